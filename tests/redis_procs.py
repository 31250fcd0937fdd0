"""Real redis-server processes for the tests: one server, a 3-master Cluster, a Sentinel set.

Everything listens on 127.0.0.1 on free ports, keeps nothing on disk (``--save ""
--appendonly no``) and lives in a temporary directory. Without ``redis-server`` the fixtures
fail with a message saying how to install it; they never skip.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Proc, free_port, wait_tcp

NO_DISK = ["--save", "", "--appendonly", "no"]


def redis_binary() -> str:
    """Path of redis-server; fails the test (never skips) when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: run `apt-get install -y redis-server` "
            "(scripts/test.sh installs it)",
            pytrace=False,
        )
    return path


def cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """``redis-cli -p PORT ARGS...``; its output without the trailing newline."""
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout.strip()


def _pair_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisServer:
    """One redis-server; can be killed, paused and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, args: list[str] | None = None):
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args or []
        self.proc: Proc | None = None
        self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again) on the same port and wait until it accepts connections."""
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.dir), *NO_DISK, *self.args]
        self.proc = Proc(args, self.dir / "redis.log")
        wait_tcp(self.port, proc=self.proc.popen)
        deadline = time.monotonic() + 10
        while cli(self.port, "PING") != "PONG" and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: connections are refused from now on."""
        assert self.proc is not None
        self.proc.popen.kill()
        self.proc.popen.wait()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop for good (resumes a paused server first so SIGTERM is handled)."""
        if self.proc is not None and self.proc.popen.poll() is None:
            self.proc.signal(signal.SIGCONT)
            self.proc.stop(timeout=5)

    def cli(self, *args: str) -> str:
        """redis-cli against this server."""
        return cli(self.port, *args)


class RedisClusterSet:
    """Three cluster-enabled masters joined with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        cluster_args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(3):
                port = _pair_port()
                node_args = [*cluster_args, "--cluster-config-file", f"nodes-{port}.conf"]
                self.nodes.append(RedisServer(workdir, port, node_args))
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            cli(self.nodes[0].port, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                "--cluster-yes", timeout=30)  # fmt: skip
            deadline = time.monotonic() + 15
            while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


class SentinelSet:
    """A primary, one replica and one sentinel watching them as ``mymaster``."""

    def __init__(self, workdir: Path) -> None:
        self.primary = RedisServer(workdir)
        self.servers = [self.primary]
        try:
            self.replica = RedisServer(workdir, args=["--replicaof", "127.0.0.1",
                                                      str(self.primary.port)])  # fmt: skip
            self.servers.append(self.replica)
            self.sentinel_port = free_port()
            conf = workdir / f"sentinel-{self.sentinel_port}.conf"
            conf.write_text(
                f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.primary.port} 1\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 5000\n"
            )
            self.sentinel = Proc([redis_binary(), str(conf), "--sentinel"],
                                 workdir / "sentinel.log")  # fmt: skip
            wait_tcp(self.sentinel_port, proc=self.sentinel.popen)
            self._wait(lambda: "slave0:" in self.primary.cli("INFO", "replication"), "replica")
            self._wait(lambda: self.master_port() == self.primary.port, "sentinel")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """``redis+sentinel://`` pointing at the sentinel."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/mymaster"

    def master_port(self) -> int | None:
        """The primary's port as the sentinel sees it now."""
        out = cli(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", "mymaster")
        lines = out.splitlines()
        return int(lines[1]) if len(lines) == 2 else None

    def failover(self) -> int:
        """``SENTINEL FAILOVER`` and wait until the replica is the writable primary."""
        old = self.master_port()
        cli(self.sentinel_port, "SENTINEL", "FAILOVER", "mymaster")
        self._wait(lambda: self.master_port() not in (None, old), "failover")
        new = self.master_port()
        assert new is not None
        self._wait(lambda: "role:master" in cli(new, "INFO", "replication"), "new primary")
        return new

    @staticmethod
    def _wait(ok: object, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():  # type: ignore[operator]
                    return
            except subprocess.SubprocessError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sentinel set: {what} not ready within {timeout}s")

    def stop(self) -> None:
        """Stop the sentinel and both servers."""
        if getattr(self, "sentinel", None) is not None:
            self.sentinel.stop(timeout=5)
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the test module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    """A 3-master Redis Cluster for the test module."""
    cluster = RedisClusterSet(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A primary/replica/sentinel set for the test module."""
    sentinels = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    yield sentinels
    sentinels.stop()

"""Real processes for integration tests: the gateway under uvicorn, the mock LLM, redis-server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "gateway"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``check()`` came true within ``timeout`` seconds (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``url`` answers (any status); fail with the process's log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_tcp(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


class Proc:
    """A subprocess with its combined output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("wb")
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT
        )

    def log(self) -> str:
        """Everything the process wrote so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


class Gateway(Proc):
    """``gateway run -c policy`` on free ports; ``url`` and ``admin`` are its base URLs."""

    def __init__(
        self,
        policy: Path,
        log: Path,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.policy = policy
        args = [
            *GATEWAY,
            "run",
            "-c",
            str(policy),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            *(extra_args or []),
        ]
        super().__init__(args, log, env)
        try:
            wait_http(f"{self.admin}/healthz", proc=self.popen)
            wait_tcp(self.port, proc=self.popen)
        except Exception as exc:
            output = self.log()
            self.stop()
            raise RuntimeError(f"gateway did not start: {exc}\n{output}") from None

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample on /metrics (0 when absent)."""
        text = httpx.get(f"{self.admin}/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
        key = f"{name}{{{want}}}" if want else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


class MockLLM(Proc):
    """The bundled mock LLM service on a free port."""

    def __init__(self, log: Path, token_latency: str = "0ms") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                *GATEWAY,
                "mock-llm",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--token-latency",
                token_latency,
            ],
            log,
        )
        wait_http(f"{self.url}/health", proc=self.popen)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    """Stop ``proc`` when the block ends."""
    try:
        yield proc
    finally:
        proc.stop()

"""``gateway run --workers N``: N worker processes on the same ports, and their supervisor.

One Python process is one core. Each worker is a whole gateway (``gateway run --worker``)
binding the proxy and admin ports with SO_REUSEPORT, so the kernel spreads connections over
them and no process sits in the request path. Metrics: the supervisor gives every worker one
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode), so any worker's
``/metrics`` shows the sums of all. Counters must be shared for limits to hold across workers,
so a policy with limits needs ``state.url`` in Redis (the memory store is per process).

The supervisor forwards SIGTERM/SIGINT (each worker drains) and SIGHUP (each reloads), and
starts a new worker when one dies; a worker that fails within its first seconds (a port in
use, a broken policy) stops them all, since a new one would fail the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from gateway.policy.schema import Policy

log = logging.getLogger("gateway.workers")

#: A worker that exits with an error sooner than this after it started could not start.
STARTUP_GRACE = 5.0
#: More restarts than this within a minute stop the supervisor (the orchestrator takes over).
MAX_RESTARTS_PER_MINUTE = 10


def check_policy(policy: Policy) -> None:
    """Raise ValueError when ``policy`` cannot run in several processes."""
    limited = policy.rate_limits is not None or any(r.rate_limits for r in policy.routes)
    if limited and policy.state.url.startswith("memory://"):
        raise ValueError(
            "--workers > 1 needs a shared state store (state.url: redis://...): with memory:// "
            "every worker would count on its own and let N times the limit through"
        )


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(self, argv: Sequence[str], workers: int) -> None:
        """``argv``: the ``gateway run`` arguments each worker gets (plus ``--worker``)."""
        self.argv = [sys.executable, "-m", "gateway", "run", *argv, "--worker"]
        self.workers = workers
        self.procs: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.restarts: list[float] = []
        own = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.metrics_dir = Path(own) if own else Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
        self._own_dir = not own

    def _spawn(self) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        proc = subprocess.Popen(self.argv, env=env, preexec_fn=_die_with_parent)
        self.procs[proc.pid] = (proc, time.monotonic())

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def run(self) -> int:
        """Supervise until every worker has exited after SIGTERM; returns the exit code."""
        # Samples of earlier runs would be summed with this one's.
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        for _ in range(self.workers):
            self._spawn()
        log.info("workers started", extra={"workers": self.workers, "pids": list(self.procs)})
        status = 0
        try:
            while self.procs:
                time.sleep(0.1)
                for pid, (proc, started) in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del self.procs[pid]
                    _mark_dead(pid, self.metrics_dir)
                    if self.stopping:
                        status = max(status, code)
                        continue
                    log.error("worker exited", extra={"pid": pid, "code": code})
                    now = time.monotonic()
                    self.restarts = [t for t in self.restarts if now - t < 60] + [now]
                    too_many = len(self.restarts) > MAX_RESTARTS_PER_MINUTE
                    # An exit code (not a signal) in the first seconds: it could not start.
                    if (code > 0 and now - started < STARTUP_GRACE) or too_many:
                        status = code or 1
                        self._signal(signal.SIGTERM, None)
                        continue
                    self._spawn()
        finally:
            for proc, _ in self.procs.values():
                proc.kill()
            if self._own_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("workers stopped", extra={"code": status})
        return status


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL, so that
    # no worker outlives it holding the ports (Linux; elsewhere workers must be stopped).
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _mark_dead(pid: int, path: Path) -> None:
    # Drops the dead worker's live gauges (in-flight, connections) from the sums.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]

"""What the limit stage costs: per request in-process, and added latency at a fixed 500 req/s.

Run ``python -m bench.ratelimit [--duration 10] [--repeat 3] [--calls 3000]``; it needs
``redis-server``, ``nginx`` and ``wrk``, and talks to 127.0.0.1 only.

Part 1 calls ``RateLimitStage.on_request`` in a loop (uvloop): no stage, the memory store,
Redis with one counter (``per_ip``) and with three (two ``per_ip`` windows and
``per_route``), and for reference the ``limits`` library's own async Redis strategy doing the
same three counters (one call each). It reports CPU µs per request (process time / calls, one
request at a time) and wall µs per request with 32 in flight, best of three rounds.

Part 2 runs one gateway per case (one process each, access log off) in front of nginx and
loads each at a fixed 500 req/s with the open-loop generator of ``bench._util``, round-robin
``--repeat`` times, keeping the run with the median p99; ``added`` is p50/p99 minus the
no-limit case's; ``max_rps_closed_loop`` is a 5 s ``wrk -c32`` run; ``state_errors`` counts
Redis calls that failed or timed out (50 ms) in all of a case's runs.

Part 3 (``--script`` runs only this part) is Redis' own CPU a request for the limit script
(``INFO commandstats``: EVALSHA µs / requests) with the four counters of ``bench.speed``'s
full chain (ip, tier, tokens, budget), the requests of a loop turn grouped into one call
(8 at a time through ``RedisStore.hit``, as under load) against one call each (the
baseline, same run), best of three rounds. ``--script --callgrind`` counts instructions
instead, with ``redis-server`` under valgrind's callgrind (the difference between 50 and 250
calls, so start-up cancels out): within ~0.5% from run to run, whatever else the machine does
(needs ``valgrind``, a Debian package).

Results: stdout and ``bench/results/ratelimit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis as redis_py
import uvloop
from limits import parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from bench import _util as bu
from gateway.context import RequestContext
from gateway.pipeline import Pipeline
from gateway.policy import load_policy_text
from gateway.stages.ratelimit import build_ratelimit_stages
from gateway.store.base import Counter
from gateway.store.redis import RedisStore, script_args
from gateway.store.script import LIMIT_SCRIPT
from gateway.telemetry import metrics

RESULTS = Path(__file__).resolve().parent / "results" / "ratelimit.json"
_ONE = "rate_limits: {per_ip: 100000000/minute}\n"
_THREE = "rate_limits: {per_ip: 100000000/minute;1000000000/day, per_route: 1000000000/minute}\n"
LIMITS = {
    "none": "",
    "memory-1": _ONE,
    "memory-3": _THREE,
    "redis-1": _ONE,
    "redis-3": _THREE,
    "redis-py-3": _THREE,
}
"""Cases: no limits, then one counter (per_ip) and three (two per_ip windows, per_route);
``redis-*`` use the gateway's lean client, ``redis-py-3`` the same store through redis-py
(the client the lean one replaced; an option only redis-py reads routes the URL to it)."""


def policy(case: str, upstream: str, redis_url: str, timeout: str = "50ms") -> str:
    """The policy of one case."""
    if case.startswith("redis-py"):
        redis_url += "?health_check_interval=0"
    state = (
        f"state: {{url: '{redis_url}', timeout: {timeout}}}\n" if case.startswith("redis") else ""
    )
    quiet = "telemetry: {access_log: false}\n"
    return f"version: 1\nupstream: {{url: '{upstream}'}}\n{state}{LIMITS[case]}{quiet}"


async def _timed(call: Callable[[], Awaitable[Any]], calls: int) -> dict[str, float]:
    """CPU and wall µs per call, one at a time and 32 in flight; best of three rounds (the
    machine is shared, so the least disturbed round is the closest to the real cost)."""
    for _ in range(200):  # warm up connections and caches
        await call()
    rounds = []
    for _ in range(3):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await call()
        cpu_us = (time.process_time() - cpu) / calls * 1e6
        seq_us = (time.perf_counter() - wall) / calls * 1e6
        wall = time.perf_counter()

        async def worker() -> None:
            for _ in range(calls // 32):
                await call()

        await asyncio.gather(*(worker() for _ in range(32)))
        par_us = (time.perf_counter() - wall) / (calls // 32 * 32) * 1e6
        rounds.append((cpu_us, seq_us, par_us))
    return {
        "cpu_us": round(min(r[0] for r in rounds), 1),
        "wall_us_1": round(min(r[1] for r in rounds), 1),
        "wall_us_32": round(min(r[2] for r in rounds), 1),
    }


async def stage_costs(redis_url: str, calls: int) -> dict[str, dict[str, float]]:
    """Part 1: per-request cost of the stage in-process."""
    out: dict[str, dict[str, float]] = {}
    for case in LIMITS:
        # a generous timeout: a busy shared machine must not open the breaker mid-measurement
        text = policy(case, "http://127.0.0.1:9", redis_url, timeout="2s")
        pipe = Pipeline(load_policy_text(text), (build_ratelimit_stages,))
        await pipe.start()
        route = pipe.router.fallback
        stages = route.before_body

        async def one(route: Any = route, stages: Any = stages) -> None:
            ctx = RequestContext({}, "r", route, "GET", "/", "192.0.2.1", [])
            for s in stages:
                await s.on_request(ctx)

        out[case] = await _timed(one, calls)
        errors = metrics.STATE_ERRORS.labels("hit")._value.get()
        if errors:
            raise RuntimeError(f"{case}: {errors} Redis calls failed; the figures are not valid")
        await pipe.close()
    storage = RedisStorage(
        redis_url.replace("redis://", "async+redis://"), implementation="redispy"
    )
    limiter = SlidingWindowCounterRateLimiter(storage)
    items = [*parse_many("100000000/minute;1000000000/day"), *parse_many("1000000000/minute")]

    async def with_limits() -> None:
        for item in items:  # the library checks one counter per call
            await limiter.hit(item, "192.0.2.1")

    out["limits-lib-redis-3"] = await _timed(with_limits, calls)
    return out


SCRIPT_COUNTERS = [
    Counter("b:{ip:192.0.2.1}:*:r60000", 10**12, 60_000),
    Counter("b:{u:bench}:*:r60000", 10**12, 60_000),
    Counter("b:{u:bench}:*:t86400000", 10**15, 86_400_000, 300),
    Counter("b:{u:bench}:*:b", 10**15, 86_400_000, 50, True),
]
"""The counters of ``bench.speed``'s full chain (ip, tier, tokens, budget) for part 3."""


def _evalsha_usec(url: str) -> float:
    out = subprocess.run(
        ["redis-cli", "-u", url, "INFO", "commandstats"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return float(line.split("usec=")[1].split(",")[0])
    return 0.0


async def script_costs(redis_url: str, calls: int) -> dict[str, float]:
    """Redis' CPU a request for the limit script, one request a call vs 8 a call."""
    rs = RedisStore(redis_url, 1.0)
    counters = SCRIPT_COUNTERS
    out: dict[str, float] = {}
    try:
        await rs.hit(counters)  # loads the script
        for _ in range(3):
            for name, together in (("one_a_call", 1), ("eight_a_call", 8)):
                before = _evalsha_usec(redis_url)
                for _ in range(calls // together):
                    await asyncio.gather(*(rs.hit(counters) for _ in range(together)))
                per = (_evalsha_usec(redis_url) - before) / (calls // together * together)
                out[name] = round(min(out.get(name, per), per), 1)
    finally:
        await rs.close()
    out["ratio"] = round(out["eight_a_call"] / out["one_a_call"], 2)
    return out


def _instructions(script: str, together: int, calls: int, workdir: Path) -> int:
    """Instructions redis-server runs in all, with ``calls`` script calls of ``together``
    requests' batches each (:data:`SCRIPT_COUNTERS`)."""
    port = bu.free_port()
    out = workdir / f"callgrind.{port}"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    bu.wait_port(port, timeout=60)
    keys, argv = script_args("hit", [SCRIPT_COUNTERS] * together, None)
    client = redis_py.Redis(port=port)
    sha = client.script_load(script)
    pipe = client.pipeline(transaction=False)
    for _ in range(calls):
        pipe.evalsha(sha, len(keys), *keys, *argv)
    pipe.execute()
    with contextlib.suppress(redis_py.ConnectionError):
        client.shutdown(nosave=True)
    err = proc.communicate(timeout=120)[1]
    return int(err.split("Collected : ")[1].split()[0])


def script_instructions(workdir: Path) -> dict[str, float]:
    """Instructions a request in Redis for the limit script, one request a call vs 8."""
    out: dict[str, float] = {}
    for name, together in (("one_a_call", 1), ("eight_a_call", 8)):
        few = _instructions(LIMIT_SCRIPT, together, 50, workdir)
        many = _instructions(LIMIT_SCRIPT, together, 250, workdir)
        out[name] = round((many - few) / (200 * together))
    out["ratio"] = round(out["eight_a_call"] / out["one_a_call"], 2)
    return out


def _state_errors(admin: int) -> float:
    """``gateway_state_errors_total{op="hit"}`` of a gateway: Redis calls that timed out."""
    samples = bu.metric_samples(admin, "gateway_state_errors_total")
    return sum(value for labels, value in samples if labels.get("op") == "hit")


def latency_at_rate(redis_url: str, duration: int, repeat: int, workdir: Path) -> dict[str, Any]:
    """Part 2: one gateway per case, all started at once, each loaded at a fixed 500 req/s,
    round-robin ``repeat`` times (so a disturbance of the shared machine hits every case
    alike); the run with the median p99 is kept per case."""
    nginx_port = bu.free_port()
    nginx = bu.start_nginx(nginx_port, "static", None, workdir / "nginx")
    bu.wait_port(nginx_port)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    admins: dict[str, int] = {}
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in LIMITS}
    out: dict[str, Any] = {}
    try:
        for case in LIMITS:
            path = workdir / f"{case}.yaml"
            path.write_text(policy(case, f"http://127.0.0.1:{nginx_port}", redis_url))
            port, admin = bu.free_port(), bu.free_port()
            cmd = [sys.executable, "-m", "gateway", "run", "-c", str(path), "--listen",
                   f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]  # fmt: skip
            procs[case] = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            urls[case] = f"http://127.0.0.1:{port}/x"
            admins[case] = admin
        for url in urls.values():
            bu.wait_port(int(url.split(":")[2].split("/")[0]), timeout=20)
            bu.run_wrk(url, duration_s=2, rate=500, connections=32)  # warm-up
        for _ in range(repeat):
            for case, url in urls.items():
                runs[case].append(bu.run_wrk(url, duration_s=duration, rate=500, connections=32))
        for case, url in urls.items():
            res = sorted(runs[case], key=lambda r: float(r["p99_ms"]))[len(runs[case]) // 2]
            res["p99_ms_all_runs"] = [round(float(r["p99_ms"]), 2) for r in runs[case]]
            res["max_rps_closed_loop"] = bu.run_wrk(url, duration_s=5)["rps"]
            res["state_errors"] = _state_errors(admins[case])
            out[case] = res
    finally:
        for proc in procs.values():
            bu.stop_process(proc)
        bu.stop_process(nginx)
    base = out["none"]
    for res in out.values():
        res["added_p50_ms"] = round(res["p50_ms"] - base["p50_ms"], 3)
        res["added_p99_ms"] = round(res["p99_ms"] - base["p99_ms"], 3)
    return out


def main() -> None:
    """Run both parts and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit")
    parser.add_argument("--duration", type=int, default=10, help="seconds per 500 req/s run")
    parser.add_argument("--calls", type=int, default=3000, help="stage calls per case")
    parser.add_argument("--repeat", type=int, default=3, help="500 req/s runs per case")
    parser.add_argument("--script", action="store_true", help="only part 3 (the script)")
    parser.add_argument(
        "--callgrind", action="store_true", help="with --script: count instructions (valgrind)"
    )
    args = parser.parse_args()
    if args.script and args.callgrind:
        with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
            counts = script_instructions(Path(tmp))
        print(json.dumps({"redis_instructions_per_request": counts}, indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        port = bu.free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            bu.wait_port(port)
            url = f"redis://127.0.0.1:{port}"
            script = uvloop.run(script_costs(url, args.calls))
            print(json.dumps({"redis_cpu_us_per_request": script}, indent=2))
            if args.script:
                return
            stage = uvloop.run(stage_costs(url, args.calls))
            print(json.dumps({"stage": stage}, indent=2))
            rate = latency_at_rate(url, args.duration, args.repeat, Path(tmp))
        finally:
            bu.stop_process(redis)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(__import__("os").sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "stage_per_request": stage,
        "redis_cpu_us_per_request": script,
        "gateway_at_500_rps": rate,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"gateway_at_500_rps": rate}, indent=2))


if __name__ == "__main__":
    main()

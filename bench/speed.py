"""The full policy chain against the gateway's own pass-through and nginx, in one run.

    python -m bench.speed [--duration 10] [--rate 500] [--write-readme]

Starts everything itself: nginx answering a chat completion (the mock upstream), nginx as a
reverse proxy in front of it, ``redis-server``, an OTLP sink, and the gateway six times: with
no policy (pass-through), with the full chain (JWT, Redis per-IP and per-tier limits and token
and cost budgets, input and output guardrails, metrics, tracing exported at sampling 0.1), the
full chain with ``state.local_share: 0.1`` (an opt-in: limits decided in-process on room
leased from Redis), these two and the pass-through with ``--workers 2``. Load: wrk -c32 -t2
POST of a 1 KB chat body; then a fixed 500 req/s open-loop run, direct vs each full chain,
for the latency added (interleaved over the rounds too, each figure, a percentile or the CPU,
the median of its rounds). In the fixed-rate runs each gateway also reports its own view,
from its ``gateway_added_latency_seconds`` histogram (p50/p99 interpolated inside the
buckets): the time it added, without the loopback hops the client's figure also carries.
RSS of each full-chain worker is sampled under load, and each gateway's CPU time (its serving
processes, ``/proc``) per request served: the throughput ratios without the noise of how much
of the two cores the other processes left it. Beside it, the CPU a request of everything else
on the same cores (the span-export processes, Redis, the upstream nginx, wrk): with G and O
the one-worker figures, two workers on two cores give at most 2G / (G + O) of one worker's
throughput, printed with the workers check; under the checks, whether any gateway could pass
both throughput checks on these cores (:func:`throughput_window`). Around the fixed-rate runs
the :mod:`bench.machine` probe records how slowly this machine runs a process that has just
slept (those figures move with it). Results: stdout, ``bench/results/speed.json``;
``--write-readme`` fills the README's speed section.

Targets (issue: speed): full chain ≥ 60% of pass-through and ≥ 6% of nginx; added p50 ≤ 0.5 ms
and p99 ≤ 2 ms at 500 req/s; ``--workers 2`` ≥ 1.6x one worker; RSS per worker under load
≤ 120 MB. Needs ``wrk``, ``nginx`` and ``redis-server`` on PATH (``apt-get install wrk
nginx-light redis-server``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import machine
from bench._util import (
    cpu_seconds,
    free_port,
    json_body,
    median_by_rps,
    metric_samples,
    run_wrk,
    start_nginx,
    stop_process,
    wait_port,
    write_readme_section,
)
from bench.proxy import ROOT, PeakRss, start_gateway
from bench.telemetry import _Sink

RESULTS = ROOT / "bench" / "results" / "speed.json"
PATH = "/v1/chat/completions"
SECRET = "bench-secret-0123456789abcdef0123456789"
ANSWER = (
    '{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"Here is a short and perfectly safe answer."},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":260,"completion_tokens":12,'
    '"total_tokens":272}}'
)
HUGE = "1000000000/minute"


def full_chain_policy(redis_port: int, sink_port: int) -> str:
    """Every stage on; limits far above the load so that every request is allowed.

    ``verdict_cache: 0``: every request here sends the same prompt, which the input
    guardrail's cache would answer after the first; real prompts differ, so the bench
    measures the check itself (``python -m bench.guard_cost`` measures the cache)."""
    return f"""
state: {{url: "redis://127.0.0.1:{redis_port}/0", on_error: deny, timeout: 500ms}}
auth:
  required: true
  algorithms: [HS256]
  secret: {{env: BENCH_JWT_SECRET}}
  default_tier: pro
  forward_headers: {{sub: X-User-Id, tier: X-User-Tier}}
rate_limits:
  per_ip: {HUGE}
  per_tier: {{pro: {HUGE}}}
  tokens_per_tier: {{pro: 1000000000000/day}}
  daily_budget_usd: {{pro: 1000000000}}
guardrails:
  input: {{format: openai, max_chars: 4000, strip_control: true, rules: [prompt-injection],
           action: block, verdict_cache: 0}}
  output: {{max_chars: 5000, rules: [unsafe-markup], fallback: "Sorry.", action: replace}}
cost:
  default: {{input_per_1k: 0.001, output_per_1k: 0.002}}
telemetry: {{otlp_endpoint: "http://127.0.0.1:{sink_port}", sample_ratio: 0.1,
             log_level: warning}}
routes:
  - {{name: chat, path: {PATH}, methods: [POST], layer: layer3}}
"""


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A throwaway ``redis-server`` on loopback without persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen(
        [*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (the workers of ``--workers N``)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def make_token(policy: Path) -> str:
    """A pro-tier token signed with the bench secret, via ``gateway token``."""
    env = {**os.environ, "BENCH_JWT_SECRET": SECRET}
    cmd = [sys.executable, "-m", "gateway", "token", "--sub", "bench", "--tier", "pro"]
    out = subprocess.run(
        [*cmd, "--ttl", "1h", "-c", str(policy)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"gateway token failed: {out.stderr}")
    return out.stdout.strip()


SHARE = 0.1
"""``state.local_share`` of the rows that show it (a tenth of a counter's room per process)."""


def shared_policy(redis_port: int, sink_port: int) -> str:
    """The full chain with ``state.local_share``: most requests admitted without a Redis
    round trip, their additions written in the background."""
    return full_chain_policy(redis_port, sink_port).replace(
        "on_error: deny,", f"on_error: deny, local_share: {SHARE},"
    )


def measure(duration: int, rate: int, workers: bool = True, rounds: int = 1) -> dict[str, Any]:
    """Run the comparison; returns the results document."""
    body = json_body(1024)
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "duration_s": duration,
    }
    sink_port = free_port()
    sink = ThreadingHTTPServer(("127.0.0.1", sink_port), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        up_port, ngx_port, redis_port = free_port(), free_port(), free_port()
        try:
            procs.append(start_nginx(up_port, "static", None, work / "up", answer=ANSWER))
            procs.append(start_nginx(ngx_port, "proxy", up_port, work / "ngx"))
            procs.append(start_redis(redis_port, work))
            for port in (up_port, ngx_port, redis_port):
                wait_port(port)
            up_pid, redis_pid = procs[0].pid, procs[2].pid
            (work / "bare").mkdir()
            bare, bare_port = start_gateway(up_port, work / "bare")
            procs.append(bare)
            os.environ["BENCH_JWT_SECRET"] = SECRET
            full_text = full_chain_policy(redis_port, sink_port)
            shared_text = shared_policy(redis_port, sink_port)
            chains = [("full chain", full_text, 1), ("full chain, local_share", shared_text, 1)]
            if workers:
                chains += [
                    ("full chain, 2 workers", full_text, 2),
                    ("full chain, local_share, 2 workers", shared_text, 2),
                ]
            gateways: dict[str, subprocess.Popen[bytes]] = {}
            admins = {"pass-through": admin_port(work / "bare")}
            targets: dict[str, tuple[int, dict[str, str] | None]] = {
                "direct": (up_port, None),
                "nginx": (ngx_port, None),
                "pass-through": (bare_port, None),
            }
            if workers:
                # what two workers give a gateway with no policy at all on these cores: the
                # workers check's yardstick (see throughput_window)
                (work / "bare2").mkdir()
                bare2, bare2_port = start_gateway(
                    up_port, work / "bare2", extra_args=["--workers", "2"]
                )
                procs.append(bare2)
                gateways["pass-through, 2 workers"] = bare2
                targets["pass-through, 2 workers"] = (bare2_port, None)
            for i, (name, text, n) in enumerate(chains):
                (work / f"chain{i}").mkdir()
                extra = ["--workers", str(n)] if n > 1 else None
                proc, port = start_gateway(
                    up_port, work / f"chain{i}", text, replace_telemetry=True, extra_args=extra
                )
                procs.append(proc)
                gateways[name] = proc
                targets[name] = (port, None)
                admins[name] = admin_port(work / f"chain{i}")
            token = make_token(work / "chain0" / "policy.yaml")
            auth = {"Authorization": f"Bearer {token}"}
            for name, _, _ in chains:
                targets[name] = (targets[name][0], auth)
            time.sleep(1)
            samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            serving = {"pass-through": bare, **gateways}
            for _, (name, (port, headers)) in itertools.product(range(rounds), targets.items()):
                url = f"http://127.0.0.1:{port}{PATH}"
                run_wrk(url, duration_s=2, method="POST", body=body, headers=headers)
                proc = serving.get(name)
                if proc is None:
                    samples[name].append(
                        run_wrk(url, duration_s=duration, method="POST", body=body, headers=headers)
                    )
                    continue
                pids = children(proc.pid) if name.endswith("2 workers") else [proc.pid]
                # each worker's span-export process (gateway.telemetry.export_process)
                helpers = [c for pid in pids for c in children(pid)]
                # everything else a request makes work for on the same cores: the export
                # processes, Redis, the upstream nginx (master and worker) and wrk itself
                parts = {
                    "export": helpers,
                    "redis": [redis_pid],
                    "upstream": [up_pid, *children(up_pid)],
                }
                with contextlib.ExitStack() as stack:
                    peaks = [stack.enter_context(PeakRss(pid)) for pid in pids]
                    helper_peaks = [stack.enter_context(PeakRss(pid)) for pid in helpers]
                    cpu, load_cpu = cpu_seconds(pids), _waited()
                    part_cpu = {k: cpu_seconds(v) for k, v in parts.items()}
                    run = run_wrk(
                        url, duration_s=duration, method="POST", body=body, headers=headers
                    )
                    cpu = cpu_seconds(pids) - cpu
                    part_cpu = {k: cpu_seconds(parts[k]) - v for k, v in part_cpu.items()}
                    part_cpu["wrk"] = _waited() - load_cpu
                    other_cpu = sum(part_cpu.values())
                # The serving processes' CPU a request: what the throughput ratios measure,
                # without the share of the cores the other processes left them.
                done = max(1.0, run["rps"] * duration)
                run["cpu_us_per_req"] = round(1e6 * cpu / done)
                run["others_cpu_us_per_req"] = round(1e6 * other_cpu / done)
                run["others_cpu_parts_us_per_req"] = {
                    k: round(1e6 * v / done) for k, v in part_cpu.items()
                }
                samples[name].append(run)
                if name.startswith("pass-through"):
                    continue
                rss = max(peak.peak for peak in peaks)
                out["full_chain_rss_mb"] = max(out.get("full_chain_rss_mb", 0), round(rss, 1))
                if helper_peaks:
                    helper = max(peak.peak for peak in helper_peaks)
                    out["export_process_rss_mb"] = max(
                        out.get("export_process_rss_mb", 0), round(helper, 1)
                    )
            # Interleaved rounds, the median of each: this 2-core VM drifts between runs.
            out["throughput"] = {name: median_by_rps(runs) for name, runs in samples.items()}
            out["rounds"] = rounds
            fixed_runs: dict[str, list[dict[str, Any]]] = {}
            # The fixed-rate figures follow how slowly this machine runs a process that has
            # just slept, which drifts between runs: measured on both sides of them.
            time.sleep(2)  # the throughput runs' last work (export, Redis) done first
            wake = [wake_probe()]
            fixed_names = ("direct", "pass-through", "full chain", "full chain, local_share")
            for _, name in itertools.product(range(rounds), fixed_names):
                port, headers = targets[name]
                url = f"http://127.0.0.1:{port}{PATH}"
                run_wrk(url, duration_s=2, rate=rate, method="POST", body=body, headers=headers)
                proc = serving.get(name)
                cpu = cpu_seconds([proc.pid]) if proc is not None else 0.0
                admin = admins.get(name)
                before = added_buckets(admin) if admin else {}
                run = run_wrk(
                    url, duration_s=duration, rate=rate, method="POST", body=body, headers=headers
                )
                if admin:
                    # The gateway's own view: its duration less the upstream's time, without
                    # the client's side of the loopback.
                    delta = _delta(added_buckets(admin), before)
                    run["own_p50_ms"] = bucket_quantile(delta, 0.5)
                    run["own_p99_ms"] = bucket_quantile(delta, 0.99)
                if proc is not None:
                    # At a fixed rate the gateway sleeps between requests; what a request then
                    # costs, against the closed-loop figure, is what `python -m bench.machine`
                    # explains.
                    done = max(1, int(run.get("requests") or run["rps"] * duration))
                    run["cpu_us_per_req"] = round(1e6 * (cpu_seconds([proc.pid]) - cpu) / done)
                fixed_runs.setdefault(name, []).append(run)
            # Interleaved like the throughput rounds; each figure is its own median.
            fixed = {name: median_fields(runs) for name, runs in fixed_runs.items()}
            out["fixed_rate"] = {"rate": rate, **fixed}
            out["machine_wake"] = [*wake, wake_probe()]
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            sink.shutdown()
    return out


def median_fields(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One fixed-rate run made of several: each number the median of its values (the
    higher middle one of an even count), anything else as the first run has it. A
    percentile's median over rounds, not a percentile over every request: the generator
    reports percentiles only."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = sorted(r[key] for r in runs if isinstance(r.get(key), int | float))
            out[key] = values[len(values) // 2]
    out["rounds"] = len(runs)
    return out


def _waited() -> float:
    """CPU seconds of this process's children that have ended and been waited for (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def workers_bound(gateway_us: float, others_us: float) -> float:
    """The most two workers can give over one on two cores shared with the other processes:
    one worker is held to one core, ``1 / G`` requests a second while the others fit on the
    second core; two fill both, ``2 / (G + O)``; their ratio is ``2G / (G + O)``."""
    return 2 * gateway_us / (gateway_us + others_us)


def wake_probe() -> dict[str, float]:
    """This machine's state as :mod:`bench.machine` measures it: µs of a unit of plain Python
    work back to back, and how many times that it takes right after a 2 ms sleep (the gap
    between requests at 500 req/s)."""
    res = machine.measure(300, (0.0, 2.0))
    return {"warm_us": round(res[0.0], 1), "after_2ms": round(res[2.0] / res[0.0], 2)}


def throughput_window(pass_us: float, others_us: float) -> tuple[float, float]:
    """The one-worker gateway CPU a request ``G`` that both throughput checks allow at once,
    as ``(low, high)``; ``low > high`` when no gateway can pass both on these cores.

    The first check (≥ 60% of pass-through, ``P`` its CPU a request) needs ``G ≤ P / 0.6``;
    the workers check can only pass when its bound (:func:`workers_bound`) reaches 1.6,
    ``2G / (G + O) ≥ 1.6``, that is ``G ≥ 4·O``."""
    return 4 * others_us, pass_us / 0.6


def admin_port(workdir: Path) -> int:
    """The admin port :func:`bench.proxy.start_gateway` wrote into ``workdir``'s policy."""
    text = (workdir / "policy.yaml").read_text()
    return int(text.split("admin_listen: 127.0.0.1:", 1)[1].split()[0])


def added_buckets(port: int) -> dict[float, float]:
    """Cumulative ``gateway_added_latency_seconds`` buckets (all endpoints): upper bound in
    seconds → count."""
    out: dict[float, float] = {}
    for labels, value in metric_samples(port, "gateway_added_latency_seconds_bucket"):
        bound = float(labels["le"])  # "+Inf" included
        out[bound] = out.get(bound, 0.0) + value
    return out


def _delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """``q``-quantile in ms from cumulative buckets, interpolated linearly inside the bucket
    as Prometheus' ``histogram_quantile`` does; None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000
            inside = count - below
            frac = (rank - below) / inside if inside else 1.0
            return (lower + (bound - lower) * frac) * 1000
        lower, below = bound, count
    return lower * 1000


def summarise(res: dict[str, Any]) -> list[str]:
    """The Markdown tables: throughput with ratios, then the checks against the targets."""
    t = res["throughput"]
    rps = {name: float(r["rps"]) for name, r in t.items()}
    lines = [
        f"Measured {res['date']} on {res['machine']}; wrk -c32 -t2, {res['duration_s']} s a "
        f"run, median of {res.get('rounds', 1)} interleaved rounds, POST of a 1 KB chat body. "
        "Command: `python -m bench.speed`.",
        "",
        "| target | req/s | p50 / p99 ms | vs pass-through | vs nginx | gateway CPU µs/req "
        "| others' CPU µs/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in t.items():
        bare, nginx = 100 * rps[name] / rps["pass-through"], 100 * rps[name] / rps["nginx"]
        cpu, others = r.get("cpu_us_per_req"), r.get("others_cpu_us_per_req")
        lines.append(
            f"| {name} | {rps[name]:.0f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
            f"{bare:.0f}% | {nginx:.1f}% | {cpu if cpu is not None else '—'} "
            f"| {others if others is not None else '—'} |"
        )
    parts = t.get("full chain", {}).get("others_cpu_parts_us_per_req")
    split = ""
    if parts:
        split = " Full chain's, by part: " + ", ".join(f"{k} {v}" for k, v in parts.items()) + "."
    lines += [
        "",
        "Others' CPU: the span-export processes, Redis, the upstream nginx and wrk, a request "
        "(`/proc` and `getrusage`)." + split,
    ]
    f = res["fixed_rate"]
    lines += _fixed_rate_table(f)
    wake = res.get("machine_wake")
    if wake:
        lines += [
            "",
            "This machine before and after the fixed-rate runs (`python -m bench.machine`): "
            + " and ".join(f"{w['warm_us']:.0f}" for w in wake)
            + " µs of plain Python work back to back, "
            + " and ".join(f"{w['after_2ms']:.2f}x" for w in wake)
            + " that right after a 2 ms sleep.",
        ]
    lines += ["", "| check | target | full chain | with `local_share` |", "|---|---|---|---|"]
    rss = res["full_chain_rss_mb"]
    cells: dict[str, list[str]] = {}
    for suffix in ("", ", local_share"):
        name = "full chain" + suffix
        add50 = f[name]["p50_ms"] - f["direct"]["p50_ms"]
        add99 = f[name]["p99_ms"] - f["direct"]["p99_ms"]
        vs_bare = rps[name] / rps["pass-through"]
        vs_nginx = rps[name] / rps["nginx"]
        two = rps.get(name + ", 2 workers", 0.0) / rps[name]
        cells.setdefault("full chain / pass-through", []).append(
            f"{_shown(100 * vs_bare, 0, 60, at_least=True)}% {_ok(vs_bare >= 0.6)}"
        )
        cells.setdefault("full chain / nginx", []).append(
            f"{_shown(100 * vs_nginx, 1, 6, at_least=True)}% {_ok(vs_nginx >= 0.06)}"
        )
        cells.setdefault(f"added at {f['rate']} req/s, p50", []).append(
            f"+{_shown(add50, 2, 0.5, at_least=False)} ms {_ok(add50 <= 0.5)}"
        )
        cells.setdefault(f"added at {f['rate']} req/s, p99", []).append(
            f"+{_shown(add99, 2, 2.0, at_least=False)} ms {_ok(add99 <= 2.0)}"
        )
        bound = ""
        g, o = t[name].get("cpu_us_per_req"), t[name].get("others_cpu_us_per_req")
        if g and o is not None:
            bound = f" (2G / (G + O) of one worker's run: {workers_bound(g, o):.2f}x)"
        cells.setdefault("--workers 2 / 1 worker", []).append(
            f"{_shown(two, 2, 1.6, at_least=True)}x {_ok(two >= 1.6)}{bound}"
            if two
            else "not measured (--no-workers)"
        )
    targets = ["≥ 60%", "≥ 6%", "≤ 0.5 ms", "≤ 2 ms", "≥ 1.6x"]
    for (check, values), target in zip(cells.items(), targets, strict=True):
        lines.append(f"| {check} | {target} | {values[0]} | {values[1]} |")
    helper = res.get("export_process_rss_mb")
    extra = f" (its span-export process: {helper} MB more)" if helper else ""
    lines.append(
        f"| RSS per worker under load | ≤ 120 MB | {rss} MB {_ok(rss <= 120)}{extra} | (all) |"
    )
    return lines + _window_lines(t)


def _window_lines(t: dict[str, Any]) -> list[str]:
    """Whether any gateway could pass both throughput checks in this run (see
    :func:`throughput_window`), and the least the bench's own processes leave for the rest."""
    bare, full = t.get("pass-through", {}), t.get("full chain", {})
    p, o = bare.get("cpu_us_per_req"), full.get("others_cpu_us_per_req")
    if not p or o is None:
        return []
    low, high = throughput_window(p, o)
    # wrk and the upstream nginx cost a request least at the pass-through's rate, the
    # fastest any gateway here runs: what they cost there is in every gateway's O
    own = sum(bare.get("others_cpu_parts_us_per_req", {}).get(k, 0) for k in ("wrk", "upstream"))
    verdict = (
        "no gateway passes both"
        if low > high
        else f"a gateway with G in [{low:.0f}, {high:.0f}] µs could"
    )
    return [
        "",
        f"Both throughput checks at once (one worker's G, O): the first needs G ≤ P / 0.6 = "
        f"{high:.0f} µs, the workers bound 1.6x needs G ≥ 4·O = {low:.0f} µs: {verdict}. "
        f"wrk and the upstream nginx alone cost {own} µs a request at the pass-through's rate "
        f"(their least here), so the window stays empty while Redis and the span export "
        f"together cost more than P / 2.4 - {own} = {p / 2.4 - own:.1f} µs a request."
        + _bare_workers(t),
    ]


def _bare_workers(t: dict[str, Any]) -> str:
    """What two workers gave the pass-through itself, with its bound, when it was run."""
    two, bare = t.get("pass-through, 2 workers"), t.get("pass-through", {})
    if not two or not bare.get("rps"):
        return ""
    ratio = two["rps"] / bare["rps"]
    g, o = bare.get("cpu_us_per_req"), bare.get("others_cpu_us_per_req")
    bound = f" (its 2G / (G + O): {workers_bound(g, o):.2f}x)" if g and o is not None else ""
    return f" Two workers give the pass-through itself {ratio:.2f}x{bound}."


def _fixed_rate_table(f: dict[str, Any]) -> list[str]:
    """The fixed-rate runs: latency added over direct and the gateway's CPU a request."""
    direct = f["direct"]
    lines = [
        "",
        f"At a fixed {f['rate']} req/s (open loop, `{direct.get('generator', '?')}`, 32 "
        f"connections), the same body; each figure the median of {direct.get('rounds', 1)} "
        "interleaved rounds:",
        "",
        "| target | p50 / p99 ms | added p50 / p99 ms | gateway's own p50 / p99 ms "
        "| gateway CPU µs/req |",
        "|---|---|---|---|---|",
    ]
    for name, r in f.items():
        if not isinstance(r, dict):
            continue
        added = "— | — | —"
        if name != "direct":
            add50, add99 = r["p50_ms"] - direct["p50_ms"], r["p99_ms"] - direct["p99_ms"]
            own = "—"
            if r.get("own_p50_ms") is not None:
                own = f"{r['own_p50_ms']:.2f} / {r['own_p99_ms']:.2f}"
            added = f"+{add50:.2f} / +{add99:.2f} | {own} | {r.get('cpu_us_per_req', '—')}"
        lines.append(f"| {name} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {added} |")
    return lines


def _shown(value: float, digits: int, target: float, at_least: bool) -> str:
    """``value`` with ``digits`` decimals, or as many more (up to four) as it takes for the
    figure shown not to contradict its check against ``target``: 1.5996x beside ❌ shows as
    1.5996x, not 1.60x; anywhere else it reads as in the other tables."""
    passed = value >= target if at_least else value <= target
    for more in range(5):
        text = f"{value:.{digits + more}f}"
        shown = float(text)
        if (shown >= target if at_least else shown <= target) == passed:
            break
    return text


def _ok(passed: bool) -> str:
    return "✅" if passed else "❌"


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 2 run")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved sweeps (median)")
    args = parser.parse_args()
    res = measure(args.duration, args.rate, workers=not args.no_workers, rounds=args.rounds)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    lines = summarise(res)
    print("\n".join(lines))
    if args.write_readme:
        write_readme_section("<!-- bench:speed:start -->", "<!-- bench:speed:end -->", lines)


if __name__ == "__main__":
    main()

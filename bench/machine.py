"""How much slower this machine runs the same Python work right after the process slept.

    python -m bench.machine [--repeat 400]

A request at a fixed 500 req/s finds the gateway asleep: it wakes for the request, sleeps
while Redis and the upstream answer, and wakes again for each answer. On the project's 2-core
VM the gateway then spends ~2-3x the CPU a request it spends under saturation (``gateway CPU
µs/req`` at 500 req/s against the closed-loop figure in ``python -m bench.speed``), and the
p50 follows. This probe shows that the machine, not the gateway, makes the difference: it
times one unit of plain Python work (decode a 1 KB chat body, search it with a regex, encode
it again: ~60-100 µs warm) back to back, and after sleeping 0.5, 2 and 10 ms before each
unit, and prints the medians and their ratio to the back-to-back one. No server is involved.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

GAPS_MS = (0.0, 0.5, 2.0, 10.0)
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hello world " * 80}] * 3}
)
RULE = re.compile(r"ignore (all )?previous|system prompt|jailbreak", re.IGNORECASE)


def unit() -> None:
    """One unit of request-like work."""
    doc = json.loads(BODY)
    RULE.search(doc["messages"][0]["content"])
    json.dumps(doc)


def measure(repeat: int, gaps: tuple[float, ...] = GAPS_MS) -> dict[float, float]:
    """Median µs of one :func:`unit` after each gap (ms), over ``repeat`` units."""
    out: dict[float, float] = {}
    for gap in gaps:
        times = []
        for _ in range(repeat):
            if gap:
                time.sleep(gap / 1000)
            start = time.perf_counter()
            unit()
            times.append(time.perf_counter() - start)
        out[gap] = statistics.median(times) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.machine", description=__doc__)
    parser.add_argument("--repeat", type=int, default=400)
    args = parser.parse_args()
    res = measure(args.repeat)
    warm = res[0.0]
    print("| sleep before each unit | median µs | vs back to back |")
    print("|---|---|---|")
    for gap, us in res.items():
        label = "none (back to back)" if gap == 0 else f"{gap:g} ms"
        print(f"| {label} | {us:.0f} | {us / warm:.2f}x |")


if __name__ == "__main__":
    main()

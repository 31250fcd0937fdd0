"""Quality of the shipped rule packs on the public corpora: detection and false positives.

Run: ``python -m bench.guard_quality [--corpora ../shared/corpora]``. Reads the corpora in
place (never copies them), prints one table per section and writes
``bench/results/guard_quality.json``. Every decision is the gateway's own: prompts go through
:meth:`gateway.stages.guard_input.InputGuardStage.verdict` with the default input settings
(``decode: [url, base64]``), answers through :class:`gateway.guard.output.AnswerChecker`
with the default output settings (``skip_code``, ``decode: [html, url]``).

Sections:

* ``prompts``: ``prompt-injection`` detection per attack category and per length band
  (indirect BIPIA items scored apart: they read as harmless on their own), false positives per
  benign category (ordinary requests vs. the NotInject hard negatives);
* ``evasions``: the direct attacks rewritten with zero-width characters, look-alike letters
  (Cyrillic/Greek), fullwidth and mathematical letters, spacing (letter-spaced words, odd
  whitespace), random case, URL encoding and base64, each caught as often as the originals?;
* ``waf``: the ``waf`` pack on the OWASP CRS 941/942 regression requests (query parameters
  and body, as ``format: text`` with ``query_params: ["*"]`` checks them), by paranoia level;
  payloads the gateway does not look at (headers, cookies, the path) are counted apart;
* ``output``: ``unsafe-markup`` on the XSS payloads per kind and on benign LLM answers.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from gateway.guard.output import AnswerChecker
from gateway.policy.sections import InputGuardConfig, OutputGuardConfig
from gateway.stages.guard_input import InputGuardStage

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "guard_quality.json"
INDIRECT = "indirect_injection_bipia"
BANDS = ((0, 200), (200, 1000), (1000, 3000), (3000, 10**9))
_LOOKALIKE = dict(
    zip(
        "aceopxyiABCEHKMOPTX",
        "\u0430\u0441\u0435\u043e\u0440\u0445\u0443\u0456\u0410\u0412\u0421\u0415\u041d\u041a\u041c\u041e\u0420\u0422\u0425",
        strict=True,
    )
)  # Cyrillic
_GREEK = dict(
    zip(
        "aeiknoptuvxABEHIKMNOPTXYZ",
        "\u03b1\u03b5\u03b9\u03ba\u03b7\u03bf\u03c1\u03c4\u03c5\u03bd\u03c7\u0391\u0392\u0395\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a7\u03a5\u0396",
        strict=True,
    )
)


def _read(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rate(hit: int, total: int) -> dict[str, Any]:
    return {"hit": hit, "total": total, "rate": round(hit / total, 4) if total else None}


def _table(title: str, rows: dict[str, dict[str, Any]], label: str) -> None:
    print(f"\n{title}\n{'category':44} {label:>10} {'n':>6} {'rate':>8}")
    for name, r in rows.items():
        rate = f"{r['rate']:.1%}" if r["rate"] is not None else "-"
        print(f"{name:44} {r['hit']:>10} {r['total']:>6} {rate:>8}")


# ---- evasions: deterministic rewrites of an attack text -------------------------------------


def _zero_width(text: str, rng: random.Random) -> str:
    marks = "\u200b\u200c\u200d\u2060\ufeff"
    return "".join(c + rng.choice(marks) if c.isalpha() and rng.random() < 0.5 else c for c in text)


def _homoglyph(text: str, rng: random.Random) -> str:
    table = _LOOKALIKE if rng.random() < 0.5 else _GREEK
    return "".join(table.get(c, c) if rng.random() < 0.6 else c for c in text)


def _fullwidth(text: str, rng: random.Random) -> str:
    def wide(c: str) -> str:
        if "!" <= c <= "~":
            return chr(ord(c) + 0xFEE0)
        return c

    def bold(c: str) -> str:
        if "a" <= c <= "z":
            return chr(0x1D41A + ord(c) - 97)
        if "A" <= c <= "Z":
            return chr(0x1D400 + ord(c) - 65)
        return c

    return "".join((wide if rng.random() < 0.5 else bold)(c) for c in text)


def _spacing(text: str, rng: random.Random) -> str:
    words = text.split()
    out = [" ".join(w) if len(w) > 2 and rng.random() < 0.5 else w for w in words]
    gaps = ["   ", "\t", "  \n ", "\u00a0\u00a0 "]
    return "".join(w + rng.choice(gaps) for w in out).rstrip()


def _case(text: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)


def _url(text: str, rng: random.Random) -> str:
    return quote(text, safe="")


def _base64(text: str, rng: random.Random) -> str:
    return base64.b64encode(text.encode()).decode()


EVASIONS: dict[str, Callable[[str, random.Random], str]] = {
    "zero-width characters": _zero_width,
    "look-alike letters (Cyrillic/Greek)": _homoglyph,
    "fullwidth / mathematical letters": _fullwidth,
    "spacing (letter-spaced words, odd gaps)": _spacing,
    "random case": _case,
    "URL encoding": _url,
    "base64": _base64,
}


# ---- sections --------------------------------------------------------------------------------


def prompts(corpora: Path, stage: InputGuardStage) -> dict[str, Any]:
    """Detection per attack category and length band; false positives per benign category."""
    detect: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    bands: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in _read(corpora / "prompts_attack.dev.jsonl"):
        hit = stage.verdict(row["text"]) is not None
        cat = row["category"]
        detect[cat][0] += hit
        detect[cat][1] += 1
        if cat != INDIRECT:
            detect["= direct (all but BIPIA)"][0] += hit
            detect["= direct (all but BIPIA)"][1] += 1
            lo, hi = next(b for b in BANDS if b[0] <= len(row["text"]) < b[1])
            band = f"{lo}-{hi if hi < 10**9 else ''} chars"
            bands[band][0] += hit
            bands[band][1] += 1
    fp: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    flagged: list[str] = []
    for row in _read(corpora / "prompts_benign.dev.jsonl"):
        verdict = stage.verdict(row["text"])
        group = "hard negatives (NotInject)" if row["category"].startswith("hard") else "ordinary"
        for key in (f"{group}: {row['category']}", f"= {group}"):
            fp[key][0] += verdict is not None
            fp[key][1] += 1
        if verdict is not None:
            flagged.append(f"{row['source_id']} ({row['category']}): {verdict.rule}")
    out = {
        "detection": {k: _rate(*v) for k, v in sorted(detect.items())},
        "by_length": {
            k: _rate(*v) for k, v in sorted(bands.items(), key=lambda kv: int(kv[0].split("-")[0]))
        },
        "false_positives": {k: _rate(*v) for k, v in sorted(fp.items())},
        "flagged_benign": flagged,
    }
    _table("prompt-injection: detection", out["detection"], "caught")
    _table("prompt-injection: detection by length (direct)", out["by_length"], "caught")
    fp_summary = {k: v for k, v in out["false_positives"].items() if k.startswith("=")}
    _table("prompt-injection: false positives", fp_summary, "flagged")
    return out


def evasions(corpora: Path, stage: InputGuardStage) -> dict[str, Any]:
    """Detection of the direct attacks, original and rewritten with each evasion."""
    attacks = [
        r["text"] for r in _read(corpora / "prompts_attack.dev.jsonl") if r["category"] != INDIRECT
    ]
    rows: dict[str, dict[str, Any]] = {
        "original": _rate(sum(stage.verdict(t) is not None for t in attacks), len(attacks))
    }
    for name, rewrite in EVASIONS.items():
        rng = random.Random(7)
        hit = sum(stage.verdict(rewrite(t, rng)) is not None for t in attacks)
        rows[name] = _rate(hit, len(attacks))
    _table("prompt-injection: evasions (direct attacks)", rows, "caught")
    return rows


def _crs_texts(row: dict[str, Any]) -> tuple[list[str], bool]:
    """The strings the gateway checks in a CRS request, and whether the request also carries
    input it does not check (cookies, unusual headers, the path)."""
    parts = urlsplit(row["uri"] or "/")
    texts = [v for pair in parse_qsl(parts.query, keep_blank_values=True) for v in pair]
    if parts.query and not texts:
        texts.append(parts.query)
    data = row.get("data")
    if isinstance(data, str) and data:
        texts.append(data)
    unchecked = bool({"Cookie", "Referer", "X-Filename"} & set(row.get("headers") or {}))
    unchecked = unchecked or any(c in parts.path for c in "'\"<>()")
    return texts, unchecked


def waf(corpora: Path, stage: InputGuardStage) -> dict[str, Any]:
    """The waf pack on CRS regression requests, by rule family and paranoia level."""
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in _read(corpora / "crs_941_942_sqli_xss.dev.jsonl"):
        texts, unchecked = _crs_texts(row)
        hit = any(stage.verdict(t) is not None for t in texts)
        family = "941 xss" if str(row["rule_id"]).startswith("941") else "942 sqli"
        kind = "must match" if row["expect_match"] else "must not match"
        key = f"{family} PL{row['paranoia_level']} {kind}"
        if row["expect_match"] and not texts:
            key += " (payload only where not checked)"
        elif row["expect_match"] and unchecked and not hit:
            key += " (missed; part not checked)"
        table[key][0] += hit
        table[key][1] += 1
    rows = {k: _rate(*v) for k, v in sorted(table.items())}
    _table("waf: CRS 941/942 regression requests (hit = flagged)", rows, "flagged")
    return rows


def output(corpora: Path, checker: AnswerChecker) -> dict[str, Any]:
    """unsafe-markup on XSS payloads per kind and on benign answers."""
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in _read(corpora / "output_xss.dev.jsonl"):
        hit = checker.check(row["text"]) is not None
        for key in (row["kind"], "= all XSS payloads"):
            table[key][0] += hit
            table[key][1] += 1
    flagged: list[str] = []
    for row in _read(corpora / "output_benign.dev.jsonl"):
        verdict = checker.check(row["text"])
        for key in (f"benign: {row['kind']}", "= benign answers (false positives)"):
            table[key][0] += verdict is not None
            table[key][1] += 1
        if verdict is not None:
            flagged.append(f"{row['source_id']} ({row['kind']}): {verdict.rule}")
    rows = {k: _rate(*v) for k, v in sorted(table.items())}
    _table("unsafe-markup: XSS payloads (caught) and benign answers (flagged)", rows, "hit")
    return {"rates": rows, "flagged_benign": flagged}


def _summary(result: dict[str, Any]) -> Iterable[str]:
    p = result["prompts"]
    direct = p["detection"]["= direct (all but BIPIA)"]["rate"]
    ordinary = p["false_positives"]["= ordinary"]["rate"]
    hard = p["false_positives"]["= hard negatives (NotInject)"]["rate"]
    xss = result["output"]["rates"]["= all XSS payloads"]["rate"]
    benign = result["output"]["rates"]["= benign answers (false positives)"]["rate"]
    yield f"direct injection/jailbreak caught {direct:.1%} (target >= 90%)"
    yield f"false positives: ordinary {ordinary:.1%} (<= 1%), hard negatives {hard:.1%} (<= 5%)"
    yield f"XSS caught {xss:.1%} (>= 95%), benign answers flagged {benign:.1%} (<= 2%)"
    worst = min(result["evasions"].items(), key=lambda kv: kv[1]["rate"])
    yield f"weakest evasion: {worst[0]} {worst[1]['rate']:.1%}"


def main() -> None:
    """Score every section; print the tables and a summary; write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    corpora: Path = args.corpora
    injection = InputGuardStage(InputGuardConfig(rules=["prompt-injection"]))
    web = InputGuardStage(
        InputGuardConfig(format="text", query_params=["*"], rules=["waf"], decode=["url", "html"])
    )
    checker = AnswerChecker(OutputGuardConfig(rules=["unsafe-markup"]))
    result = {
        "corpora": str(corpora),
        "prompts": prompts(corpora, injection),
        "evasions": evasions(corpora, injection),
        "waf": waf(corpora, web),
        "output": output(corpora, checker),
    }
    print("\nsummary")
    for line in _summary(result):
        print(" ", line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

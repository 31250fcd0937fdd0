"""Rules on RE2: compiled once per policy load into one ``re2.Set``, matched in one pass.

RE2 (``google-re2``) was chosen over Hyperscan by measurement (``bench/guard_engines.py``,
figures in docs/guardrails.md): both are linear-time; Hyperscan scans faster, but RE2 is fast
enough (a few µs per KB), ships wheels for every platform the image targets, accepts bounded
repetitions Hyperscan rejects or compiles slowly, and validates a single pattern in
microseconds, which ``gateway check`` does for every inline rule.

Patterns are matched case-insensitively against the normalised view (:mod:`gateway.text`).
A rule with ``score`` 1 decides alone; weaker rules are *signals* that decide together when
the scores of those that match add up to 1 (CRS-style anomaly scoring). Several rules may
match: each is reported with its own action, and the request gets the most severe one —
except that a combination of signals takes the mildest action among them, so a signal being
rolled out with ``monitor`` never blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]

#: Memory budget of one compiled pattern or set (RE2 falls back to a slower, still linear,
#: automaton when a DFA would need more).
MAX_MEM = 64 << 20
#: Longest pattern accepted in a policy.
MAX_PATTERN = 4096


def _options() -> Any:
    opts = re2.Options()
    opts.case_sensitive = False
    opts.log_errors = False
    opts.max_mem = MAX_MEM
    return opts


OPTIONS = _options()


def check_pattern(pattern: str) -> str | None:
    """Why RE2 rejects ``pattern`` (``"invalid perl operator: (?="``), or None when it compiles."""
    if len(pattern) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    if not pattern:
        return "empty pattern"
    try:
        compiled = re2.compile(pattern, options=OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return f"not a valid RE2 pattern: {detail}"
    if compiled.search("") is not None:
        return "matches the empty string (it would match every text)"
    return None


def compile_one(pattern: str) -> Any:
    """One pattern compiled with the engine's options (for spans, e.g. ``sanitize``)."""
    return re2.compile(pattern, options=OPTIONS)


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule: stable id (the metrics label), pattern, action and score."""

    id: str
    pattern: str
    action: str
    score: float = 1.0
    check: str | None = None
    """A post-check the caller applies to a match (``image_hosts``)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome over the rules that matched one text."""

    action: str
    """The action to take: the most severe of ``hits``."""
    rule: str
    """The id of the rule behind ``action``."""
    hits: tuple[tuple[str, str], ...]
    """Every ``(rule id, action)`` that fired, for metrics and logs."""


class RuleSet:
    """Rules compiled into one RE2 set; ``severity`` orders actions from mildest to worst."""

    __slots__ = ("_set", "rules", "severity")

    def __init__(self, rules: Sequence[Rule], severity: Sequence[str]) -> None:
        self.rules = tuple(rules)
        self.severity = {action: i for i, action in enumerate(severity)}
        self._set: Any = None
        if self.rules:
            matcher = re2.Set.SearchSet(OPTIONS)
            for rule in self.rules:
                try:
                    matcher.Add(rule.pattern)
                except re2.error:
                    raise ValueError(f"rule {rule.id}: {check_pattern(rule.pattern)}") from None
            matcher.Compile()
            self._set = matcher

    def match(self, view: str | bytes) -> list[Rule]:
        """The rules whose pattern occurs in ``view`` (a normalised text), in rule order."""
        if self._set is None or not view:
            return []
        found: list[int] | None = self._set.Match(view.encode() if isinstance(view, str) else view)
        if not found:
            return []
        return [self.rules[i] for i in sorted(found)]

    def decide(self, matched: Sequence[Rule]) -> Verdict | None:
        """Combine matched rules: decisive ones by severity, then signals by score.

        The verdict's hits are the deciding rule with the action taken, plus every other
        matching rule whose action is ``monitor`` (so a rule being rolled out is counted even
        when another one decides): one counted action per decision.
        """
        rank = self.severity
        strong = [r for r in matched if r.score >= 1.0]
        weak = [r for r in matched if r.score < 1.0]
        options: list[Rule] = []
        if strong:
            options.append(max(strong, key=lambda r: rank[r.action]))
        fired = bool(weak) and sum(r.score for r in weak) >= 1.0 - 1e-9
        if fired:
            options.append(min(weak, key=lambda r: (rank[r.action], -r.score)))
        if not options:
            return None
        chosen = max(options, key=lambda r: rank[r.action])
        watched = strong + weak if fired else strong
        hits = [(chosen.id, chosen.action)]
        hits.extend((r.id, "monitor") for r in watched if r.action == "monitor" and r is not chosen)
        return Verdict(chosen.action, chosen.id, tuple(hits))

    def scan(self, view: str | bytes) -> Verdict | None:
        """``decide(match(view))``."""
        matched = self.match(view)
        return self.decide(matched) if matched else None

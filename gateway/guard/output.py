"""The answer checks shared by JSON answers and streams: length, rules, image hosts, PII.

The text the rules read is the answer as a browser would render it (code left out with
``skip_code``), normalised like prompts (:mod:`gateway.text`, HTML entities decoded by
default). A rule with ``check: image_hosts`` (``unsafe-markup/image-exfiltration``) only counts
when an image in the answer points at a host that is not on ``image_hosts``.
"""

from __future__ import annotations

from gateway.guard.engine import RuleSet, Verdict
from gateway.guard.markup import host_allowed, image_hosts, strip_code
from gateway.guard.packs import resolve
from gateway.policy.sections import OutputGuardConfig
from gateway.text import normalise

SEVERITY = ("monitor", "replace", "block")
_RANK = {action: i for i, action in enumerate(SEVERITY)}


class AnswerChecker:
    """Everything derived from one route's ``guardrails.output`` section."""

    def __init__(self, cfg: OutputGuardConfig) -> None:
        self.cfg = cfg
        self.rules = RuleSet(resolve(cfg.rules, cfg.action), SEVERITY)
        self.allowed = frozenset(h.lower().rstrip(".") for h in cfg.image_hosts)
        self.decode = tuple(cfg.decode)
        self.max_chars = cfg.max_chars
        self.mask = cfg.mask_pii
        self.fallback = cfg.fallback
        self.skip_code = cfg.skip_code

    def view(self, text: str, in_fence: bool = False) -> str:
        """The normalised, rendered view of ``text`` (code blanked with ``skip_code``)."""
        if self.skip_code:
            text, _ = strip_code(text, in_fence)
        return normalise(text, self.decode)

    def scan_view(self, view: str) -> Verdict | None:
        """The rules' verdict on a view, image rules post-checked against ``image_hosts``."""
        matched = self.rules.match(view)
        if not matched:
            return None
        if any(r.check == "image_hosts" for r in matched):
            matched = [r for r in matched if r.check != "image_hosts" or self._foreign(view)]
        return self.rules.decide(matched)

    def _foreign(self, view: str) -> bool:
        return any(not host_allowed(h, self.allowed) for h in image_hosts(view))

    def too_long(self, length: int) -> Verdict | None:
        """The verdict for an answer of ``length`` characters under ``max_chars``."""
        if self.max_chars is None or length <= self.max_chars:
            return None
        action = self.cfg.action
        return Verdict(action, "max_chars", (("max_chars", action),))

    def check(self, text: str) -> Verdict | None:
        """The verdict on one whole answer (length first, then the rules)."""
        long = self.too_long(len(text))
        found = self.scan_view(self.view(text))
        if long is None or found is None:
            return long or found
        return worst(long, found)


def worst(a: Verdict, b: Verdict) -> Verdict:
    """The two verdicts merged: the more severe decides; the other's monitor hits are kept."""
    top, other = (a, b) if _RANK[a.action] >= _RANK[b.action] else (b, a)
    return Verdict(
        top.action, top.rule, top.hits + tuple(h for h in other.hits if h[1] == "monitor")
    )

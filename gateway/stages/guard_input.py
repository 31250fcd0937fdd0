"""The input guardrail stage: prompts checked before they reach the service.

For each prompt field (see :mod:`gateway.guard.extract`): over ``max_chars`` → refuse or
truncate; the normalised view (:mod:`gateway.text`) is matched against the rules (packs and
inline, compiled once per policy load); the verdict's action applies:

* ``block`` → 400 ``prompt_rejected`` naming the rule id, never echoing the prompt;
* ``sanitize`` → the matched text is cut from the forwarded field (plus control characters with
  ``strip_control``); if the rule still matches the normalised view afterwards (the match was an
  evasion the original text does not show literally), the prompt is blocked instead;
* ``monitor`` → counted and logged only.

A rewritten body is serialised again (compact JSON; the app sends it with its own
``Content-Length``); rewritten query parameters are encoded again. Untouched requests are
forwarded byte for byte.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from gateway.context import RequestContext
from gateway.errors import Deny
from gateway.guard import extract, outcome
from gateway.guard.engine import RuleSet, Verdict, compile_one
from gateway.guard.packs import resolve
from gateway.pipeline import BuildContext, Phase
from gateway.policy.sections import InputGuardConfig
from gateway.routes import CompiledRoute
from gateway.telemetry import metrics
from gateway.text import normalise, strip_control

SEVERITY = ("monitor", "sanitize", "block")
_BLOCKED = ((outcome.HEADER, b"block"),)
CACHED_CHARS = 8192
"""Longest prompt text whose verdict ``verdict_cache`` keeps."""
_HIT = metrics.fast_inc(metrics.CACHE_REQUESTS.labels("prompt_verdict", "hit"))
_MISS = metrics.fast_inc(metrics.CACHE_REQUESTS.labels("prompt_verdict", "miss"))


def _rejected(rule: str) -> Deny:
    return Deny(
        400, "prompt_rejected", f"the prompt was rejected by guardrail rule {rule}", _BLOCKED
    )


class InputGuardStage:
    """Checks the prompt fields of one route's requests."""

    name = "guard_input"
    phase = Phase.INPUT_GUARD

    def __init__(self, cfg: InputGuardConfig) -> None:
        self.cfg = cfg
        self.needs_body = cfg.format != "none"
        self.rules = RuleSet(resolve(cfg.rules, cfg.action), SEVERITY)
        self.spans = {
            r.id: compile_one(r.pattern) for r in self.rules.rules if r.action == "sanitize"
        }
        self.paths = [extract.compile_path(p) for p in cfg.json_paths]
        self.roles = frozenset(cfg.roles) if cfg.roles is not None else None
        self.params = frozenset(cfg.query_params)
        self.decode = tuple(cfg.decode)
        self.strip = cfg.strip_control and cfg.action == "sanitize"
        self.too_long = _rejected("max_chars")
        self._missed = [False]  # set by the cached check when it runs: lru_cache tells no one
        self._cached = self._verdict_cache(cfg.verdict_cache) if cfg.verdict_cache else None

    def verdict(self, text: str) -> Verdict | None:
        """The rules' verdict on one prompt text (what ``on_request`` decides per field)."""
        return self.rules.scan(normalise(text, self.decode))

    def _verdict_cache(self, size: int) -> Callable[[str, str, str], Verdict | None]:
        # A closure over the rules rather than a bound method: no cycle through the stage.
        rules, decode, missed = self.rules, self.decode, self._missed

        def scan(kind: str, client: str, text: str) -> Verdict | None:
            missed[0] = True
            return rules.scan(normalise(text, decode))

        return functools.lru_cache(maxsize=size)(scan)

    def client_verdict(self, ctx: RequestContext, text: str) -> Verdict | None:
        """:meth:`verdict`, kept per client for texts sent again (``verdict_cache``)."""
        cached = self._cached
        if cached is None or len(text) > CACHED_CHARS:
            return self.verdict(text)
        ident = ctx.identity
        self._missed[0] = False
        if ident is not None:
            verdict = cached("sub", ident.sub, text)
        else:
            verdict = cached("ip", ctx.client_ip, text)
        (_MISS if self._missed[0] else _HIT)(1)
        return verdict

    def prepare(self, ctx: RequestContext) -> None:
        """Ahead of its turn, while the rate limit waits on its store: the prompt fields and
        the rules' verdicts on them, by text, for the body as it is now (pure: what is
        recorded, rewritten and denied is decided in turn)."""
        assert ctx.ahead is not None
        try:
            slots, doc, pairs = self._slots(ctx)
        except extract.BadBody:
            return  # reported in turn
        max_chars = self.cfg.max_chars
        found: dict[str, Verdict | None] = {}
        for slot in slots:
            text = strip_control(slot.text) if self.strip else slot.text
            if max_chars is None or len(text) <= max_chars:
                found[text] = self.client_verdict(ctx, text)
        ctx.ahead[self.name] = (ctx.body, slots, doc, pairs, found)

    def _slots(self, ctx: RequestContext) -> tuple[list[extract.Slot], Any, list[list[str]]]:
        doc: Any = None
        slots: list[extract.Slot] = []
        body = ctx.body
        if body and self.cfg.format == "text":
            doc = [body.decode("utf-8", "replace")]
            slots.append(extract.Slot(doc, 0, doc[0]))
        elif body and self.needs_body:
            doc = extract.parse_body(body, self.cfg.max_depth, ctx.json_body)
            if self.cfg.format == "openai":
                slots = extract.openai_slots(doc, self.roles)
            elif self.cfg.format == "anthropic":
                slots = extract.anthropic_slots(doc, self.roles)
            else:
                slots = extract.path_slots(doc, self.paths)
        pairs: list[list[str]] = []
        qs = ctx.scope.get("query_string", b"")
        if self.params and qs:
            pairs = [[k, v] for k, v in parse_qsl(qs.decode("latin-1"), keep_blank_values=True)]
            slots.extend(extract.query_slots(pairs, self.params))
        return slots, doc, pairs

    async def on_request(self, ctx: RequestContext) -> Deny | None:
        """Check every prompt field; deny, rewrite or let the request go on."""
        ahead = ctx.ahead
        pre = ahead.get(self.name) if ahead else None
        found: dict[str, Verdict | None] | None = None
        if pre is not None and pre[0] is ctx.body:  # prepared for this very body
            _, slots, doc, pairs, found = pre
        else:
            try:
                slots, doc, pairs = self._slots(ctx)
            except extract.BadBody as exc:
                return Deny(400, "invalid_request", str(exc))
        ctx.prompt_texts = [slot.text for slot in slots]  # logged only if telemetry opts in
        changed = False
        for slot in slots:
            deny, new = self._check(ctx, slot.text, found)
            if deny is not None:
                return deny
            if new is not None:
                slot.set(new)
                changed = True
        if changed:
            self._rewrite(ctx, doc, pairs)
        outcome.set_header(ctx.response_headers, ctx)
        return None

    def _check(
        self, ctx: RequestContext, text: str, found: dict[str, Verdict | None] | None
    ) -> tuple[Deny | None, str | None]:
        """The Deny for one field, or its rewritten text (None: unchanged); ``found``: the
        verdicts :meth:`prepare` found, by text."""
        cfg = self.cfg
        new = strip_control(text) if self.strip else text
        if cfg.max_chars is not None and len(new) > cfg.max_chars:
            if cfg.on_too_long == "truncate":
                outcome.record(ctx, "input", [("max_chars", "truncate")])
                new = new[: cfg.max_chars]
            elif cfg.action == "monitor":
                outcome.record(ctx, "input", [("max_chars", "monitor")])
            else:
                outcome.record(ctx, "input", [("max_chars", "block")])
                return self.too_long, None
        if found is not None and new in found:
            verdict = found[new]
        else:
            verdict = self.client_verdict(ctx, new)
        if verdict is not None:
            if verdict.action == "sanitize":
                new = self._sanitize(new, verdict.hits)
                again = self.rules.scan(normalise(new, self.decode))
                if again is not None and again.action != "monitor":
                    outcome.record(ctx, "input", [(again.rule, "block")])
                    return _rejected(again.rule), None
            outcome.record(ctx, "input", verdict.hits)
            if verdict.action == "block":
                return _rejected(verdict.rule), None
        return None, (new if new != text else None)

    def _sanitize(self, text: str, hits: tuple[tuple[str, str], ...]) -> str:
        for rule, action in hits:
            regex = self.spans.get(rule)
            if action == "sanitize" and regex is not None:
                text = regex.sub("", text)
        return text

    def _rewrite(self, ctx: RequestContext, doc: Any, pairs: list[list[str]]) -> None:
        if self.cfg.format == "text" and isinstance(doc, list):
            ctx.body = doc[0].encode()
        elif doc is not None:
            ctx.body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        if pairs:
            ctx.scope["query_string"] = urlencode([(k, v) for k, v in pairs]).encode()


def build_input_guard_stages(route: CompiledRoute, build: BuildContext) -> list[Any]:
    """The input guardrail stage of ``route``, when its guardrails have an ``input`` section."""
    cfg = route.guardrails.input if route.guardrails is not None else None
    if cfg is None:
        return []
    return [build.share("guard.input " + cfg.model_dump_json(), lambda: InputGuardStage(cfg))]

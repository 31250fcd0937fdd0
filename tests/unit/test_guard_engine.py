"""Rules: pattern checks, the decision over matched rules, packs, and the policy's ``rules``."""

from __future__ import annotations

import pytest

from gateway.guard.engine import Rule, RuleSet, check_pattern
from gateway.guard.packs import load_pack, pack_names, resolve
from gateway.policy import PolicyError, load_policy_text
from gateway.policy.sections import InputRule

SEVERITY = ("monitor", "sanitize", "block")
HEAD = 'version: 1\nupstream: {url: "http://127.0.0.1:1"}\n'


def test_check_pattern_reasons() -> None:
    assert check_pattern(r"ignore\s+previous") is None
    assert check_pattern("(?=x)y") == "not a valid RE2 pattern: invalid perl operator: (?="
    assert check_pattern(r"(a") == "not a valid RE2 pattern: missing ): (a"
    assert check_pattern(r"\1") is not None  # back-references are not linear
    assert check_pattern("a*") == "matches the empty string (it would match every text)"
    assert check_pattern("") == "empty pattern"


def test_strong_rules_take_the_most_severe_action() -> None:
    rules = RuleSet(
        [Rule("a", "alpha", "monitor"), Rule("b", "beta", "block"), Rule("c", "gamma", "sanitize")],
        SEVERITY,
    )
    verdict = rules.scan("alpha beta gamma")
    assert verdict is not None
    assert (verdict.action, verdict.rule) == ("block", "b")
    # One counted action per decision, plus the monitored rules (being rolled out).
    assert verdict.hits == (("b", "block"), ("a", "monitor"))
    assert rules.scan("nothing here") is None


def test_signals_decide_together_with_the_mildest_action() -> None:
    rules = RuleSet(
        [
            Rule("s1", "one", "block", 0.5),
            Rule("s2", "two", "monitor", 0.5),
            Rule("s3", "three", "block", 0.5),
        ],
        SEVERITY,
    )
    assert rules.scan("one") is None  # a signal alone does not decide
    both = rules.scan("one two")
    assert both is not None and both.action == "monitor"  # a monitored signal never blocks
    assert both.hits == (("s2", "monitor"),)
    blocked = rules.scan("one three")
    assert blocked is not None and blocked.action == "block"
    assert blocked.hits == (("s1", "block"),)


def test_packs_load_and_compile_together() -> None:
    assert {"prompt-injection", "waf", "unsafe-markup"} <= set(pack_names())
    for name in pack_names():
        rules = load_pack(name)
        assert rules and all(r.description for r in rules)
        RuleSet([Rule(r.id, r.pattern, "block", r.score) for r in rules], SEVERITY)


def test_resolve_expands_packs_with_overrides() -> None:
    entries = [
        InputRule.model_validate({"pack": "prompt-injection", "exclude": ["jailbreak-word"]}),
        InputRule.model_validate(
            {"id": "no-secrets", "pattern": "api[_-]?key", "action": "monitor"}
        ),
    ]
    rules = resolve(entries, "block")
    ids = [r.id for r in rules]
    assert "prompt-injection/jailbreak-word" not in ids
    assert "prompt-injection/ignore-instructions" in ids
    assert rules[-1] == Rule("no-secrets", "api[_-]?key", "monitor")
    twice = resolve([InputRule.model_validate("prompt-injection")] * 2, "block")
    assert len(twice) == len({r.id for r in twice}) == len(load_pack("prompt-injection"))
    monitored = resolve([InputRule.model_validate({"pack": "waf", "action": "monitor"})], "block")
    assert {r.action for r in monitored} == {"monitor"}


def _problems(guardrails: str) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load_policy_text(HEAD + guardrails, "p.yaml")
    return err.value.problems


def test_policy_errors_name_file_line_and_path() -> None:
    problems = _problems(
        "guardrails:\n"
        "  input:\n"
        "    rules:\n"
        "      - {id: bad, pattern: '(?=x)y'}\n"
        "      - prompt-injectoin\n"
        "      - {pack: waf, exclude: [nope]}\n"
        "      - {id: half}\n"
        "      - {id: Bad Id, pattern: x}\n"
        "    action: drop\n"
        "  output:\n"
        "    format: json_paths\n"
        "    json_paths: [npc.reply]\n"
    )
    assert problems[:4] == [
        "p.yaml:6: guardrails.input.rules.0.pattern: "
        "not a valid RE2 pattern: invalid perl operator: (?=",
        "p.yaml:7: guardrails.input.rules.1.pack: unknown rule pack 'prompt-injectoin' "
        "(packs: " + ", ".join(pack_names()) + ")",
        "p.yaml:8: guardrails.input.rules.2: exclude: ['nope'] are not rules of pack 'waf'",
        "p.yaml:9: guardrails.input.rules.3: an inline rule needs id and pattern (or name a pack)",
    ]
    assert any(p.startswith("p.yaml:10: guardrails.input.rules.4.id: 'Bad Id'") for p in problems)
    assert any(
        p.startswith("p.yaml:11: guardrails.input.action: 'drop' is not allowed") for p in problems
    )
    assert (
        "p.yaml:14: guardrails.output.json_paths: 'npc.reply': a path starts with $ "
        in (
            problems[-1][
                : len("p.yaml:14: guardrails.output.json_paths: 'npc.reply': a path starts with $ ")
            ]
        )
    )


def test_shipped_policies_validate() -> None:
    policy = load_policy_text(
        HEAD
        + "guardrails:\n"
        + "  input: {rules: [prompt-injection, {pack: waf, action: monitor}], roles: [user]}\n"
        + "  output: {rules: [unsafe-markup], image_hosts: [img.example.com], mask_pii: true}\n"
    )
    assert policy.guardrails is not None and policy.guardrails.input is not None
    assert [r.pack for r in policy.guardrails.input.rules] == ["prompt-injection", "waf"]

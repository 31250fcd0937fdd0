"""Rule packs: YAML lists of rules shipped in ``gateway/guard/packs/`` (package data).

A pack file is a list of ``{id, pattern, description, score?, action?, check?}``; its name is
the file name without ``.yaml``. Policies reference packs by name and add inline rules; see
docs/guardrails.md for how to write a rule and what each pack catches. Packs are read and
validated once per process; rule ids become ``<pack>/<id>``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from gateway.guard.engine import Rule, check_pattern

PACK_DIR = Path(__file__).resolve().parent / "packs"
RULE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
CHECKS = frozenset({"image_hosts"})
_KEYS = frozenset({"id", "pattern", "description", "score", "action", "check"})


class PackError(ValueError):
    """A pack that is missing or malformed (a packaging bug, or a typo in a policy)."""


@dataclass(frozen=True, slots=True)
class PackRule:
    """One rule as written in a pack file."""

    id: str
    pattern: str
    description: str
    score: float = 1.0
    action: str | None = None
    check: str | None = None


class RuleEntry(Protocol):
    """One entry of a policy's ``rules`` list (see ``gateway.policy.sections``)."""

    @property
    def pack(self) -> str | None: ...
    @property
    def id(self) -> str | None: ...
    @property
    def pattern(self) -> str | None: ...
    @property
    def action(self) -> str | None: ...
    @property
    def score(self) -> float: ...
    @property
    def exclude(self) -> list[str]: ...


def pack_names() -> list[str]:
    """Names of the shipped packs."""
    return sorted(p.stem for p in PACK_DIR.glob("*.yaml"))


@functools.cache
def load_pack(name: str) -> tuple[PackRule, ...]:
    """The rules of pack ``name``, validated; raises PackError."""
    if name not in pack_names():
        raise PackError(f"unknown rule pack {name!r} (packs: {', '.join(pack_names())})")
    path = PACK_DIR / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PackError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, list) or not data:
        raise PackError(f"{path}: a pack is a non-empty list of rules")
    rules: list[PackRule] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        rule = _pack_rule(item, f"{path}: rule {i}")
        if rule.id in seen:
            raise PackError(f"{path}: rule id {rule.id!r} is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return tuple(rules)


def _pack_rule(item: Any, where: str) -> PackRule:
    if not isinstance(item, dict) or not {"id", "pattern", "description"} <= item.keys():
        raise PackError(f"{where}: needs id, pattern and description")
    if unknown := set(item) - _KEYS:
        raise PackError(f"{where}: unknown keys {sorted(unknown)}")
    rid, pattern = str(item["id"]), str(item["pattern"])
    if not RULE_ID.match(rid):
        raise PackError(f"{where}: id {rid!r} must match {RULE_ID.pattern}")
    if (problem := check_pattern(pattern)) is not None:
        raise PackError(f"{where} ({rid}): {problem}")
    score = float(item.get("score", 1.0))
    if not 0.0 < score <= 1.0:
        raise PackError(f"{where} ({rid}): score must be in (0, 1]")
    action = item.get("action")
    if action not in (None, "monitor"):
        raise PackError(f"{where} ({rid}): a pack rule's action can only be monitor")
    check = item.get("check")
    if check is not None and check not in CHECKS:
        raise PackError(f"{where} ({rid}): unknown check {check!r}")
    return PackRule(rid, pattern, str(item["description"]), score, action, check)


def resolve(entries: Sequence[RuleEntry], default_action: str) -> list[Rule]:
    """The compiled-rule list for a policy's ``rules``: packs expanded, actions settled.

    A rule's action is, first found: the entry's ``action`` (for a pack, it applies to all its
    rules), the pack rule's own ``action``, the section's ``action``. A rule id listed twice
    keeps its first occurrence.
    """
    rules: list[Rule] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.pack is not None:
            skip = set(entry.exclude)
            for pr in load_pack(entry.pack):
                rid = f"{entry.pack}/{pr.id}"
                if pr.id in skip or rid in seen:
                    continue
                seen.add(rid)
                action = entry.action or pr.action or default_action
                rules.append(Rule(rid, pr.pattern, action, pr.score, pr.check))
        elif entry.id is not None and entry.pattern is not None and entry.id not in seen:
            seen.add(entry.id)
            rules.append(Rule(entry.id, entry.pattern, entry.action or default_action, entry.score))
    return rules

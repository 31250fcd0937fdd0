"""Load a policy file: safe YAML → typed Policy, with ``FILE:LINE: path: message`` errors."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gateway.policy.schema import ROUTE_SECTIONS, Policy

MAX_POLICY_BYTES = 1024 * 1024


class PolicyError(Exception):
    """A policy file that cannot be used; ``str()`` is one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"{name}: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError([f"{name}: larger than {MAX_POLICY_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{name}: not UTF-8 (byte {exc.start})"]) from None
    return load_policy_text(text, name)


def load_policy_text(text: str, name: str = "policy.yaml") -> Policy:
    """Validate policy YAML given as text; ``name`` is used in error messages."""
    node, data = _parse_yaml(text, name)
    if not isinstance(data, dict):
        raise PolicyError([f"{name}:1: the policy must be a mapping (version: 1, upstream: ...)"])
    _merge_route_sections(data)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_describe(exc, node, name)) from None


def _parse_yaml(text: str, name: str) -> tuple[yaml.Node | None, Any]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise PolicyError([f"{name}:1: the file is empty"])
        _reject_duplicate_keys(node, name)
        return node, loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError([f"{name}:{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{name}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()


def _reject_duplicate_keys(node: yaml.Node, name: str) -> None:
    # PyYAML silently keeps the last of two equal keys; in a security policy that hides mistakes.
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = str(key.value)
            if k in seen:
                raise PolicyError([f"{name}:{key.start_mark.line + 1}: duplicate key {k!r}"])
            seen.add(k)
            _reject_duplicate_keys(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item, name)


def _deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


def _merge_route_sections(data: dict[str, Any]) -> None:
    routes = data.get("routes")
    if not isinstance(routes, list):
        return
    for route in routes:
        if not isinstance(route, dict):
            continue
        for section in ROUTE_SECTIONS:
            if section in route and isinstance(data.get(section), dict):
                route[section] = _deep_merge(data[section], route[section])


def _describe(exc: ValidationError, root: yaml.Node | None, name: str) -> list[str]:
    problems: list[str] = []
    errors = exc.errors(include_url=False)
    top_level = {(tuple(e["loc"]), e["type"]) for e in errors if e["loc"][:1] != ("routes",)}
    for err in errors:
        loc = [p for p in err["loc"] if isinstance(p, int | str)]
        # A top-level section merged into a route repeats its own errors there: say them once.
        if loc[:1] == ["routes"] and (tuple(loc[2:]), err["type"]) in top_level:
            continue
        path, line = _locate(root, loc)
        problems.append(f"{name}:{line}: {path or '(top)'}: {_message(err, loc)}")
    return list(dict.fromkeys(problems))


def _locate(root: yaml.Node | None, loc: list[int | str]) -> tuple[str, int]:
    """Dotted path of the parts of ``loc`` that exist in the YAML, and the line of the deepest."""
    node = root
    line = root.start_mark.line + 1 if root is not None else 1
    parts: list[str] = []
    for part in loc:
        child = _child(node, part)
        if child is None:
            # pydantic adds union/validator tags to loc; the user-facing path skips them.
            if isinstance(part, str) and ("[" in part or part.startswith("function-")):
                continue
            parts.append(str(part))
            continue
        key_line, node = child
        parts.append(str(part))
        line = key_line
    return ".".join(parts), line


def _child(node: yaml.Node | None, part: int | str) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if str(key.value) == str(part):
                return key.start_mark.line + 1, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        items = node.value
        if 0 <= part < len(items):
            return items[part].start_mark.line + 1, items[part]
    return None


def _message(err: Any, loc: list[int | str]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(loc)
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"{err['input']!r} is not allowed: {err['msg'].removeprefix('Input should be ')}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} does not match {err['ctx']['pattern']}"
    return msg


def _suggest(loc: list[int | str]) -> str:
    """' (did you mean 'x'?)' for a misspelt key, looking up the model that owns it."""
    model: type[BaseModel] | None = Policy
    for part in loc[:-1]:
        if model is None:
            return ""
        field = model.model_fields.get(str(part))
        if field is None:
            continue
        model = _model_of(field.annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None

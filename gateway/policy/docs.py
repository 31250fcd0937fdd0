"""The policy reference, generated from the schema's field docstrings.

``python -m gateway.policy.docs`` prints it; the README carries it between markers and a test
keeps the two identical.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gateway.policy.schema import Policy

START = "<!-- policy-reference:start -->"
END = "<!-- policy-reference:end -->"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0]) if args[0] is not float else "duration"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_UNIT_NAMES = {
    "parse_duration": "duration",
    "parse_size": "size",
    "parse_rate": "rate",
    "_parse_hostport": "host:port",
    "_parse_cidr": "CIDR",
}


def _unit(field_or_metadata: Any) -> str | None:
    for meta in getattr(field_or_metadata, "metadata", ()):
        name = getattr(getattr(meta, "func", None), "__name__", "")
        if name in _UNIT_NAMES:
            return _UNIT_NAMES[name]
    return None


def _human(value: Any, unit: str | None) -> str:
    if unit == "duration" and isinstance(value, int | float):
        for suffix, factor in (("h", 3600), ("m", 60), ("s", 1)):
            if value >= factor and value % factor == 0:
                return f"{int(value // factor)}{suffix}"
        return f"{round(value * 1000)}ms"
    if unit == "size" and isinstance(value, int):
        for suffix, factor in (("MiB", 1024**2), ("KiB", 1024)):
            if value >= factor and value % factor == 0:
                return f"{value // factor}{suffix}"
    if isinstance(value, str):
        return value
    return (
        "null" if value is None else repr(value).lower() if isinstance(value, bool) else repr(value)
    )


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{_human(field.default, _unit(field))}`"


def _models(model: type[BaseModel], prefix: str, out: list[tuple[str, type[BaseModel]]]) -> None:
    out.append((prefix, model))
    for name, field in model.model_fields.items():
        for sub in _nested(field.annotation):
            path = f"{prefix}.{name}" if prefix else name
            if sub is not model and all(m is not sub for _, m in out):
                _models(sub, path + ("[]" if _is_list(field.annotation) else ""), out)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


def _nested(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_nested(arg))
    return found


def reference() -> str:
    """The policy reference as Markdown, one table per section."""
    sections: list[tuple[str, type[BaseModel]]] = []
    _models(Policy, "", sections)
    lines: list[str] = []
    for path, model in sections:
        title = path or "top level"
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines += [
            f"#### `{title}`",
            "",
            doc,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            desc = " ".join((field.description or "").split()).replace("``", "`")
            desc = desc.replace("|", "\\|")
            kind = (_unit(field) or _type_name(field.annotation)).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_readme(path: Path) -> None:
    """Replace the reference between the markers in ``path``."""
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{reference()}{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parents[2] / "README.md")
    else:
        print(reference(), end="")

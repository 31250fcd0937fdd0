"""Metric names in PromQL expressions, and the metric names the gateway defines.

A deliberately small lexer, not a PromQL parser: it removes string literals, label matchers,
range and subquery brackets, ``by``/``without``/``on``/``ignoring``/``group_*`` label lists and
Grafana variables, then keeps the identifiers that are neither called (functions, aggregation
operators) nor keywords.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
    }
)
"""Words of the language that are not metric names (binary operators, modifiers, literals)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}
"""The sample names of a metric family by type, as they appear in the exposition."""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        ident, called = match.group(1), match.group(2)
        if called or ident.lower() in KEYWORDS:
            continue
        names.add(ident)
    return names


def defined_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's collectors export, by family type."""
    names = set()
    for family in registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names

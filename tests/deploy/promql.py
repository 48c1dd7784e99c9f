"""Metric names referenced by a PromQL expression, and the names the project's exporters expose."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

# Words that look like identifiers in PromQL but are not metric names.
KEYWORDS = frozenset(
    ["by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"]
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_GRAFANA_VARIABLES = re.compile(r"\$\{?\w+\}?")


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (function names, label names and keywords excluded)."""
    text = _GRAFANA_VARIABLES.sub("1m", _STRINGS.sub('""', expr))
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in KEYWORDS or re.fullmatch(r"\d.*", name):
            continue
        names.add(name)
    return names


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry exposes: counters as *_total, histograms as *_bucket/_sum/_count."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names

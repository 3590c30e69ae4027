"""What the monitoring files refer to: metric selectors in PromQL, recording-rule names, Grafana queries.

A small PromQL scanner, enough for selector extraction: string literals, `{...}` matcher blocks, `[...]` ranges and
subqueries, `by/without/on/ignoring/group_left/group_right (...)` label lists and function calls are told apart, so
that what is left are the metric names, each with its label matchers. The Prometheus integration test also runs every
expression through a real Prometheus, which catches what this scanner would not (syntax errors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
DASHBOARDS_DIR = DEPLOY / "grafana" / "dashboards"

# series that Prometheus itself writes (not the service)
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"}
# labels that Prometheus attaches to every scraped series (target labels)
TARGET_LABELS = {"job", "instance"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "atan2", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "inf", "nan", "start", "end",
}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>\d[\w.]*|\.\d[\w.]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<punct>[(){}\[\],]|=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
""", re.VERBOSE)
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)\s*,?""")


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)  # (label, op, value)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot scan PromQL at {expr[pos:pos + 30]!r} in {expr!r}")
        kind = match.lastgroup
        if kind != "ws":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _matchers(text: str) -> tuple[tuple[str, str, str], ...]:
    found, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _MATCHER.match(text, pos)
        if match is None:
            raise ValueError(f"cannot parse label matchers {{{text}}}")
        found.append((match.group(1), match.group(2), match.group(3)[1:-1]))
        pos = match.end()
    return tuple(found)


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in a PromQL expression (functions, keywords and label names excluded)."""
    tokens = _tokens(expr)
    result: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "punct" and text == "[":  # range or subquery: durations and Grafana variables only
            depth = 1
            i += 1
            while depth and i < len(tokens):
                depth += {"[": 1, "]": -1}.get(tokens[i][1], 0)
                i += 1
            continue
        if kind == "punct" and text == "{":  # a matcher block without a metric name in front (not used here)
            raise ValueError(f"selector without a metric name in {expr!r}")
        if kind == "ident" and text in _LABEL_LIST_KEYWORDS:
            i += 1
            if i < len(tokens) and tokens[i][1] == "(":
                while i < len(tokens) and tokens[i][1] != ")":
                    i += 1
            i += 1
            continue
        if kind == "ident" and (text in _KEYWORDS or nxt == "("):
            i += 1
            continue
        if kind == "ident":
            if nxt == "{":
                # re-scan the raw text of the block: the token stream has dropped nothing but whitespace
                j = i + 2
                parts = []
                while tokens[j][1] != "}":
                    parts.append(tokens[j][1])
                    j += 1
                result.append(Selector(text, _matchers(" ".join(parts).replace(" , ", ", "))))
                i = j + 1
            else:
                result.append(Selector(text))
                i += 1
            continue
        i += 1
    return result


# --- the monitoring files ---------------------------------------------------------------------------------------------
def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict]:
    return [rule for path in rule_files() for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def rule_expressions() -> dict[str, str]:
    """rule name (record or alert) -> expression."""
    return {rule.get("record") or rule["alert"]: rule["expr"] for rule in rules()}


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> dict[str, str]:
    """"<file> / <panel title> / <refId>" -> PromQL, plus the template variables' label_values() selectors."""
    found: dict[str, str] = {}
    for name, dashboard in dashboards().items():
        for panel in _panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                found[f"{name} / {panel['title']} / {target['refId']}"] = target["expr"]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\)", query or "")
            if match:
                found[f"{name} / variable {variable['name']}"] = match.group(1)
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so that Prometheus can run it."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$job", ".*")
            .replace("$class", ".*"))

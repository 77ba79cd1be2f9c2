"""Metric names used by the alert rules and the Grafana dashboard.

PromQL has no Python parser here, so names are found lexically: string literals,
range/offset brackets and label groupings (by/without/on/ignoring/group_*) are removed,
then every identifier that is not a function call, keyword or number is a metric name.
promtool parses the very same expressions (test_rules.py), so a syntax the lexer would
misread does not get through."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "atelier-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "atelier-dashboard.json"

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}
# Grafana's variables, replaced by something PromQL accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": "atelier-.*"}


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        following = text[match.end():].lstrip()
        if token.lower() in _KEYWORDS or following.startswith("("):
            continue
        if re.fullmatch(r"\d.*", token):
            continue
        names.add(token)
    return names


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict) and "label_values(" in query.get("query", ""):
            exprs.append(re.search(r"label_values\((.*),\s*\w+\)$", query["query"]).group(1))
    return [grafana_to_promql(e) for e in exprs]


def used_metric_names() -> set[str]:
    """Every metric name the rules and dashboard read, less the rules' own recorded series and
    Prometheus's `up`."""
    names = set()
    for expr in rule_expressions() + dashboard_expressions():
        names |= metric_names(expr)
    return names - recorded_names() - {"up"}

"""Print deploy/prometheus/atelier-rules.yaml as a prometheus-operator PrometheusRule.

    python deploy/prometheus/prometheusrule.py > k8s/base/prometheusrule.yaml   (make k8s-rules)

The plain rules file stays the source: promtool tests it; tests/deploy/test_rules.py checks
that the PrometheusRule carries the same groups."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

RULES = Path(__file__).with_name("atelier-rules.yaml")


def prometheus_rule() -> dict:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "atelier"}, "spec": {"groups": groups}}


if __name__ == "__main__":
    sys.stdout.write("# Generated from deploy/prometheus/atelier-rules.yaml by `make k8s-rules`; do not edit.\n")
    yaml.safe_dump(prometheus_rule(), sys.stdout, sort_keys=False, width=1000)

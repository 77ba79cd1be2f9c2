"""Prometheus rules (promtool check + unit tests with firing and silent cases), their
PrometheusRule copy, and the Grafana dashboard (parses; every expression parses with
promtool and names only metrics the services export or the rules record)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
sys.path.insert(0, str(Path(__file__).parent))
import promql_names  # noqa: E402
from exported_metrics import EXPORTED_BY  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (make tools)")
    return path


def test_rules_check_and_unit_tests() -> None:
    subprocess.run([_promtool(), "check", "rules", "atelier-rules.yaml"], cwd=RULES_DIR, check=True, capture_output=True)
    result = subprocess.run([_promtool(), "test", "rules", "atelier-rules.test.yaml"], cwd=RULES_DIR,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    rules = yaml.safe_load((RULES_DIR / "atelier-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES_DIR / "atelier-rules.test.yaml").read_text())["tests"]
    firing, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts == firing, f"alerts without a firing case: {alerts - firing}"
    assert alerts <= silent, f"alerts without a silent case: {alerts - silent}"


def test_prometheusrule_carries_the_rules_file() -> None:
    sys.path.insert(0, str(RULES_DIR))
    import prometheusrule

    shipped = yaml.safe_load((ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text())
    assert shipped == prometheusrule.prometheus_rule(), "run `make k8s-rules`"


def test_target_down_uses_the_servicemonitor_job_names() -> None:
    # prometheus-operator names a ServiceMonitor job after the Service.
    services = set()
    for path in (ROOT / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Service":
                services.add(doc["metadata"]["name"])
    rules = yaml.safe_load((RULES_DIR / "atelier-rules.yaml").read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "AtelierTargetDown"]
    jobs = set(down["expr"].split('job=~"atelier-(')[1].split(')"')[0].split("|"))
    assert {f"atelier-{j}" for j in jobs} >= services


def test_dashboard_parses_and_covers_the_required_views() -> None:
    dashboard = json.loads(promql_names.DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "latency", "queue", "unet", "jobs", "cache hit", "device memory"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_expressions_parse_with_promtool(tmp_path) -> None:
    exprs = promql_names.dashboard_expressions()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_name_resolves() -> None:
    used = promql_names.used_metric_names()
    assert {"grpc_server_handled_total", "atelier_queue_depth", "atelier_jobs"} <= used
    unknown = used - set(EXPORTED_BY)
    assert not unknown, f"rules/dashboard read metrics nothing exports: {sorted(unknown)}"


def test_metric_name_lexer() -> None:
    names = promql_names.metric_names(
        'sum by (job, le) (rate(a_total{x="b_c"}[5m])) / on (job) group_left(le) max(b:rec) > bool 0.5 unless c')
    assert names == {"a_total", "b:rec", "c"}

"""The launcher brings every installed service up on loopback (embedded models), each answers
its health check and exports the metrics the rules and dashboard read; SIGTERM stops them all
with no process left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from atelier.launcher import installed, thread_env

sys.path.insert(0, str(Path(__file__).parent))
from exported_metrics import EXPORTED_BY  # noqa: E402
from processes import alive as _alive, free_port as _free_port  # noqa: E402
from promql_names import used_metric_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _exported(text: str) -> set[str]:
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_launcher_up_metrics_and_clean_stop(tmp_path):
    shipped = json.loads((ROOT / "deploy" / "local" / "services.json").read_text())
    names = {s["name"] for s in shipped["services"] if installed(s["name"])}
    assert {"inversion", "segmentation"} <= names
    configured = []  # the shipped file on free ports
    for entry in shipped["services"]:
        entry = dict(entry, port=_free_port(), metrics_port=_free_port())
        if entry["name"] == "personalization":
            entry["args"] = ["--data-dir", str(tmp_path / "personalization")]
        configured.append(entry)
    services = [dict(s, calls=[c for c in s.get("calls", []) if c in names]) for s in configured if s["name"] in names]
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"services": configured}))

    launcher = subprocess.Popen([sys.executable, "-m", "atelier.launcher", "--config", str(config),
                                 "--startup-timeout", "300"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, pids = [], []
    try:
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith("[launcher] started"):
                pids.append(int(line.split("(pid ")[1].split(")")[0]))
            if "all services up" in line or launcher.poll() is not None:
                break
        log = "".join(lines)
        assert "all services up" in log, log[-4000:]
        for entry in configured:
            if entry["name"] not in names:
                assert f"NOT starting {entry['name']}: atelier.{entry['name']} is not installed" in log
        for service in services:
            assert f"{service['name']} is SERVING at 127.0.0.1:{service['port']}" in log
            with grpc.insecure_channel(f"127.0.0.1:{service['port']}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Wiring: a dependency flag for every `calls` entry.
        for service in services:
            for dependency in service["calls"]:
                port = next(s["port"] for s in services if s["name"] == dependency)
                assert f"--{dependency}-address 127.0.0.1:{port}" in log

        # Every metric the rules and dashboard read is exported by the services said to export it.
        exported = {}
        for service in services:
            with urllib.request.urlopen(f"http://127.0.0.1:{service['metrics_port']}/metrics", timeout=10) as reply:
                exported[service["name"]] = _exported(reply.read().decode())
        unchecked = []
        for metric in sorted(used_metric_names()):
            exporters = EXPORTED_BY[metric]
            running = [s for s in exporters if s in exported]
            if not running:
                unchecked.append(metric)
                continue
            for name in running:
                assert metric in exported[name], f"{name} does not export {metric}"
        missing_services = sorted(set().union(*EXPORTED_BY.values()) - names)
        if missing_services:
            print(f"not installed: {missing_services}; metrics not checked: {unchecked}")
        else:
            assert not unchecked

        launcher.send_signal(signal.SIGTERM)
        rest, _ = launcher.communicate(timeout=120)
        log += rest
        assert launcher.returncode == 0, log[-4000:]
        for service in services:
            assert f"{service['name']} stopped (exit status 0)" in log, log[-4000:]
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], "processes left behind"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_each_service_gets_its_share_of_the_cores_unless_told():
    assert thread_env({}, {}, services=4, cpus=16) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert thread_env({}, {}, services=4, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert thread_env({"MKL_NUM_THREADS": "3"}, {}, services=2, cpus=8) == {"OMP_NUM_THREADS": "4"}
    assert thread_env({"OMP_NUM_THREADS": "8"}, {}, services=4, cpus=2) == {}
    assert thread_env({}, {"OMP_NUM_THREADS": "2"}, services=4, cpus=2) == {}

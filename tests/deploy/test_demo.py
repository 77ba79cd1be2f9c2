"""`make demo`'s parts: the launcher brings the four services up on loopback (embedded models),
examples/demo.py runs its whole tour through the SDK against them (fewer steps than `make demo`),
writes every PNG and the contact sheet; a failing stage exits non-zero naming the stage; SIGTERM
then stops everything with no process left. Plus the contact-sheet builder on its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from atelier.launcher import installed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
from contact_sheet import Row, contact_sheet  # noqa: E402
from processes import alive, free_port  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SERVICES = ("inversion", "segmentation", "personalization", "synthesis")
PNGS = ["source", "ddim_reconstruction", "ddim_p2p", "ddim_masactrl", "spdinv_reconstruction", "spdinv_p2p",
        "spdinv_masactrl", "scribble", "gradop_plus", "sdedit", "variation_1", "variation_2", "variation_3",
        "segmentation_mask", "segmentation_overlay", "concept_input_1", "concept_input_2", "concept_input_3",
        "concept_generated_1", "concept_generated_2", "layer_edit_1", "layer_edit_2"]


def test_contact_sheet_has_a_labelled_row_per_stage():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    rows = [Row("first", "two tiles", [("red", red), ("a label far too long to fit under one tile", blue)]),
            Row("empty row: skipped"),
            Row("second", "", [("blue", blue)])]
    sheet = contact_sheet(rows, tile=100, gap=10)
    assert sheet.mode == "RGB" and sheet.width >= 10 + 2 * 110
    pixels = sheet.load()
    # Tiles are resized to the tile size and placed in column order, rows one under the other.
    reds = [(x, y) for x in range(sheet.width) for y in range(sheet.height) if pixels[x, y] == (255, 0, 0)]
    blues = [(x, y) for x in range(sheet.width) for y in range(sheet.height) if pixels[x, y] == (0, 0, 255)]
    assert len(reds) == 100 * 100 and len(blues) == 2 * 100 * 100
    assert max(x for x, _ in reds) < min(x for x, y in blues if y < max(y for _, y in reds))
    # Two rows of tiles (the empty one takes no space): the second row's tile starts below the first's.
    second_row_top = min(y for x, y in blues if x < 110)
    assert second_row_top > max(y for _, y in reds)
    with pytest.raises(ValueError):
        contact_sheet([Row("nothing")])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    missing = [name for name in SERVICES if not installed(name)]
    assert not missing, f"the demo needs every service installed: {missing}"
    tmp = tmp_path_factory.mktemp("demo")
    shipped = json.loads((ROOT / "deploy" / "local" / "services.json").read_text())
    configured = []  # the shipped file on free ports, personalization's data in tmp
    for entry in shipped["services"]:
        entry = dict(entry, port=free_port(), metrics_port=free_port())
        if entry["name"] == "personalization":
            entry["args"] = ["--data-dir", str(tmp / "personalization")]
        configured.append(entry)
    config = tmp / "services.json"
    config.write_text(json.dumps({"services": configured}))
    launcher = subprocess.Popen([sys.executable, "-m", "atelier.launcher", "--config", str(config), "--require-all"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    lines, pids = [], []
    try:
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith("[launcher] started"):
                pids.append(int(line.split("(pid ")[1].split(")")[0]))
            if "all services up" in line or launcher.poll() is not None:
                break
        assert "all services up" in "".join(lines), "".join(lines)[-4000:]
        env = {**os.environ, **{f"ATELIER_{e['name'].upper()}_ADDRESS": f"127.0.0.1:{e['port']}" for e in configured}}
        yield {"env": env, "tmp": tmp}
        launcher.send_signal(signal.SIGTERM)
        rest, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == 0, rest[-4000:]
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if alive(pid)], "processes left behind"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _demo(launched, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--no-progress", *args],
                          cwd=ROOT, env=launched["env"], capture_output=True, text=True, timeout=500)


def test_demo_runs_the_whole_tour_through_the_sdk(launched):
    out = launched["tmp"] / "out"
    done = _demo(launched, "--out", str(out), "--num-inference-steps", "4", "--train-steps", "2")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(PNGS + ["contact_sheet"])
    for name in PNGS:
        assert Image.open(out / f"{name}.png").size == (64, 64), name
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 7 * 128 and sheet.height > 6 * 128  # 6 rows; the widest has 7 tiles
    timings = done.stdout.split("[demo] stage timings:")[1]
    for stage in ("invert", "edit", "scribble", "variations", "segment", "eqdiff_train", "eqdiff_generate",
                  "layer_edit", "total"):
        assert f"  {stage} " in timings, timings


def test_a_failing_stage_exits_non_zero_naming_it(launched):
    # steps=0 is refused by the personalization service (INVALID_ARGUMENT naming `steps`).
    done = _demo(launched, "--out", str(launched["tmp"] / "failing"), "--stages", "eqdiff_train",
                 "--train-steps", "0")
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
    assert "[demo] FAILED: stage 'eqdiff_train' failed" in done.stderr and "InvalidArgumentError" in done.stderr
    assert not (launched["tmp"] / "failing" / "contact_sheet.png").exists()
    bad = _demo(launched, "--stages", "edit")  # edit needs invert's result
    assert bad.returncode == 2 and "edit needs invert" in bad.stderr

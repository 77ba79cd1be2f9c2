"""`python -m atelier.models pull --from DIR` (the air-gapped path): plain folders and hub
caches are copied into the models folder, symlinks resolved, and the services load the result."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.core.models import EMBEDDED_DIR, ModelRegistry
from atelier.models.pull import main

pytestmark = pytest.mark.timeout(300)


def _hub_cache(root: Path, repo_id: str, model: Path, revision: str = "0123abcd") -> Path:
    """Lay ``model`` out like huggingface_hub's cache: blobs + symlinked snapshot + refs/main."""
    cache = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = cache / "snapshots" / revision
    for file in model.rglob("*"):
        if file.is_file():
            blob = cache / "blobs" / f"{abs(hash(str(file)))}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(revision)
    return snapshot


def test_pull_from_a_local_folder_and_a_hub_cache(tmp_path, capsys):
    toy, toy_sam = EMBEDDED_DIR / "toy", EMBEDDED_DIR / "toy-sam"
    if not (toy / "model_index.json").exists() or not (toy_sam / "config.json").exists():
        pytest.skip("embedded models not built")
    offline = tmp_path / "offline"
    shutil.copytree(toy, offline / "stable-diffusion-v1-5")
    _hub_cache(offline, "facebook/sam-vit-base", toy_sam)
    models = tmp_path / "models"

    status = main(["pull", "--to", str(models), "--from", str(offline),
                   "sd15=stable-diffusion-v1-5/stable-diffusion-v1-5", "sam=facebook/sam-vit-base"])
    assert status == 0
    out = capsys.readouterr().out
    assert f"ATELIER_MODELS=sd15={models / 'stable-diffusion-v1-5'};sam={models / 'sam-vit-base'}" in out
    for source, copied in ((toy, models / "stable-diffusion-v1-5"), (toy_sam, models / "sam-vit-base")):
        files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(copied) for p in copied.rglob("*") if p.is_file())
        for relative in files:
            assert not (copied / relative).is_symlink()
            assert (copied / relative).read_bytes() == (source / relative).read_bytes()
    assert not list(models.glob(".*.partial"))

    # The services' registry loads what was pulled.
    registry = ModelRegistry({"sd15": str(models / "stable-diffusion-v1-5")}, device="cpu")
    model = registry.load_sd("sd15")
    assert model.unet is not None

    # A second pull keeps the folder; --force replaces it.
    marker = models / "sam-vit-base" / "marker"
    marker.write_text("x")
    assert main(["pull", "--to", str(models), "--from", str(offline), "sam=facebook/sam-vit-base"]) == 0
    assert marker.exists()
    assert main(["pull", "--to", str(models), "--from", str(offline), "--force", "sam=facebook/sam-vit-base"]) == 0
    assert not marker.exists()


def test_pull_reports_what_is_missing(tmp_path):
    (tmp_path / "offline").mkdir()
    result = subprocess.run([sys.executable, "-m", "atelier.models", "pull", "--to", str(tmp_path / "models"),
                             "--from", str(tmp_path / "offline"), "sd15=org/absent"], capture_output=True, text=True)
    assert result.returncode == 1 and "'org/absent' is not under" in result.stderr
    assert not (tmp_path / "models" / "absent").exists()
    result = subprocess.run([sys.executable, "-m", "atelier.models", "pull", "--to", "x", "no-equals-sign"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "NAME=SOURCE" in result.stderr

"""The SDK type-checks: mypy (strict, configured in clients/python/pyproject.toml) passes on
clients/python/atelier, and a user's code gets real types from ``client.inversion`` etc."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[2] / "clients" / "python"
pytestmark = pytest.mark.timeout(300)

USER_CODE = '''
import asyncio
import numpy as np
import atelier
import atelier.aio

def sync_use(client: atelier.Client) -> None:
    inversion: atelier.Inversion = client.inversion.invert("scene.png", "a cat", num_inference_steps=10)
    edited: atelier.EditResult = client.inversion.edit(inversion, "a dog", guidance_scale=5.0)
    masks: list[atelier.Segmentation] = client.segmentation.segment_many(b"...", [{"points": [(1, 2)]}])
    ready: bool = client.ready()
    wrong: int = client.segmentation.segment(edited.image, points=[(1, 2)])  # the error mypy must report
    nti = client.inversion.invert("scene.png", "a cat", method="null_text", null_text_guidance_scale=7.5)
    embeddings: "np.ndarray | None" = nti.null_embeddings
    client.inversion.edit(nti, "a dog", engine="masactrl", end_step=40, mask_source_words=["cat"],
                          mask_target_words=["dog"], mask_threshold=0.1, preset="spdinv", quantile=0.6)
    client.inversion.edit(nti, "a dog", proximal_guidance="off")  # the error mypy must report

async def async_use(client: atelier.aio.Client) -> None:
    inversion: atelier.Inversion = await client.inversion.invert("scene.png", "a cat", method="fixed_point",
                                                                 anderson_memory=3, max_rounds=5)
    wrong: str = await client.inversion.edit(inversion, "a dog")  # the error mypy must report
'''


def _mypy(*targets: str, cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(SDK / "pyproject.toml"),
                           "--no-incremental", *targets], cwd=cwd, capture_output=True, text=True)


def test_mypy_passes_on_the_sdk():
    done = _mypy("atelier", cwd=SDK)
    assert done.returncode == 0, done.stdout + done.stderr


def test_user_code_gets_the_sdk_types(tmp_path):
    (tmp_path / "use.py").write_text(USER_CODE)
    done = _mypy(str(tmp_path / "use.py"), cwd=SDK)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, done.stdout
    assert 'type "Segmentation", variable has type "int"' in errors[0]
    assert '"proximal_guidance"' in errors[1] and 'type "str"; expected "bool | None"' in errors[1]
    assert 'type "EditResult", variable has type "str"' in errors[2]

"""A reduced Table 1 (bench/bench_inversion_table.py) as a regression check on the orderings that
hold on the toy world (never on times)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from atelier.core.models import ModelRegistry
from atelier.toyworld import edit_bench
from atelier.toyworld.evaluator import load_evaluator

pytestmark = pytest.mark.timeout(300)
BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_inversion_table.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_inversion_table", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary():
    """3 edits (colour, shape, background) of one scene at 8 steps: MasaCtrl under DDIM, NPI, ProxNPI
    and SPDInv, P2P under DDIM and DirectInv (the orderings below)."""
    bench = load_bench()
    registry = ModelRegistry()
    model, evaluator = registry.load_sd("toy"), load_evaluator()
    guidance = registry.info("toy").default_guidance_scale  # as the full table runs
    edits = edit_bench.edit_set(one_object_sources=1, add_edits=0, remove_edits=0)
    rows = bench.run_table(model, evaluator, edits, methods=("ddim", "npi", "proxnpi", "spdinv"),
                           engines=("masactrl",), steps=8, guidance=guidance)
    rows += bench.run_table(model, evaluator, edits, methods=("ddim", "directinv"), engines=("p2p",), steps=8, guidance=guidance)
    assert len(rows) == 3 * 4 + 3 * 2
    return bench.summarise(rows)


# The full table (docs/benchmarks/inversion.md) holds these with margin; see there for the
# orderings of the paper that do NOT reproduce on the toy world (SPDInv under P2P).

def test_spdinv_beats_ddim_on_background_and_structure_under_masactrl(summary):
    spdinv, ddim = summary[("spdinv", "masactrl")], summary[("ddim", "masactrl")]
    assert spdinv["psnr"] > ddim["psnr"] and spdinv["structure"] < ddim["structure"]


def test_proximal_guidance_improves_npi_under_masactrl(summary):
    prox, npi = summary[("proxnpi", "masactrl")], summary[("npi", "masactrl")]
    # SSIM and structure, as the full table has them (27.3 vs 34.2 x1e-3, 87.3 vs 84.6); its
    # background MSE is not better on the retrained toy UNet (8.8 vs 7.1 x1e-3).
    assert prox["ssim"] > npi["ssim"] and prox["structure"] < npi["structure"]


def test_directinversion_beats_ddim_under_p2p(summary):
    direct, ddim = summary[("directinv", "p2p")], summary[("ddim", "p2p")]
    assert direct["psnr"] > ddim["psnr"] and direct["structure"] < ddim["structure"]


def test_edit_set_is_fixed_and_masks_cover_the_edit():
    first, second = edit_bench.edit_set(), edit_bench.edit_set()
    assert len(first) == 32 and [e.target_prompt for e in first] == [e.target_prompt for e in second]
    assert {e.kind for e in first} == set(edit_bench.KINDS)
    for edit in first:
        assert 0.0 < edit.edit_mask.mean() < 1.0
        changed = (edit.source.image != edit.target.image).any(-1)
        assert not (changed & ~edit.edit_mask).any(), edit.kind  # the target differs only inside the mask

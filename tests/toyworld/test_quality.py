"""Qualities of the SHIPPED toy-world models (issue 3), loaded offline with stock loaders.

Skips when the shipped folders are absent (`make toy-world` trains and ships them).
Fuller numbers: bench/toyworld_quality.py.
"""
from pathlib import Path

import pytest
import torch

from atelier.toyworld import quality, world
from atelier.toyworld.train_common import EMBEDDED

TOY, TOY_SAM, TOY_EVALUATOR = EMBEDDED / "toy", EMBEDDED / "toy-sam", EMBEDDED / "toy-evaluator"

# Issue 3's targets. Where the shipped models fall short, FLOORS (a little under what they
# measured) guard against regressions and the test reports the gap as an expected failure.
TARGETS = {"vae_psnr": 28.0, "evaluator_clean": 0.99, "sample_colour": 0.95, "sample_background": 0.95,
           "sample_shape": 0.90, "sam_point": 0.90, "sam_box": 0.95}
# All met by the shipped models (2026-11-21); the check() machinery stays for regressions.
FLOORS: dict[str, float] = {}


def check(name: str, value: float, detail=None) -> None:
    floor = FLOORS.get(name, TARGETS[name])
    assert value >= floor, f"{name} = {value:.4f} < {floor} ({detail})"
    if value < TARGETS[name]:
        pytest.xfail(f"{name} = {value:.4f}: above the regression floor {floor}, "
                     f"below issue 3's target {TARGETS[name]} ({detail})")


def _require(path: Path, marker: str) -> None:
    if not (path / marker).exists():
        pytest.skip(f"shipped model {path} is absent (run `make toy-world`)")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    _require(TOY, "model_index.json")
    p = StableDiffusionPipeline.from_pretrained(TOY, local_files_only=True, safety_checker=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def evaluator():
    from atelier.toyworld.evaluator import load_evaluator

    _require(TOY_EVALUATOR, "config.json")
    return load_evaluator(TOY_EVALUATOR)


@pytest.fixture(scope="module")
def sam():
    from transformers import SamModel, SamProcessor

    _require(TOY_SAM, "config.json")
    return (SamModel.from_pretrained(TOY_SAM, local_files_only=True).eval(),
            SamProcessor.from_pretrained(TOY_SAM, local_files_only=True))


def test_shipped_pipeline_is_standard_and_small(pipe):
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # f8
    size = sum(f.stat().st_size for root in (TOY, TOY_SAM, TOY_EVALUATOR) for f in root.rglob("*"))
    assert size < 60e6
    assert all(not f.name.endswith(".bin") for f in TOY.rglob("*"))  # safetensors only


def test_vae_reconstruction_psnr(pipe):
    mean, by_kind = quality.vae_psnr(pipe.vae, n=128, by_kind=True)
    check("vae_psnr", mean, by_kind)
    # Textures survive the round trip like plain backgrounds (they are the world's "style").
    assert min(by_kind.values()) >= TARGETS["vae_psnr"], by_kind


@pytest.mark.parametrize("through_vae", [False, True], ids=["clean", "vae_round_trip"])
def test_evaluator_accuracy_per_head(pipe, evaluator, through_vae):
    with torch.no_grad():
        acc = quality.evaluator_accuracy(evaluator, pipe.vae if through_vae else None, n=256)
    worst = min(acc, key=acc.get)
    if through_vae:
        # Not an issue target, but the evaluator judges decoded images: it must read VAE round
        # trips nearly as well as clean scenes (measured 0.985, shape the lowest).
        assert acc[worst] >= 0.97, acc
    else:
        check("evaluator_clean", acc[worst], acc)


def test_generated_samples_follow_one_object_prompts(pipe, evaluator):
    # Colours, shapes and all four background kinds (textures included) evenly.
    prompts = quality.one_object_prompts(48, seed=5)
    images = quality.generate(pipe, prompts, steps=25, guidance=5.0, seed=0)
    rates = quality.match_rates(evaluator, images, prompts)
    # Check all three before reporting any expected failure.
    ok = {name: rates[key] >= FLOORS.get(name, TARGETS[name]) for name, key in
          (("sample_colour", "colour"), ("sample_shape", "shape"))}
    background = min(rates["background_colour"], rates["background_kind"])
    assert all(ok.values()) and background >= FLOORS.get("sample_background", 0.95), rates
    check("sample_colour", rates["colour"], rates)
    check("sample_background", background, rates)
    check("sample_shape", rates["shape"], rates)


def test_prompts_are_what_makes_samples_match(pipe, evaluator):
    """Sanity check that the measurement can fail: samples drawn for the empty prompt (the
    unconditional model) rarely match the prompts they are scored against."""
    prompts = quality.one_object_prompts(24, seed=6)
    images = quality.generate(pipe, [""] * len(prompts), steps=25, guidance=1.0, seed=0)
    rates = quality.match_rates(evaluator, images, prompts)
    assert rates["all"] < 0.25, rates


def test_sam_mean_iou(sam):
    model, processor = sam
    miou = quality.sam_miou(model, processor, n=128)
    assert all(miou[k] >= FLOORS.get(f"sam_{k}", TARGETS[f"sam_{k}"]) for k in ("point", "box")), miou
    check("sam_point", miou["point"], miou)
    check("sam_box", miou["box"], miou)


def test_world_concepts_are_recognised(evaluator):
    scenes = [world.draw_concept(name, seed=900 + i) for i, name in enumerate(world.CONCEPT_NAMES * 8)]
    with torch.no_grad():
        out = evaluator(world.to_tensor_batch(scenes))
    names = [world.CONCEPT_NAMES[i] if i < len(world.CONCEPT_NAMES) else "none"
             for i in out["concept"].argmax(1).tolist()]
    assert sum(n == s.spec.objects[0].concept for n, s in zip(names, scenes)) / len(scenes) >= 0.95

"""Model registry, tiny offline models, device selection, imaging helpers."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.core import tiny_models
from atelier.core.device import pick_device
from atelier.core.errors import FailedPrecondition, NotFound
from atelier.core.codecs import array_to_torch, torch_to_array
from atelier.core.models import ModelRegistry, parse_model_entries

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry()


def _folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_sd_is_deterministic_and_loads_with_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    first = tiny_models.ensure_tiny_sd(seed=7, root=tmp_path / "a")
    second = tiny_models.ensure_tiny_sd(seed=7, root=tmp_path / "b")
    assert first.name == second.name  # the folder name carries the config hash
    assert _folder_bytes(first) == _folder_bytes(second)
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").exists()

    other_seed = tiny_models.ensure_tiny_sd(seed=8, root=tmp_path / "a")
    assert other_seed != first
    assert _folder_bytes(other_seed)["unet/diffusion_pytorch_model.safetensors"] != \
        _folder_bytes(first)["unet/diffusion_pytorch_model.safetensors"]

    pipe = StableDiffusionPipeline.from_pretrained(first, local_files_only=True, safety_checker=None)
    assert pipe.vae.config.block_out_channels == [32, 32, 64, 64]
    scheduler = pipe.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler.clip_sample, scheduler.set_alpha_to_one, scheduler.steps_offset) == (False, False, 1)
    # Every vocabulary word is one token (P2P aligns prompts word by word).
    for word in ("red", "circle", "striped", "background"):
        assert len(pipe.tokenizer(word).input_ids) == 3, word
    ids = pipe.tokenizer("a blue square on a dotted background").input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a blue square on a dotted background"


def test_cached_folder_is_reused(tmp_path):
    path = tiny_models.ensure_tiny_sd(root=tmp_path)
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_models.ensure_tiny_sd(root=tmp_path) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folders left behind


def test_toy_sam_loads_with_stock_transformers(registry):
    from transformers import SamModel, SamProcessor

    path = registry.resolve("toy-sam")
    model = SamModel.from_pretrained(path, local_files_only=True)
    processor = SamProcessor.from_pretrained(path, local_files_only=True)
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    inputs = processor(image, input_points=[[[32, 32]]], return_tensors="pt")
    with torch.no_grad():
        masks = model(**inputs).pred_masks
    full = processor.image_processor.post_process_masks(masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert full[0].shape[-2:] == (64, 64)


def test_load_sd_caches_per_name_across_threads(registry):
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.load_sd("toy"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(model is results[0] for model in results)
    model = results[0]
    assert registry.load_seconds["toy"] == model.load_seconds > 0
    assert model.new_scheduler() is not model.new_scheduler()


def test_encode_decode_shapes(registry):
    model = registry.load_sd("toy")
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = model.encode_image(image)
    assert latents.shape == (2, 4, 8, 8)
    decoded = model.decode_latents(latents)
    assert decoded.shape == (2, 3, 64, 64) and decoded.min() >= 0 and decoded.max() <= 1
    embeddings = model.encode_prompt(["a red circle", ""])
    assert embeddings.shape == (2, model.tokenizer.model_max_length, model.text_encoder.config.hidden_size)
    assert not torch.equal(embeddings[0], embeddings[1])


def test_unknown_models_are_not_found_and_unservable_entries_fail_precondition(tmp_path, monkeypatch):
    monkeypatch.delenv("ATELIER_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = ModelRegistry({"gone": str(tmp_path / "missing"), "hub": "nobody/no-such-model-xyz"})
    with pytest.raises(NotFound):
        registry.resolve("nope")
    with pytest.raises(FailedPrecondition, match="does not exist") as gone:
        registry.resolve("gone")
    assert str(tmp_path) not in gone.value.message  # no server paths in what a client sees
    with pytest.raises(FailedPrecondition, match="not in the local cache"):
        registry.load_sd("hub")


def test_registry_config_sources(tmp_path):
    assert parse_model_entries(" a=/p ; b=/q;") == {"a": "/p", "b": "/q"}
    with pytest.raises(ValueError):
        parse_model_entries("no-equals-sign")
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"b": str(tmp_path), "c": str(tmp_path)}))
    registry = ModelRegistry.from_config(entries={"c": "/explicit"}, models_file=str(models_file),
                                         environ={"ATELIER_MODELS": "a=/env;b=/env"})
    assert registry.entries["a"].source == "/env"
    assert registry.entries["b"].source == str(tmp_path)  # the file overrides the environment
    assert registry.entries["c"].source == "/explicit"  # explicit entries override both
    assert {"toy", "toy-sam"} <= set(registry.names())


def test_pick_device(monkeypatch):
    monkeypatch.setenv("ATELIER_DEVICE", "cpu")
    monkeypatch.delenv("ATELIER_DTYPE", raising=False)
    assert pick_device() == (torch.device("cpu"), torch.float32)
    assert pick_device(dtype="bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError):
        pick_device(dtype="fp8")


def test_array_torch_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    tensor = array_to_torch(pixels)
    assert tensor.shape == (1, 3, 16, 24) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(torch_to_array((tensor + 1) / 2), pixels)

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


# ---------------------------------------------------------------- validation, kinds, loading, LRU
def clone_model(source, target, rename=None, edit=None):
    """A model folder whose files link to ``source``'s (``rename``: {relative: new relative};
    ``edit``: {relative: function(json dict) -> dict} for config files written as copies)."""
    from pathlib import Path

    source, target = Path(source), Path(target)
    rename, edit = rename or {}, edit or {}
    for path in source.rglob("*"):
        if path.is_file():
            relative = str(path.relative_to(source))
            destination = target / rename.get(relative, relative)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative in edit:
                destination.write_text(json.dumps(edit[relative](json.loads(path.read_text()))))
            else:
                destination.symlink_to(path)
    return str(target)


WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def test_each_service_lists_its_own_kind_and_refuses_the_other_by_name(registry):
    from atelier.core.models import SAM, SD

    inversion = ModelRegistry(kinds=(SD,), service="inversion")
    segmentation = ModelRegistry(kinds=(SAM,), service="segmentation")
    assert inversion.names() == ["toy"] and segmentation.names() == ["toy-sam"]
    with pytest.raises(FailedPrecondition, match="'toy-sam' is a SAM model; inversion serves Stable Diffusion"):
        inversion.check("toy-sam")
    with pytest.raises(FailedPrecondition, match="'toy' is a Stable Diffusion model; segmentation serves SAM"):
        segmentation.check("toy")
    with pytest.raises(FailedPrecondition):
        registry.load_sd("toy-sam")  # the kind-agnostic registry still refuses SAM for load_sd
    with pytest.raises(NotFound) as unknown:
        inversion.check("x" * 10_000)
    assert len(unknown.value.message) < 200  # long names are not echoed in full


def test_fp16_only_folder_needs_the_variant_and_loads_with_it(tmp_path):
    from atelier.core.models import EMBEDDED_DIR

    folder = clone_model(EMBEDDED_DIR / "toy", tmp_path / "half",
                         rename={w: w.replace(".safetensors", ".fp16.safetensors") for w in WEIGHTS})
    plain = ModelRegistry({"half": folder})
    with pytest.raises(FailedPrecondition, match="unet has no weights for the default variant.*found: fp16.*variant"):
        plain.check("half")
    configured = ModelRegistry({"half": {"source": folder, "variant": "fp16", "dtype": "bf16"}})
    model = configured.load_sd("half")
    assert model.unet.dtype == torch.bfloat16  # dtype per entry
    globally = ModelRegistry({"half": folder}, variant="fp16")  # --model-variant
    assert globally.check("half").facts.vae_scale_factor == 8


def test_v_prediction_is_refused_by_name(tmp_path):
    from atelier.core.models import EMBEDDED_DIR

    folder = clone_model(EMBEDDED_DIR / "toy", tmp_path / "v", edit={
        "scheduler/scheduler_config.json": lambda c: {**c, "prediction_type": "v_prediction"}})
    registry = ModelRegistry({"v": folder})
    with pytest.raises(FailedPrecondition, match="v_prediction not supported"):
        registry.load_sd("v")


def test_bad_entries_are_unavailable_or_fail_a_strict_start(tmp_path):
    from atelier.core.models import EMBEDDED_DIR, SD

    sam_as_sd = {"source": str(EMBEDDED_DIR / "toy-sam"), "kind": "stable-diffusion"}
    registry = ModelRegistry({"wrong": sam_as_sd, "empty": str(tmp_path)}, kinds=(SD,), service="inversion")
    problems = registry.validate()
    assert any("'wrong'" in p and "declared Stable Diffusion but the folder holds a SAM model" in p for p in problems)
    assert any("'empty'" in p and "neither a Stable Diffusion folder" in p for p in problems)
    assert {"wrong", "empty", "toy"} <= set(registry.names())  # listed as unavailable
    with pytest.raises(FailedPrecondition, match="'wrong' is unavailable"):
        registry.load_sd("wrong")
    strict = ModelRegistry({"wrong": sam_as_sd}, kinds=(SD,))
    with pytest.raises(ValueError, match="bad model entries: model 'wrong'"):
        strict.start("toy", strict=True)


def test_a_failed_load_is_not_retried_per_request(tmp_path):
    from atelier.core.models import SD

    calls = []

    def broken(entry, device, dtype):
        calls.append(entry.name)
        raise OSError("corrupt weights")

    registry = ModelRegistry(loaders={SD: broken})
    for _ in range(3):
        with pytest.raises(FailedPrecondition, match="loading failed \\(OSError\\)"):
            registry.get("toy", wait_seconds=30)
    assert calls == ["toy"]


def test_default_guidance_comes_from_the_model_folder(tmp_path):
    from atelier.core.models import DEFAULT_GUIDANCE_SCALE, EMBEDDED_DIR

    plain = clone_model(EMBEDDED_DIR / "toy", tmp_path / "plain", rename={"atelier.json": "README"})
    registry = ModelRegistry({"plain": plain})
    assert registry.check("toy").default_guidance_scale == 2.5  # the shipped toy's atelier.json
    assert registry.check("plain").default_guidance_scale == DEFAULT_GUIDANCE_SCALE == 7.5


def test_models_load_on_the_loader_thread_and_calls_wait_bounded(tmp_path):
    from atelier.core.errors import Unavailable
    from atelier.core.models import SD, load_sd_folder

    gate, threads = threading.Event(), []

    def slow(entry, device, dtype):
        threads.append(threading.current_thread().name)
        gate.wait(30)
        return load_sd_folder(entry.folder, entry.name, device, dtype)

    registry = ModelRegistry(loaders={SD: slow}, service="inversion")
    with pytest.raises(Unavailable, match="'toy' is loading") as loading:
        registry.get("toy", wait_seconds=0.05)
    assert loading.value.retry_delay > 0
    gate.set()
    model = registry.get("toy", wait_seconds=60)
    assert model is registry.get("toy", wait_seconds=0) and threads == ["model-loader-inversion"]


def test_a_calls_remaining_time_bounds_its_wait_for_a_load():
    from atelier.core.errors import Unavailable
    from atelier.core.models import SD, load_sd_folder

    gate = threading.Event()

    def slow(entry, device, dtype):
        gate.wait(30)
        return load_sd_folder(entry.folder, entry.name, device, dtype)

    registry = ModelRegistry(loaders={SD: slow}, service="inversion")
    # The load may finish 2 s in, well inside the 60 s wait: only the caller's remaining time makes
    # these calls answer UNAVAILABLE instead of waiting for it.
    threading.Timer(2.0, gate.set).start()
    with pytest.raises(Unavailable, match="'toy' is loading"):
        registry.get("toy", remaining=0.05, wait_seconds=60)
    with pytest.raises(Unavailable, match="'toy' is loading"):
        registry.get("toy", remaining=-1.0, wait_seconds=60)  # a deadline already past: no wait at all
    assert registry.get("toy", remaining=None, wait_seconds=60) is registry.get("toy", remaining=0)


def test_lru_unload_keeps_loaded_models_within_the_memory_budget(tmp_path):
    from atelier.core.metrics import Metrics
    from atelier.core.models import EMBEDDED_DIR
    from prometheus_client import CollectorRegistry

    second = clone_model(EMBEDDED_DIR / "toy", tmp_path / "second")
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry({"second": second}, memory_budget_bytes=1, metrics=metrics)  # a tiny budget
    registry.load_sd("toy")
    assert registry.loaded_names() == ["toy"]
    registry.load_sd("second")
    assert registry.loaded_names() == ["second"]  # loading the second unloaded the first
    value = metrics.registry.get_sample_value
    assert value("atelier_model_loaded", {"model": "toy", "kind": "stable-diffusion"}) == 0
    assert value("atelier_model_loaded", {"model": "second", "kind": "stable-diffusion"}) == 1
    assert value("atelier_model_load_seconds", {"model": "second"}) > 0
    assert value("atelier_model_bytes", {"model": "second"}) > 1_000_000
    roomy = ModelRegistry({"second": second}, memory_budget_bytes=1 << 40)
    roomy.load_sd("toy"), roomy.load_sd("second")
    assert roomy.loaded_names() == ["toy", "second"]


def test_registry_flags_and_environment():
    from atelier.core.config import ServerConfig
    from atelier.core.models import SD

    config = ServerConfig.from_args(
        ["--model-variant", "fp16", "--dtype", "bf16", "--model-memory-bytes", "5", "--strict-models",
         "--max-inflight-bytes", "7"], "inversion", environ={"ATELIER_PRELOAD_MODELS": "0", "ATELIER_DEVICE": "cpu"})
    assert (config.model_variant, config.dtype, config.model_memory_bytes, config.preload_models,
            config.strict_models, config.max_inflight_bytes) == ("fp16", "bf16", 5, False, True, 7)
    registry = ModelRegistry.for_service(config, kinds=(SD,))
    assert (registry.memory_budget_bytes, registry.dtype, registry.entries["toy"].variant) == (5, torch.bfloat16, "fp16")
    defaults = ServerConfig.from_args([], "inversion", environ={})
    assert (defaults.preload_models, defaults.strict_models, defaults.max_inflight_bytes) == (True, False, 1 << 30)
    for argv, env in [(["--max-inflight-bytes", "0"], {}), ([], {"ATELIER_PRELOAD_MODELS": "maybe"})]:
        with pytest.raises(SystemExit):
            ServerConfig.from_args(argv, "inversion", environ=env)

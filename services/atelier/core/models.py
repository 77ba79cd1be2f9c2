"""Model registry: names -> model folders of a kind, validated at start-up, loaded off the
compute worker, unloaded least-recently-used to stay within a memory budget.

Sources: a local folder, a hub id (resolved to the local HF cache; fetched only with
ATELIER_ALLOW_DOWNLOADS=1), or ``builtin:toy`` / ``builtin:toy-sam``, which resolve to the
trained folders shipped under services/atelier/embedded/ when present, else to tiny seeded
models built from configs and cached on disk (see tiny_models).

A service builds its registry with the kinds it serves (``kinds=(SD,)`` for inversion,
``(SAM,)`` for segmentation). Entries of other kinds are not listed there; asking for one is
FAILED_PRECONDITION naming it. An entry of the service's kind that cannot be served (missing
weights for the variant, v_prediction, a broken folder) is *unavailable*: logged at start-up,
FAILED_PRECONDITION on use, never retried per request; ``validate(strict=True)`` (the
``--strict-models`` flag) fails the start instead. Error messages never carry folder paths.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from . import tiny_models
from .config import parse_model_entries as _parse_entries
from .device import parse_dtype, pick_device
from .errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, quoted
from .model_folders import KIND_NAMES, SAM, SD, BadModelFolder, FolderFacts, inspect_folder
from .sd_model import SDModel, load_sd_folder

__all__ = ["ModelRegistry", "ModelEntry", "SDModel", "load_sd_folder", "parse_model_entries",
           "module_bytes", "fit_to_vae", "SD", "SAM", "DEFAULT_GUIDANCE_SCALE"]

_LOG = logging.getLogger(__name__)
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
DEFAULT_ENTRIES = {"toy": "builtin:toy", "toy-sam": "builtin:toy-sam"}
# Stable Diffusion's own default, for folders that name none in atelier.json.
DEFAULT_GUIDANCE_SCALE = 7.5
# How long a call waits for its model to load (on the registry's loader thread) before answering
# UNAVAILABLE (retryable); never longer than the call's deadline (ModelRegistry.get).
MODEL_LOAD_WAIT_SECONDS = 10.0
_ENTRY_KEYS = {"source", "kind", "variant", "dtype"}


def downloads_allowed() -> bool:
    return os.environ.get("ATELIER_ALLOW_DOWNLOADS", "") == "1"


def parse_model_entries(text: str) -> dict[str, str]:
    """``"a=/p;b=/q"`` -> ``{"a": "/p", "b": "/q"}`` (the ATELIER_MODELS format)."""
    return _parse_entries(text.split(";"), "ATELIER_MODELS")


def module_bytes(model) -> int:
    """Parameter and buffer bytes of a loaded model (its ``torch_modules()`` or itself)."""
    modules = model.torch_modules() if hasattr(model, "torch_modules") else [model]
    seen, total = set(), 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _load_sd(entry: "ModelEntry", device, dtype):
    return load_sd_folder(entry.folder, name=entry.name, device=device, dtype=dtype, variant=entry.variant)


# kind -> loader(entry, device, dtype) -> model; services add theirs (segmentation: SAM).
Loader = Callable[["ModelEntry", torch.device, torch.dtype], object]


@dataclass
class ModelEntry:
    """One configured model; ``facts``/``problem`` are filled in by validation."""

    name: str
    source: str
    kind: Optional[str] = None  # declared; None: read from the folder
    variant: Optional[str] = None
    dtype: Optional[str] = None  # e.g. "fp16"; None: the registry's (device default)
    folder: Optional[str] = None  # server-side only, never sent to clients
    facts: Optional[FolderFacts] = None
    problem: Optional[str] = None  # why it cannot be served (safe to show a client)

    @property
    def detected_kind(self) -> Optional[str]:
        return self.facts.kind if self.facts is not None else self.kind

    @property
    def default_guidance_scale(self) -> float:
        value = self.facts.default_guidance_scale if self.facts is not None else None
        return DEFAULT_GUIDANCE_SCALE if value is None else value

    @classmethod
    def parse(cls, name: str, value: Union[str, dict], variant: Optional[str] = None) -> "ModelEntry":
        """``"folder"`` or ``{"source": ..., "kind": "sam", "variant": "fp16", "dtype": "fp16"}``."""
        if isinstance(value, str):
            return cls(name=name, source=value, variant=variant)
        if not isinstance(value, dict) or not isinstance(value.get("source"), str) or set(value) - _ENTRY_KEYS:
            raise ValueError(f"model {name!r}: expected a source string or an object with keys "
                             f"{sorted(_ENTRY_KEYS)} ('source' required)")
        kind = value.get("kind")
        if kind is not None and kind not in KIND_NAMES:
            raise ValueError(f"model {name!r}: unknown kind {kind!r}; choose one of {sorted(KIND_NAMES)}")
        return cls(name=name, source=value["source"], kind=kind, variant=value.get("variant", variant),
                   dtype=value.get("dtype"))


class ModelRegistry:
    """This service's models. ``kinds=None`` serves every kind (in-process use and tests).

    ``memory_budget_bytes`` bounds the parameter bytes of loaded models (0: no bound); loading
    past it unloads the least recently used models first. Loads run one at a time, on the
    caller's thread (``load``) or on the registry's loader thread (``preload``, ``get``), never on
    the compute worker: a call for a model that is loading waits up to ``wait_seconds`` and then
    answers UNAVAILABLE (retryable)."""

    def __init__(self, entries: Optional[dict] = None, device=None, dtype=None, kinds: Optional[Sequence[str]] = None,
                 variant: Optional[str] = None, memory_budget_bytes: int = 0, metrics=None,
                 loaders: Optional[dict[str, Loader]] = None, service: str = ""):
        merged = {**DEFAULT_ENTRIES, **(entries or {})}
        self.entries: dict[str, ModelEntry] = {name: ModelEntry.parse(name, value, variant)
                                               for name, value in merged.items()}
        self.device, self.dtype = device, dtype
        self._device_dtypes: dict[Optional[str], tuple[torch.device, torch.dtype]] = {}  # by entry dtype
        self.kinds = tuple(kinds) if kinds is not None else None
        self.memory_budget_bytes = memory_budget_bytes
        self.metrics = metrics
        self.loaders: dict[str, Loader] = {SD: _load_sd, **(loaders or {})}
        self.service = service or "this service"
        self.load_seconds: dict[str, float] = {}
        self._loaded: "collections.OrderedDict[str, object]" = collections.OrderedDict()  # LRU order
        self._bytes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time
        self._validated = False
        self._pending: dict[str, threading.Event] = {}
        self._queue: "collections.deque[str]" = collections.deque()
        self._loader: Optional[threading.Thread] = None

    @classmethod
    def from_config(cls, entries: Optional[dict] = None, models_file: Optional[str] = None,
                    environ=None, **kwargs) -> "ModelRegistry":
        """Merge, later winning: ATELIER_MODELS env, a JSON file ``{name: source | {source, kind,
        variant, dtype}}``, explicit entries."""
        environ = os.environ if environ is None else environ
        merged: dict = dict(parse_model_entries(environ.get("ATELIER_MODELS", "")))
        if models_file:
            with open(models_file) as handle:
                loaded = json.load(handle)
            if not isinstance(loaded, dict) or not all(isinstance(v, (str, dict)) for v in loaded.values()):
                raise ValueError(f"{models_file}: expected a JSON object of name -> source or entry object")
            merged.update(loaded)
        merged.update(entries or {})
        return cls(merged, **kwargs)

    # ------------------------------------------------------------------ validation
    def _folder_for(self, entry: ModelEntry) -> str:
        source = entry.source
        if source == "builtin:toy":
            shipped = EMBEDDED_DIR / "toy"
            return str(shipped if (shipped / "model_index.json").exists() else tiny_models.ensure_tiny_sd())
        if source == "builtin:toy-sam":
            shipped = EMBEDDED_DIR / "toy-sam"
            return str(shipped if (shipped / "config.json").exists() else tiny_models.ensure_tiny_sam())
        path = Path(source).expanduser()
        if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1:
            return str(path)
        from huggingface_hub import snapshot_download  # a hub id: the local cache, or a download if allowed

        try:
            return snapshot_download(source, local_files_only=not downloads_allowed())
        except Exception as error:  # noqa: BLE001 - any hub failure makes the entry unavailable
            if downloads_allowed():
                raise BadModelFolder(f"the hub id could not be fetched ({type(error).__name__})") from None
            raise BadModelFolder("the hub id is not in the local cache and downloads are disabled "
                                 "(ATELIER_ALLOW_DOWNLOADS=1)") from None

    def _validate_entry(self, entry: ModelEntry) -> None:
        try:
            if entry.dtype is not None:
                parse_dtype(entry.dtype)
            entry.folder = self._folder_for(entry)
            entry.facts = inspect_folder(Path(entry.folder), entry.variant, entry.kind)
        except (BadModelFolder, ValueError) as error:
            entry.problem = str(error)

    def validate(self, strict: bool = False) -> list[str]:
        """Inspect every entry (once). Returns this service's problems as log lines; with
        ``strict``, raises ValueError listing them instead."""
        with self._lock:
            first = not self._validated
            if first:
                for entry in self.entries.values():
                    self._validate_entry(entry)
                self._validated = True
            problems = [f"model {e.name!r}: {e.problem}" for e in self.entries.values()
                        if e.problem is not None and self._is_ours(e)]
        for line in problems if first else ():
            _LOG.warning("%s: %s (unavailable)", self.service, line)
        if strict and problems:
            raise ValueError("bad model entries: " + "; ".join(problems))
        return problems

    def _ensure_validated(self) -> None:
        """``validate`` once; per call only a flag test (no lock, no problem list)."""
        if not self._validated:
            self.validate()

    def _is_ours(self, entry: ModelEntry) -> bool:
        kind = entry.detected_kind
        return self.kinds is None or kind is None or kind in self.kinds

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        """This service's model names (unavailable ones included)."""
        self._ensure_validated()
        return sorted(name for name, entry in self.entries.items() if self._is_ours(entry))

    def check(self, name: str, kind: Optional[str] = None) -> ModelEntry:
        """The entry for ``name`` if it can be served here: NotFound when unknown,
        FailedPrecondition when of another kind or unavailable."""
        self._ensure_validated()
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"unknown model {quoted(name)}; ListModels lists this service's models")
        wanted = (kind,) if kind is not None else self.kinds
        found = entry.detected_kind
        if wanted is not None and found is not None and found not in wanted:
            served = " or ".join(KIND_NAMES[k] for k in wanted)
            raise FailedPrecondition(f"model {quoted(name)} is a {KIND_NAMES[found]} model; "
                                     f"{self.service} serves {served} models")
        if entry.problem is not None:
            raise FailedPrecondition(f"model {quoted(name)} is unavailable: {entry.problem}")
        return entry

    def resolve(self, name: str) -> str:
        """The local folder of a servable model (server-side use only)."""
        return self.check(name).folder

    def info(self, name: str) -> ModelEntry:
        return self.check(name)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    # ------------------------------------------------------------------ loading
    def device_dtype(self, entry: ModelEntry) -> tuple[torch.device, torch.dtype]:
        """Where and in which dtype ``entry`` loads. Chosen once per entry dtype and registry
        (ListModels asks for every entry on every call; the choice reads the environment)."""
        chosen = self._device_dtypes.get(entry.dtype)
        if chosen is None:
            device, dtype = pick_device(None if self.device is None else str(self.device), entry.dtype)
            if entry.dtype is None and self.dtype is not None:
                dtype = self.dtype
            chosen = self._device_dtypes[entry.dtype] = (device, dtype)
        return chosen

    def load(self, name: str, kind: Optional[str] = None):
        """The loaded model for ``name``, loading it on this thread if needed (one load at a time)."""
        entry = self.check(name, kind)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        with self._load_lock:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            entry = self.check(name, kind)  # a failed load meanwhile made it unavailable
            self._make_room(entry.facts.weight_bytes, keep=name)
            device, dtype = self.device_dtype(entry)
            started = time.perf_counter()
            try:
                model = self.loaders[entry.facts.kind](entry, device, dtype)
            except Exception as error:  # noqa: BLE001 - the entry becomes unavailable, not retried per call
                _LOG.exception("%s: loading model %r failed", self.service, name)
                entry.problem = f"loading failed ({type(error).__name__}); see the server log"
                raise FailedPrecondition(f"model {quoted(name)} is unavailable: {entry.problem}") from None
            seconds = time.perf_counter() - started  # includes building the tiny fallback
            if hasattr(model, "load_seconds"):
                model.load_seconds = seconds
            nbytes = module_bytes(model)
            with self._lock:
                self._loaded[name] = model
                self._bytes[name] = nbytes
                self.load_seconds[name] = seconds
            self._make_room(0, keep=name)
            if self.metrics is not None:
                self.metrics.observe_model_load(name, seconds, kind=entry.facts.kind, nbytes=nbytes)
            _LOG.info("%s: loaded model %r (%s, %.1f MB) in %.1f s", self.service, name,
                      KIND_NAMES[entry.facts.kind], nbytes / 1e6, seconds)
            return model

    def load_sd(self, name: str) -> SDModel:
        """The loaded Stable Diffusion model for ``name`` (loaded once; thread-safe)."""
        return self.load(name, kind=SD)

    def _make_room(self, incoming: int, keep: str) -> None:
        """Unload least-recently-used models until loaded + ``incoming`` bytes fit the budget."""
        if self.memory_budget_bytes <= 0:
            return
        with self._lock:
            while True:
                total = sum(self._bytes.get(n, 0) for n in self._loaded)
                victims = [n for n in self._loaded if n != keep]
                if total + incoming <= self.memory_budget_bytes or not victims:
                    break
                self._unload(victims[0], f" (least recently used; budget {self.memory_budget_bytes} bytes)")

    def _unload(self, name: str, why: str = "") -> None:
        model = self._loaded.pop(name)
        self._bytes.pop(name, None)
        _LOG.info("%s: unloaded model %r%s", self.service, name, why)
        if self.metrics is not None:
            self.metrics.observe_model_unload(name)
        close = getattr(model, "close", None)
        if callable(close):
            close()
        del model  # calls in flight keep their own reference until they finish
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Unload every model (their ``close()`` runs); queued preloads are dropped."""
        with self._lock:
            self._queue.clear()
            for name in list(self._loaded):
                self._unload(name)

    def preload(self, names: Optional[Sequence[str]] = None) -> None:
        """Queue loads on the loader thread (default: every available model of this service, in
        name order, while their on-disk size fits the budget)."""
        if names is None:
            budget, planned, names = self.memory_budget_bytes, 0, []
            for name in self.names():
                entry = self.entries[name]
                if entry.problem is None and entry.facts is not None:
                    planned += entry.facts.weight_bytes
                    if budget <= 0 or planned <= budget:
                        names.append(name)
        for name in names:
            self._schedule(name)

    def _schedule(self, name: str) -> threading.Event:
        with self._lock:
            done = self._pending.get(name)
            if done is None:
                done = self._pending[name] = threading.Event()
                self._queue.append(name)
                if self._loader is None or not self._loader.is_alive():
                    self._loader = threading.Thread(target=self._load_loop, daemon=True,
                                                    name=f"model-loader-{self.service}")
                    self._loader.start()
            return done

    def _load_loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._loader = None
                    return
                name = self._queue.popleft()
            try:
                self.load(name)
            except Exception:  # noqa: BLE001 - recorded on the entry (problem) and logged by load()
                pass
            finally:
                with self._lock:
                    self._pending.pop(name).set()

    def get(self, name: str, kind: Optional[str] = None, remaining: Optional[float] = None,
            wait_seconds: float = MODEL_LOAD_WAIT_SECONDS):
        """For request handlers: the loaded model, loading it on the loader thread and waiting up
        to ``wait_seconds`` but never past the caller's ``remaining`` seconds (its
        ``context.time_remaining()``; None: no deadline); UNAVAILABLE (retryable) while it is
        still loading."""
        self.check(name, kind)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        wait = wait_seconds if remaining is None else min(wait_seconds, remaining)
        if not self._schedule(name).wait(max(0.0, wait)):
            raise Unavailable(f"model {quoted(name)} is loading; retry shortly", retry_delay=1.0)
        return self.load(name, kind)  # loaded now (or raises why not)

    # ------------------------------------------------------------------ service start-up
    @classmethod
    def for_service(cls, config, kinds: Sequence[str], metrics=None,
                    loaders: Optional[dict[str, Loader]] = None) -> "ModelRegistry":
        """The registry of one service from its ServerConfig (flags/env of core.config)."""
        device, dtype = pick_device(config.device, config.dtype)
        budget = config.model_memory_bytes or default_memory_budget(device)
        return cls.from_config(config.models, config.models_file, device=device, dtype=dtype, kinds=kinds,
                               variant=config.model_variant, memory_budget_bytes=budget, metrics=metrics,
                               loaders=loaders, service=config.service)

    def start(self, default_model: str, strict: bool = False, preload: bool = True):
        """Validate every entry, load the default model on this thread (the server's loading
        thread: health is NOT_SERVING meanwhile), then queue the others on the loader thread."""
        self.validate(strict)
        model = self.load(default_model)
        if preload:
            self.preload()
        return model


def fit_to_vae(image, entry: ModelEntry, field: str):
    """A PIL image whose sides are multiples of the model's VAE factor: rounded down and resized
    (Lanczos) as diffusers' VaeImageProcessor does; unchanged when they already are."""
    from diffusers.image_processor import VaeImageProcessor

    factor = entry.facts.vae_scale_factor
    if image.width < factor or image.height < factor:
        raise InvalidArgument(field, f"image is {image.width}x{image.height}; this model needs at least "
                                     f"{factor}x{factor} pixels")
    processor = VaeImageProcessor(vae_scale_factor=factor)
    height, width = processor.get_default_height_width(image)
    return image if (width, height) == image.size else processor.resize(image, height, width)


def default_memory_budget(device: torch.device) -> int:
    """0.8 x the GPU's memory on CUDA (room for activations); no bound (0) on CPU."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    return 0

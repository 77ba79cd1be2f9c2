"""SAM (Kirillov et al. 2023) through transformers' SamModel / SamProcessor.

Split the way SAM is meant to be served: ``prepare`` (resize + normalise + pad, on the
caller's thread), ``encode`` (the heavy ViT image encoder, batched, cacheable, or run on
Triton), ``decode`` (prompt encoder + mask decoder on a cached embedding, then masks
upscaled to the input resolution with SamProcessor.post_process_masks).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from atelier.core.errors import InvalidArgument

__all__ = ["Prompt", "PreparedImage", "MaskCandidates", "SamPredictor", "prompt_violations", "validate_prompts"]


@dataclass(frozen=True)
class Prompt:
    """One object's prompts in input-image pixel coordinates."""

    points: np.ndarray  # (N, 2) float32, (x, y)
    labels: np.ndarray  # (N,) int64, 1 positive / 0 negative
    boxes: np.ndarray  # (B, 4) float32, (x0, y0, x1, y1); SAM takes at most one
    mask_input: Optional[np.ndarray] = None  # previous low-res logits, (h, w) or (1, h, w)

    @classmethod
    def of(cls, points=(), labels=(), boxes=(), mask_input=None) -> "Prompt":
        return cls(
            points=np.asarray(points, dtype=np.float32).reshape(-1, 2),
            labels=np.asarray(labels, dtype=np.int64).reshape(-1),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            mask_input=None if mask_input is None else np.asarray(mask_input, dtype=np.float32),
        )


@dataclass(frozen=True)
class PreparedImage:
    """An input image and what the decoder needs to map masks back to it. The encoder's
    pixels are computed only on a cache miss (``SamPredictor.pixel_values``)."""

    image: PILImage.Image  # RGB
    original_size: tuple[int, int]  # (H, W) of the input
    reshaped_size: tuple[int, int]  # (h, w) after resizing the longest side to S
    content_key: str  # hash of the RGB pixels: the embedding-cache key


@dataclass
class MaskCandidates:
    """The decoder's answer for one prompt set."""

    masks: np.ndarray  # (K, H, W) bool at the input resolution
    scores: np.ndarray  # (K,) float32 predicted IoU
    low_res_logits: np.ndarray  # (K, h, w) float32
    best_index: int  # argmax of scores


def content_key(image: PILImage.Image) -> str:
    """Hash of the decoded pixels (so PNG, JPEG-decoded or raw bytes of one image agree)."""
    rgb = image.convert("RGB")
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=20)
    digest.update(f"{rgb.width}x{rgb.height}".encode())
    return digest.hexdigest()


def _finite(*values: float) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def prompt_violations(prompt: Prompt, width: int, height: int, mask_size: int, field: str) -> list[tuple[str, str]]:
    """Field violations of one prompt set against an image of ``width`` x ``height``.

    Points must lie in the image (0 <= x < width, 0 <= y < height, pixel coordinates);
    boxes within [0, width] x [0, height] with x0 <= x1 and y0 <= y1.
    """
    # ``field`` is the SDK argument holding this prompt set ("prompt_sets[2]"), or "" when the
    # prompt's parts are arguments of their own (segment(points=, labels=, boxes=, mask_input=)).
    prefix = f"{field}." if field else ""
    violations: list[tuple[str, str]] = []
    if len(prompt.points) == 0 and len(prompt.boxes) == 0:
        violations.append((field or "points", "the prompt set is empty: give at least one point or one box"))
    if len(prompt.labels) != len(prompt.points):
        violations.append((f"{prefix}labels", f"{len(prompt.labels)} labels for {len(prompt.points)} points"))
    for i, (x, y) in enumerate(prompt.points):
        where = f"{prefix}points[{i}]"
        if not _finite(x, y):
            violations.append((where, f"coordinates must be finite, got ({x}, {y})"))
        elif not (0 <= x < width and 0 <= y < height):
            violations.append((where, f"point ({x:g}, {y:g}) lies outside the {width}x{height} image "
                                      f"(need 0 <= x < {width}, 0 <= y < {height})"))
    for i, label in enumerate(prompt.labels):
        if label not in (0, 1):
            violations.append((f"{prefix}labels[{i}]", f"label must be 1 (inside) or 0 (outside), got {label}"))
    if len(prompt.boxes) > 1:
        violations.append((f"{prefix}boxes", f"at most one box per prompt set, got {len(prompt.boxes)}; "
                                             "segment several objects with the batch form"))
    for i, (x0, y0, x1, y1) in enumerate(prompt.boxes):
        where = f"{prefix}boxes[{i}]"
        if not _finite(x0, y0, x1, y1):
            violations.append((where, "coordinates must be finite"))
        elif x1 < x0 or y1 < y0:
            violations.append((where, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x0 <= x1 and y0 <= y1"))
        elif min(x0, y0) < 0 or x1 > width or y1 > height:
            violations.append((where, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) exceeds the {width}x{height} image"))
    if prompt.mask_input is not None:
        shape = tuple(prompt.mask_input.shape)
        if shape not in ((mask_size, mask_size), (1, mask_size, mask_size)):
            violations.append((f"{prefix}mask_input", f"shape {list(shape)} does not match this model's low-res "
                                                      f"mask size: need [{mask_size}, {mask_size}]"))
        elif not np.isfinite(prompt.mask_input).all():
            violations.append((f"{prefix}mask_input", "logits must be finite"))
    return violations


def validate_prompts(prompts: Sequence[Prompt], width: int, height: int, mask_size: int,
                     fields: Optional[Sequence[str]] = None) -> None:
    """Raise InvalidArgument naming every offending field (``fields[i]`` names prompt i)."""
    if not prompts:
        raise InvalidArgument("prompt_sets", "give at least one prompt set")
    fields = fields or [f"prompt_sets[{i}]" for i in range(len(prompts))]
    violations = [v for prompt, field in zip(prompts, fields)
                  for v in prompt_violations(prompt, width, height, mask_size, field)]
    if violations:
        raise InvalidArgument.many(violations)


def _sam_decoder_class():
    """SamModel without its ViT image encoder, for servers whose encoder runs elsewhere (Triton).

    Built by transformers' own from_pretrained (variants, shards, dtype, tied weights all
    handled there); the checkpoint's ``vision_encoder.*`` tensors are expected-unused and are
    never materialised (safetensors are read per tensor). Keeps SamModel's methods, so the
    decode path is SamModel's own code on SamModel's own submodules.
    """
    from transformers import SamModel
    from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPositionalEmbedding, SamPromptEncoder

    class SamPromptDecoderModel(SamModel):
        _keys_to_ignore_on_load_unexpected = [r"^vision_encoder\."]

        def __init__(self, config):
            # SamModel.__init__ minus ``self.vision_encoder`` (keep the two in step).
            super(SamModel, self).__init__(config)
            self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
            self.prompt_encoder = SamPromptEncoder(config)
            config.mask_decoder_config._attn_implementation = config._attn_implementation
            self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
            self.post_init()

        def get_input_embeddings(self):
            return None  # the patch embedding belongs to the encoder, which is not here

        def get_image_embeddings(self, pixel_values, **kwargs):
            raise RuntimeError("this SAM was loaded without its image encoder (encoder on Triton)")

    return SamPromptDecoderModel


class SamPredictor:
    """A loaded SamModel + SamProcessor, stateless per call (safe across threads).

    ``SamPredictor.load(..., with_encoder=False)`` holds only what ``decode`` needs (prompt
    encoder, mask decoder, positional embedding): for servers whose image encoder is Triton.
    """

    def __init__(self, model, processor, name: str = "sam"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.has_encoder = getattr(model, "vision_encoder", None) is not None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.input_size = int(processor.image_processor.size["longest_edge"])
        embedding_size = int(model.config.prompt_encoder_config.image_embedding_size)
        self.low_res_size = 4 * embedding_size  # SamMaskEmbedding downsamples 4x to the embedding grid
        # Computed once: the decoder's positional grid is the same for every call.
        with torch.no_grad():
            self._image_positional_embeddings = model.get_image_wide_positional_embeddings()

    @classmethod
    def load(cls, source: str, name: str = "", device: Optional[str] = None, dtype: Optional[str] = None,
             local_files_only: bool = True, variant: Optional[str] = None,
             with_encoder: bool = True) -> "SamPredictor":
        """``with_encoder=False``: skip the ViT image encoder (most of SAM's weights); ``encode``
        then raises, and embeddings must come from elsewhere (Triton)."""
        from transformers import SamModel, SamProcessor

        from atelier.core.device import pick_device

        device, dtype = pick_device(device, dtype)
        local_files_only = local_files_only or os.environ.get("ATELIER_ALLOW_DOWNLOADS") != "1"
        model_class = SamModel if with_encoder else _sam_decoder_class()
        model = model_class.from_pretrained(source, local_files_only=local_files_only, variant=variant) \
            .to(device=device, dtype=dtype)
        processor = SamProcessor.from_pretrained(source, local_files_only=local_files_only)
        return cls(model, processor, name=name or str(source))

    # ------------------------------------------------------------------ encoder side
    def prepare(self, image: PILImage.Image) -> PreparedImage:
        rgb = image.convert("RGB")
        height, width = rgb.height, rgb.width
        # SamImageProcessor's resize rule (longest side to S, rounded); pixel_values() checks it.
        # A side of a very thin image (200x1) would round to 0: it keeps at least one pixel.
        scale = self.input_size / max(height, width)
        reshaped = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        return PreparedImage(image=rgb, original_size=(height, width), reshaped_size=reshaped,
                             content_key=content_key(rgb))

    def pixel_values(self, prepared: PreparedImage) -> torch.Tensor:
        """The encoder input (3, S, S) float32: SamProcessor's resize, rescale, normalise, pad."""
        image = prepared.image
        if min(int(side * self.input_size / max(prepared.original_size) + 0.5) for side in prepared.original_size) < 1:
            # The processor would resize a side to 0 and fail: resize to our (>= 1 px) size
            # first, with the processor's own filter; its longest side is then S already.
            height, width = prepared.reshaped_size
            image = image.resize((width, height), resample=PILImage.Resampling(self.processor.image_processor.resample))
        encoded = self.processor.image_processor(images=[image], return_tensors="pt")
        reshaped = tuple(int(v) for v in encoded["reshaped_input_sizes"][0])
        if reshaped != prepared.reshaped_size:
            raise RuntimeError(f"resize rule mismatch: processor {reshaped}, ours {prepared.reshaped_size}")
        return encoded["pixel_values"][0].to(torch.float32)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image embeddings (B, C, s, s) on the model's device."""
        if not self.has_encoder:
            raise RuntimeError(f"SAM {self.name!r} was loaded without its image encoder (encoder on Triton)")
        return self.model.get_image_embeddings(pixel_values.to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------ decoder side
    def _to_model_frame(self, coords: np.ndarray, prepared: PreparedImage) -> torch.Tensor:
        # SamProcessor rescales prompts only together with an image; the image side is cached
        # here, so apply its coordinate transform (scale to the resized frame) directly.
        (old_h, old_w), (new_h, new_w) = prepared.original_size, prepared.reshaped_size
        scaled = coords.astype(np.float32).reshape(-1, 2) * np.array([new_w / old_w, new_h / old_h], np.float32)
        return torch.from_numpy(scaled).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, prepared: PreparedImage, prompt: Prompt,
               multimask: bool = False, mask_threshold: float = 0.0) -> MaskCandidates:
        """Prompt encoder + mask decoder for one prompt set on a (C, s, s) embedding."""
        embedding = embedding.to(self.device, self.dtype)[None]
        points = labels = boxes = masks = None
        if len(prompt.points):
            points = self._to_model_frame(prompt.points, prepared)[None, None]  # (1, 1, N, 2)
            labels = torch.from_numpy(prompt.labels).to(self.device)[None, None]  # (1, 1, N)
        if len(prompt.boxes):
            boxes = self._to_model_frame(prompt.boxes, prepared).reshape(1, 1, 4)
        if prompt.mask_input is not None:
            size = self.low_res_size
            masks = torch.from_numpy(prompt.mask_input.reshape(1, 1, size, size)).to(self.device, self.dtype)
        sparse, dense = self.model.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=boxes, input_masks=masks)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding,
            image_positional_embeddings=self._image_positional_embeddings,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        low_res = low_res[0].float().cpu()  # (1, K, h, w)
        full = self.processor.post_process_masks(
            [low_res], [prepared.original_size], [prepared.reshaped_size],
            binarize=False, pad_size={"height": self.input_size, "width": self.input_size},
        )[0][0]
        scores = iou[0, 0].float().cpu().numpy()
        return MaskCandidates(
            masks=(full > mask_threshold).numpy(),
            scores=scores,
            low_res_logits=low_res[0].numpy(),
            best_index=int(np.argmax(scores)),
        )

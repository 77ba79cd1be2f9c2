"""Client of the Inversion service: DDIM, SPDInv, NPI, ProxNPI, DirectInversion, null-text and
fixed-point inversion; P2P / MasaCtrl editing with ProxEdit and the SPDInv pipeline preset."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, describe_array, describe_image
from atelier.sdk.inversion_requests import METHOD_NAMES, edit_request, invert_request
from atelier.sdk.progress import CancelToken, ProgressArg
from atelier.sdk.transport import _Transport
from atelier.v1 import inversion_pb2, inversion_pb2_grpc

__all__ = ["InversionClient", "Inversion", "StepDiagnostics", "EditResult", "EditSource", "invert_request",
           "edit_request", "INVERT_DOC", "EDIT_DOC"]


@dataclass(frozen=True)
class StepDiagnostics:
    """Inversion step ``index`` (z_index from z_index-1): its fixed-point residual
    MSE(z_t, C1*z_{t-1} + C2*eps(z_t)) and the SPDInv rounds used (0 for DDIM)."""

    index: int
    timestep: int
    residual: float
    rounds: int


@dataclass(frozen=True, eq=False)
class Inversion:
    """An inverted image. ``z_T``: (1, 4, H/8, W/8) float32; ``chain``: z_0..z_T,
    (num_inference_steps+1, 4, H/8, W/8), when requested; ``null_embeddings``: null-text
    inversion's optimised unconditional embeddings, (num_inference_steps, L, D) float32 (else
    None). ``proto`` is the server's result, sent back as is by ``edit`` (chain and embeddings
    included); ``to_bytes``/``from_bytes`` persist it."""

    z_T: np.ndarray
    chain: Optional[np.ndarray]
    diagnostics: list[StepDiagnostics]
    usage: Usage
    prompt: str
    method: str
    num_inference_steps: int
    width: int
    height: int
    model: str
    proto: inversion_pb2.InversionResult = field(repr=False)
    null_embeddings: Optional[np.ndarray] = None

    @classmethod
    def from_proto(cls, msg: inversion_pb2.InversionResult) -> "Inversion":
        return cls(
            z_T=codec.tensor_to_numpy(msg.z_t, "result.z_t"),
            chain=codec.tensor_to_numpy(msg.chain, "result.chain") if msg.HasField("chain") else None,
            diagnostics=[StepDiagnostics(d.index, d.timestep, d.residual, d.rounds) for d in msg.diagnostics],
            usage=Usage.from_proto(msg.usage),
            prompt=msg.prompt,
            method=METHOD_NAMES.get(msg.method, str(msg.method)),
            num_inference_steps=msg.num_inference_steps,
            width=msg.width,
            height=msg.height,
            model=msg.model.name,
            proto=msg,
            null_embeddings=(codec.tensor_to_numpy(msg.null_embeddings, "result.null_embeddings")
                             if msg.HasField("null_embeddings") else None),
        )

    def to_bytes(self) -> bytes:
        return bytes(self.proto.SerializeToString())

    def __repr__(self) -> str:
        return (f"Inversion(model={self.model!r}, method={self.method!r}, prompt={self.prompt!r}, "
                f"num_inference_steps={self.num_inference_steps}, size={self.width}x{self.height}, "
                f"z_T={describe_array(self.z_T)}, chain={describe_array(self.chain)}, "
                f"null_embeddings={describe_array(self.null_embeddings)}, usage={self.usage!r})")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Inversion":
        return cls.from_proto(inversion_pb2.InversionResult.FromString(data))


@dataclass(frozen=True, eq=False)
class EditResult:
    """An edit: ``image`` (PIL, RGB), ``source_image`` (the source branch's reconstruction,
    present when ``return_source=True``) and ``usage``. ``save(path)`` saves ``image``."""

    image: PILImage.Image
    source_image: Optional[PILImage.Image]
    usage: Usage
    proto: inversion_pb2.EditResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: inversion_pb2.EditResult) -> "EditResult":
        source = codec.image_to_pil(msg.source_image, "result.source_image") if msg.HasField("source_image") else None
        return cls(codec.image_to_pil(msg.image, "result.image"), source, Usage.from_proto(msg.usage), msg)

    def save(self, path: Union[str, "os.PathLike[str]"], **pil_options: Any) -> None:
        """Save the edited image (PIL's ``Image.save``)."""
        self.image.save(path, **pil_options)

    def __repr__(self) -> str:
        return (f"EditResult(image={describe_image(self.image)}, source_image={describe_image(self.source_image)}, "
                f"usage={self.usage!r})")


# What edit() takes as ``source``: an Inversion (or the server's InversionResult), or an image
# to invert in the same call.
EditSource = Union[Inversion, inversion_pb2.InversionResult, ImageLike]

INVERT_DOC = """Invert ``image`` under its source ``prompt``; returns an ``Inversion``.

``method``: "spdinv" (default; Source-Prompt-Disentangled Inversion), "ddim", "npi"
(negative-prompt inversion), "proxnpi" (ProxEdit), "direct_inversion", "null_text" or
"fixed_point" (AIDI-style, Anderson-accelerated). The method also picks how ``edit`` samples
from the result. ``return_chain=True`` also returns z_0..z_T (needed by ``edit`` for
"direct_inversion" and for inversion guidance). Options left None take the server's
(the reference implementations') defaults:

- "spdinv": ``max_rounds`` (K, 25), ``learning_rate`` (1e-3), ``loss_threshold`` (delta,
  5e-6), ``weight_decay`` (1e-2), ``check_first`` (False: the reference's Adam-step-then-check
  order; True checks delta before stepping, cheaper and measurably worse).
- "fixed_point": ``max_rounds`` (25), ``loss_threshold`` (5e-6), ``anderson_memory`` (3;
  0 is plain iteration).
- "null_text": ``null_text_guidance_scale``, the guidance the embeddings are optimised for
  (default: the model's default guidance); the embeddings come back as
  ``Inversion.null_embeddings`` and ``edit`` sends them back.

An option of another method raises ValueError; bad values raise ``InvalidArgumentError`` naming
the argument.
"""

EDIT_DOC = """Edit towards ``target_prompt``; returns an ``EditResult`` (``.image``, ``.usage``, and
with ``return_source=True`` the source branch's reconstruction ``.source_image``).

``source`` is an ``Inversion`` (from ``invert``, sent back with its chain and null-text
embeddings) or an image; an image needs ``source_prompt`` and is inverted in the same call
with ``method`` (default "spdinv"), ``num_inference_steps`` (default 50) and the inversion
options of ``invert`` (``max_rounds``, ``learning_rate``, ``loss_threshold``,
``weight_decay``, ``check_first``, ``anderson_memory``, ``null_text_guidance_scale``).
``guidance_scale=None`` uses the model's default (``client.models()``:
``default_guidance_scale``, e.g. 2.5 for the embedded toy).

``preset="spdinv"`` fills unset options with SPDInv's scripts' pipeline (P2P: refine mode,
local blend on the changed words, their attention x2). ProxEdit, defaulting per the
inversion method (on for "spdinv" and "proxnpi"): ``proximal_guidance`` (bool),
``quantile`` (in (0, 1); 0.7 for P2P, 0.6 for MasaCtrl), ``inversion_guidance`` (P2P only;
needs the chain) and ``inversion_guidance_timestep`` (400).

``engine="p2p"`` takes ``mode`` ("replace", "refine", "reweight"; default: chosen by the
server), ``cross_replace_fraction``/``self_replace_fraction``, ``reweight`` {word: scale},
``blend_words`` and ``blend_threshold``. ``engine="masactrl"`` takes ``start_step`` (4),
``start_layer`` (10), ``end_step`` (50: control over steps [start_step, end_step)) and
MaskAuto: ``mask_source_words`` and ``mask_target_words`` (both set: foreground follows
foreground, background background) with ``mask_threshold`` (0.1). Options of the other engine
raise ValueError; bad values raise ``InvalidArgumentError`` naming the argument.

``concept`` (a personalization ``Concept`` or its id) applies a trained EqDiff concept to the
edit's target: ``target_prompt`` must contain its token (``concept.token``).
"""


def with_concept(request: inversion_pb2.EditRequest, concept: Any) -> inversion_pb2.EditRequest:
    """Name ``concept`` (a personalization ``Concept``, anything with an ``id``, or an id) in ``request``."""
    if concept is None:
        return request
    concept_id = getattr(concept, "id", concept)
    if not isinstance(concept_id, str) or not concept_id:
        raise TypeError(f"concept must be a Concept or a non-empty concept id, got {type(concept).__name__}")
    request.concept_id = concept_id
    return request


class InversionClient:
    """``client.inversion``: invert images and edit them (server-streaming calls with progress).

    Every call takes ``progress`` (None, True for a tqdm bar, or a callable receiving
    ``atelier.Progress``), ``timeout`` (seconds; default: the client's) and ``cancel``
    (an ``atelier.CancelToken``).
    """

    def __init__(self, transport: _Transport):
        self._transport = transport
        self._stub = inversion_pb2_grpc.InversionStub(transport.channel)

    def invert(
        self,
        image: ImageLike,
        prompt: str,
        method: str = "spdinv",
        num_inference_steps: int = 50,
        return_chain: bool = False,
        max_rounds: Optional[int] = None,
        learning_rate: Optional[float] = None,
        loss_threshold: Optional[float] = None,
        weight_decay: Optional[float] = None,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
        *,
        check_first: Optional[bool] = None,
        anderson_memory: Optional[int] = None,
        null_text_guidance_scale: Optional[float] = None,
    ) -> Inversion:
        request = invert_request(image, prompt, method, num_inference_steps, return_chain, max_rounds,
                                 learning_rate, loss_threshold, weight_decay, model, check_first=check_first,
                                 anderson_memory=anderson_memory, null_text_guidance_scale=null_text_guidance_scale)
        return Inversion.from_proto(self._transport.stream(self._stub.Invert, request, timeout, progress, cancel=cancel))

    invert.__doc__ = INVERT_DOC

    def edit(
        self,
        source: EditSource,
        target_prompt: str,
        engine: str = "p2p",
        guidance_scale: Optional[float] = None,
        *,
        return_source: bool = False,
        source_prompt: Optional[str] = None,
        method: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        max_rounds: Optional[int] = None,
        learning_rate: Optional[float] = None,
        loss_threshold: Optional[float] = None,
        weight_decay: Optional[float] = None,
        check_first: Optional[bool] = None,
        anderson_memory: Optional[int] = None,
        null_text_guidance_scale: Optional[float] = None,
        preset: Optional[str] = None,
        proximal_guidance: Optional[bool] = None,
        quantile: Optional[float] = None,
        inversion_guidance: Optional[bool] = None,
        inversion_guidance_timestep: Optional[int] = None,
        mode: Optional[str] = None,
        cross_replace_fraction: Optional[float] = None,
        self_replace_fraction: Optional[float] = None,
        reweight: Optional[dict[str, float]] = None,
        blend_words: Optional[Sequence[str]] = None,
        blend_threshold: Optional[float] = None,
        start_step: Optional[int] = None,
        start_layer: Optional[int] = None,
        end_step: Optional[int] = None,
        mask_source_words: Optional[Sequence[str]] = None,
        mask_target_words: Optional[Sequence[str]] = None,
        mask_threshold: Optional[float] = None,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
        concept: Any = None,
    ) -> EditResult:
        request = edit_request(
            source, target_prompt, engine, guidance_scale, return_source=return_source, source_prompt=source_prompt,
            method=method, num_inference_steps=num_inference_steps, max_rounds=max_rounds,
            learning_rate=learning_rate, loss_threshold=loss_threshold, weight_decay=weight_decay,
            check_first=check_first, anderson_memory=anderson_memory,
            null_text_guidance_scale=null_text_guidance_scale, preset=preset, proximal_guidance=proximal_guidance,
            quantile=quantile, inversion_guidance=inversion_guidance,
            inversion_guidance_timestep=inversion_guidance_timestep, mode=mode,
            cross_replace_fraction=cross_replace_fraction, self_replace_fraction=self_replace_fraction,
            reweight=reweight, blend_words=blend_words, blend_threshold=blend_threshold, start_step=start_step,
            start_layer=start_layer, end_step=end_step, mask_source_words=mask_source_words,
            mask_target_words=mask_target_words, mask_threshold=mask_threshold, model=model,
        )
        with_concept(request, concept)
        return EditResult.from_proto(self._transport.stream(self._stub.Edit, request, timeout, progress, cancel=cancel))

    edit.__doc__ = EDIT_DOC

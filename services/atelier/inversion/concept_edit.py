"""A personalization concept applied to the target branch of one edit (pure: tensors in and out).

EqDiff concepts bring the placeholder's learnt embedding (S*_LF + S*_HF, injected token by token
id as EqDiff's own generation does) and Custom Diffusion K/V on every cross-attention layer.
Both act on the TARGET branch only: the source branch keeps reconstructing the real image with
the base model, so Prompt-to-Prompt / MasaCtrl still transfer its structure, and the concept
arrives through the target's text embedding and its cross-attention keys and values.

Everything is per call (``eqdiff.generate.load_concept`` builds the layers outside the shared
UNet; ``ConceptAttention`` applies them through the call's attention controller), so concurrent
edits with other concepts, or none, see the base model.

RRA is not applied: it replaces the output of the mid/up self-attention layers by a gated fusion
with the reference image's features, the very outputs that P2P's self-attention replacement and
MasaCtrl's mutual self-attention already replace with the source branch's; neither paper defines
which should win, and EqDiff's RRA also needs a reference UNet pass per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.eqdiff import fdte
from atelier.personalization.eqdiff.generate import load_concept
from atelier.personalization.eqdiff.rra import EqDiffLayers, _heads, _linear
from atelier.personalization.training import Concept

EQDIFF = "eqdiff"
LAYER_EDIT = "layer_edit"


def check_concept_kind(metadata: dict[str, str], model_name: str) -> None:
    """FailedPrecondition unless an EqDiff concept of ``model_name`` (cheap: metadata only)."""
    method = metadata.get("method")
    if method == LAYER_EDIT:
        # A LayerDiffusion state is a whole fine-tuned editing run of one image (its own UNet
        # deltas and sampling schedule), not an appearance to add to another image's edit.
        raise FailedPrecondition("layer_edit concepts cannot be used in Edit: they hold LayerDiffusion's "
                                 "per-image editing state, not a reusable appearance")
    if method != EQDIFF:
        raise FailedPrecondition(f"concepts trained with method {method!r} cannot be used in Edit (eqdiff only)")
    if metadata.get("base_model") != model_name:
        raise FailedPrecondition(f"the concept was trained on base model {metadata.get('base_model')!r}, "
                                 f"not the edit's model {model_name!r}")


@dataclass
class EditConcept:
    """A loaded EqDiff concept for one edit."""

    token: str
    initializer: str
    initializer_id: int
    embedding: torch.Tensor  # (1, D): S*_LF + S*_HF
    layers: EqDiffLayers

    def plan_text(self, prompt: str) -> str:
        """The prompt as the tokenizer sees it for word alignment: one initializer token where the
        placeholder stands, exactly where the embedding is injected."""
        return prompt.replace(self.token, f" {self.initializer} ")

    def encode(self, model, prompt: str) -> torch.Tensor:
        """(1, L, D) text embedding of ``prompt`` with the concept's vector at its placeholder."""
        ids, positions = fdte.tokenize_with_placeholder(model.tokenizer, [prompt], self.token, self.initializer_id)
        return fdte.encode_with_injection(model.text_encoder, ids, positions, self.embedding).to(model.dtype)


def prepare_concept(model, concept: Concept, target_prompt: str) -> EditConcept:
    """Load ``concept`` for ``model`` (FailedPrecondition) and check the target prompt names it."""
    check_concept_kind(concept.metadata, model.name)
    params, embeddings, layers = load_concept(model, concept)
    token = params.placeholder_token
    if token not in target_prompt:
        raise InvalidArgument("target_prompt", f"must contain the concept's placeholder {token!r}")
    initializer_id = fdte.single_token_id(model.tokenizer, params.initializer, "concept")
    with torch.no_grad():
        embedding = embeddings.combined()[None].detach()
    return EditConcept(token, params.initializer, initializer_id, embedding, layers)


@dataclass
class ConceptAttention(AttentionController):
    """Custom Diffusion K/V on the ``rows`` (the target branch's) of every cross-attention call,
    then the engine's controller (P2P / MasaCtrl) on the call with those keys and values."""

    inner: AttentionController
    layers: EqDiffLayers
    rows: torch.Tensor

    def wants(self, site: AttentionSite, step: int) -> bool:
        return self.layers.cd(site) is not None or self.inner.wants(site, step)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        processor = self.layers.cd(call.site)
        if processor is None:
            return self.inner.attend(call)
        rows = self.rows.to(call.key.device)
        context = call.context[rows]
        key, value = call.key.clone(), call.value.clone()
        key[rows] = _heads(_linear(processor.to_k_custom_diffusion, context), call.heads).to(key.dtype)
        value[rows] = _heads(_linear(processor.to_v_custom_diffusion, context), call.heads).to(value.dtype)
        if not self.inner.wants(call.site, call.step):
            return call.attend(key=key, value=value)
        edited = dataclasses.replace(call, key=key, value=value)
        out = self.inner.attend(edited)
        call.output_projected = edited.output_projected
        return out

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.after_step(step, latents)

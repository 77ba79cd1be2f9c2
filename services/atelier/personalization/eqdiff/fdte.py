"""FDTE: frequency-aware decoupled textual embedding (paper section 4.1; reference tools.py).

Two learned vectors, S*_HF (row 0) and S*_LF (row 1), stand for the placeholder token. Each
training sample is, with probabilities (p_low, p_high, p_original), its grayscale low-pass image
with S*_LF, its grayscale high-pass image with S*_HF, or the original colour image with
S*_LF + S*_HF; inference always injects S*_LF + S*_HF.

The vector replaces the placeholder's token embedding before CLIP's position embedding is added
(the reference's ``inj_forward_text``). The placeholder is located by TOKEN ID: the reference
counted whitespace-split words (+1 for BOS), which lands on the wrong token whenever an earlier
word splits into several BPE tokens ("Georgia O'Keeffe style <new2> painting"). We never add the
placeholder to the shared tokenizer (that would change the shared model for every caller):
prompts are tokenised around the placeholder string and a filler id (the initializer token, the
row the reference's ``<new2>`` held) marks its position.
"""
from __future__ import annotations

import torch
from torch import nn

from atelier.core.errors import InvalidArgument

from .params import REFERENCE_RESOLUTION

LOW, HIGH, ORIGINAL = 0, 1, 2  # the reference's flag values (train.py:1459)
HF_ROW, LF_ROW = 0, 1  # rows of the reference's freq_embeddings (tools.py:199-212)


def scaled_half_width(half_width_at_512: int, size: int) -> int:
    """A box half-width given in pixels of the reference's 512 px images, scaled to ``size`` px.

    The reference uses absolute half-widths on 512x512 images; we keep the same fraction of the
    spectrum: round(hw * size / 512), at least 1 (so the high-pass always removes DC).
    At 64 px: low-pass 50 -> 6, high-pass 5 -> 1.
    """
    return max(1, round(half_width_at_512 * size / REFERENCE_RESOLUTION))


def centre_box(height: int, width: int, half_h: int, half_w: int, device=None) -> torch.Tensor:
    """Boolean (H, W) mask of the reference's box [c-hw : c+hw] around the fftshift centre c = n//2."""
    box = torch.zeros(height, width, dtype=torch.bool, device=device)
    ch, cw = height // 2, width // 2
    box[max(0, ch - half_h):ch + half_h, max(0, cw - half_w):cw + half_w] = True
    return box


def filtered_field(images: torch.Tensor, kind: int, low_half_width: int = 50,
                   high_half_width: int = 5) -> torch.Tensor:
    """The complex ifft2 of the box-filtered grayscale spectrum, (B,H,W) (before the magnitude)."""
    height, width = images.shape[-2:]
    gray = images.float().mean(dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1))
    if kind == LOW:
        hh, hw = scaled_half_width(low_half_width, height), scaled_half_width(low_half_width, width)
        keep = centre_box(height, width, hh, hw, images.device)
    elif kind == HIGH:
        hh, hw = scaled_half_width(high_half_width, height), scaled_half_width(high_half_width, width)
        keep = ~centre_box(height, width, hh, hw, images.device)
    else:
        raise ValueError(f"kind must be LOW or HIGH, got {kind}")
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * keep, dim=(-2, -1)))


def frequency_filter(images: torch.Tensor, kind: int, low_half_width: int = 50,
                     high_half_width: int = 5) -> torch.Tensor:
    """Grayscale low- or high-pass of (B,3,H,W) images in [-1,1] (reference tools.py:137-174).

    Gray = mean of RGB; fft2 + fftshift; LOW keeps the centre box of half-width
    ``low_half_width`` (px at 512), HIGH zeroes the box of half-width ``high_half_width``;
    output = |ifft2| (the magnitude, as the reference: negative intensities fold to positive),
    repeated to 3 channels. The magnitude puts some energy back at low frequencies (|.| of a
    zero-mean high-pass field has a positive mean): that is the reference's behaviour.
    """
    filtered = filtered_field(images, kind, low_half_width, high_half_width).abs()
    return filtered.unsqueeze(1).expand(-1, 3, -1, -1).to(images.dtype)


def apply_choices(images: torch.Tensor, choices: torch.Tensor, low_half_width: int,
                  high_half_width: int) -> torch.Tensor:
    """Per-sample LOW / HIGH / ORIGINAL version of (B,3,H,W) images (reference split_fft_values)."""
    out = images.clone()
    for kind in (LOW, HIGH):
        rows = (choices == kind).nonzero().flatten()
        if len(rows):
            out[rows] = frequency_filter(images[rows], kind, low_half_width, high_half_width)
    return out


class FrequencyEmbeddings(nn.Module):
    """S*_HF and S*_LF, both initialised from one token embedding (reference train.py:905-912)."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(initial.detach().float().reshape(1, -1).repeat(2, 1).clone())

    def vectors(self, choices: torch.Tensor) -> torch.Tensor:
        """(B, D): S*_LF for LOW, S*_HF for HIGH, S*_LF + S*_HF for ORIGINAL."""
        hf, lf = self.weight[HF_ROW], self.weight[LF_ROW]
        table = torch.stack([lf, hf, lf + hf])
        return table[choices]

    def combined(self) -> torch.Tensor:
        """The inference embedding S*_ori = S*_LF + S*_HF (D,)."""
        return self.weight[LF_ROW] + self.weight[HF_ROW]


def single_token_id(tokenizer, word: str, field: str) -> int:
    """The id of ``word`` as ONE token of the tokenizer's vocabulary.

    A byte-level BPE tokenizer encodes any string, so "in the tokenizer" means a whole-word
    vocabulary entry; a word that splits into pieces (or is unknown) is InvalidArgument(field).
    (The reference took the first piece of its rare initializer "ktn+pll+ucd"; we ask for a word
    the model knows, so the embedding starts at a meaningful point.)
    """
    ids = tokenizer(word.strip(), add_special_tokens=False).input_ids if word.strip() else []
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or ids[0] == unknown:
        raise InvalidArgument(field, f"{word!r} is not a single word of the model's tokenizer")
    return int(ids[0])


def tokenize_with_placeholder(tokenizer, prompts: list[str], placeholder: str, filler_id: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), positions (B, L) bool): prompts tokenised with ``filler_id`` where the
    placeholder stands (every occurrence), padded/truncated like StableDiffusionPipeline."""
    max_length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    all_ids, all_positions = [], []
    for prompt in prompts:
        ids, positions = [bos], [False]
        for index, piece in enumerate(prompt.split(placeholder)):
            if index > 0:
                ids.append(filler_id)
                positions.append(True)
            if piece.strip():
                piece_ids = tokenizer(piece.strip(), add_special_tokens=False).input_ids
                ids += piece_ids
                positions += [False] * len(piece_ids)
        ids, positions = ids[:max_length - 1] + [eos], positions[:max_length - 1] + [False]
        ids += [pad] * (max_length - len(ids))
        positions += [False] * (max_length - len(positions))
        all_ids.append(ids)
        all_positions.append(positions)
    return torch.tensor(all_ids), torch.tensor(all_positions)


def text_transformer(text_encoder):
    # transformers 5 flattened CLIPTextModel; 4.x keeps the same parts under .text_model
    return getattr(text_encoder, "text_model", text_encoder)


def encode_with_injection(text_encoder, ids: torch.Tensor, positions: torch.Tensor,
                          vectors: torch.Tensor | None) -> torch.Tensor:
    """CLIP last hidden states with ``vectors[b]`` as the token embedding wherever
    ``positions[b]`` is set (differentiable w.r.t. ``vectors``; the encoder stays frozen).

    Runs the encoder's own submodules (embeddings, causal encoder, final norm) so the injection
    needs no hook or patch on the shared text encoder.
    """
    from transformers.masking_utils import create_causal_mask

    transformer = text_transformer(text_encoder)
    embeddings = transformer.embeddings
    device = embeddings.token_embedding.weight.device
    ids, positions = ids.to(device), positions.to(device)
    tokens = embeddings.token_embedding(ids)
    if vectors is not None:
        injected = vectors.to(tokens.dtype)[:, None, :].expand_as(tokens)
        tokens = torch.where(positions[..., None], injected, tokens)
    hidden = embeddings(inputs_embeds=tokens)
    mask = create_causal_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None)
    hidden = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    return transformer.final_layer_norm(hidden)

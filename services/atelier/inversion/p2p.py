"""Prompt-to-Prompt (Hertz et al. 2022) as an attention controller.

Follows google/prompt-to-prompt: word replace (`get_replacement_mapper`), refinement by global
token alignment (`get_refinement_mapper`), reweighting (`get_equalizer`, applied on top of the
other edits as the reference's `prev_controller`), and LocalBlend. Only the conditional rows
are edited; branch 0 of the batch is the source, branch 1.. the targets.

Scale mapping (the reference targets SD at 512px, 64x64 latents; "native" below is the UNet's
`sample_size`, 64 on SD 1.x):
- self-attention is replaced where the real-image references do it (the null-text notebook and
  SPDInv's utils/control_utils.py: maps of at most 32**2 positions, i.e. SD's 32x32, 16x16 and
  8x8 layers; the text-to-image notebook's 16**2 is not the real-image rule): maps of at most
  (native / 2)**2 positions.
- LocalBlend averages the down/up cross-attention maps of the reference's level, its 16x16
  layers (`down_cross[2:4] + up_cross[:3]`, a quarter of the latent side), max-pooled 3x3 (a
  window of 3/16 of the frame). On a small UNet a quarter of the latent is 2x2, where that pool
  makes the mask constant (the whole frame). So the level is the one closest to max(latent / 4,
  4) on a side (ties to the coarser) and the pool window keeps the reference's 3/16 of the frame: 2 * round(side / 16)
  + 1, i.e. 3x3 on SD's 16x16 maps (the reference exactly), none on a 4x4 map. Maps smaller than
  SD's 16x16 are also min-max normalised instead of max-normalised: on the toy's 4x4 maps (16
  positions share each softmax) every word attends everywhere at 35-70% of its peak, so the
  reference's "> 0.3 of the max" held on the whole frame (one-object colour edits: coverage 1.00
  with max, 0.19-0.56 with min-max, objects covering 4-19% of the image); on SD the floor is near
  0 and the reference's normalisation is kept.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite
from atelier.core.errors import InvalidArgument

MODES = ("auto", "replace", "refine", "reweight")
MAX_REWEIGHT = 100.0  # |scale| bound: attention probabilities times more overflow float16/32 sums


@dataclass
class P2PParams:
    mode: str = "auto"
    cross_replace_fraction: float = 0.8
    self_replace_fraction: float = 0.6
    reweight: dict[str, float] = field(default_factory=dict)
    blend_words: list[str] = field(default_factory=list)
    blend_threshold: float = 0.3
    blend_start_fraction: float = 0.2  # the reference's start_blend for real-image editing


# ---------------------------------------------------------------- tokens and words

@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the tokenizer sees it: ids with BOS/EOS, and each word's token positions."""

    words: tuple[str, ...]
    ids: tuple[int, ...]
    spans: tuple[tuple[int, ...], ...]


def normalize_word(word: str) -> str:
    return word.strip(string.punctuation).lower()


def tokenize_words(tokenizer, prompt: str, max_len: int, field: str = "prompt") -> PromptTokens:
    """Tokenise word by word (CLIP's BPE never merges across spaces) and check against the whole.

    Words are split at the whitespace the tokenizer itself cleans (`\\s+`); a prompt that still
    tokenises differently word by word (characters the tokenizer drops or merges) is refused as
    INVALID_ARGUMENT naming ``field``: P2P's token mapping needs each word's tokens.
    """
    words = prompt.split()
    ids, spans, position = [tokenizer.bos_token_id], [], 1
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        spans.append(tuple(p for p in range(position, position + len(word_ids)) if p < max_len - 1))
        ids.extend(word_ids)
        position += len(word_ids)
    ids = ids[: max_len - 1] + [tokenizer.eos_token_id]
    whole = tokenizer(prompt, truncation=True, max_length=max_len).input_ids
    if list(whole) != ids:
        raise InvalidArgument(field, "its words tokenise differently one by one than together (control or "
                              "unusual whitespace characters?); Prompt-to-Prompt needs each word's tokens")
    return PromptTokens(tuple(normalize_word(w) for w in words), tuple(ids), tuple(spans))


def word_positions(tokens: PromptTokens, word: str) -> list[int]:
    """Token positions of every occurrence of `word` (case and surrounding punctuation ignored)."""
    target = normalize_word(word)
    return [p for w, span in zip(tokens.words, tokens.spans) if w == target for p in span]


# ---------------------------------------------------------------- mappers

def replacement_mapper(source: PromptTokens, target: PromptTokens, max_len: int) -> torch.Tensor:
    """(max_len, max_len) M with target_attn[..., n] = sum_w source_attn[..., w] M[w, n].

    Words are paired by position (the prompts must have equal word counts); a replaced word's
    source tokens spread over its target tokens as in the reference (weight 1/len(target)).
    """
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1.0  # BOS
    last_source = last_target = 0
    for source_span, target_span in zip(source.spans, target.spans):
        if len(source_span) == len(target_span):
            for s, t in zip(source_span, target_span):
                mapper[s, t] = 1.0
        else:
            for t in target_span:
                mapper[list(source_span), t] = 1.0 / len(target_span)
        last_source = source_span[-1] if source_span else last_source
        last_target = target_span[-1] if target_span else last_target
    # EOS and padding positions follow one another.
    for offset in range(1, max_len - max(last_source, last_target)):
        mapper[last_source + offset, last_target + offset] = 1.0
    return mapper


def global_alignment(x: list[int], y: list[int], gap: int = 0, match: int = 1, mismatch: int = -1) -> list[int]:
    """Needleman-Wunsch over tokens (the reference's scores and tie-breaking: left, up, diagonal).

    Returns for each position of `y` the aligned position in `x`, or -1 when it has none.
    """
    rows, cols = len(x) + 1, len(y) + 1
    score = [[0] * cols for _ in range(rows)]
    trace = [[0] * cols for _ in range(rows)]
    for j in range(1, cols):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, rows):
        score[i][0], trace[i][0] = i * gap, 2
    for i in range(1, rows):
        for j in range(1, cols):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diagonal = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diagonal)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    y_to_x = [-1] * len(y)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif trace[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return y_to_x


def refinement_mapper(source: PromptTokens, target: PromptTokens, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas): target token n takes source token mapper[n] where alphas[n] == 1,
    keeps its own attention where alphas[n] == 0 (tokens new in the target). Padding maps to itself."""
    aligned = global_alignment(list(source.ids), list(target.ids))
    mapper = torch.arange(max_len)
    alphas = torch.ones(max_len)
    for n, m in enumerate(aligned):
        mapper[n] = max(m, 0)
        alphas[n] = float(m >= 0)
    return mapper, alphas


def equalizer(target: PromptTokens, weights: dict[str, float], max_len: int) -> torch.Tensor:
    """(max_len,) per-token attention scale: 1, except the weighted words' tokens."""
    scale = torch.ones(max_len)
    for word, value in weights.items():
        scale[word_positions(target, word)] = float(value)
    return scale


# ---------------------------------------------------------------- layer choice

def _side(latent_side: int, level: int) -> int:
    for _ in range(level):
        latent_side = (latent_side + 1) // 2  # diffusers' stride-2 downsamplers
    return latent_side


def self_replace_sites(sites: list[AttentionSite], latent_size: tuple[int, int], native_side: int) -> set[str]:
    """Self-attention sites whose maps have at most (native / 2)**2 positions (the real-image 32**2 rule)."""
    limit = (native_side // 2) ** 2
    return {s.name for s in sites if not s.is_cross
            and _side(latent_size[0], s.level) * _side(latent_size[1], s.level) <= limit}


REFERENCE_BLEND_SIDE = 16  # the reference's LocalBlend maps (SD 1.x at 512 px)


@dataclass(frozen=True)
class BlendLayout:
    sites: frozenset[str]
    pooling: int           # max-pool kernel side
    subtract_floor: bool   # min-max normalisation (maps smaller than the reference's)


def blend_sites(sites: list[AttentionSite], latent_size: tuple[int, int]) -> BlendLayout:
    """Where LocalBlend reads its maps and how it pools them: see the module docstring."""
    cross = [s for s in sites if s.is_cross and s.place != "mid"] or [s for s in sites if s.is_cross]
    if not cross:
        return BlendLayout(frozenset(), 1, False)
    wanted = max(latent_size[0] / 4, 4)
    level = min({s.level for s in cross}, key=lambda lv: (abs(_side(latent_size[0], lv) - wanted), -lv))
    side = _side(latent_size[0], level)
    return BlendLayout(frozenset(s.name for s in cross if s.level == level),
                       2 * round(side / REFERENCE_BLEND_SIDE) + 1,
                       side < REFERENCE_BLEND_SIDE)


# ---------------------------------------------------------------- local blend

class LocalBlend:
    """Keep the target latent equal to the source outside where the blend words attend.

    `word_weights`: (branches, max_len) 1 at the blend words' tokens of each branch's prompt.
    Maps are summed over steps (the reference's attention store), averaged over heads and layers.
    """

    def __init__(self, word_weights: torch.Tensor, threshold: float, start_step: int, pooling: int = 3,
                 subtract_floor: bool = False):
        self.word_weights = word_weights
        self.threshold = threshold
        self.start_step = start_step
        self.pooling = pooling
        self.subtract_floor = subtract_floor
        self.maps: dict[str, torch.Tensor] = {}

    def record(self, site: AttentionSite, cond_probs: torch.Tensor, spatial_size: tuple[int, int]) -> None:
        """cond_probs: (branches, heads, h*w, tokens) of the conditional rows, as used."""
        weights = self.word_weights.to(cond_probs.device, cond_probs.dtype)
        word_maps = (cond_probs * weights[:, None, None, :]).sum(-1).float()  # (branches, heads, h*w)
        word_maps = word_maps.reshape(*word_maps.shape[:2], *spatial_size)
        previous = self.maps.get(site.name)
        self.maps[site.name] = word_maps if previous is None else previous + word_maps

    def mask(self, latent_size: tuple[int, int]) -> torch.Tensor:
        maps = torch.cat(list(self.maps.values()), dim=1).mean(1, keepdim=True)  # (branches, 1, h, w)
        if self.pooling > 1:
            maps = F.max_pool2d(maps, kernel_size=self.pooling, stride=1, padding=self.pooling // 2)
        maps = F.interpolate(maps, size=latent_size)
        if self.subtract_floor:
            maps = maps - maps.amin(dim=(2, 3), keepdim=True)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        mask = maps > self.threshold
        return mask[:1] | mask

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        if step < self.start_step or not self.maps:
            return latents
        mask = self.mask(tuple(latents.shape[-2:])).to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])


# ---------------------------------------------------------------- the controller

class P2PController(AttentionController):
    """Edits the targets' conditional attention from the source's (branch 0).

    `cross_edit(base (heads,q,k), targets (T,heads,q,k)) -> (T,heads,q,k)` is the mode's
    replace_cross_attention; it applies for steps < cross_steps, self-attention replacement
    on `self_sites` for steps < self_steps, and LocalBlend records on its sites every step.
    """

    def __init__(self, cross_edit, cross_steps: int, self_steps: int, self_sites: set[str],
                 local_blend: LocalBlend | None = None, local_blend_sites: set[str] = frozenset()):
        self.cross_edit = cross_edit
        self.cross_steps = cross_steps
        self.self_steps = self_steps
        self.self_sites = self_sites
        self.local_blend = local_blend
        self.local_blend_sites = local_blend_sites if local_blend is not None else frozenset()

    def wants(self, site: AttentionSite, step: int) -> bool:
        if site.is_cross:
            return step < self.cross_steps or site.name in self.local_blend_sites
        return step < self.self_steps and site.name in self.self_sites

    def attend(self, call: AttentionCall) -> torch.Tensor:
        probs = call.probabilities()
        rows = call.layout.split(probs)  # (groups, branches, heads, q, k)
        cond = rows[call.layout.groups.index("cond")]
        if call.site.is_cross:
            if call.step < self.cross_steps:
                cond[1:] = self.cross_edit(cond[0], cond[1:])
            if call.site.name in self.local_blend_sites:
                if call.spatial_size is None:
                    raise RuntimeError(f"unknown feature-map size at {call.site.name}")
                self.local_blend.record(call.site, cond, call.spatial_size)
        else:
            cond[1:] = cond[:1].expand_as(cond[1:])
        return call.attend(probs=probs)

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.local_blend is None else self.local_blend(step, latents)


def replace_edit(mapper: torch.Tensor):
    """Word swap: target maps are the source's mapped through the token mapper (T, k, k)."""
    def edit(base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hqw,twn->thqn", base, mapper.to(base.device, base.dtype))
    return edit


def refine_edit(mapper: torch.Tensor, alphas: torch.Tensor):
    """Refinement: aligned tokens take the source's map, new tokens keep the target's."""
    def edit(base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alpha = alphas.to(base.device, base.dtype)[:, None, None, :]  # (T, 1, 1, k)
        taken = base[:, :, mapper.to(base.device)].permute(2, 0, 1, 3)  # (T, heads, q, k)
        return taken * alpha + targets * (1 - alpha)
    return edit


def reweight_edit(scale: torch.Tensor, previous=None):
    """Equalizer on top of a previous edit (or of the source's maps when there is none)."""
    def edit(base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        edited = previous(base, targets) if previous is not None else base.expand_as(targets)
        return edited * scale.to(base.device, base.dtype)[:, None, None, :]
    return edit

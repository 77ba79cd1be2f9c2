"""Presets: option sets that reproduce a published pipeline's defaults, filling what the request left unset.

``spdinv``: leeruibin/SPDInv's scripts.
- run_SPDInv_P2P.py: the refinement controller (``is_replace_controller=False``), a local blend on
  the edited word of each prompt (its ``--blended_word "src tgt"``) and the target word's
  attention reweighted x2 (``--eq_params 2``), with ProxEdit (the engine's defaults). Here the
  edited words are the words the two prompts do not share (a word-level diff), since a request
  names no blend word.
- run_SPDInv_MasaCtrl.py: guidance [1, scale] per branch, the source prompt as the source's
  unconditional and "" as the target's (npi_interp = 1), proximal guidance at quantile 0.6:
  what the MasaCtrl engine does by default, so the preset changes nothing there.
"""

from __future__ import annotations

import dataclasses
import difflib

from atelier.inversion.p2p import P2PParams, normalize_word

PRESETS = ("", "spdinv")
SPDINV_REWEIGHT = 2.0


def changed_words(source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """(source words, target words) outside the prompts' longest common word subsequence."""
    source = [normalize_word(w) for w in source_prompt.split()]
    target = [normalize_word(w) for w in target_prompt.split()]
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=source, b=target, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += [w for w in source[i1:i2] if w]
            added += [w for w in target[j1:j2] if w]
    return removed, added


def spdinv_p2p(source_prompt: str, target_prompt: str, params: P2PParams) -> P2PParams:
    """The SPDInv P2P script's options where ``params`` leaves them at their unset values."""
    removed, added = changed_words(source_prompt, target_prompt)
    return dataclasses.replace(
        params,
        mode="refine" if params.mode == "auto" else params.mode,
        blend_words=params.blend_words or list(dict.fromkeys(removed + added)),
        reweight=params.reweight or {word: SPDINV_REWEIGHT for word in dict.fromkeys(added)},
    )

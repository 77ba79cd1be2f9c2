"""Each inversion method's editing pipeline, as its paper and reference code run it.

The inversion methods differ not only in the chain they return but in how the edit samples from
it (SPDInv's Table 1 compares such pairs):
- ``ddim``: DDIM inversion and plain classifier-free guidance with "" (P2P's real-image edits).
- ``npi``: negative-prompt inversion (Miyake et al.): the DDIM chain, the SOURCE prompt as the
  unconditional embedding.
- ``proxnpi``: ProxEdit (Han et al.): NPI plus proximal and inversion guidance.
- ``spdinv``: SPDInv's own scripts: its chain with NPI and ProxEdit (P2P/ptp_utils.py).
- ``nti``: null-text inversion (Mokady et al.): per-step optimised unconditional embeddings.
- ``directinv``: DirectInversion (Ju et al., PnP Inversion): "" unconditional, and the source
  branch's gap to the inverted chain added back after every step, i.e. the source branch walks
  the chain exactly (its attention is the reconstruction's).
- ``fixed_point``: AIDI-style fixed-point iteration for the same fixed point as SPDInv; edited
  with SPDInv's pipeline so that the two differ only in the solver.
The request may override ProxEdit's options; the rest is what makes the method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRecipe:
    unconditional: str          # "source" (NPI), "null" (""), "optimised" (NTI's per-step embeddings)
    proximal_guidance: bool     # ProxEdit's default for this method
    inversion_guidance: bool
    pin_source: bool = False    # DirectInversion


RECIPES = {
    "ddim": EditRecipe("null", False, False),
    "npi": EditRecipe("source", False, False),
    "proxnpi": EditRecipe("source", True, True),
    "spdinv": EditRecipe("source", True, True),
    "nti": EditRecipe("optimised", False, False),
    "directinv": EditRecipe("null", False, False, pin_source=True),
    "fixed_point": EditRecipe("source", True, True),
}

"""LayerDiffusion (Li et al. 2023): layered controlled editing of one image (no public code: this
follows the paper, and says where the paper is silent or contradicts itself)."""
from .generate import generate_with_concept, load_concept
from .params import LayerDiffusionParams
from .run import LayerDiffusionRun

__all__ = ["LayerDiffusionParams", "LayerDiffusionRun", "generate_with_concept", "load_concept"]

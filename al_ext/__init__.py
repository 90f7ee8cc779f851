"""al_ext: Associated Learning for PyTorch.

Importing the package loads the compiled core (al_ext._C) and registers its ops under
torch.ops.al_ext.
"""
from ._extension import build_info
from . import data, ops, reference
from .nn import ALBlock, ALMLP, AssociatedLearning, BPNetwork, bp_baseline
from .pipeline import Pipeline, PipelineError
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "ALBlock",
    "ALMLP",
    "AssociatedLearning",
    "BPNetwork",
    "Pipeline",
    "PipelineError",
    "Trainer",
    "bp_baseline",
    "build_info",
    "data",
    "ops",
    "reference",
]

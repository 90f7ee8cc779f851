"""al_ext: Associated Learning for PyTorch.

Importing the package loads the compiled core (al_ext._C) and registers its ops under
torch.ops.al_ext.
"""
from ._extension import build_info
from . import callbacks, data, distributed, engines, label_warmup, models, ops, reference, text
from .engines import make_engine
from .errors import DistributedError, NonFiniteLossError
from .nn import ALBlock, ALMLP, AssociatedLearning, BPNetwork, bp_baseline
from .pipeline import Pipeline, PipelineError
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "ALBlock",
    "ALMLP",
    "AssociatedLearning",
    "BPNetwork",
    "DistributedError",
    "NonFiniteLossError",
    "Pipeline",
    "PipelineError",
    "Trainer",
    "bp_baseline",
    "build_info",
    "callbacks",
    "data",
    "distributed",
    "engines",
    "label_warmup",
    "make_engine",
    "models",
    "ops",
    "reference",
    "text",
]

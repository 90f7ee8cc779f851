"""AL past one process, on torch.distributed: data parallelism, the pipeline across ranks,
and both at once, launched by torchrun. ``Trainer(..., distributed=DistributedConfig(...))``
or ``torchrun --nproc-per-node N -m al_ext train --distributed ...``."""
from ..errors import DistributedError
from .config import DistributedConfig, Topology
from .engine import DistributedALEngine
from .inference import CrossRankInference

__all__ = ["CrossRankInference", "DistributedALEngine", "DistributedConfig", "DistributedError", "Topology"]

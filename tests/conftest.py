import pytest
import torch

import al_ext

CUDA_REASON = (
    "no CUDA device visible to torch" if not torch.cuda.is_available()
    else "al_ext was built without CUDA kernels"
)
HAS_CUDA = torch.cuda.is_available() and al_ext._extension.has_cuda_kernels()

# Every kernel test runs on the CPU, and on CUDA where this machine and build have it.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON))]


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 comparisons against the reference run with TF32 off."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def small_mlp(seed: int = 0, **kwargs) -> al_ext.ALMLP:
    torch.manual_seed(seed)
    options = dict(hidden=(24, 16), label_dim=12, bridge_factor=2)
    options.update(kwargs)
    return al_ext.ALMLP(20, 5, **options)

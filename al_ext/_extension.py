"""Loads the compiled core al_ext._C, after checking it was built for this torch.

Loading the module registers every op under torch.ops.al_ext. A build made against
another torch would fail in the dynamic loader with an unreadable symbol error, so
the version recorded at build time is compared first.
"""
from __future__ import annotations

from types import ModuleType

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps -e ."


class ExtensionBuildError(ImportError):
    """al_ext._C is missing or was built against another torch."""


def _load() -> ModuleType:
    try:
        from . import _build_info
    except ImportError as exc:
        raise ExtensionBuildError(
            f"al_ext's compiled core has not been built. From the source checkout run: {REBUILD_COMMAND}"
        ) from exc
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ExtensionBuildError(
            f"al_ext was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed. Rebuild it from the source checkout: {REBUILD_COMMAND}"
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ExtensionBuildError(
            f"al_ext._C could not be loaded ({exc}). Rebuild it from the source checkout: {REBUILD_COMMAND}"
        ) from exc
    return _C


_C = _load()


def build_info() -> dict[str, object]:
    """How the compiled core was built: {'torch_version': str, 'cuda': bool}."""
    return dict(_C.build_info())


def has_cuda_kernels() -> bool:
    return bool(_C.build_info()["cuda"])

"""The compiled core: how it was built, and the refusal to load against another torch."""
import pytest
import torch

import al_ext
from al_ext import _build_info, _extension


def test_build_info_matches_the_running_torch():
    info = al_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == _build_info.WITH_CUDA
    if torch.version.cuda is None:
        assert info["cuda"] is False, "a torch without CUDA cannot have produced a CUDA build"


def test_the_fused_cpu_step_runs_its_gemms_through_onednn_where_torch_has_it():
    # oneDNN's GEMMs were 1.3-1.7x MKL's at the dense block's thin shapes on these machines;
    # a torch that renamed the operator would otherwise fall back to ATen without a word.
    expected = "onednn" if torch.backends.mkldnn.is_available() else "aten"
    assert al_ext.build_info()["cpu_gemm"] == expected


def test_ops_are_registered_through_the_dispatcher():
    op = torch.ops.al_ext.mse_loss_and_grad.default
    assert op._schema.name == "al_ext::mse_loss_and_grad"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")


def test_import_with_another_torch_names_the_rebuild_command(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(_extension.ExtensionBuildError, match="built against torch 1.0.0") as err:
        _extension._load()
    assert _extension.REBUILD_COMMAND in str(err.value)

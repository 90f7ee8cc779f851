"""The CUDA sources compile, checked on any machine with nvcc, GPU or not.

CI has no GPU, so without this a broken CUDA file would only show on a GPU machine's
build. The torch-free kernels (.cu) are compiled with plain nvcc; the glue files, which
include torch's CUDA headers, are syntax-checked with the host compiler (a CPU-only torch
ships those headers but for one generated file, supplied by tests/cuda_compile_check/).
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GLUE_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cpp")) + [ROOT / "csrc" / "ops" / "registration.cpp",
                                                           ROOT / "csrc" / "scheduler" / "cuda_stage.cpp",
                                                           ROOT / "csrc" / "scheduler" / "cuda_graph_step.cpp",
                                                           ROOT / "csrc" / "python" / "module.cpp"]


def find_cuda_toolkit() -> Path | None:
    """CUDA_HOME, torch's guess, or the usual place (nvcc on PATH may be a wrapper script)."""
    for candidate in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    return None


TOOLKIT = find_cuda_toolkit()
NVCC = shutil.which("nvcc") or (str(TOOLKIT / "bin" / "nvcc") if TOOLKIT else None)
CUDA_INCLUDE = TOOLKIT / "include" if TOOLKIT else None

needs_nvcc = pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="no nvcc on this machine")
needs_cuda_headers = pytest.mark.skipif(
    CUDA_INCLUDE is None or not (CUDA_INCLUDE / "cuda_runtime.h").exists(), reason="no CUDA toolkit headers"
)


def run(cmd):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stderr[-4000:]}"


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_torch_free_kernel_compiles_with_nvcc(source, tmp_path):
    # torch's own nvcc flags, as the real build passes them: they turn off the implicit
    # float16/bfloat16 conversions, which a kernel must then not rely on.
    run([NVCC, *COMMON_NVCC_FLAGS, "-std=c++20", "-O1", "-arch=sm_90", "-c", source, "-o", tmp_path / "kernel.o"])


@needs_cuda_headers
@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_cuda_glue_compiles(source):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    includes = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'tests' / 'cuda_compile_check'}", f"-I{CUDA_INCLUDE}"]
    run([compiler, "-std=c++20", "-fsyntax-only", "-DAL_EXT_WITH_CUDA", "-DAL_EXT_TORCH_VERSION=\"check\"", *includes,
         source])


def test_every_cuda_source_is_checked():
    assert CU_FILES and len(GLUE_FILES) > 1, "no CUDA sources found: the paths above are stale"

"""Build al_ext and its compiled core al_ext._C against the torch already installed.

    pip install --no-build-isolation .

Build isolation would fetch a different (multi-GB CUDA) torch, so torch is not in
build-system.requires. CUDA kernels are built when torch has CUDA and nvcc is found;
torch.cuda.is_available() is not consulted, since a build box may have no GPU.
AL_EXT_FORCE_CUDA=1 / AL_EXT_DISABLE_CUDA=1 override the decision.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def build_with_cuda() -> bool:
    if env_flag("AL_EXT_DISABLE_CUDA"):
        return False
    if env_flag("AL_EXT_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("AL_EXT_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def write_build_info(with_cuda: bool) -> None:
    # Read at import, before the compiled module is loaded, so that a torch mismatch is
    # reported in words rather than as an undefined-symbol error from the loader.
    (ROOT / "al_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time; not tracked.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )


def extension():
    with_cuda = build_with_cuda()
    write_build_info(with_cuda)
    sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/scheduler/*.cpp")
                     + glob.glob("csrc/python/*.cpp"))
    # torch's headers need C++20 from 2.13 on; -O3 lets the elementwise loops vectorise;
    # at::parallel_for is an OpenMP pragma in a header, so without -fopenmp it runs serially;
    # -fno-math-errno lets sqrt vectorise (nothing here reads errno).
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno"]
    link = ["-fopenmp"]
    macros = [("AL_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    if not with_cuda:
        return CppExtension("al_ext._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # the H100/H200 machines; no GPU to ask here
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    macros.append(("AL_EXT_WITH_CUDA", None))
    # -lineinfo: compute-sanitizer and ncu name source lines; it changes no generated code.
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("al_ext._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

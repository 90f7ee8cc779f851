"""Builds al_ext's CUDA kernels (csrc/cuda/dense_block.cu, unmodified) as C++ for the CPU,
with this folder's CUDA runtime, into a shared library with kernel_driver.cpp's entry points
(or into the sanitize_kernels program).

The only change to the kernel source is mechanical: each `kernel<<<config>>>(args)` becomes
`::cuda_on_cpu::Launch(config)(kernel, args)`. The build is cached under the temporary
directory, keyed by a hash of the compiler, the flags and every source and header it reads,
so only the first run after a change pays for the compile.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_DIR = HERE.parent.parent / "csrc" / "cuda"
# delay.cu is left out: it reads the GPU's global timer with inline PTX, and only waits.
KERNEL_SOURCES = [KERNEL_DIR / "dense_block.cu"]
RUNTIME_SOURCES = [HERE / "block_runner.cpp", HERE / "kernel_driver.cpp", HERE / "conversions.cpp"]
# nvcc includes cuda_runtime.h in every .cu file before its first line; so does -include.
FLAGS = ["-std=c++20", "-O2", f"-I{HERE}", f"-I{KERNEL_DIR}", "-include", "cuda_runtime.h"]

# kernel<T><<<grid, block, shmem, stream>>>( ; group 3 is set when the argument list is empty.
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\))?", re.S)


def rewrite_launches(source: str) -> str:
    def launch(match: re.Match) -> str:
        kernel, config, empty = match.groups()
        return f"::cuda_on_cpu::Launch({config})({kernel}" + (")" if empty else ", ")

    rewritten = LAUNCH.sub(launch, source)
    if "<<<" in rewritten:
        raise ValueError("a kernel launch the rewrite does not recognise is left: " +
                         rewritten[rewritten.index("<<<") - 60 : rewritten.index("<<<") + 60])
    return rewritten


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(compiler: str, program: bool = False) -> Path:
    """The shared library of kernel_driver.cpp's entry points, or (program=True) the
    sanitize_kernels program, compiled unless a cached build matches the sources."""
    main = [HERE / "sanitize_kernels.cpp"] if program else []
    flags = FLAGS if program else FLAGS + ["-fPIC", "-shared"]
    inputs = sorted(set(KERNEL_SOURCES + RUNTIME_SOURCES + main + list(HERE.glob("*.h")) + list(KERNEL_DIR.glob("*.cuh"))))
    key = hashlib.sha256("\0".join([compiler, *flags]).encode())
    for path in inputs:
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = Path(tempfile.gettempdir()) / "al_ext_cuda_on_cpu" / key.hexdigest()[:20]
    output = cache / ("sanitize_kernels" if program else "kernels_on_cpu.so")
    if output.exists():
        return output
    cache.mkdir(parents=True, exist_ok=True)
    rewritten = []
    for source in KERNEL_SOURCES:
        target = cache / (source.name + ".cpp")
        target.write_text(rewrite_launches(source.read_text()))
        rewritten.append(target)
    partial = cache / f"{output.name}.{os.getpid()}"
    result = subprocess.run([compiler, *flags, *map(str, RUNTIME_SOURCES + main + rewritten), "-o", str(partial)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the kernels for the CPU failed:\n{result.stderr[-6000:]}")
    os.replace(partial, output)  # atomic: a concurrent run sees the whole file or none
    return output

#!/usr/bin/env bash
# compute-sanitizer over the CUDA kernels, on a GPU machine: builds the torch-free driver of
# every launcher (tests/cuda_on_cpu/sanitize_kernels.cpp; over a process that loads torch the
# sanitizer would take minutes), probes whether the sanitizer can see this device (on some
# machines it refuses it: "Device not supported"), then runs memcheck past one grid and
# racecheck, synccheck and initcheck on smaller sizes. A refused device is reported, exit 0.
#
#     bash scripts/sanitize_kernels.sh [build folder, default ./gpu-check]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
DRIVER="$OUT/sanitize_kernels"
nvcc -std=c++17 -O2 -lineinfo -arch=sm_90 -Icsrc/cuda csrc/cuda/dense_block.cu tests/cuda_on_cpu/kernel_driver.cpp \
  tests/cuda_on_cpu/sanitize_kernels.cpp -o "$DRIVER" || { echo "the driver did not build"; exit 1; }

probe=$(compute-sanitizer --tool memcheck --error-exitcode 1 "$DRIVER" 1 2>&1)
if ! grep -q "^ok" <<<"$probe"; then
  if grep -qiE "not supported|command not found|error 999|unknown error" <<<"$probe"; then
    echo "compute-sanitizer cannot check this machine's device; the sanitizer was not run:"
    tail -n 5 <<<"$probe"
    exit 0
  fi
  echo "the probe failed:"
  echo "$probe"
  exit 1
fi
# In order of what they find most often.
compute-sanitizer --tool memcheck --error-exitcode 1 "$DRIVER" \
  && compute-sanitizer --tool racecheck --error-exitcode 1 "$DRIVER" 40000 \
  && compute-sanitizer --tool synccheck --error-exitcode 1 "$DRIVER" 40000 \
  && compute-sanitizer --tool initcheck --error-exitcode 1 "$DRIVER" 40000

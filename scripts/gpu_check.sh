#!/usr/bin/env bash
# Every check that needs a GPU, for a session that has one (the device tool): build with
# CUDA, the CUDA-facing tests, the GPU benchmarks, and compute-sanitizer (memcheck, then
# racecheck) on the kernel tests, in that order of importance. Each part has its own time
# limit, and all of them share one budget (GPU_CHECK_BUDGET seconds, default 560: a device
# command may run 10 minutes, and a session's device time is short), so a slow part cannot
# starve the ones after it of more than its limit, and the run ends inside the budget.
# Each part writes its log to $OUT (default: ./gpu-check/).
#
#     bash scripts/gpu_check.sh                          # everything the budget allows
#     GPU_CHECK_PARTS=sanitizer bash scripts/gpu_check.sh   # one part again, reusing the build
#
# Nothing is installed: the device machine has torch, pytest, hypothesis and pytest-benchmark
# and no network, so the extension is built in place (setup.py build_ext --inplace).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PARTS="${GPU_CHECK_PARTS:-build tests bench_block bench_pipeline sanitizer}"
BUDGET="${GPU_CHECK_BUDGET:-560}"
status=0

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    status=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 1
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
  fi
  echo "commit ${commit:-unknown (no git here: say which commit was sent)}"
  date -u
} 2>&1 | tee "$OUT/env.log"

part build 220 env MAX_JOBS="$(nproc)" AL_EXT_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1
"$PY" -c "import al_ext, sys; sys.exit(0 if al_ext._extension.has_cuda_kernels() else 1)" \
  || { echo "al_ext was built without CUDA kernels"; exit 1; }

part tests 110 "$PY" -m pytest tests/test_dense_block.py tests/test_ops.py tests/test_pipeline_cuda.py \
  tests/test_scheduler.py -q -rs -p no:cacheprovider
part bench_block 150 "$PY" -m pytest benchmarks/test_bench_block_cuda.py --benchmark-only -s -q \
  --benchmark-columns=mean,rounds -p no:cacheprovider
part bench_pipeline 90 "$PY" -m pytest benchmarks/test_bench_pipeline_cuda.py --benchmark-only -s -q \
  --benchmark-columns=mean,rounds -p no:cacheprovider
# The kernels alone, small shapes: the sanitizer slows everything down many times over.
KERNEL_TESTS=(tests/test_dense_block.py tests/test_ops.py -q -p no:cacheprovider -k "cuda and not hypothesis")
part sanitizer 500 bash -c "compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest ${KERNEL_TESTS[*]@Q} \
  && compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest ${KERNEL_TESTS[*]@Q}"
exit "$status"

#!/usr/bin/env bash
# Every check that needs a GPU, for a session that has one (the device tool): build with
# CUDA, the CUDA-facing tests, the GPU benchmarks, and compute-sanitizer (memcheck and
# racecheck) on the kernel tests. Each part has its own time limit, so a slow part cannot
# starve the others, and writes its log to $OUT (default: ./gpu-check/). One device command
# may run 10 minutes, so it takes two calls, the second while the machine is still warm
# (within 30 s: the build is kept):
#
#     bash scripts/gpu_check.sh                         # build, tests, benchmarks: under 10 min
#     GPU_CHECK_PARTS=sanitizer bash scripts/gpu_check.sh  # reuses the build left in place
#
# Nothing is installed: the device machine has torch, pytest, hypothesis and pytest-benchmark
# and no network, so the extension is built in place (setup.py build_ext --inplace).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PARTS="${GPU_CHECK_PARTS:-build tests bench_pipeline bench_block}"
status=0

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
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
part bench_pipeline 90 "$PY" -m pytest benchmarks/test_bench_pipeline_cuda.py --benchmark-only -s -q \
  --benchmark-columns=mean,rounds -p no:cacheprovider
part bench_block 150 "$PY" -m pytest benchmarks/test_bench_block_cuda.py --benchmark-only -s -q \
  --benchmark-columns=mean,rounds -p no:cacheprovider
# The kernels alone, small shapes: the sanitizer slows everything down many times over.
KERNEL_TESTS=(tests/test_dense_block.py tests/test_ops.py -q -p no:cacheprovider -k "cuda and not hypothesis")
part sanitizer 500 bash -c "compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest ${KERNEL_TESTS[*]@Q} \
  && compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest ${KERNEL_TESTS[*]@Q}"
exit "$status"

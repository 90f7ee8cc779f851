#!/usr/bin/env bash
# Every check that needs a GPU, as one device command of at most 9 minutes, build included
# (a device machine is lent for about 15 minutes in all, its start included, and one command
# runs at most 10): build with CUDA, the CUDA tests, one benchmark point per target, then
# compute-sanitizer on a torch-free driver of the kernels if it works on this machine
# (scripts/sanitize_kernels.sh, which probes first: on some machines it refuses the device).
#
# The parts' limits add up to 540 s. A part runs under the smaller of its limit and what is
# left of GPU_CHECK_BUDGET (default 540); a part with under 30 s left is skipped and reported
# as such, which does not fail the run; a part that fails or runs out of its time does.
# Each part writes its log to $OUT (default: ./gpu-check/).
#
#     bash scripts/gpu_check.sh                             # everything, in order
#     GPU_CHECK_PARTS="build sanitizer" bash scripts/gpu_check.sh   # some parts again
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
BUDGET="${GPU_CHECK_BUDGET:-540}"
status=0
skipped=()

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: left out, ${left}s of the ${BUDGET}s budget left"
    skipped+=("$name")
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  if [ "$rc" -eq 124 ]; then echo "== $name: ran out of its ${limit}s"; fi
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

part build 200 env MAX_JOBS="$(nproc)" AL_EXT_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
built=1
"$PY" -c "import al_ext, sys; sys.exit(0 if al_ext._extension.has_cuda_kernels() else 1)" > /dev/null 2>&1 \
  || { echo "== al_ext has no CUDA build here: the torch parts are left out"; built=0; status=1; }

if [ "$built" -eq 1 ]; then
  # The CUDA cases only (-k matches test names, parameter ids and module names, in any case):
  # the CPU cases run in CI. bad_counter has a CUDA branch in a CPU test.
  part tests 120 "$PY" -m pytest tests/test_dense_block.py tests/test_dense_block_bf16_cuda.py tests/test_ops.py \
    tests/test_pipeline_cuda.py -q -rs -p no:cacheprovider -k "cuda or bad_counter"
  # One point per target: the block step at issue 3's large batch (with its one torch.compile,
  # cold here), and the pipeline at issue 4's L = 8, width 512, batch 64.
  part bench_block 100 "$PY" -m pytest benchmarks/test_bench_block_cuda.py --benchmark-only -s -q \
    --benchmark-columns=mean,rounds -p no:cacheprovider -k batch4096
  part bench_pipeline 60 "$PY" -m pytest benchmarks/test_bench_pipeline_cuda.py --benchmark-only -s -q \
    --benchmark-columns=mean,rounds -p no:cacheprovider -k L8-width512
fi

part sanitizer 60 bash scripts/sanitize_kernels.sh "$OUT"

[ "${#skipped[@]}" -eq 0 ] || echo "== left out for lack of time (not failures): ${skipped[*]}"
echo "== gpu_check: $([ "$status" -eq 0 ] && echo passed || echo FAILED) in ${SECONDS}s"
exit "$status"

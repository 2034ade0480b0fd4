#!/usr/bin/env bash
# One-shot GPU check, ready for whenever a GPU machine is at hand (about 5 minutes on one GPU):
# the CUDA tests (recording CUDA tensors bit-exact; 0 host syncs per training step under
# torch.cuda.set_sync_debug_mode("error")), then the GPU benchmarks: recorded/unrecorded wall of
# Crucible-3 on the GPU (bench_hf_overhead.py --no-hf, with A/A); a GPT-2-size embedding recorded while a
# GPT-2-shaped model trains (steps/s with and without, rows, every=10, writer threads, host cores,
# stalls); the writer with this machine's cores. Everything goes to $OUT (or
# benchmarks/results/gpu/): gpu_machine.txt, gpu_check.log and results/*.json, with the commit.
#
#   bash benchmarks/gpu_check.sh --download-wheels   # here, with pip: the packages a bare CUDA
#                                                    # image lacks (zarr and its needs), into .whl/
#   bash benchmarks/gpu_check.sh                     # there, in the repository root (carry .whl)
#   bash benchmarks/gpu_check.sh --dry-run           # here, on the CPU: every step but the CUDA
#                                                    # ones (their tests skip, benchmarks at CPU size)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0)

if [ "${1:-}" = "--download-wheels" ]; then
    # The GPU image's Python (3.12 on the machines seen so far) has torch, numpy, safetensors,
    # tokenizers, click, tqdm, pytest and pytest-timeout, not zarr: fetch its wheels for that Python.
    version=${GPU_PYTHON_VERSION:-3.12}
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; fi

out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
if [ -d .whl ] && [ $dry = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/crucible-site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/crucible-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CRUCIBLE_BENCH_RESULTS="$PWD/$out/results"   # harness.py writes there: the committed results stay
case "$out" in /*) export CRUCIBLE_BENCH_RESULTS="$out/results";; esac
if [ $dry = 0 ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check (--dry-run for the CPU)')" || exit 1
    device=cuda; quick=
else
    device=cpu; quick=--quick
fi
log="$out/gpu_check.log"
: > "$log"

{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$( [ $dry = 1 ] && echo ' (dry run on the CPU)')"
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, zarr, numcodecs, os; print('torch', torch.__version__, 'zarr', zarr.__version__, 'numcodecs', numcodecs.__version__, 'cores', len(os.sched_getaffinity(0)))"
} > "$out/gpu_machine.txt" 2>&1
cat "$out/gpu_machine.txt"

status=0
step() {  # step SECONDS TITLE COMMAND...: run one part, its output to the log; a failure marks the check
    local seconds=$1 title=$2; shift 2
    echo "== $title" | tee -a "$log"
    timeout "$seconds" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $title: exit $rc" | tee -a "$log"; status=1; }
}
step 150 "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py \
    "tests/test_faults.py::test_cuda_training_steps_do_not_synchronize"
step 200 "Crucible-3 overhead (bench_hf_overhead.py --no-hf --device $device --rounds 3 $quick)" \
    "$PY" benchmarks/bench_hf_overhead.py --no-hf --device $device --rounds 3 $quick
step 200 "GPT-2-size embedding while training (bench_gpu_embedding.py --device $device $quick)" \
    "$PY" benchmarks/bench_gpu_embedding.py --device $device $quick
step 300 "writer and reads with this machine's cores (bench_speed.py --quick --rounds 2)" \
    "$PY" benchmarks/bench_speed.py --quick --rounds 2

echo "gpu_check: exit $status; results in $out" | tee -a "$log"
exit $status

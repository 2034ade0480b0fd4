#!/usr/bin/env bash
# One-shot GPU check, ready for whenever a GPU machine is at hand (under 5 minutes on one GPU):
# the CUDA tests (recording CUDA tensors bit-exact; 0 host syncs per training step under
# torch.cuda.set_sync_debug_mode("error")), then the GPU benchmarks (recorded/unrecorded step time
# of Crucible-3 on the GPU, goal <= 1.05x; the writer with all cores but one). Everything it
# prints and writes goes to $OUT (or benchmarks/results/gpu/), with the commit it ran at.
#
#   bash benchmarks/gpu_check.sh --download-wheels   # here, with pip: the packages a bare CUDA
#                                                    # image lacks (zarr and its needs), into .whl/
#   bash benchmarks/gpu_check.sh                     # there, in the repository root (carry .whl)
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

out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/crucible-site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/crucible-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1

{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, zarr, numcodecs, os; print('torch', torch.__version__, 'zarr', zarr.__version__, 'numcodecs', numcodecs.__version__, 'cores', len(os.sched_getaffinity(0)))"
} > "$out/gpu_machine.txt" 2>&1
cat "$out/gpu_machine.txt"

status=0
echo "== CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py \
    "tests/test_faults.py::test_cuda_training_steps_do_not_synchronize" 2>&1 | tee "$out/cuda_tests.log" || status=1

echo "== GPU overhead (bench_overhead.py --device cuda)"
timeout 150 "$PY" benchmarks/bench_overhead.py --device cuda 2>&1 | tee "$out/overhead_cuda.log" || status=1
cp benchmarks/results/overhead_cuda.json "$out/" 2>/dev/null

echo "== writer and reads with this machine's cores (bench_speed.py --quick)"
timeout 120 "$PY" benchmarks/bench_speed.py --quick 2>&1 | tee "$out/speed.log" || status=1
cp benchmarks/results/quick/speed.json "$out/speed_quick.json" 2>/dev/null

echo "gpu_check: exit $status; results in $out"
exit $status

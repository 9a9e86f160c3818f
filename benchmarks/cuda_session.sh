#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU: the CUDA-marked
# tests, then the benchmarks on CUDA, each output in a file under $OUT
# (the device tool brings that folder back; elsewhere ./cuda-session).
#
#     bash benchmarks/cuda_session.sh          # at most 9 minutes (the limits below)
#
# Nothing is installed: the library runs from src/ with the machine's own
# torch (python3, or $PYTHON).  Each step has its own time limit, so one that
# hangs cannot eat the others' time; the last lines of every file are
# printed at the end.  The results go to the "CUDA" parts of
# docs/benchmarks.rst and docs/results/ (scale_cuda.md, scale_cuda.png).
set -u
OUT=${OUT:-cuda-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, flatness; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('flatness from', flatness.__file__)"
} > "$OUT/device.txt" 2>&1

# The limits below add up to 540 s, so the whole script fits in one
# 600-second command of the device tool, with the most valuable output
# first: correctness on the GPU, then the side-by-side benchmarks (run.py
# rewrites its report after each benchmark, so a cut keeps what finished),
# then the scale benchmark (each size's lines are printed as measured).

# every test marked cuda (tests/test_cuda.py and the CUDA cases elsewhere)
timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider -rfEs tests > "$OUT/cuda_tests.txt" 2>&1

# the side-by-side benchmarks (ours vs peers vs floors) on CUDA
timeout 170 $PY benchmarks/run.py --devices cuda --only sharpness sam hessian bench_memory \
    --timeout 80 --output "$OUT/benchmarks_cuda.md" > "$OUT/run.txt" 2>&1

# scale: 10M to 350M and 1B where memory allows, float32, then bfloat16
timeout 160 $PY benchmarks/bench_scale.py --device cuda --plot "$OUT/scale_cuda.png" > "$OUT/scale_cuda.md" 2>&1
timeout 60 $PY benchmarks/bench_scale.py --device cuda --dtype bfloat16 --sizes 125M 350M 1B \
    > "$OUT/scale_cuda_bf16.md" 2>&1

for f in "$OUT"/*.txt "$OUT"/*.md; do
    echo "== $f"
    tail -n 15 "$f"
done

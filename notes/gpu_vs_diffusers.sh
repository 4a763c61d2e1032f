#!/bin/bash
# The GPU row of issue #8 (benchmarks/vs_diffusers.py, bf16 on both sides), for a lent GPU machine.
# Prepared per notes/gpu_run.md: run from the repo root there with .whl carried; logs and JSON go to $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD USE_TF=0 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, flax, torch, transformers, diffusers; print('jax', jax.__version__, jax.devices(), 'flax',
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers',
diffusers.__version__)" 2>&1 | tee -a "$OUT/env.txt" || exit 1
for size in ${SIZES:-tiny bench}; do
  timeout 240 python3 benchmarks/vs_diffusers.py --size $size --repeats 3 --json "$OUT/$size.json" 2>&1 \
    | grep -v -E "Warning|warn\(|^I0000|^WARNING: All log" | tee "$OUT/$size.log"
done

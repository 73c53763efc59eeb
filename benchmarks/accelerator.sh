#!/usr/bin/env bash
# benchmarks/accelerator.sh OUTDIR
#
# On one NVIDIA GPU (H200 class): the Pallas kernels compiled for the GPU (backend="gpu",
# the Mosaic GPU path, never run on a GPU before) against their jnp references, then the
# four benchmarks at accelerator sizes (Llama-3-8B / Llama-2-7B shapes, random weights), and
# generate tokens/s (Llama-3.2-1B shapes) if time is left.
# Results (*.json) and logs (*.log) go to OUTDIR; OUTDIR/summary.txt lists every step with
# its exit status and time. Every step has its own time limit (sum < 8 minutes); a step
# that fails or times out is recorded and the next one runs. No network is needed.
#
# Python wheels needed: none beyond the GPU image (jax with CUDA, flax, optax, numpy,
# pyyaml, safetensors, tokenizers, ml_dtypes). The benchmarks import nothing of
# tensorflow-datasets, array_record, tensorboardX, orbax, torch or transformers (pyproject
# dependencies used by data loading, logging and tests only). pytest is optional: when it
# is importable and time is left, the kernel test files run on the GPU as well.
#
# Environment knobs: PYTHON (default python3), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92),
# SIZE=tiny (a CPU rehearsal of this script's plumbing: tiny model, 1k context).
set -u
OUT=${1:?usage: benchmarks/accelerator.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo, not an installed copy
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
PY=${PYTHON:-python3}
START=$SECONDS
TOTAL=470  # seconds; the optional last step only gets what is left of this
SIZE=${SIZE:-accelerator}
L3=llama3_8b L2=llama2_7b C3=16k,4k,32k,1k C2=16k,4k,32k CK=16k
if [ "$SIZE" = tiny ]; then L3=tiny L2=tiny C3=1k C2=1k CK=1k; fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, never abort the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=2 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (TIMED OUT: partial JSON kept)"
  echo "   rc=$rc$note after $((SECONDS - t0))s, total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
  tail -n 30 "$OUT/$name.log"
  return 0
}

passed() {  # passed KERNEL: did kernel_check pass every case of KERNEL?
  "$PY" -c "import json,sys; s=json.load(open('$OUT/kernels.json')).get('summary',{}); sys.exit(0 if s.get('$1') else 1)" 2>/dev/null
}

step env 15 bash -c "date -u; nvidia-smi; $PY -c 'import sys, jax, flax, optax; print(sys.version); print(jax.__version__, flax.__version__, optax.__version__); print(jax.devices()); print(jax.devices()[0].memory_stats())'"

# 1. Kernels compiled for the GPU vs their references (failures recorded per case).
step kernels 55 "$PY" benchmarks/kernel_check.py --backend gpu --budget-s 40 --out "$OUT/kernels.json"

# 2. Decode: Full vs AG-shaped caches vs the bytes-moved floor, jnp reference attention
#    (what "auto" runs on GPU). Contexts in priority order; --budget-s stops new groups.
step decode_llama3 105 "$PY" benchmarks/decode.py --size "$SIZE" --models $L3 \
  --contexts $C3 --batches 1,8 --budget-s 70 --out "$OUT/decode_llama3_8b.json"
step decode_llama2 55 "$PY" benchmarks/decode.py --size "$SIZE" --models $L2 \
  --contexts $C2 --batches 1,8 --budget-s 25 --out "$OUT/decode_llama2_7b.json"
# The same step through the Mosaic GPU decode kernel, if it passed its check.
if passed decode_attention; then
  step decode_gpu_kernel 45 "$PY" benchmarks/decode.py --size "$SIZE" --models $L3 \
    --contexts $CK --batches 1,8 --backend gpu --budget-s 15 --out "$OUT/decode_gpu_kernel.json"
else
  echo "== decode_gpu_kernel skipped: decode_attention failed its kernel check" | tee -a "$OUT/summary.txt"
fi

# 3. Gate-training step vs frozen-base forward+backward vs full fine-tune; MFU.
step train_step 90 "$PY" benchmarks/train_step.py --size "$SIZE" --out "$OUT/train_step.json"

# 4. Compaction throughput vs copy bandwidth (reference, and the GPU kernel: failures recorded).
step compaction 35 "$PY" benchmarks/compaction.py --size "$SIZE" --budget-s 15 \
  --out "$OUT/compaction.json"

# 5. Cache bytes allocated (device.memory_stats) at budgets 1, 0.5, 0.25 vs Full; fit table.
step memory 45 "$PY" benchmarks/memory.py --size "$SIZE" --out "$OUT/memory.json"

# 6. Generate tokens/s: ag_jax.generate (Full, AG at 0.5, 0.25) vs a plain prefill +
#    decode_step loop (Llama-3.2-1B shapes, B=8, P=4096, N=128). Runs in what the steps above
#    left of TOTAL (up to 75s), so the script stays within its time; --budget-s stops new
#    variants (each compiles) early enough for the timing rounds.
LEFT=$((TOTAL - (SECONDS - START)))
if [ $LEFT -gt 40 ]; then
  LIM=$((LEFT < 75 ? LEFT : 75))
  step generate $LIM "$PY" benchmarks/generate.py --size "$SIZE" --budget-s $((LIM - 25)) \
    --out "$OUT/generate.json"
else
  echo "== generate skipped (${LEFT}s left)" | tee -a "$OUT/summary.txt"
fi

# 7. Optional: the kernel test files on the GPU, with whatever time is left.
LEFT=$((TOTAL - (SECONDS - START)))
if "$PY" -c "import pytest" 2>/dev/null && [ $LEFT -gt 30 ]; then
  step kernel_tests $LEFT "$PY" -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
    tests/test_compact.py
else
  echo "== kernel_tests skipped (pytest missing or ${LEFT}s left)" | tee -a "$OUT/summary.txt"
fi
echo "done in $((SECONDS - START))s; results in $OUT" | tee -a "$OUT/summary.txt"

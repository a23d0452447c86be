#!/usr/bin/env bash
# The benchmark on an NVIDIA GPU, with the JAX and PyTorch backends (one process each; TensorFlow not needed).
#
#   OUT=/some/folder bash benchmarks/gpu_run.sh        # from anywhere; runs in the repository root
#
# Needs: torch with CUDA, jax with CUDA, numba (numba-cuda if the dispatcher has a CUDA implementation), and
# `import keras` working (keras and its pure-Python dependencies may be carried as wheels on PYTHONPATH).
# optax and matplotlib are optional. Sparse softmax CE at 8192x32000 and 16384x131072, float32 and bfloat16,
# forward and forward+backward, for every implementation the dispatcher can choose on the GPU (the portable
# path; a CUDA one when registered; numba_cpu is recorded as skipped), Keras's built-in, torch F.cross_entropy
# (torch process) and optax (jax process, if installed). Each process measures the device-to-device copy
# bandwidth first (the roofline). Output in $OUT: records.jsonl (the usual schema, device_name = the GPU),
# gpu.txt (nvidia-smi), jax.log, torch.log, table.txt, and the PNGs if matplotlib is there.
# Merge the records into the repository with: cat $OUT/records.jsonl >> benchmarks/results/records.jsonl
#
# Environment: SIZES (default 8192x32000,16384x131072), BACKENDS (default "jax torch"),
# PER_BACKEND_TIMEOUT seconds (default 240), EXTRA (more `bench` options, e.g. "--reps 5").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX allocates as it goes: the peak memory means something
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv >"$OUT/gpu.txt" 2>&1 || true
status=0
for backend in ${BACKENDS:-jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    # shellcheck disable=SC2086
    KERAS_BACKEND="$backend" timeout "${PER_BACKEND_TIMEOUT:-240}" \
        python -m keras_stable_heads bench --backend "$backend" --op sparse_softmax_ce \
        --sizes "${SIZES:-8192x32000,16384x131072}" --dtypes float32,bfloat16 --modes forward,forward_backward \
        --bandwidth-mib 1024 --no-progress --out "$OUT/records.jsonl" ${EXTRA:-} 2>&1 | tee "$OUT/$backend.log"
    code=${PIPESTATUS[0]}
    if [ "$code" -ne 0 ]; then echo "=== $backend exited $code"; status=1; fi
done
python benchmarks/report.py --records "$OUT/records.jsonl" | tee "$OUT/table.txt"
python benchmarks/plot.py --records "$OUT/records.jsonl" --out "$OUT" || echo "(no plots: matplotlib missing?)"
exit "$status"

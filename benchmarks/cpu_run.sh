#!/usr/bin/env bash
# The prepared CPU run: every measurement behind the issue-14/15/16 numbers in the README and docs, in one go, on
# a quiet machine (nothing else running: the records keep the load average; compare only records of one run).
#
#   bash benchmarks/cpu_run.sh [--quick]      # in the repository root, with the package installed
#
# Steps (each appends to benchmarks/results/ and prints its table; a failing step is reported, the next one runs):
#   1. op level: sparse softmax CE forward+backward through each backend (stable implementations, Keras, tf.nn,
#      torch.F, optax) at the issue's sizes, and the kernels alone with the machine's floors (the "within 1.2x of
#      the kernels" comparison) -> records.jsonl, kernel_probe.jsonl
#   2. model.fit per step, every family against its Keras twin, batch 32/256, 10 classes (5 rounds), then 2 and
#      1000 classes (3 rounds), same run id -> fit_records.jsonl, fit_ratio.png
#   3. the fused linear cross-entropy head against Dense + a loss, V = 131,072 and 262,144 -> lm_head_records.jsonl
#   4. a keras-hub Gemma fit step, default compile against fuse_lm_head -> hub_fit_records.jsonl
# --quick: tiny sizes and one round everywhere (checks the script, measures nothing worth keeping: writes to /tmp).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
RESULTS=benchmarks/results
if [ "${QUICK}" = 1 ]; then
    RESULTS=$(mktemp -d /tmp/ksh-cpu-run.XXXX)
fi
failed=()
step() {  # step NAME COMMAND...
    local name="$1"; shift
    echo "=== ${name}: $*"
    local start=${SECONDS}
    "$@" || failed+=("${name}")
    echo "=== ${name}: $((SECONDS - start)) s"
}
if [ "${QUICK}" = 1 ]; then
    step ops "${PY}" -m keras_stable_heads bench --backend all --op sparse_softmax_ce --sizes 64x10 \
        --modes forward_backward --no-extreme --reps 2 --out "${RESULTS}/records.jsonl"
    step probe "${PY}" benchmarks/kernels_cpu_probe.py --shapes 256x100 --reps 2 --floors --out "${RESULTS}/kernel_probe.jsonl"
    step fit "${PY}" -m keras_stable_heads.bench.fit --families sparse_softmax_ce --batches 32 --classes 10 --steps 5 \
        --rounds 1 --out "${RESULTS}/fit_records.jsonl" --plot "${RESULTS}/fit_ratio.png"
    step lm_head "${PY}" -m keras_stable_heads.bench.lm_head --tokens 64 --hidden 8 --vocab 512 --reps 1 \
        --out "${RESULTS}/lm_head_records.jsonl" --plot "${RESULTS}/lm_head_step.png"
    step hub_fit "${PY}" -m keras_stable_heads.bench.hub_fit --vocab 512 --batch 1 --sequence 16 --reps 1 \
        --out "${RESULTS}/hub_fit_records.jsonl" --plot "${RESULTS}/hub_fit_step.png"
else
    step ops "${PY}" -m keras_stable_heads bench --backend all --op sparse_softmax_ce \
        --sizes 256x10,65536x10,8192x1000,4096x32000 --modes forward_backward --no-extreme --reps 10 \
        --out "${RESULTS}/records.jsonl"
    step probe "${PY}" benchmarks/kernels_cpu_probe.py --shapes 4096x32000,8192x1000 --floors \
        --out "${RESULTS}/kernel_probe.jsonl"
    run_id="fit-$(date -u +%Y%m%dT%H%M%S)"
    step fit10 "${PY}" -m keras_stable_heads.bench.fit --run-id "${run_id}" --classes 10 --rounds 5 \
        --out "${RESULTS}/fit_records.jsonl" --plot "${RESULTS}/fit_ratio.png"
    step fit2-1000 "${PY}" -m keras_stable_heads.bench.fit --run-id "${run_id}" \
        --families sparse_softmax_ce,softmax_ce,multilabel_ce,softmax_focal_ce --classes 2,1000 --rounds 3 \
        --out "${RESULTS}/fit_records.jsonl" --plot "${RESULTS}/fit_ratio.png"
    step lm_head "${PY}" -m keras_stable_heads.bench.lm_head --vocab 131072,262144 --reps 2 \
        --out "${RESULTS}/lm_head_records.jsonl" --plot "${RESULTS}/lm_head_step.png"
    step hub_fit "${PY}" -m keras_stable_heads.bench.hub_fit --vocab 131072 --batch 4 --sequence 512 --reps 3 \
        --out "${RESULTS}/hub_fit_records.jsonl" --plot "${RESULTS}/hub_fit_step.png"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps done; results in ${RESULTS}"

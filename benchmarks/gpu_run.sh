#!/usr/bin/env bash
# The one prepared GPU run (issues 5 and 6): setup, the GPU tests, the benchmark on PyTorch and JAX, the profile.
#
#   bash benchmarks/gpu_run.sh [--budget SECONDS]    # on the GPU machine, in the repository root; results in $OUT
#   bash benchmarks/gpu_run.sh --dry-run             # on a CPU: every step at a tiny size (catches errors early)
#
# Prepare first on the developer's machine with `bash benchmarks/gpu_prepare.sh` (wheels in .whl/, the commit);
# docs/benchmarks.md gives the exact `run` call. Every step runs under `timeout`, its limit taken from one budget
# (default 420 s, setup included), its output appended to $OUT/run.log; a step that fails or runs out of time is
# written down and the next one runs:
#   0. setup: the wheels of .whl/ into /tmp/site (pip --target, no index); a sitecustomize there that restores
#      numpy.row_stack (numba-cuda 0.30.4 calls it, NumPy 2.5 removed it); nvidia-smi, versions, ncu's path.
#   1. GPU tests: tests/test_kernels_cuda.py and tests/test_cuda_gpu.py with KERAS_BACKEND=torch, then
#      tests/test_cuda_gpu.py with KERAS_BACKEND=jax (its JAX-vs-portable checks need that backend).
#   2. bench, torch: `keras-stable-heads bench --gpu` (suite.gpu_plan: 16384x131072 and 8192x32000, float32 and
#      bfloat16, forward and forward+backward; stable portable/numba_cuda, Keras, F.cross_entropy; the card's copy
#      bandwidth measured first) -> $OUT/records.jsonl, the harness's schema with the GPU's name in every record.
#   3. profile: benchmarks/gpu_profile.py (Numba CUDA kernels at 16384x131072 float32, block-size sweep,
#      torch.profiler of the steps, ncu if found) -> $OUT/profile.json, $OUT/ncu.txt.
#   4. bench, jax: as 2 with optax instead of F.cross_entropy.
#   5. the report (keras_stable_heads.bench.report) and plot.py over $OUT/records.jsonl -> $OUT/summary.txt (with every step's exit code, the test
#      summaries and the profile's summary) and two PNGs.
# What comes back from $OUT (at most 8 files): records.jsonl, summary.txt, run.log, profile.json, ncu.txt, PNGs.
# Then, on the developer's machine: cat records.jsonl >> benchmarks/results/gpu_harness_records.jsonl.
set -u
cd "$(dirname "$0")/.."

BUDGET=420
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --budget=*) BUDGET="${1#*=}" ;;
        *) echo "gpu_run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
END=$((SECONDS + BUDGET))
PY="${PYTHON:-python3}"
if [ -z "${OUT:-}" ]; then OUT="$(mktemp -d /tmp/ksh-gpu-run.XXXXXX)"; fi
mkdir -p "$OUT"
LOGS="$(mktemp -d /tmp/ksh-gpu-logs.XXXXXX)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$OUT/run.log"
status=0

note() { echo "[+${SECONDS}s] $*" | tee -a "$SUMMARY" "$OUT/run.log"; }

# limit CAP RESERVE: seconds a step may take: at most CAP, leaving RESERVE for the steps after it.
limit() { local t=$((END - SECONDS - $2)); [ "$t" -gt "$1" ] && t=$1; echo "$t"; }

# run_step NAME LIMIT command...: the command under `timeout`, its output in $LOGS/NAME.log and run.log.
run_step() {
    local name=$1 lim=$2 start=$SECONDS code
    shift 2
    if [ "$lim" -lt 15 ]; then note "$name: skipped, ${lim}s left for it in the budget"; status=1; return 1; fi
    note "$name: start, limit ${lim}s"
    timeout -k 10 "$lim" "$@" >"$LOGS/$name.log" 2>&1
    code=$?
    { echo "===== $name: $*"; cat "$LOGS/$name.log"; echo "===== $name: exit $code"; } >>"$OUT/run.log"
    note "$name: exit $code after $((SECONDS - start))s$([ "$code" = 124 ] && echo ' (timed out)')"
    [ "$code" = 0 ] || status=1
    return "$code"
}

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONDONTWRITEBYTECODE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX allocates as it goes: torch and JAX share the card; peaks mean something

# ---- 0. setup ---------------------------------------------------------------------------------------------------
note "gpu_run.sh: budget ${BUDGET}s, OUT=$OUT, dry run $DRY"
if [ "$DRY" = 0 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        mkdir -p /tmp/site
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl >>"$OUT/run.log" 2>&1; then note "setup: installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        else note "setup: pip install of .whl/ FAILED (see run.log)"; status=1; fi
        cat >/tmp/site/sitecustomize.py <<'EOF'
# numba-cuda 0.30.4 calls numpy.row_stack, which NumPy 2.5 removed (an alias of vstack since NumPy 2.0).
import numpy
if not hasattr(numpy, "row_stack"):
    numpy.row_stack = numpy.vstack
EOF
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "setup: no wheels in .whl/ (run benchmarks/gpu_prepare.sh first): Keras must already be installed"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${KSH_BENCH_COMMIT:-}" ] && [ -f .whl/SOURCE_COMMIT ]; then
    KSH_BENCH_COMMIT="$(head -n1 .whl/SOURCE_COMMIT)"; export KSH_BENCH_COMMIT
fi
{
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv 2>&1
    else echo "nvidia-smi: not found"; fi
    "$PY" - <<'EOF' 2>&1
import platform
from importlib import metadata
names = ("numpy", "numba", "numba-cuda", "torch", "jax", "jaxlib", "keras", "optax", "optree", "ml_dtypes")
found = []
for name in names:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} -")
print(f"python {platform.python_version()}; " + ", ".join(found))
EOF
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
    echo "ncu: ${ncu:-not found}; commit: from git, else ${KSH_BENCH_COMMIT:-unknown} (.whl/SOURCE_COMMIT)"
} | tee -a "$SUMMARY" "$OUT/run.log"

# ---- 1. GPU tests -----------------------------------------------------------------------------------------------
TESTS_TORCH=(tests/test_kernels_cuda.py tests/test_cuda_gpu.py)
TESTS_JAX=(tests/test_cuda_gpu.py)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
if [ "$DRY" = 1 ]; then  # collection only (test_cuda_gpu.py skips itself without a GPU: nothing to collect there)
    PYTEST+=(--collect-only)
    TESTS_JAX=("${TESTS_TORCH[@]}")
fi
for backend in torch jax; do
    if [ "$backend" = torch ]; then files=("${TESTS_TORCH[@]}"); cap=90; reserve=280
    else files=("${TESTS_JAX[@]}"); cap=60; reserve=250; fi
    KERAS_BACKEND=$backend run_step "tests_$backend" "$(limit $cap $reserve)" "${PYTEST[@]}" "${files[@]}"
    grep -E "(passed|failed|error|no tests ran|tests? collected)" "$LOGS/tests_$backend.log" | tail -n 1 \
        | sed "s/^/  tests $backend: /" | tee -a "$SUMMARY"
done

# ---- 2-4. the benchmark and the profile -------------------------------------------------------------------------
BENCH=("$PY" -m keras_stable_heads bench --gpu --no-progress --bandwidth-mib 2048 --out "$OUT/records.jsonl")
PROFILE=("$PY" benchmarks/gpu_profile.py --out "$OUT")
if [ "$DRY" = 1 ]; then
    BENCH+=(--sizes 64x40 --extreme-size 8x5 --reps 2 --bandwidth-mib 8)
    PROFILE+=(--simulate)
fi
bench() {  # bench BACKEND CAP RESERVE
    local lim
    lim=$(limit "$2" "$3")
    KERAS_BACKEND=$1 run_step "bench_$1" "$lim" "${BENCH[@]}" --backend "$1" --budget-s "$((lim > 60 ? lim - 35 : lim / 2))"
}
bench torch 150 190
lim=$(limit 110 120)
KERAS_BACKEND=torch run_step profile "$lim" "${PROFILE[@]}" --budget-s "$((lim > 40 ? lim - 20 : lim / 2))"
bench jax 150 45

# ---- 5. report, plots, summary ----------------------------------------------------------------------------------
{
    echo
    echo "== profile (benchmarks/gpu_profile.py)"
    "$PY" - "$OUT/profile.json" <<'EOF' 2>&1
import json, sys
sys.path.insert(0, "benchmarks")
import gpu_profile
try:
    print("\n".join(gpu_profile.summary_lines(json.load(open(sys.argv[1])))))
except (OSError, ValueError) as error:
    print(f"no profile: {error}")
EOF
    echo
    echo "== report (keras_stable_heads.bench.report over $OUT/records.jsonl)"
} >>"$SUMMARY"
run_step report "$(limit 30 15)" "$PY" -m keras_stable_heads.bench.report --records "$OUT/records.jsonl" && cat "$LOGS/report.log" >>"$SUMMARY"
run_step plot "$(limit 60 0)" "$PY" benchmarks/plot.py --records "$OUT/records.jsonl" --out "$OUT"

# At most 8 files come back from $OUT: past 8, everything but the four main files goes into one archive.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && mapfile -t rest < <(ls -1 | grep -vxE 'records.jsonl|summary.txt|run.log|profile.json') \
        && tar czf rest.tar.gz "${rest[@]}" && rm -f "${rest[@]}")
fi
rm -rf "$LOGS"
note "gpu_run.sh: done in ${SECONDS}s, status $status; files: $(cd "$OUT" && ls -1 | tr '\n' ' ')"
echo
cat "$SUMMARY"
exit "$status"

"""Timing of the Numba CPU kernels against this machine's floors (a probe, not a test): min over repetitions.

    python benchmarks/kernels_cpu_probe.py [--reps 20] [--shapes 8192x1000,4096x32000,65536x10] [--threads N]
                                           [--options plain,all] [--floors] [--out FILE.jsonl]

Loads ``keras_stable_heads/kernels/`` on its own (no Keras import; the installed package, else this checkout). Prints, per shape, forward, backward and
forward+backward of sparse softmax CE in ms, and the effective bandwidth of forward+backward counting 2 reads of
the logits and 1 write of the gradient. Output buffers are allocated once and reused.

``--floors`` adds what bounds each pass on this machine, measured in the same run:

- memory: a read-only pass over the logits (a vectorized ``prange`` max, what the forward must read) and a 2-D
  ``prange`` copy with ordinary stores (the backward's traffic: read the logits, write the gradient);
- compute: the same kernels on the first rows only, few enough that logits and gradient (~4 MiB) stay in cache,
  as ns per logit per thread, and that rate scaled to the full shape ("in-cache ms"): the time the kernel would
  take if memory cost nothing.

``--out`` appends one JSON record per shape and options (with the hardware, versions and the copy bandwidth of
this run) to a JSON Lines file.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _standalone  # noqa: E402  (the package's kernels and harness, without Keras)

_IN_CACHE_BYTES = 4 << 20  # logits + gradient of the in-cache rows: well inside a 32 MiB L3, near the L2s


def load_kernels():
    return _standalone.load("kernels", "_ksh_kernels")


def best_ms(fn, reps, inner=1):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def bare_passes(kernels):
    """(read pass, 2-D copy) as Numba functions compiled like the kernels (same flags, the kernels' maxnum)."""
    from numba import njit, prange

    simd = sys.modules[kernels.__name__ + "._simd"]
    config = sys.modules[kernels.__name__ + "._config"]
    maxnum = simd.maxnum_f32

    @njit(parallel=True, fastmath=config.FASTMATH)
    def read_pass(x, out):
        for i in prange(x.shape[0]):
            m = simd.NEG_INF
            for j in range(x.shape[1]):
                m = maxnum(m, x[i, j])
            out[i] = m

    @njit(parallel=True, fastmath=config.FASTMATH)
    def copy_2d(x, y):
        for i in prange(x.shape[0]):
            for j in range(x.shape[1]):
                y[i, j] = x[i, j]

    return read_pass, copy_2d


class SparseCase:
    """Buffers and calls of sparse softmax CE on ``logits`` (2-D), reused across calls."""

    def __init__(self, kernels, logits, labels, options):
        n, c = logits.shape
        self.k, self.logits, self.labels = kernels, logits, labels
        self.weight = np.ones(c, np.float32)
        self.loss, self.lse = np.empty(n, np.float32), np.empty(n, np.float32)
        self.dloss = np.ones(n, np.float32)
        self.grad = np.zeros((n, c), np.float32)  # first touch outside the timing
        self.options = options

    def fwd(self):
        eps, z_loss, cap = self.options
        self.k.softmax_ce_sparse_fwd(self.logits, self.labels, self.loss, self.lse, self.weight, eps, z_loss, cap,
                                     -1, False)

    def bwd(self):
        eps, z_loss, cap = self.options
        self.k.softmax_ce_sparse_bwd(self.logits, self.labels, self.lse, self.dloss, self.grad, self.weight, eps,
                                     z_loss, cap, -1, False)

    def both(self):
        self.fwd()
        self.bwd()


def in_cache_rows(n, c, threads):
    """Rows whose logits and gradient fit in ``_IN_CACHE_BYTES``: at least 2 per thread, a multiple of threads."""
    rows = max(2 * threads, _IN_CACHE_BYTES // (8 * c))
    return min(n, rows - rows % threads)


def probe(kernels, n, c, reps, rng, options, threads, floors):
    logits = (rng.standard_normal((n, c), dtype=np.float32) * 3.0).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    case = SparseCase(kernels, logits, labels, options)
    result = {"fwd_ms": best_ms(case.fwd, reps), "bwd_ms": best_ms(case.bwd, reps),
              "fwd_bwd_ms": best_ms(case.both, reps)}
    result["fwd_bwd_gbs"] = 3 * logits.nbytes / (result["fwd_bwd_ms"] * 1e-3) / 1e9
    if floors:
        read_pass, copy_2d = bare_passes(kernels)
        result["read_pass_ms"] = best_ms(lambda: read_pass(logits, case.loss), reps)
        result["copy_2d_ms"] = best_ms(lambda: copy_2d(logits, case.grad), reps)
        rows = in_cache_rows(n, c, threads)
        small = SparseCase(kernels, np.ascontiguousarray(logits[:rows]), labels[:rows], options)
        inner = max(1, int(2e7 // (rows * c)))  # ~20M logits per timing: the parallel launch cost is amortised
        for mode, fn in (("fwd", small.fwd), ("bwd", small.bwd)):
            ms = best_ms(fn, reps, inner)
            ns = ms * 1e6 * threads / (rows * c)
            result[f"in_cache_{mode}_ns_per_logit_thread"] = ns
            result[f"in_cache_{mode}_ms_full"] = ns * n * c / threads / 1e6
        result["in_cache_rows"] = rows
    return result


def machine_record(threads):
    harness = _standalone.harness()

    commit, dirty = harness.source_commit()
    return {"time": harness.utc_now(), "hardware": harness.hardware(), "versions": harness.versions(),
            "commit": commit, "dirty": dirty, "threads": threads, "load_average": harness.load_average(),
            "bandwidth": harness.host_bandwidth()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default="8192x1000,4096x32000,65536x10")
    parser.add_argument("--options", default="plain",
                        help="comma list of: plain, all (eps=0.1, z_loss=1e-4, softcap=30)")
    parser.add_argument("--threads", type=int, default=0, help="Numba threads (default: all)")
    parser.add_argument("--floors", action="store_true", help="also time the memory and compute floors")
    parser.add_argument("--out", help="append the results as JSON Lines to this file")
    args = parser.parse_args()
    kernels = load_kernels()
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    machine = machine_record(threads) if args.out else None

    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, threads {threads}, reps {args.reps} (min)")
    header = f"{'shape':>12} {'options':>7} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'GB/s':>6}"
    if args.floors:
        header += f" | {'read ms':>7} {'copy ms':>7} | in cache: {'fwd ns':>6} {'bwd ns':>6} {'fwd ms':>7} {'bwd ms':>7}"
    print(header)
    records = []
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        for name in args.options.split(","):
            options = (0.0, 0.0, 0.0) if name == "plain" else (0.1, 1e-4, 30.0)
            r = probe(kernels, n, c, args.reps, rng, options, threads, args.floors)
            line = f"{shape:>12} {name:>7} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} " \
                   f"{r['fwd_bwd_gbs']:6.1f}"
            if args.floors:
                line += (f" | {r['read_pass_ms']:7.2f} {r['copy_2d_ms']:7.2f} |           "
                         f"{r['in_cache_fwd_ns_per_logit_thread']:6.3f} {r['in_cache_bwd_ns_per_logit_thread']:6.3f} "
                         f"{r['in_cache_fwd_ms_full']:7.2f} {r['in_cache_bwd_ms_full']:7.2f}")
            print(line)
            records.append({"probe": "kernels_cpu", "op": "sparse_softmax_ce", "shape": [n, c], "options": name,
                            "reps": args.reps, **r, **(machine or {})})
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        print(f"appended {len(records)} records to {args.out}; copy bandwidth this run: "
              f"{machine['bandwidth']['copy_threads_gbs']:.1f} GB/s ({threads} threads)")


if __name__ == "__main__":
    main()

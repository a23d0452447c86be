"""Quick timing of the Numba CPU kernels (a probe, not a test): min over repetitions after a warm-up.

    python benchmarks/kernels_cpu_probe.py [--reps 20] [--shapes 8192x1000,4096x32000,65536x10] [--threads N]

Loads ``kernels/`` straight from this checkout (no Keras import). Prints, per shape, forward, backward and
forward+backward of sparse softmax CE in ms, and the effective bandwidth of forward+backward counting
2 reads of the logits and 1 write of the gradient. Output buffers are allocated once and reused.
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_kernels():
    path = os.path.join(_ROOT, "kernels")
    spec = importlib.util.spec_from_file_location("_ksh_kernels", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def probe_sparse(kernels, n, c, reps, rng, options):
    logits = (rng.standard_normal((n, c), dtype=np.float32) * 3.0).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    weight = np.ones(c, np.float32)
    loss = np.empty(n, np.float32)
    lse = np.empty(n, np.float32)
    dloss = np.ones(n, np.float32)
    grad = np.empty((n, c), np.float32)
    grad.fill(0.0)  # first touch outside the timing
    eps, z_loss, cap = options

    def fwd():
        kernels.softmax_ce_sparse_fwd(logits, labels, loss, lse, weight, eps, z_loss, cap, -1, False)

    def bwd():
        kernels.softmax_ce_sparse_bwd(logits, labels, lse, dloss, grad, weight, eps, z_loss, cap, -1, False)

    def both():
        fwd()
        bwd()

    t_f, t_b, t_fb = best_ms(fwd, reps), best_ms(bwd, reps), best_ms(both, reps)
    gbs = 3 * logits.nbytes / (t_fb * 1e-3) / 1e9
    return t_f, t_b, t_fb, gbs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default="8192x1000,4096x32000,65536x10")
    parser.add_argument("--options", default="plain",
                        help="comma list of: plain, all (eps=0.1, z_loss=1e-4, softcap=30)")
    parser.add_argument("--threads", type=int, default=0, help="Numba threads (default: all)")
    args = parser.parse_args()
    kernels = load_kernels()
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, reps {args.reps} (min)")
    print(f"{'shape':>12} {'options':>7} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'GB/s':>6}")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        for name in args.options.split(","):
            options = (0.0, 0.0, 0.0) if name == "plain" else (0.1, 1e-4, 30.0)
            t_f, t_b, t_fb, gbs = probe_sparse(kernels, n, c, args.reps, rng, options)
            print(f"{shape:>12} {name:>7} {t_f:8.3f} {t_b:8.3f} {t_fb:8.3f} {gbs:6.1f}")


if __name__ == "__main__":
    main()

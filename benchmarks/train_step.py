"""A whole training step with a large output layer: the stable loss against Keras's own, per backend.

    python benchmarks/train_step.py [--backend all|tensorflow|jax|torch] [--rows 4096] [--classes 32000]
                                    [--features 64] [--reps 5] [--out benchmarks/results/records.jsonl]

The model is ``Input(features) -> Dense(classes)`` (logits), trained with Adam by ``model.train_on_batch`` on
``rows`` examples with integer labels; the two runs differ only in the loss: ``StableSparseSoftmaxCE()``
(implementation "auto", whatever the dispatcher picks on this backend) and
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``. Same weights, data and optimizer; the step
includes the matmuls, so it shows what a user gains end to end, not just in the loss. Each backend runs in its
own process (Keras picks its backend once per process); records (mode ``train_step``, case
``dense<features>``) are appended with the harness's schema, and a table is printed.
"""

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")


def _measure_backend(args):
    sys.path.insert(0, _HERE)
    import _standalone  # noqa: F401  (puts the package on the path: the installed one, else this checkout)
    import keras
    import numpy as np

    from keras_stable_heads.bench import harness
    from keras_stable_heads import StableSparseSoftmaxCE, explain

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.features)).astype(np.float32)
    y = rng.integers(0, args.classes, args.rows).astype(np.int32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((args.features,))
    template = keras.Model(inputs, keras.layers.Dense(args.classes)(inputs))
    weights = template.get_weights()
    losses = {
        "stable/auto": StableSparseSoftmaxCE(),
        "keras": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    }
    commit, dirty = harness.source_commit()
    common = dict(run_id=args.run_id, timestamp=harness.utc_now(), commit=commit, dirty=dirty,
                  op="sparse_softmax_ce", backend=backend, device="cpu",
                  device_name=f"{harness.cpu_model()} ({harness.cpu_count()} cores)", dtype="float32",
                  shape=[args.rows, args.classes], case=f"dense{args.features}", mode="train_step", unit="ms",
                  hardware=harness.hardware(), load_average=harness.load_average(),
                  versions=harness.versions({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]))
    records = []
    for name, loss in losses.items():
        model = keras.Model.from_config(template.get_config())
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        harness.reset_peak_rss()
        stats, _ = harness.measure(lambda: model.train_on_batch(x, y), warmup=2, reps=args.reps)
        final = float(model.evaluate(x, y, verbose=0, batch_size=args.rows))
        choice = explain(loss, y, model(x)).implementation if name.startswith("stable") else None
        records.append(harness.make_record(
            **common, implementation=name, family="stable" if name.startswith("stable") else "builtin",
            **{k: v for k, v in stats.as_ms().items() if k != "unit"}, peak_rss_mib=harness.peak_rss_mib(),
            auto_choice=choice,
            loss_error=None, grad_error=None, skipped=None))
        print(f"  {backend:>10} {name:>12}: min {stats.min * 1e3:8.1f} ms  median {stats.median * 1e3:8.1f} ms"
              f"  (loss after {stats.reps + stats.warmup} steps {final:.4f})", flush=True)
    harness.append_records(args.out, records)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all", help="all, or a comma list of tensorflow, jax, torch")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(_HERE, "results", "records.jsonl"))
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _measure_backend(args)
        return 0
    backends = BACKENDS if args.backend == "all" else tuple(args.backend.split(","))
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backend: unknown {sorted(unknown)}; use all or a comma list of {', '.join(BACKENDS)}")
    run_id = args.run_id or time.strftime("train-%Y%m%dT%H%M%S")
    print(f"training step: Dense({args.classes}) on {args.rows} x {args.features}, Adam; records -> {args.out}")
    failed = 0
    for backend in backends:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--run-id", run_id, "--rows", str(args.rows),
                   "--classes", str(args.classes), "--features", str(args.features), "--reps", str(args.reps),
                   "--out", args.out]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        failed += subprocess.run(command, env=env).returncode != 0
    rows = [r for r in _load(args.out) if r.get("run_id") == run_id]
    by_backend = {}
    for r in rows:
        by_backend.setdefault(r["backend"], {})[r["implementation"]] = r
    print(f"{'backend':>10} {'stable (auto) ms':>17} {'keras ms':>9} {'speed-up':>8}  auto picks")
    for backend, pair in by_backend.items():
        s, k = pair.get("stable/auto"), pair.get("keras")
        if s and k:
            print(f"{backend:>10} {s['min']:17.1f} {k['min']:9.1f} {k['min'] / s['min']:7.2f}x  {s['auto_choice']}")
    return 1 if failed else 0


def _load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    sys.exit(main())

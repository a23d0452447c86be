"""``model.fit`` time per step: each stable loss against its Keras built-in twin, as most users train.

    python -m keras_stable_heads.bench.fit [--backend all] [--batches 32,256] [--classes 2,10,1000] [--rounds 5]
    python -m keras_stable_heads.bench.fit --profile sparse_softmax_ce --backend torch   # where a step's time goes

An MLP (784 -> 128 relu -> C outputs, Adam) is trained for one epoch on seeded synthetic data, once with the
stable loss and once with the built-in twin, the two interleaved ``--rounds`` times in one process per backend
(the machine is shared: only times from the same process and the same round are compared); the record keeps the
min and median over rounds of the seconds per step, and the builtin/stable ratio of the mins. Each model is fit
once before timing (compilation, kernel caches). Families and twins:

=====================  ========================================================  =========================
family                 stable                                                    built-in
=====================  ========================================================  =========================
sparse_softmax_ce      StableSparseSoftmaxCE                                     SparseCategoricalCE(logits)
softmax_ce             StableSoftmaxCE                                           CategoricalCE(logits)
binary_ce              StableBinaryCE (1 output)                                 BinaryCE(logits)
multilabel_ce          StableMultilabelCE (C outputs)                            BinaryCE(logits)
binary_focal_ce        StableBinaryFocalCE (1 output)                            BinaryFocalCE(logits)
softmax_focal_ce       StableSoftmaxFocalCE                                      CategoricalFocalCE(logits)
gaussian_nll           GaussianNLL (mean, log-scale: 2 outputs per target)       MeanSquaredError (1 output)
=====================  ========================================================  =========================

Records (one per backend, family, batch and class count) are appended to ``fit_records.jsonl`` in the checkout's
``benchmarks/results/`` (else the current folder); ``--plot`` draws ``fit_ratio.png`` beside it. ``--profile``
prints cProfile's top functions of a few hundred steps of each side instead.
"""

import argparse
import os
import subprocess
import sys
import time

from . import harness
from . import locations

BACKENDS = ("tensorflow", "jax", "torch")
FAMILIES = ("sparse_softmax_ce", "softmax_ce", "binary_ce", "multilabel_ce", "binary_focal_ce", "softmax_focal_ce",
            "gaussian_nll")
# Families whose output width does not follow the class count: measured once, at --classes' first entry.
_FIXED_WIDTH = ("binary_ce", "binary_focal_ce", "gaussian_nll")
_FOLDER = locations.RESULTS or os.getcwd()
RECORDS = os.path.join(_FOLDER, "fit_records.jsonl")
PLOT = os.path.join(_FOLDER, "fit_ratio.png")
FEATURES, HIDDEN = 784, 128


def _pair(family, classes):
    """(stable loss, built-in loss, stable outputs, built-in outputs, labels maker)."""
    import keras
    import numpy as np

    import keras_stable_heads as ksh

    losses = keras.losses

    def ids(rng, n):
        return rng.integers(0, classes, n).astype("int32")

    def one_hot(rng, n):
        return np.eye(classes, dtype="float32")[ids(rng, n)]

    def bits(width):
        return lambda rng, n: rng.integers(0, 2, (n, width)).astype("float32")

    table = {
        "sparse_softmax_ce": (ksh.StableSparseSoftmaxCE(), losses.SparseCategoricalCrossentropy(from_logits=True),
                              classes, classes, ids),
        "softmax_ce": (ksh.StableSoftmaxCE(), losses.CategoricalCrossentropy(from_logits=True), classes, classes,
                       one_hot),
        "binary_ce": (ksh.StableBinaryCE(), losses.BinaryCrossentropy(from_logits=True), 1, 1, bits(1)),
        "multilabel_ce": (ksh.StableMultilabelCE(), losses.BinaryCrossentropy(from_logits=True), classes, classes,
                          bits(classes)),
        "binary_focal_ce": (ksh.StableBinaryFocalCE(), losses.BinaryFocalCrossentropy(from_logits=True), 1, 1,
                            bits(1)),
        "softmax_focal_ce": (ksh.StableSoftmaxFocalCE(), losses.CategoricalFocalCrossentropy(from_logits=True),
                             classes, classes, one_hot),
        "gaussian_nll": (ksh.GaussianNLL(), losses.MeanSquaredError(), 2, 1,
                         lambda rng, n: rng.standard_normal((n, 1)).astype("float32")),
    }
    return table[family]


def _model(outputs, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(HIDDEN, activation="relu"),
                             keras.layers.Dense(outputs)])


def _prepared(family, classes, batch, steps):
    import keras
    import numpy as np

    stable, builtin, stable_width, builtin_width, labels = _pair(family, classes)
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = labels(rng, n)
    models = {}
    for side, loss, width in (("stable", stable, stable_width), ("builtin", builtin, builtin_width)):
        model = _model(width)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)  # compile, warm the caches
        models[side] = model
    return models, x, y, stable


def _measure(args, family, classes, batch):
    import keras

    import keras_stable_heads as ksh

    models, x, y, stable = _prepared(family, classes, batch, args.steps)
    times = {"stable": [], "builtin": []}
    for _ in range(args.rounds):
        for side in ("stable", "builtin"):  # interleaved: a busy spell of the machine hits both sides alike
            start = time.perf_counter()
            models[side].fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
            times[side].append((time.perf_counter() - start) / args.steps)
    choice = ksh.explain(stable, y[:batch], models["stable"].predict(x[:batch], verbose=0, batch_size=batch))
    commit, dirty = harness.source_commit()
    stats = {side: (min(t), sorted(t)[len(t) // 2]) for side, t in times.items()}
    return dict(benchmark="fit_step", run_id=args.run_id, timestamp=harness.utc_now(), commit=commit, dirty=dirty,
                backend=keras.backend.backend(), family=family, classes=classes, batch=batch, steps=args.steps,
                rounds=args.rounds, stable_min_ms=stats["stable"][0] * 1e3, stable_median_ms=stats["stable"][1] * 1e3,
                builtin_min_ms=stats["builtin"][0] * 1e3, builtin_median_ms=stats["builtin"][1] * 1e3,
                ratio=stats["builtin"][0] / stats["stable"][0], auto_choice=choice.implementation,
                device_name=f"{harness.cpu_model()} ({harness.cpu_count()} cores)", hardware=harness.hardware(),
                load_average=harness.load_average(), versions=harness.versions(keras.backend.backend()))


def _cases(args):
    for family in args.families:
        for classes in (args.classes[:1] if family in _FIXED_WIDTH else args.classes):
            for batch in args.batches:
                yield family, classes, batch


def _child(args):
    for family, classes, batch in _cases(args):
        record = _measure(args, family, classes, batch)
        harness.append_records(args.out, [record])
        print(f"{record['backend']:>10} {family:>17} C={classes:<5} batch {batch:<4} stable "
              f"{record['stable_min_ms']:7.3f} ms/step  builtin {record['builtin_min_ms']:7.3f}  "
              f"builtin/stable {record['ratio']:.2f}  ({record['auto_choice']})", flush=True)


def _profile(args):
    """cProfile's view of the stable and the built-in side of one family: where the per-step difference goes."""
    import cProfile
    import pstats

    family = args.profile
    classes, batch = args.classes[0], args.batches[0]
    models, x, y, _ = _prepared(family, classes, batch, args.steps)
    for side in ("stable", "builtin"):
        profiler = cProfile.Profile()
        profiler.enable()
        models[side].fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
        profiler.disable()
        print(f"\n=== {side}: {family}, {classes} classes, batch {batch}, {args.steps} steps "
              f"(cumulative time per call tree; per step: divide by {args.steps})")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile_lines)


def load(path, run_id=None):
    """The records of run ``run_id`` in ``path``, or of its last run."""
    return harness.load_run(path, run_id)


def table(records):
    lines = [f"{'backend':>10} {'family':>17} {'C':>5} {'batch':>5} {'stable ms':>10} {'builtin ms':>10} "
             f"{'builtin/stable':>14}  auto"]
    for r in records:
        lines.append(f"{r['backend']:>10} {r['family']:>17} {r['classes']:>5} {r['batch']:>5} "
                     f"{r['stable_min_ms']:10.3f} {r['builtin_min_ms']:10.3f} {r['ratio']:14.2f}  {r['auto_choice']}")
    return "\n".join(lines)


def plot(records, path):
    """builtin/stable per family, one panel per (batch, classes), bars per backend; 1.0 is 'as fast'."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    batches = sorted({r["batch"] for r in records})
    class_counts = sorted({r["classes"] for r in records})
    fig = Figure(figsize=(4.2 * len(class_counts), 3.8 * len(batches)), layout="constrained")
    axes = fig.subplots(len(batches), len(class_counts), squeeze=False)  # a row per batch size, a column per C
    colors = {"tensorflow": "#ef6c00", "jax": "#1565c0", "torch": "#c62828"}
    for ax, (batch, classes) in zip(axes.ravel(), [(b, c) for b in batches for c in class_counts]):
        chosen = [r for r in records if (r["batch"], r["classes"]) == (batch, classes)]
        families = [f for f in FAMILIES if any(r["family"] == f for r in chosen)]
        for j, backend in enumerate(BACKENDS):
            values = [next((r["ratio"] for r in chosen if r["family"] == f and r["backend"] == backend), 0)
                      for f in families]
            ax.barh([i + (j - 1) * 0.27 for i in range(len(families))], values, 0.27, color=colors[backend],
                    label=backend)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(families)), families, fontsize=8)
        ax.set_title(f"batch {batch}, {classes} classes", fontsize=9)
        ax.set_xlabel("built-in time / stable time (> 1: stable faster)", fontsize=8)
    axes[0][0].legend(fontsize=8)
    first = records[0]
    fig.suptitle(f"model.fit time per step, MLP {FEATURES}-{HIDDEN}-C, Adam; {first['device_name']}; "
                 f"run {first['run_id']}", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all", help="all, or a comma list of tensorflow, jax, torch")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--classes", default="10,2,1000", help="the first is also the fixed-width families' one")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=RECORDS)
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--report", action="store_true", help="only the table and plot of the latest run in --out")
    parser.add_argument("--profile", choices=FAMILIES, help="profile this family on the current backend")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.batches, args.classes = _ints(args.batches), _ints(args.classes)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.profile:
        _profile(args)
        return 0
    if args.child:
        _child(args)
        return 0
    if args.report:
        records = load(args.out, args.run_id)
        print(table(records))
        print(f"plot: {plot(records, args.plot)}")
        return 0
    backends = BACKENDS if args.backend == "all" else tuple(args.backend.split(","))
    if set(backends) - set(BACKENDS):
        parser.error(f"--backend: use all or a comma list of {', '.join(BACKENDS)}")
    args.run_id = args.run_id or time.strftime("fit-%Y%m%dT%H%M%S")
    failed = 0
    for backend in backends:
        command = [sys.executable, "-m", "keras_stable_heads.bench.fit", "--child", "--run-id", args.run_id,
                   "--families", ",".join(args.families), "--batches", ",".join(map(str, args.batches)),
                   "--classes", ",".join(map(str, args.classes)), "--steps", str(args.steps),
                   "--rounds", str(args.rounds), "--out", args.out]
        failed += subprocess.run(command, env=harness.backend_env(backend)).returncode != 0
    records = load(args.out, args.run_id)
    print(table(records))
    if records:
        print(f"records appended to {args.out} (run {args.run_id}); plot: {plot(records, args.plot)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

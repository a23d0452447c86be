"""One training step of a large-vocabulary head: the fused linear cross-entropy against Dense + a loss.

    python -m keras_stable_heads.bench.lm_head [--backend all] [--tokens 4096] [--hidden 512] [--vocab 131072,262144]

For each backend and vocabulary size, three ways to train a ``V``-way softmax head on ``(N, D)`` hidden states with
``model.train_on_batch`` (Adam, the whole batch at once):

- ``fused``: :class:`keras_stable_heads.FusedSoftmaxHead` with its loss (the logits are never materialised);
- ``dense+keras``: ``Dense(V)`` + ``SparseCategoricalCrossentropy(from_logits=True)``;
- ``dense+stable``: ``Dense(V)`` + :class:`keras_stable_heads.StableSparseSoftmaxCE`.

Each runs in a process of its own, so its peak resident memory is its own: the record has the process's peak RSS
over the steps, the RSS just before the first step (the framework, the model, the optimizer's slots and the data)
and on JAX the compiled step's temporary memory from XLA (``memory_analysis()``). Times are the min and median
of ``--reps`` steps after one warm-up step (compilation). A variant whose estimated memory does not fit
(``--memory-gib``) is recorded as skipped. One JSON record per (backend, vocabulary, variant), with the hardware,
versions and commit of the harness, is appended to ``lm_head_records.jsonl`` (in the checkout's
``benchmarks/results/``, else the current folder), and ``lm_head_step.png`` is drawn beside it from the run's
records. The demo's ``vocabulary`` task runs the same measurement at a smaller size (:func:`run`).
Benchmarks are measurements, never tests: compare only records of one run.
"""

import argparse
import os
import subprocess
import sys
import time

from . import harness
from . import locations

BACKENDS = ("tensorflow", "jax", "torch")
VARIANTS = ("fused", "dense+keras", "dense+stable")
_FOLDER = locations.RESULTS or os.getcwd()
RECORDS = os.path.join(_FOLDER, "lm_head_records.jsonl")
PLOT = os.path.join(_FOLDER, "lm_head_step.png")
# Peak memory of the Dense variants, in logits-sized (N x V float32) buffers beyond the weights: measured 3-5 at
# 4096 x 131072 (issue 14); 6 leaves headroom.
DENSE_LOGIT_BUFFERS = 6


def _estimate_gib(variant, tokens, hidden, vocab):
    weights = 4 * hidden * vocab * 4  # kernel, its gradient, Adam's two slots
    logits = tokens * vocab * 4
    extra = DENSE_LOGIT_BUFFERS * logits if variant.startswith("dense") else 2 * (64 << 20)
    return (weights + extra + (2 << 30)) / (1 << 30)  # + the framework itself


def _model(variant, hidden, vocab):
    import keras

    import keras_stable_heads as ksh

    keras.utils.set_random_seed(0)
    inputs = keras.Input((hidden,))
    if variant == "fused":
        head = ksh.FusedSoftmaxHead(vocab)
        model = keras.Model(inputs, head(inputs))
        loss = head.loss()
    else:
        model = keras.Model(inputs, keras.layers.Dense(vocab)(inputs))
        loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if variant == "dense+keras"
                else ksh.StableSparseSoftmaxCE())
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def _jax_temp_bytes(model, x, y):
    """XLA's temporary memory for the compiled training step (JAX only)."""
    import jax

    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
                                 metrics_variables=True)
    compiled = jax.jit(model.train_step).lower(state, (x, y)).compile()
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes)


def _child(args):
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, args.hidden), dtype=np.float32)
    y = rng.integers(0, args.vocab, args.tokens).astype(np.int32)
    model = _model(args.variant, args.hidden, args.vocab)
    model.optimizer.build(model.trainable_variables)
    temp = None
    if backend == "jax":
        try:
            temp = _jax_temp_bytes(model, x, y)
        except Exception as error:  # noqa: BLE001 - recorded, the timing still runs
            print(f"memory_analysis failed: {type(error).__name__}: {error}", file=sys.stderr)
    before = harness.current_rss_mib()
    harness.reset_peak_rss()
    losses = []
    stats, _ = harness.measure(lambda: losses.append(float(model.train_on_batch(x, y, return_dict=True)["loss"])), warmup=1,
                               reps=args.reps, min_reps=args.reps)
    record = _record(args, backend, args.variant, args.vocab, min_ms=stats.min * 1e3, median_ms=stats.median * 1e3,
                     max_ms=stats.max * 1e3, reps=stats.reps, peak_rss_mib=harness.peak_rss_mib(),
                     rss_before_mib=before, xla_temp_mib=None if temp is None else temp / (1 << 20),
                     first_loss=losses[0], last_loss=losses[-1], load_average=harness.load_average(),
                     versions=harness.versions({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]))
    harness.append_records(args.out, [record])
    print(f"min {record['min_ms']:9.0f} ms  peak RSS {record['peak_rss_mib']:7.0f} MiB (before the step "
          f"{record['rss_before_mib']:.0f})" + (f"  XLA temp {temp / (1 << 20):.0f} MiB" if temp else "")
          + f"  loss {record['first_loss']:.4f}", flush=True)


def _record(args, backend, variant, vocab, **fields):
    commit, dirty = harness.source_commit()
    record = dict(benchmark="lm_head_step", run_id=args.run_id, timestamp=harness.utc_now(), commit=commit,
                  dirty=dirty, backend=backend, variant=variant, tokens=args.tokens, hidden=args.hidden, vocab=vocab,
                  dtype="float32", optimizer="adam", device_name=f"{harness.cpu_model()} ({harness.cpu_count()} cores)",
                  hardware=harness.hardware(), min_ms=None, median_ms=None, max_ms=None, reps=None,
                  peak_rss_mib=None, rss_before_mib=None, xla_temp_mib=None, first_loss=None, last_loss=None,
                  skipped=None, load_average=None, versions=None)
    unknown = set(fields) - set(record)
    if unknown:
        raise ValueError(f"fields not in the lm_head_step record: {sorted(unknown)}")
    record.update(fields)
    return record


def load(path, run_id=None):
    """The records of run ``run_id`` in ``path``, or of its last run."""
    return harness.load_run(path, run_id)


def table(records):
    """Per backend and vocabulary: each variant's time and peak RSS, and the fused head's ratios to the others."""
    lines = [f"{'backend':>10} {'V':>7} {'variant':>13} {'min ms':>9} {'peak RSS MiB':>13} {'RSS before':>11} "
             f"{'XLA temp MiB':>12}  fused/this: time, peak RSS, step memory (peak - before)"]
    groups = {}
    for r in records:
        groups.setdefault((r["backend"], r["vocab"]), {})[r["variant"]] = r
    for (backend, vocab), by_variant in groups.items():
        fused = by_variant.get("fused")
        for variant in VARIANTS:
            r = by_variant.get(variant)
            if r is None:
                continue
            if r["skipped"]:
                lines.append(f"{backend:>10} {vocab:>7} {variant:>13}  skipped: {r['skipped']}")
                continue
            ratio = ""
            if fused and not fused["skipped"] and variant != "fused":
                step = (fused["peak_rss_mib"] - fused["rss_before_mib"]) / max(1.0, r["peak_rss_mib"] - r["rss_before_mib"])
                ratio = (f"  {fused['min_ms'] / r['min_ms']:.2f}x, {fused['peak_rss_mib'] / r['peak_rss_mib']:.2f}x, "
                         f"{step:.2f}x")
            temp = f"{r['xla_temp_mib']:12.0f}" if r["xla_temp_mib"] is not None else f"{'-':>12}"
            lines.append(f"{backend:>10} {vocab:>7} {variant:>13} {r['min_ms']:9.0f} {r['peak_rss_mib']:13.0f} "
                         f"{r['rss_before_mib']:11.0f} {temp}{ratio}")
    return "\n".join(lines)


def plot(records, path):
    """Step time and peak RSS per backend and variant (one vocabulary per row of panels)."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    vocabs = sorted({r["vocab"] for r in records})
    fig = Figure(figsize=(11, 3.6 * len(vocabs)), layout="constrained")
    axes = fig.subplots(len(vocabs), 2, squeeze=False)
    colors = {"fused": "#2e7d32", "dense+keras": "#c62828", "dense+stable": "#1565c0"}
    for row, vocab in enumerate(vocabs):
        for col, (key, label) in enumerate((("min_ms", "step time (ms, min)"), ("peak_rss_mib", "peak RSS (MiB)"))):
            ax = axes[row][col]
            for i, backend in enumerate(BACKENDS):
                for j, variant in enumerate(VARIANTS):
                    r = next((r for r in records if (r["backend"], r["vocab"], r["variant"]) == (backend, vocab, variant)),
                             None)
                    value = r[key] if r and not r["skipped"] else 0
                    ax.bar(i + (j - 1) * 0.27, value, 0.27, color=colors[variant], label=variant if i == 0 else None)
                    if r and r["skipped"]:
                        ax.text(i + (j - 1) * 0.27, 0, "skipped", rotation=90, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(BACKENDS)), BACKENDS)
            ax.set_title(f"{label}, V = {vocab}")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    first = records[0]
    fig.suptitle(f"One training step of a V-way head on {first['tokens']} x {first['hidden']} hidden states "
                 f"(Adam); {first['device_name']}; run {first['run_id']}", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all", help="all, or a comma list of tensorflow, jax, torch")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", default="131072,262144", help="comma list of vocabulary sizes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=20.0, help="skip variants estimated above this")
    parser.add_argument("--out", default=RECORDS)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--report", action="store_true", help="only print the table and draw the plot of the "
                        "latest run in --out (or --run-id)")
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.vocab = int(args.vocab)
        _child(args)
        return 0
    if args.report:
        records = load(args.out, args.run_id)
        print(table(records))
        print(f"plot: {plot(records, args.plot)}")
        return 0
    backends = BACKENDS if args.backend == "all" else tuple(args.backend.split(","))
    variants = tuple(args.variants.split(","))
    if set(backends) - set(BACKENDS) or set(variants) - set(VARIANTS):
        parser.error(f"--backend from {BACKENDS}, --variants from {VARIANTS}")
    failed = run(args, backends, variants, [int(v) for v in args.vocab.split(",")])
    records = load(args.out, args.run_id)
    print(table(records))
    print(f"records appended to {args.out} (run {args.run_id}); plot: {plot(records, args.plot)}")
    return 1 if failed else 0


def run(args, backends, variants, vocabs, echo=print):
    """Measure every (vocabulary, backend, variant) in a process of its own; returns the number that failed.
    ``args`` holds tokens, hidden, reps, memory_gib, out and run_id (set here when None)."""
    args.run_id = args.run_id or time.strftime("lmhead-%Y%m%dT%H%M%S")
    failed = 0
    for vocab in vocabs:
        for backend in backends:
            for variant in variants:
                estimate = _estimate_gib(variant, args.tokens, args.hidden, vocab)
                label = f"{backend:>10} {variant:>12} V={vocab}"
                if estimate > args.memory_gib:
                    reason = f"estimated {estimate:.0f} GiB > --memory-gib {args.memory_gib:g}"
                    harness.append_records(args.out, [_record(args, backend, variant, vocab, skipped=reason)])
                    echo(f"{label}: skipped ({reason})")
                    continue
                command = [sys.executable, "-m", "keras_stable_heads.bench.lm_head", "--child", "--variant", variant,
                           "--run-id", args.run_id, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
                           "--vocab", str(vocab), "--reps", str(args.reps), "--out", args.out]
                done = subprocess.run(command, env=harness.backend_env(backend), capture_output=True, text=True)
                if done.returncode != 0:
                    failed += 1
                    reason = f"failed: {done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else done.returncode}"
                    harness.append_records(args.out, [_record(args, backend, variant, vocab, skipped=reason)])
                echo(f"{label}: {done.stdout.strip().splitlines()[-1] if done.returncode == 0 else reason}")
    return failed


if __name__ == "__main__":
    sys.exit(main())

"""``keras-stable-heads demo``: why each output activation goes with its loss, trained on real data, with plots.

Choose the output's activation for the distribution you assume; maximum likelihood then fixes the loss, and the
loss must be computed from the logits. Four tasks make that visible, on scikit-learn's bundled data sets (no
download) and the current Keras backend:

==========  ==============================  ==============================================================
task        data                            the stable pairing vs the alternatives
==========  ==============================  ==============================================================
regression  iris: sepal width from length   GaussianHead + GaussianNLL (mean) vs LaplaceHead + LaplaceNLL
                                            (median)
binary      breast cancer                   BinaryHead + StableBinaryCE vs sigmoid + MSE and
                                            sigmoid + BinaryCrossentropy
multiclass  digits (10 classes)             SoftmaxHead + StableSparseSoftmaxCE vs
                                            softmax + SparseCategoricalCrossentropy
multilabel  digits, 4 attribute labels      MultilabelHead + StableMultilabelCE vs
                                            softmax + CategoricalCrossentropy
==========  ==============================  ==============================================================

It prints a summary table and writes a report folder (``report.md``, ``results.json`` and PNG plots). Use
:func:`run` from Python; the command line is ``keras-stable-heads demo [--backend B] [--epochs N] [--out DIR]
[--task T ...] [--dataset cifar10]`` (``keras_stable_heads.cli``).
"""

import contextlib
import dataclasses
import json
import os
import platform
import sys
import time

TASKS = ("regression", "binary", "multiclass", "multilabel")
#: tasks that run only when asked for with --task (not in the default minute): the large-vocabulary head.
OPT_IN_TASKS = ("vocabulary",)
#: the vocabulary task: one training step of a VOCABULARY["vocab"]-way head on synthetic hidden states, fused
#: against Dense + Keras's loss, each in a process of its own (peak memory is per process); about a minute.
VOCABULARY = {"tokens": 2048, "hidden": 256, "vocab": 65536, "reps": 2}
CIFAR_TASKS = ("binary", "multiclass")
DEFAULT_OUT = "keras-stable-heads-demo"
#: epochs per task with the bundled data sets / with CIFAR-10 (``--epochs`` sets one number for every task).
DEFAULT_EPOCHS = {"regression": 30, "binary": 15, "multiclass": 15, "multilabel": 15}
CIFAR_EPOCHS = {"binary": 6, "multiclass": 6}
SEED = 0
#: the binary and multiclass tasks train every pairing from each of these starts (_demo_tasks.initial_weights).
STARTS = ("standard", "saturated")
#: per task: (trunk width, batch size, Adam learning rate) with the bundled data; CIFAR-10 uses a small CNN.
SETTINGS = {"regression": (16, 16, 0.05), "binary": (16, 64, 0.03), "multiclass": (32, 128, 0.03),
            "multilabel": (32, 128, 0.01)}
CIFAR_SETTINGS = {"binary": (None, 128, 0.003), "multiclass": (None, 128, 0.003)}
#: "epochs to target" is the first epoch whose test metric reaches these values.
TARGETS = {"binary": ("accuracy", 0.90), "multiclass": ("accuracy", 0.90), "multilabel": ("exact match", 0.80)}
CIFAR_TARGETS = {"binary": ("accuracy", 0.75), "multiclass": ("accuracy", 0.35)}
PLOTS = {
    "regression": ("regression_fits.png",),
    "binary": ("saturation.png", "binary_curves.png"),
    "multiclass": ("multiclass_curves.png",),
    "multilabel": ("winner_takes_all.png", "multilabel_curves.png"),
    "vocabulary": ("vocabulary_step.png",),
}
CIFAR_HINT = ("CIFAR-10 is not cached in {home}/datasets: run `python -c \"import keras; "
              "keras.datasets.cifar10.load_data()\"` once (about 170 MB), then rerun.")


class DemoError(Exception):
    """A one-line problem for the user (no traceback): a missing data set, a task the data set does not have."""


@dataclasses.dataclass
class TaskResult:
    name: str
    title: str
    data: str
    runs: list
    rows: list
    plots: dict  # file name -> caption
    notes: list
    seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)  # binary: {"saturation": (z, {name: (loss, grad)})}


@dataclasses.dataclass
class _Context:
    out: str
    epochs: object  # int or None (per-task defaults)
    seed: int
    dataset: str
    progress_stream: object
    starts: tuple
    cifar: tuple = None  # (binary Data, multiclass Data) with --dataset cifar10

    def epochs_for(self, task):
        if self.epochs is not None:
            return int(self.epochs)
        return (CIFAR_EPOCHS if self.dataset == "cifar10" else DEFAULT_EPOCHS)[task]

    def settings(self, task):
        return (CIFAR_SETTINGS if self.dataset == "cifar10" else SETTINGS)[task]

    def target(self, task):
        return (CIFAR_TARGETS if self.dataset == "cifar10" else TARGETS)[task]


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """``keras-stable-heads demo``: ``args`` from the parser in :mod:`keras_stable_heads.cli`. Returns the exit code."""
    command = _command_line(args)
    try:
        run(out=args.out, tasks=args.task, epochs=args.epochs, seed=args.seed, dataset=args.dataset,
            command=command)
    except DemoError as error:
        print(f"keras-stable-heads demo: {error}", file=sys.stderr)
        return 2
    return 0


def run(out=DEFAULT_OUT, tasks=None, epochs=None, seed=SEED, dataset="bundled", command=None, stream=None,
        progress_stream=None, starts=STARTS):
    """Run the demo's tasks, print the summary table to ``stream`` and write the report folder ``out``.

    Args:
        out: the report folder (created; files in it are overwritten).
        tasks: names from :data:`TASKS` (default all; with ``dataset="cifar10"``, ``binary`` and ``multiclass``).
        epochs: one epoch count for every task (default :data:`DEFAULT_EPOCHS` / :data:`CIFAR_EPOCHS`).
        seed: seeds the data split, the initial weights and the batch order (the same for every pairing).
        dataset: ``"bundled"`` (scikit-learn's) or ``"cifar10"`` (from Keras's local cache only).
        command: the command line to record in the report.
        stream, progress_stream: where the table and the progress bars go (stdout and stderr by default).
        starts: the starts the binary and multiclass tasks train from (``"standard"``, ``"saturated"``); the
            tests pass ``("saturated",)`` to train fewer models.

    Returns:
        ``{task: TaskResult}``.

    Raises:
        DemoError: CIFAR-10 is not cached, or a task that the data set does not have was asked for.
    """
    stream = stream or sys.stdout
    tasks = _tasks(tasks, dataset)
    context = _Context(out, epochs, seed, dataset, progress_stream or sys.stderr, tuple(starts))
    if dataset == "cifar10":
        context.cifar = _cifar(seed)
    os.makedirs(out, exist_ok=True)
    import keras

    started = time.perf_counter()
    results = {}
    with _one_torch_thread():
        for task in tasks:
            task_started = time.perf_counter()
            results[task] = _RUNNERS[task](context)
            results[task].seconds = time.perf_counter() - task_started
    seconds = time.perf_counter() - started
    table = summary_table(results)
    print(f"\nkeras-stable-heads demo: keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{seconds:.0f} s\n", file=stream)
    print(table, file=stream)
    _write_report(context, results, table, seconds, command or _command_line_from(out, tasks, epochs, dataset))
    print(f"\nreport: {os.path.join(out, 'report.md')}", file=stream)
    return results


@contextlib.contextmanager
def _one_torch_thread():
    """On PyTorch, one intra-op thread while the demo trains (restored after).

    The demo's models are tiny: a second thread never pays for itself, and on a busy 2-core machine torch's
    threads wait on each other (a 128x64 matmul measured 12 ms with two threads, a training step 10x slower).
    """
    import keras

    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tasks(tasks, dataset):
    available = CIFAR_TASKS if dataset == "cifar10" else TASKS
    if dataset not in ("bundled", "cifar10"):
        raise DemoError(f"unknown dataset {dataset!r}: use 'bundled' (scikit-learn's) or 'cifar10'.")
    if not tasks or "all" in tasks:
        return available + tuple(task for task in tasks or () if task in OPT_IN_TASKS)
    wrong = [task for task in tasks if task not in available + OPT_IN_TASKS]
    if wrong:
        raise DemoError(f"--dataset {dataset} has no task {', '.join(wrong)} (it has: {', '.join(available)}).")
    return tuple(dict.fromkeys(tasks))


def _cifar(seed):
    from . import _demo_tasks as T

    arrays = T.load_cifar10()
    if arrays is None:
        raise DemoError(CIFAR_HINT.format(home=T.keras_home()))
    return T.cifar10_tasks(arrays, seed, CIFAR_SETTINGS["binary"][1])


def _command_line(args):
    parts = ["keras-stable-heads", "demo"]
    if getattr(args, "backend", None):
        parts += ["--backend", args.backend]
    return " ".join(parts + _options(args.out, args.task, args.epochs, args.dataset, args.seed))


def _command_line_from(out, tasks, epochs, dataset):
    return " ".join(["keras-stable-heads", "demo"] + _options(out, tasks, epochs, dataset, SEED))


def _options(out, tasks, epochs, dataset, seed):
    parts = []
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    if out != DEFAULT_OUT:
        parts += ["--out", out]
    for task in tasks or ():
        parts += ["--task", task]
    if dataset != "bundled":
        parts += ["--dataset", dataset]
    if seed != SEED:
        parts += ["--seed", str(seed)]
    return parts


# ----------------------------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------------------------


def _train_all(context, task, data, pairings, starts, evaluate, trunk, keep_models=False):
    from . import _demo_tasks as T

    epochs = context.epochs_for(task)
    _, batch_size, learning_rate = context.settings(task)
    progress = T.Progress(task, epochs * len(pairings) * len(starts), context.progress_stream)
    runs = [T.train(pairing, data, trunk=trunk, init=start, evaluate=evaluate, epochs=epochs, seed=context.seed,
                    batch_size=batch_size, learning_rate=learning_rate, progress=progress, keep_model=keep_models)
            for start in starts for pairing in pairings]
    progress.close()
    return runs


def _row(task, run, metric, target):
    reached = run.epochs_to(metric, target) if target is not None else None
    return {"task": task, "pairing": run.pairing.name, "stable": run.pairing.stable, "start": run.init,
            "metric": metric, "value": run.final[metric], "test_nll": run.final["nll"],
            "train_loss": run.train_loss[-1] if run.train_loss else float("nan"),
            "target": target, "epochs_to_target": reached, "seconds": run.seconds}


def _classification(context, task, data, pairings, evaluate, title, plot_name):
    from . import _demo_plots as P
    from . import _demo_tasks as T

    width = context.settings(task)[0]
    trunk = T.conv_trunk() if context.dataset == "cifar10" else T.dense_trunk(width)
    runs = _train_all(context, task, data, pairings, context.starts, evaluate, trunk)
    metric, target = context.target(task)
    rows = [_row(task, run, metric, target) for run in runs]
    saturated = (f"saturated start: output bias {-T.SATURATION:g} (all 'no')" if pairings[0].width == 1 else
                 f"saturated start: output bias +{T.SATURATION:g} on class 0")
    P.training_curves(runs, metric, metric, os.path.join(context.out, plot_name), title,
                      {"standard": "standard start (Glorot weights, zero bias)", "saturated": saturated})
    return runs, rows


def _binary(context):
    import keras
    import numpy as np

    from . import _demo_plots as P
    from . import _demo_tasks as T

    data = context.cifar[0] if context.cifar else T.breast_cancer(context.seed, context.settings("binary")[1])
    runs, rows = _classification(context, "binary", data, T.binary_pairings(), T.evaluate_binary,
                                 f"Binary ({data.name}): test accuracy and NLL per epoch", "binary_curves.png")
    z = np.linspace(-40, 10, 501)  # the confidently wrong side, and a little past 0
    curves = T.saturation_curves(z)
    P.saturation(z, curves, os.path.join(context.out, "saturation.png"), keras.backend.backend())
    notes = [_tensorflow_note("sigmoid", "BinaryCrossentropy")] if keras.backend.backend() == "tensorflow" else []
    return TaskResult("binary", "Binary: one sigmoid unit", data.description, runs, rows, {
        "saturation.png": "Loss and |gradient| against the logit, label 1. Sigmoid + MSE has gradient "
                          "2(σ−1)σ(1−σ) ≈ 2e^z: it vanishes exactly where the output is most wrong. Keras's "
                          "probability-space cross-entropy clips σ to [1e-7, 1 − 1e-7]: its loss stops at 16.118 "
                          "and its gradient is exactly 0 below z ≈ −16.1. From logits the loss is softplus(−z) "
                          "and its gradient tends to −1: a confidently wrong output gets the strongest push.",
        "binary_curves.png": "Test accuracy and test NLL per epoch. Standard start: every pairing learns. "
                             f"Saturated start (every logit near −{T.SATURATION:g}): only the logit-space loss has "
                             "a gradient to learn from.",
    }, notes, extra={"saturation": (z, curves)})


def _multiclass(context):
    import keras

    from . import _demo_tasks as T

    data = context.cifar[1] if context.cifar else T.digits(context.seed, context.settings("multiclass")[1])
    runs, rows = _classification(context, "multiclass", data, T.multiclass_pairings(len(data.label_names)),
                                 T.evaluate_multiclass, f"10 classes ({data.name}): test accuracy and NLL per epoch",
                                 "multiclass_curves.png")
    notes = ([_tensorflow_note("softmax", "SparseCategoricalCrossentropy")]
             if keras.backend.backend() == "tensorflow" else [])
    return TaskResult("multiclass", "One of K classes: softmax", data.description, runs, rows, {
        "multiclass_curves.png": "Test accuracy and NLL per epoch. Saturated start: every example starts out "
                                 f"'class 0' with probability about 1 − 9e^−{T.SATURATION:g}; Keras's "
                                 "probability-space cross-entropy clips probabilities to [1e-7, 1 − 1e-7], so "
                                 "every example's gradient is exactly 0.",
    }, notes)


def _multilabel(context):
    import keras
    import numpy as np

    from . import _demo_plots as P
    from . import _demo_tasks as T

    width, batch_size, _ = context.settings("multilabel")
    data = T.digit_attributes(context.seed, batch_size)
    pairings = T.multilabel_pairings(len(data.label_names))
    runs = _train_all(context, "multilabel", data, pairings, ("standard",), T.evaluate_multilabel,
                      T.dense_trunk(width), keep_models=True)
    metric, target = context.target("multilabel")
    rows = [_row("multilabel", run, metric, target) for run in runs]
    P.training_curves(runs, metric, metric, os.path.join(context.out, "multilabel_curves.png"),
                      "Multi-label (digit attributes): exact match at 0.5 and NLL per epoch",
                      {"standard": "standard start"})
    digit_test = data.extra["digit_test"]
    index = int(np.flatnonzero(digit_test == 6)[0])  # even, >= 5 and a multiple of 3: three labels at once
    stable, softmax = runs
    x = data.x_test[index:index + 1]
    logits = np.asarray(keras.ops.convert_to_numpy(stable.model(x, training=False)))[0]
    softmax_output = np.asarray(keras.ops.convert_to_numpy(softmax.model(x, training=False)))[0]
    P.winner_takes_all(data.extra["images_test"][index], data.label_names, data.y_test[index], logits, softmax_output,
                       os.path.join(context.out, "winner_takes_all.png"), 6)
    for run in runs:
        run.model = None
    counts = data.y_train.sum(axis=-1)
    per_count = ", ".join(str(int(np.sum(counts == k))) for k in range(4))
    notes = [f"Training examples with 0 / 1 / 2 / 3 labels: {per_count}. "
             "The softmax model is trained on the multi-hot rows normalized to sum to 1 (the usual way to feed them "
             "to a softmax; rows without a label contribute 0); both models are read at threshold 0.5."]
    return TaskResult("multilabel", "Several labels at once: a sigmoid per label", data.description, runs, rows, {
        "winner_takes_all.png": "One test digit 6 (even, ≥ 5, a multiple of 3). The MultilabelHead's raw outputs "
                                "(logits); their sigmoids, which say yes to each true label independently; the "
                                "softmax of the same logits, which must share one unit among them (winner takes "
                                "all); and what the softmax-trained model outputs.",
        "multilabel_curves.png": "Exact match (every label right at threshold 0.5) and test NLL per epoch.",
    }, notes)


def _regression(context):
    import keras
    import numpy as np

    from . import _demo_plots as P
    from . import _demo_tasks as T

    width, batch_size, _ = context.settings("regression")
    data = T.iris_sepals(context.seed, batch_size)
    pairings = T.regression_pairings()
    runs = _train_all(context, "regression", data, pairings, ("standard",), T.evaluate_regression,
                      T.dense_trunk(width, "tanh"), keep_models=True)
    mean, std = data.extra["x_mean"], data.extra["x_std"]
    x_train_cm, x_test_cm = data.x_train[:, 0] * std + mean, data.x_test[:, 0] * std + mean
    # The yardstick for "epochs to target": the least-squares line's test MAE (the linear fit of the mean).
    slope, intercept = np.polyfit(x_train_cm, data.y_train[:, 0], 1)
    line_mae = float(np.mean(np.abs(data.y_test[:, 0] - (slope * x_test_cm + intercept))))
    rows = []
    for run in runs:
        row = _row("regression", run, "MAE", None)
        row["target"] = line_mae
        for epoch, metrics in enumerate(run.test):
            if metrics["MAE"] <= line_mae:
                row["epochs_to_target"] = epoch
                break
        row["spread"] = run.final["spread"]
        row["RMSE"] = run.final["RMSE"]
        rows.append(row)
    grid_cm = np.linspace(x_train_cm.min() - 0.2, x_train_cm.max() + 0.2, 200)
    grid = ((grid_cm - mean) / std).astype("float32")[:, None]
    fits = []
    for run, color, kind in zip(runs, ("#2166ac", "#b2182b"), ("gaussian", "laplace")):
        outputs = np.asarray(keras.ops.convert_to_numpy(run.model(grid, training=False)), np.float64)
        location, scale = outputs[:, 0], np.exp(outputs[:, 1])
        spread_name = "σ" if kind == "gaussian" else "b"
        summary = (f"test MAE {run.final['MAE']:.3f}, RMSE {run.final['RMSE']:.3f}, mean {spread_name} "
                   f"{run.final['spread']:.3f} cm")
        fits.append((run.pairing.name.split(" +")[0], location, P.half_width_50(scale, kind), color, summary))
        run.model = None
    P.regression_fits(x_train_cm, data.y_train[:, 0], x_test_cm, data.y_test[:, 0], grid_cm, fits,
                      os.path.join(context.out, "regression_fits.png"), "sepal length (cm)", "sepal width (cm)")
    notes = [f"Least-squares line (fitted on the training set): test MAE {line_mae:.3f} cm; "
             "'epochs to target' is the first epoch whose test MAE is at most that.",
             "Both heads predict a spread per input (heteroscedastic): σ (Gaussian) and b (Laplace, standard "
             "deviation b√2). The Gaussian's mean minimizes squared error (MSE is its NLL at fixed σ); the "
             "Laplace's median minimizes absolute error (MAE is its NLL at fixed b)."]
    return TaskResult("regression", "Regression: Gaussian (mean) vs Laplace (median)", data.description, runs, rows,
                      {"regression_fits.png": "The two fits with the central 50% band of each predicted "
                                              "distribution (Gaussian: mean ± 0.674σ; Laplace: median ± b ln 2)."},
                      notes)


def _tensorflow_note(activation, loss):
    return (f"On TensorFlow, Keras's {loss} finds the logits cached on a tensor that comes straight out of a "
            f"{activation} and computes the loss from them, so this pairing is not clipped here: it trains like the "
            "stable one (on JAX and PyTorch it is clipped). Sigmoid + MSE saturates on every backend.")


def _vocabulary(context):
    """One training step of a large-vocabulary head: FusedSoftmaxHead (the logits never exist) against
    Dense(V) + Keras's loss, on this backend, with keras_stable_heads.bench.lm_head (the benchmark's own code)."""
    import types

    import keras

    from .bench import lm_head

    setup = VOCABULARY
    args = types.SimpleNamespace(tokens=setup["tokens"], hidden=setup["hidden"], reps=setup["reps"], memory_gib=20.0,
                                 out=os.path.join(context.out, "vocabulary_records.jsonl"), run_id=None)
    echo = lambda line: print(f"vocabulary: {line.strip()}", file=context.progress_stream, flush=True)  # noqa: E731
    lm_head.run(args, (keras.backend.backend(),), ("fused", "dense+keras"), (setup["vocab"],), echo=echo)
    records = lm_head.load(args.out, args.run_id)
    names = {"fused": "FusedSoftmaxHead + its loss", "dense+keras": "Dense(V) + SparseCategoricalCE(logits)"}
    rows, measured = [], {}
    for r in records:
        if r["skipped"]:
            cells = ["vocabulary", names[r["variant"]], "—", f"skipped: {r['skipped']}", "—", "—", "—"]
        else:
            measured[r["variant"]] = r
            cells = ["vocabulary", names[r["variant"]], "—",
                     f"step {r['min_ms']:.0f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB", "—",
                     _format(r["first_loss"], 4), "—"]
        rows.append({"task": "vocabulary", "pairing": names[r["variant"]], "stable": r["variant"] == "fused",
                     "record": r, "cells": cells})
    notes = [f"`{setup['tokens']}` tokens of `{setup['hidden']}` hidden values, a `{setup['vocab']}`-way softmax "
             f"head, Adam; each variant runs in a process of its own (peak RSS is that process's, the framework "
             f"included); time is the min of {setup['reps']} steps after a warm-up step. The full-size benchmark "
             "(4096 tokens, 512 hidden, 131,072 classes, every backend) is `python -m keras_stable_heads.bench.lm_head`."]
    fused, dense = measured.get("fused"), measured.get("dense+keras")
    if fused and dense:
        notes.append(f"Fused / Dense + Keras's loss: step time {fused['min_ms'] / dense['min_ms']:.2f}x, peak RSS "
                     f"{fused['peak_rss_mib'] / dense['peak_rss_mib']:.2f}x (the step's own memory, peak minus the "
                     f"RSS before it: {fused['peak_rss_mib'] - fused['rss_before_mib']:.0f} against "
                     f"{dense['peak_rss_mib'] - dense['rss_before_mib']:.0f} MiB); the (tokens x vocabulary) logits "
                     f"alone are {setup['tokens'] * setup['vocab'] * 4 / (1 << 20):.0f} MiB.")
    plots = {}
    if records:
        lm_head.plot(records, os.path.join(context.out, "vocabulary_step.png"))
        plots["vocabulary_step.png"] = "Step time and peak resident memory of one training step, per variant."
    result = TaskResult("vocabulary", "Large vocabulary: the fused head against Dense + Keras's loss",
                        f"synthetic hidden states and token ids (seed 0), {setup['vocab']} classes", [], rows, plots,
                        notes)
    result.extra["setup"] = (f"one step of {setup['tokens']} tokens after a warm-up step, min of {setup['reps']}, "
                             "Adam(0.001)")
    return result


_RUNNERS = {"regression": _regression, "binary": _binary, "multiclass": _multiclass, "multilabel": _multilabel,
            "vocabulary": _vocabulary}


# ----------------------------------------------------------------------------------------------------------------
# Summary and report
# ----------------------------------------------------------------------------------------------------------------


def _format(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table_rows(results):
    header = ["task", "pairing", "start", "test metric", "test NLL", "train loss (own)", "epochs to target"]
    rows = []
    for result in results.values():
        for row in result.rows:
            if "cells" in row:  # a task that measures rather than trains to a target (vocabulary)
                rows.append(row["cells"])
                continue
            target = row["target"]
            reached = row["epochs_to_target"]
            target_text = (f"MAE ≤ {target:.3f}" if row["metric"] == "MAE" else f"{row['metric']} ≥ {target:g}")
            metric = f"{row['metric']} {row['value']:.3f}"
            if "spread" in row:  # regression: the learned spread (σ, or the Laplace scale b), in cm
                metric += f", {'σ' if row['pairing'].startswith('Gaussian') else 'b'} {row['spread']:.3f}"
            rows.append([row["task"], row["pairing"], row["start"], metric,
                         _format(row["test_nll"]), _format(row["train_loss"], 4),
                         f"{_format(reached)} ({target_text})" if reached is not None else f"— ({target_text})"])
    return header, rows


def summary_table(results):
    """The printed table: one line per (task, pairing, start)."""
    header, rows = _table_rows(results)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _markdown_table(results):
    header, rows = _table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_report(context, results, table, seconds, command):
    import keras
    import numpy as np

    from . import _demo_tasks as T

    backend = keras.backend.backend()
    versions = (f"keras {keras.__version__}, backend {backend}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    lines = [
        "# keras-stable-heads demo",
        "",
        f"`{command}` — {versions}; {os.cpu_count()} CPU cores; {seconds:.0f} s for the tasks (start-up not "
        "included).",
        "",
        "Choose the output activation for the distribution you assume; maximum likelihood then fixes the loss, "
        "and the loss must see the logits. Each comparison below trains the same network twice or three times "
        "with the same data split, initial weights, batch order and optimizer (Adam); only the output activation "
        "and the loss differ. Test metrics are computed in float64 NumPy from each model's outputs mapped to "
        f"probabilities, the same yardstick for every pairing (the test NLL clips probabilities to "
        f"[{T.P_CLIP:g}, 1 − {T.P_CLIP:g}], for the yardstick only).",
        "",
        "**Saturated start.** To show what saturation does, the binary and 10-class tasks are also trained from a "
        "start "
        f"where the model is confidently wrong: the output bias is set to −{T.SATURATION:g} for the single sigmoid "
        f"unit (every example starts as 'no' with probability about 1 − e^−{T.SATURATION:g}) or to "
        f"+{T.SATURATION:g} on class 0 of the "
        "softmax (every example starts as 'class 0'); the weights are the standard Glorot start (drawn with NumPy, "
        "the same for every pairing and backend). Such logits arise "
        "in practice from unnormalized inputs, a learning-rate spike or a model fine-tuned from another task.",
        "",
        "## Summary",
        "",
        _markdown_table(results),
        "",
        "*test metric*: at the last epoch, on the test split. *train loss (own)*: the last epoch's training loss "
        "of the pairing's own loss (not comparable across pairings). *epochs to target*: the first epoch whose "
        "test metric reaches the target (0 = before training; — = never).",
        "",
    ]
    for result in results.values():
        if "setup" in result.extra:
            setup = result.extra["setup"]
        else:
            _, batch_size, learning_rate = context.settings(result.name)
            setup = (f"{context.epochs_for(result.name)} epochs, batch {batch_size}, Adam({learning_rate:g}), "
                     f"seed {context.seed}")
        lines += [f"## {result.title}", "", f"Data: {result.data}. {setup}; {result.seconds:.0f} s.", ""]
        for note in result.notes:
            lines += [note, ""]
        for name, caption in result.plots.items():
            lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    with open(os.path.join(context.out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(context.out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    record = {
        "command": command, "backend": backend, "keras": keras.__version__, "seconds": seconds,
        "seed": context.seed, "dataset": context.dataset,
        "tasks": {name: {"rows": result.rows, "plots": list(result.plots), "seconds": result.seconds,
                         "runs": [{"pairing": run.pairing.name, "stable": run.pairing.stable, "start": run.init,
                                   "train_loss": run.train_loss, "test": run.test} for run in result.runs]}
                  for name, result in results.items()},
    }
    with open(os.path.join(context.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=float)


def expected_files(tasks=TASKS):
    """The files the demo promises for ``tasks``: the report, the table, the results and each task's plots."""
    return ("report.md", "summary.txt", "results.json") + tuple(name for task in tasks for name in PLOTS[task])

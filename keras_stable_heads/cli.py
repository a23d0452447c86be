"""Command line: ``keras-stable-heads [COMMAND]`` (also ``python -m keras_stable_heads``); among the commands,
``quickstart`` and ``audit MODEL.keras [--fix OUT.keras]``."""

import argparse
import os
import sys

from keras_stable_heads import __version__


def quickstart(args):
    """Train a small softmax classifier on seeded synthetic data with StableSoftmaxCE and print the loss."""
    import keras
    import numpy as np

    from keras_stable_heads import StableSoftmaxCE

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (4, 8))
    labels = rng.integers(0, 4, 2048)
    x = (centers[labels] + rng.normal(0, 1.5, (2048, 8))).astype("float32")
    y = np.eye(4, dtype="float32")[labels]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=StableSoftmaxCE(label_smoothing=0.05),
                  metrics=["categorical_accuracy"])
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}: a Dense(4) logits head + StableSoftmaxCE")
    history = model.fit(x, y, epochs=args.epochs, batch_size=128, verbose=2)
    losses = history.history["loss"]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, accuracy {history.history['categorical_accuracy'][-1]:.3f}")
    return 0


def run_bench(args):
    """``keras-stable-heads bench [--full] [--backend ...]``: benchmarks against the built-ins."""
    from keras_stable_heads.bench import command

    return command.main(args.options)


def audit(args):
    """Print the audit of a saved model; exit 1 when it has findings (with --fix: when the fixed model has any)."""
    import keras

    from keras_stable_heads.audit import audit as audit_model
    from keras_stable_heads.audit import stabilize

    try:
        model = keras.saving.load_model(args.model)
    except Exception as error:  # noqa: BLE001 - any loading failure is reported the same way
        print(f"keras-stable-heads audit: cannot load {args.model}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    findings = audit_model(model)
    print(f"{args.model}: {findings}")
    if not args.fix:
        return 1 if findings else 0
    try:
        training, inference = stabilize(model)
    except (TypeError, ValueError) as error:
        print(f"keras-stable-heads audit: cannot fix {args.model}: {error}", file=sys.stderr)
        return 2
    training.save(args.fix)
    print(f"wrote the stabilized training model (logits, compiled with the stable losses) to {args.fix}")
    if args.inference:
        inference.save(args.inference)
        print(f"wrote the inference model (probabilities) to {args.inference}")
    remaining = audit_model(training)
    if remaining:
        print(f"{args.fix} still has {remaining}")
    return 1 if remaining else 0


def run_demo(args):
    """``keras-stable-heads demo``: train stable vs mistaken pairings on bundled data; plots and a report folder."""
    from keras_stable_heads import demo

    return demo.main(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-stable-heads", description=__doc__)
    parser.add_argument("--version", action="version", version=f"keras-stable-heads {__version__}")
    commands = parser.add_subparsers(dest="command")
    quick = commands.add_parser("quickstart", help="train a small model with StableSoftmaxCE and print the loss")
    quick.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    quick.add_argument("--epochs", type=int, default=5)
    quick.set_defaults(run=quickstart)
    check = commands.add_parser("audit", help="report mismatched output activations and losses in a saved model; "
                                "exit 1 when there are any")
    check.add_argument("model", help="a saved model (.keras)")
    check.add_argument("--fix", metavar="OUT.keras", help="write the stabilized training model (logits, stable losses)")
    check.add_argument("--inference", metavar="OUT.keras", help="with --fix: also write the inference model "
                       "(probabilities)")
    check.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    check.set_defaults(run=audit)
    # bench parses its own options (keras_stable_heads.bench.command): they pass through untouched.
    bench = commands.add_parser("bench", add_help=False, prefix_chars="+",
                                help="benchmark the losses against the built-ins; --gpu for the GPU plan (bench -h for "
                                "its options)")
    bench.add_argument("options", nargs=argparse.REMAINDER)
    bench.set_defaults(run=run_bench)
    # demo: the default command (keras_stable_heads.demo, imported only when it runs).
    show = commands.add_parser("demo", help="the default: why each activation goes with its loss, trained on "
                               "bundled data, with plots and a report folder")
    show.add_argument("--backend", choices=["tensorflow", "jax", "torch"],
                      help="Keras backend (default: KERAS_BACKEND)")
    show.add_argument("--epochs", type=int, help="epochs for every task (default: per task, see docs/demo.md)")
    show.add_argument("--out", default="keras-stable-heads-demo", help="the report folder (default: %(default)s)")
    show.add_argument("--task", action="append",
                      choices=["regression", "binary", "multiclass", "multilabel", "vocabulary", "all"],
                      help="run only this task (repeatable; default: all, which leaves out the opt-in vocabulary "
                           "task: one training step of a 65,536-way head, fused against Dense + Keras's loss)")
    show.add_argument("--dataset", choices=["bundled", "cifar10"], default="bundled",
                      help="bundled: scikit-learn's sets; cifar10: binary (bird vs airplane) and 10-class tasks on "
                      "CIFAR-10 from Keras's local cache")
    show.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and the batch order")
    show.set_defaults(run=run_demo)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # the default command
    args = parser.parse_args(argv)
    if getattr(args, "inference", None) and not args.fix:
        parser.error("--inference needs --fix")
    _use_backend(getattr(args, "backend", None), argv)
    return args.run(args)


def _use_backend(backend, argv):
    """Keras fixes its backend at import (this package imports Keras): re-run the command under the asked one."""
    if not backend or os.environ.get("KERAS_BACKEND") == backend:
        return
    import keras

    if keras.backend.backend() != backend:
        os.environ["KERAS_BACKEND"] = backend
        os.execv(sys.executable, [sys.executable, "-m", "keras_stable_heads", *argv])


if __name__ == "__main__":
    sys.exit(main())

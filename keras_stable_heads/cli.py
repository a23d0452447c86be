"""Command line: ``keras-stable-heads [quickstart]`` (also ``python -m keras_stable_heads``)."""

import argparse
import os
import sys


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-stable-heads", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    quick = commands.add_parser("quickstart", help="train a small model with StableSoftmaxCE and print the loss")
    quick.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    quick.add_argument("--epochs", type=int, default=5)
    quick.set_defaults(run=quickstart)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["quickstart", *argv]  # the default command
    args = parser.parse_args(argv)
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

"""The demo's data, pairings and training loop (see :mod:`keras_stable_heads.demo`).

Every comparison is fair by construction: one ``train`` call per pairing, with the same data split, the same
trunk, the same initial weights (:func:`initial_weights`; the output projection has the same shape in every pairing
of a task), the same optimizer and batch order (:func:`seed_everything` before each run). Only the output
activation and the loss differ. Test metrics are computed in float64 NumPy from each model's outputs mapped to
probabilities (or distribution parameters), so every pairing is measured with the same yardstick.
"""

import dataclasses
import math
import os
import pickle
import random
import sys
import time

import keras
import numpy as np

from .heads import BinaryHead
from .heads import GaussianHead
from .heads import LaplaceHead
from .heads import MultilabelHead
from .heads import SoftmaxHead

#: a probability is clipped to [P_CLIP, 1 - P_CLIP] for the test NLL only (the yardstick, the same for every pairing).
P_CLIP = 1e-12
#: the "saturated" start: the output bias is -SATURATION (one unit) or +SATURATION on class 0 (softmax).
SATURATION = 30.0
#: the multi-label task's labels: attributes of a digit, several (or none) true at once.
DIGIT_ATTRIBUTES = {
    "even": (0, 2, 4, 6, 8),
    "prime": (2, 3, 5, 7),
    ">= 5": (5, 6, 7, 8, 9),
    "multiple of 3": (0, 3, 6, 9),
}

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """A train/test split and what it is."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str
    label_names: tuple = ()
    extra: dict = dataclasses.field(default_factory=dict)


def _split(x, y, seed, test_fraction, batch_size, stratify=None):
    """A seeded (stratified) split whose training part is a whole number of batches.

    Every batch then has the same shape, so each model compiles (JAX, TensorFlow) one training step, not two.
    """
    from sklearn.model_selection import train_test_split

    train_size = int(len(x) * (1 - test_fraction)) // batch_size * batch_size
    return train_test_split(x, y, train_size=train_size, random_state=seed, stratify=stratify)


def _standardize(x_train, x_test):
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype("float32"), ((x_test - mean) / std).astype("float32")


def iris_sepals(seed, batch_size):
    """Iris: sepal width (cm) from sepal length (cm); the input standardized, the target in cm."""
    from sklearn.datasets import load_iris

    data = load_iris()
    x, y = data.data[:, :1], data.data[:, 1:2]
    x_train, x_test, y_train, y_test = _split(x, y, seed, 0.3, batch_size, stratify=data.target)
    mean, std = float(x_train.mean()), float(x_train.std())
    return Data("iris", ((x_train - mean) / std).astype("float32"), y_train.astype("float32"),
                ((x_test - mean) / std).astype("float32"), y_test.astype("float32"),
                f"scikit-learn iris: sepal width (cm) from sepal length (cm), {len(x_train)} train / "
                f"{len(x_test)} test", extra={"x_mean": mean, "x_std": std})


def breast_cancer(seed, batch_size):
    """Wisconsin breast cancer: malignant (0) vs benign (1) from 30 standardized features."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = _split(data.data, data.target, seed, 0.25, batch_size,
                                              stratify=data.target)
    x_train, x_test = _standardize(x_train, x_test)
    return Data("breast cancer", x_train, y_train[:, None].astype("float32"), x_test,
                y_test[:, None].astype("float32"),
                f"scikit-learn breast cancer (malignant vs benign, 30 features), {len(x_train)} train / "
                f"{len(x_test)} test", ("malignant", "benign"))


def digits(seed, batch_size):
    """The 8x8 digits, 64 standardized pixels, integer labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x_train, images_test, y_train, y_test = _split(data.data, data.target, seed, 0.25, batch_size,
                                                    stratify=data.target)
    x_train, x_test = _standardize(x_train, images_test)
    return Data("digits", x_train, y_train.astype("int32"), x_test, y_test.astype("int32"),
                f"scikit-learn digits (8x8 images, 10 classes), {len(x_train)} train / {len(x_test)} test",
                tuple(str(k) for k in range(10)), {"images_test": images_test})


def digit_attributes(seed, batch_size):
    """The digits with several non-exclusive labels each (:data:`DIGIT_ATTRIBUTES`); some digits have none."""
    base = digits(seed, batch_size)
    table = np.array([[d in members for members in DIGIT_ATTRIBUTES.values()] for d in range(10)], "float32")
    return dataclasses.replace(
        base, name="digit attributes", y_train=table[base.y_train], y_test=table[base.y_test],
        description=base.description.replace("10 classes", "labels: " + ", ".join(DIGIT_ATTRIBUTES)),
        label_names=tuple(DIGIT_ATTRIBUTES), extra={**base.extra, "digit_test": base.y_test})


#: where Keras caches data sets when its home folder is not writable (keras.utils.get_file).
KERAS_FALLBACK_HOME = os.path.join("/tmp", ".keras")


def keras_home():
    """Keras's home folder: ``$KERAS_HOME``, else ``~/.keras`` (data sets are cached in its ``datasets``)."""
    return os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))


def cifar10_location(home=None):
    """Where a cached CIFAR-10 lies: ``("extracted", dir)``, ``("archive", path)`` or ``None``. Never downloads."""
    roots = [os.path.join(home or keras_home(), "datasets"), os.path.join(KERAS_FALLBACK_HOME, "datasets")]
    for root in roots:
        for sub in (os.path.join("cifar-10-batches-py-target", "cifar-10-batches-py"), "cifar-10-batches-py"):
            folder = os.path.join(root, sub)
            if all(os.path.isfile(os.path.join(folder, name))
                   for name in ("data_batch_1", "data_batch_5", "test_batch")):
                return "extracted", folder
    for root in roots:
        archive = os.path.join(root, "cifar-10-batches-py-target_archive")
        if os.path.isfile(archive):
            return "archive", archive
    return None


def _cifar_batch(path):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], "uint8").reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], "int64")


def load_cifar10(home=None):
    """CIFAR-10 as ``(x_train, y_train), (x_test, y_test)`` (uint8 NHWC, int labels), from the local cache only."""
    where = cifar10_location(home)
    if where is None:
        return None
    kind, path = where
    if kind == "archive":  # Keras extracts its own cached archive (no download: the archive is there)
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        return (x_train, y_train.ravel()), (x_test, y_test.ravel())
    parts = [_cifar_batch(os.path.join(path, f"data_batch_{i}")) for i in range(1, 6)]
    x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return (x_train, y_train), _cifar_batch(os.path.join(path, "test_batch"))


def cifar10_tasks(arrays, seed, batch_size, train_size=10000, test_size=2000):
    """(binary bird-vs-airplane Data, 10-class Data) from CIFAR-10 arrays: seeded subsets scaled to [0, 1].

    Each training subset is a whole number of batches (at most ``train_size`` images).
    """
    (x_train, y_train), (x_test, y_test) = arrays
    rng = np.random.default_rng(seed)

    def subset(x, y, size, whole_batches=False):
        size = min(size, len(x))
        if whole_batches:
            size = size // batch_size * batch_size
        keep = np.sort(rng.permutation(len(x))[:size])
        return (x[keep].astype("float32") / 255.0), y[keep]

    pair = [CIFAR_CLASSES.index("airplane"), CIFAR_CLASSES.index("bird")]
    in_train, in_test = np.isin(y_train, pair), np.isin(y_test, pair)
    xb, yb = subset(x_train[in_train], y_train[in_train], train_size, whole_batches=True)
    xbt, ybt = subset(x_test[in_test], y_test[in_test], test_size)
    binary = Data("CIFAR-10 bird vs airplane", xb, (yb == pair[1])[:, None].astype("float32"), xbt,
                  (ybt == pair[1])[:, None].astype("float32"),
                  f"CIFAR-10 bird (1) vs airplane (0), {len(xb)} train / {len(xbt)} test", ("airplane", "bird"))
    xm, ym = subset(x_train, y_train, train_size, whole_batches=True)
    xmt, ymt = subset(x_test, y_test, test_size)
    multiclass = Data("CIFAR-10", xm, ym.astype("int32"), xmt, ymt.astype("int32"),
                      f"CIFAR-10 (10 classes), {len(xm)} train / {len(xmt)} test", CIFAR_CLASSES)
    return binary, multiclass


# ----------------------------------------------------------------------------------------------------------------
# Pairings: an output layer, a loss, and what the output means
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pairing:
    """An output activation paired with a loss; ``output()`` builds the last layer (its weights are set later).

    ``width`` is the number of values the output projection has, the same in every pairing of a task.
    """

    name: str
    stable: bool
    width: int
    output: object  # callable: () -> layer
    loss: object  # callable: () -> keras.losses.Loss
    emits: str  # "logits", "probabilities" or "parameters"
    train_targets: object = None  # callable: y -> the targets the loss is given (default: y)


# Layers are built with zeros and then given NumPy-drawn weights (initial_weights): no backend random op to
# compile (seconds per shape on JAX), and the same start on every backend.
def _head(cls, *args):
    return lambda: cls(*args, kernel_initializer="zeros")


def _dense(width, activation):
    return lambda: keras.layers.Dense(width, activation, kernel_initializer="zeros")


def _normalized(y):
    """Multi-hot rows -> a distribution over the labels (the usual way to feed them to a softmax); empty rows stay 0."""
    total = y.sum(axis=-1, keepdims=True)
    return np.where(total > 0, y / np.maximum(total, 1.0), 0.0).astype("float32")


def binary_pairings():
    return (
        Pairing("BinaryHead + StableBinaryCE", True, 1, _head(BinaryHead), lambda: BinaryHead().loss(), "logits"),
        Pairing("sigmoid + MSE", False, 1, _dense(1, "sigmoid"), keras.losses.MeanSquaredError, "probabilities"),
        Pairing("sigmoid + BinaryCrossentropy", False, 1, _dense(1, "sigmoid"), keras.losses.BinaryCrossentropy,
                "probabilities"),
    )


def multiclass_pairings(num_classes):
    return (
        Pairing("SoftmaxHead + StableSparseSoftmaxCE", True, num_classes, _head(SoftmaxHead, num_classes),
                lambda: SoftmaxHead(num_classes).loss(sparse=True), "logits"),
        Pairing("softmax + SparseCategoricalCrossentropy", False, num_classes, _dense(num_classes, "softmax"),
                keras.losses.SparseCategoricalCrossentropy, "probabilities"),
    )


def multilabel_pairings(num_labels):
    return (
        Pairing("MultilabelHead + StableMultilabelCE", True, num_labels, _head(MultilabelHead, num_labels),
                lambda: MultilabelHead(num_labels).loss(), "logits"),
        Pairing("softmax + CategoricalCrossentropy", False, num_labels, _dense(num_labels, "softmax"),
                keras.losses.CategoricalCrossentropy, "probabilities", _normalized),
    )


def regression_pairings():
    # The heads emit [location, log_scale]: the projection has 2 values, the same for both.
    return (
        Pairing("GaussianHead + GaussianNLL", True, 2, _head(GaussianHead, 1), lambda: GaussianHead(1).loss(full=True),
                "parameters"),
        Pairing("LaplaceHead + LaplaceNLL", True, 2, _head(LaplaceHead, 1), lambda: LaplaceHead(1).loss(full=True),
                "parameters"),
    )


# ----------------------------------------------------------------------------------------------------------------
# Yardsticks: float64 NumPy, the same for every pairing of a task
# ----------------------------------------------------------------------------------------------------------------


def _sigmoid(z):
    z = np.asarray(z, np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def _softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(outputs, emits, kind):
    """A classifier's outputs as float64 probabilities (its link applied when it emits logits)."""
    if emits == "probabilities":
        return np.asarray(outputs, np.float64)
    return _softmax(outputs) if kind == "multiclass" else _sigmoid(outputs)


def _bernoulli_nll(p, y):
    p = np.clip(p, P_CLIP, 1 - P_CLIP)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))


def evaluate_binary(outputs, y, pairing):
    p = probabilities(outputs, pairing.emits, "binary")
    return {"accuracy": float(np.mean((p > 0.5) == (y > 0.5))), "nll": _bernoulli_nll(p, y)}


def evaluate_multiclass(outputs, y, pairing):
    p = probabilities(outputs, pairing.emits, "multiclass")
    picked = np.clip(p[np.arange(len(y)), y], P_CLIP, 1.0)
    return {"accuracy": float(np.mean(p.argmax(-1) == y)), "nll": float(np.mean(-np.log(picked)))}


def evaluate_multilabel(outputs, y, pairing):
    """Exact-match accuracy (every label right, at threshold 0.5), per-label accuracy, per-label Bernoulli NLL."""
    p = probabilities(outputs, pairing.emits, "multilabel")
    hits = (p > 0.5) == (y > 0.5)
    return {"exact match": float(np.mean(hits.all(axis=-1))), "label accuracy": float(np.mean(hits)),
            "nll": _bernoulli_nll(p, y)}


def evaluate_regression(outputs, y, pairing):
    """MAE, RMSE, the spread, and the NLL of the pairing's own distribution (with its constants)."""
    outputs = np.asarray(outputs, np.float64)
    location, log_scale = outputs[:, :1], outputs[:, 1:]
    residual = y - location
    scale = np.exp(log_scale)
    if pairing.name.startswith("Gaussian"):
        nll = 0.5 * (residual / scale) ** 2 + log_scale + 0.5 * math.log(2 * math.pi)
    else:
        nll = np.abs(residual) / scale + log_scale + math.log(2.0)
    return {"MAE": float(np.mean(np.abs(residual))), "RMSE": float(np.sqrt(np.mean(residual**2))),
            "spread": float(np.mean(scale)), "nll": float(np.mean(nll))}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class Progress:
    """One bar per task on stderr: epochs done over epochs planned (a line per run when stderr is not a terminal)."""

    def __init__(self, task, total, stream=None, width=28):
        self.task, self.total, self.done, self.width = task, max(int(total), 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def epoch(self, run_name):
        self.done += 1
        if self.tty:
            self._draw(run_name, end="")

    def run_done(self, run_name):
        if not self.tty:
            self._draw(run_name, end="\n")

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, label, end):
        filled = int(round(self.width * min(self.done, self.total) / self.total))
        bar = "#" * filled + "." * (self.width - filled)
        text = (f"{self.task:<10} [{bar}] {self.done}/{self.total} epochs {time.perf_counter() - self.start:5.1f}s  "
                f"{label}")
        self.stream.write(("\r" + text[:118].ljust(118)) if self.tty else text)
        self.stream.write(end)
        self.stream.flush()


@dataclasses.dataclass
class Run:
    """One pairing trained once: its curves (index 0 = before training), final test outputs and what it took."""

    pairing: Pairing
    init: str
    train_loss: list
    test: list  # one dict of test metrics per epoch, the first before training
    outputs: np.ndarray
    seconds: float
    model: object = None

    @property
    def final(self):
        return self.test[-1]

    def epochs_to(self, metric, target, higher_is_better=True):
        """The first epoch whose test ``metric`` reaches ``target`` (0 = already at the start), else None."""
        for epoch, row in enumerate(self.test):
            if (row[metric] >= target) if higher_is_better else (row[metric] <= target):
                return epoch
        return None


class _Recorder(keras.callbacks.Callback):
    def __init__(self, x_test, evaluate, progress, name):
        super().__init__()
        self.x_test, self.evaluate, self.progress, self.name = x_test, evaluate, progress, name
        self.test, self.train_loss = [], []

    def outputs(self):
        return keras.ops.convert_to_numpy(self.model(self.x_test, training=False))

    def on_epoch_end(self, epoch, logs=None):
        self.train_loss.append(float(logs["loss"]))
        self.test.append(self.evaluate(self.outputs()))
        if self.progress is not None:
            self.progress.epoch(self.name)


def dense_trunk(units, activation="relu"):
    """``x -> Dense(units, activation)`` (weights from :func:`initial_weights`)."""

    def trunk(x):
        return keras.layers.Dense(units, activation, kernel_initializer="zeros")(x)

    return trunk


def conv_trunk():
    """A small CNN for 32x32x3 images (the CIFAR-10 tasks; weights from :func:`initial_weights`)."""

    def trunk(x):
        for filters in (16, 32):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                    kernel_initializer="zeros")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
        return keras.layers.Dense(64, "relu", kernel_initializer="zeros")(x)

    return trunk


def initial_weights(model, init, seed):
    """Set ``model``'s weights: Glorot-uniform kernels and zero biases drawn with NumPy from ``seed``.

    The same seed gives the same start to every pairing of a task (their weights have the same shapes, in the same
    order: the trunk's, then the output projection's) and on every backend. ``"saturated"`` then sets the output
    projection's bias so that the model starts out confidently wrong on part of the data: -:data:`SATURATION` for
    one unit (every example "no"), or +:data:`SATURATION` on class 0 (every example "class 0") — where a sigmoid or
    softmax followed by a probability-space loss has a vanishing (MSE) or exactly zero (clipped cross-entropy)
    gradient.
    """
    rng = np.random.default_rng(seed)
    variables = model.trainable_weights
    values = []
    for variable in variables:
        shape = tuple(variable.shape)
        if len(shape) == 1:
            values.append(np.zeros(shape, "float32"))
            continue
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
        values.append(rng.uniform(-limit, limit, shape).astype("float32"))
    if init == "saturated":
        bias = values[-1]
        if bias.shape == (1,):
            bias[0] = -SATURATION
        else:
            bias[0] = SATURATION
    elif init != "standard":
        raise ValueError(f"`init` must be 'standard' or 'saturated', got {init!r}.")
    for variable, value in zip(variables, values):
        variable.assign(value)


def seed_everything(seed):
    """Seed Python, NumPy and the backend: the batch order of ``fit`` (the initializers carry their own seeds).

    ``keras.utils.set_random_seed`` on TensorFlow, whose ``fit`` shuffles with TensorFlow's generator; elsewhere
    ``fit`` shuffles with NumPy's, and calling it would import TensorFlow for nothing (seconds).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    if backend == "torch":
        import torch

        torch.manual_seed(seed)


def train(pairing, data, *, trunk, init, evaluate, epochs, seed, batch_size, learning_rate, progress=None,
          keep_model=False):
    """Train ``pairing`` on ``data`` (seeded; the same everything but the output activation and the loss)."""
    start = time.perf_counter()
    seed_everything(seed)
    inputs = keras.Input(data.x_train.shape[1:])
    features = trunk(inputs)
    model = keras.Model(inputs, pairing.output()(features))
    initial_weights(model, init, seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=pairing.loss())
    recorder = _Recorder(data.x_test, lambda out: evaluate(out, data.y_test, pairing), progress, pairing.name)
    recorder.set_model(model)
    recorder.test.append(evaluate(recorder.outputs(), data.y_test, pairing))
    targets = pairing.train_targets(data.y_train) if pairing.train_targets else data.y_train
    if epochs > 0:
        model.fit(data.x_train, targets, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                  callbacks=[recorder])
    if progress is not None:
        progress.run_done(f"{pairing.name} ({init} start) done")
    return Run(pairing, init, recorder.train_loss, recorder.test, recorder.outputs(), time.perf_counter() - start,
               model if keep_model else None)


# ----------------------------------------------------------------------------------------------------------------
# The saturation curves
# ----------------------------------------------------------------------------------------------------------------


def saturation_curves(z):
    """Loss and d loss / d z at label 1 for each logit in ``z``, through the backend's own autodiff.

    The probability-space losses are Keras's, given probabilities (on TensorFlow a tensor straight out of a sigmoid
    carries its logits, which Keras's cross-entropy then uses instead; ``0 + p`` is a plain probability tensor, as
    on JAX and PyTorch, and as on TensorFlow whenever the probabilities come from anywhere but a sigmoid op).
    """
    from keras import ops as kops

    from . import _backend
    from . import ops

    z = np.asarray(z, "float32").reshape(-1, 1)
    y = np.ones_like(z)

    def probability(t):
        return kops.add(kops.sigmoid(t), 0.0)

    functions = {
        "sigmoid + StableBinaryCE (from logits)": lambda t: ops.sigmoid_binary_cross_entropy(t, y),
        "sigmoid + MSE": lambda t: keras.losses.mean_squared_error(y, probability(t)),
        "sigmoid + BinaryCrossentropy (probabilities, clipped at 1e-7)":
            lambda t: keras.losses.binary_crossentropy(y, probability(t)),
    }
    curves = {}
    for name, function in functions.items():
        loss = np.asarray(keras.ops.convert_to_numpy(function(keras.ops.convert_to_tensor(z))), np.float64)
        _, grad = _backend.value_and_grad(lambda t, f=function: kops.sum(f(t)), z)
        curves[name] = (loss.reshape(-1), np.asarray(grad, np.float64).reshape(-1))
    return curves

"""Model-level tests on the current backend: every loss trains, matches Keras where Keras is exact, compiles,
and works under mixed precision."""

import keras
import numpy as np
import pytest

import keras_stable_heads as ksh

BACKEND = keras.backend.backend()


def _data(kind, rows=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    w = rng.normal(size=(6, 4))
    scores = x @ w
    if kind == "sparse":
        return x, np.argmax(scores, -1).astype("int32"), 4
    if kind == "onehot":
        return x, np.eye(4, dtype="float32")[np.argmax(scores, -1)], 4
    if kind == "binary":
        return x, (scores[:, :1] > 0).astype("float32"), 1
    if kind == "multilabel":
        return x, (scores > 0).astype("float32"), 4
    return x, (scores[:, :1] + 0.3 * rng.normal(size=(rows, 1))).astype("float32"), 2  # regression: [loc, log_scale]


TRAINING = [
    (ksh.StableBinaryCE(pos_weight=2.0), "binary"),
    (ksh.StableSoftmaxCE(label_smoothing=0.1, z_loss=1e-4), "onehot"),
    (ksh.StableSparseSoftmaxCE(class_weight=[1.0, 2.0, 1.0, 0.5], logit_softcap=20.0), "sparse"),
    (ksh.StableMultilabelCE(pos_weight=[1.0, 2.0, 1.0, 1.0]), "multilabel"),
    (ksh.StableBinaryFocalCE(gamma=2.0, alpha=0.25), "binary"),
    (ksh.StableSoftmaxFocalCE(gamma=2.0), "onehot"),
    (ksh.GaussianNLL(), "regression"),
    (ksh.LaplaceNLL(), "regression"),
]


def _model(units, seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh", dtype=dtype),
                             keras.layers.Dense(units, dtype=dtype)])


@pytest.mark.parametrize("loss,kind", TRAINING, ids=lambda v: getattr(v, "name", None))
def test_every_loss_trains(loss, kind):
    x, y, units = _data(kind)
    model = _model(units)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=loss)
    history = model.fit(x, y, epochs=6, batch_size=64, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.parametrize("loss,kind", TRAINING, ids=lambda v: getattr(v, "name", None))
def test_torch_builds_the_compiled_loss_on_the_meta_device(loss, kind, monkeypatch):
    """On PyTorch, Keras builds a compiled loss by tracing it on the meta device before the first step; a loss that
    fails there is run once more on real tensors of ones the size of ``y_pred`` (a language model's whole logits:
    gigabytes). Every loss traces on meta: the only call on real data is the step's own."""
    if BACKEND != "torch":
        pytest.skip("the meta-device trace is PyTorch's")
    devices = []
    original = loss.call
    monkeypatch.setattr(loss, "call", lambda y_true, y_pred: devices.append(y_pred.device.type) or original(y_true,
                                                                                                              y_pred))
    x, y, units = _data(kind)
    model = _model(units)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    value = model.train_on_batch(x[:32], y[:32])
    assert devices == ["meta", "cpu"]
    assert np.isfinite(value)


@pytest.mark.parametrize("ours,builtin,kind", [
    (ksh.StableSparseSoftmaxCE(), keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse"),
    (ksh.StableSoftmaxCE(label_smoothing=0.1), keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
     "onehot"),
    (ksh.StableBinaryCE(), keras.losses.BinaryCrossentropy(from_logits=True), "binary"),
], ids=["sparse", "onehot", "binary"])
def test_training_matches_keras_where_keras_is_exact(ours, builtin, kind):
    x, y, units = _data(kind)
    histories = []
    for loss in (ours, builtin):
        model = _model(units, seed=3)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        histories.append(model.fit(x, y, epochs=4, batch_size=50, verbose=0, shuffle=False).history["loss"])
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-4)


def test_compiled_step_with_unknown_batch_size():
    """jit_compile=True (XLA on TensorFlow and JAX, torch.compile on PyTorch) with a ragged last batch."""
    x, y, units = _data("sparse", rows=150)
    y = np.where(np.arange(150) % 7 == 0, -1, y)
    model = _model(units)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=ksh.StableSparseSoftmaxCE(ignore_class=-1, z_loss=1e-4),
                  jit_compile=True)
    history = model.fit(x, y, epochs=3, batch_size=64, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    reference = _model(units)
    reference.set_weights(model.get_weights())
    reference.compile(loss=ksh.StableSparseSoftmaxCE(ignore_class=-1, z_loss=1e-4), jit_compile=False)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0), rtol=1e-5)


def test_torch_compile_traces_the_losses_without_warnings_about_this_package(monkeypatch):
    """torch.compile (``jit_compile=True`` on PyTorch) warns of "silent incorrectness" at every
    ``functools.lru_cache``-wrapped function it traces, once per process: nothing of this package may be one."""
    if BACKEND != "torch":
        pytest.skip("torch.compile is the PyTorch backend's")
    import warnings

    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # warned before in this process: again
    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(8, 5)).astype("float32"), requires_grad=True)
    y = torch.tensor(rng.integers(0, 5, 8).astype("int32"))
    onehot = torch.nn.functional.one_hot(y.long(), 5).float()

    def losses(t):
        return (ksh.ops.softmax_cross_entropy_with_integer_labels(t, y, z_loss=1e-3).sum()
                + ksh.ops.softmax_cross_entropy(t, onehot).sum() + ksh.ops.sigmoid_binary_cross_entropy(t, onehot).sum())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = torch.compile(losses)(z)
        value.backward()
    ours = [str(w.message)[:200] for w in caught if "keras_stable_heads" in f"{w.filename} {w.message}"]
    assert ours == []
    np.testing.assert_allclose(value.detach().item(),
                               losses(z.detach()).item(), rtol=1e-6)
    assert torch.isfinite(z.grad).all()


def test_jax_jit_of_the_op():
    if BACKEND != "jax":
        pytest.skip("jax.jit is the JAX backend's")
    import jax

    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 5)).astype("float32")
    y = rng.integers(0, 5, 8)
    f = jax.jit(jax.value_and_grad(lambda t: ksh.ops.softmax_cross_entropy_with_integer_labels(t, y, z_loss=1e-3).sum()))
    value, grad = f(z)
    np.testing.assert_allclose(float(value), float(ksh.ops.softmax_cross_entropy_with_integer_labels(z, y, z_loss=1e-3).sum()),
                               rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_matches_float32(policy):
    x, y, units = _data("sparse")
    histories = []
    for name in ("float32", policy):
        keras.config.set_dtype_policy(name)
        try:
            model = _model(units, seed=5)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=ksh.StableSparseSoftmaxCE(label_smoothing=0.05))
            assert model.layers[-1].compute_dtype == ("float32" if name == "float32" else name.split("_")[-1])
            histories.append(model.fit(x, y, epochs=3, batch_size=50, verbose=0, shuffle=False).history["loss"])
        finally:
            keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(histories[1]))
    np.testing.assert_allclose(histories[1], histories[0], rtol=3e-2)
    assert histories[1][-1] < histories[1][0]

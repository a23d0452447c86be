"""keras_stable_heads.tf_keras: every loss as a Keras 2 (tf_keras) Loss -- values equal to the Keras 3 classes,
tf_keras's reductions, sample weights and masks, config and registry, and compile / fit / evaluate / save / load in
each tf_keras format. TensorFlow backend only (the module refuses to import under another)."""

import importlib

import keras
import numpy as np
import pytest
import reference as ref
from conftest import to_numpy

import keras_stable_heads as ksh

BACKEND = keras.backend.backend()

# Options different from the defaults, per class name (widths: 3 classes / labels, or 2 for [location, log_scale]).
NON_DEFAULT = {
    "StableBinaryCE": dict(pos_weight=2.5, label_smoothing=0.1),
    "StableSoftmaxCE": dict(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5], z_loss=1e-3, logit_softcap=30.0),
    "StableSparseSoftmaxCE": dict(ignore_class=-1, label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5], z_loss=1e-3),
    "StableMultilabelCE": dict(pos_weight=[1.0, 2.0, 3.0], label_smoothing=0.05, missing_label=-1.0),
    "StableBinaryFocalCE": dict(gamma=1.5, alpha=0.25, label_smoothing=0.1),
    "StableSoftmaxFocalCE": dict(gamma=1.5, alpha=0.5, label_smoothing=0.1),
    "GaussianNLL": dict(full=True),
    "LaplaceNLL": dict(full=True),
}
NAMES = list(NON_DEFAULT)


@pytest.fixture(scope="module")
def tfk():
    if BACKEND != "tensorflow":
        pytest.skip("keras_stable_heads.tf_keras needs KERAS_BACKEND=tensorflow")
    import tf_keras

    import keras_stable_heads.tf_keras as module

    return tf_keras, module


def _batch(name, rng, rows=8):
    """Predictions and matching targets; the masked losses get some dropped entries (and one all-missing row)."""
    if name in ("GaussianNLL", "LaplaceNLL"):
        return rng.normal(size=(rows, 2)).astype("float32"), rng.normal(size=(rows, 1)).astype("float32")
    z = rng.normal(0, 2, (rows, 3)).astype("float32")
    if name == "StableSparseSoftmaxCE":
        y = rng.integers(0, 3, rows)
        y[[1, 4, 5]] = -1
        return z, y
    if name in ("StableSoftmaxCE", "StableSoftmaxFocalCE"):
        return z, np.eye(3, dtype="float32")[rng.integers(0, 3, rows)]
    y = rng.integers(0, 2, (rows, 3)).astype("float32")
    if name == "StableMultilabelCE":
        y[rng.random(y.shape) < 0.3] = -1.0
        y[2] = -1.0
    return z, y


def test_import_needs_the_tensorflow_backend():
    if BACKEND == "tensorflow":
        pytest.skip("checks the error raised under the other backends")
    with pytest.raises(ImportError, match="KERAS_BACKEND=tensorflow"):
        importlib.import_module("keras_stable_heads.tf_keras")


def test_every_public_loss_has_a_registered_tf_keras_twin(tfk):
    tf_keras, module = tfk
    public = sorted(name for name in ksh.__all__
                    if isinstance(getattr(ksh, name), type) and issubclass(getattr(ksh, name), keras.losses.Loss))
    assert public == sorted(module.__all__) == sorted(NAMES)
    for name in public:
        cls = getattr(module, name)
        assert issubclass(cls, tf_keras.losses.Loss) and not issubclass(cls, keras.losses.Loss)
        assert cls._options == getattr(ksh, name)._options
        assert tf_keras.saving.get_registered_name(cls) == f"keras_stable_heads>{name}"
        assert tf_keras.saving.get_registered_object(f"keras_stable_heads>{name}") is cls


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(tfk, name):
    tf_keras, module = tfk
    cls = getattr(module, name)
    loss = cls(**NON_DEFAULT[name], reduction="sum", name="custom")
    config = loss.get_config()
    assert config["reduction"] == "sum" and config["name"] == "custom"
    for key, value in NON_DEFAULT[name].items():
        assert config[key] == value
    assert set(config) == {"reduction", "name", *cls._options}
    assert cls.from_config(config).get_config() == config
    restored = tf_keras.losses.deserialize(tf_keras.losses.serialize(loss))
    assert type(restored) is cls and restored.get_config() == config
    assert cls().reduction == "auto"


def test_options_are_validated_by_the_keras3_constructor(tfk):
    _, module = tfk
    with pytest.raises(ValueError, match="label_smoothing"):
        module.StableSoftmaxCE(label_smoothing=1.5)
    with pytest.raises(TypeError, match="class_weight"):
        module.StableSparseSoftmaxCE(class_weight=2.0)
    with pytest.raises(TypeError):
        module.StableBinaryCE(from_logits=True)  # no such option: logits are the only input
    with pytest.raises(ValueError):
        module.StableBinaryCE(reduction="mean")  # tf_keras's reductions: auto, none, sum, sum_over_batch_size
    assert module.StableBinaryCE(2.0, 0.1).get_config()["pos_weight"] == 2.0  # positional, in Keras 3's order


@pytest.mark.parametrize("reduction", ["auto", "sum_over_batch_size", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_values_equal_the_keras3_class(tfk, name, reduction):
    """With a sample_weight; 'auto'/'sum_over_batch_size' is Keras 3's 'sum_over_batch_size' (mean over kept)."""
    _, module = tfk
    rng = np.random.default_rng(NAMES.index(name))
    z, y = _batch(name, rng)
    w = rng.uniform(0.2, 2.0, len(z)).astype("float32")
    got = to_numpy(getattr(module, name)(**NON_DEFAULT[name], reduction=reduction)(y, z, sample_weight=w))
    keras3_reduction = "sum_over_batch_size" if reduction == "auto" else reduction
    want = to_numpy(getattr(ksh, name)(**NON_DEFAULT[name], reduction=keras3_reduction)(y, z, sample_weight=w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(got)) and (reduction == "none") == (got.ndim == 1)


def test_ignore_class_and_missing_label_average_over_kept_entries(tfk):
    _, module = tfk
    rng = np.random.default_rng(7)
    z = rng.normal(size=(6, 4)).astype("float32")
    y = np.array([0, -1, 3, -1, 2, 1])
    w = rng.uniform(0.5, 2.0, 6).astype("float32")
    loss = module.StableSparseSoftmaxCE(ignore_class=-1)
    per_example = ref.sparse_softmax_ce(z, y, ignore_class=-1)
    np.testing.assert_allclose(to_numpy(loss(y, z)), per_example.sum() / 4, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(loss(y, z, sample_weight=w)), (per_example * w).sum() / 4, rtol=1e-6)
    assert to_numpy(loss(np.full(6, -1), z)) == 0.0  # every entry ignored: 0, not NaN
    np.testing.assert_allclose(to_numpy(module.StableSparseSoftmaxCE(ignore_class=-1, reduction="sum")(y, z)),
                               per_example.sum(), rtol=1e-6)

    zm = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 2.0]], "float32")
    ym = np.array([[1.0, 0.0], [-1.0, -1.0], [0.0, -1.0]], "float32")
    got = to_numpy(module.StableMultilabelCE(missing_label=-1)(ym, zm))
    np.testing.assert_allclose(got, ref.multilabel_ce(zm, ym, missing_label=-1)[[0, 2]].mean(), rtol=1e-6)


def test_keras_mask_on_predictions_combines_with_ignore_class(tfk):
    """A tf_keras mask on y_pred (Masking, Embedding(mask_zero=True)) and ignore_class both drop steps."""
    import tensorflow as tf

    _, module = tfk
    rng = np.random.default_rng(8)
    z = tf.constant(rng.normal(size=(2, 4, 3)).astype("float32"))
    y = np.array([[0, 2, -1, 1], [1, -1, 0, 2]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    z._keras_mask = tf.constant(mask)
    got = to_numpy(module.StableSparseSoftmaxCE(ignore_class=-1)(y, z))
    kept = mask & (y != -1)
    np.testing.assert_allclose(got, ref.sparse_softmax_ce(to_numpy(z), y, ignore_class=-1)[kept].mean(), rtol=1e-6)


def test_low_precision_predictions_give_a_float32_loss(tfk):
    _, module = tfk
    z = np.array([[1000.0, 1000.0], [0.0, 3.0]], "float16")
    loss = module.StableSparseSoftmaxCE(reduction="none")(np.array([0, 1]), z)
    assert loss.dtype == "float32"
    np.testing.assert_allclose(to_numpy(loss), ref.sparse_softmax_ce(z.astype("float64"), [0, 1]), rtol=1e-6)


def _multi_output_model(tf_keras):
    """One head per loss on a shared trunk; heads and targets as in _batch (3 units, or 2 for the NLLs)."""
    inputs = tf_keras.Input((5,))
    hidden = tf_keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = {name: tf_keras.layers.Dense(2 if name in ("GaussianNLL", "LaplaceNLL") else 3, name=name)(hidden)
               for name in NAMES}
    return tf_keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def trained(tfk):
    """A tf_keras model with every loss, compiled and fitted: (model, x, targets, sample weights, history)."""
    tf_keras, module = tfk
    rng = np.random.default_rng(9)
    x = rng.normal(size=(64, 5)).astype("float32")
    targets = {name: _batch(name, rng, rows=64)[1] for name in NAMES}
    weights = {name: rng.uniform(0.5, 1.5, 64).astype("float32") for name in NAMES}
    tf_keras.utils.set_random_seed(0)
    model = _multi_output_model(tf_keras)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.02),
                  loss={name: getattr(module, name)(**NON_DEFAULT[name]) for name in NAMES})
    history = model.fit(x, targets, sample_weight=weights, epochs=4, batch_size=16, shuffle=False, verbose=0).history
    return model, x, targets, weights, history


def _keras3_losses(x_targets_weights, predictions):
    x, targets, weights = x_targets_weights
    return {name: float(to_numpy(getattr(ksh, name)(**NON_DEFAULT[name])(targets[name], predictions[name],
                                                                          sample_weight=weights[name])))
            for name in NAMES}


def test_fit_trains_every_loss_and_evaluate_equals_the_keras3_losses(trained):
    model, x, targets, weights, history = trained
    for name in NAMES:
        assert np.all(np.isfinite(history[f"{name}_loss"])) and history[f"{name}_loss"][-1] < history[f"{name}_loss"][0]
    evaluated = model.evaluate(x, targets, sample_weight=weights, batch_size=64, verbose=0, return_dict=True)
    want = _keras3_losses((x, targets, weights), model.predict(x, batch_size=64, verbose=0))
    for name in NAMES:
        np.testing.assert_allclose(evaluated[f"{name}_loss"], want[name], rtol=1e-5)


@pytest.mark.parametrize("path", ["model.keras", "model.h5"])
def test_save_and_load_without_custom_objects(tfk, trained, tmp_path, path):
    """tf_keras's native format and its legacy HDF5: the losses come back as the same classes and configs."""
    tf_keras, module = tfk
    model, x, targets, weights, _ = trained
    model.save(str(tmp_path / path))
    loaded = tf_keras.models.load_model(str(tmp_path / path))
    predictions = loaded.predict(x, batch_size=64, verbose=0)
    want = _keras3_losses((x, targets, weights), predictions)
    for name in NAMES:
        original, restored = model.loss[name], loaded.loss[name]
        assert type(restored) is getattr(module, name) and restored.get_config() == original.get_config()
        got = restored(targets[name], predictions[name], sample_weight=weights[name])
        np.testing.assert_allclose(to_numpy(got), want[name], rtol=1e-6)
    original_predictions = model.predict(x, batch_size=64, verbose=0)
    for name in NAMES:
        np.testing.assert_allclose(predictions[name], original_predictions[name], rtol=1e-6)


def test_xla_compiled_fit(tfk):
    """jit_compile=True: the fused ops compile under XLA in tf_keras too, and evaluate equals the Keras 3 class."""
    tf_keras, module = tfk
    rng = np.random.default_rng(10)
    x = rng.normal(size=(48, 5)).astype("float32")
    y = np.argmax(x[:, :3], -1)
    y[::6] = -1
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(5,))])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.5), jit_compile=True,
                  loss=module.StableSparseSoftmaxCE(ignore_class=-1, z_loss=1e-3))
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    z = model.predict(x, batch_size=48, verbose=0)
    want = to_numpy(ksh.StableSparseSoftmaxCE(ignore_class=-1, z_loss=1e-3)(y, z))
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=48, verbose=0), want, rtol=1e-5)

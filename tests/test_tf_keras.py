"""keras_stable_heads.tf_keras: every loss as a Keras 2 (tf_keras) Loss -- values equal to the Keras 3 classes,
tf_keras's reductions, sample weights and masks, config and registry, and compile / fit / evaluate / save / load in
each tf_keras format; every head as a tf_keras layer -- outputs equal to the Keras 3 heads on the same weights,
links equal to a float64 reference, config and registry, training with its loss, save / load, inference_model.
TensorFlow backend only (the module refuses to import under another)."""

import importlib
import warnings

import keras
import numpy as np
import pytest
from keras_stable_heads import reference as ref
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


def _public_classes(module, base):
    """The sorted names in ``module.__all__`` of the subclasses of ``base``."""
    return sorted(name for name in module.__all__
                  if isinstance(getattr(module, name), type) and issubclass(getattr(module, name), base))


def test_every_public_loss_has_a_registered_tf_keras_twin(tfk):
    tf_keras, module = tfk
    public = [name for name in _public_classes(ksh, keras.losses.Loss) if name not in module.KERAS3_ONLY]
    assert public == _public_classes(module, tf_keras.losses.Loss) == sorted(NAMES)
    for name in public:
        cls = getattr(module, name)
        assert issubclass(cls, tf_keras.losses.Loss) and not issubclass(cls, keras.losses.Loss)
        assert cls._options == getattr(ksh, name)._options
        assert tf_keras.saving.get_registered_name(cls) == f"keras_stable_heads>{name}"
        assert tf_keras.saving.get_registered_object(f"keras_stable_heads>{name}") is cls


@pytest.mark.parametrize("name", ["FusedSoftmaxHead", "FusedSparseSoftmaxCE", "FusedTokenAccuracy"])
def test_keras3_only_objects_say_so(tfk, name):
    _, module = tfk
    assert name in module.KERAS3_ONLY and hasattr(ksh, name)  # the Keras 3 object exists
    with pytest.raises(AttributeError, match="needs Keras 3"):
        getattr(module, name)


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


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------

# Per head: constructor arguments (not all defaults), the options of head.loss(), and targets learnable from x.
HEADS = {
    "BinaryHead": (dict(kernel_initializer="he_normal"), dict(label_smoothing=0.05),
                   lambda x: (x[:, :1] > 0).astype("float32")),
    "SoftmaxHead": (dict(num_classes=3), dict(sparse=True, z_loss=1e-3), lambda x: np.argmax(x[:, :3], -1)),
    "MultilabelHead": (dict(num_labels=3, use_bias=False), dict(), lambda x: (x[:, 1:4] > 0).astype("float32")),
    "GaussianHead": (dict(units=2, log_scale_floor=-3.0), dict(), lambda x: (2.0 * x[:, :2]).astype("float32")),
    "LaplaceHead": (dict(units=2), dict(full=True), lambda x: (x[:, 2:4] - x[:, :2]).astype("float32")),
}
HEAD_NAMES = list(HEADS)
# Per head: the layer name in the test models, and the float64 NumPy link of what it emits.
LAYER = {name: name.lower().replace("head", "") for name in HEAD_NAMES}


def _location_scale(z):
    d = z.shape[-1] // 2
    return np.concatenate([z[..., :d], np.exp(z[..., d:])], -1)


LINK_REFERENCE = {
    "BinaryHead": lambda z: np.exp(ref.log_sigmoid(z)),
    "SoftmaxHead": lambda z: np.exp(ref.log_softmax(z)[0]),
    "MultilabelHead": lambda z: np.exp(ref.log_sigmoid(z)),
    "GaussianHead": _location_scale,
    "LaplaceHead": _location_scale,
}


def test_every_public_head_has_a_registered_tf_keras_twin(tfk):
    tf_keras, module = tfk
    public = _public_classes(ksh.heads, keras.layers.Layer)
    assert public == _public_classes(module, tf_keras.layers.Layer) == sorted([*HEAD_NAMES, "Link"])
    for name in public:
        cls = getattr(module, name)
        assert not issubclass(cls, keras.layers.Layer)
        assert tf_keras.saving.get_registered_name(cls) == f"keras_stable_heads>{name}"
        assert tf_keras.saving.get_registered_object(f"keras_stable_heads>{name}") is cls
    for name in HEAD_NAMES:
        twin, keras3 = getattr(module, name), getattr(ksh, name)
        assert twin.link_name == keras3.link_name
        # The same losses, as tf_keras twins.
        assert [c.__name__ for c in twin.loss_classes] == [c.__name__ for c in keras3.loss_classes]
        assert all(c is getattr(module, c.__name__) for c in twin.loss_classes)
        args, loss_options, _ = HEADS[name]
        keras3_loss = keras3(**args).loss(**loss_options)
        assert type(twin(**args).loss(**loss_options)) is getattr(module, type(keras3_loss).__name__)
    assert "inference_model" in module.__all__


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_config_round_trip(tfk, name):
    """get_config / from_config and tf_keras's (de)serialization, with the Keras 3 head's own keys and values."""
    tf_keras, module = tfk
    args = HEADS[name][0]
    head = getattr(module, name)(**args, name="custom")
    head.build((None, 5))
    config = head.get_config()
    assert config["name"] == "custom" and config["use_projection"] is True
    keras3_config = getattr(ksh, name)(**args).get_config()
    assert set(config) >= set(keras3_config) - {"dtype"}  # the same options ...
    for key in ("use_projection", "use_bias", "num_classes", "num_labels", "units", "log_scale_floor"):
        assert config.get(key) == keras3_config.get(key)  # ... with the same values
    clone = type(head).from_config(config)
    assert clone.get_config() == config
    restored = tf_keras.layers.deserialize(tf_keras.layers.serialize(head))  # no custom_objects
    assert type(restored) is type(head) and restored.get_config() == config
    bare = getattr(module, name)(**args, use_projection=False)
    assert bare.get_config()["use_projection"] is False
    assert type(bare).from_config(bare.get_config()).width == head.width


def _heads_model(tf_keras, module):
    """The five heads on one tanh trunk, outputs named as LAYER; the heads by class name.

    The binary head ("binary_logits") is behind a Dropout, which inference_model looks past."""
    inputs = tf_keras.Input((5,), name="x")
    hidden = tf_keras.layers.Dense(8, activation="tanh", name="trunk")(inputs)
    heads = {name: getattr(module, name)(**HEADS[name][0], name=LAYER[name]) for name in HEAD_NAMES}
    heads["BinaryHead"] = module.BinaryHead(**HEADS["BinaryHead"][0], name="binary_logits")
    outputs = {LAYER[name]: heads[name](hidden) for name in HEAD_NAMES}
    outputs["binary"] = tf_keras.layers.Dropout(0.1, name="binary")(outputs["binary"])
    return tf_keras.Model(inputs, outputs), heads


@pytest.fixture(scope="module")
def trained_heads(tfk):
    """A tf_keras model with every head, compiled with head.loss() and fitted: (model, heads, x, targets, history)."""
    tf_keras, module = tfk
    rng = np.random.default_rng(11)
    x = rng.normal(size=(64, 5)).astype("float32")
    targets = {LAYER[name]: HEADS[name][2](x) for name in HEAD_NAMES}
    tf_keras.utils.set_random_seed(0)
    model, heads = _heads_model(tf_keras, module)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.02),
                  loss={LAYER[name]: heads[name].loss(**HEADS[name][1]) for name in HEAD_NAMES})
    history = model.fit(x, targets, epochs=5, batch_size=16, shuffle=False, verbose=0).history
    return model, heads, x, targets, history


def test_heads_train_with_their_stable_losses_and_evaluate_equals_keras3(trained_heads):
    model, heads, x, targets, history = trained_heads
    raw = model.predict(x, batch_size=64, verbose=0)
    evaluated = model.evaluate(x, targets, batch_size=64, verbose=0, return_dict=True)
    for name in HEAD_NAMES:
        losses = history[f"{LAYER[name]}_loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], (name, losses)
        keras3_loss = getattr(ksh, name)(**HEADS[name][0]).loss(**HEADS[name][1])
        want = to_numpy(keras3_loss(targets[LAYER[name]], raw[LAYER[name]]))
        np.testing.assert_allclose(evaluated[f"{LAYER[name]}_loss"], want, rtol=1e-5)


def test_head_outputs_equal_the_keras3_heads_on_the_same_weights(tfk, trained_heads):
    tf_keras, _ = tfk
    model, heads, x, _, _ = trained_heads
    hidden = tf_keras.Model(model.input, model.get_layer("trunk").output).predict(x, batch_size=64, verbose=0)
    raw = model.predict(x, batch_size=64, verbose=0)
    for name in HEAD_NAMES:
        keras3_head = getattr(ksh, name)(**HEADS[name][0])
        keras3_head.build((None, 8))
        keras3_head.set_weights(heads[name].get_weights())
        assert len(heads[name].get_weights()) == (1 if name == "MultilabelHead" else 2)  # use_bias=False: no bias
        np.testing.assert_allclose(raw[LAYER[name]], to_numpy(keras3_head(hidden)), rtol=1e-6, atol=1e-6)
        assert raw[LAYER[name]].dtype == np.float32


def test_links_and_inference_model_equal_a_float64_reference(tfk, trained_heads):
    tf_keras, module = tfk
    model, heads, x, _, _ = trained_heads
    raw = model.predict(x, batch_size=64, verbose=0)
    served = module.inference_model(model)
    assert isinstance(served, tf_keras.Model) and served.name == f"{model.name}_inference"
    linked = served.predict(x, batch_size=64, verbose=0)
    for name in HEAD_NAMES:
        z = raw[LAYER[name]]
        want = LINK_REFERENCE[name](z.astype(np.float64))
        np.testing.assert_allclose(linked[LAYER[name]], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(heads[name].link(z)), want, rtol=1e-5, atol=1e-7)
        assert isinstance(served.get_layer(f"{heads[name].name}_{heads[name].link_name}"), module.Link)
    np.testing.assert_allclose(linked["softmax"].sum(-1), 1.0, rtol=1e-5)
    # The layers are shared: the inference model reads the training model's weights.
    assert served.get_layer("softmax") is heads["SoftmaxHead"]
    # A head inside a nested model is found too.
    inner = tf_keras.Model(model.input, heads["SoftmaxHead"].output)
    outer_input = tf_keras.Input((5,))
    nested = module.inference_model(tf_keras.Model(outer_input, inner(outer_input)))
    np.testing.assert_allclose(nested.predict(x, batch_size=64, verbose=0), linked["softmax"], rtol=1e-6)


@pytest.mark.parametrize("path", ["heads.keras", "heads.h5", "heads_savedmodel"])
def test_heads_save_and_load_without_custom_objects(tfk, trained_heads, tmp_path, path):
    """tf_keras's native format, its legacy HDF5 and a SavedModel: the same head classes, configs and outputs."""
    tf_keras, module = tfk
    model, heads, x, targets, _ = trained_heads
    model.save(str(tmp_path / path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = tf_keras.models.load_model(str(tmp_path / path))
    # Built once: a second build would draw the projection's initializer again (tf_keras warns about that).
    assert not [w for w in caught if "initializer" in str(w.message).lower()]
    original, restored = model.predict(x, batch_size=64, verbose=0), loaded.predict(x, batch_size=64, verbose=0)
    for name in HEAD_NAMES:
        layer = loaded.get_layer(heads[name].name)
        assert type(layer) is getattr(module, name) and layer.get_config() == heads[name].get_config()
        np.testing.assert_array_equal(restored[LAYER[name]], original[LAYER[name]])
        assert [w.name for w in layer.weights] == [w.name for w in heads[name].weights]
        assert type(loaded.loss[LAYER[name]]) is type(model.loss[LAYER[name]])
    linked = module.inference_model(loaded).predict(x, batch_size=64, verbose=0)
    np.testing.assert_allclose(linked["gaussian"], LINK_REFERENCE["GaussianHead"](original["gaussian"].astype(float)),
                               rtol=1e-5, atol=1e-7)


def test_log_scale_floor_and_pass_through_equal_the_reference(tfk):
    """use_projection=False: logits pass through unrounded; the smooth floor is floor + softplus(raw - floor)."""
    _, module = tfk
    raw = np.array([[0.0, -100.0], [1.5, -3.0], [-2.0, 0.5], [1e4, 50.0]], "float32")
    for name in ("GaussianHead", "LaplaceHead"):
        out = to_numpy(getattr(module, name)(1, log_scale_floor=-3.0, use_projection=False)(raw))
        floor = -3.0 + np.logaddexp(0.0, raw[:, 1].astype(np.float64) + 3.0)
        np.testing.assert_array_equal(out[:, 0], raw[:, 0])
        np.testing.assert_allclose(out[:, 1], floor, rtol=1e-6)
        keras3 = to_numpy(getattr(ksh, name)(1, log_scale_floor=-3.0, use_projection=False)(raw))
        np.testing.assert_array_equal(out, keras3)
    z = np.array([[1e4, 1.0 + 1e-6, -3.0]], "float32")
    np.testing.assert_array_equal(to_numpy(module.SoftmaxHead(3, use_projection=False)(z)), z)
    np.testing.assert_allclose(to_numpy(module.Link("softmax")(z)), LINK_REFERENCE["SoftmaxHead"](z), atol=1e-7)


def test_sequential_head_under_mixed_precision_trains_in_float32(tfk):
    """A Sequential model under mixed_float16: the projection computes in float16, the head emits float32."""
    tf_keras, module = tfk
    rng = np.random.default_rng(12)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    tf_keras.utils.set_random_seed(0)
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = module.BinaryHead()
        model = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu", input_shape=(5,)), head])
        model.compile(optimizer=tf_keras.optimizers.SGD(0.2), loss=head.loss())
        assert head.projection.compute_dtype == "float16" and model.output.dtype == "float32"
        history = model.fit(x, y, epochs=4, batch_size=8, shuffle=False, verbose=0).history["loss"]
        raw = model.predict(x, verbose=0)
        probabilities = module.inference_model(model).predict(x, verbose=0)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history)) and history[-1] < history[0], history
    assert raw.dtype == np.float32
    np.testing.assert_allclose(probabilities, np.exp(ref.log_sigmoid(raw.astype(np.float64))), rtol=1e-5, atol=1e-7)


def test_invalid_head_arguments_raise(tfk):
    tf_keras, module = tfk
    with pytest.raises(ValueError, match="num_classes >= 2"):
        module.SoftmaxHead(1)
    with pytest.raises(ValueError, match="at least one output unit"):
        module.MultilabelHead(0)
    with pytest.raises(ValueError, match="`link` must be one of"):
        module.Link("tanh")
    with pytest.raises(ValueError, match="has no weights"):
        module.BinaryHead(use_projection=False, kernel_regularizer="l2")
    with pytest.raises(ValueError, match="last axis must have 3 values"):
        module.SoftmaxHead(3, use_projection=False)(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="No output of model"):
        module.inference_model(tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))]))
    with pytest.raises(ValueError, match="not built"):
        module.inference_model(tf_keras.Sequential([module.BinaryHead()]))
    with pytest.raises(TypeError, match="Expected a tf_keras.Model"):
        module.inference_model(keras.Sequential([keras.Input((3,)), ksh.BinaryHead()]))

    class Subclassed(tf_keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        module.inference_model(Subclassed())

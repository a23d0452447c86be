"""Output heads on the current backend: the Keras layer contract, links, losses, saving, mixed precision."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from conftest import value_and_grad

import keras_stable_heads as ksh
from keras_stable_heads.heads import BinaryHead
from keras_stable_heads.heads import GaussianHead
from keras_stable_heads.heads import LaplaceHead
from keras_stable_heads.heads import Link
from keras_stable_heads.heads import MultilabelHead
from keras_stable_heads.heads import SoftmaxHead
from keras_stable_heads.heads import inference_model

# (factory, values emitted per example, matching loss class, labels for 8 examples)
CASES = {
    "binary": (lambda **kw: BinaryHead(**kw), 1, ksh.StableBinaryCE,
               lambda rng: rng.integers(0, 2, (8, 1)).astype("float32")),
    "softmax": (lambda **kw: SoftmaxHead(3, **kw), 3, ksh.StableSoftmaxCE,
                lambda rng: np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]),
    "multilabel": (lambda **kw: MultilabelHead(4, **kw), 4, ksh.StableMultilabelCE,
                   lambda rng: rng.integers(0, 2, (8, 4)).astype("float32")),
    "gaussian": (lambda **kw: GaussianHead(2, **kw), 4, ksh.GaussianNLL,
                 lambda rng: rng.normal(size=(8, 2)).astype("float32")),
    "laplace": (lambda **kw: LaplaceHead(2, **kw), 4, ksh.LaplaceNLL,
                lambda rng: rng.normal(size=(8, 2)).astype("float32")),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_layer_contract_shape_config_and_one_training_step(kind):
    """The Keras layer test: output shapes (rank 2 and 3), float32, config round trip, a falling finite loss."""
    factory, width, loss_cls, labels = CASES[kind]
    rng = np.random.default_rng(0)
    head = factory(kernel_initializer="he_normal", name=f"{kind}_head")
    assert head.compute_output_shape((None, 5)) == (None, width)
    out = head(rng.normal(size=(8, 5)).astype("float32"))
    assert tuple(out.shape) == (8, width) and keras.backend.standardize_dtype(out.dtype) == "float32"
    assert tuple(factory()(rng.normal(size=(2, 3, 5)).astype("float32")).shape) == (2, 3, width)

    config = head.get_config()
    clone = type(head).from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(head))  # no custom_objects
    assert type(restored) is type(head) and restored.get_config() == config
    assert keras.saving.get_registered_object(f"keras_stable_heads>{type(head).__name__}") is type(head)

    model = keras.Sequential([keras.Input((5,)), factory()])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=model.layers[-1].loss())
    assert isinstance(model.loss, loss_cls)
    x, y = rng.normal(size=(8, 5)).astype("float32"), labels(rng)
    history = [float(model.train_on_batch(x, y)) for _ in range(4)]
    assert np.all(np.isfinite(history)) and history[-1] < history[0], history


def test_loss_options_and_variants():
    assert BinaryHead().loss(label_smoothing=0.1, pos_weight=2.0).get_config()["pos_weight"] == 2.0
    assert isinstance(SoftmaxHead(3).loss(sparse=True, ignore_class=-1), ksh.StableSparseSoftmaxCE)
    assert SoftmaxHead(3).loss(z_loss=1e-3).get_config()["z_loss"] == 1e-3
    assert MultilabelHead(2).loss(missing_label=-1.0).get_config()["missing_label"] == -1.0
    assert GaussianHead(1).loss(full=True).get_config()["full"] is True
    assert isinstance(LaplaceHead(1).loss(), ksh.LaplaceNLL)


def test_links_are_the_inverse_links():
    z = np.array([[-30.0, 0.0, 2.0]], "float32")
    np.testing.assert_allclose(to_numpy(MultilabelHead(3).link(z)), 1.0 / (1.0 + np.exp(-z.astype(float))), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(SoftmaxHead(3).link(z)), np.exp(z) / np.exp(z).sum(), rtol=1e-6)
    params = np.array([[1.5, -2.0, 0.0, np.log(3.0)]], "float32")  # [mean (2), log_scale (2)]
    np.testing.assert_allclose(to_numpy(GaussianHead(2).link(params)), [[1.5, -2.0, 1.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(Link("laplace")(params)), [[1.5, -2.0, 1.0, 3.0]], rtol=1e-6)


def test_log_scale_floor_is_smooth_and_configurable():
    head = GaussianHead(1, log_scale_floor=-3.0, use_projection=False)
    params = np.array([[0.0, -100.0], [0.0, -3.0], [0.0, 8.0]], "float32")
    log_scale = to_numpy(head(params))[:, 1]
    assert log_scale[0] == pytest.approx(-3.0, abs=1e-6)  # floored
    assert log_scale[1] == pytest.approx(-3.0 + np.log(2.0), rel=1e-6)  # smooth at the floor: floor + log 2
    assert log_scale[2] == pytest.approx(8.0, abs=1e-4)  # the identity well above the floor
    _, grad = value_and_grad(lambda t: head(t)[:, 1], np.array([[0.0, -5.0]]))
    assert 0.0 < grad[0, 1] < 0.2  # below the floor the gradient is small but never 0
    assert GaussianHead(1).get_config()["log_scale_floor"] == -7.0


def test_functional_model_with_two_heads_trains_saves_and_links(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    classes = np.argmax(x[:, :3], axis=-1)
    target = (x[:, :1] * 2.0 + 0.1 * rng.normal(size=(64, 1))).astype("float32")
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    cls_head, reg_head = SoftmaxHead(3, name="cls"), GaussianHead(1, name="reg")
    model = keras.Model(inputs, {"cls": cls_head(hidden), "reg": reg_head(hidden)})
    model.compile(optimizer=keras.optimizers.Adam(0.03),
                  loss={"cls": cls_head.loss(sparse=True), "reg": reg_head.loss()})
    history = [float(np.ravel(model.train_on_batch(x, {"cls": classes, "reg": target}))[0]) for _ in range(8)]
    assert np.all(np.isfinite(history)) and history[-1] < 0.7 * history[0], history

    path = tmp_path / "heads.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    raw = keras.tree.map_structure(to_numpy, model(x))
    np.testing.assert_allclose(to_numpy(loaded(x)["cls"]), raw["cls"], rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.loss["reg"], ksh.GaussianNLL)

    linked = keras.tree.map_structure(to_numpy, inference_model(loaded)(x))
    np.testing.assert_allclose(linked["cls"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(linked["cls"], to_numpy(keras.ops.softmax(raw["cls"])), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(linked["reg"], np.concatenate([raw["reg"][:, :1], np.exp(raw["reg"][:, 1:])], -1),
                               rtol=1e-5)
    assert (linked["cls"].argmax(-1) == classes).mean() > 0.6


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_heads_emit_float32_under_mixed_precision(policy):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 2, (32, 1)).astype("float32")
    keras.config.set_dtype_policy(policy)
    try:
        head = BinaryHead()
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), head])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=head.loss())
        assert head.projection.compute_dtype == policy.split("_")[1]
        assert keras.backend.standardize_dtype(model.outputs[0].dtype) == "float32"
        assert keras.backend.standardize_dtype(model(x).dtype) == "float32"
        losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
        gaussian = GaussianHead(1, use_projection=False)(keras.ops.cast(np.array([[1.0, -20.0]]), policy[6:]))
        assert keras.backend.standardize_dtype(gaussian.dtype) == "float32"
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert to_numpy(gaussian)[0, 1] == pytest.approx(-7.0, abs=1e-3)


def test_use_projection_false_passes_logits_through_without_rounding():
    head = SoftmaxHead(3, use_projection=False)
    z = np.array([[1e4, 1.0 + 1e-6, -3.0]], "float32")
    np.testing.assert_array_equal(to_numpy(head(z)), z.astype(np.float64))
    assert head.get_config()["use_projection"] is False and not head.weights
    with pytest.raises(ValueError, match="last axis must have 3 values"):
        SoftmaxHead(3, use_projection=False)(np.zeros((2, 4), "float32"))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SoftmaxHead(1)
    with pytest.raises(ValueError, match="at least one output unit"):
        MultilabelHead(0)
    with pytest.raises(ValueError, match="`link` must be one of"):
        Link("tanh")
    with pytest.raises(ValueError, match="has no weights"):
        BinaryHead(use_projection=False, kernel_regularizer="l2")
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="No output of model"):
        inference_model(plain)
    with pytest.raises(ValueError, match="not built"):
        inference_model(keras.Sequential([BinaryHead()]))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        inference_model(Subclassed())

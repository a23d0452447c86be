"""The Loss classes: Keras conventions (reduction, sample_weight, masks), config, serialization, validation."""

import keras
import numpy as np
import pytest
from keras_stable_heads import reference as ref
from conftest import to_numpy

import keras_stable_heads as ksh
from keras_stable_heads.losses import set_keras_mask

NON_DEFAULT = {
    ksh.StableBinaryCE: dict(pos_weight=2.5, label_smoothing=0.1),
    ksh.StableSoftmaxCE: dict(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5], z_loss=1e-3, logit_softcap=30.0, axis=-1),
    ksh.StableSparseSoftmaxCE: dict(ignore_class=-1, label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5], z_loss=1e-3,
                                    logit_softcap=30.0, axis=-1),
    ksh.StableMultilabelCE: dict(pos_weight=[1.0, 2.0, 3.0], label_smoothing=0.05, missing_label=-1.0, label_reduction="sum"),
    ksh.StableBinaryFocalCE: dict(gamma=1.5, alpha=0.25, label_smoothing=0.1),
    ksh.StableSoftmaxFocalCE: dict(gamma=1.5, alpha=0.5, label_smoothing=0.1, axis=-1),
    ksh.GaussianNLL: dict(full=True),
    ksh.LaplaceNLL: dict(full=True),
}
CLASSES = list(NON_DEFAULT)


def _batch(cls, rng, rows=6):
    """Logits/parameters of width 3 (or 2 for the NLLs) and matching labels."""
    if cls in (ksh.GaussianNLL, ksh.LaplaceNLL):
        return rng.normal(size=(rows, 2)).astype("float32"), rng.normal(size=(rows, 1)).astype("float32")
    z = rng.normal(0, 2, (rows, 3)).astype("float32")
    if cls is ksh.StableSparseSoftmaxCE:
        return z, rng.integers(0, 3, rows).astype("float32")
    if cls in (ksh.StableSoftmaxCE, ksh.StableSoftmaxFocalCE):
        return z, np.eye(3, dtype="float32")[rng.integers(0, 3, rows)]
    return z, rng.integers(0, 2, (rows, 3)).astype("float32")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_round_trip_and_registration(cls):
    loss = cls(**NON_DEFAULT[cls], reduction="sum", name="custom")
    config = loss.get_config()
    for key, value in NON_DEFAULT[cls].items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is cls and restored.get_config() == config
    assert keras.saving.get_registered_object(f"keras_stable_heads>{cls.__name__}") is cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_class_equals_its_functional_twin(cls):
    rng = np.random.default_rng(1)
    pred, labels = _batch(cls, rng)
    loss = cls(**NON_DEFAULT[cls], reduction=None)
    per_example = to_numpy(loss(labels, pred))
    twin = {ksh.StableBinaryCE: ksh.ops.sigmoid_binary_cross_entropy, ksh.StableSoftmaxCE: ksh.ops.softmax_cross_entropy,
            ksh.StableSparseSoftmaxCE: ksh.ops.softmax_cross_entropy_with_integer_labels,
            ksh.StableMultilabelCE: ksh.ops.sigmoid_multilabel_cross_entropy,
            ksh.StableBinaryFocalCE: ksh.ops.sigmoid_focal_cross_entropy,
            ksh.StableSoftmaxFocalCE: ksh.ops.softmax_focal_cross_entropy,
            ksh.GaussianNLL: ksh.ops.gaussian_nll, ksh.LaplaceNLL: ksh.ops.laplace_nll}[cls]
    np.testing.assert_allclose(per_example, to_numpy(twin(pred, labels, **NON_DEFAULT[cls])), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", "none", None])
def test_reductions_and_sample_weight(reduction):
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (8, 5)).astype("float32")
    y = rng.integers(0, 5, 8)
    w = rng.uniform(0, 2, 8).astype("float32")
    per_example = ref.sparse_softmax_ce(z, y) * w
    got = to_numpy(ksh.StableSparseSoftmaxCE(reduction=reduction)(y, z, sample_weight=w))
    want = {"sum": per_example.sum(), "sum_over_batch_size": per_example.mean(), "mean": per_example.mean(),
            "mean_with_sample_weight": per_example.sum() / w.sum(), "none": per_example, None: per_example}[reduction]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_keras_mask_on_predictions_averages_over_unmasked_steps():
    rng = np.random.default_rng(3)
    z = keras.ops.convert_to_tensor(rng.normal(size=(2, 4, 3)).astype("float32"))
    y = rng.integers(0, 3, (2, 4))
    mask = np.array([[True, True, False, False], [True, True, True, False]])
    set_keras_mask(z, keras.ops.convert_to_tensor(mask))
    got = to_numpy(ksh.StableSparseSoftmaxCE()(y, z))
    np.testing.assert_allclose(got, ref.sparse_softmax_ce(to_numpy(z), y)[mask].mean(), rtol=1e-5)


def test_ignore_class_averages_over_kept_entries_and_all_ignored_is_zero():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(6, 4)).astype("float32")
    y = np.array([0, -1, 3, -1, 2, 1])
    loss = ksh.StableSparseSoftmaxCE(ignore_class=-1)
    kept = y != -1
    np.testing.assert_allclose(to_numpy(loss(y, z)), ref.sparse_softmax_ce(z[kept], y[kept]).mean(), rtol=1e-5)
    assert to_numpy(loss(np.full(6, -1), z)) == 0.0
    y2 = np.array([[0, -1, 3], [-1, -1, 2]])
    z2 = rng.normal(size=(2, 3, 4)).astype("float32")
    np.testing.assert_allclose(to_numpy(loss(y2, z2)), ref.sparse_softmax_ce(z2, y2, ignore_class=-1).sum() / 3, rtol=1e-5)


def test_labels_with_trailing_axis_and_out_of_range_error():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(4, 3)).astype("float32")
    y = rng.integers(0, 3, 4)
    loss = ksh.StableSparseSoftmaxCE()
    np.testing.assert_allclose(to_numpy(loss(y[:, None], z)), to_numpy(loss(y, z)), rtol=1e-7)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(np.array([0, 1, 3, 0]), z)


def test_multilabel_all_missing_example_is_dropped_from_the_average():
    z = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 2.0]], "float32")
    y = np.array([[1.0, 0.0], [-1.0, -1.0], [0.0, -1.0]], "float32")
    got = to_numpy(ksh.StableMultilabelCE(missing_label=-1)(y, z))
    per_example = ref.multilabel_ce(z, y, missing_label=-1)
    np.testing.assert_allclose(got, per_example[[0, 2]].mean(), rtol=1e-6)


@pytest.mark.parametrize("implementation", ["portable", "numba_cpu"])
def test_multilabel_missing_labels_without_the_unit_axis_mask_rows(implementation):
    """Labels (B,) for logits (B, 1), as fit passes them: each row's one label decides whether the row counts
    (not a reduction over the batch, which had averaged over all B rows)."""
    z = np.array([[2.0], [-1.0], [0.5], [3.0]], "float32")
    y = np.array([1.0, -1.0, 0.0, -1.0], "float32")
    loss = ksh.StableMultilabelCE(missing_label=-1, implementation=implementation)
    want = ref.multilabel_ce(z, y[:, None], missing_label=-1)[[0, 2]].mean()
    np.testing.assert_allclose(to_numpy(loss(y, z)), want, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(loss(y[:, None], z)), want, rtol=1e-6)


def test_binary_ce_accepts_labels_without_the_unit_axis():
    z = np.array([[-30.0], [2.0]], "float32")
    np.testing.assert_allclose(to_numpy(ksh.StableBinaryCE()(np.array([1.0, 0.0]), z)),
                               ref.binary_ce(z, [[1.0], [0.0]]).mean(), rtol=1e-6)


@pytest.mark.parametrize("cls,kwargs,error,words", [
    (ksh.StableSoftmaxCE, dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (ksh.StableSoftmaxCE, dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (ksh.StableSoftmaxCE, dict(z_loss=-1.0), ValueError, "z_loss"),
    (ksh.StableSoftmaxCE, dict(logit_softcap=0.0), ValueError, "logit_softcap"),
    (ksh.StableSoftmaxCE, dict(class_weight=[1.0, -1.0]), ValueError, "class_weight"),
    (ksh.StableSoftmaxCE, dict(class_weight=2.0), TypeError, "class_weight"),
    (ksh.StableSoftmaxCE, dict(axis=1.5), TypeError, "axis"),
    (ksh.StableSparseSoftmaxCE, dict(ignore_class=0.5), TypeError, "ignore_class"),
    (ksh.StableBinaryCE, dict(pos_weight=float("nan")), ValueError, "pos_weight"),
    (ksh.StableMultilabelCE, dict(label_reduction="max"), ValueError, "label_reduction"),
    (ksh.StableBinaryFocalCE, dict(gamma=-1.0), ValueError, "gamma"),
    (ksh.StableBinaryFocalCE, dict(alpha=2.0), ValueError, "alpha"),
    (ksh.StableSoftmaxCE, dict(reduction="median"), ValueError, "reduction"),
])
def test_bad_arguments_raise_naming_the_argument(cls, kwargs, error, words):
    with pytest.raises(error, match=words):
        cls(**kwargs)


def test_bad_shapes_raise_clear_errors():
    z = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match="class_weight"):
        ksh.StableSoftmaxCE(class_weight=[1.0, 2.0])(np.eye(3)[[0, 1, 2, 0]], z)
    with pytest.raises(ValueError, match="log_scale"):
        ksh.GaussianNLL()(np.zeros((4, 1)), z)
    with pytest.raises(ValueError, match="2 x 2"):
        ksh.LaplaceNLL()(np.zeros((4, 3)), np.zeros((4, 4), "float32"))
    with pytest.raises(ValueError, match="one class id per example"):
        ksh.StableSparseSoftmaxCE()(np.zeros((4, 3, 2)), z)
    # a batch of 1 against 4 rows: broadcast silently before (class ids on JAX, regression targets everywhere)
    with pytest.raises(ValueError, match=r"`labels` of shape \(1,\) do not match `logits` of shape \(4, 3\)"):
        ksh.StableSparseSoftmaxCE()(np.zeros((1,), "int32"), z)
    with pytest.raises(ValueError, match=r"`y_true` of shape \(1, 1\) do not match `y_pred` of shape \(4, 2\)"):
        ksh.GaussianNLL()(np.zeros((1, 1), "float32"), np.zeros((4, 2), "float32"))


@pytest.mark.parametrize("loss,implementation", [
    (lambda **k: ksh.StableSoftmaxCE(**k), None), (lambda **k: ksh.StableSoftmaxFocalCE(**k), None),
    (lambda **k: ksh.StableMultilabelCE(**k), None), (lambda **k: ksh.StableMultilabelCE(**k), "numba_cpu"),
    (lambda **k: ksh.StableBinaryFocalCE(**k), None), (lambda **k: ksh.StableBinaryFocalCE(**k), "numba_cpu"),
], ids=["softmax", "softmax_focal", "multilabel", "multilabel_kernels", "binary_focal", "binary_focal_kernels"])
def test_labels_not_of_the_logits_shape_raise(loss, implementation):
    """Class ids given to a dense loss, or one label per row for several units, raise a ValueError that names the
    shapes (before: a backend's own error, or on the portable path a silent broadcast of one label over a row)."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=(8, 5)).astype("float32")
    ids = rng.integers(0, 5, 8).astype("int32")
    fn = loss(implementation=implementation) if implementation else loss()
    for labels in (ids, (ids[:, None] % 2).astype("float32"), np.zeros((8, 4), "float32")):
        with pytest.raises(ValueError, match=r"do not match `logits` of shape \(8, 5\)"):
            fn(labels, z)
    assert np.isfinite(float(fn((rng.random((8, 5)) > 0.5).astype("float32"), z)))  # the logits' shape: fine


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_saved_model_loads_without_custom_objects(cls, tmp_path):
    rng = np.random.default_rng(6)
    pred, labels = _batch(cls, rng, rows=16)
    x = rng.normal(size=(16, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(pred.shape[-1])])
    model.compile(optimizer="sgd", loss=cls(**NON_DEFAULT[cls]))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored.loss) is cls and restored.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(restored.evaluate(x, labels, verbose=0), model.evaluate(x, labels, verbose=0), rtol=1e-6)

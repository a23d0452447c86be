"""Extreme inputs: ±1e4, ±1e30, -inf masked classes, NaN, all-masked rows, one class, the last class,
low-precision dtypes and ≥ 65,536 rows. Each row of a table asserts a value or a finiteness."""

import keras
import numpy as np
import pytest
from keras_stable_heads import reference as ref
from cases import CASES
from conftest import to_numpy
from conftest import value_and_grad

from keras_stable_heads import ops

INF = np.inf


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_logits_match_reference_softmax(scale):
    z = np.array([[scale, -scale, 0.0], [-scale, -scale, scale], [0.0, scale, scale], [scale, scale, 0.0]], np.float32)
    y = np.array([1, 2, 0, 0])
    got, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, y), z)
    np.testing.assert_allclose(got, ref.sparse_softmax_ce(z, y), rtol=1e-6)
    p = np.exp(z.astype(np.float64) - np.max(z, -1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, p - np.eye(3)[y], atol=1e-6)
    np.testing.assert_allclose(got[3], np.log(2.0), rtol=1e-6)  # (shift - z_y) + log_sum: no rounding at 1e30


@pytest.mark.parametrize("z,y,loss,grad", [
    (-30.0, 1.0, 30.0, -1.0),  # Keras's clipped probability path: 16.118 and 0
    (30.0, 0.0, 30.0, 1.0),
    (-1e4, 1.0, 1e4, -1.0),
    (1e30, 0.0, 1e30, 1.0),
    (1e30, 1.0, 0.0, 0.0),
    (-1e30, 0.0, 0.0, 0.0),
    (INF, 1.0, 0.0, 0.0),  # the other term's weight is 0: no 0 * inf
    (-INF, 0.0, 0.0, 0.0),
])
def test_binary_ce_never_saturates(z, y, loss, grad):
    value, g = value_and_grad(lambda x: ops.sigmoid_binary_cross_entropy(x, np.array([[y]])), np.array([[z]], np.float32))
    np.testing.assert_allclose(value, [loss], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(g, [[grad]], rtol=1e-6, atol=1e-12)


def test_masked_vocabulary_gives_finite_loss_and_zero_gradient():
    z = np.array([[2.0, -INF, 0.5, -INF], [-INF, -INF, 1.0, 3.0]], np.float32)
    y = np.array([0, 3])
    for fn, labels in [(ops.softmax_cross_entropy_with_integer_labels, y), (ops.softmax_cross_entropy, np.eye(4)[y]),
                       (ops.softmax_focal_cross_entropy, np.eye(4)[y])]:
        loss, grad = value_and_grad(lambda x: fn(x, labels), z)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert np.all(grad[np.isinf(z)] == 0.0)
    loss = to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y))
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y), rtol=1e-6)


def test_masked_vocabulary_with_softcap_and_z_loss_stays_masked():
    z = np.array([[2.0, -INF, 0.5]], np.float32)
    options = dict(logit_softcap=3.0, z_loss=1e-2)
    loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, np.array([0]), **options), z)
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, [0], **options), rtol=1e-6)
    assert grad[0, 1] == 0.0 and np.all(np.isfinite(grad))


@pytest.mark.parametrize("implementation", ["portable", "numba_cpu"])
def test_zero_weight_on_a_masked_class_adds_nothing(implementation):
    """A padding class (weight 0, logit -inf) with label smoothing: no 0 * inf = NaN, in either path."""
    z = np.array([[2.0, -INF, 0.5, 1.0, -1.0], [0.0, -INF, 1.0, 3.0, 2.0]], np.float32)
    w = np.array([1.0, 0.0, 1.0, 2.0, 1.0], np.float32)
    y = np.array([0, 1])
    for eps in (0.0, 0.1):
        options = dict(class_weight=w, label_smoothing=eps, implementation=implementation)
        for fn, labels in [(ops.softmax_cross_entropy_with_integer_labels, y),
                           (ops.softmax_cross_entropy, np.eye(5, dtype=np.float32)[y])]:
            loss, grad = value_and_grad(lambda x: fn(x, labels, **options), z)
            np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y, label_smoothing=eps, class_weight=w),
                                       rtol=1e-6, atol=1e-7)
            assert np.all(np.isfinite(grad)) and np.all(grad[:, 1] == 0.0)


@pytest.mark.parametrize("implementation", ["portable", "numba_cpu"])
def test_softcap_slope_where_tanh_is_near_one(implementation):
    """gradient = sech^2(z / cap) p at logits of 3-10 caps (1 - tanh^2 in float32 was 6% off at 8 caps, 0 at 9)."""
    big = np.array([90.0, 150.0, 240.0, 270.0, 300.0])
    z = np.stack([np.zeros_like(big), big], -1).astype(np.float32)
    options = dict(logit_softcap=30.0, implementation=implementation)
    _, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, np.zeros(5, int), **options), z)
    zc = 30.0 * np.tanh(z.astype(np.float64) / 30.0)
    p1 = 1.0 / (1.0 + np.exp(zc[:, 0] - zc[:, 1]))
    np.testing.assert_allclose(grad[:, 1], p1 / np.cosh(big / 30.0) ** 2, rtol=2e-5)


def test_target_at_masked_class_is_infinite_not_nan():
    z = np.array([[-INF, 1.0, 2.0]], np.float32)
    assert to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, [0]))[0] == INF


def test_all_masked_row_is_inf_with_zero_gradient():
    z = np.array([[-INF, -INF, -INF], [0.0, 1.0, 2.0]], np.float32)
    loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, np.array([1, 1])), z)
    assert loss[0] == INF and np.isfinite(loss[1])
    assert np.all(grad[0] == 0.0)
    np.testing.assert_array_equal(ref.sparse_softmax_ce(z, [1, 1])[0], INF)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nan_in_gives_nan_out(case):
    rng = np.random.default_rng(0)
    pred, labels = case.make(rng, 3, 4)
    pred = pred.astype(np.float32)
    pred[1, 0] = np.nan
    loss, grad = value_and_grad(lambda x: case.op(x, labels), pred)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
    assert np.isnan(grad[1]).any() and np.all(np.isfinite(grad[[0, 2]]))


def test_one_class_and_label_at_last_class():
    z = np.array([[3.0], [-7.0]], np.float32)
    loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, np.array([0, 0])), z)
    np.testing.assert_allclose(loss, [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    z = np.random.default_rng(1).normal(size=(4, 9)).astype(np.float32)
    y = np.full(4, 8)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y)), ref.sparse_softmax_ce(z, y),
                               rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_computes_in_float32(dtype):
    z = keras.ops.convert_to_tensor(np.array([[1000.0, 1000.0]]), dtype=dtype)
    loss = ops.softmax_cross_entropy_with_integer_labels(z, np.array([0]))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(loss), [np.log(2.0)], atol=1e-3)
    for case in CASES:
        pred, labels = case.make(np.random.default_rng(2), 3, 4)
        out = case.op(keras.ops.convert_to_tensor(pred, dtype=dtype), labels)
        assert keras.backend.standardize_dtype(out.dtype) == "float32", case.name
        want = case.reference(to_numpy(keras.ops.cast(keras.ops.convert_to_tensor(pred, dtype=dtype), "float32")), labels)
        np.testing.assert_allclose(to_numpy(out), want, rtol=1e-5, atol=1e-5, err_msg=case.name)


def test_low_precision_gradient_has_input_dtype():
    z = keras.ops.convert_to_tensor(np.array([[1.0, 2.0, 3.0]]), dtype="bfloat16")
    from keras_stable_heads import _backend

    def scalar(x):
        return keras.ops.sum(ops.softmax_cross_entropy_with_integer_labels(x, np.array([2])))

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(z)
            value = scalar(z)
        grad = tape.gradient(value, z)
    else:
        value, grad = _backend.value_and_grad(scalar, z) if keras.backend.backend() == "jax" else (None, None)
        if keras.backend.backend() == "torch":
            z.requires_grad_(True)
            value = scalar(z)
            value.backward()
            grad = z.grad
    assert keras.backend.standardize_dtype(grad.dtype) == "bfloat16"
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(to_numpy(keras.ops.cast(grad, "float32"))[0], p - [0, 0, 1], atol=1e-2)


def test_many_rows():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 4, (65536, 10)).astype(np.float32)
    y = rng.integers(0, 10, 65536)
    loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, y), z)
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y), rtol=2e-5, atol=2e-6)
    logp, _ = ref.log_softmax(z)
    np.testing.assert_allclose(grad, np.exp(logp) - np.eye(10)[y], atol=2e-6)


def test_ignored_and_out_of_range_labels():
    z = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
    y = np.array([1, -1, 4, -1])
    loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, y, ignore_class=-1), z)
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y, ignore_class=-1), rtol=1e-6)
    assert np.all(grad[[1, 3]] == 0.0)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        ops.softmax_cross_entropy_with_integer_labels(z, np.array([1, 5, 0, 0]))
    with pytest.raises(ValueError, match="ignore_class"):
        ops.softmax_cross_entropy_with_integer_labels(z, np.array([1, -1, 0, 0]))
    with pytest.raises(ValueError, match="ignore_class"):  # F.cross_entropy's own default ignore_index is no exception
        ops.softmax_cross_entropy_with_integer_labels(z, np.array([1, -100, 0, 0]))


@pytest.mark.parametrize("ignore_class", [None, -1])
def test_sparse_portable_plain_and_weighted_forms_agree_on_adversarial_rows(ignore_class):
    """With no option set the portable op's target is the one-hot itself; class weights of 1 take the weighted
    form (safe products with w_y). Both fold the row cases into one factor per row of the gradient, and both must
    match the reference on every row:
    a row of -inf logits (loss +inf, gradient 0), a masked target next to +-1e30, and, when ignoring, ignored rows
    holding +inf, -inf and NaN logits (loss 0, gradient exactly 0)."""
    rng = np.random.default_rng(11)
    z = rng.normal(0, 3, (7, 5)).astype(np.float32)
    z[1] = -INF
    z[2, :3] = [1e30, -1e30, -INF]
    y = np.array([0, 2, 1, 4, 3, 0, 2])
    if ignore_class is not None:
        z[4, 0], z[5, 1], z[6, 2] = INF, np.nan, -INF
        y[4:] = ignore_class
    want = ref.sparse_softmax_ce(z, y, ignore_class=ignore_class)
    for weights in (None, np.ones(5)):
        loss, grad = value_and_grad(lambda x: ops.softmax_cross_entropy_with_integer_labels(
            x, y, ignore_class=ignore_class, class_weight=weights, implementation="portable"), z)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        assert loss[1] == INF and np.all(grad[1] == 0.0)
        if ignore_class is not None:
            assert np.all(loss[4:] == 0.0) and np.all(grad[4:] == 0.0)
        finite = [0, 3] if ignore_class is not None else [0, 3, 4, 5, 6]
        logp, _ = ref.log_softmax(z[finite])
        np.testing.assert_allclose(grad[finite], np.exp(logp) - np.eye(5)[y[finite]], atol=2e-6)
        np.testing.assert_allclose(grad[2], [1.0, 0.0, 0.0, 0.0, 0.0] - np.eye(5)[1], atol=1e-6)


def test_focal_at_gamma_zero_equals_cross_entropy_exactly():
    """The portable formulas (the kernels' equivalent, to rounding: test_kernels_*::test_focal_at_gamma_zero_...)."""
    rng = np.random.default_rng(4)
    z = rng.normal(0, 5, (16, 6)).astype(np.float32)
    y = np.eye(6)[rng.integers(0, 6, 16)]
    yb = rng.integers(0, 2, (16, 6)).astype(np.float32)
    a, ga = value_and_grad(lambda x: ops.softmax_focal_cross_entropy(x, y, gamma=0.0, implementation="portable"), z)
    b, gb = value_and_grad(lambda x: ops.softmax_cross_entropy(x, y, implementation="portable"), z)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-7)
    a, ga = value_and_grad(lambda x: ops.sigmoid_focal_cross_entropy(x, yb, gamma=0.0, implementation="portable"), z)
    b, gb = value_and_grad(lambda x: ops.sigmoid_binary_cross_entropy(x, yb, implementation="portable"), z)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ga, gb)


def test_focal_does_not_saturate():
    """A confidently wrong prediction keeps a loss proportional to the logit and a gradient near -1."""
    loss, grad = value_and_grad(lambda x: ops.sigmoid_focal_cross_entropy(x, np.array([[1.0]])), np.array([[-40.0]], np.float32))
    np.testing.assert_allclose(loss, [40.0], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.0]], rtol=1e-5)
    z = np.array([[-40.0, 0.0, 40.0]], np.float32)
    loss, grad = value_and_grad(lambda x: ops.softmax_focal_cross_entropy(x, np.array([[1.0, 0.0, 0.0]])), z)
    np.testing.assert_allclose(loss, [80.0], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.0, 0.0, 1.0]], atol=1e-6)


def test_regression_nll_at_extremes():
    params = np.array([[1e4, 0.0], [0.0, 30.0], [0.0, -10.0]], np.float32)
    y = np.array([[0.0], [1e4], [1e-3]])
    for fn, reference in [(ops.gaussian_nll, ref.gaussian_nll), (ops.laplace_nll, ref.laplace_nll)]:
        loss, grad = value_and_grad(lambda x: fn(x, y), params)
        np.testing.assert_allclose(loss, reference(params, y), rtol=1e-5)
        assert np.all(np.isfinite(grad))


def test_binary_ce_gradient_is_exact_for_confident_logits():
    """sigmoid(z) - 1 would round to 0 above z = 16.6 in float32; the gradient is -exp(-z) there."""
    z = np.array([[20.0], [40.0], [-40.0]], np.float32)
    y = np.array([[1.0], [1.0], [0.0]])
    _, grad = value_and_grad(lambda x: ops.sigmoid_binary_cross_entropy(x, y, implementation="portable"), z)
    np.testing.assert_allclose(grad[:, 0], [-np.exp(-20.0), -np.exp(-40.0), np.exp(-40.0)], rtol=1e-5)

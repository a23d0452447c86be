"""The fused gradients against float64 central differences, through the public checker, and the checker itself."""

import keras
import numpy as np
import pytest
from cases import all_cases
from cases import resolve

from keras_stable_heads import numerics
from keras_stable_heads import ops
from keras_stable_heads.testing import check_gradients


@pytest.mark.parametrize("case,options", [pytest.param(c, o, id=n) for c, o, n in all_cases()])
def test_fused_gradient_passes_float64_check(case, options):
    rng = np.random.default_rng(11)
    pred, labels = case.make(rng, 3, 5)
    options = resolve(options, pred.shape[-1])
    result = check_gradients(lambda x: case.op(x, labels, **options), pred, rtol=1e-6, atol=1e-9)
    assert result.ok, str(result)


def test_softmax_options_with_class_axis_first():
    rng = np.random.default_rng(12)
    z = rng.normal(size=(4, 3, 2))  # classes on axis 1
    y = rng.integers(0, 4, (3, 2))
    result = check_gradients(
        lambda x: ops.softmax_cross_entropy_with_integer_labels(x, y, axis=0, label_smoothing=0.1, z_loss=1e-2), z)
    assert result.ok, str(result)


def test_directional_mode_for_large_inputs():
    rng = np.random.default_rng(13)
    z = rng.normal(size=(64, 50))
    y = rng.integers(0, 50, 64)
    result = check_gradients(lambda x: ops.softmax_cross_entropy_with_integer_labels(x, y), z, max_elements=100)
    assert result.mode == "directional" and result.ok, str(result)


def test_checker_catches_a_wrong_gradient():
    def wrong(x):
        def forward(t):
            return numerics.softplus(t), lambda g: g * keras.ops.sigmoid(t) * 1.01  # 1% off

        return numerics.fused(forward)(x)

    x = np.linspace(-3, 3, 7)
    result = check_gradients(wrong, x)
    assert not result.ok
    assert 0.009 < result.max_relative_error < 0.011
    assert "FAILED" in str(result) and len(result.where) == 1


def test_checker_works_on_a_users_own_loss():
    """A custom loss with plain autodiff (no custom gradient), as a user would check it."""
    rng = np.random.default_rng(14)
    z = rng.normal(size=(3, 4))
    y = np.eye(4)[[0, 3, 1]]

    def my_loss(logits):
        return keras.ops.sum(keras.ops.square(keras.ops.subtract(keras.ops.softmax(logits), y)), axis=-1)

    result = check_gradients(my_loss, z)
    assert result.ok and result.mode == "elementwise", str(result)
    assert "passed" in str(result)

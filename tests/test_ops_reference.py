"""Every op and option against the float64 NumPy reference: losses and (fused) gradients, float32 inputs."""

import numpy as np
import pytest
from keras_stable_heads import reference as ref
from cases import all_cases
from cases import resolve
from conftest import to_numpy
from conftest import value_and_grad

PARAMS = [pytest.param(case, options, id=name) for case, options, name in all_cases()]


@pytest.mark.parametrize("shape", [(5, 7), (64, 33), (3, 1001)], ids=str)
@pytest.mark.parametrize("case,options", PARAMS)
def test_loss_matches_reference(case, options, shape):
    rng = np.random.default_rng(hash((case.name, shape)) % 2**32)
    pred, labels = case.make(rng, *shape)
    options = resolve(options, pred.shape[-1])
    got = to_numpy(case.op(pred.astype(np.float32), labels, **options))
    want = case.reference(pred.astype(np.float32), labels, **options)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case,options", PARAMS)
def test_gradient_matches_reference(case, options):
    rng = np.random.default_rng(7)
    pred, labels = case.make(rng, 4, 6)
    options = resolve(options, pred.shape[-1])
    pred = pred.astype(np.float32)
    cotangent = rng.uniform(0.5, 1.5, 4)
    _, grad = value_and_grad(lambda x: case.op(x, labels, **options), pred, cotangent)
    want = ref.numeric_grad(lambda x: case.reference(x, labels, **options), pred, cotangent)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("case,options", PARAMS)
def test_float64_stays_float64(case, options):
    """float64 in gives float64 out, to float64 precision (the gradient checker relies on it)."""
    from keras_stable_heads import _backend

    rng = np.random.default_rng(3)
    pred, labels = case.make(rng, 4, 6)
    options = resolve(options, pred.shape[-1])
    with _backend.float64_scope():
        got = case.op(pred, labels, **options)
        assert "float64" in str(got.dtype)
        np.testing.assert_allclose(to_numpy(got), case.reference(pred, labels, **options), rtol=1e-12, atol=1e-13)

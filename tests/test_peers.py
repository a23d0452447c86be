"""Agreement with the peers where they are right: tf.nn, torch.nn.functional, optax and Keras's built-ins,
on random moderate inputs of several shapes (our op on the current backend; each peer in its own framework)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_stable_heads import ops

SHAPES = [(7, 3), (32, 10), (5, 257)]


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, shape).astype(np.float32)
    y = rng.integers(0, shape[-1], shape[0])
    soft = rng.dirichlet(np.ones(shape[-1]), shape[0]).astype(np.float32)
    bits = rng.integers(0, 2, shape).astype(np.float32)
    return z, y, soft, bits


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def optax():
    return pytest.importorskip("optax")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tf_nn(tf, shape):
    z, y, soft, bits = _data(shape, 1)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y)),
                               tf.nn.sparse_softmax_cross_entropy_with_logits(y, z).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy(z, soft)),
                               tf.nn.softmax_cross_entropy_with_logits(soft, z).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.sigmoid_binary_cross_entropy(z, bits)),
                               tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(bits, z), -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.sigmoid_multilabel_cross_entropy(z, bits, pos_weight=3.0, label_reduction="sum")),
                               tf.reduce_sum(tf.nn.weighted_cross_entropy_with_logits(bits, z, 3.0), -1).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_functional(torch, shape):
    F = torch.nn.functional
    z, y, soft, bits = _data(shape, 2)
    weight = np.linspace(0.5, 2.0, shape[-1]).astype(np.float32)
    tz, ty = torch.from_numpy(z), torch.from_numpy(y)
    y_ignored = np.where(np.arange(shape[0]) % 3 == 0, -100, y)
    for kwargs, ours in [
        (dict(label_smoothing=0.1), dict(label_smoothing=0.1)),
        (dict(weight=torch.from_numpy(weight)), dict(class_weight=weight.tolist())),
        (dict(weight=torch.from_numpy(weight), label_smoothing=0.2), dict(class_weight=weight.tolist(), label_smoothing=0.2)),
    ]:
        want = F.cross_entropy(tz, ty, reduction="none", **kwargs).numpy()
        got = to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y, **ours))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(kwargs))
    want = F.cross_entropy(tz, torch.from_numpy(y_ignored), ignore_index=-100, reduction="mean").numpy()
    kept = y_ignored != -100
    got = to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y_ignored, ignore_class=-100))
    np.testing.assert_allclose(got[kept].mean(), want, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy(z, soft, label_smoothing=0.1)),
                               F.cross_entropy(tz, torch.from_numpy(soft), label_smoothing=0.1, reduction="none").numpy(),
                               rtol=1e-5, atol=1e-5)
    pos_weight = np.linspace(0.5, 3.0, shape[-1]).astype(np.float32)
    want = F.binary_cross_entropy_with_logits(tz, torch.from_numpy(bits), pos_weight=torch.from_numpy(pos_weight),
                                              reduction="none").mean(-1).numpy()
    np.testing.assert_allclose(to_numpy(ops.sigmoid_binary_cross_entropy(z, bits, pos_weight=pos_weight.tolist())), want,
                               rtol=1e-5, atol=1e-5)
    mean, log_scale, target = z[:, :1], np.tanh(z[:, 1:2]), bits[:, :1]
    params = np.concatenate([mean, log_scale], -1)
    want = F.gaussian_nll_loss(torch.from_numpy(mean), torch.from_numpy(target), torch.from_numpy(np.exp(2 * log_scale)),
                               full=True, reduction="none", eps=1e-12)[:, 0].numpy()
    np.testing.assert_allclose(to_numpy(ops.gaussian_nll(params, target, full=True)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_optax(optax, shape):
    z, y, soft, bits = _data(shape, 3)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy_with_integer_labels(z, y)),
                               np.asarray(optax.softmax_cross_entropy_with_integer_labels(z, y)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.softmax_cross_entropy(z, soft)),
                               np.asarray(optax.softmax_cross_entropy(z, soft)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.sigmoid_binary_cross_entropy(z, bits)),
                               np.asarray(optax.sigmoid_binary_cross_entropy(z, bits)).mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.sigmoid_focal_cross_entropy(z, bits, gamma=2.0, alpha=0.25)),
                               np.asarray(optax.sigmoid_focal_loss(z, bits, alpha=0.25, gamma=2.0)).mean(-1),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_keras_builtins_on_moderate_logits(shape):
    z, y, soft, bits = _data(shape, 4)
    z = z / 3.0  # moderate: far from Keras's 1e-7 probability clip
    onehot = np.eye(shape[-1], dtype=np.float32)[y]
    pairs = [
        (ops.softmax_cross_entropy_with_integer_labels(z, y),
         keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y, z)),
        (ops.softmax_cross_entropy(z, soft, label_smoothing=0.1),
         keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)(soft, z)),
        (ops.sigmoid_binary_cross_entropy(z, bits, label_smoothing=0.1),
         keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)(bits, z)),
        (ops.sigmoid_focal_cross_entropy(z, bits, gamma=2.0, alpha=0.25),
         keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True,
                                              reduction=None)(bits, z)),
        (ops.softmax_focal_cross_entropy(z, onehot, gamma=2.0, alpha=0.25),
         keras.losses.CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0, from_logits=True, reduction=None)(onehot, z)),
    ]
    for i, (ours, theirs) in enumerate(pairs):
        np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=2e-5, atol=1e-6, err_msg=str(i))

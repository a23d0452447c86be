import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_stable_heads import _backend  # noqa: E402

BACKEND = keras.backend.backend()


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def value_and_grad(fn, x, cotangent=None):
    """Loss value and gradient of sum(cotangent * fn(x)) through the backend's autodiff, as float64 NumPy."""
    x = np.asarray(x)
    out_shape = np.shape(to_numpy(fn(keras.ops.convert_to_tensor(x))))
    w = np.ones(out_shape) if cotangent is None else np.asarray(cotangent)

    def scalar(t):
        loss = fn(t)
        return keras.ops.sum(loss * keras.ops.convert_to_tensor(w, dtype=loss.dtype))

    value = to_numpy(fn(keras.ops.convert_to_tensor(x)))
    _, grad = _backend.value_and_grad(scalar, x)
    return value, np.asarray(grad, dtype=np.float64)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    yield

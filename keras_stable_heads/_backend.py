"""The little that differs per Keras backend outside ``keras.ops``, resolved once at import.

- ``host_value(x)``: a NumPy copy of ``x`` when it is a concrete tensor already on the host (eager mode, CPU),
  else ``None``. Used to validate labels in eager mode without ever synchronising a device or breaking a trace.
- ``value_and_grad(f, x)``: ``(f(x), df/dx)`` for a scalar ``f``, as NumPy, used by the gradient checker.
- ``float64_scope()``: a context in which float64 tensors stay float64 (JAX needs ``jax_enable_x64``).
- ``global_count_scale(mask)``: inside a multi-replica ``tf.distribute`` step, ``kept / mean over replicas of kept``
  (``kept`` = true entries of ``mask`` on this replica, one all-reduce of a scalar), else ``None``. A masked loss
  scaled by it averages over the kept entries of the global batch, not of each replica's share. Other backends:
  ``None`` (JAX distributions compute on global arrays; ``torch`` DDP needs the caller's own all-reduce).
- ``take_class(x, index)``: ``x``'s entry at ``index`` along the last axis, per row (``index`` int32 in range, the
  last axis of size 1), as ``keras.ops.take_along_axis``; on TensorFlow one ``GatherV2`` with batch dimensions
  instead of the ~15 ops of Keras's general version (a graph without XLA pays for each op).
"""

import contextlib

import keras
import numpy as np

BACKEND = keras.backend.backend()


def dtype_name(dtype):
    """``keras.backend.standardize_dtype``, remembered per dtype object (it costs microseconds per call). A plain
    dict, not ``functools.lru_cache``: torch.compile traces through a dict lookup, but warns of "silent
    incorrectness" at every lru_cache-wrapped function it meets."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = keras.backend.standardize_dtype(dtype)
        if len(_DTYPE_NAMES) < _MAX_DTYPE_NAMES:
            _DTYPE_NAMES[dtype] = name
        return name
    except TypeError:  # an unhashable dtype-like
        return keras.backend.standardize_dtype(dtype)


_DTYPE_NAMES = {}
_MAX_DTYPE_NAMES = 64


def _tensorflow():
    import tensorflow as tf

    def host_value(x):
        if not tf.executing_eagerly() or not isinstance(x, tf.Tensor) or not hasattr(x, "numpy"):
            return None
        if "GPU" in (x.device or ""):
            return None
        return x.numpy()

    def value_and_grad(f, x):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return y.numpy(), tape.gradient(y, x).numpy()

    def global_count_scale(mask):
        context = tf.distribute.get_replica_context()  # None in a cross-replica context
        if context is None or context.num_replicas_in_sync == 1:
            return None
        kept = tf.reduce_sum(tf.cast(mask, tf.float32))
        mean_kept = context.all_reduce(tf.distribute.ReduceOp.MEAN, kept)
        return tf.stop_gradient(tf.math.divide_no_nan(kept, mean_kept))

    def take_class(x, index):
        return tf.gather(x, index, batch_dims=len(x.shape) - 1)

    return host_value, value_and_grad, contextlib.nullcontext, global_count_scale, take_class


def _jax():
    import jax

    def host_value(x):
        if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
            return None
        if any(d.platform != "cpu" for d in x.devices()):
            return None
        return np.asarray(x)

    def value_and_grad(f, x):
        y, g = jax.value_and_grad(f)(jax.numpy.asarray(x))
        return np.asarray(y), np.asarray(g)

    return host_value, value_and_grad, lambda: jax.enable_x64(True), _no_scale, _take_class


def _torch():
    import torch

    def host_value(x):
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        return x.detach().numpy()

    def value_and_grad(f, x):
        x = torch.as_tensor(np.asarray(x)).requires_grad_(True)
        y = f(x)
        (g,) = torch.autograd.grad(y, x)
        return y.detach().numpy(), g.numpy()

    return host_value, value_and_grad, contextlib.nullcontext, _no_scale, _take_class


def _numpy():
    def host_value(x):
        return np.asarray(x)

    def value_and_grad(f, x):
        raise NotImplementedError("the numpy backend of Keras has no automatic differentiation")

    return host_value, value_and_grad, contextlib.nullcontext, _no_scale, _take_class


def _no_scale(mask):
    return None


def _take_class(x, index):
    return keras.ops.take_along_axis(x, index, axis=-1)


_RESOLVERS = {"tensorflow": _tensorflow, "jax": _jax, "torch": _torch, "numpy": _numpy}
host_value, value_and_grad, float64_scope, global_count_scale, take_class = _RESOLVERS[BACKEND]()

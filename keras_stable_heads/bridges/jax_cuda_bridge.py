"""JAX on CUDA: ``jax.custom_vjp`` over ``jax.experimental.buffer_callback``, eagerly and inside ``jax.jit``.

XLA hands the callback its GPU buffers (``__cuda_array_interface__``, wrapped zero-copy as Numba device arrays)
and its compute stream (``ctx.stream``); the kernels write straight into the XLA-owned outputs on that stream,
so nothing synchronises the host or copies to it. ``pair`` is a CUDA kernel pair as in ``torch_cuda_bridge``.
float16/bfloat16 logits are computed in float32 (the cast is differentiated by JAX). One GPU: Numba launches on
its current device (0), so arrays sharded over several GPUs must take the portable path.
"""

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback
from numba import cuda

from ._cuda import device_view as _view  # a module attribute: the simulator tests replace it
from .jax_bridge import VMAP_METHOD, apply_with_kernel_vjp


def _stream(ctx):
    """XLA's compute stream for this call (``ctx.stream`` is a CUstream handle on GPU)."""
    return cuda.external_stream(int(ctx.stream))


def run(pair, logits, labels):
    """Per-row loss of 2-D GPU ``logits`` [N, C]; labels int32 [N] or float32 [N, C] per ``pair.label_dtype``."""
    logits = logits.astype(np.float32)
    labels = labels.astype(np.int32 if pair.label_dtype == "int32" else np.float32)
    n = logits.shape[0]
    empty = n * logits.shape[1] == 0
    out_types = (jax.ShapeDtypeStruct((n,), np.float32), jax.ShapeDtypeStruct((n, pair.saved_width), np.float32))

    def forward_cb(ctx, out, z, y):
        if not empty:
            loss, saved = out
            pair.forward(_view(z), _view(y), _view(loss), _view(saved), _stream(ctx))

    def backward_cb(ctx, grad, z, y, saved, dloss):
        if not empty:
            pair.backward(_view(z), _view(y), _view(saved), _view(dloss), _view(grad), _stream(ctx))

    forward_call = buffer_callback(forward_cb, out_types, vmap_method=VMAP_METHOD)
    backward_call = buffer_callback(backward_cb, jax.ShapeDtypeStruct(logits.shape, np.float32),
                                    vmap_method=VMAP_METHOD)

    return apply_with_kernel_vjp(forward_call, backward_call, logits, labels)

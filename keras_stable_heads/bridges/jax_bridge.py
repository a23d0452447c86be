"""JAX: ``jax.custom_vjp`` over ``jax.experimental.buffer_callback``, so the kernels write straight into
XLA-owned buffers (never ``pure_callback``, which copies every array). Works eagerly and under ``jax.jit``."""

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from ._memory import advise_huge_pages

# Under jax.vmap the callbacks run once per batch member (the kernels take one [N, C] matrix).
VMAP_METHOD = "sequential"


def run(pair, logits, labels):
    rows = jax.ShapeDtypeStruct(logits.shape[:1], np.float32)
    per_row = jax.ShapeDtypeStruct((logits.shape[0], pair.saved_width), np.float32)  # what the backward reads

    def forward_cb(ctx, out, z, y):
        loss, saved = out
        pair.forward(np.asarray(z), np.asarray(y), np.asarray(loss), np.asarray(saved))

    def backward_cb(ctx, out, z, y, saved, dloss):
        grad = np.asarray(out)
        advise_huge_pages(grad)  # XLA's fresh output buffer is not yet written: see _memory.py
        pair.backward(np.asarray(z), np.asarray(y), np.asarray(saved), np.asarray(dloss), grad)

    forward_call = buffer_callback(forward_cb, (rows, per_row), vmap_method=VMAP_METHOD)
    backward_call = buffer_callback(backward_cb, jax.ShapeDtypeStruct(logits.shape, np.float32),
                                    vmap_method=VMAP_METHOD)

    return apply_with_kernel_vjp(forward_call, backward_call, logits, labels)


def apply_with_kernel_vjp(forward_call, backward_call, logits, labels):
    """``forward_call(z, y) -> (loss, saved)`` as an op whose gradient is ``backward_call(z, y, saved, dloss)``.

    Shared by the CPU and CUDA bridges: only the buffer callbacks differ. Labels get no cotangent.
    """

    @jax.custom_vjp
    def op(z, y):
        return forward_call(z, y)[0]

    def fwd(z, y):
        loss, saved = forward_call(z, y)
        return loss, (z, y, saved)

    def bwd(residuals, dloss):
        z, y, saved = residuals
        return backward_call(z, y, saved, dloss.astype(np.float32)), None

    op.defvjp(fwd, bwd)
    return op(logits, labels)

"""Sigmoid (multi-label / binary) cross-entropy CUDA kernels, forward and backward.

Device code only (Numba CUDA, NumPy, math); import explicitly and lazily, as ``cuda_softmax_ce``. Same losses,
options and special values as the CPU kernels in ``sigmoid_ce.py``. Per entry, ``ybar = (1 - eps) y + eps / 2``:

    elem = pw ybar softplus(-z) + (1 - ybar) softplus(z)
    d elem / dz = sigmoid(z) (pw ybar + 1 - ybar) - pw ybar

Entries whose label equals ``missing_label`` (with ``has_missing``) are dropped; the row loss is their sum, or
(``mean_over_labels``) that sum over the number present (0 when none is). The forward also writes that number
to ``saved[:, 0]``, so the backward is one elementwise pass with no reduction. Layouts as in ``cuda_softmax_ce``:
one block per row (tree sum in shared memory) above SMALL_C_MAX labels, one thread per row at or below it.
"""

import numpy as np
from numba import cuda, float32

from ._cuda_config import SIGMOID_SAVED_WIDTH, UNROLL
from .cuda_softmax_ce import ONE, ZERO, _row_range, as_device, exp32, launch, log1p32

_f32 = np.float32
HALF = _f32(0.5)

SAVED_WIDTH = SIGMOID_SAVED_WIDTH


@cuda.jit(device=True)
def _elem_loss(x, ybar, pw):
    # softplus(+-z) = max(+-z, 0) + log(1 + exp(-|z|)): -log(1 - sigmoid(z)) and -log sigmoid(z), no overflow
    soft = log1p32(exp32(-abs(x)))
    sp_pos = (x if x > ZERO else ZERO) + soft
    sp_neg = (-x if x < ZERO else ZERO) + soft
    return pw * ybar * sp_neg + (ONE - ybar) * sp_pos


@cuda.jit(device=True)
def _sigmoid(x):
    e = exp32(-abs(x))
    r = ONE / (ONE + e)
    return r if x >= ZERO else e * r


@cuda.jit(device=True)
def _block_sum2(a, b):
    """(sum a, sum b) over the block (a power of two), valid in thread 0; every thread must call it."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, float32)
    sm[tid] = a
    sm[nt + tid] = b
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            a += sm[tid + half]
            b += sm[nt + tid + half]
            sm[tid] = a
            sm[nt + tid] = b
        cuda.syncthreads()
        half //= 2
    return a, b


@cuda.jit
def _sigmoid_fwd(z, labels, loss_out, saved_out, pw, eps, missing, has_missing, mean_over_labels, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    one_m_eps = ONE - eps
    eps_half = HALF * eps
    total = ZERO
    count = ZERO
    xs = cuda.local.array(UNROLL, float32)
    ys = cuda.local.array(UNROLL, float32)
    # 1. stream the row (UNROLL loads of logits and labels in flight), summing present entries and counting them
    while j + (UNROLL - 1) * jstep < c:
        for k in range(UNROLL):
            xs[k] = _f32(z[row, j + k * jstep])
        for k in range(UNROLL):
            ys[k] = _f32(labels[row, j + k * jstep])
        for k in range(UNROLL):
            e = _elem_loss(xs[k], one_m_eps * ys[k] + eps_half, pw[j + k * jstep])
            present = not has_missing or ys[k] != missing
            total += e if present else ZERO
            count += ONE if present else ZERO
        j += UNROLL * jstep
    while j < c:
        y = _f32(labels[row, j])
        e = _elem_loss(_f32(z[row, j]), one_m_eps * y + eps_half, pw[j])
        present = not has_missing or y != missing
        total += e if present else ZERO
        count += ONE if present else ZERO
        j += jstep
    # 2. combine the threads' sums; thread 0 writes the row
    if not per_thread:
        total, count = _block_sum2(total, count)
        if cuda.threadIdx.x != 0:
            return
    if mean_over_labels:
        total = total / count if count > ZERO else ZERO
    loss_out[row] = total
    saved_out[row, 0] = count


@cuda.jit
def _sigmoid_bwd(z, labels, saved, dloss, grad_out, pw, eps, missing, has_missing, mean_over_labels, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    one_m_eps = ONE - eps
    eps_half = HALF * eps
    scale = dloss[row]
    if mean_over_labels:
        count = saved[row, 0]
        scale = scale / count if count > ZERO else ZERO
    xs = cuda.local.array(UNROLL, float32)
    ys = cuda.local.array(UNROLL, float32)
    # grad = dloss / count * (sigmoid(z) (pw ybar + 1 - ybar) - pw ybar), 0 where the label is missing
    while j + (UNROLL - 1) * jstep < c:
        for u in range(UNROLL):
            xs[u] = _f32(z[row, j + u * jstep])
        for u in range(UNROLL):
            ys[u] = _f32(labels[row, j + u * jstep])
        for u in range(UNROLL):
            jj = j + u * jstep
            ybar = one_m_eps * ys[u] + eps_half
            pwy = pw[jj] * ybar
            v = scale * (_sigmoid(xs[u]) * (pwy + ONE - ybar) - pwy)
            grad_out[row, jj] = ZERO if (has_missing and ys[u] == missing) else v
        j += UNROLL * jstep
    while j < c:
        y = _f32(labels[row, j])
        ybar = one_m_eps * y + eps_half
        pwy = pw[j] * ybar
        v = scale * (_sigmoid(_f32(z[row, j])) * (pwy + ONE - ybar) - pwy)
        grad_out[row, j] = ZERO if (has_missing and y == missing) else v
        j += jstep


def sigmoid_ce_fwd(logits, labels2d, loss_out, saved_out, pos_weight, label_smoothing, missing_label, has_missing,
                   mean_over_labels, stream=0):
    """Sigmoid CE forward: writes loss_out[N] and saved_out[N, 1] (number of present labels), float32.

    logits float32 (or float16) and labels2d float32 [N, L], pos_weight float32 [L], all on the device.
    """
    z = as_device(logits)
    args = (z, as_device(labels2d), as_device(loss_out), as_device(saved_out), as_device(pos_weight),
            _f32(label_smoothing), _f32(missing_label), bool(has_missing), bool(mean_over_labels))
    launch(_sigmoid_fwd, z.shape[0], z.shape[1], stream, args, 2)


def sigmoid_ce_bwd(logits, labels2d, saved, dloss, grad_out, pos_weight, label_smoothing, missing_label,
                   has_missing, mean_over_labels, stream=0):
    """Sigmoid CE backward: writes grad_out[N, L] = dloss[:, None] * d loss / d logits (0 where dropped)."""
    z = as_device(logits)
    args = (z, as_device(labels2d), as_device(saved), as_device(dloss), as_device(grad_out), as_device(pos_weight),
            _f32(label_smoothing), _f32(missing_label), bool(has_missing), bool(mean_over_labels))
    launch(_sigmoid_bwd, z.shape[0], z.shape[1], stream, args, 0)

"""Sigmoid (multi-label / binary) cross-entropy and sigmoid focal CUDA kernels, forward and backward, and the
row helpers that every elementwise CUDA kernel is built from.

Device code only (Numba CUDA, NumPy, math); import explicitly and lazily, as ``cuda_softmax_ce``. Same losses,
options and special values as the CPU kernels in ``sigmoid_ce.py`` and ``focal.py``. Per entry,
``ybar = (1 - eps) y + eps / 2``, ``s(z) = sigmoid(z)``:

    elem = pw ybar softplus(-z) + (1 - ybar) softplus(z)
    d elem / dz = (1 - ybar) s(z) - pw ybar s(-z)          # exact (-e^-z, not 0) for confident logits

Entries whose label equals ``missing_label`` (with ``has_missing``) are dropped; the row loss is their sum, or
(``mean_over_labels``) that sum over the number present (0 when none is). The forward also writes that number
to ``saved[:, 0]``, so the backward is one elementwise pass with no reduction. Layouts as in ``cuda_softmax_ce``:
one block per row (tree sum in shared memory) above SMALL_C_MAX labels, one thread per row at or below it.

Sigmoid focal (``focal.py`` has the formulas): the mean over the row of ``alpha_t (1 - p_t)^gamma bce``; nothing
is saved (``saved`` is left as it is), the backward recomputes each entry's derivative.

Row helpers: :func:`row_fold` / :func:`row_loop` turn a device function of one entry into the loop over this
thread's entries of a row (UNROLL loads of the inputs and labels in flight), :func:`block_sum2` combines the
block's sums in shared memory. A kernel is then its per-entry function plus what it does with the row's sums.
"""

import numpy as np
from numba import cuda, float32

from ._cuda_config import SIGMOID_SAVED_WIDTH, UNROLL
from .cuda_softmax_ce import ONE, TWO, ZERO, _row_range, exp32, log1p32, pow32, run_rows, safe_mul32

_f32 = np.float32
HALF = _f32(0.5)

SAVED_WIDTH = SIGMOID_SAVED_WIDTH


# ---------------------------------------------------------------------------------------------------------------
# Row helpers
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def block_sum2(a, b):
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


def row_fold(entry, combine):
    """``fold(x, labels, out, row, j, jstep, args, a, b) -> (a, b)``: starting from ``(a, b)``, for the entries
    ``col = j, j + jstep, ...`` of a row (``labels.shape[1]`` of them), ``(u, v) = entry(x[row, col],
    labels[row, col], out, row, col, args)`` (both read as float32) and ``(a, b) = combine(a, b, u, v)``.

    One loop, no separate tail: each step loads UNROLL entries of both inputs (guarded at the row's end) before
    it uses any, so that several loads per thread are in flight.
    """

    @cuda.jit(device=True)
    def fold(x, labels, out, row, j, jstep, args, a, b):
        c = labels.shape[1]
        xs = cuda.local.array(UNROLL, float32)
        ys = cuda.local.array(UNROLL, float32)
        while j < c:
            for k in range(UNROLL):
                col = j + k * jstep
                col = col if col < c else c - 1  # in bounds; the entry is skipped below
                xs[k] = _f32(x[row, col])
                ys[k] = _f32(labels[row, col])
            for k in range(UNROLL):
                if j + k * jstep < c:
                    u, v = entry(xs[k], ys[k], out, row, j + k * jstep, args)
                    a, b = combine(a, b, u, v)
            j += UNROLL * jstep
        return a, b

    return fold


@cuda.jit(device=True)
def _add2(a, b, u, v):
    return a + u, b + v


def row_loop(entry):
    """``loop(x, labels, out, row, j, jstep, args) -> (sum u, sum v)`` over this thread's entries of a row (as
    :func:`row_fold`). A forward entry returns the terms to sum (then combine them over the block with
    :func:`block_sums`); a backward entry writes ``out`` and returns zeros."""
    fold = row_fold(entry, _add2)

    @cuda.jit(device=True)
    def loop(x, labels, out, row, j, jstep, args):
        return fold(x, labels, out, row, j, jstep, args, ZERO, ZERO)

    return loop


@cuda.jit(device=True)
def block_sums(a, b, per_thread):
    """block_sum2(a, b) in the block-per-row layout (every thread must call it), (a, b) for a thread per row."""
    if per_thread:
        return a, b
    return block_sum2(a, b)


@cuda.jit(device=True)
def writer(per_thread):
    """True in the thread that writes a row's results (thread 0 of the block, or every thread for per_thread)."""
    return per_thread or cuda.threadIdx.x == 0


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def softplus_pair(x):
    """(softplus(x), softplus(-x)) = (-log(1 - sigmoid(x)), -log sigmoid(x)): max(+-x, 0) + log(1 + exp(-|x|))."""
    soft = log1p32(exp32(-abs(x)))
    return (x if x > ZERO else ZERO) + soft, (-x if x < ZERO else ZERO) + soft


@cuda.jit(device=True)
def sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) from one e = exp(-|x|): 1 / (1 + e) and e / (1 + e), neither 1 - the other."""
    e = exp32(-abs(x))
    r = ONE / (ONE + e)
    return (r, e * r) if x >= ZERO else (e * r, r)


@cuda.jit(device=True)
def _ce_loss(x, y, out, row, col, args):
    """(elem, 1) for a present entry, (0, 0) for a missing one."""
    pw, one_m_eps, eps_half, missing, has_missing = args
    if has_missing and y == missing:
        return ZERO, ZERO
    sp_pos, sp_neg = softplus_pair(x)
    ybar = one_m_eps * y + eps_half
    # a term of weight 0 is 0 also at an infinite logit (x = +inf, y = 1: 0 * inf in the negative term)
    return safe_mul32(pw[col] * ybar, sp_neg) + safe_mul32(ONE - ybar, sp_pos), ONE


@cuda.jit(device=True)
def _ce_grad(x, y, out, row, col, args):
    # dloss / count * ((1 - ybar) sigmoid(z) - pw ybar sigmoid(-z)), 0 where the label is missing
    pw, one_m_eps, eps_half, missing, has_missing, scale = args
    p, q = sigmoid_pair(x)
    ybar = one_m_eps * y + eps_half
    v = scale * ((ONE - ybar) * p - pw[col] * ybar * q)
    out[row, col] = ZERO if (has_missing and y == missing) else v
    return ZERO, ZERO


_ce_sums = row_loop(_ce_loss)
_ce_grads = row_loop(_ce_grad)


@cuda.jit
def _sigmoid_fwd(z, labels, loss_out, saved_out, pw, eps, missing, has_missing, mean_over_labels, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    # 1. the sum of the present entries of the row, and their number
    total, count = _ce_sums(z, labels, loss_out, row, j, jstep, (pw, ONE - eps, HALF * eps, missing, has_missing))
    # 2. combined over the block; thread 0 writes the row
    total, count = block_sums(total, count, per_thread)
    if writer(per_thread):
        if mean_over_labels:
            total = total / count if count > ZERO else ZERO
        loss_out[row] = total
        saved_out[row, 0] = count


@cuda.jit
def _sigmoid_bwd(z, labels, saved, dloss, grad_out, pw, eps, missing, has_missing, mean_over_labels, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    scale = dloss[row]
    if mean_over_labels:
        count = saved[row, 0]
        scale = scale / count if count > ZERO else ZERO
    _ce_grads(z, labels, grad_out, row, j, jstep, (pw, ONE - eps, HALF * eps, missing, has_missing, scale))


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid focal
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _focal(x, label, one_m_eps, eps_half, gamma, alpha, has_alpha):
    """(elem, d elem / dz) of one entry, as focal.py's _sigmoid_focal."""
    y = one_m_eps * label + eps_half
    ny = ONE - y
    p, q = sigmoid_pair(x)
    sp_pos, sp_neg = softplus_pair(x)
    omp = y * q + ny * p  # 1 - p_t, no cancellation
    bce = (ZERO if y == ZERO else y * sp_neg) + (ZERO if ny == ZERO else ny * sp_pos)
    mod = pow32(omp, gamma)
    at = alpha * y + (ONE - alpha) * ny if has_alpha else ONE
    # d log(1 - p_t) / dz = (1 - 2y) p q / (1 - p_t); d bce / dz = (1 - y) p - y q (exact for confident logits)
    ratio = (ONE - TWO * y) * p * q / omp if omp > ZERO else ZERO
    ce = (ZERO if ny == ZERO else ny * p) - (ZERO if y == ZERO else y * q)
    return at * (mod * bce), at * (mod * (gamma * ratio * bce + ce))


@cuda.jit(device=True)
def _focal_loss(x, y, out, row, col, args):
    return _focal(x, y, *args)[0], ZERO


@cuda.jit(device=True)
def _focal_grad(x, y, out, row, col, args):
    one_m_eps, eps_half, gamma, alpha, has_alpha, scale = args
    out[row, col] = scale * _focal(x, y, one_m_eps, eps_half, gamma, alpha, has_alpha)[1]
    return ZERO, ZERO


_focal_sums = row_loop(_focal_loss)
_focal_grads = row_loop(_focal_grad)


@cuda.jit
def _sigmoid_focal_fwd(z, labels, loss_out, saved_out, gamma, alpha, has_alpha, eps, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    total, _ = _focal_sums(z, labels, loss_out, row, j, jstep, (ONE - eps, HALF * eps, gamma, alpha, has_alpha))
    total, _ = block_sums(total, ZERO, per_thread)
    if writer(per_thread):
        loss_out[row] = total / _f32(z.shape[1])


@cuda.jit
def _sigmoid_focal_bwd(z, labels, saved, dloss, grad_out, gamma, alpha, has_alpha, eps, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    args = (ONE - eps, HALF * eps, gamma, alpha, has_alpha, dloss[row] / _f32(z.shape[1]))
    _focal_grads(z, labels, grad_out, row, j, jstep, args)


# ---------------------------------------------------------------------------------------------------------------
# Host drivers
# ---------------------------------------------------------------------------------------------------------------


def sigmoid_ce_fwd(logits, labels2d, loss_out, saved_out, pos_weight, label_smoothing, missing_label, has_missing,
                   mean_over_labels, stream=0):
    """Sigmoid CE forward: writes loss_out[N] and saved_out[N, 1] (number of present labels), float32.

    logits float32 (or float16) and labels2d float32 [N, L], pos_weight float32 [L], all on the device.
    """
    run_rows(_sigmoid_fwd, (logits, labels2d, loss_out, saved_out, pos_weight),
             (_f32(label_smoothing), _f32(missing_label), bool(has_missing), bool(mean_over_labels)), stream, 2)


def sigmoid_ce_bwd(logits, labels2d, saved, dloss, grad_out, pos_weight, label_smoothing, missing_label,
                   has_missing, mean_over_labels, stream=0):
    """Sigmoid CE backward: writes grad_out[N, L] = dloss[:, None] * d loss / d logits (0 where dropped)."""
    run_rows(_sigmoid_bwd, (logits, labels2d, saved, dloss, grad_out, pos_weight),
             (_f32(label_smoothing), _f32(missing_label), bool(has_missing), bool(mean_over_labels)), stream, 0)


def sigmoid_focal_fwd(logits, labels2d, loss_out, saved_out, gamma, alpha, has_alpha, label_smoothing, stream=0):
    """Sigmoid focal CE forward: writes loss_out[N] (the mean over the C entries); saved_out is not written."""
    run_rows(_sigmoid_focal_fwd, (logits, labels2d, loss_out, saved_out),
             (_f32(gamma), _f32(alpha), bool(has_alpha), _f32(label_smoothing)), stream, 2)


def sigmoid_focal_bwd(logits, labels2d, saved, dloss, grad_out, gamma, alpha, has_alpha, label_smoothing,
                      stream=0):
    """Sigmoid focal CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits."""
    run_rows(_sigmoid_focal_bwd, (logits, labels2d, saved, dloss, grad_out),
             (_f32(gamma), _f32(alpha), bool(has_alpha), _f32(label_smoothing)), stream, 0)

"""Softmax focal cross-entropy CUDA kernels, forward and backward.

Device code only (Numba CUDA, NumPy, math); import explicitly and lazily, as ``cuda_softmax_ce``. Same loss,
options, special values and saved values as the CPU kernels in ``focal.py`` (its docstring has the formulas).

1. Forward, two reads of the row: the online max and sum of ``cuda_softmax_ce`` (then ``shift`` and ``log_sum``
   are shared with every thread of the block); then the focal terms and ``S = sum_c t_c h_c``, summed over the
   block. Thread 0 writes the loss and ``saved = (shift, log_sum, S)``.
2. Backward, one read of the row, no reduction: ``grad_c = dloss alpha (t_c h_c - p_c S)``.

Layouts as in ``cuda_softmax_ce``: one block per row above SMALL_C_MAX classes, one thread per row at or below it.
"""

import numpy as np
from numba import cuda, float32

from ._cuda_config import SOFTMAX_SAVED_WIDTH
from .cuda_sigmoid_ce import block_sums, row_fold, row_loop, writer
from .cuda_softmax_ce import (
    NEG_INF,
    ONE,
    ZERO,
    _block_reduce,
    _push,
    _row_range,
    _shift_logsum,
    exp32,
    expm1_32,
    pow32,
    run_rows,
)

_f32 = np.float32
INF = _f32(np.inf)

# (shift, log_sum, S), as the softmax kernels' (shift, log_sum, W)
SAVED_WIDTH = SOFTMAX_SAVED_WIDTH


@cuda.jit(device=True)
def _terms(x, label, args):
    """(loss term, t h, p) of one class, as focal.py's _softmax_focal; args starts (1 - eps, eps / C, shift,
    log_sum, gamma)."""
    one_m_eps, eps_c, shift, log_sum, gamma = args[:5]
    t = one_m_eps * label + eps_c
    log_p = (x - shift) - log_sum
    p = exp32(log_p)
    omp = -expm1_32(log_p)  # 1 - p without cancellation as p -> 1
    mod = pow32(omp, gamma)
    weight = t * mod
    term = ZERO if weight == ZERO else weight * -log_p
    # p log p / (1 - p) -> -1 as p -> 1 and -> 0 as p -> 0 (a masked class)
    ratio = -ONE if log_p == ZERO else (ZERO if p == ZERO else p * log_p / omp)
    return term, ZERO if t == ZERO else t * (mod * (gamma * ratio - ONE)), p


@cuda.jit(device=True)
def _loss(x, y, out, row, col, args):
    term, th, _ = _terms(x, y, args)
    return term, th


@cuda.jit(device=True)
def _grad(x, y, out, row, col, args):
    # dloss alpha (t h - p S); args = (as for _terms, dloss alpha, S, all -inf row?)
    _, th, p = _terms(x, y, args)
    k, big_s, dead = args[5:]
    out[row, col] = ZERO if dead else k * (th - p * big_s)  # a dead row's log p is NaN: its gradient is 0
    return ZERO, ZERO


_sums = row_loop(_loss)
_grads = row_loop(_grad)


@cuda.jit(device=True)
def _logit(x, y, out, row, col, args):
    return x, ZERO


@cuda.jit(device=True)
def _online(m, s, x, unused):
    """Add logit x to the running (max m, sum s of exp(z - m)) (Milakov & Gimelshein 2018)."""
    m, s, _, _ = _push(m, s, ZERO, ZERO, x, ZERO, False)
    return m, s


_max_sum = row_fold(_logit, _online)


@cuda.jit(device=True)
def _shift_and_log_sum(z, labels, out, row, j, jstep, per_thread):
    """(shift, log_sum) of the row, in every thread of the block: an online max and sum, then shared."""
    m, s = _max_sum(z, labels, out, row, j, jstep, (ZERO,), NEG_INF, ZERO)
    if not per_thread:
        m, s, _, _ = _block_reduce(m, s, ZERO, ZERO)
        sm = cuda.shared.array(0, float32)
        if cuda.threadIdx.x == 0:
            sm[0] = m
            sm[1] = s
        cuda.syncthreads()
        m = sm[0]
        s = sm[1]
        cuda.syncthreads()  # every thread has read them before the shared memory is used again
    return _shift_logsum(m, s)


@cuda.jit
def _softmax_focal_fwd(z, labels, loss_out, saved_out, gamma, alpha, eps, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    # 1. shift and log_sum (first read of the row), 2. the focal terms and S = sum t h (second read)
    shift, log_sum = _shift_and_log_sum(z, labels, loss_out, row, j, jstep, per_thread)
    loss, big_s = _sums(z, labels, loss_out, row, j, jstep, (ONE - eps, eps / _f32(z.shape[1]), shift, log_sum, gamma))
    loss, big_s = block_sums(loss, big_s, per_thread)
    if writer(per_thread):
        loss_out[row] = INF if log_sum == NEG_INF else alpha * loss
        saved_out[row, 0] = shift
        saved_out[row, 1] = log_sum
        saved_out[row, 2] = big_s


@cuda.jit
def _softmax_focal_bwd(z, labels, saved, dloss, grad_out, gamma, alpha, eps, per_thread):
    row, j, jstep = _row_range(z.shape[0], per_thread)
    if row >= z.shape[0]:
        return
    log_sum = saved[row, 1]
    args = (ONE - eps, eps / _f32(z.shape[1]), saved[row, 0], log_sum, gamma, alpha * dloss[row], saved[row, 2],
            log_sum == NEG_INF)
    _grads(z, labels, grad_out, row, j, jstep, args)


def softmax_focal_fwd(logits, labels2d, loss_out, saved_out, gamma, alpha, label_smoothing, stream=0):
    """Softmax focal CE forward: writes loss_out[N] and saved_out[N, 3] = (shift, log_sum, S), float32.

    logits float32 (or float16) and labels2d float32 [N, C], on the device; alpha: 1.0 for none.
    """
    run_rows(_softmax_focal_fwd, (logits, labels2d, loss_out, saved_out), (_f32(gamma), _f32(alpha),
             _f32(label_smoothing)), stream, 4)


def softmax_focal_bwd(logits, labels2d, saved, dloss, grad_out, gamma, alpha, label_smoothing, stream=0):
    """Softmax focal CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits."""
    run_rows(_softmax_focal_bwd, (logits, labels2d, saved, dloss, grad_out), (_f32(gamma), _f32(alpha),
             _f32(label_smoothing)), stream, 0)

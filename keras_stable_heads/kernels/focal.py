"""Focal cross-entropy kernels (Lin et al. 2017), sigmoid and softmax, forward and backward.

Both follow ``keras_stable_heads.ops`` term for term (the kernels must equal the portable path), in log space.

Sigmoid focal, per entry, ``y = (1 - eps) label + eps / 2``, ``p = s(z)``, ``q = s(-z)`` (both from one exp)::

    1 - p_t = y q + (1 - y) p                               # no 1 - p cancellation
    bce     = y softplus(-z) + (1 - y) softplus(z)          # each term 0 when its weight is 0
    elem    = alpha_t (1 - p_t)^gamma bce,   alpha_t = alpha y + (1 - alpha)(1 - y), or 1 without alpha
    d elem / dz = alpha_t (1 - p_t)^gamma (gamma r bce + (1 - y) p - y q),
    r = (1 - 2y) p q / (1 - p_t)  (0 where 1 - p_t = 0)

and the row loss is the mean over the C entries. ``(1 - y) p - y q`` is the cross-entropy's exact gradient: at
``z = 20, y = 1`` it is ``-s(-20)``, not ``s(20) - 1``, which float32 rounds to 0.

Softmax focal, per row, target ``t = (1 - eps) y + eps / C``, ``log p = (z - shift) - log_sum`` (``shift`` the row
max, 0 if not finite; ``log_sum = log sum exp(z - shift)``), ``1 - p = -expm1(log p)``::

    loss   = alpha sum_c [t_c (1-p_c)^gamma != 0] t_c (1 - p_c)^gamma (-log p_c)     (+inf for an all -inf row)
    grad_c = alpha (t_c h_c - p_c S),   h = (1 - p)^gamma (gamma p log p / (1 - p) - 1),   S = sum_c t_c h_c

with ``p log p / (1 - p)`` taken as -1 at ``p = 1`` and 0 at ``p = 0``. The forward reads the row three times
(max; sum; terms) and saves ``(shift, log_sum, S)`` per row; the backward writes the gradient in one pass from
them. A masked class (``-inf`` logit, no target mass) gets a finite loss and exactly zero gradient.

``(1 - p_t)^gamma`` is :func:`pow_unit`: the integer part of gamma (up to 7) by multiplication, exact to a few
ulp (so the default ``gamma = 2`` is ``x * x``), any fraction as ``exp(frac * log x)``.

Layouts: softmax focal works one row per thread, vectorized along the row. Sigmoid focal is elementwise: for
``C > FLAT_C_MAX`` likewise; for smaller C (a binary head has C = 1, shorter than a vector) each thread takes a
block of ``FLAT_BLOCK // C`` whole rows, computes the entries as one flat vectorized loop into a stack buffer
(forward) or the output (backward), then reduces (forward) or scales (backward) per row.
"""

import math

import numpy as np
from numba import carray, njit, prange

from ._config import FASTMATH, FLAT_BLOCK, FLAT_C_MAX
from ._simd import (
    INF,
    NEG_INF,
    ONE,
    TWO,
    ZERO,
    exp_f32,
    exp_nonpos_f32,
    log_f32,
    select_f32,
    stack_scratch_f32,
    sub_exact,
)
from .sigmoid_ce import sigmoid_pair, softplus_pair
from .softmax_ce import _row_max, _row_sumexp, _shift_of, next_row

_f32 = np.float32
_u = np.uint64
_inline = {"inline": "always", "fastmath": FASTMATH, "error_model": "numpy"}

# ---------------------------------------------------------------------------------------------------------------
# Elementary pieces (inlined, vectorizable)
# ---------------------------------------------------------------------------------------------------------------

_TINY = _f32(np.finfo(np.float32).tiny)  # 2^-126, the smallest normal float32
_TWO_24 = _f32(2.0 ** 24)
_LN2_TIMES_24 = _f32(24.0 * np.log(2.0))
_MAX_INT_GAMMA = 7  # the integer part of gamma taken by multiplication: x, x^2, x^4 and their products


@njit(**_inline)
def log_unit(x):
    """log x for x in [0, 1], denormals included (log_f32 takes normal numbers): those are scaled by 2^24 first."""
    small = x < _TINY
    return log_f32(select_f32(small, x * _TWO_24, x)) - select_f32(small, _LN2_TIMES_24, ZERO)


@njit(**_inline)
def gamma_parts(gamma):
    """gamma as (bit 1, bit 2, bit 4 of its integer part up to 7, the rest, whether there is a rest)."""
    whole = np.int64(min(gamma, _f32(_MAX_INT_GAMMA)))  # clamp first: a float -> int conversion of 1e30 is poison
    frac = gamma - _f32(whole)
    return (whole & 1) != 0, (whole & 2) != 0, (whole & 4) != 0, frac, frac != ZERO


@njit(fastmath=FASTMATH, error_model="numpy")  # called once per kernel; Numba-inlined it confuses parfors
def _setup(gamma, eps, share):
    """(1 - eps, eps / share, gamma_parts(gamma)): loop invariants (labels become (1 - eps) y + eps / share)."""
    return ONE - eps, eps / share, gamma_parts(gamma)


@njit(**_inline)
def pow_unit(x, parts):
    """x ** gamma for x in [0, 1] (or NaN), gamma given as gamma_parts(gamma); x ** 0 is 1, also for x = 0 and NaN."""
    b1, b2, b4, frac, has_frac = parts
    x2 = x * x
    p = select_f32(b1, x, ONE) * select_f32(b2, x2, ONE) * select_f32(b4, x2 * x2, ONE)
    if has_frac:  # loop-invariant: LLVM hoists the test out of the loop
        p = p * exp_f32(frac * log_unit(x))
    return p


# 1/9!, 1/8!, ..., 1/2!: the Taylor coefficients of (expm1(x) - x) / x^2, highest first (Horner)
_EXPM1_TAYLOR = tuple(_f32(1.0 / math.factorial(k)) for k in range(9, 1, -1))
_EXPM1_POLY_MIN = _f32(-0.5)


@njit(**_inline)
def one_minus_exp(x, e):
    """1 - exp(x) = -expm1(x) for x <= 0 with e = exp(x): Taylor to degree 9 on [-1/2, 0] (error < 1e-9, no
    cancellation as exp(x) -> 1), 1 - e below (where 1 - e >= 0.39 has none)."""
    q = ZERO
    for coef in _EXPM1_TAYLOR:
        q = q * x + coef
    poly = -(q * (x * x) + x)
    return select_f32(x >= _EXPM1_POLY_MIN, poly, ONE - e)


@njit(**_inline)
def _safe_mul(w, x):
    # 0 * x == 0 even for x = inf (a zero-weight term of a cross-entropy), as numerics.safe_mul
    return select_f32(w == ZERO, ZERO, w * x)


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid focal
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _sigmoid_focal(z, label, one_m_eps, eps_half, parts, gamma, alpha, has_alpha):
    """(elem, d elem / dz) of one entry; the forward uses the first, the backward the second (LLVM drops the rest)."""
    y = one_m_eps * label + eps_half
    ny = ONE - y
    p, q = sigmoid_pair(z)
    sp_pos, sp_neg = softplus_pair(z)
    omp = y * q + ny * p  # 1 - p_t
    bce = _safe_mul(y, sp_neg) + _safe_mul(ny, sp_pos)
    mod = pow_unit(omp, parts)
    at = select_f32(has_alpha, alpha * y + (ONE - alpha) * ny, ONE)
    # d log(1 - p_t) / dz = (1 - 2y) p q / (1 - p_t); 0 where 1 - p_t underflowed (the modulator is 0 there too)
    positive = omp > ZERO
    ratio = select_f32(positive, (ONE - TWO * y) * p * q / select_f32(positive, omp, ONE), ZERO)
    # d bce / dz = (1 - y) p - y q, the cross-entropy's exact form
    grad = mod * (gamma * ratio * bce + (_safe_mul(ny, p) - _safe_mul(y, q)))
    return at * (mod * bce), at * grad


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_focal_fwd_rows(logits, labels, loss_out, gamma, alpha, has_alpha, eps):
    n, c = logits.shape
    one_m_eps, eps_half, parts = _setup(gamma, eps, TWO)
    for i in prange(n):
        total = ZERO
        for j in range(c):
            total += _sigmoid_focal(logits[i, j], labels[i, j], one_m_eps, eps_half, parts, gamma, alpha, has_alpha)[0]
        loss_out[i] = total / _f32(c)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_focal_bwd_rows(logits, labels, dloss, grad_out, gamma, alpha, has_alpha, eps):
    n, c = logits.shape
    one_m_eps, eps_half, parts = _setup(gamma, eps, TWO)
    for i in prange(n):
        scale = dloss[i] / _f32(c)
        for j in range(c):
            g = _sigmoid_focal(logits[i, j], labels[i, j], one_m_eps, eps_half, parts, gamma, alpha, has_alpha)[1]
            grad_out[i, j] = g * scale


_scratch = stack_scratch_f32(FLAT_BLOCK)


@njit(fastmath=FASTMATH, error_model="numpy")
def _flat_layout(n, c):
    """(rows per block, blocks, C as an unsigned int, C as a float32) of the flat layout."""
    rows = FLAT_BLOCK // c
    return rows, (n + rows - 1) // rows, _u(c), _f32(c)


@njit(**_inline)
def _flat_block(b, rows, n, c):
    """(first row, rows in block b, first flat index, flat entries) of a flat-layout block, as unsigned ints
    (Numba then emits no negative-index wraparound, which would keep the loops from vectorizing)."""
    r0 = b * rows
    m = min(rows, n - r0)
    return _u(r0), _u(m), _u(r0 * c), _u(m * c)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_focal_fwd_flat(z, y, loss_out, c, gamma, alpha, has_alpha, eps):
    # z, y: the [N, C] logits and labels flattened, C <= FLAT_C_MAX
    n = loss_out.shape[0]
    one_m_eps, eps_half, parts = _setup(gamma, eps, TWO)
    rows, blocks, uc, fc = _flat_layout(n, c)
    for b in prange(blocks):
        buf = carray(_scratch(), FLAT_BLOCK)
        r0, m, k0, count = _flat_block(b, rows, n, c)
        # 1. every entry of the block, one flat vectorized loop
        for k in range(count):
            buf[k] = _sigmoid_focal(z[k0 + k], y[k0 + k], one_m_eps, eps_half, parts, gamma, alpha, has_alpha)[0]
        # 2. the mean of each row
        for r in range(m):
            total = ZERO
            for j in range(uc):
                total += buf[r * uc + j]
            loss_out[r0 + r] = total / fc


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_focal_bwd_flat(z, y, dloss, grad, c, gamma, alpha, has_alpha, eps):
    # z, y, grad: the [N, C] arrays flattened, C <= FLAT_C_MAX
    n = dloss.shape[0]
    one_m_eps, eps_half, parts = _setup(gamma, eps, TWO)
    rows, blocks, uc, fc = _flat_layout(n, c)
    for b in prange(blocks):
        r0, m, k0, count = _flat_block(b, rows, n, c)
        # 1. d elem / dz of every entry of the block, one flat vectorized loop, into the output
        for k in range(count):
            grad[k0 + k] = _sigmoid_focal(z[k0 + k], y[k0 + k], one_m_eps, eps_half, parts, gamma, alpha, has_alpha)[1]
        # 2. times dloss / C per row (the block is still in L1)
        for r in range(m):
            scale = dloss[r0 + r] / fc
            for j in range(uc):
                grad[k0 + r * uc + j] *= scale


# ---------------------------------------------------------------------------------------------------------------
# Softmax focal
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _row_shift_log_sum(x, i, nxt):
    """(shift, log_sum) of row i: shift = max if finite, else 0; log_sum = log sum exp(z - shift) (-inf: all -inf).
    Prefetches row ``nxt`` during the exp pass where that is the faster layout (see softmax_ce.next_row and
    _config.PREFETCH; on AVX-512 hosts the exp pass is one whole-row loop)."""
    shift = _shift_of(_row_max(x, i))
    return shift, np.log(_row_sumexp(x, i, shift, nxt))


@njit(**_inline)
def _softmax_focal(z, t, shift, log_sum, parts, gamma):
    """(loss term, t h, p) of one class with target t."""
    # (z - shift) - log_sum, never z - (shift + log_sum) (which rounds at |z| ~ 1e4)
    log_p = sub_exact(z - shift, log_sum)
    p = exp_nonpos_f32(log_p)
    # 1 - p == -expm1(log p): exact as p -> 1
    omp = one_minus_exp(log_p, p)
    mod = pow_unit(omp, parts)
    weight = t * mod
    term = select_f32(weight == ZERO, ZERO, weight * -log_p)
    # p log p / (1 - p) -> -1 as p -> 1 and -> 0 as p -> 0 (a masked class)
    ratio = select_f32(log_p == ZERO, -ONE, select_f32(p == ZERO, ZERO, p * log_p / omp))
    return term, _safe_mul(t, mod * (gamma * ratio - ONE)), p


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_focal_fwd_rows(logits, labels, loss_out, saved_out, gamma, alpha, eps):
    n, c = logits.shape
    one_m_eps, eps_c, parts = _setup(gamma, eps, _f32(c))
    for i in prange(n):
        shift, log_sum = _row_shift_log_sum(logits, i, next_row(i, n, c))
        loss = ZERO
        big_s = ZERO
        for j in range(c):
            term, th, _ = _softmax_focal(logits[i, j], one_m_eps * labels[i, j] + eps_c, shift, log_sum, parts, gamma)
            loss += term
            big_s += th
        loss_out[i] = INF if log_sum == NEG_INF else alpha * loss
        saved_out[i, 0] = shift
        saved_out[i, 1] = log_sum
        saved_out[i, 2] = big_s


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_focal_bwd_rows(logits, labels, saved, dloss, grad_out, gamma, alpha, eps):
    n, c = logits.shape
    one_m_eps, eps_c, parts = _setup(gamma, eps, _f32(c))
    for i in prange(n):
        shift = saved[i, 0]
        log_sum = saved[i, 1]
        big_s = saved[i, 2]
        if log_sum == NEG_INF:  # an all -inf row: nothing to learn, zero gradient (its log p would be NaN)
            for j in range(c):
                grad_out[i, j] = ZERO
            continue
        k = alpha * dloss[i]
        for j in range(c):
            _, th, p = _softmax_focal(logits[i, j], one_m_eps * labels[i, j] + eps_c, shift, log_sum, parts, gamma)
            grad_out[i, j] = k * (th - p * big_s)


# ---------------------------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------------------------


def flat(a):
    """A 1-D view of a C-contiguous array; raises rather than copy (a copy of an output would be lost)."""
    view = a.view()
    view.shape = (a.size,)
    return view


def sigmoid_focal_fwd(logits, labels2d, loss_out, gamma, alpha, has_alpha, label_smoothing):
    """Sigmoid focal CE forward: writes loss_out[N] (mean over the C entries); logits, labels2d float32 [N, C]."""
    n, c = logits.shape
    args = (_f32(gamma), _f32(alpha), bool(has_alpha), _f32(label_smoothing))
    if c == 0:
        loss_out[:] = np.nan  # the mean of no entries, as the portable path's 0 / 0
    elif c <= FLAT_C_MAX:
        _sigmoid_focal_fwd_flat(flat(logits), flat(labels2d), loss_out, c, *args)
    else:
        _sigmoid_focal_fwd_rows(logits, labels2d, loss_out, *args)


def sigmoid_focal_bwd(logits, labels2d, dloss, grad_out, gamma, alpha, has_alpha, label_smoothing):
    """Sigmoid focal CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits."""
    n, c = logits.shape
    args = (_f32(gamma), _f32(alpha), bool(has_alpha), _f32(label_smoothing))
    if c == 0:
        return
    if c <= FLAT_C_MAX:
        _sigmoid_focal_bwd_flat(flat(logits), flat(labels2d), dloss, flat(grad_out), c, *args)
    else:
        _sigmoid_focal_bwd_rows(logits, labels2d, dloss, grad_out, *args)


def softmax_focal_fwd(logits, labels2d, loss_out, saved_out, gamma, alpha, label_smoothing):
    """Softmax focal CE forward: writes loss_out[N] and saved_out[N, 3] = (shift, log_sum, S), float32.

    logits, labels2d: C-contiguous float32 [N, C]; alpha: 1.0 for none.
    """
    _softmax_focal_fwd_rows(logits, labels2d, loss_out, saved_out, _f32(gamma), _f32(alpha), _f32(label_smoothing))


def softmax_focal_bwd(logits, labels2d, saved, dloss, grad_out, gamma, alpha, label_smoothing):
    """Softmax focal CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits."""
    _softmax_focal_bwd_rows(logits, labels2d, saved, dloss, grad_out, _f32(gamma), _f32(alpha),
                            _f32(label_smoothing))

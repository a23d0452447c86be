"""Softmax cross-entropy kernels (sparse integer labels and dense label distributions), forward and backward.

Notation per row: ``z`` logits, ``z' = softcap(z) = cap * tanh(z / cap)`` (``-inf`` stays ``-inf``), C classes,
``eps`` label smoothing, ``w`` class weights, target ``ybar = (1 - eps) * y + eps / C``,
``lse = logsumexp(z')``, ``p = exp(z' - lse)``, ``W = sum_c w_c ybar_c``.

    loss   = sum_c w_c ybar_c (lse - z'_c)  [terms with w_c ybar_c == 0 skipped]  + z_loss * lse^2
    grad_c = dloss * softcap'(z_c) * (p_c (W + 2 z_loss lse) - w_c ybar_c),   softcap' = 1 - (z' / cap)^2

The forward writes ``loss`` and ``lse`` per row; the backward reads the logits and ``lse`` and writes the
gradient, each in one pass over the logits. A row whose logits are all ``-inf`` has ``lse = -inf``,
``loss = +inf`` and a zero gradient. Sparse only: a row whose label equals ``ignore_class`` (with
``has_ignore``) gets loss 0, lse 0 and a zero gradient; a label outside [0, C) gets a NaN loss and gradient.

Numerics: ``lse = m + log(sum_c exp(z'_c - m))`` with ``m`` the row max (``m = 0`` when it is not finite, which
maps an all ``-inf`` row to ``-inf`` and a ``+inf`` logit to ``+inf``, as the float64 reference does), and
``lse - z'_c`` is computed as ``(m - z'_c) + log(sum)``, which has no cancellation when ``z'_c`` is the max.
Sums are float32 in vector lanes (``reassoc``), as accurate as float64 accumulation at these sizes.

Layouts: for ``C > SMALL_C_MAX`` one thread works on one row at a time and vectorizes along the row. For small
C a row is shorter than a vector, so ``ROW_BLOCK`` rows are processed together and the loops run down a column
of the block (vectorized across rows); the forward uses ``lse_out``/``loss_out`` as the per-row accumulators.
"""

import numpy as np
from numba import njit, prange

from ._config import FASTMATH, ROW_BLOCK, SMALL_C_MAX
from ._simd import INF, NAN, NEG_INF, ONE, TWO, ZERO, exp_nonpos_f32, maxnum_f32, tanh_f32

_f32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Elementwise pieces. Every helper is inlined by Numba (a call in a loop stops vectorization, and passing a row
# view to a function that is not inlined costs an atomic reference count per row); rows are addressed as
# (array, i) so that no view is created.
# ---------------------------------------------------------------------------------------------------------------

_inline = {"inline": "always", "fastmath": FASTMATH, "error_model": "numpy"}


@njit(**_inline)
def _softcap(z, cap, inv_cap):
    """cap * tanh(z / cap), keeping -inf as -inf (a masked class stays masked)."""
    zc = cap * tanh_f32(z * inv_cap)
    return NEG_INF if z == NEG_INF else zc


@njit(**_inline)
def _shift_of(m):
    """The max used as the exp shift: m if finite, else 0."""
    return m if (m > NEG_INF and m < INF) else ZERO


@njit(**_inline)
def _inv(cap):
    return ONE / cap if cap > ZERO else ZERO


@njit(**_inline)
def _weight_sum(w):
    total = ZERO
    for j in range(w.shape[0]):
        total += w[j]
    return total


@njit(**_inline)
def _fill(out, i, value):
    for j in range(out.shape[1]):
        out[i, j] = value


# ---------------------------------------------------------------------------------------------------------------
# Row reductions (large C): one row, vectorized along it
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _row_max(x, i):
    # llvm.maxnum ignores NaN; a NaN logit still reaches the loss through the sum of exps.
    m = NEG_INF
    for j in range(x.shape[1]):
        m = maxnum_f32(m, x[i, j])
    return m


@njit(**_inline)
def _row_sumexp(x, i, shift):
    s = ZERO
    for j in range(x.shape[1]):
        s += exp_nonpos_f32(x[i, j] - shift)
    return s


@njit(**_inline)
def _row_sumexp_cap(x, i, shift, cap, inv_cap):
    s = ZERO
    for j in range(x.shape[1]):
        s += exp_nonpos_f32(_softcap(x[i, j], cap, inv_cap) - shift)
    return s


@njit(**_inline)
def _row_sumexp_gap(x, i, shift, w):
    """(sum_j exp(z_j - shift), sum_j w_j (shift - z_j))."""
    s = ZERO
    g = ZERO
    for j in range(x.shape[1]):
        z = x[i, j]
        s += exp_nonpos_f32(z - shift)
        g += w[j] * (shift - z)
    return s, g


@njit(**_inline)
def _row_sumexp_gap_cap(x, i, shift, w, cap, inv_cap):
    s = ZERO
    g = ZERO
    for j in range(x.shape[1]):
        z = _softcap(x[i, j], cap, inv_cap)
        s += exp_nonpos_f32(z - shift)
        g += w[j] * (shift - z)
    return s, g


@njit(**_inline)
def _row_gap(x, i, shift, w, cap, inv_cap):
    """sum_j w_j (shift - z'_j) (used by the small-C layout, where C <= SMALL_C_MAX)."""
    g = ZERO
    if cap > ZERO:
        for j in range(x.shape[1]):
            g += w[j] * (shift - _softcap(x[i, j], cap, inv_cap))
    else:
        for j in range(x.shape[1]):
            g += w[j] * (shift - x[i, j])
    return g


@njit(**_inline)
def _sparse_loss(shift, s, gap, zy, wy, wsum, one_m_eps, eps_c, z_loss, has_eps):
    """Loss and lse of one sparse row from its reductions; s == 0 means an all -inf row."""
    d = np.log(s)
    lse = shift + d
    # (1 - eps) w_y (lse - z'_y) + eps/C sum_c w_c (lse - z'_c), with lse - z' = (shift - z') + d.
    loss = one_m_eps * wy * ((shift - zy) + d)
    if has_eps:
        loss += eps_c * (gap + wsum * d)
    if z_loss != ZERO:
        loss += z_loss * lse * lse
    if s == ZERO:
        loss = INF
    return loss, lse


# ---------------------------------------------------------------------------------------------------------------
# Sparse forward
# ---------------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sparse_fwd_rows(logits, labels, loss_out, lse_out, w, eps, z_loss, cap, ignore_class, has_ignore):
    n, c = logits.shape
    wsum = _weight_sum(w)
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_eps = eps != ZERO
    has_cap = cap > ZERO
    inv_cap = _inv(cap)
    for i in prange(n):
        y = np.int64(labels[i])
        if has_ignore and y == ignore_class:
            loss_out[i] = ZERO
            lse_out[i] = ZERO
            continue
        m = _row_max(logits, i)
        gap = ZERO
        if has_cap:
            # softcap is increasing, so max(z') = softcap(max(z)).
            shift = _shift_of(_softcap(m, cap, inv_cap))
            if has_eps:
                s, gap = _row_sumexp_gap_cap(logits, i, shift, w, cap, inv_cap)
            else:
                s = _row_sumexp_cap(logits, i, shift, cap, inv_cap)
        else:
            shift = _shift_of(m)
            if has_eps:
                s, gap = _row_sumexp_gap(logits, i, shift, w)
            else:
                s = _row_sumexp(logits, i, shift)
        if y < 0 or y >= c:
            lse_out[i] = shift + np.log(s)
            loss_out[i] = NAN
            continue
        zy = _softcap(logits[i, y], cap, inv_cap) if has_cap else logits[i, y]
        loss, lse = _sparse_loss(shift, s, gap, zy, w[y], wsum, one_m_eps, eps_c, z_loss, has_eps)
        loss_out[i] = loss
        lse_out[i] = lse


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sparse_fwd_blocks(logits, labels, loss_out, lse_out, w, eps, z_loss, cap, ignore_class, has_ignore):
    n, c = logits.shape
    wsum = _weight_sum(w)
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_eps = eps != ZERO
    has_cap = cap > ZERO
    inv_cap = _inv(cap)
    nblocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(nblocks):
        r0 = b * ROW_BLOCK
        r1 = min(r0 + ROW_BLOCK, n)
        # 1. Row max, down the columns of the block; lse_out[r] holds it.
        for r in range(r0, r1):
            lse_out[r] = NEG_INF
        for j in range(c):
            for r in range(r0, r1):
                lse_out[r] = maxnum_f32(lse_out[r], logits[r, j])
        # 2. The shift, into lse_out; loss_out[r] accumulates sum_j exp(z'_j - shift).
        for r in range(r0, r1):
            m = _softcap(lse_out[r], cap, inv_cap) if has_cap else lse_out[r]
            lse_out[r] = _shift_of(m)
            loss_out[r] = ZERO
        if has_cap:
            for j in range(c):
                for r in range(r0, r1):
                    loss_out[r] += exp_nonpos_f32(_softcap(logits[r, j], cap, inv_cap) - lse_out[r])
        else:
            for j in range(c):
                for r in range(r0, r1):
                    loss_out[r] += exp_nonpos_f32(logits[r, j] - lse_out[r])
        # 3. Per row: loss and lse from the sums.
        for r in range(r0, r1):
            y = np.int64(labels[r])
            shift = lse_out[r]
            s = loss_out[r]
            if has_ignore and y == ignore_class:
                loss_out[r] = ZERO
                lse_out[r] = ZERO
            elif y < 0 or y >= c:
                loss_out[r] = NAN
                lse_out[r] = shift + np.log(s)
            else:
                gap = _row_gap(logits, r, shift, w, cap, inv_cap) if has_eps else ZERO
                zy = _softcap(logits[r, y], cap, inv_cap) if has_cap else logits[r, y]
                loss, lse = _sparse_loss(shift, s, gap, zy, w[y], wsum, one_m_eps, eps_c, z_loss, has_eps)
                loss_out[r] = loss
                lse_out[r] = lse


# ---------------------------------------------------------------------------------------------------------------
# Sparse backward
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _row_grad(x, out, i, lse, k):
    # grad_j = p_j K
    for j in range(x.shape[1]):
        out[i, j] = exp_nonpos_f32(x[i, j] - lse) * k


@njit(**_inline)
def _row_grad_eps(x, out, i, lse, k, a, w):
    # grad_j = p_j K - a w_j, a = dloss eps / C
    for j in range(x.shape[1]):
        out[i, j] = exp_nonpos_f32(x[i, j] - lse) * k - a * w[j]


@njit(**_inline)
def _row_grad_cap(x, out, i, lse, k, cap, inv_cap):
    # grad_j = softcap'(z_j) p_j K, softcap' = 1 - tanh^2 (0 at -inf, so a masked class gets exactly 0)
    for j in range(x.shape[1]):
        z = x[i, j]
        t = tanh_f32(z * inv_cap)
        zc = NEG_INF if z == NEG_INF else cap * t
        out[i, j] = (ONE - t * t) * (exp_nonpos_f32(zc - lse) * k)


@njit(**_inline)
def _row_grad_eps_cap(x, out, i, lse, k, a, w, cap, inv_cap):
    for j in range(x.shape[1]):
        z = x[i, j]
        t = tanh_f32(z * inv_cap)
        zc = NEG_INF if z == NEG_INF else cap * t
        out[i, j] = (ONE - t * t) * (exp_nonpos_f32(zc - lse) * k - a * w[j])


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sparse_bwd_rows(logits, labels, lse, dloss, grad_out, w, eps, z_loss, cap, ignore_class, has_ignore):
    n, c = logits.shape
    wsum = _weight_sum(w)
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_eps = eps != ZERO
    has_cap = cap > ZERO
    inv_cap = _inv(cap)
    for i in prange(n):
        y = np.int64(labels[i])
        if has_ignore and y == ignore_class:
            _fill(grad_out, i, ZERO)
            continue
        if y < 0 or y >= c:
            _fill(grad_out, i, NAN)
            continue
        li = lse[i]
        if li == NEG_INF:
            _fill(grad_out, i, ZERO)
            continue
        g = dloss[i]
        big_w = one_m_eps * w[y] + eps_c * wsum
        kw = big_w + TWO * z_loss * li if z_loss != ZERO else big_w
        k = g * kw
        a = g * eps_c
        if has_cap:
            if has_eps:
                _row_grad_eps_cap(logits, grad_out, i, li, k, a, w, cap, inv_cap)
            else:
                _row_grad_cap(logits, grad_out, i, li, k, cap, inv_cap)
        else:
            if has_eps:
                _row_grad_eps(logits, grad_out, i, li, k, a, w)
            else:
                _row_grad(logits, grad_out, i, li, k)
        # The label's own term, - dloss softcap'(z_y) w_y ybar_y, written over the vector result.
        zy = logits[i, y]
        slope = ONE
        if has_cap:
            t = tanh_f32(zy * inv_cap)
            slope = ONE - t * t
            zy = _softcap(zy, cap, inv_cap)
        grad_out[i, y] = g * slope * (exp_nonpos_f32(zy - li) * kw - w[y] * (one_m_eps + eps_c))


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sparse_bwd_blocks(logits, labels, lse, dloss, grad_out, w, eps, z_loss, cap, ignore_class, has_ignore):
    n, c = logits.shape
    wsum = _weight_sum(w)
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_cap = cap > ZERO
    has_zl = z_loss != ZERO
    inv_cap = _inv(cap)
    two_zl = TWO * z_loss
    nblocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(nblocks):
        r0 = b * ROW_BLOCK
        r1 = min(r0 + ROW_BLOCK, n)
        # Down each column of the block, every per-row case as a select, so that the loop vectorizes.
        for j in range(c):
            wj = w[j]
            for r in range(r0, r1):
                y = np.int64(labels[r])
                li = lse[r]
                g = dloss[r]
                valid = (y >= 0) & (y < c)
                wy = w[y if valid else 0]
                big_w = one_m_eps * wy + eps_c * wsum
                kw = big_w + two_zl * li if has_zl else big_w
                ybar = one_m_eps + eps_c if y == j else eps_c
                z = logits[r, j]
                if has_cap:
                    t = tanh_f32(z * inv_cap)
                    zc = NEG_INF if z == NEG_INF else cap * t
                    v = g * (ONE - t * t) * (exp_nonpos_f32(zc - li) * kw - wj * ybar)
                else:
                    v = g * (exp_nonpos_f32(z - li) * kw - wj * ybar)
                v = ZERO if li == NEG_INF else v
                v = v if valid else NAN
                if has_ignore:
                    v = ZERO if y == ignore_class else v
                grad_out[r, j] = v


# ---------------------------------------------------------------------------------------------------------------
# Dense forward / backward
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _dense_row_sums(x, lab, i, shift, w, one_m_eps, eps_c, cap, inv_cap, has_cap):
    """(sum exp(z'-shift), sum_{wy != 0} wy (shift - z'), W = sum wy), wy = w ((1-eps) y + eps/C)."""
    s = ZERO
    t = ZERO
    big_w = ZERO
    if has_cap:
        for j in range(x.shape[1]):
            z = _softcap(x[i, j], cap, inv_cap)
            wy = w[j] * (one_m_eps * lab[i, j] + eps_c)
            s += exp_nonpos_f32(z - shift)
            term = wy * (shift - z)
            t += ZERO if wy == ZERO else term
            big_w += wy
    else:
        for j in range(x.shape[1]):
            z = x[i, j]
            wy = w[j] * (one_m_eps * lab[i, j] + eps_c)
            s += exp_nonpos_f32(z - shift)
            term = wy * (shift - z)
            t += ZERO if wy == ZERO else term
            big_w += wy
    return s, t, big_w


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _dense_fwd_rows(logits, labels, loss_out, lse_out, w, eps, z_loss, cap):
    n, c = logits.shape
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_cap = cap > ZERO
    inv_cap = _inv(cap)
    for i in prange(n):
        m = _row_max(logits, i)
        if has_cap:
            m = _softcap(m, cap, inv_cap)
        shift = _shift_of(m)
        s, t, big_w = _dense_row_sums(logits, labels, i, shift, w, one_m_eps, eps_c, cap, inv_cap, has_cap)
        d = np.log(s)
        lse = shift + d
        loss = t + big_w * d
        if z_loss != ZERO:
            loss += z_loss * lse * lse
        if s == ZERO:
            loss = INF
        loss_out[i] = loss
        lse_out[i] = lse


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _dense_bwd_rows(logits, labels, lse, dloss, grad_out, w, eps, z_loss, cap):
    n, c = logits.shape
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    has_cap = cap > ZERO
    inv_cap = _inv(cap)
    for i in prange(n):
        li = lse[i]
        if li == NEG_INF:
            _fill(grad_out, i, ZERO)
            continue
        g = dloss[i]
        big_w = ZERO
        for j in range(c):
            big_w += w[j] * (one_m_eps * labels[i, j] + eps_c)
        kw = big_w + TWO * z_loss * li if z_loss != ZERO else big_w
        k = g * kw
        if has_cap:
            for j in range(c):
                z = logits[i, j]
                t = tanh_f32(z * inv_cap)
                zc = NEG_INF if z == NEG_INF else cap * t
                wy = w[j] * (one_m_eps * labels[i, j] + eps_c)
                grad_out[i, j] = (ONE - t * t) * (exp_nonpos_f32(zc - li) * k - g * wy)
        else:
            for j in range(c):
                wy = w[j] * (one_m_eps * labels[i, j] + eps_c)
                grad_out[i, j] = exp_nonpos_f32(logits[i, j] - li) * k - g * wy


# ---------------------------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------------------------


def softmax_ce_sparse_fwd(logits, labels, loss_out, lse_out, class_weight, label_smoothing, z_loss, softcap,
                          ignore_class, has_ignore):
    """Sparse softmax CE forward: writes loss_out[N] and lse_out[N] (float32).

    logits: C-contiguous float32 [N, C]; labels: int32 [N]; class_weight: float32 [C];
    softcap: 0.0 for none; ignore_class is used only when has_ignore.
    """
    kernel = _sparse_fwd_blocks if logits.shape[1] <= SMALL_C_MAX else _sparse_fwd_rows
    kernel(logits, labels, loss_out, lse_out, class_weight, _f32(label_smoothing), _f32(z_loss), _f32(softcap),
           int(ignore_class), bool(has_ignore))


def softmax_ce_sparse_bwd(logits, labels, lse, dloss, grad_out, class_weight, label_smoothing, z_loss, softcap,
                          ignore_class, has_ignore):
    """Sparse softmax CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits."""
    kernel = _sparse_bwd_blocks if logits.shape[1] <= SMALL_C_MAX else _sparse_bwd_rows
    kernel(logits, labels, lse, dloss, grad_out, class_weight, _f32(label_smoothing), _f32(z_loss), _f32(softcap),
           int(ignore_class), bool(has_ignore))


def softmax_ce_dense_fwd(logits, labels2d, loss_out, lse_out, class_weight, label_smoothing, z_loss, softcap):
    """Dense-label softmax CE forward: writes loss_out[N] and lse_out[N]; labels2d float32 [N, C]."""
    _dense_fwd_rows(logits, labels2d, loss_out, lse_out, class_weight, _f32(label_smoothing), _f32(z_loss),
                    _f32(softcap))


def softmax_ce_dense_bwd(logits, labels2d, lse, dloss, grad_out, class_weight, label_smoothing, z_loss, softcap):
    """Dense-label softmax CE backward: writes grad_out[N, C]."""
    _dense_bwd_rows(logits, labels2d, lse, dloss, grad_out, class_weight, _f32(label_smoothing), _f32(z_loss),
                    _f32(softcap))

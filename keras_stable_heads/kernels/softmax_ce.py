"""Softmax cross-entropy kernels (sparse integer labels and dense label distributions), forward and backward.

Notation per row: ``z`` logits, ``z' = softcap(z) = cap * tanh(z / cap)`` (``-inf`` stays ``-inf``), C classes,
``eps`` label smoothing, ``w`` class weights, target ``ybar = (1 - eps) * y + eps / C``,
``lse = logsumexp(z')``, ``p = exp(z' - lse)``, ``W = sum_c w_c ybar_c``.

    loss   = sum_c w_c ybar_c (lse - z'_c)  [terms with w_c ybar_c == 0 skipped]  + z_loss * lse^2
    grad_c = dloss * softcap'(z_c) * (p_c (W + 2 z_loss lse) - w_c ybar_c),   softcap' = 1 - (z' / cap)^2

(``softcap'`` computed as ``sech^2(z / cap)`` from ``exp(-2 |z| / cap)``, with no cancellation where ``z'`` is
near ``+-cap``.)

The forward writes ``loss`` and ``lse`` per row; the backward reads the logits and ``lse`` and writes the
gradient, each in one pass over the logits. A row whose logits are all ``-inf`` has ``lse = -inf``,
``loss = +inf`` and a zero gradient. Sparse only: a row whose label equals ``ignore_class`` (with
``has_ignore``) gets loss 0, lse 0 and a zero gradient; a label outside [0, C) gets a NaN loss and gradient.

Numerics: ``lse = m + log(sum_c exp(z'_c - m))`` with ``m`` the row max (``m = 0`` when it is not finite, which
maps an all ``-inf`` row to ``-inf`` and a ``+inf`` logit to ``+inf``, as the float64 reference does), and
``lse - z'_c`` is computed as ``(m - z'_c) + log(sum)``, which has no cancellation when ``z'_c`` is the max.
Sums are float32 in vector lanes (``reassoc``), as accurate as float64 accumulation at these sizes.
``(m - z') + log(sum)`` uses ``sub_exact``/``add_exact`` so that ``reassoc`` cannot turn it into
``(m + log(sum)) - z'``. The backward takes ``p = exp(z' - lse)`` from the saved float32 lse, except for rows with
``|lse| > LSE_RECOMPUTE_ABOVE``, where the rounding of lse would show in p (at 1e30, lse = 1e30 + log 2 is 1e30):
there it recomputes the row's max and sum and uses ``p = exp(z' - m) / sum``.

Layouts: for large C one thread works on one row at a time and vectorizes along the row. For small C
(``SMALL_C_MAX`` forward, ``SMALL_C_MAX_BWD`` backward) a row is shorter than a vector, so blocks of
``ROW_BLOCK`` rows are transposed into a per-thread stack buffer and processed across rows (see below).
"""

import numpy as np
from numba import carray, njit, prange

from ._config import (
    FASTMATH,
    FLOATS_PER_LINE,
    LSE_RECOMPUTE_ABOVE,
    PREFETCH,
    PREFETCH_MAX_C,
    PREFETCH_SPAN,
    ROW_BLOCK,
    SMALL_C_MAX,
    SMALL_C_MAX_BWD,
)
from ._simd import (
    INF,
    NAN,
    NEG_INF,
    ONE,
    TWO,
    ZERO,
    exp_nonpos_f32,
    log_f32,
    maxnum_f32,
    prefetch_row_f32,
    safe_mul_f32,
    sech2_f32,
    select_f32,
    stack_scratch_f32,
    add_exact,
    sub_exact,
    tanh_f32,
)

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
def next_row(i, n, c):
    """The row to prefetch while working on row ``i``: ``i + 1`` (same thread under ``prange``'s static chunks,
    except at a chunk's end), or ``i`` itself (a no-op) for the last row and for rows too long to keep two in L2."""
    k = np.int64(i)  # prange's index may be unsigned; uint64 + int64 would type as float64
    return k + 1 if (k + 1 < n and c <= PREFETCH_MAX_C) else k


@njit(**_inline)
def prefetch_span(x, i, j0, j1):
    """Prefetch row ``i``'s entries ``[j0, j1)`` into L2, one hint per cache line (nothing where PREFETCH is off:
    then a span is the whole row)."""
    if PREFETCH:
        for j in range(j0, j1, FLOATS_PER_LINE):
            prefetch_row_f32(x, i, j)


# The exp passes below run over a row already in cache (its max pass just read it) in spans of PREFETCH_SPAN;
# before each span they prefetch the same span of row ``nxt`` (see next_row), which the next max pass reads.
# Where PREFETCH is off (AVX-512 hosts, see _config) each is one loop over the whole row: any loop around the
# inner one, even a single span, measured as slow as the spans.


@njit(**_inline)
def _row_sumexp(x, i, shift, nxt):
    s = ZERO
    c = x.shape[1]
    if not PREFETCH:
        for j in range(c):
            s += exp_nonpos_f32(x[i, j] - shift)
        return s
    for j0 in range(0, c, PREFETCH_SPAN):
        j1 = min(j0 + PREFETCH_SPAN, c)
        prefetch_span(x, nxt, j0, j1)
        for j in range(j0, j1):
            s += exp_nonpos_f32(x[i, j] - shift)
    return s


@njit(**_inline)
def _row_sumexp_cap(x, i, shift, cap, inv_cap, nxt):
    s = ZERO
    c = x.shape[1]
    if not PREFETCH:
        for j in range(c):
            s += exp_nonpos_f32(_softcap(x[i, j], cap, inv_cap) - shift)
        return s
    for j0 in range(0, c, PREFETCH_SPAN):
        j1 = min(j0 + PREFETCH_SPAN, c)
        prefetch_span(x, nxt, j0, j1)
        for j in range(j0, j1):
            s += exp_nonpos_f32(_softcap(x[i, j], cap, inv_cap) - shift)
    return s


@njit(**_inline)
def _row_sumexp_gap(x, i, shift, w, nxt):
    """(sum_j exp(z_j - shift), sum_j w_j (shift - z_j)); the gap is NaN where a class of weight 0 has z_j = -inf
    (0 * inf): see _row_gap_skipping_zero_weights."""
    s = ZERO
    g = ZERO
    c = x.shape[1]
    if not PREFETCH:
        for j in range(c):
            z = x[i, j]
            s += exp_nonpos_f32(z - shift)
            g += w[j] * (shift - z)
        return s, g
    for j0 in range(0, c, PREFETCH_SPAN):
        j1 = min(j0 + PREFETCH_SPAN, c)
        prefetch_span(x, nxt, j0, j1)
        for j in range(j0, j1):
            z = x[i, j]
            s += exp_nonpos_f32(z - shift)
            g += w[j] * (shift - z)
    return s, g


@njit(**_inline)
def _row_sumexp_gap_cap(x, i, shift, w, cap, inv_cap, nxt):
    s = ZERO
    g = ZERO
    c = x.shape[1]
    if not PREFETCH:
        for j in range(c):
            z = _softcap(x[i, j], cap, inv_cap)
            s += exp_nonpos_f32(z - shift)
            g += w[j] * (shift - z)
        return s, g
    for j0 in range(0, c, PREFETCH_SPAN):
        j1 = min(j0 + PREFETCH_SPAN, c)
        prefetch_span(x, nxt, j0, j1)
        for j in range(j0, j1):
            z = _softcap(x[i, j], cap, inv_cap)
            s += exp_nonpos_f32(z - shift)
            g += w[j] * (shift - z)
    return s, g


@njit(**_inline)
def _row_gap_skipping_zero_weights(x, i, shift, w, cap, inv_cap, has_cap):
    """sum_j w_j (shift - z'_j) over the classes of nonzero weight: the slow path for a row whose vectorized gap
    is NaN, which a class of weight 0 with a -inf logit gives (0 * inf), as does a NaN logit (still NaN here).
    A select in the vector loop would cost every row ~40% of the forward with label smoothing."""
    g = ZERO
    for j in range(x.shape[1]):
        z = _softcap(x[i, j], cap, inv_cap) if has_cap else x[i, j]
        g += safe_mul_f32(w[j], shift - z)
    return g


@njit(**_inline)
def _sparse_loss(shift, s, gap, zy, wy, wsum, one_m_eps, eps_c, z_loss, has_eps):
    """Loss and lse of one sparse row from its reductions; s == 0 means an all -inf row."""
    d = np.log(s)
    lse = shift + d
    # (1 - eps) w_y (lse - z'_y) + eps/C sum_c w_c (lse - z'_c), with lse - z' = (shift - z') + d.
    loss = safe_mul_f32(one_m_eps * wy, add_exact(sub_exact(shift, zy), d))
    if has_eps:
        loss += eps_c * (gap + wsum * d)
    if z_loss != ZERO:
        loss += z_loss * lse * lse
    if s == ZERO:
        loss = INF
    return loss, lse


# ---------------------------------------------------------------------------------------------------------------
# Row-block layout (C <= SMALL_C_MAX)
#
# A row of 10 classes is shorter than a vector, and vectorizing down a column of the row-major logits needs
# gathers, which AVX2 CPUs run no faster than scalar code (LLVM does not even try). So each thread copies a
# block of ROW_BLOCK rows into a stack buffer, transposed (t[j, r] = logits[r0 + r, j], cheap scalar copies
# within L1), runs every elementwise pass and per-row reduction across the ROW_BLOCK lanes, and (backward)
# copies the gradient block back. Indices are unsigned so that Numba emits no negative-index wraparound,
# which LLVM cannot vectorize through.
# ---------------------------------------------------------------------------------------------------------------

SCRATCH_ROWS = max(SMALL_C_MAX, SMALL_C_MAX_BWD) + 8  # the block kernels must only see C <= these
_scratch = stack_scratch_f32(SCRATCH_ROWS * ROW_BLOCK)
_u = np.uint64
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U4 = np.uint64(4)
_U5 = np.uint64(5)
_U6 = np.uint64(6)
_U7 = np.uint64(7)


@njit(**_inline)
def _transpose_in(x, r0, m, uc, t):
    for r in range(m):
        for j in range(uc):
            t[j, r] = x[r0 + r, j]


@njit(**_inline)
def _block_exact_shift(t, m, uc, cap, inv_cap, has_cap):
    """For rows of the block with |lse| > LSE_RECOMPUTE_ABOVE (row uc), recompute (max, 1 / sum exp(z' - max))
    into rows uc and uc + 6 of the scratch (p = exp(z' - row uc) * row uc + 6); row uc + 7 is a temporary."""
    acc = uc + _U7
    for r in range(m):
        acc_m = NEG_INF
        for j in range(uc):
            z = _softcap(t[j, r], cap, inv_cap) if has_cap else t[j, r]
            acc_m = maxnum_f32(acc_m, z)
        shift = _shift_of(acc_m)
        s = ZERO
        for j in range(uc):
            z = _softcap(t[j, r], cap, inv_cap) if has_cap else t[j, r]
            s += exp_nonpos_f32(z - shift)
        t[acc, r] = shift
        big = np.abs(t[uc, r]) > LSE_RECOMPUTE_ABOVE and t[uc, r] < INF
        t[uc + _U6, r] = select_f32(big, ONE / s, ONE)
        t[uc, r] = select_f32(big, shift, t[uc, r])


@njit(**_inline)
def _transpose_out(t, r0, m, uc, out):
    for r in range(m):
        for j in range(uc):
            out[r0 + r, j] = t[j, r]


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
        nxt = next_row(i, n, c)
        gap = ZERO
        if has_cap:
            # softcap is increasing, so max(z') = softcap(max(z)).
            shift = _shift_of(_softcap(m, cap, inv_cap))
            if has_eps:
                s, gap = _row_sumexp_gap_cap(logits, i, shift, w, cap, inv_cap, nxt)
            else:
                s = _row_sumexp_cap(logits, i, shift, cap, inv_cap, nxt)
        else:
            shift = _shift_of(m)
            if has_eps:
                s, gap = _row_sumexp_gap(logits, i, shift, w, nxt)
            else:
                s = _row_sumexp(logits, i, shift, nxt)
        if np.isnan(gap):
            gap = _row_gap_skipping_zero_weights(logits, i, shift, w, cap, inv_cap, has_cap)
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
    has_zl = z_loss != ZERO
    inv_cap = _inv(cap)
    nblocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(nblocks):
        # t[j, r]: the block transposed (rows of the block along the vector lanes); then 3 accumulator rows.
        t = carray(_scratch(), (SCRATCH_ROWS, ROW_BLOCK))
        r0 = b * ROW_BLOCK
        m = _u(min(ROW_BLOCK, n - r0))
        uc = _u(c)
        _transpose_in(logits, r0, m, uc, t)
        if has_cap:
            for j in range(uc):
                for r in range(m):
                    t[j, r] = _softcap(t[j, r], cap, inv_cap)
        # 1. shift = row max (0 if not finite), 2. s = sum exp(z' - shift), 3. gap = sum w (shift - z').
        for r in range(m):
            t[uc, r] = NEG_INF
            t[uc + _U1, r] = ZERO
            t[uc + _U2, r] = ZERO
        for j in range(uc):
            for r in range(m):
                t[uc, r] = maxnum_f32(t[uc, r], t[j, r])
        for r in range(m):
            t[uc, r] = _shift_of(t[uc, r])
        for j in range(uc):
            for r in range(m):
                t[uc + _U1, r] += exp_nonpos_f32(t[j, r] - t[uc, r])
        if has_eps:
            for j in range(uc):
                wj = w[j]
                if wj != ZERO:  # a class of weight 0 adds 0, also where its logit is -inf
                    for r in range(m):
                        t[uc + _U2, r] += wj * (t[uc, r] - t[j, r])
        # 4. Per row, every case as a select.
        for r in range(m):
            y = np.int64(labels[r0 + r])
            valid = (y >= 0) & (y < c)
            yc = _u(y) if valid else _U0
            shift = t[uc, r]
            ssum = t[uc + _U1, r]
            d = log_f32(ssum)
            lse = shift + d
            loss = safe_mul_f32(one_m_eps * w[yc], add_exact(sub_exact(shift, t[yc, r]), d))
            if has_eps:
                loss += eps_c * (t[uc + _U2, r] + wsum * d)
            if has_zl:
                loss += z_loss * lse * lse
            loss = select_f32(ssum == ZERO, INF, loss)
            loss = select_f32(valid, loss, NAN)
            ignored = has_ignore & (y == ignore_class)
            loss_out[r0 + r] = select_f32(ignored, ZERO, loss)
            lse_out[r0 + r] = select_f32(ignored, ZERO, lse)


# ---------------------------------------------------------------------------------------------------------------
# Sparse backward
# ---------------------------------------------------------------------------------------------------------------


@njit(**_inline)
def _exact_shift(x, i, lse, cap, inv_cap, has_cap):
    """(sh, scale) with p = exp(z' - sh) * scale: (lse, 1), or for |lse| > LSE_RECOMPUTE_ABOVE the row's
    (max, 1 / sum exp(z' - max)) recomputed."""
    if not (np.abs(lse) > LSE_RECOMPUTE_ABOVE and lse < INF):
        return lse, ONE
    m = _row_max(x, i)
    if has_cap:
        shift = _shift_of(_softcap(m, cap, inv_cap))
        s = _row_sumexp_cap(x, i, shift, cap, inv_cap, i)
    else:
        shift = _shift_of(m)
        s = _row_sumexp(x, i, shift, i)
    return shift, ONE / s


@njit(**_inline)
def _row_grad(x, out, i, sh, k):
    # grad_j = p_j K, p_j = exp(z_j - sh) * scale (sh = lse, scale = 1 unless recomputed: see _exact_shift);
    # the caller folds scale into k (and a is not scaled: it multiplies w, not p)
    for j in range(x.shape[1]):
        out[i, j] = exp_nonpos_f32(x[i, j] - sh) * k


@njit(**_inline)
def _row_grad_eps(x, out, i, sh, k, a, w):
    # grad_j = p_j K - a w_j, a = dloss eps / C
    for j in range(x.shape[1]):
        out[i, j] = exp_nonpos_f32(x[i, j] - sh) * k - a * w[j]


@njit(**_inline)
def _row_grad_cap(x, out, i, sh, k, cap, inv_cap):
    # grad_j = softcap'(z_j) p_j K, softcap' = 1 - tanh^2 (0 at -inf, so a masked class gets exactly 0)
    for j in range(x.shape[1]):
        z = x[i, j]
        zc = _softcap(z, cap, inv_cap)
        out[i, j] = sech2_f32(z * inv_cap) * (exp_nonpos_f32(zc - sh) * k)


@njit(**_inline)
def _row_grad_eps_cap(x, out, i, sh, k, a, w, cap, inv_cap):
    for j in range(x.shape[1]):
        z = x[i, j]
        zc = _softcap(z, cap, inv_cap)
        out[i, j] = sech2_f32(z * inv_cap) * (exp_nonpos_f32(zc - sh) * k - a * w[j])


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
        sh, scale = _exact_shift(logits, i, li, cap, inv_cap, has_cap)
        if has_cap:
            if has_eps:
                _row_grad_eps_cap(logits, grad_out, i, sh, k * scale, a, w, cap, inv_cap)
            else:
                _row_grad_cap(logits, grad_out, i, sh, k * scale, cap, inv_cap)
        else:
            if has_eps:
                _row_grad_eps(logits, grad_out, i, sh, k * scale, a, w)
            else:
                _row_grad(logits, grad_out, i, sh, k * scale)
        # The label's own term, - dloss softcap'(z_y) w_y ybar_y, written over the vector result.
        zy = logits[i, y]
        slope = ONE
        if has_cap:
            slope = sech2_f32(zy * inv_cap)
            zy = _softcap(zy, cap, inv_cap)
        grad_out[i, y] = g * slope * (exp_nonpos_f32(zy - sh) * (kw * scale) - w[y] * (one_m_eps + eps_c))


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
        t = carray(_scratch(), (SCRATCH_ROWS, ROW_BLOCK))
        r0 = b * ROW_BLOCK
        m = _u(min(ROW_BLOCK, n - r0))
        uc = _u(c)
        _transpose_in(logits, r0, m, uc, t)
        # Per-row scalars in rows uc.. of the scratch: lse, dloss, dloss * (W + 2 z_loss lse), label (as a
        # float: exact, C <= SMALL_C_MAX), and the value that overrides the row (NaN: bad label; 0: ignored or
        # all -inf) with its flag.
        for r in range(m):
            y = np.int64(labels[r0 + r])
            valid = (y >= 0) & (y < c)
            li = lse[r0 + r]
            g = dloss[r0 + r]
            big_w = one_m_eps * w[_u(y) if valid else _U0] + eps_c * wsum
            kw = big_w + two_zl * li if has_zl else big_w
            ignored = has_ignore & (y == ignore_class)
            t[uc, r] = li
            t[uc + _U1, r] = g
            t[uc + _U2, r] = g * kw
            t[uc + _U3, r] = _f32(y) if valid else _f32(-1.0)
            # as by rows: ignored -> 0, else a bad label -> NaN (whatever the logits), else all -inf -> 0
            t[uc + _U4, r] = select_f32(valid, ZERO, NAN)
            t[uc + _U4, r] = select_f32(ignored | ((li == NEG_INF) & valid), ZERO, t[uc + _U4, r])
            t[uc + _U5, r] = select_f32(ignored | (li == NEG_INF) | (not valid), ONE, ZERO)
            t[uc + _U6, r] = ONE
        # Rows with a large |lse|: p = exp(z' - max) / sum, recomputed (see LSE_RECOMPUTE_ABOVE); row uc then
        # holds the shift and row uc + 6 the factor 1 / sum (1 for the other rows).
        recompute = False
        for r in range(m):
            recompute |= np.abs(t[uc, r]) > LSE_RECOMPUTE_ABOVE
        if recompute:
            _block_exact_shift(t, m, uc, cap, inv_cap, has_cap)
        # grad = dloss softcap'(z) (p (W + 2 z_loss lse) - w_j ybar_j), in place in the scratch
        # (the softcap test is hoisted: a branch inside the loop would be if-converted and tanh always paid).
        if has_cap:
            for j in range(uc):
                wj = w[j]
                fj = _f32(j)
                for r in range(m):
                    z = t[j, r]
                    wybar = wj * select_f32(t[uc + _U3, r] == fj, one_m_eps + eps_c, eps_c)
                    zc = _softcap(z, cap, inv_cap)
                    p = exp_nonpos_f32(zc - t[uc, r]) * t[uc + _U6, r]
                    v = sech2_f32(z * inv_cap) * (p * t[uc + _U2, r] - t[uc + _U1, r] * wybar)
                    t[j, r] = select_f32(t[uc + _U5, r] != ZERO, t[uc + _U4, r], v)
        else:
            for j in range(uc):
                wj = w[j]
                fj = _f32(j)
                for r in range(m):
                    wybar = wj * select_f32(t[uc + _U3, r] == fj, one_m_eps + eps_c, eps_c)
                    p = exp_nonpos_f32(t[j, r] - t[uc, r]) * t[uc + _U6, r]
                    v = p * t[uc + _U2, r] - t[uc + _U1, r] * wybar
                    t[j, r] = select_f32(t[uc + _U5, r] != ZERO, t[uc + _U4, r], v)
        _transpose_out(t, r0, m, uc, grad_out)


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
            t += safe_mul_f32(wy, shift - z)
            big_w += wy
    else:
        for j in range(x.shape[1]):
            z = x[i, j]
            wy = w[j] * (one_m_eps * lab[i, j] + eps_c)
            s += exp_nonpos_f32(z - shift)
            t += safe_mul_f32(wy, shift - z)
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
        sh, scale = _exact_shift(logits, i, li, cap, inv_cap, has_cap)
        k = k * scale
        if has_cap:
            for j in range(c):
                z = logits[i, j]
                zc = _softcap(z, cap, inv_cap)
                wy = w[j] * (one_m_eps * labels[i, j] + eps_c)
                grad_out[i, j] = sech2_f32(z * inv_cap) * (exp_nonpos_f32(zc - sh) * k - g * wy)
        else:
            for j in range(c):
                wy = w[j] * (one_m_eps * labels[i, j] + eps_c)
                grad_out[i, j] = exp_nonpos_f32(logits[i, j] - sh) * k - g * wy


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
    kernel = _sparse_bwd_blocks if logits.shape[1] <= SMALL_C_MAX_BWD else _sparse_bwd_rows
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

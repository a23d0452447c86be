"""Softmax cross-entropy CUDA kernels (sparse integer labels and dense label distributions), forward and backward.

Device code only: Numba CUDA, NumPy and ``math``. Import this module explicitly and lazily
(``from keras_stable_heads.kernels import cuda_softmax_ce``): importing ``numba.cuda`` is slow and needs a CUDA
driver, or the simulator (``NUMBA_ENABLE_CUDASIM=1`` / ``numba.config.ENABLE_CUDASIM = 1`` before the import).

Same losses, options and special values as the CPU kernels in ``softmax_ce.py`` (see its docstring). Per row:
``z'`` softcapped logits (``-inf`` stays ``-inf``), ``ybar = (1 - eps) y + eps / C``, ``wy_c = w_c ybar_c``,
``W = sum_c wy_c``, ``shift`` = max of ``z'`` (0 if not finite), ``log_sum = log sum_c exp(z'_c - shift)``,
``lse = shift + log_sum``, ``p_c = exp((z'_c - shift) - log_sum)``:

    loss   = sum_{c: wy_c != 0} wy_c (shift - z'_c) + W log_sum + z_loss lse^2
    grad_c = dloss softcap'(z_c) (p_c (W + 2 z_loss lse) - wy_c)

Design (the split forward/backward of the CPU kernels, one pass over the logits each):

1. Forward, one read of the logits: an online max and sum (Milakov & Gimelshein 2018, "Online normalizer
   calculation for softmax"): ``m`` the running max, ``s = sum exp(z' - m)``, rescaled by ``exp(m_old - m_new)``
   when the max grows. The smoothing/dense term ``a = sum wy (m - z')`` is kept against the running max too
   (grown by ``W_so_far (m_new - m_old)``), so every term added is >= 0 and nothing cancels at |z| ~ 1e4.
2. Block layout (C > SMALL_C_MAX): one block per row, threads stride the row (coalesced), UNROLL loads in
   flight per thread; then a tree reduction of (m, s, a, W) in dynamic shared memory; thread 0 writes
   ``loss`` and ``saved = (shift, log_sum, W)``. Thread layout (C <= SMALL_C_MAX): one thread per row.
3. Backward, one read of the logits and one write of the gradient, with no reduction: every per-row scalar it
   needs is in ``saved``. Keeping ``shift`` and ``log_sum`` apart makes ``p`` exact to float32 rounding at any
   |lse| (``1e30 + log 2`` would round to ``1e30``), so unlike the CPU kernels nothing is recomputed.

Accumulation is float32 (float16 logits are read and converted; the gradient is written in the logits' dtype).
Grid: a 1-D grid of N blocks (block layout) or ceil(N / ROWS_PER_BLOCK) blocks, fine up to 2^31 - 1.
"""

import math

import numpy as np
from numba import config as _numba_config
from numba import cuda, float32

from . import _cuda_config as _cfg
from ._cuda_config import SOFTMAX_SAVED_WIDTH, UNROLL

_f32 = np.float32

ZERO = _f32(0.0)
ONE = _f32(1.0)
TWO = _f32(2.0)
INF = _f32(np.inf)
NEG_INF = _f32(-np.inf)
NAN = _f32(np.nan)

SAVED_WIDTH = SOFTMAX_SAVED_WIDTH

# True when these kernels run on Numba's CUDA simulator (Python threads on the CPU, for tests).
SIMULATED = bool(_numba_config.ENABLE_CUDASIM)


# ---------------------------------------------------------------------------------------------------------------
# float32 elementary functions: libdevice on the GPU (math.* of a float32 is the float32 libdevice function);
# under the simulator NumPy float32, which returns inf/NaN where Python's math module would raise. (expm1 and pow
# serve the focal kernels.)
# ---------------------------------------------------------------------------------------------------------------


def _elementary(numpy_fn, math_fn, arity=1):
    """``math_fn`` as a device function on the GPU; ``numpy_fn`` in float32 with warnings off under the simulator."""
    if SIMULATED:

        def simulated(*args):
            with np.errstate(all="ignore"):
                return _f32(numpy_fn(*(_f32(a) for a in args)))

        return simulated
    if arity == 2:
        return cuda.jit(device=True)(lambda x, y: math_fn(x, y))
    return cuda.jit(device=True)(lambda x: math_fn(x))


exp32 = _elementary(np.exp, math.exp)
log32 = _elementary(np.log, math.log)
log1p32 = _elementary(np.log1p, math.log1p)
tanh32 = _elementary(np.tanh, math.tanh)
expm1_32 = _elementary(np.expm1, math.expm1)
pow32 = _elementary(np.power, math.pow, arity=2)


@cuda.jit(device=True)
def sech2_32(x):
    """1 - tanh(x)^2 as 4 e / (1 + e)^2, e = exp(-2|x|): no cancellation where tanh is near +-1; 0 at +-inf."""
    e = exp32(-TWO * abs(x))
    r = ONE / (ONE + e)
    return (e + e) * r * (TWO * r)


@cuda.jit(device=True)
def safe_mul32(a, x):
    """a * x, 0 where a == 0 even if x is infinite: a loss term of weight 0 is skipped (numerics.safe_mul)."""
    return ZERO if a == ZERO else a * x


@cuda.jit(device=True)
def softcap32(x, cap, inv_cap):
    """cap * tanh(x / cap), keeping -inf as -inf (a masked class stays masked)."""
    v = cap * tanh32(x * inv_cap)
    return NEG_INF if x == NEG_INF else v


# ---------------------------------------------------------------------------------------------------------------
# Online (max, sum, gap, weight) state of a row or part of a row
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _push(m, s, a, wt, x, wy, track):
    """Add one element x (target weight wy) to the state: m max, s = sum exp(x - m), and (track) a = sum over
    wy != 0 of wy (m - x) (+inf for a masked element with target mass), wt = sum wy."""
    # 1. new max: rescale the sum by exp(m_old - m_new); move the gap to the new max (every term stays >= 0)
    if x > m:
        if track and m != NEG_INF:
            a += wt * (x - m)
        s = s * exp32(m - x) + ONE
        m = x
    # 2. otherwise add exp(x - m); -inf adds nothing, NaN propagates; x == m adds 1 (also for m == +inf)
    elif x != NEG_INF:
        s += ONE if x == m else exp32(x - m)
    if track:
        if wy != ZERO:
            a += wy * INF if x == NEG_INF else wy * (m - x)
        wt += wy
    return m, s, a, wt


@cuda.jit(device=True)
def _rescaled(s, mi, m):
    return s if mi == m else s * exp32(mi - m)


@cuda.jit(device=True)
def _moved(wt, mi, m):
    # a state's gap against its own max mi, re-expressed against m >= mi (no-op from -inf: a is 0 or +inf)
    return ZERO if (mi == m or mi == NEG_INF) else wt * (m - mi)


@cuda.jit(device=True)
def _merge(m1, s1, a1, w1, m2, s2, a2, w2):
    m = m2 if m2 > m1 else m1
    s = _rescaled(s1, m1, m) + _rescaled(s2, m2, m)
    a = (a1 + a2) + (_moved(w1, m1, m) + _moved(w2, m2, m))
    return m, s, a, w1 + w2


@cuda.jit(device=True)
def _block_reduce(m, s, a, wt):
    """Tree reduction over the block (a power of two) in dynamic shared memory (4 * blockDim float32); the
    result is valid in thread 0. Every thread of the block must call it."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, float32)
    sm[tid] = m
    sm[nt + tid] = s
    sm[2 * nt + tid] = a
    sm[3 * nt + tid] = wt
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            o = tid + half
            m, s, a, wt = _merge(m, s, a, wt, sm[o], sm[nt + o], sm[2 * nt + o], sm[3 * nt + o])
            sm[tid] = m
            sm[nt + tid] = s
            sm[2 * nt + tid] = a
            sm[3 * nt + tid] = wt
        cuda.syncthreads()
        half //= 2
    return m, s, a, wt


@cuda.jit(device=True)
def _shift_logsum(m, s):
    """(shift, log_sum), lse = shift + log_sum: shift = m if finite else 0, as the CPU kernels and the float64
    reference do (an all -inf row gives -inf, a +inf logit +inf, NaN stays NaN)."""
    if m == INF:
        return ZERO, s * INF
    if m == NEG_INF:
        return ZERO, log32(s)
    return m, log32(s)


@cuda.jit(device=True)
def _grad_elem(x, shift, d, k, target, cap, inv_cap, has_cap):
    """softcap'(z) (p K - target), p = exp((z' - shift) - log_sum); softcap' = 1 - tanh^2 is 0 at -inf."""
    if has_cap:
        return sech2_32(x * inv_cap) * (exp32((softcap32(x, cap, inv_cap) - shift) - d) * k - target)
    return exp32((x - shift) - d) * k - target


@cuda.jit(device=True)
def load_tile(a, row, j, jstep, out):
    """out[k] = a[row, j + k jstep] as float32 for k < UNROLL: UNROLL loads in flight before any is used."""
    for k in range(UNROLL):
        out[k] = _f32(a[row, j + k * jstep])


@cuda.jit(device=True)
def _row_range(n, per_thread):
    """(row, first column, column step) of this thread; row >= n means nothing to do."""
    tid = cuda.threadIdx.x
    if per_thread:
        return cuda.blockIdx.x * cuda.blockDim.x + tid, 0, 1
    return cuda.blockIdx.x, tid, cuda.blockDim.x


# ---------------------------------------------------------------------------------------------------------------
# Sparse labels
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit
def _sparse_fwd(z, labels, loss_out, saved_out, w, eps, z_loss, cap, ignore_class, has_ignore, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    y = np.int64(labels[row])
    if has_ignore and y == ignore_class:  # uniform over the block: no thread reaches the reduction
        if per_thread or cuda.threadIdx.x == 0:
            loss_out[row] = ZERO
            saved_out[row, 0] = ZERO
            saved_out[row, 1] = ZERO
            saved_out[row, 2] = ZERO
        return
    has_cap = cap > ZERO
    inv_cap = ONE / cap if has_cap else ZERO
    track = eps != ZERO  # label smoothing: also sum_c w_c (m - z'_c) and sum_c w_c
    m = NEG_INF
    s = ZERO
    a = ZERO
    wt = ZERO
    xs = cuda.local.array(UNROLL, float32)
    ws = cuda.local.array(UNROLL, float32)
    # 1. stream the row: UNROLL loads in flight, then the online update of each
    while j + (UNROLL - 1) * jstep < c:
        load_tile(z, row, j, jstep, xs)
        for k in range(UNROLL):
            ws[k] = w[j + k * jstep] if track else ZERO
        for k in range(UNROLL):
            x = softcap32(xs[k], cap, inv_cap) if has_cap else xs[k]
            m, s, a, wt = _push(m, s, a, wt, x, ws[k], track)
        j += UNROLL * jstep
    while j < c:
        x = _f32(z[row, j])
        x = softcap32(x, cap, inv_cap) if has_cap else x
        m, s, a, wt = _push(m, s, a, wt, x, w[j] if track else ZERO, track)
        j += jstep
    # 2. combine the threads' states
    if not per_thread:
        m, s, a, wt = _block_reduce(m, s, a, wt)
        if cuda.threadIdx.x != 0:
            return
    # 3. (1 - eps) w_y (lse - z'_y) + eps/C sum_c w_c (lse - z'_c) + z_loss lse^2, lse - z' = (shift - z') + log_sum
    valid = y >= 0 and y < c
    zy = ZERO
    wy = ZERO
    if valid:
        zy = _f32(z[row, y])
        zy = softcap32(zy, cap, inv_cap) if has_cap else zy
        wy = w[y]
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    shift, d = _shift_logsum(m, s)
    lse = shift + d
    loss = safe_mul32(one_m_eps * wy, (shift - zy) + d)  # skipped at target weight 0, also where z'_y is -inf
    if track:
        loss += eps_c * (a + wt * d)  # wt = sum_c w_c when tracking
    big_w = one_m_eps * wy + eps_c * wt
    if z_loss != ZERO:
        loss += z_loss * lse * lse
    if s == ZERO:
        loss = INF
    if not valid:
        loss = NAN
        big_w = NAN
    loss_out[row] = loss
    saved_out[row, 0] = shift
    saved_out[row, 1] = d
    saved_out[row, 2] = big_w


@cuda.jit
def _sparse_bwd(z, labels, saved, dloss, grad_out, w, eps, z_loss, cap, ignore_class, has_ignore, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    y = np.int64(labels[row])
    shift = saved[row, 0]
    d = saved[row, 1]
    big_w = saved[row, 2]
    # 1. rows that get one value: ignored (0), label out of range (NaN), all logits -inf (0)
    fill = ZERO
    filled = False
    if has_ignore and y == ignore_class:
        filled = True
    elif y < 0 or y >= c:
        filled = True
        fill = NAN
    elif d == NEG_INF:
        filled = True
    if filled:
        while j < c:
            grad_out[row, j] = fill
            j += jstep
        return
    # 2. grad_c = dloss softcap'(z_c) (p_c K - wy_c), K = W + 2 z_loss lse,
    #    wy_c = w_c eps / C + [c == y] w_y (1 - eps)
    has_cap = cap > ZERO
    inv_cap = ONE / cap if has_cap else ZERO
    has_eps = eps != ZERO
    g = dloss[row]
    kw = big_w + TWO * z_loss * (shift + d) if z_loss != ZERO else big_w
    k = g * kw
    ae = g * (eps / _f32(c))
    ay = g * (ONE - eps) * w[y]
    xs = cuda.local.array(UNROLL, float32)
    while j + (UNROLL - 1) * jstep < c:
        load_tile(z, row, j, jstep, xs)
        for u in range(UNROLL):
            jj = j + u * jstep
            target = ae * w[jj] if has_eps else ZERO
            if jj == y:
                target += ay
            grad_out[row, jj] = _grad_elem(xs[u], shift, d, k, target, cap, inv_cap, has_cap)
        j += UNROLL * jstep
    while j < c:
        target = ae * w[j] if has_eps else ZERO
        if j == y:
            target += ay
        grad_out[row, j] = _grad_elem(_f32(z[row, j]), shift, d, k, target, cap, inv_cap, has_cap)
        j += jstep


# ---------------------------------------------------------------------------------------------------------------
# Dense labels
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit
def _dense_fwd(z, labels, loss_out, saved_out, w, eps, z_loss, cap, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    has_cap = cap > ZERO
    inv_cap = ONE / cap if has_cap else ZERO
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    m = NEG_INF
    s = ZERO
    a = ZERO
    wt = ZERO
    xs = cuda.local.array(UNROLL, float32)
    ws = cuda.local.array(UNROLL, float32)
    while j + (UNROLL - 1) * jstep < c:
        load_tile(z, row, j, jstep, xs)
        for k in range(UNROLL):
            jj = j + k * jstep
            ws[k] = w[jj] * (one_m_eps * _f32(labels[row, jj]) + eps_c)
        for k in range(UNROLL):
            x = softcap32(xs[k], cap, inv_cap) if has_cap else xs[k]
            m, s, a, wt = _push(m, s, a, wt, x, ws[k], True)
        j += UNROLL * jstep
    while j < c:
        x = _f32(z[row, j])
        x = softcap32(x, cap, inv_cap) if has_cap else x
        m, s, a, wt = _push(m, s, a, wt, x, w[j] * (one_m_eps * _f32(labels[row, j]) + eps_c), True)
        j += jstep
    if not per_thread:
        m, s, a, wt = _block_reduce(m, s, a, wt)
        if cuda.threadIdx.x != 0:
            return
    # sum_{wy != 0} wy (shift - z') + W log_sum + z_loss lse^2
    shift, d = _shift_logsum(m, s)
    lse = shift + d
    loss = a + wt * d
    if z_loss != ZERO:
        loss += z_loss * lse * lse
    if s == ZERO:
        loss = INF
    loss_out[row] = loss
    saved_out[row, 0] = shift
    saved_out[row, 1] = d
    saved_out[row, 2] = wt


@cuda.jit
def _dense_bwd(z, labels, saved, dloss, grad_out, w, eps, z_loss, cap, per_thread):
    n, c = z.shape
    row, j, jstep = _row_range(n, per_thread)
    if row >= n:
        return
    shift = saved[row, 0]
    d = saved[row, 1]
    big_w = saved[row, 2]
    if d == NEG_INF:
        while j < c:
            grad_out[row, j] = ZERO
            j += jstep
        return
    has_cap = cap > ZERO
    inv_cap = ONE / cap if has_cap else ZERO
    one_m_eps = ONE - eps
    eps_c = eps / _f32(c)
    g = dloss[row]
    kw = big_w + TWO * z_loss * (shift + d) if z_loss != ZERO else big_w
    k = g * kw
    xs = cuda.local.array(UNROLL, float32)
    ys = cuda.local.array(UNROLL, float32)
    while j + (UNROLL - 1) * jstep < c:
        load_tile(z, row, j, jstep, xs)
        load_tile(labels, row, j, jstep, ys)
        for u in range(UNROLL):
            jj = j + u * jstep
            target = g * (w[jj] * (one_m_eps * ys[u] + eps_c))
            grad_out[row, jj] = _grad_elem(xs[u], shift, d, k, target, cap, inv_cap, has_cap)
        j += UNROLL * jstep
    while j < c:
        target = g * (w[j] * (one_m_eps * _f32(labels[row, j]) + eps_c))
        grad_out[row, j] = _grad_elem(_f32(z[row, j]), shift, d, k, target, cap, inv_cap, has_cap)
        j += jstep


# ---------------------------------------------------------------------------------------------------------------
# Host drivers
# ---------------------------------------------------------------------------------------------------------------


def as_device(x):
    """A Numba device array viewing ``x`` (zero-copy) if ``x`` exports ``__cuda_array_interface__``, else ``x``
    (a Numba device array, or a NumPy array under the simulator). Never synchronises: the producer's stream
    ordering is the caller's business (the bridges launch on the framework's current stream)."""
    if not hasattr(x, "__cuda_array_interface__") or hasattr(x, "device_ctypes_pointer"):
        return x
    try:
        return cuda.as_cuda_array(x, sync=False)
    except TypeError:  # a Numba without the ``sync`` keyword
        return cuda.as_cuda_array(x)


def block_threads(num_classes):
    """Threads per block of the block-per-row layout for this class count (0: thread-per-row layout)."""
    if num_classes <= _cfg.SMALL_C_MAX:
        return 0
    t = _cfg.MIN_BLOCK_THREADS
    while t < _cfg.BLOCK_THREADS and t * _cfg.ITEMS_PER_THREAD < num_classes:
        t *= 2
    return t


def launch(kernel, n, num_classes, stream, args, shared_per_thread):
    """Launch ``kernel(*args, per_thread)`` over n rows in the layout that suits ``num_classes``."""
    if n == 0:
        return
    threads = block_threads(num_classes)
    if threads == 0:
        rows = _cfg.ROWS_PER_BLOCK
        kernel[(n + rows - 1) // rows, rows, stream, 0](*args, True)
    else:
        kernel[n, threads, stream, shared_per_thread * threads * 4](*args, False)


def run_rows(kernel, arrays, scalars, stream, shared_per_thread, layout_of=0):
    """Launch ``kernel(*arrays, *scalars, per_thread)`` with zero-copy device views of ``arrays``, over the rows
    of ``arrays[layout_of]`` in the layout that suits its number of columns."""
    views = tuple(as_device(a) for a in arrays)
    n, c = views[layout_of].shape
    launch(kernel, n, c, stream, views + tuple(scalars), shared_per_thread)


def softmax_ce_sparse_fwd(logits, labels, loss_out, saved_out, class_weight, label_smoothing, z_loss, softcap,
                          ignore_class, has_ignore, stream=0):
    """Sparse softmax CE forward: writes loss_out[N] and saved_out[N, 3] = (shift, log_sum, W), float32.

    logits: C-contiguous float32 (or float16) [N, C]; labels: int32 [N]; class_weight: float32 [C], all on the
    device; softcap: 0.0 for none; ignore_class is used only when has_ignore; stream: a Numba stream or 0.
    lse = saved_out[:, 0] + saved_out[:, 1].
    """
    run_rows(_sparse_fwd, (logits, labels, loss_out, saved_out, class_weight),
             (_f32(label_smoothing), _f32(z_loss), _f32(softcap), np.int64(ignore_class), bool(has_ignore)), stream, 4)


def softmax_ce_sparse_bwd(logits, labels, saved, dloss, grad_out, class_weight, label_smoothing, z_loss, softcap,
                          ignore_class, has_ignore, stream=0):
    """Sparse softmax CE backward: writes grad_out[N, C] = dloss[:, None] * d loss / d logits (logits' dtype)."""
    run_rows(_sparse_bwd, (logits, labels, saved, dloss, grad_out, class_weight),
             (_f32(label_smoothing), _f32(z_loss), _f32(softcap), np.int64(ignore_class), bool(has_ignore)), stream, 0)


def softmax_ce_dense_fwd(logits, labels2d, loss_out, saved_out, class_weight, label_smoothing, z_loss, softcap,
                         stream=0):
    """Dense-label softmax CE forward: writes loss_out[N] and saved_out[N, 3]; labels2d float32 [N, C]."""
    run_rows(_dense_fwd, (logits, labels2d, loss_out, saved_out, class_weight),
             (_f32(label_smoothing), _f32(z_loss), _f32(softcap)), stream, 4)


def softmax_ce_dense_bwd(logits, labels2d, saved, dloss, grad_out, class_weight, label_smoothing, z_loss, softcap,
                         stream=0):
    """Dense-label softmax CE backward: writes grad_out[N, C]."""
    run_rows(_dense_bwd, (logits, labels2d, saved, dloss, grad_out, class_weight),
             (_f32(label_smoothing), _f32(z_loss), _f32(softcap)), stream, 0)

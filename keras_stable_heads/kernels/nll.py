"""Gaussian and Laplace negative log-likelihood kernels, forward and backward.

``params`` is ``[N, 2D]``: the location ``m`` in the first D columns, ``log_scale`` in the last D; ``targets`` is
``[N, D]``. Per target, with ``res = y - m`` and ``inv = exp(-log_scale)`` (as ``keras_stable_heads.ops``)::

    Gaussian:  elem = log_scale + (res inv)^2 / 2,   d/dm = -(res inv) inv,   d/dlog_scale = 1 - (res inv)^2
    Laplace:   elem = log_scale + |res| inv,         d/dm = -sign(res) inv,   d/dlog_scale = 1 - |res| inv

The row loss is the mean of ``elem`` over the D targets (``full``'s constant is added by the op, for every
implementation alike); the gradient is ``dloss / D`` times the derivatives. Nothing is saved for the backward:
it recomputes the elementwise terms in one pass. IEEE arithmetic throughout, as the portable path: a log-scale of
+inf gives an infinite loss, NaN in gives NaN out, ``sign(NaN)`` is NaN.

Layouts: with one target per example (D = 1, the usual regression head) the ``[N, 2]`` parameters are read as a
flat array with stride 2 (LLVM's interleaved loads) and the loop runs over examples, vectorized; with D > 1 one
row per thread, vectorized along the row.
"""

import numpy as np
from numba import njit, prange

from ._config import FASTMATH, FLAT_BLOCK
from ._simd import HALF, ONE, ZERO, exp_f32, select_f32
from .focal import flat

_f32 = np.float32
_u = np.uint64
_inline = {"inline": "always", "fastmath": FASTMATH, "error_model": "numpy"}


@njit(**_inline)
def _nll(m, log_scale, y, laplace):
    """(elem, d elem / dm, d elem / dlog_scale) of one target; both kinds are cheap, the flag picks one."""
    inv = exp_f32(-log_scale)
    res = y - m
    r = res * inv
    a = np.abs(res) * inv
    # sign(res), NaN for NaN (res * 0 is NaN only then: the flags keep NaN, so it is not folded to 0)
    sign = select_f32(res > ZERO, ONE, select_f32(res < ZERO, -ONE, res * ZERO))
    core = select_f32(laplace, a, HALF * (r * r))
    d_m = select_f32(laplace, -sign * inv, -r * inv)
    d_log_scale = ONE + select_f32(laplace, -a, -(r * r))
    return log_scale + core, d_m, d_log_scale


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _nll_fwd_rows(params, targets, loss_out, laplace):
    n, d = targets.shape
    for i in prange(n):
        total = ZERO
        for j in range(d):
            total += _nll(params[i, j], params[i, d + j], targets[i, j], laplace)[0]
        loss_out[i] = total / _f32(d)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _nll_bwd_rows(params, targets, dloss, grad_out, laplace):
    n, d = targets.shape
    for i in prange(n):
        g = dloss[i] / _f32(d)
        for j in range(d):
            _, d_m, d_log_scale = _nll(params[i, j], params[i, d + j], targets[i, j], laplace)
            grad_out[i, j] = d_m * g
            grad_out[i, d + j] = d_log_scale * g


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _nll_fwd_one(params, targets, loss_out, laplace):
    # D = 1: params flat [2N] (m, log_scale interleaved), targets flat [N]; blocks of FLAT_BLOCK examples
    n = loss_out.shape[0]
    for b in prange((n + FLAT_BLOCK - 1) // FLAT_BLOCK):
        k0 = _u(b * FLAT_BLOCK)
        for k in range(k0, _u(min(n, b * FLAT_BLOCK + FLAT_BLOCK))):
            loss_out[k] = _nll(params[k + k], params[k + k + _u(1)], targets[k], laplace)[0]


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _nll_bwd_one(params, targets, dloss, grad, laplace):
    # D = 1: params and grad flat [2N], targets flat [N]
    n = dloss.shape[0]
    for b in prange((n + FLAT_BLOCK - 1) // FLAT_BLOCK):
        k0 = _u(b * FLAT_BLOCK)
        for k in range(k0, _u(min(n, b * FLAT_BLOCK + FLAT_BLOCK))):
            _, d_m, d_log_scale = _nll(params[k + k], params[k + k + _u(1)], targets[k], laplace)
            g = dloss[k]
            grad[k + k] = d_m * g
            grad[k + k + _u(1)] = d_log_scale * g


def _forward(params, targets2d, loss_out, laplace):
    if targets2d.shape[1] == 1:
        _nll_fwd_one(flat(params), flat(targets2d), loss_out, laplace)
    elif targets2d.shape[1] == 0:
        loss_out[:] = np.nan  # the mean of no targets, as the portable path's 0 / 0
    else:
        _nll_fwd_rows(params, targets2d, loss_out, laplace)


def _backward(params, targets2d, dloss, grad_out, laplace):
    if targets2d.shape[1] == 1:
        _nll_bwd_one(flat(params), flat(targets2d), dloss, flat(grad_out), laplace)
    elif targets2d.shape[1] > 0:
        _nll_bwd_rows(params, targets2d, dloss, grad_out, laplace)


def gaussian_nll_fwd(params, targets2d, loss_out):
    """Gaussian NLL forward: writes loss_out[N]; params float32 [N, 2D] = [mean, log_scale], targets2d [N, D]."""
    _forward(params, targets2d, loss_out, False)


def gaussian_nll_bwd(params, targets2d, dloss, grad_out):
    """Gaussian NLL backward: writes grad_out[N, 2D] = dloss[:, None] * d loss / d params."""
    _backward(params, targets2d, dloss, grad_out, False)


def laplace_nll_fwd(params, targets2d, loss_out):
    """Laplace NLL forward: writes loss_out[N]; params float32 [N, 2D] = [location, log_scale], targets2d [N, D]."""
    _forward(params, targets2d, loss_out, True)


def laplace_nll_bwd(params, targets2d, dloss, grad_out):
    """Laplace NLL backward: writes grad_out[N, 2D] = dloss[:, None] * d loss / d params."""
    _backward(params, targets2d, dloss, grad_out, True)

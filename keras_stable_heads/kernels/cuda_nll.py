"""Gaussian and Laplace negative log-likelihood CUDA kernels, forward and backward.

Device code only (Numba CUDA, NumPy); import explicitly and lazily, as ``cuda_softmax_ce``. Same losses and
special values as the CPU kernels in ``nll.py`` (its docstring has the formulas): ``params [N, 2D]`` holds the
location then the log-scale of each of the D targets ``[N, D]``; the row loss is the mean over the D targets.
Nothing is saved (``saved`` is left as it is); the backward recomputes each target's derivatives. Layouts as in
``cuda_softmax_ce``, chosen by D: one block per row above SMALL_C_MAX targets, one thread per row at or below it.
"""

import numpy as np
from numba import cuda

from .cuda_sigmoid_ce import block_sums, row_loop, writer
from .cuda_softmax_ce import ONE, ZERO, _row_range, exp32, run_rows

_f32 = np.float32
HALF = _f32(0.5)

SAVED_WIDTH = 1  # unused


@cuda.jit(device=True)
def _nll(m, y, row, col, args):
    """(elem, d elem / dm, d elem / dlog_scale) of target ``col``, its location m and target y given; args starts
    (params, laplace)."""
    params = args[0]
    log_scale = _f32(params[row, params.shape[1] // 2 + col])
    inv = exp32(-log_scale)
    res = y - m
    if args[1]:  # Laplace
        a = abs(res) * inv
        sign = ONE if res > ZERO else (-ONE if res < ZERO else res * ZERO)  # NaN stays NaN
        return log_scale + a, -sign * inv, ONE - a
    r = res * inv
    return log_scale + HALF * (r * r), -r * inv, ONE - r * r


@cuda.jit(device=True)
def _loss(m, y, out, row, col, args):
    return _nll(m, y, row, col, args)[0], ZERO


@cuda.jit(device=True)
def _grad(m, y, out, row, col, args):
    # dloss / D times the derivatives; args = (params, laplace, dloss / D)
    _, d_m, d_log_scale = _nll(m, y, row, col, args)
    out[row, col] = d_m * args[2]
    out[row, out.shape[1] // 2 + col] = d_log_scale * args[2]
    return ZERO, ZERO


_sums = row_loop(_loss)
_grads = row_loop(_grad)


@cuda.jit
def _nll_fwd(params, targets, loss_out, laplace, per_thread):
    row, j, jstep = _row_range(targets.shape[0], per_thread)
    if row >= targets.shape[0]:
        return
    total, _ = _sums(params, targets, loss_out, row, j, jstep, (params, laplace))
    total, _ = block_sums(total, ZERO, per_thread)
    if writer(per_thread):
        loss_out[row] = total / _f32(targets.shape[1])


@cuda.jit
def _nll_bwd(params, targets, dloss, grad_out, laplace, per_thread):
    row, j, jstep = _row_range(targets.shape[0], per_thread)
    if row >= targets.shape[0]:
        return
    _grads(params, targets, grad_out, row, j, jstep, (params, laplace, dloss[row] / _f32(targets.shape[1])))


def gaussian_nll_fwd(params, targets2d, loss_out, saved_out, stream=0):
    """Gaussian NLL forward: writes loss_out[N]; params float32 [N, 2D] = [mean, log_scale], targets2d [N, D]."""
    run_rows(_nll_fwd, (params, targets2d, loss_out), (False,), stream, 2, layout_of=1)


def gaussian_nll_bwd(params, targets2d, saved, dloss, grad_out, stream=0):
    """Gaussian NLL backward: writes grad_out[N, 2D] = dloss[:, None] * d loss / d params."""
    run_rows(_nll_bwd, (params, targets2d, dloss, grad_out), (False,), stream, 0, layout_of=1)


def laplace_nll_fwd(params, targets2d, loss_out, saved_out, stream=0):
    """Laplace NLL forward: writes loss_out[N]; params float32 [N, 2D] = [location, log_scale], targets2d [N, D]."""
    run_rows(_nll_fwd, (params, targets2d, loss_out), (True,), stream, 2, layout_of=1)


def laplace_nll_bwd(params, targets2d, saved, dloss, grad_out, stream=0):
    """Laplace NLL backward: writes grad_out[N, 2D] = dloss[:, None] * d loss / d params."""
    run_rows(_nll_bwd, (params, targets2d, dloss, grad_out), (True,), stream, 0, layout_of=1)

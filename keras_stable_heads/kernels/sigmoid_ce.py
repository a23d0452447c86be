"""Sigmoid (multi-label / binary) cross-entropy kernels, forward and backward.

Per entry, with ``ybar = (1 - eps) y + eps / 2`` and ``pw`` the positive weight of its label:

    elem = pw ybar softplus(-z) + (1 - ybar) softplus(z)          # -pw ybar log s(z) - (1 - ybar) log(1 - s(z))
    d elem / dz = (1 - ybar) s(z) - pw ybar s(-z)

``softplus(x) = max(x, 0) + log(1 + exp(-|x|))`` never overflows; both softplus share ``log(1 + exp(-|z|))``.
The gradient is written with ``s(-z)``, not as ``s(z) (pw ybar + 1 - ybar) - pw ybar``: at ``z = 20, ybar = 1`` the
latter rounds ``s(z) - 1`` to 0 in float32, while the exact value ``-s(-20) = -2.06e-9`` is tiny but not 0.
``s(z)`` and ``s(-z)`` come from one ``exp(-|z|)`` (:func:`sigmoid_pair`).
A term of weight 0 is 0 also at an infinite logit (``z = +inf, y = 1`` gives loss 0, not ``0 * inf``).
Entries whose label equals ``missing_label`` (with ``has_missing``) are dropped. The row loss is the sum over
present entries, or (``mean_over_labels``) that sum divided by the number present, 0 when none is.
"""

import numpy as np
from numba import njit, prange

from ._config import FASTMATH
from ._simd import HALF, ONE, ZERO, exp_nonpos_f32, log1p_exp_neg_abs, maxnum_f32, safe_mul_f32, select_f32

_f32 = np.float32


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def softplus_pair(z):
    """(softplus(z), softplus(-z)) = (-log(1 - sigmoid(z)), -log sigmoid(z)), sharing log(1 + exp(-|z|))."""
    soft = log1p_exp_neg_abs(z)
    return maxnum_f32(z, ZERO) + soft, maxnum_f32(-z, ZERO) + soft


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def sigmoid_pair(z):
    """(sigmoid(z), sigmoid(-z)) from one u = exp(-|z|): 1 / (1 + u) and u / (1 + u), neither 1 - the other."""
    u = exp_nonpos_f32(-np.abs(z))
    r = ONE / (ONE + u)
    pos = z >= ZERO
    return select_f32(pos, r, u * r), select_f32(pos, u * r, r)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def _elem_loss(z, ybar, pw):
    # a term of weight 0 is 0 also at an infinite logit (z = +inf, y = 1: 0 * inf in the negative term)
    sp_pos, sp_neg = softplus_pair(z)
    return safe_mul_f32(pw * ybar, sp_neg) + safe_mul_f32(ONE - ybar, sp_pos)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_fwd_rows(logits, labels, loss_out, pos_weight, eps, missing, has_missing, mean_over_labels):
    n, c = logits.shape
    one_m_eps = ONE - eps
    eps_half = HALF * eps
    for i in prange(n):
        row = logits[i]
        lab = labels[i]
        total = ZERO
        count = _f32(c)
        if has_missing:
            count = ZERO
            for j in range(c):
                y = lab[j]
                e = _elem_loss(row[j], one_m_eps * y + eps_half, pos_weight[j])
                present = y != missing
                total += e if present else ZERO
                count += ONE if present else ZERO
        else:
            for j in range(c):
                total += _elem_loss(row[j], one_m_eps * lab[j] + eps_half, pos_weight[j])
        if mean_over_labels:
            total = total / count if count > ZERO else ZERO
        loss_out[i] = total


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid_bwd_rows(logits, labels, dloss, grad_out, pos_weight, eps, missing, has_missing, mean_over_labels):
    n, c = logits.shape
    one_m_eps = ONE - eps
    eps_half = HALF * eps
    for i in prange(n):
        row = logits[i]
        lab = labels[i]
        out = grad_out[i]
        scale = dloss[i]
        if mean_over_labels:
            count = _f32(c)
            if has_missing:
                count = ZERO
                for j in range(c):
                    count += ONE if lab[j] != missing else ZERO
            scale = scale / count if count > ZERO else ZERO
        for j in range(c):
            y = lab[j]
            ybar = one_m_eps * y + eps_half
            p, q = sigmoid_pair(row[j])
            # (1 - ybar) s(z) - pw ybar s(-z): exact (-e^-z, not 0) for confident logits
            v = scale * ((ONE - ybar) * p - pos_weight[j] * ybar * q)
            if has_missing and y == missing:
                v = ZERO
            out[j] = v


def sigmoid_ce_fwd(logits, labels2d, loss_out, pos_weight, label_smoothing, missing_label, has_missing,
                   mean_over_labels):
    """Sigmoid CE forward: writes loss_out[N]; logits and labels2d float32 [N, L], pos_weight float32 [L]."""
    _sigmoid_fwd_rows(logits, labels2d, loss_out, pos_weight, _f32(label_smoothing), _f32(missing_label),
                      bool(has_missing), bool(mean_over_labels))


def sigmoid_ce_bwd(logits, labels2d, dloss, grad_out, pos_weight, label_smoothing, missing_label, has_missing,
                   mean_over_labels):
    """Sigmoid CE backward: writes grad_out[N, L] = dloss[:, None] * d loss / d logits (0 where dropped)."""
    _sigmoid_bwd_rows(logits, labels2d, dloss, grad_out, pos_weight, _f32(label_smoothing), _f32(missing_label),
                      bool(has_missing), bool(mean_over_labels))

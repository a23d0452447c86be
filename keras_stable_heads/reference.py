"""Float64 NumPy references, written the obvious way.

Every loss in ``keras_stable_heads.ops`` and every kernel in ``keras_stable_heads.kernels`` is tested against
these functions. They take NumPy arrays, compute in float64 and return the unreduced per-example loss.
Gradients are taken by central finite differences of these references (``numeric_grad``), so no formula for a
gradient is trusted twice.

Conventions shared with the library:
- a logit of ``-inf`` masks its class: it has probability 0 and contributes nothing where its target weight is 0;
- ``logit_softcap=c`` maps ``z -> c * tanh(z / c)`` but keeps ``-inf`` as ``-inf`` (a masked class stays masked);
- a row whose logits are all ``-inf`` has loss ``+inf``;
- entries marked ``ignore_class`` (sparse) or ``missing_label`` (multilabel) contribute 0.
"""

import numpy as np


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def softcap(z, cap):
    z = _f64(z)
    if cap is None:
        return z
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(z), -np.inf, cap * np.tanh(z / cap))


def log_softmax(z):
    """log softmax over the last axis; an all -inf row gives all -inf."""
    z = _f64(z)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sum = np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        # (z - m) - log_sum, not z - (m + log_sum): at z = 1e30 even float64 would round m + log 2 to m.
        return (z - m) - log_sum, (m + log_sum)[..., 0]


def _xlogy_terms(weights, logp):
    # 0 * log(0) == 0: a class with no target mass contributes nothing, even when masked with -inf.
    with np.errstate(invalid="ignore"):
        return np.where(weights == 0, 0.0, -weights * logp)


def softmax_ce(logits, labels, *, label_smoothing=0.0, class_weight=None, z_loss=0.0, logit_softcap=None):
    """-sum_c w_c y'_c log softmax(z')_c + z_loss * lse^2, with y' = (1-eps) y + eps / C."""
    z = softcap(logits, logit_softcap)
    y = _f64(labels)
    num_classes = z.shape[-1]
    y = (1.0 - label_smoothing) * y + label_smoothing / num_classes
    w = np.ones(num_classes) if class_weight is None else _f64(class_weight)
    logp, lse = log_softmax(z)
    loss = np.sum(_xlogy_terms(w * y, logp), axis=-1)
    if z_loss:
        loss = loss + z_loss * np.where(np.isfinite(lse), lse, 0.0) ** 2
    return np.where(np.isneginf(lse), np.inf, loss)


def sparse_softmax_ce(logits, labels, *, ignore_class=None, **kwargs):
    """softmax_ce with one_hot(labels); entries equal to ignore_class give 0."""
    labels = np.asarray(labels).astype(np.int64)
    num_classes = np.shape(logits)[-1]
    ignored = np.zeros(labels.shape, bool) if ignore_class is None else labels == ignore_class
    one_hot = np.eye(num_classes)[np.where(ignored, 0, labels)]
    loss = softmax_ce(logits, one_hot, **kwargs)
    return np.where(ignored, 0.0, loss)


def linear_sparse_softmax_ce(hidden, kernel, labels, *, bias=None, transpose_kernel=False, **kwargs):
    """sparse_softmax_ce of the logits hidden @ kernel (+ bias), computed in float64; kernel (D, V), or (V, D)
    with transpose_kernel. The reference of the fused linear cross-entropy (keras_stable_heads.linear_ce)."""
    w = _f64(kernel)
    logits = _f64(hidden) @ (w.T if transpose_kernel else w)
    if bias is not None:
        logits = logits + _f64(bias)
    return sparse_softmax_ce(logits, labels, **kwargs)


def log_sigmoid(z):
    z = _f64(z)
    return -np.logaddexp(0.0, -z)


def sigmoid_bce_elementwise(logits, labels, *, pos_weight=1.0, label_smoothing=0.0):
    """-(pos_weight * y' log sigmoid(z) + (1 - y') log(1 - sigmoid(z))), y' = (1-eps) y + eps/2."""
    z = _f64(logits)
    y = (1.0 - label_smoothing) * _f64(labels) + 0.5 * label_smoothing
    pw = _f64(pos_weight)
    return -(pw * y * log_sigmoid(z) + (1.0 - y) * log_sigmoid(-z))


def binary_ce(logits, labels, **kwargs):
    """Mean over the last axis of the element-wise sigmoid cross-entropy (Keras's convention)."""
    return np.mean(sigmoid_bce_elementwise(logits, labels, **kwargs), axis=-1)


def multilabel_ce(logits, labels, *, pos_weight=1.0, label_smoothing=0.0, missing_label=None, label_reduction="mean"):
    """Per-label sigmoid CE; labels equal to missing_label are dropped; mean or sum over present labels."""
    y = _f64(labels)
    present = np.ones(y.shape, bool) if missing_label is None else y != missing_label
    elem = sigmoid_bce_elementwise(logits, np.where(present, y, 0.0), pos_weight=pos_weight,
                                   label_smoothing=label_smoothing)
    total = np.sum(np.where(present, elem, 0.0), axis=-1)
    if label_reduction == "sum":
        return total
    count = np.sum(present, axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def binary_focal_ce(logits, labels, *, gamma=2.0, alpha=None, label_smoothing=0.0):
    """mean over the last axis of alpha_t (1 - p_t)^gamma * BCE, p_t = y' p + (1 - y')(1 - p)."""
    z = _f64(logits)
    y = (1.0 - label_smoothing) * _f64(labels) + 0.5 * label_smoothing
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(-z))
        # 1 - p written as sigmoid(-z), so that the reference itself does not cancel.
        one_minus_pt = y / (1.0 + np.exp(z)) + (1.0 - y) * p
    bce = sigmoid_bce_elementwise(z, y)
    alpha_t = 1.0 if alpha is None else y * alpha + (1.0 - y) * (1.0 - alpha)
    return np.mean(alpha_t * one_minus_pt ** gamma * bce, axis=-1)


def softmax_focal_ce(logits, labels, *, gamma=2.0, alpha=None, label_smoothing=0.0):
    """-alpha sum_c y'_c (1 - p_c)^gamma log p_c."""
    z = _f64(logits)
    y = _f64(labels)
    y = (1.0 - label_smoothing) * y + label_smoothing / z.shape[-1]
    logp, lse = log_softmax(z)
    p = np.exp(logp)
    a = 1.0 if alpha is None else alpha
    with np.errstate(invalid="ignore"):
        terms = np.where(y == 0, 0.0, -y * (1.0 - p) ** gamma * logp)
    loss = a * np.sum(terms, axis=-1)
    return np.where(np.isneginf(lse), np.inf, loss)


def gaussian_nll(y_pred, y_true, *, full=False):
    """y_pred = [mean, log_scale] on the last axis; mean over D of log_scale + (y - mean)^2 / (2 scale^2)."""
    y_pred = _f64(y_pred)
    d = y_pred.shape[-1] // 2
    mean, log_scale = y_pred[..., :d], y_pred[..., d:]
    scale = np.exp(log_scale)
    nll = log_scale + 0.5 * ((_f64(y_true) - mean) / scale) ** 2
    if full:
        nll = nll + 0.5 * np.log(2.0 * np.pi)
    return np.mean(nll, axis=-1)


def laplace_nll(y_pred, y_true, *, full=False):
    """y_pred = [location, log_scale]; mean over D of log_scale + |y - location| / scale."""
    y_pred = _f64(y_pred)
    d = y_pred.shape[-1] // 2
    loc, log_scale = y_pred[..., :d], y_pred[..., d:]
    nll = log_scale + np.abs(_f64(y_true) - loc) / np.exp(log_scale)
    if full:
        nll = nll + np.log(2.0)
    return np.mean(nll, axis=-1)


def numeric_grad(f, x, cotangent=None, rel_step=1e-6):
    """Central finite-difference gradient of sum(cotangent * f(x)) in float64, one coordinate at a time."""
    x = _f64(x).copy()
    out = _f64(f(x))
    w = np.ones_like(out) if cotangent is None else _f64(cotangent)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        h = rel_step * max(1.0, abs(flat[i]))
        keep = flat[i]
        flat[i] = keep + h
        up = np.sum(w * _f64(f(x)))
        flat[i] = keep - h
        down = np.sum(w * _f64(f(x)))
        flat[i] = keep
        gflat[i] = (up - down) / (2.0 * h)
    return grad

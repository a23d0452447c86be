"""Logit-space losses as pure functions: ``f(prediction, labels, *, options) -> per-example loss``.

Each function takes logits (or distribution parameters), never probabilities, and returns the unreduced loss,
one value per example (the class or label axis reduced). Each carries a fused gradient: the backward pass is
computed from quantities saved by the forward pass (the log-sum-exp, the sigmoid), never by differentiating
through ``log``/``exp``; ``keras_stable_heads.testing.check_gradients`` proves every one of them.

float16 and bfloat16 inputs are computed in float32 and return float32; float64 stays float64. Labels are
constants: no gradient flows to them.
"""

import functools

from keras import ops

from . import _backend
from . import dispatch
from . import _validation as check
from .numerics import filled_like
from .numerics import fused
from .numerics import is_neg_inf
from .numerics import shifted_exp
from .numerics import mean_last
from .numerics import safe_mul
from .numerics import softcap
from .numerics import softplus
from .numerics import upcast

__all__ = [
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "sigmoid_binary_cross_entropy",
    "sigmoid_multilabel_cross_entropy",
    "sigmoid_focal_cross_entropy",
    "softmax_focal_cross_entropy",
    "gaussian_nll",
    "laplace_nll",
    "linear_softmax_cross_entropy_with_integer_labels",
]


# ----------------------------------------------------------------------------------------------------------------
# Shapes and constants
# ----------------------------------------------------------------------------------------------------------------


def _class_axis_last(x, axis):
    rank = len(x.shape)
    if not -rank <= axis < rank:
        raise ValueError(f"`axis`={axis} is out of range for an input of rank {rank}.")
    return x if axis % rank == rank - 1 else ops.moveaxis(x, axis, -1)


def _static_size(x, name):
    size = x.shape[-1]
    if size is None:
        raise ValueError(f"The last axis of `{name}` (classes or labels) must have a static size, got shape {x.shape}.")
    return int(size)


def _per_class(values, size, dtype, name):
    """A scalar or a length-``size`` sequence as a tensor broadcasting over the last axis; None stays None."""
    if values is None:
        return None
    if isinstance(values, float):
        return ops.convert_to_tensor(values, dtype=dtype)
    if len(values) != size:
        raise ValueError(f"`{name}` has {len(values)} entries but the inputs have {size} classes/labels on the last axis.")
    return ops.convert_to_tensor(values, dtype=dtype)


def _same_rank(labels, logits):
    """Labels of shape (...) for logits (..., 1) gain the axis; labels (..., 1) for logits (...) lose it."""
    rank, logits_rank = len(labels.shape), len(logits.shape)
    if rank == logits_rank - 1:
        return ops.expand_dims(labels, -1)
    if rank == logits_rank + 1 and labels.shape[-1] == 1:
        return ops.squeeze(labels, -1)
    if rank != logits_rank:
        raise ValueError(f"`labels` of shape {labels.shape} do not match the predictions of shape {logits.shape}.")
    return labels


def _matching_labels(labels, logits, expected, want=None, names=("labels", "logits")):
    """``labels``, after checking that each static dimension equals the logits' (or ``want``'s): broadcasting would
    pair labels with the wrong logits, or fail deep inside a backend with its own message."""
    shape, want = tuple(labels.shape), tuple(logits.shape if want is None else want)
    if len(shape) != len(want) or any(a is not None and b is not None and a != b for a, b in zip(shape, want)):
        raise ValueError(f"`{names[0]}` of shape {shape} do not match `{names[1]}` of shape {tuple(logits.shape)}: "
                         f"expected {expected}")
    return labels


def _dense_labels(labels, logits, axis):
    """One-hot or probability labels in the logits' dtype, class axis last, of the logits' shape."""
    labels = _class_axis_last(ops.cast(ops.convert_to_tensor(labels), logits.dtype), axis)
    return _matching_labels(labels, logits, "one-hot or probability labels of the logits' shape; for integer class "
                            "ids use softmax_cross_entropy_with_integer_labels (StableSparseSoftmaxCE).")


def _per_logit_labels(labels, logits):
    """Sigmoid labels in the logits' dtype, one per logit (``(...)`` for logits ``(..., 1)`` accepted)."""
    labels = _same_rank(ops.cast(ops.convert_to_tensor(labels), logits.dtype), logits)
    return _matching_labels(labels, logits, "one label per logit (0/1 or a probability), the logits' shape.")


def _integer_labels(labels, logits, axis):
    """Integer labels of shape (...) for logits with the class axis at ``axis``; (..., 1) is accepted too."""
    labels = ops.convert_to_tensor(labels)
    logits_rank = len(logits.shape)
    if len(labels.shape) == logits_rank:
        if labels.shape[axis] != 1:
            raise ValueError(
                f"Integer `labels` must have the logits' shape without the class axis, or size 1 there; got labels of "
                f"shape {labels.shape} for logits of rank {logits_rank} (axis={axis})."
            )
        labels = ops.squeeze(labels, axis)
    elif len(labels.shape) != logits_rank - 1:
        raise ValueError(
            f"Integer `labels` of shape {labels.shape} do not fit logits of rank {logits_rank}: expected rank "
            f"{logits_rank - 1} (one class id per example). For one-hot labels use `softmax_cross_entropy`."
        )
    examples = tuple(d for i, d in enumerate(logits.shape) if i != axis % logits_rank)
    labels = _matching_labels(labels, logits, "one class id per example, the logits' shape without the class axis.",
                              want=examples)
    return labels if _backend.dtype_name(labels.dtype) == "int32" else ops.cast(labels, "int32")


def _check_label_range(labels, num_classes, ignore_class):
    """Eager mode: raise on labels outside [0, num_classes). In a compiled step they give NaN instead."""
    values = _backend.host_value(labels)
    if values is None:
        return
    bad = (values < 0) | (values >= num_classes)
    if ignore_class is not None:
        bad &= values != ignore_class
    if bad.any():
        raise ValueError(
            f"Integer labels must be in [0, {num_classes}) (the number of classes), got {values[bad].ravel()[:5].tolist()}"
            + (f"; `ignore_class`={ignore_class} marks entries to skip." if ignore_class is not None else
               ". Pass `ignore_class=` to skip padding entries.")
        )


def _finish_rows(loss, log_sum):
    """A row whose logits are all -inf (``log_sum = -inf``) has no probability anywhere: its loss is +inf."""
    return ops.where(is_neg_inf(log_sum), filled_like(loss, float("inf")), loss)


# ----------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------------------------------------------


def _softmax_ce_grad(e, total, shift, log_sum, dz, target, total_target, z_loss, row_factor):
    """d loss / d logits = (p * (sum_c target_c + 2 z_loss lse) - target) * row_factor, times the softcap derivative.

    ``target`` is the weighted (smoothed) label distribution ``w_c y_c`` and ``total_target`` its row sum; the
    softmax is ``p = e / total`` from the forward's shifted exponentials (see :func:`numerics.shifted_exp`).
    ``row_factor`` (one value per row, the class axis kept) is the upstream gradient, where callers also fold in
    their per-row cases (0 for an ignored row, NaN for an out-of-range label). A row whose logits are all ``-inf``
    gets 0. Every per-row case is a per-row factor, so the logits-sized work is ``e * a - target * b``: in a
    TensorFlow graph without XLA (fit's mode on a CPU), where each op costs its own dispatch, few ops matter.
    """
    dead = is_neg_inf(log_sum)
    zero = ops.zeros_like(total)
    scale = total_target + 2.0 * z_loss * (shift + log_sum) if z_loss else total_target
    # a dead row has total 0 and e 0: its factors are 0 (not 0 / 0)
    grad = e * ops.where(dead, zero, scale * row_factor / total) - target * ops.where(dead, zero, row_factor)
    return grad if dz is None else grad * dz


def _z_loss_term(z_loss, shift, log_sum):
    # z-loss (PaLM): z_loss * log(Z)^2 keeps the normaliser near 1.
    lse = shift + log_sum
    return z_loss * ops.square(ops.where(ops.isfinite(lse), lse, ops.zeros_like(lse)))


def softmax_cross_entropy(logits, labels, *, label_smoothing=0.0, class_weight=None, z_loss=0.0, logit_softcap=None, axis=-1,
                          implementation=None):
    """Softmax cross-entropy of logits against one-hot or probability labels.

    Computes, per example, with ``z' = softcap(z)``, ``y' = (1 - eps) y + eps / C`` and class weights ``w``::

        loss = -sum_c w_c y'_c log softmax(z')_c + z_loss * logsumexp(z')^2

    The gradient is ``(p * (sum_c w_c y'_c + 2 z_loss lse) - w y') * softcap'(z)``, computed from the saved
    log-sum-exp. A ``-inf`` logit at a class with no target mass is a masked class: finite loss, zero gradient.

    Args:
        logits: float tensor ``(..., C)`` (classes on ``axis``).
        labels: one-hot or probability vectors, same shape as ``logits``.
        label_smoothing: ``eps`` in [0, 1]; mixes the labels with the uniform distribution over ``C``.
        class_weight: optional length-``C`` sequence of non-negative weights ``w_c`` (as ``torch``'s ``weight``,
            without its batch renormalisation: Keras's reduction divides by the batch size).
        z_loss: coefficient of the z-loss ``lse^2`` (PaLM, Chowdhery et al. 2022); 0 disables it.
        logit_softcap: ``c > 0`` applies ``c * tanh(z / c)`` before the softmax (Gemma 2); ``-inf`` stays ``-inf``.
        axis: the class axis.
        implementation: ``"auto"`` (default), ``"portable"``, ``"native"``, ``"numba_cpu"`` or ``"numba_cuda"``; see
            :mod:`keras_stable_heads.dispatch`.

    Returns:
        The per-example loss, shape ``logits.shape`` without ``axis``.

    Example:
        >>> import numpy as np
        >>> from keras_stable_heads import ops
        >>> loss = ops.softmax_cross_entropy(np.array([[0.0, 1e4]]), np.array([[1.0, 0.0]]))
        >>> float(loss[0])
        10000.0
    """
    eps = check.fraction("label_smoothing", label_smoothing)
    class_weight = check.weights_or_none("class_weight", class_weight)
    z_loss = check.non_negative("z_loss", z_loss)
    cap = check.positive_or_none("logit_softcap", logit_softcap)
    axis = check.axis(axis)
    logits = _class_axis_last(upcast(logits), axis)
    labels = _dense_labels(labels, logits, axis)
    num_classes = _static_size(logits, "logits")
    w = _per_class(class_weight, num_classes, logits.dtype, "class_weight")  # validates its length on every path
    options = dict(label_smoothing=eps, class_weight=class_weight, z_loss=z_loss, logit_softcap=cap)
    choice = dispatch.choose("softmax_ce", logits, implementation, options)
    portable = functools.partial(_softmax_ce_portable, logits, labels, num_classes, eps, w, z_loss, cap)
    if choice.implementation != "portable":
        return dispatch.run(choice, "softmax_ce", logits, labels, options, exact=portable)
    return portable()


def _softmax_ce_portable(logits, labels, num_classes, eps, w, z_loss, cap):
    target = (1.0 - eps) * labels + eps / num_classes if eps else labels
    if w is not None:
        target = target * w
    total_target = ops.sum(target, axis=-1, keepdims=True)

    def forward(x):
        z, dz = softcap(x, cap)
        shift, e, total = shifted_exp(z)
        log_sum = ops.log(total)
        # -log p_c == (shift - z_c) + log_sum, never rounding shift + log_sum.
        loss = ops.sum(safe_mul(target, (shift - z) + log_sum), axis=-1, keepdims=True)
        if z_loss:
            loss = loss + _z_loss_term(z_loss, shift, log_sum)
        loss = _finish_rows(loss, log_sum)[..., 0]
        return loss, lambda g: _softmax_ce_grad(e, total, shift, log_sum, dz, target, total_target, z_loss,
                                                ops.expand_dims(g, -1))

    return fused(forward)(logits)


def softmax_cross_entropy_with_integer_labels(
    logits, labels, *, ignore_class=None, label_smoothing=0.0, class_weight=None, z_loss=0.0, logit_softcap=None, axis=-1,
    implementation=None,
):
    """Softmax cross-entropy against integer class ids, without building a one-hot in the forward pass.

    Equals :func:`softmax_cross_entropy` with ``one_hot(labels)``. With ``y'`` the smoothed one-hot::

        loss = (1 - eps) w_y (lse - z'_y) + (eps / C) (sum_c w_c lse - sum_c w_c z'_c) + z_loss lse^2

    Entries whose label equals ``ignore_class`` get loss 0 and zero gradient (the Loss class masks them out of
    the average). A label outside ``[0, C)`` raises ``ValueError`` in eager mode and gives NaN in a compiled step.

    Args:
        logits: float tensor ``(..., C)`` (classes on ``axis``).
        labels: integer class ids, shape ``logits.shape`` without ``axis``, or with size 1 there.
        ignore_class: an integer label (e.g. -1 or 255) that marks entries to skip.
        label_smoothing, class_weight, z_loss, logit_softcap, axis, implementation: as in :func:`softmax_cross_entropy`.

    Example:
        >>> import numpy as np
        >>> from keras_stable_heads import ops
        >>> loss = ops.softmax_cross_entropy_with_integer_labels(np.array([[0.0, -np.inf, 2.0]]), np.array([2]))
        >>> round(float(loss[0]), 4)
        0.1269
    """
    ignore_class = check.integer_or_none("ignore_class", ignore_class)
    eps = check.fraction("label_smoothing", label_smoothing)
    class_weight = check.weights_or_none("class_weight", class_weight)
    z_loss = check.non_negative("z_loss", z_loss)
    cap = check.positive_or_none("logit_softcap", logit_softcap)
    axis = check.axis(axis)
    logits = upcast(logits)
    labels = _integer_labels(labels, logits, axis)
    logits = _class_axis_last(logits, axis)
    num_classes = _static_size(logits, "logits")
    options = dict(ignore_class=ignore_class, label_smoothing=eps, class_weight=class_weight, z_loss=z_loss,
                   logit_softcap=cap)
    w = _per_class(class_weight, num_classes, logits.dtype, "class_weight")  # validates its length on every path
    choice = dispatch.choose("sparse_softmax_ce", logits, implementation, options)
    check_labels = functools.partial(_check_label_range, labels, num_classes, ignore_class)
    if not dispatch.checks_labels(choice):  # else the op itself finds a bad label, and then calls check_labels
        check_labels()

    def portable():
        forward = _sparse_softmax_ce_forward(labels, num_classes, logits.dtype, ignore_class=ignore_class, eps=eps,
                                            w=w, z_loss=z_loss, cap=cap)
        return fused(forward)(logits)

    if choice.implementation != "portable":
        return dispatch.run(choice, "sparse_softmax_ce", logits, labels, options, exact=portable,
                            check_labels=check_labels)
    return portable()


def _sparse_softmax_ce_forward(labels, num_classes, dtype, *, ignore_class, eps, w, z_loss, cap):
    """The portable sparse softmax cross-entropy for fixed integer ``labels``, as ``forward(logits) -> (loss, vjp)``.

    The one piece of code behind :func:`softmax_cross_entropy_with_integer_labels` (which wraps it with
    :func:`numerics.fused`) and the chunks of the fused linear cross-entropy (:mod:`keras_stable_heads.linear_ce`,
    which calls it on each chunk of logits). Options are validated already: ``eps`` the label smoothing, ``w`` the
    class weights as a tensor or None, ``cap`` the softcap or None. ``vjp(upstream)`` is d loss / d logits times
    the per-example ``upstream``.
    """
    in_range = ops.logical_and(labels >= 0, labels < num_classes)
    if ignore_class is None:
        kept, invalid = in_range, None
    else:
        ignored = ops.equal(labels, ignore_class)
        kept = ops.logical_and(in_range, ops.logical_not(ignored))
        invalid = ops.logical_and(ops.logical_not(in_range), ops.logical_not(ignored))
    safe_labels = ops.expand_dims(ops.where(kept, labels, ops.zeros_like(labels)), -1)
    # Per-example weight of the true class, and the total weight of the smoothed target (a row sum of w y'); with
    # neither smoothing nor class weights (what most training jobs ask for) the target is the one-hot itself.
    weighted = bool(eps) or w is not None
    w_y = (ops.ones(ops.shape(safe_labels), dtype) if w is None else ops.take(w, safe_labels)) if weighted else None
    w_sum = float(num_classes) if w is None else ops.sum(w)
    total_target = (1.0 - eps) * w_y + (eps / num_classes) * w_sum if weighted else 1.0

    def forward(x):
        z, dz = softcap(x, cap)
        shift, e, total = shifted_exp(z)
        log_sum = ops.log(total)
        z_y = _backend.take_class(z, safe_labels)
        # -log p_y == (shift - z_y) + log_sum: exact at the row max (never rounding shift + log_sum)
        loss = (shift - z_y) + log_sum if not weighted else safe_mul((1.0 - eps) * w_y, (shift - z_y) + log_sum)
        if eps:
            # sum_c w_c (lse - z_c) == w_sum log_sum - sum_c w_c (z_c - shift): shift cancels exactly
            # (a class of weight 0 adds 0, also where its logit is -inf)
            weighted_z = ops.sum((z - shift) if w is None else safe_mul(w, z - shift), axis=-1, keepdims=True)
            loss = loss + (eps / num_classes) * (w_sum * log_sum - weighted_z)
        if z_loss:
            loss = loss + _z_loss_term(z_loss, shift, log_sum)
        loss = _finish_rows(loss, log_sum)[..., 0]
        loss = _mark_labels(loss, kept, invalid)

        def vjp(g):
            target = ops.one_hot(safe_labels[..., 0], num_classes, dtype=dtype)
            if weighted:
                target = (1.0 - eps) * w_y * target
            if eps:
                target = target + (eps / num_classes) * (1.0 if w is None else w)
            # ignored rows 0, out-of-range labels NaN: as a per-row factor of the upstream
            row_factor = ops.expand_dims(_mark_labels(g, kept, invalid), -1)
            grad = _softmax_ce_grad(e, total, shift, log_sum, dz, target, total_target, z_loss, row_factor)
            if invalid is not None:  # exactly 0 for an ignored row, whatever its logits (inf * 0 would be NaN)
                grad = ops.where(ops.expand_dims(ops.logical_or(kept, invalid), -1), grad, ops.zeros_like(grad))
            return grad

        return loss, vjp

    return forward


def _mark_labels(value, kept, invalid):
    """Ignored entries -> 0; out-of-range labels -> NaN (loud in a compiled step, where no error can be raised).
    ``invalid=None``: there is no ignored class, so every entry not kept is out of range."""
    nan = filled_like(value, float("nan"))
    return ops.where(kept, value, nan if invalid is None else ops.where(invalid, nan, ops.zeros_like(value)))


def softmax_focal_cross_entropy(logits, labels, *, gamma=2.0, alpha=None, label_smoothing=0.0, axis=-1,
                                implementation=None):
    """Softmax focal loss (Lin et al. 2017) computed in log space from logits.

    ``loss = -alpha sum_c y'_c (1 - p_c)^gamma log p_c`` with ``log p = z - lse`` and ``1 - p_c = -expm1(log p_c)``,
    so it never saturates: at ``gamma=0, alpha=None`` it equals :func:`softmax_cross_entropy` exactly.
    The gradient is ``alpha (y'_j h_j - p_j sum_c y'_c h_c)`` with ``h_c = (1-p_c)^gamma (gamma p_c log p_c / (1-p_c) - 1)``.
    ``implementation``: as in :func:`softmax_cross_entropy`.
    """
    gamma = check.non_negative("gamma", gamma)
    alpha = check.number_or_none("alpha", alpha)
    if alpha is not None:
        alpha = check.non_negative("alpha", alpha)
    eps = check.fraction("label_smoothing", label_smoothing)
    axis = check.axis(axis)
    logits = _class_axis_last(upcast(logits), axis)
    labels = _dense_labels(labels, logits, axis)
    num_classes = _static_size(logits, "logits")
    choice = dispatch.choose("softmax_focal_ce", logits, implementation)
    if choice.implementation != "portable":
        options = dict(gamma=gamma, alpha=alpha, label_smoothing=eps)
        return dispatch.run(choice, "softmax_focal_ce", logits, labels, options)
    target = (1.0 - eps) * labels + eps / num_classes if eps else labels

    def forward(z):
        shift, e, total = shifted_exp(z)
        log_sum = ops.log(total)
        log_p = (z - shift) - log_sum
        # 1 - p == -expm1(log p): exact as p -> 1, where 1 - exp(log p) would cancel.
        one_minus_p = -ops.expm1(log_p)
        modulator = ops.power(one_minus_p, gamma)
        loss = ops.sum(safe_mul(target * modulator, -log_p), axis=-1, keepdims=True)
        if alpha is not None:
            loss = alpha * loss
        loss = _finish_rows(loss, log_sum)[..., 0]

        def vjp(g):
            p = e / total  # the forward's exponentials: one exp per logit, as in softmax_cross_entropy
            zero = ops.zeros_like(p)
            # p log p / (1 - p) -> -1 as p -> 1 and -> 0 as p -> 0 (a masked class).
            ratio = ops.where(
                ops.equal(log_p, 0.0), -ops.ones_like(p), ops.where(ops.equal(p, 0.0), zero, p * log_p / one_minus_p)
            )
            h = modulator * (gamma * ratio - 1.0)
            target_h = safe_mul(target, h)
            grad = target_h - p * ops.sum(target_h, axis=-1, keepdims=True)
            if alpha is not None:
                grad = alpha * grad
            grad = ops.where(is_neg_inf(log_sum), ops.zeros_like(grad), grad)
            return grad * ops.expand_dims(g, -1)

        return loss, vjp

    return fused(forward)(logits)


# ----------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ----------------------------------------------------------------------------------------------------------------


def _bce_terms(z, target_pos, target_neg):
    # -log sigmoid(z) == softplus(-z) and -log(1 - sigmoid(z)) == softplus(z): no log of a rounded probability.
    return safe_mul(target_pos, softplus(-z)) + safe_mul(target_neg, softplus(z))


def _sigmoid_labels(logits, labels, label_smoothing, missing_label):
    """(labels smoothed towards 1/2 with missing entries zeroed, the mask of present entries or None)."""
    labels = _per_logit_labels(labels, logits)
    present = None
    if missing_label is not None:
        present = ops.not_equal(labels, missing_label)
        labels = ops.where(present, labels, ops.zeros_like(labels))
    if label_smoothing:
        labels = (1.0 - label_smoothing) * labels + 0.5 * label_smoothing
    return labels, present


def _label_reduction(values, present, mean):
    """Sum or mean over the last axis, over present entries only; a row with none present gives 0.

    Returns ``(reduced, scale)`` where ``scale`` is d reduced / d value for a present entry.
    """
    size = values.shape[-1]
    if present is None:
        total = ops.sum(values, axis=-1)
        return (total / size, 1.0 / size) if mean else (total, 1.0)
    values = ops.where(present, values, ops.zeros_like(values))
    total = ops.sum(values, axis=-1)
    if not mean:
        return total, ops.cast(present, values.dtype)
    count = ops.sum(ops.cast(present, values.dtype), axis=-1)
    scale = ops.where(count > 0, 1.0 / ops.where(count > 0, count, ops.ones_like(count)), ops.zeros_like(count))
    return total * scale, ops.cast(present, values.dtype) * ops.expand_dims(scale, -1)


def _sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, missing_label, mean, implementation):
    logits = upcast(logits)
    choice = dispatch.choose("sigmoid_ce", logits, implementation)
    if choice.implementation != "portable":
        options = dict(pos_weight=pos_weight, label_smoothing=label_smoothing, missing_label=missing_label,
                       label_reduction="mean" if mean else "sum")
        return dispatch.run(choice, "sigmoid_ce", logits, _per_logit_labels(labels, logits), options)
    y, present = _sigmoid_labels(logits, labels, label_smoothing, missing_label)
    pw = _per_class(pos_weight, _static_size(logits, "logits"), logits.dtype, "pos_weight")
    target_pos = y if pw is None else pw * y

    def forward(z):
        loss, scale = _label_reduction(_bce_terms(z, target_pos, 1.0 - y), present, mean)

        def vjp(g):
            # d/dz [pw y softplus(-z) + (1 - y) softplus(z)] = (1 - y) sigmoid(z) - pw y sigmoid(-z): no
            # sigmoid(z) - 1 cancellation, so the gradient stays exact (-e^-z, not 0) for confident logits.
            grad = safe_mul(1.0 - y, ops.sigmoid(z)) - safe_mul(target_pos, ops.sigmoid(-z))
            return grad * scale * ops.expand_dims(g, -1)

        return loss, vjp

    return fused(forward)(logits)


def sigmoid_binary_cross_entropy(logits, labels, *, pos_weight=None, label_smoothing=0.0, implementation=None):
    """Binary cross-entropy from logits, averaged over the last axis (Keras's ``binary_crossentropy`` convention).

    ``loss = mean(pos_weight * y' softplus(-z) + (1 - y') softplus(z))`` with ``y' = (1 - eps) y + eps / 2``.
    Exact for every logit: at ``z = -30, y = 1`` the loss is 30 and its gradient -1 (a probability-space loss
    clipped at 1e-7 gives 16.118 and 0). ``pos_weight`` is ``torch``'s ``pos_weight`` (scalar or per unit).

    Example:
        >>> import numpy as np
        >>> from keras_stable_heads import ops
        >>> float(ops.sigmoid_binary_cross_entropy(np.array([[-30.0]]), np.array([[1.0]]))[0])
        30.0
    """
    pos_weight = check.weights_or_none("pos_weight", pos_weight, allow_scalar=True)
    eps = check.fraction("label_smoothing", label_smoothing)
    return _sigmoid_cross_entropy(logits, labels, pos_weight, eps, None, True, implementation)


def sigmoid_multilabel_cross_entropy(
    logits, labels, *, pos_weight=None, label_smoothing=0.0, missing_label=None, label_reduction="mean",
    implementation=None,
):
    """Independent sigmoid cross-entropy per label, reduced over the labels of each example.

    Labels equal to ``missing_label`` (e.g. -1) are unknown: they add nothing and do not count in the mean.
    An example with every label missing gives 0 (the Loss class masks it out of the batch average).

    Args:
        logits: ``(..., L)`` logits, one per label.
        labels: multi-hot ``(..., L)`` in [0, 1], or ``missing_label``.
        pos_weight: scalar or length-``L`` weight of the positive term.
        label_smoothing: ``eps``; labels become ``(1 - eps) y + eps / 2``.
        missing_label: a value marking an unknown label, or None.
        label_reduction: ``"mean"`` (over present labels) or ``"sum"``.
        implementation: as in :func:`softmax_cross_entropy`.
    """
    pos_weight = check.weights_or_none("pos_weight", pos_weight, allow_scalar=True)
    eps = check.fraction("label_smoothing", label_smoothing)
    missing_label = check.number_or_none("missing_label", missing_label)
    label_reduction = check.choice("label_reduction", label_reduction, ("mean", "sum"))
    return _sigmoid_cross_entropy(logits, labels, pos_weight, eps, missing_label, label_reduction == "mean", implementation)


def sigmoid_focal_cross_entropy(logits, labels, *, gamma=2.0, alpha=None, label_smoothing=0.0, implementation=None):
    """Binary focal loss (Lin et al. 2017) from logits, averaged over the last axis.

    ``loss = alpha_t (1 - p_t)^gamma BCE`` with ``1 - p_t = y' sigmoid(-z) + (1 - y') sigmoid(z)`` computed without
    cancellation and the BCE from softplus, so it never saturates. ``alpha_t = alpha y' + (1 - alpha)(1 - y')``
    when ``alpha`` is given. ``gamma=0, alpha=None`` equals :func:`sigmoid_binary_cross_entropy` exactly.
    ``implementation``: as in :func:`softmax_cross_entropy`.
    """
    gamma = check.non_negative("gamma", gamma)
    alpha = check.number_or_none("alpha", alpha)
    if alpha is not None:
        alpha = check.fraction("alpha", alpha)
    eps = check.fraction("label_smoothing", label_smoothing)
    logits = upcast(logits)
    choice = dispatch.choose("sigmoid_focal_ce", logits, implementation)
    if choice.implementation != "portable":
        options = dict(gamma=gamma, alpha=alpha, label_smoothing=eps)
        return dispatch.run(choice, "sigmoid_focal_ce", logits, _per_logit_labels(labels, logits), options)
    y, _ = _sigmoid_labels(logits, labels, eps, None)
    alpha_t = None if alpha is None else alpha * y + (1.0 - alpha) * (1.0 - y)

    def forward(z):
        p, q = ops.sigmoid(z), ops.sigmoid(-z)
        one_minus_pt = y * q + (1.0 - y) * p
        modulator = ops.power(one_minus_pt, gamma)
        bce = _bce_terms(z, y, 1.0 - y)
        elem = modulator * bce if alpha_t is None else alpha_t * modulator * bce
        loss, scale = _label_reduction(elem, None, mean=True)

        def vjp(g):
            # d log(1 - p_t) / dz = (1 - 2y) p q / (1 - p_t); 0 where 1 - p_t underflowed (then modulator is 0 too).
            positive = one_minus_pt > 0.0
            ratio = ops.where(positive, (1.0 - 2.0 * y) * p * q / ops.where(positive, one_minus_pt, 1.0), 0.0)
            # d BCE / dz = (1 - y) p - y q, written as in the cross-entropy (no p - 1 cancellation).
            grad = modulator * (gamma * ratio * bce + (safe_mul(1.0 - y, p) - safe_mul(y, q)))
            if alpha_t is not None:
                grad = alpha_t * grad
            return grad * scale * ops.expand_dims(g, -1)

        return loss, vjp

    return fused(forward)(logits)


# ----------------------------------------------------------------------------------------------------------------
# Regression likelihoods
# ----------------------------------------------------------------------------------------------------------------


def _location_scale(params, targets):
    params = upcast(params)
    width = _static_size(params, "y_pred")
    if width % 2:
        raise ValueError(
            f"`y_pred` must hold [location, log_scale] concatenated on the last axis (2*D values), got {width} values."
        )
    dim = width // 2
    targets = _same_rank(ops.cast(ops.convert_to_tensor(targets), params.dtype), params)
    if targets.shape[-1] is not None and targets.shape[-1] != dim:
        raise ValueError(
            f"`y_true` has {targets.shape[-1]} values per example but `y_pred` holds {width} = 2 x {dim} "
            f"(location and log-scale for each of {dim} targets)."
        )
    targets = _matching_labels(targets, params, f"{dim} target value(s) per example, one per location in `y_pred`.",
                               want=tuple(params.shape[:-1]) + (dim,), names=("y_true", "y_pred"))
    return params, targets, dim


def _location_scale_nll(params, targets, nll_and_grads, op, implementation):
    """Shared driver: ``nll_and_grads(residual, inv_scale) -> (elementwise nll without log_scale, d/dloc, d/dlog_scale)``."""
    params, targets, dim = _location_scale(params, targets)
    choice = dispatch.choose(op, params, implementation)
    if choice.implementation != "portable":
        return dispatch.run(choice, op, params, targets, {})

    def forward(x):
        loc, log_scale = x[..., :dim], x[..., dim:]
        inv_scale = ops.exp(-log_scale)
        core, d_loc, d_log_scale = nll_and_grads(targets - loc, inv_scale)
        loss = mean_last(log_scale + core)

        def vjp(g):
            g = ops.expand_dims(g, -1) / dim
            return ops.concatenate([d_loc * g, (1.0 + d_log_scale) * g], axis=-1)

        return loss, vjp

    return fused(forward)(params)


def _gaussian_terms(residual, inv_scale):
    r = residual * inv_scale
    return 0.5 * ops.square(r), -r * inv_scale, -ops.square(r)


def _laplace_terms(residual, inv_scale):
    a = ops.abs(residual) * inv_scale
    return a, -ops.sign(residual) * inv_scale, -a


def gaussian_nll(y_pred, y_true, *, full=False, implementation=None):
    """Gaussian negative log-likelihood, averaged over the D targets of an example.

    ``y_pred`` is ``[mean, log_scale]`` concatenated on the last axis (``2 * D`` values, mean first) and
    ``loss = mean(log_scale + (y - mean)^2 / (2 exp(2 log_scale)))`` (+ ``log(2 pi) / 2`` with ``full=True``).
    With the scale fixed this is mean squared error up to constants; learning ``log_scale`` gives the spread.
    Floor ``log_scale`` (``GaussianHead`` does) so that ``exp(-log_scale)`` stays finite.
    ``implementation``: as in :func:`softmax_cross_entropy`.
    """
    loss = _location_scale_nll(y_pred, y_true, _gaussian_terms, "gaussian_nll", implementation)
    # log N(y | m, s) = -log s - (y - m)^2 / 2 s^2 - log(2 pi) / 2
    return loss + 0.9189385332046727 if full else loss


def laplace_nll(y_pred, y_true, *, full=False, implementation=None):
    """Laplace negative log-likelihood (location = the median), averaged over the D targets of an example.

    ``y_pred`` is ``[location, log_scale]`` on the last axis and ``loss = mean(log_scale + |y - location| / scale)``
    (+ ``log 2`` with ``full=True``). With the scale fixed this is mean absolute error up to constants.
    ``implementation``: as in :func:`softmax_cross_entropy`.
    """
    loss = _location_scale_nll(y_pred, y_true, _laplace_terms, "laplace_nll", implementation)
    # log Laplace(y | m, b) = -log b - |y - m| / b - log 2
    return loss + 0.6931471805599453 if full else loss


# The fused output projection + sparse softmax CE; it builds on the helpers above, so it is imported last.
from .linear_ce import linear_softmax_cross_entropy_with_integer_labels  # noqa: E402

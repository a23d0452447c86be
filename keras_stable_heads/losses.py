"""Keras ``Loss`` classes: each validates its options once, stores them and calls its function in ``ops``.

Reduction, ``sample_weight``, Keras masks and dtype casting stay in ``keras.losses.Loss``. Every class takes
**logits** (or distribution parameters) as ``y_pred``; there is no ``from_logits`` flag to get wrong.
"""

import keras
from keras import ops as kops
from keras.src.backend import get_keras_mask
from keras.src.backend import set_keras_mask

from . import _backend
from . import _validation as check
from . import dispatch
from . import ops
from ._export import export


class _StableLoss(keras.losses.Loss):
    """Shared config plumbing: ``_options`` names the constructor options that ``get_config`` round-trips."""

    _options = ()

    def __init__(self, *, name, reduction, dtype, implementation=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if implementation is not None:
            dispatch.requested(implementation)  # validate now: a ValueError naming the choices
        self.implementation = implementation

    def _op_options(self):
        return {key: getattr(self, key) for key in self._options}

    def get_config(self):
        config = super().get_config()
        config.update(self._op_options())
        config["dtype"] = self._dtype_policy.name
        return config

    def _mask_rows(self, loss, keep, y_pred):
        """Attach ``keep`` as the Keras mask: 'sum_over_batch_size' then averages over kept entries (all dropped -> 0).

        In a multi-replica ``tf.distribute`` step Keras divides each replica by its own kept count; scaling by
        kept-here / mean-kept-over-replicas makes it the global batch's count, as on one device.
        """
        if self.reduction in ("sum_over_batch_size", "mean"):
            in_mask = get_keras_mask(y_pred)
            scale = _backend.global_count_scale(keep if in_mask is None else kops.logical_and(keep, in_mask))
            if scale is not None:
                loss = loss * kops.cast(scale, loss.dtype)
        set_keras_mask(loss, keep)
        return loss


@export
class StableBinaryCE(_StableLoss):
    """Binary cross-entropy from logits (one sigmoid unit, or several averaged like Keras's ``BinaryCrossentropy``).

    Exact for every logit: at logit -30 with label 1 the loss is 30 and the gradient -1.

    Args:
        pos_weight: weight of the positive term (``torch``'s ``pos_weight``), a scalar or one per unit.
        label_smoothing: ``eps`` in [0, 1]; labels become ``(1 - eps) y + eps / 2``.
        implementation: None/``"auto"``, ``"portable"``, ``"numba_cpu"`` or ``"numba_cuda"`` (see
            ``keras_stable_heads.dispatch``).
        reduction, name, dtype: as ``keras.losses.Loss``.

    Example:
        >>> import keras
        >>> from keras_stable_heads import StableBinaryCE
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])  # logits: no sigmoid
        >>> model.compile(optimizer="adam", loss=StableBinaryCE(pos_weight=3.0))
    """

    _options = ("pos_weight", "label_smoothing", "implementation")
    _kernel_op = "sigmoid_ce"

    def __init__(self, pos_weight=None, label_smoothing=0.0, implementation=None, reduction="sum_over_batch_size",
                 name="stable_binary_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.pos_weight = check.weights_or_none("pos_weight", pos_weight, allow_scalar=True)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)

    def call(self, y_true, y_pred):
        return ops.sigmoid_binary_cross_entropy(y_pred, y_true, **self._op_options())


@export
class StableSoftmaxCE(_StableLoss):
    """Softmax cross-entropy from logits against one-hot or probability labels.

    Args:
        label_smoothing: ``eps`` in [0, 1].
        class_weight: optional list of ``C`` non-negative weights.
        z_loss: coefficient of ``logsumexp(z)^2`` (0 disables).
        logit_softcap: ``c > 0`` applies ``c * tanh(z / c)`` first; None disables.
        axis: the class axis.
        implementation: None/``"auto"``, ``"portable"``, ``"native"``, ``"numba_cpu"`` or ``"numba_cuda"`` (see
            ``keras_stable_heads.dispatch``).
        reduction, name, dtype: as ``keras.losses.Loss``.

    Example:
        >>> import keras
        >>> from keras_stable_heads import StableSoftmaxCE
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])  # logits: no softmax
        >>> model.compile(optimizer="adam", loss=StableSoftmaxCE(label_smoothing=0.1))
    """

    _options = ("label_smoothing", "class_weight", "z_loss", "logit_softcap", "axis", "implementation")
    _kernel_op = "softmax_ce"

    def __init__(self, label_smoothing=0.0, class_weight=None, z_loss=0.0, logit_softcap=None, axis=-1,
                 implementation=None, reduction="sum_over_batch_size", name="stable_softmax_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)
        self.class_weight = check.weights_or_none("class_weight", class_weight)
        self.z_loss = check.non_negative("z_loss", z_loss)
        self.logit_softcap = check.positive_or_none("logit_softcap", logit_softcap)
        self.axis = check.axis(axis)

    def call(self, y_true, y_pred):
        return ops.softmax_cross_entropy(y_pred, y_true, **self._op_options())


@export
class StableSparseSoftmaxCE(_StableLoss):
    """Softmax cross-entropy from logits against integer class ids, shape ``(...)`` or ``(..., 1)``.

    With ``ignore_class``, entries with that label are dropped: the default reduction averages over the kept
    entries only, and a batch with every entry ignored gives 0 (not NaN).

    Args:
        ignore_class: an integer label marking entries to skip (e.g. -1 or 255), or None.
        label_smoothing, class_weight, z_loss, logit_softcap, axis, implementation: as ``StableSoftmaxCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("ignore_class", "label_smoothing", "class_weight", "z_loss", "logit_softcap", "axis", "implementation")
    _kernel_op = "sparse_softmax_ce"

    def __init__(self, ignore_class=None, label_smoothing=0.0, class_weight=None, z_loss=0.0, logit_softcap=None,
                 axis=-1, implementation=None, reduction="sum_over_batch_size", name="stable_sparse_softmax_ce",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.ignore_class = check.integer_or_none("ignore_class", ignore_class)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)
        self.class_weight = check.weights_or_none("class_weight", class_weight)
        self.z_loss = check.non_negative("z_loss", z_loss)
        self.logit_softcap = check.positive_or_none("logit_softcap", logit_softcap)
        self.axis = check.axis(axis)

    def call(self, y_true, y_pred):
        loss = ops.softmax_cross_entropy_with_integer_labels(y_pred, y_true, **self._op_options())
        if self.ignore_class is None:
            return loss
        labels = kops.reshape(kops.cast(y_true, "int32"), kops.shape(loss))
        return self._mask_rows(loss, kops.not_equal(labels, self.ignore_class), y_pred)


@export
class StableMultilabelCE(_StableLoss):
    """Multi-label cross-entropy from logits: an independent sigmoid per label.

    Args:
        pos_weight: scalar or one weight per label for the positive term.
        label_smoothing: ``eps``; labels become ``(1 - eps) y + eps / 2``.
        missing_label: a label value (e.g. -1) marking an unknown label, dropped from the loss; an example with
            every label missing is masked out of the batch average.
        label_reduction: ``"mean"`` over present labels (default) or ``"sum"``.
        implementation: as ``StableBinaryCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("pos_weight", "label_smoothing", "missing_label", "label_reduction", "implementation")
    _kernel_op = "sigmoid_ce"

    def __init__(self, pos_weight=None, label_smoothing=0.0, missing_label=None, label_reduction="mean",
                 implementation=None, reduction="sum_over_batch_size", name="stable_multilabel_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.pos_weight = check.weights_or_none("pos_weight", pos_weight, allow_scalar=True)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)
        self.missing_label = check.number_or_none("missing_label", missing_label)
        self.label_reduction = check.choice("label_reduction", label_reduction, ("mean", "sum"))

    def call(self, y_true, y_pred):
        loss = ops.sigmoid_multilabel_cross_entropy(y_pred, y_true, **self._op_options())
        if self.missing_label is None:
            return loss
        # labels (B,) for logits (B, 1) are one label per row, as the op reads them (not a row of B labels)
        labels = ops._same_rank(kops.convert_to_tensor(y_true), y_pred)
        present = kops.not_equal(labels, self.missing_label)
        return self._mask_rows(loss, kops.any(present, axis=-1), y_pred)


@export
class StableBinaryFocalCE(_StableLoss):
    """Binary focal cross-entropy from logits, in log space: never saturates; ``gamma=0, alpha=None`` is BCE.

    Args:
        gamma: focusing exponent >= 0.
        alpha: weight of the positive class in [0, 1], or None for no class balancing.
        label_smoothing: ``eps``; labels become ``(1 - eps) y + eps / 2``.
        implementation: as ``StableBinaryCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("gamma", "alpha", "label_smoothing", "implementation")
    _kernel_op = "sigmoid_focal_ce"

    def __init__(self, gamma=2.0, alpha=None, label_smoothing=0.0, implementation=None,
                 reduction="sum_over_batch_size", name="stable_binary_focal_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.gamma = check.non_negative("gamma", gamma)
        self.alpha = None if alpha is None else check.fraction("alpha", alpha)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)

    def call(self, y_true, y_pred):
        return ops.sigmoid_focal_cross_entropy(y_pred, y_true, **self._op_options())


@export
class StableSoftmaxFocalCE(_StableLoss):
    """Softmax focal cross-entropy from logits against one-hot or probability labels, in log space.

    Args:
        gamma: focusing exponent >= 0.
        alpha: a non-negative scale, or None. ``gamma=0, alpha=None`` equals ``StableSoftmaxCE`` exactly.
        label_smoothing: ``eps`` in [0, 1].
        axis: the class axis.
        implementation: as ``StableSoftmaxCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("gamma", "alpha", "label_smoothing", "axis", "implementation")
    _kernel_op = "softmax_focal_ce"

    def __init__(self, gamma=2.0, alpha=None, label_smoothing=0.0, axis=-1, implementation=None,
                 reduction="sum_over_batch_size", name="stable_softmax_focal_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.gamma = check.non_negative("gamma", gamma)
        self.alpha = None if alpha is None else check.non_negative("alpha", alpha)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)
        self.axis = check.axis(axis)

    def call(self, y_true, y_pred):
        return ops.softmax_focal_cross_entropy(y_pred, y_true, **self._op_options())


@export
class GaussianNLL(_StableLoss):
    """Gaussian negative log-likelihood; ``y_pred`` is ``[mean, log_scale]`` on the last axis (2·D values).

    Args:
        full: add the constant ``log(2 pi) / 2`` so the value is the true negative log-likelihood.
        implementation: as ``StableBinaryCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("full", "implementation")
    _kernel_op = "gaussian_nll"

    def __init__(self, full=False, implementation=None, reduction="sum_over_batch_size", name="gaussian_nll",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.full = bool(full)

    def call(self, y_true, y_pred):
        return ops.gaussian_nll(y_pred, y_true, **self._op_options())


@export
class LaplaceNLL(_StableLoss):
    """Laplace negative log-likelihood; ``y_pred`` is ``[location, log_scale]`` on the last axis (2·D values).

    The location is the conditional median; with a fixed scale this is mean absolute error up to constants.

    Args:
        full: add the constant ``log 2``.
        implementation: as ``StableBinaryCE``.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    _options = ("full", "implementation")
    _kernel_op = "laplace_nll"

    def __init__(self, full=False, implementation=None, reduction="sum_over_batch_size", name="laplace_nll",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.full = bool(full)

    def call(self, y_true, y_pred):
        return ops.laplace_nll(y_pred, y_true, **self._op_options())

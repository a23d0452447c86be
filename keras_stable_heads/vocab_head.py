"""A vocabulary head trained through the fused linear cross-entropy: ``fit`` never sees the (tokens x V) logits.

Three objects work together:

- :class:`FusedSoftmaxHead` owns the ``(D, V)`` kernel and bias. Its training output is a float32 tensor of
  shape ``(..., 0)`` — no values — that carries, as a tensor attribute (the way Keras carries a mask from an output
  to its loss), what the loss needs: the hidden states, the kernel and bias as read in this step (traced values
  on JAX, watched variables on TensorFlow, parameters on torch, so gradients reach them), the head and its mask.
  The empty shape is deliberate: a plain Keras loss or metric given it raises (argmax over an empty axis) instead
  of silently reading hidden states as logits. Called with ``output="logits"`` or ``"probabilities"`` it
  materialises them; :func:`keras_stable_heads.inference_model` builds that model, with the same weights.
- :class:`FusedSparseSoftmaxCE` reads the attribute and calls :func:`keras_stable_heads.linear_ce.weighted_sum`
  with Keras's sample weights, mask and reduction folded into per-token weights, so the op's output is one scalar
  and the gradients are computed in the forward (three matmuls). ``reduction="none"`` takes the general per-token
  op instead (four matmuls).
- :class:`FusedTokenAccuracy`, owned by the head (``track_accuracy=True``), is updated by the loss from inside
  the fused pass (the argmax of each chunk's logits). Layer metrics are part of ``model.metrics``: Keras resets
  and reports it (``token_accuracy`` in the logs) and, on JAX, carries its state out of the traced step.
"""

import dataclasses

import keras
from keras import ops as kops
from keras.src.backend import get_keras_mask
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.backend.common.tensor_attributes import get_tensor_attr
from keras.src.backend.common.tensor_attributes import set_tensor_attr
from keras.src.losses.loss import apply_mask
from keras.src.losses.loss import reduce_weighted_values
from keras.src.losses.loss import scale_loss_for_distribution
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

from . import _backend
from . import _validation as check
from . import linear_ce
from ._export import export
from .losses import _StableLoss

__all__ = ["FusedSoftmaxHead", "FusedSparseSoftmaxCE", "FusedTokenAccuracy"]

_PAYLOAD = "_keras_stable_heads_fused"
_OUTPUTS = ("fused", "logits", "probabilities")


@dataclasses.dataclass(frozen=True)
class _Payload:
    """What a :class:`FusedSoftmaxHead` hands its loss in place of logits."""

    head: object
    hidden: object
    kernel: object
    bias: object
    mask: object


def _payload_of(y_pred):
    payload = get_tensor_attr(y_pred, _PAYLOAD) if y_pred is not None else None
    if payload is None:
        raise ValueError(
            "FusedSparseSoftmaxCE takes the training output of a FusedSoftmaxHead (the last layer of the model, "
            f"called without `output=`), got a prediction of shape {getattr(y_pred, 'shape', None)} that carries no "
            "hidden states. For logits use StableSparseSoftmaxCE; do not put layers after a FusedSoftmaxHead."
        )
    return payload


def _metrics_can_update(value):
    """Metric variables take ``value`` unless it is a JAX tracer outside a stateless scope (a custom jitted loop
    that does not map the model's metric variables): there an assignment would leak the tracer."""
    if _backend.BACKEND != "jax" or in_stateless_scope():
        return True
    import jax

    return not isinstance(value, jax.core.Tracer)


@export
class FusedTokenAccuracy(keras.metrics.Metric):
    """Token accuracy counted inside the fused pass: the share of kept tokens whose label has the largest logit.

    Equals ``keras.metrics.SparseCategoricalAccuracy`` on the materialised logits with ``sample_weight`` the
    tokens' weights (sample weights times mask), ignored tokens left out; ties go to the first class, as in
    ``argmax``. A :class:`FusedSoftmaxHead` owns one (``head.accuracy``) and :class:`FusedSparseSoftmaxCE`
    updates it; Keras reports it under its name (``"token_accuracy"``). It cannot be updated from predictions,
    so it does not go into ``compile(metrics=...)``.
    """

    def __init__(self, name="token_accuracy", dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.correct = self.add_variable((), initializer="zeros", name="correct", dtype="float32")
        self.count = self.add_variable((), initializer="zeros", name="count", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        raise TypeError(
            f"{type(self).__name__} is updated by FusedSparseSoftmaxCE inside the fused pass (the logits it needs "
            "exist only there): a FusedSoftmaxHead(track_accuracy=True) reports it by itself. Remove it from "
            "compile(metrics=...)."
        )

    def add_counts(self, correct, count):
        """Add weighted correct tokens and their total weight (what the fused pass counted)."""
        if not _metrics_can_update(correct):
            return
        self.correct.assign_add(kops.cast(correct, "float32"))
        self.count.assign_add(kops.cast(count, "float32"))

    def result(self):
        return kops.divide_no_nan(self.correct, self.count)

    def reset_state(self):
        self.correct.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@export
class FusedSparseSoftmaxCE(_StableLoss):
    """Sparse softmax cross-entropy of a :class:`FusedSoftmaxHead`, fused with its projection (no logits).

    ``y_true`` are integer class ids of the tokens' shape (or with a trailing axis of size 1); ``y_pred`` is the
    head's training output. Reduction, ``sample_weight`` and Keras masks mean what they mean for
    ``StableSparseSoftmaxCE`` on the logits (the value is equal, for the same weights); ``ignore_class`` entries
    are dropped from the average, and a batch with all of them dropped gives 0.

    Args:
        ignore_class, label_smoothing, z_loss, logit_softcap: as ``StableSparseSoftmaxCE``.
        chunk_size: tokens per chunk of logits; None picks one from the sizes (``linear_ce.CHUNK_BYTES``).
        implementation: None/``"auto"`` or ``"portable"``.
        reduction, name, dtype: as ``keras.losses.Loss``.

    Example:
        >>> import keras
        >>> from keras_stable_heads import FusedSoftmaxHead
        >>> head = FusedSoftmaxHead(32000)
        >>> model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(32000, 64), head])
        >>> model.compile(optimizer="adam", loss=head.loss(ignore_class=-1))
    """

    _options = ("ignore_class", "label_smoothing", "z_loss", "logit_softcap", "chunk_size", "implementation")

    def __init__(self, ignore_class=None, label_smoothing=0.0, z_loss=0.0, logit_softcap=None, chunk_size=None,
                 implementation=None, reduction="sum_over_batch_size", name="fused_sparse_softmax_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype, implementation=implementation)
        self.ignore_class = check.integer_or_none("ignore_class", ignore_class)
        self.label_smoothing = check.fraction("label_smoothing", label_smoothing)
        self.z_loss = check.non_negative("z_loss", z_loss)
        self.logit_softcap = check.positive_or_none("logit_softcap", logit_softcap)
        self.chunk_size = linear_ce.check_chunk_size(chunk_size)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if in_symbolic_scope() and get_tensor_attr(y_pred, _PAYLOAD) is None:
            # Keras builds a compiled loss once on symbolic outputs (shapes only, no head call): a scalar will do
            return kops.zeros((), self.dtype)
        payload = _payload_of(y_pred)
        with keras.name_scope(self.name):
            hidden = payload.hidden
            labels = kops.reshape(kops.cast(kops.convert_to_tensor(y_true), "int32"), kops.shape(hidden)[:-1])
            mask = payload.mask if payload.mask is not None else get_keras_mask(y_pred)
            keep = None if self.ignore_class is None else kops.not_equal(labels, self.ignore_class)
            if keep is not None:
                mask = keep if mask is None else kops.logical_and(keep, kops.cast(mask, "bool"))
            # a frozen head (trainable=False) gets no kernel gradient: the op skips that matmul
            options = dict(bias=payload.bias, kernel_grad=bool(payload.head.kernel.trainable), **self._op_options())
            if self.reduction in (None, "none"):
                loss = linear_ce.linear_softmax_cross_entropy_with_integer_labels(hidden, payload.kernel, labels,
                                                                                  **options)
                return reduce_weighted_values(loss, sample_weight=sample_weight, mask=mask, reduction="none",
                                              dtype=self.dtype)
            weights = self._token_weights(labels, sample_weight, mask)
            metric = payload.head.accuracy
            value, correct = linear_ce.weighted_sum(hidden, payload.kernel, labels, weights,
                                                    accuracy=metric is not None, **options)
            if metric is not None:
                kept = kops.logical_and(labels >= 0, labels < payload.head.num_classes)
                if keep is not None:
                    kept = kops.logical_and(kept, keep)
                metric.add_counts(correct, kops.sum(kops.where(kept, weights, kops.zeros_like(weights))))
            value = kops.cast(value, self.dtype)
            return scale_loss_for_distribution(value) if self.reduction != "sum" else value

    def _token_weights(self, labels, sample_weight, mask):
        """Per-token weights with Keras's reduction folded in: ``sum(weights * loss)`` is what
        ``keras.losses.Loss.__call__`` returns for the per-token ``loss`` (``losses.loss.reduce_weighted_values``)."""
        dtype = "float32"
        ones = kops.ones(kops.shape(labels), dtype)
        if mask is not None:
            mask = kops.cast(mask, dtype)
            if self.reduction in ("sum_over_batch_size", "mean"):
                # a tf.distribute replica averages over the global batch's kept tokens (see losses._mask_rows)
                scale = _backend.global_count_scale(kops.cast(mask, "bool"))
                if scale is not None:
                    ones = ones * kops.cast(scale, dtype)
        if sample_weight is not None:
            sample_weight = kops.convert_to_tensor(sample_weight, dtype)
        sample_weight = apply_mask(sample_weight, mask, dtype=dtype, reduction=self.reduction)
        if sample_weight is None:
            weights, divisor_weights = ones, None
        else:
            values, sample_weight = squeeze_or_expand_to_same_rank(ones, kops.cast(sample_weight, dtype))
            weights, divisor_weights = kops.reshape(values * sample_weight, kops.shape(labels)), sample_weight
        if self.reduction == "sum":
            return weights
        if self.reduction == "mean_with_sample_weight" and divisor_weights is not None:
            divisor = kops.sum(divisor_weights)
        else:
            divisor = kops.cast(kops.size(labels), dtype)
        return kops.divide_no_nan(weights, divisor)

    def call(self, y_true, y_pred):
        """The per-token loss (the general op), for callers of ``Loss.call``."""
        payload = _payload_of(y_pred)
        labels = kops.reshape(kops.cast(y_true, "int32"), kops.shape(payload.hidden)[:-1])
        return linear_ce.linear_softmax_cross_entropy_with_integer_labels(
            payload.hidden, payload.kernel, labels, bias=payload.bias, **self._op_options())


@export
class FusedSoftmaxHead(keras.layers.Layer):
    """A softmax over ``num_classes`` (a vocabulary) whose training loss never materialises the logits.

    Owns a ``(D, V)`` kernel (and a bias) like ``Dense(num_classes)``. Called as usual (``output=None``, the
    training model) it emits an empty ``(..., 0)`` float32 tensor carrying the hidden states for
    :class:`FusedSparseSoftmaxCE` (``head.loss(**options)``); ``output="logits"`` or ``"probabilities"`` emits
    those (``(..., V)``, float32). :func:`keras_stable_heads.inference_model` turns a training model into one
    that emits ``inference_output``, with the same weights. Under ``mixed_bfloat16``/``mixed_float16`` the kernel
    is a float32 variable and the matmuls take bfloat16/float16 operands (float32 accumulation where the
    backend has it); the loss and the logits are float32.

    Args:
        num_classes: V, the vocabulary size (>= 2).
        use_bias, kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: as for ``keras.layers.Dense``.
        inference_output: what the inference model emits: ``"logits"`` (default: what decoding samples from) or
            ``"probabilities"`` (the softmax link, as the other heads).
        track_accuracy: count token accuracy inside the fused pass (:class:`FusedTokenAccuracy`, reported as
            ``"token_accuracy"``).
        **kwargs: as ``keras.layers.Layer``.

    Example:
        >>> import keras, numpy as np
        >>> from keras_stable_heads import FusedSoftmaxHead, inference_model
        >>> head = FusedSoftmaxHead(50)
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), head])
        >>> model.compile(optimizer="adam", loss=head.loss())
        >>> logits = inference_model(model).predict(np.zeros((2, 8)), verbose=0)
        >>> logits.shape
        (2, 50)
    """

    link_name = "softmax"
    loss_classes = (FusedSparseSoftmaxCE,)

    def __init__(self, num_classes, use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 inference_output="logits", track_accuracy=True, **kwargs):
        # inputs are cast here, to the compute dtype; the kernel is read as float32 (autocast=False) and cast
        # inside the op, so that its gradient is accumulated in float32
        super().__init__(autocast=False, **kwargs)
        self.supports_masking = True
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"FusedSoftmaxHead needs an integer num_classes >= 2, got {num_classes!r}.")
        self.num_classes = num_classes
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.inference_output = check.choice("inference_output", inference_output, ("logits", "probabilities"))
        self.track_accuracy = bool(track_accuracy)
        self.accuracy = FusedTokenAccuracy() if self.track_accuracy else None
        self.kernel = None
        self.bias = None

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"FusedSoftmaxHead needs a static hidden size (last axis), got input shape {input_shape}.")
        self.kernel = self.add_weight(name="kernel", shape=(int(dim), self.num_classes),
                                      initializer=self.kernel_initializer, regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint, autocast=False)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer, constraint=self.bias_constraint,
                                        autocast=False)
        super().build(input_shape)

    def call(self, inputs, mask=None, output=None):
        output = "fused" if output is None else check.choice("output", output, _OUTPUTS)
        hidden = kops.cast(inputs, self.compute_dtype)
        kernel = kops.convert_to_tensor(self.kernel)
        bias = None if self.bias is None else kops.convert_to_tensor(self.bias)
        if output == "fused":
            self._check_compiled_loss()
            empty = kops.cast(hidden[..., :0], "float32")
            set_tensor_attr(empty, _PAYLOAD, _Payload(self, hidden, kernel, bias, mask))
            return empty
        logits = linear_ce.logits(hidden, kernel, bias=bias)
        return kops.softmax(logits, axis=-1) if output == "probabilities" else logits

    def _check_compiled_loss(self):
        """Raise when the model being called (``fit``/``evaluate``) was compiled with losses of which none is a
        :class:`FusedSparseSoftmaxCE`: a plain loss given the empty training output would compute nothing (on JAX,
        Keras's sparse cross-entropy of zero classes is a silent 0) or fail obscurely."""
        context = global_state.get_global_attribute("current_call_ctx")
        model = getattr(context, "entry_layer", None)
        compiled = getattr(model, "_compile_loss", None)
        losses = [loss for loss in keras.tree.flatten(getattr(compiled, "_user_loss", None)) if loss is not None]
        if losses and not any(isinstance(loss, FusedSparseSoftmaxCE) for loss in losses):
            names = ", ".join(loss if isinstance(loss, str) else type(loss).__name__ for loss in losses)
            raise ValueError(
                f"Model '{model.name}' is compiled with loss {names}, but FusedSoftmaxHead '{self.name}' emits no "
                "logits in training (its output only carries the hidden states to FusedSparseSoftmaxCE). Compile "
                "with loss=head.loss(...), or use SoftmaxHead/Dense for a loss that needs the logits."
            )

    def compute_output_spec(self, inputs, mask=None, output=None):
        width = 0 if output in (None, "fused") else self.num_classes
        return keras.KerasTensor(tuple(inputs.shape[:-1]) + (width,), dtype="float32")

    def logits(self, hidden):
        """``hidden @ kernel + bias`` as float32 (materialised)."""
        return self(hidden, output="logits")

    def link(self, outputs):
        """Logits -> probabilities (the softmax link)."""
        return kops.softmax(kops.cast(outputs, "float32"), axis=-1)

    def loss(self, **options):
        """The matching loss, :class:`FusedSparseSoftmaxCE` built with ``options``."""
        return FusedSparseSoftmaxCE(**options)

    def inference_tensor(self, tensor):
        """The inference output for this head's training output ``tensor`` in a functional graph: the head
        called again on the same hidden states with ``output=inference_output`` (a new node, the same weights)."""
        operation, node_index, _ = tensor._keras_history
        if operation is not self:
            raise ValueError(f"A layer ({operation.name}) follows FusedSoftmaxHead '{self.name}': its training output "
                             "holds no values. Make the head the model's last layer.")
        hidden = self._inbound_nodes[node_index].input_tensors[0]
        return self(hidden, output=self.inference_output)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "inference_output": self.inference_output,
            "track_accuracy": self.track_accuracy,
        }

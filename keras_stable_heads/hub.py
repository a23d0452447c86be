"""keras-hub causal language models trained through the fused linear cross-entropy: one call, then ``fit``.

::

    causal_lm = keras_hub.models.GemmaCausalLM(backbone)          # or .from_preset(...)
    keras_stable_heads.hub.fuse_lm_head(causal_lm, label_smoothing=0.1)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-4))      # loss and weighted accuracy: keras-hub's defaults
    causal_lm.fit(x, y, sample_weight=padding_mask)               # never holds the (tokens x vocabulary) logits

A keras-hub ``CausalLM`` is a Functional model ``inputs -> backbone -> token_embedding(hidden, reverse=True)``: its
output is the logits of a ``keras.layers.ReversibleEmbedding`` called in reverse (``hidden @ E^T`` with the tied
``(V, D)`` embedding ``E``, or ``hidden @ R`` with an untied ``(D, V)`` reverse kernel), soft-capped by
``logit_soft_cap`` (Gemma 2's final logit soft-cap), in ``reverse_dtype`` when set. :func:`fuse_lm_head` patches the
instance (instance attributes only, undone by :func:`unfuse_lm_head`) so that **inside the train and test steps**:

- ``call`` returns the hidden states that feed the reverse embedding, not the logits;
- ``compute_loss`` computes the compiled loss from them with
  :func:`keras_stable_heads.linear_ce.weighted_sum`: the embedding matrix (or reverse kernel) read from the layer
  (inside JAX's stateless scope, its traced value), ``transpose_kernel`` for the tied case,
  ``logit_softcap=logit_soft_cap``, the operands in the dtypes of the layer's own matmul (:meth:`LMHead.operands`:
  ``reverse_dtype``, or the promotion of bfloat16 hidden states to a float32 kernel under ``mixed_bfloat16``),
  ``sample_weight`` (keras-hub's padding mask) as the per-token weights, and Keras's reduction divisor; under a
  JAX ``keras.distribution``, each device on its own batch shard (:func:`_per_batch_shard`);
- the compiled weighted ``SparseCategoricalAccuracy`` is updated from the same fused pass (the op counts
  ``argmax == label`` per chunk, weighted), with exactly Keras's bookkeeping; ``compute_metrics`` then only reads
  the results, so no metric ever receives hidden states as if they were logits.

Everywhere else (``predict``, ``generate``, ``call_with_cache``, ``score``, a plain ``causal_lm(x)``, Keras's symbolic
build) the model computes its logits as before. ``compile`` is patched to translate the loss and metrics
(:func:`fuse_lm_head`'s docstring says which are accepted) and to refuse the ones that would need the logits.
"""

import contextlib
import dataclasses
import functools
import math
import numbers

import keras
from keras import ops

from . import _backend
from . import _validation as check
from . import dispatch
from . import linear_ce
from .losses import StableSparseSoftmaxCE

__all__ = ["fuse_lm_head", "unfuse_lm_head", "is_fused"]

_STATE = "_keras_stable_heads_fused_head"  # the instance attribute that holds a fused model's _FusedHead
_PATCHED = ("call", "compile", "compute_loss", "compute_metrics", "train_step", "test_step")
_ACCURACY_NAMES = ("accuracy", "acc", "sparse_categorical_accuracy")
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
_INSTALL = "pip install keras-stable-heads[hub]"


# ----------------------------------------------------------------------------------------------------------------
# The head of a causal LM: where its logits come from
# ----------------------------------------------------------------------------------------------------------------


def _reversible_embedding_classes():
    """keras core's ``ReversibleEmbedding`` and, where it is a separate class, keras-hub's; keras-hub is imported
    here, lazily, and needed only where Keras has no ReversibleEmbedding of its own (older Keras 3 releases)."""
    classes = [keras.layers.ReversibleEmbedding] if hasattr(keras.layers, "ReversibleEmbedding") else []
    try:
        import keras_hub
    except ImportError as error:
        if classes:
            return tuple(classes)
        raise ImportError(f"keras_stable_heads.hub needs keras-hub (this Keras has no ReversibleEmbedding): "
                          f"{_INSTALL}") from error
    hub_class = getattr(keras_hub.layers, "ReversibleEmbedding", None)
    if hub_class is not None and hub_class not in classes:
        classes.append(hub_class)
    return tuple(classes)


@dataclasses.dataclass(frozen=True)
class LMHead:
    """The logits of a causal LM, as the fused op sees them: ``cap * tanh((hidden @ kernel) / cap)``.

    ``embedding`` is the ``ReversibleEmbedding`` called in reverse; ``tied`` says the kernel is its ``(V, D)``
    ``embeddings`` (else its ``(D, V)`` ``reverse_embeddings``); ``kernel_autocast`` the dtype its variables read as
    inside the model (:func:`autocast_dtype`); ``hidden_tensor`` the symbolic hidden states it is called on. The
    soft-cap and ``reverse_dtype`` are read from the layer at each step, so they follow later changes to it.
    """

    embedding: object
    tied: bool
    kernel_autocast: object = None
    hidden_tensor: object = None

    @property
    def softcap(self):
        return check.positive_or_none("logit_soft_cap", getattr(self.embedding, "logit_soft_cap", None))

    @property
    def reverse_dtype(self):
        return getattr(self.embedding, "reverse_dtype", None)

    @property
    def kernel_trainable(self):
        """Whether the kernel gets a gradient: not when the layer is frozen (keras-hub's ``enable_lora`` freezes the
        embeddings), and then the fused op skips it. A tied kernel with LoRA on the embedding itself does (its
        gradient flows into the low-rank factors)."""
        if self.tied:
            return bool(self.embedding.trainable_weights)
        return bool(getattr(self.embedding.reverse_embeddings, "trainable", True))

    def operands(self, hidden):
        """``(hidden, kernel)`` in the dtypes the layer's reverse matmul multiplies them in, so the fused loss is
        the compiled loss of the model's own logits.

        The kernel is the variable's current value (inside a JAX stateless scope, the traced one; with LoRA on the
        embedding, ``embeddings`` includes the low-rank update), read as the layer reads it inside the model:
        autocast to ``kernel_autocast`` when Keras's rules autocast it there (:func:`autocast_dtype`). The layer
        multiplies the hidden states as they come by that kernel, promoted to a common dtype (float32 for bfloat16
        hidden states and a float32 kernel: keras-hub's models under ``mixed_bfloat16``), or both cast to
        ``reverse_dtype`` when set. A kernel wider than the operands is not cast down here: the op does it, and
        returns its gradient in the kernel's dtype.
        """
        kernel = self.embedding.embeddings if self.tied else self.embedding.reverse_embeddings
        if self.kernel_autocast is not None:
            kernel = ops.cast(kernel, self.kernel_autocast)
        kernel_dtype = keras.backend.standardize_dtype(kernel.dtype)
        hidden_dtype = keras.backend.standardize_dtype(hidden.dtype)
        if self.reverse_dtype is not None:
            operand = keras.backend.standardize_dtype(self.reverse_dtype)
        else:
            operand = keras.backend.result_type(hidden_dtype, kernel_dtype)
        if hidden_dtype != operand:
            hidden = ops.cast(hidden, operand)
        if kernel_dtype != operand and not _itemsize(kernel_dtype) > _itemsize(operand):
            kernel = ops.cast(kernel, operand)
        return hidden, kernel


def autocast_dtype(parent, layer):
    """The dtype ``layer``'s float variables read as when ``parent`` (a top-level model; None: ``layer`` itself
    is called at top level) calls it, by Keras's ``Layer.__call__`` rules, or None when they are not cast.

    A top-level call autocasts when the caller's policy is mixed (compute dtype != variable dtype); inside that
    scope a layer with ``autocast=False`` (``Embedding``, hence ``ReversibleEmbedding``) reads its variables
    as they are, one with ``autocast=True`` in its own compute dtype.
    """
    def mixed(obj):
        return obj.compute_dtype != obj.variable_dtype

    if parent is None or parent is layer or not mixed(parent):
        return layer.compute_dtype if mixed(layer) else None
    if not layer.autocast or not keras.backend.is_float_dtype(layer.compute_dtype):
        return None
    return layer.compute_dtype


def lm_head(causal_lm):
    """The :class:`LMHead` of a keras-hub ``CausalLM`` (or any Functional model whose single output is a
    ``ReversibleEmbedding`` called with ``reverse=True``); ``ValueError`` saying why when there is none."""
    classes = _reversible_embedding_classes()
    if not isinstance(causal_lm, keras.Model):
        raise TypeError(f"fuse_lm_head takes a keras-hub CausalLM (a keras.Model), got {type(causal_lm).__name__}.")
    outputs = getattr(causal_lm, "outputs", None)
    if not outputs or len(outputs) != 1 or getattr(outputs[0], "_keras_history", None) is None:
        raise ValueError(f"fuse_lm_head needs a Functional CausalLM with one output (the logits); "
                         f"{type(causal_lm).__name__} has outputs {outputs!r}.")
    operation, node_index, _ = outputs[0]._keras_history
    if not isinstance(operation, classes):
        raise ValueError(
            f"fuse_lm_head: the output of {type(causal_lm).__name__} is computed by {type(operation).__name__} "
            f"{operation.name!r}, not by a ReversibleEmbedding called with reverse=True; the fused loss needs the "
            f"logits to be exactly the reverse embedding's output (models that slice or cap the logits after it, "
            f"such as PaliGemma or Gemma 4 with final_logit_cap, are not supported).")
    node = operation._inbound_nodes[node_index]
    args, kwargs = node.arguments.args, node.arguments.kwargs
    reverse = kwargs.get("reverse", args[1] if len(args) > 1 else False)
    if reverse is not True:
        raise ValueError(f"fuse_lm_head: the output of {type(causal_lm).__name__} is {operation.name!r} called "
                         f"forward (an embedding lookup), not with reverse=True.")
    if operation.quantization_mode is not None:
        raise ValueError(f"fuse_lm_head: {operation.name!r} is quantized ({operation.quantization_mode}); the fused "
                         f"loss needs a float kernel. Fuse before quantizing, or train without fuse_lm_head.")
    tied = bool(operation.tie_weights)
    if not tied and getattr(operation, "reverse_embeddings", None) is None:
        raise ValueError(f"fuse_lm_head: {operation.name!r} has tie_weights=False but no reverse_embeddings: build "
                         f"the model first.")
    head = LMHead(embedding=operation, tied=tied, kernel_autocast=autocast_dtype(causal_lm, operation),
                  hidden_tensor=args[0])
    head.softcap  # a bad logit_soft_cap raises here, not in the first step
    return head


# ----------------------------------------------------------------------------------------------------------------
# Loss and metrics: what compile() accepts and what the fused step computes from it
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LossConfig:
    ignore_class: object
    label_smoothing: float
    z_loss: float
    reduction: str
    loss_weight: float


def _loss_options(ignore_class, label_smoothing, z_loss, chunk_size, implementation):
    """fuse_lm_head's options, validated (ValueError/TypeError naming the argument)."""
    linear_ce.check_chunk_size(chunk_size)
    if implementation is not None:
        dispatch.requested(implementation)
    return dict(ignore_class=check.integer_or_none("ignore_class", ignore_class),
                label_smoothing=check.fraction("label_smoothing", label_smoothing),
                z_loss=check.non_negative("z_loss", z_loss))


def _translate_loss(loss, defaults, head):
    """``(loss for Keras's compile, its options for the fused op, its reduction)`` from compile's ``loss``.

    "auto" is :class:`StableSparseSoftmaxCE` with fuse_lm_head's options. A ``StableSparseSoftmaxCE`` or a
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` is taken with its own options. Compiled, the
    loss is the ordinary (unfused) one: correct on logits wherever Keras calls it outside the fused steps.
    """
    if isinstance(loss, str) and loss == "auto":
        loss = StableSparseSoftmaxCE(**defaults)
    if isinstance(loss, StableSparseSoftmaxCE):
        if loss.class_weight is not None:
            raise ValueError("fuse_lm_head: the fused loss has no `class_weight`; compile without it.")
        if loss.axis not in (-1, None):
            raise ValueError(f"fuse_lm_head: the vocabulary is the last axis; the loss has axis={loss.axis}.")
        if loss.logit_softcap is not None:
            raise ValueError(f"fuse_lm_head: the loss has logit_softcap={loss.logit_softcap}, applied on top of the "
                             f"model's logits; the fused loss applies only the model's own cap "
                             f"(logit_soft_cap={head.softcap}). Compile without logit_softcap.")
        options = dict(ignore_class=loss.ignore_class, label_smoothing=loss.label_smoothing, z_loss=loss.z_loss)
    elif isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        config = loss.get_config()
        if not config.get("from_logits", False):
            raise ValueError("fuse_lm_head: SparseCategoricalCrossentropy(from_logits=False) takes probabilities, "
                             "but a CausalLM outputs logits: pass from_logits=True, or loss='auto'.")
        if config.get("axis", -1) != -1:
            raise ValueError(f"fuse_lm_head: the vocabulary is the last axis; the loss has axis={config['axis']}.")
        options = dict(ignore_class=config.get("ignore_class"), label_smoothing=0.0, z_loss=0.0)
    else:
        raise ValueError(f"fuse_lm_head: compile(loss=...) must be 'auto', a StableSparseSoftmaxCE or "
                         f"keras.losses.SparseCategoricalCrossentropy(from_logits=True); got {loss!r}. Other losses "
                         f"need the logits: call keras_stable_heads.hub.unfuse_lm_head(model) to use them.")
    if loss.reduction not in _REDUCTIONS:
        raise ValueError(f"fuse_lm_head: the fused loss reduces to one value per batch; reduction must be one of "
                         f"{_REDUCTIONS}, got {loss.reduction!r}.")
    return loss, options, loss.reduction


def _loss_weight(loss_weights):
    if loss_weights is None:
        return 1.0
    if isinstance(loss_weights, (list, tuple)) and len(loss_weights) == 1:
        loss_weights = loss_weights[0]
    if isinstance(loss_weights, bool) or not isinstance(loss_weights, numbers.Real):
        raise ValueError(f"fuse_lm_head: `loss_weights` must be a number (the model has one output), got "
                         f"{loss_weights!r}.")
    return float(loss_weights)


def _translate_metrics(metrics, weighted_metrics):
    """The weighted accuracies to compile: keras-hub's default, ``SparseCategoricalAccuracy`` instances, or the
    names "accuracy"/"acc"/"sparse_categorical_accuracy". Anything else would need the logits."""
    if metrics:
        raise ValueError(f"fuse_lm_head: compile(metrics=...) gets no padding mask; the fused step computes its "
                         f"accuracy weighted by sample_weight: pass it in weighted_metrics (keras-hub's default) "
                         f"instead, got metrics={metrics!r}.")
    if isinstance(weighted_metrics, str) and weighted_metrics == "auto":
        return [keras.metrics.SparseCategoricalAccuracy()]
    if weighted_metrics is None:
        return []
    if not isinstance(weighted_metrics, (list, tuple)):
        raise ValueError(f"fuse_lm_head: weighted_metrics must be 'auto', None or a list, got {weighted_metrics!r}.")
    accuracies = []
    for metric in weighted_metrics:
        if isinstance(metric, str) and metric.lower() in _ACCURACY_NAMES:
            accuracies.append(keras.metrics.SparseCategoricalAccuracy(name=metric))
        elif type(metric) is keras.metrics.SparseCategoricalAccuracy:
            accuracies.append(metric)
        else:
            raise ValueError(f"fuse_lm_head: the fused step computes no logits, so it can only compute the weighted "
                             f"SparseCategoricalAccuracy (from the same pass); {metric!r} would need the logits. "
                             f"Call keras_stable_heads.hub.unfuse_lm_head(model) to use other metrics.")
    return accuracies


# ----------------------------------------------------------------------------------------------------------------
# The fused step
# ----------------------------------------------------------------------------------------------------------------


class _FusedHead:
    """A fused model's state (a plain object, so Keras and torch do not track the helper model it holds)."""

    def __init__(self, model, head, options, chunk_size, implementation):
        self.head = head
        self.defaults = options
        self.chunk_size = chunk_size
        self.implementation = implementation
        # the same layers, up to the reverse embedding's input: the hidden states, in the model's own graph
        self.hidden_model = keras.Model(model.input, head.hidden_tensor, name=f"{model.name}_hidden_states")
        self.originals = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
        self.compiled = None  # (_LossConfig, accuracies) once compile() ran through the patch
        self.depth = 0  # > 0 while a train/test step runs (or is traced)

    @contextlib.contextmanager
    def fused_step(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    @property
    def active(self):
        return self.depth > 0


def _token_weights(sample_weight, token_shape):
    """``sample_weight`` as float32 per-token weights of ``token_shape`` (the hidden states' leading shape): one
    weight per token, with or without a trailing 1 (keras-hub's padding mask), or one per sequence (``(B,)``,
    broadcast over its tokens). Written without the weights' rank, which TensorFlow's relaxed retracing can lose."""
    if sample_weight is None:
        return ops.ones(token_shape, "float32")
    weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    static = _static_shape(weights)
    tokens = [_static(d) for d in token_shape]
    if static and None not in static + tokens:
        size, batch = math.prod(static), tokens[0]
        if size not in (math.prod(tokens), batch) or static[0] != batch:
            raise ValueError(f"fuse_lm_head: sample_weight of shape {tuple(static)} does not fit the tokens' shape "
                             f"{tuple(tokens)}: give one weight per token (keras-hub's padding mask) or one per "
                             f"sequence.")
    if len(token_shape) == 1:
        return ops.reshape(weights, token_shape)
    batch = token_shape[0]
    rest = math.prod(token_shape[1:])
    # (B,) -> (B, 1) broadcast over each sequence's tokens; (B, S) or (B, S, 1) -> (B, S)
    per_row = ops.broadcast_to(ops.reshape(weights, (batch, -1)), (batch, rest))
    return ops.reshape(per_row, token_shape)


def _static_shape(x):
    """The static shape as a list (None for unknown dimensions), or None when even the rank is unknown."""
    try:
        return [_static(d) for d in x.shape]
    except (TypeError, ValueError):
        return None


def _static(dim):
    try:
        return None if dim is None else int(dim)
    except TypeError:  # a symbolic dimension
        return None


def _fused_loss(model, state, y, hidden, sample_weight):
    """The compiled loss of ``y`` against the model's logits, from the hidden states; updates the accuracies."""
    config, accuracies = state.compiled
    head = state.head
    token_shape = tuple(ops.shape(hidden)[:-1])
    # one label per token: (B, S) or (B, S, 1), whatever rank TensorFlow's relaxed retracing left them
    labels = ops.reshape(ops.cast(ops.convert_to_tensor(y), "int32"), token_shape)
    weights = _token_weights(sample_weight, token_shape)
    hidden, kernel = head.operands(hidden)
    op = functools.partial(
        linear_ce.weighted_sum, transpose_kernel=head.tied, ignore_class=config.ignore_class,
        label_smoothing=config.label_smoothing, z_loss=config.z_loss, logit_softcap=head.softcap,
        chunk_size=state.chunk_size, implementation=state.implementation, accuracy=bool(accuracies),
        kernel_grad=head.kernel_trainable)
    total, correct = _per_batch_shard(op, hidden, kernel, labels, weights)  # ReversibleEmbedding has no bias
    loss = total / _divisor(config, labels, weights, total.dtype) * config.loss_weight
    for metric in accuracies:
        _update_accuracy(metric, correct, weights, labels)
    return loss


def _per_batch_shard(op, hidden, kernel, labels, weights):
    """``op(hidden, kernel, labels, weights)``; under a JAX ``keras.distribution`` whose batch axis spans
    several devices, on each device's own batch shard, the sums added over the batch axis.

    The op loops over chunks of *all* its tokens, so given the global batch XLA would gather the hidden states onto
    every device and each would compute the whole batch's loss. ``shard_map`` over the batch axis alone keeps each
    device on its tokens; the other mesh axes stay automatic, so a kernel sharded over the vocabulary
    (``ModelParallel``) stays sharded inside: each device multiplies its tokens by its vocabulary shard, and XLA
    combines the shards' log-sum-exps with all-reduces of per-token values (``tests/test_hub.py`` checks the
    compiled program on 4 simulated devices). ``shard_map``'s transpose sums the kernel's gradient over the batch
    axis (the tests compare trained weights with one device's).
    """
    mesh_axis = _jax_batch_axis()
    if mesh_axis is None:
        return op(hidden, kernel, labels, weights)
    import jax
    from jax.sharding import PartitionSpec

    mesh, axis = mesh_axis

    def local(hidden, kernel, labels, weights):
        total, correct = op(hidden, kernel, labels, weights)
        return ops.reshape(total, (1,)), ops.reshape(correct, (1,))

    shard, whole = PartitionSpec(axis), PartitionSpec()
    args = tuple(ops.convert_to_tensor(a) for a in (hidden, kernel, labels, weights))
    specs = (shard, whole, shard, shard)
    # check_vma=False: linear_ce's loop starts its carries as (invariant) zeros, which the check refuses
    totals, corrects = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(shard, shard), axis_names={axis},
                                     check_vma=False)(*args)
    return ops.sum(totals), ops.sum(corrects)


def _jax_batch_axis():
    """``(jax Mesh, batch axis name)`` of the current JAX ``keras.distribution`` when its batch axis has more than
    one device, else None."""
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    axis = getattr(distribution, "batch_dim_name", None)
    if distribution is None or axis is None:
        return None
    mesh = distribution.device_mesh
    if axis not in mesh.axis_names or mesh.shape[mesh.axis_names.index(axis)] < 2:
        return None
    return mesh.backend_mesh, axis


def _divisor(config, labels, weights, dtype):
    """Keras's reduction divisor (``keras.losses.Loss``, with the ignored tokens as its mask)."""
    if config.reduction == "sum":
        return ops.ones((), dtype)
    if config.reduction == "mean_with_sample_weight":
        if config.ignore_class is not None:
            weights = weights * ops.cast(ops.not_equal(labels, config.ignore_class), weights.dtype)
        divisor = ops.sum(ops.cast(weights, dtype))
    elif config.ignore_class is None:
        divisor = ops.cast(ops.size(labels), dtype)
    else:
        # Keras's masked mean: the kept tokens' count, whatever their weights; over the global batch under
        # tf.distribute (each replica's count scaled as StableSparseSoftmaxCE does)
        kept = ops.not_equal(labels, config.ignore_class)
        divisor = ops.sum(ops.cast(kept, dtype))
        scale = _backend.global_count_scale(kept)
        if scale is not None:
            divisor = divisor / ops.cast(scale, dtype)
    divisor = _scaled_for_replicas(divisor)
    # an empty (all-ignored) batch has loss 0, as Keras's divide_no_nan gives
    return ops.where(divisor > 0, divisor, ops.ones_like(divisor))


def _scaled_for_replicas(divisor):
    """Keras divides a mean loss by the number of tf.distribute replicas (``scale_loss_for_distribution``)."""
    if keras.backend.backend() != "tensorflow":
        return divisor
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return divisor * replicas if replicas > 1 else divisor


def _update_accuracy(metric, correct, weights, labels):
    """Keras's weighted ``SparseCategoricalAccuracy.update_state`` from the fused pass's weighted count: ``Mean``
    averages each sequence's weighted hits over its tokens and the weights likewise, so it adds
    ``correct / tokens_per_sequence`` to ``total`` and ``sum(weights) / tokens_per_sequence`` to ``count``."""
    per_sequence = math.prod(tuple(ops.shape(labels))[1:])  # 1 for (N,) tokens
    per_sequence = ops.cast(per_sequence, metric.dtype)
    metric.total.assign_add(ops.cast(correct, metric.dtype) / per_sequence)
    metric.count.assign_add(ops.cast(ops.sum(weights), metric.dtype) / per_sequence)


def _build_compiled_metrics(model, y, hidden, head):
    """Keras builds its compiled metrics on their first update (TensorFlow, torch) or symbolically before the first
    step (JAX); the fused step never updates them through Keras, so it builds them from the logits' shape."""
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is not None and not compiled.built:
        logits = keras.KerasTensor(tuple(hidden.shape[:-1]) + (head.embedding.input_dim,), dtype="float32")
        compiled.build(y, logits)


def _itemsize(dtype):
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(dtype, 4)


# ----------------------------------------------------------------------------------------------------------------
# The patch
# ----------------------------------------------------------------------------------------------------------------


def fuse_lm_head(causal_lm, *, ignore_class=None, label_smoothing=0.0, z_loss=0.0, chunk_size=None,
                 implementation=None):
    """Make a keras-hub ``CausalLM`` train and evaluate through the fused linear cross-entropy; returns it.

    After this call, ``causal_lm.compile(optimizer=...)`` (keras-hub compiles tasks when they are built, so compile
    again after fusing) and ``fit``/``evaluate`` as usual: the loss is the one the model compiled by default computes
    (``SparseCategoricalCrossentropy(from_logits=True)``, the padding mask as ``sample_weight``, the mean over all
    tokens), from the hidden states, ``chunk_size`` tokens at a time, never holding the ``(tokens, vocabulary)``
    logits; the weighted ``SparseCategoricalAccuracy`` comes from the same pass. ``predict``, ``generate``,
    ``score`` and ``causal_lm(x)`` return what they did. Undo with :func:`unfuse_lm_head`.

    ``compile`` accepts ``loss="auto"`` (:class:`~keras_stable_heads.StableSparseSoftmaxCE` with the options
    below), a ``StableSparseSoftmaxCE`` (no ``class_weight`` or ``logit_softcap``), or
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``, with reduction ``"sum_over_batch_size"``,
    ``"sum"`` or ``"mean_with_sample_weight"``, and a number as ``loss_weights``; ``weighted_metrics="auto"``, None,
    or a list of ``SparseCategoricalAccuracy`` (or "accuracy"); no unweighted ``metrics``. Anything else raises
    ``ValueError`` in ``compile``, as it would need the logits. The compiled loss object is the ordinary one, so
    ``model.loss(y, model.predict(x))`` gives the same number.

    Args:
        causal_lm: a keras-hub ``CausalLM`` whose output is ``token_embedding(hidden, reverse=True)`` (Gemma, Gemma 2
            and 3 text, GPT-2, Llama, Llama 3, Mistral, Mixtral, Qwen, Phi-3, OPT, Bloom, Falcon, GPT-NeoX, ...):
            a tied or untied ``keras.layers.ReversibleEmbedding``, with its ``logit_soft_cap`` and
            ``reverse_dtype``.
        ignore_class, label_smoothing, z_loss: the options of ``loss="auto"``, as in
            :class:`~keras_stable_heads.StableSparseSoftmaxCE`.
        chunk_size: tokens per chunk of logits (None: ``linear_ce.CHUNK_BYTES`` of float32 logits per chunk).
        implementation: as :func:`keras_stable_heads.linear_ce.linear_softmax_cross_entropy_with_integer_labels`.

    Example:
        >>> import keras, keras_hub, numpy as np
        >>> from keras_stable_heads.hub import fuse_lm_head
        >>> backbone = keras_hub.models.GPT2Backbone(vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        ...                                          intermediate_dim=32, max_sequence_length=8, dropout=0.0)
        >>> lm = fuse_lm_head(keras_hub.models.GPT2CausalLM(backbone, preprocessor=None))
        >>> lm.compile(optimizer=keras.optimizers.Adam(1e-3))
        >>> x = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), "int32")}
        >>> history = lm.fit(x, np.ones((2, 8), "int32"), sample_weight=np.ones((2, 8)), verbose=0)
        >>> bool(history.history["loss"][0] > 0)
        True
    """
    options = _loss_options(ignore_class, label_smoothing, z_loss, chunk_size, implementation)
    if is_fused(causal_lm):
        raise ValueError(f"fuse_lm_head: {causal_lm.name!r} is fused already (unfuse_lm_head undoes it).")
    head = lm_head(causal_lm)
    state = _FusedHead(causal_lm, head, options, chunk_size, implementation)
    model = causal_lm
    originals = {name: getattr(model, name) for name in _PATCHED}

    def call(*args, **kwargs):
        if state.active:
            return state.hidden_model.call(*args, **kwargs)
        return originals["call"](*args, **kwargs)

    def compile(optimizer="auto", loss="auto", *, metrics=None, weighted_metrics="auto", loss_weights=None,
                **kwargs):
        keras_loss, loss_options, reduction = _translate_loss(loss, state.defaults, head)
        accuracies = _translate_metrics(metrics, weighted_metrics)
        config = _LossConfig(reduction=reduction, loss_weight=_loss_weight(loss_weights), **loss_options)
        originals["compile"](optimizer=optimizer, loss=keras_loss, weighted_metrics=accuracies,
                             loss_weights=loss_weights, **kwargs)
        state.compiled = (config, tuple(accuracies))

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not state.active:
            return originals["compute_loss"](x, y, y_pred, sample_weight, training=training)
        _build_compiled_metrics(model, y, y_pred, head)
        losses = [_fused_loss(model, state, y, y_pred, sample_weight)]
        losses += [model._aggregate_additional_loss(extra) for extra in model.losses]
        return losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))

    def compute_metrics(x, y, y_pred, sample_weight=None):
        if not state.active:
            return originals["compute_metrics"](x, y, y_pred, sample_weight=sample_weight)
        return model.get_metrics_result()  # the accuracies were updated by the fused pass in compute_loss

    def stepper(name):
        def step(*args, **kwargs):
            if state.compiled is None:
                raise RuntimeError(f"fuse_lm_head: compile {model.name!r} after fusing its head (keras-hub compiles "
                                   f"a task when it is built, with the unfused loss): model.compile(optimizer=...).")
            with state.fused_step():
                return originals[name](*args, **kwargs)

        return step

    patches = dict(call=call, compile=compile, compute_loss=compute_loss, compute_metrics=compute_metrics,
                   train_step=stepper("train_step"), test_step=stepper("test_step"))
    for name, function in patches.items():
        setattr(model, name, function)
    object.__setattr__(model, _STATE, state)
    _reset_step_functions(model)
    return model


def unfuse_lm_head(causal_lm):
    """Undo :func:`fuse_lm_head`: the model's own ``call``, ``compile``, loss and metric methods again; returns it.
    The compiled loss and accuracies stay (they are the ordinary ones, computed from logits from now on)."""
    state = getattr(causal_lm, _STATE, None)
    if state is None:
        raise ValueError(f"unfuse_lm_head: {getattr(causal_lm, 'name', causal_lm)!r} is not fused.")
    for name in _PATCHED:
        if name in state.originals:
            setattr(causal_lm, name, state.originals[name])
        else:
            object.__delattr__(causal_lm, name)
    object.__delattr__(causal_lm, _STATE)
    _reset_step_functions(causal_lm)
    return causal_lm


def is_fused(causal_lm):
    """Whether :func:`fuse_lm_head` patched this model."""
    return getattr(causal_lm, _STATE, None) is not None


def _reset_step_functions(model):
    """Drop Keras's cached step functions: the next fit/evaluate traces the (un)patched steps."""
    for name in ("train_function", "test_function"):
        if hasattr(model, name):
            setattr(model, name, None)

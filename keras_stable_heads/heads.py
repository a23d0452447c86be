"""Output heads: the last layer of a model, emitting exactly what the matching stable loss takes.

A head is a thin layer: a ``Dense`` projection (or, with ``use_projection=False``, the incoming values as they
are), cast to float32, plus the head's knowledge of its **link** — the function that turns what it emits into
probabilities (or a mean and a spread) at inference::

    head                        emits (training)          matching loss                            link (inference)
    BinaryHead()                1 logit                   StableBinaryCE                           sigmoid -> P(y=1)
    SoftmaxHead(num_classes)    K logits                  StableSoftmaxCE / StableSparseSoftmaxCE  softmax
    MultilabelHead(num_labels)  L logits                  StableMultilabelCE                       sigmoid per label
    GaussianHead(units)         [mean, log_scale]         GaussianNLL                              [mean, std]
    LaplaceHead(units)          [location, log_scale]     LaplaceNLL                               [median, scale]

``head.loss(**options)`` builds the matching loss and :func:`inference_model` turns a model whose outputs are
heads into one that outputs the linked values, with the same weights. Every head's output is float32, also under
a ``mixed_float16``/``mixed_bfloat16`` policy (the projection itself runs in the policy's compute dtype).
"""

import keras

from . import _head_core as core
from . import losses
from ._export import export
from ._head_core import apply_link  # noqa: F401  (importable from here, as before the tf_keras heads)

__all__ = ["BinaryHead", "SoftmaxHead", "MultilabelHead", "GaussianHead", "LaplaceHead", "Link", "inference_model"]


@export
class Link(core.LinkLogic, keras.layers.Layer):
    """Applies a head's link: the layer :func:`inference_model` puts after each head.

    Computes in float32. ``"gaussian"``/``"laplace"`` turn ``[location, log_scale]`` into ``[location, scale]``.

    Args:
        link: ``"sigmoid"``, ``"softmax"`` (over the last axis), ``"gaussian"`` or ``"laplace"``.
        **kwargs: as ``keras.layers.Layer`` (``name``, ``dtype``; the dtype defaults to float32).
    """


# ----------------------------------------------------------------------------------------------------------------
# Heads: the logic of each is in keras_stable_heads._head_core (shared with the tf_keras heads); here, the
# Keras 3 layer base and the public classes with their documentation.
# ----------------------------------------------------------------------------------------------------------------


class _Head(core.HeadLogic, keras.layers.Layer):
    """The Keras 3 base of every head: a ``keras.layers.Dense`` projection, the losses of
    :mod:`keras_stable_heads.losses`, and the symbolic output spec (float32)."""

    _dense_class = keras.layers.Dense
    _loss_module = losses

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")


@export
class BinaryHead(core.BinaryLogic, _Head):
    """One logit for a yes/no target; link sigmoid -> ``P(y=1)``; loss :class:`~keras_stable_heads.StableBinaryCE`.

    Args:
        use_projection: project the inputs with a ``Dense(1)`` (default); ``False`` takes an input that already
            holds the logit (last axis of size 1) and only casts it to float32.
        use_bias, kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: the projection's options, as for ``keras.layers.Dense``.
        **kwargs: as ``keras.layers.Layer``.

    Example:
        >>> import keras
        >>> from keras_stable_heads.heads import BinaryHead
        >>> head = BinaryHead()
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), head])
        >>> model.compile(optimizer="adam", loss=head.loss(label_smoothing=0.05))
    """


@export
class SoftmaxHead(core.SoftmaxLogic, _Head):
    """``num_classes`` logits for one class in K; link softmax; loss ``StableSoftmaxCE`` (``StableSparseSoftmaxCE``).

    Args:
        num_classes: K, the number of classes (>= 2; one yes/no target is a ``BinaryHead``).
        use_projection, use_bias, kernel_initializer, ...: as :class:`BinaryHead`.
    """


@export
class MultilabelHead(core.MultilabelLogic, _Head):
    """``num_labels`` logits, an independent yes/no each; link sigmoid per label; loss ``StableMultilabelCE``.

    Args:
        num_labels: L, the number of labels.
        use_projection, use_bias, kernel_initializer, ...: as :class:`BinaryHead`.
    """


@export
class GaussianHead(core.GaussianLogic, _Head):
    """Mean and log standard deviation per target; link ``[mean, std]``; loss :class:`~keras_stable_heads.GaussianNLL`.

    Emits ``concat([mean, log_scale])`` (``2 * units`` values). The log-scale has a **smooth** floor:
    ``log_scale = floor + softplus(raw - floor)``, so the standard deviation stays above ``exp(floor)`` (the
    default -7 gives 9.1e-4: rescale targets whose noise is smaller) and ``exp(-log_scale)`` in the loss stays
    finite, while the gradient to ``raw`` never becomes 0.

    Args:
        units: D, the number of real targets per example.
        log_scale_floor: the floor of the log standard deviation (in the config).
        use_projection, use_bias, kernel_initializer, ...: as :class:`BinaryHead` (the projection has ``2 * units``
            outputs; ``use_projection=False`` takes ``2 * units`` values and only applies the floor).
    """


@export
class LaplaceHead(core.LaplaceLogic, _Head):
    """Location (median) and log-scale per target; link ``[median, scale]``; loss ``LaplaceNLL``.

    Emits ``concat([location, log_scale])`` with the same **smooth** log-scale floor as :class:`GaussianHead`
    (``floor + softplus(raw - floor)``, default -7).

    Args:
        units: D, the number of real targets per example.
        log_scale_floor: the floor of the log scale (in the config).
        use_projection, use_bias, kernel_initializer, ...: as :class:`GaussianHead`.
    """


HEADS = (BinaryHead, SoftmaxHead, MultilabelHead, GaussianHead, LaplaceHead)

# Layers that pass their input through at inference (shape and meaning unchanged): heads and the audit look past them.
PASS_THROUGH = tuple(getattr(keras.layers, name) for name in core.PASS_THROUGH_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# Inference model
# ----------------------------------------------------------------------------------------------------------------


def graph_of(model):
    """The Functional graph of a Functional or built Sequential model (its ``inputs``/``outputs``), or a clear error."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
    if isinstance(model, keras.Sequential):
        if not getattr(model, "_functional", None):
            raise ValueError(f"Sequential model '{model.name}' is not built: give it a keras.Input (or call it on "
                             "data) so that its outputs are known.")
        return model._functional
    if not hasattr(model, "_outputs_struct"):
        raise TypeError(f"Model '{model.name}' ({type(model).__name__}) is subclassed: its layer graph is not known. "
                        "Heads and the audit need a Sequential or functional model.")
    return model


def _inputs_and_outputs(model):
    graph = graph_of(model)
    return graph._inputs_struct, graph._outputs_struct


_KERAS3 = core.Flavour(head_base=_Head, link_layer=Link, model_class=keras.Model, pass_through=PASS_THROUGH,
                       graph=_inputs_and_outputs)


def head_of(tensor):
    """The head that produced ``tensor`` (a model output), looking past dropout-like layers and into nested models."""
    return core.head_of(tensor, _KERAS3)


def inference_model(model, name=None):
    """A model with ``model``'s inputs and weights whose head outputs are passed through their links.

    Each output produced by a head gets a :class:`Link` layer: probabilities for ``BinaryHead``,
    ``SoftmaxHead`` and ``MultilabelHead``; ``[mean, std]`` for ``GaussianHead`` and ``[median, scale]`` for
    ``LaplaceHead`` (on the last axis, location first); a ``FusedSoftmaxHead`` (whose training output holds no
    values) is called again on its hidden states for its ``inference_output``, logits or probabilities. Other
    outputs are passed through unchanged. The layers
    are shared, not copied: training ``model`` further updates the inference model too.

    Args:
        model: a Sequential (built) or functional model with at least one output produced by a head.
        name: the new model's name (default ``model.name + "_inference"``).

    Example:
        >>> import keras, numpy as np
        >>> from keras_stable_heads.heads import SoftmaxHead, inference_model
        >>> model = keras.Sequential([keras.Input((4,)), SoftmaxHead(3)])
        >>> probabilities = inference_model(model).predict(np.zeros((2, 4)), verbose=0)
        >>> probabilities.shape, bool(np.allclose(probabilities.sum(-1), 1.0))
        ((2, 3), True)
    """
    return core.inference_model(model, name, _KERAS3)

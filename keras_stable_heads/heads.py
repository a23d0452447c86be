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
from keras import ops

from . import losses
from ._export import export
from .numerics import softplus

__all__ = ["BinaryHead", "SoftmaxHead", "MultilabelHead", "GaussianHead", "LaplaceHead", "Link", "inference_model"]

# The options of the projection that a head takes and serializes (they mean what they mean for ``Dense``).
_DENSE_OPTIONS = ("use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
                  "kernel_constraint", "bias_constraint")


# ----------------------------------------------------------------------------------------------------------------
# Links: what a head emits -> what it means
# ----------------------------------------------------------------------------------------------------------------


def _location_and_scale(params):
    """``[location, log_scale]`` on the last axis -> ``[location, exp(log_scale)]``."""
    dim = params.shape[-1] // 2
    return ops.concatenate([params[..., :dim], ops.exp(params[..., dim:])], axis=-1)


_LINKS = {
    "sigmoid": ops.sigmoid,
    "softmax": lambda z: ops.softmax(z, axis=-1),
    "gaussian": _location_and_scale,
    "laplace": _location_and_scale,
}


def apply_link(link, outputs):
    """Apply the named link (``"sigmoid"``, ``"softmax"``, ``"gaussian"``, ``"laplace"``) to a head's outputs."""
    if link not in _LINKS:
        raise ValueError(f"`link` must be one of {sorted(_LINKS)}, got {link!r}.")
    return _LINKS[link](ops.cast(outputs, "float32"))


@export
class Link(keras.layers.Layer):
    """Applies a head's link: the layer :func:`inference_model` puts after each head.

    Computes in float32. ``"gaussian"``/``"laplace"`` turn ``[location, log_scale]`` into ``[location, scale]``.

    Args:
        link: ``"sigmoid"``, ``"softmax"`` (over the last axis), ``"gaussian"`` or ``"laplace"``.
        **kwargs: as ``keras.layers.Layer`` (``name``, ``dtype``; the dtype defaults to float32).
    """

    def __init__(self, link, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if link not in _LINKS:
            raise ValueError(f"`link` must be one of {sorted(_LINKS)}, got {link!r}.")
        self.link = link

    def call(self, inputs):
        return apply_link(self.link, inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "link": self.link}


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


class _Head(keras.layers.Layer):
    """Shared machinery: the optional projection, the float32 output, the config and the link.

    Subclasses pass their width, set ``link_name`` and ``loss_classes``, implement ``loss``, and may override
    ``_emit`` (which post-processes the float32 values).
    """

    link_name = None
    #: the loss classes that take this head's output; :mod:`keras_stable_heads.audit` reports any other loss.
    loss_classes = ()

    def __init__(self, width, *, use_projection=True, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, **kwargs):
        # Inputs are cast by the projection itself (to the policy's compute dtype); with no projection they must
        # reach the float32 output without a round trip through float16.
        super().__init__(autocast=False, **kwargs)
        # Heads act on the last axis only: a sequence mask passes through to the loss, which honours it.
        self.supports_masking = True
        self._width = int(width)
        if self._width < 1:
            raise ValueError(f"{type(self).__name__} needs at least one output unit, got {width!r}.")
        self.use_projection = bool(use_projection)
        self.projection = None
        if self.use_projection:
            self.projection = keras.layers.Dense(
                self._width, use_bias=use_bias, kernel_initializer=kernel_initializer,
                bias_initializer=bias_initializer, kernel_regularizer=kernel_regularizer,
                bias_regularizer=bias_regularizer, kernel_constraint=kernel_constraint,
                bias_constraint=bias_constraint, dtype=self.dtype_policy, name="projection",
            )
        elif any(value is not None for value in (kernel_regularizer, bias_regularizer, kernel_constraint,
                                                 bias_constraint)):
            raise ValueError(f"{type(self).__name__}(use_projection=False) has no weights: drop the regularizers and "
                             "constraints, or set use_projection=True.")

    @property
    def width(self):
        """The number of values the head emits per example (last axis)."""
        return self._width

    def build(self, input_shape):
        if self.use_projection:
            self.projection.build(input_shape)
        elif input_shape[-1] is not None and input_shape[-1] != self._width:
            raise ValueError(
                f"{type(self).__name__}(use_projection=False) passes its input through, so the input's last axis must "
                f"have {self._width} values; got shape {tuple(input_shape)}. Use use_projection=True to project."
            )

    def call(self, inputs, mask=None):
        del mask  # passed on unchanged by Keras (supports_masking)
        values = self.projection(inputs) if self.use_projection else inputs
        return self._emit(ops.cast(values, "float32"))

    def _emit(self, values):
        return values

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self._width,)

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def link(self, outputs):
        """The inverse link: what this head emits -> probabilities (or location and spread), as ``keras.ops``."""
        return apply_link(self.link_name, outputs)

    def loss(self, **options):
        raise NotImplementedError

    def _config(self):
        """The subclass's own constructor arguments."""
        return {}

    def get_config(self):
        config = {**super().get_config(), **self._config(), "use_projection": self.use_projection}
        if self.use_projection:
            dense = self.projection.get_config()
            config.update({key: dense[key] for key in _DENSE_OPTIONS})
        return config


@export
class BinaryHead(_Head):
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

    link_name = "sigmoid"
    loss_classes = (losses.StableBinaryCE, losses.StableBinaryFocalCE, losses.StableMultilabelCE)

    def __init__(self, **kwargs):
        super().__init__(1, **kwargs)

    def loss(self, **options):
        """``StableBinaryCE(**options)``."""
        return losses.StableBinaryCE(**options)


@export
class SoftmaxHead(_Head):
    """``num_classes`` logits for one class in K; link softmax; loss ``StableSoftmaxCE`` (``StableSparseSoftmaxCE``).

    Args:
        num_classes: K, the number of classes (>= 2; one yes/no target is a ``BinaryHead``).
        use_projection, use_bias, kernel_initializer, ...: as :class:`BinaryHead`.
    """

    link_name = "softmax"
    loss_classes = (losses.StableSoftmaxCE, losses.StableSparseSoftmaxCE, losses.StableSoftmaxFocalCE)

    def __init__(self, num_classes, **kwargs):
        if int(num_classes) < 2:
            raise ValueError(f"SoftmaxHead needs num_classes >= 2 (a softmax over one unit is the constant 1), got "
                             f"{num_classes!r}. For one yes/no target use BinaryHead().")
        super().__init__(num_classes, **kwargs)
        self.num_classes = int(num_classes)

    def loss(self, sparse=False, **options):
        """``StableSparseSoftmaxCE(**options)`` for integer labels (``sparse=True``), else ``StableSoftmaxCE``."""
        return losses.StableSparseSoftmaxCE(**options) if sparse else losses.StableSoftmaxCE(**options)

    def _config(self):
        return {"num_classes": self.num_classes}


@export
class MultilabelHead(_Head):
    """``num_labels`` logits, an independent yes/no each; link sigmoid per label; loss ``StableMultilabelCE``.

    Args:
        num_labels: L, the number of labels.
        use_projection, use_bias, kernel_initializer, ...: as :class:`BinaryHead`.
    """

    link_name = "sigmoid"
    loss_classes = (losses.StableMultilabelCE, losses.StableBinaryCE, losses.StableBinaryFocalCE)

    def __init__(self, num_labels, **kwargs):
        super().__init__(num_labels, **kwargs)
        self.num_labels = int(num_labels)

    def loss(self, **options):
        """``StableMultilabelCE(**options)``."""
        return losses.StableMultilabelCE(**options)

    def _config(self):
        return {"num_labels": self.num_labels}


class _LocationScaleHead(_Head):
    """``[location, log_scale]`` for ``units`` targets, the log-scale floored smoothly at ``log_scale_floor``."""

    def __init__(self, units, log_scale_floor=-7.0, **kwargs):
        super().__init__(2 * int(units), **kwargs)
        self.units = int(units)
        self.log_scale_floor = float(log_scale_floor)

    def _emit(self, values):
        location, raw = values[..., : self.units], values[..., self.units:]
        # Smooth floor: floor + softplus(raw - floor) > floor, == raw once raw is a few units above the floor, and
        # its gradient never vanishes (a hard max would stop a log-scale that fell below the floor for good).
        log_scale = self.log_scale_floor + softplus(raw - self.log_scale_floor)
        return ops.concatenate([location, log_scale], axis=-1)

    def _config(self):
        return {"units": self.units, "log_scale_floor": self.log_scale_floor}


@export
class GaussianHead(_LocationScaleHead):
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

    link_name = "gaussian"
    loss_classes = (losses.GaussianNLL,)

    def loss(self, **options):
        """``GaussianNLL(**options)``."""
        return losses.GaussianNLL(**options)


@export
class LaplaceHead(_LocationScaleHead):
    """Location (median) and log-scale per target; link ``[median, scale]``; loss ``LaplaceNLL``.

    Emits ``concat([location, log_scale])`` with the same **smooth** log-scale floor as :class:`GaussianHead`
    (``floor + softplus(raw - floor)``, default -7).

    Args:
        units: D, the number of real targets per example.
        log_scale_floor: the floor of the log scale (in the config).
        use_projection, use_bias, kernel_initializer, ...: as :class:`GaussianHead`.
    """

    link_name = "laplace"
    loss_classes = (losses.LaplaceNLL,)

    def loss(self, **options):
        """``LaplaceNLL(**options)``."""
        return losses.LaplaceNLL(**options)


HEADS = (BinaryHead, SoftmaxHead, MultilabelHead, GaussianHead, LaplaceHead)

# Layers that pass their input through at inference (shape and meaning unchanged): heads and the audit look past them.
PASS_THROUGH = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
                keras.layers.SpatialDropout3D, keras.layers.AlphaDropout, keras.layers.GaussianDropout,
                keras.layers.Identity, keras.layers.ActivityRegularization)


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


def head_of(tensor):
    """The head that produced ``tensor`` (a model output), looking past dropout-like layers and into nested models."""
    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        operation, node_index, tensor_index = history
        if isinstance(operation, _Head):
            return operation
        if isinstance(operation, PASS_THROUGH):
            history = getattr(operation._inbound_nodes[node_index].input_tensors[0], "_keras_history", None)
            continue
        if isinstance(operation, keras.Model) and hasattr(operation, "outputs"):
            try:
                history = getattr(operation.outputs[tensor_index], "_keras_history", None)
            except (AttributeError, ValueError, IndexError):
                return None
            continue
        return None
    return None


def inference_model(model, name=None):
    """A model with ``model``'s inputs and weights whose head outputs are passed through their links.

    Each output produced by a head gets a :class:`Link` layer: probabilities for ``BinaryHead``,
    ``SoftmaxHead`` and ``MultilabelHead``; ``[mean, std]`` for ``GaussianHead`` and ``[median, scale]`` for
    ``LaplaceHead`` (on the last axis, location first). Other outputs are passed through unchanged. The layers
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
    graph = graph_of(model)
    found = []

    def link(tensor):
        head = head_of(tensor)
        if head is None:
            return tensor
        found.append(head)
        return Link(head.link_name, name=f"{head.name}_{head.link_name}")(tensor)

    linked = keras.tree.map_structure(link, graph._outputs_struct)
    if not found:
        raise ValueError(
            f"No output of model '{model.name}' is produced by a head (BinaryHead, SoftmaxHead, MultilabelHead, "
            "GaussianHead, LaplaceHead). For a model ending in a sigmoid or softmax use "
            "keras_stable_heads.stabilize(model), which returns both a logits model and an inference model."
        )
    return keras.Model(graph._inputs_struct, linked, name=name or f"{model.name}_inference")

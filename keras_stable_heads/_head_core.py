"""What an output head is, whichever Keras builds the layer: written once, used by Keras 3 and by tf_keras.

:mod:`keras_stable_heads.heads` puts each mixin below in front of ``keras.layers.Layer``;
:mod:`keras_stable_heads.tf_keras` puts the same mixin in front of ``tf_keras.layers.Layer``. A mixin holds the
head's arguments and their validation, its width, what it emits (in ``keras.ops``, which take tf tensors under the
TensorFlow backend), its link, its config and the names of its losses. The base it is mixed into supplies:

- ``_dense_class``: the ``Dense`` layer of that Keras (the projection);
- ``_loss_module``: where the loss classes named in ``loss_names`` live (Keras 3's or tf_keras's twins);

and :class:`Flavour` supplies what walking a model's graph needs (:func:`head_of`, :func:`inference_model`).
"""

import dataclasses
from collections.abc import Callable

import keras
from keras import ops

from .numerics import softplus

# The options of the projection that a head takes and serializes (they mean what they mean for ``Dense``).
DENSE_OPTIONS = ("use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
                 "kernel_constraint", "bias_constraint")

# Layers that pass their input through at inference (shape and meaning unchanged): heads and the audit look past
# them. Names, looked up in each Keras's ``layers`` module.
PASS_THROUGH_NAMES = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout",
                      "GaussianDropout", "Identity", "ActivityRegularization")


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


def check_link(link):
    """``link`` if it names a link, else a ``ValueError`` listing the names."""
    if link not in _LINKS:
        raise ValueError(f"`link` must be one of {sorted(_LINKS)}, got {link!r}.")
    return link


def apply_link(link, outputs):
    """Apply the named link (``"sigmoid"``, ``"softmax"``, ``"gaussian"``, ``"laplace"``) to a head's outputs."""
    return _LINKS[check_link(link)](ops.cast(outputs, "float32"))


class LinkLogic:
    """The ``Link`` layer: applies a head's link in float32 (the layer's dtype defaults to float32)."""

    def __init__(self, link, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.link = check_link(link)

    def call(self, inputs):
        return apply_link(self.link, inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "link": self.link}


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


class HeadLogic:
    """Shared machinery: the optional projection, the float32 output, the config, the link and the losses.

    A head mixin passes its width to ``__init__``, sets ``link_name`` and ``loss_names`` (the first is what
    ``loss()`` builds), and may override ``_emit`` (which post-processes the float32 values) and ``_config``.
    """

    link_name = None
    #: names of the loss classes that take this head's output, the default first.
    loss_names = ()
    #: the loss classes of ``loss_names``, from the base's ``_loss_module``; the audit reports any other loss.
    loss_classes = ()
    _dense_class = None
    _loss_module = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._loss_module is not None:
            cls.loss_classes = tuple(getattr(cls._loss_module, name) for name in cls.loss_names)

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
            self.projection = self._dense_class(
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
        # Marks the layer built: tf_keras's build_from_config (loading a .keras file) calls build() directly, and an
        # unmarked layer would be built again, with a second draw of the projection's initializer.
        super().build(input_shape)

    def call(self, inputs, mask=None):
        del mask  # passed on unchanged by Keras (supports_masking)
        values = self.projection(inputs) if self.use_projection else inputs
        return self._emit(ops.cast(values, "float32"))

    def _emit(self, values):
        return values

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self._width,)

    def link(self, outputs):
        """The inverse link: what this head emits -> probabilities (or location and spread), as ``keras.ops``."""
        return apply_link(self.link_name, outputs)

    def loss(self, **options):
        """The matching loss built with ``options``: the first of ``loss_names`` (``StableBinaryCE`` for a
        ``BinaryHead``, ``StableMultilabelCE``, ``GaussianNLL``, ``LaplaceNLL``)."""
        return self.loss_classes[0](**options)

    def _config(self):
        """The subclass's own constructor arguments."""
        return {}

    def get_config(self):
        config = {**super().get_config(), **self._config(), "use_projection": self.use_projection}
        if self.use_projection:
            dense = self.projection.get_config()
            config.update({key: dense[key] for key in DENSE_OPTIONS})
        return config


class BinaryLogic(HeadLogic):
    link_name = "sigmoid"
    loss_names = ("StableBinaryCE", "StableBinaryFocalCE", "StableMultilabelCE")

    def __init__(self, **kwargs):
        super().__init__(1, **kwargs)


class SoftmaxLogic(HeadLogic):
    link_name = "softmax"
    loss_names = ("StableSoftmaxCE", "StableSparseSoftmaxCE", "StableSoftmaxFocalCE")

    def __init__(self, num_classes, **kwargs):
        if int(num_classes) < 2:
            raise ValueError(f"SoftmaxHead needs num_classes >= 2 (a softmax over one unit is the constant 1), got "
                             f"{num_classes!r}. For one yes/no target use BinaryHead().")
        super().__init__(num_classes, **kwargs)
        self.num_classes = int(num_classes)

    def loss(self, sparse=False, **options):
        """``StableSparseSoftmaxCE(**options)`` for integer labels (``sparse=True``), else ``StableSoftmaxCE``."""
        name = "StableSparseSoftmaxCE" if sparse else "StableSoftmaxCE"
        return getattr(self._loss_module, name)(**options)

    def _config(self):
        return {"num_classes": self.num_classes}


class MultilabelLogic(HeadLogic):
    link_name = "sigmoid"
    loss_names = ("StableMultilabelCE", "StableBinaryCE", "StableBinaryFocalCE")

    def __init__(self, num_labels, **kwargs):
        super().__init__(num_labels, **kwargs)
        self.num_labels = int(num_labels)

    def _config(self):
        return {"num_labels": self.num_labels}


class LocationScaleLogic(HeadLogic):
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


class GaussianLogic(LocationScaleLogic):
    link_name = "gaussian"
    loss_names = ("GaussianNLL",)


class LaplaceLogic(LocationScaleLogic):
    link_name = "laplace"
    loss_names = ("LaplaceNLL",)


# ----------------------------------------------------------------------------------------------------------------
# A model's heads and its inference model
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flavour:
    """The classes of one Keras (Keras 3 or tf_keras) that walking a model's graph needs.

    Attributes:
        head_base: the base class of that Keras's heads.
        link_layer: its ``Link`` layer class.
        model_class: its ``Model`` class.
        pass_through: its layers named in ``PASS_THROUGH_NAMES``.
        graph: ``model -> (inputs, outputs)``, the nested input and output tensors of a Sequential (built) or
            functional model; a clear ``TypeError``/``ValueError`` for any other.
    """

    head_base: type
    link_layer: type
    model_class: type
    pass_through: tuple
    graph: Callable


def head_of(tensor, flavour):
    """The head that produced ``tensor`` (a model output), looking past dropout-like layers and into nested models."""
    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        operation, node_index, tensor_index = history
        if isinstance(operation, flavour.head_base) or _is_fused_head(operation):
            return operation
        if isinstance(operation, flavour.pass_through):
            inputs = keras.tree.flatten(operation._inbound_nodes[node_index].input_tensors)
            history = getattr(inputs[0], "_keras_history", None)
            continue
        if isinstance(operation, flavour.model_class) and hasattr(operation, "outputs"):
            try:
                history = getattr(operation.outputs[tensor_index], "_keras_history", None)
            except (AttributeError, ValueError, IndexError, TypeError):
                return None
            continue
        return None
    return None


def _is_fused_head(operation):
    """A head whose training output is not what it emits at inference (``FusedSoftmaxHead``): it builds its own
    inference output with ``inference_tensor(training_output)`` instead of a ``Link`` after it."""
    return callable(getattr(operation, "inference_tensor", None))


def inference_model(model, name, flavour):
    """``model``'s inputs and layers, each head output passed through a ``Link`` (see ``heads.inference_model``)."""
    inputs, outputs = flavour.graph(model)
    found = []

    def link(tensor):
        head = head_of(tensor, flavour)
        if head is None:
            return tensor
        found.append(head)
        if _is_fused_head(head):
            return head.inference_tensor(tensor)
        return flavour.link_layer(head.link_name, name=f"{head.name}_{head.link_name}")(tensor)

    linked = keras.tree.map_structure(link, outputs)
    if not found:
        raise ValueError(
            f"No output of model '{model.name}' is produced by a head (BinaryHead, SoftmaxHead, MultilabelHead, "
            "GaussianHead, LaplaceHead, FusedSoftmaxHead). For a model ending in a sigmoid or softmax use "
            "keras_stable_heads.stabilize(model), which returns both a logits model and an inference model."
        )
    return flavour.model_class(inputs, linked, name=name or f"{model.name}_inference")

"""Every loss as a Keras 2 (``tf_keras``) ``Loss`` and every head as a ``tf_keras`` layer, for models built with
``tf_keras`` or with ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``.

>>> import os; os.environ["KERAS_BACKEND"] = "tensorflow"   # before the first ``import keras``
>>> import tf_keras
>>> from keras_stable_heads.tf_keras import StableSparseSoftmaxCE
>>> model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,))])     # logits: no softmax
>>> model.compile(optimizer="sgd", loss=StableSparseSoftmaxCE(ignore_class=-1))

Each class here is built from the Keras 3 class of the same name in :mod:`keras_stable_heads.losses` by one factory:
same options (the Keras 3 class's ``_options``), same validation (its ``__init__`` runs), same computation (its
``call``, i.e. the fused op in :mod:`keras_stable_heads.ops`). What differs is Keras 2's:

- ``reduction`` is tf_keras's: ``"auto"`` (the default: ``"sum_over_batch_size"``, and what ``fit`` needs under a
  ``tf.distribute`` strategy), ``"sum_over_batch_size"``, ``"sum"``, ``"none"``; there is no ``dtype`` argument
  (float16/bfloat16 predictions are computed in float32 and the loss is float32, as in Keras 3).
- Classes are registered in tf_keras's own registry as ``"keras_stable_heads>ClassName"``, so a tf_keras model
  saved in any tf_keras format loads back with ``tf_keras.models.load_model(path)`` and no ``custom_objects``.

Masks. ``ignore_class`` (``StableSparseSoftmaxCE``), ``missing_label`` (``StableMultilabelCE``) and a Keras mask on
the predictions (``_keras_mask``, e.g. from ``Masking`` or ``Embedding(mask_zero=True)``) drop entries:

- ``"auto"``/``"sum_over_batch_size"``: ``sum(loss * sample_weight over kept entries) / (number of kept entries)``,
  the mean over kept entries; 0 when nothing is kept (tf_keras's own masking gives NaN there).
- Under a ``tf.distribute`` strategy (``model.fit`` with ``MirroredStrategy``), each replica divides by the mean over
  replicas of the kept count (one all-reduce of a scalar) rather than by its own count; as tf_keras then averages the
  replicas' gradients, a step is ``sum over the global batch / kept entries of the global batch``, as on one device.
  (tf_keras's own masking divides by each replica's count, which differs when replicas keep different numbers.)
- ``"sum"`` / ``"none"``: the weighted sum / the per-entry losses, dropped entries 0.

Heads. ``BinaryHead``, ``SoftmaxHead``, ``MultilabelHead``, ``GaussianHead``, ``LaplaceHead`` and ``Link`` are
tf_keras layers, and :func:`inference_model` takes a tf_keras model:

>>> from keras_stable_heads.tf_keras import SoftmaxHead, inference_model
>>> head = SoftmaxHead(3)
>>> model = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu", input_shape=(4,)), head])
>>> model.compile(optimizer="sgd", loss=head.loss(sparse=True))     # this module's StableSparseSoftmaxCE
>>> served = inference_model(model)                                  # softmax probabilities, same weights

Each is built from the Keras 3 class of the same name in :mod:`keras_stable_heads.heads` by one factory: that
class's logic mixin from :mod:`keras_stable_heads._head_core` (arguments and their validation, width, the float32
output, the smooth log-scale floor, link, config keys, loss names) in front of a tf_keras base, which gives it a
``tf_keras.layers.Dense`` projection and this module's losses. Registered as ``"keras_stable_heads>ClassName"`` in
tf_keras's registry, so a model with heads loads back from ``.keras``, ``.h5`` or a SavedModel without
``custom_objects``.

Keras 3's backend must be TensorFlow (``KERAS_BACKEND=tensorflow``): the ops are written in ``keras.ops``, which
operate on tf tensors only under that backend.
"""

import inspect
import sys

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_stable_heads.tf_keras needs Keras 3's TensorFlow backend: its losses are computed with keras.ops, which "
        f"take tf tensors only under that backend, but the backend is {keras.backend.backend()!r}. Set "
        "KERAS_BACKEND=tensorflow in the environment before Python first imports keras."
    )

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from keras.src.backend import get_keras_mask  # noqa: E402
from tf_keras.src.utils import losses_utils  # noqa: E402

from . import _head_core  # noqa: E402
from . import heads as _heads  # noqa: E402
from . import losses as _losses  # noqa: E402
from ._backend import global_count_scale  # noqa: E402
from ._export import PACKAGE  # noqa: E402

# Constructor arguments that belong to the Loss base class, not to a loss's own options.
_BASE_ARGUMENTS = ("self", "reduction", "name", "dtype")


class _TFKerasStableLoss(tf_keras.losses.Loss):
    """tf_keras face of a Keras 3 loss class: a Keras 3 instance validates the options and computes the loss."""

    _keras3_class = None
    _options = ()

    def __init__(self, options, reduction, name):
        # The Keras 3 constructor validates the options (ValueError/TypeError naming the argument).
        self._keras3 = self._keras3_class(**options, reduction="none", name=name)
        super().__init__(reduction=reduction, name=name)
        for key in self._options:
            setattr(self, key, getattr(self._keras3, key))

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in self._options})
        return config

    @tf.autograph.experimental.do_not_convert  # no data-dependent Python control flow: nothing to convert
    def call(self, y_true, y_pred):
        """The per-example loss (dropped entries 0); the entries kept, if the loss drops any, as its ``_keras_mask``."""
        loss = self._keras3.call(y_true, y_pred)
        keep = get_keras_mask(loss)
        if keep is not None:
            loss._keras_mask = keep  # the attribute tf_keras reads (Keras 3 may keep it elsewhere)
        return loss

    def __call__(self, y_true, y_pred, sample_weight=None):
        """tf_keras's ``Loss.__call__``, except for the count a masked mean divides by.

        The mask is the loss's own (``ignore_class``, ``missing_label``) and/or the predictions' ``_keras_mask``.
        'auto'/'sum_over_batch_size' weight kept entries by ``size / kept`` so the mean is over kept entries, with
        ``kept`` averaged over the replicas of a ``tf.distribute`` step (the global batch's count) and ``0 / 0 = 0``
        (tf_keras's own masking divides by each replica's count and gives NaN when nothing is kept).
        """
        with tf_keras.backend.name_scope(self._name_scope):
            y_pred = tf.convert_to_tensor(y_pred)
            losses = self.call(y_true, y_pred)
            reduction = self._get_reduction()  # as tf_keras: under a strategy outside fit, 'auto' raises
            masks = [m for m in (getattr(y_pred, "_keras_mask", None), getattr(losses, "_keras_mask", None))
                     if m is not None]
            if masks:
                mask = tf.cast(masks[0] if len(masks) == 1 else tf.logical_and(*masks), losses.dtype)
                if reduction == tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE:
                    size = tf.cast(tf.size(mask), losses.dtype)
                    weight = tf.math.divide_no_nan(size, tf.reduce_sum(mask))  # size / kept
                    # Under a strategy, size / (mean over replicas of kept) == size / kept * kept / mean kept.
                    scale = global_count_scale(mask)
                    if scale is not None:
                        weight = weight * tf.cast(scale, losses.dtype)
                    mask = mask * weight
                sample_weight = losses_utils.apply_mask(losses, sample_weight, tf.stop_gradient(mask))
            return losses_utils.compute_weighted_loss(losses, sample_weight, reduction=reduction)


def _registered_twin(keras3_class, bases, namespace):
    """A class on ``bases`` named and documented as ``keras3_class``, registered in tf_keras's registry."""
    name = keras3_class.__name__
    cls = type(name, bases, {
        **namespace, "__module__": __name__, "__qualname__": name,
        "__doc__": f"tf_keras version of :class:`keras_stable_heads.{name}` (see this module's docstring).\n\n"
                   + (keras3_class.__doc__ or ""),
    })
    return tf_keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def _tf_keras_class(keras3_class):
    """The tf_keras ``Loss`` subclass with ``keras3_class``'s options, validation, computation, name and docs."""
    signature = inspect.signature(keras3_class.__init__)
    options = [p for key, p in signature.parameters.items() if key not in _BASE_ARGUMENTS]
    if {p.name for p in options} != set(keras3_class._options):
        raise TypeError(
            f"{keras3_class.__name__}: constructor options {[p.name for p in options]} differ from its _options "
            f"{keras3_class._options}; tf_keras's get_config would not round-trip them."
        )
    options_signature = inspect.Signature(options)
    default_name = signature.parameters["name"].default

    def __init__(self, *args, reduction=tf_keras.losses.Reduction.AUTO, name=default_name, **kwargs):
        bound = options_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _TFKerasStableLoss.__init__(self, dict(bound.arguments), reduction, name)

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *options,
         inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default=tf_keras.losses.Reduction.AUTO),
         inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=default_name)]
    )
    return _registered_twin(keras3_class, (_TFKerasStableLoss,), {
        "__init__": __init__, "_keras3_class": keras3_class, "_options": tuple(keras3_class._options)})


StableBinaryCE = _tf_keras_class(_losses.StableBinaryCE)
StableSoftmaxCE = _tf_keras_class(_losses.StableSoftmaxCE)
StableSparseSoftmaxCE = _tf_keras_class(_losses.StableSparseSoftmaxCE)
StableMultilabelCE = _tf_keras_class(_losses.StableMultilabelCE)
StableBinaryFocalCE = _tf_keras_class(_losses.StableBinaryFocalCE)
StableSoftmaxFocalCE = _tf_keras_class(_losses.StableSoftmaxFocalCE)
GaussianNLL = _tf_keras_class(_losses.GaussianNLL)
LaplaceNLL = _tf_keras_class(_losses.LaplaceNLL)


# ----------------------------------------------------------------------------------------------------------------
# Heads: the logic mixins of keras_stable_heads._head_core in front of tf_keras's Layer
# ----------------------------------------------------------------------------------------------------------------


class _TFKerasHead(_head_core.HeadLogic, tf_keras.layers.Layer):
    """The tf_keras base of every head: a ``tf_keras.layers.Dense`` projection and this module's losses."""

    _dense_class = tf_keras.layers.Dense
    _loss_module = sys.modules[__name__]  # this module: the loss twins above, by the Keras 3 names

    def build_from_config(self, config):
        # Loading a .keras file builds the layer here, outside its name scope: enter it, so that the projection's
        # weights get the names they had when the model was built ("head_name/kernel:0").
        with tf.name_scope(self.name):
            super().build_from_config(config)


def _tf_keras_layer(keras3_class, base):
    """The tf_keras layer with ``keras3_class``'s logic (its first base, a mixin of ``_head_core``) on ``base``."""
    logic = keras3_class.__bases__[0]
    if logic.__module__ != _head_core.__name__:
        raise TypeError(f"{keras3_class.__name__}: its first base {logic.__name__} is not a mixin of "
                        f"{_head_core.__name__}, so it has no logic to share with a tf_keras layer.")
    return _registered_twin(keras3_class, (logic, base), {})


Link = _tf_keras_layer(_heads.Link, tf_keras.layers.Layer)
BinaryHead = _tf_keras_layer(_heads.BinaryHead, _TFKerasHead)
SoftmaxHead = _tf_keras_layer(_heads.SoftmaxHead, _TFKerasHead)
MultilabelHead = _tf_keras_layer(_heads.MultilabelHead, _TFKerasHead)
GaussianHead = _tf_keras_layer(_heads.GaussianHead, _TFKerasHead)
LaplaceHead = _tf_keras_layer(_heads.LaplaceHead, _TFKerasHead)


def _inputs_and_outputs(model):
    """The nested input and output tensors of a tf_keras functional or built Sequential model, or a clear error."""
    if not isinstance(model, tf_keras.Model):
        raise TypeError(f"Expected a tf_keras.Model, got {type(model).__module__}.{type(model).__name__} (for a "
                        "Keras 3 model use keras_stable_heads.inference_model).")
    if not getattr(model, "_is_graph_network", False):
        if isinstance(model, tf_keras.Sequential):
            raise ValueError(f"Sequential model '{model.name}' is not built: give its first layer an input_shape (or "
                             "start it with tf_keras.Input) so that its outputs are known.")
        raise TypeError(f"Model '{model.name}' ({type(model).__name__}) is subclassed: its layer graph is not known. "
                        "inference_model needs a Sequential or functional model.")
    return model._nested_inputs, model._nested_outputs


_TF_KERAS = _head_core.Flavour(
    head_base=_TFKerasHead, link_layer=Link, model_class=tf_keras.Model, graph=_inputs_and_outputs,
    pass_through=tuple(getattr(tf_keras.layers, name) for name in _head_core.PASS_THROUGH_NAMES),
)


def inference_model(model, name=None):
    """A tf_keras model with ``model``'s inputs and weights whose head outputs are passed through their links.

    As :func:`keras_stable_heads.inference_model`, for a tf_keras Sequential (built) or functional model: each
    output produced by a head (looking past dropout-like layers and into nested models) gets a :class:`Link`;
    other outputs pass through unchanged; the layers are shared, not copied.

    Args:
        model: a ``tf_keras`` Sequential (built) or functional model with at least one output produced by a head.
        name: the new model's name (default ``model.name + "_inference"``).
    """
    return _head_core.inference_model(model, name, _TF_KERAS)


__all__ = [
    "GaussianNLL",
    "LaplaceNLL",
    "StableBinaryCE",
    "StableBinaryFocalCE",
    "StableMultilabelCE",
    "StableSoftmaxCE",
    "StableSoftmaxFocalCE",
    "StableSparseSoftmaxCE",
    "BinaryHead",
    "GaussianHead",
    "LaplaceHead",
    "Link",
    "MultilabelHead",
    "SoftmaxHead",
    "inference_model",
]

#: Keras 3 objects with no tf_keras twin. The fused vocabulary head hands its loss the hidden states as a Keras 3
#: tensor attribute and runs the fused linear cross-entropy through keras.ops on any backend; tf_keras has neither.
#: Asking for one here raises an AttributeError that says so, rather than a bare "no attribute".
KERAS3_ONLY = ("FusedSoftmaxHead", "FusedSparseSoftmaxCE", "FusedTokenAccuracy")


def __getattr__(name):
    if name in KERAS3_ONLY:
        raise AttributeError(
            f"keras_stable_heads.tf_keras has no {name}: the fused vocabulary head needs Keras 3 (it passes the hidden "
            f"states to its loss as a Keras 3 tensor attribute). Use keras_stable_heads.{name} with Keras 3, or, in "
            "tf_keras, Dense(V) with StableSparseSoftmaxCE.")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

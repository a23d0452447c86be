"""Every loss as a Keras 2 (``tf_keras``) ``Loss``, for models built with ``tf_keras`` or with ``tf.keras`` under
``TF_USE_LEGACY_KERAS=1``.

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

Keras 3's backend must be TensorFlow (``KERAS_BACKEND=tensorflow``): the ops are written in ``keras.ops``, which
operate on tf tensors only under that backend.
"""

import inspect

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

from . import losses as _losses  # noqa: E402
from ._export import PACKAGE  # noqa: E402

# Constructor arguments that belong to the Loss base class, not to a loss's own options.
_BASE_ARGUMENTS = ("self", "reduction", "name", "dtype")


def _replica_mean(x):
    """The mean of ``x`` over the replicas of the current ``tf.distribute`` step; ``x`` itself outside one."""
    context = tf.distribute.get_replica_context()  # None in a cross-replica context, the default one without strategy
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, x)


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
                    mask = mask * tf.math.divide_no_nan(size, _replica_mean(tf.reduce_sum(mask)))
                sample_weight = losses_utils.apply_mask(losses, sample_weight, tf.stop_gradient(mask))
            return losses_utils.compute_weighted_loss(losses, sample_weight, reduction=reduction)


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
    name = keras3_class.__name__
    cls = type(name, (_TFKerasStableLoss,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name, "_keras3_class": keras3_class,
        "_options": tuple(keras3_class._options),
        "__doc__": f"tf_keras version of :class:`keras_stable_heads.{name}` (see this module's docstring).\n\n"
                   + (keras3_class.__doc__ or ""),
    })
    return tf_keras.saving.register_keras_serializable(package=PACKAGE)(cls)


StableBinaryCE = _tf_keras_class(_losses.StableBinaryCE)
StableSoftmaxCE = _tf_keras_class(_losses.StableSoftmaxCE)
StableSparseSoftmaxCE = _tf_keras_class(_losses.StableSparseSoftmaxCE)
StableMultilabelCE = _tf_keras_class(_losses.StableMultilabelCE)
StableBinaryFocalCE = _tf_keras_class(_losses.StableBinaryFocalCE)
StableSoftmaxFocalCE = _tf_keras_class(_losses.StableSoftmaxFocalCE)
GaussianNLL = _tf_keras_class(_losses.GaussianNLL)
LaplaceNLL = _tf_keras_class(_losses.LaplaceNLL)

__all__ = [
    "GaussianNLL",
    "LaplaceNLL",
    "StableBinaryCE",
    "StableBinaryFocalCE",
    "StableMultilabelCE",
    "StableSoftmaxCE",
    "StableSoftmaxFocalCE",
    "StableSparseSoftmaxCE",
]

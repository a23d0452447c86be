"""Audit a model's output activations against its losses, and fix what the audit finds.

The pairing of output activation and loss is the most common silent bug in Keras models: a sigmoid or softmax
fed to a ``from_logits=True`` loss is silently wrong on JAX and PyTorch, a linear output fed to a probability
loss is clipped, a softmax over one unit is a constant. :func:`audit` reads the model's graph (Sequential or
functional, nested models included) and its loss and names each such pairing, with the number that goes wrong
and the fix. :func:`stabilize` applies the fix: a training model that emits logits through heads, compiled with
the exact stable twin of the loss, and an inference model whose predictions equal the original model's.

Every number in a finding is computed from ``keras.config.epsilon()`` (1e-7 by default): a probability-space
cross-entropy clips at ``eps``, so its loss is capped at ``-log(eps) = 16.118`` and its gradient is 0 past
``|logit| = log((1 - eps) / eps) = 16.118``.
"""

import contextlib
import dataclasses
import functools
import inspect
import math
import warnings

import keras
import numpy as np
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.ops import nn as _nn_ops

from . import losses as stable
from .heads import PASS_THROUGH
from .heads import BinaryHead
from .heads import MultilabelHead
from .heads import SoftmaxHead
from .heads import _Head
from .heads import graph_of
from .heads import inference_model

__all__ = ["Finding", "Findings", "AuditError", "AuditWarning", "CODES", "audit", "stabilize", "stable_twin",
           "install_compile_check", "uninstall_compile_check"]

#: Every finding kind, with what it means. ``severity`` is "error" (silently wrong) or "warning" (saturates).
CODES = {
    "probabilities_as_logits": "a sigmoid/softmax output fed to a loss that takes logits (from_logits=True, stable)",
    "logits_as_probabilities": "a linear (or other real-valued) output fed to a probability-space loss",
    "softmax_one_unit": "a softmax over a single unit: the constant 1",
    "softmax_binary_ce": "a softmax over several units with binary cross-entropy",
    "sigmoid_categorical_ce": "a sigmoid output with categorical cross-entropy",
    "saturating_regression_loss": "a sigmoid/softmax output with squared or absolute error",
    "clipped_probability_loss": "a sigmoid/softmax output with its probability-space cross-entropy, clipped at epsilon",
    "head_loss_mismatch": "a head compiled with a loss that does not take what the head emits",
}

_WARNING_CODES = ("clipped_probability_loss",)

_BINARY = ("binary", "binary_focal", "multilabel")
_CATEGORICAL = ("categorical", "sparse_categorical", "categorical_focal")
_CROSS_ENTROPY = _BINARY + _CATEGORICAL
_REGRESSION = ("squared", "absolute", "huber", "log_cosh")
# Keras's TensorFlow backend computes these from the logits it caches on a sigmoid/softmax output (the focal losses
# only in part): JAX and PyTorch do not.
_RESCUED_ON_TENSORFLOW = ("binary", "categorical", "sparse_categorical")

# Activations whose output is any real number (not a probability): fine as logits, wrong as probabilities.
_REAL_VALUED = ("linear", "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "softplus",
                "softsign", "exponential", "log_softmax", "mish", "celu", "glu", "hard_silu", "hard_tanh",
                "log_sigmoid", "sparse_plus", "squareplus", "tanh_shrink", "hard_shrink", "soft_shrink")
_PROBABILITY = ("sigmoid", "softmax")

_ACTIVATION_LAYERS = {keras.layers.ReLU: "relu", keras.layers.ELU: "elu", keras.layers.LeakyReLU: "leaky_relu",
                      keras.layers.PReLU: "prelu"}


# ----------------------------------------------------------------------------------------------------------------
# Findings
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    """One mismatched pairing: which output, which layer, what goes wrong numerically, and the fix.

    Attributes:
        output: the output's name (its key in a loss dict).
        layer: the layer (or op) that sets the output's activation, ``outer/inner`` for nested models.
        activation: ``"sigmoid"``, ``"softmax"``, ``"linear"``, ... or the head's class name.
        loss: the loss as written in ``compile``, e.g. ``BinaryCrossentropy(from_logits=True)``.
        code: the kind of finding, a key of :data:`CODES`.
        problem: one sentence on the numerics, with the number that goes wrong.
        fix: what to change.
        severity: ``"error"`` (silently wrong) or ``"warning"`` (saturates on confidently wrong examples).
    """

    output: str
    layer: str
    activation: str
    loss: str
    code: str
    problem: str
    fix: str
    severity: str = "error"

    def __str__(self):
        return (f"[{self.severity}] {self.code}: output '{self.output}' (layer '{self.layer}', activation "
                f"{self.activation}) with loss {self.loss}\n    problem: {self.problem}\n    fix: {self.fix}")


class Findings(list):
    """The list of :class:`Finding` that :func:`audit` returns; ``str()`` gives a readable report."""

    @property
    def codes(self):
        return [finding.code for finding in self]

    @property
    def errors(self):
        return Findings(f for f in self if f.severity == "error")

    def __str__(self):
        if not self:
            return "no findings: every output's activation matches its loss."
        lines = [f"{len(self)} finding{'s' if len(self) > 1 else ''}:"]
        lines += [f"{i}. {finding}" for i, finding in enumerate(self, 1)]
        return "\n".join(lines)


class AuditError(ValueError):
    """Raised by ``Model.compile`` under :func:`install_compile_check` (``action="raise"``); ``.findings`` has them."""

    def __init__(self, findings):
        super().__init__(f"keras_stable_heads audit: {findings}")
        self.findings = findings


class AuditWarning(UserWarning):
    """Warned by ``Model.compile`` under :func:`install_compile_check` (``action="warn"``)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the model: where each output's activation is set
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Output:
    key: str  # the output's name: the key a loss dict uses
    activation: str  # "sigmoid", "softmax", a real-valued activation name, or "unknown"
    units: int | None  # size of the activation's axis
    axis_is_last: bool
    layer: str  # path of the layer/op that sets the activation
    operation: object = None  # that layer/op
    graph: object = None  # the Functional graph that holds ``operation`` (None for an unbuilt Sequential)
    chain: tuple = ()  # (graph, tensor) pairs from the activation's output to the model output
    head: _Head | None = None
    output_operation: object = None  # the top-level operation that produces the model output


def _activation_name(fn):
    if fn is None:
        return "linear"
    for name in _PROBABILITY + _REAL_VALUED:
        try:
            if fn is keras.activations.get(name):
                return name
        except (ValueError, TypeError):
            continue
    return "unknown"


def _describe_operation(operation):
    """``(activation, softmax axis)`` set by a layer or op: the activation's name, or "unknown"."""
    if isinstance(operation, _Head):
        return "linear", -1
    if isinstance(operation, keras.layers.Softmax):
        return "softmax", operation.axis
    if isinstance(operation, _nn_ops.Sigmoid):
        return "sigmoid", -1
    if isinstance(operation, _nn_ops.Softmax):
        return "softmax", operation.axis
    if isinstance(operation, _nn_ops.LogSoftmax):
        return "log_softmax", -1
    for cls, name in _ACTIVATION_LAYERS.items():
        if isinstance(operation, cls):
            return name, -1
    if isinstance(operation, keras.layers.RNN) or not isinstance(operation, keras.layers.Layer):
        return "unknown", -1
    if hasattr(operation, "activation") and callable(operation.activation):
        return _activation_name(operation.activation), -1
    if isinstance(operation, keras.layers.Lambda) or not type(operation).__module__.startswith("keras."):
        return "unknown", -1
    return "linear", -1  # a built-in layer with no activation: real-valued


def _axis_size(shape, axis):
    if axis is None or not shape:
        return None, False
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    rank = len(shape)
    if len(axes) != 1:
        return None, False
    a = axes[0] % rank
    return shape[a], a == rank - 1


def _trace(graph, tensor, key):
    """Follow ``tensor`` back through pass-through layers and nested models to the operation that sets it."""
    chain, prefix, top = [], "", None
    while True:
        operation, node_index, tensor_index = tensor._keras_history
        if top is None:
            top = operation
        if isinstance(operation, keras.Model) and not isinstance(operation, _Head):
            inner = graph_of(operation)
            chain.append((graph, tensor))
            graph, tensor = inner, inner.outputs[tensor_index]
            prefix += f"{operation.name}/"
            continue
        if isinstance(operation, PASS_THROUGH):
            chain.append((graph, tensor))
            tensor = operation._inbound_nodes[node_index].input_tensors[0]
            continue
        break
    chain.append((graph, tensor))
    activation, axis = _describe_operation(operation)
    units, last = _axis_size(tuple(tensor.shape), axis)
    return _Output(key=key, activation=activation, units=units, axis_is_last=last, layer=prefix + operation.name,
                   operation=operation, graph=graph, chain=tuple(reversed(chain)),
                   head=operation if isinstance(operation, _Head) else None, output_operation=top)


def _outputs(model):
    """One :class:`_Output` per model output, in the flat order of ``model.outputs``."""
    if isinstance(model, keras.Sequential) and not getattr(model, "_functional", None):
        return [_trace_layers(model)]
    graph = graph_of(model)
    struct = graph._outputs_struct
    flat = keras.tree.flatten_with_path(struct)
    names = getattr(model, "output_names", None) or [t._keras_history[0].name for t in graph.outputs]
    outputs = []
    for i, (path, tensor) in enumerate(flat):
        key = "/".join(str(p) for p in path) if isinstance(struct, dict) else names[i]
        outputs.append(_trace(graph, tensor, key))
    return outputs


def _trace_layers(model):
    """An unbuilt Sequential model: read its last layers (no graph, so :func:`stabilize` needs it built)."""
    layers = [layer for layer in model.layers if not isinstance(layer, PASS_THROUGH)]
    if not layers:
        raise ValueError(f"Sequential model '{model.name}' has no layers to audit.")
    layer = layers[-1]
    activation, axis = _describe_operation(layer)
    units = getattr(layer, "units", None) if axis in (-1, None) else None
    if isinstance(layer, _Head):
        units = layer.width
    elif activation in _PROBABILITY and isinstance(layer, (keras.layers.Activation, keras.layers.Softmax)):
        before = [lyr for lyr in layers[:-1] if hasattr(lyr, "units")]
        units = getattr(before[-1], "units", None) if before else None
    return _Output(key=model.layers[-1].name, activation=activation, units=units, axis_is_last=axis in (-1, None),
                   layer=layer.name, operation=layer, head=layer if isinstance(layer, _Head) else None)


def _losses_for(model, loss, outputs):
    """The loss of each output, following Keras's rules: one loss for all, a list in output order, or a dict."""
    if loss is None:
        return [None] * len(outputs)
    if isinstance(loss, dict) and "class_name" not in loss:
        known = {o.key for o in outputs}
        unknown = sorted(set(loss) - known)
        if unknown:
            raise ValueError(f"The loss dict has keys {unknown} that name no output of '{model.name}'; its outputs are "
                             f"{sorted(known)}.")
        return [loss.get(o.key) for o in outputs]
    if isinstance(loss, (list, tuple)):
        if len(loss) != len(outputs):
            raise ValueError(f"{len(loss)} losses were given for the {len(outputs)} outputs of '{model.name}'.")
        return list(loss)
    return [loss] * len(outputs)


# ----------------------------------------------------------------------------------------------------------------
# Reading the loss
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LossInfo:
    label: str  # as the user wrote it
    family: str | None  # binary, binary_focal, multilabel, categorical, sparse_categorical, categorical_focal,
    #                     squared, absolute, huber, log_cosh, gaussian, laplace; None = unknown
    space: str  # "logits", "probabilities", "values" or "unknown"
    options: dict
    loss: object
    stable: bool = False


def _keras_functions():
    names = {"binary_crossentropy": "binary", "binary_focal_crossentropy": "binary_focal",
             "categorical_crossentropy": "categorical", "sparse_categorical_crossentropy": "sparse_categorical",
             "categorical_focal_crossentropy": "categorical_focal", "mean_squared_error": "squared",
             "mean_absolute_error": "absolute", "huber": "huber", "log_cosh": "log_cosh"}
    return {keras.losses.get(name): family for name, family in names.items()}


_FUNCTIONS = _keras_functions()
_STABLE = {stable.StableBinaryCE: "binary", stable.StableBinaryFocalCE: "binary_focal",
           stable.StableMultilabelCE: "multilabel", stable.StableSoftmaxCE: "categorical",
           stable.StableSparseSoftmaxCE: "sparse_categorical", stable.StableSoftmaxFocalCE: "categorical_focal",
           stable.GaussianNLL: "gaussian", stable.LaplaceNLL: "laplace"}


def _defaults(fn):
    try:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    except (TypeError, ValueError):
        return {}


def _describe_loss(loss, units=None):
    """A :class:`_LossInfo` for anything ``compile(loss=...)`` accepts; None for no loss."""
    if loss is None:
        return None
    if isinstance(loss, str):
        if loss.lower() in ("crossentropy", "ce"):  # Keras picks binary for one unit
            fn = keras.losses.get("binary_crossentropy" if units == 1 else "categorical_crossentropy")
        else:
            fn = keras.losses.get(loss)
        if fn is None:
            return _LossInfo(repr(loss), None, "unknown", {}, loss)
        info = _describe_loss(fn, units)
        suffix = _from_logits_suffix(info)
        return dataclasses.replace(info, label=repr(loss) + (f" {suffix}" if suffix else ""), loss=loss)
    if isinstance(loss, dict):
        return _describe_loss(keras.losses.deserialize(loss), units)
    if type(loss) in _STABLE:
        return _LossInfo(_stable_label(loss), _STABLE[type(loss)], "logits", loss.get_config(), loss, stable=True)
    fn, kwargs, reduction = None, {}, None
    if isinstance(loss, LossFunctionWrapper):
        fn, kwargs, reduction = loss.fn, dict(loss._fn_kwargs), loss.reduction
    elif isinstance(loss, functools.partial):
        fn, kwargs = loss.func, dict(loss.keywords)
    elif callable(loss) and not isinstance(loss, keras.losses.Loss):
        fn = loss
    family = _FUNCTIONS.get(fn)
    if family is None:
        return _LossInfo(getattr(loss, "name", None) or type(loss).__name__ if isinstance(loss, keras.losses.Loss)
                         else getattr(loss, "__name__", repr(loss)), None, "unknown", {}, loss)
    options = {**_defaults(fn), **kwargs}
    if reduction is not None:
        options["reduction"] = reduction
    if family in _CROSS_ENTROPY:
        space = "logits" if options.get("from_logits") else "probabilities"
    else:
        space = "values"
    if isinstance(loss, LossFunctionWrapper) and type(loss) is not LossFunctionWrapper:
        label = type(loss).__name__
    else:
        label = getattr(fn, "__name__", "loss")
    info = _LossInfo(label, family, space, options, loss)
    return dataclasses.replace(info, label=label + _from_logits_suffix(info))


def _from_logits_suffix(info):
    return f"(from_logits={bool(info.options.get('from_logits'))})" if info.family in _CROSS_ENTROPY else ""


def _stable_label(loss):
    """``StableBinaryCE(label_smoothing=0.1)``: the class with its non-default options."""
    cls = type(loss)
    config, default = loss.get_config(), cls().get_config()
    shown = [f"{k}={v!r}" for k, v in config.items() if k not in ("name", "dtype") and default.get(k) != v]
    return f"{cls.__name__}({', '.join(shown)})"


# ----------------------------------------------------------------------------------------------------------------
# Stable twins
# ----------------------------------------------------------------------------------------------------------------


def stable_twin(loss, *, link=None, units=None):
    """The exact logit-space loss that replaces ``loss``, keeping its options.

    ``BinaryCrossentropy`` -> ``StableBinaryCE`` (``label_smoothing``), ``CategoricalCrossentropy`` ->
    ``StableSoftmaxCE`` (``label_smoothing``, ``axis``), ``SparseCategoricalCrossentropy`` ->
    ``StableSparseSoftmaxCE`` (``ignore_class``, ``axis``), ``BinaryFocalCrossentropy`` -> ``StableBinaryFocalCE``
    (``gamma``, ``alpha`` when ``apply_class_balancing``, ``label_smoothing``), ``CategoricalFocalCrossentropy`` ->
    ``StableSoftmaxFocalCE`` (``gamma``, ``alpha``, ``label_smoothing``, ``axis``); ``reduction`` is carried. Strings
    (``"binary_crossentropy"``...), the loss functions and ``functools.partial`` of them are accepted too. A stable
    loss is returned as a copy.

    Args:
        loss: the loss as given to ``compile``.
        link: the link the logits will have: ``"sigmoid"`` or ``"softmax"``; by default the loss's own. Give it
            to pair a loss with an output it does not match (``"mse"`` on a sigmoid -> ``StableBinaryCE``;
            binary cross-entropy on a softmax -> ``StableSoftmaxCE``).
        units: the size of the output's last axis (resolves the string ``"crossentropy"``).

    Raises:
        ValueError: for a loss with no logit-space twin (a regression loss without ``link``, an unknown loss).

    Example:
        >>> import keras
        >>> from keras_stable_heads.audit import stable_twin
        >>> stable_twin(keras.losses.BinaryCrossentropy(label_smoothing=0.1)).get_config()["label_smoothing"]
        0.1
    """
    info = loss if isinstance(loss, _LossInfo) else _describe_loss(loss, units)
    if info is None or info.family is None:
        raise ValueError(f"No stable twin is known for the loss {info.label if info else None}: pass a loss from "
                         "keras_stable_heads (or a Keras cross-entropy) explicitly.")
    if link not in (None, "sigmoid", "softmax"):
        raise ValueError(f"`link` must be 'sigmoid', 'softmax' or None, got {link!r}.")
    family, o = info.family, info.options
    same_link = link is None or (link == "sigmoid") == (family in _BINARY)
    if (info.stable and same_link) or family in ("gaussian", "laplace"):
        return type(info.loss).from_config(info.loss.get_config())
    if link is None:
        if family in _REGRESSION:
            raise ValueError(f"{info.label} is a regression loss: it has a logit-space twin only for a sigmoid or "
                             "softmax output; pass link='sigmoid' or link='softmax'.")
        link = "sigmoid" if family in _BINARY else "softmax"
    common = {"reduction": o["reduction"]} if "reduction" in o else {}
    smoothing = {"label_smoothing": float(o.get("label_smoothing", 0.0) or 0.0)}
    axis = o.get("axis", -1)
    if link == "sigmoid":
        if axis not in (-1, None) and family in ("binary", "binary_focal"):
            raise ValueError(f"{info.label} has axis={axis}; StableBinaryCE reduces over the last axis only.")
        if family == "binary_focal":
            alpha = o.get("alpha") if o.get("apply_class_balancing") else None
            return stable.StableBinaryFocalCE(gamma=o.get("gamma", 2.0), alpha=alpha, **smoothing, **common)
        if family == "categorical_focal":
            return stable.StableBinaryFocalCE(gamma=o.get("gamma", 2.0), **common)
        return stable.StableBinaryCE(**(smoothing if family == "binary" else {}), **common)
    if family == "sparse_categorical":
        return stable.StableSparseSoftmaxCE(ignore_class=o.get("ignore_class"), axis=axis, **common)
    if family == "categorical_focal":
        return stable.StableSoftmaxFocalCE(gamma=o.get("gamma", 2.0), alpha=o.get("alpha"), axis=axis, **smoothing,
                                           **common)
    if family == "binary_focal":
        alpha = o.get("alpha") if o.get("apply_class_balancing") else None
        return stable.StableSoftmaxFocalCE(gamma=o.get("gamma", 2.0), alpha=alpha, **smoothing, **common)
    if family in ("categorical", "binary"):
        return stable.StableSoftmaxCE(**smoothing, **({"axis": axis} if family == "categorical" else {}), **common)
    return stable.StableSoftmaxCE(**common)


def _twin_label(info, link):
    try:
        return _stable_label(stable_twin(info, link=link))
    except ValueError:
        return "StableBinaryCE" if link == "sigmoid" else "StableSoftmaxCE"


# ----------------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------------


def _numbers():
    eps = float(keras.config.epsilon())
    # -log(eps) caps the loss; sigmoid(z) < eps (or > 1 - eps) once |z| > log((1 - eps) / eps).
    return eps, -math.log(eps), math.log((1.0 - eps) / eps)


def _saturating_gradient(activation, units, family, delta=1.0):
    """d loss / d (true-class logit) at a logit 10 below the others, for a loss through a sigmoid or softmax."""
    k = max(int(units or 2), 2) if activation == "softmax" else 1
    if activation == "sigmoid":
        p = np.array([1.0 / (1.0 + math.exp(10.0))])
        jacobian = p * (1.0 - p)  # dp/dz
        y = np.array([1.0])
    else:
        z = np.zeros(k)
        z[0] = -10.0
        p = np.exp(z - z.max())
        p /= p.sum()
        jacobian = p * ((np.arange(k) == 0) - p[0])  # dp_c / dz_0
        y = (np.arange(k) == 0).astype(float)
    r = p - y
    d = {"squared": 2.0 * r, "absolute": np.sign(r), "huber": np.clip(r, -delta, delta), "log_cosh": np.tanh(r)}[family]
    return abs(float(np.sum(d * jacobian) / len(p)))


def _finding(out, info, code, problem, fix):
    activation = out.activation if out.head is None else f"{type(out.head).__name__} (logits)"
    return Finding(output=out.key, layer=out.layer, activation=activation, loss=info.label if info else "none",
                   code=code, problem=problem, fix=fix, severity="warning" if code in _WARNING_CODES else "error")


def _check(out, info):
    """The findings for one output and its loss."""
    eps, cap, edge = _numbers()
    act, k = out.activation, out.units
    if act == "softmax" and k == 1:
        return [_finding(out, info, "softmax_one_unit",
                         "a softmax over a single unit always outputs 1.0, so the prediction is constant and every "
                         "gradient through it is exactly 0.",
                         "for a yes/no target emit one logit with a sigmoid link: BinaryHead() (or Dense(1) with no "
                         "activation) trained with StableBinaryCE; keras_stable_heads.stabilize(model) does this.")]
    if info is None or info.family is None:
        return []
    if out.head is not None:
        return _check_head(out, info, eps, cap)
    if act in _PROBABILITY:
        return _check_probability_output(out, info, eps, cap, edge)
    if act in _REAL_VALUED and info.space == "probabilities":
        link = "sigmoid" if info.family in _BINARY else "softmax"
        return [_finding(out, info, "logits_as_probabilities",
                         f"{info.label} reads the raw {act} outputs as probabilities and clips them to "
                         f"[{eps:g}, 1 - {eps:g}]: every output outside that range (negative, or above 1) gets zero "
                         f"gradient and the loss is capped at {cap:.1f}.",
                         f"keep the {act} output as logits and train with {_twin_label(info, link)}, which takes "
                         f"logits; apply the {link} only at inference (a head and "
                         "keras_stable_heads.inference_model, or keras_stable_heads.stabilize(model)).")]
    return []


def _check_head(out, info, eps, cap):
    head = out.head
    name = type(head).__name__
    if info.space == "probabilities":
        return [_finding(out, info, "logits_as_probabilities",
                         f"{info.label} reads the {name}'s logits as probabilities and clips them to "
                         f"[{eps:g}, 1 - {eps:g}]: every logit outside that range gets zero gradient and the loss is "
                         f"capped at {cap:.1f}.",
                         f"compile with the head's own loss, head.loss() ({head.loss().__class__.__name__}).")]
    ok = isinstance(info.loss, head.loss_classes) or (
        not info.stable and info.space == "logits"
        and info.family in (_BINARY if head.link_name == "sigmoid" else _CATEGORICAL if head.link_name == "softmax"
                            else ()))
    if ok:
        return []
    expected = head.loss().__class__.__name__
    return [_finding(out, info, "head_loss_mismatch",
                     f"{name} emits {head.width} value{'s' if head.width > 1 else ''} per example for {expected} "
                     f"({head.link_name} link), but {info.label} reads them as "
                     f"{_what_loss_reads(info)}, so it optimises the wrong quantity.",
                     f"compile with head.loss() ({expected}), or change the head to match the targets.")]


def _what_loss_reads(info):
    if info.family in ("gaussian", "laplace"):
        return "[location, log_scale] pairs"
    if info.family in _REGRESSION:
        return "predicted values"
    if info.family in _BINARY:
        return "independent sigmoid logits"
    return "softmax logits over one class in K"


def _check_probability_output(out, info, eps, cap, edge):
    act, k = out.activation, out.units
    keras_loss = not info.stable
    if info.space == "logits" and info.family in _CROSS_ENTROPY:
        if act == "sigmoid":
            problem = (f"{info.label} applies a second sigmoid to the probabilities, so predictions stay in "
                       f"[0.5, 0.731] and the loss cannot fall below {math.log1p(math.exp(-1)):.3f} for a positive "
                       f"label or log 2 = {math.log(2):.3f} for a negative: training stalls near 0.69")
        else:
            kk = max(k or 2, 2)
            problem = (f"{info.label} applies a second softmax to the probabilities, which squeezes every class "
                       f"into [{1 / (1 + (kk - 1) * math.e):.3g}, {math.e / (math.e + kk - 1):.3g}]: the loss cannot "
                       f"fall below log(1 + {kk - 1}/e) = {math.log1p((kk - 1) / math.e):.3f} (chance is "
                       f"log {kk} = {math.log(kk):.3f})")
        if keras_loss and info.family in _RESCUED_ON_TENSORFLOW:
            problem = (f"On JAX and PyTorch, {problem} (TensorFlow's backend alone substitutes the logits, with a "
                       "warning).")
        else:
            problem += "."
        twin = _stable_label(info.loss) if info.stable else _twin_label(info, None)
        return [_finding(out, info, "probabilities_as_logits", problem,
                         f"remove the {act} so the layer emits logits ({_head_hint(act, k)}) and keep a logits loss, "
                         f"{twin}; get probabilities from keras_stable_heads.inference_model, or run "
                         "keras_stable_heads.stabilize(model).")]
    if info.family in _BINARY and act == "softmax":
        kk = k or 2
        uniform = (math.log(kk) - (kk - 1) * math.log1p(-1.0 / kk)) / kk
        return [_finding(out, info, "softmax_binary_ce",
                         f"binary cross-entropy scores the {kk} softmax outputs as {kk} independent yes/no labels, "
                         f"which is not the likelihood of one class in {kk} (a uniform prediction scores "
                         f"{uniform:.3f} instead of log {kk} = {math.log(kk):.3f}), and each term is clipped at "
                         f"{eps:g} (capped at {cap:.1f}).",
                         "for one label per example keep the softmax and train its logits with StableSoftmaxCE "
                         "(StableSparseSoftmaxCE for integer labels; SoftmaxHead); for several labels per example use "
                         "sigmoid logits with StableMultilabelCE (MultilabelHead).")]
    if info.family in _CATEGORICAL and act == "sigmoid":
        if k == 1:
            problem = ("categorical cross-entropy renormalises the single sigmoid to 1.0, so the loss is 0 and the "
                       "gradient exactly 0 for every example.")
            fix = "for a yes/no target train the logit with StableBinaryCE (BinaryHead)."
        else:
            kk = k or 2
            problem = (f"categorical cross-entropy renormalises the {kk} sigmoids to sum to 1, so only their ratios "
                       f"are trained: all {kk} at 0.5 or all at 0.99 give the same loss log {kk} = "
                       f"{math.log(kk):.3f}, and the sigmoid outputs are not probabilities.")
            fix = ("for one class per example use softmax logits with StableSoftmaxCE (SoftmaxHead); for several "
                   "labels per example keep the sigmoid and train its logits with StableMultilabelCE (MultilabelHead).")
        return [_finding(out, info, "sigmoid_categorical_ce", problem, fix)]
    if info.family in _REGRESSION:
        gradient = _saturating_gradient(act, k, info.family, info.options.get("delta", 1.0))
        link = act
        where = "the logit is" if act == "sigmoid" else "the true class's logit is"
        return [_finding(out, info, "saturating_regression_loss",
                         f"{info.label} through a {act} has gradient {gradient:.2g} when {where} 10 below "
                         f"{'its label' if act == 'sigmoid' else 'the others'} (cross-entropy gives 1.0): the error "
                         "vanishes where the prediction is most wrong, so confident mistakes stop learning.",
                         f"train the logits with {_twin_label(info, link)} (it accepts soft targets in [0, 1]) and "
                         f"apply the {act} only at inference; keras_stable_heads.stabilize(model) does both.")]
    if info.space == "probabilities":
        where = (f"past |logit| {edge:.1f}" if act == "sigmoid"
                 else f"once the true class trails by more than {edge:.1f} in logit")
        return [_finding(out, info, "clipped_probability_loss",
                         f"{info.label} takes the log of a probability clipped to [{eps:g}, 1 - {eps:g}]: the loss is "
                         f"capped at {cap:.1f} and its gradient is exactly 0 {where}, so confidently wrong examples "
                         "stop learning" + (" (on JAX and PyTorch; TensorFlow's backend substitutes the logits)."
                                            if info.family in _RESCUED_ON_TENSORFLOW else "."),
                         f"remove the {act} so the layer emits logits and train with {_twin_label(info, act)}, exact "
                         f"for every logit (30.0 at logit -30, not {cap:.3f}); keras_stable_heads.stabilize(model) "
                         "does both and keeps an inference model with probabilities.")]
    return []


def _head_hint(activation, units):
    if activation == "sigmoid":
        return "BinaryHead()" if units == 1 else f"MultilabelHead({units or 'L'})"
    return f"SoftmaxHead({units or 'K'})"


# ----------------------------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------------------------


def audit(model, loss=None):
    """Check each output's activation against its loss; returns :class:`Findings` (empty for a clean model).

    Reads the graph of a Sequential or functional model — a ``Dense(activation=...)``, an ``Activation`` or
    ``Softmax`` layer after a ``Dense``, ``keras.ops.sigmoid``/``softmax`` in a functional graph, a head, nested
    models, looking past dropout and identity layers — and the loss of each output (one loss for all, a list in
    output order or a dict by output name, as ``compile`` takes it). It reports:

    - ``probabilities_as_logits``: a sigmoid/softmax output with ``from_logits=True`` or a stable (logits) loss;
    - ``logits_as_probabilities``: a linear (or other real-valued) output, or a head, with a probability loss;
    - ``softmax_one_unit``: a softmax over one unit (whatever the loss);
    - ``softmax_binary_ce``: a softmax over several units with binary cross-entropy;
    - ``sigmoid_categorical_ce``: a sigmoid output with categorical cross-entropy;
    - ``saturating_regression_loss``: a sigmoid/softmax output with squared, absolute, Huber or log-cosh error;
    - ``clipped_probability_loss`` (warning): a sigmoid/softmax with its own probability-space cross-entropy,
      which clips at ``keras.config.epsilon()``;
    - ``head_loss_mismatch``: a head with a loss that does not take what it emits.

    Args:
        model: a Sequential or functional ``keras.Model`` (a subclassed model has no readable graph).
        loss: the loss to check, as ``compile`` takes it; by default the loss the model was compiled with.

    Returns:
        :class:`Findings`, a list of :class:`Finding`; ``print(findings)`` gives a readable report.

    Example:
        >>> import keras
        >>> from keras_stable_heads.audit import audit
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        >>> audit(model, loss=keras.losses.BinaryCrossentropy(from_logits=True)).codes
        ['probabilities_as_logits']
    """
    return _audit(model, _compiled_loss(model) if loss is None else loss)


def _compiled_loss(model):
    return getattr(model, "loss", None) if getattr(model, "compiled", False) else None


def _audit(model, loss):
    outputs = _outputs(model)
    findings = Findings()
    for out, output_loss in zip(outputs, _losses_for(model, loss, outputs)):
        findings.extend(_check(out, _describe_loss(output_loss, out.units)))
    return findings


# ----------------------------------------------------------------------------------------------------------------
# stabilize
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    mode: str  # "keep", "replace" (swap the operation for a head), "linearize" (drop its activation, append a head),
    #            "append" (append a head after the output)
    loss: object
    head: type | None = None
    units: int | None = None


def _target(out, info):
    """``(head class, link)`` the fixed output gets, from its activation, units and loss family."""
    family, k = info.family, out.units
    if out.activation == "softmax":
        if k == 1:
            return BinaryHead, "sigmoid"
        return SoftmaxHead, "softmax"
    if out.activation == "sigmoid":
        if family in _CATEGORICAL and k != 1:
            return SoftmaxHead, "softmax"
        return (BinaryHead if k == 1 else MultilabelHead), "sigmoid"
    if family in _BINARY:
        return (BinaryHead if k == 1 else MultilabelHead), "sigmoid"
    if k == 1:
        raise ValueError(f"Output '{out.key}' has one unit but a categorical loss: use a binary loss.")
    return SoftmaxHead, "softmax"


def _plan(out, info):
    if out.head is not None:
        if info is None or info.family is None:
            return _Plan("keep", None if info is None else info.loss)
        if info.stable and isinstance(info.loss, out.head.loss_classes):
            return _Plan("keep", stable_twin(info))
        if out.head.link_name in ("sigmoid", "softmax") and info.family in _CROSS_ENTROPY + _REGRESSION:
            return _Plan("keep", stable_twin(info, link=out.head.link_name))
        return _Plan("keep", out.head.loss())
    if info is None:
        return _Plan("keep", None)  # an output with no loss is not trained: nothing to fix
    probability = out.activation in _PROBABILITY
    if not probability and info.family not in _CROSS_ENTROPY:
        return _Plan("keep", info.loss)  # a regression output, or nothing to fix
    if info.family is None:
        raise ValueError(f"Output '{out.key}' ends in a {out.activation} but its loss "
                         f"({info.label}) has no known stable twin: pass `loss=`.")
    if not probability and out.activation != "linear":
        raise ValueError(f"Output '{out.key}' ends in {out.activation} (layer '{out.layer}') and has the "
                         f"cross-entropy {info.label}: logits must be unbounded, so replace the {out.activation} with "
                         "a linear output first.")
    if probability and not out.axis_is_last:
        raise ValueError(f"Output '{out.key}' applies its softmax over an axis other than the last: stabilize only "
                         "handles the last axis.")
    head, link = _target(out, info)
    operation = out.operation
    if isinstance(operation, keras.layers.Dense) and _dense_is_plain(operation):
        mode = "replace"
    elif probability and isinstance(operation, (keras.layers.Activation, keras.layers.Softmax, _nn_ops.Sigmoid,
                                                _nn_ops.Softmax)):
        mode = "replace"
    elif probability and "activation" in _config_or_empty(operation):
        mode = "linearize"
    elif not probability:
        mode = "append"
    else:
        raise ValueError(f"Output '{out.key}': cannot remove the {out.activation} of layer '{out.layer}' "
                         f"({type(operation).__name__}).")
    _check_not_shared(out, mode)
    return _Plan(mode, stable_twin(info, link=link), head, out.units)


def _config_or_empty(operation):
    try:
        return operation.get_config()
    except (NotImplementedError, TypeError, AttributeError):
        return {}


def _dense_is_plain(layer):
    config = layer.get_config()
    return not config.get("lora_rank") and config.get("activity_regularizer") is None and \
        getattr(layer, "quantization_mode", None) is None


def _check_not_shared(out, mode):
    """Removing an activation must not change any other path: the layer runs once and feeds only the output."""
    operation = out.operation
    if out.graph is None:
        raise ValueError("stabilize needs a built model: give the Sequential model a keras.Input first.")
    nodes = [node for nodes in out.graph._nodes_by_depth.values() for node in nodes]
    if mode in ("replace", "linearize") and sum(node.operation is operation for node in nodes) > 1:
        raise ValueError(f"Layer '{out.layer}' is called more than once in the model: stabilize cannot remove the "
                         f"{out.activation} from one call only. Add a separate Activation layer at the output.")
    for graph, tensor in out.chain:
        graph_nodes = [node for nodes in graph._nodes_by_depth.values() for node in nodes]
        consumers = [node for node in graph_nodes if any(t is tensor for t in node.input_tensors)]
        is_output = any(t is tensor for t in graph.outputs)
        if len(consumers) + is_output > 1:
            raise ValueError(f"The {out.activation} output of '{out.layer}' also feeds other layers: stabilize cannot "
                             "turn it into logits without changing them.")


def _head_layer(plan, name, dtype=None, source=None):
    kwargs = {"name": name}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if plan.head is not BinaryHead:
        kwargs["num_classes" if plan.head is SoftmaxHead else "num_labels"] = plan.units
    if source is None:
        return plan.head(use_projection=False, **kwargs)
    config = source.get_config()
    options = {key: config[key] for key in ("use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer",
                                            "bias_regularizer", "kernel_constraint", "bias_constraint")}
    return plan.head(**options, **kwargs)


def stabilize(model, loss=None, *, optimizer=None, metrics=None, loss_weights=None):
    """Fix every output the audit flags: ``(training_model, inference_model)`` with the original weights.

    The training model emits logits: a ``Dense(activation="sigmoid"/"softmax")`` output becomes the matching head
    (``BinaryHead``, ``MultilabelHead``, ``SoftmaxHead``) with the Dense's weights; a final ``Activation``,
    ``Softmax`` layer or ``keras.ops.sigmoid``/``softmax`` becomes a projection-free head; a linear output with a
    cross-entropy gets one appended. It is compiled with the stable twin of each output's loss (options and
    ``reduction`` carried, see :func:`stable_twin`), the original optimizer's config (fresh state) and
    ``loss_weights``. Metrics are not carried — they would see logits — pass ``metrics=`` for new ones. The
    inference model (:func:`~keras_stable_heads.heads.inference_model` of the training model) shares its layers
    and outputs probabilities.

    The inference model's predictions equal the original model's for every sigmoid/softmax output. Where the
    audit found the output itself to be wrong its meaning changes, as the fix says: a softmax over one unit
    becomes a sigmoid, a sigmoid under categorical cross-entropy a softmax (same ranking), and a linear output
    under a probability loss gains its sigmoid/softmax. Regression outputs are kept as they are.

    Args:
        model: a built Sequential or functional model, compiled, or with ``loss`` given.
        loss: the loss(es) to fix, as ``compile`` takes them; by default the compiled loss.
        optimizer: the training model's optimizer (default: a copy of the original's config, else ``"rmsprop"``).
        metrics: metrics for the training model (they see logits).
        loss_weights: default: the original's.

    Returns:
        ``(training_model, inference_model)``.

    Raises:
        ValueError: when there is no loss, or an activation cannot be removed without changing another path
            (a shared layer, a probability also fed to other layers, a softmax over a non-last axis).
    """
    graph_of(model)  # a built Sequential or functional model, else a clear error
    loss = _compiled_loss(model) if loss is None else loss
    outputs = _outputs(model)
    per_output = _losses_for(model, loss, outputs)
    if all(item is None for item in per_output):
        raise ValueError(f"Model '{model.name}' has no loss to stabilize: compile it or pass `loss=`.")
    infos = [_describe_loss(item, out.units) for out, item in zip(outputs, per_output)]
    plans = [_plan(out, info) for out, info in zip(outputs, infos)]

    replacements, renamed = {}, {}
    for out, plan in zip(outputs, plans):
        operation = out.operation
        if plan.mode == "replace" and isinstance(operation, keras.layers.Dense):
            replacements[id(operation)] = lambda layer, plan=plan: _head_layer(plan, layer.name, layer.dtype_policy,
                                                                                 source=layer)
        elif plan.mode == "replace":
            name = getattr(operation, "name", None)
            replacements[id(operation)] = lambda layer, plan=plan, name=name: _head_layer(plan, name)
        elif plan.mode == "linearize":
            def linear(layer):
                config = layer.get_config()
                config["activation"] = "linear"
                return layer.__class__.from_config(config)

            replacements[id(operation)] = linear
        if plan.mode in ("linearize", "append") and isinstance(out.output_operation, keras.layers.Layer) \
                and not isinstance(out.output_operation, keras.Model):
            renamed[id(out.output_operation)] = out.output_operation.name

    def clone(layer):
        new = (replacements.get(id(layer)) or (lambda lyr: lyr.__class__.from_config(lyr.get_config())))(layer)
        if id(layer) in renamed:
            config = new.get_config()
            config["name"] = f"{renamed[id(layer)]}_logits"
            new = new.__class__.from_config(config)
        return new

    with _unchecked():  # clone_model recompiles the clone with the original loss
        cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _copy_weights(model, cloned)

    training = cloned
    if any(plan.mode in ("linearize", "append") for plan in plans):
        graph = graph_of(cloned)
        flat = []
        for out, plan, tensor in zip(outputs, plans, graph.outputs):
            if plan.mode in ("linearize", "append"):
                name = renamed.get(id(out.output_operation), f"{out.key}_head")
                tensor = _head_layer(plan, name)(tensor)
            flat.append(tensor)
        training = keras.Model(graph._inputs_struct, keras.tree.pack_sequence_as(graph._outputs_struct, flat),
                               name=model.name)

    new_losses = [plan.loss for plan in plans]
    if isinstance(loss, dict) and "class_name" not in loss:
        compiled_loss = {out.key: item for out, item in zip(outputs, new_losses) if out.key in loss}
    elif len(outputs) == 1:
        compiled_loss = new_losses[0]
    else:
        compiled_loss = new_losses
    if optimizer is None:
        previous = getattr(model, "optimizer", None)
        optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(previous)) if previous is not None \
            else "rmsprop"
    if loss_weights is None and getattr(model, "_compile_config", None) is not None:
        loss_weights = model._compile_config.config.get("loss_weights")
    with _unchecked():
        training.compile(optimizer=optimizer, loss=compiled_loss, loss_weights=loss_weights, metrics=metrics)
    return training, _inference(training)


def _copy_weights(source, target):
    weights = source.get_weights()
    if len(weights) != len(target.weights):
        raise ValueError(f"stabilize: the rebuilt model has {len(target.weights)} weights, the original "
                         f"{len(weights)}; cannot carry them over.")
    target.set_weights(weights)


def _inference(training):
    try:
        return inference_model(training)
    except ValueError:
        graph = graph_of(training)  # no head (regression only): the model itself predicts
        return keras.Model(graph._inputs_struct, graph._outputs_struct, name=f"{training.name}_inference")


# ----------------------------------------------------------------------------------------------------------------
# Strict mode
# ----------------------------------------------------------------------------------------------------------------

_INSTALLED = {}
_SUSPENDED = []


@contextlib.contextmanager
def _unchecked():
    """No compile check inside: stabilize's own (re)compiles are not a user's compile."""
    _SUSPENDED.append(True)
    try:
        yield
    finally:
        _SUSPENDED.pop()


def install_compile_check(action="raise", severity="warning"):
    """Make ``keras.Model.compile`` audit the model and its loss first, and raise or warn on a finding.

    Subclassed models (no readable graph) are compiled unchecked. Loading a saved, compiled model also calls
    ``compile``. Calling it again replaces the settings; :func:`uninstall_compile_check` restores ``compile``.

    Args:
        action: ``"raise"`` (:class:`AuditError`, a ``ValueError``, before compiling) or ``"warn"``
            (:class:`AuditWarning`, then compile).
        severity: ``"warning"`` checks every finding; ``"error"`` ignores ``clipped_probability_loss``.
    """
    if action not in ("raise", "warn"):
        raise ValueError(f"`action` must be 'raise' or 'warn', got {action!r}.")
    if severity not in ("warning", "error"):
        raise ValueError(f"`severity` must be 'warning' or 'error', got {severity!r}.")
    if not _INSTALLED:
        _INSTALLED["own"] = "compile" in vars(keras.Model)
        _INSTALLED["compile"] = keras.Model.compile
    original = _INSTALLED["compile"]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compile(self, *args, **kwargs):
        if _SUSPENDED:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        try:
            findings = _audit(self, bound.arguments.get("loss"))
        except (TypeError, ValueError):
            findings = Findings()  # no graph to read (subclassed model): compile unchecked
        if severity == "error":
            findings = findings.errors
        if findings:
            if action == "raise":
                raise AuditError(findings)
            warnings.warn(f"keras_stable_heads audit: {findings}", AuditWarning, stacklevel=2)
        return original(self, *args, **kwargs)

    keras.Model.compile = compile


def uninstall_compile_check():
    """Restore ``keras.Model.compile``; a no-op when :func:`install_compile_check` was not called."""
    if not _INSTALLED:
        return
    if _INSTALLED["own"]:
        keras.Model.compile = _INSTALLED["compile"]
    else:
        del keras.Model.compile
    _INSTALLED.clear()

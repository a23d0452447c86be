"""Which implementation computes an op: a registry, with the backend resolved once at import.

Implementations (in order of preference for the automatic choice):

- ``numba_cpu``: the fused Numba kernels of ``keras_stable_heads.kernels``, for float32 CPU tensors on every
  backend, through one bridge per backend (``bridges/``). Not inside an XLA-compiled TensorFlow function (no XLA
  kernel exists for a Python op), not inside ``torch.compile``, and not under a Keras or ``tf.distribute``
  distribution (a host kernel cannot be sharded).
- ``numba_cuda``: the Numba CUDA kernels, for float32 (and upcast float16/bfloat16) GPU tensors of the torch
  and JAX backends, launched on the framework's own stream with zero-copy views. TensorFlow on GPU uses the
  portable XLA path (TensorFlow has no CUDA array interface).
- ``native``: the backend's own fused op where it is exact for the options asked, on CPU tensors:
  ``torch.nn.functional.cross_entropy`` for softmax cross-entropy (integer labels with or without
  ``ignore_class``, or dense labels), and TensorFlow's ``tf.nn.sparse_softmax_cross_entropy_with_logits``
  (also under XLA and ``tf.distribute``), without label smoothing, class weights, z-loss or soft-cap. Its formula
  (``log_softmax``) is the portable path's; where it would differ (a row of only ``-inf`` logits, a 0 label on a
  ``-inf`` logit, an out-of-range label in a compiled step: a NaN) the call is recomputed on the portable path, so
  results never depend on the choice. "auto" takes it on torch below a measured size, where the kernels' Python
  glue costs more than the op; on TensorFlow only when requested (not measured faster in ``fit``).
- ``portable``: the ``keras.ops`` code in :mod:`keras_stable_heads.ops`: every backend, device, dtype and
  context, compiled by XLA where the backend uses it.

Choosing: the keyword ``implementation=`` of an op or loss wins, else the environment variable
``KERAS_STABLE_HEADS_IMPLEMENTATION``, else ``"auto"``. A forced implementation that cannot run raises
``ValueError`` saying why; ``"auto"`` takes the first that can run and whose measured size threshold the input
reaches, else the portable path. :func:`explain` returns the choice and the reason.

Ops with kernels (``_kernel_ops.OPS``): softmax cross-entropy with integer and dense labels, sigmoid
cross-entropy (binary and multi-label), sigmoid and softmax focal cross-entropy, Gaussian and Laplace NLL.
"""

import dataclasses
import functools
import os

import keras

from . import _backend
from . import _kernel_ops
from ._backend import dtype_name as _dtype_name

ENV_VAR = "KERAS_STABLE_HEADS_IMPLEMENTATION"
CHOICES = ("auto", "portable", "native", "numba_cpu", "numba_cuda")

# The automatic choice uses the Numba CPU path from this many logits up (N * C), per backend; None: never.
# Measured forward+backward with `keras-stable-heads bench --full --backend all` on the quiet 2-core AMD EPYC
# (Zen 3) box, run 20261126T121108Z-152d2b in benchmarks/results/records.jsonl (min ms, numba_cpu vs portable):
# - torch: the kernels win at every size (256x10: 0.57 vs 2.0, its eager portable path pays ~1 ms of op
#   overhead; 8192x1000: 8.5 vs 216), so always.
# - TensorFlow (tf.function, no XLA; under XLA the portable path is forced): portable at 256x10 (0.56 vs 1.48),
#   the kernels from 65536x10 (3.4 vs 8.9) up, so from 65536 logits.
# - JAX: the portable path (one exp per logit, XLA-fused like optax) wins up to ~2M logits (65536x10: 1.72 vs
#   1.94; 2048x1000: 1.49 vs 1.73, run 20261126T122235Z-7dc1a3), the kernels from ~4M (4096x1000: 3.0 vs 5.3;
#   8192x1000: 8.0 vs 9.9; 4096x32000: 151 vs 347). 16384x256 (4.2M logits) is a tie (4.5 vs 4.3).
#   Re-measured on the 2-core Intel Xeon (AVX-512, 2026-12-07, jitted value_and_grad, min of 20): the portable path
#   wins up to 8192x1000 (2048x1000 1.13 vs 1.40, 4096x1000 2.07 vs 2.48, 8192x1000 4.85 vs 6.20), the kernels from
#   2048x4096 (10.4 vs 14.9; 16384x1000 21.5 vs 30.0). The step is where the gradient stops fitting glibc's
#   largest reused block (32 MiB of float32, 8.4M logits): above it every XLA buffer is freshly mapped, which costs
#   the portable path's several buffers more. 4M is kept: it loses 16-20% here between 4M and 8M logits, while 8M
#   would lose 43% on the AMD box at 4096x1000.
NUMBA_MIN_ELEMENTS = {"jax": 4_000_000, "torch": 0, "tensorflow": 1 << 16}
# The same for the CUDA kernels on a GPU, measured on an H200 by the script later folded into the harness
# (benchmarks/results/gpu_harness_records.jsonl). torch: the kernels beat the portable path at every size measured
# (512x10: 1.25 vs 1.89 ms; 16384x131072: 9.9 vs 103 ms), so always. JAX: XLA's fusion of the portable path
# beats them at every size (16384x131072: 8.2 vs 10.5 ms), so "auto" never picks them there (None).
NUMBA_CUDA_MIN_ELEMENTS = {"torch": 0, "jax": None}
# The thresholds above are the cross-entropy ops'. The focal losses and the regression NLLs have their own, per
# backend; a backend not listed (None) keeps the portable path under "auto" (the kernels run when requested).
# Measured forward+backward, min of 5 short runs, 2-core AMD EPYC (Zen 3), portable / numba_cpu in ms:
# - torch: focal at every size (sigmoid focal 256x10: 1.83 / 0.52, 65536x1: 5.09 / 1.20, 8192x100: 54.1 / 6.2;
#   softmax focal 256x10: 1.08 / 0.61, 65536x10: 21.5 / 8.2, 8192x1000: 430 / 31); the NLLs lose below ~16k
#   values (256x2: 0.40 / 0.56, 2048x8: 0.52 / 0.87) and win from 131,072 (65536x2: 1.21 / 0.85, 8192x128:
#   5.8 / 2.0).
# - tensorflow: all four lose or tie up to 65,536 logits (softmax focal 256x10: 1.27 / 1.87, sigmoid focal
#   65536x1: 2.40 / 2.30, gaussian 2048x8: 1.05 / 1.82) and win from 131,072 (gaussian 65536x2: 3.05 / 2.40,
#   softmax focal 2048x100: 5.29 / 3.66, 8192x1000: 212 / 40).
# - jax: mixed (softmax focal 8192x1000: 101 / 24 but 65536x10: 6.3 / 6.7; everything at 256 rows 0.2-0.7x),
#   so never automatic, as for the cross-entropy ops.
_FROM_131072 = {"torch": 1 << 17, "tensorflow": 1 << 17, "jax": None}
NUMBA_MIN_ELEMENTS_BY_OP = {
    "sigmoid_focal_ce": {"torch": 0, "tensorflow": 1 << 17, "jax": None},
    "softmax_focal_ce": {"torch": 0, "tensorflow": 1 << 17, "jax": None},
    "gaussian_nll": _FROM_131072,
    "laplace_nll": _FROM_131072,
}
# Not measured on a GPU: the portable path under "auto".
NUMBA_CUDA_MIN_ELEMENTS_BY_OP = {}
_MEASURED_OPS = frozenset({"sparse_softmax_ce", "softmax_ce", "sigmoid_ce"})
# "auto" takes the backend's own op (``native``) below this many logits, where the kernels' Python glue costs
# more than the op itself; from here the kernels. Measured forward+backward on the 2-core Intel Xeon (AVX-512),
# `keras-stable-heads bench --backend torch,tensorflow --op sparse_softmax_ce,softmax_ce --sizes
# 32x10,256x10,256x100,1024x32,2048x32,4096x32,8192x32,1024x1000 --modes forward_backward --impl stable,keras`
# (run 20261207T012710Z-d64edd), min ms native / numba_cpu / Keras:
# - torch sparse: 32x10 0.158 / 0.224 / 0.168, 256x100 0.217 / 0.279 / 0.191, 1024x32 0.218 / 0.242 / 0.210,
#   2048x32 0.315 / 0.298 / 0.267, 8192x32 0.679 / 0.621 / 0.606: native below 65,536 logits, the kernels from there.
# - TensorFlow: never automatic. Keras's fit runs a tf.function without XLA on a CPU-only machine (jit_compile
#   "auto" resolves to False there), where the native op gained 0-17% over the portable path and lost to the
#   kernels from 2048x32; in fit (batch 32/256, 10 classes) builtin/stable was 0.98/0.94 with native against
#   0.98/1.10 with the portable path. Under XLA the portable path is as fast or faster (32x10 0.214 vs Keras+XLA
#   0.198; 1024x32 0.315 vs 0.432).
NATIVE_MAX_ELEMENTS = {"torch": 1 << 16}
NATIVE_MIN_ELEMENTS = {"torch": 0, "tensorflow": None}


class Choice:
    """The implementation chosen for one call, and why.

    ``reason`` is a string, or a function that makes it: the reason is only formatted when someone reads it
    (``explain``), not on every call of a loss.
    """

    __slots__ = ("implementation", "_reason")

    def __init__(self, implementation, reason):
        self.implementation = implementation
        self._reason = reason

    @property
    def reason(self):
        return self._reason() if callable(self._reason) else self._reason

    def __eq__(self, other):
        return isinstance(other, Choice) and (self.implementation, self.reason) == (other.implementation, other.reason)

    __hash__ = None

    def __repr__(self):
        return f"Choice({self.implementation!r}, {self.reason!r})"

    def __str__(self):
        return f"{self.implementation}: {self.reason}"


def requested(implementation=None):
    """The implementation asked for, by keyword or environment variable, validated."""
    value = implementation if implementation is not None else os.environ.get(ENV_VAR, "auto")
    value = {"numba": "numba_cpu"}.get(value, value)
    if value not in CHOICES:
        source = "`implementation`" if implementation is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {CHOICES} (or 'numba'), got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Where a tensor lives and what context it is traced in, per backend (resolved once)
# ----------------------------------------------------------------------------------------------------------------


def _tensorflow_context():
    import tensorflow as tf

    def in_xla():
        try:
            from tensorflow.python.ops import control_flow_util

            return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
        except (ImportError, AttributeError):  # private API moved: be safe, use the portable path
            return True

    def context(x):
        if tf.executing_eagerly():
            device = "gpu" if "GPU" in (getattr(x, "device", "") or "") else "cpu"
        else:
            device = "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
        if in_xla():
            return device, "inside an XLA-compiled function (jit_compile=True), which cannot call a Python kernel"
        if tf.distribute.has_strategy():
            return device, "inside a tf.distribute strategy scope, where a host kernel cannot be sharded"
        return device, None

    return context


def _jax_context():
    import jax

    def context(x):
        if isinstance(x, jax.core.Tracer):
            device = jax.default_backend()
        else:
            devices = x.devices()
            if len(devices) > 1:
                return "gpu", "the array is sharded over several devices, where a host or single-GPU kernel cannot run"
            device = next(iter(devices)).platform
        device = "cpu" if device == "cpu" else "gpu"
        if keras.distribution.distribution() is not None:
            return device, "under a keras.distribution layout, where a host kernel cannot be sharded"
        return device, None

    return context


def _torch_context():
    import torch

    def context(x):
        device = "cpu" if x.device.type == "cpu" else "gpu"
        if torch.compiler.is_compiling():
            return device, "inside torch.compile, which cannot trace a NumPy kernel"
        return device, None

    return context


def _numpy_context():
    return lambda x: ("cpu", "the numpy backend has no custom gradients to attach a kernel to")


_context = {"tensorflow": _tensorflow_context, "jax": _jax_context, "torch": _torch_context,
            "numpy": _numpy_context}[_backend.BACKEND]()


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    ops: frozenset
    backends: frozenset
    devices: frozenset
    min_elements: dict  # backend -> threshold for the ops in _MEASURED_OPS
    min_elements_by_op: dict  # op -> {backend: threshold} for the others (none listed: never automatic)
    max_elements: dict = None  # backend -> "auto" picks this implementation only below this many logits
    dtypes: frozenset = frozenset({"float32"})
    options_blocker: object = None  # (op, options) -> why the op with these options is not computed exactly
    traced_backends: frozenset = frozenset()  # backends where it also runs in compiled/distributed contexts

    def threshold(self, op):
        """Logits from which "auto" picks this implementation for ``op`` here; None: never (not measured faster)."""
        table = self.min_elements if op in _MEASURED_OPS else self.min_elements_by_op.get(op, {})
        return table.get(_backend.BACKEND)

    def blocker(self, op, x, options=None):
        """Why this implementation cannot compute ``op`` on ``x`` (with ``options``; None: the defaults) here, or
        None if it can."""
        if op not in self.ops:
            return f"{self.name} has no kernel for {op}"
        if _backend.BACKEND not in self.backends:
            return f"{self.name} does not serve the {_backend.BACKEND} backend"
        dtype = _dtype_name(x.dtype)
        if dtype not in self.dtypes:
            return f"{self.name} computes {' and '.join(sorted(self.dtypes))} only, got {dtype}"
        if x.shape[-1] is None:
            return "the class axis has no static size"
        device, context = _context(x)
        if device not in self.devices:
            return f"{self.name} does not run on {device} tensors"
        if context is not None and _backend.BACKEND not in self.traced_backends:
            return context
        if self.options_blocker is not None:
            unsupported = self.options_blocker(op, options or {})
            if unsupported:
                return unsupported
        missing = _import_error(self.name)
        if missing:
            return missing
        return None


_IMPORT_ERRORS = {}


def _cuda_missing():
    import importlib

    from numba import cuda

    from .kernels import cuda_softmax_ce

    for module in _kernel_ops.CUDA_MODULES:
        importlib.import_module(f".kernels.{module}", __package__)

    if cuda_softmax_ce.SIMULATED:
        return "Numba's CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM)"
    if not cuda.is_available():
        return "no CUDA driver or GPU is visible to Numba"
    return None


def _cpu_missing():
    from . import kernels  # noqa: F401

    return None


def _import_error(name):
    """Import an implementation's kernels once; remember why they could not be used."""
    if name not in _IMPORT_ERRORS:
        try:
            _IMPORT_ERRORS[name] = {"numba_cpu": _cpu_missing, "numba_cuda": _cuda_missing,
                                    "native": lambda: None}[name]()
        except Exception as error:  # a broken numba install must not break the portable path
            _IMPORT_ERRORS[name] = f"the {name} kernels could not be imported ({type(error).__name__}: {error})"
    return _IMPORT_ERRORS[name]


KERNEL_OPS = frozenset(_kernel_ops.OPS)

# The backend's own fused op, per backend and op: used where it computes this package's formula exactly.
# TensorFlow's dense op is left out: its gradient is softmax - labels, right only for labels that sum to 1.
NATIVE_OPS = {
    "torch": {"sparse_softmax_ce": "torch.nn.functional.cross_entropy",
              "softmax_ce": "torch.nn.functional.cross_entropy"},
    "tensorflow": {"sparse_softmax_ce": "tf.nn.sparse_softmax_cross_entropy_with_logits"},
}
_NATIVE_EXACT_OPTIONS = ("label_smoothing", "class_weight", "z_loss", "logit_softcap")


def _native_options_blocker(op, options):
    """The backend's op computes this package's formula only without these options (its label smoothing and
    class weights are not normalised as here, and it has no z-loss or soft-cap)."""
    name = NATIVE_OPS.get(_backend.BACKEND, {}).get(op)
    if name is None:
        return f"{_backend.BACKEND} has no native op that computes {op} exactly"
    used = [key for key in _NATIVE_EXACT_OPTIONS if options.get(key)]
    if used:
        return f"{name} does not compute {', '.join(used)} as this package does"
    return None


REGISTRY = {
    "native": Implementation(
        name="native",
        ops=frozenset({"sparse_softmax_ce", "softmax_ce"}),
        backends=frozenset(NATIVE_OPS),
        devices=frozenset({"cpu"}),
        min_elements=NATIVE_MIN_ELEMENTS,
        min_elements_by_op={},
        max_elements=NATIVE_MAX_ELEMENTS,
        dtypes=frozenset({"float32", "float64"}),
        options_blocker=_native_options_blocker,
        traced_backends=frozenset({"tensorflow"}),  # a graph op: fine under XLA and tf.distribute
    ),
    "numba_cpu": Implementation(
        name="numba_cpu",
        ops=KERNEL_OPS,
        backends=frozenset({"tensorflow", "jax", "torch"}),
        devices=frozenset({"cpu"}),
        min_elements=NUMBA_MIN_ELEMENTS,
        min_elements_by_op=NUMBA_MIN_ELEMENTS_BY_OP,
    ),
    "numba_cuda": Implementation(
        name="numba_cuda",
        ops=KERNEL_OPS,
        backends=frozenset({"jax", "torch"}),
        devices=frozenset({"gpu"}),
        min_elements=NUMBA_CUDA_MIN_ELEMENTS,
        min_elements_by_op=NUMBA_CUDA_MIN_ELEMENTS_BY_OP,
    ),
}


def _elements(x):
    size = 1
    for d in x.shape:
        if d is None:
            return None
        size *= int(d)
    return size


_REQUESTED_PORTABLE = Choice("portable", "requested")
# Choices already made, by everything they depend on (see _choice_key); a training step asks the same question
# on every call, and answering it costs more than a small step's loss.
_CHOICES = {}
_MAX_CHOICES = 1024


def choose(op, x, implementation=None, options=None):
    """The :class:`Choice` for computing ``op`` on logits ``x`` (already float32/float64, classes last) with the
    op's ``options`` (a dict; None: the defaults)."""
    wanted = requested(implementation)
    if wanted == "portable":
        return _REQUESTED_PORTABLE
    key = _choice_key(op, x, wanted, options)
    choice = _CHOICES.get(key) if key is not None else None
    if choice is None:
        choice = _choose(op, x, wanted, options)
        if key is not None:
            if len(_CHOICES) >= _MAX_CHOICES:
                _CHOICES.clear()
            _CHOICES[key] = choice
    return choice


def _choice_key(op, x, wanted, options):
    """What a choice depends on: the op and request, the logits' dtype, shape, device and tracing context, the
    options, and the thresholds in force (tests and users may change them); None where an option is traced."""
    options = options or {}
    try:
        key = tuple(options.items())  # one call site passes its options in one order
        hash(key)
    except TypeError:  # per-class weights as a list or an array
        try:
            key = _kernel_ops.options_key(options)
        except (TypeError, ValueError):
            return None
    thresholds = tuple((impl.threshold(op), (impl.max_elements or {}).get(_backend.BACKEND)) for impl in REGISTRY.values())
    return op, wanted, _dtype_name(x.dtype), tuple(x.shape), _context(x), key, thresholds


def _choose(op, x, wanted, options):
    if wanted != "auto":
        blocker = REGISTRY[wanted].blocker(op, x, options)
        if blocker:
            raise ValueError(f"implementation={wanted!r} cannot compute {op} here: {blocker}. "
                             f"Use implementation='auto' to fall back to the portable path.")
        return Choice(wanted, "requested")
    reasons = []
    for impl in REGISTRY.values():
        blocker = impl.blocker(op, x, options)
        if blocker is None:
            blocker = _size_blocker(impl, op, x)
            if blocker is None:
                return Choice(impl.name, functools.partial(_chosen_because, impl, op, _shape(x)))
        reasons.append(blocker)
    return Choice("portable", lambda: "; ".join(reasons) or "no other implementation")


def _size_blocker(impl, op, x):
    """Why "auto" does not take ``impl`` at this size (its measured thresholds), or None."""
    size, threshold = _elements(x), impl.threshold(op)
    if threshold is None and op not in _MEASURED_OPS:
        return (f"{impl.name} was not measured faster than the portable path for {op} on "
                f"{_backend.BACKEND}: it runs only when requested")
    if threshold is None:
        return f"{impl.name} was measured slower than the portable path on {_backend.BACKEND}"
    if size is not None and size < threshold:
        return f"{size} logits is below the measured threshold of {threshold} for {impl.name}"
    limit = (impl.max_elements or {}).get(_backend.BACKEND)
    if limit is not None and (size is None or size >= limit):
        count = "an unknown number of" if size is None else size
        return f"{count} logits is not below {limit}, where {impl.name} stops being the fastest"
    return None


def _chosen_because(impl, op, shape):
    device = next(iter(impl.devices))
    if impl.name == "native":
        return (f"{shape} on {device}: {NATIVE_OPS[_backend.BACKEND][op]} computes these options exactly and is "
                f"the fastest below {impl.max_elements[_backend.BACKEND]} logits")
    threshold = impl.threshold(op)
    when = f"from {threshold} logits" if threshold else f"at every size measured on {_backend.BACKEND}"
    return f"{shape} float32 on {device}; {impl.name} is faster {when}"


def _shape(x):
    return "x".join("?" if d is None else str(d) for d in x.shape)


def checks_labels(choice):
    """Whether the chosen implementation finds out-of-range integer labels itself (PyTorch's eager native op raises
    on them), so that the eager host-side check of every call (``ops._check_label_range``) can be skipped."""
    return choice.implementation == "native" and _backend.BACKEND == "torch"


def run(choice, op, logits, labels, options, exact=None, check_labels=None):
    """Compute ``op`` with the chosen implementation; returns the per-example loss (leading shape).

    ``exact()`` computes the same loss on the portable path: the native op falls back to it where its own formula
    would give a NaN that this package's does not (see ``bridges/torch_native.py``). ``check_labels()`` raises the
    package's error for out-of-range integer labels, for an implementation that :func:`checks_labels` itself."""
    if choice.implementation == "native":
        return _bridge("native").run(op, logits, labels, options, exact, check_labels)
    num_classes = int(logits.shape[-1])
    cuda = choice.implementation == "numba_cuda"
    pair = (_kernel_ops.cuda_pair if cuda else _kernel_ops.cpu_pair)(op, num_classes, options)
    # Flatten to [N, C] / [N] or [N, width]; the common 2-D case skips the reshapes (each keras.ops call costs
    # microseconds of Python, which is most of a small batch's time on PyTorch).
    flat = len(logits.shape) == 2
    leading = None if flat else keras.ops.shape(logits)[:-1]
    z = logits if flat else keras.ops.reshape(logits, (-1, num_classes))
    if pair.label_dtype == "int32":
        y = _as_dtype(labels, "int32")
        y = y if flat and len(y.shape) == 1 else keras.ops.reshape(y, (-1,))
    else:
        width = pair.label_width or num_classes
        y = _as_dtype(labels, "float32")
        y = y if flat and tuple(y.shape) == (logits.shape[0], width) else keras.ops.reshape(y, (-1, width))
    loss = _bridge(choice.implementation).run(pair, z, y)
    return loss if flat else keras.ops.reshape(loss, leading)


def _as_dtype(x, dtype):
    return x if keras.backend.standardize_dtype(x.dtype) == dtype else keras.ops.cast(x, dtype)


_BRIDGE_MODULES = {
    ("native", "torch"): "torch_native",
    ("native", "tensorflow"): "tf_native",
    ("numba_cpu", "torch"): "torch_bridge",
    ("numba_cpu", "tensorflow"): "tf_bridge",
    ("numba_cpu", "jax"): "jax_bridge",
    ("numba_cuda", "torch"): "torch_cuda_bridge",
    ("numba_cuda", "jax"): "jax_cuda_bridge",
}


@functools.lru_cache(maxsize=None)
def _bridge(implementation):
    import importlib

    return importlib.import_module(f".bridges.{_BRIDGE_MODULES[implementation, _backend.BACKEND]}", __package__)


def explain(loss, y_true, y_pred):
    """Which implementation ``loss`` (a Loss object) would use on these inputs, and why.

    Example:
        >>> choice = keras_stable_heads.explain(StableSparseSoftmaxCE(), labels, logits)
        >>> print(choice)   # numba_cpu: 4096x32000 float32 on cpu; numba_cpu is faster at every size measured on torch
    """
    from .numerics import upcast

    op = getattr(loss, "_kernel_op", None)
    if op is None:
        return Choice("portable", f"{type(loss).__name__} has only the portable implementation")
    x = upcast(y_pred)
    axis = getattr(loss, "axis", -1)
    if axis not in (-1, len(x.shape) - 1):
        x = keras.ops.moveaxis(x, axis, -1)
    options = {key: getattr(loss, key) for key in getattr(loss, "_options", ()) if key not in ("axis", "implementation")}
    return choose(op, x, getattr(loss, "implementation", None), options)

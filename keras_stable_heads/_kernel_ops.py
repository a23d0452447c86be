"""Host side of the kernel paths: turn an op's options into one forward/backward pair of kernel calls.

A pair closes over the kernel arguments and is handed to a backend bridge, which owns the tensors and allocates
every buffer. Pairs compute on 2-D logits ``[N, C]`` (for the regression NLLs, parameters ``[N, 2D]`` with
targets ``[N, D]``) and write a per-row loss plus saved per-row float32 values ``[N, saved_width]`` that the
backward reads (the log-sum-exp for softmax ops; unused by the elementwise ops).

- :func:`cpu_pair` (Numba CPU, NumPy arrays): ``forward(logits, labels, loss_out, saved_out)`` and
  ``backward(logits, labels, saved, dloss, grad_out)``.
- :func:`cuda_pair` (Numba CUDA, device arrays): the same with a trailing ``stream`` argument.
"""

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelPair:
    forward: object
    backward: object
    label_dtype: str  # "int32" (class ids [N]) or "float32" (labels [N, label_width])
    saved_width: int = 1
    label_width: int = None  # columns of float32 labels; None: as many as the logits


@dataclasses.dataclass(frozen=True)
class _Spec:
    kernels: tuple  # (forward, backward) names, the same in the CPU package and the CUDA module
    cuda_module: str
    label_dtype: str = "float32"
    cpu_saved: int = 1  # float32 values per row that the CPU forward saves; 0: its kernels take no saved buffer
    half_labels: bool = False  # labels have half the logits' columns (location-scale parameters)


_SPECS = {
    "sparse_softmax_ce": _Spec(("softmax_ce_sparse_fwd", "softmax_ce_sparse_bwd"), "cuda_softmax_ce", "int32"),
    "softmax_ce": _Spec(("softmax_ce_dense_fwd", "softmax_ce_dense_bwd"), "cuda_softmax_ce"),
    "sigmoid_ce": _Spec(("sigmoid_ce_fwd", "sigmoid_ce_bwd"), "cuda_sigmoid_ce", cpu_saved=0),
    "sigmoid_focal_ce": _Spec(("sigmoid_focal_fwd", "sigmoid_focal_bwd"), "cuda_sigmoid_ce", cpu_saved=0),
    "softmax_focal_ce": _Spec(("softmax_focal_fwd", "softmax_focal_bwd"), "cuda_softmax_focal", cpu_saved=3),
    "gaussian_nll": _Spec(("gaussian_nll_fwd", "gaussian_nll_bwd"), "cuda_nll", cpu_saved=0, half_labels=True),
    "laplace_nll": _Spec(("laplace_nll_fwd", "laplace_nll_bwd"), "cuda_nll", cpu_saved=0, half_labels=True),
}

OPS = tuple(_SPECS)
CUDA_MODULES = tuple(sorted({spec.cuda_module for spec in _SPECS.values()}))


def _host_per_class(values, size):
    if values is None:
        return np.ones(size, np.float32)
    return np.broadcast_to(np.asarray(values, np.float32), (size,)).copy()


@functools.lru_cache(maxsize=64)
def _device_per_class(values, size):
    """Per-class weights copied to the GPU once per distinct value (no host-to-device copy per call)."""
    from numba import cuda

    return cuda.to_device(_host_per_class(values, size))


def kernel_args(op, num_classes, options, per_class):
    """The kernels' trailing arguments for ``op`` with ``options``, and the labels' dtype."""
    if op in ("gaussian_nll", "laplace_nll"):  # `full` adds its constant in the op, for every implementation
        return (), "float32"
    if op in ("sigmoid_focal_ce", "softmax_focal_ce"):
        alpha = options.get("alpha")
        gamma, eps = float(options.get("gamma", 2.0)), float(options.get("label_smoothing", 0.0))
        if op == "softmax_focal_ce":  # alpha scales the row; None is 1
            return (gamma, 1.0 if alpha is None else float(alpha), eps), "float32"
        return (gamma, 0.0 if alpha is None else float(alpha), alpha is not None, eps), "float32"
    if op == "sigmoid_ce":
        missing = options.get("missing_label")
        args = (per_class(options.get("pos_weight"), num_classes), float(options.get("label_smoothing", 0.0)),
                0.0 if missing is None else float(missing), missing is not None,
                options.get("label_reduction", "mean") == "mean")
        return args, "float32"
    args = (per_class(options.get("class_weight"), num_classes), float(options.get("label_smoothing", 0.0)),
            float(options.get("z_loss", 0.0)), float(options.get("logit_softcap") or 0.0))
    if op == "sparse_softmax_ce":
        ignore = options.get("ignore_class")
        return args + (0 if ignore is None else int(ignore), ignore is not None), "int32"
    return args, "float32"


def _label_width(spec, num_classes):
    return num_classes // 2 if spec.half_labels else num_classes


def _frozen(value):
    """A hashable stand-in for an option's value (per-class weights as a tuple), or raise TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return tuple(np.ravel(np.asarray(value, np.float32)).tolist())


def options_key(options):
    """A hashable key for an op's options (per-class weights as tuples); TypeError or ValueError for a traced one."""
    return tuple(sorted((name, _frozen(v)) for name, v in options.items()))


def cpu_pair(op, num_classes, options):
    """The Numba CPU pair for ``op`` with ``options``: built once per distinct (op, classes, options)."""
    try:
        key = (op, int(num_classes), options_key(options))
    except (TypeError, ValueError):  # a traced per-class weight: no key, build it every call
        return _cpu_pair(op, num_classes, options)
    return _cached_cpu_pair(key)


@functools.lru_cache(maxsize=256)
def _cached_cpu_pair(key):
    op, num_classes, options = key
    return _cpu_pair(op, num_classes, dict(options))


def _serial_when_small(kernel):
    """``kernel`` run on the calling thread alone when its logits are small (kernels._config.SERIAL_MAX_ELEMENTS)."""
    import numba

    from .kernels._config import SERIAL_MAX_ELEMENTS

    def call(z, *args):
        if z.size >= SERIAL_MAX_ELEMENTS:
            return kernel(z, *args)
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return kernel(z, *args)
        finally:
            numba.set_num_threads(threads)

    return call


def _cpu_pair(op, num_classes, options):
    from . import kernels

    spec = _SPECS[op]
    args, label_dtype = kernel_args(op, num_classes, options, _host_per_class)
    fwd, bwd = (_serial_when_small(getattr(kernels, name)) for name in spec.kernels)
    if spec.cpu_saved == 0:  # the elementwise kernels keep nothing for the backward

        def forward(z, y, loss, saved):
            fwd(z, y, loss, *args)

        def backward(z, y, saved, dloss, grad):
            bwd(z, y, dloss, grad, *args)

    else:  # one saved value per row is a 1-D [N] array to the kernels, more a 2-D [N, width] one
        shape = (lambda s: s.reshape(-1)) if spec.cpu_saved == 1 else (lambda s: s)

        def forward(z, y, loss, saved):
            fwd(z, y, loss, shape(saved), *args)

        def backward(z, y, saved, dloss, grad):
            bwd(z, y, shape(saved), dloss, grad, *args)

    return KernelPair(forward, backward, label_dtype, max(spec.cpu_saved, 1), _label_width(spec, num_classes))


def cuda_pair(op, num_classes, options, to_device=None, modules=None):
    """The CUDA pair. Tests override how per-class weights reach the device (``to_device``) and which kernel
    modules run (``modules``: a mapping from a name in ``CUDA_MODULES`` to that module, e.g. loaded under the
    CUDA simulator)."""
    spec = _SPECS[op]
    if modules is None:
        import importlib

        module = importlib.import_module(f".kernels.{spec.cuda_module}", __package__)
    else:
        module = modules[spec.cuda_module]

    if to_device is None:
        per_class = lambda values, size: _device_per_class(None if values is None else tuple(np.ravel(values)), size)  # noqa: E731
    else:
        per_class = lambda values, size: to_device(_host_per_class(values, size))  # noqa: E731
    args, label_dtype = kernel_args(op, num_classes, options, per_class)
    fwd, bwd = (getattr(module, name) for name in spec.kernels)
    return KernelPair(
        forward=lambda z, y, loss, saved, stream: fwd(z, y, loss, saved, *args, stream=stream),
        backward=lambda z, y, saved, dloss, grad, stream: bwd(z, y, saved, dloss, grad, *args, stream=stream),
        label_dtype=label_dtype,
        saved_width=module.SAVED_WIDTH,
        label_width=_label_width(spec, num_classes),
    )

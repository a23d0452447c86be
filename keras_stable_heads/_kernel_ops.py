"""Host side of the kernel paths: turn an op's options into one forward/backward pair of kernel calls.

A pair closes over the kernel arguments and is handed to a backend bridge, which owns the tensors and allocates
every buffer. Pairs compute on 2-D logits ``[N, C]`` and write a per-row loss plus saved per-row float32 values
(the log-sum-exp for softmax ops) that the backward reads.

- :func:`cpu_pair` (Numba CPU, NumPy arrays): ``forward(logits, labels, loss_out, saved_out)`` and
  ``backward(logits, labels, saved, dloss, grad_out)``; ``saved`` is float32 ``[N]``.
- :func:`cuda_pair` (Numba CUDA, device arrays): the same with a trailing ``stream`` argument; ``saved`` is
  float32 ``[N, saved_width]``.
"""

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelPair:
    forward: object
    backward: object
    label_dtype: str  # "int32" (class ids [N]) or "float32" (labels [N, C])
    saved_width: int = 1


OPS = ("sparse_softmax_ce", "softmax_ce", "sigmoid_ce")


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


_KERNEL_NAMES = {
    "sparse_softmax_ce": ("softmax_ce_sparse_fwd", "softmax_ce_sparse_bwd"),
    "softmax_ce": ("softmax_ce_dense_fwd", "softmax_ce_dense_bwd"),
    "sigmoid_ce": ("sigmoid_ce_fwd", "sigmoid_ce_bwd"),
}


def cpu_pair(op, num_classes, options):
    from . import kernels

    args, label_dtype = kernel_args(op, num_classes, options, _host_per_class)
    fwd, bwd = (getattr(kernels, name) for name in _KERNEL_NAMES[op])
    if op == "sigmoid_ce":  # the CPU sigmoid kernels keep nothing for the backward

        def forward(z, y, loss, saved):
            fwd(z, y, loss, *args)

        def backward(z, y, saved, dloss, grad):
            bwd(z, y, dloss, grad, *args)

    else:

        def forward(z, y, loss, saved):
            fwd(z, y, loss, saved, *args)

        def backward(z, y, saved, dloss, grad):
            bwd(z, y, saved, dloss, grad, *args)

    return KernelPair(forward, backward, label_dtype)


def cuda_pair(op, num_classes, options, to_device=None, modules=None):
    """The CUDA pair. Tests override how per-class weights reach the device (``to_device``) and which kernel
    modules run (``modules=(softmax, sigmoid)``, e.g. loaded under the CUDA simulator)."""
    if modules is None:
        from .kernels import cuda_sigmoid_ce
        from .kernels import cuda_softmax_ce
    else:
        cuda_softmax_ce, cuda_sigmoid_ce = modules

    if to_device is None:
        per_class = lambda values, size: _device_per_class(None if values is None else tuple(np.ravel(values)), size)  # noqa: E731
    else:
        per_class = lambda values, size: to_device(_host_per_class(values, size))  # noqa: E731
    args, label_dtype = kernel_args(op, num_classes, options, per_class)
    module = cuda_sigmoid_ce if op == "sigmoid_ce" else cuda_softmax_ce
    fwd, bwd = (getattr(module, name) for name in _KERNEL_NAMES[op])
    return KernelPair(
        forward=lambda z, y, loss, saved, stream: fwd(z, y, loss, saved, *args, stream=stream),
        backward=lambda z, y, saved, dloss, grad, stream: bwd(z, y, saved, dloss, grad, *args, stream=stream),
        label_dtype=label_dtype,
        saved_width=module.SAVED_WIDTH,
    )

"""Host side of the kernel path: turn an op's options into one forward/backward pair of kernel calls.

NumPy only (the kernels' own contract): a :class:`KernelPair` closes over the kernel arguments and is handed to a
backend bridge, which owns the tensors and allocates every buffer. Each pair computes on 2-D float32 logits
``[N, C]`` and writes a per-row loss plus one saved per-row float32 value (the log-sum-exp for softmax ops).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelPair:
    """``forward(logits, labels, loss_out, saved_out)`` and ``backward(logits, labels, saved, dloss, grad_out)``."""

    forward: object
    backward: object
    label_dtype: str  # "int32" (class ids [N]) or "float32" (labels [N, C])


def _per_class(values, size):
    if values is None:
        return np.ones(size, np.float32)
    return np.broadcast_to(np.asarray(values, np.float32), (size,)).copy()


def _softmax(kernel_fwd, kernel_bwd, label_dtype, num_classes, options, extra=()):
    args = (
        _per_class(options.get("class_weight"), num_classes),
        float(options.get("label_smoothing", 0.0)),
        float(options.get("z_loss", 0.0)),
        float(options.get("logit_softcap") or 0.0),
        *extra,
    )
    return KernelPair(
        forward=lambda z, y, loss, saved: kernel_fwd(z, y, loss, saved, *args),
        backward=lambda z, y, saved, dloss, grad: kernel_bwd(z, y, saved, dloss, grad, *args),
        label_dtype=label_dtype,
    )


def sparse_softmax_ce(num_classes, options):
    from . import kernels

    ignore = options.get("ignore_class")
    extra = (0 if ignore is None else int(ignore), ignore is not None)
    return _softmax(kernels.softmax_ce_sparse_fwd, kernels.softmax_ce_sparse_bwd, "int32", num_classes, options, extra)


def softmax_ce(num_classes, options):
    from . import kernels

    return _softmax(kernels.softmax_ce_dense_fwd, kernels.softmax_ce_dense_bwd, "float32", num_classes, options)


def sigmoid_ce(num_labels, options):
    from . import kernels

    missing = options.get("missing_label")
    args = (
        _per_class(options.get("pos_weight"), num_labels),
        float(options.get("label_smoothing", 0.0)),
        0.0 if missing is None else float(missing),
        missing is not None,
        options.get("label_reduction", "mean") == "mean",
    )

    def forward(z, y, loss, saved):
        kernels.sigmoid_ce_fwd(z, y, loss, *args)

    def backward(z, y, saved, dloss, grad):
        kernels.sigmoid_ce_bwd(z, y, dloss, grad, *args)

    return KernelPair(forward=forward, backward=backward, label_dtype="float32")


BUILDERS = {
    "sparse_softmax_ce": sparse_softmax_ce,
    "softmax_ce": softmax_ce,
    "sigmoid_ce": sigmoid_ce,
}

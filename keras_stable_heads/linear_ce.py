"""Softmax cross-entropy fused with the output projection: the (tokens x V) logits are never materialised.

For hidden states ``h`` (``(..., D)``), a kernel ``W`` (``(D, V)`` like ``Dense``'s, or ``(V, D)`` like a tied
embedding matrix with ``transpose_kernel=True``) and an optional bias ``b``::

    loss_n = softmax_cross_entropy_with_integer_labels(h_n @ W + b, y_n, **options)

computed token chunk by token chunk (Liger-Kernel's fused linear cross-entropy, Apple's Cut Cross-Entropy): a
chunk of ``T`` tokens gets its ``(T, V)`` logits from one matmul, and the sparse softmax cross-entropy of
:mod:`keras_stable_heads.ops` (the same code, so the same options, ``-inf``/ignore rules and large-logit
exactness) turns them into the chunk's losses and ``dloss/dlogits``. Two paths:

- **General** (:func:`linear_softmax_cross_entropy_with_integer_labels`, a loss per token, any upstream
  gradient): the forward keeps nothing but its inputs; the backward recomputes each chunk's logits and forms
  ``dh_chunk = dlogits @ W^T``, ``dW += h_chunk^T @ dlogits``, ``db += sum(dlogits)``. Four matmuls.
- **Reduced** (:func:`weighted_sum`, what :class:`~keras_stable_heads.FusedSparseSoftmaxCE` calls): the op
  itself reduces ``sum_n w_n loss_n`` to one scalar, so its upstream gradient is one scalar ``g`` and the
  gradients are ``g`` times ``d(sum)/d(h, W, b)``, which the forward computes while each chunk's logits are
  live (three matmuls); the backward only scales them. The forward pays for them only when a gradient is taken:
  on JAX the primal of a ``custom_vjp`` runs without them (``jit``/``evaluate``); on TensorFlow they are
  computed when a gradient tape is recording (``fit``, not ``evaluate``), and otherwise recomputed in the
  backward if a gradient is asked for after all; on torch when an input requires a gradient.

Memory: at most one chunk of float32 logits (and what the softmax needs of it) at a time, plus a float32
accumulator the size of the kernel for its gradient. Loops are ``lax.scan`` on JAX, ``tf.while_loop`` with
``parallel_iterations=1`` on TensorFlow (XLA keeps one chunk alive), a Python loop on torch. On torch and
TensorFlow (outside XLA) each chunk's softmax runs in the sparse op's Numba CPU kernels (one pass for the loss,
one for ``dloss/dlogits``, into reused buffers); on JAX in ``keras.ops``, fused by XLA.

Precision: the matmuls take their operands in the narrower of the hidden states' and the kernel's dtypes (a
float32 kernel variable is cast once to bfloat16 for bfloat16 hidden states, as ``Dense`` does under
``mixed_bfloat16``; never to float32 for low-precision hidden states) and return float32 where the backend can
(JAX ``preferred_element_type``, TensorFlow under XLA; elsewhere a low-precision matmul's output is rounded to
its dtype, as ``Dense``'s logits are); the softmax is float32 (float64 for float64), the kernel's gradient is
accumulated over chunks in float32 and returned in the kernel's own dtype.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from . import _backend
from . import _kernel_ops
from . import _validation as check
from . import dispatch
from .numerics import compute_dtype
from .numerics import safe_mul
from .ops import _check_label_range
from .ops import _matching_labels
from .ops import _sparse_softmax_ce_forward

__all__ = ["linear_softmax_cross_entropy_with_integer_labels", "weighted_sum", "logits"]

# chunk_size=None takes as many tokens per chunk as fit CHUNK_BYTES[backend] of float32 logits (at least
# MIN_CHUNK). A chunk holds two (T, V) float32 buffers (logits, dlogits), and the kernel's gradient accumulator is
# read and written once per chunk; small chunks also make small-M matmuls. Measured on the 2-core box, reduced op
# forward+backward at N=4096, D=512, V=131072, float32, min of 3 (timings vary by up to 50% run to run there):
# torch T=256/512/1024: 18.5/10.7/16.3 s; TensorFlow 22.1/16.5/16.9 s (peak RSS grows with T: 3.2/4.0/6.0 GB);
# JAX 26.7/26.7/14.1 s, with XLA temporaries of 384/513/1026 MiB (the unfused step: 4096 MiB). JAX gets the
# smaller budget so that its temporaries stay under a tenth of the unfused step's. Re-measured on the keras-hub
# Gemma fit step (D=256, V=131072, Adam; benchmarks/results/hub_fit_jax_chunk256.jsonl against runs T073624 and
# T073857 of hub_fit_records.jsonl): 256 MiB for JAX took 2.71 s / 5.19 s at 4x512 / 8x512 tokens against
# 2.83 s / 5.74 s, for +250 MiB peak RSS and XLA temporaries of 591 / 690 MiB against 95 / 214 MiB: 128 MiB kept.
CHUNK_BYTES = {"jax": 128 << 20, "tensorflow": 256 << 20, "torch": 256 << 20}
# Where each chunk's softmax runs in the Numba kernels on TensorFlow, a smaller budget: the kernels' reused
# gradient buffers are chunk-sized. Quiet 2-core Xeon, Dense-sized head step (FusedSoftmaxHead, fit's graph, N=4096,
# D=512, V=131072, Adam), min of 2: 256 MiB 7.06 s / 4104 MiB peak, 128 MiB 7.20 s / 3668 MiB, 64 MiB 7.94 s /
# 3157 MiB (XLA chunks, 256 MiB: 10.37 s / 2889 MiB; Dense + Keras's loss: 6.58 s / 5977 MiB).
KERNEL_CHUNK_BYTES = {"tensorflow": 64 << 20}
MIN_CHUNK = 16

# What "auto" runs, measured with the reduced op at N=4096, D=512, V=131072, T=512 (forward+backward):
# - torch: each chunk's softmax in the Numba CPU kernels (22.8 s at T=128 against 45 s for keras.ops, which
#   allocates and page-faults several (T, V) temporaries per chunk);
# - TensorFlow: the kernels through numpy_function, eagerly and in a graph (fit). On the quiet 2-core Xeon (run of
#   2026-12-07, the head's fit step above) the graph's XLA-compiled keras.ops chunks took 10.4 s against 7.9 s for
#   the kernels at 64 MiB chunks (+0.27 GB peak): TensorFlow's CPU matmuls outside XLA are oneDNN's, faster than
#   XLA's. (A loaded-box measurement had favoured XLA: 18.4 s / +0.7 GB against 16.5 s / +2.4 GB at 256 MiB.)
#   Inside an XLA function or a tf.distribute strategy, where the kernels cannot run, the XLA/keras.ops path;
# - JAX: the keras.ops path, fused by XLA (no kernel path).


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call: shapes, dtypes and options."""

    num_classes: int
    chunk: int  # tokens per chunk
    transpose_kernel: bool
    has_bias: bool
    ignore_class: int
    eps: float
    z_loss: float
    cap: float
    operand_dtype: str  # the matmuls' operands
    compute_dtype: str  # logits, softmax and the kernel's gradient accumulator
    kernels: bool  # each chunk's softmax cross-entropy by the Numba CPU kernels (else keras.ops)
    xla: bool  # TensorFlow: the op's loops run as an XLA cluster inside a graph that is not compiled
    hidden_dtype: str
    kernel_dtype: str
    bias_dtype: str
    kernel_grad: bool = True  # False: a frozen kernel (e.g. LoRA), whose gradient is neither computed nor returned


def _float_tensor(name, x):
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"`{name}` must be a float tensor (float16, bfloat16, float32 or float64), got {dtype}.")
    return x, dtype


def _operand_dtype(hidden_dtype, kernel_dtype):
    """The narrower of the two dtypes: a float32 kernel meets bfloat16 hidden states as bfloat16 (never the reverse)."""
    if {hidden_dtype, kernel_dtype} == {"float16", "bfloat16"}:
        raise TypeError("`hidden` and `kernel` are float16 and bfloat16: cast one of them so that both use one "
                        "low-precision dtype.")
    size = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
    return hidden_dtype if size[hidden_dtype] <= size[kernel_dtype] else kernel_dtype


def _static(dim):
    return None if dim is None else int(dim)


def _check_shapes(hidden, kernel, bias, transpose_kernel):
    """``(D, V)`` from ``hidden (..., D)``, ``kernel (D, V)`` (or ``(V, D)`` transposed) and ``bias (V,)``."""
    if len(hidden.shape) < 1 or hidden.shape[-1] is None:
        raise ValueError(f"`hidden` must have shape (..., D) with a static D (the hidden size), got {hidden.shape}.")
    dim = int(hidden.shape[-1])
    if len(kernel.shape) != 2 or None in tuple(kernel.shape):
        raise ValueError(f"`kernel` must be a 2-D matrix with static shape (D, V), or (V, D) with "
                         f"transpose_kernel=True; got shape {kernel.shape}.")
    rows, cols = (int(d) for d in kernel.shape)
    kernel_dim, num_classes = (cols, rows) if transpose_kernel else (rows, cols)
    if kernel_dim != dim:
        if (rows if transpose_kernel else cols) == dim:
            layout = "(V, D) like a tied embedding matrix" if not transpose_kernel else "(D, V) like Dense's kernel"
            fix = "True" if not transpose_kernel else "False"
            raise ValueError(f"`kernel` of shape {tuple(kernel.shape)} is {layout} for hidden states of size D={dim}: "
                             f"pass transpose_kernel={fix}.")
        expected = f"(V, {dim})" if transpose_kernel else f"({dim}, V)"
        raise ValueError(f"`kernel` of shape {tuple(kernel.shape)} does not match `hidden` of shape {hidden.shape}: "
                         f"expected {expected} (transpose_kernel={transpose_kernel}).")
    if bias is not None and tuple(_static(d) for d in bias.shape) != (num_classes,):
        raise ValueError(f"`bias` must have shape ({num_classes},) (one value per class), got {bias.shape}.")
    return dim, num_classes


def _token_labels(labels, hidden):
    """Integer labels of the hidden states' leading shape (``(..., 1)`` accepted), as int32."""
    labels = ops.convert_to_tensor(labels)
    leading = tuple(_static(d) for d in hidden.shape[:-1])
    if len(labels.shape) == len(leading) + 1 and _static(labels.shape[-1]) == 1:
        labels = ops.squeeze(labels, -1)
    labels = _matching_labels(labels, hidden, f"one class id per token, shape {leading} (or {leading + (1,)}).",
                              want=leading, names=("labels", "hidden"))
    return ops.cast(labels, "int32")


def check_chunk_size(chunk_size):
    """``chunk_size`` if it is None or a positive integer, else a ``ValueError``."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer (tokens per chunk) or None, got {chunk_size!r}.")
    return chunk_size


def _chunk_tokens(num_tokens, num_classes, chunk_size, kernels=False):
    """Tokens per chunk: ``chunk_size`` or the CHUNK_BYTES budget (KERNEL_CHUNK_BYTES where the chunks' softmax
    runs in the kernels), evened out so the last chunk pads little."""
    if check_chunk_size(chunk_size) is None:
        budget = CHUNK_BYTES.get(_backend.BACKEND, 128 << 20)
        if kernels:
            budget = KERNEL_CHUNK_BYTES.get(_backend.BACKEND, budget)
        chunk_size = max(MIN_CHUNK, budget // (4 * num_classes))
    if num_tokens is None:
        return chunk_size
    chunks = max(1, math.ceil(num_tokens / chunk_size))
    return max(1, math.ceil(num_tokens / chunks))


def _prepare(hidden, kernel, labels, bias, transpose_kernel, ignore_class, label_smoothing, z_loss, logit_softcap,
             chunk_size, implementation, kernel_grad=True):
    ignore_class = check.integer_or_none("ignore_class", ignore_class)
    eps = check.fraction("label_smoothing", label_smoothing)
    z_loss = check.non_negative("z_loss", z_loss)
    cap = check.positive_or_none("logit_softcap", logit_softcap)
    if not isinstance(transpose_kernel, bool):
        raise TypeError(f"`transpose_kernel` must be True or False, got {transpose_kernel!r}.")
    if not isinstance(kernel_grad, bool):
        raise TypeError(f"`kernel_grad` must be True or False, got {kernel_grad!r}.")
    hidden, hidden_dtype = _float_tensor("hidden", hidden)
    kernel, kernel_dtype = _float_tensor("kernel", kernel)
    bias_dtype = None
    if bias is not None:
        bias, bias_dtype = _float_tensor("bias", bias)
    _, num_classes = _check_shapes(hidden, kernel, bias, transpose_kernel)
    labels = _token_labels(labels, hidden)
    _check_label_range(labels, num_classes, ignore_class)
    leading = [_static(d) for d in hidden.shape[:-1]]
    num_tokens = None if None in leading else math.prod(leading)
    operand = _operand_dtype(hidden_dtype, kernel_dtype)
    kernels = _use_kernels(implementation, hidden, kernel)
    spec = _Spec(
        num_classes=num_classes, chunk=_chunk_tokens(num_tokens, num_classes, chunk_size, kernels),
        transpose_kernel=transpose_kernel, has_bias=bias is not None, ignore_class=ignore_class, eps=eps,
        z_loss=z_loss, cap=cap, operand_dtype=operand, compute_dtype=compute_dtype(operand),
        kernels=kernels, xla=not kernels and _glue.xla_cluster(),
        hidden_dtype=hidden_dtype, kernel_dtype=kernel_dtype, bias_dtype=bias_dtype, kernel_grad=kernel_grad,
    )
    return spec, hidden, kernel, bias, labels


def _use_kernels(implementation, hidden, kernel):
    """Whether each chunk's cross-entropy runs in the Numba CPU kernels (``"numba_cpu"``, and ``"auto"`` where the
    backend glue prefers them) or in ``keras.ops`` (``"portable"``). A forced choice that cannot run raises."""
    wanted = dispatch.requested(implementation)
    if wanted == "portable":
        return False
    if wanted in ("numba_cuda", "native"):
        raise ValueError(f"implementation={wanted!r} cannot compute the fused linear cross-entropy: it has no "
                         f"{'CUDA kernel' if wanted == 'numba_cuda' else 'native'} path. Use 'auto', 'portable' or "
                         "'numba_cpu'.")
    if _glue.kernel_ce is None:
        blocker = f"the fused linear cross-entropy has no kernel path on {_backend.BACKEND}"
    else:  # the kernels' own conditions (float32, CPU, not in XLA or torch.compile...) on both matmul operands
        numba_cpu = dispatch.REGISTRY["numba_cpu"]
        blocker = numba_cpu.blocker("sparse_softmax_ce", hidden) or numba_cpu.blocker("sparse_softmax_ce", kernel)
    if wanted == "numba_cpu" and blocker:
        raise ValueError(f"implementation='numba_cpu' cannot compute the fused linear cross-entropy here: {blocker}. "
                         "Use 'auto' to fall back to the portable path.")
    return blocker is None and (wanted == "numba_cpu" or _glue.auto_kernels())


def _chunked(spec, hidden, *per_token):
    """``hidden (..., D)`` -> ``(n, T, D)`` and each per-token tensor ``(...)`` -> ``(n, T)``, zero-padded."""
    dim = hidden.shape[-1]
    flat = ops.reshape(hidden, (-1, dim))
    num_tokens = ops.shape(flat)[0]
    chunks = (num_tokens + spec.chunk - 1) // spec.chunk
    pad = chunks * spec.chunk - num_tokens
    # padded tokens have weight/upstream 0 and label 0, so they add nothing (and their rows are sliced off)
    out = [ops.reshape(ops.pad(flat, [[0, pad], [0, 0]]), (chunks, spec.chunk, dim))]
    for x in per_token:
        out.append(ops.reshape(ops.pad(ops.reshape(x, (-1,)), [[0, pad]]), (chunks, spec.chunk)))
    return out


def _unchunked(values, like):
    """``(n, T)`` per-token values -> the shape of ``like`` (the labels), padding dropped."""
    flat = ops.reshape(values, (-1,))
    return ops.reshape(flat[: ops.shape(ops.reshape(like, (-1,)))[0]], ops.shape(like))


# ----------------------------------------------------------------------------------------------------------------
# One chunk: logits, loss and dloss/dlogits (the sparse op's own code), gradients of the matmul
# ----------------------------------------------------------------------------------------------------------------


def _chunk_logits(spec, h, kernel, bias):
    """``(T, D) @ W (+ b)`` -> ``(T, V)`` in the compute dtype."""
    return _glue.logits(h, kernel, bias, transpose_b=spec.transpose_kernel, out_dtype=spec.compute_dtype)


def _chunk_ce(spec):
    """``ce(z, labels, upstream=None) -> (loss (T,), dloss/dz times upstream, or None)`` for one chunk's logits:
    the sparse softmax cross-entropy of :mod:`keras_stable_heads.ops` (the same code), or its Numba CPU kernels."""
    if spec.kernels:
        options = dict(ignore_class=spec.ignore_class, label_smoothing=spec.eps, class_weight=None,
                       z_loss=spec.z_loss, logit_softcap=spec.cap)
        return _glue.kernel_ce(_kernel_ops.cpu_pair("sparse_softmax_ce", spec.num_classes, options))

    def ce(z, labels, upstream=None):
        forward = _sparse_softmax_ce_forward(labels, spec.num_classes, spec.compute_dtype,
                                             ignore_class=spec.ignore_class, eps=spec.eps, w=None, z_loss=spec.z_loss,
                                             cap=spec.cap)
        loss, vjp = forward(z)
        return loss, None if upstream is None else vjp(upstream)

    return ce


def _chunk_backward(spec, h, kernel, dz, acc):
    """``dh`` of the chunk, and the accumulators ``(dkernel[, dbias])`` with the chunk's share added."""
    dz_op = ops.cast(dz, spec.operand_dtype)
    # dh = dz @ W^T: W is (D, V), or (V, D) when transposed
    dh = _glue.dot(dz_op, kernel, transpose_b=not spec.transpose_kernel, out_dtype=spec.compute_dtype)
    if not spec.kernel_grad:  # a frozen kernel: one matmul of three skipped, no (D, V) accumulator
        dk = acc[0]
    elif spec.transpose_kernel:
        dk = _glue.dot_add(acc[0], dz_op, h, transpose_a=True)  # dE += dz^T @ h, (V, D)
    else:
        dk = _glue.dot_add(acc[0], h, dz_op, transpose_a=True)  # dW += h^T @ dz, (D, V)
    db = (acc[1] + ops.sum(dz, axis=0),) if spec.has_bias else ()
    return ops.cast(dh, spec.hidden_dtype), (dk,) + db


def _accumulators(spec, kernel):
    """Zero ``(dkernel[, dbias])`` in the compute dtype (a tuple: loops cannot carry None; a frozen kernel's
    place holds a scalar)."""
    dk = ops.zeros(ops.shape(kernel) if spec.kernel_grad else (), spec.compute_dtype)
    return (dk, ops.zeros((spec.num_classes,), spec.compute_dtype)) if spec.has_bias else (dk,)


def _finish_grads(spec, dh, acc, scale=None):
    """``(dhidden, dkernel or None, dbias or None)`` in the inputs' dtypes, times ``scale`` (the reduced op's
    upstream). A frozen kernel (``kernel_grad=False``) gets None: no gradient, which every backend reads as zero."""
    dk, db = (acc[0] if spec.kernel_grad else None), (acc[1] if spec.has_bias else None)
    if scale is not None:
        dh = ops.cast(dh * ops.cast(scale, dh.dtype), spec.hidden_dtype)
        dk = None if dk is None else dk * scale
        db = None if db is None else db * scale
    dk = None if dk is None else ops.cast(dk, spec.kernel_dtype)
    db = None if db is None else ops.cast(db, spec.bias_dtype)
    return dh, dk, db


def _inputs(spec, args):
    """Unpack ``(hidden, kernel, labels[, bias], *rest)`` and cast the matmul operands (inside the op, so that the
    kernel's gradient is accumulated in float32 and returned in its own dtype, never through a bfloat16 cast)."""
    h3, kernel, l3 = args[:3]
    bias = args[3] if spec.has_bias else None
    rest = args[4:] if spec.has_bias else args[3:]
    h3 = ops.cast(h3, spec.operand_dtype)
    kernel = ops.cast(kernel, spec.operand_dtype)
    bias = None if bias is None else ops.cast(bias, spec.compute_dtype)
    return h3, kernel, l3, bias, rest


def _grads_out(spec, dh, dk, db, *rest):
    """Gradients in the order of the op's arguments (labels get None)."""
    return (dh, dk, None) + ((db,) if spec.has_bias else ()) + rest


# ----------------------------------------------------------------------------------------------------------------
# The general op: a loss per token, backward by recomputation
# ----------------------------------------------------------------------------------------------------------------


def _general_op(spec):
    ce = _chunk_ce(spec)

    def primal(*args):
        h3, kernel, l3, bias, _ = _inputs(spec, args)

        def body(carry, xs):
            h, labels = xs
            loss, _ = ce(_chunk_logits(spec, h, kernel, bias), labels)
            return carry, (loss,)

        _, (loss,) = _glue.scan(body, (), (h3, l3), (spec.compute_dtype,))
        return (loss,)

    def forward(*args):
        return primal(*args), args

    def backward(args, cotangents):
        h3, kernel, l3, bias, _ = _inputs(spec, args)
        (g3,) = cotangents

        def body(acc, xs):
            h, labels, g = xs
            _, dz = ce(_chunk_logits(spec, h, kernel, bias), labels, ops.cast(g, spec.compute_dtype))
            dh, acc = _chunk_backward(spec, h, kernel, dz, acc)
            return acc, (dh,)

        acc, (dh,) = _glue.scan(body, _accumulators(spec, kernel), (h3, l3, g3), (spec.hidden_dtype,))
        return _grads_out(spec, *_finish_grads(spec, dh, acc))

    return _glue.custom_op(primal, forward, backward, spec.xla)


def linear_softmax_cross_entropy_with_integer_labels(
    hidden, kernel, labels, *, bias=None, transpose_kernel=False, ignore_class=None, label_smoothing=0.0, z_loss=0.0,
    logit_softcap=None, chunk_size=None, implementation=None, kernel_grad=True,
):
    """Softmax cross-entropy of ``hidden @ kernel (+ bias)`` against integer labels, without materialising the logits.

    Equals ``softmax_cross_entropy_with_integer_labels(hidden @ kernel + bias, labels, **options)`` (same options,
    ``-inf`` and ``ignore_class`` rules, large-logit exactness), computed ``chunk_size`` tokens at a time: at no
    point does it hold more than one chunk of logits. Stored between forward and backward: the inputs only (the
    backward recomputes each chunk's logits). Gradients flow to ``hidden``, ``kernel`` and ``bias``; labels are
    constants. See the module docstring for precision and the reduced path.

    Args:
        hidden: ``(..., D)`` hidden states (any leading axes: one token per position).
        kernel: ``(D, V)`` like ``Dense``'s kernel, or ``(V, D)`` like an embedding matrix with
            ``transpose_kernel=True``.
        labels: integer class ids of shape ``hidden.shape[:-1]`` (or with a trailing axis of size 1).
        bias: optional ``(V,)`` bias; a ``-inf`` entry masks its class.
        transpose_kernel: the kernel is ``(V, D)`` (a tied embedding matrix).
        ignore_class, label_smoothing, z_loss, logit_softcap: as in
            :func:`~keras_stable_heads.ops.softmax_cross_entropy_with_integer_labels`.
        chunk_size: tokens per chunk; None picks as many as fit ``CHUNK_BYTES`` of float32 logits.
        implementation: how each chunk's softmax cross-entropy runs: ``"portable"`` (``keras.ops``),
            ``"numba_cpu"`` (the fused Numba CPU kernels of the sparse op, float32 CPU tensors on TensorFlow outside
            XLA and on torch), or None/``"auto"``: the kernels on torch and in eager TensorFlow where they can run,
            else the portable path (in a TensorFlow graph, compiled by XLA as one cluster). The matmuls are the
            backend's own either way.
        kernel_grad: False for a frozen kernel (a tied embedding under LoRA, a head that is not trained): its
            gradient is not computed (one matmul of three in the backward, no ``(D, V)`` float32 accumulator) and
            is returned as None, which every backend treats as zero.

    Returns:
        The per-token loss, shape ``hidden.shape[:-1]``, float32 (float64 for float64 inputs).

    Example:
        >>> import keras, numpy as np
        >>> from keras_stable_heads import ops
        >>> h, w = np.ones((2, 3), "float32"), np.zeros((3, 4), "float32")
        >>> loss = ops.linear_softmax_cross_entropy_with_integer_labels(h, w, np.array([0, 3]))
        >>> [round(float(v), 4) for v in keras.ops.convert_to_numpy(loss)]  # log 4: every class has logit 0
        [1.3863, 1.3863]
    """
    spec, hidden, kernel, bias, labels = _prepare(hidden, kernel, labels, bias, transpose_kernel, ignore_class,
                                                  label_smoothing, z_loss, logit_softcap, chunk_size, implementation,
                                                  kernel_grad)
    h3, l3 = _chunked(spec, hidden, labels)
    args = (h3, kernel, l3) + ((bias,) if spec.has_bias else ())
    (loss3,) = _general_op(spec)(*args)
    return _unchunked(loss3, labels)


# ----------------------------------------------------------------------------------------------------------------
# The reduced op: one scalar, gradients computed during the forward
# ----------------------------------------------------------------------------------------------------------------


def _reduced_op(spec, accuracy):
    """``(sum_n w_n loss_n, sum_n w_n [argmax_c z_nc == y_n])``; the second output has no gradient."""
    ce = _chunk_ce(spec)

    def run(args, with_grads):
        h3, kernel, l3, bias, (w3,) = _inputs(spec, args)

        def body(carry, xs):
            h, labels, w = xs
            w = ops.cast(w, spec.compute_dtype)
            z = _chunk_logits(spec, h, kernel, bias)
            loss, dz = ce(z, labels, w if with_grads else None)
            total, correct, acc = carry
            # a weight of 0 (padding, masked tokens) drops the token even where its loss is infinite
            total = total + ops.sum(safe_mul(w, loss))
            if accuracy:
                correct = correct + ops.sum(w * ops.cast(_glue.argmax_is(z, labels), spec.compute_dtype))
            if not with_grads:
                return (total, correct, acc), ()
            dh, acc = _chunk_backward(spec, h, kernel, dz, acc)
            return (total, correct, acc), (dh, loss)

        zero = ops.zeros((), spec.compute_dtype)
        init = (zero, zero, _accumulators(spec, kernel) if with_grads else ())
        ys_dtypes = (spec.hidden_dtype, spec.compute_dtype) if with_grads else ()
        (total, correct, acc), ys = _glue.scan(body, init, (h3, l3, w3), ys_dtypes)
        return (total, correct), (ys, acc)

    def primal(*args):
        return run(args, with_grads=False)[0]

    def forward(*args):
        outputs, ((dh, loss), acc) = run(args, with_grads=True)
        return outputs, (dh, acc, loss)

    def backward(residuals, cotangents):
        dh, acc, loss = residuals
        g = cotangents[0]
        g = ops.cast(g, spec.compute_dtype)
        # d(sum_n w_n loss_n)/dw_n = loss_n (weights are data in Keras, but the gradient is right either way)
        dw = safe_mul(g, loss)
        return _grads_out(spec, *_finish_grads(spec, dh, acc, scale=g), dw)

    return _glue.custom_op(primal, forward, backward, spec.xla)


def weighted_sum(hidden, kernel, labels, weights, *, bias=None, transpose_kernel=False, ignore_class=None,
                 label_smoothing=0.0, z_loss=0.0, logit_softcap=None, chunk_size=None, implementation=None,
                 accuracy=False, kernel_grad=True):
    """``(sum_n weights_n * loss_n, sum_n weights_n * [argmax_c logits_nc == labels_n])`` of the fused linear CE.

    The reduced op behind :class:`~keras_stable_heads.FusedSparseSoftmaxCE`: its output is one scalar, so the
    gradients of ``hidden``, ``kernel`` and ``bias`` are computed during the forward, while each chunk's logits are
    live (three matmuls instead of the general path's four), and the backward only scales them by the scalar
    upstream. ``weights`` (the tokens' shape) carry Keras's sample weights, masks and reduction divisor; a token of
    weight 0 adds nothing, also where its loss is infinite. The second value (float, no gradient) counts weighted
    correct tokens (``accuracy=True``; else 0): the argmax of the raw logits, first index on ties, as
    ``keras.metrics.SparseCategoricalAccuracy``. Other arguments: as
    :func:`linear_softmax_cross_entropy_with_integer_labels`.
    """
    spec, hidden, kernel, bias, labels = _prepare(hidden, kernel, labels, bias, transpose_kernel, ignore_class,
                                                  label_smoothing, z_loss, logit_softcap, chunk_size, implementation,
                                                  kernel_grad)
    weights = ops.convert_to_tensor(weights)
    weights = ops.reshape(ops.cast(weights, spec.compute_dtype), ops.shape(labels))
    h3, l3, w3 = _chunked(spec, hidden, labels, weights)
    args = (h3, kernel, l3) + ((bias,) if spec.has_bias else ()) + (w3,)
    return _reduced_op(spec, bool(accuracy))(*args)


def logits(hidden, kernel, *, bias=None, transpose_kernel=False):
    """``hidden @ kernel (+ bias)`` as float32 (float64 for float64), with the op's operand dtypes: the inference
    path of :class:`~keras_stable_heads.FusedSoftmaxHead` (this one does materialise ``(..., V)``)."""
    hidden, hidden_dtype = _float_tensor("hidden", hidden)
    kernel, kernel_dtype = _float_tensor("kernel", kernel)
    if bias is not None:
        bias, _ = _float_tensor("bias", bias)
    dim, num_classes = _check_shapes(hidden, kernel, bias, transpose_kernel)
    operand = _operand_dtype(hidden_dtype, kernel_dtype)
    flat = ops.cast(ops.reshape(hidden, (-1, dim)), operand)
    z = _glue.dot(flat, ops.cast(kernel, operand), transpose_b=transpose_kernel, out_dtype=compute_dtype(operand))
    if bias is not None:
        z = z + ops.cast(bias, z.dtype)
    return ops.reshape(z, tuple(ops.shape(hidden)[:-1]) + (num_classes,))


# ----------------------------------------------------------------------------------------------------------------
# Backend glue, resolved once at import (as keras_stable_heads._backend): the matmul with float32 output, the
# chunk loop, and the custom gradient whose forward knows whether a gradient will be taken.
#
#   dot(a, b, transpose_a, transpose_b, out_dtype)   a @ b in out_dtype (float32 accumulation for low precision)
#   dot_add(acc, a, b, transpose_a)                  acc + a @ b (in place where the backend allows)
#   logits(h, kernel, bias, transpose_b, out_dtype)  h @ kernel (+ bias), a chunk's logits
#   argmax_is(z, labels)                             argmax(z, -1) == labels (first index on ties), boolean
#   kernel_ce(pair)                                  the chunk's ``ce`` (see _chunk_ce) over the Numba kernels of
#                                                    ``pair`` (_kernel_ops.cpu_pair), or None: no kernel path
#   scan(body, carry, xs, ys_dtypes)                 lax.scan semantics over the leading axis of xs
#   custom_op(primal, forward, backward, xla)        op(*args) -> primal(*args); when differentiated, forward(*args)
#                                                    -> (outputs, residuals), backward(residuals, cotangents) -> grads;
#                                                    xla: each of the three compiled as an XLA cluster (TensorFlow)
#   auto_kernels()                                   whether "auto" takes the kernels (where they can run) here
#   xla_cluster()                                    whether the portable path compiles its loops with XLA here
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Glue:
    dot: object
    dot_add: object
    logits: object
    argmax_is: object
    scan: object
    custom_op: object
    kernel_ce: object
    auto_kernels: object
    xla_cluster: object


def _no():
    return False


def _argmax_is(z, labels):
    return ops.equal(ops.cast(ops.argmax(z, axis=-1), "int32"), labels)


def _logits_by_dot(dot):
    def logits(h, kernel, bias, transpose_b=False, out_dtype=None):
        z = dot(h, kernel, transpose_b=transpose_b, out_dtype=out_dtype)
        return z if bias is None else z + bias

    return logits


def _jax_glue():
    import jax
    from jax import lax

    def dot(a, b, transpose_a=False, transpose_b=False, out_dtype=None):
        dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
        return lax.dot_general(a, b, dims, preferred_element_type=out_dtype)

    def dot_add(acc, a, b, transpose_a=False):
        return acc + dot(a, b, transpose_a=transpose_a, out_dtype=acc.dtype)

    def scan(body, carry, xs, ys_dtypes):
        return lax.scan(body, carry, xs)

    def custom_op(primal, forward, backward, xla=False):
        op = jax.custom_vjp(primal)
        op.defvjp(forward, backward)
        return op

    return _Glue(dot, dot_add, _logits_by_dot(dot), _argmax_is, scan, custom_op, None, _no, _no)


def _tensorflow_glue():
    import tensorflow as tf
    from tensorflow.python.eager import record  # whether a gradient tape is recording (also while tracing)

    def _in_xla():
        try:
            from tensorflow.python.ops import control_flow_util

            return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
        except (ImportError, AttributeError):
            return False

    def dot(a, b, transpose_a=False, transpose_b=False, out_dtype=None):
        if a.dtype == out_dtype or not _in_xla():
            # CPU/GPU TensorFlow has no kernel for a bfloat16 x bfloat16 -> float32 matmul outside XLA
            return tf.cast(tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b), out_dtype)
        return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=out_dtype, adj_x=transpose_a, adj_y=transpose_b)

    def dot_add(acc, a, b, transpose_a=False):
        return acc + dot(a, b, transpose_a=transpose_a, out_dtype=acc.dtype)

    def scan(body, carry, xs, ys_dtypes):
        n = tf.shape(xs[0])[0]
        arrays = [tf.TensorArray(dtype, size=n) for dtype in ys_dtypes]

        def step(i, carry, arrays):
            carry, ys = body(carry, tuple(tf.gather(x, i) for x in xs))
            return i + 1, carry, [a.write(i, y) for a, y in zip(arrays, ys)]

        # one iteration at a time: parallel iterations would keep several chunks of logits alive
        _, carry, arrays = tf.while_loop(lambda i, *_: i < n, step, (tf.constant(0), carry, arrays),
                                         parallel_iterations=1, maximum_iterations=n)
        return carry, tuple(a.stack() for a in arrays)

    def custom_op(primal, forward, backward, xla=False):
        if xla:
            primal, forward, backward = (tf.function(f, jit_compile=True, autograph=False)
                                         for f in (primal, forward, backward))

        def op(*args):
            # variables are read here, where the tape records the read: a tf.custom_gradient function that reads
            # a variable itself must declare it (and raises in eager mode otherwise)
            args = [tf.convert_to_tensor(a.value if isinstance(a, keras.Variable) else a) for a in args]

            @tf.custom_gradient
            def inner(*xs):
                recording = record.could_possibly_record()
                outputs, residuals = forward(*xs) if recording else (primal(*xs), None)

                def grad(*cotangents):
                    saved = residuals if residuals is not None else forward(*xs)[1]
                    cotangents = [tf.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs)]
                    return list(backward(saved, tuple(cotangents)))

                return tuple(outputs), grad

            return inner(*args)

        return op

    def kernel_ce(pair):
        from .bridges._memory import GRADIENTS
        from .bridges._memory import aligned_empty

        def run(z, y, upstream=None):
            z, y = np.ascontiguousarray(z), np.ascontiguousarray(y)
            loss, saved = aligned_empty(z.shape[:1]), aligned_empty((z.shape[0], pair.saved_width))
            pair.forward(z, y, loss, saved)
            if upstream is None:
                return loss
            grad = GRADIENTS.empty(z.shape)  # reused once TensorFlow has dropped the last chunk's
            pair.backward(z, y, saved, np.ascontiguousarray(upstream, np.float32), grad)
            return loss, grad

        def ce(z, labels, upstream=None):
            if upstream is None:
                loss = tf.numpy_function(run, [z, labels], tf.float32, stateful=False)
                loss.set_shape(z.shape[:1])
                return loss, None
            loss, grad = tf.numpy_function(run, [z, labels, upstream], [tf.float32, tf.float32], stateful=False)
            loss.set_shape(z.shape[:1])
            grad.set_shape(z.shape)
            return loss, grad

        return ce

    def xla_cluster():
        # in a graph (Keras's fit on a CPU is not XLA-compiled) and not inside an XLA function already; eagerly,
        # each call would compile anew
        return not tf.executing_eagerly() and not _in_xla()

    return _Glue(dot, dot_add, _logits_by_dot(dot), _argmax_is, scan, custom_op, kernel_ce, lambda: True,
                 xla_cluster)


def _torch_glue():
    import torch

    def dot(a, b, transpose_a=False, transpose_b=False, out_dtype=None):
        out = torch.matmul(a.T if transpose_a else a, b.T if transpose_b else b)
        return out if out_dtype is None else out.to(_torch_dtype(out_dtype))

    def dot_add(acc, a, b, transpose_a=False):
        a = a.T if transpose_a else a
        if a.dtype == acc.dtype:
            return acc.addmm_(a, b)  # in place: no new (D, V) buffer per chunk
        return acc.add_(torch.matmul(a, b))

    def logits(h, kernel, bias, transpose_b=False, out_dtype=None):
        kernel = kernel.T if transpose_b else kernel
        if h.device.type != "cpu" or h.dtype != torch.float32 or _torch_dtype(out_dtype) != torch.float32:
            return logits_by_dot(h, kernel, bias, out_dtype=out_dtype)
        # a pooled buffer: a fresh (T, V) allocation per chunk would page-fault all of it (see bridges/_memory.py)
        from .bridges._memory import CHUNKS

        out = torch.from_numpy(CHUNKS.empty((h.shape[0], kernel.shape[1])))
        if bias is None:
            return torch.matmul(h, kernel, out=out)
        return torch.addmm(bias, h, kernel, out=out)

    logits_by_dot = _logits_by_dot(dot)

    def argmax_is(z, labels):
        # torch.argmax over rows is ~5x slower than amax on CPU: compare the label's logit with the row max, and
        # where it is the max, count the maxima; only a row with several (a tie) needs argmax's first-index rule
        top = torch.amax(z, dim=1)
        at_label = torch.gather(z, 1, labels.clamp(0, z.shape[1] - 1).long()[:, None])[:, 0]
        hit = (at_label == top) & (labels >= 0) & (labels < z.shape[1])
        rows = torch.nonzero(hit)[:, 0]
        if rows.numel():
            tied = rows[(z[rows] == top[rows, None]).sum(dim=1) > 1]
            if tied.numel():
                hit[tied] = torch.argmax(z[tied], dim=1) == labels[tied].long()
        return hit

    def scan(body, carry, xs, ys_dtypes):
        from .bridges._memory import CHUNKS

        ys = []
        try:
            for i in range(xs[0].shape[0]):
                carry, y = body(carry, tuple(x[i] for x in xs))
                ys.append(y)
        finally:
            # the chunks' logits and gradient buffers, reused from chunk to chunk, are freed here rather than
            # held through the model's backward and the optimizer's update (0.5 GB at 512 tokens x 131072)
            CHUNKS.clear()
        stacked = tuple(torch.stack([y[k] for y in ys]) for k in range(len(ys_dtypes))) if ys else ()
        return carry, stacked

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, fns, *args):
            primal, forward, backward = fns
            ctx.backward_fn = backward
            if any(ctx.needs_input_grad[1:]):
                outputs, ctx.residuals = forward(*args)
            else:
                outputs, ctx.residuals = primal(*args), None
            for extra in outputs[1:]:
                ctx.mark_non_differentiable(extra)
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *cotangents):
            grads = ctx.backward_fn(ctx.residuals, cotangents)
            ctx.residuals = None
            return (None,) + tuple(grads)

    def custom_op(primal, forward, backward, xla=False):
        return lambda *args: Function.apply((primal, forward, backward), *args)

    def kernel_ce(pair):
        from .bridges._memory import CHUNKS

        def ce(z, labels, upstream=None):
            z, y = z.detach().contiguous(), labels.contiguous()
            loss = torch.empty(z.shape[0], dtype=torch.float32)
            saved = torch.empty((z.shape[0], pair.saved_width), dtype=torch.float32)
            pair.forward(z.numpy(), y.numpy(), loss.numpy(), saved.numpy())
            if upstream is None:
                return loss, None
            grad = CHUNKS.empty(tuple(z.shape))  # reused once the last chunk's is dropped
            pair.backward(z.numpy(), y.numpy(), saved.numpy(), upstream.detach().float().contiguous().numpy(), grad)
            return loss, torch.from_numpy(grad)

        return ce

    return _Glue(dot, dot_add, logits, argmax_is, scan, custom_op, kernel_ce, lambda: True, _no)


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


_glue = {"jax": _jax_glue, "tensorflow": _tensorflow_glue, "torch": _torch_glue}[_backend.BACKEND]()

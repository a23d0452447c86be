"""Stable building blocks, in one place, written once in ``keras.ops``.

Every loss in :mod:`keras_stable_heads.ops` composes these; none re-derives them. Each numerics trick carries a
one-line comment right above the line that uses it.

Conventions (shared with the kernels and the float64 references in ``reference.py``):

- A logit of ``-inf`` masks its class: probability 0, and no contribution where the class has no target mass.
- :func:`logsumexp` of a row that is all ``-inf`` is ``-inf`` (not NaN); the losses then report ``+inf`` for it.
- NaN in gives NaN out: nothing here replaces a NaN with a number.
"""

from keras import ops

from ._backend import dtype_name

_LOW_PRECISION = ("float16", "bfloat16")


def compute_dtype(dtype):
    """The dtype a loss computes in: float32 for float16/bfloat16 (and integers), else the input's own."""
    name = dtype_name(dtype)
    return name if name in ("float32", "float64") else "float32"


def upcast(x):
    """``x`` as a tensor in :func:`compute_dtype` (float16/bfloat16 logits are computed in float32)."""
    x = ops.convert_to_tensor(x)
    target = compute_dtype(x.dtype)
    return x if dtype_name(x.dtype) == target else ops.cast(x, target)


# keras.ops.maximum/minimum return float32 for two float64 tensors on PyTorch, and keras.ops.tanh and
# keras.ops.mean compute float64 in float32 on JAX: the helpers below keep every dtype's own precision.


def relu(x):
    """``max(x, 0)`` in ``x``'s own dtype."""
    return ops.where(x > 0.0, x, ops.zeros_like(x))


def softplus(x):
    """``log(1 + exp(x))``, exact for every float, ``softplus(-inf) = 0``, ``softplus(inf) = inf``."""
    # log(1 + exp(x)) == max(x, 0) + log1p(exp(-|x|)): the exp never overflows.
    return relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


def log_sigmoid(x):
    """``log(sigmoid(x))`` without underflow: ``log_sigmoid(-30) = -30``, not ``log(1e-7)``."""
    # log(sigmoid(x)) == -log(1 + exp(-x)) == -softplus(-x)
    return -softplus(-x)


def safe_mul(weight, x):
    """``weight * x`` with ``0 * x == 0`` even where ``x`` is infinite (``0 * log(0)`` is 0 in a cross-entropy)."""
    return ops.where(ops.equal(weight, 0.0), ops.zeros_like(x), weight * x)


def shifted_exp(z):
    """``(shift, e, total)`` over the last axis, keeping it: ``e = exp(z - shift)``, ``total = sum(e)``.

    ``shift`` is the row maximum (0 where that is not finite), so ``e <= 1`` and ``total`` is in ``[1, C]`` for a
    row with a finite max. A loss that needs the softmax in its gradient keeps ``e`` and takes ``p = e / total``:
    one exponential per logit for forward and backward together, the way XLA and the built-ins compute it
    (recomputing ``exp`` in the backward made XLA on CPU write ``z - shift`` to memory and run ``exp`` twice).
    """
    m = ops.max(z, axis=-1, keepdims=True)
    # A row of -inf (or with +inf) would make z - m NaN; shift it by 0 instead.
    m = ops.where(ops.isfinite(m), m, ops.zeros_like(m))
    e = ops.exp(z - m)
    return m, e, ops.sum(e, axis=-1, keepdims=True)


def logsumexp(z):
    """Log-sum-exp over the last axis as ``(shift, log_sum)``, both keeping the axis: ``lse = shift + log_sum``.

    ``shift`` is the row maximum and ``log_sum = log(sum(exp(z - shift)))`` is in ``[0, log C]``. Keeping the two
    apart is what makes large logits exact: ``log p = (z - shift) - log_sum`` and ``lse - z_y = (shift - z_y) + log_sum``
    never round ``shift + log_sum`` (at ``z = 1e4`` float32 spacing is 1e-3, which would cost 3 digits of ``p``).
    A row that is all ``-inf`` gets ``shift = 0, log_sum = -inf`` (not NaN). Only the forward value is used:
    every loss supplies its own gradient, so no gradient flows through the shift.
    """
    shift, _, total = shifted_exp(z)
    return shift, ops.log(total)


def tanh(x):
    """``tanh`` in the input's own precision on every backend (``keras.ops.tanh`` rounds float64 to float32 on JAX)."""
    a = ops.abs(x)
    a = ops.where(a > 20.0, 20.0, a)
    # tanh|x| == expm1(2|x|) / (expm1(2|x|) + 2): no cancellation near 0; |x| >= 20 rounds to 1 in float64.
    e = ops.expm1(2.0 * a)
    return ops.sign(x) * (e / (e + 2.0))


def softcap(z, cap):
    """``cap * tanh(z / cap)`` and its derivative; ``-inf`` stays ``-inf`` so a masked class stays masked.

    Returns ``(z_capped, dz_capped_dz)``; with ``cap=None`` returns ``(z, None)``.
    """
    if cap is None:
        return z, None
    x = z / cap
    masked = ops.isinf(z) & (z < 0)
    capped = ops.where(masked, z, cap * tanh(x))
    # 1 - t^2 as 4 e / (1 + e)^2, e = exp(-2 |z| / cap): 1 - t^2 cancels where t is near +-1 (float32: 6% off at
    # |z| = 8 cap, 0 from 9 cap); 0 at -inf, so a masked class gets no gradient
    e = ops.exp(-2.0 * ops.abs(x))
    r = 1.0 / (1.0 + e)
    return capped, (4.0 * e) * ops.square(r)


def filled_like(x, value):
    """``x``'s shape and dtype, every entry ``value``. Not ``keras.ops.full_like``: on PyTorch's meta device, where
    Keras first traces a compiled loss (``_symbolic_build``), it calls ``.item()`` and fails, and Keras then runs the
    loss once on real tensors of ones the size of ``y_pred`` (a language model's whole (tokens, vocabulary) logits)."""
    return ops.zeros_like(x) + value


def is_neg_inf(x):
    return ops.equal(x, float("-inf"))


def mean_last(x):
    """Mean over the last (static) axis; ``keras.ops.mean`` computes float64 in float32 on JAX and PyTorch."""
    return ops.sum(x, axis=-1) / x.shape[-1]


def fused(forward):
    """Turn ``forward(x) -> (value, vjp)`` into an op whose gradient is ``vjp(upstream)``.

    This is the one place that adapts ``keras.ops.custom_gradient`` to its backends: TensorFlow and JAX pass the
    upstream cotangent positionally, PyTorch passes the saved inputs positionally and the cotangent as
    ``upstream=``. Losses close over their labels, which are therefore constants (no gradient flows to them).
    """

    @ops.custom_gradient
    def op(x):
        value, vjp = forward(x)

        def grad(*args, upstream=None):
            if upstream is None:
                upstream = args[0]
            return vjp(upstream)

        return value, grad

    return op

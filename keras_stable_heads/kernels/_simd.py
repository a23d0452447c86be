"""float32 building blocks that LLVM can vectorize.

pip-installed Numba has no SVML, so ``np.exp``/``math.exp`` stay scalar library calls and keep any loop that
uses them from vectorizing; ``max`` reductions do not vectorize either. Everything here is written in plain
float32 arithmetic (no float64 constant, no ``math.floor``, which returns int64 and promotes to float64) so that
it inlines into a loop and becomes SIMD code.

- ``maxnum_f32``/``minnum_f32``: ``llvm.maxnum.f32``/``llvm.minnum.f32`` (IEEE maxNum: a NaN operand is ignored),
  which LLVM turns into vector max reductions.
- ``exp_f32``: ``n = round(x / ln2)`` by the 1.5 * 2^23 trick (which also leaves n in the low bits of the sum,
  so no float -> int conversion), ``r = x - n ln2`` (Cody-Waite, two constants), ``exp(r)`` by a degree-6
  polynomial in Horner form (0.05 ulp before rounding), times ``2^n`` built from its bits in two halves, so that
  denormal results are rounded once and ``+inf`` comes exactly when the result overflows. The argument is
  clamped with selects whose false branch is ``x``: each is one x86 max/min, which passes a NaN on, so NaN needs
  no fix-up and ``+-inf`` fall out of the clamp. About 1 ulp.
- ``exp_nonpos_f32``: the same for the arguments of softmax (``z - max <= 0``), with one ``2^n`` factor
  (denormal results may flush to 0); 17 vector instructions per 8 results on AVX2.
- ``log_f32``: Cephes ``logf`` (mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial), without a library call.
- ``log1p_exp_neg_abs``: ``log(1 + exp(-|x|))``, the soft part of softplus: Cephes ``logf`` polynomial on the
  mantissa of ``v = 1 + u``, plus the rounding error of ``1 + u`` divided by ``v`` (Goldberg).
- ``tanh_f32``: Cephes ``tanhf``; ``sech2_f32``: ``1 - tanh^2`` without cancellation.
- ``safe_mul_f32``: ``a * x`` that is 0 where ``a`` is 0, also for an infinite ``x`` (``numerics.safe_mul``).
- ``prefetch_row_f32``: a software prefetch (``llvm.prefetch``) of one cache line of a 2-D array.

Inlining and flags: LLVM inlines the small ``exp_f32`` into every loop by itself, and the fast-math flags are per
instruction, so its Cody-Waite reduction keeps ``ELEMENTARY_FASTMATH`` (no ``reassoc``) inside a ``FASTMATH``
kernel. The larger functions are too big for LLVM's inliner once ``exp_f32`` is inside them, and a call in the
loop stops vectorization, so they are inlined by Numba (``inline='always'``), whose inlined code takes the
caller's flags: their arithmetic is written to be safe under ``reassoc``, and the one step that is not (the
rounding error of ``1 + u``) is a separate small function.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._config import ELEMENTARY_FASTMATH, TANH_POLY_MAX

_F32 = ir.FloatType()


def _binary_f32_intrinsic(name):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_F32, [_F32, _F32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, args)

    return codegen


@intrinsic
def maxnum_f32(typingctx, a, b):
    """IEEE maxNum of two float32 (a NaN operand is ignored); vectorizes as a reduction."""
    if a != types.float32 or b != types.float32:
        return None
    return types.float32(types.float32, types.float32), _binary_f32_intrinsic("llvm.maxnum.f32")


@intrinsic
def minnum_f32(typingctx, a, b):
    """IEEE minNum of two float32 (a NaN operand is ignored)."""
    if a != types.float32 or b != types.float32:
        return None
    return types.float32(types.float32, types.float32), _binary_f32_intrinsic("llvm.minnum.f32")


@intrinsic
def select_f32(typingctx, cond, a, b):
    """``a if cond else b`` as one LLVM ``select`` (never a branch, which can keep a loop from vectorizing)."""
    if not isinstance(cond, types.Boolean) or a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, signature, args):
        c, x, y = args
        if c.type != ir.IntType(1):
            c = builder.icmp_unsigned("!=", c, ir.Constant(c.type, 0))
        return builder.select(c, x, y)

    return types.float32(cond, types.float32, types.float32), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    """Reinterpret the bits of a float32 as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_to_f32(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32 (Numba widens int32 arithmetic to int64)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if i.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32)) if i.bitwidth > 32 else builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, _F32)

    return types.float32(i), codegen


@intrinsic
def prefetch_row_f32(typingctx, arr, i, j):
    """Hint the CPU to fetch ``arr[i, j]``'s cache line into L2 (``llvm.prefetch``: read, locality 2, data).

    A hint only: no load, no fault, no dependency, so it costs an issue slot and lets memory work while the
    caller computes on data already in cache. ``arr`` is a 2-D array; no bounds check (a prefetch past the end
    is harmless, but callers pass valid indices).
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(i, types.Integer)
            and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, value=args[0])
        index = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, aryty, array, index, wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, i, j), codegen


def stack_scratch_f32(size):
    """An intrinsic ``scratch()`` returning a pointer to ``size`` float32 on the stack of the calling function.

    The ``alloca`` is placed in the entry block of the function being compiled (for a ``prange`` body, the
    per-thread worker), so each thread has its own buffer and nothing is allocated on the heap. It lives until
    that function returns; wrap it with ``numba.carray``. LLVM knows it aliases no argument array, which lets
    loops over it vectorize without runtime alias checks.
    """

    @intrinsic
    def scratch(typingctx):
        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, _F32, size=size)

        return types.CPointer(types.float32)(), codegen

    return scratch


_f32 = np.float32
_i32 = np.int32
ZERO = _f32(0.0)
ONE = _f32(1.0)
TWO = _f32(2.0)
HALF = _f32(0.5)
INF = _f32(np.inf)
NEG_INF = _f32(-np.inf)
NAN = _f32(np.nan)

_LOG2E = _f32(1.44269504088896341)
# ln 2 split so that n * _LN2_HI is exact for |n| < 2^9 (Cody-Waite).
_LN2_HI = _f32(0.693359375)
_LN2_LO = _f32(-2.12194440e-4)
# exp(r) = 1 + r (1 + r Q(r)) on |r| <= ln(2) / 2, Q of degree 4: relative error 3e-9 (0.05 ulp) before rounding;
# fitted by iteratively reweighted least squares on Chebyshev nodes (relative error, minimax in the limit).
_EXP_Q0 = _f32(0.49999994)
_EXP_Q1 = _f32(0.16666521)
_EXP_Q2 = _f32(0.04166839)
_EXP_Q3 = _f32(0.00836871)
_EXP_Q4 = _f32(0.00138146)
# 1.5 * 2^23: for |v| < 2^22, fl(v + _ROUND_MAGIC) - _ROUND_MAGIC is v rounded to an integer n, and the low
# mantissa bits of fl(v + _ROUND_MAGIC) are n itself (two's complement), so n << 23 needs no float -> int conversion.
_ROUND_MAGIC = _f32(12582912.0)
_ROUND_MAGIC_BITS = _i32(0x4B400000)
_EXP_BIAS = _i32(127)
_MANT_BITS = _i32(23)
_ONE_I32 = _i32(1)
# exp_f32's clamp: round(x / ln 2) is -151 at the low end (the result rounds to 0) and 128 at the high end.
_EXP_CLAMP_LO = _f32(-104.5)
_EXP_CLAMP_HI = _f32(89.0)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def _exp_reduce(xc):
    """(t, p) for a clamped float32 argument: n = round(x / ln 2) is held in the bits of t, p = exp(x - n ln 2)."""
    t = xc * _LOG2E + _ROUND_MAGIC
    fn = t - _ROUND_MAGIC
    # r = x - n ln 2 in two steps, |r| <= ln(2) / 2.
    r = xc - fn * _LN2_HI
    r = r - fn * _LN2_LO
    q = _EXP_Q4 * r + _EXP_Q3
    q = q * r + _EXP_Q2
    q = q * r + _EXP_Q1
    q = q * r + _EXP_Q0
    q = q * r + ONE
    return t, q * r + ONE


@njit(fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def exp_f32(x):
    """exp of a float32, ~1 ulp, vectorizable; +inf -> +inf, -inf -> 0, NaN -> NaN."""
    # Clamp so that n stays in [-151, 128], where the scaling below gives exactly 0 and +inf; written as
    # selects whose false branch is x, so a NaN passes through (see exp_nonpos_f32) and needs no fix-up.
    xc = select_f32(x < _EXP_CLAMP_LO, _EXP_CLAMP_LO, x)
    xc = select_f32(xc > _EXP_CLAMP_HI, _EXP_CLAMP_HI, xc)
    t, p = _exp_reduce(xc)
    # times 2^n = 2^n1 * 2^n2 with both halves normal numbers: one rounding for denormal results, and +inf for
    # n = 128 only when p * 2^128 overflows.
    n = f32_to_bits(t) - _ROUND_MAGIC_BITS
    n1 = n >> _ONE_I32
    n2 = n - n1
    return p * bits_to_f32((n1 + _EXP_BIAS) << _MANT_BITS) * bits_to_f32((n2 + _EXP_BIAS) << _MANT_BITS)


_EXP_NONPOS_LO = _f32(-88.0)
_EXP_NONPOS_HI = _f32(89.0)
_EXP_BIAS_BITS = _i32(127 << 23)


@njit(fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def exp_nonpos_f32(x):
    """exp for the shifted arguments of softmax (x = z - max <= 0): ~1 ulp for normal results, cheaper than exp_f32.

    One 2^n scale instead of two: results below the smallest normal (x < -87.3) may be flushed to 0, and
    x in (88.37, 88.72] gives +inf instead of a finite number; +inf -> +inf, -inf -> 0, NaN -> NaN.
    """
    # Clamp so that n stays in [-127, 128]: 2^-127 has exponent bits 0 (the result is 0), 2^128 those of +inf.
    # Written as selects whose false branch is x, a NaN passes through the clamp (each select is one x86
    # max/min instruction, which returns its second operand when unordered) and on into p: no NaN fix-up needed.
    xc = select_f32(x < _EXP_NONPOS_LO, _EXP_NONPOS_LO, x)
    xc = select_f32(xc > _EXP_NONPOS_HI, _EXP_NONPOS_HI, xc)
    t, p = _exp_reduce(xc)
    # The low 9 bits of t's bits hold n, so (bits << 23) is n << 23 modulo 2^32 (the magic's own bits shift out).
    return p * bits_to_f32((f32_to_bits(t) << _MANT_BITS) + _EXP_BIAS_BITS)


_LOG_P0 = _f32(7.0376836292e-2)
_LOG_P1 = _f32(-1.1514610310e-1)
_LOG_P2 = _f32(1.1676998740e-1)
_LOG_P3 = _f32(-1.2420140846e-1)
_LOG_P4 = _f32(1.4249322787e-1)
_LOG_P5 = _f32(-1.6668057665e-1)
_LOG_P6 = _f32(2.0000714765e-1)
_LOG_P7 = _f32(-2.4999993993e-1)
_LOG_P8 = _f32(3.3333331174e-1)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def _log_mantissa_poly(f):
    """log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1), without the exponent part (Cephes logf)."""
    z = f * f
    q = _LOG_P0 * f + _LOG_P1
    q = q * f + _LOG_P2
    q = q * f + _LOG_P3
    q = q * f + _LOG_P4
    q = q * f + _LOG_P5
    q = q * f + _LOG_P6
    q = q * f + _LOG_P7
    q = q * f + _LOG_P8
    return f + (q * f * z - HALF * z)


_MANT_MASK = _i32(0x007FFFFF)
_HALF_BITS = _i32(0x3F000000)
_BIAS_M1 = _i32(126)
_SQRTHF = _f32(0.707106781186547524)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def log_f32(x):
    """log of a float32 (Cephes logf, ~1 ulp) without a library call: vectorizable; 0 -> -inf, +inf -> +inf,
    NaN and x < 0 -> NaN. Denormal inputs are not handled (they give a finite, wrong value): callers pass sums
    of exponentials that are >= 1 or exactly 0."""
    bits = f32_to_bits(x)
    # x = m * 2^e with m in [0.5, 1), then folded into [sqrt(1/2), sqrt(2)).
    e = (bits >> _MANT_BITS) - _BIAS_M1
    m = bits_to_f32((bits & _MANT_MASK) | _HALF_BITS)
    low = m < _SQRTHF
    fe = _f32(e) - select_f32(low, ONE, ZERO)
    f = select_f32(low, m + m, m) - ONE
    y = _log_mantissa_poly(f) + fe * _LN2_LO + fe * _LN2_HI
    y = select_f32(x == ZERO, NEG_INF, y)
    y = select_f32(x == INF, INF, y)
    return select_f32(x < ZERO, NAN, select_f32(x != x, x, y))


_SQRT2 = _f32(1.41421356237309505)
_LN2 = _f32(0.693147180559945309)


@njit(fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def sub_exact(a, b):
    """a - b as an instruction without ``reassoc``, so that LLVM cannot fold it into its neighbours."""
    return a - b


@njit(fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def add_exact(a, b):
    """a + b without ``reassoc``: ``(m - z) + d`` must not become ``(m + d) - z`` (which loses d when |m| >> d)."""
    return a + b


@njit(fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def _one_plus_rounding_error(u, v):
    """u - (v - 1) for v = fl(1 + u): exact for 0 <= u <= 1 (a separate function: ``reassoc`` would fold it to 0)."""
    return u - (v - ONE)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def log1p_exp_neg_abs(x):
    """log(1 + exp(-|x|)) in (0, ln 2], accurate also when exp(-|x|) is tiny; NaN -> NaN."""
    u = exp_nonpos_f32(-np.abs(x))
    v = ONE + u
    # log(v + c) ~= log(v) + c / v, c the rounding error of 1 + u.
    c = _one_plus_rounding_error(u, v)
    # v in [1, 2]: fold into [sqrt(1/2), sqrt(2)) with k in {0, 1}.
    big = v >= _SQRT2
    k = select_f32(big, ONE, ZERO)
    m = select_f32(big, HALF * v, v)
    return _log_mantissa_poly(m - ONE) + k * _LN2 + c / v


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def safe_mul_f32(a, x):
    """``a * x`` with ``0 * x == 0`` even where ``x`` is infinite: a loss term whose weight is 0 is skipped
    (``0 * log 0`` is 0 in a cross-entropy), also where its logit is infinite. One blend per vector."""
    return select_f32(a == ZERO, ZERO, a * x)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def softplus_f32(x):
    """log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)); +inf -> +inf, -inf -> 0, NaN -> NaN."""
    return maxnum_f32(x, ZERO) + log1p_exp_neg_abs(x)


_TANH_P0 = _f32(-5.70498872745e-3)
_TANH_P1 = _f32(2.06390887954e-2)
_TANH_P2 = _f32(-5.37397155531e-2)
_TANH_P3 = _f32(1.33314422036e-1)
_TANH_P4 = _f32(-3.33332819422e-1)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def tanh_f32(x):
    """tanh of a float32 (Cephes tanhf, ~2 ulp); +-inf -> +-1, NaN -> NaN; vectorizable."""
    ax = np.abs(x)
    # |x| >= 0.625: (1 - e) / (1 + e), e = exp(-2|x|) <= 0.29 (no cancellation); e = 0 for large |x|: exactly 1.
    e = exp_nonpos_f32(-(ax + ax))
    big = np.copysign((ONE - e) / (ONE + e), x)
    z = x * x
    q = _TANH_P0 * z + _TANH_P1
    q = q * z + _TANH_P2
    q = q * z + _TANH_P3
    q = q * z + _TANH_P4
    small = q * z * x + x
    return select_f32(ax < TANH_POLY_MAX, small, big)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def sech2_f32(x):
    """1 - tanh(x)^2 (the softcap's slope) as 4 e / (1 + e)^2, e = exp(-2|x|): no cancellation where tanh is near
    +-1 (1 - t * t loses 6% at |x| = 8 and is 0 from 9); 0 at +-inf, NaN -> NaN. Its exp is tanh_f32's."""
    ax = np.abs(x)
    e = exp_nonpos_f32(-(ax + ax))
    r = ONE / (ONE + e)
    return (e + e) * r * (TWO * r)


@njit(inline="always", fastmath=ELEMENTARY_FASTMATH, error_model="numpy")
def sigmoid_f32(x):
    """1 / (1 + exp(-x)) without overflow: exp(-|x|) / (1 + exp(-|x|)) for x < 0; NaN -> NaN."""
    u = exp_nonpos_f32(-np.abs(x))
    s = ONE / (ONE + u)
    return select_f32(x >= ZERO, s, u * s)

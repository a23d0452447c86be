"""Numba CPU kernels against the float64 references in reference.py.

The kernels run through ``keras_stable_heads._kernel_ops.cpu_pair`` (the pairs the bridges call), as the installed
``keras_stable_heads.kernels``, so the suite compiles them once and shares Numba's on-disk cache with the dispatch
tests. The checks shared with the CUDA kernels (tests/test_kernels_cuda.py) live in cases.py; this file picks the
CPU's shapes (both layouts of every kernel, class counts that are not multiples of the vector width, >= 65,536
rows) and adds what is CPU-only: the elementary functions, the machine code, the cache folder.
"""

import os
import re
import sys
import warnings

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)

import cases  # noqa: E402
from keras_stable_heads import reference as ref  # noqa: E402
from cases import FOCAL_OPTIONS, SOFTMAX_OPTIONS, opts_id, shape_id  # noqa: E402

from keras_stable_heads import _kernel_ops  # noqa: E402
from keras_stable_heads.kernels import _cache  # noqa: E402
from keras_stable_heads.kernels import _config  # noqa: E402
from keras_stable_heads.kernels import _simd  # noqa: E402
from keras_stable_heads.kernels import focal as _focal  # noqa: E402
from keras_stable_heads.kernels import nll as _nll  # noqa: E402
from keras_stable_heads.kernels import sigmoid_ce as _sigmoid  # noqa: E402
from keras_stable_heads.kernels import softmax_ce as _softmax  # noqa: E402

K = cases.Kernels(_kernel_ops.cpu_pair)
f32 = np.float32

# Shapes that exercise both layouts: C <= 12 (block forward and backward), 13..32 (block forward, row
# backward), > 32 (rows), and class counts that are not multiples of the vector width.
SHAPES = [(67, 10), (40, 7), (70, 20), (9, 33), (6, 1001), (5, 1)]
# Elementwise kernels: C <= FLAT_C_MAX takes the flat layout (C = 1 is a binary head), above it rows.
FLAT_SHAPES = [(67, 1), (40, 3), (9, 32), (9, 33), (5, 1001)]


# ---------------------------------------------------------------------------------------------------------------
# Elementary functions
# ---------------------------------------------------------------------------------------------------------------


def _jit_map(fn):
    from numba import njit

    @njit(fastmath=_config.FASTMATH, error_model="numpy")
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    return apply


def _ulp_error(got, want):
    want32 = want.astype(f32)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want32)).astype(np.float64)


@pytest.mark.parametrize("name,lo,hi", [("exp_f32", -103.9, 88.72), ("exp_nonpos_f32", -87.3, 0.5)])
def test_polynomial_exp_within_2_ulp(name, lo, hi):
    x = np.linspace(lo, hi, 1_000_003, dtype=np.float64).astype(f32)
    out = np.empty_like(x)
    _jit_map(getattr(_simd, name))(x, out)
    want = np.exp(x.astype(np.float64))
    normal = want >= np.finfo(f32).tiny
    assert _ulp_error(out[normal], want[normal]).max() <= 2.0
    # denormal results: exp_f32 rounds them (error below one denormal step); exp_nonpos_f32 may flush to 0
    tiny = ~normal
    if name == "exp_f32":
        assert np.abs(out[tiny] - want[tiny]).max() <= 2.0 ** -149
    else:
        assert np.all((out[tiny] == 0) | (np.abs(out[tiny] - want[tiny]) <= 2.0 ** -149))


@pytest.mark.parametrize("name", ["exp_f32", "exp_nonpos_f32"])
def test_polynomial_exp_special_values(name):
    x = np.array([-np.inf, np.inf, np.nan, -1e30, -200.0, -104.0, -88.5, 0.0, -0.0, 100.0, 1e30], f32)
    out = np.empty_like(x)
    _jit_map(getattr(_simd, name))(x, out)
    assert out[0] == 0.0 and out[1] == np.inf and np.isnan(out[2])
    assert np.all(out[3:6] == 0.0)
    assert 0.0 <= out[6] < 1e-38  # a denormal or 0
    assert out[7] == 1.0 and out[8] == 1.0
    assert np.all(out[9:] == np.inf)


def test_exp_overflow_threshold():
    x = np.array([88.72283, 88.7228394, 88.73], f32)
    out = np.empty_like(x)
    _jit_map(_simd.exp_f32)(x, out)
    assert np.isfinite(out[0]) and out[0] > 3.4e38 and np.all(out[1:] == np.inf)


@pytest.mark.parametrize("name,reference,lo,hi,tol", [
    ("tanh_f32", np.tanh, -20.0, 20.0, 2.5),
    ("sigmoid_f32", lambda v: 1.0 / (1.0 + np.exp(-v)), -80.0, 80.0, 3.0),
    ("log1p_exp_neg_abs", lambda v: np.log1p(np.exp(-np.abs(v))), -80.0, 80.0, 3.0),
    ("softplus_f32", lambda v: np.logaddexp(0.0, v), -80.0, 80.0, 3.0),
    ("log_f32", np.log, 1e-30, 1e30, 2.0),
])
def test_elementary_functions_ulp(name, reference, lo, hi, tol):
    if lo > 0:
        x = np.geomspace(lo, hi, 400_001).astype(f32)
    else:
        x = np.linspace(lo, hi, 400_001).astype(f32)
    out = np.empty_like(x)
    _jit_map(getattr(_simd, name))(x, out)
    want = reference(x.astype(np.float64))
    normal = np.abs(want) >= np.finfo(f32).tiny
    assert _ulp_error(out[normal], want[normal]).max() <= tol


def test_elementary_functions_special_values():
    x = np.array([-np.inf, np.inf, np.nan], f32)
    for name, expected in [("tanh_f32", [-1.0, 1.0]), ("sigmoid_f32", [0.0, 1.0]),
                           ("softplus_f32", [0.0, np.inf]), ("log1p_exp_neg_abs", [0.0, 0.0])]:
        out = np.empty_like(x)
        _jit_map(getattr(_simd, name))(x, out)
        assert list(out[:2]) == expected, name
        assert np.isnan(out[2]), name
    out = np.empty(4, f32)
    _jit_map(_simd.log_f32)(np.array([0.0, np.inf, -1.0, np.nan], f32), out)
    assert out[0] == -np.inf and out[1] == np.inf and np.isnan(out[2]) and np.isnan(out[3])


# ---------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy (the checks are in cases.py, shared with the CUDA kernels)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("opts", SOFTMAX_OPTIONS, ids=opts_id)
def test_sparse_matches_reference(shape, opts):
    cases.check_softmax_matches_reference(K, shape, opts, sparse=True)


@pytest.mark.parametrize("c", [1, 3, 10, 20, 40])
@pytest.mark.parametrize("opts", [SOFTMAX_OPTIONS[0], SOFTMAX_OPTIONS[6]], ids=opts_id)
def test_sparse_grad_matches_finite_differences(c, opts):
    cases.check_sparse_grad_finite_differences(K, (3, c), opts)


@pytest.mark.parametrize("c", [10, 20, 33, 1001])
def test_sparse_extreme_inputs(c):
    cases.check_sparse_extreme_inputs(K, c)


@pytest.mark.parametrize("c", [10, 20, 1001])
@pytest.mark.parametrize("opts", SOFTMAX_OPTIONS[1:], ids=opts_id)
def test_sparse_masked_classes_with_options(c, opts):
    cases.check_sparse_masked_classes_with_options(K, c, opts)


@pytest.mark.parametrize("c", [2, 40])
def test_softcap_slope_far_out(c):
    cases.check_softcap_slope_far_out(K, c)


@pytest.mark.parametrize("c", [10, 13, 40])
def test_sparse_bad_label_on_all_masked_row(c):
    cases.check_sparse_bad_label_on_all_masked_row(K, c)


@pytest.mark.parametrize("c", [10, 20, 1001])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_zero_weight_on_masked_classes(c, sparse):
    cases.check_zero_weight_on_masked_classes(K, c, sparse)


@pytest.mark.parametrize("c", [10, 20, 1001])
def test_sparse_ignore_class(c):
    cases.check_sparse_ignore_class(K, c, 50)


def test_sparse_one_class():
    cases.check_sparse_one_class(K)


@pytest.mark.parametrize("shape", [(65536, 10), (65536 + 37, 20), (70000, 33)], ids=shape_id)
def test_sparse_many_rows(shape):
    n, c = shape
    rng = np.random.default_rng(n + c)
    z = (rng.standard_normal(shape) * 3.0).astype(f32)
    y = rng.integers(0, c, n)
    dloss = rng.random(n).astype(f32)
    loss, lse, grad = K.sparse(z, y, eps=0.1, dloss=dloss)
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y, label_smoothing=0.1), rtol=1e-5, atol=1e-6)
    want_grad = cases.softmax_grad_closed_form(z, cases.sparse_ybar(y, c, 0.1), np.ones(c), 0.0, 0.0, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)


def test_sparse_large_class_count_accuracy():
    """Long rows: float32 partial sums over 32000 classes stay accurate."""
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((4, 32000)) * 5.0).astype(f32)
    y = rng.integers(0, 32000, 4)
    loss, lse, _ = K.sparse(z, y)
    logp, want_lse = ref.log_softmax(z)  # (sparse_softmax_ce would build a 32000 x 32000 one-hot matrix)
    np.testing.assert_allclose(loss, -logp[np.arange(4), y], rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("opts", SOFTMAX_OPTIONS, ids=opts_id)
def test_dense_matches_reference(shape, opts):
    cases.check_softmax_matches_reference(K, shape, opts, sparse=False)


@pytest.mark.parametrize("opts", [SOFTMAX_OPTIONS[0], SOFTMAX_OPTIONS[6]], ids=opts_id)
def test_dense_grad_matches_finite_differences(opts):
    cases.check_dense_grad_finite_differences(K, (3, 6), opts)


@pytest.mark.parametrize("c", [10, 1001])
def test_dense_equals_sparse_for_one_hot(c):
    cases.check_dense_equals_sparse_for_one_hot(K, c, 50)


@pytest.mark.parametrize("c", [10, 1001])
def test_dense_extreme_inputs(c):
    cases.check_dense_extreme_inputs(K, c)


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 1), (67, 10), (9, 33), (5, 1001)], ids=shape_id)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("missing", [None, -1.0])
@pytest.mark.parametrize("mean", [True, False])
def test_sigmoid_matches_reference(shape, eps, weighted, missing, mean):
    cases.check_sigmoid_matches_reference(K, shape, eps, weighted, missing, mean)


@pytest.mark.parametrize("c", [5, 40])
def test_sigmoid_binary_ce_and_finite_differences(c):
    cases.check_sigmoid_binary_ce_and_finite_differences(K, c)


def test_sigmoid_extreme_inputs():
    cases.check_sigmoid_extreme_inputs(K)


def test_sigmoid_gradient_exact_for_confident_logits():
    cases.check_sigmoid_gradient_exact_for_confident_logits(K)


def test_sigmoid_many_rows():
    rng = np.random.default_rng(9)
    z = (rng.standard_normal((65536, 10)) * 3).astype(f32)
    y = rng.integers(0, 2, (65536, 10)).astype(f32)
    loss, grad = K.sigmoid(z, y)
    np.testing.assert_allclose(loss, ref.multilabel_ce(z, y), rtol=1e-5, atol=1e-7)
    want_grad = cases.sigmoid_grad_closed_form(z, y, np.ones(10), 0.0, np.ones(y.shape, bool), True, np.ones(65536))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Focal cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", FLAT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("options", FOCAL_OPTIONS, ids=opts_id)
def test_sigmoid_focal_matches_reference(shape, options):
    cases.check_sigmoid_focal_matches_reference(K, shape, options, rows=[0, 1, shape[0] - 1])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options", FOCAL_OPTIONS, ids=opts_id)
def test_softmax_focal_matches_reference(shape, options):
    cases.check_softmax_focal_matches_reference(K, shape, options, rows=[0, 1, shape[0] - 1])


@pytest.mark.parametrize("shape", [(65536 + 37, 3), (70000, 1), (65536, 40)], ids=shape_id)
def test_sigmoid_focal_many_rows(shape):
    options = {"gamma": 2.5, "alpha": 0.25, "label_smoothing": 0.1}
    cases.check_sigmoid_focal_matches_reference(K, shape, options, rows=cases.sample_rows(shape[0]))


@pytest.mark.parametrize("shape", [(65536 + 5, 13), (65536, 33)], ids=shape_id)
def test_softmax_focal_many_rows(shape):
    options = {"gamma": 2.0, "alpha": 0.5, "label_smoothing": 0.1}
    cases.check_softmax_focal_matches_reference(K, shape, options, rows=cases.sample_rows(shape[0]))


@pytest.mark.parametrize("shape", [(20, 1), (20, 7), (3, 40)], ids=shape_id)
def test_focal_at_gamma_zero_equals_cross_entropy(shape):
    cases.check_focal_at_gamma_zero_equals_cross_entropy(K, shape)


@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 0.0}, {"gamma": 9.0}],
                         ids=opts_id)
def test_sigmoid_focal_extreme_inputs(options):
    cases.check_sigmoid_focal_extreme_inputs(K, options)


@pytest.mark.parametrize("c", [10, 33, 1001])
@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 0.0}], ids=opts_id)
def test_softmax_focal_extreme_inputs(c, options):
    cases.check_softmax_focal_extreme_inputs(K, c, options)


def test_pow_unit_matches_float64_power():
    """x ** gamma by multiplication (integer part) and exp/log (fraction), denormal x included."""
    from numba import njit

    @njit(fastmath=_config.FASTMATH, error_model="numpy")
    def apply(x, gamma, out):
        parts = _focal.gamma_parts(gamma)
        for i in range(x.shape[0]):
            out[i] = _focal.pow_unit(x[i], parts)

    x = np.concatenate([np.geomspace(1e-44, 1.0, 20001), [0.0, 1.0, 0.5, np.nan]]).astype(f32)
    for gamma in (0.0, 0.5, 1.0, 2.0, 3.0, 2.5, 7.0, 9.25):
        out = np.empty_like(x)
        apply(x, f32(gamma), out)
        want = np.power(x[:-1].astype(np.float64), gamma)
        normal = want >= np.finfo(f32).tiny
        # a few ulp from the multiplications, plus the rounding of the exp argument frac * log x (float32's limit)
        frac = gamma - min(int(gamma), 7)
        log_x = np.log(np.where(x[:-1] > 0, x[:-1], 1.0).astype(np.float64))  # (x = 0 is checked below)
        tol = (8.0 + 3.0 * np.abs(frac * log_x)) * 2.0 ** -24
        rel = np.abs(out[:-1] - want) / np.where(normal, want, 1.0)
        assert np.all(rel[normal] <= tol[normal]), (gamma, np.max(rel[normal] / tol[normal]))
        assert np.all(np.abs(out[:-1][~normal] - want[~normal]) <= np.finfo(f32).tiny), gamma
        assert out[-4] == (1.0 if gamma == 0 else 0.0) and out[-3] == 1.0
        assert np.isnan(out[-1]) == (gamma != 0)  # NaN ** 0 is 1, as IEEE pow


def test_one_minus_exp_is_exact_near_zero():
    """1 - exp(x) for x <= 0 (softmax focal's 1 - p) without cancellation as x -> 0."""
    from numba import njit

    @njit(fastmath=_config.FASTMATH, error_model="numpy")
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = _focal.one_minus_exp(x[i], _simd.exp_f32(x[i]))

    x = -np.concatenate([np.geomspace(1e-30, 80.0, 40001), [0.0, np.inf]]).astype(f32)
    out = np.empty_like(x)
    apply(x, out)
    want = -np.expm1(x.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=4e-7, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Regression NLLs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["gaussian_nll", "laplace_nll"])
@pytest.mark.parametrize("rows,dim", [(67, 1), (40, 3), (9, 8), (5, 37)], ids=lambda v: str(v))
def test_nll_matches_reference(op, rows, dim):
    cases.check_nll_matches_reference(K, op, rows, dim)


@pytest.mark.parametrize("op", ["gaussian_nll", "laplace_nll"])
@pytest.mark.parametrize("rows,dim", [(65536 + 3, 1), (65536, 5)], ids=lambda v: str(v))
def test_nll_many_rows(op, rows, dim):
    cases.check_nll_matches_reference(K, op, rows, dim, sampled=cases.sample_rows(rows))


@pytest.mark.parametrize("op", ["gaussian_nll", "laplace_nll"])
def test_nll_extreme_inputs(op):
    cases.check_nll_extreme_inputs(K, op)


# ---------------------------------------------------------------------------------------------------------------
# Machine code and cache
# ---------------------------------------------------------------------------------------------------------------

_z, _zf, _rows, _s3 = np.zeros((4, 40), f32), np.zeros(160, f32), np.zeros(4, f32), np.zeros((4, 3), f32)
_ASM_KERNELS = {  # each kernel's dispatcher and example arguments
    "softmax_ce_sparse_fwd": (_softmax._sparse_fwd_rows, (_z, np.zeros(4, np.int32), _rows, _rows, np.ones(40, f32),
                                                          f32(0), f32(0), f32(0), -1, False)),
    "sigmoid_ce_bwd": (_sigmoid._sigmoid_bwd_rows, (_z, _z, _rows, _z, np.ones(40, f32), f32(0), f32(0), False,
                                                    True)),
    "sigmoid_focal_fwd_flat": (_focal._sigmoid_focal_fwd_flat, (_zf, _zf, _rows, 40, f32(2), f32(0), False, f32(0))),
    "sigmoid_focal_bwd_rows": (_focal._sigmoid_focal_bwd_rows, (_z, _z, _rows, _z, f32(2.5), f32(0), False, f32(0))),
    "softmax_focal_fwd": (_focal._softmax_focal_fwd_rows, (_z, _z, _rows, _s3, f32(2), f32(1), f32(0))),
    "softmax_focal_bwd": (_focal._softmax_focal_bwd_rows, (_z, _z, _s3, _rows, _z, f32(0.5), f32(1), f32(0))),
    "nll_fwd_one": (_nll._nll_fwd_one, (np.zeros(8, f32), _rows, _rows, False)),
    "nll_bwd_rows": (_nll._nll_bwd_rows, (_z, _z[:, :20].copy(), _rows, _z, True)),
}


def _kernel_assembly(name):
    """The assembly of one kernel of ``_ASM_KERNELS``, compiled afresh for this process's CPU target."""
    from numba import njit

    dispatcher, args = _ASM_KERNELS[name]
    options = dict(dispatcher.targetoptions)
    options.pop("nopython", None)
    options["cache"] = False  # Numba does not inspect code loaded from its cache
    options["parallel"] = False  # the same loops, compiled in a third of the time
    fresh = njit(**options)(dispatcher.py_func)
    fresh(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fresh.inspect_asm(fresh.signatures[0])


# A packed single-precision FMA on a 256- or 512-bit register: what LLVM emits for a vectorized loop on any x86
# machine of this project's kind (AVX2: ymm; AVX-512: zmm where the target prefers 512-bit vectors, ymm where it
# prefers 256). An operand before the register may be a memory one, e.g. ``(%rbx){1to8}``.
_WIDE_PACKED_FMA = re.compile(r"vfmadd\w*ps\s+[^\n]*%[yz]mm")


def _check_vectorized_without_library_calls(name, asm):
    assert asm.strip(), "empty assembly"
    called = re.findall(r"call\w*\s+([^\s*%]+)", asm) + re.findall(r"movabsq\s+\$([A-Za-z_]\w*)", asm)
    math_calls = {c for c in called if re.fullmatch(r"_*(exp|expf|expm1f?|pow|powf|log|logf|log1pf?)(@\w+)?", c)}
    assert math_calls <= ({"logf"} if name in ("softmax_ce_sparse_fwd", "softmax_focal_fwd") else set()), math_calls
    assert "cvtps2pd" not in asm
    assert _WIDE_PACKED_FMA.search(asm), "no packed ymm/zmm FMA: the loops did not vectorize"
    if name in ("softmax_ce_sparse_fwd", "softmax_focal_fwd"):
        from keras_stable_heads.kernels._config import PREFETCH

        # the exp pass prefetches the next row into L2 where that was measured faster (no AVX-512), and only there
        assert bool(re.search(r"prefetcht1\s", asm)) == PREFETCH, f"prefetcht1 in the forward should be {PREFETCH}"


def _host_has_avx2_fma():
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("avx2") and features.get("fma"))


@pytest.mark.skipif(not _host_has_avx2_fma(), reason="the host has no AVX2/FMA: no 256-bit vector code to look for")
@pytest.mark.parametrize("name", list(_ASM_KERNELS))
def test_kernel_loops_are_vectorized_without_library_calls(name):
    """Each kernel's loops are SIMD code (packed FMAs on ymm or zmm registers) with exp/log/pow inlined as
    polynomials: no call to expf, powf or a log (the softmax forwards take one log per row, of the row's sum,
    outside the vector loops), no float64 conversion."""
    try:
        asm = _kernel_assembly(name)
    except Exception as exc:  # pragma: no cover - depends on the Numba build
        pytest.skip(f"assembly inspection unavailable: {exc!r}")
    _check_vectorized_without_library_calls(name, asm)


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "jax",
                    reason="backend-independent and costly (a fresh process per CPU): run with the jax backend only")
@pytest.mark.parametrize("cpu", ["znver3", "znver4"])  # this project's machines: AVX2 only, and AVX-512 (zmm code)
def test_vectorization_check_holds_on_both_kinds_of_machine(cpu):
    """The assembly check passes for code compiled for either kind of machine CI may run on, whichever this
    one is: Numba compiles for ``NUMBA_CPU_NAME`` in a fresh process, and the check above reads its assembly."""
    import subprocess

    name = "softmax_ce_sparse_fwd"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_kernels_cpu as t; "
              "sys.stdout.write(t._kernel_assembly(sys.argv[2]))")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu)
    env.pop("NUMBA_CPU_FEATURES", None)  # the named CPU's own features, not this host's
    result = subprocess.run([sys.executable, "-c", script, _TESTS, name], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    _check_vectorized_without_library_calls(name, result.stdout)
    register = "zmm" if cpu == "znver4" else "ymm"
    assert re.search(r"vfmadd\w*ps\s+[^\n]*%" + register, result.stdout), f"{cpu}: expected {register} FMAs"


def test_cache_dir_selection(tmp_path):
    pkg = str(tmp_path / "pkg")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    writable = lambda path: not path.startswith(pkg)  # noqa: E731 - the installed package is read-only
    chosen = _cache.select_cache_dir(_cache.CANONICAL_NAME, pkg, env, writable)
    assert chosen == os.path.join(str(tmp_path / "xdg"), *_config.CACHE_SUBDIR)
    # a writable package keeps Numba's own choice (its __pycache__)
    assert _cache.select_cache_dir(_cache.CANONICAL_NAME, pkg, env, lambda p: True) is None
    # loaded under another name: never the package's __pycache__, a folder of its own
    other = _cache.select_cache_dir("_ksh_kernels", pkg, env, lambda p: True)
    assert other is not None and other.endswith("-as-_ksh_kernels")
    # nothing writable: None (Numba then reports it), never an exception
    assert _cache.select_cache_dir(_cache.CANONICAL_NAME, pkg, env, lambda p: False) is None
    # the real helper on a real folder
    assert _cache._writable_dir(str(tmp_path / "made" / "here"))


def test_cpu_pairs_are_built_once_per_options_and_small_calls_run_on_one_thread():
    import numba

    options = dict(ignore_class=None, label_smoothing=0.1, class_weight=[1.0, 2.0, 3.0], z_loss=0.0,
                   logit_softcap=None)
    first = _kernel_ops.cpu_pair("sparse_softmax_ce", 3, options)
    again = _kernel_ops.cpu_pair("sparse_softmax_ce", 3, dict(options, class_weight=np.array([1, 2, 3], f32)))
    assert first is again  # the same weights as a list or an array: one pair
    assert _kernel_ops.cpu_pair("sparse_softmax_ce", 3, dict(options, label_smoothing=0.2)) is not first
    threads = numba.get_num_threads()
    seen = []
    original = numba.set_num_threads
    try:
        numba.set_num_threads = lambda n: seen.append(n) or original(n)
        z = np.random.default_rng(0).standard_normal((4, 3)).astype(f32)
        loss, saved = np.empty(4, f32), np.empty((4, 1), f32)
        first.forward(z, np.array([0, 1, 2, 0], np.int32), loss, saved)
    finally:
        numba.set_num_threads = original
    assert seen == [1, threads] and numba.get_num_threads() == threads  # one thread for the call, then restored
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, [0, 1, 2, 0], label_smoothing=0.1,
                                                           class_weight=[1.0, 2.0, 3.0]), rtol=2e-6)

"""Numba CPU kernels against the float64 references in reference.py.

The kernels are imported as the installed ``keras_stable_heads.kernels``, so the suite compiles them once and
shares Numba's on-disk cache with the dispatch tests. Shapes are small except where a test is about size
(>= 65536 rows).
"""

import os
import re
import sys
import warnings

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)

import reference as ref  # noqa: E402


# The installed package's own kernels: one compilation and one cache shared with the dispatch tests.
import keras_stable_heads.kernels as K  # noqa: E402
from keras_stable_heads.kernels import _cache  # noqa: E402
from keras_stable_heads.kernels import _config  # noqa: E402
from keras_stable_heads.kernels import _simd  # noqa: E402
from keras_stable_heads.kernels import softmax_ce as _softmax  # noqa: E402

f32 = np.float32
INF = np.inf


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def sparse_run(z, y, w=None, eps=0.0, zl=0.0, cap=0.0, ignore=None, dloss=None):
    z = np.ascontiguousarray(z, dtype=f32)
    n, c = z.shape
    y = np.asarray(y, dtype=np.int32)
    w = np.ones(c, f32) if w is None else np.asarray(w, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss, lse = np.full(n, 7.0, f32), np.full(n, 7.0, f32)
    grad = np.full((n, c), 7.0, f32)
    has_ignore = ignore is not None
    ig = -1 if ignore is None else ignore
    K.softmax_ce_sparse_fwd(z, y, loss, lse, w, eps, zl, cap, ig, has_ignore)
    K.softmax_ce_sparse_bwd(z, y, lse, dloss, grad, w, eps, zl, cap, ig, has_ignore)
    return loss, lse, grad


def dense_run(z, y, w=None, eps=0.0, zl=0.0, cap=0.0, dloss=None):
    z = np.ascontiguousarray(z, dtype=f32)
    n, c = z.shape
    y = np.ascontiguousarray(y, dtype=f32)
    w = np.ones(c, f32) if w is None else np.asarray(w, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss, lse = np.full(n, 7.0, f32), np.full(n, 7.0, f32)
    grad = np.full((n, c), 7.0, f32)
    K.softmax_ce_dense_fwd(z, y, loss, lse, w, eps, zl, cap)
    K.softmax_ce_dense_bwd(z, y, lse, dloss, grad, w, eps, zl, cap)
    return loss, lse, grad


def sigmoid_run(z, y, pw=None, eps=0.0, missing=None, mean=True, dloss=None):
    z = np.ascontiguousarray(z, dtype=f32)
    n, c = z.shape
    y = np.ascontiguousarray(y, dtype=f32)
    pw = np.ones(c, f32) if pw is None else np.asarray(pw, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss = np.full(n, 7.0, f32)
    grad = np.full((n, c), 7.0, f32)
    has_missing = missing is not None
    ms = 0.0 if missing is None else missing
    K.sigmoid_ce_fwd(z, y, loss, pw, eps, ms, has_missing, mean)
    K.sigmoid_ce_bwd(z, y, dloss, grad, pw, eps, ms, has_missing, mean)
    return loss, grad


def softmax_grad_closed_form(z, ybar, w, zl, cap, dloss):
    """float64: dloss * softcap'(z) * (p (W + 2 zl lse) - w ybar)."""
    zp = ref.softcap(z, cap or None)
    _, lse = ref.log_softmax(zp)
    # p from exp(z - max) / sum: at |z| ~ 1e30 even float64 lse = max + log(sum) rounds log(sum) away
    m = np.max(zp, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore"):
        e = np.exp(zp - m)
        p = e / np.sum(e, axis=-1, keepdims=True)
    w = np.asarray(w, np.float64)
    big_w = np.sum(w * ybar, axis=-1, keepdims=True)
    slope = 1.0 - (zp / cap) ** 2 if cap else 1.0
    return np.asarray(dloss, np.float64)[:, None] * slope * (p * (big_w + 2.0 * zl * lse[:, None]) - w * ybar)


def sparse_ybar(y, c, eps):
    return (1.0 - eps) * np.eye(c)[y] + eps / c


def sigmoid_grad_closed_form(z, y, pw, eps, present, mean, dloss):
    z = np.asarray(z, np.float64)
    ybar = (1.0 - eps) * np.asarray(y, np.float64) + 0.5 * eps
    pwy = np.asarray(pw, np.float64) * ybar
    g = 1.0 / (1.0 + np.exp(-z)) * (pwy + 1.0 - ybar) - pwy
    g = np.where(present, g, 0.0)
    scale = np.asarray(dloss, np.float64)
    if mean:
        count = present.sum(-1)
        scale = np.where(count > 0, scale / np.maximum(count, 1), 0.0)
    return scale[:, None] * g


# Shapes that exercise both layouts: C <= 12 (block forward and backward), 13..32 (block forward, row
# backward), > 32 (rows), and class counts that are not multiples of the vector width.
SHAPES = [(67, 10), (40, 7), (70, 20), (9, 33), (6, 1001), (5, 1)]
OPTIONS = [  # (label_smoothing, class weights?, z_loss, softcap)
    (0.0, False, 0.0, 0.0),
    (0.1, False, 0.0, 0.0),
    (0.0, True, 0.0, 0.0),
    (0.0, False, 1e-3, 0.0),
    (0.0, False, 0.0, 5.0),
    (0.2, True, 1e-3, 0.0),
    (0.1, True, 1e-3, 5.0),
    (0.1, False, 0.0, 30.0),
]


def _opts_id(o):
    return f"eps{o[0]}-w{int(o[1])}-zl{o[2]}-cap{o[3]}"


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
# Sparse softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opts", OPTIONS, ids=_opts_id)
def test_sparse_matches_reference(shape, opts):
    eps, weighted, zl, cap = opts
    n, c = shape
    rng = np.random.default_rng(n * 1000 + c)
    z = (rng.standard_normal(shape) * 4.0).astype(f32)
    y = rng.integers(0, c, n)
    y[-1] = c - 1  # label at the last class
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    loss, lse, grad = sparse_run(z, y, w, eps, zl, cap, dloss=dloss)
    want = ref.sparse_softmax_ce(z, y, label_smoothing=eps, class_weight=w, z_loss=zl, logit_softcap=cap or None)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    _, want_lse = ref.log_softmax(ref.softcap(z, cap or None))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
    wv = np.ones(c) if w is None else w
    want_grad = softmax_grad_closed_form(z, sparse_ybar(y, c, eps), wv, zl, cap, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("c", [1, 3, 10, 20, 40])
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[6]], ids=_opts_id)
def test_sparse_grad_matches_finite_differences(c, opts):
    eps, weighted, zl, cap = opts
    rng = np.random.default_rng(c)
    n = 3
    z = (rng.standard_normal((n, c)) * 2.0).astype(f32)
    y = rng.integers(0, c, n)
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    _, _, grad = sparse_run(z, y, w, eps, zl, cap, dloss=dloss)
    numeric = ref.numeric_grad(
        lambda x: ref.sparse_softmax_ce(x, y, label_smoothing=eps, class_weight=w, z_loss=zl,
                                        logit_softcap=cap or None), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [10, 20, 33, 1001])
def test_sparse_extreme_inputs(c):
    """One row per case; every case in one batch, so a bad row cannot leak into its neighbours."""
    rng = np.random.default_rng(7 + c)
    rows, labels = [], []

    def add(row, label):
        rows.append(np.asarray(row, f32))
        labels.append(label)

    base = rng.standard_normal(c).astype(f32)
    add(base * 1e4, int(np.argmax(base)))                      # 0: +-1e4, label at the max: loss ~ 0
    add(base * 1e4, int(np.argmin(base)))                      # 1: +-1e4, label at the min: loss ~ 2e4
    add(np.where(base > 0, 1e30, -1e30), 0)                    # 2: +-1e30
    masked = base.copy()
    masked[1::2] = -np.inf                                     # 3: -inf masks odd classes
    add(masked, 0)
    add(np.full(c, -np.inf), 0)                                # 4: all -inf
    nan_row = base.copy()
    nan_row[c // 2] = np.nan                                   # 5: NaN in
    add(nan_row, 0)
    add(base, c - 1)                                           # 6: label at the last class
    add(base, -1)                                              # 7: out of range (low)
    add(base, c)                                               # 8: out of range (high)
    add(base, 0)                                               # 9: a normal row after the bad ones
    z = np.stack(rows)
    y = np.array(labels)
    loss, lse, grad = sparse_run(z, y)
    safe_y = np.clip(y, 0, c - 1)
    want = ref.sparse_softmax_ce(z, safe_y)
    good = [0, 1, 2, 3, 6, 9]
    # +-1e30: the float64 reference absorbs log(#classes at the max) into 1e30; the kernel keeps it (exact value)
    k = int(np.sum(z[2] == z[2].max()))
    want[2] = np.log(k) + (float(z[2].max()) - float(z[2, 0]))
    np.testing.assert_allclose(loss[good], want[good], rtol=1e-5, atol=5e-3)
    assert np.all(np.isfinite(loss[good])) and np.all(np.isfinite(grad[good]))
    # confident row at 1e4: the loss is ~0 with no cancellation
    assert 0.0 <= loss[0] <= 1e-3
    # masked classes: exactly zero gradient, finite loss
    assert np.all(grad[3, 1::2] == 0.0)
    # all -inf row: lse -inf, loss +inf, zero gradient
    assert lse[4] == -np.inf and loss[4] == np.inf and np.all(grad[4] == 0.0)
    # NaN in -> NaN out, for that row only
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))
    # labels out of range -> NaN loss and gradient
    assert np.all(np.isnan(loss[7:9])) and np.all(np.isnan(grad[7:9]))
    # gradients of good rows against the closed form; at +-1e4 and +-1e30 the float32 lse alone would not do
    # (1e30 + log 2 rounds to 1e30), the backward recomputes max and sum there (LSE_RECOMPUTE_ABOVE)
    want_grad = softmax_grad_closed_form(z[good], sparse_ybar(safe_y[good], c, 0.0), np.ones(c), 0.0, 0.0,
                                         np.ones(len(good)))
    np.testing.assert_allclose(grad[good], want_grad, rtol=1e-5, atol=2e-6)
    # each gradient row sums to 0 (softmax minus one-hot)
    np.testing.assert_allclose(grad[good].sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("c", [10, 20, 1001])
@pytest.mark.parametrize("opts", OPTIONS[1:], ids=_opts_id)
def test_sparse_masked_classes_with_options(c, opts):
    """-inf classes with every option: softcap keeps them masked (grad exactly 0); with label smoothing the
    loss is +inf (the smoothed target puts mass on a class of probability 0), as in the reference."""
    eps, weighted, zl, cap = opts
    rng = np.random.default_rng(c)
    z = rng.standard_normal((4, c)).astype(f32)
    z[:, 1::3] = -np.inf
    y = np.array([0, 2 % c, 0, c - 1 if (c - 1) % 3 != 1 else 0])
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    loss, _, grad = sparse_run(z, y, w, eps, zl, cap)
    want = ref.sparse_softmax_ce(z, y, label_smoothing=eps, class_weight=w, z_loss=zl, logit_softcap=cap or None)
    if eps > 0:
        assert np.all(loss == np.inf) and np.all(want == np.inf)
    else:
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    if cap > 0 or eps == 0:
        assert np.all(grad[:, 1::3] == 0.0)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("c", [10, 20, 1001])
def test_sparse_ignore_class(c):
    rng = np.random.default_rng(3)
    n = 50
    z = rng.standard_normal((n, c)).astype(f32)
    y = rng.integers(0, c, n)
    y[::3] = -100
    y[1] = c  # out of range and not ignored
    loss, lse, grad = sparse_run(z, y, eps=0.1, zl=1e-3, ignore=-100)
    ignored = y == -100
    assert np.all(loss[ignored] == 0.0) and np.all(lse[ignored] == 0.0) and np.all(grad[ignored] == 0.0)
    assert np.isnan(loss[1]) and np.all(np.isnan(grad[1]))
    keep = ~ignored & (y < c)
    want = ref.sparse_softmax_ce(z[keep], y[keep], label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(loss[keep], want, rtol=1e-5, atol=1e-6)
    # an ignore_class that is a valid class id drops exactly those rows
    loss2, _, grad2 = sparse_run(z, np.where(ignored, 0, np.minimum(y, c - 1)), ignore=0)
    assert np.all(loss2[ignored] == 0.0) and np.all(grad2[ignored] == 0.0)


def test_sparse_one_class():
    z = np.array([[3.0], [-1e30], [np.inf * -1], [0.0]], f32)
    loss, lse, grad = sparse_run(z, [0, 0, 0, 0])
    np.testing.assert_array_equal(loss[[0, 1, 3]], 0.0)
    assert loss[2] == np.inf and lse[2] == -np.inf
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_allclose(lse[[0, 1, 3]], [3.0, -1e30, 0.0])


@pytest.mark.parametrize("shape", [(65536, 10), (65536 + 37, 20), (70000, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sparse_many_rows(shape):
    n, c = shape
    rng = np.random.default_rng(n + c)
    z = (rng.standard_normal(shape) * 3.0).astype(f32)
    y = rng.integers(0, c, n)
    dloss = rng.random(n).astype(f32)
    loss, lse, grad = sparse_run(z, y, eps=0.1, dloss=dloss)
    want = ref.sparse_softmax_ce(z, y, label_smoothing=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    want_grad = softmax_grad_closed_form(z, sparse_ybar(y, c, 0.1), np.ones(c), 0.0, 0.0, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)


def test_sparse_large_class_count_accuracy():
    """Long rows: float32 partial sums over 32000 classes stay accurate."""
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((4, 32000)) * 5.0).astype(f32)
    y = rng.integers(0, 32000, 4)
    loss, lse, _ = sparse_run(z, y)
    logp, want_lse = ref.log_softmax(z)  # (sparse_softmax_ce would build a 32000 x 32000 one-hot matrix)
    np.testing.assert_allclose(loss, -logp[np.arange(4), y], rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Dense softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------------


def _dense_labels(rng, n, c):
    y = rng.random((n, c))
    y[y < 0.5] = 0.0  # zero target mass on about half of the classes
    y[:, 0] += 0.1
    return (y / y.sum(-1, keepdims=True)).astype(f32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opts", OPTIONS, ids=_opts_id)
def test_dense_matches_reference(shape, opts):
    eps, weighted, zl, cap = opts
    n, c = shape
    rng = np.random.default_rng(n * 7 + c)
    z = (rng.standard_normal(shape) * 4.0).astype(f32)
    y = _dense_labels(rng, n, c)
    w = (rng.random(c) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    loss, lse, grad = dense_run(z, y, w, eps, zl, cap, dloss=dloss)
    want = ref.softmax_ce(z, y, label_smoothing=eps, class_weight=w, z_loss=zl, logit_softcap=cap or None)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref.log_softmax(ref.softcap(z, cap or None))[1], rtol=1e-6, atol=1e-6)
    ybar = (1.0 - eps) * y.astype(np.float64) + eps / c
    wv = np.ones(c) if w is None else w
    np.testing.assert_allclose(grad, softmax_grad_closed_form(z, ybar, wv, zl, cap, dloss), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[6]], ids=_opts_id)
def test_dense_grad_matches_finite_differences(opts):
    eps, weighted, zl, cap = opts
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 6)).astype(f32)
    y = _dense_labels(rng, 3, 6)
    w = (rng.random(6) + 0.5).astype(f32) if weighted else None
    dloss = rng.standard_normal(3).astype(f32)
    _, _, grad = dense_run(z, y, w, eps, zl, cap, dloss=dloss)
    numeric = ref.numeric_grad(lambda x: ref.softmax_ce(x, y, label_smoothing=eps, class_weight=w, z_loss=zl,
                                                        logit_softcap=cap or None), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [10, 1001])
def test_dense_equals_sparse_for_one_hot(c):
    rng = np.random.default_rng(c)
    z = (rng.standard_normal((50, c)) * 3.0).astype(f32)
    y = rng.integers(0, c, 50)
    w = (rng.random(c) + 0.5).astype(f32)
    dloss = rng.random(50).astype(f32)
    ls, es, gs = sparse_run(z, y, w, 0.1, 1e-3, 5.0, dloss=dloss)
    ld, ed, gd = dense_run(z, np.eye(c, dtype=f32)[y], w, 0.1, 1e-3, 5.0, dloss=dloss)
    np.testing.assert_allclose(ld, ls, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ed, es, rtol=1e-6)
    np.testing.assert_allclose(gd, gs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c", [10, 1001])
def test_dense_extreme_inputs(c):
    rng = np.random.default_rng(c)
    base = rng.standard_normal(c).astype(f32)
    z = np.stack([base * 1e4, np.where(base > 0, 1e30, -1e30), base, base, np.full(c, -np.inf), base]).astype(f32)
    z[2, 1::2] = -np.inf  # masked classes with zero target mass: finite loss
    z[3, 1] = -np.inf     # masked class with target mass: +inf
    z[5, 2] = np.nan
    y = np.zeros((6, c), f32)
    y[:, 0] = 0.7
    y[:, -1 if c % 2 == 1 else -2] += 0.3  # an even class, not masked in row 2
    y[3, 1] = 0.2
    loss, lse, grad = dense_run(z, y)
    want = ref.softmax_ce(z, y)
    # +-1e30: exact value (the float64 reference rounds log(#classes at the max) away against 1e30)
    top = z[1].max()
    want[1] = np.sum(y[1] * ((np.float64(top) - z[1]) + np.log(np.sum(z[1] == top))))
    np.testing.assert_allclose(loss[:3], want[:3], rtol=1e-5)
    assert np.all(grad[2, 1::2] == 0.0) and np.all(np.isfinite(grad[:3]))
    assert loss[3] == np.inf == want[3]
    assert loss[4] == np.inf and lse[4] == -np.inf and np.all(grad[4] == 0.0)
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 1), (67, 10), (9, 33), (5, 1001)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("missing", [None, -1.0])
@pytest.mark.parametrize("mean", [True, False])
def test_sigmoid_matches_reference(shape, eps, weighted, missing, mean):
    n, c = shape
    rng = np.random.default_rng(n + c)
    z = (rng.standard_normal(shape) * 4.0).astype(f32)
    y = rng.integers(0, 2, shape).astype(f32)
    y[0, 0] = 0.3  # soft label
    if missing is not None:
        y[rng.random(shape) < 0.3] = missing
        y[-1] = missing  # a row with nothing present
    pw = (rng.random(c) * 3.0 + 0.2).astype(f32) if weighted else None
    dloss = rng.standard_normal(n).astype(f32)
    loss, grad = sigmoid_run(z, y, pw, eps, missing, mean, dloss=dloss)
    want = ref.multilabel_ce(z, y, pos_weight=1.0 if pw is None else pw, label_smoothing=eps,
                             missing_label=missing, label_reduction="mean" if mean else "sum")
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    present = np.ones(shape, bool) if missing is None else y != missing
    want_grad = sigmoid_grad_closed_form(z, np.where(present, y, 0.0), np.ones(c) if pw is None else pw, eps,
                                         present, mean, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    if missing is not None:
        assert loss[-1] == 0.0 and np.all(grad[-1] == 0.0) and np.all(grad[~present] == 0.0)


def test_sigmoid_binary_ce_and_finite_differences():
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((3, 5)) * 3.0).astype(f32)
    y = rng.integers(0, 2, (3, 5)).astype(f32)
    pw = (rng.random(5) + 0.5).astype(f32)
    dloss = rng.standard_normal(3).astype(f32)
    loss, grad = sigmoid_run(z, y, pw, 0.1, None, True, dloss=dloss)
    np.testing.assert_allclose(loss, ref.binary_ce(z, y, pos_weight=pw, label_smoothing=0.1), rtol=1e-5)
    numeric = ref.numeric_grad(lambda x: ref.binary_ce(x, y, pos_weight=pw, label_smoothing=0.1), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_sigmoid_extreme_inputs():
    z = np.array([[-30.0, 30.0, 1e4, -1e4, 1e30, -1e30, np.nan, 0.0]], f32)
    y = np.array([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]], f32)
    loss, grad = sigmoid_run(z, y, mean=False)
    elem = ref.sigmoid_bce_elementwise(z[:, :6], y[:, :6])
    assert np.isnan(loss[0]) and np.isnan(grad[0, 6])
    np.testing.assert_allclose(grad[0, :6], [-1.0, 1.0, 0.0, 0.0, 1.0, -1.0], atol=1e-12)
    assert grad[0, 7] == np.float32(-0.5)
    # the same entries, without the NaN: finite sum equal to the reference (30 + 30 + 0 + 0 + 1e30 + 1e30 ...)
    loss2, _ = sigmoid_run(z[:, :6], y[:, :6], mean=False)
    np.testing.assert_allclose(loss2, elem.sum(-1), rtol=1e-6)
    l30, g30 = sigmoid_run([[-30.0]], [[1.0]])
    np.testing.assert_allclose(l30, 30.0, rtol=1e-7)
    assert g30[0, 0] == -1.0


def test_sigmoid_many_rows():
    rng = np.random.default_rng(9)
    z = (rng.standard_normal((65536, 10)) * 3).astype(f32)
    y = rng.integers(0, 2, (65536, 10)).astype(f32)
    loss, grad = sigmoid_run(z, y)
    np.testing.assert_allclose(loss, ref.multilabel_ce(z, y), rtol=1e-5, atol=1e-7)
    want_grad = sigmoid_grad_closed_form(z, y, np.ones(10), 0.0, np.ones(y.shape, bool), True, np.ones(65536))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Machine code and cache
# ---------------------------------------------------------------------------------------------------------------


def test_sparse_forward_asm_has_no_scalar_exp_call():
    """The row kernel's exp must be inlined polynomial code: no call to expf/exp, no float64 conversion."""
    from numba import njit

    dispatcher = _softmax._sparse_fwd_rows
    try:
        options = dict(dispatcher.targetoptions)
        options.pop("nopython", None)
        options["cache"] = False  # Numba does not inspect code loaded from its cache
        options["parallel"] = False  # the same row loop, compiled in a third of the time
        fresh = njit(**options)(dispatcher.py_func)
        z = np.zeros((4, 40), f32)
        out = np.empty(4, f32)
        fresh(z, np.zeros(4, np.int32), out, out.copy(), np.ones(40, f32), f32(0), f32(0), f32(0), -1, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asm = fresh.inspect_asm(fresh.signatures[0])
    except Exception as exc:  # pragma: no cover - depends on the Numba build
        pytest.skip(f"assembly inspection unavailable: {exc!r}")
    assert asm.strip(), "empty assembly"
    calls = re.findall(r"call\w*\s+([^\s]+)", asm)
    assert not [c for c in calls if "exp" in c.lower()], calls
    assert "cvtps2pd" not in asm
    # the polynomial is there, vectorized
    assert re.search(r"vfmadd\w*ps\s+%[xyz]mm", asm) or re.search(r"mulps\s+%[xyz]mm", asm)


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

"""Numba CUDA kernels against the float64 references in reference.py.

Without a GPU these run on Numba's CUDA simulator (Python threads on the CPU), so they test the kernels' logic:
layouts, the online max/sum, the block reduction, every option and special value; not speed or the interop glue
(tests/test_cuda_gpu.py does that on a real GPU). With a GPU the same tests run on it.

Numba reads ``NUMBA_ENABLE_CUDASIM`` when ``numba`` is imported, which the CPU kernel tests do first; setting
``numba.config.ENABLE_CUDASIM`` as well (before ``numba.cuda`` is imported) switches the simulator on. If
``numba.cuda`` was already imported for real on a machine with no GPU, the tests run in a subprocess instead.

The blocks are shrunk (BLOCK_THREADS = 64, ITEMS_PER_THREAD = 2, ROWS_PER_BLOCK = 8) so that tiny shapes cover
several blocks, multi-step reductions, the unrolled streaming loop and its tail. The kernel modules are loaded
from ``kernels/`` under a private package name without running ``kernels/__init__.py`` (no Keras, no CPU kernels).
"""

import ctypes.util
import importlib
import os
import subprocess
import sys
import types

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)

import reference as ref  # noqa: E402


def _driver_present():
    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None


SIMULATE = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not _driver_present()
_IN_SUBPROCESS = False
if SIMULATE:
    import numba

    if "numba.cuda" in sys.modules and not hasattr(sys.modules["numba.cuda"], "simulator_init"):
        _IN_SUBPROCESS = True  # too late to switch this process to the simulator
    else:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        numba.config.ENABLE_CUDASIM = 1

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NumPy's inf/NaN warnings inside simulated kernels
    pytest.mark.filterwarnings("ignore:.*(under-utilization|copy overhead).*"),  # Numba on a GPU, tiny grids
]


def _load():
    name = "_ksh_cuda_kernels"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(os.path.dirname(_TESTS), "kernels")]
        sys.modules[name] = package
    return tuple(importlib.import_module(f"{name}.{m}") for m in ("cuda_softmax_ce", "cuda_sigmoid_ce", "_cuda_config"))


if _IN_SUBPROCESS:

    def test_simulated_in_subprocess():
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    S = G = CFG = None
else:
    S, G, CFG = _load()

f32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Kernel pairs for the bridges (keras_stable_heads._kernel_ops.cuda_pair over these modules)
# ---------------------------------------------------------------------------------------------------------------


def cuda_pair(op, num_classes, options, to_device=None):
    """keras_stable_heads._kernel_ops.cuda_pair over the kernel modules loaded here."""
    from keras_stable_heads import _kernel_ops

    return _kernel_ops.cuda_pair(op, num_classes, options, to_device=to_device, modules=(S, G))


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch, request):
    if CFG is None:  # this process cannot simulate: only test_simulated_in_subprocess runs
        if request.node.name != "test_simulated_in_subprocess":
            pytest.skip("runs in a subprocess on the CUDA simulator (numba.cuda was imported for real first)")
        yield
        return
    monkeypatch.setattr(CFG, "BLOCK_THREADS", 64)
    monkeypatch.setattr(CFG, "MIN_BLOCK_THREADS", 32)
    monkeypatch.setattr(CFG, "ITEMS_PER_THREAD", 2)
    monkeypatch.setattr(CFG, "ROWS_PER_BLOCK", 8)
    yield


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def sparse_run(z, y, w=None, eps=0.0, zl=0.0, cap=0.0, ignore=None, dloss=None, dtype=f32, stream=0):
    z = np.ascontiguousarray(z, dtype=dtype)
    n, c = z.shape
    y = np.asarray(y, dtype=np.int32)
    w = np.ones(c, f32) if w is None else np.asarray(w, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss = np.full(n, 7.0, f32)
    saved = np.full((n, S.SAVED_WIDTH), 7.0, f32)
    grad = np.full((n, c), 7.0, dtype)
    ig = -1 if ignore is None else ignore
    S.softmax_ce_sparse_fwd(z, y, loss, saved, w, eps, zl, cap, ig, ignore is not None, stream)
    S.softmax_ce_sparse_bwd(z, y, saved, dloss, grad, w, eps, zl, cap, ig, ignore is not None, stream)
    return loss, saved[:, 0] + saved[:, 1], grad


def dense_run(z, y, w=None, eps=0.0, zl=0.0, cap=0.0, dloss=None):
    z = np.ascontiguousarray(z, dtype=f32)
    n, c = z.shape
    y = np.ascontiguousarray(y, dtype=f32)
    w = np.ones(c, f32) if w is None else np.asarray(w, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss = np.full(n, 7.0, f32)
    saved = np.full((n, S.SAVED_WIDTH), 7.0, f32)
    grad = np.full((n, c), 7.0, f32)
    S.softmax_ce_dense_fwd(z, y, loss, saved, w, eps, zl, cap)
    S.softmax_ce_dense_bwd(z, y, saved, dloss, grad, w, eps, zl, cap)
    return loss, saved[:, 0] + saved[:, 1], grad


def sigmoid_run(z, y, pw=None, eps=0.0, missing=None, mean=True, dloss=None):
    z = np.ascontiguousarray(z, dtype=f32)
    n, c = z.shape
    y = np.ascontiguousarray(y, dtype=f32)
    pw = np.ones(c, f32) if pw is None else np.asarray(pw, f32)
    dloss = np.ones(n, f32) if dloss is None else np.asarray(dloss, f32)
    loss = np.full(n, 7.0, f32)
    saved = np.full((n, G.SAVED_WIDTH), 7.0, f32)
    grad = np.full((n, c), 7.0, f32)
    ms = 0.0 if missing is None else missing
    G.sigmoid_ce_fwd(z, y, loss, saved, pw, eps, ms, missing is not None, mean)
    G.sigmoid_ce_bwd(z, y, saved, dloss, grad, pw, eps, ms, missing is not None, mean)
    return loss, grad


def softmax_grad_closed_form(z, ybar, w, zl, cap, dloss):
    """float64: dloss * softcap'(z) * (p (W + 2 zl lse) - w ybar), p from exp(z' - max) / sum."""
    zp = ref.softcap(z, cap or None)
    _, lse = ref.log_softmax(zp)
    m = np.max(zp, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore"):
        e = np.exp(zp - m)
        p = e / np.sum(e, axis=-1, keepdims=True)
    w = np.asarray(w, np.float64)
    big_w = np.sum(w * ybar, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        slope = np.where(np.isneginf(zp), 0.0, 1.0 - (zp / cap) ** 2) if cap else 1.0  # 0 at a masked class
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


# (20, 10): thread per row, 3 blocks of 8 (the last partial), unrolled loop + tail;
# (3, 300): block per row, 64 threads (6-step reduction), one unrolled tile of 256 + a tail of 44.
SHAPES = [(20, 10), (3, 300)]
OPTIONS = [  # (label_smoothing, class weights?, z_loss, softcap)
    (0.0, False, 0.0, 0.0),
    (0.1, True, 0.0, 0.0),
    (0.0, False, 1e-3, 0.0),
    (0.0, False, 0.0, 5.0),
    (0.1, True, 1e-3, 5.0),
]


def _opts_id(o):
    return f"eps{o[0]}-w{int(o[1])}-zl{o[2]}-cap{o[3]}"


def _shape_id(s):
    return f"{s[0]}x{s[1]}"


# ---------------------------------------------------------------------------------------------------------------
# Host side: layouts and launch configuration
# ---------------------------------------------------------------------------------------------------------------


def test_block_threads_choice():
    assert [S.block_threads(c) for c in (1, 32, 33, 64, 65, 300)] == [0, 0, 32, 32, 64, 64]
    CFG.BLOCK_THREADS, CFG.ITEMS_PER_THREAD = 512, 8
    assert [S.block_threads(c) for c in (33, 1000, 32000, 131072)] == [32, 128, 512, 512]


def test_launch_grid_covers_many_rows():
    """A 1-D grid of N blocks (block layout) or ceil(N / ROWS_PER_BLOCK) blocks: no 65535 limit to work around."""
    seen = []

    class Kernel:
        def __getitem__(self, config):
            seen.append(config)
            return lambda *args: seen.append(args)

    S.launch(Kernel(), 70001, 300, 0, ("z",), 4)
    S.launch(Kernel(), 70001, 10, 0, ("z",), 4)
    S.launch(Kernel(), 0, 10, 0, ("z",), 4)  # no rows: no launch
    assert seen == [(70001, 64, 0, 4 * 64 * 4), ("z", False), (8751, 8, 0, 0), ("z", True)]


# ---------------------------------------------------------------------------------------------------------------
# Sparse softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
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
    np.testing.assert_allclose(lse, ref.log_softmax(ref.softcap(z, cap or None))[1], rtol=1e-6, atol=1e-6)
    wv = np.ones(c) if w is None else w
    want_grad = softmax_grad_closed_form(z, sparse_ybar(y, c, eps), wv, zl, cap, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(3, 5), (2, 40)], ids=_shape_id)
def test_sparse_grad_matches_finite_differences(shape):
    n, c = shape
    rng = np.random.default_rng(c)
    z = (rng.standard_normal(shape) * 2.0).astype(f32)
    y = rng.integers(0, c, n)
    w = (rng.random(c) + 0.5).astype(f32)
    dloss = rng.standard_normal(n).astype(f32)
    _, _, grad = sparse_run(z, y, w, 0.1, 1e-3, 5.0, dloss=dloss)
    numeric = ref.numeric_grad(
        lambda x: ref.sparse_softmax_ce(x, y, label_smoothing=0.1, class_weight=w, z_loss=1e-3, logit_softcap=5.0),
        z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [10, 300])
def test_sparse_extreme_inputs(c):
    """One row per case, all in one batch, so a bad row cannot leak into its neighbours."""
    rng = np.random.default_rng(7 + c)
    base = rng.standard_normal(c).astype(f32)
    masked = base.copy()
    masked[1::2] = -np.inf
    nan_row = base.copy()
    nan_row[c // 2] = np.nan
    cases = [
        (base * 1e4, int(np.argmax(base))),         # 0: +-1e4, label at the max: loss ~ 0
        (base * 1e4, int(np.argmin(base))),         # 1: +-1e4, label at the min: loss ~ 2e4
        (np.where(base > 0, 1e30, -1e30), 0),       # 2: +-1e30
        (masked, 0),                                # 3: -inf masks odd classes
        (np.full(c, -np.inf), 0),                   # 4: all -inf
        (nan_row, 0),                               # 5: NaN in
        (base, c - 1),                              # 6: label at the last class
        (base, -1),                                 # 7: out of range (low)
        (base, c),                                  # 8: out of range (high)
        (base + 1e4, 0),                            # 9: a common offset of 1e4 (|lse| large, spread small)
    ]
    z = np.stack([np.asarray(r, f32) for r, _ in cases])
    y = np.array([label for _, label in cases])
    loss, lse, grad = sparse_run(z, y)
    safe_y = np.clip(y, 0, c - 1)
    want = ref.sparse_softmax_ce(z, safe_y)
    good = [0, 1, 2, 3, 6, 9]
    # +-1e30: the float64 reference absorbs log(#classes at the max) into 1e30; the kernel keeps it (exact value)
    k = int(np.sum(z[2] == z[2].max()))
    want[2] = np.log(k) + (float(z[2].max()) - float(z[2, 0]))
    np.testing.assert_allclose(loss[good], want[good], rtol=1e-5, atol=5e-3)
    assert 0.0 <= loss[0] <= 1e-3
    assert np.all(grad[3, 1::2] == 0.0)
    assert lse[4] == -np.inf and loss[4] == np.inf and np.all(grad[4] == 0.0)
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))
    assert np.all(np.isnan(loss[7:9])) and np.all(np.isnan(grad[7:9]))
    # the backward uses (shift, log_sum) kept apart: p exact to float32 rounding at |lse| = 1e4 and 1e30
    want_grad = softmax_grad_closed_form(z[good], sparse_ybar(safe_y[good], c, 0.0), np.ones(c), 0.0, 0.0,
                                         np.ones(len(good)))
    np.testing.assert_allclose(grad[good], want_grad, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(grad[good].sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("c", [10, 40])
@pytest.mark.parametrize("opts", [(0.0, True, 1e-3, 5.0), (0.1, True, 1e-3, 5.0), (0.1, False, 0.0, 0.0)],
                         ids=_opts_id)
def test_sparse_masked_classes_with_options(c, opts):
    """-inf classes with every option: softcap keeps them masked (grad exactly 0); with label smoothing the loss
    is +inf (the smoothed target puts mass on a class of probability 0), as in the reference."""
    eps, weighted, zl, cap = opts
    rng = np.random.default_rng(c)
    z = rng.standard_normal((4, c)).astype(f32)
    z[:, 1::3] = -np.inf
    y = np.array([0, 2, 0, c - 1 if (c - 1) % 3 != 1 else 0])
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


@pytest.mark.parametrize("c", [10, 40])
def test_sparse_ignore_class_and_bad_labels(c):
    rng = np.random.default_rng(3)
    n = 12
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
    want_grad = softmax_grad_closed_form(z[keep], sparse_ybar(y[keep], c, 0.1), np.ones(c), 1e-3, 0.0,
                                         np.ones(keep.sum()))
    np.testing.assert_allclose(grad[keep], want_grad, rtol=1e-5, atol=2e-6)


def test_sparse_one_class():
    z = np.array([[3.0], [-1e30], [-np.inf], [0.0]], f32)
    loss, lse, grad = sparse_run(z, [0, 0, 0, 0])
    np.testing.assert_array_equal(loss[[0, 1, 3]], 0.0)
    assert loss[2] == np.inf and lse[2] == -np.inf
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_allclose(lse[[0, 1, 3]], [3.0, -1e30, 0.0])


@pytest.mark.parametrize("c", [10, 40])
def test_sparse_float16_logits(c):
    """float16 logits are read as float32 (float32 accumulation); the gradient is written as float16."""
    rng = np.random.default_rng(c + 1)
    z = (rng.standard_normal((6, c)) * 3.0).astype(np.float16)
    y = rng.integers(0, c, 6)
    dloss = rng.random(6).astype(f32)
    loss, _, grad = sparse_run(z, y, eps=0.1, dloss=dloss, dtype=np.float16)
    assert grad.dtype == np.float16
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y, label_smoothing=0.1), rtol=1e-5, atol=1e-6)
    want_grad = softmax_grad_closed_form(z, sparse_ybar(y, c, 0.1), np.ones(c), 0.0, 0.0, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-3, atol=1e-4)  # float16 rounding of the output


def test_sparse_on_a_stream():
    if not SIMULATE:  # host arrays cannot be launched on a real stream; tests/test_cuda_gpu.py uses torch streams
        pytest.skip("the simulator's stream argument; real streams are covered by tests/test_cuda_gpu.py")
    from numba import cuda

    rng = np.random.default_rng(4)
    z = rng.standard_normal((5, 40)).astype(f32)
    y = rng.integers(0, 40, 5)
    loss, _, grad = sparse_run(z, y, stream=cuda.stream())
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Dense softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------------


def _dense_labels(rng, n, c):
    y = rng.random((n, c))
    y[y < 0.5] = 0.0  # zero target mass on about half of the classes
    y[:, 0] += 0.1
    return (y / y.sum(-1, keepdims=True)).astype(f32)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3], OPTIONS[4]], ids=_opts_id)
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


def test_dense_grad_matches_finite_differences():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2, 40)).astype(f32)
    y = _dense_labels(rng, 2, 40)
    w = (rng.random(40) + 0.5).astype(f32)
    dloss = rng.standard_normal(2).astype(f32)
    _, _, grad = dense_run(z, y, w, 0.1, 1e-3, 5.0, dloss=dloss)
    numeric = ref.numeric_grad(lambda x: ref.softmax_ce(x, y, label_smoothing=0.1, class_weight=w, z_loss=1e-3,
                                                        logit_softcap=5.0), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [10, 40])
def test_dense_equals_sparse_for_one_hot(c):
    rng = np.random.default_rng(c)
    z = (rng.standard_normal((4, c)) * 3.0).astype(f32)
    y = rng.integers(0, c, 4)
    w = (rng.random(c) + 0.5).astype(f32)
    dloss = rng.random(4).astype(f32)
    ls, es, gs = sparse_run(z, y, w, 0.1, 1e-3, 5.0, dloss=dloss)
    ld, ed, gd = dense_run(z, np.eye(c, dtype=f32)[y], w, 0.1, 1e-3, 5.0, dloss=dloss)
    np.testing.assert_allclose(ld, ls, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ed, es, rtol=1e-6)
    np.testing.assert_allclose(gd, gs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c", [10, 40])
def test_dense_extreme_inputs(c):
    rng = np.random.default_rng(c)
    base = rng.standard_normal(c).astype(f32)
    z = np.stack([base * 1e4, np.where(base > 0, 1e30, -1e30), base, base, np.full(c, -np.inf), base,
                  base - 1e4]).astype(f32)
    z[2, 1::2] = -np.inf  # masked classes with zero target mass: finite loss
    z[3, 1] = -np.inf     # masked class with target mass: +inf
    z[5, 2] = np.nan
    y = np.zeros((7, c), f32)
    y[:, 0] = 0.7
    y[:, -1 if c % 2 == 1 else -2] += 0.3  # an even class, not masked in row 2
    y[3, 1] = 0.2
    loss, lse, grad = dense_run(z, y)
    want = ref.softmax_ce(z, y)
    top = z[1].max()
    want[1] = np.sum(y[1] * ((np.float64(top) - z[1]) + np.log(np.sum(z[1] == top))))
    np.testing.assert_allclose(loss[[0, 1, 2, 6]], want[[0, 1, 2, 6]], rtol=1e-5)
    assert np.all(grad[2, 1::2] == 0.0) and np.all(np.isfinite(grad[[0, 1, 2, 6]]))
    assert loss[3] == np.inf == want[3]
    assert loss[4] == np.inf and lse[4] == -np.inf and np.all(grad[4] == 0.0)
    assert np.isnan(loss[5]) and np.all(np.isnan(grad[5]))
    rows = [0, 1, 2, 6]
    want_grad = softmax_grad_closed_form(z[rows], y[rows].astype(np.float64), np.ones(c), 0.0, 0.0, np.ones(4))
    np.testing.assert_allclose(grad[rows], want_grad, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 10), (3, 300), (11, 1)], ids=_shape_id)
@pytest.mark.parametrize("eps,weighted,missing,mean", [
    (0.0, False, None, True),
    (0.1, True, None, False),
    (0.0, True, -1.0, True),
    (0.1, False, -1.0, False),
])
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
    z = (rng.standard_normal((3, 40)) * 3.0).astype(f32)
    y = rng.integers(0, 2, (3, 40)).astype(f32)
    pw = (rng.random(40) + 0.5).astype(f32)
    dloss = rng.standard_normal(3).astype(f32)
    loss, grad = sigmoid_run(z, y, pw, 0.1, None, True, dloss=dloss)
    np.testing.assert_allclose(loss, ref.binary_ce(z, y, pos_weight=pw, label_smoothing=0.1), rtol=1e-5)
    numeric = ref.numeric_grad(lambda x: ref.binary_ce(x, y, pos_weight=pw, label_smoothing=0.1), z, dloss)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_sigmoid_extreme_inputs():
    z = np.array([[-30.0, 30.0, 1e4, -1e4, 1e30, -1e30, np.nan, 0.0]], f32)
    y = np.array([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]], f32)
    loss, grad = sigmoid_run(z, y, mean=False)
    assert np.isnan(loss[0]) and np.isnan(grad[0, 6])
    np.testing.assert_allclose(grad[0, :6], [-1.0, 1.0, 0.0, 0.0, 1.0, -1.0], atol=1e-12)
    assert grad[0, 7] == np.float32(-0.5)
    loss2, _ = sigmoid_run(z[:, :6], y[:, :6], mean=False)
    np.testing.assert_allclose(loss2, ref.sigmoid_bce_elementwise(z[:, :6], y[:, :6]).sum(-1), rtol=1e-6)
    # a NaN logit in a missing entry is dropped with it
    loss3, grad3 = sigmoid_run(z, np.where(np.isnan(z), -1.0, y), missing=-1.0, mean=True)
    assert np.isfinite(loss3[0]) and grad3[0, 6] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Bridge glue on the CPU: the real bridge code around simulated kernels, with the two calls that need a GPU
# (the zero-copy view and the external stream) replaced by host equivalents
# ---------------------------------------------------------------------------------------------------------------


def _host_stream(monkeypatch, bridge):
    monkeypatch.setattr(bridge.cuda, "external_stream", lambda handle: 0, raising=False)


@pytest.mark.skipif(not SIMULATE, reason="glue test for the simulator; tests/test_cuda_gpu.py covers the GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_bridge_glue(monkeypatch, dtype):
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from keras_stable_heads.bridges import torch_cuda_bridge as bridge

    monkeypatch.setattr(bridge, "_view", lambda t: t.numpy())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    _host_stream(monkeypatch, bridge)
    rng = np.random.default_rng(8)
    z64 = rng.standard_normal((6, 40)) * 3.0
    y = rng.integers(0, 40, 6)
    dloss = rng.standard_normal(6)
    pair = cuda_pair("sparse_softmax_ce", 40, {"label_smoothing": 0.1, "z_loss": 1e-3}, to_device=np.asarray if SIMULATE else None)
    z = torch.tensor(z64, dtype=getattr(torch, dtype), requires_grad=True)
    loss = bridge.run(pair, z, torch.tensor(y))
    (loss * torch.tensor(dloss, dtype=torch.float32)).sum().backward()
    zq = z.detach().float().numpy()  # the values the kernel saw
    np.testing.assert_allclose(loss.detach().numpy(), ref.sparse_softmax_ce(zq, y, label_smoothing=0.1, z_loss=1e-3),
                               rtol=1e-5, atol=1e-6)
    assert z.grad.dtype == z.dtype
    want = softmax_grad_closed_form(zq, sparse_ybar(y, 40, 0.1), np.ones(40), 1e-3, 0.0, dloss)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(z.grad.float().numpy(), want, rtol=tol, atol=tol * 0.1)


@pytest.mark.skipif(not SIMULATE, reason="glue test for the simulator; tests/test_cuda_gpu.py covers the GPU")
def test_jax_bridge_glue_under_jit(monkeypatch):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from keras_stable_heads.bridges import jax_cuda_bridge as bridge

    monkeypatch.setattr(bridge, "_view", np.asarray)  # CPU buffers: NumPy views, writable for the outputs
    monkeypatch.setattr(bridge, "_stream", lambda ctx: 0)  # ctx.stream exists on GPU only
    rng = np.random.default_rng(9)
    z = (rng.standard_normal((5, 12)) * 2.0).astype(f32)
    y = rng.integers(0, 2, (5, 12)).astype(f32)
    y[0, :3] = -1.0
    dloss = rng.standard_normal(5).astype(f32)
    options = {"label_smoothing": 0.1, "missing_label": -1.0, "pos_weight": 2.0}
    pair = cuda_pair("sigmoid_ce", 12, options, to_device=np.asarray if SIMULATE else None)
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(bridge.run(pair, x, jnp.asarray(y)) * dloss)))
    value, grad = value_and_grad(jnp.asarray(z))
    want = ref.multilabel_ce(z, y, pos_weight=2.0, label_smoothing=0.1, missing_label=-1.0)
    np.testing.assert_allclose(float(value), np.sum(want * dloss), rtol=1e-5)
    present = y != -1.0
    want_grad = sigmoid_grad_closed_form(z, np.where(present, y, 0.0), np.full(12, 2.0), 0.1, present, True, dloss)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)

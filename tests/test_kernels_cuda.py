"""Numba CUDA kernels against the float64 references in reference.py.

Without a GPU these run on Numba's CUDA simulator (Python threads on the CPU), so they test the kernels' logic:
layouts, the online max/sum, the block reduction, every option and special value; not speed or the interop glue
(tests/test_cuda_gpu.py does that on a real GPU). With a GPU the same tests run on it.

Numba reads ``NUMBA_ENABLE_CUDASIM`` when ``numba`` is imported, which the CPU kernel tests do first; setting
``numba.config.ENABLE_CUDASIM`` as well (before ``numba.cuda`` is imported) switches the simulator on. If
``numba.cuda`` was already imported for real on a machine with no GPU, the tests run in a subprocess instead.

The blocks are shrunk (BLOCK_THREADS = 64, ITEMS_PER_THREAD = 2, ROWS_PER_BLOCK = 8) so that tiny shapes cover
several blocks, multi-step reductions, the unrolled streaming loop and its tail. The kernel modules are loaded
from ``keras_stable_heads/kernels/`` (of the package under test) under a private package name without running ``kernels/__init__.py`` (no CPU kernels), and run
through ``keras_stable_heads._kernel_ops.cuda_pair``. The checks are shared with the CPU kernels (cases.py).

The simulator runs Python, so it would accept code that Numba's CUDA target rejects (``min`` of two ints, say):
``test_kernels_compile_to_ptx`` compiles every kernel for a real GPU (sm_90 PTX, through NVVM, which needs no GPU
or driver) in a subprocess without the simulator.
"""

import ctypes.util
import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)

from keras_stable_heads import reference as ref  # noqa: E402

# The kernels' folder in the package under test (the installed one, or the checkout's).
_KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(ref.__file__)), "kernels")


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


_MODULES = ("cuda_softmax_ce", "cuda_sigmoid_ce", "cuda_softmax_focal", "cuda_nll")


def _load():
    name = "_ksh_cuda_kernels"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [_KERNELS_DIR]
        sys.modules[name] = package
    return {m: importlib.import_module(f"{name}.{m}") for m in _MODULES + ("_cuda_config",)}


if _IN_SUBPROCESS:

    def test_simulated_in_subprocess():
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    MODULES = S = G = CFG = None
else:
    MODULES = _load()
    S, G, CFG = MODULES["cuda_softmax_ce"], MODULES["cuda_sigmoid_ce"], MODULES["_cuda_config"]

import cases  # noqa: E402
from cases import FOCAL_OPTIONS, SOFTMAX_OPTIONS, opts_id, shape_id  # noqa: E402
from cases import sigmoid_grad_closed_form, softmax_grad_closed_form, sparse_ybar  # noqa: E402,F401 (test_cuda_gpu)

f32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Kernel pairs for the bridges (keras_stable_heads._kernel_ops.cuda_pair over these modules)
# ---------------------------------------------------------------------------------------------------------------


def cuda_pair(op, num_classes, options, to_device=None):
    """keras_stable_heads._kernel_ops.cuda_pair over the kernel modules loaded here."""
    from keras_stable_heads import _kernel_ops

    return _kernel_ops.cuda_pair(op, num_classes, options, to_device=to_device, modules=MODULES)


def host_pair(op, num_classes, options, stream=0):
    """cuda_pair with its stream bound, for NumPy arrays (the simulator's, or Numba's copies to a real GPU)."""
    pair = cuda_pair(op, num_classes, options, to_device=np.asarray if SIMULATE else None)
    return dataclasses.replace(pair, forward=lambda *a: pair.forward(*a, stream),
                               backward=lambda *a: pair.backward(*a, stream))


K = cases.Kernels(host_pair)


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


# (20, 10): thread per row, 3 blocks of 8 (the last partial), unrolled loop + tail;
# (3, 300): block per row, 64 threads (6-step reduction), one unrolled tile of 256 + a tail of 44.
SHAPES = [(20, 10), (3, 300)]
SHORT_OPTIONS = [SOFTMAX_OPTIONS[i] for i in (0, 2, 3, 4, 6)]
SHORT_FOCAL = [FOCAL_OPTIONS[i] for i in (0, 2, 5)]


# ---------------------------------------------------------------------------------------------------------------
# Host side: layouts, launch configuration, and code for a real GPU
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


_PTX_SCRIPT = textwrap.dedent("""
    import importlib, os, re, sys, types
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as error:
        print("no NVVM:", error)
        sys.exit(77)
    import numba.cuda.dispatcher
    from numba import cuda, types as nt

    class Device:  # device functions are compiled for the current device's compute capability: pretend an H100
        compute_capability = (9, 0)

    numba.cuda.dispatcher.get_current_device = lambda: Device()
    package = types.ModuleType("_ksh_ptx")
    package.__path__ = [sys.argv[1]]
    sys.modules["_ksh_ptx"] = package
    S, G, F, N = (importlib.import_module("_ksh_ptx." + m) for m in sys.argv[2].split(","))
    f4, b, i8 = nt.float32, nt.boolean, nt.int64
    a1, a2, i1 = nt.float32[::1], nt.float32[:, ::1], nt.int32[::1]
    kernels = {
        "sparse_fwd": (S._sparse_fwd, (a2, i1, a1, a2, a1, f4, f4, f4, i8, b, b)),
        "sparse_bwd": (S._sparse_bwd, (a2, i1, a2, a1, a2, a1, f4, f4, f4, i8, b, b)),
        "dense_fwd": (S._dense_fwd, (a2, a2, a1, a2, a1, f4, f4, f4, b)),
        "dense_bwd": (S._dense_bwd, (a2, a2, a2, a1, a2, a1, f4, f4, f4, b)),
        "sigmoid_fwd": (G._sigmoid_fwd, (a2, a2, a1, a2, a1, f4, f4, b, b, b)),
        "sigmoid_bwd": (G._sigmoid_bwd, (a2, a2, a2, a1, a2, a1, f4, f4, b, b, b)),
        "sigmoid_focal_fwd": (G._sigmoid_focal_fwd, (a2, a2, a1, a2, f4, f4, b, f4, b)),
        "sigmoid_focal_bwd": (G._sigmoid_focal_bwd, (a2, a2, a2, a1, a2, f4, f4, b, f4, b)),
        "softmax_focal_fwd": (F._softmax_focal_fwd, (a2, a2, a1, a2, f4, f4, f4, b)),
        "softmax_focal_bwd": (F._softmax_focal_bwd, (a2, a2, a2, a1, a2, f4, f4, f4, b)),
        "nll_fwd": (N._nll_fwd, (a2, a2, a1, b, b)),
        "nll_bwd": (N._nll_bwd, (a2, a2, a1, a2, b, b)),
    }
    failed = []
    for name, (kernel, signature) in kernels.items():
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        except Exception as error:
            failed.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if re.search(r"\\.f64", ptx):  # float32 kernels: float64 arithmetic would be an accidental promotion
            failed.append(f"{name}: float64 instructions in the PTX")
    print("\\n".join(failed) or f"{len(kernels)} kernels compiled")
    sys.exit(1 if failed else 0)
""")


def test_kernels_compile_to_ptx():
    """Every CUDA kernel compiles for a real GPU (the simulator runs Python and accepts code the CUDA target
    rejects), in float32 only."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, _KERNELS_DIR, ",".join(_MODULES)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 77:
        pytest.skip(f"NVVM is not available: {done.stdout.strip()[-200:]}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "12 kernels compiled" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy (the checks are in cases.py, shared with the CPU kernels)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("opts", SHORT_OPTIONS, ids=opts_id)
def test_sparse_matches_reference(shape, opts):
    cases.check_softmax_matches_reference(K, shape, opts, sparse=True)


@pytest.mark.parametrize("shape", [(3, 5), (2, 40)], ids=shape_id)
def test_sparse_grad_matches_finite_differences(shape):
    cases.check_sparse_grad_finite_differences(K, shape, SOFTMAX_OPTIONS[6])


@pytest.mark.parametrize("c", [10, 300])
def test_sparse_extreme_inputs(c):
    cases.check_sparse_extreme_inputs(K, c)


@pytest.mark.parametrize("c", [10, 40])
@pytest.mark.parametrize("opts", [(0.0, True, 1e-3, 5.0), (0.1, True, 1e-3, 5.0), (0.1, False, 0.0, 0.0)],
                         ids=opts_id)
def test_sparse_masked_classes_with_options(c, opts):
    cases.check_sparse_masked_classes_with_options(K, c, opts)


@pytest.mark.parametrize("c", [2, 40])
def test_softcap_slope_far_out(c):
    cases.check_softcap_slope_far_out(K, c)


@pytest.mark.parametrize("c", [10, 40])
def test_sparse_bad_label_on_all_masked_row(c):
    cases.check_sparse_bad_label_on_all_masked_row(K, c)


@pytest.mark.parametrize("c", [10, 40])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_zero_weight_on_masked_classes(c, sparse):
    cases.check_zero_weight_on_masked_classes(K, c, sparse)


@pytest.mark.parametrize("c", [10, 40])
def test_sparse_ignore_class_and_bad_labels(c):
    cases.check_sparse_ignore_class(K, c, 12)


def test_sparse_one_class():
    cases.check_sparse_one_class(K)


@pytest.mark.parametrize("c", [10, 40])
def test_sparse_float16_logits(c):
    """float16 logits are read as float32 (float32 accumulation); the gradient is written as float16."""
    rng = np.random.default_rng(c + 1)
    z = (rng.standard_normal((6, c)) * 3.0).astype(np.float16)
    y = rng.integers(0, c, 6)
    dloss = rng.random(6).astype(f32)
    loss, _, grad = K.sparse(z, y, eps=0.1, dloss=dloss, dtype=np.float16)
    assert grad.dtype == np.float16
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y, label_smoothing=0.1), rtol=1e-5, atol=1e-6)
    want_grad = softmax_grad_closed_form(z, sparse_ybar(y, c, 0.1), np.ones(c), 0.0, 0.0, dloss)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-3, atol=1e-4)  # float16 rounding of the output


def test_sparse_on_a_stream():
    if not SIMULATE:  # host arrays cannot be launched on a real stream; tests/test_cuda_gpu.py uses torch streams
        pytest.skip("the simulator's stream argument; real streams are covered by tests/test_cuda_gpu.py")
    from numba import cuda

    stream = cuda.stream()
    rng = np.random.default_rng(4)
    z = rng.standard_normal((5, 40)).astype(f32)
    y = rng.integers(0, 40, 5)
    loss, _, grad = cases.Kernels(lambda op, c, o: host_pair(op, c, o, stream)).sparse(z, y)
    np.testing.assert_allclose(loss, ref.sparse_softmax_ce(z, y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Dense softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("opts", [SOFTMAX_OPTIONS[0], SOFTMAX_OPTIONS[4], SOFTMAX_OPTIONS[6]], ids=opts_id)
def test_dense_matches_reference(shape, opts):
    cases.check_softmax_matches_reference(K, shape, opts, sparse=False)


def test_dense_grad_matches_finite_differences():
    cases.check_dense_grad_finite_differences(K, (2, 40), SOFTMAX_OPTIONS[6])


@pytest.mark.parametrize("c", [10, 40])
def test_dense_equals_sparse_for_one_hot(c):
    cases.check_dense_equals_sparse_for_one_hot(K, c, 4)


@pytest.mark.parametrize("c", [10, 40])
def test_dense_extreme_inputs(c):
    cases.check_dense_extreme_inputs(K, c)


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 10), (3, 300), (11, 1)], ids=shape_id)
@pytest.mark.parametrize("eps,weighted,missing,mean", [
    (0.0, False, None, True),
    (0.1, True, None, False),
    (0.0, True, -1.0, True),
    (0.1, False, -1.0, False),
])
def test_sigmoid_matches_reference(shape, eps, weighted, missing, mean):
    cases.check_sigmoid_matches_reference(K, shape, eps, weighted, missing, mean)


def test_sigmoid_binary_ce_and_finite_differences():
    cases.check_sigmoid_binary_ce_and_finite_differences(K, 40)


def test_sigmoid_extreme_inputs():
    cases.check_sigmoid_extreme_inputs(K)


def test_sigmoid_gradient_exact_for_confident_logits():
    cases.check_sigmoid_gradient_exact_for_confident_logits(K)


# ---------------------------------------------------------------------------------------------------------------
# Focal cross-entropy and regression NLLs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 10), (3, 300), (11, 1)], ids=shape_id)
@pytest.mark.parametrize("options", SHORT_FOCAL, ids=opts_id)
def test_sigmoid_focal_matches_reference(shape, options):
    cases.check_sigmoid_focal_matches_reference(K, shape, options, rows=[0, shape[0] - 1])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options", SHORT_FOCAL, ids=opts_id)
def test_softmax_focal_matches_reference(shape, options):
    cases.check_softmax_focal_matches_reference(K, shape, options, rows=[0, shape[0] - 1])


@pytest.mark.parametrize("shape", [(4, 7), (2, 40)], ids=shape_id)
def test_focal_at_gamma_zero_equals_cross_entropy(shape):
    cases.check_focal_at_gamma_zero_equals_cross_entropy(K, shape)


@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 0.0}], ids=opts_id)
def test_sigmoid_focal_extreme_inputs(options):
    cases.check_sigmoid_focal_extreme_inputs(K, options)


@pytest.mark.parametrize("c", [10, 40])
@pytest.mark.parametrize("options", [{}, {"gamma": 0.0}], ids=opts_id)
def test_softmax_focal_extreme_inputs(c, options):
    cases.check_softmax_focal_extreme_inputs(K, c, options)


@pytest.mark.parametrize("op", ["gaussian_nll", "laplace_nll"])
@pytest.mark.parametrize("rows,dim", [(20, 1), (20, 5), (3, 70)], ids=lambda v: str(v))
def test_nll_matches_reference(op, rows, dim):
    cases.check_nll_matches_reference(K, op, rows, dim)


@pytest.mark.parametrize("op", ["gaussian_nll", "laplace_nll"])
def test_nll_extreme_inputs(op):
    cases.check_nll_extreme_inputs(K, op)


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
    pair = cuda_pair("sparse_softmax_ce", 40, {"label_smoothing": 0.1, "z_loss": 1e-3},
                     to_device=np.asarray if SIMULATE else None)
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

"""The CUDA kernels through the PyTorch and JAX bridges on a real GPU (skipped without one).

Checked against the float64 references (closed-form gradients) and, where the Keras backend matches the
framework, against the portable keras.ops path (``implementation="portable"``). Uses the default block sizes,
shapes past 65535 rows, C up to 131072, a non-default torch stream, and bfloat16 inputs (computed in float32).
The bridges are called directly with ``cuda_pair`` (tests/test_kernels_cuda.py) until the dispatcher wires them.
"""

import ctypes.util
import os
import sys

import numpy as np
import pytest


def _driver_present():
    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not _driver_present():
    # Decided before numba.cuda is imported: importing it for real here would keep the simulator off in
    # tests/test_kernels_cuda.py, which runs later in the same process.
    pytest.skip("needs an NVIDIA GPU and driver", allow_module_level=True)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the GPU in this process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from keras_stable_heads import reference as ref  # noqa: E402
import test_kernels_cuda as kc  # noqa: E402  (the kernels, loaded without the simulator here, and cuda_pair)
from numba import cuda  # noqa: E402

if not cuda.is_available():
    pytest.skip("Numba finds no usable CUDA device", allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*(under-utilization|copy overhead).*")]

f32 = np.float32


def _keras_backend():
    try:
        import keras

        return keras.backend.backend()
    except Exception:  # keras missing: no portable comparison
        return None


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def _jax():
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend")
    return jax


def _torch_bridge():
    from keras_stable_heads.bridges import torch_cuda_bridge

    return torch_cuda_bridge


def _jax_bridge():
    from keras_stable_heads.bridges import jax_cuda_bridge

    return jax_cuda_bridge


def _inputs(op, n, c, seed, masked=True):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 3.0).astype(f32)
    if masked:
        z[0, 1] = -np.inf  # a masked class (with label smoothing: an infinite loss, a finite gradient)
    if op == "sparse_softmax_ce":
        y = rng.integers(0, c, n).astype(np.int32)
        y[0] = 0
    elif op == "softmax_ce":
        y = rng.dirichlet(np.ones(c), n).astype(f32)
        y[0, 1] = 0.0
    else:
        y = rng.integers(0, 2, (n, c)).astype(f32)
        z[0, 1] = -30.0 if masked else z[0, 1]
    return z, y, rng.standard_normal(n).astype(f32)


def _want(op, z, y, dloss, options):
    """float64 loss and closed-form gradient of sum(dloss * loss)."""
    n, c = z.shape
    if op == "sigmoid_ce":
        present = np.ones(z.shape, bool)
        pw = options.get("pos_weight", 1.0)
        loss = ref.multilabel_ce(z, y, pos_weight=pw, label_smoothing=options.get("label_smoothing", 0.0))
        grad = kc.sigmoid_grad_closed_form(z, y, np.broadcast_to(pw, (c,)), options.get("label_smoothing", 0.0),
                                           present, True, dloss)
        return loss, grad
    kwargs = {k: options[k] for k in ("label_smoothing", "class_weight", "z_loss", "logit_softcap") if k in options}
    eps = options.get("label_smoothing", 0.0)
    w = options.get("class_weight")
    if op == "sparse_softmax_ce":
        one_hot = np.zeros((n, c))  # (reference.sparse_softmax_ce indexes np.eye(C): 137 GB at C = 131072)
        one_hot[np.arange(n), y] = 1.0
        loss = ref.softmax_ce(z, one_hot, **kwargs)
        ybar = (1.0 - eps) * one_hot + eps / c
    else:
        ybar = (1.0 - eps) * y.astype(np.float64) + eps / c
        loss = ref.softmax_ce(z, y, **kwargs)
    grad = kc.softmax_grad_closed_form(z, ybar, np.ones(c) if w is None else w, options.get("z_loss", 0.0),
                                       options.get("logit_softcap") or 0.0, dloss)
    return loss, grad


CASES = [  # (op, n, c, options): thread layout, block layouts, > 65535 rows, C = 131072
    ("sparse_softmax_ce", 70_000, 10, {}),
    ("sparse_softmax_ce", 66_000, 100, {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 30.0}),
    ("sparse_softmax_ce", 64, 1000, {"label_smoothing": 0.1, "class_weight": np.linspace(0.5, 1.5, 1000)}),
    ("sparse_softmax_ce", 4, 131_072, {}),
    ("softmax_ce", 512, 20, {"label_smoothing": 0.1, "z_loss": 1e-3}),
    ("softmax_ce", 64, 3000, {"logit_softcap": 5.0}),
    ("sigmoid_ce", 4096, 10, {"label_smoothing": 0.1, "pos_weight": 2.0}),
    ("sigmoid_ce", 64, 3000, {}),
]


def _case_id(case):
    return f"{case[0]}-{case[1]}x{case[2]}-{'-'.join(case[3]) or 'plain'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_bridge_matches_reference(case):
    torch = _torch()
    op, n, c, options = case
    z, y, dloss = _inputs(op, n, c, n + c)
    pair = kc.cuda_pair(op, c, options)
    zt = torch.tensor(z, device="cuda", requires_grad=True)
    loss = _torch_bridge().run(pair, zt, torch.tensor(y, device="cuda"))
    (loss * torch.tensor(dloss, device="cuda")).sum().backward()
    want_loss, want_grad = _want(op, z, y, dloss, options)
    np.testing.assert_allclose(loss.detach().cpu().numpy(), want_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(zt.grad.cpu().numpy(), want_grad, rtol=2e-5, atol=2e-6)


def test_torch_bridge_on_a_side_stream_with_no_host_sync():
    torch = _torch()
    z, y, dloss = _inputs("sparse_softmax_ce", 2048, 32000, 1)
    pair = kc.cuda_pair("sparse_softmax_ce", 32000, {})
    zt = torch.tensor(z, device="cuda", requires_grad=True)
    yt, dt = torch.tensor(y, device="cuda"), torch.tensor(dloss, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call in the bridge raises
    try:
        with torch.cuda.stream(side):
            loss = _torch_bridge().run(pair, zt, yt)
            (loss * dt).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    want_loss, want_grad = _want("sparse_softmax_ce", z, y, dloss, {})
    np.testing.assert_allclose(loss.detach().cpu().numpy(), want_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(zt.grad.cpu().numpy(), want_grad, rtol=2e-5, atol=2e-6)


def test_torch_bridge_bfloat16_is_computed_in_float32():
    torch = _torch()
    z, y, dloss = _inputs("sparse_softmax_ce", 256, 5000, 2)
    pair = kc.cuda_pair("sparse_softmax_ce", 5000, {"label_smoothing": 0.1})
    zt = torch.tensor(z, device="cuda").to(torch.bfloat16).requires_grad_()
    loss = _torch_bridge().run(pair, zt, torch.tensor(y, device="cuda"))
    (loss * torch.tensor(dloss, device="cuda")).sum().backward()
    assert loss.dtype == torch.float32 and zt.grad.dtype == torch.bfloat16
    zq = zt.detach().float().cpu().numpy()
    want_loss, want_grad = _want("sparse_softmax_ce", zq, y, dloss, {"label_smoothing": 0.1})
    np.testing.assert_allclose(loss.detach().cpu().numpy(), want_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(zt.grad.float().cpu().numpy(), want_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("op", ["sparse_softmax_ce", "softmax_ce", "sigmoid_ce"])
def test_torch_bridge_matches_portable_path(op):
    if _keras_backend() != "torch":
        pytest.skip("the portable comparison for torch needs KERAS_BACKEND=torch")
    torch = _torch()
    from keras_stable_heads import ops

    n, c = 128, 5000
    z, y, dloss = _inputs(op, n, c, 3, masked=False)
    options = {"label_smoothing": 0.1} if op == "sigmoid_ce" else {"label_smoothing": 0.1, "z_loss": 1e-3}
    portable = {
        "sparse_softmax_ce": ops.softmax_cross_entropy_with_integer_labels,
        "softmax_ce": ops.softmax_cross_entropy,
        "sigmoid_ce": ops.sigmoid_multilabel_cross_entropy,
    }[op]
    results = []
    for fn in (lambda zt, yt: _torch_bridge().run(kc.cuda_pair(op, c, options), zt, yt),
               lambda zt, yt: portable(zt, yt, implementation="portable", **options)):
        zt = torch.tensor(z, device="cuda", requires_grad=True)
        loss = fn(zt, torch.tensor(y, device="cuda"))
        (loss * torch.tensor(dloss, device="cuda")).sum().backward()
        results.append((loss.detach().cpu().numpy(), zt.grad.cpu().numpy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[6]], ids=_case_id)
def test_jax_bridge_under_jit_matches_reference(case):
    jax = _jax()
    import jax.numpy as jnp

    op, n, c, options = case
    z, y, dloss = _inputs(op, n, c, n * 3 + c)
    pair = kc.cuda_pair(op, c, options)
    yj, dj = jnp.asarray(y), jnp.asarray(dloss)
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(_jax_bridge().run(pair, x, yj) * dj)))
    value, grad = step(jnp.asarray(z))
    want_loss, want_grad = _want(op, z, y, dloss, options)
    np.testing.assert_allclose(float(value), np.sum(want_loss * dloss), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-5, atol=2e-6)
    losses = jax.jit(lambda x: _jax_bridge().run(pair, x, yj))(jnp.asarray(z))  # forward only, no residuals
    np.testing.assert_allclose(np.asarray(losses), want_loss, rtol=2e-5, atol=2e-6)


def test_jax_bridge_matches_portable_path():
    if _keras_backend() != "jax":
        pytest.skip("the portable comparison for JAX needs KERAS_BACKEND=jax")
    jax = _jax()
    import jax.numpy as jnp

    from keras_stable_heads import ops

    z, y, dloss = _inputs("sparse_softmax_ce", 128, 5000, 4, masked=False)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    pair = kc.cuda_pair("sparse_softmax_ce", 5000, options)
    yj, dj = jnp.asarray(y), jnp.asarray(dloss)
    ours = jax.jit(jax.value_and_grad(lambda x: jnp.sum(_jax_bridge().run(pair, x, yj) * dj)))
    theirs = jax.jit(jax.value_and_grad(lambda x: jnp.sum(ops.softmax_cross_entropy_with_integer_labels(
        x, yj, implementation="portable", **options) * dj)))
    (v1, g1), (v2, g2) = ours(jnp.asarray(z)), theirs(jnp.asarray(z))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=2e-5, atol=2e-6)


def test_kernels_on_numba_device_arrays_and_stream():
    """The host drivers on Numba device arrays with an explicit stream, default block sizes."""
    z, y, dloss = _inputs("softmax_ce", 300, 2000, 5)
    stream = cuda.stream()
    dz, dy, dd = (cuda.to_device(a, stream=stream) for a in (z, y, dloss))
    loss = cuda.device_array(300, f32, stream=stream)
    saved = cuda.device_array((300, kc.S.SAVED_WIDTH), f32, stream=stream)
    grad = cuda.device_array((300, 2000), f32, stream=stream)
    w = cuda.to_device(np.ones(2000, f32), stream=stream)
    kc.S.softmax_ce_dense_fwd(dz, dy, loss, saved, w, 0.0, 0.0, 0.0, stream)
    kc.S.softmax_ce_dense_bwd(dz, dy, saved, dd, grad, w, 0.0, 0.0, 0.0, stream)
    got_loss, got_grad = loss.copy_to_host(stream=stream), grad.copy_to_host(stream=stream)
    stream.synchronize()
    want_loss, want_grad = _want("softmax_ce", z, y, dloss, {})
    np.testing.assert_allclose(got_loss, want_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=2e-6)


def test_dispatcher_routes_gpu_tensors_to_cuda_and_matches_portable():
    """Through the public op: values and gradients of numba_cuda equal the portable path; "auto" picks the
    kernels on torch (measured faster at every size) and the portable path on JAX (XLA measured faster)."""
    backend = _keras_backend()
    if backend not in ("torch", "jax"):
        pytest.skip("the dispatcher's CUDA path serves the torch and jax Keras backends")
    import keras

    from keras_stable_heads import dispatch
    from keras_stable_heads import ops

    rng = np.random.default_rng(21)
    z = rng.normal(0, 3, (2048, 1000)).astype(f32)
    y = rng.integers(0, 1000, 2048).astype(np.int32)
    options = {"label_smoothing": 0.1, "z_loss": 1e-4}
    if backend == "torch":
        torch = _torch()
        zt, yt = torch.tensor(z, device="cuda"), torch.tensor(y, device="cuda")
        assert dispatch.choose("sparse_softmax_ce", zt).implementation == "numba_cuda"
        results = []
        for impl in ("portable", "numba_cuda"):
            leaf = zt.clone().requires_grad_(True)
            loss = ops.softmax_cross_entropy_with_integer_labels(leaf, yt, implementation=impl, **options)
            loss.sum().backward()
            results.append((loss.detach().cpu().numpy(), leaf.grad.cpu().numpy()))
    else:
        jax = _jax()
        zj, yj = jax.device_put(z), jax.device_put(y)
        choice = dispatch.choose("sparse_softmax_ce", zj)  # XLA's fused portable path was measured faster on JAX
        assert choice.implementation == "portable" and "measured slower" in choice.reason
        results = []
        for impl in ("portable", "numba_cuda"):
            f = jax.jit(jax.value_and_grad(lambda t: keras.ops.sum(
                ops.softmax_cross_entropy_with_integer_labels(t, yj, implementation=impl, **options))))
            value, grad = f(zj)
            results.append((np.asarray(value), np.asarray(grad)))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6)

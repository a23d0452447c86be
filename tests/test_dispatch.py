"""The dispatch registry and the Numba CPU path through each backend's bridge.

The Numba path must equal the portable keras.ops path (values and gradients) on every backend, inside
model.fit with a ragged last batch; the dispatch rules (forced, automatic, fallback) each have a test."""

import keras
import numpy as np
import pytest
from keras_stable_heads import reference as ref
from conftest import value_and_grad

import keras_stable_heads as ksh
from keras_stable_heads import dispatch
from keras_stable_heads import ops

BACKEND = keras.backend.backend()

KERNEL_OPS = [
    ("sparse", ops.softmax_cross_entropy_with_integer_labels,
     [{}, {"ignore_class": -1}, {"label_smoothing": 0.1, "class_weight": "w", "z_loss": 1e-3, "logit_softcap": 5.0}]),
    ("dense", ops.softmax_cross_entropy,
     [{}, {"label_smoothing": 0.1, "class_weight": "w", "z_loss": 1e-3, "logit_softcap": 5.0}]),
    ("binary", ops.sigmoid_binary_cross_entropy, [{}, {"pos_weight": 2.0, "label_smoothing": 0.1}]),
    ("multilabel", ops.sigmoid_multilabel_cross_entropy,
     [{"missing_label": -1.0}, {"missing_label": -1.0, "pos_weight": "w", "label_reduction": "sum"}]),
    ("sigmoid_focal", ops.sigmoid_focal_cross_entropy,
     [{}, {"gamma": 0.5, "alpha": 0.25, "label_smoothing": 0.1}, {"gamma": 0.0}]),
    ("softmax_focal", ops.softmax_focal_cross_entropy, [{}, {"gamma": 3.5, "alpha": 0.5, "label_smoothing": 0.1}]),
    ("gaussian", ops.gaussian_nll, [{}, {"full": True}]),
    ("laplace", ops.laplace_nll, [{}, {"full": True}]),
]
# Relative tolerance of the loss values, numba_cpu against portable: float32 rounding, except that the focal
# kernels take a fractional power as exp(frac * log x) where the backends call powf (a few ulp of frac * log x).
VALUE_RTOL = {"sigmoid_focal": 1e-5, "softmax_focal": 1e-5}


def _inputs(kind, shape, seed=0, extreme=False):
    if kind in ("gaussian", "laplace"):
        return _nll_inputs(shape, seed, extreme)
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, shape).astype(np.float32)
    if extreme:
        # rows 0 and 1 get +-1e4 and +-1e30 (one logit per row: down the first rows)
        where = (slice(0, 2), 0) if shape[-1] == 1 else (0, slice(0, 2))
        z.reshape(-1, shape[-1])[where] = [1e4, -1e4]
        z.reshape(-1, shape[-1])[(slice(2, 4), 0) if shape[-1] == 1 else (1, slice(0, 2))] = [1e30, -1e30]
        if kind in ("sparse", "dense", "softmax_focal"):
            z.reshape(-1, shape[-1])[2, 1:3] = -np.inf
    lead = shape[:-1]
    if kind == "sparse":
        y = rng.integers(0, shape[-1], lead)
        y.reshape(-1)[2] = 0
        y.reshape(-1)[3] = -1
        return z, y
    if kind in ("dense", "softmax_focal"):
        y = np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], lead)]
        y.reshape(-1, shape[-1])[2] = np.eye(shape[-1])[0]
        if kind == "softmax_focal":  # some probability vectors
            soft = rng.dirichlet(np.ones(shape[-1]), lead).astype(np.float32)
            y = np.where(rng.random(lead + (1,)) < 0.3, soft, y)
            y.reshape(-1, shape[-1])[2] = np.eye(shape[-1])[0]
        return z, y
    y = rng.integers(0, 2, shape).astype(np.float32)
    if kind == "multilabel":
        y[rng.random(shape) < 0.2] = -1.0
    if kind == "sigmoid_focal":
        y = np.where(rng.random(shape) < 0.3, rng.random(shape), y).astype(np.float32)
        if extreme:  # confidently right and wrong at +-20 (a tiny, exact gradient) and at +-inf
            flat_z, flat_y = z.reshape(-1), y.reshape(-1)
            flat_z[6:12] = [20.0, -20.0, np.inf, -np.inf, np.inf, -np.inf]
            flat_y[6:12] = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    return z, y


def _nll_inputs(shape, seed, extreme):
    """[location, log_scale] parameters for D = shape[-1] targets, and the targets."""
    rng = np.random.default_rng(seed)
    d = shape[-1]
    params = np.concatenate([rng.normal(0, 2, shape[:-1] + (d,)), rng.normal(0, 0.5, shape[:-1] + (d,))], -1)
    targets = rng.normal(0, 2, shape[:-1] + (d,))
    if extreme:  # a residual of 1e4 and of 1e30 (its square overflows: +inf), scales of e^30 and e^-10
        flat_p, flat_t = params.reshape(-1, 2 * d), targets.reshape(-1, d)
        flat_p[0, 0], flat_p[1, 0], flat_p[2, d], flat_p[3, d] = 1e4, 1e30, 30.0, -10.0
        flat_t[3, 0] = flat_p[3, 0] + 1e-3
    return params.astype(np.float32), targets.astype(np.float32)


def _resolve(options, width):
    return {k: (list(np.linspace(0.5, 2.0, width)) if v == "w" else v) for k, v in options.items()}


@pytest.mark.parametrize("shape", [(37, 7), (5, 1001), (4, 6, 33), (65536, 10)], ids=str)
@pytest.mark.parametrize("kind,fn,option_sets", KERNEL_OPS, ids=[k[0] for k in KERNEL_OPS])
def test_numba_path_equals_portable_path(kind, fn, option_sets, shape):
    z, y = _inputs(kind, shape, extreme=len(shape) == 2 and shape[0] > 8)
    for options in option_sets:
        options = _resolve(options, shape[-1])
        if kind == "sparse" and "ignore_class" not in options:
            y = np.where(y < 0, 1, y)
        results = [value_and_grad(lambda x: fn(x, y, implementation=impl, **options), z)
                   for impl in ("portable", "numba_cpu")]
        (v0, g0), (v1, g1) = results
        np.testing.assert_allclose(v1, v0, rtol=VALUE_RTOL.get(kind, 2e-6), atol=1e-6, err_msg=str(options))
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6, err_msg=str(options))


@pytest.mark.parametrize("kind,shape", [("sigmoid_focal", (70000, 1)), ("gaussian", (65536 + 3, 1)),
                                        ("laplace", (66000, 1))], ids=str)
def test_numba_path_equals_portable_path_one_entry_per_row(kind, shape):
    """One logit (a binary head) or one target per example: the kernels' flat layout, over >= 65,536 rows."""
    fn = {"sigmoid_focal": ops.sigmoid_focal_cross_entropy, "gaussian": ops.gaussian_nll,
          "laplace": ops.laplace_nll}[kind]
    z, y = _inputs(kind, shape, seed=5, extreme=True)
    options = {"gamma": 1.5, "alpha": 0.75} if kind == "sigmoid_focal" else {"full": True}
    (v0, g0), (v1, g1) = [value_and_grad(lambda x: fn(x, y, implementation=impl, **options), z)
                          for impl in ("portable", "numba_cpu")]
    np.testing.assert_allclose(v1, v0, rtol=VALUE_RTOL.get(kind, 2e-6), atol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)


def test_numba_path_matches_reference_and_keeps_nan():
    z, y = _inputs("sparse", (64, 20), seed=3)
    y = np.where(y < 0, 1, y)
    z[5, 3] = np.nan
    loss = np.asarray(keras.ops.convert_to_numpy(
        ops.softmax_cross_entropy_with_integer_labels(z, y, implementation="numba_cpu")), np.float64)
    want = ref.sparse_softmax_ce(z, y)
    assert np.isnan(loss[5])
    keep = np.arange(64) != 5
    np.testing.assert_allclose(loss[keep], want[keep], rtol=2e-6)


def test_forced_implementation_that_cannot_run_raises():
    z = np.zeros((4096, 16))  # float64: the kernels are float32 only (and too large for the native op)
    with keras_stable_heads_float64():
        with pytest.raises(ValueError, match="float32 only"):
            ops.softmax_cross_entropy_with_integer_labels(z, np.zeros(4096, "int32"), implementation="numba_cpu")
        choice = dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(z))
        assert choice.implementation == "portable" and "float32 only" in choice.reason


def keras_stable_heads_float64():
    from keras_stable_heads import _backend

    return _backend.float64_scope()


def _without_native(monkeypatch):
    """The kernels' thresholds alone: the native op (below its own limit) is tested in test_native_choice_rules."""
    if BACKEND in dispatch.NATIVE_MAX_ELEMENTS:
        monkeypatch.setitem(dispatch.NATIVE_MAX_ELEMENTS, BACKEND, 0)


def test_auto_choice_uses_the_measured_threshold(monkeypatch):
    _without_native(monkeypatch)
    small = keras.ops.convert_to_tensor(np.zeros((2, 3), np.float32))
    large = keras.ops.convert_to_tensor(np.zeros((1024, 1024), np.float32))
    threshold = dispatch.NUMBA_MIN_ELEMENTS[BACKEND]
    if threshold is None:  # measured slower than the portable path on this backend: never automatic
        choice = dispatch.choose("sparse_softmax_ce", large)
        assert choice.implementation == "portable" and "measured slower" in choice.reason
    else:
        # exactly at the threshold the kernels run, one row fewer stays portable
        columns = next((w for w in (1024, 1000) if threshold >= w and threshold % w == 0), 1)
        rows = max(1, threshold // columns)
        at = keras.ops.zeros((rows, columns), "float32")
        assert rows * columns == threshold or threshold == 0
        assert dispatch.choose("sparse_softmax_ce", at).implementation == "numba_cpu"
        if threshold > columns:
            below = dispatch.choose("sparse_softmax_ce", keras.ops.zeros((rows - 1, columns), "float32"))
            assert below.implementation == "portable" and "threshold" in below.reason
        expected = "numba_cpu" if 6 >= threshold else "portable"
        assert dispatch.choose("sparse_softmax_ce", small).implementation == expected
        if expected == "portable":
            assert "threshold" in dispatch.choose("sparse_softmax_ce", small).reason
    # the focal losses and the NLLs: their own measured thresholds per backend (None: only when requested)
    for op in ("sigmoid_focal_ce", "softmax_focal_ce", "gaussian_nll", "laplace_nll"):
        threshold = dispatch.REGISTRY["numba_cpu"].threshold(op)
        assert threshold == dispatch.NUMBA_MIN_ELEMENTS_BY_OP[op][BACKEND]
        choice = dispatch.choose(op, large)
        if threshold is None:
            assert choice.implementation == "portable" and "not measured faster" in choice.reason, choice
        else:
            assert choice.implementation == "numba_cpu", choice
            expected = "numba_cpu" if threshold <= 6 else "portable"
            assert dispatch.choose(op, small).implementation == expected
        assert dispatch.choose(op, large, "numba_cpu").implementation == "numba_cpu"


def test_environment_variable_and_keyword(monkeypatch):
    large = keras.ops.convert_to_tensor(np.zeros((1024, 1024), np.float32))
    monkeypatch.setenv(dispatch.ENV_VAR, "portable")
    assert dispatch.choose("sparse_softmax_ce", large).implementation == "portable"
    assert dispatch.choose("sparse_softmax_ce", large, "numba").implementation == "numba_cpu"  # keyword wins
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.choose("sparse_softmax_ce", large)
    with pytest.raises(ValueError, match="implementation"):
        ksh.StableSparseSoftmaxCE(implementation="gpu")


def test_explain_names_the_choice_and_reason(monkeypatch):
    _without_native(monkeypatch)
    y = np.zeros(1024, "int32")
    z = np.zeros((1024, 1024), np.float32)
    choice = ksh.explain(ksh.StableSparseSoftmaxCE(implementation="numba_cpu"), y, z)
    assert choice.implementation == "numba_cpu" and choice.reason == "requested"
    auto = ksh.explain(ksh.StableSparseSoftmaxCE(), y, z)
    threshold = dispatch.NUMBA_MIN_ELEMENTS[BACKEND]
    assert auto.implementation == ("portable" if threshold is None or z.size < threshold else "numba_cpu")
    assert "1024x1024" in str(auto) or "measured slower" in str(auto) or "threshold" in str(auto)
    assert ksh.explain(ksh.StableSparseSoftmaxCE(implementation="portable"), y, z).implementation == "portable"
    assert "only the portable" in ksh.explain(keras.losses.MeanSquaredError(), z, z).reason
    assert ksh.explain(ksh.GaussianNLL(implementation="numba_cpu"), z[:, :1], z[:, :2]).implementation == "numba_cpu"
    focal = ksh.explain(ksh.StableSoftmaxFocalCE(), z, z)
    if dispatch.NUMBA_MIN_ELEMENTS_BY_OP["softmax_focal_ce"][BACKEND] is None:
        assert focal.implementation == "portable" and "not measured faster" in focal.reason
    else:
        assert focal.implementation == "numba_cpu" and "1024x1024" in focal.reason


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_numba_path_equals_portable_path(jit_compile):
    """A ragged last batch (unknown batch size); under XLA/torch.compile the auto choice falls back."""
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile is covered by test_training.py; here it would only re-test the fallback")
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 8)).astype("float32")
    y = rng.integers(0, 64, 300)
    histories = []
    for impl in ("portable", "numba_cpu" if not jit_compile else "auto"):
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile,
                      loss=ksh.StableSparseSoftmaxCE(label_smoothing=0.1, implementation=impl))
        histories.append(model.fit(x, y, epochs=3, batch_size=128, verbose=0, shuffle=False).history["loss"])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)


FIT_LOSSES = {  # (loss class and options, units, labels)
    "binary_focal": (lambda impl: ksh.StableBinaryFocalCE(gamma=2.0, alpha=0.25, label_smoothing=0.1,
                                                          implementation=impl), 3, "binary"),
    "softmax_focal": (lambda impl: ksh.StableSoftmaxFocalCE(gamma=1.5, label_smoothing=0.1, implementation=impl), 40,
                      "one_hot"),
    "gaussian": (lambda impl: ksh.GaussianNLL(full=True, implementation=impl), 2, "real"),
    "laplace": (lambda impl: ksh.LaplaceNLL(implementation=impl), 4, "real"),
}


@pytest.mark.parametrize("name", list(FIT_LOSSES))
def test_fit_with_new_kernels_equals_portable_path(name):
    """model.fit with each focal / NLL loss on its kernels: the same loss history as the portable path (ragged
    last batch), and the model learns."""
    make_loss, units, kind = FIT_LOSSES[name]
    rng = np.random.default_rng(10)
    x = rng.normal(size=(300, 8)).astype("float32")
    signal = x[:, :1] * 2.0
    if kind == "binary":
        y = (x[:, :3] + 0.3 * rng.normal(size=(300, 3)) > 0).astype("float32")
    elif kind == "one_hot":
        y = np.eye(units, dtype="float32")[np.argmax(x[:, :4], axis=1)]
    else:
        y = (signal + 0.1 * rng.normal(size=(300, 1)) * np.ones((1, units // 2))).astype("float32")
    histories = []
    for impl in ("portable", "numba_cpu"):
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=make_loss(impl))
        histories.append(model.fit(x, y, epochs=4, batch_size=128, verbose=0, shuffle=False).history["loss"])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    assert histories[1][-1] < histories[1][0]


def test_tensorflow_xla_context_falls_back():
    if BACKEND != "tensorflow":
        pytest.skip("XLA context detection is TensorFlow's")
    import tensorflow as tf

    seen = []

    @tf.function(jit_compile=True)
    def step(z):
        seen.append(dispatch.choose("sparse_softmax_ce", z))
        return ops.softmax_cross_entropy_with_integer_labels(z, tf.zeros([4096], tf.int32))

    step(tf.zeros([4096, 64]))
    assert seen[0].implementation == "portable" and "XLA" in seen[0].reason
    with pytest.raises(ValueError, match="XLA"):
        tf.function(jit_compile=True)(
            lambda z: ops.softmax_cross_entropy_with_integer_labels(z, tf.zeros([8], tf.int32), implementation="numba"))(
            tf.zeros([8, 4]))


def test_distribution_scopes_take_the_portable_path():
    """A host kernel cannot be sharded: under a tf.distribute strategy or a keras.distribution the auto choice is
    the portable path (torch DDP runs one process per replica, where the kernels are valid)."""
    large = np.zeros((1024, 1024), np.float32)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
            choice = dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(large))
        assert choice.implementation == "portable" and "tf.distribute" in choice.reason
    elif BACKEND == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        try:
            choice = dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(large))
        finally:
            keras.distribution.set_distribution(None)
        assert choice.implementation == "portable" and "keras.distribution" in choice.reason
    else:  # torch
        assert dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(large)).implementation == "numba_cpu"


@pytest.mark.skipif(BACKEND != "jax", reason="jax.vmap")
def test_numba_cpu_under_jax_vmap_equals_portable():
    """The JAX bridge's buffer callbacks run once per batch member under vmap (the kernels take one matrix)."""
    import jax

    rng = np.random.default_rng(3)
    z = (rng.standard_normal((3, 6, 7)) * 4).astype(np.float32)
    y = rng.integers(0, 7, (3, 6)).astype(np.int32)

    def grads(implementation):
        def total(z, y):
            return ops.softmax_cross_entropy_with_integer_labels(z, y, implementation=implementation).sum()

        return np.asarray(jax.jit(jax.vmap(jax.value_and_grad(total)))(z, y)[1])

    np.testing.assert_allclose(grads("numba_cpu"), grads("portable"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Reused gradient buffers (torch and TensorFlow bridges; XLA allocates JAX's)
# ---------------------------------------------------------------------------------------------------------------


def test_buffer_pool_reuses_an_array_only_once_nothing_else_holds_it():
    from keras_stable_heads.bridges._memory import MIN_BYTES, BufferPool

    pool = BufferPool(max_pooled=2)
    shape = (1024, MIN_BYTES // 4096 + 1)  # just over the size worth pooling
    a = pool.empty(shape)
    address = a.ctypes.data
    holder = [a]  # a framework tensor's reference
    del a
    b = pool.empty(shape)
    assert b.ctypes.data != address  # still held: a new array
    assert b.ctypes.data % 64 == 0 and b.shape == shape and b.dtype == np.float32
    holder.clear()
    c = pool.empty(shape)
    assert c.ctypes.data == address  # released: reused
    small = pool.empty((4, 4))
    assert small.shape == (4, 4) and pool.empty((4, 4)) is not small  # small arrays are not pooled
    assert BufferPool(max_pooled=0).empty(shape) is not BufferPool(max_pooled=0).empty(shape)


def _held_gradient(x, y):
    """The backend's own gradient tensor of sum(loss) through the numba_cpu bridge (not copied)."""
    fn = lambda z: ops.softmax_cross_entropy_with_integer_labels(z, y, implementation="numba_cpu")  # noqa: E731
    if BACKEND == "torch":
        import torch

        z = torch.tensor(x, requires_grad=True)
        fn(z).sum().backward()
        return z.grad
    import tensorflow as tf

    z = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = tf.reduce_sum(fn(z))
    return tape.gradient(loss, z)


@pytest.mark.skipif(BACKEND == "jax", reason="XLA allocates the gradient buffers on JAX")
def test_reused_gradient_buffers_never_overwrite_a_held_gradient():
    rng = np.random.default_rng(11)
    n, c = 1024, 2200  # 9 MB of float32: pooled
    xs = [(rng.standard_normal((n, c)) * 3).astype(np.float32) for _ in range(3)]
    y = rng.integers(0, c, n).astype(np.int32)
    want = [value_and_grad(lambda z: ops.softmax_cross_entropy_with_integer_labels(z, y, implementation="portable"),
                           x)[1] for x in xs]
    g0 = _held_gradient(xs[0], y)
    g1 = _held_gradient(xs[1], y)  # g0 is held: its buffer must not be written
    np.testing.assert_allclose(np.asarray(g0), want[0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(g1), want[1], rtol=1e-5, atol=1e-9)
    address = g0.data_ptr() if BACKEND == "torch" else None
    del g0
    g2 = _held_gradient(xs[2], y)  # may reuse g0's buffer, never g1's
    np.testing.assert_allclose(np.asarray(g1), want[1], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(g2), want[2], rtol=1e-5, atol=1e-9)
    if address is not None:
        assert g2.data_ptr() == address  # the released buffer was reused: no fresh pages


NATIVE_CASES = [("sparse", "sparse_softmax_ce", ops.softmax_cross_entropy_with_integer_labels,
                 [{}, {"ignore_class": -1}, {"ignore_class": 0}]),
                ("dense", "softmax_ce", ops.softmax_cross_entropy, [{}])]
NATIVE_HERE = dispatch.NATIVE_OPS.get(BACKEND, {})


@pytest.mark.parametrize("shape", [(37, 7), (5, 1001), (4, 6, 33), (300, 10)], ids=str)
@pytest.mark.parametrize("kind,op,fn,option_sets", NATIVE_CASES, ids=[k[0] for k in NATIVE_CASES])
def test_native_path_equals_portable_path(kind, op, fn, option_sets, shape):
    """The backend's own op gives the portable path's values and gradients, extreme rows included (a row with
    -inf logits and a zero label on them makes the native op NaN: the portable path recomputes those calls)."""
    if op not in NATIVE_HERE:
        pytest.skip(f"no native {op} on {BACKEND}")
    z, y = _inputs(kind, shape, extreme=len(shape) == 2 and shape[0] > 8)
    if kind == "dense":  # labels that do not sum to 1 too: the gradient is p * sum(y) - y
        y = y * np.linspace(0.5, 1.5, shape[-1], dtype=np.float32)
    for options in option_sets:
        labels = np.where(y < 0, options.get("ignore_class", 1), y) if kind == "sparse" else y
        results = [value_and_grad(lambda x: fn(x, labels, implementation=impl, **options), z)
                   for impl in ("portable", "native")]
        (v0, g0), (v1, g1) = results
        np.testing.assert_allclose(v1, v0, rtol=2e-6, atol=1e-6, err_msg=str(options))
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6, err_msg=str(options))


@pytest.mark.skipif(not NATIVE_HERE, reason="no native op registered for this backend")
def test_native_path_gives_the_package_semantics_where_its_formula_is_nan():
    z = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 2.0], [1.0, 2.0, 3.0]], np.float32)
    y = np.array([0, 2, 1])
    cases = {"sparse_softmax_ce": (ops.softmax_cross_entropy_with_integer_labels, y),
             "softmax_ce": (ops.softmax_cross_entropy, np.eye(3, dtype=np.float32)[y])}
    for fn, labels in (cases[op] for op in NATIVE_HERE):
        native, grad_native = value_and_grad(lambda x: fn(x, labels, implementation="native"), z)
        portable, grad_portable = value_and_grad(lambda x: fn(x, labels, implementation="portable"), z)
        assert native[0] == np.inf and np.isfinite(native[1:]).all()
        np.testing.assert_allclose(native, portable, rtol=2e-6)
        np.testing.assert_allclose(grad_native, grad_portable, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(native[1:], ref.sparse_softmax_ce(z[1:], y[1:]), rtol=2e-6)


def test_native_choice_rules():
    small = keras.ops.convert_to_tensor(np.zeros((32, 10), np.float32))
    large = keras.ops.convert_to_tensor(np.zeros((1024, 1024), np.float32))
    if not NATIVE_HERE:
        with pytest.raises(ValueError, match="does not serve"):
            dispatch.choose("sparse_softmax_ce", small, "native")
        assert dispatch.choose("sparse_softmax_ce", small).implementation != "native"
        return
    if dispatch.REGISTRY["native"].threshold("sparse_softmax_ce") is None:  # measured, not faster: on request only
        choice = dispatch.choose("sparse_softmax_ce", small)
        assert choice.implementation != "native" and "native was measured slower" in choice.reason
        assert dispatch.choose("sparse_softmax_ce", small, "native").implementation == "native"
        return
    limit = dispatch.NATIVE_MAX_ELEMENTS[BACKEND]
    assert dispatch.choose("sparse_softmax_ce", small).implementation == "native"
    dense = "native" if "softmax_ce" in NATIVE_HERE else "portable"
    assert dispatch.choose("softmax_ce", small).implementation == dense
    if dense == "portable":
        with pytest.raises(ValueError, match="no native op"):
            dispatch.choose("softmax_ce", small, "native")
    assert dispatch.choose("sparse_softmax_ce", keras.ops.zeros((limit // 8, 8), "float32")).implementation != "native"
    assert dispatch.choose("sparse_softmax_ce", keras.ops.zeros((limit // 8 - 1, 8), "float32")).implementation == "native"
    assert dispatch.choose("sparse_softmax_ce", large).implementation == (
        "numba_cpu" if large.shape[0] * large.shape[1] >= dispatch.NUMBA_MIN_ELEMENTS[BACKEND] else "portable")
    # options it does not compute as this package does: never chosen, and forcing it says why
    smoothed = {"label_smoothing": 0.1, "ignore_class": None, "class_weight": None, "z_loss": 0.0, "logit_softcap": None}
    assert dispatch.choose("sparse_softmax_ce", small, None, smoothed).implementation != "native"
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.softmax_cross_entropy_with_integer_labels(small, np.zeros(32, "int32"), label_smoothing=0.1,
                                                      implementation="native")
    assert dispatch.choose("sigmoid_ce", small).implementation != "native"
    explained = ksh.explain(ksh.StableSparseSoftmaxCE(), np.zeros(32, "int32"), np.zeros((32, 10), np.float32))
    assert explained.implementation == "native" and "cross_entropy" in explained.reason
    assert ksh.explain(ksh.StableSparseSoftmaxCE(z_loss=1e-4), np.zeros(32, "int32"),
                       np.zeros((32, 10), np.float32)).implementation != "native"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's graph and XLA modes")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_native_tensorflow_op_in_compiled_functions(jit_compile):
    """Inside tf.function (and XLA) the native op runs, and tf.cond hands the batches its formula would get wrong
    to the portable path: an all -inf row (+inf), an out-of-range label (NaN in a compiled step)."""
    import tensorflow as tf

    rng = np.random.default_rng(7)
    z = rng.normal(0, 3, (40, 9)).astype(np.float32)
    z[3, 0] = 1e30
    y = rng.integers(0, 9, 40)
    y[5] = -1  # ignored with ignore_class=-1

    def loss_and_grad(implementation, labels, logits, **options):
        x = tf.convert_to_tensor(logits)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = ops.softmax_cross_entropy_with_integer_labels(x, labels, implementation=implementation, **options)
            total = tf.reduce_sum(tf.where(tf.math.is_finite(loss), loss, 0.0))
        return loss, tape.gradient(total, x)

    compiled = tf.function(loss_and_grad, jit_compile=jit_compile, reduce_retracing=True)
    for labels, logits, options in ((y, z, {"ignore_class": -1}), (np.where(y < 0, 0, y), z, {})):
        got = [np.asarray(t) for t in compiled("native", tf.constant(labels), logits, **options)]
        want = [np.asarray(t) for t in loss_and_grad("portable", labels, logits, **options)]
        np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    # the exact path's answers, from inside the compiled function
    all_neg_inf = z.copy()
    all_neg_inf[2] = -np.inf
    loss, _ = compiled("native", tf.constant(np.where(y < 0, 0, y)), all_neg_inf)
    assert np.asarray(loss)[2] == np.inf and np.isfinite(np.asarray(loss)[3:]).all()
    bad = np.where(y < 0, 0, y)
    bad[7] = 9
    loss, _ = compiled("native", tf.constant(bad), z)
    assert np.isnan(np.asarray(loss)[7]) and np.isfinite(np.delete(np.asarray(loss), 7)).all()

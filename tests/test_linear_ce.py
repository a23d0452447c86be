"""The fused linear cross-entropy (keras_stable_heads.linear_ce) and its Keras head, loss and metric, on the current
backend: float64 references and gradient checks, equality to the unfused path, chunking, extremes, precision,
argument errors, compiled code, and training through ``fit``."""

import dataclasses
import os
import tempfile

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

import keras_stable_heads as ksh
from keras_stable_heads import _backend
from keras_stable_heads import linear_ce
from keras_stable_heads import ops
from keras_stable_heads import reference as ref
from keras_stable_heads.testing import check_gradients

OPTIONS = {
    "plain": {},
    "ignore": {"ignore_class": -1},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"logit_softcap": 2.0},
    "all": {"ignore_class": -1, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 3.0},
}

fused = linear_ce.linear_softmax_cross_entropy_with_integer_labels


def _problem(rng, leading=(2, 7), dim=5, classes=11, ignore=True):
    hidden = rng.normal(size=leading + (dim,))
    kernel = rng.normal(size=(dim, classes))
    bias = rng.normal(size=classes)
    labels = rng.integers(0, classes, leading)
    if ignore:
        labels.reshape(-1)[[1, 4]] = -1
    return hidden, kernel, bias, labels


def _compiled(fn):
    """``fn`` compiled once (``jax.jit``, ``tf.function(jit_compile=True)``): a gradient check calls it ~100 times,
    and eagerly each call would run the chunk loop op by op (torch runs it eagerly, as Keras does)."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    return fn


def _grads(fn, args, index):
    """d sum(fn(*args)) / d args[index] through the backend's autodiff, float64 NumPy."""

    def scalar(x):
        values = list(args)
        values[index] = x
        return keras.ops.sum(fn(*values))

    with _backend.float64_scope():
        if BACKEND == "jax":  # jit outside the gradient: eagerly every call retraces the chunk loop
            import jax

            value, grad = jax.jit(jax.value_and_grad(scalar))(np.asarray(args[index]))
            return np.asarray(value), np.asarray(grad, dtype=np.float64)
        return _backend.value_and_grad(scalar, np.asarray(args[index]))


# ----------------------------------------------------------------------------------------------------------------
# The op against the float64 reference, and against the unfused path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("chunk_size", [4, None])  # 14 tokens, 11 classes: 4 divides neither
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_loss_matches_float64_reference(name, chunk_size, transpose_kernel):
    options = OPTIONS[name]
    rng = np.random.default_rng(1)
    hidden, kernel, bias, labels = _problem(rng, ignore="ignore_class" in options)
    if "ignore_class" not in options:
        labels = np.abs(labels)
    k = kernel.T if transpose_kernel else kernel
    loss = _compiled(lambda h, k, b: fused(h, k, labels, bias=b, transpose_kernel=transpose_kernel,
                                           chunk_size=chunk_size, **options))(
        hidden.astype("float32"), k.astype("float32"), bias.astype("float32"))
    assert tuple(loss.shape) == labels.shape and keras.backend.standardize_dtype(loss.dtype) == "float32"
    expected = ref.linear_sparse_softmax_ce(hidden, kernel, labels, bias=bias, **options)
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("path", ["per_token", "reduced"])
def test_float64_gradients_of_hidden_kernel_and_bias(name, path):
    """Autodiff (the fused backward) against central differences, for all three inputs, every option."""
    options = dict(OPTIONS[name], chunk_size=3)
    rng = np.random.default_rng(2)
    hidden, kernel, bias, labels = _problem(rng, leading=(5,), dim=3, classes=7, ignore=False)
    labels[2] = -1 if "ignore_class" in options else labels[2]
    weights = rng.uniform(0.2, 1.5, size=5)

    def op(h, k, b):
        if path == "per_token":
            return fused(h, k, labels, bias=b, **options)
        return linear_ce.weighted_sum(h, k, labels, weights, bias=b, **options)[0]

    # one check over (hidden, kernel, bias) flattened together: every entry of all three, one compiled function
    shapes = [hidden.shape, kernel.shape, bias.shape]
    sizes = [int(np.prod(shape)) for shape in shapes]
    offsets = np.cumsum([0] + sizes)

    def fn(flat):
        parts = [keras.ops.reshape(flat[offsets[i]:offsets[i + 1]], shapes[i]) for i in range(3)]
        return op(*parts)

    result = check_gradients(_compiled(fn), np.concatenate([hidden.ravel(), kernel.ravel(), bias.ravel()]),
                             rtol=1e-6, atol=1e-9)
    name = ["hidden", "kernel", "bias"][int(np.searchsorted(offsets, result.where[0], side="right")) - 1]
    assert result.ok, f"worst at {name}: {result}"


def test_float64_gradient_of_a_tied_kernel_without_bias():
    rng = np.random.default_rng(3)
    hidden, kernel, _, labels = _problem(rng, leading=(2, 3), dim=3, classes=6, ignore=False)
    embedding = kernel.T  # (V, D)
    for fn in (lambda e: fused(hidden, e, labels, transpose_kernel=True, chunk_size=4, label_smoothing=0.1),
               lambda e: linear_ce.weighted_sum(hidden, e, labels, np.ones(6), transpose_kernel=True, chunk_size=4)[0]):
        result = check_gradients(_compiled(fn), embedding)
        assert result.ok, str(result)


@pytest.mark.parametrize("implementation", [None, "portable"])
@pytest.mark.parametrize("name", ["plain", "all"])
def test_equals_the_unfused_op_loss_and_gradients(name, implementation):
    """The fused op == softmax_cross_entropy_with_integer_labels(hidden @ kernel + bias) on this backend, with each
    chunk's softmax as "auto" picks it (the Numba kernels on torch and TensorFlow) or in keras.ops."""
    if BACKEND == "jax" and implementation == "portable":
        pytest.skip("on JAX 'auto' is the portable path")
    options = dict(OPTIONS[name], implementation=implementation)
    rng = np.random.default_rng(4)
    hidden, kernel, bias, labels = _problem(rng, ignore="ignore_class" in options)
    labels = labels if "ignore_class" in options else np.abs(labels)
    args = [a.astype("float32") for a in (hidden, kernel, bias)]

    def fused_fn(h, k, b):
        return fused(h, k, labels, bias=b, chunk_size=3, **options)

    def unfused_fn(h, k, b):
        z = keras.ops.add(keras.ops.matmul(h, k), b)
        return ops.softmax_cross_entropy_with_integer_labels(z, labels, **OPTIONS[name])

    np.testing.assert_allclose(to_numpy(fused_fn(*args)), to_numpy(unfused_fn(*args)), rtol=1e-5, atol=1e-6)
    for index in range(3):
        _, got = _grads(fused_fn, args, index)
        _, want = _grads(unfused_fn, args, index)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_reduced_path_equals_weighted_per_token_path_and_counts_accuracy():
    rng = np.random.default_rng(5)
    hidden, kernel, bias, labels = _problem(rng, leading=(3, 5), classes=9)
    weights = rng.uniform(0.0, 2.0, size=labels.shape)
    args = [a.astype("float32") for a in (hidden, kernel, bias)]
    options = dict(ignore_class=-1, label_smoothing=0.05, chunk_size=4)

    def reduced(h, k, b):
        return linear_ce.weighted_sum(h, k, labels, weights, bias=b, **options)[0]

    def weighted(h, k, b):
        return keras.ops.sum(fused(h, k, labels, bias=b, **options) * keras.ops.convert_to_tensor(weights, "float32"))

    value, correct = linear_ce.weighted_sum(*args[:2], labels, weights, bias=args[2], accuracy=True, **options)
    np.testing.assert_allclose(to_numpy(value), to_numpy(weighted(*args)), rtol=1e-5)
    for index in range(3):
        np.testing.assert_allclose(_grads(reduced, args, index)[1], _grads(weighted, args, index)[1], rtol=1e-4,
                                   atol=1e-6)
    logits = hidden @ kernel + bias
    hits = (np.argmax(logits, -1) == labels) * weights
    np.testing.assert_allclose(to_numpy(correct), hits.sum(), rtol=1e-5)


def test_accuracy_takes_the_first_class_on_ties_like_argmax():
    labels = np.array([0, 3, 2])
    hidden, kernel = np.ones((3, 2), "float32"), np.zeros((2, 4), "float32")  # every logit 0: argmax is class 0
    _, correct = linear_ce.weighted_sum(hidden, kernel, labels, np.ones(3), accuracy=True)
    assert float(to_numpy(correct)) == 1.0


def test_no_gradient_work_without_a_gradient(monkeypatch):
    """The reduced op computes gradients in its forward only when they are taken (evaluate stays cheap)."""
    calls = []
    original = linear_ce._chunk_backward
    monkeypatch.setattr(linear_ce, "_chunk_backward", lambda *a: calls.append(1) or original(*a))
    rng = np.random.default_rng(6)
    hidden, kernel, bias, labels = (a.astype("float32") if a.dtype.kind == "f" else a
                                    for a in _problem(rng, ignore=False))
    weights = np.full(labels.shape, 0.1, "float32")
    if BACKEND == "jax":
        import jax

        jax.jit(lambda h: linear_ce.weighted_sum(h, kernel, labels, weights, bias=bias)[0])(hidden)
    else:
        linear_ce.weighted_sum(hidden, kernel, labels, weights, bias=bias)
    assert not calls
    _grads(lambda h, k, b: linear_ce.weighted_sum(h, k, labels, weights, bias=b)[0], [hidden, kernel, bias], 1)
    assert calls


@pytest.mark.parametrize("reduced", [False, True])
def test_frozen_kernel_skips_its_gradient(monkeypatch, reduced):
    """kernel_grad=False (a frozen kernel, e.g. under LoRA): the same loss and hidden/bias gradients, no kernel
    gradient (None, read as zero), and no kernel-gradient matmul in the chunk loop."""
    rng = np.random.default_rng(8)
    hidden, kernel, bias, labels = _problem(rng, ignore=False)
    args = [a.astype("float32") for a in (hidden, kernel, bias)]
    weights = rng.uniform(0.5, 1.5, labels.shape).astype("float32")
    calls = []
    original = linear_ce._glue.dot_add
    counting = dataclasses.replace(linear_ce._glue, dot_add=lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(linear_ce, "_glue", counting)

    def loss(kernel_grad):
        if reduced:
            return lambda h, k, b: linear_ce.weighted_sum(h, k, labels, weights, bias=b, chunk_size=4,
                                                          kernel_grad=kernel_grad)[0]
        return lambda h, k, b: fused(h, k, labels, bias=b, chunk_size=4, kernel_grad=kernel_grad)

    np.testing.assert_allclose(to_numpy(loss(False)(*args)), to_numpy(loss(True)(*args)), rtol=1e-6)
    for index in (0, 2):
        np.testing.assert_allclose(_grads(loss(False), args, index)[1], _grads(loss(True), args, index)[1],
                                   rtol=1e-6, atol=1e-7)
    del calls[:]
    if BACKEND == "tensorflow":  # a gradient of None for the kernel
        import tensorflow as tf

        k = tf.constant(args[1])
        with tf.GradientTape() as tape:
            tape.watch(k)
            value = keras.ops.sum(loss(False)(args[0], k, args[2]))
        assert tape.gradient(value, k) is None
    elif BACKEND == "torch":
        import torch

        k = torch.tensor(args[1], requires_grad=True)
        value = keras.ops.sum(loss(False)(torch.tensor(args[0], requires_grad=True), k, torch.tensor(args[2])))
        assert torch.autograd.grad(value, k, allow_unused=True) == (None,)
    else:  # JAX reads None as a zero cotangent
        assert not np.any(_grads(loss(False), args, 1)[1])
    assert not calls
    _grads(loss(True), args, 1)
    assert calls


def test_torch_chunk_buffers_are_reused_within_the_loop_and_freed_after_it(monkeypatch):
    """PyTorch's chunk loop takes its (tokens, V) logits and gradient buffers from a pool: two allocations for the
    whole loop, not two per chunk (a fresh buffer page-faults all of it), and none of them held once the loss and
    its gradients are computed (they would sit in memory through the model's backward and the optimizer)."""
    if BACKEND != "torch":
        pytest.skip("PyTorch's chunk loop")
    from keras_stable_heads.bridges import _memory

    tokens, classes, dim, chunk = 96, 16384, 8, 32  # 2 MiB per chunk buffer: a pooled size
    monkeypatch.setattr(_memory, "MIN_BYTES", 1 << 20)
    allocations = []
    original = _memory.aligned_empty
    monkeypatch.setattr(_memory, "aligned_empty", lambda shape, *a: allocations.append(shape) or original(shape, *a))
    rng = np.random.default_rng(9)
    hidden = rng.normal(0.0, 1.0, (tokens, dim)).astype("float32")
    kernel = rng.normal(0.0, 0.3, (dim, classes)).astype("float32")
    labels = rng.integers(0, classes, tokens).astype("int32")
    weights = rng.uniform(0.5, 1.5, tokens).astype("float32")
    loss = lambda h, k: linear_ce.weighted_sum(h, k, labels, weights, chunk_size=chunk,  # noqa: E731
                                               implementation="numba_cpu")[0]
    value, grad_kernel = _grads(loss, [hidden, kernel], 1)
    chunk_sized = [shape for shape in allocations if shape == (chunk, classes)]
    assert len(chunk_sized) == 2  # the logits and their gradient, reused by the 3 chunks
    assert len(_memory.CHUNKS) == 0
    unchunked, reference_grad = _grads(lambda h, k: linear_ce.weighted_sum(h, k, labels, weights, chunk_size=tokens,
                                                                           implementation="numba_cpu")[0],
                                       [hidden, kernel], 1)
    np.testing.assert_allclose(value, unchunked, rtol=1e-5)
    np.testing.assert_allclose(grad_kernel, reference_grad, rtol=1e-4, atol=1e-7)


def test_frozen_head_trains_the_layers_below_as_a_frozen_dense_does():
    model, head, twin = _models()
    head.trainable = False
    twin.layers[-1].trainable = False
    x, y = _data(n=8)
    kernel = np.asarray(head.kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=head.loss(ignore_class=-1, chunk_size=7))
    twin.compile(optimizer=keras.optimizers.SGD(0.5), loss=ksh.StableSparseSoftmaxCE(ignore_class=-1))
    history = model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0).history
    twin_history = twin.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["loss"], twin_history["loss"], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(head.kernel), kernel)
    for got, want in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Extremes, masking, precision
# ----------------------------------------------------------------------------------------------------------------


def test_all_ignored_batch_gives_zero_and_finite_gradients():
    rng = np.random.default_rng(7)
    hidden, kernel, bias, _ = (a.astype("float32") for a in _problem(rng))
    labels = np.full((2, 7), -1)
    loss = fused(hidden, kernel, labels, bias=bias, ignore_class=-1, chunk_size=4)
    assert np.all(to_numpy(loss) == 0.0)
    for index in range(3):
        _, grad = _grads(lambda h, k, b: fused(h, k, labels, bias=b, ignore_class=-1), [hidden, kernel, bias], index)
        assert np.all(grad == 0.0)
    value, _ = linear_ce.weighted_sum(hidden, kernel, labels, np.zeros((2, 7)), bias=bias, ignore_class=-1)
    assert float(to_numpy(value)) == 0.0


def test_neg_inf_bias_masks_classes():
    rng = np.random.default_rng(8)
    hidden, kernel, bias, labels = (a.astype("float32") if a.dtype.kind == "f" else a
                                    for a in _problem(rng, ignore=False))
    labels = labels % 8
    bias[8:] = -np.inf  # classes 8, 9, 10 masked; no label there
    loss = fused(hidden, kernel, labels, bias=bias, chunk_size=4)
    expected = ref.linear_sparse_softmax_ce(hidden, kernel, labels, bias=bias)
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=2e-5)
    _, dk = _grads(lambda h, k, b: fused(h, k, labels, bias=b, chunk_size=4), [hidden, kernel, bias], 1)
    _, db = _grads(lambda h, k, b: fused(h, k, labels, bias=b, chunk_size=4), [hidden, kernel, bias], 2)
    assert np.all(np.isfinite(dk)) and np.all(dk[:, 8:] == 0.0) and np.all(db[8:] == 0.0)


def test_large_logits_stay_exact():
    hidden = np.array([[1.0], [1.0]], "float32")
    kernel = np.array([[1e4, 1e4 - 1.0, -1e4]], "float32")
    loss = fused(hidden, kernel, np.array([1, 0]))
    np.testing.assert_allclose(to_numpy(loss), [1.0 + np.log1p(np.exp(-1.0)), np.log1p(np.exp(-1.0))], rtol=1e-6)


@pytest.mark.parametrize("kernel_dtype", ["bfloat16", "float32"])
def test_bfloat16_hidden_states_against_float64(kernel_dtype):
    """bfloat16 operands, float32 softmax: close to the float64 loss of the same (rounded) inputs; the kernel's
    gradient comes back in the kernel's dtype."""
    rng = np.random.default_rng(9)
    hidden, kernel, bias, labels = _problem(rng, leading=(4, 16), dim=32, classes=50, ignore=False)
    h = keras.ops.cast(hidden, "bfloat16")
    k = keras.ops.cast(kernel * 0.3, kernel_dtype)
    loss = fused(h, k, labels, bias=bias.astype("float32"), chunk_size=24)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    expected = ref.linear_sparse_softmax_ce(to_numpy(h), to_numpy(k), labels, bias=bias)
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=3e-2, atol=3e-2)
    value, _ = linear_ce.weighted_sum(h, k, labels, np.ones(labels.shape), bias=bias.astype("float32"))
    np.testing.assert_allclose(float(to_numpy(value)), expected.sum(), rtol=1e-2)


def test_kernel_gradient_dtype_follows_the_kernel():
    rng = np.random.default_rng(10)
    hidden, kernel, _, labels = _problem(rng, leading=(6,), ignore=False)
    h = keras.ops.cast(hidden, "bfloat16")
    k = keras.ops.convert_to_tensor(kernel, "float32")
    if BACKEND == "jax":
        import jax

        grad = jax.grad(lambda k: linear_ce.weighted_sum(h, k, labels, np.ones(6))[0])(k)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(k)
            value = linear_ce.weighted_sum(h, k, labels, np.ones(6))[0]
        grad = tape.gradient(value, k)
    else:
        k.requires_grad_(True)
        grad = __import__("torch").autograd.grad(linear_ce.weighted_sum(h, k, labels, np.ones(6))[0], k)[0]
    assert keras.backend.standardize_dtype(grad.dtype) == "float32" and np.all(np.isfinite(to_numpy(grad)))


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kernel=np.zeros((4, 6))), ValueError, "kernel"),  # D mismatch
    (dict(kernel=np.zeros((6, 3))), ValueError, "transpose_kernel=True"),  # (V, D) without the flag
    (dict(kernel=np.zeros((3, 6)), transpose_kernel=True), ValueError, "transpose_kernel=False"),
    (dict(kernel=np.zeros((3,))), ValueError, "kernel"),
    (dict(bias=np.zeros(5)), ValueError, "bias"),
    (dict(labels=np.zeros((2, 3), "int32")), ValueError, "labels"),
    (dict(labels=np.array([0, 6])), ValueError, r"\[0, 6\)"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(transpose_kernel="yes"), TypeError, "transpose_kernel"),
    (dict(kernel_grad="no"), TypeError, "kernel_grad"),
    (dict(hidden=np.zeros((2, 3), "int32")), TypeError, "hidden"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(implementation="numba_cuda"), ValueError, "implementation"),
    (dict(implementation="fastest"), ValueError, "implementation"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    args = dict(hidden=np.zeros((2, 3), "float32"), kernel=np.zeros((3, 6), "float32"), labels=np.array([0, 5]))
    args.update(kwargs)
    hidden, kernel, labels = args.pop("hidden"), args.pop("kernel"), args.pop("labels")
    with pytest.raises(error, match=match):
        fused(hidden, kernel, labels, **args)


def test_forced_kernels_raise_where_they_cannot_run():
    hidden, kernel, labels = np.zeros((2, 3), "float64"), np.zeros((3, 4), "float64"), np.array([0, 1])
    with pytest.raises(ValueError, match="numba_cpu"):
        fused(hidden, kernel, labels, implementation="numba_cpu")  # float64 (and no kernel path on JAX)
    if BACKEND != "jax":
        loss = fused(hidden.astype("float32"), kernel.astype("float32"), labels, implementation="numba_cpu")
        np.testing.assert_allclose(to_numpy(loss), np.log(4.0), rtol=1e-6)


def test_mixed_low_precision_dtypes_raise():
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        fused(keras.ops.zeros((2, 3), "float16"), keras.ops.zeros((3, 4), "bfloat16"), np.array([0, 1]))


# ----------------------------------------------------------------------------------------------------------------
# Compiled code
# ----------------------------------------------------------------------------------------------------------------


def test_compiled_step_equals_eager():
    rng = np.random.default_rng(11)
    hidden, kernel, bias, labels = (a.astype("float32") if a.dtype.kind == "f" else a for a in _problem(rng))
    weights = np.full(labels.shape, 1.0 / labels.size, "float32")
    options = dict(ignore_class=-1, z_loss=1e-3, chunk_size=4)

    def step(h, k, b):
        return linear_ce.weighted_sum(h, k, labels, weights, bias=b, **options)[0]

    def per_token(h, k, b):
        return fused(h, k, labels, bias=b, **options)

    eager = [to_numpy(step(hidden, kernel, bias)), to_numpy(per_token(hidden, kernel, bias))]
    if BACKEND == "jax":
        import jax

        value, grads = jax.jit(jax.value_and_grad(step, argnums=(0, 1, 2)))(hidden, kernel, bias)
        compiled = [to_numpy(value), to_numpy(jax.jit(per_token)(hidden, kernel, bias))]
        _, general = jax.jit(jax.value_and_grad(lambda *a: per_token(*a).sum() / labels.size, argnums=1))(
            hidden, kernel, bias)
        np.testing.assert_allclose(to_numpy(grads[1]), to_numpy(general), rtol=1e-4, atol=1e-7)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def compiled_fn(h, k, b):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(k)
                value = step(h, k, b)
                total = tf.reduce_sum(per_token(h, k, b)) / labels.size
            return value, per_token(h, k, b), tape.gradient([value], k), tape.gradient(total, k)

        value, losses, grad, general = compiled_fn(hidden, kernel, bias)
        compiled = [to_numpy(value), to_numpy(losses)]
        np.testing.assert_allclose(to_numpy(grad), to_numpy(general), rtol=1e-4, atol=1e-7)
    else:
        import torch

        k = torch.tensor(kernel, requires_grad=True)
        compiled = [to_numpy(step(hidden, k, bias)), to_numpy(per_token(hidden, k, bias))]
        assert torch.autograd.grad(step(hidden, k, bias), k)[0].shape == k.shape
    for got, want in zip(compiled, eager):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Keras: the head, its loss and metric
# ----------------------------------------------------------------------------------------------------------------

V, D, T = 13, 6, 5


def _models(head_kwargs=None, mask_zero=False):
    """A fused model and its unfused twin (Dense(V) + logits), sharing no weights: copy them with _copy."""
    keras.utils.set_random_seed(3)
    tokens = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Dense(D, activation="tanh")(keras.layers.Embedding(20, D, mask_zero=mask_zero)(tokens))
    head = ksh.FusedSoftmaxHead(V, name="vocab", **(head_kwargs or {}))
    fused_model = keras.Model(tokens, head(hidden))
    twin_tokens = keras.Input((T,), dtype="int32")
    twin_embedded = keras.layers.Embedding(20, D, mask_zero=mask_zero)(twin_tokens)
    twin_hidden = keras.layers.Dense(D, activation="tanh")(twin_embedded)
    twin = keras.Model(twin_tokens, keras.layers.Dense(V, use_bias=head.use_bias)(twin_hidden))
    twin.set_weights(fused_model.get_weights())
    return fused_model, head, twin


def _data(seed=0, n=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, (n, T)).astype("int32")
    y = rng.integers(0, V, (n, T))
    y[0, :2] = -1
    return x, y


def test_fit_decreases_and_equals_dense_with_stable_loss():
    """Batches of 4, 4 and 2: TensorFlow retraces the step with an unknown batch size (a dynamic token count)."""
    model, head, twin = _models()
    x, y = _data(n=10)
    sample_weight = np.linspace(0.5, 1.5, 10 * T).reshape(10, T)  # per token (temporal), as Keras takes them
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=head.loss(ignore_class=-1, chunk_size=7))
    twin.compile(optimizer=keras.optimizers.SGD(0.5), loss=ksh.StableSparseSoftmaxCE(ignore_class=-1))
    history = model.fit(x, y, sample_weight=sample_weight, epochs=4, batch_size=4, shuffle=False, verbose=0).history
    twin_history = twin.fit(x, y, sample_weight=sample_weight, epochs=4, batch_size=4, shuffle=False, verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    np.testing.assert_allclose(history["loss"], twin_history["loss"], rtol=1e-4)
    for got, want in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # the token accuracy == Keras's SparseCategoricalAccuracy on the logits (ignored tokens left out)
    logs = model.evaluate(x, y, sample_weight=sample_weight, verbose=0, return_dict=True)
    logits = twin.predict(x, verbose=0)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(np.maximum(y, 0), logits, sample_weight=(y != -1) * sample_weight)
    np.testing.assert_allclose(logs["token_accuracy"], float(accuracy.result()), rtol=1e-6)
    twin_logs = twin.evaluate(x, y, sample_weight=sample_weight, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], twin_logs["loss"], rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight", "none"])
def test_reductions_sample_weights_and_masks_as_keras(reduction):
    model, head, twin = _models(mask_zero=True)
    x, y = _data(1)
    x[1, 3:] = 0  # masked tokens (Embedding(mask_zero=True))
    sample_weight = np.linspace(0.2, 2.0, 8 * T).reshape(8, T)
    options = dict(ignore_class=-1, reduction=reduction)
    fused_loss = head.loss(**options)(y, model(x), sample_weight=sample_weight)
    twin_loss = ksh.StableSparseSoftmaxCE(**options)(y, twin(x), sample_weight=sample_weight)
    np.testing.assert_allclose(to_numpy(fused_loss), to_numpy(twin_loss), rtol=1e-5, atol=1e-7)


def test_masked_fit_matches_the_twin():
    model, head, twin = _models(mask_zero=True)
    x, y = _data(2)
    x[2, 2:] = 0
    model.compile(optimizer="sgd", loss=head.loss(ignore_class=-1))
    twin.compile(optimizer="sgd", loss=ksh.StableSparseSoftmaxCE(ignore_class=-1))
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0, return_dict=True)["loss"],
                               twin.evaluate(x, y, verbose=0, return_dict=True)["loss"], rtol=1e-5)


def test_all_ignored_batch_through_the_loss_is_zero():
    model, head, _ = _models()
    x, _ = _data()
    value = head.loss(ignore_class=-1)(np.full((8, T), -1), model(x))
    assert float(to_numpy(value)) == 0.0


def test_save_load_without_custom_objects_and_inference_model():
    model, head, twin = _models()
    x, y = _data(3)
    model.compile(optimizer="adam", loss=head.loss(ignore_class=-1, label_smoothing=0.1))
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "fused.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, ksh.FusedSparseSoftmaxCE) and loaded.loss.label_smoothing == 0.1
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0, return_dict=True)["loss"],
                               model.evaluate(x, y, verbose=0, return_dict=True)["loss"], rtol=1e-6)

    logits = ksh.inference_model(loaded).predict(x, verbose=0)
    hidden = keras.Model(loaded.input, loaded.get_layer("vocab").input).predict(x, verbose=0)
    kernel, bias = (to_numpy(w) for w in loaded.get_layer("vocab").weights)
    assert logits.shape == (8, T, V)
    np.testing.assert_allclose(logits, hidden @ kernel + bias, rtol=1e-5, atol=1e-5)

    config = head.get_config()
    assert ksh.FusedSoftmaxHead.from_config(config).get_config() == config
    loss = head.loss(z_loss=1e-3, chunk_size=64)
    assert keras.losses.deserialize(keras.losses.serialize(loss)).get_config() == loss.get_config()


def test_probability_inference_output():
    model, _, _ = _models({"inference_output": "probabilities", "use_bias": False})
    x, _ = _data(4)
    probabilities = ksh.inference_model(model).predict(x, verbose=0)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_mixed_bfloat16_policy_trains_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, head, _ = _models()
    finally:
        keras.config.set_dtype_policy("float32")
    x, y = _data(5)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=head.loss(ignore_class=-1))
    history = model.fit(x, y, epochs=4, batch_size=8, verbose=0).history["loss"]
    assert keras.backend.standardize_dtype(head.kernel.dtype) == "float32"
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    logits = ksh.inference_model(model)(x)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_plain_metrics_and_wrong_pairings_raise():
    model, head, twin = _models()
    x, y = _data(6)
    plain = keras.Model(model.input, model.output)
    plain.compile(loss=head.loss(), metrics=["sparse_categorical_accuracy"])
    with pytest.raises(Exception, match="argmax|empty|ArgMax|non-zero"):
        plain.evaluate(x, np.abs(y), verbose=0)
    with pytest.raises(TypeError, match="compile"):
        ksh.FusedTokenAccuracy().update_state(y, model(x))
    with pytest.raises(ValueError, match="FusedSoftmaxHead"):
        head.loss()(y, twin(x))
    plain.compile(loss="sparse_categorical_crossentropy")  # on JAX it would be a silent 0: the head refuses it
    with pytest.raises(ValueError, match="head.loss"):
        plain.evaluate(x, np.abs(y), verbose=0)
    with pytest.raises(ValueError, match="inference_output"):
        ksh.FusedSoftmaxHead(V, inference_output="argmax")

"""Everything that is compared, per Keras backend, in one place: the stable ops and the built-ins.

A :class:`Candidate` is a per-example loss ``loss(logits, labels)`` written in the backend's own tensors, plus
how it is compiled. A :class:`Framework` (one per backend) turns a candidate into the two timed callables —
``forward`` (returns the per-example loss) and ``forward_backward`` (returns the summed loss, the per-example
loss and the gradient of the sum w.r.t. the logits) — and knows how to synchronise its device, move arrays,
and read its peak memory:

- JAX: ``jax.jit(loss)`` and ``jax.jit(jax.value_and_grad(sum of loss))``; ``block_until_ready``.
- PyTorch: eager; forward under ``torch.no_grad()``; ``loss.sum().backward()`` on a leaf tensor;
  ``torch.cuda.synchronize()`` on a GPU.
- TensorFlow: ``tf.function`` with a ``GradientTape``, and a ``jit_compile=True`` (XLA) variant (``+xla``).

Stable implementations are enumerated from :mod:`keras_stable_heads.dispatch` (``"portable"`` plus every key
of ``REGISTRY``), so an implementation added there later (a CUDA one, say) is benchmarked without a change
here; one whose ``blocker`` says it cannot run on these inputs (another device, backend) is left out, and the
runner says so once.

Built-ins: Keras's own loss with ``from_logits=True`` on every backend, and the framework's native op:
``tf.nn`` on TensorFlow, ``torch.nn.functional`` on PyTorch, ``optax`` on JAX.
"""

import dataclasses

import numpy as np

OPS = ("sparse_softmax_ce", "softmax_ce", "sigmoid_ce")


@dataclasses.dataclass(frozen=True)
class Candidate:
    implementation: str       # the name in the records, e.g. "stable/numba_cpu", "keras+xla", "torch.F"
    family: str               # "stable" or "builtin"
    loss: object              # loss(logits, labels) -> per-example loss, in the backend's tensors
    xla: bool = False         # TensorFlow only: compile with jit_compile=True
    blocker: str = None       # why it cannot run here (then it is recorded as skipped)
    dispatch_name: str = None  # for stable candidates: the dispatcher's implementation name


# ----------------------------------------------------------------------------------------------------------------
# The candidates
# ----------------------------------------------------------------------------------------------------------------


def _stable_function(op):
    from keras_stable_heads import ops

    return {
        "sparse_softmax_ce": ops.softmax_cross_entropy_with_integer_labels,
        "softmax_ce": ops.softmax_cross_entropy,
        "sigmoid_ce": ops.sigmoid_binary_cross_entropy,
    }[op]


def stable_implementations():
    """The implementations the dispatcher can choose: "portable" and every registered one."""
    from keras_stable_heads import dispatch

    return ["portable", *(name for name in dispatch.REGISTRY if name != "portable")]


def stable_blocker(op, implementation, logits):
    """Why ``implementation`` cannot compute ``op`` on ``logits`` here (the dispatcher's own answer), or None."""
    if implementation == "portable":
        return None
    from keras_stable_heads import dispatch
    from keras_stable_heads.numerics import upcast

    return dispatch.REGISTRY[implementation].blocker(op, upcast(logits))


def auto_choice(op, logits):
    from keras_stable_heads import dispatch
    from keras_stable_heads.numerics import upcast

    try:
        return dispatch.choose(op, upcast(logits)).implementation
    except Exception as error:  # an auto choice must not break a benchmark
        return f"error: {error}"


def _keras_builtin(op, from_logits=True):
    import keras

    cls = {
        "sparse_softmax_ce": keras.losses.SparseCategoricalCrossentropy,
        "softmax_ce": keras.losses.CategoricalCrossentropy,
        "sigmoid_ce": keras.losses.BinaryCrossentropy,
    }[op]
    return cls(from_logits=from_logits, reduction=None)


def _keras_probabilities(op):
    """Keras's loss on probabilities (softmax/sigmoid first, ``from_logits=False``): the common mistake, clipped."""
    import keras

    loss = _keras_builtin(op, from_logits=False)
    link = keras.ops.sigmoid if op == "sigmoid_ce" else keras.ops.softmax
    return lambda z, y: loss(y, link(z))


def _native(backend, op):
    """The framework's own fused op: (name, loss) or None."""
    if backend == "tensorflow":
        import tensorflow as tf

        return "tf.nn", {
            "sparse_softmax_ce": lambda z, y: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z),
            "softmax_ce": lambda z, y: tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=z),
            "sigmoid_ce": lambda z, y: tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z), -1),
        }[op]
    if backend == "torch":
        import torch.nn.functional as F

        return "torch.F", {
            "sparse_softmax_ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
            "softmax_ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
            "sigmoid_ce": lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1),
        }[op]
    if backend == "jax":
        try:
            import optax
        except ImportError:
            return None
        return "optax", {
            "sparse_softmax_ce": optax.softmax_cross_entropy_with_integer_labels,
            "softmax_ce": optax.softmax_cross_entropy,
            "sigmoid_ce": lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean(-1),
        }[op]
    return None


def candidates(backend, op, logits, include=None):
    """The candidates for ``op`` on this backend, for these (framework) ``logits``.

    ``include`` optionally restricts to implementation names (prefix match, e.g. ``"stable"`` or ``"keras"``).
    """
    variants = (False, True) if backend == "tensorflow" else (False,)
    stable_fn = _stable_function(op)
    result = []
    for name in stable_implementations():
        blocker = stable_blocker(op, name, logits)
        for xla in variants:
            if xla and name != "portable":
                continue  # a Python kernel cannot run inside XLA: the dispatcher says so, no need to show it
            loss = (lambda fn, impl: lambda z, y: fn(z, y, implementation=impl))(stable_fn, name)
            result.append(Candidate(f"stable/{name}" + ("+xla" if xla else ""), "stable", loss, xla, blocker, name))
    keras_loss = _keras_builtin(op)
    for xla in variants:
        result.append(Candidate("keras" + ("+xla" if xla else ""), "builtin", lambda z, y: keras_loss(y, z), xla))
    native = _native(backend, op)
    if native is not None:
        name, loss = native
        for xla in variants:
            result.append(Candidate(name + ("+xla" if xla else ""), "builtin", loss, xla))
    if include:
        result = [c for c in result if any(c.implementation.startswith(prefix) for prefix in include)]
    return result


def exactness_only_candidates(op):
    """Compared for exactness only (not timed): Keras's loss applied to probabilities, the clipped way."""
    return [Candidate("keras(probs)", "builtin", _keras_probabilities(op))]


# ----------------------------------------------------------------------------------------------------------------
# Frameworks
# ----------------------------------------------------------------------------------------------------------------


class _Framework:
    """What differs per backend around a candidate: tensors, compilation, synchronisation, memory."""

    name = None
    device = "cpu"
    device_name = None

    def framework_versions(self):
        return ()

    def peak_device_mib(self):
        return None

    def reset_device_peak(self):
        pass

    def release(self):
        """Give cached device memory back between candidates (a GPU holds several N x C buffers per candidate)."""

    def device_copy_gbs(self, nbytes):
        """The device's copy bandwidth (bytes read + written per second, best of the timed calls), in GB/s; None
        on a CPU (the host copy of :func:`harness.host_bandwidth` is the roofline there)."""
        return None


class JaxFramework(_Framework):
    name = "jax"

    def __init__(self):
        import jax

        self.jax = jax
        self._device = jax.devices()[0]
        self.device = "cpu" if self._device.platform == "cpu" else "gpu"
        self.device_name = None if self.device == "cpu" else self._device.device_kind

    def framework_versions(self):
        return ("jax", "jaxlib", "optax", "ml_dtypes")

    def logits(self, array, dtype):
        # Move float32, then cast on the device (a host-side cast of gigabytes is slow and single-threaded).
        return self.jax.device_put(np.ascontiguousarray(array), self._device).astype(dtype)

    def labels(self, array):
        array = array.astype(np.int32) if array.dtype.kind in "iu" else array
        return self.jax.device_put(self.jax.numpy.asarray(array))

    def compile(self, candidate, mode):
        jax, jnp = self.jax, self.jax.numpy
        if mode == "forward":
            return jax.jit(candidate.loss)

        def total(z, y):
            loss = candidate.loss(z, y)
            return jnp.sum(loss.astype(jnp.float32)), loss

        value_and_grad = jax.value_and_grad(total, has_aux=True)

        def forward_backward(z, y):
            (total_loss, loss), grad = value_and_grad(z, y)
            return total_loss, loss, grad

        return jax.jit(forward_backward)

    def sync(self, result):
        self.jax.block_until_ready(result)

    def to_numpy(self, x, rows):
        return np.asarray(x[:rows]).astype(np.float64)

    def peak_device_mib(self):
        if self.device == "cpu":
            return None
        stats = self._device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20

    def device_copy_gbs(self, nbytes):
        if self.device == "cpu":
            return None
        from .harness import measure

        x = self.jax.numpy.ones(nbytes // 4, self.jax.numpy.float32)
        add = self.jax.jit(lambda a: a + 1.0)  # one read and one write of every element
        stats, _ = measure(lambda: add(x), warmup=2, reps=10, sync=self.sync)
        return 2 * x.nbytes / stats.min / 1e9


class TorchFramework(_Framework):
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = "gpu" if self._device.type == "cuda" else "cpu"
        self.device_name = torch.cuda.get_device_name(0) if self.device == "gpu" else None

    def framework_versions(self):
        return ("torch",)

    def logits(self, array, dtype):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self._device).to(getattr(self.torch, dtype))

    def labels(self, array):
        array = array.astype(np.int64) if array.dtype.kind in "iu" else array  # F.cross_entropy wants int64
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self._device)

    def compile(self, candidate, mode):
        torch = self.torch
        if mode == "forward":
            def forward(z, y):
                with torch.no_grad():
                    return candidate.loss(z, y)

            return forward

        def forward_backward(z, y):
            z = z.detach().requires_grad_(True)  # a fresh leaf: no gradient accumulates across calls
            loss = candidate.loss(z, y)
            total = loss.float().sum()
            total.backward()
            return total.detach(), loss.detach(), z.grad

        return forward_backward

    def sync(self, result):
        if self.device == "gpu":
            self.torch.cuda.synchronize()

    def to_numpy(self, x, rows):
        return x[:rows].detach().float().cpu().numpy().astype(np.float64)

    def reset_device_peak(self):
        if self.device == "gpu":
            self.torch.cuda.reset_peak_memory_stats()

    def release(self):
        if self.device == "gpu":
            self.torch.cuda.empty_cache()

    def peak_device_mib(self):
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.device == "gpu" else None

    def device_copy_gbs(self, nbytes):
        if self.device == "cpu":
            return None
        from .harness import measure

        src = self.torch.ones(nbytes // 4, dtype=self.torch.float32, device=self._device)
        dst = self.torch.empty_like(src)
        stats, _ = measure(lambda: dst.copy_(src), warmup=2, reps=10, sync=self.sync)
        return 2 * src.nbytes / stats.min / 1e9


class TensorFlowFramework(_Framework):
    name = "tensorflow"

    def __init__(self):
        import tensorflow as tf

        self.tf = tf
        gpus = tf.config.list_logical_devices("GPU")
        self.device = "gpu" if gpus else "cpu"
        self.device_name = None
        if gpus:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            self.device_name = details.get("device_name", "GPU")

    def framework_versions(self):
        return ("tensorflow",)

    def logits(self, array, dtype):
        return self.tf.cast(self.tf.constant(array), dtype)

    def labels(self, array):
        array = array.astype(np.int32) if array.dtype.kind in "iu" else array
        return self.tf.constant(array)

    def compile(self, candidate, mode):
        tf = self.tf
        if mode == "forward":
            return tf.function(candidate.loss, jit_compile=candidate.xla, autograph=False)

        def forward_backward(z, y):
            with tf.GradientTape() as tape:
                tape.watch(z)
                loss = candidate.loss(z, y)
                total = tf.reduce_sum(tf.cast(loss, tf.float32))
            return total, loss, tape.gradient(total, z)

        return tf.function(forward_backward, jit_compile=candidate.xla, autograph=False)

    def sync(self, result):
        if self.device == "gpu":
            self.tf.test.experimental.sync_devices()

    def to_numpy(self, x, rows):
        return self.tf.cast(x[:rows], self.tf.float64).numpy()


def framework(backend):
    return {"jax": JaxFramework, "torch": TorchFramework, "tensorflow": TensorFlowFramework}[backend]()


def labels_like(op, labels, logits_dtype, fw):
    """Labels as the framework wants them: integer ids, or N x C floats in the logits' dtype."""
    if op == "sparse_softmax_ce":
        return fw.labels(labels)
    return fw.logits(labels, logits_dtype)

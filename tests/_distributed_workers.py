"""Distributed runs for ``test_distribution.py``, each in a fresh process: ``python _distributed_workers.py NAME``.

Simulated devices must be set up before TensorFlow or JAX starts (logical CPU devices; ``XLA_FLAGS``), so each worker
does that first, then imports Keras. A worker prints one JSON line, prefixed ``RESULT``, with what it measured
(single-device and distributed loss histories and weights, compiled-program facts); the tests assert on it.

Every case trains one independent linear head of one multi-output model with a ``sample_weight``; initial weights
come from a seeded NumPy generator, batches are unshuffled.
"""

import contextlib
import json
import os
import re
import sys

import numpy as np

ROWS, FEATURES, CLASSES, BATCH, EPOCHS, LEARNING_RATE = 64, 6, 4, 32, 2, 0.05

# (case, loss class, options, kind of target)
CASES = [
    ("binary_ce", "StableBinaryCE", dict(pos_weight=2.0, label_smoothing=0.1), "binary"),
    ("softmax_ce", "StableSoftmaxCE", dict(label_smoothing=0.1, z_loss=1e-3), "onehot"),
    ("sparse_softmax_ce", "StableSparseSoftmaxCE", dict(class_weight=[1.0, 2.0, 1.0, 0.5], logit_softcap=20.0),
     "sparse"),
    ("sparse_ignore_class", "StableSparseSoftmaxCE", dict(ignore_class=-1, label_smoothing=0.1), "sparse_ignore"),
    ("multilabel_ce", "StableMultilabelCE", dict(pos_weight=[1.0, 2.0, 1.0, 1.0], missing_label=-1.0), "multilabel"),
    ("binary_focal_ce", "StableBinaryFocalCE", dict(gamma=2.0, alpha=0.25), "binary"),
    ("softmax_focal_ce", "StableSoftmaxFocalCE", dict(gamma=2.0), "onehot"),
    ("gaussian_nll", "GaussianNLL", {}, "regression"),
    ("laplace_nll", "LaplaceNLL", {}, "regression"),
]
# The cases whose loss drops entries: their batch mean divides by the number of kept entries.
MASKED_CASES = ("sparse_ignore_class", "multilabel_ce")
WIDTH = {"binary": 1, "regression": 2}  # prediction width per kind of target; CLASSES otherwise


def targets(kind, seed=0):
    """Targets of one kind for the shared features ``features()``."""
    rng = np.random.default_rng(seed)
    scores = features() @ rng.normal(size=(FEATURES, CLASSES))
    if kind in ("sparse", "sparse_ignore"):
        y = np.argmax(scores, -1).astype("int32")
        if kind == "sparse_ignore":
            # Shards keep different numbers of rows: in each batch of 32, rows 0-9 and 20 are ignored, so the first
            # half keeps 6 rows and the second 15 (2 replicas), the four quarters 0, 6, 7 and 8 (4 devices).
            for start in range(0, ROWS, BATCH):
                y[start:start + 10] = -1
                y[start + 20] = -1
        return y
    if kind == "onehot":
        return np.eye(CLASSES, dtype="float32")[np.argmax(scores, -1)]
    if kind == "binary":
        return (scores[:, :1] > 0).astype("float32")
    if kind == "multilabel":
        y = (scores > 0).astype("float32")
        y[rng.random(y.shape) < 0.3] = -1.0  # missing labels, spread unevenly
        y[:6] = -1.0  # six examples with every label missing, all in the first shard
        return y
    return (0.3 * scores[:, :1] + 0.3 * rng.normal(size=(ROWS, 1))).astype("float32")  # for [location, log_scale]


def features():
    return np.random.default_rng(100).normal(size=(ROWS, FEATURES)).astype("float32")


def training_data():
    """Features, and per case its targets and sample weights."""
    weights = np.random.default_rng(1).uniform(0.2, 2.0, ROWS).astype("float32")
    return (features(), {case: targets(kind) for case, _, _, kind in CASES},
            {case: weights for case, *_ in CASES})


def multi_head_model(k):
    """One independent linear head per case in one model: one fit trains every loss, and a difference in one loss
    cannot leak into another case's weights."""
    inputs = k.Input((FEATURES,), name="x")
    outputs = {case: k.layers.Dense(WIDTH.get(kind, CLASSES), name=case)(inputs) for case, _, _, kind in CASES}
    return k.Model(inputs, outputs)


def seeded_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.5, np.shape(w)).astype("float32") for w in model.get_weights()]


def case_weights(model, case):
    return [np.asarray(w, np.float64).tolist() for w in model.get_layer(case).get_weights()]


def fit(k, module, scope):
    """Build, compile and fit in ``scope``: SGD, 2 epochs of 2 batches of 32. Per case: loss history and weights."""
    x, y, sw = training_data()
    with scope:
        model = multi_head_model(k)
        model.set_weights(seeded_weights(model))
        model.compile(optimizer=k.optimizers.SGD(LEARNING_RATE),
                      loss={case: getattr(module, cls)(**options) for case, cls, options, _ in CASES})
        history = model.fit(x, y, sample_weight=sw, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                            verbose=0).history
    return {case: dict(history=history[f"{case}_loss"], weights=case_weights(model, case)) for case, *_ in CASES}, model


def emit(result):
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# TensorFlow: tf.distribute.MirroredStrategy over 2 logical CPU devices, with Keras 3 or with tf_keras
# ----------------------------------------------------------------------------------------------------------------


def tf_mirrored(engine):
    if engine == "tf_keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras is Keras 2 (tf_keras): the documented Keras 2 set-up
    import tensorflow as tf

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    assert keras.backend.backend() == "tensorflow", keras.backend.backend()
    if engine == "tf_keras":
        import tf_keras

        import keras_stable_heads.tf_keras as module

        k = tf.keras
        assert k.Model is tf_keras.Model
    else:
        import keras_stable_heads as module

        k = keras
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    single, _ = fit(k, module, contextlib.nullcontext())
    mirrored, model = fit(k, module, strategy.scope())
    emit({"replicas": strategy.num_replicas_in_sync, "model_strategy": type(model.distribute_strategy).__name__,
          "single": single, "distributed": mirrored})


# ----------------------------------------------------------------------------------------------------------------
# JAX: keras.distribution.DataParallel and ModelParallel over 4 simulated host devices
# ----------------------------------------------------------------------------------------------------------------

# Sizes distinct from each other and from the batch (32; 16 per batch shard) so the compiled program can be read.
MP_CLASSES, MP_HIDDEN = 10, 24
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")


def _jax(count=4):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    import jax

    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    assert len(jax.devices()) == count, jax.devices()
    return jax, keras


def jax_data_parallel():
    jax, keras = _jax()
    import keras_stable_heads as ksh

    single, _ = fit(keras, ksh, contextlib.nullcontext())
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    parallel, model = fit(keras, ksh, distribution.scope())
    kernel = model.get_layer(CASES[0][0]).kernel.value
    emit({"devices": len(jax.devices()), "kernel_devices": len(kernel.sharding.device_set),
          "kernel_replicated": bool(kernel.sharding.is_fully_replicated), "single": single, "distributed": parallel})


def _shapes(text):
    return [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", text)]


def collectives(hlo):
    """[op, result shapes] of every collective in an optimised HLO module (a tuple result has several shapes)."""
    return [[m.group(2), _shapes(m.group(1))] for m in map(_COLLECTIVE.search, hlo.splitlines()) if m]


def dot_shapes(hlo):
    """Result shapes of the matrix products in an optimised (CPU) HLO module."""
    shapes = []
    for line in hlo.splitlines():
        if re.search(r"\s(dot|custom-call)\(", line) and "=" in line:
            shapes.extend(_shapes(line.split("=", 1)[1].split("(", 1)[0]))
    return sorted({tuple(s) for s in shapes})


def jax_model_parallel():
    jax, keras = _jax()
    import keras_stable_heads as ksh

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    labels = rng.integers(0, MP_CLASSES, BATCH).astype("int32")
    labels[::5] = -1  # ignored rows
    onehot = np.eye(MP_CLASSES, dtype="float32")[np.maximum(labels, 0)]

    def build():
        return keras.Sequential([keras.Input((FEATURES,)),
                                 keras.layers.Dense(MP_HIDDEN, activation="tanh", name="hidden"),
                                 keras.layers.Dense(MP_CLASSES, name="head")])

    reference_model = build()
    initial = seeded_weights(reference_model)
    reference_model.set_weights(initial)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*/head/kernel"] = (None, "model")  # the head's classes split over the "model" axis (keys are regexes)
    layout_map[".*/head/bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        model = build()
        model.set_weights(initial)
    head = model.get_layer("head").kernel.value
    batch_sharded = jax.sharding.NamedSharding(mesh.backend_mesh, jax.sharding.PartitionSpec("batch"))
    results = {"devices": len(jax.devices()), "classes": MP_CLASSES, "hidden": MP_HIDDEN, "batch": BATCH,
               "head_kernel_shard": list(head.sharding.shard_shape(head.shape))}
    cases = {"sparse": (ksh.StableSparseSoftmaxCE(ignore_class=-1, label_smoothing=0.1, z_loss=1e-3), labels),
             "dense": (ksh.StableSoftmaxCE(label_smoothing=0.1, z_loss=1e-3), onehot)}
    for name, (loss, y) in cases.items():
        def loss_of(net):
            def f(weights, x, y):
                logits, _ = net.stateless_call(weights, [], x)
                return loss(y, logits)
            return jax.jit(jax.value_and_grad(f))

        step = loss_of(model)
        args = ([v.value for v in model.trainable_variables], jax.device_put(x, batch_sharded),
                jax.device_put(y, batch_sharded))
        with distribution.scope():  # traced under the distribution, as in fit (the dispatcher sees it)
            value, grads = step(*args)
            compiled = step.lower(*args).compile()
        hlo = compiled.as_text()
        # Unsharded reference: a model built outside the distribution, on host arrays (one device).
        ref_value, ref_grads = loss_of(reference_model)([np.asarray(w) for w in initial], x, y)
        results[name] = {
            "loss": float(value), "reference_loss": float(ref_value),
            "grads": [np.asarray(g, np.float64).tolist() for g in grads],
            "reference_grads": [np.asarray(g, np.float64).tolist() for g in ref_grads],
            "head_grad_shard": list(grads[2].sharding.shard_shape(grads[2].shape)),
            "collectives": collectives(hlo), "dot_shapes": [list(s) for s in dot_shapes(hlo)],
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        }
    emit(results)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch: torch.nn.parallel.DistributedDataParallel, gloo, 2 processes
# ----------------------------------------------------------------------------------------------------------------

WORLD = 2
STEPS = EPOCHS * ROWS // BATCH


def _torch_losses(ksh, global_kept=None):
    """``case -> f(y, logits, sample_weight)``. With ``global_kept(case, y)``, the masked cases follow the recipe of
    docs/scaling.md: reduction 'sum' divided by the kept count of the global batch, times the world size (DDP
    averages the gradients of the ranks)."""
    losses = {}
    for case, cls, options, _ in CASES:
        if case in MASKED_CASES and global_kept is not None:
            loss = getattr(ksh, cls)(**options, reduction="sum")
            losses[case] = (lambda y, z, w, loss=loss, case=case:
                            loss(y, z, sample_weight=w) * WORLD / global_kept(case, y))
        else:
            loss = getattr(ksh, cls)(**options)
            losses[case] = lambda y, z, w, loss=loss: loss(y, z, sample_weight=w)
    return losses


def _kept(case, y):
    """What a masked case keeps: labels other than -1, or examples with at least one present label."""
    import torch

    present = y != -1
    return (present if case == "sparse_ignore_class" else present.any(-1)).to(torch.float32).sum()


def _torch_train(module, losses, shard=None, mean_over_ranks=None):
    """SGD over the same batches as ``fit``; with ``shard=(rank, world)`` on this rank's rows of each batch.
    Returns per case the mean loss of each epoch, as ``fit`` reports it (over ranks too, with ``mean_over_ranks``)."""
    import torch

    x, y, sw = training_data()
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    history = {case: [] for case in losses}
    for step in range(STEPS):
        rows = np.arange(BATCH) + (step * BATCH) % ROWS
        if shard is not None:
            rows = np.array_split(rows, shard[1])[shard[0]]
        outputs = module(torch.as_tensor(x[rows]))
        values = {case: f(torch.as_tensor(y[case][rows]), outputs[case], torch.as_tensor(sw[case][rows]))
                  for case, f in losses.items()}
        optimizer.zero_grad()
        sum(values.values()).backward()
        optimizer.step()
        for case, value in values.items():
            value = value.detach().clone()
            if mean_over_ranks is not None:
                value = mean_over_ranks(value)
            history[case].append(float(value))
    return {case: np.mean(np.reshape(steps, (EPOCHS, -1)), axis=1).tolist() for case, steps in history.items()}


def _ddp_rank(rank, init_file, out_dir):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    import keras

    import keras_stable_heads as ksh

    def mean_over_ranks(value):
        dist.all_reduce(value)
        return value / WORLD

    def global_kept(case, y):
        kept = _kept(case, y)
        dist.all_reduce(kept)
        return kept

    results = {}
    for variant, counter in (("recipe", global_kept), ("default", None)):
        model = multi_head_model(keras)
        model.set_weights(seeded_weights(model))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        history = _torch_train(ddp, _torch_losses(ksh, counter), (rank, WORLD), mean_over_ranks)
        results[variant] = {case: dict(history=history[case], weights=case_weights(model, case)) for case, *_ in CASES}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def torch_ddp():
    import tempfile

    import torch
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    import keras

    assert keras.backend.backend() == "torch", keras.backend.backend()
    import keras_stable_heads as ksh

    model = multi_head_model(keras)
    model.set_weights(seeded_weights(model))
    history = _torch_train(model, _torch_losses(ksh))
    results = {"world": WORLD,
               "single": {case: dict(history=history[case], weights=case_weights(model, case)) for case, *_ in CASES}}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_rank, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results[f"rank{rank}"] = json.load(f)
    emit(results)


WORKERS = {
    "tf_mirrored_keras3": lambda: tf_mirrored("keras3"),
    "tf_mirrored_tf_keras": lambda: tf_mirrored("tf_keras"),
    "jax_data_parallel": jax_data_parallel,
    "jax_model_parallel": jax_model_parallel,
    "torch_ddp": torch_ddp,
}

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    WORKERS[sys.argv[1]]()

"""JAX distribution runs for ``test_hub.py``, in a fresh process: ``python _hub_workers.py NAME``.

4 simulated host devices (``--xla_force_host_platform_device_count``, set before JAX starts). A worker prints one JSON
line, prefixed ``RESULT``: single-device and distributed loss histories and trained weights of small random-weight
keras-hub models fused with ``keras_stable_heads.hub.fuse_lm_head``, and facts read from the compiled train step
(its collectives and the shapes of every array in it).
"""

import json
import os
import re
import sys

import numpy as np

VOCAB, HIDDEN, BATCH, SEQ, CHUNK, EPOCHS, LR = 96, 16, 8, 8, 8, 2, 0.5
# DataParallel over 4 devices: 2 sequences (16 tokens) per device; ModelParallel (2 x 2 mesh "batch" x "model"):
# 4 sequences (32 tokens) per device and half the vocabulary (48 rows of the embedding).
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"\b(?:f16|bf16|f32|f64|s32|u32|s64|u8|pred)\[([0-9,]*)\]")


def _jax(count=4):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    import jax

    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    assert len(jax.devices()) == count, jax.devices()
    return jax, keras


def _shapes(text):
    return [[int(d) for d in dims.split(",") if d] for dims in _SHAPE.findall(text)]


def program_facts(hlo):
    """Collectives ([op, result shapes]), matmul result shapes, and every distinct array shape of an optimised HLO
    module."""
    collectives = [[m.group(2), _shapes(m.group(1))] for m in map(_COLLECTIVE.search, hlo.splitlines()) if m]
    dots = set()
    for line in hlo.splitlines():
        if re.search(r"\s(dot|custom-call)\(", line) and "=" in line:
            dots.update(tuple(s) for s in _shapes(line.split("=", 1)[1].split("(", 1)[0]))
    arrays = {tuple(s) for s in _shapes(hlo)}
    return {"collectives": collectives, "dot_shapes": sorted(map(list, dots)),
            "array_shapes": sorted(map(list, arrays))}


def causal_lm(keras, family):
    import keras_hub

    if family == "gemma":  # tied embedding, final logit soft-cap
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=HIDDEN,
            intermediate_dim=32, head_dim=8, final_logit_soft_cap=3.0)
        return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    backbone = keras_hub.models.LlamaBackbone(  # untied (D, V) reverse kernel
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=HIDDEN,
        intermediate_dim=32)
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


def seeded_weights(model):
    rng = np.random.default_rng(0)
    return [rng.normal(0.0, 1.0 if "embeddings" in v.path else 0.2, v.shape).astype("float32")
            if "embeddings" in v.path or len(v.shape) > 1 else np.asarray(v.numpy(), "float32") for v in model.weights]


def batch():
    rng = np.random.default_rng(1)
    lengths = np.array([8, 6, 5, 3, 8, 7, 2, 4])
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    x = {"token_ids": (rng.integers(1, VOCAB, (BATCH, SEQ)) * mask).astype("int32"), "padding_mask": mask}
    return x, rng.integers(0, VOCAB, (BATCH, SEQ)).astype("int32"), mask.astype("float32")


def train(keras, family, weights, fused):
    """Compile (SGD) and fit EPOCHS full batches; the loss history, accuracy history and trained weights."""
    from keras_stable_heads import hub

    model = causal_lm(keras, family)
    model.set_weights(weights)
    if fused:
        hub.fuse_lm_head(model, chunk_size=CHUNK)
    model.compile(optimizer=keras.optimizers.SGD(LR))
    x, y, sw = batch()
    history = model.fit(x, y, sample_weight=sw, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0).history
    result = {"loss": history["loss"], "accuracy": history["sparse_categorical_accuracy"],
              "weights": [np.asarray(w, np.float64).ravel()[:4096].tolist() for w in model.get_weights()]}
    return result, model


def compiled_train_step(jax, model, mesh, batch_axis):
    """The optimised HLO of the model's train step with its state as placed and the batch sharded as fit shards it."""
    x, y, sw = batch()
    sharding = jax.sharding.NamedSharding(mesh.backend_mesh, jax.sharding.PartitionSpec(batch_axis))
    data = jax.device_put((x, y, sw), sharding)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])
    return jax.jit(model.train_step).lower(state, data).compile().as_text()


def jax_distributed():
    """Gemma (tied, soft-capped) under DataParallel and ModelParallel, Llama (untied) under ModelParallel; each
    against the default compile on one device."""
    jax, keras = _jax()
    results = {"devices": len(jax.devices()), "vocab": VOCAB, "hidden": HIDDEN, "batch": BATCH, "seq": SEQ,
               "chunk": CHUNK}
    for family in ("gemma", "llama"):
        keras.utils.set_random_seed(0)
        weights = seeded_weights(causal_lm(keras, family))
        single, _ = train(keras, family, weights, fused=False)  # the default compile, one device
        runs = {"single": single}
        if family == "gemma":
            data_parallel = keras.distribution.DataParallel(devices=jax.devices())
            with data_parallel.scope():
                runs["data_parallel"], model = train(keras, family, weights, fused=True)
                runs["data_parallel_program"] = program_facts(
                    compiled_train_step(jax, model, data_parallel.device_mesh, "batch"))
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
        layout_map = keras.distribution.LayoutMap(mesh)
        # the head's kernel split over its vocabulary axis: (V, D) tied embedding, or (D, V) reverse kernel
        layout_map["token_embedding/embeddings"] = ("model", None)
        layout_map["token_embedding/reverse_embeddings"] = (None, "model")
        model_parallel = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
        with model_parallel.scope():
            runs["model_parallel"], model = train(keras, family, weights, fused=True)
            embedding = model.backbone.token_embedding
            kernel = (embedding.embeddings if embedding.tie_weights else embedding.reverse_embeddings).value
            runs["kernel_shard"] = list(kernel.sharding.shard_shape(kernel.shape))
            runs["model_parallel_program"] = program_facts(compiled_train_step(jax, model, mesh, "batch"))
        results[family] = runs
    print("RESULT " + json.dumps(results), flush=True)


WORKERS = {"jax_distributed": jax_distributed}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    WORKERS[sys.argv[1]]()

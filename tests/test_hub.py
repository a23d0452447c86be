"""keras-hub causal LMs trained through the fused loss (``keras_stable_heads.hub.fuse_lm_head``) equal their default
compile: loss, gradients, weighted accuracy, fit; ``predict``/``generate`` unchanged; bad input raises.

Small random-weight models from the constructors (nothing downloaded): Gemma (tied embedding, final logit soft-cap,
an embedding scaled so the cap bites), GPT-2 (tied; on its own preprocessor's output) and Llama (untied reverse
kernel). Each test compares a fused model with an unfused twin holding the same weights, on the same batch with a
padding mask as ``sample_weight``. On JAX, a subprocess with 4 simulated devices (``_hub_workers.py``) trains under
``DataParallel`` and a vocabulary-sharded ``ModelParallel`` and reads the compiled step.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_stable_heads as ksh  # noqa: E402
from keras_stable_heads import hub  # noqa: E402

BACKEND = keras.backend.backend()
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hub_workers.py")
# The worker imports the package this process tests (the installed wheel in CI, else the checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(ksh.__file__)))
VOCAB, HIDDEN, BATCH, SEQ = 96, 16, 4, 8
SOFTCAP = 3.0
LR = 0.5
CHUNK = 8  # tokens per chunk of logits in the fused models of the main fixture: 4 chunks per batch of 4 x 8


def _backbone(family, dtype=None):
    if family == "gemma":
        return keras_hub.models.GemmaBackbone(
            vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=HIDDEN,
            intermediate_dim=32, head_dim=8, final_logit_soft_cap=SOFTCAP, dtype=dtype)
    if family == "gpt2":
        return keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=HIDDEN, intermediate_dim=32,
            max_sequence_length=SEQ, dropout=0.0, dtype=dtype)
    if family == "llama":  # tie_word_embeddings=False: a separate (D, V) reverse kernel
        return keras_hub.models.LlamaBackbone(
            vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=HIDDEN,
            intermediate_dim=32, dtype=dtype)
    raise AssertionError(family)


TASKS = {"gemma": "GemmaCausalLM", "gpt2": "GPT2CausalLM", "llama": "LlamaCausalLM"}
# a byte-pair vocabulary for GPT-2's tokenizer, built in memory: string inputs through keras-hub's preprocessor
BPE_VOCABULARY = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "Ġa": 5, "Ġb": 6, "Ġc": 7, "ab": 8, "Ġab": 9,
                  **{f"x{i}": i for i in range(10, VOCAB)}}
BPE_MERGES = ["a b", "Ġ a", "Ġ b", "Ġ c", "Ġa b"]


def _causal_lm(family, weights=None, dtype=None):
    """A CausalLM without preprocessor; with ``weights`` given, those; else seeded weights (the embedding ~N(0, 1),
    so Gemma's logits reach past its soft-cap)."""
    model = getattr(keras_hub.models, TASKS[family])(_backbone(family, dtype), preprocessor=None)
    if weights is None:
        rng = np.random.default_rng(0)
        weights = [rng.normal(0.0, 1.0 if "embeddings" in v.path else 0.2, v.shape).astype("float32")
                   if "embeddings" in v.path or len(v.shape) > 1 else np.asarray(v.numpy(), "float32")
                   for v in model.weights]
    model.set_weights(weights)
    return model


def _batch(seed=0):
    """Token ids, a padding mask (rows of 8, 6, 5 and 3 tokens) and labels: half of them random, half drawn later
    from the model's own argmax (:func:`_labels`) so the accuracy is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(SEQ)[None, :] < np.array([8, 6, 5, 3])[:, None]).astype("int32")
    x = {"token_ids": (rng.integers(1, VOCAB, (BATCH, SEQ)) * mask).astype("int32"), "padding_mask": mask}
    return x, mask.astype("float32")


def _labels(model, x, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, VOCAB, (BATCH, SEQ)).astype("int32")
    predicted = np.argmax(np.asarray(model.predict(x, verbose=0)), -1)
    y[:, ::2] = predicted[:, ::2]
    return y


def _pair(family, fuse_options=None, compile_options=None, dtype=None):
    """(reference compiled as keras-hub compiles it, fused twin with the same weights, x, y, sample_weight)."""
    reference = _causal_lm(family, dtype=dtype)
    fused = _causal_lm(family, weights=reference.get_weights(), dtype=dtype)
    compile_options = dict(compile_options or {})
    reference.compile(optimizer=keras.optimizers.SGD(LR), sampler="greedy", **compile_options)
    hub.fuse_lm_head(fused, **(fuse_options or {"chunk_size": CHUNK}))
    fused.compile(optimizer=keras.optimizers.SGD(LR), sampler="greedy", **compile_options)
    x, sw = _batch()
    return reference, fused, x, _labels(reference, x), sw


def _numpy(weights):
    return [np.asarray(w, np.float64) for w in weights]


@pytest.fixture(scope="module", params=["gemma", "llama"])
def trained(request):
    """Per family, both models: one SGD step (its logs are the loss and accuracy of the initial weights, its update
    is -LR * gradient), two more epochs, and ``predict``/``generate`` afterwards (same weights again)."""
    keras.utils.set_random_seed(0)
    family = request.param
    reference, fused, x, y, sw = _pair(family)
    out = {"family": family, "reference_model": reference, "fused_model": fused, "x": x, "y": y, "sw": sw}
    for name, model in (("reference", reference), ("fused", fused)):
        before = _numpy(model.get_weights())
        step = model.train_on_batch(x, y, sample_weight=sw, return_dict=True)
        after = _numpy(model.get_weights())
        history = model.fit(x, y, sample_weight=sw, epochs=2, shuffle=False, verbose=0).history
        out[name] = dict(step=step, grads=[(b - a) / LR for b, a in zip(before, after)],
                         history=history, weights=_numpy(model.get_weights()),
                         paths=[v.path for v in model.weights])
        out[name]["predict"] = np.asarray(model.predict(x, verbose=0))
        out[name]["generate"] = model.generate(x, stop_token_ids=None)
        if family == "gemma":  # called directly, with training=True, outside fit/evaluate: the logits
            out[name]["called"] = keras.ops.convert_to_numpy(model(x, training=True))
    return out


def test_loss_and_weighted_accuracy_equal_default_compile(trained):
    ref, fused = trained["reference"], trained["fused"]
    assert set(fused["step"]) == {"loss", "sparse_categorical_accuracy"} == set(ref["step"])
    np.testing.assert_allclose(fused["step"]["loss"], ref["step"]["loss"], rtol=1e-5)
    accuracy = ref["step"]["sparse_categorical_accuracy"]
    assert 0.2 < accuracy < 0.9, accuracy  # labels are half the model's argmax (on real tokens, weighted)
    np.testing.assert_allclose(fused["step"]["sparse_categorical_accuracy"], accuracy, rtol=1e-6)


def test_gpt2_trains_on_its_preprocessors_output_as_the_default():
    """keras-hub's data: its preprocessor turns strings into token ids, labels shifted by one and the padding mask
    as a boolean sample_weight (computed once here; ``fit`` on strings runs the same preprocessor in tf.data, which
    costs seconds per model). The fused GPT-2 (tied embedding) fits on it as the default does."""
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=BPE_VOCABULARY, merges=BPE_MERGES)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=SEQ)
    x, y, sample_weight = (keras.tree.map_structure(keras.ops.convert_to_numpy, t)
                           for t in preprocessor(["a b c", "ab ab", "c", "a a a a b", "b c a"]))
    assert sample_weight.dtype == bool and not sample_weight.all()
    reference = _causal_lm("gpt2")
    fused = hub.fuse_lm_head(_causal_lm("gpt2", weights=reference.get_weights()))
    histories = []
    for model in (reference, fused):
        model.compile(optimizer=keras.optimizers.SGD(LR))
        histories.append(model.fit(x, y, sample_weight=sample_weight, epochs=3, shuffle=False, verbose=0).history)
    want, got = histories
    for key in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert got["loss"][-1] < got["loss"][0]
    for a, b in zip(_numpy(fused.get_weights()), _numpy(reference.get_weights())):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_is_the_weighted_token_mean_of_the_logits_cross_entropy():
    """The default compile's number written out in float64 from ``predict``'s (capped) logits:
    ``sum(mask * CE(logits, y)) / (B * S)``."""
    keras.utils.set_random_seed(0)
    model = _causal_lm("gemma")
    x, sw = _batch()
    y = _labels(model, x)
    logits = np.asarray(model.predict(x, verbose=0), np.float64)
    shift = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - shift).sum(-1)) + shift[..., 0]
    expected = (sw * (lse - np.take_along_axis(logits, y[..., None], -1)[..., 0])).sum() / sw.size
    hub.fuse_lm_head(model).compile(optimizer="sgd")
    got = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradients_equal_default_compile_including_the_embedding(trained):
    ref, fused = trained["reference"], trained["fused"]
    assert fused["paths"] == ref["paths"]
    embedding_seen = False
    for path, got, want in zip(ref["paths"], fused["grads"], ref["grads"]):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), err_msg=path)
        if "embeddings" in path:
            embedding_seen = True
            assert scale > 0, path  # the (tied or reverse) kernel receives a gradient through the fused op
    assert embedding_seen


def test_fit_decreases_the_loss_as_the_default_does(trained):
    ref, fused = trained["reference"], trained["fused"]
    for key in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(fused["history"][key], ref["history"][key], rtol=1e-4, err_msg=key)
    losses = [fused["step"]["loss"]] + fused["history"]["loss"]
    assert losses[-1] < losses[0], losses
    for path, got, want in zip(ref["paths"], fused["weights"], ref["weights"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=path)


def test_predict_generate_and_direct_calls_unchanged(trained):
    ref, fused = trained["reference"], trained["fused"]
    assert fused["predict"].shape == (BATCH, SEQ, VOCAB)
    np.testing.assert_allclose(fused["predict"], ref["predict"], rtol=1e-5, atol=1e-5)
    assert hub.is_fused(trained["fused_model"]) and not hub.is_fused(trained["reference_model"])
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(fused["generate"][key], ref["generate"][key], err_msg=key)
    prompt = trained["x"]["padding_mask"].astype(bool)
    generated = fused["generate"]["token_ids"]
    np.testing.assert_array_equal(generated[prompt], trained["x"]["token_ids"][prompt])  # prompt kept
    assert (generated[~prompt] != 0).any()  # and tokens generated after it
    if trained["family"] == "gemma":
        np.testing.assert_allclose(fused["called"], ref["predict"], rtol=1e-5, atol=1e-5)
        # the soft-cap is in play: the logits are capped, and the uncapped ones would pass the cap
        assert np.abs(fused["predict"]).max() <= SOFTCAP
        assert np.abs(fused["predict"]).max() > 0.9 * SOFTCAP


@pytest.mark.parametrize("fuse_options,loss", [
    (dict(ignore_class=0, label_smoothing=0.1, z_loss=1e-3),
     lambda: ksh.StableSparseSoftmaxCE(ignore_class=0, label_smoothing=0.1, z_loss=1e-3)),
    ({}, lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0, reduction="sum")),
    ({}, lambda: ksh.StableSparseSoftmaxCE(reduction="mean_with_sample_weight")),
])
def test_loss_options_and_explicit_losses_equal_the_unfused_loss(fuse_options, loss):
    """fuse_lm_head's options configure loss='auto'; an explicit loss is taken with its own options and reduction.
    Label 0 is ignored in two cases (it occurs among the labels); each equals the same loss compiled unfused."""
    keras.utils.set_random_seed(0)
    reference = _causal_lm("llama")
    fused = hub.fuse_lm_head(_causal_lm("llama", weights=reference.get_weights()), **fuse_options)
    x, sw = _batch()
    y = np.random.default_rng(2).integers(0, VOCAB, (BATCH, SEQ))
    y[:, 1] = 0
    reference.compile(optimizer="sgd", loss=loss())
    fused.compile(optimizer="sgd", loss=loss() if not fuse_options else "auto")
    want = reference.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    got = fused.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    if BACKEND != "torch":
        # on torch, Keras masks the compiled metrics with the loss's ignore mask (its own SparseCategoricalCrossentropy
        # with ignore_class too), on JAX and TensorFlow not; the fused accuracy is always unmasked, as the latter
        np.testing.assert_allclose(got["sparse_categorical_accuracy"], want["sparse_categorical_accuracy"], rtol=1e-6)


def test_per_sequence_weights_and_no_weights_and_loss_weights():
    """sample_weight per sequence (B,) weights each row's tokens; None weighs every token 1; loss_weights scales."""
    keras.utils.set_random_seed(0)
    reference = _causal_lm("gpt2")
    fused = hub.fuse_lm_head(_causal_lm("gpt2", weights=reference.get_weights()))
    reference.compile(optimizer="sgd", loss_weights=2.0)
    fused.compile(optimizer="sgd", loss_weights=2.0)
    x, sw = _batch()
    y = _labels(reference, x)
    for weights in (None, sw[..., None]):  # no weights; the padding mask with a trailing 1
        want = reference.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)
        got = fused.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    # (B,) weights: Keras's loss cannot broadcast them over (B, S); the fused one weighs each row's tokens (also
    # after TensorFlow's relaxed retracing has lost the weights' rank, at this third signature)
    rows = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    got = fused.evaluate(x, y, sample_weight=rows, verbose=0, return_dict=True)
    per_token = np.repeat(rows[:, None, None], SEQ, 1)  # (B, S, 1), as above: no third trace of Keras's own loss
    want = reference.evaluate(x, y, sample_weight=per_token, verbose=0, return_dict=True)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("policy,reverse_dtype", [("mixed_bfloat16", None), ("mixed_bfloat16", "float32"),
                                                   ("float32", "bfloat16"), ("bfloat16", "float32")])
def test_operands_are_those_of_the_layers_reverse_matmul(policy, reverse_dtype):
    """Called at top level under mixed_bfloat16 the layer reads its kernel as bfloat16 (inside a mixed model it
    would not: ``test_mixed_precision_fit``); with ``reverse_dtype`` both operands are cast to it. The fused loss of
    the same hidden states equals the cross-entropy of the layer's own logits (eager: identical hidden states)."""
    from keras_stable_heads import linear_ce

    embedding = keras.layers.ReversibleEmbedding(VOCAB, HIDDEN, dtype=policy, reverse_dtype=reverse_dtype,
                                                 logit_soft_cap=SOFTCAP, embeddings_initializer="random_normal")
    embedding.build()
    rng = np.random.default_rng(0)
    embedding.embeddings.assign(rng.normal(0.0, 0.3, (VOCAB, HIDDEN)))
    hidden = keras.ops.convert_to_tensor(rng.normal(0.0, 2.0, (BATCH, SEQ, HIDDEN)), dtype=embedding.compute_dtype)
    y = rng.integers(0, VOCAB, (BATCH, SEQ))
    logits = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(embedding(hidden, reverse=True), "float64")))
    shift = logits.max(-1, keepdims=True)
    ce = np.log(np.exp(logits - shift).sum(-1)) + shift[..., 0] - np.take_along_axis(logits, y[..., None], -1)[..., 0]
    head = hub.LMHead(embedding=embedding, tied=True, kernel_autocast=hub.autocast_dtype(None, embedding))
    assert (head.softcap, head.reverse_dtype) == (SOFTCAP, reverse_dtype)
    h, kernel = head.operands(hidden)
    want_dtype = reverse_dtype or ("bfloat16" if policy == "mixed_bfloat16" else policy)
    assert keras.backend.standardize_dtype(h.dtype) == want_dtype
    total, _ = linear_ce.weighted_sum(h, kernel, y, np.ones_like(y, "float32"), transpose_kernel=True,
                                      logit_softcap=SOFTCAP)
    rtol = 1e-2 if want_dtype == "bfloat16" else 1e-6
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(total)), ce.sum(), rtol=rtol)


def test_mixed_precision_fit():
    """A mixed_bfloat16 Gemma trains fused; its first loss is the default's up to the bfloat16 backbone, whose
    rounding differs between two compiled programs (the default's own predict and evaluate differ by as much)."""
    keras.utils.set_random_seed(0)
    reference = _causal_lm("gemma", dtype="mixed_bfloat16")
    fused = hub.fuse_lm_head(_causal_lm("gemma", weights=reference.get_weights(), dtype="mixed_bfloat16"))
    reference.compile(optimizer=keras.optimizers.SGD(LR))
    fused.compile(optimizer=keras.optimizers.SGD(LR))
    x, sw = _batch()
    y = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ))
    want = reference.evaluate(x, y, sample_weight=sw, verbose=0)[0]
    got = fused.fit(x, y, sample_weight=sw, epochs=3, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got[0], want, rtol=3e-3)
    assert got[-1] < got[0], got


def test_unfuse_restores_the_model():
    keras.utils.set_random_seed(0)
    model = _causal_lm("gpt2")
    own = {name: model.__dict__.get(name) for name in ("call", "compile", "compute_loss", "train_step")}
    hub.fuse_lm_head(model, label_smoothing=0.1)
    model.compile(optimizer="sgd")
    x, sw = _batch()
    y = _labels(model, x)
    fused_loss = model.evaluate(x, y, sample_weight=sw, verbose=0)
    assert hub.unfuse_lm_head(model) is model and not hub.is_fused(model)
    assert {name: model.__dict__.get(name) for name in own} == own
    # the compiled loss stays: the ordinary StableSparseSoftmaxCE, now from the logits
    assert isinstance(model.loss, ksh.StableSparseSoftmaxCE) and model.loss.label_smoothing == 0.1
    np.testing.assert_allclose(model.evaluate(x, y, sample_weight=sw, verbose=0), fused_loss, rtol=1e-5)


def test_lora_fine_tuning_and_save_load(tmp_path):
    """keras-hub's LoRA fine-tuning (backbone frozen, the embedding too): one fused step equals the default's; a
    saved fused model loads back unfused, with the same logits (fuse it again after loading)."""
    keras.utils.set_random_seed(0)
    reference = _causal_lm("gemma")
    fused = _causal_lm("gemma", weights=reference.get_weights())
    for model in (reference, fused):
        model.backbone.enable_lora(rank=2)
    fused.set_weights(reference.get_weights())
    hub.fuse_lm_head(fused)
    for model in (reference, fused):
        model.compile(optimizer=keras.optimizers.SGD(LR))
    x, sw = _batch()
    y = np.random.default_rng(3).integers(0, VOCAB, (BATCH, SEQ))
    want = reference.train_on_batch(x, y, sample_weight=sw, return_dict=True)
    got = fused.train_on_batch(x, y, sample_weight=sw, return_dict=True)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert [v.path for v in fused.trainable_variables] == [v.path for v in reference.trainable_variables]
    assert all("lora" in v.path for v in fused.trainable_variables)
    assert not hub.lm_head(fused).kernel_trainable  # so the fused op skipped the embedding's gradient
    for path, a, b in zip([v.path for v in fused.weights], _numpy(fused.get_weights()),
                          _numpy(reference.get_weights())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=path)
    fused.save(tmp_path / "fused.keras")
    loaded = keras.saving.load_model(tmp_path / "fused.keras")
    assert not hub.is_fused(loaded)
    np.testing.assert_allclose(np.asarray(loaded.predict(x, verbose=0)), np.asarray(fused.predict(x, verbose=0)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="reads the lowered JAX train step")
def test_train_step_never_materialises_the_logits(trained):
    """The fused model's lowered JAX train step holds logits only as (chunk, V) blocks: no (tokens, V) or
    (B, S, V) array anywhere (the default's train step has (B, S, V) logits and their gradient)."""
    import jax

    model, x, y, sw = trained["fused_model"], trained["x"], trained["y"], trained["sw"]
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])
    text = jax.jit(model.train_step).lower(state, (x, y, sw)).as_text()
    assert f"tensor<{CHUNK}x{VOCAB}xf32>" in text
    for shape in (f"{BATCH * SEQ}x{VOCAB}x", f"{BATCH}x{SEQ}x{VOCAB}x"):
        assert shape not in text, shape


@pytest.mark.skipif(BACKEND != "torch", reason="watches PyTorch's dispatcher")
def test_first_torch_step_never_materialises_the_logits():
    """The fused model's first ``train_on_batch`` on PyTorch (Keras's build of the compiled loss and metrics, then
    the step) creates no tensor of the logits' size on the CPU: logits exist only as (chunk, V) blocks. Keras builds
    the loss on the meta device and, where that fails, again on real tensors of ones the size of ``y_pred``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if getattr(value, "device", None) is not None and value.device.type == "cpu" and value.dim() \
                        and value.shape[-1] == VOCAB:
                    self.rows.append(value.numel() // VOCAB)
            return out

    _, fused, x, y, sw = _pair("gemma")
    with Sizes() as sizes:
        logs = fused.train_on_batch(x, y, sample_weight=sw, return_dict=True)
    assert np.isfinite(logs["loss"])
    # rows of V values: (chunk, V) logits blocks and the (D, V) kernel's transpose, never the (B, S, V) logits
    assert CHUNK in sizes.rows and max(sizes.rows) < BATCH * SEQ, sorted(set(sizes.rows))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_models_without_a_reverse_embedding_output_are_refused():
    with pytest.raises(TypeError, match="keras.Model"):
        hub.fuse_lm_head("gemma")
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="not by a ReversibleEmbedding"):
        hub.fuse_lm_head(keras.Model(inputs, keras.layers.Dense(3)(inputs)))
    embedding = keras.layers.ReversibleEmbedding(10, 4)
    tokens = keras.Input((5,), dtype="int32")
    with pytest.raises(ValueError, match="reverse=True"):
        hub.fuse_lm_head(keras.Model(tokens, embedding(tokens)))


def test_a_plain_functional_model_ending_in_a_reverse_embedding_is_fused():
    """Not only keras-hub's tasks: any Functional model whose output is ReversibleEmbedding(reverse=True)."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQ,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(VOCAB, HIDDEN, tie_weights=False, logit_soft_cap=2.0)
    hidden = keras.layers.Dense(HIDDEN, activation="tanh")(embedding(tokens))
    model = keras.Model(tokens, embedding(hidden, reverse=True))
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=["accuracy"])
    hub.fuse_lm_head(twin)
    twin.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 weighted_metrics=["accuracy"])
    x, sw = _batch()
    y = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ))
    want = model.evaluate(x["token_ids"], y, sample_weight=sw, verbose=0, return_dict=True)
    got = twin.evaluate(x["token_ids"], y, sample_weight=sw, verbose=0, return_dict=True)
    assert set(got) == {"loss", "accuracy"}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("options,error,match", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(ignore_class=0.5), TypeError, "ignore_class"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(implementation="gpu_magic"), ValueError, "implementation"),
])
def test_bad_options_raise(options, error, match):
    model = _causal_lm("gpt2")
    with pytest.raises(error, match=match):
        hub.fuse_lm_head(model, **options)
    assert not hub.is_fused(model)


@pytest.mark.parametrize("compile_options,match", [
    (dict(loss="mse"), "need the logits"),
    (dict(loss=keras.losses.SparseCategoricalCrossentropy()), "from_logits=False"),
    (dict(loss=ksh.StableSparseSoftmaxCE(class_weight=[1.0] * VOCAB)), "class_weight"),
    (dict(loss=ksh.StableSparseSoftmaxCE(logit_softcap=5.0)), "logit_softcap"),
    (dict(loss=ksh.StableSparseSoftmaxCE(reduction="none")), "reduction"),
    (dict(weighted_metrics=["mae"]), "would need the logits"),
    (dict(metrics=["accuracy"]), "weighted_metrics"),
    (dict(loss_weights=[1.0, 2.0]), "loss_weights"),
])
def test_compile_refuses_what_needs_the_logits(compile_options, match):
    model = hub.fuse_lm_head(_causal_lm("gpt2"))
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", **compile_options)


def test_fit_before_recompiling_and_fusing_twice_raise():
    model = hub.fuse_lm_head(_causal_lm("gpt2"))  # keras-hub compiled it when it was built, unfused
    x, sw = _batch()
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(x, np.zeros((BATCH, SEQ), "int32"), sample_weight=sw, shuffle=False, verbose=0)
    with pytest.raises(ValueError, match="fused already"):
        hub.fuse_lm_head(model)
    with pytest.raises(ValueError, match="not fused"):
        hub.unfuse_lm_head(_causal_lm("gpt2"))


def test_missing_keras_hub_names_the_extra(monkeypatch):
    """keras-hub is needed only where Keras has no ReversibleEmbedding of its own (older Keras 3 releases)."""
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="not by a ReversibleEmbedding"):  # Keras's own class is enough
        hub.fuse_lm_head(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    monkeypatch.delattr(keras.layers, "ReversibleEmbedding")
    with pytest.raises(ImportError, match=r"keras-stable-heads\[hub\]"):
        hub.fuse_lm_head(keras.Sequential())


# ----------------------------------------------------------------------------------------------------------------
# JAX distribution: 4 simulated devices in a subprocess (tests/_hub_workers.py)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _distributed_worker(request):
    """Starts the 4-device JAX worker when this module's distribution tests are selected, before the other tests
    run, so that its compilations overlap theirs; yields the process."""
    wanted = BACKEND == "jax" and any(item.module is request.module and "jax_distribution" in item.name
                                      for item in request.session.items)
    if not wanted:
        yield None
        return
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, WORKER, "jax_distributed"], env=env, text=True,
                            cwd=os.path.dirname(WORKER), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def distributed(_distributed_worker):
    out, err = _distributed_worker.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if _distributed_worker.returncode != 0 or not lines:
        pytest.fail(f"worker exited with {_distributed_worker.returncode}:\n{err[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _assert_same_training(got, want, name):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5, atol=1e-6, err_msg=f"{name}: loss history")
    np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6, err_msg=f"{name}: accuracy")
    for i, (a, b) in enumerate(zip(got["weights"], want["weights"])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"{name}: weights {i}")
    assert want["loss"][-1] < want["loss"][0], want["loss"]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_distribution_data_parallel_equals_one_device(distributed):
    """DataParallel over 4 devices: the fused Gemma trains as the default compile does on one device, and each
    device computes the loss of its own tokens: no all-gather (the hidden states are not gathered), logits in
    (chunk, V) blocks of its 16 tokens."""
    assert distributed["devices"] == 4
    runs = distributed["gemma"]
    _assert_same_training(runs["data_parallel"], runs["single"], "gemma, DataParallel")
    program = runs["data_parallel_program"]
    assert {op for op, _ in program["collectives"]} == {"all-reduce"}, program["collectives"]
    vocab, chunk, tokens = distributed["vocab"], distributed["chunk"], distributed["batch"] * distributed["seq"]
    assert [chunk, vocab] in program["dot_shapes"], program["dot_shapes"]
    assert not [s for s in program["array_shapes"] if tokens in s], "an array of every token"


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_jax_distribution_model_parallel_vocabulary_sharded_equals_one_device(distributed, family):
    """ModelParallel on a 2 x 2 mesh ("batch", "model") with the head's kernel split over its vocabulary (Gemma's tied
    (V, D) embedding, Llama's untied (D, V) reverse kernel): training equals the default compile on one device, and
    the compiled step holds no array with the whole vocabulary axis (V = 96) -- not the kernel, its gradient, nor a
    row of logits; each device multiplies (chunk, D) hidden states by its (V/2) shard, and the shards' log-sum-exps
    are combined by all-reduces of per-token values."""
    runs = distributed[family]
    vocab, hidden, chunk = distributed["vocab"], distributed["hidden"], distributed["chunk"]
    assert runs["kernel_shard"] == ([vocab // 2, hidden] if family == "gemma" else [hidden, vocab // 2])
    _assert_same_training(runs["model_parallel"], runs["single"], f"{family}, ModelParallel")
    program = runs["model_parallel_program"]
    assert not [s for s in program["array_shapes"] if vocab in s], [s for s in program["array_shapes"] if vocab in s]
    assert [chunk, vocab // 2] in program["dot_shapes"], program["dot_shapes"]
    reduced = [shape for op, shapes in program["collectives"] if op == "all-reduce" for shape in shapes]
    assert [chunk] in reduced, program["collectives"]  # per-token max/sum of the sharded log-sum-exp

"""audit / stabilize / install_compile_check on the current backend, one real buggy model per finding kind.

For each kind: the audit reports it (and nothing for the clean twin), ``stabilize`` gives the exact loss on
extreme logits (30.0, not 16.118) and training makes progress where the original stalls. TensorFlow's backend
rescues a sigmoid/softmax + cross-entropy pair by reading the logits cached on the tensor; where it does, the
"original stalls" half is asserted on JAX and PyTorch only and the rescue itself is asserted on TensorFlow.
"""

import functools
import math
import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_stable_heads as ksh
from keras_stable_heads.audit import CODES
from keras_stable_heads.audit import AuditError
from keras_stable_heads.audit import AuditWarning
from keras_stable_heads.audit import audit
from keras_stable_heads.audit import install_compile_check
from keras_stable_heads.audit import stabilize
from keras_stable_heads.audit import stable_twin
from keras_stable_heads.audit import uninstall_compile_check
from keras_stable_heads.heads import BinaryHead
from keras_stable_heads.heads import GaussianHead
from keras_stable_heads.heads import MultilabelHead
from keras_stable_heads.heads import SoftmaxHead

BACKEND = keras.backend.backend()
L = keras.layers
CLIP = -math.log(1e-7)  # 16.118: Keras's probability losses at a clipped probability


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*softmax over axis.*")  # Keras's own hint for a 1-unit softmax
        warnings.filterwarnings("ignore", message=".*from_logits=True.*")  # TensorFlow's hint
        yield


def _dense(units, activation=None, bias=0.0, name=None):
    """A Dense layer with a zero kernel: its logits are exactly ``bias`` for every input."""
    return L.Dense(units, activation=activation, kernel_initializer="zeros", name=name,
                   bias_initializer=keras.initializers.Constant(bias))


def _model(*layers, inputs=4):
    return keras.Sequential([keras.Input((inputs,)), *layers])


X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
ONES = np.ones((32, 1), "float32")


def _steps(model, x, y, n):
    """``n`` training steps on one batch; the total loss after each."""
    return [float(np.ravel(model.train_on_batch(x, y))[0]) for _ in range(n)]


def _evaluate(model, x, y):
    """The compiled loss on one batch (computed eagerly: no compiled function per model)."""
    return float(to_numpy(model.compute_loss(x=x, y=y, y_pred=model(x))))


def _predict(model, x):
    return keras.tree.map_structure(to_numpy, model(x))


# ----------------------------------------------------------------------------------------------------------------
# One real model per finding kind, and clean models
# ----------------------------------------------------------------------------------------------------------------

BUGGY = {
    "probabilities_as_logits": lambda: (_model(_dense(1, "sigmoid")),
                                        keras.losses.BinaryCrossentropy(from_logits=True)),
    "probabilities_as_logits/activation_layer": lambda: (
        _model(L.Dense(8), _dense(3), L.Activation("softmax")), keras.losses.CategoricalCrossentropy(from_logits=True)),
    "probabilities_as_logits/stable_loss": lambda: (_model(_dense(3), L.Softmax()), ksh.StableSparseSoftmaxCE()),
    "logits_as_probabilities": lambda: (_model(_dense(1)), "binary_crossentropy"),
    "logits_as_probabilities/head": lambda: (_model(BinaryHead()), keras.losses.BinaryCrossentropy()),
    "softmax_one_unit": lambda: (_model(_dense(1, "softmax")), "binary_crossentropy"),
    "softmax_binary_ce": lambda: (_model(_dense(4, "softmax")), keras.losses.BinaryCrossentropy()),
    "sigmoid_categorical_ce": lambda: (_model(_dense(3), L.Activation("sigmoid")), "categorical_crossentropy"),
    "saturating_regression_loss": lambda: (_model(_dense(1, "sigmoid")), "mse"),
    "saturating_regression_loss/softmax_mae": lambda: (_model(_dense(3, "softmax")), keras.losses.MeanAbsoluteError()),
    "clipped_probability_loss": lambda: (_model(_dense(1, "sigmoid"), L.Dropout(0.2)), "binary_crossentropy"),
    "clipped_probability_loss/sparse": lambda: (_model(_dense(3, "softmax")), "sparse_categorical_crossentropy"),
    "head_loss_mismatch": lambda: (_model(GaussianHead(1)), "mse"),
}

CLEAN = {
    "logits+from_logits": lambda: (_model(_dense(1)), keras.losses.BinaryCrossentropy(from_logits=True)),
    "logits+stable": lambda: (_model(_dense(3)), ksh.StableSparseSoftmaxCE()),
    "head+head.loss": lambda: (_model(MultilabelHead(3)), MultilabelHead(3).loss()),
    "softmax_head+sparse_keras_logits": lambda: (
        _model(SoftmaxHead(3)), keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "regression": lambda: (_model(_dense(2)), "mse"),
    "no_loss": lambda: (_model(_dense(1, "softmax")), None),
}


@pytest.mark.parametrize("case", list(BUGGY))
def test_audit_reports_each_kind_from_compile(case):
    model, loss = BUGGY[case]()
    model.compile(optimizer="sgd", loss=loss)
    findings = audit(model)
    code = case.split("/")[0]
    assert findings.codes == [code], str(findings)
    finding = findings[0]
    assert finding.output == model.layers[-1].name and finding.layer in [layer.name for layer in model.layers]
    assert finding.problem.endswith(".") and any(ch.isdigit() for ch in finding.problem)
    assert finding.fix and code in CODES
    assert finding.severity == ("warning" if code == "clipped_probability_loss" else "error")
    text = str(findings)
    assert text.startswith("1 finding:") and code in text and finding.output in text


@pytest.mark.parametrize("case", list(CLEAN))
def test_clean_models_have_no_findings(case):
    model, loss = CLEAN[case]()
    if loss is not None:
        model.compile(optimizer="sgd", loss=loss)
    findings = audit(model)
    if case == "no_loss":  # the structural check needs no loss
        assert findings.codes == ["softmax_one_unit"]
        return
    assert findings == [] and str(findings).startswith("no findings")


def test_messages_carry_the_numbers_from_epsilon():
    model = _model(_dense(1, "sigmoid"))
    assert "capped at 16.1" in audit(model, loss="binary_crossentropy")[0].problem
    assert "past |logit| 16.1" in audit(model, loss="binary_crossentropy")[0].problem
    double = audit(model, loss=keras.losses.BinaryCrossentropy(from_logits=True))[0].problem
    assert "0.313" in double and "0.693" in double
    softmax = audit(_model(_dense(10, "softmax")), loss=keras.losses.CategoricalCrossentropy(from_logits=True))[0]
    assert f"{math.log1p(9 / math.e):.3f}" in softmax.problem and "log 10 = 2.303" in softmax.problem
    mse = audit(model, loss="mse")[0].problem
    assert "9.1e-05" in mse  # 2 (p - 1) p (1 - p) at logit -10
    previous = keras.config.epsilon()
    keras.config.set_epsilon(1e-4)
    try:
        assert "capped at 9.2" in audit(model, loss="binary_crossentropy")[0].problem
    finally:
        keras.config.set_epsilon(previous)


def test_loss_argument_overrides_compile_and_is_read_from_compile():
    model = _model(_dense(1, "sigmoid"))
    assert audit(model) == []  # not compiled, no loss: nothing to check
    model.compile(loss="mse")
    assert audit(model).codes == ["saturating_regression_loss"]
    assert audit(model, loss=ksh.StableBinaryCE()).codes == ["probabilities_as_logits"]
    assert audit(model, loss=functools.partial(keras.losses.binary_crossentropy, from_logits=True)).codes == [
        "probabilities_as_logits"]


def _multi_output():
    inputs = keras.Input((4,))
    hidden = L.Dense(8)(inputs)
    logits = _dense(3, name="kind_logits")(hidden)
    return inputs, [
        L.Dense(1, activation="sigmoid", name="flag")(hidden),  # Dense(activation=...)
        L.Softmax(name="kind")(logits),  # a Softmax layer after a Dense
        L.Dense(2, name="size")(hidden),  # regression
    ]


def test_multi_output_losses_by_list_and_dict():
    inputs, outputs = _multi_output()
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss=[keras.losses.BinaryCrossentropy(from_logits=True), "mse", "mse"])
    assert [(f.output, f.code) for f in audit(model)] == [("flag", "probabilities_as_logits"),
                                                         ("kind", "saturating_regression_loss")]
    dict_loss = {"flag": "binary_crossentropy", "kind": ksh.StableSoftmaxCE(), "size": "mse"}
    assert [(f.output, f.code) for f in audit(model, loss=dict_loss)] == [("flag", "clipped_probability_loss"),
                                                                         ("kind", "probabilities_as_logits")]
    # outputs given as a dict: the dict keys name them; keras.ops.sigmoid in the graph is read as well
    named = keras.Model(inputs, {"a": keras.ops.sigmoid(L.Dense(1)(inputs)), "b": outputs[2]})
    named.compile(loss={"a": keras.losses.BinaryCrossentropy(from_logits=True), "b": "mse"})
    assert [(f.output, f.code) for f in audit(named)] == [("a", "probabilities_as_logits")]
    with pytest.raises(ValueError, match="name no output"):
        audit(model, loss={"nope": "mse"})
    with pytest.raises(ValueError, match="2 losses were given for the 3 outputs"):
        audit(model, loss=["mse", "mse"])


def test_nested_model_and_unbuilt_sequential():
    backbone = _model(L.Dense(8), L.Dense(3, activation="softmax", name="inner"))
    inputs = keras.Input((4,))
    outer = keras.Model(inputs, backbone(inputs))
    findings = audit(outer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    assert findings.codes == ["probabilities_as_logits"] and findings[0].layer.endswith("/inner")
    unbuilt = keras.Sequential([L.Dense(4), L.Dense(1), L.Activation("softmax")])
    assert audit(unbuilt, loss="binary_crossentropy").codes == ["softmax_one_unit"]

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        audit(Subclassed())


# ----------------------------------------------------------------------------------------------------------------
# stabilize: exact losses, progress where the original stalls, the same predictions
# ----------------------------------------------------------------------------------------------------------------


def _rescued_on_tensorflow():
    return BACKEND == "tensorflow"


def test_clipped_sigmoid_bce_becomes_exact_and_learns():
    model = _model(_dense(1, "sigmoid", bias=-30.0))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="binary_crossentropy")
    before = _evaluate(model, X, ONES)
    training, inference = stabilize(model)
    np.testing.assert_allclose(_predict(inference, X), _predict(model, X), rtol=1e-6, atol=1e-30)
    assert isinstance(training.layers[-1], BinaryHead) and isinstance(training.loss, ksh.StableBinaryCE)
    assert _evaluate(training, X, ONES) == pytest.approx(30.0, rel=1e-6)
    if _rescued_on_tensorflow():
        assert before == pytest.approx(30.0, rel=1e-5)  # TF substitutes the cached logits
    else:
        assert before == pytest.approx(CLIP, rel=1e-5)
        assert _steps(model, X, ONES, 3)[-1] == pytest.approx(CLIP, rel=1e-5)  # zero gradient: stuck
    assert _steps(training, X, ONES, 3)[-1] < 29.0


def test_double_sigmoid_stalls_and_stabilized_trains():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    keras.utils.set_random_seed(3)
    model = _model(L.Dense(1, activation="sigmoid"))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    training, inference = stabilize(model)
    np.testing.assert_allclose(_predict(inference, x), _predict(model, x), rtol=1e-6)
    original = _steps(model, x, y, 25)
    fixed = _steps(training, x, y, 25)
    assert fixed[-1] < 0.35, fixed
    if _rescued_on_tensorflow():
        assert original[-1] < 0.35  # rescued (with a warning) on TensorFlow only
    else:
        assert original[-1] > 0.5, original  # floor (0.313 + 0.693) / 2 for balanced labels


def test_logits_as_probabilities_is_stuck_everywhere_and_stabilized_learns():
    model = _model(_dense(1, bias=-1.0))  # a linear output, negative: clipped to 1e-7
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    training, _ = stabilize(model)
    assert _evaluate(training, X, ONES) == pytest.approx(math.log1p(math.e), rel=1e-6)  # softplus(1), exact
    assert _steps(model, X, ONES, 3) == pytest.approx([CLIP] * 3, rel=1e-5)
    fixed = _steps(training, X, ONES, 5)
    assert fixed[-1] < fixed[0] < 1.32


def test_softmax_one_unit_is_constant_and_stabilized_is_a_sigmoid():
    model = _model(_dense(1, "softmax", bias=-2.0))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    predictions = _predict(model, X)
    assert np.ptp(predictions) == 0.0 and predictions[0, 0] == pytest.approx(1.0, abs=1e-6)  # a constant
    training, inference = stabilize(model)
    assert isinstance(training.layers[-1], BinaryHead)
    np.testing.assert_allclose(_predict(inference, X[:2]), 1.0 / (1.0 + math.e ** 2), rtol=1e-6)
    assert _evaluate(training, X, ONES) == pytest.approx(math.log1p(math.e ** 2), rel=1e-6)
    if not _rescued_on_tensorflow():
        assert _steps(model, X, ONES, 3) == pytest.approx([0.0] * 3, abs=1e-6)  # log(1) = 0 and no gradient
    fixed = _steps(training, X, ONES, 5)
    assert fixed[-1] < fixed[0]


def test_saturating_mse_stalls_everywhere_and_stabilized_learns():
    model = _model(_dense(1, "sigmoid", bias=-10.0))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    training, inference = stabilize(model)
    np.testing.assert_allclose(_predict(inference, X), _predict(model, X), rtol=1e-6)
    assert _evaluate(training, X, ONES) == pytest.approx(10.0 + math.log1p(math.exp(-10.0)), rel=1e-6)
    original = _steps(model, X, ONES, 5)
    assert original[-1] > 0.999, original  # gradient 9e-5: 5 steps of SGD(1.0) move the logit by 5e-4
    assert _steps(training, X, ONES, 5)[-1] < 6.0


@pytest.mark.parametrize("case,logits,labels,exact", [
    ("softmax_binary_ce", [-30.0, 0.0, 0.0, 0.0], [[1.0, 0.0, 0.0, 0.0]], 30.0 + math.log(3.0)),
    ("sigmoid_categorical_ce", [-30.0, 0.0, 0.0], [[1.0, 0.0, 0.0]], 30.0 + math.log(2.0)),
    ("clipped_probability_loss/sparse", [-30.0, 0.0, 0.0], [[0]], 30.0 + math.log(2.0)),
    ("probabilities_as_logits/activation_layer", [-30.0, 0.0, 0.0], [[1.0, 0.0, 0.0]], 30.0 + math.log(2.0)),
])
def test_stabilized_softmax_losses_are_exact_at_extreme_logits(case, logits, labels, exact):
    model, loss = BUGGY[case]()
    model.compile(optimizer="sgd", loss=loss)
    _set_logits(model, logits)
    x = X[:4]
    y = np.repeat(np.array(labels, "float32" if case != "clipped_probability_loss/sparse" else "int32"), 4, axis=0)
    training, inference = stabilize(model)
    assert isinstance(training.layers[-1], SoftmaxHead)
    assert _evaluate(training, x, y) == pytest.approx(exact, rel=1e-6)
    if case == "sigmoid_categorical_ce":  # sigmoid -> softmax: same ranking, now a distribution
        ranking = _predict(model, x).argsort(-1)
        np.testing.assert_array_equal(_predict(inference, x).argsort(-1), ranking)
    else:
        np.testing.assert_allclose(_predict(inference, x), _predict(model, x), rtol=1e-5, atol=1e-30)
    original = _evaluate(model, x, y)
    assert original < exact - 1.0 or _rescued_on_tensorflow()  # clipped, or (TF) rescued


def _set_logits(model, logits):
    """Give the model's last Dense a zero kernel and ``logits`` as its bias."""
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)][-1]
    kernel, _ = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), np.array(logits, "float32")])


def test_head_mismatch_stabilizes_to_the_heads_loss():
    model, loss = BUGGY["head_loss_mismatch"]()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    training, inference = stabilize(model)
    assert isinstance(training.loss, ksh.GaussianNLL)
    y = (X[:, :1] * 3.0).astype("float32")
    raw = _predict(training, X)
    assert _evaluate(training, X, y) == pytest.approx(float(to_numpy(ksh.ops.gaussian_nll(raw, y)).mean()), rel=1e-5)
    linked = _predict(inference, X)
    np.testing.assert_allclose(linked[:, 1], np.exp(raw[:, 1]), rtol=1e-5)
    steps = _steps(training, X, y, 10)
    assert steps[-1] < steps[0]


def test_stabilize_multi_output_functional_keeps_names_and_regression():
    inputs, outputs = _multi_output()
    model = keras.Model(inputs, outputs)
    loss = {"flag": keras.losses.BinaryCrossentropy(label_smoothing=0.1), "kind": "sparse_categorical_crossentropy",
            "size": "mse"}
    model.compile(optimizer="adam", loss=loss, loss_weights={"flag": 1.0, "kind": 2.0, "size": 0.5})
    training, inference = stabilize(model)
    assert training.output_names == ["flag", "kind", "size"]
    assert set(training.loss) == {"flag", "kind", "size"} and training.loss["size"] == "mse"
    assert training.loss["flag"].label_smoothing == 0.1 and isinstance(training.loss["kind"], ksh.StableSparseSoftmaxCE)
    assert audit(training) == []
    for got, want in zip(_predict(inference, X), _predict(model, X)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    y = [np.ones((32, 1), "float32"), np.zeros((32,), "int32"), np.zeros((32, 2), "float32")]
    steps = _steps(training, X, y, 3)
    assert np.all(np.isfinite(steps)) and steps[-1] < steps[0]


def test_stabilize_conv_softmax_nested_and_linear_non_dense_outputs():
    # a Conv1D with a softmax (its activation is dropped and a head appended), inside a nested model
    inner = keras.Sequential([keras.Input((5, 2)), L.Conv1D(3, 1, activation="softmax", name="conv")], name="inner")
    inputs = keras.Input((5, 2))
    model = keras.Model(inputs, inner(inputs))
    model.compile(loss="categorical_crossentropy")
    assert audit(model).codes == ["clipped_probability_loss"]
    x = np.random.default_rng(4).normal(size=(3, 5, 2)).astype("float32")
    training, inference = stabilize(model)
    np.testing.assert_allclose(_predict(inference, x), _predict(model, x), rtol=1e-5)
    assert isinstance(training.layers[-1], SoftmaxHead) and audit(training) == []
    # a linear output from a layer that is not a Dense, under a probability loss: a head is appended
    pooled = keras.Sequential([keras.Input((5, 1)), L.GlobalAveragePooling1D(name="pool")])
    pooled.compile(loss="binary_crossentropy")
    assert audit(pooled).codes == ["logits_as_probabilities"]
    training, inference = stabilize(pooled)
    z = np.full((2, 5, 1), -3.0, "float32")
    np.testing.assert_allclose(_predict(inference, z), 1.0 / (1.0 + math.exp(3.0)), rtol=1e-6)
    assert training.output_names == ["pool"]


def test_stabilize_errors():
    with pytest.raises(ValueError, match="no loss to stabilize"):
        stabilize(_model(_dense(1, "sigmoid")))
    with pytest.raises(ValueError, match="no known stable twin"):
        stabilize(_model(_dense(1, "sigmoid")), loss=lambda y, p: (y - p) ** 2)
    shared = L.Dense(2, activation="sigmoid")
    inputs = keras.Input((2,))
    with pytest.raises(ValueError, match="called more than once"):
        stabilize(keras.Model(inputs, shared(shared(inputs))), loss="binary_crossentropy")
    hidden = L.Dense(3, activation="softmax")(inputs)
    with pytest.raises(ValueError, match="also feeds other layers"):
        stabilize(keras.Model(inputs, [hidden, L.Dense(1)(hidden)]), loss=["categorical_crossentropy", "mse"])
    with pytest.raises(ValueError, match="replace the relu"):
        stabilize(_model(_dense(1, "relu")), loss="binary_crossentropy")


# ----------------------------------------------------------------------------------------------------------------
# Stable twins: options carried, equal to Keras where Keras is exact
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keras_loss,expected_cls,options", [
    (keras.losses.BinaryCrossentropy(label_smoothing=0.1, reduction="sum"), ksh.StableBinaryCE,
     {"label_smoothing": 0.1, "reduction": "sum"}),
    (keras.losses.CategoricalCrossentropy(label_smoothing=0.2), ksh.StableSoftmaxCE, {"label_smoothing": 0.2}),
    (keras.losses.SparseCategoricalCrossentropy(ignore_class=-1), ksh.StableSparseSoftmaxCE, {"ignore_class": -1}),
    (keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.3, gamma=1.5), ksh.StableBinaryFocalCE,
     {"alpha": 0.3, "gamma": 1.5}),
    (keras.losses.BinaryFocalCrossentropy(alpha=0.3), ksh.StableBinaryFocalCE, {"alpha": None}),
    (keras.losses.CategoricalFocalCrossentropy(alpha=0.5, gamma=3.0), ksh.StableSoftmaxFocalCE,
     {"alpha": 0.5, "gamma": 3.0}),
    ("binary_crossentropy", ksh.StableBinaryCE, {}),
    ("sparse_categorical_crossentropy", ksh.StableSparseSoftmaxCE, {"ignore_class": None}),
    (functools.partial(keras.losses.categorical_crossentropy, label_smoothing=0.1), ksh.StableSoftmaxCE,
     {"label_smoothing": 0.1}),
], ids=lambda v: getattr(v, "name", None) if isinstance(v, keras.losses.Loss) else None)
def test_stable_twin_carries_options_and_matches_keras_from_logits(keras_loss, expected_cls, options):
    twin = stable_twin(keras_loss)
    assert type(twin) is expected_cls
    config = twin.get_config()
    for key, value in options.items():
        assert config[key] == value
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (6, 3)).astype("float32")
    if expected_cls is ksh.StableSparseSoftmaxCE:
        labels = rng.integers(0, 3, 6)
    elif expected_cls in (ksh.StableBinaryCE, ksh.StableBinaryFocalCE):
        labels = rng.integers(0, 2, (6, 3)).astype("float32")
    else:
        labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 6)]
    reference = keras.losses.get(keras_loss) if isinstance(keras_loss, str) else keras_loss
    if isinstance(reference, keras.losses.Loss):
        exact = reference.__class__.from_config({**reference.get_config(), "from_logits": True})(labels, logits)
    else:
        fn = reference.func if isinstance(reference, functools.partial) else reference
        keywords = reference.keywords if isinstance(reference, functools.partial) else {}
        exact = keras.ops.mean(fn(labels, logits, from_logits=True, **keywords))
    np.testing.assert_allclose(to_numpy(twin(labels, logits)), to_numpy(exact), rtol=2e-5)


def test_stable_twin_for_mismatched_links_and_errors():
    assert type(stable_twin("mse", link="sigmoid")) is ksh.StableBinaryCE
    assert type(stable_twin(keras.losses.BinaryCrossentropy(), link="softmax")) is ksh.StableSoftmaxCE
    assert type(stable_twin(ksh.StableMultilabelCE(pos_weight=2.0))) is ksh.StableMultilabelCE
    with pytest.raises(ValueError, match="regression loss"):
        stable_twin("mse")
    with pytest.raises(ValueError, match="No stable twin"):
        stable_twin(lambda y, p: p)
    with pytest.raises(ValueError, match="`link` must be"):
        stable_twin("binary_crossentropy", link="tanh")


# ----------------------------------------------------------------------------------------------------------------
# Strict mode
# ----------------------------------------------------------------------------------------------------------------


def test_install_compile_check_raises_warns_and_uninstalls():
    bad = _model(_dense(1, "sigmoid"))
    try:
        install_compile_check()
        with pytest.raises(AuditError, match="probabilities_as_logits") as info:
            bad.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
        assert isinstance(info.value, ValueError) and info.value.findings.codes == ["probabilities_as_logits"]
        assert not bad.compiled
        _model(_dense(1)).compile(loss=ksh.StableBinaryCE())  # clean: compiles
        training, _ = stabilize(bad, loss="binary_crossentropy")  # stabilize's internal clone is not blocked
        assert training.compiled
        install_compile_check(action="warn", severity="error")
        bad.compile(loss="binary_crossentropy")  # clipped_probability_loss is a warning: ignored at "error"
        with pytest.warns(AuditWarning, match="saturating_regression_loss"):
            bad.compile(loss="mse")
        assert bad.compiled
    finally:
        uninstall_compile_check()
    bad.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    assert bad.compiled
    with pytest.raises(ValueError, match="`action`"):
        install_compile_check(action="explode")

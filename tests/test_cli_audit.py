"""``keras-stable-heads audit MODEL.keras [--fix OUT.keras]`` on the current backend (cli.main called directly)."""

import warnings

import keras
import numpy as np
import pytest

import keras_stable_heads as ksh
from keras_stable_heads import cli
from keras_stable_heads.audit import audit
from keras_stable_heads.heads import SoftmaxHead

X = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")

# A model saved before its first training step has an unbuilt optimizer: Keras notes that on loading.
pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")


def _saved(tmp_path, name, layers, loss):
    model = keras.Sequential([keras.Input((4,)), *layers])
    if loss is not None:
        model.compile(optimizer="adam", loss=loss)
    path = str(tmp_path / name)
    model.save(path)
    return model, path


def test_audit_prints_findings_and_exits_1(tmp_path, capsys):
    _, path = _saved(tmp_path, "bad.keras", [keras.layers.Dense(3), keras.layers.Activation("softmax")],
                     keras.losses.CategoricalCrossentropy(from_logits=True))
    assert cli.main(["audit", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 1 finding:")
    assert "probabilities_as_logits" in out and "log(1 + 2/e) = 0.551" in out and "fix:" in out


def test_clean_model_exits_0(tmp_path, capsys):
    head = SoftmaxHead(3)
    _, path = _saved(tmp_path, "clean.keras", [keras.layers.Dense(8, activation="relu"), head], head.loss(sparse=True))
    assert cli.main(["audit", path]) == 0
    assert "no findings" in capsys.readouterr().out


def test_fix_writes_a_stabilized_model_that_loads_and_predicts_the_same(tmp_path, capsys):
    model, path = _saved(tmp_path, "sigmoid.keras", [keras.layers.Dense(1, activation="sigmoid")],
                         keras.losses.BinaryCrossentropy(label_smoothing=0.1))
    fixed, served = str(tmp_path / "fixed.keras"), str(tmp_path / "served.keras")
    assert cli.main(["audit", path, "--fix", fixed, "--inference", served]) == 0
    out = capsys.readouterr().out
    assert "clipped_probability_loss" in out and f"to {fixed}" in out and f"to {served}" in out
    training = keras.saving.load_model(fixed)  # no custom_objects
    assert audit(training) == []
    assert isinstance(training.loss, ksh.StableBinaryCE) and training.loss.label_smoothing == 0.1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.saving.load_model(served)(X)),
                               keras.ops.convert_to_numpy(model(X)), rtol=1e-6)


def test_errors_exit_2(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path / "missing.keras")]) == 2
    assert "cannot load" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's hint about a softmax over one unit
        _, path = _saved(tmp_path, "no_loss.keras", [keras.layers.Dense(1, activation="softmax")], None)
    assert cli.main(["audit", path, "--fix", str(tmp_path / "out.keras")]) == 2  # a finding but no loss to fix
    captured = capsys.readouterr()
    assert "softmax_one_unit" in captured.out and "no loss to stabilize" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", path, "--inference", str(tmp_path / "x.keras")])
    assert exit_info.value.code == 2


def test_quickstart_subcommand_still_dispatches(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "quickstart", lambda args: seen.append(args.epochs) or 0)
    assert cli.main(["quickstart", "--epochs", "2"]) == 0 and cli.main(["quickstart"]) == 0
    assert seen == [2, 5]

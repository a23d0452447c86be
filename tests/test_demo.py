"""The demo (``keras-stable-heads demo``) on the current backend: its files, its binary comparison, its command line.

The whole demo runs once per backend (module fixture) with 2 epochs and the saturated start only (fewer models
to compile); the comparison asserted is the seeded saturated binary task, where the margins are large (the
stable pairing's test NLL is several nats below the mistaken ones' after 2 epochs on every backend).
"""

import io
import json
import os
import pickle

import keras
import numpy as np
import pytest

from keras_stable_heads import _demo_tasks
from keras_stable_heads import cli
from keras_stable_heads import demo

BACKEND = keras.backend.backend()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed, progress = io.StringIO(), io.StringIO()
    threads = _torch_threads()
    results = demo.run(out=str(out), epochs=2, stream=printed, progress_stream=progress, starts=("saturated",))
    assert _torch_threads() == threads  # the demo's one-thread setting on PyTorch is restored
    return out, results, printed.getvalue(), progress.getvalue()


def _torch_threads():
    if BACKEND != "torch":
        return None
    import torch

    return torch.get_num_threads()


def test_writes_every_promised_file(tiny_demo):
    out, results, printed, progress = tiny_demo
    assert set(results) == set(demo.TASKS)
    for name in demo.expected_files():
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == PNG_SIGNATURE, name
            assert path.stat().st_size > 10_000, f"{name} looks empty ({path.stat().st_size} bytes)"
    report = (out / "report.md").read_text(encoding="utf-8")
    for task in demo.TASKS:
        for plot in demo.PLOTS[task]:
            assert f"]({plot})" in report, plot
    record = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert record["backend"] == BACKEND and set(record["tasks"]) == set(demo.TASKS)
    # The printed table has one line per (task, pairing, start), and the progress went to the other stream.
    assert printed.count("\nbinary ") == 3 and printed.count("\nmulticlass ") == 2
    assert "epochs" in progress and "epochs" not in printed.split("task ")[0]
    assert (out / "summary.txt").read_text(encoding="utf-8").strip() in printed


def _final(results, task, name):
    (run,) = [r for r in results[task].runs if r.pairing.name == name]
    return run


def test_binary_stable_pairing_beats_the_mistaken_ones(tiny_demo):
    """Saturated start, seeded, 2 epochs: the stable pairing learns; sigmoid + MSE does not (every backend)."""
    _, results, _, _ = tiny_demo
    stable = _final(results, "binary", "BinaryHead + StableBinaryCE")
    mse = _final(results, "binary", "sigmoid + MSE")
    clipped = _final(results, "binary", "sigmoid + BinaryCrossentropy")
    assert stable.test[0]["nll"] > 10  # the start is confidently wrong for every pairing
    assert stable.final["nll"] < mse.final["nll"] - 5, (stable.final, mse.final)
    assert stable.final["accuracy"] > mse.final["accuracy"], (stable.final, mse.final)
    assert mse.final["nll"] > 0.9 * mse.test[0]["nll"]  # stuck: the saturated sigmoid's gradient vanishes
    if BACKEND == "tensorflow":
        # TensorFlow's Keras reads the logits cached on a sigmoid output: that pairing is not clipped there.
        assert clipped.final["nll"] < clipped.test[0]["nll"] - 5
    else:
        assert stable.final["nll"] < clipped.final["nll"] - 5, (stable.final, clipped.final)
        assert clipped.final["nll"] == pytest.approx(clipped.test[0]["nll"])  # clipped: gradient exactly 0


def test_multilabel_sigmoids_beat_a_softmax(tiny_demo):
    _, results, _, _ = tiny_demo
    stable = _final(results, "multilabel", "MultilabelHead + StableMultilabelCE")
    softmax = _final(results, "multilabel", "softmax + CategoricalCrossentropy")
    assert stable.final["exact match"] > softmax.final["exact match"] + 0.3


def test_saturation_curves_show_the_clip(tiny_demo):
    _, results, _, _ = tiny_demo
    grid, all_curves = results["binary"].extra["saturation"]
    at = [int(np.argmin(np.abs(grid - value))) for value in (-30.0, -20.0)]
    curves = {name: (loss[at], grad[at]) for name, (loss, grad) in all_curves.items()}
    stable_loss, stable_grad = curves["sigmoid + StableBinaryCE (from logits)"]
    clipped_loss, clipped_grad = curves["sigmoid + BinaryCrossentropy (probabilities, clipped at 1e-7)"]
    _, mse_grad = curves["sigmoid + MSE"]
    np.testing.assert_allclose(stable_loss, [30.0, 20.0], rtol=1e-6)
    np.testing.assert_allclose(stable_grad, [-1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(clipped_loss, -np.log(1e-7), rtol=1e-4)
    assert np.all(clipped_grad == 0.0)
    assert np.all(np.abs(mse_grad) < 1e-7)


def test_cli_default_command_is_the_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "main", lambda args: seen.append(args) or 0)
    assert cli.main([]) == 0
    assert cli.main(["--epochs", "3", "--task", "binary", "--out", "somewhere"]) == 0
    assert cli.main(["demo", "--dataset", "cifar10"]) == 0
    first, second, third = seen
    assert first.command == "demo" and first.out == demo.DEFAULT_OUT and first.epochs is None and not first.task
    assert (second.epochs, second.task, second.out) == (3, ["binary"], "somewhere")
    assert third.dataset == "cifar10"
    # quickstart stays available as a subcommand
    ran = []
    monkeypatch.setattr(cli, "quickstart", lambda args: ran.append(args.epochs) or 0)
    assert cli.main(["quickstart", "--epochs", "1"]) == 0 and ran == [1]


def test_cifar10_not_cached_is_one_line_without_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(_demo_tasks, "KERAS_FALLBACK_HOME", str(tmp_path / "fallback"))
    assert cli.main(["demo", "--dataset", "cifar10", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cifar10.load_data()" in err and str(tmp_path / "keras") in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["demo", "--dataset", "cifar10", "--task", "regression"]) == 2
    assert "has no task regression" in capsys.readouterr().err


def _fake_cifar(folder, rng, per_batch=60):
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32)).astype("uint8")
        data[:, 0] = labels  # a marker: the red value of the top-left pixel is the label
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)


def test_cifar10_is_read_from_the_cache_only(tmp_path):
    _fake_cifar(tmp_path / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py",
                np.random.default_rng(0))
    assert _demo_tasks.cifar10_location(str(tmp_path))[0] == "extracted"
    (x_train, y_train), (x_test, y_test) = _demo_tasks.load_cifar10(str(tmp_path))
    assert x_train.shape == (300, 32, 32, 3) and x_test.shape == (60, 32, 32, 3) and x_train.dtype == np.uint8
    assert np.array_equal(x_train[:, 0, 0, 0], y_train) and np.array_equal(x_test[:, 0, 0, 0], y_test)
    binary, multiclass = _demo_tasks.cifar10_tasks(((x_train, y_train), (x_test, y_test)), 0, 16)
    raw = np.round(binary.x_train[:, 0, 0, 0] * 255).astype(int)
    assert set(raw) <= {0, 2} and np.array_equal(binary.y_train[:, 0], raw == 2)  # bird (2) = 1, airplane (0) = 0
    assert len(binary.x_train) % 16 == 0 and multiclass.x_train.shape[1:] == (32, 32, 3)


@pytest.mark.skipif(BACKEND != "torch", reason="suite time: the task's plumbing does not depend on the backend "
                    "(two child processes, ~45 s); the head it measures is tested on every backend in test_linear_ce.py")
def test_vocabulary_task_measures_the_fused_head_against_dense(monkeypatch, tmp_path):
    """The opt-in vocabulary task, shrunk: both variants measured in their own processes, rows, plot, records."""
    monkeypatch.setattr(demo, "VOCABULARY", {"tokens": 64, "hidden": 8, "vocab": 512, "reps": 1})
    printed, progress = io.StringIO(), io.StringIO()
    results = demo.run(out=str(tmp_path), tasks=["vocabulary"], stream=printed, progress_stream=progress)
    result = results["vocabulary"]
    assert [row["pairing"] for row in result.rows] == ["FusedSoftmaxHead + its loss",
                                                        "Dense(V) + SparseCategoricalCE(logits)"]
    for row in result.rows:
        record = row["record"]
        assert record["skipped"] is None, record["skipped"]
        assert record["backend"] == BACKEND and record["vocab"] == 512 and record["tokens"] == 64
        assert 0 < record["min_ms"] and record["peak_rss_mib"] >= record["rss_before_mib"] > 0
        assert abs(record["first_loss"] - np.log(512)) < 0.5  # a fresh head: about uniform over the vocabulary
    assert "vocabulary" in printed.getvalue() and "peak RSS" in printed.getvalue()
    assert (tmp_path / "vocabulary_step.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "Fused / Dense" in (tmp_path / "report.md").read_text()
    # not part of the default minute
    assert "vocabulary" not in demo._tasks(None, "bundled") and "vocabulary" not in demo._tasks(["all"], "bundled")

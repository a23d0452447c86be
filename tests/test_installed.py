"""What a user gets from ``pip install keras-stable-heads``: every module is in the package, the version is one,
and every documented command runs from the install, away from any checkout.

``scripts/test.sh`` (CI) builds the sdist and the wheel, installs the wheel into a fresh virtual environment and
runs the whole suite there with ``KSH_TEST_INSTALLED=1``: then the first test proves the package under test is that
install, not this checkout, and the module list is compared with the checkout's files (a module left out of the
wheel fails here even if nothing imports it). From a checkout (an editable install) the same tests run, minus
those two comparisons.
"""

import importlib
import importlib.metadata
import json
import os
import pkgutil
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_stable_heads as ksh
from keras_stable_heads import dispatch
from test_training import TRAINING, _data, _model

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLED = os.environ.get("KSH_TEST_INSTALLED") == "1"
BACKEND = keras.backend.backend()
PACKAGE_DIR = os.path.dirname(os.path.realpath(ksh.__file__))
# Modules that need what a CPU-only install may lack (the CUDA kernels import numba.cuda's device API).
_OPTIONAL = ("keras_stable_heads.kernels.cuda_", "keras_stable_heads.bridges.jax_cuda", "keras_stable_heads.bridges."
             "torch_cuda", "keras_stable_heads.bridges._cuda", "keras_stable_heads.tf_keras")


def _module_names(folder):
    return {info.name for info in pkgutil.walk_packages([folder], "keras_stable_heads.")} | {"keras_stable_heads"}


@pytest.mark.skipif(not INSTALLED, reason="a checkout run: the package under test is the checkout")
def test_the_package_under_test_is_the_installed_wheel():
    assert PACKAGE_DIR != os.path.realpath(os.path.join(CHECKOUT, "keras_stable_heads")), PACKAGE_DIR
    assert os.path.basename(os.path.dirname(PACKAGE_DIR)) == "site-packages", PACKAGE_DIR
    # the checkout's modules, every one of them in the install
    missing = _module_names(os.path.join(CHECKOUT, "keras_stable_heads")) - _module_names(PACKAGE_DIR)
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"


def test_every_module_imports():
    failed = {}
    for name in sorted(_module_names(PACKAGE_DIR) - {"keras_stable_heads.__main__"}):  # that one runs the CLI
        try:
            importlib.import_module(name)
        except ImportError as error:
            if not name.startswith(_OPTIONAL):
                failed[name] = repr(error)
    assert not failed, failed


def test_the_version_is_the_distributions():
    assert ksh.__version__ == importlib.metadata.version("keras-stable-heads")


def _console_script():
    """The ``keras-stable-heads`` executable installed beside this Python (the venv's, or the editable one's)."""
    found = shutil.which("keras-stable-heads", path=os.path.dirname(sys.executable)) or \
        shutil.which("keras-stable-heads")
    if found is None:
        pytest.skip("no keras-stable-heads executable installed")
    return found


def _run(args, cwd, timeout=600):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([_console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_console_script_version(tmp_path):
    done = _run(["--version"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"keras-stable-heads {ksh.__version__}"


def test_bench_quickest_run_from_any_folder(tmp_path):
    """``keras-stable-heads bench``: the harness and its float64 reference are in the package. From an install
    the records go to the current folder; from a checkout they would go to benchmarks/results, so --out is given."""
    out = tmp_path / "keras-stable-heads-bench.jsonl"
    args = ["bench", "--op", "sparse_softmax_ce", "--sizes", "16x5", "--impl", "stable,keras", "--reps", "2",
            "--extreme-size", "8x5", "--bandwidth-mib", "8", "--no-progress"]
    done = _run(args if INSTALLED else [*args, "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    timed = [r for r in records if r["case"] == "random"]
    assert timed and all(r["min"] > 0 and r["backend"] == BACKEND for r in timed)
    assert any(r["family"] == "stable" for r in timed) and any(r["implementation"].startswith("keras") for r in timed)
    extreme = [r for r in records if r["case"] == "extreme" and r["family"] == "stable"]
    assert extreme and all(r["loss_error"] < 1e-6 for r in extreme)  # against the packaged float64 reference
    if INSTALLED:
        assert records[0]["commit"] == f"keras-stable-heads {ksh.__version__}"
    assert "records appended" in done.stdout


def test_demo_quickest_task(tmp_path):
    done = _run(["demo", "--task", "regression", "--epochs", "1", "--out", str(tmp_path / "demo")], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "GaussianHead + GaussianNLL" in done.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results  # the report's data
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "regression_fits.png").exists()


def test_audit_of_a_saved_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy())
    path = tmp_path / "probabilities.keras"
    model.save(path)
    done = _run(["audit", str(path)], tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # findings: exit 1
    assert "StableSoftmaxCE" in done.stdout  # the fix it names


def _runnable(implementation):
    x = keras.ops.convert_to_tensor(np.zeros((4, 3), "float32"))
    try:
        dispatch.choose("sparse_softmax_ce", x, implementation)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("implementation", ["portable", "numba_cpu"])
@pytest.mark.parametrize("loss,kind", TRAINING, ids=lambda v: getattr(v, "name", None))
def test_every_loss_family_fits_on_each_implementation(loss, kind, implementation):
    why_not = _runnable(implementation)
    if why_not:
        pytest.skip(why_not)
    config = loss.get_config()
    config["implementation"] = implementation
    forced = type(loss).from_config(config)
    x, y, units = _data(kind, rows=128)
    model = _model(units)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=forced)
    losses = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    choice = ksh.explain(forced, y[:8], model.predict(x[:8], verbose=0))
    assert choice.implementation == implementation, choice


def test_a_head_and_its_inference_model():
    keras.utils.set_random_seed(0)
    x, y, _ = _data("binary", rows=64)
    inputs = keras.Input((6,))
    head = ksh.BinaryHead()
    model = keras.Model(inputs, head(keras.layers.Dense(8, activation="tanh")(inputs)))
    model.compile(optimizer="adam", loss=head.loss())
    losses = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    logits = model.predict(x, verbose=0)
    probabilities = ksh.inference_model(model).predict(x, verbose=0)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-5, atol=1e-7)

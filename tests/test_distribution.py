"""Distributed training equals single-device training, on one machine with simulated devices.

- TensorFlow: ``tf.distribute.MirroredStrategy`` over 2 logical CPU devices, ``model.fit`` with Keras 3 and with
  tf_keras (as ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``).
- JAX (4 host devices from ``--xla_force_host_platform_device_count``): ``keras.distribution.DataParallel``
  ``model.fit``; ``ModelParallel`` with the head's classes sharded, checked in the compiled program.
- PyTorch: ``DistributedDataParallel``, gloo, 2 processes.

Device set-up must precede the framework's start, so the runs happen in subprocesses (``_distributed_workers.py``),
each backend's concurrently; a test runs only under the KERAS_BACKEND of its framework, so once in the suite.
Every case trains with a ``sample_weight``; ``sparse_ignore_class`` and ``multilabel_ce`` (all-missing examples)
keep different numbers of entries on different replicas.
"""

import json
import os
import subprocess
import sys

import _distributed_workers as workers
import keras
import numpy as np
import pytest

import keras_stable_heads as ksh

BACKEND = keras.backend.backend()
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_workers.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
# The workers import the package this process tests (the installed wheel in CI, else the checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(ksh.__file__)))
CASE_NAMES = [case for case, *_ in workers.CASES]


def _run_concurrently(backend, names, timeout=600):
    """Run workers in parallel subprocesses under ``backend``; their RESULT objects by name."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
    env.pop("TF_USE_LEGACY_KERAS", None)
    procs = {name: subprocess.Popen([sys.executable, WORKER, name], env=env, cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in names}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"worker {name} exited with {proc.returncode}:\n{err[-4000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    return results


def _only(backend):
    if BACKEND != backend:
        pytest.skip(f"runs once, in the KERAS_BACKEND={backend} pass of the suite")


@pytest.fixture(scope="module")
def tf_runs():
    _only("tensorflow")
    return _run_concurrently("tensorflow", ["tf_mirrored_keras3", "tf_mirrored_tf_keras"])


@pytest.fixture(scope="module")
def jax_runs():
    _only("jax")
    return _run_concurrently("jax", ["jax_data_parallel", "jax_model_parallel"])


@pytest.fixture(scope="module")
def torch_run():
    _only("torch")
    return _run_concurrently("torch", ["torch_ddp"])["torch_ddp"]


def _assert_same_training(single, distributed, case):
    """Same per-step losses and trained weights, and the loss went down."""
    history, reference = distributed[case]["history"], single[case]["history"]
    np.testing.assert_allclose(history, reference, rtol=2e-5, atol=1e-5, err_msg=f"{case}: loss history")
    for got, want in zip(distributed[case]["weights"], single[case]["weights"]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5, err_msg=f"{case}: trained weights")
    assert reference[-1] < reference[0], (case, reference)


MIRRORED_PARAMS = [pytest.param(engine, case) for engine in ("tf_keras", "keras3") for case in CASE_NAMES]


@pytest.mark.parametrize("engine,case", MIRRORED_PARAMS)
def test_mirrored_strategy_fit_equals_single_device(tf_runs, engine, case):
    run = tf_runs[f"tf_mirrored_{engine}"]
    assert run["replicas"] == 2 and run["model_strategy"] == "MirroredStrategy"
    _assert_same_training(run["single"], run["distributed"], case)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_jax_data_parallel_fit_equals_single_device(jax_runs, case):
    run = jax_runs["jax_data_parallel"]
    assert run["devices"] == 4 and run["kernel_devices"] == 4 and run["kernel_replicated"]
    _assert_same_training(run["single"], run["distributed"], case)


@pytest.mark.parametrize("labels", ["sparse", "dense"])
def test_jax_model_parallel_sharded_head_equals_unsharded_without_gathering_logits(jax_runs, labels):
    """The head's kernel [24, 10] is split on its class axis over the mesh's "model" axis (2 x 2 mesh: "batch",
    "model"); the jitted loss-and-gradient step then equals the unsharded one, and its compiled SPMD program
    computes each device's [16, 5] block of logits and never moves logits: its only collectives are all-reduces,
    none of which has a full class axis (10), among them the per-row [16] max/sum of the sharded log-sum-exp."""
    run = jax_runs["jax_model_parallel"]
    result = run[labels]
    classes, hidden, batch = run["classes"], run["hidden"], run["batch"]
    local_rows, local_classes = batch // 2, classes // 2
    assert run["head_kernel_shard"] == [hidden, local_classes]
    assert result["head_grad_shard"] == [hidden, local_classes]
    np.testing.assert_allclose(result["loss"], result["reference_loss"], rtol=1e-6)
    for got, want in zip(result["grads"], result["reference_grads"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    kinds = {op for op, _ in result["collectives"]}
    assert kinds == {"all-reduce"}, result["collectives"]  # no all-gather, all-to-all, permute, reduce-scatter
    shapes = [shape for _, op_shapes in result["collectives"] for shape in op_shapes]
    assert not [s for s in shapes if classes in s], result["collectives"]  # nothing with the full class axis
    assert [local_rows] in shapes, result["collectives"]  # the log-sum-exp's per-row reduction across class shards
    assert [local_rows, local_classes] in result["dot_shapes"], result["dot_shapes"]  # local logits block
    assert not [s for s in result["dot_shapes"] if classes in s], result["dot_shapes"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_torch_ddp_equals_single_process(torch_run, case):
    """Default reduction for every loss; for the masked ones, the docs/scaling.md recipe (sum / global kept count)."""
    assert torch_run["world"] == 2
    for rank in ("rank0", "rank1"):
        _assert_same_training(torch_run["single"], torch_run[rank]["recipe"], case)
        if case not in workers.MASKED_CASES:
            _assert_same_training(torch_run["single"], torch_run[rank]["default"], case)


@pytest.mark.parametrize("case", workers.MASKED_CASES)
def test_torch_ddp_default_reduction_of_masked_losses_averages_each_rank(torch_run, case):
    """Why docs/scaling.md gives a recipe: under DDP the default reduction averages over each rank's kept entries,
    and the ranks keep different numbers here, so the plain loss trains differently from one process."""
    got = torch_run["rank0"]["default"][case]["history"]
    want = torch_run["single"][case]["history"]
    assert np.max(np.abs(np.subtract(got, want))) > 1e-3, (got, want)

"""Smoke test of the benchmarks (keras_stable_heads.bench and the checkout's benchmarks/ scripts): values and
records, never timings."""

import importlib.util
import json
import os
import sys
import types

import keras
import numpy as np
import pytest

from keras_stable_heads import cli
from keras_stable_heads.bench import baselines
from keras_stable_heads.bench import harness
from keras_stable_heads.bench import report
from keras_stable_heads.bench import suite

# The scripts stay in the checkout (this file's), whether the package under test is installed or the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def benchmarks():
    return types.SimpleNamespace(harness=harness, suite=suite, report=report, baselines=baselines)


def _script(name):
    """``benchmarks/<name>.py`` imported as a module (the scripts find the package through benchmarks/_standalone)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    module_name = f"_ksh_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def test_measure_counts_calls_and_orders_statistics(benchmarks):
    calls = []
    synced = []
    stats, last = benchmarks.harness.measure(lambda: calls.append(1) or len(calls), warmup=2, reps=5,
                                             sync=synced.append)
    assert len(calls) == 7 and stats.reps == 5 and stats.warmup == 2
    assert synced == [1, 2, 3, 4, 5, 6, 7]  # every call, warm-up included, is synchronised
    assert last == 7
    assert 0 <= stats.min <= stats.median <= stats.max
    assert set(stats.as_ms()) == {"min", "median", "max", "unit", "reps", "warmup"}


def test_bytes_moved_is_the_notes_traffic_model(benchmarks):
    moved = benchmarks.harness.bytes_moved
    n, c = 8192, 1000
    assert moved("sparse_softmax_ce", "forward", n, c, 4) == 4 * n * c
    assert moved("sparse_softmax_ce", "forward_backward", n, c, 4) == 12 * n * c
    assert moved("sparse_softmax_ce", "forward_backward", n, c, 2) == 6 * n * c
    assert moved("softmax_ce", "forward_backward", n, c, 4) == 20 * n * c  # labels are N x C too


def test_bandwidth_is_measured_and_positive(benchmarks):
    bandwidth = benchmarks.harness.host_bandwidth(8 << 20, reps=2)
    assert bandwidth["copy_1t_gbs"] > 0
    assert bandwidth["copy_threads_gbs"] > 0 and bandwidth["threads"] >= 1


def test_record_schema(benchmarks):
    harness = benchmarks.harness
    record = harness.make_record(op="softmax_ce", loss_error=harness.json_number(float("nan")))
    assert list(record) == list(harness.FIELDS)
    assert record["schema"] == harness.SCHEMA_VERSION and record["loss_error"] == "nan"
    with pytest.raises(ValueError, match="not in the record schema"):
        harness.make_record(speed=1.0)


def test_sizes_and_errors(benchmarks):
    suite = benchmarks.suite
    assert suite.parse_sizes("256x10, 8192x1000")[1] == (8192, 1000)
    rows, classes = suite.parse_sizes("128k")[0]
    assert classes == 131072 and rows >= 1 and rows & (rows - 1) == 0
    with pytest.raises(ValueError, match="NxC"):
        suite.parse_sizes("big")
    assert suite.loss_error([1.0, np.inf], [1.0, np.inf]) == 0.0
    assert np.isnan(suite.loss_error([np.nan], [1.0]))
    assert suite.grad_error([0.5, -1.0], [0.5, -0.5]) == pytest.approx(1.0)  # |-0.5| / max|want| = 0.5


def test_quick_run_writes_records(tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    code = cli.main(["bench", "--op", "sparse_softmax_ce", "--sizes", "16x5", "--impl", "stable/portable,keras",
                     "--reps", "2", "--extreme-size", "8x5", "--bandwidth-mib", "8", "--no-progress", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    timed = [r for r in records if r["case"] == "random"]
    assert {r["implementation"].removesuffix("+xla") for r in timed} == {"stable/portable", "keras"}  # +xla: TF
    for r in timed:
        assert r["backend"] == keras.backend.backend() and r["device"] == "cpu"
        assert r["op"] == "sparse_softmax_ce" and r["shape"] == [16, 5] and r["dtype"] == "float32"
        assert r["mode"] == "forward_backward" and r["unit"] == "ms" and r["skipped"] is None
        assert r["reps"] == 2 and r["bytes"] == 12 * 16 * 5
        assert r["bandwidth_gbs"] > 0 and r["roofline_gbs"] > 0 and r["bandwidth_fraction"] > 0
        assert r["loss_error"] < 1e-5 and r["grad_error"] < 1e-5 and r["error_rows"] == 16
        assert r["hardware"]["cores"] >= 1 and "keras" in r["versions"] and r["timestamp"]
    stable = next(r for r in timed if r["implementation"] == "stable/portable")
    # the record names what "auto" would pick for these inputs: the dispatcher's own answer
    from keras_stable_heads import dispatch

    expected = dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(np.zeros((16, 5), "float32")))
    assert stable["auto_choice"] == expected.implementation
    extreme = [r for r in records if r["case"] == "extreme"]
    assert {r["implementation"].removesuffix("+xla") for r in extreme} == {"stable/portable", "keras", "keras(probs)"}
    assert next(r for r in extreme if r["implementation"] == "stable/portable")["loss_error"] < 1e-6
    assert len({r["run_id"] for r in records}) == 1
    printed = capsys.readouterr().out
    assert "stable (auto)" in printed and "records appended" in printed


# ------------------------------------------------------------------------------------------------------------------
# The GPU plan, the time budget, the one schema for CPU and GPU records (all run on a CPU; no timing asserted)
# ------------------------------------------------------------------------------------------------------------------


def _runner(benchmarks, plan, **kwargs):
    return benchmarks.suite.Runner(plan, run_id="test", log=lambda message: None, **kwargs)


def test_gpu_plan_runs_the_headline_size_first_then_the_sweep(benchmarks):
    suite = benchmarks.suite
    cases = _runner(benchmarks, suite.gpu_plan()).cases()
    assert [(n, c) for _, n, c, _, _ in cases] == [*suite.GPU_SIZES, *suite.GPU_SWEEP_SIZES]
    assert cases[0] == ("sparse_softmax_ce", 16384, 131072, ("float32", "bfloat16"), ("forward", "forward_backward"))
    assert all(case[3:] == (("float32",), ("forward_backward",)) for case in cases[len(suite.GPU_SIZES):])
    # sizes asked for replace the plan's, sweep included
    plan = suite.gpu_plan().with_overrides(sizes=((8, 5), (16, 5)))
    assert [(n, c) for _, n, c, _, _ in _runner(benchmarks, plan).cases()] == [(16, 5), (8, 5)]


def test_large_inputs_repeat_a_seeded_block(benchmarks, monkeypatch):
    suite = benchmarks.suite
    small, _ = suite.make_inputs("sparse_softmax_ce", 4, 8, "random")
    monkeypatch.setattr(suite, "TILE_ABOVE_BYTES", 64)
    monkeypatch.setattr(suite, "TILE_BYTES", 4 * 8 * 4)  # blocks of 4 rows
    logits, labels = suite.make_inputs("sparse_softmax_ce", 10, 8, "random")
    assert logits.shape == (10, 8) and labels.shape == (10,) and labels.dtype == np.int32
    np.testing.assert_array_equal(logits[:4], small)  # the first rows are the seeded draw (exactness uses them)
    np.testing.assert_array_equal(logits[4:8], small)
    np.testing.assert_array_equal(logits[8:], small[:2])


def test_a_spent_budget_records_every_measurement_as_skipped(benchmarks):
    suite = benchmarks.suite
    plan = suite.quick_plan().with_overrides(sizes=((16, 5),), include=("stable/portable", "keras"),
                                             extreme_size=(8, 5))
    runner = _runner(benchmarks, plan, bandwidth_bytes=8 << 20, deadline=benchmarks.harness.Deadline(-1.0))
    records = runner.run()
    assert records and all(r["skipped"] == suite.SKIPPED_FOR_TIME for r in records)
    assert {r["case"] for r in records} == {"random", "extreme"}
    assert all(r["min"] is None and r["device_name"] for r in records)


def test_gpu_plan_through_the_command_line(tmp_path):
    out = tmp_path / "records.jsonl"
    code = cli.main(["bench", "--gpu", "--sizes", "8x5,16x5", "--dtypes", "float32", "--modes", "forward_backward",
                     "--impl", "stable/portable", "--reps", "2", "--no-extreme", "--bandwidth-mib", "8",
                     "--budget-s", "600", "--no-progress", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    shapes = [r["shape"] for r in records]  # TensorFlow adds stable/portable+xla
    assert shapes.index([16, 5]) < shapes.index([8, 5]) and len(shapes) in (2, 4)  # largest first
    for r in records:
        assert r["schema"] == 2 and r["source"] is None and r["skipped"] is None
        assert r["device"] == "cpu" and r["bandwidth"]["device_copy_gbs"] is None  # the GPU paths stay off


def test_git_commit_falls_back_to_the_environment(benchmarks, tmp_path, monkeypatch):
    monkeypatch.setenv("KSH_BENCH_COMMIT", "abc1234")
    assert benchmarks.harness.git_commit(str(tmp_path)) == ("abc1234", None)  # no git checkout there


def _gpu_convert(benchmarks):
    return _script("gpu_convert")


def test_h200_records_converted_to_the_harness_schema(benchmarks):
    harness, convert = benchmarks.harness, _gpu_convert(benchmarks)
    records = convert.convert()
    raw = [json.loads(line) for line in open(convert.RAW)]
    assert len(records) == sum(1 for r in raw if "p50_ms" in r and r["op"] == "sparse_softmax_ce")
    for r in records:
        assert list(r) == list(harness.FIELDS) and r["schema"] == harness.SCHEMA_VERSION
        assert r["device"] == "gpu" and r["device_name"] == "NVIDIA H200" and r["mode"] == "forward_backward"
        source = raw[r["source"]["line"] - 1]
        assert r["median"] == source["p50_ms"] and r["min"] is None and r["reps"] == source["iters"]
        assert r["bytes"] == source["model_bytes"] and r["roofline_gbs"] == 4256.2
        assert r["bandwidth_fraction"] == pytest.approx(source["pct_copy_bw"] / 100, abs=1e-3)
        json.dumps(r, allow_nan=False)
    assert {r["implementation"] for r in records} >= {"stable/numba_cuda", "stable/portable", "keras", "torch.F",
                                                       "optax"}
    # the committed file holds exactly this conversion (the converter is deterministic)
    committed = [r for r in harness.load_records(convert.OUT) if r["run_id"] == convert.RUN_ID]
    assert committed == json.loads(json.dumps(records))


def _mixed_records(benchmarks):
    """A few CPU records measured here and the converted H200 records: two devices in one file."""
    harness, convert = benchmarks.harness, _gpu_convert(benchmarks)
    cpu = []
    for shape, impl, family, ms in (((8192, 32000), "stable/numba_cpu", "stable", 500.0),
                                    ((8192, 32000), "keras", "builtin", 900.0),
                                    ((256, 10), "stable/numba_cpu", "stable", 0.5), ((256, 10), "keras", "builtin", 0.4)):
        for backend in ("jax", "torch"):
            cpu.append(harness.make_record(
                run_id="cpu", op="sparse_softmax_ce", implementation=impl, family=family, backend=backend,
                device="cpu", device_name="Test CPU (2 cores)", dtype="float32", shape=list(shape), case="random",
                mode="forward_backward", unit="ms", min=ms, median=ms, max=ms, reps=3, warmup=1,
                bytes=12 * shape[0] * shape[1], roofline_gbs=20.0, auto_choice="numba_cpu"))
    return cpu + convert.convert()


def test_report_separates_devices(benchmarks, capsys, tmp_path):
    report = benchmarks.report
    records = _mixed_records(benchmarks)
    table = report.format_speed(records)
    assert "device" in table.splitlines()[0] and "NVIDIA H200" in table and "Test CPU" in table
    assert "* median" in table  # the converted records have no min
    path = tmp_path / "mixed.jsonl"
    benchmarks.harness.append_records(str(path), records)
    assert report.main(["--records", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "=== Test CPU (2 cores)" in printed and "=== NVIDIA H200" in printed
    assert "converted from benchmarks/results/gpu_records_h200.jsonl" in printed


@pytest.mark.parametrize("xla_ms, expected", [(0.3, "stable/portable+xla"), (0.9, "stable/numba_cpu")])
def test_report_lets_the_stable_side_compile_with_xla_as_the_builtins_do(benchmarks, xla_ms, expected):
    """TensorFlow: the fastest built-in may be an XLA-compiled variant; the stable side's XLA variant (what the
    dispatcher runs inside jit_compile) counts too, but only when it is faster than the auto pick."""
    make = benchmarks.harness.make_record
    records = [make(run_id="r", op="sparse_softmax_ce", implementation=impl, family=family, backend="tensorflow",
                    device="cpu", device_name="Test CPU (2 cores)", dtype="float32", shape=[256, 10], case="random",
                    mode="forward_backward", unit="ms", min=ms, median=ms, max=ms, reps=3, warmup=1, bytes=30720,
                    roofline_gbs=20.0, auto_choice="numba_cpu" if family == "stable" else None)
               for impl, family, ms in (("stable/numba_cpu", "stable", 0.6), ("stable/portable+xla", "stable", xla_ms),
                                        ("keras+xla", "builtin", 0.5))]
    (row,) = benchmarks.report.speed_rows(records)
    assert row["stable"]["implementation"] == expected
    assert row["speedup"] == pytest.approx(0.5 / min(0.6, xla_ms))


def test_plot_draws_each_device_and_both_together(benchmarks, tmp_path):
    pytest.importorskip("matplotlib")
    plot = _script("plot")
    path = tmp_path / "mixed.jsonl"
    benchmarks.harness.append_records(str(path), _mixed_records(benchmarks))
    assert plot.main(["--records", str(path), "--out", str(tmp_path)]) == 0
    drawn = {p.name for p in tmp_path.glob("*.png")}
    assert {"headline_devices.png", "headline_nvidia-h200.png", "headline_test-cpu-2-cores.png",
            "sparse_softmax_ce_nvidia-h200.png"} <= drawn


def test_gpu_collect_appends_a_run_once(benchmarks, tmp_path):
    collect = _script("gpu_collect")
    run = tmp_path / "out"
    results = tmp_path / "results"
    run.mkdir()
    results.mkdir()
    records = _gpu_convert(benchmarks).convert()[:3]
    benchmarks.harness.append_records(str(run / "records.jsonl"), records)
    (run / "profile.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    collect.collect(str(run), str(results))
    collect.collect(str(run), str(results))  # the same run again: not appended twice
    assert len((results / "gpu_harness_records.jsonl").read_text().splitlines()) == 3
    assert (results / "gpu_profile_nvidia-h200.json").exists()


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="backend-independent: runs once, under torch")
def test_gpu_profile_runs_on_the_cuda_simulator(tmp_path):
    import subprocess

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_profile.py"), "--simulate",
                           "--rows", "2", "--classes", "40", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["size"] == [2, 40]
    for which in ("forward", "backward"):
        assert profile["kernels"][which]["reps"] >= 1 and profile["kernels"][which]["bytes"] > 0
    assert all(row["loss_max_abs_diff_vs_default"] == 0.0 for row in profile["sweep"]["rows"])
    assert "top" in profile["steps"]["torch.F float32"]  # the profiler summary's code path, on CPU ops
    assert profile["ncu_target"] is True and "found" in profile["ncu"]


def test_gpu_run_script_parses():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for script in ("gpu_run.sh", "gpu_prepare.sh"):
        done = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_train_step_script_records_both_losses(tmp_path):
    """benchmarks/train_step.py on a tiny model: one record per loss, same training, what "auto" picked."""
    import subprocess

    out = tmp_path / "train.jsonl"
    backend = keras.backend.backend()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--backend", backend,
                             "--rows", "64", "--classes", "50", "--features", "8", "--reps", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["implementation"] for r in records] == ["stable/auto", "keras"]
    for r in records:
        assert r["mode"] == "train_step" and r["backend"] == backend and r["shape"] == [64, 50]
        assert 0 < r["min"] <= r["median"] <= r["max"] and r["reps"] == 1
    from keras_stable_heads import dispatch

    # 64 x 50 logits against the measured thresholds: the native op below its limit, else the kernels from theirs
    threshold, native_limit = dispatch.NUMBA_MIN_ELEMENTS[backend], dispatch.NATIVE_MAX_ELEMENTS.get(backend, 0)
    expected = ("native" if "sparse_softmax_ce" in dispatch.NATIVE_OPS.get(backend, {}) and 64 * 50 < native_limit
                else "numba_cpu" if threshold is not None and 64 * 50 >= threshold else "portable")
    assert records[0]["auto_choice"] == expected and records[1]["auto_choice"] is None
    assert "speed-up" in result.stdout


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="backend-independent: runs once, under torch")
def test_kernel_probe_records_times_and_floors(tmp_path):
    """benchmarks/kernels_cpu_probe.py --floors: one record per shape and options, the in-cache rate scaled."""
    import subprocess

    out = tmp_path / "probe.jsonl"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels_cpu_probe.py"), "--reps", "1",
                           "--shapes", "96x40,64x10", "--options", "plain,all", "--floors", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shape"], r["options"]) for r in records] == [
        ([96, 40], "plain"), ([96, 40], "all"), ([64, 10], "plain"), ([64, 10], "all")]
    for r in records:
        n, c = r["shape"]
        assert r["threads"] == 1 and r["hardware"]["cores"] >= 1 and r["bandwidth"]["copy_threads_gbs"] > 0
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "read_pass_ms", "copy_2d_ms"):
            assert 0 < r[key] < 1e4, key
        assert r["fwd_bwd_gbs"] == pytest.approx(3 * n * c * 4 / (r["fwd_bwd_ms"] * 1e-3) / 1e9)
        assert 2 <= r["in_cache_rows"] <= n  # logits + gradient of 96x40 fit: every row, one thread
        for mode in ("fwd", "bwd"):
            ns = r[f"in_cache_{mode}_ns_per_logit_thread"]
            assert ns > 0 and r[f"in_cache_{mode}_ms_full"] == pytest.approx(ns * n * c / 1e6)


def test_fit_benchmark_records_both_sides(tmp_path):
    """keras_stable_heads.bench.fit on a tiny plan in this process: one record per case, both sides timed."""
    import argparse

    from keras_stable_heads.bench import fit

    out = tmp_path / "fit.jsonl"
    args = argparse.Namespace(families=["sparse_softmax_ce", "gaussian_nll"], batches=[8], classes=[5], steps=3,
                              rounds=2, out=str(out), run_id="test")
    fit._child(args)
    records = fit.load(str(out))
    assert [(r["family"], r["classes"], r["batch"]) for r in records] == [("sparse_softmax_ce", 5, 8),
                                                                          ("gaussian_nll", 5, 8)]
    for r in records:
        assert r["backend"] == keras.backend.backend() and r["steps"] == 3 and r["rounds"] == 2
        assert 0 < r["stable_min_ms"] <= r["stable_median_ms"] and 0 < r["builtin_min_ms"] <= r["builtin_median_ms"]
        assert r["ratio"] == pytest.approx(r["builtin_min_ms"] / r["stable_min_ms"])
    from keras_stable_heads import dispatch

    expected = dispatch.choose("sparse_softmax_ce", keras.ops.convert_to_tensor(np.zeros((8, 5), "float32")))
    assert records[0]["auto_choice"] == expected.implementation
    assert "sparse_softmax_ce" in fit.table(records)


def test_lm_head_benchmark_runs_a_child_and_keeps_its_record_format(tmp_path, capsys):
    """keras_stable_heads.bench.lm_head through its child-process loop (one variant, tiny): a measured record with
    the fields, in the order, of the committed records; a variant estimated not to fit is recorded as skipped."""
    from keras_stable_heads.bench import lm_head

    out = tmp_path / "lm_head.jsonl"
    args = types.SimpleNamespace(tokens=32, hidden=8, reps=1, memory_gib=20.0, out=str(out), run_id=None)
    assert lm_head.run(args, (keras.backend.backend(),), ("fused",), (64,)) == 0
    args.memory_gib = 0.0
    assert lm_head.run(args, (keras.backend.backend(),), ("dense+keras",), (64,)) == 0
    fused, dense = lm_head.load(str(out))
    committed = os.path.join(ROOT, "benchmarks", "results", "lm_head_records.jsonl")
    if os.path.exists(committed):
        with open(committed) as f:
            assert list(fused) == list(json.loads(f.readline()))
    assert (fused["benchmark"], fused["variant"], fused["vocab"]) == ("lm_head_step", "fused", 64)
    assert fused["skipped"] is None
    assert 0 < fused["min_ms"] <= fused["median_ms"] and fused["peak_rss_mib"] >= fused["rss_before_mib"] > 0
    assert np.isfinite(fused["first_loss"]) and fused["backend"] in fused["versions"]
    assert dense["skipped"].startswith("estimated") and dense["min_ms"] is None
    assert "skipped: estimated" in lm_head.table([fused, dense])


def test_hub_fit_benchmark_records_both_variants(tmp_path):
    """keras_stable_heads.bench.hub_fit, both variants measured in this process at a tiny size: finite positive
    times, peak RSS over the RSS before, the same weights (seed 0) and so the same losses, and the table's ratios."""
    pytest.importorskip("keras_hub")
    from keras_stable_heads.bench import hub_fit

    out = tmp_path / "hub_fit.jsonl"
    for variant in hub_fit.VARIANTS:
        args = types.SimpleNamespace(variant=variant, family="gemma", batch=1, sequence=16, vocab=512, reps=1,
                                     out=str(out), run_id="test")
        hub_fit._child(args)
    records = {r["variant"]: r for r in hub_fit.load(str(out))}
    assert set(records) == {"default", "fused"}
    for r in records.values():
        assert (r["benchmark"], r["backend"], r["family"], r["vocab"], r["skipped"]) == (
            "hub_fit_step", keras.backend.backend(), "gemma", 512, None)
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and np.isfinite(r["min_ms"])
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0
        assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
        assert (r["first_loss"], r["last_loss"]) == tuple(r["losses"]) and "keras-hub" in r["versions"]
        assert (r["xla_temp_mib"] is not None) == (keras.backend.backend() == "jax")
    default, fused = records["default"], records["fused"]
    assert fused["first_loss"] == pytest.approx(default["first_loss"], rel=1e-4)
    assert fused["last_loss"] == pytest.approx(default["last_loss"], rel=1e-4)
    assert fused["first_loss"] == pytest.approx(np.log(512), rel=0.2)  # a random start: about log V
    rows = hub_fit.table(list(records.values())).splitlines()
    assert len(rows) == 3 and rows[1].split()[:4] == [keras.backend.backend(), "gemma", "512", "default"]
    ratios = rows[1].rsplit("  ", 1)[1]  # on the default row: fused / default
    assert ratios.startswith(f"{fused['min_ms'] / default['min_ms']:.2f}x, "
                             f"{fused['peak_rss_mib'] / default['peak_rss_mib']:.2f}x, ")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(hub_fit.plot(list(records.values()), str(tmp_path / "hub_fit.png"))) > 0

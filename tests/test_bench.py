"""Smoke test of the benchmark harness (benchmarks/): values and records, never timings."""

import json

import keras
import numpy as np
import pytest

from keras_stable_heads import bench
from keras_stable_heads import cli

ROOT = bench.checkout_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="benchmarks/ is only in a source checkout")


@pytest.fixture(scope="module")
def benchmarks():
    return bench.load_benchmarks(ROOT)


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

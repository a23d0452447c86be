"""One-off: the H200 records of the old ``gpu_cuda_check.py`` in the harness's record schema.

    python benchmarks/gpu_convert.py [--raw results/gpu_records_h200.jsonl] [--out results/gpu_harness_records.jsonl]

The old script (commit 39e5fe8, since folded into ``suite.gpu_plan`` and ``gpu_profile.py``) wrote its own
schema: p20/p50/p80 of the timed calls, GB/s by ``3 * itemsize * N * C`` bytes, the copy bandwidth of a torch
``copy_`` of 2 GiB in the same run. Each timed row becomes one :func:`harness.make_record` record with the values
kept: ``median`` = p50 (``min`` and ``max`` were not recorded: None), ``bytes`` = its model bytes (the harness's
own ``bytes_moved`` for forward+backward, checked), ``roofline_gbs`` = its measured copy bandwidth; ``source``
names the raw file, the line and the script, and holds the row's own numbers (``raw``) and, on the numba_cuda
float32 rows, its full-size check against the framework's loss (``check``). Rows that are no measurement in the
schema (the pytest summary, the copy, the checks) stay in the raw file only, which is kept as it is.

Idempotent: a run whose ``run_id`` is already in ``--out`` is not written again.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _standalone  # noqa: E402

harness = _standalone.harness()

RESULTS = os.path.join(HERE, "results")
RAW = os.path.join(RESULTS, "gpu_records_h200.jsonl")
DEVICE_FILE = os.path.join(RESULTS, "gpu_h200_device.txt")
OUT = os.path.join(RESULTS, "gpu_harness_records.jsonl")
RUN_ID = "20261126T072845Z-h200-gpu_cuda_check"
SCRIPT = "benchmarks/gpu_cuda_check.py at commit 39e5fe8 (the run was of the working tree committed there)"

# The old script's implementation names -> (the harness's name, family).
IMPLEMENTATIONS = {
    "numba_cuda": ("stable/numba_cuda", "stable"),
    "ksh_portable": ("stable/portable", "stable"),
    "torch_F.cross_entropy": ("torch.F", "builtin"),
    "keras_builtin": ("keras", "builtin"),
    "optax": ("optax", "builtin"),
    "jax_lse_minus_take": ("jax.nn.logsumexp", "builtin"),  # logsumexp(z) - take_along_axis(z, y), jitted
}
# What implementation="auto" picks for these inputs: dispatch.NUMBA_CUDA_MIN_ELEMENTS, which these very records
# set (torch: the kernels from 0 logits; JAX: never, the portable path).
AUTO = {"torch": "numba_cuda", "jax": "portable"}
STEP = {
    "torch": "loss.mean().backward() on a leaf (eager; the harness times loss.sum().backward())",
    "jax": "jax.jit(jax.value_and_grad(mean loss)) (the harness: the sum, and the per-example loss returned too)",
}


def _device_context(path):
    """(GPU name, versions) from the device file: nvidia-smi's CSV line and a 'name version ...' line."""
    name, versions = None, {}
    if os.path.exists(path):
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) > 1:
            name = lines[1].split(",")[0].strip()
        if len(lines) > 2:
            words = lines[2].split()
            versions = {words[i].replace("_", "-"): words[i + 1] for i in range(0, len(words) - 1, 2)}
    return name, versions


def convert(raw_path=RAW, device_path=DEVICE_FILE):
    """The harness-schema records of one raw file, in its order."""
    with open(raw_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    gpu, device_versions = _device_context(device_path)
    copy = next((r for r in rows if r.get("op") == "copy" and r.get("gbps")), None)
    copy_gbs = copy["gbps"] if copy else None
    checks = {(r["backend"], r["shape"], r["dtype"]): r for r in rows if "check" in r}
    records = []
    for line, r in enumerate(rows, start=1):
        if r.get("op") != "sparse_softmax_ce" or "p50_ms" not in r:
            continue
        implementation, family = IMPLEMENTATIONS[r["impl"]]
        n, c = (int(x) for x in r["shape"].split("x"))
        itemsize = 2 if r["dtype"] == "bfloat16" else 4
        moved = harness.bytes_moved(r["op"], "forward_backward", n, c, itemsize)
        if moved != r["model_bytes"]:
            raise ValueError(f"line {line}: model bytes {r['model_bytes']} != the harness's {moved}")
        gbs = moved / (r["p50_ms"] * 1e-3) / 1e9
        raw = {k: r[k] for k in ("impl", "mode", "p20_ms", "p50_ms", "p80_ms", "iters", "model_bytes", "gbps",
                                 "pct_copy_bw") if k in r}
        source = {
            "file": "benchmarks/results/gpu_records_h200.jsonl", "line": line, "script": SCRIPT,
            "converted_by": "benchmarks/gpu_convert.py",
            "statistics": "median = p50 of the timed calls; min and max were not recorded (p20, p80 in raw); "
                          "bandwidth_gbs = bytes / median",
            "step": STEP[r["backend"]],
            "inputs": "logits N(0, 2) made on the GPU (the harness: N(0, 3)); labels uniform",
            "raw": raw,
        }
        check = checks.get((r["backend"], r["shape"], r["dtype"]))
        if check and r["impl"] == "numba_cuda":
            source["check"] = {k: check[k] for k in ("check", "loss", "loss_rel_diff", "grad_max_abs_diff",
                                                      "grad_max_abs")}
        versions = {**r.get("versions", {}), "numpy": device_versions.get("numpy")}
        device = r.get("device") or gpu
        records.append(harness.make_record(
            run_id=RUN_ID, timestamp=r["time"] + "+00:00", commit=None, dirty=None, op=r["op"],
            implementation=implementation, family=family, backend=r["backend"], device="gpu", device_name=device,
            dtype=r["dtype"], shape=[n, c], case="random", mode="forward_backward", unit="ms", min=None,
            median=r["p50_ms"], max=None, reps=r["iters"], warmup=2, bytes=moved, bandwidth_gbs=gbs,
            roofline_gbs=copy_gbs, bandwidth_fraction=gbs / copy_gbs if copy_gbs else None,
            auto_choice=AUTO[r["backend"]] if family == "stable" else None,
            bandwidth={"copy_1t_gbs": None, "copy_threads_gbs": None, "threads": None, "device_copy_gbs": copy_gbs},
            hardware={"cpu": None, "cores": None, "memory_gib": None, "gpu": device}, versions=versions,
            source=source))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", default=RAW)
    parser.add_argument("--device-file", default=DEVICE_FILE)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    records = convert(args.raw, args.device_file)
    if any(r.get("run_id") == RUN_ID for r in harness.load_records(args.out)):
        print(f"{args.out} already holds run {RUN_ID}: nothing written")
        return 0
    harness.append_records(args.out, records)
    print(f"{len(records)} records of run {RUN_ID} appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

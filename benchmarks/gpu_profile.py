"""Where the GPU time of sparse softmax CE goes: the Numba CUDA kernels profiled against the card's copy bandwidth.

    python benchmarks/gpu_profile.py --out DIR [--budget-s 90] [--rows 16384] [--classes 131072]
    python benchmarks/gpu_profile.py --out DIR --simulate      # a dry run on a CPU (Numba's CUDA simulator)

For issue 6 ("if a target is missed, say by how much and what limits it, from a profile"). Five parts, each
guarded (a failure is written down and the next part runs), each started only while the time budget lasts:

1. ``copy``: the card's copy bandwidth, a device-to-device ``copy_`` of a 2 GiB buffer timed with
   :func:`harness.measure` and ``torch.cuda.synchronize`` (bytes read + written per second): the roofline.
2. ``kernels``: the sparse forward and backward kernels alone on float32 ``N x C`` logits, launched on torch's
   stream through the kernels' host drivers with the default launch configuration, timed with CUDA events over
   back-to-back launches (:func:`harness.stats_of`): ms, the bytes each must move (forward: read the logits;
   backward: read them again and write the gradient; plus the per-row vectors), GB/s and the fraction of the
   copy bandwidth.
3. ``sweep``: the same at ``BLOCK_THREADS`` = 128, 256, 512, 1024 (``keras_stable_heads/kernels/_cuda_config.py``, read at each
   launch), with the loss compared to the default's (a launch setting must not change it).
4. ``steps``: ``torch.profiler`` (CUDA activity) of one forward+backward through ``keras_stable_heads.ops``
   with ``implementation="numba_cuda"`` in float32 and bfloat16, of the portable path and of
   ``F.cross_entropy``: every GPU kernel's time, so a step splits into the Numba kernels, dtype casts and the rest.
5. ``ncu``: when Nsight Compute is on the machine, one ``ncu --section SpeedOfLight --section
   MemoryWorkloadAnalysis`` (plus Occupancy, LaunchStats, WarpStateStats) run over one launch of each kernel
   (this script with ``--ncu-target`` at ``NCU_ROWS`` x C; clocks left as they are: ``--clock-control none``);
   its text goes to ``DIR/ncu.txt`` and its metrics into the JSON. Not found: the JSON says so.

Everything goes to ``DIR/profile.json``; a summary is printed. ``--simulate`` runs parts 2, 3 and the ncu
target on the simulator with NumPy arrays at a tiny size, and part 4 on the CPU (F.cross_entropy only): a check
that the code runs, not a measurement.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _standalone  # noqa: E402  (the package's harness and kernels, without Keras)

harness = _standalone.harness()  # NumPy only; numba is imported lazily by it

BLOCK_SWEEP = (128, 256, 512, 1024)
BATCH = 3  # launches per timed sample: the host's launch cost is paid once per sample, not per kernel
# SpeedOfLight and MemoryWorkloadAnalysis (asked for by issue 6), and the cheap sections that say why a
# memory-bound kernel falls short: occupancy, launch resources (registers, shared memory), warp stall reasons.
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
# Rows of the ncu run: kernel replay saves and restores the buffers a kernel may write for each of its passes, so
# ncu gets 4096 rows of the same 131072 classes (2 GiB of logits; 8 waves of blocks on 132 SMs): the same work per
# row, and seconds instead of minutes.
NCU_ROWS = 4096
COPY_BYTES = 2 << 30
SKIPPED = "time budget spent"
NCU_KERNELS = "regex:_sparse_(fwd|bwd)"


# ---------------------------------------------------------------------------------------------------------------
# Arrays and timing: torch on the GPU, or NumPy on Numba's simulator
# ---------------------------------------------------------------------------------------------------------------


class TorchGPU:
    simulated = False

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.torch = torch
        self.name = torch.cuda.get_device_name(0)

    def logits(self, n, c, seed=0):
        g = self.torch.Generator(device="cuda").manual_seed(seed)
        return self.torch.randn((n, c), generator=g, device="cuda", dtype=self.torch.float32).mul_(3.0)

    def labels(self, n, c, seed=1):
        g = self.torch.Generator(device="cuda").manual_seed(seed)
        return self.torch.randint(0, c, (n,), generator=g, device="cuda", dtype=self.torch.int32)

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device="cuda")

    def ones(self, shape):
        return self.torch.ones(shape, dtype=self.torch.float32, device="cuda")

    def stream(self):
        from numba import cuda

        return cuda.external_stream(int(self.torch.cuda.current_stream().cuda_stream))

    def sync(self, _=None):
        self.torch.cuda.synchronize()

    def time(self, fn, warmup=2, reps=5, batch=BATCH):
        """Stats of one call of ``fn`` from CUDA events around ``batch`` back-to-back calls, in seconds."""
        for _ in range(warmup):
            fn()
        self.sync()
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        times = []
        for _ in range(reps):
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / batch)
        return harness.stats_of(times, warmup)

    def numpy(self, x):
        return x.detach().cpu().numpy()

    def copy_gbs(self, nbytes=COPY_BYTES):
        src = self.torch.ones(nbytes // 4, dtype=self.torch.float32, device="cuda")
        dst = self.torch.empty_like(src)
        stats, _ = harness.measure(lambda: dst.copy_(src), warmup=2, reps=10, sync=self.sync)
        del src, dst
        return 2 * nbytes / stats.min / 1e9, stats

    def free(self):
        self.torch.cuda.empty_cache()


class Simulated:
    """NumPy arrays on Numba's CUDA simulator: the same calls, times that mean nothing."""

    simulated = True
    name = "Numba CUDA simulator"

    def __init__(self):
        import numpy as np

        self.np = np

    def logits(self, n, c, seed=0):
        return (self.np.random.default_rng(seed).standard_normal((n, c)) * 3.0).astype(self.np.float32)

    def labels(self, n, c, seed=1):
        return self.np.random.default_rng(seed).integers(0, c, n).astype(self.np.int32)

    def zeros(self, shape):
        return self.np.zeros(shape, self.np.float32)

    def ones(self, shape):
        return self.np.ones(shape, self.np.float32)

    def stream(self):
        return 0

    def sync(self, _=None):
        pass

    def time(self, fn, warmup=1, reps=2, batch=1):
        stats, _ = harness.measure(fn, warmup=min(warmup, 1), reps=min(reps, 2))
        return stats

    def numpy(self, x):
        return x

    def copy_gbs(self, nbytes=1 << 20):
        return None, None

    def free(self):
        pass


def kernel_modules():
    """(cuda_softmax_ce, _cuda_config): the package's own (shared with the ops path, compiled once), else the
    files of ``keras_stable_heads/kernels/`` loaded under a private name (no Keras needed)."""
    try:
        from keras_stable_heads.kernels import _cuda_config, cuda_softmax_ce

        return cuda_softmax_ce, _cuda_config
    except Exception:  # keras or the package missing: the kernels need neither
        import importlib

        name = _standalone.load("kernels", "_ksh_profile_kernels", run_init=False).__name__
        return (importlib.import_module(f"{name}.cuda_softmax_ce"), importlib.import_module(f"{name}._cuda_config"))


class SparseKernels:
    """The sparse softmax CE kernels on one set of buffers: ``forward()`` and ``backward()`` launch once each."""

    def __init__(self, dev, n, c):
        self.S, self.cfg = kernel_modules()
        self.dev, self.n, self.c = dev, n, c
        self.z = dev.logits(n, c)
        self.y = dev.labels(n, c)
        self.w = dev.ones((c,))
        self.loss = dev.zeros((n,))
        self.saved = dev.zeros((n, self.S.SAVED_WIDTH))
        self.dloss = dev.ones((n,))
        self.grad = dev.zeros((n, c))
        self.stream = dev.stream()

    def forward(self):
        self.S.softmax_ce_sparse_fwd(self.z, self.y, self.loss, self.saved, self.w, 0.0, 0.0, 0.0, 0, False,
                                     self.stream)

    def backward(self):
        self.S.softmax_ce_sparse_bwd(self.z, self.y, self.saved, self.dloss, self.grad, self.w, 0.0, 0.0, 0.0, 0,
                                     False, self.stream)

    def bytes(self, which):
        """Bytes a kernel must move: the N x C float32 traffic plus the per-row vectors it reads and writes."""
        n, c, width = self.n, self.c, self.S.SAVED_WIDTH
        if which == "forward":  # logits, labels in; loss, saved out
            return 4 * n * c + 4 * n + 4 * n + 4 * n * width
        return 8 * n * c + 4 * n + 4 * n * width + 4 * n  # logits in, gradient out; labels, saved, dloss in

    def launch_config(self):
        return {"block_threads": self.S.block_threads(self.c), "grid": self.n,
                "BLOCK_THREADS": self.cfg.BLOCK_THREADS, "UNROLL": self.cfg.UNROLL}

    def release(self):
        for name in ("z", "y", "w", "loss", "saved", "dloss", "grad"):
            setattr(self, name, None)
        self.dev.free()


# ---------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------


def _timing(dev, kernels, which, copy_gbs, reps=5):
    fn = kernels.forward if which == "forward" else kernels.backward
    stats = dev.time(fn, reps=reps)
    moved = kernels.bytes(which)
    gbs = moved / stats.min / 1e9
    return {**stats.as_ms(), "bytes": moved, "bandwidth_gbs": gbs,
            "fraction_of_copy": gbs / copy_gbs if copy_gbs else None}


def part_kernels(dev, kernels, copy_gbs):
    kernels.forward()  # compiles, and the backward needs the saved values
    kernels.backward()
    dev.sync()
    result = {"launch": kernels.launch_config()}
    for which in ("forward", "backward"):
        result[which] = _timing(dev, kernels, which, copy_gbs)
    fwd, bwd = result["forward"]["min"], result["backward"]["min"]
    moved = kernels.bytes("forward") + kernels.bytes("backward")
    result["forward_plus_backward"] = {"ms": fwd + bwd, "bytes": moved,
                                       "bandwidth_gbs": moved / ((fwd + bwd) * 1e-3) / 1e9,
                                       "fraction_of_copy": (moved / ((fwd + bwd) * 1e-3) / 1e9 / copy_gbs)
                                       if copy_gbs else None}
    return result


def part_sweep(dev, kernels, copy_gbs, deadline, settings=BLOCK_SWEEP):
    import numpy as np

    cfg = kernels.cfg
    default = cfg.BLOCK_THREADS
    kernels.forward()
    dev.sync()
    reference = np.array(dev.numpy(kernels.loss), copy=True)
    rows = []
    try:
        for threads in settings:
            if deadline.passed():
                rows.append({"BLOCK_THREADS": threads, "skipped": SKIPPED})
                continue
            cfg.BLOCK_THREADS = threads
            row = {"BLOCK_THREADS": threads, "block_threads": kernels.S.block_threads(kernels.c)}
            try:
                kernels.forward()
                dev.sync()
                row["loss_max_abs_diff_vs_default"] = float(np.max(np.abs(dev.numpy(kernels.loss) - reference)))
                for which in ("forward", "backward"):
                    t = _timing(dev, kernels, which, copy_gbs, reps=3)
                    row[which] = {k: t[k] for k in ("min", "median", "bandwidth_gbs", "fraction_of_copy")}
            except Exception as error:  # e.g. too many resources requested for launch
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
    finally:
        cfg.BLOCK_THREADS = default
    timed = [r for r in rows if "forward" in r]
    best = {which: min(timed, key=lambda r: r[which]["min"])["BLOCK_THREADS"] for which in ("forward", "backward")} \
        if timed else None
    return {"default_BLOCK_THREADS": default, "rows": rows, "best": best}


def _profile_summary(prof, device_kernels=True, top=12):
    """{kernel name: count, total_us} of a torch.profiler run: device kernels/copies, or (CPU run) CPU ops."""
    groups = {}
    for event in prof.events():
        on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
        if on_device != device_kernels:
            continue
        if not device_kernels and getattr(event, "cpu_parent", None) is not None:
            continue  # CPU run: top-level ops only
        name = event.name if len(event.name) <= 120 else event.name[:117] + "..."
        entry = groups.setdefault(name, {"count": 0, "total_us": 0.0})
        entry["count"] += 1
        entry["total_us"] += float(event.time_range.elapsed_us())
    ordered = sorted(groups.items(), key=lambda kv: -kv[1]["total_us"])
    total = sum(entry["total_us"] for _, entry in ordered)
    numba = sum(entry["total_us"] for name, entry in ordered if "cudapy" in name or "_sparse_" in name)
    return {"total_us": total, "what": "GPU kernels and copies" if device_kernels else "CPU ops (top level)",
            "numba_kernels_us": numba,
            "top": [{"name": name, **entry, "share": entry["total_us"] / total if total else None}
                    for name, entry in ordered[:top]]}


def part_steps(dev, n, c, deadline):
    """torch.profiler of one forward+backward per implementation and dtype (CPU ops only on the simulator)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    on_gpu = not dev.simulated
    steps = {"torch.F": lambda z, y: F.cross_entropy(z, y.long(), reduction="none")}
    result = {}
    if on_gpu:
        try:
            from keras_stable_heads import ops
        except Exception as error:  # Keras missing: the kernels were profiled alone above
            result["stable"] = {"error": f"keras_stable_heads: {type(error).__name__}: {error}"[:300]}
        else:
            for impl in ("numba_cuda", "portable"):
                steps[f"stable/{impl}"] = (lambda impl: lambda z, y: ops.softmax_cross_entropy_with_integer_labels(
                    z, y, implementation=impl))(impl)
    device = "cuda" if on_gpu else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    z32 = torch.randn((n, c), generator=gen, device=device).mul_(3.0)
    y = torch.randint(0, c, (n,), generator=gen, device=device, dtype=torch.int32)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    for dtype in ("float32", "bfloat16"):
        z = z32 if dtype == "float32" else z32.to(torch.bfloat16)
        for name, loss_fn in steps.items():
            key = f"{name} {dtype}"
            if name == "stable/portable" and dtype == "bfloat16":
                continue  # the float32 step says what limits it; the bench times both
            if deadline.passed():
                result[key] = {"skipped": SKIPPED}
                continue

            def step():
                x = z.detach().requires_grad_(True)
                loss_fn(x, y).float().sum().backward()
                return x.grad

            try:
                step()  # compile, allocate
                dev.sync()
                start = time.perf_counter()
                with profile(activities=activities) as prof:
                    step()
                    dev.sync()
                wall_ms = (time.perf_counter() - start) * 1e3
                result[key] = {"wall_ms_under_profiler": wall_ms, **_profile_summary(prof, on_gpu)}
            except Exception as error:
                result[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
            dev.free()
        del z
    return result


def find_ncu():
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda-*/bin/ncu"):
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


_NCU_KERNEL = re.compile(r"_sparse_(fwd|bwd).*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)")
_NCU_SECTION = re.compile(r"^\s*Section: (.+?)\s*$")
_NCU_METRIC = re.compile(r"^\s{2,}(\S.*?\S)\s{2,}(\S+)\s+([-\d.,]+)\s*$")


def parse_ncu(text):
    """{"forward"/"backward": {"<metric> [<unit>]": value}} from ncu's details page."""
    kernels, current = {}, None
    for line in text.splitlines():
        match = _NCU_KERNEL.search(line)
        if match and not _NCU_METRIC.match(line):
            current = "forward" if match.group(1) == "fwd" else "backward"
            kernels.setdefault(current, {})
            continue
        if _NCU_SECTION.match(line):
            continue
        match = _NCU_METRIC.match(line)
        if match and current:
            name, unit, value = match.groups()
            try:
                kernels[current][f"{name} [{unit}]"] = float(value.replace(",", ""))
            except ValueError:
                pass
    return kernels


def part_ncu(out, n, c, deadline, timeout_s=150):
    ncu = find_ncu()
    if ncu is None:
        return {"found": False, "note": "Nsight Compute (ncu) is not on this machine: no hardware counters"}
    timeout = max(10.0, min(timeout_s, deadline.left()))
    command = [ncu, "--target-processes", "all", "--clock-control", "none", "--kernel-name-base", "mangled",
               "--kernel-name", NCU_KERNELS, "--launch-count", "2"]
    for section in NCU_SECTIONS:
        command += ["--section", section]
    command += [sys.executable, os.path.abspath(__file__), "--ncu-target", "--rows", str(n), "--classes", str(c)]
    start = time.time()

    def text_of(data):
        return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")

    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
        text, code = text_of(done.stdout) + "\n" + text_of(done.stderr), done.returncode
    except subprocess.TimeoutExpired as expired:
        text = f"{text_of(expired.stdout)}\n{text_of(expired.stderr)}\nTIMEOUT after {timeout:.0f} s"
        code = None
    path = os.path.join(out, "ncu.txt")
    with open(path, "w") as f:
        f.write(" ".join(command) + "\n\n" + text)
    return {"found": ncu, "returncode": code, "seconds": round(time.time() - start, 1), "text": path,
            "size": [n, c], "sections": list(NCU_SECTIONS), "metrics": parse_ncu(text)}


def ncu_target(dev, n, c):
    """What ncu profiles: one forward and one backward launch (compilation is no launch)."""
    kernels = SparseKernels(dev, n, c)
    kernels.forward()
    kernels.backward()
    dev.sync()
    return kernels


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def _guard(report, name, fn):
    start = time.time()
    try:
        report[name] = fn()
    except Exception as error:
        traceback.print_exc()
        report[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    report.setdefault("seconds", {})[name] = round(time.time() - start, 1)
    print(f"[profile] {name}: {time.time() - start:.1f} s", flush=True)


def summary_lines(report):
    lines = [f"profile on {report.get('device')} at {report['size'][0]}x{report['size'][1]} float32"]
    if report.get("error"):
        lines.append(f"  {report['error']}")
    copy = report.get("copy") or {}
    if copy.get("gbs"):
        lines.append(f"  copy bandwidth {copy['gbs']:.0f} GB/s (read + write, min of {copy.get('reps')} copies)")
    kernels = report.get("kernels") or {}
    for which in ("forward", "backward"):
        k = kernels.get(which)
        if isinstance(k, dict) and "min" in k:
            fraction = k.get("fraction_of_copy")
            lines.append(f"  {which:8s} kernel {k['min']:.3f} ms, {k['bandwidth_gbs']:.0f} GB/s"
                         + (f" = {100 * fraction:.0f}% of copy" if fraction else ""))
    both = kernels.get("forward_plus_backward")
    if both and both.get("fraction_of_copy"):
        fraction = both["fraction_of_copy"]
        lines.append(f"  both     {both['ms']:.3f} ms, {100 * fraction:.0f}% of copy "
                     f"(launch {kernels.get('launch')})")
        lines.append(f"  issue 6 target, forward+backward at >= 80% of the copy bandwidth: the kernels reach "
                     f"{100 * fraction:.0f}%" + (" (met)" if fraction >= 0.8 else
                                                  f", {80 - 100 * fraction:.0f} points short"))
    sweep = report.get("sweep") or {}
    for row in sweep.get("rows", []):
        if "forward" in row:
            lines.append(f"  BLOCK_THREADS {row['BLOCK_THREADS']:4d}: fwd {row['forward']['min']:.3f} ms, "
                         f"bwd {row['backward']['min']:.3f} ms, loss diff {row['loss_max_abs_diff_vs_default']:.1e}")
        else:
            lines.append(f"  BLOCK_THREADS {row['BLOCK_THREADS']:4d}: {row.get('error') or row.get('skipped')}")
    if sweep.get("best"):
        lines.append(f"  best BLOCK_THREADS: {sweep['best']} (default {sweep.get('default_BLOCK_THREADS')})")
    for part in ("copy", "kernels", "sweep", "steps", "ncu"):
        entry = report.get(part)
        if isinstance(entry, dict) and set(entry) <= {"error", "skipped"} and entry:
            lines.append(f"  {part}: {entry.get('error') or entry.get('skipped')}")
    steps = report.get("steps") or {}
    for key, step in steps.items() if not set(steps) <= {"error", "skipped"} else ():
        if not isinstance(step, dict):
            continue
        if "top" in step:
            top = ", ".join(f"{e['name'][:40]} {e['total_us'] / 1e3:.2f} ms" for e in step["top"][:4])
            numba = f" (Numba kernels {step['numba_kernels_us'] / 1e3:.2f} ms)" if step.get("numba_kernels_us") else ""
            lines.append(f"  step {key}: {step['total_us'] / 1e3:.2f} ms of {step['what']}{numba}: {top}")
        else:
            lines.append(f"  step {key}: {step.get('error') or step.get('skipped')}")
    ncu = report.get("ncu") or {}
    if ncu.get("found") is False:
        lines.append("  ncu: not found")
    elif ncu.get("found"):
        wanted = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "L2 Hit Rate",
                  "Mem Busy", "Max Bandwidth", "Achieved Occupancy")
        for which, metrics in (ncu.get("metrics") or {}).items():
            keep = {k: v for k, v in metrics.items() if k.rsplit(" [", 1)[0] in wanted}
            lines.append(f"  ncu {which}: " + ", ".join(f"{k} {v:g}" for k, v in keep.items()))
        if not ncu.get("metrics"):
            lines.append(f"  ncu: returncode {ncu.get('returncode')}, no metrics parsed (see {ncu.get('text')})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    parser.add_argument("--budget-s", type=float, default=90.0, help="seconds for the whole profile")
    parser.add_argument("--rows", type=int, default=None, help="N (default 16384; 4 with --simulate)")
    parser.add_argument("--classes", type=int, default=None, help="C (default 131072; 64 with --simulate)")
    parser.add_argument("--simulate", action="store_true", help="a dry run on Numba's CUDA simulator")
    parser.add_argument("--ncu-rows", type=int, default=None, help=f"N of the ncu run (default {NCU_ROWS})")
    parser.add_argument("--no-ncu", action="store_true")
    parser.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate:  # before numba is imported
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        import numba

        numba.config.ENABLE_CUDASIM = 1
    n = args.rows or (4 if args.simulate else 16384)
    c = args.classes or (64 if args.simulate else 131072)
    if args.ncu_target:
        ncu_target(Simulated() if args.simulate else TorchGPU(), n, c)
        return 0
    deadline = harness.Deadline(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile.json")
    commit, dirty = harness.source_commit()
    report = {"device": None, "size": [n, c], "dtype": "float32", "op": "sparse_softmax_ce",
              "timestamp": harness.utc_now(), "commit": commit, "dirty": dirty,
              "versions": harness.versions("torch", "jax", "jaxlib")}

    def save():  # after every part: a crash later loses nothing measured before it
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)

    try:
        dev = Simulated() if args.simulate else TorchGPU()
    except Exception as error:
        report["error"] = f"no device: {type(error).__name__}: {error}"[:500]
        save()
        print(report["error"])
        return 1
    report["device"] = dev.name

    def copy():
        gbs, stats = dev.copy_gbs()
        return {"gbs": gbs, "reps": stats.reps if stats else None, "buffer_bytes": COPY_BYTES} if gbs else \
            {"gbs": None, "note": "simulated: no copy bandwidth"}

    _guard(report, "copy", copy)
    save()
    copy_gbs = (report.get("copy") or {}).get("gbs")
    kernels = None
    try:
        kernels = SparseKernels(dev, n, c)
    except Exception as error:
        traceback.print_exc()
        report["kernels"] = {"error": f"buffers: {type(error).__name__}: {error}"[:500]}
    if kernels is not None:
        _guard(report, "kernels", lambda: part_kernels(dev, kernels, copy_gbs))
        save()
        if deadline.passed():
            report["sweep"] = {"skipped": SKIPPED}
        else:
            settings = BLOCK_SWEEP[1:3] if dev.simulated else BLOCK_SWEEP  # the simulator: the code path only
            _guard(report, "sweep", lambda: part_sweep(dev, kernels, copy_gbs, deadline, settings))
        kernels.release()
        del kernels
        save()
    if deadline.passed():
        report["steps"] = {"skipped": SKIPPED}
    else:
        _guard(report, "steps", lambda: part_steps(dev, n, c, deadline))
    save()
    if args.no_ncu:
        report["ncu"] = {"skipped": "--no-ncu"}
    elif args.simulate:
        report["ncu"] = {"found": find_ncu() or False, "note": "simulated: the ncu target ran without ncu"}
        _guard(report, "ncu_target", lambda: bool(ncu_target(dev, n, c)))
    elif deadline.left() < 15:
        report["ncu"] = {"skipped": SKIPPED}
    else:
        _guard(report, "ncu", lambda: part_ncu(args.out, min(n, args.ncu_rows or NCU_ROWS), c, deadline))
    save()
    print("\n".join(summary_lines(report)))
    print(f"[profile] written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

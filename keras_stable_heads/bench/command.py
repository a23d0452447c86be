"""``keras-stable-heads bench``: benchmarks against the built-in losses, from an install or a checkout.

The command-line entry of :mod:`keras_stable_heads.bench`: it parses the options, runs the plan on each asked
Keras backend — in this process for the current backend, in one subprocess per other backend (Keras fixes its
backend per process) — with a progress bar on stderr, appends the records to ``--out`` (default: the checkout's
``benchmarks/results/records.jsonl``, or ``keras-stable-heads-bench.jsonl`` in the current folder from an
install) and prints the table.

    keras-stable-heads bench                      # quick: about a minute, the current backend
    keras-stable-heads bench --full --backend all # everything, one process per backend
    keras-stable-heads bench --op sparse_softmax_ce --sizes 8192x1000,128k --backend jax,torch
    keras-stable-heads bench --gpu --backend jax,torch --budget-s 240   # on a GPU (benchmarks/gpu_run.sh)
"""

import argparse
import dataclasses
import os
import secrets
import subprocess
import sys
import time

from . import baselines
from . import harness
from . import locations
from . import report

BACKENDS = ("tensorflow", "jax", "torch")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-stable-heads bench",
        description="Time the stable losses (each implementation the dispatcher can choose) against Keras's "
                    "built-ins, tf.nn, torch.nn.functional and optax; append records and print a table.")
    plans = parser.add_mutually_exclusive_group()
    plans.add_argument("--full", action="store_true",
                       help="everything: 3 ops, sizes up to 8192x32000 and a 128k-class case, float32 and "
                            "bfloat16, forward and forward+backward (default: a quick subset, about a minute)")
    plans.add_argument("--gpu", action="store_true",
                       help="the GPU plan: sparse softmax CE at 16384x131072 and 8192x32000 (largest first), "
                            "float32 and bfloat16, forward and forward+backward, then a small float32 sweep; "
                            "runs on a CPU too (then with --sizes, as a dry run)")
    parser.add_argument("--backend", default=None,
                        help="tensorflow, jax, torch, a comma list, or all (default: the current Keras backend)")
    parser.add_argument("--op", default=None,
                        help="comma list of sparse_softmax_ce, softmax_ce, sigmoid_ce, or all")
    parser.add_argument("--sizes", default=None, help="comma list of NxC, and 128k for the machine-sized "
                                                      "131072-class case (replaces the plan's sizes for every op)")
    parser.add_argument("--dtypes", default=None, help="comma list of float32, bfloat16")
    parser.add_argument("--modes", default=None, help="comma list of forward, forward_backward")
    parser.add_argument("--impl", default=None,
                        help="comma list of implementation-name prefixes to keep, e.g. stable,keras,torch.F")
    parser.add_argument("--reps", type=int, default=None, help="at most this many timed calls per measurement")
    parser.add_argument("--no-extreme", action="store_true", help="skip the extreme-logit exactness case")
    parser.add_argument("--extreme-size", default=None, help="NxC of the extreme-logit case (default 1024x1000)")
    parser.add_argument("--out", default=None, help="records file (JSON Lines, appended; default "
                                                    "benchmarks/results/records.jsonl in a checkout, else "
                                                    f"{locations.INSTALLED_RECORDS} here)")
    parser.add_argument("--bandwidth-mib", type=int, default=512,
                        help="size of the buffer copied to measure memory bandwidth (default 512 MiB)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run, every backend together: what is left when they are spent "
                             "is recorded as skipped (default: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def _split(text, allowed=None, name="value"):
    if not text:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if allowed is not None:
        if items == ["all"]:
            return list(allowed)
        bad = [item for item in items if item not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad}; choose from {list(allowed)} (or all)")
    return items


class ProgressBar:
    """A one-line progress bar on stderr (a line per tenth of the work when stderr is not a terminal)."""

    def __init__(self, title, enabled=True, stream=None, width=24):
        stream = stream or sys.stderr  # the stderr of when the bar is made, not of when this module was imported
        self.title, self.enabled, self.stream, self.width = title, enabled, stream, width
        self.tty = enabled and stream.isatty()
        self.start = time.perf_counter()
        self.shown = -1
        self.dirty = False

    def __call__(self, done, total, label):
        if not self.enabled or not total:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(self.width * done / total)
            text = f"\r{self.title} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {elapsed:4.0f}s {label}"
            columns = _terminal_columns()
            self.stream.write(text[:columns - 1].ljust(columns - 1))
            self.stream.flush()
            self.dirty = True
        else:
            tenth = 10 * done // total
            if tenth != self.shown:
                self.shown = tenth
                print(f"{self.title} {done}/{total} ({elapsed:.0f}s) {label}", file=self.stream, flush=True)

    def write(self, message):
        if self.dirty:
            self.stream.write("\n")
            self.dirty = False
        print(message, file=self.stream, flush=True)

    def close(self):
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False


def _terminal_columns():
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 100


def _plan(args):
    from . import suite  # imports Keras: only once the command runs

    plan = suite.full_plan() if args.full else suite.gpu_plan() if args.gpu else suite.quick_plan()
    ops = _split(args.op, baselines.OPS, "op")
    sizes = suite.parse_sizes(args.sizes) if args.sizes else None
    dtypes = _split(args.dtypes, suite.DTYPES, "dtype")
    modes = _split(args.modes, suite.MODES, "mode")
    extreme_size = suite.parse_sizes(args.extreme_size)[0] if args.extreme_size else None
    plan = plan.with_overrides(ops=ops, sizes=sizes, dtypes=dtypes, modes=modes, include=_split(args.impl),
                               reps=args.reps, extreme_size=extreme_size)
    if args.no_extreme:
        plan = dataclasses.replace(plan, extreme=False)
    return plan


def run_here(args, out, run_id, deadline=None):
    """Run the plan on the current Keras backend in this process, appending records to ``out``."""
    import keras

    from . import suite

    plan = _plan(args)
    backend = keras.backend.backend()
    bar = ProgressBar(f"bench {backend}", enabled=not args.no_progress)
    runner = suite.Runner(plan, run_id=run_id, progress=bar, log=bar.write,
                                     bandwidth_bytes=max(1, args.bandwidth_mib) << 20, deadline=deadline)
    context = runner.measure_context()
    bw = context["bandwidth"]
    bar.write(f"bench {backend}: {context['device_name']}; copy {bw['copy_1t_gbs']:.1f} GB/s (1 thread), "
              f"{bw['copy_threads_gbs'] or 0:.1f} GB/s ({bw['threads']} threads)"
              + (f", device copy {bw['device_copy_gbs']:.0f} GB/s" if bw.get("device_copy_gbs") else "")
              + (f"; {deadline.left():.0f} s of budget left" if deadline and deadline.at else ""))
    try:
        records = runner.run(sink=lambda batch: harness.append_records(out, batch))
    finally:
        bar.close()
    return records


def run_child(backend, argv, run_id):
    """Run the same command for one other backend in a subprocess (Keras fixes its backend per process)."""
    command = [sys.executable, "-m", "keras_stable_heads", "bench", *argv, "--backend", backend,
               "--run-id", run_id, "--child"]
    return subprocess.run(command, env=harness.backend_env(backend)).returncode


def _strip(argv, names):
    """``argv`` without the options in ``names`` (and their values)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        flag = item.split("=", 1)[0]
        if flag in names:
            skip = "=" not in item
            continue
        kept.append(item)
    return kept


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    import keras

    current = keras.backend.backend()
    try:
        backends = _split(args.backend, BACKENDS, "backend") or [current]
    except ValueError as error:
        parser.error(str(error))
    try:
        _plan(args)  # validate the options once, before any process starts
    except ValueError as error:
        parser.error(str(error))
    out = os.path.abspath(args.out or locations.default_records())
    run_id = args.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    # One deadline for every backend's process (the children get its absolute time).
    deadline = harness.Deadline(args.budget_s, at=args.deadline)
    child_argv = _strip(argv, {"--backend", "--run-id", "--child", "--out", "--budget-s", "--deadline"}) + \
        ["--out", out] + (["--deadline", repr(deadline.at)] if deadline.at else [])
    status = 0
    for backend in backends:
        if backend == current:
            run_here(args, out, run_id, deadline)
        else:
            code = run_child(backend, child_argv, run_id)
            if code != 0:
                print(f"bench: the {backend} run failed (exit {code})", file=sys.stderr)
                status = 1
    if args.child:
        return status
    records = harness.load_records(out, run_id)
    modes = sorted({r["mode"] for r in records if r["case"] == "random"}, reverse=True)
    for mode in modes:
        print(f"\n{mode.replace('_', '+')} (min ms of the timed calls; speed-up = fastest built-in / stable):")
        print(report.format_speed(records, mode))
    if any(r["case"] == "extreme" for r in records):
        print("\nexactness on extreme logits (loss error / gradient error against float64):")
        print(report.format_exactness(records))
    print(f"\n{len(records)} records appended to {out} (run {run_id}); plots: python benchmarks/plot.py "
          f"--records {out} (in a checkout)")
    return status


if __name__ == "__main__":
    sys.exit(main())

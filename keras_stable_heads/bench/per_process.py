"""A training-step benchmark that measures each (backend, variant) in a process of its own: the part that
:mod:`.lm_head` and :mod:`.hub_fit` share.

A :class:`StepBenchmark` says what one benchmark measures (its variants, its own record fields, how its
comparisons are grouped and its plot titled); with it

- :meth:`StepBenchmark.main` is the command line (``--backend``, ``--variants``, ``--reps``, ``--memory-gib``,
  ``--out``, ``--run-id``, ``--report``, ``--plot``, plus the benchmark's own sizes);
- :meth:`StepBenchmark.run` starts ``python -m <module> --child ...`` once per :class:`Job` (peak RSS is per
  process, and Keras fixes its backend per process), recording a job that is estimated not to fit, or that fails,
  as skipped with the reason;
- :meth:`StepBenchmark.measure` is the child's side: the RSS before the first step, one warm-up step (compilation),
  ``--reps`` timed steps, the peak RSS over them, the losses; it appends one record with the hardware, versions and
  commit;
- :meth:`StepBenchmark.table` and :meth:`StepBenchmark.plot` show one run: each variant's time and memory, and the
  ``fused`` variant's ratios to the others.
"""

import argparse
import dataclasses
import subprocess
import sys
import time

from . import harness

BACKENDS = ("tensorflow", "jax", "torch")
FUSED = "fused"  # the variant whose ratios to the others the table shows
# A record's fields: the run and the variant, the benchmark's own (StepBenchmark.fields), the machine, and these
_MEASURED = ("min_ms", "median_ms", "max_ms", "reps", "peak_rss_mib", "rss_before_mib", "xla_temp_mib",
             "first_loss", "last_loss", "skipped", "load_average", "versions")


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement: a backend, a variant, and the values of the benchmark's size fields (handed to the child
    as ``--name value``); ``estimate_gib`` is compared with ``--memory-gib`` (None: always run)."""

    backend: str
    variant: str
    sizes: dict
    estimate_gib: float = None


@dataclasses.dataclass(frozen=True)
class StepBenchmark:
    """What one benchmark measures.

    Args:
        name: the records' ``benchmark`` field.
        module: the module whose ``--child`` runs one measurement (``python -m module``).
        run_prefix: run ids are ``<run_prefix>-<local time>``.
        variants: the variants, in table and plot order; one of them is ``"fused"``.
        colors: a bar colour per variant.
        fields: the benchmark's own record fields and their defaults (sizes, constants such as the dtype), in
            record order; a benchmark that lists ``losses`` gets every step's loss there, the warm-up step's first.
        group: ``(field, header, width)`` of the fields that, with the backend, make one comparison of the
            variants: a table block, a row of panels in the plot.
        title: the plot's title from the run's first record.
        columns: further table columns, ``(header, width, function of a record -> text)``, after XLA's temporary
            memory.
        distributions: packages whose versions the records give, beside Python, NumPy, Keras, Numba and the
            backend's framework.
    """

    name: str
    module: str
    run_prefix: str
    variants: tuple
    colors: dict
    fields: dict
    group: tuple
    title: object
    columns: tuple = ()
    distributions: tuple = ()

    # ------------------------------------------------------------------------------------------------------------
    # Records
    # ------------------------------------------------------------------------------------------------------------

    def record(self, run_id, backend, variant, **fields):
        """One record: every field present (unset ones None, the benchmark's own with their defaults)."""
        commit, dirty = harness.source_commit()
        record = dict(benchmark=self.name, run_id=run_id, timestamp=harness.utc_now(), commit=commit, dirty=dirty,
                      backend=backend, variant=variant)
        record.update(self.fields)
        record.update(device_name=f"{harness.cpu_model()} ({harness.cpu_count()} cores)", hardware=harness.hardware())
        record.update(dict.fromkeys(_MEASURED))
        unknown = set(fields) - set(record)
        if unknown:
            raise ValueError(f"fields not in the {self.name} record: {sorted(unknown)}")
        record.update(fields)
        return record

    def load(self, path, run_id=None):
        """The records of run ``run_id`` in ``path``, or of its last run."""
        return harness.load_run(path, run_id)

    # ------------------------------------------------------------------------------------------------------------
    # The parent: one child process per job
    # ------------------------------------------------------------------------------------------------------------

    def run(self, args, jobs, echo=print):
        """Measure every job in a process of its own; returns the number that failed. ``args`` holds reps,
        memory_gib, out and run_id (set here when None)."""
        args.run_id = args.run_id or time.strftime(f"{self.run_prefix}-%Y%m%dT%H%M%S")
        failed = 0
        for job in jobs:
            label = f"{job.backend:>10} {job.variant:>12} " + " ".join(
                f"{header}={job.sizes[field]}" for field, header, _ in self.group)
            if job.estimate_gib is not None and job.estimate_gib > args.memory_gib:
                reason = f"estimated {job.estimate_gib:.0f} GiB > --memory-gib {args.memory_gib:g}"
                self._append_skipped(args, job, reason)
                echo(f"{label}: skipped ({reason})")
                continue
            command = [sys.executable, "-m", self.module, "--child", "--variant", job.variant, "--run-id",
                       args.run_id, "--reps", str(args.reps), "--out", args.out]
            for field, value in job.sizes.items():
                command += [f"--{field.replace('_', '-')}", str(value)]
            done = subprocess.run(command, env=harness.backend_env(job.backend), capture_output=True, text=True)
            if done.returncode != 0:
                failed += 1
                error = done.stderr.strip()
                reason = f"failed: {error.splitlines()[-1][:300] if error else done.returncode}"
                self._append_skipped(args, job, reason)
            echo(f"{label}: {done.stdout.strip().splitlines()[-1] if done.returncode == 0 else reason}")
        return failed

    def _append_skipped(self, args, job, reason):
        record = self.record(args.run_id, job.backend, job.variant, skipped=reason, **job.sizes)
        harness.append_records(args.out, [record])

    # ------------------------------------------------------------------------------------------------------------
    # The child: one measurement
    # ------------------------------------------------------------------------------------------------------------

    def measure(self, args, backend, train_step, *, xla_temp_bytes=None, **fields):
        """Time ``train_step()`` (it runs one step and returns its loss as a float): one warm-up step, then
        ``args.reps`` steps; append the record (``fields``: the benchmark's own), print one line, return it."""
        before = harness.current_rss_mib()
        harness.reset_peak_rss()
        losses = []
        stats, _ = harness.measure(lambda: losses.append(train_step()), warmup=1, reps=args.reps,
                                   min_reps=args.reps)
        if "losses" in self.fields:
            fields["losses"] = losses
        # the versions of Python, NumPy, Keras, Numba, the backend's framework (a distribution of the same name)
        record = self.record(args.run_id, backend, args.variant, min_ms=stats.min * 1e3,
                             median_ms=stats.median * 1e3, max_ms=stats.max * 1e3, reps=stats.reps,
                             peak_rss_mib=harness.peak_rss_mib(), rss_before_mib=before,
                             xla_temp_mib=None if xla_temp_bytes is None else xla_temp_bytes / (1 << 20),
                             first_loss=losses[0], last_loss=losses[-1], load_average=harness.load_average(),
                             versions=harness.versions(backend, *self.distributions), **fields)
        harness.append_records(args.out, [record])
        temp = f"  XLA temp {xla_temp_bytes / (1 << 20):.0f} MiB" if xla_temp_bytes else ""
        print(f"min {record['min_ms']:9.0f} ms  peak RSS {record['peak_rss_mib']:7.0f} MiB (before the step "
              f"{record['rss_before_mib']:.0f}){temp}  loss {record['first_loss']:.4f}", flush=True)
        return record

    # ------------------------------------------------------------------------------------------------------------
    # One run's table and plot
    # ------------------------------------------------------------------------------------------------------------

    def _key(self, record):
        return tuple(record[field] for field, _, _ in self.group)

    def table(self, records):
        """Per backend and group: each variant's time and peak RSS, and the fused variant's ratios to the others."""
        keys = "".join(f" {header:>{width}}" for _, header, width in self.group)
        extra = "".join(f" {header:>{width}}" for header, width, _ in self.columns)
        lines = [f"{'backend':>10}{keys} {'variant':>13} {'min ms':>9} {'peak RSS MiB':>13} {'RSS before':>11} "
                 f"{'XLA temp MiB':>12}{extra}  {FUSED}/this: time, peak RSS, step memory (peak - before)"]
        groups = {}
        for r in records:
            groups.setdefault((r["backend"],) + self._key(r), {})[r["variant"]] = r
        for (backend, *key), by_variant in groups.items():
            head = f"{backend:>10}" + "".join(f" {value:>{width}}" for value, (_, _, width) in zip(key, self.group))
            fused = by_variant.get(FUSED)
            for variant in self.variants:
                r = by_variant.get(variant)
                if r is None:
                    continue
                if r["skipped"]:
                    lines.append(f"{head} {variant:>13}  skipped: {r['skipped']}")
                    continue
                ratio = ""
                if fused and not fused["skipped"] and variant != FUSED:
                    step = ((fused["peak_rss_mib"] - fused["rss_before_mib"])
                            / max(1.0, r["peak_rss_mib"] - r["rss_before_mib"]))
                    ratio = (f"  {fused['min_ms'] / r['min_ms']:.2f}x, "
                             f"{fused['peak_rss_mib'] / r['peak_rss_mib']:.2f}x, {step:.2f}x")
                temp = f"{r['xla_temp_mib']:12.0f}" if r["xla_temp_mib"] is not None else f"{'-':>12}"
                cells = "".join(f" {cell(r):>{width}}" for _, width, cell in self.columns)
                lines.append(f"{head} {variant:>13} {r['min_ms']:9.0f} {r['peak_rss_mib']:13.0f} "
                             f"{r['rss_before_mib']:11.0f} {temp}{cells}{ratio}")
        return "\n".join(lines)

    def plot(self, records, path):
        """Step time and peak RSS per backend and variant (one group, e.g. one vocabulary, per row of panels)."""
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

        keys = sorted({self._key(r) for r in records})
        fig = Figure(figsize=(11, 3.6 * len(keys)), layout="constrained")
        axes = fig.subplots(len(keys), 2, squeeze=False)
        width = 0.81 / len(self.variants)
        for row, key in enumerate(keys):
            where = ", ".join(f"{header} = {value}" for value, (_, header, _) in zip(key, self.group))
            panels = (("min_ms", "step time (ms, min)"), ("peak_rss_mib", "peak RSS (MiB)"))
            for col, (field, label) in enumerate(panels):
                ax = axes[row][col]
                for i, backend in enumerate(BACKENDS):
                    for j, variant in enumerate(self.variants):
                        r = next((r for r in records
                                  if (r["backend"], self._key(r), r["variant"]) == (backend, key, variant)), None)
                        value = r[field] if r and not r["skipped"] else 0
                        x = i + (j - (len(self.variants) - 1) / 2) * width
                        ax.bar(x, value, width, color=self.colors[variant], label=variant if i == 0 else None)
                        if r and r["skipped"]:
                            ax.text(x, 0, "skipped", rotation=90, ha="center", va="bottom", fontsize=7)
                ax.set_xticks(range(len(BACKENDS)), BACKENDS)
                ax.set_title(f"{label}, {where}")
                if row == 0 and col == 0:
                    ax.legend(fontsize=8)
        fig.suptitle(self.title(records[0]), fontsize=9)
        fig.savefig(path, dpi=110)
        return path

    # ------------------------------------------------------------------------------------------------------------
    # The command line
    # ------------------------------------------------------------------------------------------------------------

    def main(self, argv, *, description, records, plot, add_sizes, child, run):
        """The command line: ``add_sizes(parser)`` adds the benchmark's own options; ``child(args)`` measures one
        variant (``--child``); ``run(args, backends, variants)`` measures them all and returns the failures."""
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--backend", default="all", help="all, or a comma list of tensorflow, jax, torch")
        parser.add_argument("--variants", default=",".join(self.variants),
                            help=f"comma list of {', '.join(self.variants)}")
        add_sizes(parser)
        parser.add_argument("--reps", type=int, default=3)
        parser.add_argument("--memory-gib", type=float, default=20.0, help="skip variants estimated above this")
        parser.add_argument("--out", default=records)
        parser.add_argument("--run-id", default=None)
        parser.add_argument("--report", action="store_true", help="only print the table and draw the plot of the "
                            "latest run in --out (or --run-id)")
        parser.add_argument("--plot", default=plot)
        parser.add_argument("--variant", help=argparse.SUPPRESS)
        parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        if args.child:
            child(args)
            return 0
        if args.report:
            records = self.load(args.out, args.run_id)
            print(self.table(records))
            print(f"plot: {self.plot(records, args.plot)}")
            return 0
        backends = BACKENDS if args.backend == "all" else tuple(args.backend.split(","))
        variants = tuple(args.variants.split(","))
        if set(backends) - set(BACKENDS) or set(variants) - set(self.variants):
            parser.error(f"--backend from {BACKENDS}, --variants from {self.variants}")
        failed = run(args, backends, variants)
        records = self.load(args.out, args.run_id)
        print(self.table(records))
        print(f"records appended to {args.out} (run {args.run_id}); plot: {self.plot(records, args.plot)}")
        return 1 if failed else 0


def xla_temp_bytes(model, data):
    """XLA's temporary memory for the compiled training step of ``model`` on ``data`` (``(x, y)`` or
    ``(x, y, sample_weight)``) on JAX; None on the other backends, or when XLA cannot say (the timing still runs)."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    try:
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        compiled = jax.jit(model.train_step).lower(state, data).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception as error:  # noqa: BLE001 - reported; the record has None
        print(f"memory_analysis failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None

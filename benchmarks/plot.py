"""Draw PNGs from the benchmark records: time against size per implementation, with the roofline as a line.

    python benchmarks/plot.py [--records FILE ...] [--out benchmarks/results] [--stat min]

Reads the CPU and GPU records by default (``results/records.jsonl``, ``results/gpu_harness_records.jsonl``; one
schema, ``--records`` repeats). Devices are never mixed in one line: one PNG per device and op
(``<op>_<device>.png``), a grid with one column per backend and one row per (mode, dtype); sizes run along x in
order of N*C (evenly spaced), time on a log scale; every implementation is a line (stable ones solid, built-ins
dashed), and the black line is that device's roofline, the bytes the op must move divided by the copy bandwidth
measured in the same run. Plus ``headline_<device>.png``: sparse softmax CE, float32, forward+backward, one
panel per backend; and, when the records hold more than one device, ``headline_devices.png``: the same op,
forward+backward, one panel per (dtype, backend), one line style per device (named in the legend) and each
device's own roofline. A record without the asked statistic (converted from an older script that kept
percentiles) is drawn at its median, and the title says so. The latest record of each measurement is used.
Needs matplotlib (``pip install matplotlib``).
"""

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _standalone  # noqa: E402,F401  (puts the package on the path: the installed one, else this checkout)
from keras_stable_heads.bench import report  # noqa: E402  (loading and de-duplicating records)

DEFAULT_RECORDS = report.DEFAULT_RECORDS
BACKENDS = ("tensorflow", "jax", "torch")
DEVICE_STYLES = ("-", "--", ":", "-.")


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower()


def _timed(records, stat):
    """The latest timed records, each with ``_t`` (the time drawn) and ``_stat`` (the statistic it is)."""
    timed = []
    for r in report.latest(records):
        value, used = report.stat_value(r, stat)
        if r["case"] == "random" and not r.get("skipped") and value is not None:
            timed.append({**r, "_t": value, "_stat": used})
    return timed


def _stat_note(records, stat):
    used = {r["_stat"] for r in records}
    note = f"{stat} of the timed calls"
    return note if used <= {stat} else f"{note}; median if none"


def _roofline(group):
    """{shape: ms} at the device's measured copy bandwidth."""
    roof = {}
    for r in group:
        if r.get("roofline_gbs") and r.get("bytes"):
            roof[tuple(r["shape"])] = r["bytes"] / (r["roofline_gbs"] * 1e9) * 1e3
    return roof


def _style(implementation, palette):
    if implementation not in palette:
        palette[implementation] = f"C{len(palette) % 10}"
    stable = implementation.startswith("stable/")
    return dict(color=palette[implementation], linestyle="-" if stable else "--", linewidth=2.2 if stable else 1.2,
                marker="o" if stable else ".", markersize=5 if stable else 4)


def _panel(ax, group, stat, palette):
    """One panel: a line per implementation (sizes in order of N*C, evenly spaced), and the roofline."""
    by_impl = {}
    for r in group:
        by_impl.setdefault(r["implementation"], []).append(r)
    shapes = sorted({tuple(r["shape"]) for r in group}, key=lambda s: (s[0] * s[1], s))
    where = {shape: i for i, shape in enumerate(shapes)}
    for implementation in sorted(by_impl, key=lambda name: (not name.startswith("stable/"), name)):
        points = sorted(by_impl[implementation], key=lambda r: where[tuple(r["shape"])])
        ax.plot([where[tuple(r["shape"])] for r in points], [r["_t"] for r in points], label=implementation,
                **_style(implementation, palette))
    roof = _roofline(group)
    if roof:
        xs = sorted(roof, key=lambda s: where[s])
        ax.plot([where[s] for s in xs], [roof[s] for s in xs], color="black", linewidth=1.5,
                label="roofline (bytes / measured copy bandwidth)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{s[0]}x{s[1]}" for s in shapes], rotation=30, ha="right", fontsize=7)
    ax.grid(True, which="major", alpha=0.3)


def _legend(fig, axes):
    """One legend for the whole figure, below the panels (an implementation keeps its colour in every panel)."""
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = sorted(handles, key=lambda name: (name.startswith("roofline"), not name.startswith("stable/"), name))
    columns = min(len(labels), 6 if len(labels) <= 12 else 4)
    rows = -(-len(labels) // max(columns, 1))
    fig.tight_layout(rect=(0, min(0.45, (0.2 * rows + 0.3) / fig.get_figheight()), 1, 1))
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=max(columns, 1),
               fontsize=8, frameon=False)


def plot_op(plt, records, op, device, stat, out):
    rows = sorted({(r["mode"], r["dtype"]) for r in records}, key=lambda md: (md[0] != "forward_backward", md[1]))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in records)]
    fig, axes = plt.subplots(len(rows), len(backends), figsize=(4.6 * len(backends), 3.4 * len(rows)),
                             squeeze=False)
    palette = {}
    for i, (mode, dtype) in enumerate(rows):
        for j, backend in enumerate(backends):
            group = [r for r in records if r["backend"] == backend and r["mode"] == mode and r["dtype"] == dtype]
            ax = axes[i][j]
            if group:
                _panel(ax, group, stat, palette)
            ax.set_title(f"{backend}: {mode.replace('_', '+')}, {dtype}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{stat} time (ms)")
    fig.suptitle(f"{op} on {device} ({_stat_note(records, stat)}; lower is better)", fontsize=11)
    _legend(fig, axes)
    path = os.path.join(out, f"{op}_{slug(device)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_headline(plt, records, device, stat, out, op="sparse_softmax_ce", dtype="float32", mode="forward_backward"):
    chosen = [r for r in records if r["op"] == op and r["dtype"] == dtype and r["mode"] == mode]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in chosen)]
    if not backends:
        return None
    fig, axes = plt.subplots(1, len(backends), figsize=(4.8 * len(backends), 4.0), squeeze=False, sharey=True)
    palette = {}
    for j, backend in enumerate(backends):
        ax = axes[0][j]
        _panel(ax, [r for r in chosen if r["backend"] == backend], stat, palette)
        ax.set_title(backend, fontsize=10)
        if j == 0:
            ax.set_ylabel(f"{stat} time (ms)")
    fig.suptitle(f"{op}, {dtype}, forward+backward, on {device} ({_stat_note(chosen, stat)})",
                 fontsize=11)
    _legend(fig, axes)
    path = os.path.join(out, f"headline_{slug(device)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_devices(plt, records, stat, out, op="sparse_softmax_ce", mode="forward_backward"):
    """Every device in one figure: a panel per (dtype, backend); colour = implementation, line style = device;
    each device's roofline in black in its line style. Sizes are the union of the devices' sizes."""
    chosen = [r for r in records if r["op"] == op and r["mode"] == mode]
    names = report.devices(chosen)
    if len(names) < 2:
        return None
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in chosen)]
    dtypes = sorted({r["dtype"] for r in chosen}, key=lambda d: (d != "float32", d))
    styles = {device: DEVICE_STYLES[i % len(DEVICE_STYLES)] for i, device in enumerate(names)}
    fig, axes = plt.subplots(len(dtypes), len(backends), figsize=(5.6 * len(backends), 4.0 * len(dtypes)),
                             squeeze=False)
    palette = {}
    for i, dtype in enumerate(dtypes):
        for j, backend in enumerate(backends):
            ax = axes[i][j]
            group = [r for r in chosen if r["backend"] == backend and r["dtype"] == dtype]
            shapes = sorted({tuple(r["shape"]) for r in group}, key=lambda s: (s[0] * s[1], s))
            where = {shape: k for k, shape in enumerate(shapes)}
            for device in names:
                on_device = [r for r in group if r.get("device_name") == device]
                by_impl = {}
                for r in on_device:
                    by_impl.setdefault(r["implementation"], []).append(r)
                for implementation in sorted(by_impl, key=lambda n: (not n.startswith("stable/"), n)):
                    points = sorted(by_impl[implementation], key=lambda r: where[tuple(r["shape"])])
                    style = _style(implementation, palette)
                    style["linestyle"] = styles[device]
                    ax.plot([where[tuple(r["shape"])] for r in points], [r["_t"] for r in points],
                            label=f"{implementation} — {device}", **style)
                roof = _roofline(on_device)
                if roof:
                    xs = sorted(roof, key=lambda s: where[s])
                    ax.plot([where[s] for s in xs], [roof[s] for s in xs], color="black", linewidth=1.5,
                            linestyle=styles[device], label=f"roofline — {device}")
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{s[0]}x{s[1]}" for s in shapes], rotation=30, ha="right", fontsize=7)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{backend}: {mode.replace('_', '+')}, {dtype}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{stat} time (ms)")
    fig.suptitle(f"{op} on {' vs '.join(names)} ({_stat_note(chosen, stat)}; line style = device)", fontsize=10)
    _legend(fig, axes)
    path = os.path.join(out, "headline_devices.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", action="append", default=None,
                        help="a records file (repeatable; default: results/records.jsonl and "
                             "results/gpu_harness_records.jsonl)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the PNGs")
    parser.add_argument("--stat", default="min", choices=["min", "median", "max"])
    parser.add_argument("--run-id", help="only this run's records")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    paths = args.records or DEFAULT_RECORDS
    records = _timed(report.load(paths, args.run_id), args.stat)
    if not records:
        print(f"no timed records in {', '.join(paths)}: run `keras-stable-heads bench` first", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    written = []
    for device in sorted({r["device_name"] or "unknown" for r in records}):
        on_device = [r for r in records if (r["device_name"] or "unknown") == device]
        for op in sorted({r["op"] for r in on_device}):
            written.append(plot_op(plt, [r for r in on_device if r["op"] == op], op, device, args.stat, args.out))
        headline = plot_headline(plt, on_device, device, args.stat, args.out)
        if headline:
            written.append(headline)
    both = plot_devices(plt, records, args.stat, args.out)
    if both:
        written.append(both)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

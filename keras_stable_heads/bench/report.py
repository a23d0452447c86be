"""Tables from benchmark records: the stable op against the fastest built-in, and the exactness table.

    python -m keras_stable_heads.bench.report [--records FILE ...] [--run-id ID] [--markdown]

Standard library only (with :mod:`.locations`), so it runs wherever the records are. The default records are the
checkout's CPU file ``benchmarks/results/records.jsonl`` and GPU file ``benchmarks/results/gpu_harness_records.jsonl``
(one schema; ``--records`` repeats), or from an installed package the current folder's records. One section per device. For each backend, op, dtype and size, the *stable* row is the implementation
that ``implementation="auto"`` picks for those inputs (what a user gets), the *built-in* row the fastest of
Keras's loss, ``tf.nn``, ``torch.nn.functional`` and ``optax`` (``+xla`` variants included). Times are the min of
the timed calls by default (``--stat``; the machines these run on are often shared, and the min is the
reproducible one); a record without that statistic (converted from an older script that kept percentiles) shows
its median, marked ``*``. Speed-up is built-in time / stable time; "% roofline" is the stable op's bytes moved
per second over the copy bandwidth measured in the same run.
"""

import argparse
import json
import os
import sys

from . import locations

DEFAULT_RECORDS = locations.committed_records()


def load(paths, run_id=None):
    """The records of one file or a list of files, in order; missing files and lines that are not JSON give none."""
    records = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if run_id is None or record.get("run_id") == run_id:
                        records.append(record)
    return records


def stat_value(r, stat="min"):
    """``(time in ms, statistic used)`` of a record: ``stat``, else its median (a converted record that has no
    min or max), else ``(None, None)``."""
    for name in (stat, "median"):
        value = r.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value, name
    return None, None


def devices(records):
    """The device names in the records, in order of first appearance."""
    return list(dict.fromkeys(r.get("device_name") for r in records))


def latest(records):
    """The latest record per measurement key (later lines win)."""
    table = {}
    for r in records:
        key = (r["backend"], r.get("device_name"), r["op"], r["implementation"], r["dtype"], tuple(r["shape"]),
               r["case"], r["mode"])
        table[key] = r
    return list(table.values())


def _ok(r, stat="min"):
    return not r.get("skipped") and stat_value(r, stat)[0] is not None


def _error(x):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return "0" if x == 0 else f"{x:.0e}"


def speed_rows(records, mode="forward_backward", stat="min"):
    """One row per (backend, device, op, dtype, size): the auto-picked stable op (or its XLA-compiled variant, when
    that is faster) and the fastest built-in (any variant)."""
    groups = {}
    for r in latest(records):
        if r["case"] != "random" or r["mode"] != mode or not _ok(r, stat):
            continue
        key = (r["backend"], r["device_name"], r["op"], r["dtype"], tuple(r["shape"]))
        groups.setdefault(key, []).append(r)
    rows = []
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2], kv[0][3],
                                                               kv[0][4][0] * kv[0][4][1], kv[0][4])):
        stable = [r for r in group if r["family"] == "stable"]
        builtin = [r for r in group if r["family"] == "builtin"]
        if not stable or not builtin:
            continue

        def t(r):
            return stat_value(r, stat)[0]

        auto = stable[0].get("auto_choice")
        picked = [r for r in stable if r["implementation"] == f"stable/{auto}"]
        ours = picked[0] if picked else min(stable, key=t)
        # Inside an XLA-compiled function (TensorFlow's jit_compile) the dispatcher always takes the portable path,
        # so when the built-in side includes its XLA-compiled variants, so does the stable side.
        compiled = [r for r in stable if r["implementation"].endswith("+xla")]
        if compiled and t(min(compiled, key=t)) < t(ours):
            ours = min(compiled, key=t)
        best_stable = min(stable, key=t)
        theirs = min(builtin, key=t)
        roofline = ours.get("roofline_gbs")
        fraction = ours["bytes"] / (t(ours) * 1e-3) / (roofline * 1e9) if roofline and ours.get("bytes") else None
        rows.append(dict(backend=key[0], device=key[1], op=key[2], dtype=key[3], shape=key[4], stable=ours,
                         best_stable=best_stable, builtin=theirs, speedup=t(theirs) / t(ours),
                         fraction=fraction, stat=stat))
    return rows


def _size(shape):
    return f"{shape[0]}x{shape[1]}"


def _table(header, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in body])


def _ms(r, stat, marker="*"):
    value, used = stat_value(r, stat)
    return f"{value:.3g}" + ("" if used == stat else marker)


def format_speed(records, mode="forward_backward", markdown=False, stat="min"):
    """The speed table; a device column when the records come from more than one device."""
    several = len(devices(records)) > 1
    header = ["backend", *(["device"] if several else []), "op", "dtype", "size", "stable (auto)", "ms",
              "fastest built-in", "ms", "speed-up", "% roofline", "loss err stable / built-in"]
    body = []
    fell_back = False
    marker = "\\*" if markdown else "*"
    for row in speed_rows(records, mode, stat):
        s, b = row["stable"], row["builtin"]
        fraction = row["fraction"]
        cells = [_ms(s, stat, marker), _ms(b, stat, marker)]
        fell_back = fell_back or any(cell.endswith("*") for cell in cells)
        body.append([row["backend"], *([row["device"] or "?"] if several else []), row["op"], row["dtype"],
                     _size(row["shape"]), s["implementation"].removeprefix("stable/"), cells[0],
                     b["implementation"], cells[1], f"{row['speedup']:.2f}x",
                     "—" if fraction is None else f"{100 * fraction:.0f}%",
                     f"{_error(s.get('loss_error'))} / {_error(b.get('loss_error'))}"])
    if not body:
        return f"(no {mode} timings)"
    table = _table(header, body, markdown)
    if fell_back:
        table += (f"\n\n{marker} median: the record has no {stat} (converted from a script that kept percentiles; "
                  "see its `source`)")
    return table


def format_exactness(records, markdown=False):
    """Errors on the extreme-logit case, one row per backend/op/dtype, one column per implementation."""
    cells = {}
    impls = []
    several = len(devices(records)) > 1
    for r in latest(records):
        if r["case"] != "extreme":
            continue
        key = (r["backend"], *([r.get("device_name") or "?"] if several else []), r["op"], r["dtype"])
        if r.get("skipped"):
            continue
        text = f"{_error(r.get('loss_error'))} / {_error(r.get('grad_error'))}"
        cells.setdefault(key, {})[r["implementation"]] = text
        if r["implementation"] not in impls:
            impls.append(r["implementation"])
    if not cells:
        return "(no exactness records)"
    impls.sort(key=lambda name: (not name.startswith("stable"), name))
    header = ["backend", *(["device"] if several else []), "op", "dtype", *impls]
    body = [[*key, *(cells[key].get(name, "—") for name in impls)] for key in sorted(cells)]
    return _table(header, body, markdown)


def context_lines(records):
    """Where the numbers came from: devices, bandwidth, versions, commit, time."""
    seen = {}
    for r in records:
        seen.setdefault((r["backend"], r.get("device_name")), r)
    lines = []
    for (backend, device), r in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        bw = r.get("bandwidth") or {}
        versions = r.get("versions") or {}
        parts = [f"{backend} on {device}"]
        if bw.get("copy_1t_gbs"):
            parts.append(f"copy {bw['copy_1t_gbs']:.0f} GB/s (1 thread), "
                         f"{bw.get('copy_threads_gbs') or 0:.0f} GB/s ({bw.get('threads')} threads)")
        if bw.get("device_copy_gbs"):
            parts.append(f"device copy {bw['device_copy_gbs']:.0f} GB/s")
        parts.append(", ".join(f"{k} {v}" for k, v in versions.items() if v))
        parts.append(f"commit {r.get('commit')}{'+dirty' if r.get('dirty') else ''}, {r.get('timestamp')}")
        source = r.get("source")
        if source:
            parts.append(f"converted from {source.get('file')} ({source.get('script')})" if isinstance(source, dict)
                         else f"source: {source}")
        lines.append("; ".join(parts))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", action="append", default=None,
                        help="a records file (repeatable; default: the checkout's benchmarks/results/records.jsonl and "
                             "gpu_harness_records.jsonl)")
    parser.add_argument("--run-id", help="only this run's records (default: the latest record of each measurement)")
    parser.add_argument("--mode", default="forward_backward", choices=["forward", "forward_backward"])
    parser.add_argument("--stat", default="min", choices=["min", "median", "max"])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    paths = args.records or DEFAULT_RECORDS
    records = load(paths, args.run_id)
    if not records:
        print(f"no records in {', '.join(paths)}", file=sys.stderr)
        return 1
    for device in devices(records):
        on_device = [r for r in records if r.get("device_name") == device]
        print(("### " if args.markdown else "=== ") + f"{device}\n")
        print(format_speed(on_device, args.mode, args.markdown, args.stat))
        print()
        print("Exactness on extreme logits (loss error / gradient error against float64):")
        print(format_exactness(on_device, args.markdown))
        print()
        for line in context_lines(on_device):
            print(("- " if args.markdown else "") + line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

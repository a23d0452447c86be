"""Bring a GPU run's files (``benchmarks/gpu_run.sh`` under ``$OUT``) into ``benchmarks/results/``.

    python benchmarks/gpu_collect.py DIR      # DIR: the folder the device tool's reply names (files_at)

- ``records.jsonl`` is appended to ``results/gpu_harness_records.jsonl`` (runs already there are skipped), so
  ``report.py`` and ``plot.py`` read it with the CPU records;
- ``profile.json``, ``ncu.txt``, ``summary.txt`` and ``run.log`` are copied to ``results/gpu_profile_<device>.json``,
  ``gpu_ncu_<device>.txt``, ``gpu_summary_<device>.txt`` and ``gpu_log_<device>.txt`` (a later run on the same
  card replaces them; the records keep every run).
Then redraw the PNGs (``python benchmarks/plot.py``) and commit the files it names.
"""

import argparse
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _standalone  # noqa: E402

harness = _standalone.harness()

RESULTS = os.path.join(HERE, "results")
GPU_RECORDS = os.path.join(RESULTS, "gpu_harness_records.jsonl")
COPIES = {"profile.json": "gpu_profile_{}.json", "ncu.txt": "gpu_ncu_{}.txt", "summary.txt": "gpu_summary_{}.txt",
          "run.log": "gpu_log_{}.txt"}


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower()


def collect(folder, results=RESULTS):
    """Append the run's records, copy its other files; returns the paths written."""
    written = []
    records = harness.load_records(os.path.join(folder, "records.jsonl"))
    device = next((r["device_name"] for r in records if r.get("device") == "gpu"), None)
    if device is None and os.path.exists(os.path.join(folder, "profile.json")):
        with open(os.path.join(folder, "profile.json")) as f:
            device = json.load(f).get("device")
    target = os.path.join(results, os.path.basename(GPU_RECORDS))
    known = {r.get("run_id") for r in harness.load_records(target)}
    new = [r for r in records if r.get("run_id") not in known]
    if new:
        harness.append_records(target, new)
        written.append(target)
    print(f"{len(new)} records appended to {target} ({len(records) - len(new)} were there already)")
    for name, pattern in COPIES.items():
        source = os.path.join(folder, name)
        if os.path.exists(source):
            destination = os.path.join(results, pattern.format(slug(device)))
            shutil.copyfile(source, destination)
            written.append(destination)
            print(f"{source} -> {destination}")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--results", default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"no folder {args.folder}", file=sys.stderr)
        return 1
    collect(args.folder, args.results)
    print("next: python benchmarks/plot.py && git add the files above and the PNGs it prints")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where benchmark records live (standard library only, so every benchmark script can use it).

From a source checkout (the package's parent folder has ``benchmarks/results/``) records go to that folder, with
the committed ones; from an installed package, to the current folder.
"""

import os

_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the source checkout this package runs from, or None for an installed package
CHECKOUT = _PARENT if os.path.isdir(os.path.join(_PARENT, "benchmarks", "results")) else None
#: the committed results of the checkout, or None
RESULTS = os.path.join(CHECKOUT, "benchmarks", "results") if CHECKOUT else None
INSTALLED_RECORDS = "keras-stable-heads-bench.jsonl"


def default_records():
    """The records file a run appends to when ``--out`` is not given."""
    if RESULTS:
        return os.path.join(RESULTS, "records.jsonl")
    return os.path.abspath(INSTALLED_RECORDS)


def committed_records():
    """The records files the report and the plots read by default: the checkout's CPU and GPU records, or, from
    an installed package, the current folder's records file."""
    if RESULTS:
        return [os.path.join(RESULTS, "records.jsonl"), os.path.join(RESULTS, "gpu_harness_records.jsonl")]
    return [os.path.abspath(INSTALLED_RECORDS)]

"""The one benchmark harness: timing, the roofline, peak memory, the record schema, and the run's context.

Nothing here knows about losses or Keras backends: :func:`measure` times any callable (wall time, each call
followed by the device synchronisation it is given), :func:`stats_of` turns times measured otherwise (CUDA
events) into the same statistics, :func:`bytes_moved` is the traffic model, :func:`host_bandwidth` measures the
machine's copy bandwidth in the same run, :class:`Deadline` is a run's time budget, and :func:`make_record`
builds the one long-form record that every run appends to a records file (``results/records.jsonl`` on CPU,
``results/gpu_harness_records.jsonl`` on GPU: the same schema, the device's name in every record).
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as np

SCHEMA_VERSION = 2

# The record schema: one JSON object per line, one line per (op, implementation, backend, device, dtype, shape,
# case, mode). Timings are in ``unit`` (milliseconds); an error that is not finite is written as the string
# "nan" or "inf" (JSON has no NaN); a measurement that could not run has ``skipped`` set to the reason and no stats.
# Schema 2 = schema 1 plus ``source``; a schema-1 record reads as one with ``source`` None (readers use .get).
FIELDS = (
    "schema",            # SCHEMA_VERSION
    "run_id",            # one id per `keras-stable-heads bench` invocation (shared by its per-backend processes)
    "timestamp",         # UTC, ISO 8601
    "commit",            # `git rev-parse --short HEAD`, or None outside a git checkout
    "dirty",             # the checkout had uncommitted changes to tracked files (None if unknown)
    "op",                # sparse_softmax_ce | softmax_ce | sigmoid_ce (the dispatcher's op names)
    "implementation",    # stable/<dispatch implementation>[+xla] | keras[+xla] | tf.nn[+xla] | torch.F | optax | keras(probs)
    "family",            # "stable" (this package) or "builtin"
    "backend",           # the Keras backend of the process (tensorflow | jax | torch)
    "device",            # "cpu" or "gpu"
    "device_name",       # the CPU model and core count, or the GPU's name
    "dtype",             # logits dtype: float32 | bfloat16
    "shape",             # [N, C]
    "case",              # "random" (N(0, 3) logits) or "extreme" (see suite.py)
    "mode",              # forward | forward_backward | exactness (errors only, no timing)
    "unit",              # "ms"
    "min", "median", "max",  # statistics over `reps` timed calls, in `unit`
    "reps", "warmup",
    "bytes",             # bytes the op must move (bytes_moved)
    "bandwidth_gbs",     # bytes / min time (the best achieved; on a shared machine the median carries the noise)
    "roofline_gbs",      # the measured copy bandwidth used as the roofline (see `bandwidth`)
    "bandwidth_fraction",  # bandwidth_gbs / roofline_gbs
    "loss_error",        # max_i |loss_i - ref_i| / max(1, |ref_i|) against the float64 reference
    "grad_error",        # max |grad - ref| / max |ref| (gradient of the summed loss w.r.t. the logits)
    "error_rows",        # the errors are over the first `error_rows` rows of the same inputs
    "peak_rss_mib",      # peak resident memory of the process during this measurement (inputs included)
    "peak_device_mib",   # peak GPU memory (torch: during this measurement; jax: of the process so far)
    "auto_choice",       # for stable ops: what implementation="auto" picks for these inputs
    "skipped",           # None, or why this implementation could not run here
    "bandwidth",         # {copy_1t_gbs, copy_threads_gbs, threads, device_copy_gbs}: measured in this run
    "hardware",          # {cpu, cores, memory_gib, gpu}
    "load_average",      # the machine's 1/5/15-minute load average when the run started (a shared box is noisy)
    "versions",          # {python, numpy, keras, numba, <framework>...}
    "source",            # None: measured by this harness. Else where a converted record came from (a dict:
                         # the original file and script, its own statistics; see gpu_convert.py)
)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stats:
    """Statistics of the timed calls, in seconds."""

    min: float
    median: float
    max: float
    reps: int
    warmup: int

    def as_ms(self):
        return {"min": self.min * 1e3, "median": self.median * 1e3, "max": self.max * 1e3, "unit": "ms",
                "reps": self.reps, "warmup": self.warmup}


def stats_of(times_s, warmup):
    """:class:`Stats` of timed calls given in seconds (for times measured otherwise, e.g. with CUDA events)."""
    times = list(times_s)
    if not times:
        raise ValueError("no timed calls")
    return Stats(min(times), statistics.median(times), max(times), len(times), warmup)


def measure(fn, *, warmup=2, reps=10, sync=None, budget_s=None, min_reps=3):
    """Time ``fn()``: ``warmup`` untimed calls (compilation happens there), then up to ``reps`` timed calls.

    Each call is followed by ``sync(result)`` inside the timed region (block until a device has finished), so a
    timing is the wall time of the whole computation. With ``budget_s``, timing stops once that many seconds
    have been spent on timed calls and at least ``min_reps`` calls were made (fewer repetitions for huge sizes).
    Returns ``(Stats, result of the last call)``.
    """
    sync = sync or (lambda result: None)
    result = None
    for _ in range(warmup):
        result = fn()
        sync(result)
        result = None
    times = []
    spent = 0.0
    while len(times) < max(reps, 1):
        result = None
        start = time.perf_counter()
        result = fn()
        sync(result)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if budget_s is not None and spent >= budget_s and len(times) >= min_reps:
            break
    return stats_of(times, warmup), result


class Deadline:
    """A run's time budget: ``Deadline(seconds)`` (None: no limit), or ``Deadline(at=epoch_seconds)`` to share one
    deadline across processes (``bench --budget-s`` hands its children the absolute time)."""

    def __init__(self, seconds=None, *, at=None):
        self.at = at if at is not None else (None if seconds is None else time.time() + seconds)

    def left(self):
        """Seconds left (inf without a limit)."""
        return float("inf") if self.at is None else self.at - time.time()

    def passed(self):
        return self.left() <= 0


# ----------------------------------------------------------------------------------------------------------------
# The roofline
# ----------------------------------------------------------------------------------------------------------------


def bytes_moved(op, mode, n, c, itemsize):
    """Bytes the op must move at the least, for ``N x C`` logits of ``itemsize`` bytes.

    Forward: one read of the logits (and of the labels when they are ``N x C``: dense softmax and sigmoid ops).
    Forward + backward: the forward's reads, the backward's second read of the same inputs, and one write of the
    gradient (a split forward/backward design; a one-pass fused kernel could do with fewer, and would then exceed
    a fraction of 1). Per-row vectors (integer labels, loss, log-sum-exp) are negligible and not counted.
    For float32 sparse softmax CE: ``4 N C`` forward, ``12 N C`` forward + backward.
    """
    logits = n * c * itemsize
    inputs = logits if op == "sparse_softmax_ce" else 2 * logits
    if mode == "forward":
        return inputs
    if mode == "forward_backward":
        return 2 * inputs + logits
    raise ValueError(f"no traffic model for mode {mode!r}")


try:
    import numba
except ImportError:  # the 1-thread copy is still measured
    numba = None
else:
    @numba.njit(parallel=True, cache=True)
    def _parallel_copy(src, dst):
        for i in numba.prange(src.size):
            dst[i] = src[i]


def host_bandwidth(nbytes=512 << 20, reps=5):
    """Copy bandwidth of host memory (bytes read + written per second, best of ``reps``), in GB/s.

    ``copy_1t_gbs``: ``np.copyto`` (one thread). ``copy_threads_gbs``: a Numba ``prange`` copy on all of Numba's
    threads (``threads``), the roofline for the Numba kernels, which use the same threads. Buffers are touched
    before timing (a first write page-faults).
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    result = {}
    stats, _ = measure(lambda: np.copyto(dst, src), warmup=1, reps=reps)
    result["copy_1t_gbs"] = 2 * src.nbytes / stats.min / 1e9
    if numba is None:
        result["copy_threads_gbs"], result["threads"] = None, None
        return result
    stats, _ = measure(lambda: _parallel_copy(src, dst), warmup=1, reps=reps)
    result["copy_threads_gbs"] = 2 * src.nbytes / stats.min / 1e9
    result["threads"] = int(numba.get_num_threads())
    return result


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of the process
# ----------------------------------------------------------------------------------------------------------------


def reset_peak_rss():
    """Reset the process's peak resident set (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib():
    """Peak resident memory (``VmHWM``) in MiB since the last :func:`reset_peak_rss`, else of the process."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib():
    """Resident memory (``VmRSS``) in MiB now, or None where /proc is not there."""
    return _proc_status_mib("VmRSS")


# ----------------------------------------------------------------------------------------------------------------
# Context of a run: hardware, versions, commit, time
# ----------------------------------------------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hardware(gpu=None):
    memory = memory_bytes()
    return {"cpu": cpu_model(), "cores": cpu_count(),
            "memory_gib": None if memory is None else round(memory / 2**30, 1), "gpu": gpu}


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


COMMIT_ENV = "KSH_BENCH_COMMIT"


def git_commit(root):
    """``(short commit, dirty)`` of the checkout at ``root``. Outside git or without git (a copy of the working
    tree on a GPU machine): ``($KSH_BENCH_COMMIT, None)``, which ``gpu_run.sh`` sets from ``.whl/SOURCE_COMMIT``."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
    fallback = os.environ.get(COMMIT_ENV) or None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, env=env, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return fallback
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return fallback


def source_commit():
    """``(commit, dirty)`` of what runs: the source checkout's git commit (see :func:`git_commit`), or for an
    installed package ``($KSH_BENCH_COMMIT or "keras-stable-heads <version>", None)``."""
    from . import locations

    if locations.CHECKOUT:
        return git_commit(locations.CHECKOUT)
    from importlib import metadata

    try:
        installed = f"keras-stable-heads {metadata.version('keras-stable-heads')}"
    except metadata.PackageNotFoundError:
        installed = None
    return os.environ.get(COMMIT_ENV) or installed, None


def backend_env(backend):
    """The environment for a child process on another Keras backend (Keras fixes its backend per process), with
    this package's parent folder first on the path (so a checkout that is not installed works too)."""
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [parent, env.get("PYTHONPATH")]))
    return env


def versions(*distributions):
    """Versions of Python, NumPy, Keras, Numba and the named distributions that are installed (none imported)."""
    from importlib import metadata

    result = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("keras", "numba", "numba-cuda", *distributions):
        try:
            result[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return result


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------


def json_number(x):
    """A float for JSON: finite values as they are, NaN and infinities as the strings "nan", "inf", "-inf"."""
    if x is None:
        return None
    x = float(x)
    if np.isfinite(x):
        return x
    return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")


def make_record(**fields):
    """One record of the schema (:data:`FIELDS`): every field present (unset ones None), no unknown field."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fields not in the record schema: {sorted(unknown)}")
    record = {name: fields.get(name) for name in FIELDS}
    record["schema"] = SCHEMA_VERSION
    return record


def append_records(path, records):
    """Append records as JSON Lines (one object per line) to ``path``, creating its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")


def load_run(path, run_id=None):
    """The records of run ``run_id`` in ``path``, or of the last run there (the run of its last record)."""
    records = load_records(path)
    run_id = run_id or (records[-1].get("run_id") if records else None)
    return [r for r in records if r.get("run_id") == run_id]


def load_records(path, run_id=None):
    """The records in ``path`` (all, or those of one ``run_id``); lines that are not JSON are skipped.
    ``path`` may be a list of files (read in order; missing files give no records). The reader itself lives in
    report.py, which must stay standard-library only."""
    try:
        from . import report
    except ImportError:  # imported as a top-level module by the scripts that put benchmarks/ on sys.path
        import report
    return report.load(path, run_id)

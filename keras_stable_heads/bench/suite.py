"""The benchmark plan and its loop, for one Keras backend (one process): timings, roofline, exactness.

For every (op, size, dtype): the same seeded inputs go to every candidate of :mod:`baselines`; each is timed in
``forward`` and ``forward_backward`` mode with :func:`harness.measure`, and its loss and gradient on those same
inputs are compared with the float64 references of :mod:`keras_stable_heads.reference` (the tests' own).
An ``extreme`` case (exactness only) adds logits of scale 1e4 and, for the softmax ops, one masked (``-inf``)
class per row, plus Keras's loss applied to probabilities (the clipped way) for contrast.

Plans: :func:`quick_plan` and :func:`full_plan` (sized for a 2-core CPU) and :func:`gpu_plan` (the GPU sizes of
issues 5 and 6, largest first, then a float32 sweep of small sizes for the dispatcher's thresholds). A plan runs
on whatever device the backend computes on: the same code measures a CPU and a GPU, with the device's own
synchronisation, peak memory and copy bandwidth (:mod:`baselines`). A :class:`harness.Deadline` bounds a run:
what is left when it passes is recorded as skipped ("time budget spent"), never lost silently.
"""

import dataclasses
import gc
import os
import sys
import time
import traceback

import numpy as np

from .. import reference
from . import baselines
from . import harness

MODES = ("forward", "forward_backward")
DTYPES = ("float32", "bfloat16")
HEADLINE_SIZES = ((256, 10), (65536, 10), (8192, 1000), (4096, 32000))
LARGE_CLASSES = 131072
# The errors are computed on the first rows of the inputs, at most this many logits (rows are independent).
ERROR_ELEMENTS = 1 << 22
EXTREME_SIZE = (1024, 1000)
# In the full plan, bfloat16 and forward-only timings up to this many logits (8192x1000); beyond, float32 fwd+bwd.
FULL_LOW_PRECISION_MAX = 8192 * 1000
# From this many bytes of logits on, one warm-up call and 3 timed calls; from HUGE_BYTES on, 2 timed calls.
LARGE_BYTES = 256 << 20
HUGE_BYTES = 1 << 30
# Logits larger than this are a seeded block of TILE_BYTES repeated along the rows (labels stay independent):
# drawing 2^31 normal floats on one host thread takes tens of seconds, and rows are independent, so neither the
# timings nor the exactness (on the first rows, which are the block's) change.
TILE_ABOVE_BYTES = 1 << 30
TILE_BYTES = 256 << 20
# The GPU plan: the sizes of issues 5 and 6 (a language-model head: 32000 and 131072 classes), largest first, and
# small float32 forward+backward sizes after them for the dispatcher's GPU thresholds.
GPU_SIZES = ((16384, 131072), (8192, 32000))
GPU_SWEEP_SIZES = ((512, 10), (4096, 100), (2048, 1000), (4096, 8192))
SKIPPED_FOR_TIME = "time budget spent"


def large_case_rows(classes=LARGE_CLASSES, memory=None, headroom=16):
    """Rows for the 128k-class case on this machine: the largest power of two whose float32 logits, times
    ``headroom`` (gradient, the built-ins' N x C temporaries, labels, the framework's copies), fit in memory."""
    memory = memory or harness.memory_bytes() or (8 << 30)
    rows = 1
    while 2 * rows * classes * 4 * headroom <= memory:
        rows *= 2
    return rows


def parse_sizes(text):
    """``"256x10,8192x1000,128k"`` -> ``((256, 10), (8192, 1000), (rows, 131072))``; "128k" is sized to memory."""
    sizes = []
    for token in text.split(","):
        token = token.strip().lower()
        if not token:
            continue
        if token in ("128k", "131072"):
            sizes.append((large_case_rows(), LARGE_CLASSES))
            continue
        try:
            n, c = (int(part) for part in token.split("x"))
        except ValueError:
            raise ValueError(f"a size is NxC (e.g. 8192x1000) or 128k, got {token!r}") from None
        if n < 1 or c < 1:
            raise ValueError(f"sizes must be positive, got {token!r}")
        sizes.append((n, c))
    if not sizes:
        raise ValueError("no sizes given")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures (per backend)."""

    ops: tuple
    sizes: dict            # op -> ((N, C), ...)
    dtypes: tuple
    modes: tuple
    extreme: bool          # also the extreme-logit exactness case
    reps: int              # at most this many timed calls per measurement...
    budget_s: float        # ...and stop once this many seconds were timed (at least 3 calls)
    include: tuple = None  # implementation-name prefixes to keep (None: all)
    extreme_size: tuple = EXTREME_SIZE
    low_precision_max_elements: int = None  # bfloat16 only up to this many logits (None: every size)
    extreme_dtypes: tuple = ("float32",)
    low_precision_ops: tuple = None  # bfloat16 only for these ops (None: every op)
    forward_max_elements: int = None  # forward-only timing up to this many logits (None: every size)
    size_order: str = "ascending"  # or "descending": the largest (the headline) first, when a budget may run out
    sweep_sizes: tuple = ()  # after the sizes: float32, forward+backward only, every op of the plan
    shrink_large: bool = True  # fewer calls from LARGE_BYTES / HUGE_BYTES of logits on (seconds per call on a CPU)

    def with_overrides(self, ops=None, sizes=None, dtypes=None, modes=None, include=None, reps=None,
                       extreme_size=None):
        ops = tuple(ops) if ops else self.ops
        table = {op: tuple(sizes) if sizes else self.sizes.get(op, HEADLINE_SIZES) for op in ops}
        # Sizes or dtypes asked for explicitly are run in every asked dtype.
        explicit = bool(sizes or dtypes)
        limit = None if explicit else self.low_precision_max_elements
        extreme_dtypes = tuple(dtypes) if dtypes else self.extreme_dtypes
        return dataclasses.replace(self, low_precision_max_elements=limit, extreme_dtypes=extreme_dtypes,
                                   forward_max_elements=None if (explicit or modes) else self.forward_max_elements,
                                   sweep_sizes=() if (sizes or (dtypes and "float32" not in dtypes)
                                                      or (modes and "forward_backward" not in modes))
                                   else self.sweep_sizes,
                                   low_precision_ops=None if explicit else self.low_precision_ops, ops=ops, sizes=table, dtypes=tuple(dtypes) if dtypes else self.dtypes,
                                   modes=tuple(modes) if modes else self.modes,
                                   include=tuple(include) if include else self.include, reps=reps or self.reps,
                                   extreme_size=tuple(extreme_size) if extreme_size else self.extreme_size)


def quick_plan():
    """About a minute per backend on a 2-core CPU: sparse softmax CE, float32, forward+backward, headline sizes."""
    return Plan(ops=("sparse_softmax_ce",), sizes={"sparse_softmax_ce": HEADLINE_SIZES}, dtypes=("float32",),
                modes=("forward_backward",), extreme=True, reps=10, budget_s=0.4)


def full_plan():
    """Everything: the three ops with kernels, forward and forward+backward, float32 and bfloat16.

    Sparse softmax CE (the language-model head) goes from 256x10 to 8192x32000 and a 128k-class case sized to
    memory, in bfloat16 up to ``FULL_LOW_PRECISION_MAX`` logits, forward-only timings up to the same size
    (beyond it only forward+backward, the training step); the dense softmax and sigmoid ops (same kernels'
    traffic) stop at 8192x1000, float32. Sized for about 10 minutes on a quiet 2-core CPU for the three
    backends: ``--sizes`` / ``--dtypes`` / ``--modes`` run what is asked in every asked dtype and mode.
    """
    big = HEADLINE_SIZES + ((8192, 32000), (large_case_rows(), LARGE_CLASSES))
    small = HEADLINE_SIZES[:3]
    return Plan(ops=baselines.OPS, sizes={"sparse_softmax_ce": big, "softmax_ce": small, "sigmoid_ce": small},
                dtypes=DTYPES, modes=MODES, extreme=True, reps=10, budget_s=0.3,
                low_precision_max_elements=FULL_LOW_PRECISION_MAX, low_precision_ops=("sparse_softmax_ce",),
                forward_max_elements=FULL_LOW_PRECISION_MAX)


def gpu_plan():
    """A GPU (the JAX and PyTorch backends): sparse softmax CE at 16384x131072 and 8192x32000, float32 and
    bfloat16, forward and forward+backward, largest first, then the float32 forward+backward sweep
    ``GPU_SWEEP_SIZES``; the extreme-logit exactness case on the GPU too. Each implementation the dispatcher can
    choose there (portable, numba_cuda), Keras's built-in, torch F.cross_entropy or optax. A few minutes per
    backend on an H100/H200, most of it compilation and input transfer; ``--budget-s`` bounds it."""
    return Plan(ops=("sparse_softmax_ce",), sizes={"sparse_softmax_ce": GPU_SIZES}, dtypes=DTYPES, modes=MODES,
                extreme=True, reps=10, budget_s=0.5, size_order="descending", sweep_sizes=GPU_SWEEP_SIZES,
                shrink_large=False)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and references
# ----------------------------------------------------------------------------------------------------------------


def make_inputs(op, n, c, case, seed=0):
    """Seeded float32 logits and labels (int ids for sparse softmax, one-hot / 0-1 floats otherwise)."""
    rng = np.random.default_rng(seed)
    scale = 3.0 if case == "random" else 1e4
    block = n if n * c * 4 <= TILE_ABOVE_BYTES else max(1, TILE_BYTES // (4 * c))
    logits = rng.standard_normal((block, c), dtype=np.float32)
    logits *= np.float32(scale)
    if block < n:  # see TILE_ABOVE_BYTES
        logits = np.tile(logits, (-(-n // block), 1))[:n]
    ids = rng.integers(0, c, n)
    if case == "extreme" and op != "sigmoid_ce" and c > 1:
        # One masked class per row, never the label: probability 0, and no target mass there.
        masked = (ids + 1 + rng.integers(0, c - 1, n)) % c
        logits[np.arange(n), masked] = -np.inf
    if op == "sparse_softmax_ce":
        labels = ids.astype(np.int32)
    elif op == "softmax_ce":
        labels = np.zeros((n, c), np.float32)
        labels[np.arange(n), ids] = 1.0
    else:
        labels = rng.integers(0, 2, (n, c)).astype(np.float32)
    return logits, labels


def rounded(array, dtype):
    """``array`` rounded to ``dtype`` and back to float32: the values a ``dtype`` tensor actually holds."""
    if dtype == "float32":
        return array
    import ml_dtypes

    return array.astype(getattr(ml_dtypes, dtype)).astype(np.float32)


def reference_loss_and_grad(reference, op, logits, labels):
    """Float64 per-example loss and gradient of the summed loss, from the references' own building blocks."""
    z = np.asarray(logits, np.float64)
    if op == "sigmoid_ce":
        y = np.asarray(labels, np.float64)
        loss = reference.binary_ce(z, y)
        # d/dz mean_c softplus terms = (sigmoid(z) - y) / C, with sigmoid = exp(log_sigmoid)
        return loss, (np.exp(reference.log_sigmoid(z)) - y) / z.shape[-1]
    log_p, _ = reference.log_softmax(z)
    p = np.exp(log_p)
    if op == "sparse_softmax_ce":
        # reference.sparse_softmax_ce indexes np.eye(C) (C x C floats: 128 GiB at 131072 classes), so the one-hot
        # rows are built here and given to reference.softmax_ce (integer labels == one-hot is tested in tests/).
        rows = np.arange(z.shape[0])
        one_hot = np.zeros_like(z)
        one_hot[rows, np.asarray(labels, np.int64)] = 1.0
        loss = reference.softmax_ce(z, one_hot)
        p[rows, np.asarray(labels, np.int64)] -= 1.0
        return loss, p
    y = np.asarray(labels, np.float64)
    return reference.softmax_ce(z, y), p * y.sum(-1, keepdims=True) - y


def loss_error(got, want):
    """max_i |got_i - want_i| / max(1, |want_i|); equal infinities count as exact; NaN if any NaN appears."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - want)
        err = np.where(got == want, 0.0, np.where(np.isfinite(want), diff / np.maximum(1.0, np.abs(want)), np.inf))
    if np.isnan(err).any() or np.isnan(got).any():
        return float("nan")
    return float(err.max()) if err.size else 0.0


def grad_error(got, want):
    """max |got - want| / max |want|; NaN if any NaN appears."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if np.isnan(got).any():
        return float("nan")
    with np.errstate(invalid="ignore"):
        diff = np.where(got == want, 0.0, np.abs(got - want))
    scale = np.max(np.abs(want)) if want.size else 1.0
    return float(diff.max() / (scale if scale > 0 else 1.0)) if diff.size else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


class Runner:
    """Runs a :class:`Plan` on the current Keras backend and returns the records."""

    def __init__(self, plan, *, run_id, progress=None, log=None, bandwidth_bytes=512 << 20, deadline=None):
        import keras

        self.plan = plan
        self.run_id = run_id
        self.backend = keras.backend.backend()
        self.progress = progress or (lambda done, total, label: None)
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.fw = baselines.framework(self.backend)
        self.reference = reference
        self.done = 0
        self.total = 0
        self.context = None
        self.bandwidth_bytes = bandwidth_bytes
        self.deadline = deadline or harness.Deadline()
        self._blocked = set()

    # -- context, measured once per process ---------------------------------------------------------------------

    def measure_context(self):
        bandwidth = harness.host_bandwidth(self.bandwidth_bytes)
        bandwidth["device_copy_gbs"] = self.fw.device_copy_gbs(max(self.bandwidth_bytes, 1 << 30))
        commit, dirty = harness.source_commit()
        cpu = f"{harness.cpu_model()} ({harness.cpu_count()} cores)"
        device_name = self.fw.device_name if self.fw.device == "gpu" else cpu
        roofline = bandwidth["device_copy_gbs"] if self.fw.device == "gpu" else bandwidth["copy_threads_gbs"]
        self.context = dict(
            run_id=self.run_id, timestamp=harness.utc_now(), commit=commit, dirty=dirty, backend=self.backend,
            device=self.fw.device, device_name=device_name, roofline_gbs=roofline, bandwidth=bandwidth,
            hardware=harness.hardware(self.fw.device_name), load_average=harness.load_average(), versions=harness.versions(*self.fw.framework_versions()),
        )
        return self.context

    # -- counting, for the progress bar -------------------------------------------------------------------------

    def _candidates(self, op, logits):
        """The candidates that can run here; those the dispatcher blocks are left out (said once)."""
        runnable = []
        for candidate in baselines.candidates(self.backend, op, logits, include=self.plan.include):
            if candidate.blocker is None:
                runnable.append(candidate)
            elif (candidate.implementation, candidate.blocker) not in self._blocked:
                self._blocked.add((candidate.implementation, candidate.blocker))
                self.log(f"  not run: {candidate.implementation} ({candidate.blocker})")
        return runnable

    def dtypes_for(self, op, n, c):
        limit, ops = self.plan.low_precision_max_elements, self.plan.low_precision_ops
        return [d for d in self.plan.dtypes
                if d == "float32" or ((limit is None or n * c <= limit) and (ops is None or op in ops))]

    def modes_for(self, n, c):
        limit = self.plan.forward_max_elements
        return [m for m in self.plan.modes if m != "forward" or limit is None or n * c <= limit]

    def cases(self):
        """``(op, n, c, dtypes, modes)`` in the order measured: the sizes (ascending or largest first), then the
        sweep sizes (float32, forward+backward)."""
        sizes = sorted({size for op in self.plan.ops for size in self.plan.sizes[op]}, key=lambda s: s[0] * s[1],
                       reverse=self.plan.size_order == "descending")
        result = []
        for n, c in sizes:
            for op in self.plan.ops:
                if (n, c) in self.plan.sizes[op]:
                    result.append((op, n, c, tuple(self.dtypes_for(op, n, c)), tuple(self.modes_for(n, c))))
        for n, c in sorted(self.plan.sweep_sizes, key=lambda s: s[0] * s[1]):
            for op in self.plan.ops:
                if (n, c) not in self.plan.sizes[op]:
                    result.append((op, n, c, ("float32",), ("forward_backward",)))
        return result

    def count(self):
        total = 0
        per_op = {}
        for op in self.plan.ops:
            for dtype in self.plan.dtypes:
                tiny = self.fw.logits(np.zeros((2, 3), np.float32), dtype)
                per_op[op, dtype] = len(self._candidates(op, tiny))
                if self.plan.extreme and dtype in self.plan.extreme_dtypes:
                    total += per_op[op, dtype] + len(baselines.exactness_only_candidates(op))
        for op, n, c, dtypes, modes in self.cases():
            total += sum(per_op.get((op, dtype), 0) for dtype in dtypes) * len(modes)
        return total

    def _step(self, label):
        self.done += 1
        self.progress(self.done, self.total, label)

    # -- one measurement -----------------------------------------------------------------------------------------

    def _record(self, candidate, op, dtype, shape, case, mode, **fields):
        return harness.make_record(**self.context, op=op, implementation=candidate.implementation,
                                   family=candidate.family, dtype=dtype, shape=list(shape), case=case, mode=mode,
                                   **fields)

    def _outputs(self, candidate, z, y, rows):
        """The candidate's per-example loss and gradient on the first ``rows`` rows (untimed, for exactness)."""
        _, loss, grad = self.fw.compile(candidate, "forward_backward")(z, y)
        return self.fw.to_numpy(loss, rows), self.fw.to_numpy(grad, rows)

    def run_case(self, op, n, c, dtype, logits_np, labels_np, modes=None):
        """Time every candidate on one input in ``modes`` (default: the plan's for this size); returns the records."""
        z = self.fw.logits(logits_np, dtype)
        y = baselines.labels_like(op, labels_np, dtype, self.fw)
        rows = max(1, min(n, ERROR_ELEMENTS // c))
        try:
            ref_loss, ref_grad = reference_loss_and_grad(self.reference, op, rounded(logits_np[:rows], dtype),
                                                         labels_np[:rows])
        except Exception as error:  # no exactness column then, but the timings still count
            self.log(f"  no float64 reference for {op} {n}x{c}: {_reason(error)}")
            ref_loss = ref_grad = None
        itemsize = 2 if dtype == "bfloat16" else 4
        large = self.plan.shrink_large and n * c * itemsize >= LARGE_BYTES
        huge_reps = 2 if n * c * itemsize >= HUGE_BYTES else 3
        records = []
        for candidate in self._candidates(op, z):
            auto = baselines.auto_choice(op, z) if candidate.family == "stable" else None
            outputs = {}
            results = {}
            skipped = candidate.blocker
            modes = tuple(modes or self.modes_for(n, c))
            for mode in modes:
                label = f"{self.backend} {op} {n}x{c} {dtype} {candidate.implementation} {mode}"
                if skipped is None and self.deadline.passed():
                    skipped = SKIPPED_FOR_TIME
                    self.log(f"  skipped {label}: {skipped}")
                if skipped is None:
                    try:
                        fn = self.fw.compile(candidate, mode)
                        harness.reset_peak_rss()
                        self.fw.reset_device_peak()
                        stats, out = harness.measure(lambda: fn(z, y), warmup=1 if large else 2,
                                                     reps=min(huge_reps, self.plan.reps) if large else self.plan.reps,
                                                     sync=self.fw.sync, budget_s=self.plan.budget_s,
                                                     min_reps=min(huge_reps, 3))
                        results[mode] = (stats, harness.peak_rss_mib(), self.fw.peak_device_mib())
                        if mode == "forward_backward" and ref_loss is not None:
                            outputs["loss"], outputs["grad"] = (self.fw.to_numpy(out[1], rows),
                                                                self.fw.to_numpy(out[2], rows))
                        del out, fn
                    except Exception as error:  # an implementation that cannot run here is recorded, not fatal
                        skipped = _reason(error)
                        self.log(f"  skipped {label}: {skipped}")
                self._step(label)
            errors = {}
            if skipped is None and ref_loss is not None:
                try:
                    if "grad" not in outputs:
                        outputs["loss"], outputs["grad"] = self._outputs(candidate, z, y, rows)
                    errors = dict(loss_error=harness.json_number(loss_error(outputs["loss"], ref_loss)),
                                  grad_error=harness.json_number(grad_error(outputs["grad"], ref_grad)),
                                  error_rows=rows)
                except Exception as error:
                    self.log(f"  no exactness for {candidate.implementation}: {_reason(error)}")
            for mode in modes:
                if mode not in results:
                    records.append(self._record(candidate, op, dtype, (n, c), "random", mode,
                                                skipped=skipped or "not run", auto_choice=auto))
                    continue
                stats, peak_rss, peak_device = results[mode]
                moved = harness.bytes_moved(op, mode, n, c, itemsize)
                gbs = moved / stats.min / 1e9
                roofline = self.context["roofline_gbs"]
                records.append(self._record(
                    candidate, op, dtype, (n, c), "random", mode, **stats.as_ms(), bytes=moved, bandwidth_gbs=gbs,
                    bandwidth_fraction=gbs / roofline if roofline else None, peak_rss_mib=peak_rss,
                    peak_device_mib=peak_device, auto_choice=auto, **errors))
            outputs.clear()
            gc.collect()
            self.fw.release()
        return records

    def skipped_case(self, op, n, c, dtype, modes, reason):
        """Records saying that every candidate of one case was not run, and why (no inputs are made)."""
        tiny = self.fw.logits(np.zeros((2, 3), np.float32), dtype)
        records = []
        for candidate in self._candidates(op, tiny):
            for mode in modes:
                records.append(self._record(candidate, op, dtype, (n, c), "random", mode, skipped=reason))
                self._step(f"{self.backend} {op} {n}x{c} {dtype} {candidate.implementation} {mode}")
        return records

    def run_extreme(self, op, dtype):
        """Exactness only, on extreme logits: every candidate, and Keras's loss applied to probabilities."""
        n, c = self.plan.extreme_size
        logits_np, labels_np = make_inputs(op, n, c, "extreme", seed=1)
        z = self.fw.logits(logits_np, dtype)
        y = baselines.labels_like(op, labels_np, dtype, self.fw)
        ref_loss, ref_grad = reference_loss_and_grad(self.reference, op, rounded(logits_np, dtype), labels_np)
        records = []
        for candidate in self._candidates(op, z) + baselines.exactness_only_candidates(op):
            label = f"{self.backend} {op} extreme {dtype} {candidate.implementation}"
            skipped = candidate.blocker or (SKIPPED_FOR_TIME if self.deadline.passed() else None)
            fields = {}
            if skipped is None:
                try:
                    loss, grad = self._outputs(candidate, z, y, n)
                    fields = dict(loss_error=harness.json_number(loss_error(loss, ref_loss)),
                                  grad_error=harness.json_number(grad_error(grad, ref_grad)), error_rows=n)
                except Exception as error:
                    skipped = _reason(error)
                    self.log(f"  skipped {label}: {skipped}")
            records.append(self._record(candidate, op, dtype, (n, c), "extreme", "exactness", skipped=skipped,
                                        **fields))
            self._step(label)
        return records

    def run(self, sink=None):
        """Run the whole plan; each case's records go to ``sink(records)`` as soon as they exist. Returns all."""
        if self.context is None:
            self.measure_context()
        self.total = self.count()
        self.done = 0
        everything = []

        def emit(records):
            everything.extend(records)
            if sink is not None:
                sink(records)

        for op, n, c, dtypes, modes in self.cases():
            if self.deadline.passed():  # no inputs made (gigabytes, at the GPU sizes) only to be skipped
                for dtype in dtypes:
                    emit(self.skipped_case(op, n, c, dtype, modes, SKIPPED_FOR_TIME))
                continue
            start = time.perf_counter()
            logits_np, labels_np = make_inputs(op, n, c, "random")
            if time.perf_counter() - start > 1.0:
                self.log(f"  inputs {op} {n}x{c}: {time.perf_counter() - start:.1f} s")
            for dtype in dtypes:
                emit(self.run_case(op, n, c, dtype, logits_np, labels_np, modes))
            del logits_np, labels_np
            gc.collect()
        if self.plan.extreme:
            for op in self.plan.ops:
                for dtype in self.plan.extreme_dtypes:
                    emit(self.run_extreme(op, dtype))
        return everything


def _reason(error):
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    text = text[0] if text else type(error).__name__
    if os.environ.get("KSH_BENCH_TRACEBACK"):
        traceback.print_exception(error)
    return text[:300]

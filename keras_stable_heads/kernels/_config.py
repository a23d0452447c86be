"""Every tunable of the Numba CPU kernels, in one place.

Kernels import these names; nothing in a kernel module is a bare magic number that one might want to tune.
"""

import numpy as np

# Fast-math flags for the kernels: everything LLVM needs to vectorize reductions (``reassoc``) and fuse
# multiply-adds (``contract``), but never ``nnan``/``ninf``, so that ``-inf`` masking and NaN propagation survive
# (with ``fastmath=True`` LLVM folds ``isnan`` to False and removes the guards).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# Flags for the elementary functions (exp, log, tanh). ``reassoc`` is left out on purpose: with it LLVM may
# fold the Cody-Waite reduction ``x - n*ln2_hi - n*ln2_lo`` into ``x - n*(ln2_hi + ln2_lo)`` and lose ~20 ulp.
# Instruction flags are per instruction, so these stay in force after inlining into a FASTMATH kernel.
ELEMENTARY_FASTMATH = {"nsz", "arcp", "contract", "afn"}

# Class counts up to SMALL_C_MAX use the row-block layout in the forward (and up to SMALL_C_MAX_BWD in the
# backward), which vectorizes across rows instead of along a row: a row of 10 classes is shorter than one
# vector. Measured on a 2-core AVX2 (Zen 3) box, one thread: at 65536 x 10 the block forward takes 1.1 ms
# against 3.7 ms by rows, the block backward 1.3 ms against 1.5 ms; at C = 16..32 the backward by rows wins.
SMALL_C_MAX = 32
SMALL_C_MAX_BWD = 12

# Rows per block in the row-block layout: a multiple of the widest vector (16 float32 lanes), small enough that
# the per-thread stack buffer holding the transposed block ((SMALL_C_MAX + 6) * ROW_BLOCK * 4 bytes = 9.5 KiB)
# stays in L1 between the passes over it.
ROW_BLOCK = 64

# tanh: below this |x| a Cephes odd polynomial is used; above it 1 - 2 / (exp(2|x|) + 1), which has no
# cancellation there.
TANH_POLY_MAX = np.float32(0.625)

# Software prefetch in the softmax forward (large C): while a thread runs the exp pass over row i (from cache,
# compute-bound), it asks for row i + 1 in blocks of PREFETCH_SPAN floats, so that the next row's max pass
# (memory-bound) finds it in L2 and memory is busy during the exps. Only for rows of at most PREFETCH_MAX_C
# classes, so that the current and the next row fit in the 512 KiB L2 of one core together. One prefetch per
# 64-byte line (FLOATS_PER_LINE). Measured on the 2-core Zen 3 box, Numba alone, forward of sparse softmax CE,
# min of 20 interleaved calls (old and new kernels in one process): 4096 x 32000 62.6 -> 53.8 ms (with
# label smoothing, z-loss and softcap 168 -> 125 ms), 8192 x 1000 5.96 -> 5.16 ms (17.0 -> 12.7). The dense
# forward (three reductions per span) ran slower with spans (4.9 -> 7.1 ms at 8192 x 1000) and keeps whole-row
# loops without prefetch.
# On the 2-core Intel Xeon with AVX-512 (LLVM target rocketlake, 480 MiB L3) the spans cost instead of gaining: the
# same forward (max pass, then the exp-sum pass) as one whole-row loop without prefetch took 1.87 ms against 2.59
# at 8192 x 1000, 35.5 against 49.9 ms at 4096 x 32000 (the read floor is 31 ms) and 1.84 against 3.21 at
# 65536 x 100; the spans without their prefetches were slower still (3.15, 54.4, 3.31), so it is the span loops
# themselves (a 64-float vector iteration restarting every 256 floats). So the spans and their prefetches are
# used only where the host has no AVX-512; elsewhere PREFETCH is off and the exp passes run over whole rows.
# Unmeasured: AVX-512 machines other than that one (e.g. Zen 4).
def _host_has_avx512():
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # no feature query on this platform: keep the measured AVX2 layout
        return False


PREFETCH = not _host_has_avx512()
PREFETCH_SPAN = 256
PREFETCH_MAX_C = 32768 if PREFETCH else 0
FLOATS_PER_LINE = 16

# Kernel calls over fewer values than this run on the calling thread alone (numba.set_num_threads(1) around the
# call; the count is thread-local and restored after). A parallel region wakes the other worker, which at these
# sizes costs more than its half of the work, and on a busy machine (a framework's own threads, other jobs) it
# waits for a core: sparse softmax CE forward+backward at 32 x 10 through torch measured 2118 us with 2 threads
# against 367 us with 1 on a loaded 2-core box; at 256 x 1000 (quiet) 2 threads took 171 us, 1 thread 341 us.
SERIAL_MAX_ELEMENTS = 1 << 15

# Folder (under a user cache root) that holds the Numba cache when the installed package is not writable.
CACHE_SUBDIR = ("keras_stable_heads", "numba")

# The backward gets p = exp(z' - lse) from the forward's float32 lse, whose rounding error (half an ulp of lse)
# becomes a relative error of p: 1.9e-6 at |lse| = 32, 0.03 at 1e4, everything at 1e30 (lse = 1e30 + log 3
# rounds to 1e30). Rows with |lse| above this recompute max and log-sum in the backward (two more passes over
# a row that is in cache) and use p = exp(z' - max) / sum.
LSE_RECOMPUTE_ABOVE = np.float32(32.0)

# Elementwise losses (sigmoid focal CE, the regression NLLs with one target) with at most FLAT_C_MAX entries per
# row: a row is shorter than a vector (a binary head has C = 1), so each thread takes blocks of FLAT_BLOCK // C
# whole rows and computes their entries as one flat, vectorized loop (into a per-thread stack buffer of
# FLAT_BLOCK float32 = 4 KiB, in L1), then reduces or scales per row.
FLAT_C_MAX = 32
FLAT_BLOCK = 1024

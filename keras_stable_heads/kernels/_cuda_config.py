"""Every tunable of the Numba CUDA kernels, in one place.

The host drivers read these names from this module at call time (``_cuda_config.BLOCK_THREADS``, not a copy
taken at import), so tests can shrink the blocks to exercise multi-block grids and multi-step reductions on
tiny shapes. Values marked *compile time* are baked into the kernels when they are compiled.
"""

# Class counts up to SMALL_C_MAX are computed with one thread per row (a row of 10 classes would leave a
# block of 32+ threads mostly idle); above it, one block per row.
SMALL_C_MAX = 32

# Threads per block in the thread-per-row layout.
ROWS_PER_BLOCK = 128

# Largest block in the block-per-row layout (a power of two, 32..1024). 512 threads give 4 blocks of 16 warps
# per SM on Hopper, i.e. full occupancy, and 256 elements per thread at C = 131072.
BLOCK_THREADS = 512

# Smallest block in the block-per-row layout (a power of two >= 32). A block is the smallest power of two in
# [MIN_BLOCK_THREADS, BLOCK_THREADS] with at least C / ITEMS_PER_THREAD threads, so mid-sized rows
# (C = 1000: 128 threads) do not leave most of a 512-thread block idle.
MIN_BLOCK_THREADS = 32
ITEMS_PER_THREAD = 8

# Compile time. Elements each thread loads before it uses any of them, in the streaming loops: several loads
# in flight per thread are needed to cover memory latency at full bandwidth (Little's law: about 3 TB/s x
# 0.6 us = 1.8 MB in flight, 14 KB per SM, more than one 4-byte load per resident thread).
UNROLL = 4

# Per-row float32 values that a forward writes for its backward (the ``saved`` buffer is [N, width]).
# Softmax: (shift, log_sum, W): shift = row max of the softcapped logits (0 if not finite), log_sum =
# log sum_c exp(z'_c - shift), W = sum_c w_c ybar_c. Keeping shift and log_sum apart (rather than their
# float32 sum, the lse) lets the backward form p = exp((z' - shift) - log_sum) with no large cancelling terms,
# so no recomputation is needed at |lse| ~ 1e4..1e30 (the CPU kernels recompute; see LSE_RECOMPUTE_ABOVE).
SOFTMAX_SAVED_WIDTH = 3
# Sigmoid: (number of present labels,), so that the backward of a mean over present labels needs no reduction.
SIGMOID_SAVED_WIDTH = 1

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

# Class counts up to this use the row-block layout, which vectorizes across rows instead of along a row
# (a row of 10 classes is shorter than one 16-lane AVX-512 vector).
SMALL_C_MAX = 32

# Rows per block in the row-block layout: a multiple of the widest vector (16 float32 lanes), small enough that
# the block's logits (ROW_BLOCK * SMALL_C_MAX * 4 bytes = 8 KiB) stay in L1 between the passes over them.
ROW_BLOCK = 64

# float32 exp: inputs above EXP_HI overflow to +inf; below EXP_LO the result is under half the smallest
# denormal and rounds to 0. Between EXP_DENORMAL and EXP_LO the result is a denormal.
EXP_HI = np.float32(88.72283935546875)
EXP_LO = np.float32(-103.97208404541016)

# tanh: below this |x| a Cephes odd polynomial is used; above it 1 - 2 / (exp(2|x|) + 1), which has no
# cancellation there.
TANH_POLY_MAX = np.float32(0.625)

# Folder (under a user cache root) that holds the Numba cache when the installed package is not writable.
CACHE_SUBDIR = ("keras_stable_heads", "numba")

"""Numba CPU kernels for the logit-space losses (device code: NumPy arrays in, caller-allocated buffers out).

Every forward kernel writes the per-row loss (and, for softmax losses, the per-row log-sum-exp of the
softcapped logits); every backward kernel reads the logits and the forward's saved per-row values and writes
the gradient in one pass. Inputs must be C-contiguous float32 logits [N, C] and int32 sparse labels; the host
wrappers do no conversion (Numba compiles one version per type signature).
"""

import os as _os

from ._cache import numba_cache_dir as _numba_cache_dir

# The cache folder is chosen when each @njit(cache=True) function is defined, so all kernel modules are
# imported inside this block (see _cache.py for why and where).
with _numba_cache_dir(__name__, _os.path.dirname(_os.path.abspath(__file__))) as CACHE_DIR:
    from .sigmoid_ce import sigmoid_ce_bwd, sigmoid_ce_fwd
    from .softmax_ce import (
        softmax_ce_dense_bwd,
        softmax_ce_dense_fwd,
        softmax_ce_sparse_bwd,
        softmax_ce_sparse_fwd,
    )

__all__ = [
    "softmax_ce_sparse_fwd",
    "softmax_ce_sparse_bwd",
    "softmax_ce_dense_fwd",
    "softmax_ce_dense_bwd",
    "sigmoid_ce_fwd",
    "sigmoid_ce_bwd",
]

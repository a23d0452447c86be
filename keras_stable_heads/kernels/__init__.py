"""Numba CPU kernels for the logit-space losses (device code: NumPy arrays in, caller-allocated buffers out).

Every forward kernel writes the per-row loss (and, for softmax losses, per-row values of the log-sum-exp: the lse
of the softcapped logits for cross-entropy, ``(shift, log_sum, S)`` for focal); every backward kernel reads the
logits and the forward's saved per-row values and writes the gradient in one pass. The elementwise losses
(sigmoid CE and focal, Gaussian and Laplace NLL) save nothing. Inputs must be C-contiguous float32 logits [N, C]
and int32 sparse labels; the host wrappers do no conversion (Numba compiles one version per type signature).
"""

import os as _os

from ._cache import numba_cache_dir as _numba_cache_dir

# The cache folder is chosen when each @njit(cache=True) function is defined, so all kernel modules are
# imported inside this block (see _cache.py for why and where).
with _numba_cache_dir(__name__, _os.path.dirname(_os.path.abspath(__file__))) as CACHE_DIR:
    from .focal import sigmoid_focal_bwd, sigmoid_focal_fwd, softmax_focal_bwd, softmax_focal_fwd
    from .nll import gaussian_nll_bwd, gaussian_nll_fwd, laplace_nll_bwd, laplace_nll_fwd
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
    "sigmoid_focal_fwd",
    "sigmoid_focal_bwd",
    "softmax_focal_fwd",
    "softmax_focal_bwd",
    "gaussian_nll_fwd",
    "gaussian_nll_bwd",
    "laplace_nll_fwd",
    "laplace_nll_bwd",
]

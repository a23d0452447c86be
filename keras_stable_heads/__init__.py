"""keras-stable-heads: exact logit-space losses for Keras 3, with fused gradients, on every backend.

Pair each output with the loss of its distribution and compute that loss from logits:

==========================  ==================  ========================================
distribution                link (inference)    loss here (takes logits / parameters)
==========================  ==================  ========================================
Bernoulli                   sigmoid             ``StableBinaryCE``
categorical (one of K)      softmax             ``StableSoftmaxCE`` / ``StableSparseSoftmaxCE``
independent labels          sigmoid per label   ``StableMultilabelCE``
Gaussian                    identity (mean)     ``GaussianNLL``
Laplace                     identity (median)   ``LaplaceNLL``
==========================  ==================  ========================================
"""

from . import dispatch
from . import ops
from . import testing
from .dispatch import explain
from .losses import GaussianNLL
from .losses import LaplaceNLL
from .losses import StableBinaryCE
from .losses import StableBinaryFocalCE
from .losses import StableMultilabelCE
from .losses import StableSoftmaxCE
from .losses import StableSoftmaxFocalCE
from .losses import StableSparseSoftmaxCE

__version__ = "0.1.0"

__all__ = [
    "GaussianNLL",
    "LaplaceNLL",
    "StableBinaryCE",
    "StableBinaryFocalCE",
    "StableMultilabelCE",
    "StableSoftmaxCE",
    "StableSoftmaxFocalCE",
    "StableSparseSoftmaxCE",
    "dispatch",
    "explain",
    "ops",
    "testing",
]

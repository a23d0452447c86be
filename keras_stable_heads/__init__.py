"""keras-stable-heads: exact logit-space losses for Keras 3, with fused gradients, on every backend.

Pair each output with the loss of its distribution and compute that loss from logits:

==========================  ==================  ========================================
distribution                link (inference)    loss here (takes logits / parameters)
==========================  ==================  ========================================
Bernoulli                   sigmoid             ``StableBinaryCE``
categorical (one of K)      softmax             ``StableSoftmaxCE`` / ``StableSparseSoftmaxCE``
large vocabulary (one of V) softmax / logits    ``FusedSparseSoftmaxCE`` (``FusedSoftmaxHead``: no logits)
independent labels          sigmoid per label   ``StableMultilabelCE``
Gaussian                    identity (mean)     ``GaussianNLL``
Laplace                     identity (median)   ``LaplaceNLL``
==========================  ==================  ========================================
"""

from . import dispatch
from . import ops
from . import testing
from .audit import AuditError
from .audit import AuditWarning
from .audit import Finding
from .audit import Findings
from .audit import audit
from .audit import install_compile_check
from .audit import stabilize
from .audit import stable_twin
from .audit import uninstall_compile_check
from .dispatch import explain
from .heads import BinaryHead
from .heads import GaussianHead
from .heads import LaplaceHead
from .heads import Link
from .heads import MultilabelHead
from .heads import SoftmaxHead
from .heads import inference_model
from .losses import GaussianNLL
from .losses import LaplaceNLL
from .losses import StableBinaryCE
from .losses import StableBinaryFocalCE
from .losses import StableMultilabelCE
from .losses import StableSoftmaxCE
from .losses import StableSoftmaxFocalCE
from .losses import StableSparseSoftmaxCE
from .vocab_head import FusedSoftmaxHead
from .vocab_head import FusedSparseSoftmaxCE
from .vocab_head import FusedTokenAccuracy

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "AuditWarning",
    "BinaryHead",
    "Finding",
    "Findings",
    "FusedSoftmaxHead",
    "FusedSparseSoftmaxCE",
    "FusedTokenAccuracy",
    "GaussianHead",
    "LaplaceHead",
    "Link",
    "MultilabelHead",
    "SoftmaxHead",
    "audit",
    "inference_model",
    "install_compile_check",
    "stabilize",
    "stable_twin",
    "uninstall_compile_check",
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

"""PyTorch's own fused softmax cross-entropy (``F.cross_entropy``) as the ``native`` implementation.

It computes ``-log_softmax(z)[y]`` (or ``-sum_c y_c log_softmax(z)_c``, whose autograd gradient is
``p sum_c y_c - y``) from the logits: the portable path's formula, with PyTorch's own fused forward and
backward, which at small sizes costs less than the kernels' Python glue. The dispatcher sends it only the options
it computes exactly (``dispatch._native_options_blocker``). Where its formula gives NaN and this package's does not
— a row whose logits are all ``-inf`` (+inf here), a zero label on a ``-inf`` logit (``0 * -inf``) — the call is
recomputed on the portable path (``exact``); a NaN that comes from the inputs is a NaN on every path. PyTorch
runs eagerly, so the check is one host read of a flag.
"""

import torch
from torch.nn import functional

# No ignored class: an ignore_index that no label can equal (labels are int32 before .long()), so that every
# out-of-range label, -100 (F.cross_entropy's default ignore_index) included, raises.
_NO_IGNORED_CLASS = -(1 << 63)


def run(op, logits, labels, options, exact, check_labels=None):
    num_classes = logits.shape[-1]
    flat = logits.dim() == 2
    z = logits if flat else logits.reshape(-1, num_classes)
    if op == "sparse_softmax_ce":
        ignore = options.get("ignore_class")
        try:
            loss = functional.cross_entropy(z, labels.reshape(-1).long(), reduction="none",
                                            ignore_index=_NO_IGNORED_CLASS if ignore is None else int(ignore))
        except IndexError:  # "Target 10 is out of bounds": say it as the other paths do
            if check_labels is not None:
                check_labels()
            raise
    else:
        y = labels if flat else labels.reshape(-1, num_classes)
        loss = functional.cross_entropy(z, y.to(z.dtype), reduction="none")
    if torch.isnan(loss).any():
        return exact()
    return loss if flat else loss.reshape(logits.shape[:-1])

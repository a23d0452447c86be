"""PyTorch: a ``torch.autograd.Function`` over zero-copy NumPy views of CPU tensors; gradients are NumPy arrays
from the reuse pool in ``_memory.py`` wrapped without a copy, the other buffers are torch's."""

import torch

from ._memory import GRADIENTS


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, pair):
        z = logits.detach().contiguous()
        y = labels.detach().contiguous()
        loss = torch.empty(z.shape[0], dtype=torch.float32)
        saved = torch.empty((z.shape[0], pair.saved_width), dtype=torch.float32)
        pair.forward(z.numpy(), y.numpy(), loss.numpy(), saved.numpy())
        ctx.save_for_backward(z, y, saved)
        ctx.pair = pair
        return loss

    @staticmethod
    def backward(ctx, dloss):
        z, y, saved = ctx.saved_tensors
        out = GRADIENTS.empty(z.shape)  # reused once no tensor holds it; fresh pages cost more than the kernel
        grad = torch.from_numpy(out)  # the tensor keeps a reference to the array: see _memory.py
        ctx.pair.backward(z.numpy(), y.numpy(), saved.numpy(), dloss.detach().contiguous().numpy(), out)
        return grad, None, None


def run(pair, logits, labels):
    return _KernelFunction.apply(logits, labels, pair)

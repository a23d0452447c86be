"""PyTorch on CUDA: a ``torch.autograd.Function`` over zero-copy Numba views of CUDA tensors.

``pair`` is a CUDA kernel pair: ``forward(z, y, loss, saved, stream)``, ``backward(z, y, saved, dloss, grad,
stream)``, ``label_dtype`` and ``saved_width`` (float32 values per row that the forward keeps for the backward).
Torch allocates every buffer (its caching allocator owns them); the kernels are launched on torch's current
stream of the tensor's device, so they are ordered with the surrounding torch work and nothing synchronises
the host or copies to it. float16/bfloat16 logits are computed in float32 (the cast is part of the autograd
graph, so the gradient comes back in the input dtype).
"""

import contextlib

import torch
from numba import cuda

from ._cuda import device_view as _view  # a module attribute: the simulator tests replace it


def _launch_context(device):
    """Numba launches on its current device: make it the tensor's (a no-op on device 0, Numba's default)."""
    return contextlib.nullcontext() if not device.index else cuda.gpus[device.index]


class _CudaKernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, pair):
        z = logits.detach().contiguous()
        y = labels.detach().contiguous()
        loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        saved = torch.empty((z.shape[0], pair.saved_width), dtype=torch.float32, device=z.device)
        if z.numel():
            with _launch_context(z.device):
                stream = cuda.external_stream(int(torch.cuda.current_stream(z.device).cuda_stream))
                pair.forward(_view(z), _view(y), _view(loss), _view(saved), stream)
        ctx.save_for_backward(z, y, saved)
        ctx.pair = pair
        return loss

    @staticmethod
    def backward(ctx, dloss):
        z, y, saved = ctx.saved_tensors
        grad = torch.empty_like(z)
        if z.numel():
            g = dloss.detach().to(torch.float32).contiguous()  # often an expanded scalar (stride 0)
            with _launch_context(z.device):
                stream = cuda.external_stream(int(torch.cuda.current_stream(z.device).cuda_stream))
                ctx.pair.backward(_view(z), _view(y), _view(saved), _view(g), _view(grad), stream)
        return grad, None, None


def run(pair, logits, labels):
    """Per-row loss of 2-D CUDA ``logits`` [N, C]; labels int32 [N] or float32 [N, C] per ``pair.label_dtype``."""
    labels = labels.to(torch.int32 if pair.label_dtype == "int32" else torch.float32)
    return _CudaKernelFunction.apply(logits.to(torch.float32), labels, pair)

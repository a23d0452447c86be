"""What the CUDA bridges share: a Numba device-array view over a framework's GPU buffer."""

from numba import cuda


def device_view(buffer):
    """A Numba device array over a contiguous GPU buffer (CUDA array interface), without synchronising."""
    try:
        return cuda.as_cuda_array(buffer, sync=False)
    except TypeError:  # a Numba without the ``sync`` keyword
        return cuda.as_cuda_array(buffer)

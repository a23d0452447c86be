"""Output buffers on the CPU: reuse gradient buffers the framework has let go, and advise huge pages on fresh ones.

A gradient the size of the logits is a fresh allocation on every backward pass (the framework owns it and
frees it after use). Large allocations come straight from ``mmap``, so the first write to each 4 KiB page
faults: measured on a 2-core Zen 3 box, first-touching a fresh 512 MiB ``torch.empty`` buffer took ~380 ms,
against ~100 ms after ``madvise(MADV_HUGEPAGE)`` and ~70 ms for memory already mapped, while the backward kernel
itself takes ~60 ms at that size. NumPy already advises huge pages for its own large arrays; PyTorch's CPU
allocator and XLA's do not. :func:`advise_huge_pages` advises the 2 MiB-aligned interior of a buffer that the
kernel is about to write, which is harmless when the pages are already mapped or when the system's huge-page
mode is ``never``, and does nothing on platforms without ``madvise``.
"""

import ctypes
import ctypes.util
import functools
import math
import sys
import threading

import numpy as np

# Below this many bytes the page faults do not matter and the system call would cost more than it saves.
MIN_BYTES = 8 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(array):
    """Advise transparent huge pages for a NumPy array's memory that has not been written yet (best effort)."""
    nbytes = array.nbytes
    if nbytes < MIN_BYTES:
        return
    madvise = _madvise()
    if madvise is None:
        return
    start = array.ctypes.data
    first = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    last = (start + nbytes) & ~(_HUGE_PAGE - 1)
    if last > first:
        madvise(first, last - first, _MADV_HUGEPAGE)  # a failure only means no huge pages: nothing to report


# ---------------------------------------------------------------------------------------------------------------
# Reusing gradient buffers
# ---------------------------------------------------------------------------------------------------------------

# How many large buffers the pool keeps (the most recently used first). Training reuses one gradient shape per
# step (two with a short last batch); 0 turns reuse off.
MAX_POOLED = 4
_ALIGN = 64


def aligned_empty(shape, dtype=np.float32):
    """An uninitialised NumPy array whose data starts on a 64-byte boundary (TensorFlow adopts such an output
    without a copy; NumPy advises huge pages for its large allocations itself)."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)  # np.prod and .ctypes cost microseconds, most of a small gradient's allocation
    raw = np.empty(count * dtype.itemsize + _ALIGN, np.uint8)
    start = (-raw.__array_interface__["data"][0]) % _ALIGN
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def _references(arrays, i):
    """``sys.getrefcount`` of ``arrays[i]`` as seen from here; :data:`_UNSHARED` is measured by this same code, so
    the comparison holds whatever references the interpreter itself adds or elides on the way."""
    array = arrays[i]
    return sys.getrefcount(array)


# The count of an array that only its list holds (CPython reference counting; other interpreters do not pool).
_UNSHARED = _references([np.empty(0)], 0) if sys.implementation.name == "cpython" else None


class BufferPool:
    """Hands out float32 arrays for gradients, reusing one that nothing outside the pool references any more.

    Every training step needs a fresh gradient the size of the logits, and a fresh large allocation costs page
    faults (the OS zeroes each page before the kernel writes it: ~30 ms for 512 MiB with huge pages, ~4x that
    without), more than the kernel's own pass when the buffer is large. The bridges wrap the arrays they get from
    here without a copy (``torch.from_numpy``; TensorFlow adopts an aligned array returned by ``numpy_function``),
    and both frameworks keep a Python reference to the array for as long as any tensor uses its memory. So an
    array whose only reference is the pool's is free: reusing it cannot change a gradient that is still held.
    The pool keeps at most ``MAX_POOLED`` arrays of at least ``MIN_BYTES`` (smaller ones are cheap to allocate);
    between steps their memory stays with the process, the size of one gradient per distinct shape.
    """

    def __init__(self, max_pooled=None):
        self._max = MAX_POOLED if max_pooled is None else max_pooled
        self._arrays = []
        self._lock = threading.Lock()  # TensorFlow may run two numpy_function calls at once

    def empty(self, shape):
        shape = tuple(int(d) for d in shape)
        if self._max <= 0 or _UNSHARED is None or math.prod(shape) * 4 < MIN_BYTES:
            return aligned_empty(shape)
        with self._lock:
            for i in range(len(self._arrays)):
                if self._arrays[i].shape == shape and _references(self._arrays, i) == _UNSHARED:
                    array = self._arrays.pop(i)
                    self._arrays.insert(0, array)
                    return array
            array = aligned_empty(shape)
            self._arrays.insert(0, array)
            del self._arrays[self._max:]
            return array

    def __len__(self):
        """How many arrays the pool holds."""
        return len(self._arrays)

    def clear(self):
        """Drop the pool's references: an array nothing else holds is freed now."""
        with self._lock:
            self._arrays.clear()


GRADIENTS = BufferPool()
# The fused linear cross-entropy's per-chunk (tokens, V) buffers on PyTorch (logits and their gradient): reused
# chunk after chunk within one loop over the chunks, released when the loop ends (``linear_ce``'s torch glue), so
# that nothing chunk-sized outlives the loss into the model's backward and the optimizer's update.
CHUNKS = BufferPool()

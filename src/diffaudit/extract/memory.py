"""CPU memory tuning of the extraction: glibc keeps freed activations for reuse (:func:`cpu_heap_reuse`)."""
from __future__ import annotations

import threading
from contextlib import contextmanager

# glibc mallopt parameters (malloc.h) and the values cpu_heap_reuse sets and restores.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_REUSE = {_M_MMAP_THRESHOLD: 2**31 - 1, _M_TRIM_THRESHOLD: 2**31 - 1}
# Afterwards: the values glibc's dynamic thresholds settle at after large numpy/torch buffers (mmap threshold at its
# 32 MiB ceiling, trim threshold twice that).
_HEAP_AFTER = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def cpu_heap_reuse(enabled: bool = True):
    """On glibc, keep freed memory in the heap for reuse for the duration (a no-op elsewhere, or if not ``enabled``).

    A U-Net pass on the CPU allocates and frees activations of tens to hundreds of MB at every layer. glibc serves
    each block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so every such
    activation is page-faulted and zeroed by the kernel again (8 million page faults on the parity-sized run,
    benchmarks/bench_extraction_variants.py). Raising the mmap and trim thresholds for the duration lets freed blocks
    be reused; the peak RSS grows by what the heap keeps. Afterwards the heap is trimmed (memory goes back to the
    system) and the thresholds are set to 32 and 64 MiB, where glibc's dynamic thresholds settle after large buffers.
    Values computed are not affected."""
    global _heap_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_depth += 1
        if _heap_depth == 1:
            for param, value in _HEAP_REUSE.items():
                libc.mallopt(param, value)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                for param, value in _HEAP_AFTER.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


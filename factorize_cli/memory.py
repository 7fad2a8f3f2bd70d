"""The process's allocation policy: large tensors go back to the operating system when freed.

glibc serves an allocation above its mmap threshold with a mapping of its own, unmapped on free; smaller
ones come from per-thread arenas, which keep what is freed for reuse. The threshold is dynamic: it rises
to the size of the largest mapped block freed so far (up to 32 MiB). A run that factorizes two layers at
a time frees 10-30 MB tensors (weights, Gram matrices, factors) from several threads, so after the
first few layers those go to the arenas, which fragment and hold them: peak RSS was 10-40% higher than
the live tensors and varied from run to run (the 1.1B-like checkpoint: 0.89-1.15 GiB). A fixed
threshold of 16 MiB keeps the large tensors mapped (slice: 0.79 -> 0.71 GB, same system time; 4 MiB
would save more but spends 2.5x the system time on page faults).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

MMAP_THRESHOLD = 16 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h); setting it also turns the dynamic rise off


@functools.cache
def _libc(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` (integer result), or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def release_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; False where that does not apply
    (not Linux, a C library whose ``mallopt`` does nothing) or the user chose a threshold
    (``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``)."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _libc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def give_back() -> None:
    """Return the free memory of every allocator arena to the system (glibc's ``malloc_trim``); a no-op
    elsewhere. Called after each layer: what a layer's temporaries below the mmap threshold left in the
    arenas would otherwise stay resident."""
    import ctypes

    trim = _libc("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)

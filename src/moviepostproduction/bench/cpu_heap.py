"""Keep freed CPU tensor memory inside the process, as CUDA's caching allocator does (glibc only).

With glibc's defaults every tensor above the dynamic mmap threshold (at most 32 MiB) gets fresh pages from
the OS and hands them back when freed, so the next tensor of that size page-faults all of them in again: at
FLUX width one 4096 x 3072 fp32 tensor is 48 MiB, and its page faults cost about 20 ms on the benchmark CPU,
6x the element-wise multiply that writes it and 15x a gather (docs/benchmarks.md). Raising the mmap and trim
thresholds makes freed blocks stay in the heap and be reused. The cost: the resident set stays at its
high-water mark until `return_freed_memory` (which `bench_memory` calls before measuring).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # keep up to 2 GiB of free heap top

_kept = False  # process-wide, like the allocator it describes: there is no going back to the defaults


def _glibc(name: str):
    """The C library's function `name`, or None where there is no such library or function (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (once per process); True when both took effect, False without glibc."""
    global _kept
    mallopt = None if _kept else _glibc("mallopt")
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        _kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS now (`malloc_trim`), whatever the thresholds; a no-op without glibc."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def heap_kept() -> bool:
    """Whether `keep_freed_memory` took effect earlier in this process."""
    return _kept

"""Peak memory of one call: CUDA allocator statistics, or the process's resident set sampled on CPU.

tracemalloc does not see torch's allocations, so on CPU the resident set size (psutil) is sampled from a
background thread while the call runs; peak minus the level at entry is the call's growth. Freed heap pages
are handed back to the OS first (glibc `malloc_trim`) so an earlier call's leftovers do not hide this one's.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import torch

from moviepostproduction.bench.cpu_heap import return_freed_memory

SAMPLE_S = 0.002  # RSS sampling period on CPU


class PeakMemory:
    """`measure(fn)` runs fn once and returns its peak memory above the level at entry, in MiB (None: unknown)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._process = None
        if device.type == "cuda":
            self.method: str | None = "torch.cuda.max_memory_allocated"
            self.note = "CUDA allocator peak above the memory allocated before the call"
            return
        try:
            import psutil
        except ImportError:
            self.method = None
            self.note = "memory not measured on CPU: psutil is not installed"
            return
        self._process = psutil.Process()
        self.method = "psutil RSS sampling"
        self.note = f"process RSS sampled every {SAMPLE_S * 1000:g} ms, peak above the level at entry (approximate)"

    def measure(self, fn: Callable[[], None]) -> float | None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self._process is None:
            fn()
            return None
        return_freed_memory()
        base = self._process.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                peak[0] = max(peak[0], self._process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
        peak[0] = max(peak[0], self._process.memory_info().rss)
        return (peak[0] - base) / 2**20

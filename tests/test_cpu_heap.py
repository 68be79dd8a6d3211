"""cpu_heap: freed tensor memory is reused instead of being faulted in from the OS again (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, torch
from moviepostproduction.bench.cpu_heap import heap_kept, keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else heap_kept()
for _ in range(16):  # warm-up: the heap settles after its first few large blocks
    torch.ones(12 * 2**20).sum()  # 48 MiB: above glibc's default mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(12 * 2**20).sum()  # allocate, write every page, free
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 12 * 2**20 * 4 // 4096  # pages of one 48 MiB tensor


def minor_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_heap_reuses_freed_tensors_without_page_faults():
    assert minor_faults("system") == ("False", pytest.approx(4 * PAGES, rel=0.1))  # every tensor faults in again
    kept, faults = minor_faults("keep")
    assert kept == "True" and faults < PAGES // 10  # the freed block is reused

"""reuse_freed_memory: a large tensor freed and allocated again is served without page faults."""

import platform

import pytest
import torch

from fishr_lite.cpu_memory import minor_page_faults, reuse_freed_memory, reusing_freed_memory

ROWS, COLUMNS = 25_000, 390  # one Colored MNIST activation: 39 MB, above glibc's default mmap threshold
PAGES = ROWS * COLUMNS * 4 // 4096


def faults_of_a_fresh_filled_tensor() -> int:
    before = minor_page_faults()
    tensor = torch.empty(ROWS, COLUMNS)
    tensor.fill_(1.0)  # touch every page
    del tensor
    return minor_page_faults() - before


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="mallopt is glibc's")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    # glibc's default would fault in every page of every fresh 39 MB tensor; run this
    # check in a child process so the setting does not leak into the other tests
    import subprocess
    import sys
    code = (
        "from tests.test_cpu_memory import faults_of_a_fresh_filled_tensor as f, PAGES\n"
        "from fishr_lite.cpu_memory import reuse_freed_memory, reusing_freed_memory\n"
        "before = [f() for _ in range(3)]\n"
        "assert not reusing_freed_memory() and reuse_freed_memory() and reusing_freed_memory()\n"
        "f(); f()\n"  # the first allocations after the switch grow the heap
        "after = [f() for _ in range(3)]\n"
        "print(before, after, PAGES)\n"
        "assert min(before) > PAGES // 2, before\n"
        "assert max(after) < PAGES // 100, after\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=__file__.rsplit("/tests/", 1)[0])
    assert result.returncode == 0, result.stdout + result.stderr


def test_page_fault_counter_counts():
    assert minor_page_faults() >= 0
    assert isinstance(reusing_freed_memory(), bool) and callable(reuse_freed_memory)

"""reuse_freed_memory: a large tensor freed and allocated again is served without page faults."""

import json
import mmap
import platform
import subprocess
import sys

import pytest

from fishr_lite.cpu_memory import minor_page_faults

ROWS, COLUMNS = 25_000, 390  # one Colored MNIST activation: 39 MB, above glibc's default mmap threshold
PAGES = ROWS * COLUMNS * 4 // 4096

CHILD = f"""
import json, torch
from fishr_lite.cpu_memory import minor_page_faults, reuse_freed_memory, reusing_freed_memory
def faults():
    before = minor_page_faults()
    tensor = torch.empty({ROWS}, {COLUMNS})
    tensor.fill_(1.0)  # touch every page
    del tensor
    return minor_page_faults() - before
before = [faults() for _ in range(3)]
assert not reusing_freed_memory() and reuse_freed_memory() and reusing_freed_memory()
for _ in range(16):  # the first allocations after the switch grow the heap (see cpu_memory)
    faults()
print(json.dumps([before, [faults() for _ in range(3)]]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="mallopt is glibc's")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    # glibc's default faults in every page of every fresh 39 MB tensor. With the setting, once
    # the heap has settled (up to ten allocations here, see the module docstring), the freed
    # block is reused: in each of four child processes.
    results = []
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(json.loads(out.stdout))
    for before, _ in results:
        assert min(before) > PAGES // 2, results  # the default: every page faulted again
    assert all(max(after) < PAGES // 100 for _, after in results), results


@pytest.mark.skipif(platform.system() == "Windows", reason="getrusage is POSIX")
def test_the_counter_sees_fresh_pages_being_touched():
    pages = 1024
    with mmap.mmap(-1, pages * 4096) as fresh:  # anonymous memory: no page is mapped yet
        before = minor_page_faults()
        for page in range(pages):
            fresh[page * 4096] = 1
        assert minor_page_faults() - before >= pages // 2

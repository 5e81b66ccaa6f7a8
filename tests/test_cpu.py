"""``cpu.keep_freed_memory``: glibc keeps large freed blocks (the command's allocator setting), seen in the
process's resident memory, in a fresh interpreter each (it changes the process for good)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from edgeslim import cpu

SCRIPT = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("cpu", sys.argv[2])  # the module alone: no torch import
cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu)
keep_freed_memory = cpu.keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
base = rss_mb()
a = np.ones(200 << 20, np.uint8)   # 200 MB, every page touched
del a
print(applied, round(rss_mb() - base))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_stay_with_the_process_only_when_asked():
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode, cpu.__file__], capture_output=True, text=True,
                             check=True)
        applied, kept = out.stdout.split()
        return applied, int(kept)

    applied, kept = run("keep")
    assert applied == "True" and kept >= 190  # the 200 MB block is still the process's, ready for reuse
    applied, kept = run("plain")
    assert applied == "False" and kept < 20   # glibc's default: a block this large was an mmap, unmapped at free

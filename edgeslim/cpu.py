"""The CPU this process runs on, as far as onnxruntime's int8 kernels care.

On x86 CPUs with AVX2 but no VNNI (AVX-512 VNNI or AVX-VNNI), onnxruntime's uint8 x int8 GEMM and conv kernels
multiply with ``vpmaddubsw``, which adds each pair of adjacent products in saturating int16: weights of magnitude
above 64 can overflow that sum and silently change results. VNNI (``vpdpbusd``) and ARM kernels accumulate in
int32 and are exact. This module only reads ``/proc/cpuinfo``; the choices built on it are in ``config``
(``PTQConfig.weight_range``) and ``export.onnx_qdq`` (weight containers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["cpu_flags", "cpu_name", "int8_weights_saturate", "keep_freed_memory", "usable_cores"]

_VNNI = ("avx512_vnni", "avx_vnni", "avx512vnni")


@lru_cache(maxsize=1)
def _flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


@lru_cache(maxsize=1)
def int8_weights_saturate() -> bool:
    """True on x86 CPUs with AVX2 and no VNNI, where onnxruntime's u8s8 kernels saturate pair sums at int16."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = _flags()
    return "avx2" in flags and not any(f in flags for f in _VNNI)


def cpu_flags() -> str:
    """The flags that decide onnxruntime's int8 kernels: AVX-512 VNNI / AVX-VNNI (exact, fast u8s8) or AVX2 only."""
    flags = _flags()
    if not flags:
        return "flags unknown"
    vnni = sorted(f for f in flags if "vnni" in f)
    return ("VNNI: " + ", ".join(vnni)) if vnni else ("AVX2, no VNNI" if "avx2" in flags else "no AVX2")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the system (no mmap for
    big blocks, no trimming of the heap); True where it applied (Linux with glibc).

    A detector's activations at 640x640 are tens of MB each, above glibc's largest mmap threshold (32 MB), so
    every PyTorch tensor of that size was a fresh mapping whose pages the kernel zeroes on first touch, and every
    free returned it: measured here, calibrating yolov5n (batch 8) took 1.6x as long, its FP32 forward 1.3x. The
    cost is that the process keeps its peak heap until it exits, which is what a command wants and a library
    must not impose: the command line calls this (``cli.main``), the library never does."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

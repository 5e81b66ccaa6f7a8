"""The CPU this process runs on, as far as onnxruntime's int8 kernels care.

On x86 CPUs with AVX2 but no VNNI (AVX-512 VNNI or AVX-VNNI), onnxruntime's uint8 x int8 GEMM and conv kernels
multiply with ``vpmaddubsw``, which adds each pair of adjacent products in saturating int16: weights of magnitude
above 64 can overflow that sum and silently change results. VNNI (``vpdpbusd``) and ARM kernels accumulate in
int32 and are exact. This module only reads ``/proc/cpuinfo``; the choices built on it are in ``config``
(``PTQConfig.weight_range``) and ``export.onnx_qdq`` (weight containers).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

__all__ = ["cpu_flags", "cpu_name", "int8_weights_saturate"]

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

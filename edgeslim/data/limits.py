"""Refuse, up front and with the size, inputs that would need more memory than the machine has.

An ``.npy`` header is a few bytes that can declare terabytes; ``np.load`` would try to allocate them (MemoryError, or
the kernel's OOM killer). ``array_header`` reads only the header, so the size is known before anything is allocated.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from ..errors import EdgeslimError

__all__ = ["ACTIVATION_FACTOR", "machine_memory_bytes", "human_bytes", "check_fits", "array_header", "array_nbytes",
           "check_array_header", "check_input_shape"]


ACTIVATION_FACTOR = 16  # a forward pass holds several activations of the input's size at once


def machine_memory_bytes() -> int:
    """Physical memory of this machine (8 GiB when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Raise when ``nbytes`` exceeds half of this machine's memory."""
    limit = machine_memory_bytes() // 2
    if nbytes > limit:
        raise EdgeslimError(f"{what} needs {human_bytes(nbytes)} but this machine has "
                            f"{human_bytes(machine_memory_bytes())} of memory: {fix}")


def array_header(f: BinaryIO, shown: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of an ``.npy`` stream, without reading its data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise EdgeslimError(f"'{shown}' has no valid .npy header ({str(exc)[:120]}): save it with np.save / "
                            "np.savez") from None
    return tuple(int(d) for d in shape), dtype


def array_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=object)) * int(dtype.itemsize)


def check_array_header(f: BinaryIO, shown: str) -> tuple[tuple[int, ...], np.dtype]:
    """Read an ``.npy`` header and refuse an array larger than the machine can hold; returns (shape, dtype)."""
    shape, dtype = array_header(f, shown)
    check_fits(array_nbytes(shape, dtype), f"'{shown}' (an array of shape {shape}, {dtype})",
               "pass a smaller array (a subset of the inputs)")
    return shape, dtype


def check_input_shape(shape: tuple[int, ...]) -> None:
    """Refuse a model input so large that one forward pass at batch 1 cannot fit in memory."""
    nbytes = int(np.prod(shape, dtype=object)) * 4
    check_fits(nbytes * ACTIVATION_FACTOR, f"input shape {','.join(map(str, shape))} ({human_bytes(nbytes)} per input, "
               "several times that for the activations)", "pass the model's real input size with --input-shape C,H,W")

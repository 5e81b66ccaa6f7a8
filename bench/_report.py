"""Write one benchmark's section into BENCHMARKS.md (between markers), with command, machine and date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from edgeslim.cpu import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# edgeslim benchmarks\n\nEvery section below is written by a script in `bench/`; the command, machine and date are in it.\n"


def machine() -> str:
    """CPU (with the VNNI / AVX2 flags that decide onnxruntime's int8 kernels), cores and package versions."""
    import onnxruntime
    import torch

    return (f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=False).stdout.strip() or "?"
    except OSError:
        return "?"


COMMIT = _commit()  # read when the benchmark starts: the code that produced the numbers


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, atomically."""
    stamp = (f"_Command: `{' '.join(['python', '-m', 'bench.' + Path(sys.argv[0]).stem, *sys.argv[1:]])}`; "
             f"machine: {machine()}; date: {datetime.date.today().isoformat()}; commit {COMMIT}._\n")
    block = f"<!-- bench:{name} -->\n{body.strip()}\n\n{stamp}<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)

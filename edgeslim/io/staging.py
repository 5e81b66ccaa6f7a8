"""Write a job's outputs atomically: everything goes to a staging folder inside ``out`` and is moved in at the end,
``summary.json`` last, so a failed run never leaves a partial summary (or a half-written model) behind."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def staged(out: str | Path, work: Callable[[Path], dict]) -> dict:
    """Run ``work(stage)``; it writes its files into ``stage`` and returns the summary, written as ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        summary = work(stage)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        for f in sorted((p for p in stage.iterdir() if p.is_file()), key=lambda p: p.name == "summary.json"):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary

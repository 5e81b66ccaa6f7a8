"""Write a job's outputs atomically: everything goes to a staging folder inside ``out`` and is moved in at the end,
``summary.json`` last, so a failed run never leaves a partial summary (or a half-written model) behind.

Staging folders are named ``.staging-<pid>-<random>``: a run killed with SIGKILL cannot clean up, so the next run
into the same ``--out`` removes the staging folders of processes that no longer exist (``sweep_stale``). SIGTERM is
turned into ``KeyboardInterrupt`` (``sigterm_as_interrupt``) so the ``finally`` blocks that remove staging folders
run on SIGTERM as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import EdgeslimError

__all__ = ["STAGE_PREFIX", "new_stage", "staged", "process_alive", "sweep_stale", "check_out_folder",
           "untouched_on_failure", "sigterm_as_interrupt"]


STAGE_PREFIX = ".staging-"
_OWNED = re.compile(r"^\.staging-(\d+)-")


def new_stage(out: str | Path) -> Path:
    """A fresh, private staging folder inside ``out`` (created), named with this process's id."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out))


def staged(out: str | Path, work: Callable[[Path], dict]) -> dict:
    """Run ``work(stage)``; it writes its files into ``stage`` and returns the summary, written as ``summary.json``."""
    out = Path(out)
    stage = new_stage(out)
    try:
        summary = work(stage)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        for f in sorted((p for p in stage.iterdir() if p.is_file()), key=lambda p: p.name == "summary.json"):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:
        return False
    return True


def sweep_stale(out: str | Path) -> list[Path]:
    """Remove the staging folders in ``out`` left by processes that died (SIGKILL, power loss); return them."""
    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for p in out.iterdir():
        m = _OWNED.match(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_out_folder(out: str | Path, shown: str | None = None) -> Path:
    """Refuse an ``--out`` that cannot hold results, before any work: an existing file, a path below a file, a
    read-only folder. Returns the path."""
    out = Path(out).expanduser()
    shown = shown if shown is not None else str(out)
    if out.exists() and not out.is_dir():
        raise EdgeslimError(f"--out {shown} is an existing file, not a folder: pass a folder for the results")
    base = out
    while not base.exists():  # the nearest existing ancestor must be a folder we may create folders in
        if base.is_symlink():
            raise EdgeslimError(f"--out {shown} goes through the dangling link {base}: pass another folder")
        base = base.parent
    if not base.is_dir():
        raise EdgeslimError(f"--out {shown} is below {base}, which is a file, not a folder: pass another --out")
    if _read_only(base):
        what = "is" if base == out else f"would be created in {base}, which is"
        raise EdgeslimError(f"--out {shown} {what} read-only: pass a writable folder (or make it writable)")
    return out


def _read_only(path: Path) -> bool:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        mode = path.stat().st_mode
    except OSError:
        return True
    return not os.access(path, os.W_OK | os.X_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


@contextlib.contextmanager
def untouched_on_failure(out: str | Path | None) -> Iterator[None]:
    """A run that fails leaves no trace: an ``out`` folder it created, still empty, is removed again."""
    path = Path(out).expanduser() if out is not None and str(out).strip() else None
    existed = path is None or path.exists() or path.is_symlink()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        raise


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C does), so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

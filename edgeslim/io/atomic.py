"""Atomic file writes that never follow a planted link.

A fixed temporary name (``dest.tmp``) is a hazard: a symlink planted under that name makes the writer write wherever
it points. Temporary files are therefore created with ``tempfile.mkstemp`` (``O_CREAT | O_EXCL``: a fresh file,
never an existing path or link) in the destination's folder, then renamed over the destination (``os.replace``
replaces a link at ``dest`` itself, it does not write through it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import EdgeslimError

__all__ = ["check_destination", "atomic_path", "atomic_write_bytes"]


def check_destination(path: str | Path, what: str = "output file") -> Path:
    """``path`` must name a file in an existing folder, not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise EdgeslimError(f"{what} {path} is a folder: pass a file name inside it, e.g. {path / 'model.onnx'}")
    parent = path.parent
    if not parent.is_dir():
        what_is = "does not exist" if not parent.exists() else "is not a folder"
        raise EdgeslimError(f"the folder of {what} {path} {what_is}: create it first (mkdir -p {parent}) or pass "
                            "another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output file") -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` (created with O_EXCL); on success it replaces ``path``,
    on failure it is removed."""
    path = check_destination(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EdgeslimError(f"cannot write {what} {path} ({exc.strerror or exc}): check the folder's permissions") \
            from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the result the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "output file") -> Path:
    """Write ``data`` to ``path`` atomically, through a fresh temporary file (never a planted link)."""
    path = Path(path)
    with atomic_path(path, what) as tmp:
        with open(tmp, "r+b") as f:
            f.write(data)
            f.truncate()
    return path

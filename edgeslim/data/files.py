"""Encoded image files (JPEG/PNG/...) from an ImageFolder directory or a zip of one.

Layout follows torchvision's ImageFolder (``root/<class>/**/<img>``, classes sorted by name
give the label order) so labels match models trained with it. Zips are read member by member,
never extracted: data sets stay read-only and nothing is left behind on disk.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

try:  # a dependency; without it (a platform with no wheel) PIL decodes every image
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

from edgeslim.errors import EdgeslimError
from edgeslim.data.transforms import (
    HIGH_DEPTH_MODES,
    Preprocess,
    high_depth_to_unit,
    needs_resize,
    normalize_uint8,
    normalize_unit,
    pil_to_uint8,
    unit_float_resized,
)

__all__ = ["IMAGE_EXTENSIONS", "SPLIT_NAMES", "hidden_path", "image_folder_layout", "walk_folder", "ZipReader",
           "parent_folders", "zip_names", "zip_member", "open_zip", "read_file", "decode_image", "default_workers",
           "FileSource", "folder_source", "zip_source"]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_EXT_TEXT = "/".join(IMAGE_EXTENSIONS)
# Top-level folder names that mean "several splits in one archive", not classes.
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation", "eval"})


def hidden_path(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def image_folder_layout(
    files: list[str], dirs: set[str], where: str, *, allow_strip: bool = True
) -> tuple[list[str], list[str], np.ndarray, str]:
    """Class names, image paths and labels from relative posix paths under a root.

    A single top-level folder holding class folders (``test/<class>/<img>``) is taken as the
    root when ``allow_strip``; several split-like top-level folders (train/test) are refused
    so they are never mistaken for two classes. Returns ``(classes, images, labels, prefix)``
    where ``prefix`` is the stripped folder ('' if none).
    """
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not hidden_path(f.split("/"))]
    if not images:
        raise EdgeslimError(
            f"data {where} has no images ({_EXT_TEXT}): pass an ImageFolder root with one "
            "sub-folder per class"
        )
    split_parts = [f.split("/") for f in images]
    tops = sorted({p[0] for p in split_parts if len(p) >= 2})
    prefix = ""
    if allow_strip and len(tops) == 1 and all(len(p) >= 3 for p in split_parts):
        prefix = tops[0]
        split_parts = [p[1:] for p in split_parts]
        dirs = {d[len(prefix) + 1 :] for d in dirs if d.startswith(prefix + "/")}
    elif (
        allow_strip
        and len(tops) > 1
        and set(tops) <= SPLIT_NAMES
        and all(len(p) >= 3 for p in split_parts)
    ):
        raise EdgeslimError(
            f"data {where} holds the splits {', '.join(tops)}: pass split= one of them "
            f"(e.g. split='{tops[-1]}')"
        )
    split_parts = [p for p in split_parts if len(p) >= 2]
    if not split_parts:
        raise EdgeslimError(
            f"data {where} has images but no class sub-folders: put each class's images "
            "in root/<class>/ (ImageFolder layout)"
        )
    classes = sorted({p[0] for p in split_parts})
    class_dirs = {d.split("/")[0] for d in dirs if d and not hidden_path(d.split("/"))}
    empty = sorted(class_dirs - set(classes))
    if empty:
        raise EdgeslimError(
            f"class folder '{empty[0]}' in data {where} has no images ({_EXT_TEXT}): add images "
            "or remove the folder (labels follow the sorted class folders)"
        )
    index = {c: i for i, c in enumerate(classes)}
    rel = sorted("/".join(p) for p in split_parts)
    labels = np.asarray([index[r.split("/", 1)[0]] for r in rel], dtype=np.int64)
    full = [f"{prefix}/{r}" if prefix else r for r in rel]
    return classes, full, labels, prefix


def walk_folder(root: Path) -> tuple[list[str], set[str]]:
    """All files and folders under ``root`` as sorted relative posix paths (follows links, each real folder once:
    a link back to a parent folder is not walked again, so a link loop cannot hang the walk)."""
    files: list[str] = []
    dirs: set[str] = set()
    seen: set[str] = set()
    for cur, dnames, fnames in os.walk(root, followlinks=True):
        real = os.path.realpath(cur)
        if real in seen:
            dnames[:] = []
            continue
        seen.add(real)
        rel = Path(cur).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        dnames[:] = sorted(d for d in dnames if not d.startswith(".")
                           and os.path.realpath(os.path.join(cur, d)) not in seen)
        dirs.update(rel + d for d in dnames)
        files.extend(rel + f for f in fnames)
    return sorted(files), dirs


class ZipReader:
    """Thread-safe member reads from one zip; reopens after fork so workers never share a handle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            try:
                self._zf = shared_zip(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise EdgeslimError(f"'{self.path}' is not a readable zip file ({exc}): re-create the zip") from None
            self._pid = os.getpid()
        return self._zf

    def names(self) -> tuple[list[str], set[str]]:
        """Member files and folders (including implied parent folders)."""
        with self._lock:
            infos = self._zip().infolist()
        files = sorted(i.filename for i in infos if not i.is_dir())
        dirs = {i.filename.rstrip("/") for i in infos if i.is_dir()}
        return files, dirs | parent_folders(files)

    def read(self, name: str) -> bytes:
        with self._lock:
            return zip_member(self._zip(), name, self.path)

    def close(self) -> None:
        with self._lock:
            self._zf = None  # the handle is the process's (``shared_zip``): other readers of the file may hold it

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def parent_folders(files: list[str]) -> set[str]:
    """Every folder above each ``a/b/c.jpg`` (``a``, ``a/b``), each distinct parent walked up once."""
    dirs: set[str] = set()
    for parent in {f.rpartition("/")[0] for f in files if "/" in f}:
        parts = parent.split("/")
        for k in range(len(parts), 0, -1):
            d = "/".join(parts[:k])
            if d in dirs:
                break
            dirs.add(d)
    return dirs


@functools.lru_cache(maxsize=8)
def _archive(path: str, size: int, mtime_ns: int, pid: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def shared_zip(path: Path) -> zipfile.ZipFile:
    """One open ``ZipFile`` per version of the file (path, size, modification time) per process, for listing and
    reading alike: its central directory is parsed once (CIFAR-10's 50,000 members: about 0.7 s a parse here, and
    deciding the task, opening the data set and reading it each needed one). ``ZipFile`` reads members through a
    locked shared file, so readers in threads may share it; a forked worker opens its own. Raises what
    ``zipfile`` raises."""
    st = Path(path).stat()
    return _archive(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, os.getpid())


@functools.lru_cache(maxsize=8)
def _listing(zf: zipfile.ZipFile) -> tuple[str, ...]:
    return tuple(zf.namelist())


def zip_names(path: Path) -> tuple[str, ...]:
    """The member names of a zip (``shared_zip``'s, listed once). Raises what ``zipfile`` raises."""
    return _listing(shared_zip(path))


def zip_member(zf: zipfile.ZipFile, name: str, path) -> bytes:
    """The bytes of one member; a damaged, encrypted or unknown-method member is one ``EdgeslimError``."""
    try:
        return zf.read(name)
    except RuntimeError as exc:  # zipfile: "File ... is encrypted, password required for extraction"
        raise EdgeslimError(f"cannot read '{name}' from zip '{path}' ({exc}): re-create the zip without a "
                            "password") from None
    except NotImplementedError as exc:
        raise EdgeslimError(f"cannot read '{name}' from zip '{path}' ({exc}): re-create the zip with the standard "
                            "deflate compression (zip -r, or shutil.make_archive)") from None
    except (zipfile.BadZipFile, zlib.error, OSError, KeyError, EOFError, ValueError) as exc:
        raise EdgeslimError(f"cannot read '{name}' from zip '{path}' (the member is damaged: {str(exc)[:120]}): "
                            "re-create the zip") from None


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EdgeslimError(f"'{path}' is not a readable zip file ({exc}): re-create the zip") from None


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EdgeslimError(f"cannot read image '{path}' ({exc.strerror or exc}): check the file and its permissions") from None


def decode_image(data: bytes, pp: Preprocess, shown: str) -> np.ndarray:
    """Encoded bytes -> ``H,W,C`` at the model's size: uint8, or float32 in [0, 1] for 16-bit grayscale images
    (kept at full precision instead of saturating at 255); a bad file raises naming it."""
    fast = _jpeg_at_size(data, pp)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width == 0 or img.height == 0:
                raise ValueError("the image has no pixels")
            if img.mode in HIGH_DEPTH_MODES:
                return unit_float_resized(high_depth_to_unit(img), pp)
            return pil_to_uint8(img, pp)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise EdgeslimError(
            f"image '{shown}' is unreadable or corrupt ({exc}): re-encode it or remove it from the data set"
        ) from None


# JPEG components -> the channels a model takes, for the fast path: colour JPEGs (YCbCr) to RGB, gray to gray
_JPEG_FAST = {("YCbCr", 3): "RGB", ("Gray", 1): "Gray"}


def _jpeg_at_size(data: bytes, pp: Preprocess) -> np.ndarray | None:
    """A JPEG that is already the model's size, decoded by libjpeg-turbo straight into an array (simplejpeg), or
    None for everything else (PIL decodes it). PIL decodes with the same library and settings (accurate integer
    IDCT, fancy upsampling), so the pixels are the same bits (tests/data/test_data.py checks the subsamplings,
    gray, progressive and restart-marker JPEGs); this skips PIL's per-image Python work, most of a 32x32 decode."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        target = _JPEG_FAST.get((space, pp.channels))
        if target is None or needs_resize(w, h, pp):
            return None
        arr = simplejpeg.decode_jpeg(data, colorspace=target, fastdct=False, fastupsample=False)
    except ValueError:  # simplejpeg's error for anything libjpeg-turbo refuses: PIL names the problem
        return None
    return arr if arr.ndim == 3 else arr[:, :, None]


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class FileSource:
    """Decodes images by index; ``load`` spreads work over threads (PIL releases the GIL)."""

    def __init__(
        self,
        names: list[str],
        read: Callable[[str], bytes],
        shown: Callable[[str], str],
        pp: Preprocess,
        workers: int | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.names = names
        self._read = read
        self._shown = shown
        self.pp = pp
        self.workers = workers or default_workers()
        self._close = close

    def __len__(self) -> int:
        return len(self.names)

    def load(self, idx: np.ndarray) -> np.ndarray:
        c, h, w = self.pp.input_shape
        raw = np.empty((len(idx), h, w, c), np.uint8)
        # Reads stay on this thread (zip access is serialized anyway); only decoding,
        # which releases the GIL inside PIL, is spread over threads in large chunks.
        names = [self.names[int(i)] for i in idx]
        blobs = [self._read(n) for n in names]

        unit: dict[int, np.ndarray] = {}  # 16-bit images, decoded to floats in [0, 1]

        def work(a: int, b: int) -> None:
            for j in range(a, b):
                img = decode_image(blobs[j], self.pp, self._shown(names[j]))
                if img.dtype == np.uint8:
                    raw[j] = img
                else:
                    unit[j] = img

        n_chunks = min(len(idx) // 256, self.workers)
        if n_chunks <= 1:
            work(0, len(idx))
        else:
            bounds = np.linspace(0, len(idx), n_chunks + 1).astype(int)
            with ThreadPoolExecutor(n_chunks) as ex:
                futures = [ex.submit(work, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
                for f in futures:
                    f.result()
        out = normalize_uint8(raw, self.pp)
        for j, img in unit.items():
            out[j] = normalize_unit(img, self.pp)
        return out

    def close(self) -> None:
        if self._close is not None:
            self._close()


def folder_source(root: Path, pp: Preprocess, split: str | None, workers: int | None):
    """ImageFolder directory -> (source, labels, classes, description)."""
    if split is not None:
        sub = root / split
        if not sub.is_dir():
            found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            raise EdgeslimError(
                f"unknown split '{split}': folder '{root}' has sub-folders "
                f"{', '.join(found) or '(none)'}; pass one of them or no split"
            )
        root = sub
    files, dirs = walk_folder(root)
    classes, names, labels, prefix = image_folder_layout(
        files, dirs, f"folder '{root}'", allow_strip=split is None
    )
    base = root / prefix if prefix else root
    src = FileSource(names, lambda n: read_file(root / n), lambda n: str(root / n), pp, workers)
    return src, labels, classes, f"folder:{base}"


def zip_source(path: Path, pp: Preprocess, split: str | None, workers: int | None):
    """Zip of an ImageFolder (class folders at the top, or one top folder that is the root)."""
    reader = ZipReader(path)
    files, dirs = reader.names()
    if split is not None:
        tops = sorted({f.split("/")[0] for f in files if "/" in f and not hidden_path(f.split("/"))})
        if split not in tops:
            reader.close()
            raise EdgeslimError(
                f"unknown split '{split}': zip '{path}' has top-level folders "
                f"{', '.join(tops) or '(none)'}; pass one of them or no split"
            )
        files = [f[len(split) + 1 :] for f in files if f.startswith(split + "/")]
        dirs = {d[len(split) + 1 :] for d in dirs if d.startswith(split + "/")}
    try:
        classes, names, labels, prefix = image_folder_layout(
            files, dirs, f"zip '{path}'" + (f" split '{split}'" if split else ""),
            allow_strip=split is None,
        )
    except EdgeslimError:
        reader.close()
        raise
    if split is not None:
        names = [f"{split}/{n}" for n in names]
        prefix = split
    src = FileSource(names, reader.read, lambda n: f"{path}:{n}", pp, workers, reader.close)
    return src, labels, classes, f"zip:{path}" + (f"[{prefix}]" if prefix else "")

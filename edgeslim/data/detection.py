"""YOLO-format detection data (directory or zip) with letterbox preprocessing (numpy + PIL).

Layout (the one YOLOv5/YOLOv8 data sets use): images under ``.../images/<split>/``; the label
file of an image is found by replacing the **last** ``images`` path component with ``labels``
and the extension with ``.txt`` (``coco128/images/val2017/x.jpg`` ->
``coco128/labels/val2017/x.txt``). A label line is ``cls cx cy w h``, normalized to [0, 1];
an empty or missing label file means an image without objects. Class names come from a YAML
at the data set root (``config.yaml``, ``data.yaml``, then any ``*.yaml``; ``names:`` as a
list or an ``{id: name}`` dict) or from ``names=``. A folder of images without labels opens
too (``has_labels`` is False): enough for calibration.

Letterbox (the YOLO evaluation convention, square only): scale ``r = min(S/h, S/w)`` (upscaling
allowed), bilinear resize with PIL to ``round(w r) x round(h r)``, pad to ``S x S`` centered with
gray 114. Boxes are returned in letterboxed pixels, ``x' = x r + pad``; :func:`to_original`
inverts that. Pixels are taken as stored (no EXIF rotation), the frame COCO annotates in.

Example::

    ds = open_detection("../shared/data/coco128.zip", "val2017", imgsz=640)
    for x, targets, metas in ds.batches(16):   # x: N,3,640,640 float32 in [0, 1]
        ...
"""

from __future__ import annotations

import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, NamedTuple

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from edgeslim.errors import EdgeslimError
from edgeslim.data.transforms import HIGH_DEPTH_MODES, high_depth_to_unit
from edgeslim.data.files import IMAGE_EXTENSIONS, ZipReader, hidden_path, read_file, walk_folder

__all__ = ["PAD_VALUE", "Target", "ImageMeta", "letterbox_geometry", "letterbox", "to_original", "label_path",
           "parse_labels", "DetectionDataset", "MAX_YAML_BYTES", "MAX_YAML_NODES", "load_small_yaml", "open_detection"]


PAD_VALUE = 114
_EXT_TEXT = "/".join(IMAGE_EXTENSIONS)
_YAML_FIRST = ("config.yaml", "data.yaml")


class Target(NamedTuple):
    """Objects of one image: ``boxes`` (k, 4) xyxy float32 in letterboxed pixels, ``classes`` (k,) int64."""

    boxes: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class ImageMeta:
    """Where one letterboxed image came from: enough to map boxes back and to name it."""

    index: int
    name: str  # path inside the zip or folder
    image_id: int | str  # file stem, as an int when numeric (COCO ids: 000000000139 -> 139)
    orig_hw: tuple[int, int]
    ratio: float
    pad: tuple[int, int]  # (dw, dh): left and top padding in pixels


def letterbox_geometry(h: int, w: int, imgsz: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """``(r, (new_w, new_h), (dw, dh))`` for an ``h x w`` image letterboxed to ``imgsz`` square."""
    r = min(imgsz / h, imgsz / w)
    nw, nh = min(imgsz, max(1, round(w * r))), min(imgsz, max(1, round(h * r)))
    return r, (nw, nh), ((imgsz - nw) // 2, (imgsz - nh) // 2)


def letterbox(img: Image.Image, imgsz: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """PIL image -> ``(3, S, S)`` float32 RGB in [0, 1], ratio ``r`` and pad ``(dw, dh)``.

    16-bit grayscale images keep their precision (resized in float mode, value / 65535) instead of saturating."""
    wide = img.mode in HIGH_DEPTH_MODES
    if wide:
        img = Image.fromarray(high_depth_to_unit(img)[:, :, 0] * np.float32(255.0), mode="F")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError("the image has no pixels")
    r, (nw, nh), (dw, dh) = letterbox_geometry(h, w, imgsz)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    canvas = np.full((imgsz, imgsz, 3), PAD_VALUE, np.float32 if wide else np.uint8)
    pixels = np.asarray(img, np.float32 if wide else np.uint8)
    canvas[dh : dh + nh, dw : dw + nw] = pixels[:, :, None] if wide else pixels
    out = np.ascontiguousarray(canvas.transpose(2, 0, 1)).astype(np.float32)
    out /= np.float32(255.0)
    return out, r, (dw, dh)


def to_original(boxes: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Letterboxed xyxy boxes (k, >=4) -> original-image pixels, clipped to the image.

    Extra columns (score, class) are passed through, so detections map back in one call.
    """
    out = np.array(boxes, dtype=np.float32, copy=True, ndmin=2)
    dw, dh = meta.pad
    h, w = meta.orig_hw
    out[:, [0, 2]] = np.clip((out[:, [0, 2]] - dw) / meta.ratio, 0, w)
    out[:, [1, 3]] = np.clip((out[:, [1, 3]] - dh) / meta.ratio, 0, h)
    return out


def label_path(image: str) -> str | None:
    """Label file for an image path: last ``images`` component -> ``labels``, extension -> ``.txt``."""
    p = PurePosixPath(image)
    parts = list(p.parts)
    hits = [i for i, c in enumerate(parts[:-1]) if c == "images"]
    if not hits:
        return None
    parts[hits[-1]] = "labels"
    return str(PurePosixPath(*parts).with_suffix(".txt"))


def parse_labels(text: str, shown: str) -> np.ndarray:
    """YOLO label text -> (k, 5) float64 ``[cls, cx, cy, w, h]``; a malformed line raises naming it."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            vals = [float(v) for v in fields]
        except ValueError:
            vals = []
        bad = ""
        if len(fields) != 5 or not vals:
            bad = "is not 'cls cx cy w h' (5 numbers)"
        elif not all(np.isfinite(vals)) or vals[0] < 0 or vals[0] != int(vals[0]):
            bad = "has a class id that is not a non-negative integer or a non-finite value"
        elif min(vals[1:]) < 0 or max(vals[1:]) > 1 + 1e-3:
            bad = "has coordinates outside [0, 1] (YOLO labels are normalized by the image size)"
        if bad:
            raise EdgeslimError(
                f"label file '{shown}' line {lineno} {bad}: fix or remove the line ({line.strip()!r})"
            )
        rows.append(vals)
    return np.asarray(rows, np.float64).reshape(-1, 5)


def _names_from(value, shown: str) -> list[str]:
    if isinstance(value, dict):
        try:
            items = sorted((int(k), str(v)) for k, v in value.items())
        except (TypeError, ValueError):
            items = []
        if not items or [k for k, _ in items] != list(range(len(items))):
            raise EdgeslimError(
                f"class names in {shown} must have ids 0..n-1: pass names as a list or {{0: name, ...}}"
            )
        return [v for _, v in items]
    if isinstance(value, (list, tuple)) and value:
        return [str(v) for v in value]
    raise EdgeslimError(
        f"class names in {shown} are not a list or {{id: name}} dict: pass e.g. names: [person, car]"
    )


class _Reader:
    """Files under one root, folder or zip: relative posix names, read as bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = ZipReader(path) if path.is_file() else None
        self.files, _ = self.zip.names() if self.zip else walk_folder(path)
        self._set = set(self.files)

    def has(self, name: str) -> bool:
        return name in self._set

    def read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip else read_file(self.path / name)

    def shown(self, name: str) -> str:
        return f"{self.path}:{name}" if self.zip else str(self.path / name)

    def close(self) -> None:
        if self.zip:
            self.zip.close()


class DetectionDataset:
    """Letterboxed images with their boxes; built by :func:`open_detection`.

    ``ds[i]`` is ``(image (3, S, S) float32, Target, ImageMeta)``; ``batches`` stacks them.
    Labels are parsed when the set is opened (errors show up front), pixels decoded on use.
    """

    def __init__(
        self,
        reader: _Reader,
        images: list[str],
        labels: list[np.ndarray],
        names: list[str],
        *,
        imgsz: int,
        has_labels: bool,
        name: str,
    ) -> None:
        self._reader = reader
        self.images = images
        self._labels = labels
        self.names = names
        self.imgsz = imgsz
        self.has_labels = has_labels
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def num_boxes(self) -> int:
        return int(sum(len(lab) for lab in self._labels))

    def __getitem__(self, i: int) -> tuple[np.ndarray, Target, ImageMeta]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i = int(i) % n
        member = self.images[i]
        shown = self._reader.shown(member)
        try:
            with Image.open(io.BytesIO(self._reader.read(member))) as img:
                w, h = img.size
                x, r, pad = letterbox(img, self.imgsz)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise EdgeslimError(
                f"image '{shown}' is unreadable or corrupt ({exc}): re-encode it or remove it"
            ) from None
        lab = self._labels[i]
        cx, cy, bw, bh = (lab[:, k] for k in range(1, 5))
        xyxy = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], axis=1)
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, w) * r + pad[0]
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, h) * r + pad[1]
        stem = PurePosixPath(member).stem
        meta = ImageMeta(i, member, int(stem) if stem.isdigit() else stem, (h, w), r, pad)
        return x, Target(xyxy.astype(np.float32), lab[:, 0].astype(np.int64)), meta

    def batches(
        self, batch_size: int, *, desc: str | None = None
    ) -> Iterator[tuple[np.ndarray, list[Target], list[ImageMeta]]]:
        """Yield ``(x N,3,S,S float32, targets, metas)`` in order; the next batch decodes in a thread.

        With ``desc`` a tqdm bar on stderr counts images.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise EdgeslimError(f"batch size {batch_size!r} is not a positive integer: pass e.g. 16")
        starts = range(0, len(self), int(batch_size))

        def load(a: int):
            items = [self[j] for j in range(a, min(a + int(batch_size), len(self)))]
            return np.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]

        bar = tqdm(total=len(self), desc=desc, unit="img", mininterval=0.5) if desc is not None else None
        pool = ThreadPoolExecutor(1)
        pending: Future | None = None
        try:
            for k, a in enumerate(starts):
                out = pending.result() if pending is not None else load(a)
                pending = pool.submit(load, starts[k + 1]) if k + 1 < len(starts) else None
                yield out
                if bar is not None:
                    bar.update(len(out[1]))
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()

    def subset_indices(self, n: int, seed: int = 0) -> np.ndarray:
        """The indices ``subset(n, seed)`` keeps, in file order."""
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise EdgeslimError(f"subset size {n!r} is not a positive integer: pass e.g. 64")
        if n >= len(self):
            return np.arange(len(self))
        return np.sort(np.random.default_rng(seed).choice(len(self), int(n), replace=False))

    def subset(self, n: int, seed: int = 0) -> "DetectionDataset":
        """A seeded random ``n`` images (kept in file order); ``n >= len`` keeps all. Shares the reader."""
        idx = self.subset_indices(n, seed)
        return DetectionDataset(
            self._reader, [self.images[i] for i in idx], [self._labels[i] for i in idx], self.names,
            imgsz=self.imgsz, has_labels=self.has_labels, name=f"{self.name}[subset {len(idx)}]",
        )

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "DetectionDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({self.name!r}, n={len(self)}, boxes={self.num_boxes()}, "
            f"classes={self.num_classes}, imgsz={self.imgsz})"
        )


def _select_images(files: list[str], split: str | None, where: str) -> list[str]:
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not hidden_path(f.split("/"))]
    if not images:
        raise EdgeslimError(f"data {where} has no images ({_EXT_TEXT}): pass a YOLO data set or a folder of images")
    splits: dict[str, list[str]] = {}
    for f in images:
        parts = f.split("/")[:-1]
        for i in range(len(parts) - 1):
            if parts[i] == "images":
                splits.setdefault(parts[i + 1], []).append(f)
    if split is None:
        if len(splits) > 1:
            found = ", ".join(sorted(splits))
            raise EdgeslimError(f"data {where} holds the splits {found}: pass split= one of them")
        return images
    if split in splits:
        return splits[split]
    fallback = [f for f in images if split in f.split("/")[:-1]]
    if fallback:
        return fallback
    found = ", ".join(sorted(splits)) or "(none: no images/<split>/ folders)"
    raise EdgeslimError(f"data {where} has no images for split '{split}': splits found: {found}")


def _yaml_order(here: set[str]) -> list[str]:
    first = [f for f in _YAML_FIRST if f in here]
    return first + sorted(f for f in here if f.lower().endswith((".yaml", ".yml")) and f not in _YAML_FIRST)


MAX_YAML_BYTES = 1 << 20  # a data set's class-name file is a few KiB
MAX_YAML_NODES = 1_000_000  # "billion laughs": nested aliases expand to billions of nodes from a few lines


def _expanded_size(node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (safe_load builds it as a cycle, not an expansion)
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        total = 1
    memo[key] = min(total, MAX_YAML_NODES + 1)
    return memo[key]


class _LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand to more than ``MAX_YAML_NODES`` nodes."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases (*name) expand to more than {MAX_YAML_NODES:,} nodes: an alias bomb, "
                                 "not a data set file")
        return node


def load_small_yaml(data: bytes, shown: str):
    """A data set's YAML file, parsed safely: at most ``MAX_YAML_BYTES``, aliases expanding to at most
    ``MAX_YAML_NODES`` nodes."""
    if len(data) > MAX_YAML_BYTES:
        raise EdgeslimError(f"'{shown}' is {len(data) >> 10} KiB, too large for a data set's YAML file (at most "
                            f"{MAX_YAML_BYTES >> 10} KiB): pass the file with the class names")
    loader = _LimitedLoader(data)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _find_names(reader: _Reader, images: list[str], root: Path | None) -> list[str] | None:
    """Names from the first YAML with ``names:``: the data set root (parent of ``images``) first.

    Then the path's root and its top folder; for a folder given inside ``images/``, the
    folder above that ``images``.
    """
    parts = images[0].split("/")[:-1]
    hits = [i for i, c in enumerate(parts) if c == "images"]
    folders = (["/".join(parts[: hits[-1]])] if hits else []) + ["", parts[0] if parts else ""]
    candidates: list[tuple[str, Callable[[], bytes]]] = []
    for folder in dict.fromkeys(folders):
        pre = folder + "/" if folder else ""
        here = {f[len(pre) :] for f in reader.files if f.startswith(pre) and "/" not in f[len(pre) :]}
        candidates += [(reader.shown(pre + f), partial(reader.read, pre + f)) for f in _yaml_order(here)]
    if root is not None and not hits:
        full = root.resolve().parts
        up = [i for i, c in enumerate(full) if c == "images"]
        if up:
            base = Path(*full[: up[-1]])
            here = {q.name for q in base.iterdir() if q.is_file()}
            candidates += [(str(base / f), (base / f).read_bytes) for f in _yaml_order(here)]
    for shown, read in candidates:
        try:
            doc = load_small_yaml(read(), shown)
        except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EdgeslimError(f"'{shown}' is not valid YAML ({first}): fix it or pass names=") from None
        if isinstance(doc, dict) and "names" in doc:
            return _names_from(doc["names"], f"'{shown}'")
    return None


def _load_labels(reader: _Reader, images: list[str], root: Path | None) -> tuple[list[np.ndarray], list[str]]:
    """(k, 5) label arrays per image (empty when its file is missing) and the label files read ('' if none)."""
    labels, shown_all = [], []
    for img in images:
        lab = label_path(img)
        if lab is not None or root is None:  # the labels folder is inside the folder or zip
            text = reader.read(lab).decode("utf-8", "replace") if lab is not None and reader.has(lab) else None
            shown = reader.shown(lab) if lab is not None else ""
        else:  # a folder given inside images/: its labels live outside it
            full = label_path((root.resolve() / img).as_posix())
            text = Path(full).read_text("utf-8", "replace") if full and Path(full).is_file() else None
            shown = str(full)
        labels.append(parse_labels(text, shown) if text is not None else np.zeros((0, 5)))
        shown_all.append(shown if text is not None else "")
    return labels, shown_all


def open_detection(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    imgsz: int = 640,
    names: list[str] | dict[int, str] | None = None,
) -> DetectionDataset:
    """Open a YOLO-format detection set (folder or ``.zip``, read in place) letterboxed to ``imgsz``.

    ``split`` picks ``images/<split>/`` (e.g. ``'val2017'``); ``names`` overrides the YAML.
    """
    if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz <= 0:
        raise EdgeslimError(f"imgsz {imgsz!r} is not a positive integer: pass e.g. 640")
    if split is not None and (not isinstance(split, str) or not split or "/" in split or split in (".", "..")):
        raise EdgeslimError(f"unknown split {split!r}: pass a plain folder name such as 'val2017'")
    p = Path(path).expanduser()
    if not p.exists():
        raise EdgeslimError(f"data path '{p}' does not exist: pass a YOLO data set folder or .zip")
    if p.is_file() and not p.name.lower().endswith(".zip"):
        raise EdgeslimError(f"data path '{p}' is not a folder or .zip: pass a YOLO data set folder or .zip")
    reader = _Reader(p)
    where = f"{'zip' if reader.zip else 'folder'} '{p}'"
    try:
        images = sorted(_select_images(reader.files, split, where))
        class_names = _names_from(names, "names=") if names is not None else _find_names(
            reader, images, None if reader.zip else p
        )
        labels, label_files = _load_labels(reader, images, None if reader.zip else p)
        found = sum(bool(f) for f in label_files)
        if found and class_names is None:
            raise EdgeslimError(
                f"data {where} has labels but no class names: add a data.yaml with names: or pass names="
            )
        class_names = class_names or []
        for shown, lab in zip(label_files, labels):
            if len(lab) and lab[:, 0].max() >= len(class_names):
                raise EdgeslimError(
                    f"label file '{shown}' has class id {int(lab[:, 0].max())} but there are {len(class_names)} "
                    "class names: fix the label or the names"
                )
    except EdgeslimError:
        reader.close()
        raise
    name = f"{'zip' if reader.zip else 'folder'}:{p}" + (f"[{split}]" if split else "")
    return DetectionDataset(reader, images, labels, class_names, imgsz=int(imgsz), has_labels=found > 0, name=name)

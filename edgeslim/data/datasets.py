"""``ImageDataset`` and ``open_dataset``: one interface over every supported data source.

Calibration and evaluation revisit the same images (several passes, several candidate
configurations), so decoded images are kept in one float32 array when the whole set fits
under ``max_cache_bytes``; images are decoded lazily, on first use, so picking 512
calibration images out of a large set never decodes the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeslim.errors import EdgeslimError
from edgeslim.data.arrays import cifar_source, digits_source, is_cifar_dir, npz_source
from edgeslim.data.files import folder_source, zip_source
from edgeslim.data.transforms import Preprocess

__all__ = ["DEFAULT_CACHE_BYTES", "DIGITS", "ImageDataset", "open_dataset"]


DEFAULT_CACHE_BYTES = 2 << 30  # 2 GiB
DIGITS = "sklearn-digits"
_KINDS = (
    "an ImageFolder directory, a .zip of one, a CIFAR python folder or .tar.gz, "
    f"an .npz with x/y, or '{DIGITS}'"
)


class _Source(Protocol):
    def __len__(self) -> int: ...

    def load(self, idx: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class _Rows:
    """Some rows of a data set, decoded through it (and its cache)."""

    def __init__(self, parent: "ImageDataset", idx: np.ndarray) -> None:
        self.parent, self.idx = parent, np.asarray(idx, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.idx)

    def load(self, idx: np.ndarray) -> np.ndarray:
        return self.parent.batch(self.idx[np.asarray(idx, dtype=np.int64)])

    def close(self) -> None:
        return None


class ImageDataset:
    """Labelled images, each returned as a preprocessed ``C,H,W`` float32 array.

    ``labels`` (int64) and ``classes`` are known up front; pixels are decoded on demand.
    ``get``/``batch`` return fresh arrays, so callers may modify them freely.
    """

    def __init__(
        self,
        source: _Source,
        labels: np.ndarray,
        classes: list[str],
        preprocess: Preprocess,
        *,
        name: str = "",
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        labels = np.asarray(labels)
        if len(source) == 0:
            raise EdgeslimError(f"data {name or 'set'} has no images: pass a data set with at least one image")
        if labels.ndim != 1 or len(labels) != len(source):
            raise EdgeslimError(
                f"data {name or 'set'} has {len(source)} images but {labels.size} labels: "
                "pass exactly one label per image"
            )
        labels = labels.astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise EdgeslimError(
                f"data {name or 'set'} has labels in [{labels.min()}, {labels.max()}] but "
                f"{len(classes)} classes: labels must be 0..{len(classes) - 1}"
            )
        labels.flags.writeable = False
        self._source = source
        self.labels = labels
        self.classes = list(classes)
        self.preprocess = preprocess
        self.name = name
        nbytes = len(labels) * int(np.prod(preprocess.input_shape)) * 4
        self._cache: np.ndarray | None = None
        self._have: np.ndarray | None = None
        if nbytes <= max_cache_bytes:
            # np.empty is not touched until written, so an unused cache costs no memory.
            self._cache = np.empty((len(labels),) + preprocess.input_shape, np.float32)
            self._have = np.zeros(len(labels), bool)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cached(self) -> bool:
        """True when decoded images are kept in memory (the set fits under the cache limit)."""
        return self._cache is not None

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1:
            idx = idx.reshape(-1)
        if idx.size == 0:
            return idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        n = len(self)
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"index out of range for data set of {n} images")
        return np.where(idx < 0, idx + n, idx).astype(np.int64)

    def batch(self, indices) -> np.ndarray:
        """Images at ``indices`` as one ``N,C,H,W`` float32 array."""
        idx = self._indices(indices)
        if self._cache is None or self._have is None:
            return self._source.load(idx)
        missing = np.unique(idx[~self._have[idx]])
        if missing.size:
            self._cache[missing] = self._source.load(missing)
            self._have[missing] = True
        return self._cache[idx]

    def get(self, i: int) -> np.ndarray:
        """Image ``i`` as a ``C,H,W`` float32 array."""
        return self.batch([int(i)])[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """``(image, label)``, the shape torch-style loaders expect."""
        x = self.get(i)
        return x, int(self.labels[int(i)])

    def load_all(self) -> np.ndarray:
        """Decode every image (fills the cache); returns ``N,C,H,W`` float32."""
        return self.batch(np.arange(len(self)))

    def subset(self, size: int, seed: int = 0) -> "ImageDataset":
        """A seeded, class-balanced subset of ``size`` images (``--eval-size``), sharing this set's files and
        decoded-image cache; ``size >= len`` keeps every image."""
        from edgeslim.data.sampling import calibration_indices

        if isinstance(size, bool) or int(size) != size or size <= 0:
            raise EdgeslimError(f"subset size {size!r} is not a positive integer: pass e.g. 500")
        if size >= len(self):
            return self
        idx = calibration_indices(len(self), int(size), seed, self.labels)
        return ImageDataset(_Rows(self, idx), self.labels[idx], self.classes, self.preprocess,
                            name=f"{self.name}[subset {len(idx)}]", max_cache_bytes=0)

    def close(self) -> None:
        """Release open files (zip handles); the cache stays usable."""
        self._source.close()

    def __enter__(self) -> "ImageDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, n={len(self)}, classes={len(self.classes)}, "
            f"input_shape={self.preprocess.input_shape})"
        )


def open_dataset(
    path: str | os.PathLike,
    preprocess: Preprocess,
    *,
    split: str | None = None,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    workers: int | None = None,
) -> ImageDataset:
    """Open a labelled image set, picking the reader from what ``path`` is.

    ``split`` picks a sub-folder (ImageFolder dir or zip), 'train'/'test' (CIFAR, default
    'test'; sklearn-digits, default all), or ``x_<split>``/``y_<split>`` arrays (npz).
    ``workers`` threads decode encoded images (default: CPU count, at most 8).
    """
    if not isinstance(preprocess, Preprocess):
        raise EdgeslimError(
            f"preprocess must be a Preprocess, got {type(preprocess).__name__}: "
            "pass Preprocess(input_shape=..., mean=..., std=...)"
        )
    if split is not None and (not isinstance(split, str) or not split or "/" in split or split in (".", "..")):
        raise EdgeslimError(f"unknown split {split!r}: pass a plain name such as 'train' or 'test'")
    if str(path) == DIGITS:
        src, labels, classes, name = digits_source(preprocess, split)
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise EdgeslimError(f"data path '{p}' does not exist: pass {_KINDS}")
        lower = p.name.lower()
        if p.is_dir():
            if is_cifar_dir(p):
                src, labels, classes, name = cifar_source(p, preprocess, split)
            else:
                src, labels, classes, name = folder_source(p, preprocess, split, workers)
        elif lower.endswith(".zip"):
            src, labels, classes, name = zip_source(p, preprocess, split, workers)
        elif lower.endswith(".npz"):
            src, labels, classes, name = npz_source(p, preprocess, split)
        elif lower.endswith((".tar.gz", ".tgz", ".tar")):
            src, labels, classes, name = cifar_source(p, preprocess, split)
        else:
            raise EdgeslimError(f"data path '{p}' has an unsupported type: pass {_KINDS}")
    try:
        return ImageDataset(src, labels, classes, preprocess, name=name, max_cache_bytes=max_cache_bytes)
    except EdgeslimError:
        src.close()
        raise

"""Data sets that arrive as arrays: CIFAR python batches, ``.npz`` files, scikit-learn digits.

Images are held raw (uint8, or float in [0,1]) in ``N,H,W,C`` order and normalized on demand,
vectorized when no resize is needed. CIFAR batches are pickles, so they are only read from
their known file names and through an unpickler that accepts nothing but numpy arrays.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from edgeslim.errors import EdgeslimError
from edgeslim.data.limits import check_array_header
from edgeslim.data.transforms import (
    Preprocess,
    convert_channels_float,
    convert_channels_uint8,
    needs_resize,
    normalize_uint8,
    normalize_unit,
    pil_to_chw,
    unit_float_to_chw,
)

__all__ = ["ARCHIVE_ERRORS", "CIFAR10_TRAIN", "CIFAR_NAMES", "CIFAR_SUBDIRS", "ArraySource", "is_cifar_dir",
           "cifar_source", "npz_source", "digits_arrays", "digits_source"]


# what reading a damaged zip / npz member raises: a bad CRC, a broken deflate stream, an unknown compression
# method or an encrypted member, a truncated file
ARCHIVE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                  RuntimeError)
CIFAR10_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_NAMES = frozenset(CIFAR10_TRAIN + ("test_batch", "batches.meta", "train", "test", "meta"))
CIFAR_SUBDIRS = ("cifar-10-batches-py", "cifar-100-python")


class ArraySource:
    """Raw ``N,H,W,C`` images (uint8 or float in [0,1]) -> normalized ``N,C,H,W`` float32."""

    def __init__(self, images: np.ndarray, pp: Preprocess) -> None:
        self.images = images
        self.pp = pp
        self._unit = images.dtype != np.uint8

    def __len__(self) -> int:
        return len(self.images)

    def load(self, idx: np.ndarray) -> np.ndarray:
        x = self.images[idx]
        pp = self.pp
        if not needs_resize(x.shape[2], x.shape[1], pp):
            if self._unit:
                return normalize_unit(convert_channels_float(x, pp.channels), pp)
            return normalize_uint8(convert_channels_uint8(x, pp.channels), pp)
        out = np.empty((len(x),) + pp.input_shape, np.float32)
        for j, im in enumerate(x):
            if self._unit:
                out[j] = unit_float_to_chw(im, pp)
            else:
                out[j] = pil_to_chw(Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), pp)
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- CIFAR python batches


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build dicts, lists, bytes and numpy arrays, and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(*target)


def _unpickle(data: bytes, shown: str) -> dict:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure here means a bad or foreign file
        raise EdgeslimError(
            f"CIFAR file '{shown}' is not a CIFAR python batch ({exc}): re-download the "
            "python version of the data set"
        ) from None
    if not isinstance(obj, dict):
        raise EdgeslimError(f"CIFAR file '{shown}' holds no dict: re-download the python version")
    return obj


def _cifar_files_in_dir(root: Path) -> dict[str, Path]:
    for sub in CIFAR_SUBDIRS:
        if (root / sub).is_dir():
            root = root / sub
            break
    return {n: root / n for n in CIFAR_NAMES if (root / n).is_file()}


def is_cifar_dir(root: Path) -> bool:
    found = _cifar_files_in_dir(root)
    return any(n in found for n in CIFAR10_TRAIN + ("test_batch",)) or {"train", "test"} <= set(found)


def _cifar_files_in_tar(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in CIFAR_NAMES and base not in out:
                    f = tar.extractfile(m)
                    if f is not None:
                        out[base] = f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EdgeslimError(f"'{path}' is not a readable tar archive ({exc}): re-download it") from None
    if not out:
        raise EdgeslimError(
            f"tar archive '{path}' has no CIFAR batches (data_batch_*, test_batch, train, test): "
            "pass cifar-10-python.tar.gz or cifar-100-python.tar.gz"
        )
    return out


def cifar_source(path: Path, pp: Preprocess, split: str | None):
    """CIFAR-10/100 python batches from a folder or a .tar.gz; ``split`` 'train'|'test' (default)."""
    split = "test" if split is None else split
    if split not in ("train", "test"):
        raise EdgeslimError(f"unknown split '{split}' for CIFAR data '{path}': pass split='train' or 'test'")
    if path.is_dir():
        files = _cifar_files_in_dir(path)
        read = lambda n: files[n].read_bytes()  # noqa: E731
        available = set(files)
    else:
        blobs = _cifar_files_in_tar(path)
        read = blobs.__getitem__
        available = set(blobs)
    cifar100 = bool({"train", "test"} & available) and not ({"test_batch"} | set(CIFAR10_TRAIN)) & available
    if cifar100:
        wanted = [split] if split in available else []
    else:
        wanted = [n for n in CIFAR10_TRAIN if n in available] if split == "train" else (
            ["test_batch"] if "test_batch" in available else []
        )
    if not wanted:
        want = split if cifar100 else ("data_batch_1..5" if split == "train" else "test_batch")
        other = "test" if split == "train" else "train"
        raise EdgeslimError(f"CIFAR data '{path}' has no {want}: pass split='{other}' or add the file")
    xs, ys = [], []
    for name in wanted:
        shown = f"{path}:{name}"
        d = _unpickle(read(name), shown)
        data = d.get(b"data")
        labels = d.get(b"fine_labels", d.get(b"labels"))
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
            raise EdgeslimError(
                f"CIFAR file '{shown}' lacks b'data' (N,3072) uint8 and b'labels': re-download it"
            )
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(data):
            raise EdgeslimError(
                f"CIFAR file '{shown}' has {len(data)} images but {len(labels)} labels: re-download it"
            )
        xs.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    images = np.ascontiguousarray(np.concatenate(xs))
    labels = np.concatenate(ys)
    meta_name, key = ("meta", b"fine_label_names") if cifar100 else ("batches.meta", b"label_names")
    classes: list[str] | None = None
    if meta_name in available:
        names = _unpickle(read(meta_name), f"{path}:{meta_name}").get(key)
        if isinstance(names, list):
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if classes is None:
        classes = [str(i) for i in range(100 if cifar100 else 10)]
    return ArraySource(images, pp), labels, classes, f"cifar:{path}[{split}]"


# ---------------------------------------------------------------- .npz


def _npz_keys(keys: set[str], split: str | None, path: Path) -> tuple[str, str]:
    pairs = (("x", "y"), ("images", "labels"))
    if split is None:
        for xk, yk in pairs:
            if xk in keys and yk in keys:
                return xk, yk
        if {"x_test", "y_test"} <= keys:
            return "x_test", "y_test"
        raise EdgeslimError(
            f"npz '{path}' has arrays {', '.join(sorted(keys)) or '(none)'} but needs 'x' and 'y' "
            "(or 'images' and 'labels'): save it with np.savez(path, x=images, y=labels)"
        )
    for xk, yk in pairs:
        if f"{xk}_{split}" in keys and f"{yk}_{split}" in keys:
            return f"{xk}_{split}", f"{yk}_{split}"
    splits = sorted({k[2:] for k in keys if k.startswith("x_") and "y_" + k[2:] in keys})
    raise EdgeslimError(
        f"unknown split '{split}' for npz '{path}' (needs arrays x_{split}/y_{split}): pass "
        + (f"one of {', '.join(splits)}" if splits else "no split")
    )


def npz_source(path: Path, pp: Preprocess, split: str | None):
    """``x`` N,H,W,C uint8 (or N,H,W) is scaled by /255; float ``x`` N,C,H,W must already be in [0,1]."""
    try:
        with np.load(path, allow_pickle=False) as z:
            xk, yk = _npz_keys(set(z.files), split, path)
            for k in (xk, yk):  # the sizes the headers declare, before anything is allocated
                with z.zip.open(f"{k}.npy") as f:
                    check_array_header(f, f"{path}:{k}")
            x, y = z[xk], z[yk]
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in z.files else None
    except EdgeslimError:
        raise
    except ARCHIVE_ERRORS as exc:
        raise EdgeslimError(f"npz '{path}' is not readable ({str(exc)[:160]}): save it again with np.savez") from None
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[3] not in (1, 3):
            raise EdgeslimError(
                f"npz '{path}' uint8 '{xk}' has shape {x.shape}: save uint8 images as N,H,W,C with C 1 or 3"
            )
    elif np.issubdtype(x.dtype, np.floating):
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EdgeslimError(
                f"npz '{path}' float '{xk}' has shape {x.shape}: save float images as N,C,H,W "
                "with C 1 or 3 (e.g. x.transpose(0, 3, 1, 2))"
            )
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)
        if x.size and not np.isfinite(x).all():
            raise EdgeslimError(f"npz '{path}' '{xk}' has NaN/inf values: fix the saved images")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise EdgeslimError(
                f"npz '{path}' float '{xk}' spans [{lo:.3g}, {hi:.3g}] but float images must be in "
                "[0, 1] (normalization is applied here): save raw uint8 or x/255"
            )
    else:
        raise EdgeslimError(f"npz '{path}' '{xk}' has dtype {x.dtype}: save uint8 or float images")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise EdgeslimError(f"npz '{path}' '{xk}' holds images of {x.shape[1]}x{x.shape[2]} pixels: save images "
                            "with at least one pixel")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise EdgeslimError(f"npz '{path}' '{yk}' must be a 1-D integer array, got {y.dtype} {y.shape}: save class indices")
    if len(y) != len(x):
        raise EdgeslimError(
            f"npz '{path}' has {len(x)} images but {len(y)} labels: save one label per image"
        )
    y = y.astype(np.int64)
    if classes is None:
        classes = [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]
    return ArraySource(x, pp), y, classes, f"npz:{path}" + (f"[{split}]" if split else "")


# ---------------------------------------------------------------- scikit-learn digits


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits`` gives them: (1797 8x8 images 0..16 as float64, their labels).

    Read from the CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what ``load_digits`` reads),
    found without importing scikit-learn: importing ``sklearn.datasets`` takes 2 s here, most of a demo command's
    start. ``load_digits`` itself where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            if data.ndim == 2 and data.shape[1] == 65:
                return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digits_source(pp: Preprocess, split: str | None):
    """1797 8x8 digits, 0..16 scaled by /16; 'train' = first 80% of a seed-0 permutation."""
    if split not in (None, "train", "test"):
        raise EdgeslimError(f"unknown split '{split}' for sklearn-digits: pass 'train', 'test' or no split")
    raw, target = digits_arrays()
    images = (raw / 16.0).astype(np.float32)[..., None]
    labels = target.astype(np.int64)
    if split is not None:
        perm = np.random.default_rng(0).permutation(len(images))
        n_train = int(0.8 * len(images))
        sel = perm[:n_train] if split == "train" else perm[n_train:]
        images, labels = images[sel], labels[sel]
    classes = [str(i) for i in range(10)]
    return ArraySource(np.ascontiguousarray(images), pp), labels, classes, "sklearn-digits" + (f"[{split}]" if split else "")


"""Label-free model inputs: what the ``fidelity`` task calibrates and scores on, and how images become inputs.

Two kinds of data, told apart by what they hold:
* **arrays** (``.npz`` with an ``x`` array, or ``.npy``): float ``N, C, H, W`` arrays are taken as model inputs
  as they are (already preprocessed, any range); ``uint8`` ``N, H, W, C`` arrays are images and go through
  ``InputSpec`` like decoded files;
* **images** (a folder, searched recursively, or a ``.zip``; any layout, labels not needed): decoded with PIL,
  converted to ``channel_order``, resized by ``resize`` (stretch / letterbox / center-crop) to ``size``, then
  ``(pixel / 255 - mean) / std`` per channel.

The unit convention: ``mean`` and ``std`` apply to pixels scaled to [0, 1], one value per channel in the
model's channel order (ImageNet: mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225; a model trained on
``(x - 127.5) / 128`` over 0..255 pixels: mean 0.5, std 0.502).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import EdgeslimError
from .arrays import ARCHIVE_ERRORS
from .files import zip_member, zip_names
from .limits import check_array_header
from .transforms import HIGH_DEPTH_MODES, high_depth_to_unit

__all__ = ["InputSpec", "open_inputs", "has_labels", "RESIZE_MODES", "CHANNEL_ORDERS"]

RESIZE_MODES = ("stretch", "letterbox", "center-crop")
CHANNEL_ORDERS = ("RGB", "BGR", "GRAY")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LETTERBOX_PAD = 114  # the grey that YOLO-style letterboxing pads with
MAX_INPUT_BYTES = 8 << 30


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input. Written to ``summary.json``, ``encodings.json`` and the ONNX files'
    ``metadata_props`` so whoever deploys the model knows what to feed it."""

    size: tuple[int, int]  # H, W
    channel_order: str = "RGB"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: str = "stretch"

    def __post_init__(self) -> None:
        order = str(self.channel_order).upper()
        if order not in CHANNEL_ORDERS:
            raise EdgeslimError(f"unknown channel order {self.channel_order!r}: use one of {', '.join(CHANNEL_ORDERS)}")
        if self.resize not in RESIZE_MODES:
            raise EdgeslimError(f"unknown resize mode {self.resize!r}: use one of {', '.join(RESIZE_MODES)}")
        c = 1 if order == "GRAY" else 3
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) == 1:
            mean = mean * c
        if len(std) == 1:
            std = std * c
        if len(mean) != c or len(std) != c:
            raise EdgeslimError(f"--mean / --std have {len(mean)} / {len(std)} values for a {order} input of {c} "
                                f"channel(s): pass one value or {c}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise EdgeslimError(f"--mean {mean} / --std {std}: pass finite numbers, std > 0")
        h, w = (int(v) for v in self.size)
        if not (0 < h <= 8192 and 0 < w <= 8192):
            raise EdgeslimError(f"input size {h}x{w} is out of range: pass --input-size H,W between 1 and 8192")
        object.__setattr__(self, "channel_order", order)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "size", (h, w))

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["units"] = "mean / std apply to pixels scaled to [0, 1]: x = (pixel / 255 - mean) / std"
        return d

    def image(self, img: Image.Image) -> np.ndarray:
        """A decoded image as the model's ``C, H, W`` float32 input."""
        if img.mode in HIGH_DEPTH_MODES:  # 16-bit gray: geometry in float mode, at full precision (0..255 scale)
            img = Image.fromarray(high_depth_to_unit(img)[:, :, 0] * np.float32(255.0), mode="F")
        else:
            img = img.convert("L" if self.channels == 1 else "RGB")
        h, w = self.size
        iw, ih = img.size
        if iw == 0 or ih == 0:
            raise ValueError("image has no pixels")
        if self.resize == "stretch":
            arr = np.asarray(img.resize((w, h), Image.BILINEAR) if (iw, ih) != (w, h) else img)
        elif self.resize == "center-crop":
            r = max(h / ih, w / iw)
            nw, nh = max(w, round(iw * r)), max(h, round(ih * r))
            img = img.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (iw, ih) else img
            top, left = (nh - h) // 2, (nw - w) // 2
            arr = np.asarray(img.crop((left, top, left + w, top + h)))
        else:
            r = min(h / ih, w / iw)
            nw, nh = min(w, max(1, round(iw * r))), min(h, max(1, round(ih * r)))
            canvas = np.full((h, w) if img.mode in ("L", "F") else (h, w, 3), LETTERBOX_PAD,
                             np.float32 if img.mode == "F" else np.uint8)
            top, left = (h - nh) // 2, (w - nw) // 2
            canvas[top:top + nh, left:left + nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR))
            arr = canvas
        arr = arr.reshape(h, w, -1)
        if arr.shape[2] != self.channels:  # a 16-bit gray image for an RGB / BGR model
            arr = np.repeat(arr, self.channels, axis=2)
        if self.channel_order == "BGR":
            arr = arr[..., ::-1]
        x = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(self.std, np.float32)[:, None, None]


def _check_arrays(x: np.ndarray, shown: str, input_shape: tuple[int, ...]) -> np.ndarray:
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise EdgeslimError(f"'{shown}' holds arrays of shape {tuple(x.shape)} but the model takes N x "
                            f"{' x '.join(map(str, input_shape))}: save preprocessed inputs as N, C, H, W float arrays")
    if len(x) == 0:
        raise EdgeslimError(f"'{shown}' holds no inputs: save at least one")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise EdgeslimError(f"'{shown}' has NaN / inf values: fix the saved inputs")
    return x


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as f:
                check_array_header(f, str(path))
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                key = "x" if "x" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise EdgeslimError(f"'{path}' holds {', '.join(z.files) or 'nothing'}: save the inputs as 'x' "
                                        "(np.savez(path, x=inputs))")
                with z.zip.open(f"{key}.npy") as f:
                    check_array_header(f, f"{path}:{key}")
                header = z.zip.getinfo(f"{key}.npy").file_size
                if header > MAX_INPUT_BYTES:
                    raise EdgeslimError(f"'{path}' array '{key}' needs {header / 2**30:.1f} GiB: pass at most "
                                        f"{MAX_INPUT_BYTES >> 30} GiB of inputs (a subset)")
                arr = z[key]
    except EdgeslimError:
        raise
    except ARCHIVE_ERRORS as exc:
        raise EdgeslimError(f"'{path}' is not a readable array file ({str(exc)[:120]}): save it with np.savez / "
                            "np.save") from None
    if arr.nbytes > MAX_INPUT_BYTES:
        raise EdgeslimError(f"'{path}' needs {arr.nbytes / 2**30:.1f} GiB: pass at most {MAX_INPUT_BYTES >> 30} GiB")
    return np.asarray(arr)


def _image_files(path: Path) -> list[tuple[str, callable]]:
    """(shown name, bytes reader) for every image under a folder (each directory visited once) or in a zip."""
    if path.is_dir():
        found, seen = [], set()
        stack = [path]
        while stack:
            d = stack.pop()
            key = d.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                entries = sorted(d.iterdir())
            except OSError as exc:
                raise EdgeslimError(f"cannot list '{d}' ({exc.strerror or exc}): check its permissions") from None
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(e)
                elif e.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((str(e), e.read_bytes))
        return sorted(found, key=lambda t: t[0])
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise EdgeslimError(f"'{path}' is not a readable zip ({exc}): re-create it") from None
    names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES) and "/." not in f"/{n}")
    return [(f"{path}:{n}", (lambda n=n: zip_member(zf, n, path))) for n in names]


def open_inputs(path: str | Path, input_shape: tuple[int, ...], spec: InputSpec | None = None, *,
                limit: int | None = None, seed: int = 0) -> np.ndarray:
    """Model inputs ``N, C, H, W`` float32 from ``path`` (see the module docstring); ``limit`` takes a seeded
    random subset of at most that many."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EdgeslimError(f"data path '{p}' does not exist: pass an .npz / .npy of inputs, an image folder or a zip")
    rng = np.random.default_rng(seed)
    if p.is_file() and p.suffix.lower() in (".npz", ".npy"):
        arr = _load_array(p)
        if arr.dtype == np.uint8:
            if spec is None:
                raise EdgeslimError(f"'{p}' holds uint8 images: pass the preprocessing (--mean, --std, ...)")
            arr = arr[..., None] if arr.ndim == 3 else arr
            if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or 0 in arr.shape[1:3]:
                raise EdgeslimError(f"'{p}' holds uint8 images of shape {arr.shape}: save images as N, H, W, C "
                                    "with C 1 or 3 and at least one pixel")
            idx = _subset(len(arr), limit, rng)
            return np.stack([spec.image(Image.fromarray(arr[i].squeeze(-1) if arr.shape[-1] == 1 else arr[i]))
                             for i in idx]) if len(idx) else _check_arrays(arr[:0], str(p), input_shape)
        if not np.issubdtype(arr.dtype, np.floating):
            raise EdgeslimError(f"'{p}' holds {arr.dtype} arrays: save float32 model inputs (N, C, H, W) or uint8 "
                                "images (N, H, W, C)")
        x = _check_arrays(arr, str(p), input_shape)
        return x[np.sort(_subset(len(x), limit, rng))]
    if not (p.is_dir() or p.suffix.lower() == ".zip"):
        raise EdgeslimError(f"data path '{p}' has an unsupported type: pass an .npz / .npy of inputs, an image "
                            "folder or a zip of images")
    if spec is None:
        raise EdgeslimError("image data needs the preprocessing: pass --mean, --std (and --channel-order, "
                            "--input-size, --resize) for this model")
    files = _image_files(p)
    if not files:
        raise EdgeslimError(f"'{p}' holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a folder or zip of images")
    out = []
    for i in np.sort(_subset(len(files), limit, rng)):
        shown, read = files[i]
        try:
            with Image.open(io.BytesIO(read())) as img:
                out.append(spec.image(img))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise EdgeslimError(f"image '{shown}' is unreadable or corrupt ({str(exc)[:100]}): re-encode or remove "
                                "it") from None
    return _check_arrays(np.stack(out), str(p), input_shape)


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise EdgeslimError(f"invalid subset size {limit}: use 1 or more")
    return rng.choice(n, size=limit, replace=False)


def has_labels(path: str | Path) -> bool:
    """Whether ``path`` is a labelled set (``--task auto``): an .npz with ``y``, CIFAR, scikit-learn digits, or a
    folder / zip of two or more class folders with no images of its own at the top."""
    p = Path(str(path)).expanduser()
    if str(path) == "sklearn-digits" or str(p).lower().endswith((".tar.gz", ".tgz", ".tar")):
        return True
    if p.suffix.lower() == ".npy" or not p.exists():
        return False
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return any(k == "y" or k.startswith("y_") for k in z.files)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return False
    if p.is_dir():
        if (p / "data_batch_1").exists() or (p / "test_batch").exists():
            return True
        tops = [e for e in p.iterdir() if not e.name.startswith(".")]
        names = [(e.name + "/") if e.is_dir() else e.name for e in tops]
        sub = [e for e in tops if e.is_dir()]
        if len(sub) == 1 and not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
            tops = [e for e in sub[0].iterdir() if not e.name.startswith(".")]
            names = [(e.name + "/") if e.is_dir() else e.name for e in tops]
    elif p.suffix.lower() == ".zip":
        try:
            entries = [n for n in zip_names(p) if not n.startswith(("__MACOSX", "."))]
        except (OSError, zipfile.BadZipFile):
            return False
        tops = sorted({n.split("/")[0] + ("/" if "/" in n else "") for n in entries})
        if len(tops) == 1 and tops[0].endswith("/"):
            root = tops[0]
            tops = sorted({n[len(root):].split("/")[0] + ("/" if "/" in n[len(root):] else "")
                           for n in entries if n.startswith(root) and n != root})
        names = tops
    else:
        return False
    folders = [n for n in names if n.endswith("/")]
    return len(folders) >= 2 and not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names)

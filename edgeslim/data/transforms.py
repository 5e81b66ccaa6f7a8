"""Image preprocessing: the exact pipeline a model saw at training time.

Post-training quantization calibrates on activation ranges, so the calibration and evaluation
inputs must be preprocessed *exactly* like the training data; a wrong mean/std or a different
resize silently costs accuracy. The pipeline therefore mirrors torchvision's PIL path
(``Resize(s)`` -> ``CenterCrop(H, W)`` -> ``ToTensor`` -> ``Normalize``) and keeps every step in
float32 in a fixed order, so results are reproducible bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgeslim.errors import EdgeslimError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD", "Preprocess", "needs_resize", "resize_crop",
           "normalize_uint8", "normalize_unit", "pil_to_uint8", "pil_to_chw", "unit_float_to_chw", "unit_float_resized",
           "HIGH_DEPTH_MODES", "high_depth_to_unit", "convert_channels_float", "convert_channels_uint8"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs (one ``C,H,W`` float32 array per image).

    ``resize`` is the shorter side before a center crop (ImageNet style: 256 for a 224 crop).
    With ``resize=None`` an image whose size differs from ``H,W`` is resized directly to
    ``H,W`` (aspect ratio not kept), which suits fixed-size sets such as CIFAR.
    Lists are accepted for ``input_shape``/``mean``/``std`` (e.g. from JSON) and stored as tuples.
    """

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(v) for v in self.input_shape)
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError) as exc:
            raise EdgeslimError(
                f"preprocess input_shape/mean/std must be numbers ({exc}): "
                "pass e.g. input_shape=(3, 224, 224), mean=(0.485, 0.456, 0.406)"
            ) from None
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) <= 0:
            raise EdgeslimError(
                f"preprocess input_shape {shape} is not C,H,W with C 1 or 3: "
                "pass e.g. (3, 224, 224) or (1, 28, 28)"
            )
        c = shape[0]
        if len(mean) != c or len(std) != c:
            raise EdgeslimError(
                f"preprocess mean/std have {len(mean)}/{len(std)} values but the input has {c} "
                f"channel(s): pass one mean and one std per channel"
            )
        if not all(math.isfinite(m) for m in mean):
            raise EdgeslimError(f"preprocess mean {mean} is not finite: pass finite numbers")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise EdgeslimError(f"preprocess std {std} has a non-positive value: pass std > 0")
        resize = self.resize
        if resize is not None:
            if isinstance(resize, bool) or int(resize) != resize:
                raise EdgeslimError(f"preprocess resize {resize!r} is not an integer: pass e.g. 256")
            resize = int(resize)
            if resize < max(shape[1], shape[2]):
                raise EdgeslimError(
                    f"preprocess resize {resize} is smaller than the {shape[1]}x{shape[2]} crop: "
                    f"pass resize >= {max(shape[1], shape[2])} or None"
                )
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "resize", resize)

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.input_shape[1], self.input_shape[2]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std as float32 vectors (the dtype the pipeline computes in)."""
        return np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)


def needs_resize(iw: int, ih: int, pp: Preprocess) -> bool:
    """True when :func:`resize_crop` would change an ``iw`` x ``ih`` image (lets arrays skip PIL)."""
    h, w = pp.size_hw
    if (iw, ih) != (w, h):
        return True
    return pp.resize is not None and min(iw, ih) != pp.resize


def resize_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize (bilinear) and center crop a PIL image to ``pp``'s ``H,W``, like torchvision.

    Steps are skipped when they would be no-ops, so already-sized images are untouched.
    """
    h, w = pp.size_hw
    iw, ih = img.size
    if pp.resize is None:
        if (iw, ih) != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        return img
    short, long_ = (iw, ih) if iw <= ih else (ih, iw)
    if short != pp.resize:
        new_short, new_long = pp.resize, int(pp.resize * long_ / short)
        size = (new_short, new_long) if iw <= ih else (new_long, new_short)
        img = img.resize(size, Image.BILINEAR)
        iw, ih = img.size
    if (iw, ih) != (w, h):
        top = int(round((ih - h) / 2.0))
        left = int(round((iw - w) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    return img


def normalize_uint8(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """``...,H,W,C`` uint8 -> ``...,C,H,W`` float32 via x/255 then (x-mean)/std.

    The layout change happens on the uint8 data first so the float math runs over
    contiguous planes (much faster than broadcasting over a trailing axis of 3).
    """
    out = np.ascontiguousarray(np.moveaxis(x, -1, -3)).astype(np.float32)
    out /= np.float32(255.0)
    return _normalize_chw_inplace(out, pp)


def normalize_unit(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """``...,H,W,C`` float in [0,1] -> ``...,C,H,W`` float32 via (x-mean)/std."""
    out = np.ascontiguousarray(np.moveaxis(x, -1, -3), dtype=np.float32)
    if out is x or np.shares_memory(out, x):
        out = out.copy()
    return _normalize_chw_inplace(out, pp)


def _normalize_chw_inplace(out: np.ndarray, pp: Preprocess) -> np.ndarray:
    mean, std = pp.mean_std()
    out -= mean[:, None, None]
    out /= std[:, None, None]
    return out


def pil_to_uint8(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Decoded PIL image -> ``H,W,C`` uint8 after mode convert and resize/crop.

    Normalization is left to the caller so a whole batch is normalized in one vectorized step.
    """
    mode = "L" if pp.channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    img = resize_crop(img, pp)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def pil_to_chw(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Decoded PIL image -> ``C,H,W`` float32 (mode convert, resize/crop, normalize)."""
    return normalize_uint8(pil_to_uint8(img, pp), pp)


def unit_float_to_chw(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """One ``H,W,C`` float image in [0,1] -> ``C,H,W`` float32.

    Channel conversion follows PIL ('L' = ITU-R 601-2 luma; gray -> RGB repeats the channel)
    and resizing runs per channel in PIL's float mode, so float and uint8 sources behave alike.
    """
    return normalize_unit(unit_float_resized(x, pp), pp)


def unit_float_resized(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """One ``H,W,C`` float image in [0,1] -> ``H,W,C`` float32 with ``pp``'s channels and size (not normalized)."""
    x = convert_channels_float(x, pp.channels)
    if needs_resize(x.shape[1], x.shape[0], pp):
        planes = [np.asarray(resize_crop(Image.fromarray(x[:, :, c], mode="F"), pp)) for c in range(x.shape[2])]
        x = np.stack(planes, axis=-1)
    return x


# PIL modes of 16-bit (and 32-bit integer) grayscale images: converting them to 'L' saturates every value above 255
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def high_depth_to_unit(img: Image.Image) -> np.ndarray:
    """A 16-bit grayscale image -> ``H,W,1`` float32 in [0, 1] (value / 65535), at full precision."""
    x = np.asarray(img, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"unsupported {img.mode} image of shape {x.shape}")
    return np.clip(x / np.float32(65535.0), 0.0, 1.0)[:, :, None]


def convert_channels_float(x: np.ndarray, channels: int) -> np.ndarray:
    """Match the channel count of ``...,H,W,C`` float images to ``channels``."""
    x = x.astype(np.float32, copy=False)
    src = x.shape[-1]
    if src == channels:
        return x
    if src == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if src == 3 and channels == 1:
        luma = np.asarray([0.299, 0.587, 0.114], np.float32)
        return (x @ luma)[..., None].astype(np.float32)
    raise EdgeslimError(f"images have {src} channels: pass images with 1 or 3 channels")


def convert_channels_uint8(x: np.ndarray, channels: int) -> np.ndarray:
    """Match the channel count of ``N,H,W,C`` uint8 images (bit-identical to PIL convert)."""
    src = x.shape[-1]
    if src == channels:
        return x
    if src == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if src == 3 and channels == 1:
        out = [np.asarray(Image.fromarray(im, "RGB").convert("L"))[:, :, None] for im in x]
        return np.stack(out) if out else np.empty(x.shape[:-1] + (1,), np.uint8)
    raise EdgeslimError(f"images have {src} channels: pass images with 1 or 3 channels")

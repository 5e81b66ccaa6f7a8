"""Training data held in memory, its augmentation and the seeded batch order.

Every random choice of a training run is a pure function of ``(seed, epoch)`` (the batch order) or
``(seed, step)`` (the augmentation and any per-step probes), so a run stopped at any step and resumed draws
exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data import ImageDataset, batches, calibration_indices

if TYPE_CHECKING:
    from ..models import ModelInfo

__all__ = ["TrainData", "augment", "batch_indices", "epoch_order", "load_train", "step_generator"]


@dataclass
class TrainData:
    """Training images (preprocessed N,C,H,W float32) and labels, with the black pixel value per channel
    (for padding random crops)."""

    x: torch.Tensor
    y: torch.Tensor
    pad_value: torch.Tensor = field(default_factory=lambda: torch.zeros(3))

    def digest(self) -> str:
        """SHA-256 over the images, labels and pad value (shapes and dtypes included): a resumed run refuses a
        checkpoint trained on other data."""
        h = hashlib.sha256()
        for t in (self.x, self.y, self.pad_value):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def augment(x: torch.Tensor, pad_value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after padding by 1/8 of the size (4 pixels at 32x32) and random horizontal flip, the CIFAR
    augmentation of He et al. 2016 ("Deep residual learning", sec. 4.2)."""
    n, c, h, w = x.shape
    p = max(1, h // 8)
    padded = pad_value.reshape(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n, h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n, w
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``n`` training images used in ``epoch`` (the same on every process)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of optimizer step ``step``: augmentation first, then whatever a step hook draws."""
    return torch.Generator().manual_seed(seed * 1000003 + step)


def batch_indices(order: torch.Tensor, position: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The images of batch ``position`` of an epoch (global ``batch_size``), this process's share of them."""
    return order[position * batch_size:(position + 1) * batch_size][rank::world]


def load_train(ds: ImageDataset, info: ModelInfo, size: int | None, seed: int, progress: bool = True) -> TrainData:
    """The training images as one tensor (a seeded class-balanced subset of ``size`` images if given); crops are
    padded with black, i.e. ``-mean / std`` after normalization (zeros when the statistics do not match)."""
    idx = calibration_indices(len(ds), size, seed, ds.labels) if size else np.arange(len(ds))
    xs = [x for x, _ in batches(ds, 512, idx, desc="loading training images" if progress else None)]
    black = (0.0 - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    if len(black) != info.input_shape[0]:
        black = np.zeros(info.input_shape[0], np.float32)
    return TrainData(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(ds.labels[idx].copy()),
                     torch.from_numpy(black))

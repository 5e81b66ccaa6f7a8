"""``edgeslim demo``: the whole PTQ flow offline, on a real data set that ships with scikit-learn.

Trains the small ``digits_cnn`` on scikit-learn's 8x8 handwritten digits (1,797 images; 80 % train,
20 % test, seeded), then runs the same job as ``edgeslim quantize`` (W8A8 per-channel, min-max).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import PTQConfig
from .data import Preprocess, open_dataset
from .config import MeasureOptions
from .jobs.quantize import run_quantize
from .models import build_model
from .tasks import Classify

__all__ = ["train_digits_cnn", "run_demo"]


def train_digits_cnn(train_x: np.ndarray, train_y: np.ndarray, *, epochs: int = 30, seed: int = 0):
    torch.manual_seed(seed)
    model, info = build_model("digits_cnn")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train_x) + 63) // 64))
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc="training digits_cnn", unit="epoch")
    for _ in bar:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), info


def run_demo(out: Path, *, epochs: int = 30, threads: int = 1) -> dict:
    _, info = build_model("digits_cnn")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset("sklearn-digits", pre, split="train")
    test = open_dataset("sklearn-digits", pre, split="test")
    model, info = train_digits_cnn(train.batch(np.arange(len(train))), train.labels, epochs=epochs)
    config = PTQConfig(calib_size=512)
    return run_quantize(model, info, Classify(train, test, measure=MeasureOptions(threads=threads)), config, out)

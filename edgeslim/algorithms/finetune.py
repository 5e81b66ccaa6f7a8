"""Fine-tuning a float model after a structural change (pruning, factorization, a new backbone), with
distillation from the original model.

Seed 003 fine-tunes after every lightweighting step; distilling from the unchanged model (Hinton et al. 2015)
needs no labels beyond the training images and recovers most of what the change cost. Plain SGD with Nesterov
momentum and a cosine schedule, the random crop / flip augmentation of the QAT trainer, BN in training mode.
``on_step(model, step)`` runs after every optimizer step (a gradual pruning schedule re-masks weights there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import EdgeslimError
from .qat import TrainData, augment


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0  # may be fractional: the step budget is epochs x steps per epoch
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    kd: bool = True  # distil from the teacher (KL to its softened predictions)
    kd_weight: float = 1.0  # weight of the KL term; the rest (1 - kd_weight) is cross-entropy on the labels
    temperature: float = 1.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise EdgeslimError(f"invalid fine-tuning epochs {self.epochs}: use a positive number (e.g. 1 or 0.5)")
        if not self.lr > 0:
            raise EdgeslimError(f"invalid learning rate {self.lr}: use a positive number")
        if self.batch_size < 1:
            raise EdgeslimError(f"invalid batch size {self.batch_size}: use 1 or more")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise EdgeslimError(f"invalid KD weight {self.kd_weight}: use a number in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                      cfg: FinetuneConfig) -> torch.Tensor:
    """``kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * CE(labels)``; plain CE without a teacher."""
    ce = F.cross_entropy(logits, y)
    if teacher_logits is None or not cfg.kd:
        return ce
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                  reduction="batchmean") * t * t
    return cfg.kd_weight * kl + (1 - cfg.kd_weight) * ce


def finetune(model: nn.Module, data: TrainData, cfg: FinetuneConfig, *, teacher: nn.Module | None = None,
             on_step: Callable[[nn.Module, int], None] | None = None, progress: bool = True,
             desc: str = "fine-tuning") -> dict:
    """Train ``model`` in place on ``data`` for ``cfg.epochs``; returns ``{"steps", "seconds", "loss", "train_top1"}``."""
    n = len(data.y)
    if n == 0:
        raise EdgeslimError("no training images: pass --train-data with images")
    spe = math.ceil(n / cfg.batch_size)
    total = max(1, round(cfg.epochs * spe))
    decay = [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)
    if teacher is not None:
        teacher.eval()
    model.train()
    t0, step, loss_sum, correct, seen = time.perf_counter(), 0, 0.0, 0, 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, mininterval=1.0, leave=False)
    while step < total:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + step // spe))
        for i in range(spe):
            if step >= total:
                break
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x, y = data.x[idx], data.y[idx]
            if cfg.augment:
                x = augment(x, data.pad_value, torch.Generator().manual_seed(cfg.seed * 1000003 + step))
            with torch.no_grad():
                t_logits = teacher(x) if (cfg.kd and teacher is not None) else None
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = model(x)
            loss = distillation_loss(logits, y, t_logits, cfg)
            if not torch.isfinite(loss):
                model.eval()
                raise EdgeslimError(f"fine-tuning diverged at step {step} (loss {float(loss)}): lower the "
                                    f"learning rate (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(model, step)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - t0, "loss": loss_sum / max(seen, 1),
            "train_top1": correct / max(seen, 1), "config": cfg.to_dict()}

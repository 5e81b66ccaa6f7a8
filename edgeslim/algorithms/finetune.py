"""Fine-tuning a float model after a structural change (pruning, factorization, a new backbone), with
distillation from the original model.

The TTA guideline fine-tunes after every lightweighting step; distilling from the unchanged model (Hinton et al. 2015,
"Distilling the knowledge in a neural network") needs no labels beyond the training images and recovers most of
what the change cost. The run is the shared training loop (``train.loop``: SGD with Nesterov momentum, a cosine
schedule, the random crop / flip augmentation, BN in training mode, checkpoints with exact resume).
``on_step(model, step)`` runs after every optimizer step (a gradual pruning schedule re-masks weights there).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import FinetuneConfig
from ..errors import EdgeslimError
from ..train.checkpoint import Checkpoint
from ..train.data import TrainData
from ..train.loop import fit
from ..train.losses import distillation_loss

__all__ = ["finetune"]


def finetune(model: nn.Module, data: TrainData, cfg: FinetuneConfig, *, teacher: nn.Module | None = None,
             on_step: Callable[[nn.Module, int], None] | None = None, progress: bool = True,
             desc: str = "fine-tuning", checkpoint: Checkpoint | None = None, resume: bool = False) -> dict:
    """Train ``model`` in place on ``data`` for ``cfg.epochs``; returns ``{"steps", "seconds", "loss", "train_top1",
    "config", "resumed_from_step"}``. ``checkpoint`` / ``resume`` as in ``train.loop.fit`` (its identity gets
    ``config``). A diverging loss raises (the weights are those of the step before)."""
    if len(data.y) == 0:
        raise EdgeslimError("no training images: pass --train-data with images")
    if checkpoint is not None:
        checkpoint.identity = {"config": cfg.to_dict(), **checkpoint.identity}
    r = fit(model, data, cfg.recipe(len(data.y)), teacher=teacher if cfg.kd else None,
            loss=lambda out, y, t: distillation_loss(out, y, t, weight=cfg.kd_weight, temperature=cfg.temperature),
            on_step=on_step, checkpoint=checkpoint, resume=resume, progress=progress, desc=desc)
    if r["diverged"] is not None:
        raise EdgeslimError(f"fine-tuning diverged at step {r['diverged']['step']} (loss {r['diverged']['loss']}): "
                            f"lower the learning rate (now {cfg.lr})")
    return {"steps": r["steps"], "seconds": r["seconds"], "loss": r["loss"], "train_top1": r["train_top1"],
            "config": cfg.to_dict(), "resumed_from_step": r["resumed_from_step"]}

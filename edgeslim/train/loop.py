"""The one training loop: SGD with Nesterov momentum, a per-step cosine learning rate, optional distillation,
step hooks, periodic checkpoints and exact resume. Quantization-aware training (``algorithms.qat``) and
fine-tuning after a structural change (``algorithms.finetune``) both run it.

* Optimizer: SGD, Nesterov momentum 0.9 (Sutskever et al. 2013, "On the importance of initialization and
  momentum"), weight decay on conv / linear weights only (tensors of two or more dimensions: not on biases,
  normalization or quantizer scales).
* Schedule: cosine decay from the peak rate to zero over the run, per step, no warm-up (Loshchilov and Hutter
  2017, "SGDR"); a pure function of the step, so it needs no state of its own in a checkpoint.
* Data: a seeded permutation per epoch, a seeded generator per step (``train.data``); with ``torchrun`` each
  process takes its share of every global batch.
* Hooks: ``before_step(batch)`` after the batch and the teacher's outputs are ready and before the forward pass
  (QAT anneals DSQ's alpha and estimates EWGS's Hessian there); ``on_step(model, step)`` after every optimizer
  step (a gradual pruning schedule re-masks weights there); ``on_epoch(row, model)`` at the end of every epoch
  (QAT scores the validation set there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import EdgeslimError
from .checkpoint import Checkpoint, params_digest, rng_state, set_rng_state
from .data import TrainData, augment, batch_indices, epoch_order, step_generator
from .dist import Dist

__all__ = ["Batch", "Progress", "Recipe", "fit", "sgd"]

Loss = Callable[[object, torch.Tensor, object], torch.Tensor]  # (model output, labels, teacher output) -> loss


@dataclass(frozen=True)
class Recipe:
    """How to train: ``steps`` optimizer steps on global batches of ``batch_size``, peak rate ``lr``."""

    steps: int
    lr: float
    batch_size: int
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    momentum: float = 0.9

    def lr_at(self, step: int) -> float:
        """The cosine schedule: ``lr / 2 * (1 + cos(pi * step / steps))``."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))


@dataclass
class Batch:
    """One step's inputs, for ``before_step``: the (augmented) images, labels, the teacher's outputs (None
    without a teacher), the step's generator (already advanced by the augmentation) and the step number."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_out: object
    gen: torch.Generator
    step: int


@dataclass
class Progress:
    """Where a run stands: steps done, running sums of the run and of the current epoch, finished epochs' rows."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    curve: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def record(self, loss: float, correct: int, n: int) -> None:
        self.loss_sum += loss * n
        self.epoch_loss_sum += loss * n
        self.correct += correct
        self.epoch_correct += correct
        self.seen += n
        self.epoch_seen += n
        self.curve.append(loss)

    def new_epoch(self) -> None:
        self.epoch_loss_sum, self.epoch_correct, self.epoch_seen, self.epoch_seconds, self.curve = 0.0, 0, 0, 0.0, []

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(**d)


def sgd(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on the trainable tensors of two or more dimensions only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, momentum=recipe.momentum, nesterov=True)


def _restore(model: nn.Module, opt: torch.optim.Optimizer, state: dict, path) -> None:
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise EdgeslimError(f"--resume: {path} was written for another model ({str(exc).splitlines()[0][:100]}): "
                            "resume with the same model and options, or pass a new --out") from None


def _close_epoch(p: Progress, epoch: int, model: nn.Module, on_epoch, dist: Dist) -> None:
    """The epoch's row in ``p.history``: loss and train top-1 (averaged over processes), the loss per 25 steps,
    what ``on_epoch(row, model)`` adds, and the seconds (``train_seconds``: the steps alone; ``seconds``: with
    ``on_epoch``'s evaluation)."""
    row = {"epoch": epoch + 1, "steps": p.step, "loss": p.epoch_loss_sum / max(1, p.epoch_seen),
           "train_top1": p.epoch_correct / max(1, p.epoch_seen),
           "loss_curve": [float(np.mean(p.curve[i:i + 25])) for i in range(0, len(p.curve), 25)]}
    row["loss"], row["train_top1"] = dist.mean(torch.tensor([row["loss"], row["train_top1"]], dtype=torch.float64)).tolist()
    row["seconds"] = row["train_seconds"] = p.epoch_seconds
    t0 = time.perf_counter()
    if on_epoch is not None:
        on_epoch(row, model)
    row["seconds"] = p.epoch_seconds + time.perf_counter() - t0
    p.history.append(row)


def _batch(data: TrainData, order: torch.Tensor, position: int, step: int, recipe: Recipe, teacher: nn.Module | None,
           dist: Dist) -> Batch:
    """Batch ``position`` of the epoch's ``order`` for optimizer step ``step``: this process's images, augmented
    with the step's generator, and the teacher's outputs on them."""
    gen = step_generator(recipe.seed, step)
    idx = batch_indices(order, position, recipe.batch_size, dist.rank, dist.world)
    x, y = data.x[idx], data.y[idx]
    if recipe.augment:
        x = augment(x, data.pad_value, gen)
    with torch.no_grad():
        t_out = teacher(x) if teacher is not None else None
    return Batch(x, y, t_out, gen, step)


def _finite(value: torch.Tensor, dist: Dist) -> bool:
    """Whether the loss is finite on every process (all stop together)."""
    return bool(dist.mean(torch.isfinite(value.detach()).double().reshape(1)) == 1.0)


def fit(model: nn.Module, data: TrainData, recipe: Recipe, *, loss: Loss, teacher: nn.Module | None = None,
        before_step: Callable[[Batch], None] | None = None, on_step: Callable[[nn.Module, int], None] | None = None,
        on_epoch: Callable[[dict, nn.Module], None] | None = None, checkpoint: Checkpoint | None = None,
        resume: bool = False, dist: Dist = Dist(), progress: bool = True, desc: str = "training",
        accuracy: bool = True) -> dict:
    """Train ``model`` in place for ``recipe.steps`` steps; ``loss(out, y, teacher_out)`` is minimized.

    ``teacher``: run (without gradients) on every batch, its output passed to ``loss``. ``accuracy``: count train
    top-1 (False for outputs that are not logits). With ``checkpoint``, the main process writes it when
    ``checkpoint.due(step)``, at the end of every epoch and at the end; ``resume`` continues from it exactly.
    A non-finite loss stops training with the weights of the step before (``diverged`` in the result).

    Returns ``{"history", "steps", "steps_per_epoch", "seconds", "loss", "train_top1", "resumed_from_step",
    "diverged"}`` (and ``"replicas"`` under torchrun).
    """
    n = len(data.y)
    if n == 0:
        raise EdgeslimError("no training images: pass --train-data with images")
    if recipe.batch_size // dist.world < 1:
        raise EdgeslimError(f"--batch-size {recipe.batch_size} is smaller than the {dist.world} processes: raise it")
    spe = math.ceil(n / recipe.batch_size)
    total = recipe.steps
    opt = sgd(model, recipe)
    p, order, resumed = Progress(), None, None
    if checkpoint is not None:
        checkpoint.identity = {**checkpoint.identity, "data": data.digest(),
                               "tensors": {k: list(v.shape) for k, v in model.state_dict().items()}}
    if resume:
        if checkpoint is None:
            raise EdgeslimError("--resume needs a checkpoint to resume from")
        state = checkpoint.load()
        _restore(model, opt, state, checkpoint.path)
        p, order, resumed = Progress.from_dict(state["progress"]), state["order"], state["progress"]["step"]
        set_rng_state(state["rng"])

    def save() -> None:
        if checkpoint is not None and dist.main:
            checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "progress": p.to_dict(),
                             "order": order, "rng": rng_state(), "step": p.step, "epoch": p.step // spe,
                             "total_steps": total})

    if teacher is not None:
        teacher.eval()
    net = dist.wrap(model)
    bar = tqdm(total=total, initial=p.step, desc=desc, unit="step", disable=not (progress and dist.main),
               mininterval=1.0, leave=False)
    diverged = None
    while p.step < total and diverged is None:
        epoch, position = divmod(p.step, spe)
        if position == 0 or order is None:
            order = epoch_order(n, recipe.seed, epoch)
        if position == 0:
            p.new_epoch()
        mark = time.perf_counter()
        model.train()
        for i in range(position, min(spe, total - epoch * spe)):
            step = p.step
            batch = _batch(data, order, i, step, recipe, teacher, dist)
            if before_step is not None:
                before_step(batch)
            lr = recipe.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            out = net(batch.x)
            value = loss(out, batch.y, batch.teacher_out)
            if not _finite(value, dist):
                diverged = {"step": step, "loss": float(value.detach())}
                tqdm.write(f"the training loss became {diverged['loss']} at step {step}: training stopped (the weights "
                           f"are those of step {step}); lower the learning rate (now {recipe.lr}) or use more bits")
                break
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            p.step += 1
            if on_step is not None:
                on_step(model, p.step)
            p.record(value.item(), int((out.argmax(1) == batch.y).sum()) if accuracy else 0, len(batch.y))
            bar.update(1)
            shown = {"loss": f"{p.epoch_loss_sum / p.epoch_seen:.4g}", "lr": f"{lr:.4f}"}
            if accuracy:
                shown["acc"] = f"{p.epoch_correct / p.epoch_seen:.3f}"
            bar.set_postfix(shown, refresh=False)
            if checkpoint is not None and i + 1 < spe and p.step < total and checkpoint.due(p.step):
                now = time.perf_counter()
                p.epoch_seconds, mark = p.epoch_seconds + now - mark, now
                save()
        p.epoch_seconds += time.perf_counter() - mark
        _close_epoch(p, epoch, model, on_epoch, dist)
        if diverged is None:
            save()
        dist.barrier()
    bar.close()
    model.eval()
    result = {"history": p.history, "steps": p.step, "steps_per_epoch": spe,
              "seconds": sum(r["seconds"] for r in p.history),
              "train_seconds": sum(r.get("train_seconds", r["seconds"]) for r in p.history),
              "loss": p.loss_sum / max(1, p.seen), "train_top1": p.correct / max(1, p.seen),
              "resumed_from_step": resumed, "diverged": diverged}
    if dist.world > 1:
        digests = dist.gather(params_digest(model))
        result["replicas"] = {"world_size": dist.world, "identical": len(set(digests)) == 1, "digests": digests}
    return result

"""Quantization-aware training on the frozen PTQ graph.

The model trained is the one PTQ produced (``ptq.prepare`` -> ``calibrate`` -> ``freeze``): BatchNorm is
already folded into the convolutions, so the weights being trained are the weights that are deployed and
no BN statistics move during training (documented in docs/design.md). ``attach`` puts a
``TrainableQuantizer`` on every integer weight and activation quantizer, initialized from the PTQ scales;
``train`` runs SGD (optionally distilling from the FP32 teacher, optionally under ``torchrun``);
``finish`` writes the learned scales (and, for PoT / APoT weights, the level codes) back into the PTQ
modules so lowering, the integer engine and the QDQ export run unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from ..errors import EdgeslimError
from ..quant.modules import ActQuant, QuantConv2d, QuantLinear, QuantSpec
from ..quant.qat import METHODS, QUANTIZERS, LevelSet, TrainableQuantizer
from . import ptq


@dataclass(frozen=True)
class QATConfig:
    """How to train. ``epochs`` or ``max_steps`` bounds the run (``max_steps`` wins when both are given).

    * ``quantizer`` / ``a_quantizer``: level sets of weights / activations (``a_quantizer`` defaults to
      ``quantizer``); ``method``: the gradient estimator (``quant.qat``).
    * ``lr`` is the peak of a cosine schedule over the whole run (per step, no warm-up); SGD with Nesterov
      momentum 0.9, ``weight_decay`` on weights only (not on biases or scales). The default 0.001 is low
      because BN is folded: the shared ResNet-20 diverged within 10 steps at 0.01 and trained at 0.001.
    * ``kd``: distil from the FP32 model: ``kd_weight * T^2 * KL(teacher || student)`` at temperature
      ``kd_temperature`` plus ``(1 - kd_weight)`` times the label cross-entropy.
    * ``dsq_alpha``: DSQ's alpha, annealed linearly from the first value to the second over the run.
    * ``daq_gamma``: DAQ's temperature constant (seed 004 uses 2).
    * ``ewgs_every``: steps between Hessian-trace updates of EWGS's delta (default: one epoch, at most a
      fifth of the run); delta is 0 (plain STE) until the first update, as seed 004 describes.
    """

    w_bits: int = 4
    a_bits: int = 4
    quantizer: str = "uniform"
    a_quantizer: str | None = None
    method: str = "lsq"
    epochs: int | None = 1
    max_steps: int | None = None
    lr: float = 0.001
    batch_size: int = 128
    weight_decay: float = 5e-4
    kd: bool = False
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    dsq_alpha: tuple[float, float] = (0.2, 0.01)
    daq_gamma: float = 2.0
    ewgs_every: int | None = None
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: QAT trains 2 to 8 bits")
        for name in ("quantizer", "a_quantizer"):
            v = getattr(self, name)
            if v is not None and v not in QUANTIZERS:
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: use one of {', '.join(QUANTIZERS)}")
        if self.method not in METHODS:
            raise EdgeslimError(f"invalid --method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.epochs is None and self.max_steps is None:
            raise EdgeslimError("give --epochs N or --max-steps N")
        for name in ("epochs", "max_steps", "batch_size", "ewgs_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: use a positive integer")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise EdgeslimError(f"invalid --lr {self.lr!r}: use a positive learning rate such as 0.01")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise EdgeslimError(f"invalid kd weight {self.kd_weight}: use a value in [0, 1]")
        a0, a1 = self.dsq_alpha
        if not (0 < a1 <= a0 < 1):
            raise EdgeslimError(f"invalid DSQ alpha schedule {self.dsq_alpha}: use 0 < end <= start < 1")

    @property
    def act_quantizer(self) -> str:
        return self.a_quantizer or self.quantizer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dsq_alpha"] = list(self.dsq_alpha)
        return d


NON_UNIFORM_MAX_BITS = 4

# -- quantizers on the PTQ graph ---------------------------------------------------------------------------

def _layers(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)) and not m.spec.is_float]


def _acts(gm: fx.GraphModule) -> list[tuple[str, ActQuant]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, ActQuant) and not m.spec.is_float]


def _mse_scale(x: torch.Tensor, levels: LevelSet, axis: int | None) -> torch.Tensor:
    """The unit (scale) of a non-uniform level set minimizing the squared error on ``x``, per channel
    when ``axis`` is 0: a grid search over clipping ranges from 20 % to 100 % of the largest magnitude."""
    flat = x.detach().reshape(x.shape[0], -1) if axis == 0 else x.detach().reshape(1, -1)
    amax = flat.abs().amax(dim=1).clamp_min(1e-8)
    top = float(max(abs(levels.qmin), abs(levels.qmax)))
    best, best_err = amax / top, None
    for ratio in torch.linspace(0.2, 1.0, 41):
        s = (amax * ratio / top)[:, None]
        err = ((levels.round(flat / s) * s - flat) ** 2).sum(dim=1)
        if best_err is None:
            best_err = err
        better = err < best_err
        best = torch.where(better, s[:, 0], best)
        best_err = torch.minimum(err, best_err)
    return best if axis == 0 else best.reshape(())


def attach(gm: fx.GraphModule, config: QATConfig) -> dict:
    """Put a trainable quantizer on every integer weight and activation of the frozen PTQ graph ``gm``.

    A learned rounding from AdaRound / BRECQ (``--algorithm``) is baked into the weights first (each weight
    moved onto its learned grid point), so training starts from exactly the reconstructed model.
    Returns notes (quantizers kept uniform and why). Asymmetric activations (a zero point, e.g. the
    normalized image input) keep the uniform grid: a non-uniform level set is symmetric around zero. Tensors
    wider than ``NON_UNIFORM_MAX_BITS`` (8-bit first / last layers of a plan) keep it too: a 5-bit PoT set
    already spans 2^14 units, more than an 8-bit integer.
    """
    notes: dict[str, list[str]] = {"uniform_kept": []}
    for name, m in _layers(gm):
        if getattr(m, "round_up", None) is not None:  # AdaRound / BRECQ start: the learned codes become the weights
            with torch.no_grad():
                m.weight.copy_(m._dequantized_codes())
            m.set_rounding(None)
        kind = config.quantizer
        if kind != "uniform" and not m.spec.symmetric:
            kind = "uniform"
            notes["uniform_kept"].append(f"{name} (asymmetric weights)")
        if kind != "uniform" and m.spec.bits > NON_UNIFORM_MAX_BITS:
            kind = "uniform"
            notes["uniform_kept"].append(f"{name} ({m.spec.bits}-bit weights)")
        levels = (LevelSet("uniform", m.spec.bits, True, qmin=m.w_qmin, qmax=m.w_qmax) if kind == "uniform"
                  else LevelSet(kind, m.spec.bits, True))
        if kind == "uniform":
            scale = m.w_scale.detach().clone()
        else:
            scale = _mse_scale(m.weight.detach(), levels, m.w_axis)
        m.wq = TrainableQuantizer(levels, config.method, scale, m.w_zero_point.detach().float(), m.w_axis,
                                  numel=m.weight.numel(), gamma=config.daq_gamma)
    for name, q in _acts(gm):
        kind = config.act_quantizer
        if kind != "uniform" and int(q.zero_point) != 0:
            kind = "uniform"
            notes["uniform_kept"].append(f"{name} (asymmetric: zero point {int(q.zero_point)})")
        elif kind != "uniform" and q.spec.bits > NON_UNIFORM_MAX_BITS:
            kind = "uniform"
            notes["uniform_kept"].append(f"{name} ({q.spec.bits}-bit activations)")
        if kind == "uniform":
            levels = LevelSet("uniform", q.spec.bits, q.signed, qmin=q.qmin, qmax=q.qmax)
            scale = q.scale.detach().clone()
        else:
            levels = LevelSet(kind, q.spec.bits, q.signed)
            hi = float(q.scale) * max(abs(q.qmax), abs(q.qmin))  # the PTQ clipping range
            scale = torch.tensor(hi / max(abs(levels.qmax), abs(levels.qmin)))
        q.aq = TrainableQuantizer(levels, config.method, scale, q.zero_point.detach().float(), None,
                                  gamma=config.daq_gamma)
    for name, p in gm.named_parameters():  # weights and biases train; scales unless the method is ste
        p.requires_grad_(not name.endswith(".scale") or config.method != "ste")
    return notes


def quantizers(model: nn.Module) -> list[TrainableQuantizer]:
    return [m for m in model.modules() if isinstance(m, TrainableQuantizer)]


def finish(gm: fx.GraphModule) -> dict:
    """Write learned scales (uniform) or level codes (PoT / APoT weights) back into the PTQ modules and remove
    the trainable quantizers where the PTQ modules can express the result.

    Returns ``{"exportable": bool, "reason": str, "levels": {layer: {...}}}``: non-uniform *activation*
    levels cannot be written as ONNX QuantizeLinear (a uniform grid), so such a model keeps its trainable
    activation quantizers (the PyTorch model still evaluates) and is not exported.
    """
    info: dict = {"exportable": True, "reason": "", "levels": {}}
    for name, m in _layers(gm):
        wq = getattr(m, "wq", None)
        if wq is None:
            continue
        s = wq.scale.detach().abs().clamp_min(1e-8)
        if wq.levels.uniform:
            m.w_scale.copy_(s.reshape(m.w_scale.shape))
        else:
            shape = [-1] + [1] * (m.weight.dim() - 1) if wq.axis == 0 else []
            sb = s.reshape(shape) if shape else s
            codes = wq.levels.round(m.weight.detach() / sb)
            top = int(codes.abs().max()) if codes.numel() else 0
            with torch.no_grad():
                m.weight.copy_(codes * sb)  # the dequantized PoT / APoT values: exact multiples of the unit
            container = 8 if max(abs(wq.levels.qmin), wq.levels.qmax) <= 127 else 16
            m.spec = QuantSpec(bits=container, symmetric=True, per_channel=wq.axis == 0)
            m.w_qmin, m.w_qmax = -(1 << (container - 1)) + 1, (1 << (container - 1)) - 1
            m.w_scale = s.reshape(-1) if wq.axis == 0 else s.reshape(())
            m.w_zero_point = torch.zeros_like(m.w_scale, dtype=torch.int64)
            m._fq_key = None
            info["levels"][name] = {"kind": wq.levels.kind, "bits": wq.levels.bits,
                                    "codes": [int(v) for v in wq.levels.levels.tolist()], "container_bits": container,
                                    "max_code_used": top}
            if container > 8:
                info["exportable"] = False
                info["reason"] = (f"{name}: {wq.levels.kind} codes up to {wq.levels.qmax} need more than int8; "
                                  "use 4 bits or fewer for PoT / APoT weights")
        del m.wq
    for name, q in _acts(gm):
        aq = getattr(q, "aq", None)
        if aq is None:
            continue
        if aq.levels.uniform:
            q.scale.copy_(aq.scale.detach().abs().clamp_min(1e-8).reshape(()))
            del q.aq
        else:
            info["exportable"] = False
            info["reason"] = (f"{name}: {aq.levels.kind} activation levels are not uniform and ONNX QuantizeLinear "
                              "is; use --a-quantizer uniform to export")
            info["levels"][name] = {"kind": aq.levels.kind, "bits": aq.levels.bits, "scale": float(aq.scale.abs()),
                                    "codes": [int(v) for v in aq.levels.levels.tolist()]}
            aq.eval()
    ptq.refresh_input_scales(gm)
    return info


# -- training -------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """Training images (preprocessed N,C,H,W float32) and labels, with the black pixel value per channel
    (for padding random crops)."""

    x: torch.Tensor
    y: torch.Tensor
    pad_value: torch.Tensor = field(default_factory=lambda: torch.zeros(3))


def augment(x: torch.Tensor, pad_value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after padding by 1/8 of the size (4 pixels at 32x32) and random horizontal flip."""
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


@dataclass
class Dist:
    """Where this process sits in a ``torchrun`` job (world 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(td.get_rank(), td.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as td

            t = t.clone()
            td.all_reduce(t)
            t /= self.world
        return t


def _loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: QATConfig) -> torch.Tensor:
    ce = F.cross_entropy(logits, y)
    if teacher_logits is None:
        return ce
    t = cfg.kd_temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                  reduction="batchmean") * t * t
    return cfg.kd_weight * kl + (1 - cfg.kd_weight) * ce


def hutchinson_trace(loss: torch.Tensor, outputs: list[torch.Tensor], gen: torch.Generator
                     ) -> list[tuple[float, float] | None]:
    """Per tensor in ``outputs``: (Hutchinson estimate ``v^T H v`` of the trace of the loss Hessian with
    respect to that tensor, one Rademacher probe ``v``; mean absolute gradient). None where the loss does not
    depend on it. Exact for a diagonal Hessian (``v_i^2 = 1``)."""
    grads = torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None]
    probes = {i: torch.randint(0, 2, outputs[i].shape, generator=gen).to(outputs[i].dtype) * 2 - 1 for i in used}
    if not used:
        return [None] * len(outputs)
    hv = torch.autograd.grad(sum((grads[i] * probes[i]).sum() for i in used), [outputs[i] for i in used],
                             allow_unused=True)
    out: list[tuple[float, float] | None] = [None] * len(outputs)
    for i, h in zip(used, hv):
        trace = 0.0 if h is None else float((probes[i] * h).sum())
        out[i] = (trace, float(grads[i].detach().abs().mean()))
    return out


def hutchinson_deltas(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits, cfg: QATConfig,
                      gen: torch.Generator, dist: Dist) -> list[float]:
    """EWGS's delta per quantizer: ``unit * (Tr(H) / N) / G`` (seed 004 eq. 2) with ``H`` the Hessian of the
    loss with respect to the quantizer's output (``hutchinson_trace``), ``N`` its size, ``G`` the mean absolute
    gradient and ``unit`` the quantizer's mean scale (delta multiplies a distance measured in codes).
    Negative curvature estimates give 0. Averaged over processes, so replicas stay identical."""
    qs = quantizers(model)
    for q in qs:
        q.hutchinson = True
    try:
        loss = _loss(model(x), y, teacher_logits, cfg)
        outs = [q.last_output for q in qs]
        deltas = []
        for q, o, est in zip(qs, outs, hutchinson_trace(loss, outs, gen)):
            if est is None or est[1] == 0.0:
                deltas.append(0.0)
                continue
            trace, gmean = est
            unit = float(q.scale.detach().abs().mean())
            deltas.append(max(0.0, unit * (trace / o.numel()) / gmean))
    finally:
        for q in qs:
            q.hutchinson = False
            q.last_output = None
    return dist.mean(torch.tensor(deltas, dtype=torch.float64)).tolist()


def params_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (replica checks)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def head_distillation(student, teacher) -> torch.Tensor:
    """Label-free loss for models with several raw outputs (detector heads): the mean squared error between the
    student's and the teacher's outputs after a sigmoid, averaged over the outputs. The sigmoid is the squash the
    YOLO / FastestDet decoders apply to objectness and class scores; it keeps the many confidently empty cells
    (logits far below zero) from dominating the loss."""
    s = [student] if isinstance(student, torch.Tensor) else list(student)
    t = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    return sum(F.mse_loss(torch.sigmoid(a), torch.sigmoid(b)) for a, b in zip(s, t)) / len(s)


def train(model: fx.GraphModule, teacher: nn.Module | None, data: TrainData, cfg: QATConfig, *,
          evaluate: Callable[[nn.Module], float], checkpoint: Path | None = None, resume: bool = False,
          dist: Dist = Dist(), progress: bool = True,
          objective: Callable[[object, object], torch.Tensor] | None = None) -> dict:
    """Train the quantizers and weights of ``model`` (after ``attach``) in place.

    ``objective(student_out, teacher_out)`` replaces the classification loss (labels unused, no train accuracy):
    e.g. ``head_distillation`` for detectors, whose outputs are raw head tensors.

    After each epoch the model is scored with ``evaluate`` (main process) and, with ``checkpoint``, written
    there atomically (weights, scales, optimizer, step, history); ``resume`` continues from it. Returns
    ``{"history": [...], "steps": int, "seconds": float, "replicas": {...}}``.
    """
    n = len(data.y)
    per_rank = cfg.batch_size // dist.world
    if per_rank < 1:
        raise EdgeslimError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} processes: raise it")
    spe = math.ceil(n / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe)
    ewgs_every = cfg.ewgs_every or max(1, min(spe, total // 5))
    qs = quantizers(model)
    if objective is not None and (teacher is None or cfg.method == "ewgs"):
        raise EdgeslimError("a distillation objective needs the FP32 teacher and a method other than ewgs "
                            "(EWGS's Hessian estimate uses the classification loss): use lsq, ste, dsq or daq")

    decay = [p for name, p in model.named_parameters() if p.requires_grad and name.endswith("weight") and p.dim() > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)
    history: list[dict] = []
    start_epoch = 0
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise EdgeslimError(f"--resume: no checkpoint at {checkpoint}: run without --resume first")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EdgeslimError(f"checkpoint {checkpoint} cannot be read ({str(exc).splitlines()[0][:80]}): "
                                "delete it and train again") from None
        if state.get("config") != cfg.to_dict():
            changed = sorted(k for k in cfg.to_dict() if state.get("config", {}).get(k) != cfg.to_dict()[k])
            raise EdgeslimError(f"--resume: the checkpoint was trained with other settings ({', '.join(changed)}): "
                                "resume with the same options, or use a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        for q, d in zip(qs, state["deltas"]):
            q.delta.fill_(d)
    net: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, broadcast_buffers=False)
    step = start_epoch * spe
    diverged = None
    seconds = sum(h["seconds"] for h in history)
    for epoch in range(start_epoch, epochs):
        te = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        steps_here = min(spe, total - step)
        bar = tqdm(range(steps_here), desc=f"QAT epoch {epoch + 1}/{epochs}", unit="step", disable=not (progress and dist.main),
                   mininterval=1.0, leave=False)
        model.train()
        loss_sum, correct, seen, curve = 0.0, 0, 0, []
        for i in bar:
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size][dist.rank::dist.world]
            x, y = data.x[idx], data.y[idx]
            if cfg.augment:
                x = augment(x, data.pad_value, gen)
            with torch.no_grad():
                t_logits = teacher(x) if ((cfg.kd or objective is not None) and teacher is not None) else None
            frac = step / max(1, total - 1)
            for q in qs:
                q.alpha = cfg.dsq_alpha[0] + (cfg.dsq_alpha[1] - cfg.dsq_alpha[0]) * frac
            if cfg.method == "ewgs" and step > 0 and step % ewgs_every == 0:
                for q, d in zip(qs, hutchinson_deltas(model, x, y, t_logits, cfg, gen, dist)):
                    q.delta.fill_(d)
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            logits = net(x)
            loss = objective(logits, t_logits) if objective is not None else _loss(logits, y, t_logits, cfg)
            if not bool(dist.mean(torch.isfinite(loss.detach()).double().reshape(1)) == 1.0):
                diverged = {"step": step, "loss": float(loss.detach())}
                tqdm.write(f"the training loss became {diverged['loss']} at step {step}: training stopped (the "
                           f"weights are those of step {step}); lower --lr (now {cfg.lr}) or use more bits")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            curve.append(loss.item())
            if objective is None:
                correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            shown = {"loss": f"{loss_sum / seen:.4g}", "lr": f"{lr:.4f}"}
            if objective is None:
                shown["acc"] = f"{correct / seen:.3f}"
            bar.set_postfix(shown, refresh=False)
        bar.close()
        row = {"epoch": epoch + 1, "steps": step, "loss": loss_sum / max(1, seen), "train_top1": correct / max(1, seen),
               "loss_curve": [float(np.mean(curve[i:i + 25])) for i in range(0, len(curve), 25)]}  # per 25 steps
        stats = dist.mean(torch.tensor([row["loss"], row["train_top1"]], dtype=torch.float64)).tolist()
        row["loss"], row["train_top1"] = stats
        if cfg.method == "ewgs":
            row["ewgs_delta_mean"] = float(np.mean([float(q.delta) for q in qs])) if qs else 0.0
            row["ewgs_delta_max"] = float(max([float(q.delta) for q in qs], default=0.0))
        if dist.main:
            model.eval()
            row["val_top1"] = evaluate(model)
        row["seconds"] = time.perf_counter() - te
        seconds += row["seconds"]
        history.append(row)
        if dist.main:
            msg = f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, train {row['train_top1']:.4f}, " \
                  f"val {row['val_top1']:.4f} ({row['seconds']:.0f} s)"
            tqdm.write(msg)
            if checkpoint is not None:
                _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                              "history": history, "config": cfg.to_dict(),
                              "deltas": [float(q.delta) for q in qs]}, checkpoint)
        dist.barrier()
        if diverged is not None:
            break
    model.eval()
    result = {"history": history, "steps": step, "steps_per_epoch": spe, "seconds": seconds,
              "resumed_from_epoch": start_epoch if resume else None, "diverged": diverged}
    if dist.world > 1:
        import torch.distributed as td

        digests: list[str | None] = [None] * dist.world
        td.all_gather_object(digests, params_digest(model))
        result["replicas"] = {"world_size": dist.world, "identical": len(set(digests)) == 1, "digests": digests}
    return result


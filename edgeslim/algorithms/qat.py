"""Quantization-aware training on the frozen PTQ graph.

The model trained is the one PTQ produced (``ptq.prepare`` -> ``calibrate`` -> ``freeze``): BatchNorm is
already folded into the convolutions, so the weights being trained are the weights that are deployed and
no BN statistics move during training (documented in docs/design.md). ``attach`` puts a
``TrainableQuantizer`` on every integer weight and activation quantizer, initialized from the PTQ scales;
``train`` runs the shared training loop (``train.loop``: SGD, cosine, optional distillation from the FP32
teacher, optional ``torchrun``, checkpoints) with the quantizers' per-step updates (``QuantizerSchedule``);
``finish`` writes the learned scales (and, for PoT / APoT weights, the level codes) back into the PTQ
modules so lowering, the integer engine and the QDQ export run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

from ..config import QATConfig
from ..errors import EdgeslimError
from ..quant.modules import ActQuant, QuantConv2d, QuantLinear, QuantSpec
from ..quant.qat import LevelSet, TrainableQuantizer
from ..train.checkpoint import Checkpoint
from ..train.data import TrainData
from ..train.dist import Dist
from ..train.loop import Batch, fit
from ..train.losses import distillation_loss
from . import ptq

__all__ = ["NON_UNIFORM_MAX_BITS", "QuantizerSchedule", "attach", "finish", "hutchinson_deltas",
           "hutchinson_trace", "qat_loss", "quantizers", "train"]


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
        if m.round_up is not None:  # AdaRound / BRECQ start: the learned codes become the weights
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
        m.set_weight_quantizer(TrainableQuantizer(levels, config.method, scale, m.w_zero_point.detach().float(),
                                                  m.w_axis, numel=m.weight.numel(), gamma=config.daq_gamma))
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
        q.set_quantizer(TrainableQuantizer(levels, config.method, scale, q.zero_point.detach().float(), None,
                                           gamma=config.daq_gamma))
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
        wq = m.wq
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
        m.set_weight_quantizer(None)
    for name, q in _acts(gm):
        aq = q.aq
        if aq is None:
            continue
        if aq.levels.uniform:
            q.scale.copy_(aq.scale.detach().abs().clamp_min(1e-8).reshape(()))
            q.set_quantizer(None)
        else:
            info["exportable"] = False
            info["reason"] = (f"{name}: {aq.levels.kind} activation levels are not uniform and ONNX QuantizeLinear "
                              "is; use --a-quantizer uniform to export")
            info["levels"][name] = {"kind": aq.levels.kind, "bits": aq.levels.bits, "scale": float(aq.scale.abs()),
                                    "codes": [int(v) for v in aq.levels.levels.tolist()]}
            aq.eval()
    ptq.refresh_input_scales(gm)
    return info


# -- training: the shared loop (``train.loop``) with the quantizers' own per-step updates ----------------------

def hutchinson_trace(loss: torch.Tensor, outputs: list[torch.Tensor], gen: torch.Generator
                     ) -> list[tuple[float, float] | None]:
    """Per tensor in ``outputs``: (Hutchinson estimate ``v^T H v`` of the trace of the loss Hessian with
    respect to that tensor, one Rademacher probe ``v``; mean absolute gradient). None where the loss does not
    depend on it. Exact for a diagonal Hessian (``v_i^2 = 1``; Hutchinson 1989, "A stochastic estimator of the
    trace of the influence matrix")."""
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


def hutchinson_deltas(model: nn.Module, batch: Batch, loss: Callable, dist: Dist = Dist()) -> list[float]:
    """EWGS's delta per quantizer: ``unit * (Tr(H) / N) / G`` (Lee et al. 2021, "Network quantization with
    element-wise gradient scaling", eq. 2) with ``H`` the Hessian of ``loss`` with respect to the quantizer's
    output (``hutchinson_trace``, probes drawn from the step's generator), ``N`` its size, ``G`` the mean
    absolute gradient and ``unit`` the quantizer's mean scale (delta multiplies a distance measured in codes).
    Negative curvature estimates give 0. Averaged over processes, so replicas stay identical."""
    qs = quantizers(model)
    for q in qs:
        q.hutchinson = True
    try:
        value = loss(model(batch.x), batch.y, batch.teacher_out)
        outs = [q.last_output for q in qs]
        deltas = []
        for q, o, est in zip(qs, outs, hutchinson_trace(value, outs, batch.gen)):
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


@dataclass
class QuantizerSchedule:
    """The quantizers' updates before every step (``train.loop``'s ``before_step``): DSQ's alpha annealed
    linearly over the run (Gong et al. 2019, "Differentiable soft quantization"), and every ``ewgs_every`` steps
    EWGS's delta re-estimated (``hutchinson_deltas``); delta is 0 (plain STE) until the first update. Both are
    functions of the step and of buffers in the model, so a resumed run repeats them exactly."""

    model: nn.Module
    cfg: QATConfig
    total: int
    ewgs_every: int
    loss: Callable
    dist: Dist = field(default_factory=Dist)

    def __post_init__(self) -> None:
        self.quantizers = quantizers(self.model)

    def __call__(self, batch: Batch) -> None:
        qs = self.quantizers
        frac = batch.step / max(1, self.total - 1)
        for q in qs:
            q.alpha = self.cfg.dsq_alpha[0] + (self.cfg.dsq_alpha[1] - self.cfg.dsq_alpha[0]) * frac
        if self.cfg.method == "ewgs" and batch.step > 0 and batch.step % self.ewgs_every == 0:
            for q, d in zip(qs, hutchinson_deltas(self.model, batch, self.loss, self.dist)):
                q.delta.fill_(d)


def qat_loss(cfg: QATConfig, objective: Callable | None = None) -> Callable:
    """The loss ``(out, y, teacher_out)``: ``objective(out, teacher_out)`` when given (labels unused), else
    distillation at ``cfg.kd_weight`` / ``cfg.kd_temperature`` (plain cross-entropy without teacher outputs)."""
    if objective is not None:
        return lambda out, y, t: objective(out, t)
    return lambda out, y, t: distillation_loss(out, y, t, weight=cfg.kd_weight, temperature=cfg.kd_temperature)


def train(model: fx.GraphModule, teacher: nn.Module | None, data: TrainData, cfg: QATConfig, *,
          evaluate: Callable[[nn.Module], float], checkpoint: Checkpoint | None = None, resume: bool = False,
          dist: Dist = Dist(), progress: bool = True, objective: Callable[[object, object], torch.Tensor] | None = None
          ) -> dict:
    """Train the quantizers and weights of ``model`` (after ``attach``) in place with ``train.loop.fit``.

    ``objective(student_out, teacher_out)`` replaces the classification loss (labels unused, no train accuracy):
    e.g. ``train.losses.head_distillation`` for detectors, whose outputs are raw head tensors. After each epoch
    the model is scored with ``evaluate`` (main process). ``checkpoint`` (its identity gets ``config``) is written
    as ``train.loop`` describes; ``resume`` continues from it. Returns ``fit``'s result plus
    ``resumed_from_epoch``.
    """
    if objective is not None and (teacher is None or cfg.method == "ewgs"):
        raise EdgeslimError("a distillation objective needs the FP32 teacher and a method other than ewgs "
                            "(EWGS's Hessian estimate uses the classification loss): use lsq, ste, dsq or daq")
    recipe = cfg.recipe(len(data.y))
    spe = max(1, math.ceil(len(data.y) / cfg.batch_size))
    epochs = math.ceil(recipe.steps / spe)
    loss = qat_loss(cfg, objective)
    schedule = QuantizerSchedule(model, cfg, recipe.steps, cfg.ewgs_every or max(1, min(spe, recipe.steps // 5)),
                                 loss, dist)

    def on_epoch(row: dict, m: nn.Module) -> None:
        qs = quantizers(m)
        if cfg.method == "ewgs":
            row["ewgs_delta_mean"] = float(np.mean([float(q.delta) for q in qs])) if qs else 0.0
            row["ewgs_delta_max"] = float(max([float(q.delta) for q in qs], default=0.0))
        if dist.main:
            m.eval()
            row["val_top1"] = evaluate(m)
            tqdm.write(f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train {row['train_top1']:.4f}, "
                       f"val {row['val_top1']:.4f} ({row['seconds']:.0f} s)")

    if checkpoint is not None:
        checkpoint.identity = {"config": cfg.to_dict(), **checkpoint.identity}
    result = fit(model, data, recipe, loss=loss, teacher=teacher if (cfg.kd or objective is not None) else None,
                 before_step=schedule, on_epoch=on_epoch, checkpoint=checkpoint, resume=resume, dist=dist,
                 progress=progress, desc="QAT", accuracy=objective is None)
    start = result["resumed_from_step"]
    result["resumed_from_epoch"] = None if start is None else start / spe
    return result

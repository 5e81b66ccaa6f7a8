"""The ``qat`` job for every task: PTQ start, quantization-aware training, export, scores, ``summary.json``.

The task (``tasks``: classify, detect, fidelity) is a parameter: it gives the training and calibration inputs
(``qat_setup``), the loss (``qat_loss``: the labels' cross-entropy or distillation for classify, head distillation
for detectors, output distillation for any model), the score of a PyTorch model after every epoch and at the end
(``qat_score``) and the scores of the exported files (``qat_files``). This job does what is the same for all of
them: the frozen FP32 teacher, ``api.quantize`` (the PTQ start), ``qat.attach``, the one training loop
(``qat.train`` -> ``train.loop.fit``), ``qat.finish``, the two ONNX files, ``encodings.json``, ``qat_model.pt``
and the summary.

The checkpoint (``checkpoint.pt``) is written into ``out`` atomically every ``checkpoint_every`` steps (by
default every five minutes of training) and at the end of every epoch, so a killed run continues with
``--resume`` exactly where the checkpoint was written, and ends with the weights of an uninterrupted run.
``--resume`` refuses a checkpoint of another model, QAT / PTQ config, plan or training data. Under ``torchrun``
every process trains its share of each batch and only the main one scores and writes. The final artefacts are
staged and moved into ``out`` at the end, ``summary.json`` last (``io.staging``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import api
from ..algorithms import mixed_precision as mp
from ..algorithms import ptq, qat
from ..config import MixedPlan, PTQConfig, QATConfig
from ..errors import EdgeslimError
from ..io.staging import staged
from ..models import ModelInfo
from ..report.encodings import encodings
from ..tasks import Task
from ..train.checkpoint import Checkpoint, params_digest
from ..train.dist import Dist

__all__ = ["run_qat"]


def run_qat(model: nn.Module, info: ModelInfo, task: Task, cfg: QATConfig, ptq_config: PTQConfig, out: Path, *,
            resume: bool = False, train_size: int | None = None, val_size: int | None = None,
            plan: MixedPlan | None = None, dist: Dist = Dist(), checkpoint_every: int | None = None) -> dict:
    """Train ``model`` quantization-aware on the task's training inputs, score it with the task, write ``out``;
    return the summary (on every process; only the main one scores and writes files).

    ``train_size``: training inputs used (None: all); ``val_size``: test inputs scored after every epoch (None:
    all); ``plan``: per-layer precisions of the PTQ start; ``checkpoint_every``: steps between checkpoints (None:
    every five minutes of training)."""
    task.check(info)
    objective, loss = task.qat_loss(cfg)
    if objective is not None and cfg.method == "ewgs":
        raise EdgeslimError(f"qat --task {task.name} distils the FP32 model's outputs; EWGS's Hessian estimate needs "
                            "the classification loss: use --method lsq, ste, dsq or daq")
    if mp.fixed_batch(model):
        cfg = replace(cfg, batch_size=1)  # an ONNX import whose reshapes were folded at batch 1
    out = Path(out)
    ckpt = Checkpoint(out / "checkpoint.pt", every=checkpoint_every,
                      identity={"model weights": params_digest(model), "ptq": ptq_config.to_dict(),
                                "plan": plan.to_dict() if plan is not None else None})
    main = dist.main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.check_start(resume)
    dist.barrier()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    setup = task.qat_setup(teacher, info, cfg, ptq_config, train_size, val_size, main)
    summary: dict = {"model": info.name, "task": task.name, **setup.fields}

    q = api.quantize(copy.deepcopy(model).eval(), setup.calib, ptq_config, plan=plan, input_shape=info.input_shape,
                     batch_size=setup.calib_batch_size, progress=main)
    gm = q.model
    ptq.set_mode(gm, "quant")
    if main:
        summary["ptq"] = {**task.qat_score(gm, "evaluating PTQ"), "seconds": q.seconds, "config": ptq_config.to_dict()}
    notes = qat.attach(gm, cfg)
    if main and (cfg.quantizer != "uniform" or cfg.act_quantizer != "uniform"):
        summary["init"] = task.qat_score(gm, f"evaluating {cfg.quantizer} init")
    result = qat.train(gm, teacher, setup.data, cfg,
                       evaluate=lambda m: task.qat_score(m, None, validation=True)[task.metric_key],
                       objective=objective, checkpoint=ckpt, resume=resume, dist=dist, progress=main)
    summary["history"] = result["history"]
    summary["training"] = {k: v for k, v in result.items() if k != "history"}
    if not main:
        return summary
    levels = qat.finish(gm)
    ptq.set_mode(gm, "quant")
    summary["qat"] = task.qat_score(gm, "evaluating QAT")
    summary.update(loss=loss, notes=notes, levels=levels["levels"], config=cfg.to_dict(),
                   ptq_config=ptq_config.to_dict())
    if plan is not None:
        summary["plan"] = plan.to_dict()

    def work(stage: Path) -> dict:
        if levels["exportable"]:
            q = api.convert_qat(gm, ptq_config, info.input_shape)
            int8 = api.export_onnx(q, stage / "model_int8.onnx")
            fp32 = api.export_fp32_onnx(teacher, info.input_shape, stage / "model_fp32.onnx")
            fields = task.qat_files(gm, q.intgraph, fp32, int8, info)
            sizes = fields.pop("size_bytes", {})
            summary.update(fields)
            summary["size_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size,
                                     "weights_quantized": q.intgraph.weight_bytes(), **sizes}
            enc = encodings(q.intgraph)
        else:
            summary[task.qat_file_key] = {"exported": False, "reason": levels["reason"]}
            enc = {}
        enc["qat_levels"] = levels["levels"]
        (stage / "encodings.json").write_text(json.dumps(enc, indent=1))
        torch.save(gm.state_dict(), stage / "qat_model.pt")
        return summary

    return staged(out, work)

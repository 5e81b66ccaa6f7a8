"""The ``qat`` job: FP32 and PTQ baselines, quantization-aware training, export, ``summary.json``.

The checkpoint (``checkpoint.pt``) is written into ``out`` atomically every ``checkpoint_every`` steps (by
default every five minutes of training) and at the end of every epoch, so a killed run continues with
``--resume`` exactly where the checkpoint was written, and ends with the weights of an uninterrupted run.
``--resume`` refuses a checkpoint of another model, QAT / PTQ config, plan or training data. The final
artefacts are staged and moved into ``out`` at the end, ``summary.json`` last.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import api
from .algorithms import ptq, qat
from .config import MixedPlan, PTQConfig
from .data import ImageDataset, batches, calibration_indices
from .errors import EdgeslimError
from .eval import metrics, ort as ort_eval
from .models import ModelInfo
from .report.encodings import encodings
from .train.checkpoint import Checkpoint, params_digest
from .train.data import load_train
from .train.dist import Dist


def top1(model: nn.Module, ds: ImageDataset, batch_size: int = 256, desc: str | None = None,
         indices: np.ndarray | None = None) -> float:
    model.eval()
    outs = []
    with torch.no_grad():
        for x, _ in batches(ds, batch_size, indices, desc=desc):
            outs.append(model(torch.from_numpy(x)).numpy())
    labels = ds.labels if indices is None else ds.labels[indices]
    return metrics.top1(np.concatenate(outs), labels)


def run_qat(model: nn.Module, info: ModelInfo, train_ds: ImageDataset, test_ds: ImageDataset, cfg: qat.QATConfig,
            ptq_config: PTQConfig, out: Path, *, resume: bool = False, train_size: int | None = None,
            val_size: int | None = None, batch_size: int = 256, plan: MixedPlan | None = None, dist: Dist = Dist(),
            checkpoint_every: int | None = None) -> dict:
    """Train ``model`` quantization-aware on ``train_ds``, score on ``test_ds``, write artefacts into ``out``;
    ``checkpoint_every``: steps between checkpoints (None: every five minutes of training)."""
    if info.num_classes and len(test_ds.classes) > info.num_classes:
        raise EdgeslimError(f"test data has {len(test_ds.classes)} classes but the model predicts {info.num_classes}: "
                            "pass data for this model")
    if train_ds.classes != test_ds.classes:
        raise EdgeslimError(f"--train-data has classes {train_ds.classes[:4]}... but --data has {test_ds.classes[:4]}...: "
                            "pass the training and test splits of the same data set")
    out = Path(out)
    ckpt = Checkpoint(out / "checkpoint.pt", every=checkpoint_every,
                      identity={"model weights": params_digest(model), "ptq": ptq_config.to_dict(),
                                "plan": plan.to_dict() if plan is not None else None})
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.check_start(resume)
    dist.barrier()
    main = dist.main
    data = load_train(train_ds, info, train_size, cfg.seed, main)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    summary: dict = {"model": info.name, "images": {"train": len(data.y), "test": len(test_ds),
                                                    "calibration": min(ptq_config.calib_size, len(data.y))}}
    if main:
        summary["fp32"] = {"top1": top1(teacher, test_ds, batch_size, "evaluating FP32")}

    calib_idx = calibration_indices(len(data.y), ptq_config.calib_size, ptq_config.seed, data.y.numpy())
    q = api.quantize(copy.deepcopy(model).eval(), data.x[calib_idx], ptq_config, plan=plan,
                     input_shape=info.input_shape, progress=main)
    gm = q.model
    if main:
        summary["ptq"] = {"top1": top1(gm, test_ds, batch_size, "evaluating PTQ"), "seconds": q.seconds,
                          "config": ptq_config.to_dict()}
    notes = qat.attach(gm, cfg)
    if main and (cfg.quantizer != "uniform" or cfg.act_quantizer != "uniform"):
        summary["init"] = {"top1": top1(gm, test_ds, batch_size, f"evaluating {cfg.quantizer} init")}
    val_idx = calibration_indices(len(test_ds), val_size, cfg.seed, test_ds.labels) if val_size else None
    summary["images"]["validation"] = len(test_ds) if val_idx is None else len(val_idx)
    result = qat.train(gm, teacher, data, cfg, evaluate=lambda m: top1(m, test_ds, batch_size, None, val_idx),
                       checkpoint=ckpt, resume=resume, dist=dist, progress=main)
    summary["history"] = result["history"]
    summary["training"] = {k: v for k, v in result.items() if k != "history"}
    if not main:
        return summary
    levels = qat.finish(gm)
    ptq.set_mode(gm, "quant")
    summary["qat"] = {"top1": top1(gm, test_ds, batch_size, "evaluating QAT")}
    summary["notes"] = notes
    summary["levels"] = levels["levels"]
    summary["config"] = cfg.to_dict()
    if plan is not None:
        summary["plan"] = plan.to_dict()
    from .io.staging import new_stage

    stage = new_stage(out)  # .staging-<pid>-...: the next run sweeps it if this process is killed (SIGKILL)
    try:
        if levels["exportable"]:
            q = api.convert_qat(gm, ptq_config, info.input_shape)
            graph = q.intgraph
            path = api.export_onnx(q, stage / "model_int8.onnx")
            fp32 = api.export_fp32_onnx(teacher, info.input_shape, stage / "model_fp32.onnx")
            sess = ort_eval.session(path, threads=0)
            logits = np.concatenate([ort_eval.predict(sess, x, batch_size) for x, _ in batches(test_ds, batch_size,
                                                                                             desc="evaluating ONNX")])
            summary["onnx"] = {"top1": metrics.top1(logits, test_ds.labels)}
            summary["size_bytes"] = {"fp32_onnx": fp32.stat().st_size, "int8_onnx": path.stat().st_size,
                                     "weights_quantized": graph.weight_bytes()}
            enc = encodings(graph)
            enc["qat_levels"] = levels["levels"]
            (stage / "encodings.json").write_text(json.dumps(enc, indent=1))
        else:
            summary["onnx"] = {"exported": False, "reason": levels["reason"]}
            (stage / "encodings.json").write_text(json.dumps({"qat_levels": levels["levels"]}, indent=1))
        torch.save(gm.state_dict(), stage / "qat_model.pt")
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "summary.json"):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    tqdm.write(f"FP32 {summary['fp32']['top1']:.4f}  PTQ {summary['ptq']['top1']:.4f}  QAT {summary['qat']['top1']:.4f}"
               + (f"  ONNX {summary['onnx']['top1']:.4f}" if "top1" in summary["onnx"] else
                  f"  (not exported: {summary['onnx']['reason']})"))
    return summary

"""Quantization-aware training of detectors without a detection loss: the ``qat --task detect`` job.

The student (the PTQ model with trainable quantizers, ``algorithms.qat``) learns to reproduce the FP32 model's raw
head outputs on the calibration-split images (``train.losses.head_distillation``): no labels, no anchor matching, and the
same code for every detector edgeslim decodes. The test split is scored (mAP) after every epoch and at the end
in PyTorch and in onnxruntime. Artifacts are staged and moved into ``out`` at the end, ``summary.json`` last;
``out/checkpoint.pt`` is written as for the classification ``qat`` job (``train.checkpoint``) and ``resume``
continues from it exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import api
from .algorithms import ptq, qat
from .config import MixedPlan, PTQConfig
from .data.detection import DetectionDataset
from .io.staging import staged
from .detect_task import (DetectOptions, calibration_images, check_detector, evaluate_models, fit_options,
                          ort_runner, paired_latency, to_model_order, torch_runner)
from .models import ModelInfo
from .report.encodings import encodings
from .train.checkpoint import Checkpoint, params_digest
from .train.data import TrainData
from .train.losses import head_distillation

LETTERBOX_PAD = 114 / 255  # the grey of the letterbox borders, in [0, 1] pixels


def run_detect_qat(model: nn.Module, info: ModelInfo, train: DetectionDataset, test: DetectionDataset,
                   cfg: qat.QATConfig, ptq_config: PTQConfig, out: Path, *, plan: MixedPlan | None = None,
                   train_size: int | None = None, opts: DetectOptions = DetectOptions(), resume: bool = False,
                   checkpoint_every: int | None = None) -> dict:
    """PTQ start on ``train``, QAT by head distillation on ``train``, mAP on ``test`` (PyTorch and ONNX)."""
    decoder = check_detector(info, test)
    opts = fit_options(model, opts)
    if getattr(model, "meta", {}).get("onnx_dynamic_batch") is False:
        cfg = replace(cfg, batch_size=1)  # an ONNX import whose reshapes were folded at batch 1
    ckpt = Checkpoint(Path(out) / "checkpoint.pt", every=checkpoint_every,
                      identity={"model weights": params_digest(model), "ptq": ptq_config.to_dict(),
                                "plan": plan.to_dict() if plan is not None else None})
    ckpt.check_start(resume)

    def mAP(m: nn.Module, desc: str) -> dict:
        return evaluate_models({"m": torch_runner(m)}, test, decoder, opts, desc=desc, info=info)["m"]

    def work(stage: Path) -> dict:
        x = calibration_images(train, train_size or len(train), cfg.seed, info)
        pad = (LETTERBOX_PAD - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
        data = TrainData(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64),
                             torch.from_numpy(np.broadcast_to(pad, (info.input_shape[0],)).copy()))
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        q = api.quantize(copy.deepcopy(model).eval(), x[:ptq_config.calib_size], ptq_config, plan=plan,
                         input_shape=info.input_shape, batch_size=opts.batch_size, progress=True)
        gm = q.model
        ptq.set_mode(gm, "quant")
        summary: dict = {"model": info.name, "task": "detect",
                         "images": {"train": len(x), "calibration": min(ptq_config.calib_size, len(x)),
                                    "test": len(test), "test_boxes": test.num_boxes(), "imgsz": test.imgsz},
                         "fp32": mAP(teacher, "evaluating FP32"), "ptq": mAP(gm, "evaluating PTQ")}
        notes = qat.attach(gm, cfg)
        result = qat.train(gm, teacher, data, cfg, evaluate=lambda m: mAP(m, "")["map50_95"], objective=head_distillation,
                           checkpoint=ckpt, resume=resume)
        levels = qat.finish(gm)
        ptq.set_mode(gm, "quant")
        summary["history"] = result["history"]
        summary["training"] = {k: v for k, v in result.items() if k != "history"}
        summary["loss"] = "head distillation: MSE of sigmoid(raw head outputs) to the FP32 model's (no labels)"
        summary["notes"], summary["config"], summary["ptq_config"] = notes, cfg.to_dict(), ptq_config.to_dict()
        if plan is not None:
            summary["plan"] = plan.to_dict()
        if not levels["exportable"]:
            summary["qat"] = mAP(gm, "evaluating QAT")
            summary["onnx_int8"] = {"exported": False, "reason": levels["reason"]}
            return summary
        q = api.convert_qat(gm, ptq_config, info.input_shape)
        graph = q.intgraph
        int8 = api.export_onnx(q, stage / "model_int8.onnx")
        fp32 = api.export_fp32_onnx(teacher, info.input_shape, stage / "model_fp32.onnx")
        summary.update(evaluate_models({"qat": torch_runner(gm), "onnx_int8": ort_runner(int8)}, test, decoder, opts,
                                       desc="evaluating QAT / ONNX", info=info))
        summary["export_check"] = export_check(gm, graph, int8, next(test.batches(opts.batch_size))[0], info)
        summary["size_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size,
                                 "weights_quantized": graph.weight_bytes()}
        summary["latency_ms"] = paired_latency(fp32, int8, info, opts)
        (stage / "encodings.json").write_text(json.dumps(encodings(graph), indent=1))
        torch.save(gm.state_dict(), stage / "qat_model.pt")
        return summary

    return staged(out, work)


def export_check(gm: nn.Module, graph, path: Path, x: np.ndarray, info: ModelInfo) -> dict:
    """How far onnxruntime's INT8 file is from the trained PyTorch model on one batch: the largest difference of
    each head output, in steps (LSB) of that output's quantizer."""
    x = to_model_order(x, info)
    ours, theirs = torch_runner(gm)(x), ort_runner(path)(x)
    producer = {o: n for n in graph.nodes for o in n.outputs}
    diffs, steps = [], []
    for name, a, b in zip(graph.output_names, ours, theirs):
        node = producer.get(name)
        qp = graph.qparams.get(node.inputs[0]) if node is not None and node.op == "DequantizeLinear" else None
        d = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        diffs.append(d)
        steps.append(d / qp.scale if qp is not None else None)  # None: a float output (no quantizer)
    return {"images": int(len(x)), "max_abs_diff": diffs, "max_diff_lsb": steps}


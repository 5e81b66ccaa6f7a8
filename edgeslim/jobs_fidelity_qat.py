"""Quantization-aware training without labels, for any model: the ``qat --task fidelity`` job.

The student (the PTQ model with trainable quantizers, ``algorithms.qat``) learns to reproduce the FP32 model's
outputs on the training inputs (``train.losses.output_distillation``: per output, the squared error relative to
the output's energy, the inverse of the SQNR the fidelity task reports); every output counts, whatever it holds
(boxes, landmarks, feature maps, class scores). After every epoch the test inputs are scored in PyTorch (the worst
output's SQNR against the FP32 model); at the end the INT8 and FP32 ONNX files are scored against each other in
onnxruntime (``eval.fidelity``), as ``quantize --task fidelity`` does. Checkpoints and ``resume`` as for the other
QAT jobs (``train.checkpoint``); artifacts are staged, ``summary.json`` last.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import analysis, api
from .algorithms import mixed_precision as mp
from .algorithms import ptq, qat
from .config import MixedPlan, PTQConfig
from .eval import ort as ort_eval
from .eval.fidelity import fidelity, headline_db
from .io.staging import staged
from .models import ModelInfo
from .report.encodings import encodings
from .train.checkpoint import Checkpoint, params_digest
from .train.data import TrainData
from .train.losses import output_distillation

__all__ = ["run_fidelity_qat"]


def _outputs(m: nn.Module, x: np.ndarray, batch: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return mp.outputs_of(m, torch.from_numpy(x), batch)


def run_fidelity_qat(model: nn.Module, info: ModelInfo, train_x: np.ndarray, test_x: np.ndarray, cfg: qat.QATConfig,
                     ptq_config: PTQConfig, out: Path, *, plan: MixedPlan | None = None, batch_size: int = 64,
                     resume: bool = False, checkpoint_every: int | None = None, spec: dict | None = None) -> dict:
    """PTQ start on ``train_x``, QAT by output distillation on ``train_x``, SQNR vs FP32 on ``test_x``."""
    if mp.fixed_batch(model):
        from dataclasses import replace

        cfg = replace(cfg, batch_size=1)  # an ONNX import whose reshapes were folded at batch 1
        batch_size = 1
    ckpt = Checkpoint(Path(out) / "checkpoint.pt", every=checkpoint_every,
                      identity={"model weights": params_digest(model), "ptq": ptq_config.to_dict(),
                                "plan": plan.to_dict() if plan is not None else None})  # the training loop adds the data's digest
    ckpt.check_start(resume)

    def work(stage: Path) -> dict:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        ref = _outputs(teacher, test_x, batch_size)

        def sqnr(m: nn.Module) -> float:
            return mp.worst_sqnr(_outputs(m, test_x, batch_size), ref)

        q = api.quantize(copy.deepcopy(model).eval(), train_x[:ptq_config.calib_size], ptq_config, plan=plan,
                         input_shape=info.input_shape, batch_size=batch_size, progress=True)
        gm = q.model
        ptq.set_mode(gm, "quant")
        data = TrainData(torch.from_numpy(np.ascontiguousarray(train_x)), torch.zeros(len(train_x), dtype=torch.int64),
                         torch.zeros(info.input_shape[0]))  # crops pad with 0 in model-input units
        summary: dict = {"model": info.name, "task": "fidelity",
                         "inputs": {"train": int(len(train_x)), "calibration": int(min(ptq_config.calib_size,
                                                                                           len(train_x))),
                                    "test": int(len(test_x)), "shape": list(info.input_shape)},
                         "preprocessing": spec if spec is not None else "inputs given as preprocessed arrays",
                         "metric": "worst output SQNR vs the FP32 model (dB), PyTorch on the test inputs",
                         "ptq": {"sqnr_db": sqnr(gm)}}
        notes = qat.attach(gm, cfg)
        result = qat.train(gm, teacher, data, cfg, evaluate=sqnr, objective=output_distillation, checkpoint=ckpt,
                           resume=resume)
        levels = qat.finish(gm)
        ptq.set_mode(gm, "quant")
        summary["qat"] = {"sqnr_db": sqnr(gm)}
        summary["history"] = result["history"]
        summary["training"] = {k: v for k, v in result.items() if k != "history"}
        summary["loss"] = "output distillation: per output ||student - FP32||^2 / ||FP32||^2, averaged (no labels)"
        summary["notes"], summary["config"], summary["ptq_config"] = notes, cfg.to_dict(), ptq_config.to_dict()
        if plan is not None:
            summary["plan"] = plan.to_dict()
        if not levels["exportable"]:
            summary["onnx_int8"] = {"exported": False, "reason": levels["reason"]}
            return summary
        q = api.convert_qat(gm, ptq_config, info.input_shape)
        graph = q.intgraph
        int8 = api.export_onnx(q, stage / "model_int8.onnx")
        fp32 = api.export_fp32_onnx(teacher, info.input_shape, stage / "model_fp32.onnx")
        outs = {k: ort_eval.predict_all(ort_eval.session(p, threads=0), test_x, batch_size)
                for k, p in (("fp32", fp32), ("int8", int8))}
        lsbs = dict(zip(outs["int8"], analysis.output_steps(graph).values()))
        per_output = fidelity(dict(zip(outs["int8"], outs["fp32"].values())), outs["int8"], lsbs)
        integer, total = ort_eval.integer_convs(int8)
        summary["onnx_int8"] = {"fidelity_vs_fp32": per_output, "headline_sqnr_db": headline_db(per_output),
                                "integer_convs": integer, "total_convs": total}
        summary["size_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size,
                                 "weights_quantized": graph.weight_bytes()}
        summary["latency_ms"] = ort_eval.fp32_int8_latency(fp32, int8, info.input_shape)
        (stage / "encodings.json").write_text(json.dumps(encodings(graph), indent=1))
        torch.save(gm.state_dict(), stage / "qat_model.pt")
        return summary

    return staged(out, work)

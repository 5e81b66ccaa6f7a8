"""The label-free ``fidelity`` task: any model, any number of outputs, no labels.

Its data are model inputs (``data.inputs``: arrays as they are, or images through an ``InputSpec``). A model is
scored by how closely each output of the INT8 file follows the FP32 file's (``eval.fidelity``: SQNR, cosine,
largest error in output LSBs, top-1 agreement for class scores), both run in onnxruntime; the headline and the
``sensitivity`` / ``mixed`` metric is the worst output's SQNR in dB (budgets as a floor in dB). The INT8 file keeps
the FP32 file's input / output names, and both carry the preprocessing in their metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from .. import analysis, api
from ..algorithms import mixed_precision as mp
from ..algorithms import ptq
from ..config import AnalyzeOptions, MixedPlan, PTQConfig, QATConfig
from ..data.inputs import InputSpec
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..eval.fidelity import fidelity, headline_db
from ..export.onnx_qdq import save_onnx, set_io_names
from ..intgraph import IntGraph
from ..models import ModelInfo
from ..train.data import TrainData
from ..train.losses import output_distillation
from .base import Deployed, QATSetup, Split, check_source, fake_quant_outputs

__all__ = ["Fidelity", "output_lsbs", "SIMULATION_SUBSET"]

SIMULATION_SUBSET = 32  # inputs the PyTorch simulation is checked on against the INT8 file


def output_lsbs(g: IntGraph) -> dict[str, float | None]:
    """The quantization step of each model output that is dequantized from integer codes (else None)."""
    return analysis.output_steps(g)


def fixed_batch(model: nn.Module) -> bool:
    """An imported ONNX model whose reshapes were folded at batch 1 (it runs one input at a time)."""
    return (getattr(model, "meta", {}) or {}).get("onnx_dynamic_batch") is False


class Fidelity:
    """Label-free: model inputs as arrays; the worst output's SQNR (dB) against the FP32 model. ``spec``: how
    images became these inputs (None: arrays given as they are); ``threads`` / ``latency_rounds``: latency."""

    name, metric_key, graph_key = "fidelity", "sqnr_db", "onnx_int8"
    calib_batch_size = 128
    tflite_range_inputs = 256
    sweep_inputs, scores_against_fp32 = "holdout", True
    metric_description = {"name": "SQNR", "unit": "dB", "per_unit": 1.0}

    def __init__(self, calib: np.ndarray, test: np.ndarray, batch_size: int = 64, seed: int = 0, *,
                 spec: InputSpec | None = None, threads: int = 1, latency_rounds: int = 50) -> None:
        self.calib_x, self.test_x, self.batch_size, self.seed = calib, test, batch_size, seed
        self.spec, self.threads, self.latency_rounds = spec, threads, latency_rounds
        self._qat: tuple | None = None  # qat: (batch, test / validation inputs, the FP32 outputs on them)

    def check(self, info: ModelInfo) -> None:
        return None

    # ------------------------------------------------------------------ quantize / analyze

    def calibration(self, config: PTQConfig, info: ModelInfo) -> np.ndarray:
        return self.calib_x

    def preprocessing(self, info: ModelInfo) -> dict | str:
        return self.spec.to_dict() if self.spec is not None else "inputs given as preprocessed arrays"

    def metadata(self, info: ModelInfo, config: PTQConfig) -> dict[str, str]:
        values = {"edgeslim.model": info.name, "edgeslim.input_shape": json.dumps(list(info.input_shape)),
                  "edgeslim.quantization": json.dumps({"w_bits": config.w_bits, "a_bits": config.a_bits})}
        if self.spec is not None:
            values["edgeslim.preprocessing"] = json.dumps(self.spec.to_dict())
        return values

    def fp32_file(self, model: nn.Module, info: ModelInfo, path: Path) -> Path:
        """The user's own ONNX file when the model came from one, else torch's export (with the INT8 file's IO
        names)."""
        src = (getattr(model, "meta", {}) or {}).get("onnx_path")
        if src:
            return save_onnx(onnx.load(src), path)
        proto = onnx.load(str(api.export_fp32_onnx(model, info.input_shape, path)))
        n_out = len(proto.graph.output)
        return save_onnx(set_io_names(proto, *api.fp32_io_names(model, n_out)), path)

    def evaluate(self, model: nn.Module, info: ModelInfo, d: Deployed, analyze: AnalyzeOptions | None) -> dict:
        """Per output agreement of the INT8 file with the FP32 file on every test input (onnxruntime); the PyTorch
        simulation against the INT8 file on the first inputs; the engine with ``analyze``; the ``.tflite``."""
        test, batch = self.test_x, (1 if fixed_batch(model) else self.batch_size)
        names = api.fp32_io_names(d.q.model, len(d.q.intgraph.output_names))
        lsbs = dict(zip(names[1], output_lsbs(d.q.intgraph).values()))
        sessions = {k: ort_eval.session(p, threads=0) for k, p in (("fp32", d.fp32), ("int8", d.int8))}
        outs = {k: ort_eval.predict_all(s, test, batch) for k, s in sessions.items()}
        if list(outs["fp32"]) != list(outs["int8"]):
            raise EdgeslimError(f"internal: INT8 outputs {list(outs['int8'])} differ from FP32 {list(outs['fp32'])}")
        per_output = fidelity(outs["fp32"], outs["int8"], lsbs)
        sub = test[:SIMULATION_SUBSET]
        sim = dict(zip(outs["int8"], _simulate(d.q, sub, batch)))
        agreement = {}
        for name, y in sim.items():
            diff = float(np.abs(y - outs["int8"][name][:len(sub)]).max()) if y.size else 0.0
            agreement[name] = {"max_abs_diff": diff, **({"max_diff_lsb": diff / lsbs[name]} if lsbs.get(name) else {})}
        fields = {
            "inputs": {"calibration": int(len(d.calib)), "test": int(len(test)), "fixed_batch": fixed_batch(model),
                       "names": names[0], "shape": list(info.input_shape)},
            "outputs": names[1],
            "headline": {"metric": "worst output SQNR of INT8 vs FP32 (dB)", "value": headline_db(per_output)},
            "onnx_int8": {"fidelity_vs_fp32": per_output},
            "simulation_vs_onnx_int8": {"images": int(len(sub)), "per_output": agreement},
        }
        if analyze is not None:
            fields.update(analysis.analyze_outputs(d.q.intgraph, test, outs["int8"], outs["fp32"], analyze, batch))
        if d.lite is not None:
            fields.update(self._tflite_fields(d, outs["fp32"], names[1]))
        return fields

    def _tflite_fields(self, d: Deployed, fp32: dict[str, np.ndarray], names: list[str]) -> dict:
        """``model_int8.tflite`` (+ TFLM files); its outputs in LiteRT (XNNPACK, 1 thread, batch 1) scored against
        the FP32 ONNX outputs; the engine's ``tflite`` mode vs LiteRT / TFLM on the first inputs."""
        from ..export.tflm import agreement, litert_runner, write_files

        fb, tg, meta = d.lite
        test = self.test_x
        fields = write_files(fb, tg, meta, d.stage, d.formats)
        lsbs = dict(zip(names, output_lsbs(tg).values()))
        got = dict(zip(names, litert_runner(fb)(test)))
        fields["tflite"].update(fidelity_vs_fp32=fidelity(fp32, got, lsbs), inputs=int(len(test)),
                                scored_by="LiteRT (XNNPACK, 1 thread), batch 1",
                                engine_vs_runtimes=agreement(tg, fb, test[:SIMULATION_SUBSET // 4], names))
        return fields

    def latency(self, d: Deployed, info: ModelInfo) -> dict:
        return ort_eval.fp32_int8_latency(d.fp32, d.int8, info.input_shape, threads=self.threads,
                                          rounds=self.latency_rounds)

    def write_report(self, summary: dict, info: ModelInfo, path: Path) -> None:
        from ..report.fidelity_html import write_fidelity_report

        write_fidelity_report(summary, path)

    # ------------------------------------------------------------------ sensitivity / mixed

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str = "calib") -> Split:
        """Seeded: ``calib_size`` calibration inputs, and a held-out subset disjoint from them (the rest of the
        calibration inputs, or of ``--data`` with ``holdout_from="data"``)."""
        check_source(holdout_size, holdout_from)
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(self.calib_x))
        n_cal = min(config.calib_size, len(order))
        src = self.calib_x if holdout_from == "calib" else self.test_x
        rest = order[n_cal:] if holdout_from == "calib" else rng.permutation(len(self.test_x))
        minimum = 8 + (8 if holdout_from == "data" else 0)
        if len(rest) < minimum:
            what = ("--calib-data holds no inputs beyond the --calib-size used for calibration"
                    if holdout_from == "calib" else "--data has too few inputs")
            raise EdgeslimError(f"{what} for a held-out subset of at least 8: add inputs, lower --calib-size, or use "
                                "--holdout-from data")
        size = min(holdout_size, len(rest) - (8 if holdout_from == "data" else 0))
        hold = np.sort(rest[:size])
        eval_idx = (np.arange(len(self.test_x)) if holdout_from == "calib"
                    else np.setdiff1d(np.arange(len(self.test_x)), hold))
        return Split(self.calib_x[np.sort(order[:n_cal])], torch.from_numpy(src[hold]), mp.sqnr_metric(), eval_idx,
                     holdout_from)

    def _test(self, indices: np.ndarray | None) -> np.ndarray:
        return self.test_x if indices is None else self.test_x[indices]

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]:
        """Worst-output SQNR of each ONNX model against the ``fp32`` one, all run in onnxruntime."""
        if "fp32" not in paths:
            raise ValueError("fidelity scoring needs the FP32 model under the key 'fp32'")
        x = self._test(indices)
        outs = {k: ort_eval.predict_all(ort_eval.session(p, threads=0, inputs=len(x)), x, self.batch_size)
                for k, p in paths.items()}
        ref = [torch.from_numpy(v) for v in outs["fp32"].values()]
        return {k: mp.worst_sqnr([torch.from_numpy(v) for v in o.values()], ref) for k, o in outs.items()}

    def score_fields(self, paths: dict[str, Path], desc: str,
                     indices: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """The worst output's SQNR of each file (its only score), against the ``fp32`` one."""
        return {k: {"sqnr_db": v} for k, v in self.score_onnx(paths, desc, indices).items()}

    @property
    def test_size(self) -> int:
        return len(self.test_x)

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]:
        """Worst-output SQNR of the fake-quant model under each plan against the FP32 model, in PyTorch."""
        x = self._test(indices)
        outs = fake_quant_outputs(gm, config, plans, model,
                                  (x[i:i + self.batch_size] for i in range(0, len(x), self.batch_size)))
        return {k: mp.worst_sqnr(v, outs["fp32"]) for k, v in outs.items()}


    # ------------------------------------------------------------------ qat (``calib``: the training inputs)

    qat_file_key = "onnx_int8"

    def qat_loss(self, cfg: QATConfig) -> tuple[Callable | None, str]:
        """Output distillation (``train.losses.output_distillation``): the inverse of the SQNR that is scored."""
        return (output_distillation,
                "output distillation: per output ||student - FP32||^2 / ||FP32||^2, averaged (no labels)")

    def qat_setup(self, teacher: nn.Module, info: ModelInfo, cfg: QATConfig, ptq_config: PTQConfig,
                  train_size: int | None, val_size: int | None, main: bool) -> QATSetup:
        """The first ``train_size`` training inputs (all by default; the CLI draws a seeded subset when it loads
        them), crops padded with 0 in model-input units; the first ``calib_size`` of them calibrate. The FP32
        model's outputs on the test inputs (the first ``val_size`` of them after every epoch) are the reference."""
        batch = 1 if fixed_batch(teacher) else self.batch_size
        x = self.calib_x[:train_size] if train_size else self.calib_x
        sets = {"test": self.test_x, "validation": self.test_x[:val_size] if val_size else self.test_x}
        with torch.no_grad():
            refs = {k: mp.outputs_of(teacher, torch.from_numpy(v), batch) for k, v in sets.items() if
                    k == "test" or val_size}
        refs.setdefault("validation", refs["test"])
        self._qat = (batch, sets, refs)
        val = sets["validation"]
        data = TrainData(torch.from_numpy(np.ascontiguousarray(x)), torch.zeros(len(x), dtype=torch.int64),
                         torch.zeros(info.input_shape[0]))
        fields = {"inputs": {"train": int(len(x)), "calibration": int(min(ptq_config.calib_size, len(x))),
                             "test": int(len(self.test_x)), "shape": list(info.input_shape), "validation": int(len(val))},
                  "preprocessing": self.preprocessing(info),
                  "metric": "worst output SQNR vs the FP32 model (dB), PyTorch on the test inputs"}
        return QATSetup(data, x[:ptq_config.calib_size], batch, fields)

    def qat_score(self, m: nn.Module, desc: str | None, validation: bool = False) -> dict:
        """The worst output's SQNR against the FP32 model on the test inputs (``validation``: the first
        ``val_size``)."""
        batch, sets, refs = self._qat
        key = "validation" if validation else "test"
        m.eval()
        with torch.no_grad():
            return {"sqnr_db": mp.worst_sqnr(mp.outputs_of(m, torch.from_numpy(sets[key]), batch), refs[key])}

    def qat_files(self, gm: fx.GraphModule, graph: IntGraph, fp32: Path, int8: Path, info: ModelInfo) -> dict:
        """Per output agreement of the INT8 file with the FP32 file on the test inputs, both in onnxruntime, as
        ``quantize --task fidelity`` reports it; integer convs; the paired latency."""
        batch = self._qat[0]
        outs = {k: ort_eval.predict_all(ort_eval.session(p, threads=0), self.test_x, batch)
                for k, p in (("fp32", fp32), ("int8", int8))}
        lsbs = dict(zip(outs["int8"], output_lsbs(graph).values()))
        per_output = fidelity(dict(zip(outs["int8"], outs["fp32"].values())), outs["int8"], lsbs)
        integer, total = ort_eval.integer_convs(int8)
        return {"onnx_int8": {"fidelity_vs_fp32": per_output, "headline_sqnr_db": headline_db(per_output),
                              "integer_convs": integer, "total_convs": total},
                "latency_ms": ort_eval.fp32_int8_latency(fp32, int8, info.input_shape, threads=self.threads,
                                                         rounds=self.latency_rounds)}

def _simulate(q: api.Quantized, x: np.ndarray, batch: int) -> list[np.ndarray]:
    ptq.set_mode(q.model, "quant")
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            y = q.model(torch.from_numpy(x[i:i + batch]))
            ys = list(y) if isinstance(y, (tuple, list)) else [y]
            for k, t in enumerate(ys):
                if len(outs) <= k:
                    outs.append([])
                outs[k].append(t.numpy())
    return [np.concatenate(o) for o in outs]

"""Thin public verbs over the pipeline stages.

>>> import edgeslim, torch
>>> model, info = edgeslim.build_model("resnet20")
>>> calib = torch.randn(32, *info.input_shape)
>>> q = edgeslim.quantize(model, calib, edgeslim.PTQConfig(w_bits=8, a_bits=8))
>>> _ = edgeslim.export_onnx(q, "/tmp/r20_int8.onnx")
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .algorithms import ptq
from .algorithms.bias_correction import correct_bias
from .algorithms.reconstruction import Reconstruction, reconstruct
from .config import MixedPlan, PTQConfig
from .errors import EdgeslimError
from .export.onnx_qdq import save_onnx, set_io_names, to_onnx
from .intgraph import IntGraph
from .lower import lower


class FloatIslandWarning(UserWarning):
    """Some ops of the model run in float in the INT8 model (listed in the message and in ``summary.json``)."""


@dataclass
class Quantized:
    """The result of ``quantize``: the fake-quant model, its integer graph, and how it was made."""

    model: fx.GraphModule  # fake-quant simulation (``ptq.set_mode(model, "off")`` runs it in float)
    intgraph: IntGraph
    config: PTQConfig
    input_shape: tuple[int, ...]
    seconds: float  # prepare + calibrate + freeze + (reconstruction, bias correction) + lower
    plan: MixedPlan | None = None
    reports: dict[str, list[dict]] = field(default_factory=dict)  # per-unit AdaRound / BRECQ results


Calibration = torch.Tensor | np.ndarray | Callable[[], Iterable[torch.Tensor]]


def _as_batches(calib: Calibration, batch_size: int) -> Callable[[], Iterable[torch.Tensor]]:
    if callable(calib):
        return lambda: (torch.as_tensor(x, dtype=torch.float32) for x in calib())
    x = torch.as_tensor(np.asarray(calib) if not isinstance(calib, torch.Tensor) else calib, dtype=torch.float32)
    if x.dim() != 4 or len(x) == 0:
        raise EdgeslimError(f"calibration data has shape {tuple(x.shape)}: pass a non-empty N,C,H,W batch")
    return lambda: (x[i:i + batch_size] for i in range(0, len(x), batch_size))


def quantize(model: nn.Module, calib: Calibration, config: PTQConfig | None = None, *,
             plan: MixedPlan | None = None, input_shape: tuple[int, ...] | None = None, batch_size: int = 128,
             progress: bool = False) -> Quantized:
    """Post-training quantization: capture, fold BN, fuse, calibrate on ``calib``, freeze, lower.

    ``calib`` is an N,C,H,W array / tensor of preprocessed images or a callable returning an
    iterable of batches (called once per calibration pass). ``plan`` sets per-layer precisions
    (mixed precision, FP16 / FP32 islands); see ``MixedPlan``. ``config.algorithms`` adds CLE, AdaRound or
    BRECQ (``config.iters`` per unit; per-unit results in ``Quantized.reports``) and bias correction.
    """
    config = config or PTQConfig()
    if input_shape is None:
        if callable(calib):
            raise EdgeslimError("pass input_shape=(C, H, W) when calibration data is a callable")
        input_shape = tuple(np.asarray(calib).shape[1:]) if not isinstance(calib, torch.Tensor) else tuple(calib.shape[1:])
    t0 = time.perf_counter()
    if getattr(model, "meta", {}).get("onnx_dynamic_batch") is False:
        batch_size = 1  # an imported ONNX model with batch-1 reshapes (e.g. channel shuffles folded at batch 1)
    gm = ptq.prepare(model, tuple(input_shape), config, plan)
    batches = _as_batches(calib, batch_size)
    ptq.calibrate(gm, batches, progress=progress)
    ptq.freeze(gm, config)
    reports = {}
    method = next((m for m in ("adaround", "brecq") if m in config.algorithms), None)  # at most one (PTQConfig)
    if method is not None:
        settings = Reconstruction(iters=config.iters, fisher=config.fisher, seed=config.seed)
        units = reconstruct(gm, torch.cat(list(batches())), method=method, settings=settings, progress=progress)
        reports[method] = [r.to_dict() for r in units]
    if "bias-correction" in config.algorithms:
        correct_bias(gm, batches, progress=progress)
    graph = lower(gm, tuple(input_shape))
    islands = [i["fn"] for i in graph.float_islands() if i["op"] in ("FloatIsland", "Softmax")]
    if islands:
        warnings.warn(FloatIslandWarning(
            f"{len(islands)} op(s) have no integer form and run in float between DequantizeLinear / QuantizeLinear: "
            f"{', '.join(sorted(set(islands)))}"), stacklevel=2)
    return Quantized(gm, graph, config, tuple(input_shape), time.perf_counter() - t0, plan, reports)


def export_onnx(q: Quantized, path: str | Path, *, weight_type: str = "auto", activations: str = "float",
                io_names: tuple[list[str], list[str]] | None = None) -> Path:
    """Write the INT8 (QDQ) ONNX model of ``q`` atomically.

    ``weight_type``: ``int8``, ``uint8`` or ``auto`` (uint8 on x86 CPUs without VNNI, where onnxruntime's
    int8-weight kernels saturate; see ``export.onnx_qdq``). ``io_names`` (input names, output names) default to
    the names of the FP32 file: an imported ONNX model's own, else those ``export_fp32_onnx`` writes.
    """
    model = to_onnx(q.intgraph, weight_type=weight_type, activations=activations)
    return save_onnx(set_io_names(model, *(io_names or fp32_io_names(q.model, len(q.intgraph.output_names)))),
                     Path(path))


def fp32_io_names(model: nn.Module, n_outputs: int) -> tuple[list[str], list[str]]:
    """The FP32 file's input and output names: the imported ONNX file's, else ``export_fp32_onnx``'s."""
    meta = getattr(model, "meta", {}) or {}
    if meta.get("onnx_input_names") and len(meta.get("onnx_output_names", [])) == n_outputs:
        return list(meta["onnx_input_names"][:1]), list(meta["onnx_output_names"])
    return ["input"], (["output"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)])


def export_fp16_onnx(fp32_onnx: str | Path, path: str | Path) -> Path:
    """The whole model in FP16 (weights and arithmetic; float32 inputs / outputs), for FP16 devices.

    Converted with onnxconverter-common (Microsoft's ONNX float16 converter). onnxruntime's CPU provider
    has few FP16 kernels on x86 and inserts casts around the others, so on such a CPU this halves the
    file but does not speed anything up (BENCHMARKS.md measures it).
    """
    import onnx
    from onnxconverter_common import float16

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": values below FP16's range
        model = float16.convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True)
    return save_onnx(model, path)


def export_fp32_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write the float model as ONNX (opset 17, dynamic batch) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    x = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            y = model.eval()(x)
    except Exception as exc:
        raise EdgeslimError(f"model does not run on an input of shape {tuple(x.shape)} "
                            f"({str(exc).splitlines()[0][:160]}): check the input shape") from None
    n_out = len(y) if isinstance(y, (tuple, list)) else 1  # detectors: one output per head
    outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / constant-folding notes
            torch.onnx.export(model.eval(), (x,), str(tmp), dynamo=False,
                              input_names=["input"], output_names=outputs, opset_version=17,
                              dynamic_axes={"input": {0: "N"}, **{o: {0: "N"} for o in outputs}})
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise EdgeslimError(f"FP32 ONNX export failed ({str(exc).splitlines()[0][:160]}): the model uses an op "
                            "torch.onnx cannot export") from None
    tmp.replace(path)
    return path

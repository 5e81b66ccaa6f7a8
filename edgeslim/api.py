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
from .algorithms.reconstruction import reconstruct
from .config import MixedPlan, PTQConfig, Reconstruction
from .errors import EdgeslimError
from .export.onnx_qdq import set_io_names, to_onnx
from .intgraph import IntGraph
from .io.atomic import atomic_path, check_destination
from .lower import lower

__all__ = ["FloatIslandWarning", "Quantized", "Calibration", "batch_count", "calibration_batches", "quantize",
           "calibrate", "convert_qat", "export_onnx", "fp32_io_names", "export_fp16_onnx", "export_fp32_onnx"]


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


Calibration = torch.Tensor | np.ndarray | Callable[[], Iterable[torch.Tensor]] | Iterable


def _as_batches(calib: Calibration, batch_size: int) -> Callable[[], Iterable[torch.Tensor]]:
    if callable(calib):
        return lambda: (_batch_tensor(x) for x in calib())
    if not isinstance(calib, (torch.Tensor, np.ndarray)):
        return calibration_batches(calib)
    x = torch.as_tensor(np.asarray(calib) if not isinstance(calib, torch.Tensor) else calib, dtype=torch.float32)
    if x.dim() != 4 or len(x) == 0:
        raise EdgeslimError(f"calibration data has shape {tuple(x.shape)}: pass a non-empty N,C,H,W batch")
    return lambda: (x[i:i + batch_size] for i in range(0, len(x), batch_size))


def batch_count(calib: Calibration, batch_size: int) -> int | None:
    """How many batches ``_as_batches`` yields for an array / tensor (None: unknown until read)."""
    if isinstance(calib, (torch.Tensor, np.ndarray)) and len(calib):
        return -(-len(calib) // batch_size)
    return None


def _batch_tensor(item) -> torch.Tensor:
    """One calibration batch: a tensor / array, or the inputs of an ``(x, y)`` pair (what a DataLoader yields)."""
    if isinstance(item, (tuple, list)) and item and not isinstance(item[0], (int, float)):
        item = item[0]
    if isinstance(item, dict):
        raise EdgeslimError("calibration batches are dicts: pass tensors, or (inputs, labels) pairs")
    try:
        x = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EdgeslimError(f"a calibration batch is a {type(item).__name__} ({str(exc)[:80]}): pass N,C,H,W "
                            "tensors or (inputs, labels) pairs") from None
    if x.dim() == 3:  # one image
        x = x.unsqueeze(0)
    if x.dim() < 2 or len(x) == 0:
        raise EdgeslimError(f"a calibration batch has shape {tuple(x.shape)}: pass non-empty N,C,H,W batches")
    return x


def calibration_batches(data: Iterable) -> Callable[[], Iterable[torch.Tensor]]:
    """Calibration data as ``ptq.calibrate`` takes it (a callable returning the batches, called once per pass) from
    any iterable of batches or of ``(inputs, labels)`` pairs: a ``torch.utils.data.DataLoader``, a list, a
    generator (read once and kept)."""
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise EdgeslimError(f"calibration data is a {type(data).__name__}: pass an N,C,H,W tensor / array, a "
                            "DataLoader or an iterable of batches")
    if iter(data) is data:  # a generator or iterator: one pass only, calibration needs several
        kept = [_batch_tensor(b) for b in data]
        if not kept:
            raise EdgeslimError("calibration data is empty: pass at least one batch")
        return lambda: iter(kept)
    first = next(iter(data), None)
    if first is None:
        raise EdgeslimError("calibration data is empty: pass at least one batch")
    _batch_tensor(first)
    return lambda: (_batch_tensor(b) for b in data)


def _input_shape_of(calib: Calibration) -> tuple[int, ...]:
    """The C,H,W of the calibration data (the first batch's, for iterables)."""
    if isinstance(calib, torch.Tensor):
        return tuple(calib.shape[1:])
    if isinstance(calib, np.ndarray):
        return tuple(calib.shape[1:])
    if callable(calib):
        raise EdgeslimError("pass input_shape=(C, H, W) when calibration data is a callable")
    return tuple(next(iter(calibration_batches(calib)())).shape[1:])


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise EdgeslimError(f"model is a {type(model).__name__}, not a torch.nn.Module: pass the network (an nn.Module "
                            "instance; for a function, wrap it in a Module whose forward calls it)")


def quantize(model: nn.Module, calib: Calibration, config: PTQConfig | None = None, *,
             plan: MixedPlan | None = None, input_shape: tuple[int, ...] | None = None, batch_size: int = 128,
             progress: bool = False) -> Quantized:
    """Post-training quantization: capture, fold BN, fuse, calibrate on ``calib``, freeze, lower.

    ``calib`` is an N,C,H,W array / tensor of preprocessed images, a callable returning an
    iterable of batches (called once per calibration pass), or a ``torch.utils.data.DataLoader`` / any iterable of
    batches or of ``(inputs, labels)`` pairs (read once and kept in memory; ``input_shape`` from its first batch). ``plan`` sets per-layer precisions
    (mixed precision, FP16 / FP32 islands); see ``MixedPlan``. ``config.algorithms`` adds CLE, AdaRound or
    BRECQ (``config.iters`` per unit; per-unit results in ``Quantized.reports``) and bias correction.
    """
    config = config or PTQConfig()
    _check_module(model)
    if not isinstance(calib, (torch.Tensor, np.ndarray)) and not callable(calib):
        kept = list(calibration_batches(calib)())  # a DataLoader / iterable of batches or (x, y) pairs, read once
        input_shape = input_shape or tuple(kept[0].shape[1:])
        calib = lambda: iter(kept)  # noqa: E731
    if input_shape is None:
        input_shape = _input_shape_of(calib)
    t0 = time.perf_counter()
    if getattr(model, "meta", {}).get("onnx_dynamic_batch") is False:
        batch_size = 1  # an imported ONNX model with batch-1 reshapes (e.g. channel shuffles folded at batch 1)
    gm = ptq.prepare(model, tuple(input_shape), config, plan)
    batches = _as_batches(calib, batch_size)
    ptq.calibrate(gm, batches, progress=progress, total=batch_count(calib, batch_size))
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


def calibrate(gm: fx.GraphModule, calib: Calibration, *, batch_size: int = 128, progress: bool = False) -> fx.GraphModule:
    """``ptq.calibrate`` on any calibration data ``quantize`` takes: an N,C,H,W tensor / array, a callable returning
    batches, a ``torch.utils.data.DataLoader`` or any iterable of batches or ``(inputs, labels)`` pairs."""
    if not isinstance(calib, (torch.Tensor, np.ndarray)) and not callable(calib):
        kept = list(calibration_batches(calib)())
        calib = lambda: iter(kept)  # noqa: E731
    return ptq.calibrate(gm, _as_batches(calib, batch_size), progress=progress, total=batch_count(calib, batch_size))


def convert_qat(gm: fx.GraphModule, config: PTQConfig, input_shape: tuple[int, ...]) -> Quantized:
    """A trained fake-quant model (QAT, after ``algorithms.qat.finish``) as a ``Quantized``: lowered to its integer
    graph, ready for ``export_onnx`` / ``export_tflite``."""
    shape = tuple(input_shape)
    return Quantized(gm, lower(gm, shape), config, shape, 0.0)


def export_onnx(q: Quantized, path: str | Path, *, weight_type: str = "auto", activations: str = "float",
                io_names: tuple[list[str], list[str]] | None = None) -> Path:
    """Write the INT8 (QDQ) ONNX model of ``q`` atomically.

    ``weight_type``: ``int8``, ``uint8`` or ``auto`` (uint8 on x86 CPUs without VNNI, where onnxruntime's
    int8-weight kernels saturate; see ``export.onnx_qdq``). ``io_names`` (input names, output names) default to
    the names of the FP32 file: an imported ONNX model's own, else those ``export_fp32_onnx`` writes.
    """
    if not isinstance(q, Quantized):
        raise EdgeslimError(f"export_onnx takes the result of edgeslim.quantize, not a {type(q).__name__}")
    check_destination(path, "ONNX file")
    model = to_onnx(q.intgraph, weight_type=weight_type, activations=activations)
    model = set_io_names(model, *(io_names or fp32_io_names(q.model, len(q.intgraph.output_names))))
    return _save_model(model, Path(path))


def _save_model(model, path: Path) -> Path:
    """Write an ONNX model atomically through a fresh temporary file (never through a planted ``path.tmp`` link)."""
    import onnx

    with atomic_path(path, "ONNX file") as tmp:
        onnx.save(model, str(tmp))
    return path


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

    path = check_destination(path, "ONNX file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": values below FP16's range
        model = float16.convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True)
    return _save_model(model, path)


def export_fp32_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write the float model as ONNX (opset 17, dynamic batch) atomically."""
    _check_module(model)
    path = check_destination(path, "ONNX file")
    x = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            y = model.eval()(x)
    except Exception as exc:
        raise EdgeslimError(f"model does not run on an input of shape {tuple(x.shape)} "
                            f"({str(exc).splitlines()[0][:160]}): check the input shape") from None
    n_out = len(y) if isinstance(y, (tuple, list)) else 1  # detectors: one output per head
    outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    with atomic_path(path, "ONNX file") as tmp:  # a fresh temporary file: never through a planted link
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / constant-folding notes
                torch.onnx.export(model.eval(), (x,), str(tmp), dynamo=False,
                                  input_names=["input"], output_names=outputs, opset_version=17,
                                  dynamic_axes={"input": {0: "N"}, **{o: {0: "N"} for o in outputs}})
        except Exception as exc:
            raise EdgeslimError(f"FP32 ONNX export failed ({str(exc).splitlines()[0][:160]}): the model uses an op "
                                "torch.onnx cannot export") from None
    return path

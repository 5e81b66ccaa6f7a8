"""Peer quantizers and measurement helpers for side-by-side benchmarks.

Every peer takes the same FP32 ONNX model (one float32 NCHW input with a dynamic batch
dim) and the same calibration images (float32 ``N,C,H,W``, already normalised) and
writes a QDQ INT8 ONNX model.  A peer never raises: failure (or a missing package) is
reported in :attr:`PeerResult.error`.

Measurement (op counts in the optimized graph, interleaved latency, accuracy) uses
``edgeslim.eval.ort``, the same code that measures edgeslim's own models.
"""
from __future__ import annotations

import importlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PeerResult", "TorchPeerResult", "ort_quantize_static", "nncf_quantize", "brevitas_ptq"]

@dataclass(frozen=True)
class PeerResult:
    name: str
    path: Path | None
    seconds: float  # time to quantize, pre-processing and calibration included
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _input_name(model_path: Path) -> str:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"expected one graph input, got {names}")
    return names[0]


def _batches(calib: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    for i in range(0, len(calib), batch_size):
        yield calib[i:i + batch_size]


# --------------------------------------------------------------------------- ORT

_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ORT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def ort_quantize_static(
    fp32_onnx: Path,
    calib: np.ndarray,
    out: Path,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    activation_type: str = "uint8",
    activation_symmetric: bool | None = None,
    calib_batch: int = 16,
    preprocess: bool = True,
    num_bins: int | None = None,
    num_quantized_bins: int | None = None,
    weight_type: str = "int8",
    reduce_range: bool = False,
) -> PeerResult:
    """``onnxruntime.quantization.quantize_static`` in QDQ format (int8 weights, or ``weight_type="uint8"``).

    ``activation_symmetric=None`` keeps ORT's default (asymmetric activations, also for
    int8).  ``calib_batch`` images go through each calibration run: every ORT calibrator
    reduces over the batch dim (MinMax takes min/max, histograms collect all values), so
    any batch size gives the same ranges with a dynamic batch dim (checked: identical
    scales for 1, 16, 64); 16 is faster than 1 (fewer session runs).
    ``preprocess`` runs ``quant_pre_process`` first (ORT's recommended step: symbolic
    shape inference + basic graph optimisation), timed as part of quantization.

    Histogram size: ``quantize_static`` does not forward ``num_bins`` /
    ``num_quantized_bins``, and ORT's entropy defaults (128 / 128) leave a single KL
    candidate, i.e. the full range: with defaults "entropy" gives the same ranges as
    "minmax" (checked on onnxruntime 1.31).  Passing ``num_bins`` (e.g. 2048, with
    ``num_quantized_bins`` 128 or 256 for entropy) calibrates with ``create_calibrator``
    directly and hands the ranges to ``quantize_static`` through its calibration cache.
    """
    sym = "" if activation_symmetric is None else ("-sym" if activation_symmetric else "-asym")
    bins = "" if num_bins is None else f"-{num_bins}b" + ("" if num_quantized_bins is None else f"{num_quantized_bins}q")
    name = (f"ort-{method}{bins}-{'pc' if per_channel else 'pt'}-"
            f"{'u8' if activation_type == 'uint8' else 's8'}{sym}" + ("-u8w" if weight_type == "uint8" else "") + ("-rr" if reduce_range else ""))
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            create_calibrator,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, 0.0, f"onnxruntime.quantization unavailable: {_one_line(e)}")
    if method not in _ORT_METHODS:
        return PeerResult(name, None, 0.0, f"unknown method {method!r}; use {sorted(_ORT_METHODS)}")
    if activation_type not in _ORT_TYPES:
        return PeerResult(name, None, 0.0, f"unknown activation_type {activation_type!r}")
    if num_bins is not None and method == "minmax":
        return PeerResult(name, None, 0.0, "num_bins applies to entropy/percentile only")
    if preprocess:
        try:  # quant_pre_process imports sympy lazily (~2 s): keep that out of the timing
            import onnxruntime.tools.symbolic_shape_infer  # noqa: F401
        except Exception:  # noqa: BLE001
            pass

    class _Reader(CalibrationDataReader):
        def __init__(self, input_name: str):
            self.input_name = input_name
            self.it = _batches(calib, calib_batch)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {self.input_name: b}

        def rewind(self):  # not called by quantize_static, but harmless
            self.it = _batches(calib, calib_batch)

    extra = {}
    if activation_symmetric is not None:
        extra["ActivationSymmetric"] = bool(activation_symmetric)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = fp32_onnx
            if preprocess:
                src = Path(tmp) / "pre.onnx"
                quant_pre_process(str(fp32_onnx), str(src))
            cal_method = getattr(CalibrationMethod, _ORT_METHODS[method])
            reader, cache = _Reader(_input_name(fp32_onnx)), None
            if num_bins is not None:
                from onnxruntime.quantization.calibrate import save_tensors_data

                opts = {"num_bins": int(num_bins)}
                if num_quantized_bins is not None and method == "entropy":
                    opts["num_quantized_bins"] = int(num_quantized_bins)
                cal = create_calibrator(src, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                        calibrate_method=cal_method, extra_options=opts)
                cal.collect_data(reader)
                cache = Path(tmp) / "ranges.json"
                save_tensors_data(cal.compute_data(), cache)
                reader = None
                del cal
            quantize_static(
                str(src),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=getattr(QuantType, _ORT_TYPES[activation_type]),
                weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8,
                calibrate_method=cal_method,
                reduce_range=reduce_range,  # 7-bit weights: onnxruntime's advice for x86 CPUs without VNNI
                extra_options=extra,
                # only when needed: the argument is new in recent onnxruntime releases
                **({} if cache is None else {"calibration_cache_path": str(cache)}),
            )
    except Exception as e:  # noqa: BLE001 - a failed peer is a result
        return PeerResult(name, None, time.perf_counter() - t0, _one_line(e))
    return PeerResult(name, out, time.perf_counter() - t0)


# -------------------------------------------------------------------------- NNCF

_NNCF_LAZY_MODULES = (
    "nncf.onnx.quantization.quantize_model",
    "nncf.onnx.statistics.aggregator",
    "nncf.quantization.algorithms.min_max.onnx_backend",
    "nncf.quantization.algorithms.fast_bias_correction.onnx_backend",
    "nncf.quantization.algorithms.bias_correction.onnx_backend",
)


def nncf_quantize(
    fp32_onnx: Path,
    calib: np.ndarray,
    out: Path,
    *,
    preset: str = "performance",
    fast_bias_correction: bool = True,
) -> PeerResult:
    """NNCF post-training quantization with its ONNX backend (one image per sample).

    ``preset="performance"``: symmetric weights and activations; ``"mixed"``: asymmetric
    activations.  The bias-correction pass NNCF runs by default is part of the timing.
    """
    name = f"nncf-{preset}"
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    try:
        import nncf
        import onnx
    except ImportError:
        return PeerResult(name, None, 0.0, "nncf not installed")
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, 0.0, f"nncf import failed: {_one_line(e)}")
    try:
        preset_enum = nncf.QuantizationPreset(preset)
    except ValueError:
        return PeerResult(name, None, 0.0, f"unknown preset {preset!r}; use 'performance' or 'mixed'")
    for mod in _NNCF_LAZY_MODULES:  # imported on first use (~2 s): keep out of the timing
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        model = onnx.load(str(fp32_onnx))
        input_name = _input_name(fp32_onnx)
        samples = list(_batches(calib, 1))
        dataset = nncf.Dataset(samples, lambda x: {input_name: x})
        qmodel = nncf.quantize(
            model,
            dataset,
            preset=preset_enum,
            subset_size=len(samples),
            fast_bias_correction=fast_bias_correction,
        )
        onnx.save(qmodel, str(out))
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, time.perf_counter() - t0, _one_line(e))
    return PeerResult(name, out, time.perf_counter() - t0)


# --------------------------------------------------------------------------- Brevitas (PyTorch fake-quant)

@dataclass(frozen=True)
class TorchPeerResult:
    """A peer that returns a fake-quant PyTorch model (evaluated in PyTorch, like edgeslim's simulation)."""

    name: str
    model: object | None
    seconds: float
    error: str | None = None


def brevitas_ptq(model, calib: np.ndarray, *, w_bits: int, a_bits: int, first_conv_8bit: bool = False,
                 gptq: bool = False, bias_correction: bool = True) -> TorchPeerResult:
    """Brevitas PTQ through its ImageNet example's ``quantize_model`` (graph mode, per-channel symmetric float-scale
    weights, static per-tensor activations with percentile calibration), then GPTQ and / or bias correction.

    ``first_conv_8bit`` uses Brevitas' ``layerwise`` backend, which keeps the first conv (3 input channels)
    at 8 bits and quantizes each layer's weights and input.
    """
    name = "brevitas" + ("-gptq" if gptq else "") + ("-first8" if first_conv_8bit else "")
    try:
        import copy

        import torch
        from brevitas.graph.quantize import preprocess_for_quantize
        from brevitas_examples.imagenet_classification.ptq import ptq_common
    except ImportError:
        return TorchPeerResult(name, None, 0.0, "brevitas not installed")
    except Exception as e:  # noqa: BLE001
        return TorchPeerResult(name, None, 0.0, f"brevitas import failed: {_one_line(e)}")
    loader = [(torch.from_numpy(np.ascontiguousarray(b)), None) for b in _batches(calib, 64)]
    t0 = time.perf_counter()
    try:
        m = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=0)
        q = ptq_common.quantize_model(
            m, backend="layerwise" if first_conv_8bit else "fx", weight_bit_width=w_bits, act_bit_width=a_bits,
            bias_bit_width=32, weight_quant_granularity="per_channel", act_quant_percentile=99.999,
            act_quant_type="sym", scale_factor_type="float_scale", quant_format="int")
        ptq_common.calibrate(loader, q)
        if gptq:
            ptq_common.apply_gptq(loader, q)
        if bias_correction:
            ptq_common.apply_bias_correction(loader, q)
    except Exception as e:  # noqa: BLE001
        return TorchPeerResult(name, None, time.perf_counter() - t0, _one_line(e))
    return TorchPeerResult(name, q.eval(), time.perf_counter() - t0)

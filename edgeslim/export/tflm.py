"""Microcontroller build files for a ``.tflite`` model (TensorFlow Lite for Microcontrollers).

* ``c_source(fb)``: ``model_data.h`` / ``model_data.cc``, the flatbuffer as a 16-byte aligned C array;
* ``resolver_calls(op_codes)``: the ``MicroMutableOpResolver`` calls the model needs;
* ``arena_bytes(fb)``: the tensor arena TFLM's interpreter allocates for it (its ``RecordingMicroAllocator``
  total, read from ``print_allocations`` after one inference);
* ``write_deployment(...)``: the run-folder files and the ``summary.json`` fields (``tflite``, ``mcu``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..config import FORMATS
from ..errors import EdgeslimError
from ..intgraph import IntGraph

__all__ = ["RESOLVER", "parse_formats", "require_tflite", "check_config", "require_litert", "check_plan", "check_model",
           "c_source", "resolver_calls", "arena_bytes", "score_litert", "build", "litert_runner", "agreement",
           "write_files", "write_deployment"]


RESOLVER = {"CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "FULLY_CONNECTED": "AddFullyConnected",
            "ADD": "AddAdd", "MUL": "AddMul", "CONCATENATION": "AddConcatenation",
            "AVERAGE_POOL_2D": "AddAveragePool2D", "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean",
            "RESHAPE": "AddReshape", "TRANSPOSE": "AddTranspose", "PAD": "AddPad", "PADV2": "AddPadV2",
            "STRIDED_SLICE": "AddStridedSlice", "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
            "LOGISTIC": "AddLogistic", "HARD_SWISH": "AddHardSwish", "LEAKY_RELU": "AddLeakyRelu",
            "QUANTIZE": "AddQuantize", "DEQUANTIZE": "AddDequantize", "GATHER": "AddGather", "CAST": "AddCast",
            "MAXIMUM": "AddMaximum", "MINIMUM": "AddMinimum", "RELU": "AddRelu", "RELU6": "AddRelu6",
            "SOFTMAX": "AddSoftmax",
            # float islands' builtins
            "EXP": "AddExp", "LOG": "AddLog", "SQRT": "AddSqrt", "NEG": "AddNeg", "ABS": "AddAbs", "FLOOR": "AddFloor",
            "CEIL": "AddCeil", "SIN": "AddSin", "COS": "AddCos", "SUB": "AddSub", "DIV": "AddDiv", "PRELU": "AddPrelu",
            "TANH": "AddTanh", "ELU": "AddElu", "GELU": "AddGelu", "SUM": "AddSum", "REDUCE_MAX": "AddReduceMax"}


def parse_formats(text: str) -> tuple[str, ...]:
    """``"onnx,tflite"`` -> ("onnx", "tflite"); ``tflm`` implies ``tflite``; onnx is always written (it is scored)."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise EdgeslimError(f"unknown format(s) {', '.join(bad)}: use a comma-separated list of {', '.join(FORMATS)}")
    if "tflm" in formats and "tflite" not in formats:
        formats = (*formats, "tflite")
    return formats


def require_tflite(formats: tuple[str, ...]) -> None:
    """One clear error when the optional packages a format needs are missing."""
    needs = {"tflite": ("tflite", "flatbuffers"), "tflm": ("tflite", "flatbuffers", "tflite_micro")}
    for fmt in (f for f in formats if f in needs):
        for mod in needs[fmt]:
            try:
                __import__(mod)
            except ImportError:
                raise EdgeslimError(f"--formats {fmt} needs the tflite extra: pip install -e '.[tflite]'") from None


def check_config(config) -> None:
    """Refuse, before any work, a ``PTQConfig`` whose integer graph TFLite's int8 kernels cannot hold."""
    if config.w_scheme != "symmetric":
        raise EdgeslimError("--formats tflite needs symmetric weights (TFLite int8 weights have zero point 0): "
                            "use --w-scheme symmetric")
    if config.a_bits > 8:
        raise EdgeslimError(f"--formats tflite needs activations of 8 bits or fewer (got --a-bits {config.a_bits}): "
                            "use --a-bits 8")
    if config.w_bits > 8:
        raise EdgeslimError(f"--formats tflite needs weights of 8 bits or fewer (got --w-bits {config.w_bits})")


def require_litert() -> None:
    """Scoring a ``.tflite`` outside classification (fidelity, detect, ``export``) runs LiteRT and TFLM."""
    for mod, pkg in (("ai_edge_litert", "ai-edge-litert"), ("tflite_micro", "tflite-micro")):
        try:
            __import__(mod)
        except ImportError:
            raise EdgeslimError(f"--formats tflite scores the file in LiteRT and TFLM: {pkg} is missing: "
                                "pip install -e '.[tflite]'") from None


def check_plan(plan) -> None:
    """Refuse, before any work, a mixed-precision plan that leaves layers TFLite cannot run: FP16 (TFLite has no
    FP16 activations) or more than 8 bits. FP32 layers are written as float32 builtins between DEQUANTIZE /
    QUANTIZE (``export.tflite``, named in ``tflite.float_nodes``)."""
    for pattern, p in (plan.rules if plan is not None else ()):
        for what, prec in (("weights", p.w), ("activations", p.a)):
            if (prec.is_float and prec.kind != "fp32") or (not prec.is_float and prec.bits > 8):
                raise EdgeslimError(f"--formats tflite: the plan keeps {what} of {pattern!r} at {prec}: the TFLite "
                                    "export writes int2..int8 layers and FP32 layers (as float ops), not FP16 or "
                                    "wider integers: use --formats onnx, or a plan of int2..int8 / fp32")


def check_model(model) -> None:
    """Refuse, before any work, layers the TFLite exporter has no int8 builtin for: grouped (non-depthwise)
    convolutions and transposed convolutions."""
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise EdgeslimError(f"--formats tflite: layer {name} is a transposed convolution, which edgeslim's "
                                "TFLite exporter cannot write yet: use --formats onnx")
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups != m.in_channels:
            raise EdgeslimError(f"--formats tflite: conv {name} is grouped ({m.groups} groups of "
                                f"{m.in_channels // m.groups} channels): TFLite int8 has only plain and depthwise "
                                "convolutions: use --formats onnx")


def c_source(fb: bytes, name: str = "g_model") -> tuple[str, str]:
    """(model_data.h, model_data.cc): the flatbuffer as ``alignas(16) const unsigned char name[]``."""
    header = (f"// Generated by edgeslim: the int8 LiteRT model as a C array (TFLM reads it in place).\n"
              f"#pragma once\n\nextern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n")
    rows = [", ".join(f"0x{b:02x}" for b in fb[i:i + 12]) for i in range(0, len(fb), 12)]
    body = ",\n  ".join(rows)
    source = (f'#include "model_data.h"\n\nalignas(16) const unsigned char {name}[] = {{\n  {body}\n}};\n'
              f"const unsigned int {name}_len = {len(fb)};\n")
    return header, source


def resolver_calls(op_codes: list[str]) -> list[str]:
    """``tflite::MicroMutableOpResolver<N>`` calls, one per builtin the model uses."""
    missing = [c for c in op_codes if c not in RESOLVER]
    if missing:
        raise EdgeslimError(f"no TFLM resolver entry known for {', '.join(missing)}: open an issue")
    return [f"resolver.{RESOLVER[c]}();" for c in op_codes]


def arena_bytes(fb: bytes, input_shape: tuple[int, ...], input_dtype=np.float32) -> int:
    """The tensor arena TFLM allocated for ``fb`` (RecordingMicroAllocator total, after one inference)."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    it = tflm.Interpreter.from_bytes(fb, arena_size=max(len(fb) * 10, 1 << 20))
    it.set_input(np.zeros(input_shape, dtype=input_dtype), 0)
    it.invoke()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)  # the allocator prints to the C++ stderr
        try:
            it.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    found = re.search(r"Arena allocation total (\d+) bytes", text)
    if not found:
        raise EdgeslimError("TFLM did not report its arena size: check the tflite-micro package")
    return int(found.group(1))


def score_litert(fb: bytes, test) -> dict:
    """Top-1 of a float-input ``.tflite`` classifier in LiteRT's default interpreter (XNNPACK, 1 thread), one
    image at a time (batch 1, as written): ``test`` yields (x N, C, H, W float32, labels)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    correct = total = 0
    for x, y in test:
        xn = np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))
        for i in range(len(xn)):
            it.set_tensor(inp, xn[i:i + 1])
            it.invoke()
            correct += int(np.argmax(it.get_tensor(out)[0]) == int(y[i]))
            total += 1
    return {"top1": correct / max(total, 1), "images": total, "scored_by": "LiteRT (XNNPACK, 1 thread), batch 1"}


def build(g: IntGraph, calib: np.ndarray | None = None, io: str = "float",
          logits: list | None = None) -> tuple[bytes, IntGraph, dict]:
    """(flatbuffer, prepared IntGraph, ``to_tflite`` info) for ``g``: raises the exporter's one-line
    ``EdgeslimError`` for a graph TFLite cannot hold, so jobs call it right after quantizing (before scoring).
    ``logits``: recorded int8 parameters of the float-output layers (``prepare_graph``)."""
    from .tflite import prepare_graph, to_tflite

    tg = prepare_graph(g, calib, logits=logits)
    fb, info = to_tflite(tg, io=io)
    return fb, tg, info


def _input_shape(tg: IntGraph) -> tuple[int, ...]:
    return (1, *tg.input_shape[1:], tg.input_shape[0]) if len(tg.input_shape) == 3 else (1, *tg.input_shape)


def litert_runner(fb: bytes, reference: bool = False, threads: int = 1):
    """``x`` (float N, C, H, W, the IntGraph's layout) -> the float outputs of a float-IO ``.tflite`` in the
    IntGraph's layout (4-D outputs back to NCHW), one image at a time: LiteRT's default kernels (XNNPACK,
    ``threads``) or its reference kernels (``reference``)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    it = Interpreter(model_content=fb, experimental_op_resolver_type=kind, num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]
    outs = [d["index"] for d in it.get_output_details()]

    def run(x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, np.float32)
        xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x
        got: list[list[np.ndarray]] = [[] for _ in outs]
        for i in range(len(xn)):
            it.set_tensor(inp, xn[i:i + 1])
            it.invoke()
            for k, o in enumerate(outs):
                y = it.get_tensor(o)
                got[k].append(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y.copy())
        return [np.concatenate(g) for g in got]
    return run


def agreement(tg: IntGraph, fb: bytes, x: np.ndarray, names: list[str] | None = None) -> dict:
    """Per output, the engine's ``tflite`` mode against LiteRT's reference kernels, LiteRT's default kernels
    (XNNPACK) and TFLM on ``x`` (float IO file): share of identical output codes and the largest difference in
    output steps, keyed by ``names`` (default: the graph's output names). LiteRT's reference FULLY_CONNECTED rounds
    once where the others round twice (1 step at ties)."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    from ..analysis import output_steps
    from ..engine.run import run

    x = np.asarray(x, np.float32)
    # one image at a time, as the file runs (models whose reshapes fold the batch take nothing else)
    per_image = [run(tg, x[i:i + 1], requant="tflite") for i in range(len(x))]
    want = {name: np.concatenate([r[name] for r in per_image]) for name in tg.output_names}
    steps = output_steps(tg)
    micro = tflm.Interpreter.from_bytes(fb, arena_size=max(len(fb) * 10, 1 << 20))

    def tflm_run(xb: np.ndarray) -> list[np.ndarray]:
        got: list[list[np.ndarray]] = [[] for _ in tg.output_names]
        for i in range(len(xb)):
            micro.set_input(np.ascontiguousarray(xb[i:i + 1].transpose(0, 2, 3, 1)) if xb.ndim == 4 else xb[i:i + 1], 0)
            micro.invoke()
            for k in range(len(tg.output_names)):
                y = micro.get_output(k)
                got[k].append(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)
        return [np.concatenate(g) for g in got]

    result: dict = {"images": int(len(x))}
    for key, fn in (("litert_reference", litert_runner(fb, reference=True)), ("litert_xnnpack", litert_runner(fb)),
                    ("tflm", tflm_run)):
        per = {}
        for name, key_name, got in zip(tg.output_names, names or tg.output_names, fn(x)):
            lsb = steps.get(name) or 1.0
            d = np.abs(got.astype(np.float64) - want[name].astype(np.float64)) / float(np.float32(lsb))
            per[key_name] = {"identical_share": float(np.mean(d < 0.5)) if d.size else 1.0,
                         "max_diff_steps": round(float(d.max()), 3) if d.size else 0.0}
        result[key] = per
    return result


def write_files(fb: bytes, tg: IntGraph, info: dict, folder: Path, formats: tuple[str, ...],
                io: str = "float") -> dict:
    """Write ``model_int8.tflite`` (and, for ``tflm``, the C array, resolver and arena size) into ``folder``
    (each file atomically); return the ``summary.json`` fields ``tflite`` (and ``mcu``)."""
    folder = Path(folder)

    def put(name: str, data: bytes) -> None:
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)

    put("model_int8.tflite", fb)
    from .tflite import logit_qparams

    summary = {"tflite": {"file": "model_int8.tflite", "size_bytes": len(fb), "ops": info["ops"],
                          "float_ops": info["float_ops"], "float_nodes": info.get("float_nodes", []),
                          "lut_as_gather": info["lut_as_gather"], "io": io,
                          "layout": "NHWC", "content_sha256": info["content_sha256"],
                          # the int8 logits' parameters (edgeslim export rebuilds this very file from them)
                          "logit_qparams": [{"scale": q.scale, "zero_point": q.zero_point}
                                            for q in logit_qparams(tg)]}}
    if "tflm" in formats:
        header, source = c_source(fb)
        put("model_data.h", header.encode())
        put("model_data.cc", source.encode())
        calls = resolver_calls(info["op_codes"])
        put("op_resolver.txt", (f"tflite::MicroMutableOpResolver<{len(calls)}> resolver;\n" + "\n".join(calls)
                                + "\n").encode())
        arena = arena_bytes(fb, _input_shape(tg), np.float32 if io == "float" else np.int8)
        summary["mcu"] = {"flash_bytes": len(fb), "ram_bytes": arena, "resolver": calls,
                          "flash_counts": "the model flatbuffer (kernel code not included)",
                          "ram_counts": "TFLM tensor arena (RecordingMicroAllocator total)"}
    return summary


def write_deployment(g: IntGraph, calib: np.ndarray | None, folder: Path, formats: tuple[str, ...],
                     io: str = "float", test=None) -> dict:
    """Write ``model_int8.tflite`` (and the TFLM files) into ``folder``; return the summary fields. ``test``
    (batches of (images, labels)) scores the file in LiteRT when ``ai-edge-litert`` is installed."""
    fb, tg, info = build(g, calib, io)
    summary = write_files(fb, tg, info, folder, formats, io)
    if test is not None and io == "float":
        try:
            summary["tflite"].update(score_litert(fb, test))
        except ImportError:
            summary["tflite"]["top1"] = None  # ai-edge-litert is not installed: the file is written, not scored
    return summary

"""Detector files that decode in the graph: the model's raw head outputs feed the decoder, written as ONNX ops.

YOLOv5's own exporter writes ``(N, A, 5 + nc)``: box centre, width and height in input pixels, objectness and
per-class probabilities (a box's class score is objectness x class probability). ``with_decoder`` appends the
decoder's torch form (``decoder.module()``, the same formulas as the numpy decoder used for mAP) to an FP32 or
INT8 file, so a deployment needs only NMS. The decoding runs in float after the INT8 network (as in the
exporters of YOLOv5 and FastestDet).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import compose, version_converter

from ..errors import EdgeslimError
from ..eval import ort as ort_eval

__all__ = ["with_decoder", "DECODED_OUTPUT"]

DECODED_OUTPUT = "detections"
EXPORT_OPSET = 17


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _head_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Each output's shape at batch 1, by running the file once (the graph's own shape annotations may be
    symbolic or missing)."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    if not dims or any(d <= 0 for d in dims):
        raise EdgeslimError("the detector's input has no fixed C, H, W: export it at its input size first")
    sess = ort_eval.session(model.SerializeToString())
    x = np.zeros((1, *dims), np.float32)
    return [tuple(o.shape) for o in sess.run(None, {sess.get_inputs()[0].name: x})]


def with_decoder(model: onnx.ModelProto, decoder) -> onnx.ModelProto:
    """``model`` (raw head outputs, in the decoder's order) with ``decoder.module()`` appended; its one output is
    ``detections``, ``(N, A, 5 + nc)``. Metadata and the input are kept."""
    heads = [o.name for o in model.graph.output]
    shapes = _head_shapes(model)
    module = decoder.module().eval()
    names = [f"head_{i}" for i in range(len(heads))]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(module, tuple(torch.zeros(s) for s in shapes), buf, dynamo=False, input_names=names,
                          output_names=[DECODED_OUTPUT], opset_version=EXPORT_OPSET,
                          dynamic_axes={n: {0: "N"} for n in [*names, DECODED_OUTPUT]})
    dec = onnx.load_from_string(buf.getvalue())
    if _opset(model) != EXPORT_OPSET:
        dec = version_converter.convert_version(dec, _opset(model))
    dec.ir_version = model.ir_version
    merged = compose.merge_models(model, dec, io_map=list(zip(heads, names)), prefix2="decode/",
                                  outputs=[f"decode/{DECODED_OUTPUT}"])
    out = merged.graph.output[0]
    for node in merged.graph.node:  # the output keeps the exporter's plain name
        node.output[:] = [DECODED_OUTPUT if o == out.name else o for o in node.output]
    out.name = DECODED_OUTPUT
    dims = out.type.tensor_type.shape.dim
    shape = _head_shapes(merged)[0]  # (1, A, 5 + nc): the exporter leaves A and 5 + nc symbolic
    for d, v in zip(list(dims)[1:], shape[1:]):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    del merged.metadata_props[:]
    merged.metadata_props.extend(model.metadata_props)
    merged.metadata_props.add(key="edgeslim.output_layout",
                              value="detections: (N, A, 5 + classes) = cx, cy, w, h (input pixels), objectness, "
                                    "class probabilities; score = objectness x class probability; NMS not included")
    onnx.checker.check_model(merged)
    return merged

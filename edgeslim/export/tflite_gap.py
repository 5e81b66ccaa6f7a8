"""Where the ``.tflite`` and the INT8 ONNX file of one IntGraph compute different integers.

Both files hold the same codes: the same int8 weight codes (the IntGraph's grid, 7-bit on CPUs without VNNI too),
the same activation scales and zero points (unsigned codes stored as ``q - 128``), the same tables. What differs
is each runtime's arithmetic: onnxruntime requantizes an accumulator with a float32 multiplier and one rounding
(half to even); TFLite's int8 kernels (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", 2018) with a 31-bit fixed-point multiplier and two roundings
(``SaturatingRoundingDoublingHighMul``, then ``RoundingDivideByPOT``, half away from zero). With a right shift
of ``s`` bits the first rounding moves values within ``2**-(s + 1)`` of a half-way point across it, so about
``2**-s`` of a layer's outputs differ by one step; the network then carries each difference to the next layers.

* ``isolated_differences(g, tg, x)``: per node, the engine's ``tflite`` kernel (what LiteRT / TFLM compute) on the
  input codes of the ``float`` form (what onnxruntime computes): the share of outputs the layer alone changes;
* ``output_agreement(a, b, steps)``: share of identical outputs and SQNR of two runtimes' outputs.
"""

from __future__ import annotations

import numpy as np

from ..intgraph import IntGraph

__all__ = ["isolated_differences", "output_agreement"]


def isolated_differences(g: IntGraph, tg: IntGraph, x: np.ndarray) -> dict[str, dict]:
    """Per op type of ``tg`` (``prepare_graph(g, ...)``): outputs compared, share differing from the ``float``
    form of ``g`` and the largest difference in codes, each node fed the ``float`` form's input codes on ``x``.
    Nodes whose output the float form does not hold (float-output heads made int8) are left out."""
    from ..engine import tflite_run
    from ..engine.run import OPS, run

    ref = run(g, np.asarray(x, np.float32), return_codes=True)
    cfg = {"requant": "tflite", "accumulator_bits": 32, "overflow": "saturate", "stats": None, "shift_add": False}
    out: dict[str, dict] = {}
    for node in tg.nodes:
        name = node.outputs[0]
        fn = tflite_run.OPS.get(node.op) or OPS.get(node.op)
        if fn is None or len(node.outputs) != 1 or name not in ref or name not in g.qparams or \
                not all(i in ref for i in node.inputs):
            continue
        got = np.asarray(fn(tg, node, dict(ref), cfg))
        want = np.asarray(ref[name])
        if got.shape != want.shape:
            continue
        d = np.abs(got.astype(np.int64) - want.astype(np.int64))
        key = node.attrs.get("tflite_op", node.op)
        row = out.setdefault(key, {"nodes": 0, "outputs": 0, "different": 0, "max_diff": 0})
        row["nodes"] += 1
        row["outputs"] += int(d.size)
        row["different"] += int(np.count_nonzero(d))
        row["max_diff"] = max(row["max_diff"], int(d.max()) if d.size else 0)
    for row in out.values():
        row["share"] = row["different"] / max(row["outputs"], 1)
    return out


def output_agreement(a: np.ndarray, b: np.ndarray, step: float | None = None) -> dict:
    """``b`` against ``a`` (same shape): SQNR in dB, and with ``step`` (the outputs' quantization step) the share
    of identical outputs (within half a step) and the largest difference in steps."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(np.shape(a))
    noise = float(np.sum((a64 - b64) ** 2))
    result = {"sqnr_db": float("inf") if noise == 0 else float(10 * np.log10(np.sum(a64 ** 2) / noise))}
    if step:
        d = np.abs(a64 - b64) / float(np.float32(step))
        result.update(identical_share=float(np.mean(d < 0.5)), max_diff_steps=round(float(d.max()), 3))
    return result

"""Probe which QDQ patterns onnxruntime's CPU provider fuses into integer kernels.

Builds tiny QDQ graphs with ``onnx.helper`` (float input -> Q -> DQ -> op -> Q -> DQ),
lets onnxruntime optimise them at EXTENDED and ALL level, and prints the op types of
the saved optimised graphs plus the max |difference| of the optimised session output
against an unoptimised (ORT_DISABLE_ALL) session (0.1 = one output LSB: rounding, not a bug).

Findings with onnxruntime 1.31.1 on x86-64 (see the printed table for the full set):
* QDQ -> QLinearConv fusion happens at EXTENDED; ALL additionally turns it into
  com.microsoft QLinearConv (NHWC, channels_last) wrapped in Transposes.
* x86 CPU only fuses Conv with uint8 activations; int8 Q->DQ pairs get rewritten to
  uint8 (zp + 128, "qdq_s8_to_u8") first, so int8 convs fuse only when their input Q
  and DQ are directly adjacent (an int8 Clip in between keeps the Conv float).
* A Relu/Clip between Conv and Q is dropped only if the Q already clips the same
  range (zp == type minimum for Relu); otherwise the Conv stays float (FusedConv).

    python -m bench.probe_ort_fusion [--opset 17] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

U8, I8 = TensorProto.UINT8, TensorProto.INT8
_NP = {U8: np.uint8, I8: np.int8}
_RNG = np.random.default_rng(0)

# Q/DQ bookkeeping ops: shown in the table but not "compute".
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


class _G:
    """Small graph builder."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0

    def name(self, p: str) -> str:
        self._n += 1
        return f"{p}_{self._n}"

    def const(self, arr: np.ndarray, p: str = "c") -> str:
        n = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(self, op: str, ins: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=self.name(op), **attrs))
        return out

    def q(self, x: str, scale: float, zp: int, t: int) -> str:
        return self.node("QuantizeLinear", [x, self.const(np.float32(scale), "s"), self.const(_NP[t](zp), "zp")])

    def dq(self, x: str, scale, zp, axis: int | None = None) -> str:
        kw = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [x, self.const(scale, "s"), self.const(zp, "zp")], **kw)

    def qdq_act(self, x: str, scale: float, zp: int, t: int) -> str:
        return self.dq(self.q(x, scale, zp, t), np.float32(scale), _NP[t](zp))

    def add_input(self, shape: list) -> str:
        n = f"in{len(self.inputs)}"
        self.inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))
        return n

    def finish(self, y: str, opset: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], ["out"], name="out_identity"))
        rank = len(self.inputs[0].type.tensor_type.shape.dim)
        self.outputs.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [f"d{i}" for i in range(rank)]))
        g = helper.make_graph(self.nodes, "probe", self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = min(m.ir_version, 9)
        onnx.checker.check_model(m)
        return m


def _act(t: int) -> tuple[float, int]:
    """(scale, zero point) of an activation: asymmetric for uint8, symmetric for int8."""
    return (0.05, 10) if t == U8 else (0.05, 0)


def _conv_weights(g: _G, cout: int, cin: int, wt: int = I8, *, per_channel: bool = True,
                  wzp_nonzero: bool = False, k: int = 3) -> str:
    w = _RNG.integers(-100, 100, size=(cout, cin, k, k)).astype(_NP[wt])
    if per_channel:
        s = (0.01 + 0.01 * _RNG.random(cout)).astype(np.float32)
        zp = (_RNG.integers(-3, 4, size=cout) if wzp_nonzero else np.zeros(cout)).astype(_NP[wt])
        return g.dq(g.const(w, "w"), s, zp, axis=0)
    return g.dq(g.const(w, "w"), np.float32(0.01), _NP[wt](3 if wzp_nonzero else 0))


def _bias(g: _G, cout: int, x_scale: float, w_dq: str) -> str:
    # bias scale = x_scale * w_scale (per channel): look the weight scale up from its DQ.
    dq = next(n for n in g.nodes if n.output[0] == w_dq)
    ws = numpy_helper.to_array(next(i for i in g.inits if i.name == dq.input[1]))
    b = _RNG.integers(-1000, 1000, size=cout).astype(np.int32)
    return g.dq(g.const(b, "b"), (x_scale * ws).astype(np.float32).reshape(-1),
                np.zeros(np.size(ws), np.int32), axis=0 if np.size(ws) > 1 else None)


def _out_zp(t: int, out_zp: int | None) -> int:
    """Output zero point: default 0 for both types (so uint8 output zp is its minimum)."""
    return 0 if out_zp is None else out_zp


def conv(t: int = U8, *, per_channel=True, wzp_nonzero=False, post: str | None = None,
         int_clip_before: bool = False, wt: int = I8, bias: bool = True, qout: bool = True,
         out_zp: int | None = None, out_scale: float = 0.1):
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        x = g.add_input(["N", 8, 8, 8])
        s, zp = _act(t)
        xq = g.q(x, s, zp, t)
        if int_clip_before:  # integer Clip between Q and DQ (uint8/int8 in and out)
            lo, hi = (zp, 255) if t == U8 else (zp, 127)
            xq = g.node("Clip", [xq, g.const(_NP[t](lo), "lo"), g.const(_NP[t](hi), "hi")])
        xd = g.dq(xq, np.float32(s), _NP[t](zp))
        w = _conv_weights(g, 16, 8, wt, per_channel=per_channel, wzp_nonzero=wzp_nonzero)
        ins = [xd, w] + ([_bias(g, 16, s, w)] if bias else [])
        y = g.node("Conv", ins, pads=[1, 1, 1, 1])
        if post == "Relu":
            y = g.node("Relu", [y])
        elif post == "Clip06":
            y = g.node("Clip", [y, g.const(np.float32(0), "lo"), g.const(np.float32(6), "hi")])
        if qout:
            y = g.qdq_act(y, out_scale, _out_zp(t, out_zp), t)
        return g.finish(y, opset)
    return build


def add(t: int = U8, *, post: str | None = None, out_zp: int | None = None):
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        s, zp = _act(t)
        a = g.qdq_act(g.add_input(["N", 8, 8, 8]), s, zp, t)
        b = g.qdq_act(g.add_input(["N", 8, 8, 8]), s * 1.5, zp, t)
        y = g.node("Add", [a, b])
        if post == "Relu":
            y = g.node("Relu", [y])
        return g.finish(g.qdq_act(y, 0.1, _out_zp(t, out_zp), t), opset)
    return build


def residual(t: int = U8, *, relu: bool = False, shared_dq: bool = True):
    """x -> Q -> DQ -> Conv [-> Relu] -> Q -> DQ -> Add(., x) -> Q -> DQ: one Q (or DQ) feeding two consumers."""
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        x = g.add_input(["N", 8, 8, 8])
        s, zp = _act(t)
        xq = g.q(x, s, zp, t)
        xd = g.dq(xq, np.float32(s), _NP[t](zp))
        w = _conv_weights(g, 8, 8)
        y = g.node("Conv", [xd, w, _bias(g, 8, s, w)], pads=[1, 1, 1, 1])
        if relu:
            y = g.node("Relu", [y])
        y = g.qdq_act(y, 0.1, 0, t)
        skip = xd if shared_dq else g.dq(xq, np.float32(s), _NP[t](zp))
        y = g.node("Add", [y, skip])
        return g.finish(g.qdq_act(y, 0.1, 0, t), opset)
    return build


def gap(t: int = U8):
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        s, zp = _act(t)
        y = g.node("GlobalAveragePool", [g.qdq_act(g.add_input(["N", 8, 8, 8]), s, zp, t)])
        return g.finish(g.qdq_act(y, 0.05, zp, t), opset)
    return build


def _fc_weight(g: _G, k: int, m: int, *, transposed: bool, per_channel: bool) -> str:
    shape, axis = ((m, k), 0) if transposed else ((k, m), 1)
    w = _RNG.integers(-100, 100, size=shape).astype(np.int8)
    if per_channel:
        return g.dq(g.const(w, "w"), (0.01 + 0.01 * _RNG.random(m)).astype(np.float32),
                    np.zeros(m, np.int8), axis=axis)
    return g.dq(g.const(w, "w"), np.float32(0.01), np.int8(0))


def gemm(t: int = U8, *, per_channel: bool = True, qout: bool = True):
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        s, zp = _act(t)
        x = g.qdq_act(g.add_input(["N", 64]), s, zp, t)
        w = _fc_weight(g, 64, 10, transposed=True, per_channel=per_channel)
        y = g.node("Gemm", [x, w, _bias(g, 10, s, w)], transB=1)
        if qout:
            y = g.qdq_act(y, 0.1, zp, t)
        return g.finish(y, opset)
    return build


def matmul(t: int = U8, *, per_channel: bool = False, qout: bool = True):
    def build(opset: int) -> onnx.ModelProto:
        g = _G()
        s, zp = _act(t)
        x = g.qdq_act(g.add_input(["N", 64]), s, zp, t)
        y = g.node("MatMul", [x, _fc_weight(g, 64, 10, transposed=False, per_channel=per_channel)])
        if qout:
            y = g.qdq_act(y, 0.1, zp, t)
        return g.finish(y, opset)
    return build


PATTERNS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "DQ(u8)+DQ(w s8 pc zp0)+DQ(b s32)->Conv->Q(u8)": conv(U8),
    "  same, int8 activations (zp 0)": conv(I8),
    "  same, w per-tensor": conv(U8, per_channel=False),
    "  same, w per-channel zp!=0": conv(U8, wzp_nonzero=True),
    "  same, w per-tensor zp!=0": conv(U8, per_channel=False, wzp_nonzero=True),
    "  same, u8 weights (u8u8)": conv(U8, wt=U8),
    "  same, no bias": conv(U8, bias=False),
    "  ->Conv->Relu->Q(u8 zp 0)": conv(U8, post="Relu"),
    "  ->Conv->Relu->Q(u8 zp 10)": conv(U8, post="Relu", out_zp=10),
    "  ->Conv->Relu->Q(s8 zp 0)": conv(I8, post="Relu"),
    "  ->Conv->Relu->Q(s8 zp -128)": conv(I8, post="Relu", out_zp=-128),
    "  ->Conv->Clip(0,6)->Q(u8 zp 0, scale 0.1)": conv(U8, post="Clip06"),
    "  ->Conv->Clip(0,6)->Q(u8 zp 0, scale 6/255)": conv(U8, post="Clip06", out_scale=6 / 255),
    "  ->Conv (no output Q), u8": conv(U8, qout=False),
    "Q(u8)->Clip(u8)->DQ->Conv->Q(u8)": conv(U8, int_clip_before=True),
    "Q(s8)->Clip(s8)->DQ->Conv->Q(s8)": conv(I8, int_clip_before=True),
    "DQ,DQ->Add->Q (u8)": add(U8),
    "DQ,DQ->Add->Q (s8)": add(I8),
    "DQ,DQ->Add->Relu->Q (u8 zp 0)": add(U8, post="Relu"),
    "DQ,DQ->Add->Relu->Q (u8 zp 10)": add(U8, post="Relu", out_zp=10),
    "DQ,DQ->Add->Relu->Q (s8 zp 0)": add(I8, post="Relu"),
    "residual: Q->DQ->{Conv->Q->DQ, Add} (u8)": residual(U8),
    "residual: Q->DQ->{Conv->Q->DQ, Add} (s8)": residual(I8),
    "residual, own DQ per consumer (s8)": residual(I8, shared_dq=False),
    "residual, Conv->Relu->Q(s8 zp0)": residual(I8, relu=True),
    "DQ->GlobalAveragePool->Q (u8)": gap(U8),
    "DQ->GlobalAveragePool->Q (s8)": gap(I8),
    "DQ->Gemm(transB, w pc)->Q (u8)": gemm(U8),
    "DQ->Gemm(transB, w pc)->Q (s8)": gemm(I8),
    "DQ->Gemm(transB, w per-tensor)->Q (u8)": gemm(U8, per_channel=False),
    "DQ->Gemm(transB, w pc) no Q (u8)": gemm(U8, qout=False),
    "DQ->MatMul(w per-tensor)->Q (u8)": matmul(U8),
    "DQ->MatMul(w per-tensor)->Q (s8)": matmul(I8),
    "DQ->MatMul(w pc axis1)->Q (u8)": matmul(U8, per_channel=True),
    "DQ->MatMul(w per-tensor) no Q (u8)": matmul(U8, qout=False),
}

LEVELS = {
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def optimized_ops(model: onnx.ModelProto, level, feeds) -> tuple[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "m.onnx"), os.path.join(d, "opt.onnx")
        onnx.save(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = dst
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        out = sess.run(None, feeds)[0]
        opt = onnx.load(dst)
    c = Counter((n.op_type if n.domain in ("", "ai.onnx") else f"ms:{n.op_type}") for n in opt.graph.node)
    c.pop("Identity", None)
    txt = ", ".join(f"{k}" + (f"x{v}" if v > 1 else "") for k, v in sorted(c.items(), key=lambda kv: (kv[0] in _QDQ, kv[0])))
    return txt, out


def run(opset: int = 17, markdown: bool = False) -> list[tuple[str, str, str, float]]:
    rows = []
    for name, build in PATTERNS.items():
        try:
            m = build(opset)
            feeds = {i.name: _RNG.standard_normal(
                [2 if isinstance(d, str) or d.dim_param else d.dim_value
                 for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in m.graph.input}
            ref = ort.InferenceSession(m.SerializeToString(), _disabled(), providers=["CPUExecutionProvider"])
            want = ref.run(None, feeds)[0]
            ext, got_e = optimized_ops(m, LEVELS["EXTENDED"], feeds)
            al, got_a = optimized_ops(m, LEVELS["ALL"], feeds)
            diff = float(max(np.abs(got_e - want).max(), np.abs(got_a - want).max()))
            rows.append((name, ext, al, diff))
        except Exception as e:  # noqa: BLE001 - a probe row, not a crash
            rows.append((name, f"ERROR: {str(e).splitlines()[0][:100]}", "", float("nan")))
    _print(rows, markdown)
    return rows


def _disabled() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def _print(rows, markdown: bool) -> None:
    hdr = ("pattern", "EXTENDED optimized graph", "ALL optimized graph", "max abs diff")
    if markdown:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for r in rows:
            print(f"| {r[0].strip()} | {r[1]} | {r[2]} | {r[3]:.3g} |")
        return
    w = [max(len(hdr[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    print("  ".join(h.ljust(w[i]) if i < 3 else h for i, h in enumerate(hdr)))
    for r in rows:
        print("  ".join([r[0].ljust(w[0]), r[1].ljust(w[1]), r[2].ljust(w[2]), f"{r[3]:.3g}"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, opset {a.opset}")
    run(a.opset, a.markdown)


if __name__ == "__main__":
    main()

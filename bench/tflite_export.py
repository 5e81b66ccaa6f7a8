"""ResNet-20 (CIFAR-10) as a LiteRT int8 flatbuffer: top-1 in LiteRT (reference kernels and XNNPACK) next to
onnxruntime INT8 and the engine's tflite mode, the share of identical outputs, TFLM on a subset, latency of
LiteRT XNNPACK (1 thread) vs onnxruntime INT8 (1 thread) paired, flash and arena bytes.
Writes the ``tflite-export`` section of BENCHMARKS.md with ``--write``.

    python -m bench.tflite_export [--shared ../shared] [--test-size 10000] [--ref-size 10000] [--tflm-size 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.data import Preprocess, calibration_indices, open_dataset
from edgeslim.engine.run import run
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.export.onnx_qdq import save_onnx, to_onnx
from edgeslim.export.tflite import prepare_graph, to_tflite
from edgeslim.export.tflm import arena_bytes
from edgeslim.models import build_model


def _litert(fb: bytes, reference: bool, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    it = Interpreter(model_content=fb, experimental_op_resolver_type=kind, num_threads=threads)
    it.allocate_tensors()
    return it


def _invoke_all(it, x_nhwc: np.ndarray) -> np.ndarray:
    """One image at a time (the file has batch 1, as microcontrollers need)."""
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    rows = []
    for i in range(len(x_nhwc)):
        it.set_tensor(inp, x_nhwc[i:i + 1])
        it.invoke()
        rows.append(it.get_tensor(out)[0].copy())
    return np.stack(rows)


def _tflm_all(fb: bytes, x_nhwc: np.ndarray) -> np.ndarray:
    from tflite_micro.python.tflite_micro import runtime as tflm

    it = tflm.Interpreter.from_bytes(fb, arena_size=1 << 22)
    rows = []
    for i in range(len(x_nhwc)):
        it.set_input(x_nhwc[i:i + 1], 0)
        it.invoke()
        rows.append(it.get_output(0)[0].copy())
    return np.stack(rows)


def _paired_latency(fb: bytes, onnx_path: Path, shape, rounds: int) -> dict:
    """ms per image at batch 1, one thread each, interleaved round by round (order alternating)."""
    lite = _litert(fb, reference=False, threads=1)
    sess = ort_eval.session(onnx_path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    feed = {sess.get_inputs()[0].name: x}
    inp = lite.get_input_details()[0]["index"]

    def t_lite():
        t0 = time.perf_counter()
        lite.set_tensor(inp, xn)
        lite.invoke()
        return (time.perf_counter() - t0) * 1e3

    def t_ort():
        t0 = time.perf_counter()
        sess.run(None, feed)
        return (time.perf_counter() - t0) * 1e3

    times = {"litert_xnnpack": [], "ort_int8": []}
    for i in range(rounds + 10):
        pair = [("litert_xnnpack", t_lite), ("ort_int8", t_ort)]
        for k, fn in (pair if i % 2 else pair[::-1]):
            v = fn()
            if i >= 10:
                times[k].append(v)
    return {"litert_xnnpack_ms": statistics.median(times["litert_xnnpack"]),
            "ort_int8_ms": statistics.median(times["ort_int8"]),
            "litert_over_ort": ort_eval.paired_ratio(times, "litert_xnnpack", "ort_int8")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--ref-size", type=int, default=10000, help="images run in LiteRT's reference kernels")
    ap.add_argument("--tflm-size", type=int, default=500, help="images run in TFLM (slow reference kernels)")
    ap.add_argument("--latency-rounds", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="edgeslim-tflite-"))
    torch.set_num_threads(2)

    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    x_cal = train.batch(calibration_indices(len(train), args.calib_size, 0, train.labels))
    idx = np.arange(len(test)) if args.test_size >= len(test) else \
        calibration_indices(len(test), args.test_size, 0, test.labels)
    x, y = test.batch(idx), test.labels[idx]
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    q = api.quantize(model, x_cal, PTQConfig(), input_shape=info.input_shape)
    onnx_path = save_onnx(to_onnx(q.intgraph), work / "int8.onnx")  # what api.export_onnx writes (IO names aside)
    tg = prepare_graph(q.intgraph, x_cal)
    fb, finfo = to_tflite(tg)
    (work / "model_int8.tflite").write_bytes(fb)
    print(f"tflite: {len(fb)} bytes, ops {finfo['ops']}", file=sys.stderr)

    logits = {"ort_int8": ort_eval.predict(ort_eval.session(onnx_path, threads=0), x, 500)}
    logits["engine_tflite"] = run(tg, x, requant="tflite")[tg.output_names[0]]
    n_ref = min(args.ref_size, len(x))
    t0 = time.perf_counter()
    logits["litert_ref"] = _invoke_all(_litert(fb, reference=True), xn[:n_ref])
    t_ref = time.perf_counter() - t0
    logits["litert_xnnpack"] = _invoke_all(_litert(fb, reference=False), xn)
    n_tflm = min(args.tflm_size, len(x))
    logits["tflm"] = _tflm_all(fb, xn[:n_tflm])
    print(f"reference kernels: {t_ref / n_ref * 1e3:.1f} ms / image", file=sys.stderr)

    eng = logits["engine_tflite"]
    head = next(n for n in tg.nodes if n.outputs[0] == tg.output_names[0])
    lsb = np.float32(tg.qparams[head.inputs[0]].scale)  # the int8 logits' step
    rows = []
    for k, v in logits.items():
        n = len(v)
        integer = k != "ort_int8"  # onnxruntime returns the float accumulator (no int8 logits)
        same = f"{100 * float(np.mean(np.all(v == eng[:n], axis=1))):.2f} %" if integer else "-"
        worst = f"{float(np.abs(v - eng[:n]).max() / lsb):.0f}" if integer else "-"
        rows.append([k, n, metrics.top1(v, y[:n]), metrics.top1(eng[:n], y[:n]), same, worst,
                     int(np.sum(v.argmax(1) != logits["ort_int8"][:n].argmax(1)))])
    lat = _paired_latency(fb, onnx_path, info.input_shape, args.latency_rounds)
    arena = arena_bytes(fb, (1, *xn.shape[1:]))
    body = "\n".join([
        "## LiteRT / TFLM export (ResNet-20, CIFAR-10 JPEG)",
        "",
        "`export.tflite` writes the IntGraph of the default PTQ config (W8A8, per-channel symmetric weights) as an int8 "
        "flatbuffer (float input / output). Top-1 of each runtime on its first n test images, with the engine's "
        "`tflite` mode on the same images; identical = every logit of the image equal to the engine's.",
        "",
        table(["runtime", "images", "top-1", "engine top-1 (same images)", "identical to engine",
               "max logit diff (LSB)", "argmax != ORT INT8"], rows),
        "",
        f"File {len(fb):,} bytes (flash), TFLM arena {arena:,} bytes; ops {finfo['ops']}.",
        f"Latency at batch 1, one thread, paired over {args.latency_rounds} rounds: LiteRT XNNPACK "
        f"{lat['litert_xnnpack_ms']:.3f} ms, onnxruntime INT8 {lat['ort_int8_ms']:.3f} ms, "
        f"ratio {lat['litert_over_ort']:.2f}x.",
    ])
    print(body)
    if args.write:
        write_section("tflite-export", body)
    print(f"artifacts in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()

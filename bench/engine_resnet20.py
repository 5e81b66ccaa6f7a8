"""The numpy integer engine on the shared ResNet-20: accuracy and parity with onnxruntime, seed 000's overflow
tables, narrow accumulators, throughput. Writes its sections of BENCHMARKS.md.

    python -m bench.engine_resnet20 [--shared ../shared] [--acc-images 1000] [--overflow-images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.analysis import output_lsb
from edgeslim.config import PTQConfig
from edgeslim.data import Preprocess, calibration_indices, open_dataset
from edgeslim.engine.overflow import OverflowStats
from edgeslim.engine.run import run
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--acc-images", type=int, default=300, help="test images for the 16-bit accumulator runs")
    ap.add_argument("--overflow-images", type=int, default=256)
    ap.add_argument("--only", default="engine,overflow,imported", help="comma-separated sections to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    shared = Path(args.shared)
    torch.set_num_threads(2)
    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    x_cal = train.batch(calibration_indices(len(train), 512, 0, train.labels))
    x, y = test.batch(np.arange(len(test))), test.labels
    work = Path(tempfile.mkdtemp(prefix="edgeslim-engine-"))
    if "engine" in only:
        _engine(model, x_cal, x, y, work)
    if "overflow" in only:
        _overflow(model, x_cal, x, y, args.overflow_images, args.acc_images)
    if "imported" in only:
        _imported(model, info, x_cal, x, y, work)


def _imported(model, info, x_cal, x, y, work: Path) -> None:
    """An INT8 model made elsewhere (onnxruntime's quantize_static) imported and run by the engine."""
    from bench.peers import ort_quantize_static
    from edgeslim.io.onnx_qdq_import import import_qdq

    fp32 = api.export_fp32_onnx(model, info.input_shape, work / "fp32.onnx")
    r = ort_quantize_static(fp32, x_cal, work / "ort_int8.onnx", method="minmax")
    if r.error:
        write_section("engine-imported", f"## Engine on onnxruntime's own INT8 model\n\nquantize_static failed: {r.error}")
        return
    g = import_qdq(r.path)
    ort_logits = ort_eval.predict(ort_eval.session(r.path, threads=0), x, 500)
    eng = run(g, x)[g.output_names[0]]
    steps = np.rint(np.abs(eng.astype(np.float64) - ort_logits) / output_lsb(g))
    write_section("engine-imported", "\n".join([
        "## The engine on an INT8 ONNX model made elsewhere (onnxruntime quantize_static, QDQ, u8/s8 per-channel)\n",
        "`edgeslim.io.onnx_qdq_import.import_qdq` turns the QDQ file into an IntGraph; the engine runs it.\n",
        table(["onnxruntime top-1", "engine top-1", "output elements differing", "max diff (LSB)"],
              [[metrics.top1(ort_logits, y), metrics.top1(eng, y), f"{(steps >= 1).mean():.5f}", int(steps.max())]])]))


def _engine(model, x_cal, x, y, work: Path) -> None:
    rows = []
    for label, cfg, requant in [("W8A8 default (float scales)", PTQConfig(), "float"),
                                ("W8A8 default (float scales)", PTQConfig(), "fixed"),
                                ("W8A8 pow2 per-tensor symmetric (VTA)",
                                 PTQConfig(scale="pow2", granularity="tensor", scheme="symmetric"), "shift")]:
        q = api.quantize(model, x_cal, cfg)
        path = api.export_onnx(q, work / "m.onnx")
        with torch.no_grad():
            fq = torch.cat([q.model(torch.from_numpy(x[i:i + 500])) for i in range(0, len(x), 500)]).numpy()
        onnx_logits = ort_eval.predict(ort_eval.session(path, threads=0), x, 500)
        t0 = time.perf_counter()
        eng = run(q.intgraph, x, requant=requant)[q.intgraph.output_names[0]]
        eng_s = time.perf_counter() - t0
        steps = np.rint(np.abs(eng.astype(np.float64) - onnx_logits) / output_lsb(q.intgraph))
        rows.append([label, requant, metrics.top1(fq, y), metrics.top1(onnx_logits, y), metrics.top1(eng, y),
                     f"{(steps >= 1).mean():.5f}", int(steps.max()), f"{len(x) / eng_s:.0f}"])
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), 500):
            model(torch.from_numpy(x[i:i + 500]))
    torch_ips = len(x) / (time.perf_counter() - t0)
    write_section("engine-resnet20", "\n".join([
        "## Integer engine (numpy) on ResNet-20: accuracy, parity with onnxruntime, throughput\n",
        f"512 calibration images, all {len(y)} test images. Differences are counted on the logits in units of the "
        "last layer's accumulator step (s_in x s_w): 0 means the same int32 accumulator as onnxruntime. "
        f"Float PyTorch (FP32, 2 threads) runs {torch_ips:.0f} images/s in the same run. "
        "`float` mirrors onnxruntime's arithmetic and matches it exactly; `fixed` (integer m0 x 2^-shift) and `shift` (pure shifts, power-of-two scales) round ties half up where onnxruntime rounds half to even, so a code occasionally differs by 1 LSB and the difference propagates to later layers (one input code step moves a logit by many accumulator steps); the top-1 columns show what it costs. \n",
        table(["config", "requantization", "fake-quant top-1", "onnxruntime top-1", "engine top-1",
               "logits differing from ORT", "max diff (steps)", "engine images/s"], rows)]))



def _overflow(model, x_cal, x, y, overflow_images: int, acc_images: int) -> None:
    """Seed 000 Tables 1 and 2, and narrow accumulators."""
    q = api.quantize(model, x_cal, PTQConfig())
    stats = OverflowStats()
    run(q.intgraph, x[:overflow_images], stats=stats)
    names = {n.name: n.attrs.get("module", n.name) for n in q.intgraph.layers()}
    ov = [[names.get(r["name"], r["name"]), *(f"{100 * r['product_int8'][k]:.2f}" for k in ("avg", "max", "min")),
           *(f"{100 * r['sum_int16'][k]:.2f}" for k in ("avg", "max", "min"))] for r in stats.layers()]
    n = acc_images
    acc_rows = []
    for bits, mode in ((32, "saturate"), (16, "saturate"), (16, "wrap")):
        st = OverflowStats()
        t0 = time.perf_counter()
        logits = run(q.intgraph, x[:n], accumulator_bits=bits, overflow=mode, stats=st)[q.intgraph.output_names[0]]
        events = sum(r["accumulator_overflows"] for r in st.layers())
        acc_rows.append([f"{bits}-bit", mode if bits == 16 else "-", metrics.top1(logits, y[:n]), events,
                         f"{time.perf_counter() - t0:.1f}"])
    write_section("engine-overflow", "\n".join([
        "## Seed 000's overflow tables on ResNet-20 (W8A8 default), and what narrow accumulators cost\n",
        f"Over the first {overflow_images} test images, per layer and over its output filters (avg / max / min): "
        "% of int8 x int8 products (x - zx)(w - zw) outside [-128, 127] (Table 1) and % of per-pixel receptive-field "
        "sums outside INT16 (Table 2).\n",
        table(["layer", "INT8 product avg %", "max %", "min %", "INT16 sum avg %", "max %", "min %"], ov),
        f"\nAccuracy of the integer engine with narrow accumulators, first {n} test images "
        "(partial sums accumulated in order over the receptive field; overflow events = partial sums that left "
        "the accumulator range):\n",
        table(["accumulator", "on overflow", "engine top-1", "overflow events", "seconds"], acc_rows)]))


if __name__ == "__main__":
    main()

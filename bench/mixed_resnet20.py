"""Mixed precision on the shared CIFAR ResNet-20: both sensitivity sweeps (W8A8, W4A4), the W4A4 search under
a 0.5-point budget with its frontier, seed 002's group table, and FP16 (whole model and islands) next to INT8
and FP32. Writes its sections of BENCHMARKS.md and the figures under docs/img/.

    python -m bench.mixed_resnet20 [--shared ../shared] [--only fp16,containers,groups,sweeps,search] [--holdout 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._data import resnet20_cifar
from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import MixedPlan, PTQConfig
from edgeslim.data import calibration_indices
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.config import Budget, MeasureOptions
from edgeslim.jobs.mixed import run_mixed, run_sensitivity
from edgeslim.tasks import Classify
from edgeslim.quant.precision import LayerPrecision
from edgeslim.report.mixed_html import frontier_figure, sensitivity_figure

IMG = ROOT / "docs" / "img"


def _save(fig, name: str) -> str:
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=100, bbox_inches="tight")
    return f"docs/img/{name}"


def sweeps(model, info, train, test, args, work: Path) -> None:
    parts = [f"Sensitivity on {args.holdout} held-out training images (disjoint from the {args.calib_size} "
             f"calibration images), calibrator `{args.calibrator}`, per-channel weights. **keep FP32**: only that op "
             "in FP32, the rest quantized (seed 000); **only quantized**: only that op quantized, the rest FP32. "
             "Ops are the weighted layers and the residual adds / pooling (their input precision). Each sweep "
             "calibrates once and reuses the FP32 logits and every activation upstream of the changed op.", ""]
    results = {}
    for bits in (8, 4):
        config = PTQConfig(w_bits=bits, a_bits=bits, calibrator=args.calibrator, calib_size=args.calib_size)
        s = run_sensitivity(model, info, Classify(train, test), config, work / f"sens{bits}", high=LayerPrecision.parse("fp32"),
                            holdout_size=args.holdout, group_table=False, measure=MeasureOptions())
        results[bits] = s["sensitivity"]
        if bits == 4:
            parts.append(f"![W4A4 sensitivity]({_save(sensitivity_figure(s['sensitivity']), 'sensitivity_resnet20_w4a4.png')})")
    r8, r4 = results[8], results[4]
    rows = []
    for a, b in zip(r8["rows"], r4["rows"]):
        rows.append([a["name"], a["macs"], a["keep_high"]["score"], a["only_quantized"]["score"], b["keep_high"]["score"],
                     b["keep_high"]["delta"], b["keep_high"]["sqnr_db"], b["only_quantized"]["score"],
                     b["only_quantized"]["delta"]])
    head = (f"FP32 held-out top-1 {r8['fp32_score']:.4f}; uniform W8A8 {r8['uniform']['score']:.4f}, "
            f"uniform W4A4 {r4['uniform']['score']:.4f}. Wall time (2 cores): W8A8 keep-FP32 "
            f"{r8['seconds']['keep_high']:.0f} s, only-quantized {r8['seconds']['only_quantized']:.0f} s; "
            f"W4A4 {r4['seconds']['keep_high']:.0f} s and {r4['seconds']['only_quantized']:.0f} s "
            f"({len(r4['rows'])} ops each, {r4['images']} images).")
    body = "\n".join(["## Mixed precision: per-op sensitivity on ResNet-20 (W8A8 and W4A4)", "", *parts, "", head, "",
                      table(["op", "MACs", "W8A8 keep FP32", "W8A8 only quantized", "W4A4 keep FP32", "gain",
                             "SQNR dB", "W4A4 only quantized", "change"], rows)])
    write_section("mixed-sweeps", body)


def search(model, info, train, test, args, work: Path) -> None:
    config = PTQConfig(w_bits=4, a_bits=4, calibrator=args.calibrator, calib_size=args.calib_size)
    rows, notes = [], []
    for high in args.high.split(","):
        s = run_mixed(model, info, Classify(train, test), config, work / f"mixed_{high}_{args.holdout_from}",
                      budget=Budget(max_drop=0.5), high=LayerPrecision.parse(high), holdout_size=args.holdout,
                      holdout_from=args.holdout_from, measure=MeasureOptions())
        m, u, f = s["mixed"], s["uniform"], s["fp32"]
        if not rows:
            rows.append(["FP32", "", f["score"], f["onnx_score"], f["holdout_score"], "", "", f["size_bytes"], "",
                         f["latency_ms"], 1.0, ""])
            rows.append(["uniform W4A4", "", u["score"], u["onnx_score"], u["holdout_score"], 0.0, 0.0, u["onnx_bytes"],
                         u["size_bytes"], u["latency_ms"]["batch1"], u["latency_over_fp32"]["batch1"],
                         u["latency_over_fp32"]["batch64"]])
        rows.append([f"mixed W4A4 / {high}", "yes" if s["met"] else "no", m["score"], s["onnx_mixed"]["score"],
                     m["holdout_score"], m["high_precision_mac_fraction"], m["high_precision_param_fraction"],
                     m["onnx_bytes"], m["size_bytes"], m["latency_ms"]["batch1"], m["latency_over_fp32"]["batch1"],
                     m["latency_over_fp32"]["batch64"]])
        suffix = "" if args.holdout_from == "calib" else "_dataholdout"
        fig = _save(frontier_figure(s), f"mixed_frontier_resnet20_w4a4_{high}{suffix}.png")
        evaluated = len(s["candidates"])
        notes.append(f"- **high = {high}**: {s['reason']}. Standard error of the held-out drop (paired with FP32): "
                     f"{m.get('holdout_drop_se', float('nan')) * 100:.2f} points. On the test set: drop "
                     f"{(f['onnx_score'] - s['onnx_mixed']['score']) * 100:.2f} points in onnxruntime "
                     f"({'within' if s['met_on_test'] else 'over'} the "
                     f"budget). High-precision ops: {', '.join(m['high_precision_layers']) or 'none'}. Search "
                     f"{s['search']['seconds']:.0f} s + sensitivity {s['search']['sensitivity_seconds']:.0f} s, "
                     f"{evaluated} plans evaluated; whole job {s['total_seconds']:.0f} s. Frontier: ![frontier]({fig})")
    if args.holdout_from == "calib":
        where = (f"The search scores plans on {args.holdout} held-out *training* images (the budget is checked "
                 "there: FP32 is more accurate on training images than on the test set); the test columns, on all "
                 "10,000 test images, are the verification.")
    else:
        where = (f"`--holdout-from data`: the search scores plans on {args.holdout} test images (seeded, "
                 "class-balanced) and every test column uses the *other* test images, so nothing reported was "
                 "used to choose the plan.")
    body = "\n".join([
        f"## Mixed precision: W4A4 ResNet-20 under a 0.5-point budget (`edgeslim mixed --max-drop 0.5`, "
        f"held-out images from --{'calib-data' if args.holdout_from == 'calib' else 'data'})", "",
        f"`edgeslim mixed resnet20 --weights resnet20_cifar10jpeg.pt --calib-data cifar10-jpeg-train.zip "
        f"--data cifar10-jpeg-test.zip --w-bits 4 --a-bits 4 --calibrator {args.calibrator} --max-drop 0.5 "
        f"--holdout-size {args.holdout} --holdout-from {args.holdout_from} --high H`. {where} "
        "Sizes: ONNX file bytes and stored parameter bytes (weights packed at "
        "their bit width, int32 biases). onnxruntime stores and runs 4-bit weights in int8 containers (the fast "
        "kernel here, as they cannot saturate), while 8-bit weights need the slower uint8 container on this CPU "
        "(see the weight-container section); float layers are slower still. Latency of single candidates is "
        "noisy on this shared 2-core machine (+-0.2 ms at batch 1).", "",
        table(["model", "met", "test top-1 (PyTorch, simulation subset)", "test top-1 (onnxruntime)", "held-out top-1",
               "high MAC fraction", "high weight fraction", "ONNX bytes", "parameter bytes", "ms b1", "x FP32 b1",
               "x FP32 b64"], rows), "", *notes])
    write_section("mixed-search" if args.holdout_from == "calib" else "mixed-search-data", body)


def groups(model, info, train, test, args, work: Path) -> None:
    config = PTQConfig(calibrator=args.calibrator, calib_size=args.calib_size)
    gspec = {"stem": ("conv1",), "layer1": ("layer1.*",), "layer2": ("layer2.*",), "layer3": ("layer3.*",),
             "classifier": ("linear",)}
    s = run_sensitivity(model, info, Classify(train, test), config, work / "groups", high=LayerPrecision.parse("fp32"),
                        holdout_size=200, groups=gspec, measure=MeasureOptions())
    g = s["groups"]
    names = list(g["groups"])
    rows = [["Baseline FP32", *["32"] * len(names), g["fp32_bytes"], "", g["fp32_score"], "", "", ""]]
    for r in sorted(g["rows"], key=lambda r: len(r["quantized"])):
        label = "FP32 islands (all ops)" if not r["quantized"] else (
            "PTQ INT8 (all)" if len(r["quantized"]) == len(names) else "partial quantization")
        rows.append([label, *["8" if n in r["quantized"] else "32" for n in names], r["weight_bytes"], r["onnx_bytes"],
                     r["score"], r["latency_ms"], r["latency_over_fp32"], r["fps"]])
    body = "\n".join([
        "## Partial quantization of ResNet-20 groups (seed 002's Table 2 form)", "",
        "Every combination of five groups (stem `conv1`, `layer1`, `layer2`, `layer3`, classifier `linear`) in FP32 "
        "(32) or W8A8 (8); a group in FP32 also reads FP32 inputs. Top-1 of the exported ONNX model in onnxruntime "
        f"on the {s['images']['test']} test images; latency batch 1, one thread, paired with the FP32 model; "
        "weight bytes at real bit widths. The first row is the plain FP32 export, the second the same model "
        "through the mixed exporter with every op in FP32.", "",
        table(["method", *names, "weight bytes", "ONNX bytes", "top-1", "ms", "x FP32", "FPS"], rows)])
    write_section("mixed-groups", body)


def fp16(model, info, train, test, args, work: Path) -> None:
    idx = calibration_indices(len(train), args.calib_size, 0, train.labels)
    calib = train.batch(idx)
    x, y = test.batch(np.arange(len(test))), test.labels
    config = PTQConfig(calibrator=args.calibrator, calib_size=args.calib_size)
    fp32 = api.export_fp32_onnx(model, info.input_shape, work / "fp32.onnx")
    paths = {"FP32": fp32, "FP16 whole model (onnxconverter-common, FP16 arithmetic)":
             api.export_fp16_onnx(fp32, work / "fp16.onnx")}
    plans = {"FP16 storage, every op (edgeslim plan `*`=fp16)": MixedPlan((("*", "fp16"),)),
             "INT8 with FP16 islands (conv1, layer3, linear)": MixedPlan((("conv1", "fp16"), ("layer3.*", "fp16"),
                                                                          ("linear", "fp16"))),
             "INT8 with FP16 islands (conv1, linear)": MixedPlan((("conv1", "fp16"), ("linear", "fp16"))),
             "INT8 (W8A8)": None}
    sims = {}
    for i, (name, plan) in enumerate(plans.items()):
        q = api.quantize(model, calib, config, plan=plan, input_shape=info.input_shape)
        paths[name] = api.export_onnx(q, work / f"plan{i}.onnx")
        with torch.no_grad():
            sims[name] = metrics.top1(torch.cat([q.model(torch.from_numpy(x[j:j + 500]))
                                                 for j in range(0, len(x), 500)]).numpy(), y)
    rows = []
    for name, path in paths.items():
        top1 = metrics.top1(ort_eval.predict(ort_eval.session(path, threads=0), x, 500), y)
        lat = {}
        for b, rounds in ((1, 300), (64, 30)):
            s = ort_eval.latency_samples({"fp32": fp32, "m": path}, info.input_shape, b, rounds=rounds)
            lat[b] = (statistics.median(s["m"]), ort_eval.paired_ratio(s, "m", "fp32"))
        counts = ort_eval.optimized_op_counts(path)
        rows.append([name, sims.get(name, ""), top1, path.stat().st_size, lat[1][0], lat[1][1], lat[64][0], lat[64][1],
                     f"{ort_eval.integer_convs(path)[0]}/{ort_eval.integer_convs(path)[1]}", counts.get("Cast", 0)])
    body = "\n".join([
        "## FP16 (whole model and islands) next to INT8 and FP32 on ResNet-20", "",
        f"Top-1 on the {len(y)} test images; latency onnxruntime CPU, 1 thread, paired with FP32 in one process. "
        "Two FP16 forms: the whole graph converted to FP16 arithmetic (what an FP16 GPU/NPU runs), and edgeslim's "
        "plan form, where FP16 tensors and weights are stored in half precision between FP32 computations (what "
        "the PyTorch simulation computes, so its accuracy matches onnxruntime exactly). This CPU has no FP16 "
        "arithmetic: onnxruntime inserts Cast nodes around every FP16 op (counted in its optimized graph), so FP16 "
        "only halves the file here; it does not make anything faster.", "",
        table(["model", "top-1 (PyTorch sim)", "top-1 (onnxruntime)", "ONNX bytes", "ms b1", "x FP32 b1", "ms b64",
               "x FP32 b64", "integer convs", "Casts in ORT graph"], rows)])
    write_section("mixed-fp16", body)


def containers(model, info, train, test, args, work: Path) -> None:
    """INT8 weight containers on this CPU: the speed / exactness trade-off onnxruntime's u8s8 kernels impose."""
    from edgeslim.export.onnx_qdq import host_weight_type, weight_containers

    calib = train.batch(calibration_indices(len(train), args.calib_size, 0, train.labels))
    x, y = test.batch(np.arange(len(test))), test.labels
    fp32 = api.export_fp32_onnx(model, info.input_shape, work / "c_fp32.onnx")
    rows = []
    for label, bits, wtype in (("W8A8, uint8 weights (auto here)", 8, "auto"),
                               ("W8A8, int8 weights (forced)", 8, "int8"),
                               ("W7A8, int8 weights (auto: cannot saturate)", 7, "auto")):
        q = api.quantize(model, calib, PTQConfig(w_bits=bits, calibrator=args.calibrator, calib_size=args.calib_size),
                         input_shape=info.input_shape)
        path = api.export_onnx(q, work / f"c_{bits}_{wtype}.onnx", weight_type=wtype)
        with torch.no_grad():
            sim = torch.cat([q.model(torch.from_numpy(x[j:j + 500])) for j in range(0, len(x), 500)]).numpy()
        ort_logits = ort_eval.predict(ort_eval.session(path, threads=0), x, 500)
        lat = {}
        for b, rounds in ((1, 300), (64, 30)):
            smp = ort_eval.latency_samples({"fp32": fp32, "m": path}, info.input_shape, b, rounds=rounds)
            lat[b] = ort_eval.paired_ratio(smp, "m", "fp32")
        kinds = weight_containers(q.intgraph, wtype)
        rows.append([label, ", ".join(f"{v} {k}" for k, v in kinds.items()), metrics.top1(sim, y),
                     metrics.top1(ort_logits, y), int((sim.argmax(1) != ort_logits.argmax(1)).sum()),
                     float(np.abs(sim - ort_logits).max()), lat[1], lat[64]])
    body = "\n".join([
        "## INT8 weight containers on this CPU (why W8 is not faster here)", "",
        f"This machine's CPU has AVX2 but no VNNI (`host_weight_type()` = `{host_weight_type()}`). onnxruntime's "
        "u8 x s8 kernels there add pairs of products in saturating int16, so int8 weights give *wrong* results; "
        "edgeslim stores such weights as uint8 (exact, but onnxruntime's u8 x u8 path is no faster than FP32 "
        "here). Weights within [-64, 64] (7 bits) cannot saturate and keep the fast int8 kernel exactly. On ARM and "
        "VNNI CPUs int8 weights are exact and `auto` keeps them (the issue-2 tables, measured on such a machine, "
        "show INT8 at about 0.5x FP32). Same model, data and calibration in each row; latency paired with FP32.", "",
        table(["model", "weight containers", "top-1 (PyTorch sim)", "top-1 (onnxruntime)",
               "argmax differences sim vs ORT", "max logit diff", "x FP32 b1", "x FP32 b64"], rows)])
    write_section("mixed-containers", body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--calibrator", default="entropy")
    ap.add_argument("--high", default="int8,fp32", help="high precisions to search with (comma-separated)")
    ap.add_argument("--holdout-from", default="calib", help="calib | data (see edgeslim mixed --holdout-from)")
    ap.add_argument("--only", default="fp16,containers,groups,sweeps,search")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shared = Path(args.shared)
    model, info, train, test = resnet20_cifar(shared)
    work = Path(tempfile.mkdtemp(prefix="edgeslim-mixed-bench-"))
    for name, fn in (("fp16", fp16), ("containers", containers), ("groups", groups), ("sweeps", sweeps),
                     ("search", search)):
        if name in args.only.split(","):
            t0 = time.perf_counter()
            fn(model, info, train, test, args, work)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""INT8 speed of the lightweighting steps' models (issue 22): ResNet-20 as trained, factorized (G2, depthwise-separable
with depth multipliers > 1), factorized + magnitude-pruned (G5, memory) and factorized + channel-pruned (G5, speed),
each quantized W8A8 and run in onnxruntime next to its own FP32 file, interleaved in one process (paired ratios),
one thread, batch 1. No fine-tuning: this measures speed, not accuracy. ``--legacy-depthwise`` also times the
factorized file as exported before the depthwise repeat (a grouped QLinearConv with several outputs per group).

    python -m bench.plan_speed [--rounds 200]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeslim import api
from edgeslim.algorithms.factorize import factorize
from edgeslim.algorithms.pruning import magnitude_prune, prune_channels, remove_masks
from edgeslim.config import PTQConfig
from edgeslim.cpu import int8_weights_saturate
from edgeslim.eval import ort as ort_eval
from edgeslim.export import onnx_qdq
from edgeslim.models import build_model

from ._report import table, write_section

ROOT = Path(__file__).resolve().parents[1]


def _models(weights: str | None):
    torch.manual_seed(0)
    model, info = build_model("resnet20", weights)
    fact, _ = factorize(model, info.input_shape, macs_reduction=0.5)
    sparse = copy.deepcopy(fact)
    magnitude_prune(sparse, 0.45)
    remove_masks(sparse)
    slim = prune_channels(fact, info.input_shape, ratio=0.3)
    slim = slim[0] if isinstance(slim, tuple) else slim
    return info, {"ResNet-20": model, "factorized (G2)": fact, "factorized + 45% magnitude pruning (G5)": sparse,
                  "factorized + 30% channel pruning (G5)": slim}


def _without_repeat(path: Path, out: Path) -> Path:
    """The file as the exporter wrote it before: each channel repeat removed, its depthwise conv grouped again."""
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    for conv in [n for n in m.graph.node if n.op_type == "Conv"]:
        dq = producer.get(conv.input[0])
        gather = producer.get(dq.input[0]) if dq is not None else None
        if gather is None or gather.op_type != "Gather":
            continue
        index = onnx.numpy_helper.to_array(inits[gather.input[1]])
        multiplier = int(np.sum(index == index[0]))
        group = next(a for a in conv.attribute if a.name == "group")
        group.i = len(index) // multiplier
        dq.input[0] = gather.input[0]
        m.graph.node.remove(gather)
    onnx.save(m, str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--legacy-depthwise", action="store_true")
    ap.add_argument("--section", help="default plan-int8-speed, or plan-int8-speed-avx2 on x86 CPUs with AVX2 and no VNNI")
    args = ap.parse_args()
    saturating = int8_weights_saturate()
    weights = Path(args.shared) / "models" / "resnet20_cifar10jpeg.pt"
    info, models = _models(str(weights) if weights.exists() else None)
    calib = np.random.default_rng(0).standard_normal((64, *info.input_shape)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(models.items()):
            q = api.quantize(m, calib, PTQConfig(), input_shape=info.input_shape)  # weight_range auto
            paths = {"fp32": api.export_fp32_onnx(m, info.input_shape, Path(tmp) / f"{i}_fp32.onnx"),
                     "int8": api.export_onnx(q, Path(tmp) / f"{i}_int8.onnx")}
            if saturating:  # the 8-bit grid, exact here only in uint8 weight containers
                full = api.quantize(m, calib, PTQConfig(weight_range="full"), input_shape=info.input_shape)
                paths["int8 full"] = api.export_onnx(full, Path(tmp) / f"{i}_int8_full.onnx")
            multipliers = sorted({onnx_qdq.depth_multiplier(n) for n in q.intgraph.nodes if n.op == "QLinearConv"})
            if args.legacy_depthwise and multipliers != [1]:
                paths["int8 grouped"] = _without_repeat(paths["int8"], Path(tmp) / f"{i}_legacy.onnx")
            lat = ort_eval.latency_samples(paths, info.input_shape, 1, threads=1, rounds=args.rounds)
            convs = sum(1 for n in q.intgraph.nodes if n.op == "QLinearConv")
            row = [name, convs, ",".join(map(str, multipliers)), statistics.median(lat["fp32"]),
                   statistics.median(lat["int8"]), ort_eval.paired_ratio(lat, "int8", "fp32")]
            row.append(ort_eval.paired_ratio(lat, "int8 grouped", "fp32") if "int8 grouped" in lat else "")
            if saturating:
                row.append(ort_eval.paired_ratio(lat, "int8 full", "fp32"))
            rows.append(row)
            print(row, flush=True)
    body = "\n".join([
        "## INT8 speed of the lightweighting steps' models (ResNet-20, onnxruntime, batch 1, one thread)", "",
        "Each model quantized W8A8 (per-channel, min-max, 64 random calibration inputs: speed only, no fine-tuning) "
        "and timed next to its own FP32 file, interleaved (paired ratio: median of per-round ratios). Separable "
        "factorization writes depthwise convs with several outputs per input channel (depth multiplier m > 1); "
        "onnxruntime runs such a QLinearConv as a generic grouped convolution, so the export repeats the input "
        "channels on the codes (a Gather) and writes an m = 1 depthwise conv, which onnxruntime's int8 depthwise "
        "kernel runs (bit-exact: tests/export/test_export_onnx.py). The last column, with `--legacy-depthwise`, is the "
        "same INT8 file without that repeat, as exported before."
        + (" This CPU has AVX2 and no VNNI: the INT8 column uses the default `--weight-range auto` (8-bit weights "
           "on the 7-bit grid, int8 containers, exact here); the last column is the 8-bit grid, exact here only in "
           "uint8 weight containers." if saturating else ""), "",
        table(["model", "QLinearConv", "depth multipliers", "FP32 ms", "INT8 ms", "INT8 / FP32",
               "INT8 / FP32 without the repeat"] + (["INT8 / FP32, 8-bit grid (uint8 containers)"] if saturating else []),
              rows)])
    write_section(args.section or ("plan-int8-speed-avx2" if saturating else "plan-int8-speed"), body)


if __name__ == "__main__":
    main()

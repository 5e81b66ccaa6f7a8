"""Command line: ``edgeslim {demo, inspect, quantize, analyze, sensitivity, mixed, qat}``. Parses options into configs and calls the API.

Every user-facing problem ends in one line ``edgeslim: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_lighten
from .cli_model import THREADS_HELP, HelpFormatter, load_model, model_args
from .errors import EdgeslimError


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data", required=True, help="ImageFolder dir / zip, CIFAR batches, .npz or sklearn-digits")
    p.add_argument("--calib-split", help="split / top-level folder of --calib-data (e.g. train)")
    p.add_argument("--calib-size", type=int, default=512, help="calibration images, seeded class-balanced subset")
    p.add_argument("--data", required=True, help="evaluation data, same formats as --calib-data")
    p.add_argument("--data-split", help="split / top-level folder of --data (e.g. test)")
    p.add_argument("--eval-size", type=int, help="score on a seeded subset of this many --data inputs (class-balanced "
                   "when labelled; every task; default: all)")
    p.add_argument("--w-bits", type=int, default=8, help="weight bits (2..16)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits (2..16)")
    p.add_argument("--granularity", default="channel", help="weights: channel | tensor")
    p.add_argument("--scheme", default="asymmetric", help="activations: asymmetric (default) | symmetric")
    p.add_argument("--w-scheme", default="symmetric", help="weights: symmetric (default) | asymmetric")
    p.add_argument("--scale", default="float", help="float | pow2 (bit-shift requant) | global (one scale, baseline)")
    p.add_argument("--calibrator", default="minmax", help="minmax | percentile | entropy | mse")
    p.add_argument("--no-fuse", action="store_true", help="do not fuse Conv/Add + ReLU (separate requantization)")
    p.add_argument("--algorithm", default="", help="extra PTQ steps, comma-separated, run in this order: cle "
                        "(cross-layer equalization), adaround (learned rounding per layer) or brecq (per block, "
                        "also learns activation step sizes), bias-correction (empirical, on the calibration images)")
    p.add_argument("--iters", type=int, default=1000, help="adaround / brecq: iterations per layer or block "
                        "(default 1000)")
    p.add_argument("--fisher", action="store_true", help="brecq: weight the block loss by the diagonal Fisher "
                        "(squared output gradients of the KL to the FP32 predictions)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random subset (calibration, scoring)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--simulate-size", type=int, default=None,
                   help="score the PyTorch FP32 and fake-quant models on a subset of this many test images (the ONNX "
                   "files are scored on all of them, in onnxruntime); 0 = all (default: 1000 classify, 16 detect)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", default="auto", choices=("auto", "classify", "detect", "fidelity"),
                   help="classify (labelled images: top-1), detect (YOLO-format data: mAP, confusion matrix; see "
                   "--groups), fidelity (no labels: INT8 vs FP32 per output, SQNR / cosine / LSB) or auto "
                   "(default: detect for detectors, classify when the data has labels, else fidelity)")
    _preprocess_args(p)
    p.add_argument("--groups", help="precision per layer group, e.g. backbone=8,neck=32,head=32 (detectors define "
                   "backbone / neck / head; values: int8, fp16, fp32 or bits, 32 = FP32)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="detect: score threshold of mAP candidates")
    p.add_argument("--iou-thres", type=float, default=0.6, help="detect: NMS IoU threshold")
    p.add_argument("--cm-conf", type=float, default=0.25, help="detect: score threshold of the confusion matrix")
    p.add_argument("--decoder", help="detect, for models without one (ONNX files): yolov5 | yolov3-tiny | fastestdet "
                   "(raw obj, reg, cls) | fastestdet-activated (the published FastestDet.onnx output)")
    p.add_argument("--decoded-output", action="store_true",
                   help="detect: also write model_fp32_decoded.onnx / model_int8_decoded.onnx, whose one output is the "
                   "decoded (N, boxes, 5 + classes) = cx, cy, w, h, objectness, class probabilities (NMS not included)")


def _preprocess_args(p: argparse.ArgumentParser, channel_order: bool = True) -> None:
    g = p.add_argument_group("preprocessing (fidelity task: how images become model inputs; .npz / .npy float "
                             "arrays are used as they are)")
    if channel_order:
        g.add_argument("--channel-order", help="RGB, BGR or GRAY: the order the model was trained on (default RGB; "
                       "fastestdet: BGR)")
    g.add_argument("--mean", help="per-channel mean of pixels scaled to [0, 1], e.g. 0.485,0.456,0.406 (default: the "
                   "model's own, or 0; x = (pixel / 255 - mean) / std)")
    g.add_argument("--std", help="per-channel std, same units, e.g. 0.229,0.224,0.225 (default: the model's own, or 1)")
    g.add_argument("--input-size", help="H,W the images are resized to (default: the model's input size)")
    g.add_argument("--resize", default=None, choices=("stretch", "letterbox", "center-crop"),
                   help="how images reach --input-size (default stretch)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="edgeslim", description="Make CNNs small and fast for embedded devices.")
    try:
        parser.add_argument("--version", action="version", version=f"edgeslim {version('edgeslim')}")
    except PackageNotFoundError:  # running from a source tree that was not installed
        parser.add_argument("--version", action="version", version="edgeslim (not installed)")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=lambda **kw: argparse.ArgumentParser(
                                    formatter_class=HelpFormatter, **kw))
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and quantize it (offline)")
    demo.add_argument("--out", default="runs/demo", help="output folder (summary.json, report.html, the ONNX files)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs of the small CNN")
    demo.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    inspect = sub.add_parser("inspect", help="layers, parameters, MACs and size per layer")
    model_args(inspect)
    quant = sub.add_parser("quantize", help="post-training quantization -> INT8 ONNX + report")
    model_args(quant)
    _quant_args(quant)
    quant.add_argument("--plan", help="mixed-precision plan JSON (per-layer precisions; written by `edgeslim mixed`)")
    quant.add_argument("--formats", default="onnx", help="comma-separated: onnx (always written), tflite "
                       "(model_int8.tflite, LiteRT int8), tflm (also model_data.h/.cc, op resolver, arena size)")
    analyze = sub.add_parser("analyze", help="quantize, then run the integer engine: accuracy, parity, overflow")
    model_args(analyze)
    _quant_args(analyze)
    analyze.add_argument("--engine", action="store_true", help="integer engine accuracy and parity with onnxruntime")
    analyze.add_argument("--overflow", action="store_true", help="per-layer / per-filter overflow statistics")
    analyze.add_argument("--accumulator", type=int, default=32, help="accumulator bits: 32 (default) or 16")
    analyze.add_argument("--overflow-mode", default="saturate", help="16-bit accumulator: saturate | wrap")
    analyze.add_argument("--requant", default="float", help="float (onnxruntime) | fixed (m0*2^-n) | shift (pow2)")
    analyze.add_argument("--overflow-images", type=int, default=256, help="test images for overflow statistics")
    analyze.add_argument("--plan", help="mixed-precision plan JSON (float islands run in float32 in the engine)")
    sens = sub.add_parser("sensitivity", help="per-layer sensitivity (each layer kept high / quantized alone) and the layer-group "
                          "table (e.g. backbone / neck / head at each precision)")
    model_args(sens)
    _quant_args(sens)
    _mixed_args(sens, high_default="fp32")
    sens.add_argument("--group", action="append", default=[], metavar="NAME=PATTERN[|PATTERN]",
                      help="a named group of layers by module-name pattern (repeat); default: top-level modules")
    sens.add_argument("--no-groups", action="store_true", help="skip the group table")
    mixed = sub.add_parser("mixed", help="search per-layer precisions under an accuracy / size / latency budget")
    model_args(mixed)
    _quant_args(mixed)
    _mixed_args(mixed, high_default=None)
    mixed.add_argument("--max-drop", type=float, help="quality budget in points below FP32: top-1 points for "
                       "classify (0.5 = half a point), mAP@0.5:0.95 points for detect")
    mixed.add_argument("--min-sqnr", type=float, help="fidelity (no labels): the worst output's SQNR vs FP32 must stay "
                       "at or above this many dB")
    mixed.add_argument("--max-size-kb", type=float, help="stored parameter budget in KiB")
    mixed.add_argument("--max-latency-ms", type=float, help="onnxruntime latency budget per image (batch 1)")
    mixed.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)
    qat = sub.add_parser("qat", help="quantization-aware training (STE, LSQ, EWGS, DSQ, DAQ; uniform, PoT, APoT)")
    _qat_args(qat)
    qat.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)
    prune = sub.add_parser("prune", help="pruning: channel pruning (speed) or magnitude pruning (memory), fine-tuned with "
                           "distillation")
    cli_lighten.add_args(prune)
    prune.add_argument("--method", default="channel", help="channel (physically smaller model) | magnitude (sparse)")
    prune.add_argument("--target-macs", type=float, help="channel: keep this fraction of the MACs (0.7 = remove 30%%)")
    prune.add_argument("--ratio", type=float, help="channel: remove this fraction of every prunable group instead")
    prune.add_argument("--importance", default="l1", help="channel: l1 | l2 | bn | taylor")
    prune.add_argument("--sparsity", type=float, default=0.5, help="magnitude: fraction of weights set to zero")
    prune.add_argument("--scope", default="global", help="magnitude: global | layer")
    prune.add_argument("--one-shot", action="store_true", help="magnitude: prune at once instead of gradually")
    fact = sub.add_parser("factorize", help="factorization: heavy convs -> depthwise-separable or bottleneck, fine-tuned "
                          "with distillation")
    cli_lighten.add_args(fact)
    fact.add_argument("--method", default="separable", help="separable (depthwise + pointwise) | bottleneck (1x1 first)")
    fact.add_argument("--layers", help="comma-separated conv names (default: the heaviest, by MACs share)")
    fact.add_argument("--share", type=float, default=0.5, help="factorize the heaviest convs covering this MACs share")
    fact.add_argument("--macs-reduction", type=float, default=0.5, help="each conv keeps at most this MACs fraction")
    fact.add_argument("--rank", type=int, help="explicit rank / depth multiplier instead of --macs-reduction")
    plan = sub.add_parser("plan", help="cheapest road first: quantization (W8, low-bit, mixed, FP16), then backbone swap, "
                          "factorization, pruning, until the target is met")
    cli_lighten.add_args(plan)
    plan.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)
    plan.add_argument("--max-ram-kb", type=float, help="mcu targets: RAM budget in KiB, the tensor arena TFLM allocates "
                      "for the int8 .tflite (needs the tflite extra)")
    plan.add_argument("--target", default="cpu-int8", help="cpu-int8 | vta | mcu-int8 | mcu-w4 | fp16-gpu | a target JSON")
    plan.add_argument("--lowbit-method", default="brecq", help="learned rounding of the sub-8-bit roads: brecq | adaround")
    plan.add_argument("--lowbit-iters", type=int, default=300, help="its iterations per unit")
    plan.add_argument("--holdout-size", type=int, default=1000, help="training images kept out of fine-tuning that "
                      "score every choice (at most a quarter of them; the test set is never used to choose)")
    plan.add_argument("--max-drop", type=float, help="accuracy budget in points of top-1 (1.0 = one point)")
    plan.add_argument("--max-latency-ms", type=float, help="onnxruntime latency per image (batch 1)")
    plan.add_argument("--max-size-kb", type=float, help="stored parameter size in KiB")
    plan.add_argument("--steps", default="G1,G2,G3,G4,G5", help="which steps may run: G1 backbone swap, G2 factorization, "
                      "G3 uniform low-bit quantization, G4 mixed precision / FP16, G5 pruning")
    plan.add_argument("--budget-epochs", type=float, default=3.0, help="fine-tuning epochs shared by factorization and pruning")
    plan.add_argument("--calib-size", type=int, default=512, help="calibration images of the quantization roads")
    plan.add_argument("--prune-macs", type=float, default=0.5, help="pruning (channel): keep this MACs fraction")
    plan.add_argument("--sparsity", type=float, help="pruning (magnitude): sparsity (default: the smallest that "
                      "fits --max-size-kb, counted with the values' deployed width)")
    plan.add_argument("--backbone", help="backbone swap: a light backbone as NAME[:WIDTH] (shufflenet_v2:0.5, mobilenet_v2:1.0); "
                      "it starts from random weights and is distilled from the model")
    export = sub.add_parser("export", help="LiteRT (.tflite) / TFLM files of a finished quantize run folder")
    export.add_argument("run_dir", help="the --out folder of edgeslim quantize (model_int8.onnx, summary.json)")
    export.add_argument("--format", required=True, choices=("tflite", "tflm"),
                        help="tflite: model_int8.tflite; tflm: also model_data.h/.cc, op_resolver.txt, arena size")
    export.add_argument("--io", default="float", choices=("float", "int8"), help="the .tflite's input / output type")
    return parser


def _qat_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--train-data", required=True, help="training images: ImageFolder dir / zip, CIFAR batches, .npz")
    p.add_argument("--train-split", help="split / top-level folder of --train-data (e.g. train)")
    p.add_argument("--train-size", type=int, help="train on a seeded class-balanced subset of this many images")
    p.add_argument("--data", required=True, help="test data, scored after every epoch")
    p.add_argument("--data-split", help="split / top-level folder of --data (e.g. test)")
    p.add_argument("--val-size", type=int, help="score each epoch on a seeded subset of --data of this size "
                   "(the final numbers use all of --data)")
    p.add_argument("--eval-size", type=int, help="score the final numbers on a seeded class-balanced subset of this "
                   "many --data images (default: all)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits (2..16)")
    p.add_argument("--a-bits", type=int, default=4, help="activation bits (2..16)")
    p.add_argument("--quantizer", default="uniform", help="levels: uniform (default) | pot | apot (powers of two)")
    p.add_argument("--a-quantizer", help="activation levels if not --quantizer's (uniform activations export to ONNX)")
    p.add_argument("--method", default="lsq", help="gradient estimator: lsq (default) | ste | ewgs | dsq | daq")
    p.add_argument("--epochs", type=int, help="epochs (default 1 unless --max-steps is given)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=0.001, help="peak learning rate of the cosine schedule (default 0.001; BN is folded, "
                   "so rates that suit the float model with BN can diverge)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over processes (default 128)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (weights only, not biases or scales)")
    p.add_argument("--kd", action="store_true", help="distil from the FP32 model (KL to its predictions)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="with --kd: weight of the KL term (rest: labels)")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="with --kd: softmax temperature of the KL term")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--resume", action="store_true", help="continue exactly from --out/checkpoint.pt (refused if the "
                   "model, QAT / PTQ options, --plan or training data differ)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write --out/checkpoint.pt every N optimizer "
                   "steps and at every epoch end (default: every 5 minutes of training; 0: epoch ends only)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random subset (calibration, scoring)")
    p.add_argument("--calib-size", type=int, default=512, help="training images that calibrate the PTQ start")
    p.add_argument("--calibrator", default="mse", help="PTQ start: mse (default) | minmax | percentile | entropy")
    p.add_argument("--algorithm", default="", help="PTQ start: extra steps as for `quantize` (cle, adaround | brecq, "
                   "bias-correction); QAT then starts from the reconstructed model")
    p.add_argument("--iters", type=int, default=1000, help="--algorithm adaround / brecq: iterations per unit")
    p.add_argument("--granularity", default="channel", help="weights: channel (default) | tensor")
    p.add_argument("--plan", help="per-layer precisions JSON (e.g. first / last layer at int8); see `edgeslim mixed`")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--torch-threads", type=int, help="PyTorch threads per process for training (default: PyTorch's "
                   "choice)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", default="auto", choices=("auto", "classify", "detect", "fidelity"),
                   help="classify (labelled images: labels + optional --kd), detect (YOLO-format --train-data / --data; "
                   "the loss is distillation of the FP32 model's head outputs, no labels, mAP scored every epoch), "
                   "fidelity (no labels, any model: distillation of every output, SQNR vs FP32 scored every epoch), "
                   "or auto (detect for detectors, classify when the data has labels, else fidelity)")
    p.add_argument("--decoder", help="detect, for models without one (ONNX files): see `quantize --help`")
    p.add_argument("--channel-order", help="detect / fidelity: RGB, BGR or GRAY, the order the model was trained on")
    _preprocess_args(p, channel_order=False)


def _mixed_args(p: argparse.ArgumentParser, high_default: str | None) -> None:
    p.add_argument("--high", default=high_default,
                   help="precision of layers kept high: int8, int16, fp16, fp32 or w8a16 style (default: "
                        + (high_default or "int8 when --w-bits/--a-bits are below 8, else fp32") + ")")
    p.add_argument("--holdout-size", type=int, default=1000,
                   help="held-out images that score every plan (default 1000)")
    p.add_argument("--score-with", default="onnxruntime", choices=("onnxruntime", "pytorch"),
                   help="what runs each candidate plan on the held-out inputs: its exported INT8 file in onnxruntime "
                   "(fast, scores what is deployed) or the PyTorch fake-quant simulation")
    p.add_argument("--holdout-from", default="calib",
                   help="calib (default: from --calib-data, disjoint from calibration; all --data reports) or data "
                        "(from --data; the final numbers use the other --data images)")


def _check_numbers(args) -> None:
    """Options that must be non-negative / positive, checked before any work starts."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise EdgeslimError(f"invalid --seed {seed}: use an integer from 0 to 2**32 - 1")
    for opt in ("epochs", "eval_size", "batch_size", "threads"):
        v = getattr(args, opt, None)
        if v is not None and not isinstance(v, float) and v < 1:  # float --epochs (lightening): _check_ranges
            raise EdgeslimError(f"invalid --{opt.replace('_', '-')} {v}: use 1 or more")
    _check_ranges(args)


# option: (lowest, highest, lowest allowed, highest allowed) -- every float option is also checked to be finite
_RANGES = {"kd_temperature": (0.0, None, False, True), "kd_weight": (0.0, 1.0, True, True),
           "lr": (0.0, None, False, True), "weight_decay": (0.0, None, True, True),
           "budget_epochs": (0.0, None, True, True), "max_drop": (0.0, None, True, True),
           "max_size_kb": (0.0, None, False, True), "max_latency_ms": (0.0, None, False, True),
           "target_macs": (0.0, 1.0, False, True), "ratio": (0.0, 1.0, False, False),
           "sparsity": (0.0, 1.0, True, False), "prune_macs": (0.0, 1.0, False, True),
           "share": (0.0, 1.0, False, True), "macs_reduction": (0.0, 1.0, False, True),
           "conf_thres": (0.0, 1.0, True, True), "iou_thres": (0.0, 1.0, False, True),
           "cm_conf": (0.0, 1.0, True, True)}


def _check_ranges(args) -> None:
    """Float options must be finite numbers inside their range (``--kd-temperature 0`` divides by zero)."""
    import math

    for opt, (lo, hi, lo_ok, hi_ok) in _RANGES.items():
        v = getattr(args, opt, None)
        if not isinstance(v, float):
            continue
        bad = not math.isfinite(v) or v < lo or (v == lo and not lo_ok)
        bad = bad or (hi is not None and (v > hi or (v == hi and not hi_ok)))
        if bad:
            span = f"{'[' if lo_ok else '('}{lo:g}, {'inf)' if hi is None else f'{hi:g}' + (']' if hi_ok else ')')}"
            raise EdgeslimError(f"invalid --{opt.replace('_', '-')} {v:g}: use a number in {span}")
    epochs = getattr(args, "epochs", None)
    if isinstance(epochs, float) and (not math.isfinite(epochs) or epochs <= 0):
        raise EdgeslimError(f"invalid --epochs {epochs:g}: use a positive number of epochs")


def _check_out(args) -> None:
    """``--out`` must be a folder of its own: never empty, never holding (or being) one of the inputs."""
    out = getattr(args, "out", None)
    if out is None:
        return
    if not str(out).strip():
        raise EdgeslimError("--out is empty: pass a folder for the results, e.g. --out runs/model")
    target = Path(out).expanduser().resolve()
    for opt in ("model", "weights", "calib_data", "data", "train_data", "plan"):
        value = getattr(args, opt, None)
        if not value or not isinstance(value, str):
            continue
        src = Path(value).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if src == target or target in src.parents:
            raise EdgeslimError(f"--out {out} holds the input {value} (--{opt.replace('_', '-')}), which the results "
                                "would overwrite: pass another --out folder")
    from .io.staging import check_out_folder, sweep_stale

    sweep_stale(check_out_folder(out))  # refuse a file / read-only --out; drop staging folders of dead runs


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .api import FloatIslandWarning

    if issubclass(category, FloatIslandWarning):
        print(f"edgeslim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for the reports' provenance
    import warnings

    warnings.showwarning = _show_warning
    from .io.staging import sigterm_as_interrupt, untouched_on_failure

    try:  # SIGTERM cleans up staging folders as Ctrl-C does; a failed run removes the --out it created
        with sigterm_as_interrupt(), untouched_on_failure(getattr(args, "out", None)):
            _check_out(args)
            _check_numbers(args)
            return {"demo": _demo, "inspect": _inspect, "quantize": _quantize, "analyze": _quantize,
                    "sensitivity": _sensitivity, "mixed": _deploying(_mixed), "qat": _deploying(_qat),
                    "prune": cli_lighten.prune, "factorize": cli_lighten.factorize,
                    "plan": _deploying(cli_lighten.plan),
                    "export": _export}[args.command](args)
    except EdgeslimError as exc:
        print(f"edgeslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeslim: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file system refusal the checks did not foresee (a read-only or special --out, ...)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"edgeslim: error: {exc.strerror or exc}{where}: check the paths and their permissions", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - never a traceback; EDGESLIM_DEBUG=1 shows it
        import os

        if os.environ.get("EDGESLIM_DEBUG"):
            raise
        print(f"edgeslim: error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
              "rerun with EDGESLIM_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 2


def _inspect(args) -> int:
    from .graph.capture import capture
    from .eval.profile import profile

    model, info = load_model(args)
    rows = profile(capture(model, info.input_shape))
    print(f"{info.name}: input {info.input_shape}, {info.num_classes} classes")
    print(f"{'layer':<28}{'op':<14}{'output':<18}{'params':>10}{'MACs':>14}{'KiB fp32':>10}")
    for r in rows:
        print(f"{r.name:<28}{r.op:<14}{str(r.out_shape[1:]):<18}{r.params:>10,}{r.macs:>14,}{r.fp32_bytes / 1024:>10.1f}")
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    print(f"{'total':<60}{params:>10,}{macs:>14,}{4 * params / 1024:>10.1f}")
    from .algorithms import ptq
    from .config import PTQConfig

    names = ptq.plan_names(ptq.prepare(model, info.input_shape, PTQConfig()))
    print("names a mixed-precision plan can match (weighted layers, then adds / concatenations / pooling):")
    print("  " + " ".join(names))
    return 0


def _config(args):
    from .config import PTQConfig

    config = PTQConfig(w_bits=args.w_bits, a_bits=args.a_bits, granularity=args.granularity, scheme=args.scheme,
                       w_scheme=args.w_scheme,
                       scale=args.scale, calibrator=args.calibrator, fuse=not args.no_fuse,
                       calib_size=args.calib_size, seed=args.seed,
                       algorithms=tuple(a.strip() for a in args.algorithm.split(",") if a.strip()),
                       iters=args.iters, fisher=args.fisher)
    if args.threads < 1:
        raise EdgeslimError(f"invalid --threads {args.threads}: use 1 or more")
    return config


def _data(args, info):
    from .data import Preprocess, open_dataset

    pre = Preprocess(info.input_shape, info.mean, info.std)
    calib, test = open_dataset(args.calib_data, pre, split=args.calib_split), \
        open_dataset(args.data, pre, split=args.data_split)
    import math

    from .data.limits import check_fits

    n = min(args.calib_size, len(calib))  # the calibration images are held in memory at once
    check_fits(n * 4 * math.prod(info.input_shape), f"{n} calibration images of {tuple(info.input_shape)}",
               "lower --calib-size")
    if info.num_classes and len(test.classes) < info.num_classes:  # more classes than the model's: refused later
        print(f"edgeslim: warning: the model predicts {info.num_classes} classes but --data has {len(test.classes)} "
              f"({', '.join(test.classes[:3])}{', ...' if len(test.classes) > 3 else ''}): its labels are read as the "
              f"model's classes 0..{len(test.classes) - 1}; check that this is the data the model was trained for",
              file=sys.stderr)
    if getattr(args, "eval_size", None):
        test = test.subset(args.eval_size, args.seed)
    return calib, test


def _detect_data(args, info):
    """The calibration and test sets letterboxed to the model's size, and the model's detection ``ModelInfo``."""
    from .data.detection import open_detection
    from .models import as_detector

    size = info.input_shape[1]
    calib = open_detection(args.calib_data, args.calib_split, imgsz=size)
    test = open_detection(args.data, args.data_split, imgsz=size)
    if getattr(args, "eval_size", None):
        test = test.subset(args.eval_size, args.seed)
    return calib, test, as_detector(info, args.decoder, test.names, args.channel_order)


def _plan(args, model, info):
    from .config import MixedPlan

    if args.plan and getattr(args, "groups", None):
        raise EdgeslimError("pass either --plan or --groups, not both")
    if getattr(args, "groups", None):
        from .detect_task import group_plan
        from .models import model_groups

        return group_plan(model_groups(model, info), args.groups)
    return MixedPlan.load(args.plan) if args.plan else None


def _formats(args, config) -> tuple[str, ...]:
    """``--formats`` (quantize): checked before any work, including the optional packages TFLite needs."""
    from .export.tflm import check_config, parse_formats, require_tflite

    formats = parse_formats(getattr(args, "formats", "onnx"))
    require_tflite(formats)
    if formats != ("onnx",):
        check_config(config)
    return formats


def _quantize(args) -> int:
    from .analysis import AnalyzeOptions
    from .config import MeasureOptions
    from .jobs import run_quantize

    config = _config(args)
    formats = _formats(args, config)
    model, info = load_model(args)
    plan = _plan(args, model, info)
    analyze = None
    if args.command == "analyze":
        both = not (args.engine or args.overflow)
        analyze = AnalyzeOptions(engine=args.engine or both, overflow=args.overflow or both,
                                 accumulator_bits=args.accumulator, overflow_mode=args.overflow_mode,
                                 requant=args.requant, overflow_images=args.overflow_images)
    task = _task(args, info)
    if formats != ("onnx",):  # what TFLite cannot hold is refused here, before calibration
        from .export.tflm import check_model, check_plan, require_litert

        check_plan(plan)
        check_model(model)
        if task != "classify":
            require_litert()
    if getattr(args, "decoded_output", False) and task != "detect":
        raise EdgeslimError("--decoded-output writes a detector's box decoding into the graph: it needs --task detect "
                            "and a detector edgeslim can decode")
    if task == "fidelity":
        return _quantize_fidelity(args, model, info, config, plan, analyze, formats)
    if task == "detect":
        from .detect_task import DetectOptions
        from .jobs_detect import run_detect_quantize

        calib, test, info = _detect_data(args, info)
        opts = DetectOptions(conf_thres=args.conf_thres, iou_thres=args.iou_thres, cm_conf=args.cm_conf,
                             batch_size=min(args.batch_size, 16), threads=args.threads,
                             simulation_images=_simulate(args, 16), decoded_output=args.decoded_output)
        from .report.provenance import provenance

        summary = run_detect_quantize(model, info, calib, test, config, Path(args.out), plan=plan, opts=opts,
                                      analyze=analyze, formats=formats,
                                      provenance=provenance(args, getattr(args, "argv", None)))
        print_detect_summary(summary, Path(args.out))
        return 0
    calib, test = _data(args, info)
    from .report.provenance import provenance

    summary = run_quantize(model, info, calib, test, config, Path(args.out),
                           MeasureOptions(threads=args.threads, batch_size=args.batch_size,
                                          simulation_images=_simulate(args, 1000), formats=formats), analyze, plan,
                           provenance=provenance(args, getattr(args, "argv", None)))
    print_summary(summary, Path(args.out))
    return 0


FINAL_FORMATS_HELP = ("comma-separated: onnx (always written), tflite (the final INT8 model as model_int8.tflite, "
                      "LiteRT int8), tflm (also model_data.h/.cc, op resolver, arena size)")
DEPLOYED = {"mixed": "model_mixed.onnx", "qat": "model_int8.onnx", "plan": "model_final.onnx"}  # the final model


def _deployable(args) -> tuple[str, ...]:
    """``--formats`` on mixed / qat / plan: the extras and what the final model can be, checked before any work."""
    from .export.tflm import parse_formats, require_litert, require_tflite

    formats = parse_formats(args.formats)
    if getattr(args, "max_ram_kb", None) is not None:  # plan: TFLM's arena of every candidate
        if not str(args.target).startswith("mcu-"):
            raise EdgeslimError(f"--max-ram-kb is the TFLM tensor arena of a microcontroller build: use --target "
                                f"mcu-int8 or mcu-w4 (not {args.target})")
        require_tflite(("tflite", "tflm"))
    if formats == ("onnx",):
        return formats
    require_tflite(formats)
    require_litert()
    what = f"{args.command} --formats {','.join(f for f in formats if f != 'onnx')}"
    if args.command == "mixed":
        from .export.tflm import check_config

        config = _config(args)
        check_config(config)
        high = _high(args, config)
        if high.w.is_float or high.a.is_float or max(high.w.bits, high.a.bits) > 8:
            raise EdgeslimError(f"{what}: --high {high} leaves layers TFLite's int8 kernels cannot run: pass --high "
                                "int8 (with --w-bits / --a-bits below 8 for the other layers)")
    elif args.command == "qat":
        if args.w_bits > 8 or args.a_bits > 8:
            raise EdgeslimError(f"{what} needs --w-bits / --a-bits of 8 or fewer")
    elif getattr(args, "target", None) == "fp16-gpu":
        raise EdgeslimError(f"{what}: the fp16-gpu target ends in FP16, which the int8 TFLite export cannot write: "
                            "use --target mcu-int8 or cpu-int8")
    return formats


def _deploying(command):
    """Run ``command`` (mixed / qat / plan); with ``--formats tflite / tflm``, write its final INT8 model (``DEPLOYED``)
    as ``model_int8.tflite`` (+ TFLM files) into ``--out`` afterwards (``jobs_export``: int8 logits bounded from the
    weights), summary.json's ``tflite`` / ``mcu`` fields updated."""
    def call(args) -> int:
        formats = _deployable(args)
        code = command(args)
        if code != 0 or formats == ("onnx",):
            return code
        from .train.dist import Dist

        if not Dist.from_env().main:
            return code
        model_file = DEPLOYED[args.command]
        if not (Path(args.out) / model_file).is_file():
            raise EdgeslimError(f"--formats {args.formats}: the run wrote no {model_file} (see summary.json), so there "
                                "is no INT8 model to write as .tflite")
        from .jobs_export import run_export

        try:
            _tflite_line(run_export(Path(args.out), formats, model_file=model_file, calib=_range_inputs(args)))
        except EdgeslimError as exc:
            raise EdgeslimError(f"{args.command} finished ({args.out} holds its results), but its {model_file} was not "
                                f"written as TFLite: {exc}") from None
        return code
    return call


def _range_inputs(args, n: int = 256):
    """Up to ``n`` of the command's calibration (``--calib-data``) or training (``--train-data``) inputs, preprocessed
    as the run did, whose float logits set the int8 range of the exported final model (classify, fidelity); None
    (the range is then bounded from the weights) for detectors or when they cannot be read."""
    from .data import calibration_indices

    try:
        model, info = load_model(args)
        source = "calib_data" if getattr(args, "calib_data", None) else "train_data"
        task = _qat_task(args, info) if args.command == "qat" else \
            (_task(args, info) if hasattr(args, "task") else "classify")
        if task == "fidelity":
            return _fidelity_inputs(args, model, info, calib_limit=n, source=source)[0]
        if task != "classify":
            return None
        from .data import Preprocess, open_dataset

        ds = open_dataset(getattr(args, source), Preprocess(info.input_shape, info.mean, info.std),
                          split=getattr(args, source.replace("_data", "_split"), None))
        return ds.batch(calibration_indices(len(ds), min(n, len(ds)), getattr(args, "seed", 0), ds.labels))
    except EdgeslimError:
        return None


def _export(args) -> int:
    from .export.tflm import parse_formats, require_tflite
    from .jobs_export import run_export

    formats = parse_formats(args.format)
    require_tflite(formats)
    s = run_export(Path(args.run_dir), formats, io=args.io)
    _tflite_line(s)
    e = s["tflite"].get("engine_vs_runtimes")
    if e:
        print("engine (tflite mode) vs " + ", ".join(
            f"{k} {min(r['identical_share'] for r in e[k].values()):.2%}" for k in ("litert_reference", "litert_xnnpack",
                                                                                   "tflm"))
            + f" identical outputs ({e['images']} random inputs); int8 logits range "
            + s["tflite"]["logits_range"])
    print(f"wrote {args.run_dir}/model_int8.tflite" + (", model_data.h, model_data.cc, op_resolver.txt"
                                                       if "mcu" in s else "") + ", summary.json (tflite / mcu)")
    return 0


def _task(args, info) -> str:
    """The task ``--task auto`` stands for: detect for detectors, classify for labelled data, else fidelity."""
    from .data.inputs import has_labels

    if args.task != "auto":
        return args.task
    if info.task == "detect":
        return "detect"
    return "classify" if has_labels(args.data) and has_labels(args.calib_data) else "fidelity"


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EdgeslimError(f"invalid {what} {text!r}: pass comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def input_spec(args, info):
    """The preprocessing of image data: options first, then the ONNX file's metadata, then the model's own."""
    import json

    from .data.inputs import InputSpec

    meta = (getattr(args, "_model_meta", None) or {}).get("edgeslim.preprocessing")
    stored = {}
    if meta:
        try:
            stored = {k: v for k, v in json.loads(meta).items() if k in ("size", "channel_order", "mean", "std", "resize")}
        except (ValueError, AttributeError):
            stored = {}
    c = info.input_shape[0]
    if c not in (1, 3):
        raise EdgeslimError(f"the model's input is {tuple(info.input_shape)}, not C,H,W with 1 or 3 channels, so images "
                            "cannot be fed to it: pass its inputs as arrays (np.savez('x.npz', x=inputs))")
    size = _floats(args.input_size, "--input-size")
    if size is not None and (len(size) != 2 or any(v != int(v) for v in size)):
        raise EdgeslimError(f"invalid --input-size {args.input_size!r}: pass H,W, e.g. 224,224")
    size = tuple(int(v) for v in size) if size else tuple(stored.get("size", info.input_shape[1:]))
    if size != tuple(info.input_shape[1:]):
        raise EdgeslimError(f"--input-size {size[0]},{size[1]} differs from the model's input {info.input_shape[1]},"
                            f"{info.input_shape[2]}: pass the model's size (or --input-shape for models that take others)")
    order = args.channel_order or stored.get("channel_order") or ("GRAY" if c == 1 else info.channel_order)
    if (order.upper() == "GRAY") != (c == 1):
        raise EdgeslimError(f"--channel-order {order} does not fit a model input of {c} channel(s): pass "
                            + ("GRAY" if c == 1 else "RGB or BGR"))
    mean = _floats(args.mean, "--mean") or tuple(stored.get("mean", info.mean))
    std = _floats(args.std, "--std") or tuple(stored.get("std", info.std))
    return InputSpec(size=size, channel_order=order, mean=mean, std=std, resize=args.resize or stored.get("resize", "stretch"))


def _quantize_fidelity(args, model, info, config, plan, analyze=None, formats=("onnx",)) -> int:
    from .jobs_fidelity import FidelityOptions, run_fidelity_quantize
    from .report.provenance import provenance

    calib, test, spec = _fidelity_inputs(args, model, info, calib_limit=args.calib_size)
    s = run_fidelity_quantize(model, info, calib, test, config, Path(args.out), spec=spec,
                              opts=FidelityOptions(threads=args.threads, batch_size=min(args.batch_size, 64)),
                              plan=plan, analyze=analyze, formats=formats,
                              provenance=provenance(args, getattr(args, "argv", None)))
    print_fidelity_summary(s, Path(args.out))
    return 0


def print_fidelity_summary(s: dict, out: Path) -> None:
    from .report.provenance import preprocessing_line

    o = s["onnx_int8"]
    if "preprocessing" in s:
        print(preprocessing_line(s["preprocessing"]))
    print(f"\n{s['model']}: INT8 vs FP32 on {s['inputs']['test']} inputs (calibrated on {s['inputs']['calibration']}), "
          "both in onnxruntime")
    print(f"{'output':<28}{'shape':<18}{'SQNR dB':>9}{'cosine':>9}{'max err':>11}{'LSB':>7}{'top-1 agr':>10}")
    for name, r in o["fidelity_vs_fp32"].items():
        db = "exact" if r["identical"] else f"{r['sqnr_db']:.1f}"
        lsb = f"{r['max_error_lsb']:.1f}" if "max_error_lsb" in r else "-"
        agr = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
        print(f"{name[:27]:<28}{str(tuple(r['shape'])):<18}{db:>9}{r['cosine']:>9.5f}{r['max_abs_error']:>11.4g}"
              f"{lsb:>7}{agr:>10}")
    lat = s["latency_ms"]
    print(f"integer convs in onnxruntime: {o['integer_convs']}/{o['total_convs']}; ONNX {s['size_bytes']['fp32'] / 1024:.1f}"
          f" -> {s['size_bytes']['int8'] / 1024:.1f} KiB; INT8/FP32 latency {lat['int8_over_fp32']:.2f}x (batch 1, "
          f"{lat['threads']} thread(s)); quantized in {s['time_to_quantize_s']:.1f} s")
    _float_line(o.get("float_ops_profile"))
    if o["float_islands"]:
        ops = sorted({i["fn"] for i in o["float_islands"]})
        print(f"float islands ({len(o['float_islands'])} ops run in FP32 between integer tensors): {', '.join(ops)}")
    if "engine_vs_onnx" in s:
        worst = max((r.get("max_diff_steps", 0.0) for r in s["engine_vs_onnx"].values()), default=0.0)
        print(f"integer engine vs onnxruntime: at most {worst:.0f} output step(s) apart; engine SQNR vs FP32 "
              + ", ".join(f"{k} {'exact' if r['identical'] else format(r['sqnr_db'], '.1f')}"
                          for k, r in s["engine"]["fidelity_vs_fp32"].items()))
    if "overflow" in s and s["overflow"]["layers"]:
        worst = max(s["overflow"]["layers"], key=lambda r: r["sum_int16"]["max"])
        print(f"overflow ({s['overflow']['images']} inputs): worst INT16 sum overflow {worst['sum_int16']['max']:.2%} "
              f"of pixels in a filter of {worst['name']}")
    _tflite_line(s)
    print(f"wrote {out}/summary.json, model_fp32.onnx, model_int8.onnx, encodings.json, report.html")


def _simulate(args, default: int) -> int | None:
    n = getattr(args, "simulate_size", None)
    if n is None:
        return default
    if n < 0:
        raise EdgeslimError(f"invalid --simulate-size {n}: use 0 (all images) or a positive number")
    return n or None


def _high(args, config):
    from .quant.precision import LayerPrecision

    if args.high:
        return LayerPrecision.parse(args.high)
    return LayerPrecision.parse("int8" if min(config.w_bits, config.a_bits) < 8 else "fp32")


def _plan_task(args, model, info):
    """The task object that scores plans for ``sensitivity`` / ``mixed`` (classify or fidelity)."""
    from .tasks import Classify, Fidelity

    task = _task(args, info)
    if task == "classify":
        calib, test = _data(args, info)
        return Classify(calib, test, batch_size=args.batch_size)
    calib, test, _ = _fidelity_inputs(args, model, info)
    fixed_batch = (getattr(model, "meta", {}) or {}).get("onnx_dynamic_batch") is False
    return Fidelity(calib, test, batch_size=1 if fixed_batch else min(args.batch_size, 64), seed=args.seed)


def _fidelity_inputs(args, model, info, calib_limit: int | None = None, source: str = "calib_data"):
    """Model inputs for the label-free task: arrays as they are, images through the preprocessing options.
    ``source``: the option holding the first set (``calib_data``, or ``train_data`` for ``qat``)."""
    from .data.inputs import open_inputs

    args._model_meta = (getattr(model, "meta", {}) or {}).get("onnx_metadata")
    first = getattr(args, source)
    uses_images = any(not str(p).lower().endswith((".npz", ".npy")) for p in (first, args.data))
    given = any(getattr(args, k, None) is not None for k in ("mean", "std", "channel_order", "input_size", "resize"))
    spec = input_spec(args, info) if uses_images or given else None  # arrays are model inputs as they are
    calib = open_inputs(first, info.input_shape, spec, limit=calib_limit, seed=args.seed)
    test = open_inputs(args.data, info.input_shape, spec, limit=args.eval_size, seed=args.seed)
    return calib, test, spec


def _fmt_score(v, key: str) -> str:
    if v is None:
        return "exact"
    return f"{v:.2f}" if key == "sqnr_db" else f"{v:.4f}"


def _row_printer(key: str):
    """Print each sensitivity row as soon as it is scored (above the progress bars)."""
    from tqdm import tqdm

    def show(sweep: str, row: dict) -> None:
        r = row[sweep]
        delta = "-" if r["delta"] is None else (f"{r['delta']:+.2f}" if key == "sqnr_db" else f"{r['delta']:+.4f}")
        what = "kept high" if sweep == "keep_high" else "only quantized"
        tqdm.write(f"  {row['name']:<28}{what:<16}{_fmt_score(r['score'], key):>10}{delta:>9}")
    return show


def _step_printer(key: str):
    """Print each step of the mixed-precision search as soon as it is scored."""
    from tqdm import tqdm

    def show(c) -> None:
        tqdm.write(f"  {c.label[:34]:<36}{_fmt_score(c.score, key):>10}{c.size_bytes / 1024:>9.1f} KiB"
                   f"  {'kept' if c.accepted else 'not kept'}")
    return show


def _sensitivity(args) -> int:
    from .algorithms.mixed_precision import parse_group
    from .config import MeasureOptions
    from .jobs_mixed import run_sensitivity
    from .report.mixed_html import metric_label

    config = _config(args)
    high = _high(args, config)
    groups = dict(parse_group(g) for g in args.group) or None
    model, info = load_model(args)
    if _task(args, info) == "detect":
        return _detect_sensitivity(args, model, info, config, high, groups)
    task = _plan_task(args, model, info)
    s = run_sensitivity(model, info, task, config, Path(args.out), high=high, holdout_size=args.holdout_size,
                        groups=groups, group_table=not args.no_groups, holdout_from=args.holdout_from,
                        measure=MeasureOptions(threads=args.threads, batch_size=args.batch_size),
                        score_with=args.score_with, on_row=_row_printer(task.metric_key))
    sens, key = s["sensitivity"], task.metric_key
    label = metric_label(sens["metric"])
    print(f"\n{label}: FP32 {_fmt_score(sens['fp32_score'], key)}, uniform {sens['low']} "
          f"{_fmt_score(sens['uniform']['score'], key)} on {sens['images']} held-out inputs; sweeps took "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sens["seconds"].items()))
    print(f"{'op':<24}{'keep ' + str(sens['high']):>16}{'gain':>8}{'only ' + str(sens['low']):>16}{'change':>8}")
    for r in sens["rows"]:
        kh, oq = r.get("keep_high"), r.get("only_quantized")
        delta = (lambda d: "-" if d is None else f"{d:+.4f}" if key != "sqnr_db" else f"{d:+.2f}")
        print(f"{r['name']:<24}{_fmt_score(kh['score'], key):>16}{delta(kh['delta']):>8}"
              f"{_fmt_score(oq['score'], key):>16}{delta(oq['delta']):>8}")
    if "groups" in s:
        g = s["groups"]
        print(f"\ngroups ({', '.join(g['groups'])}) at {g['high']} / {g['low']}: {len(g['rows'])} combinations")
        for r in g["rows"]:
            prec = ",".join(r["precision"][n] for n in g["groups"])
            print(f"  {prec:<40} {label} {_fmt_score(r['score'], key)}  {r['weight_bytes'] / 1024:8.1f} KiB  "
                  f"{r['latency_ms']:.3f} ms ({r['latency_over_fp32']:.2f}x FP32)")
    print(f"wrote {args.out}/summary.json, report.html")
    return 0


def _detect_row_printer():
    from tqdm import tqdm

    def show(r: dict) -> None:
        tqdm.write(f"  {r['name']:<32} kept high: mAP@.5 {r['map50']:.4f} ({r['delta_map50']:+.4f}), "
                   f"@.5:.95 {r['map50_95']:.4f} ({r['delta_map50_95']:+.4f})")
    return show


def _detect_sensitivity(args, model, info, config, high, groups) -> int:
    from .detect_task import DetectOptions
    from .jobs_detect import run_detect_sensitivity
    from .models import model_groups

    calib, test, info = _detect_data(args, info)
    opts = DetectOptions(conf_thres=args.conf_thres, iou_thres=args.iou_thres, cm_conf=args.cm_conf,
                         batch_size=min(args.batch_size, 16), threads=args.threads)
    s = run_detect_sensitivity(model, info, calib, test, config, Path(args.out),
                               groups=groups or model_groups(model, info), high=high,
                               group_table=not args.no_groups, opts=opts, on_row=_detect_row_printer())
    print(f"\nFP32 mAP@.5 {s['fp32']['map50']:.4f} (@.5:.95 {s['fp32']['map50_95']:.4f}); all {s['low']} "
          f"{s['uniform']['map50']:.4f} ({s['uniform']['map50_95']:.4f}) on {s['images']['test']} images")
    print(f"{'layer kept ' + s['high']:<34}{'mAP@.5':>8}{'gain':>8}{'mAP@.5:.95':>12}{'gain':>8}")
    for r in s.get("layers", []):
        print(f"{r['name']:<34}{r['map50']:>8.4f}{r['delta_map50']:>+8.4f}{r['map50_95']:>12.4f}{r['delta_map50_95']:>+8.4f}")
    for r in s.get("groups", {}).get("rows", []):
        prec = ",".join(f"{g}={p}" for g, p in r["precisions"].items())
        print(f"  {prec:<48} mAP@.5 {r['map50']:.4f}  {r['weight_bytes'] / 1024:8.1f} KiB  {r['latency_ms']:.1f} ms "
              f"({r['latency_over_fp32']:.2f}x FP32)")
    print(f"wrote {args.out}/summary.json")
    return 0


def _budget(args, task: str):
    """``mixed``'s budget in the task's units, refusing the old fraction spelling of --max-drop."""
    from .algorithms.mixed_precision import Budget

    if args.max_drop is not None and 0 < args.max_drop < 0.05:
        raise EdgeslimError(f"--max-drop {args.max_drop:g} is read as points (0.5 = half a point), so this allows "
                            f"{args.max_drop:g} points; it looks like the old fraction spelling: pass "
                            f"{args.max_drop * 100:g} for {args.max_drop * 100:g} points")
    if task == "fidelity" and args.max_drop is not None:
        raise EdgeslimError("without labels the plan is scored by its SQNR against the FP32 model, whose own SQNR is "
                            "infinite: give the floor with --min-sqnr DB (e.g. 30) instead of --max-drop")
    if task != "fidelity" and args.min_sqnr is not None:
        raise EdgeslimError(f"--min-sqnr is the label-free budget; the {task} task takes --max-drop (points)")
    return Budget(args.max_drop, None if args.max_size_kb is None else int(args.max_size_kb * 1024),
                  args.max_latency_ms, args.min_sqnr)


def _mixed(args) -> int:
    from .config import MeasureOptions
    from .jobs_mixed import run_mixed

    config = _config(args)
    high = _high(args, config)
    model, info = load_model(args)
    task_name = _task(args, info)
    budget = _budget(args, task_name)
    if task_name == "detect":
        from .detect_task import DetectOptions
        from .jobs_detect import run_detect_mixed

        calib, test, info = _detect_data(args, info)
        opts = DetectOptions(conf_thres=args.conf_thres, iou_thres=args.iou_thres, cm_conf=args.cm_conf,
                             batch_size=min(args.batch_size, 16), threads=args.threads)
        s = run_detect_mixed(model, info, calib, test, config, Path(args.out), budget=budget, high=high, opts=opts)
        print(f"\nmAP@0.5:0.95 FP32 {s['fp32']['map50_95']:.4f}, all {s['low']} {s['uniform']['map50_95']:.4f}, mixed "
              f"{s['mixed']['map50_95']:.4f} ({len(s['high_precision_layers'])} layers at {s['high']}: "
              f"{', '.join(s['high_precision_layers']) or 'none'})")
        print(f"{'met' if s['met'] else 'NOT met'}: {s['reason']} (scored on --data)")
        print(f"wrote {args.out}/summary.json, plan.json, model_mixed.onnx")
        return 0
    task = _plan_task(args, model, info)
    s = run_mixed(model, info, task, config, Path(args.out), budget=budget, high=high,
                  holdout_size=args.holdout_size, holdout_from=args.holdout_from,
                  measure=MeasureOptions(threads=args.threads, batch_size=args.batch_size,
                                         simulation_images=_simulate(args, 1000)), score_with=args.score_with,
                  on_step=_step_printer(task.metric_key))
    print_mixed_summary(s, Path(args.out))
    return 0


def print_mixed_summary(s: dict, out: Path) -> None:
    from .report.mixed_html import metric_label

    m, key = s["mixed"], s["metric"]["key"]
    label = metric_label(s["metric"])
    n_sim, n_test = s["images"].get("simulation", s["images"]["test"]), s["images"]["test"]
    print(f"\nONNX: the files in onnxruntime on {n_test} test inputs; PyTorch: the simulation on {n_sim} of them")
    print(f"\n{'':<22}{'PyTorch ' + label:>16}{'ONNX ' + label:>13}{'KiB':>9}{'ms b1':>9}")
    for name, row, onnx in (("FP32", s["fp32"], s["fp32"]["onnx_score"]),
                            ("uniform " + s["low"], s["uniform"], s["uniform"]["onnx_score"]),
                            ("mixed", m, s["onnx_mixed"]["score"])):
        ms = row["latency_ms"] if name == "FP32" else row["latency_ms"]["batch1"]
        print(f"{name:<22}{_fmt_score(row['score'], key):>16}{_fmt_score(onnx, key):>13}"
              f"{row['size_bytes'] / 1024:>9.1f}{ms:>9.3f}")
    print(f"{'met' if s['met'] else 'NOT met'} on the {s['images']['holdout']} held-out inputs "
          f"(from --{'calib-data' if s['images']['holdout_from'] == 'calib' else 'data'}): {s['reason']}")
    b = s["budget"]
    if b["max_drop"] is not None or b["min_score"] is not None:
        per_unit, unit = s["metric"]["per_unit"], s["metric"]["unit"]
        fp32, mixed = s["fp32"]["onnx_score"], s["onnx_mixed"]["score"]
        have = (f"drop {(fp32 - mixed) * per_unit:.2f} {unit} (budget {b['max_drop']:.2f})"
                if b["max_drop"] is not None else f"{label} {_fmt_score(mixed, key)} (floor {b['min_score']:.2f})")
        print(f"on the {n_test} test inputs (ONNX): {have}: " + ("within budget" if s["met_on_test"] else
              "OVER budget (the held-out inputs are few or unlike the test data: raise --holdout-size, or "
              "--holdout-from data when --calib-data is the training set)"))
    print(f"high precision ({s['high']}): {', '.join(m['high_precision_layers']) or 'none'} = "
          f"{m['high_precision_mac_fraction']:.1%} of MACs")
    print(f"wrote {out}/summary.json, plan.json, model_mixed.onnx, report.html")


def _qat(args) -> int:
    import torch

    from .algorithms.qat import QATConfig
    from .config import PTQConfig
    from .data import Preprocess, open_dataset
    from .jobs_qat import run_qat
    from .train.dist import Dist

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise EdgeslimError(f"invalid --torch-threads {args.torch_threads}: use 1 or more")
        torch.set_num_threads(args.torch_threads)
    epochs = args.epochs if args.epochs is not None else (None if args.max_steps else 1)
    cfg = QATConfig(w_bits=args.w_bits, a_bits=args.a_bits, quantizer=args.quantizer, a_quantizer=args.a_quantizer,
                    method=args.method, epochs=epochs, max_steps=args.max_steps, lr=args.lr,
                    batch_size=args.batch_size, weight_decay=args.weight_decay, kd=args.kd,
                    kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, augment=not args.no_augment,
                    seed=args.seed)
    ptq_config = PTQConfig(w_bits=args.w_bits, a_bits=args.a_bits, granularity=args.granularity,
                           calibrator=args.calibrator, calib_size=args.calib_size, seed=args.seed,
                           algorithms=tuple(a.strip() for a in args.algorithm.split(",") if a.strip()),
                           iters=args.iters)
    for name in ("train_size", "val_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v}: use a positive number of images")
    from .config import MixedPlan

    plan = MixedPlan.load(args.plan) if args.plan else None
    model, info = load_model(args)
    task = _qat_task(args, info)
    if task == "detect":
        return _qat_detect(args, model, info, cfg, ptq_config, plan)
    if task == "fidelity":
        return _qat_fidelity(args, model, info, cfg, ptq_config, plan)
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(args.train_data, pre, split=args.train_split)
    test = open_dataset(args.data, pre, split=args.data_split)
    if args.eval_size:
        test = test.subset(args.eval_size, args.seed)
    dist = Dist.from_env()
    try:
        s = run_qat(model, info, train, test, cfg, ptq_config, Path(args.out), resume=args.resume,
                    train_size=args.train_size, val_size=args.val_size, plan=plan, dist=dist,
                    checkpoint_every=args.checkpoint_every)
    finally:
        if dist.world > 1:
            import torch.distributed as td

            td.destroy_process_group()
    if dist.main:
        print(f"wrote {args.out}/summary.json, checkpoint.pt, qat_model.pt, encodings.json"
              + (", model_int8.onnx, model_fp32.onnx" if "top1" in s.get("onnx", {}) else ""))
    return 0


def _qat_task(args, info) -> str:
    """``qat --task auto``: detect for detectors, classify when both data sets are labelled, else fidelity."""
    from .data.inputs import has_labels

    if args.task != "auto":
        return args.task
    if info.task == "detect":
        return "detect"
    return "classify" if has_labels(args.train_data) and has_labels(args.data) else "fidelity"


def _qat_fidelity(args, model, info, cfg, ptq_config, plan) -> int:
    from .jobs_fidelity_qat import run_fidelity_qat
    from .train.dist import Dist

    if Dist.from_env().world > 1:
        raise EdgeslimError("qat --task fidelity runs in one process: run it without torchrun")
    if cfg.method == "ewgs":
        raise EdgeslimError("qat --task fidelity distils the FP32 model's outputs; EWGS's Hessian estimate needs the "
                            "classification loss: use --method lsq, ste, dsq or daq")
    train, test, spec = _fidelity_inputs(args, model, info, calib_limit=args.train_size, source="train_data")
    s = run_fidelity_qat(model, info, train, test, cfg, ptq_config, Path(args.out), plan=plan,
                         batch_size=min(args.batch_size, 64), resume=args.resume,
                         checkpoint_every=args.checkpoint_every, spec=spec.to_dict() if spec is not None else None)
    print(f"\nworst-output SQNR vs FP32 on {s['inputs']['test']} inputs: PTQ {s['ptq']['sqnr_db']:.2f} dB, "
          f"QAT {s['qat']['sqnr_db']:.2f} dB (PyTorch)")
    if "fidelity_vs_fp32" in s.get("onnx_int8", {}):
        print(f"INT8 ONNX vs FP32 ONNX in onnxruntime: {s['onnx_int8']['headline_sqnr_db']:.2f} dB; integer convs "
              f"{s['onnx_int8']['integer_convs']}/{s['onnx_int8']['total_convs']}")
        print(f"wrote {args.out}/summary.json, model_int8.onnx, model_fp32.onnx, qat_model.pt, encodings.json")
    else:
        print(f"wrote {args.out}/summary.json (not exported: {s['onnx_int8']['reason']})")
    return 0


def _qat_detect(args, model, info, cfg, ptq_config, plan) -> int:
    from .data.detection import open_detection
    from .train.dist import Dist
    from .detect_task import DetectOptions
    from .jobs_detect_qat import run_detect_qat
    from .models import as_detector

    if Dist.from_env().world > 1:
        raise EdgeslimError("qat --task detect runs in one process: run it without torchrun")
    size = info.input_shape[1]
    train = open_detection(args.train_data, args.train_split, imgsz=size)
    test = open_detection(args.data, args.data_split, imgsz=size)
    if args.eval_size:
        test = test.subset(args.eval_size, args.seed)
    info = as_detector(info, args.decoder, test.names, args.channel_order)
    s = run_detect_qat(model, info, train, test, cfg, ptq_config, Path(args.out), plan=plan,
                       train_size=args.train_size, opts=DetectOptions(batch_size=min(args.batch_size, 16), threads=args.threads),
                       resume=args.resume, checkpoint_every=args.checkpoint_every)
    for k in ("fp32", "ptq", "qat", "onnx_int8"):
        if "map50" in s.get(k, {}):
            print(f"{k:<10} mAP@.5 {s[k]['map50']:.4f}  mAP@.5:.95 {s[k]['map50_95']:.4f}")
    print(f"wrote {args.out}/summary.json" + (", model_int8.onnx, model_fp32.onnx" if "map50" in s.get("onnx_int8", {})
                                                else f" (not exported: {s['onnx_int8']['reason']})"))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), epochs=args.epochs, threads=args.threads)
    print_summary(summary, Path(args.out))
    return 0


def _float_line(profile: dict | None) -> None:
    """One line on what keeps the INT8 model from running all-integer in onnxruntime."""
    if not profile:
        return
    share = profile["time_share"]
    ops = ", ".join(f"{op} {t:.0%}" for op, t in list(profile["float_time_by_op"].items())[:5])
    print(f"onnxruntime kernel time: integer {share['integer']:.0%}, float {share['float']:.0%}"
          + (f" ({ops})" if ops else "") + f", Q/DQ {share['qdq']:.0%}, data movement {share['movement']:.0%}")


def print_summary(s: dict, out: Path) -> None:
    from .report.provenance import preprocessing_line

    lat = s["latency_ms"]
    if "preprocessing" in s:
        print(preprocessing_line(s["preprocessing"]))
    b = next(iter(lat["fp32"]))
    print(f"\n{'':<26}{'top-1':>8}{'flips':>8}{'ONNX KiB':>10}{f'ms ({b})':>12}")
    print(f"{'FP32':<26}{s['fp32']['top1']:>8.4f}{'':>8}{s['size_bytes']['fp32'] / 1024:>10.1f}{lat['fp32'][b]:>12.3f}")
    label = f"fake-quant ({s['quantized'].get('images', '')} img)" if "images" in s["quantized"] else "fake-quant (PyTorch)"
    print(f"{label:<26}{s['quantized']['top1']:>8.4f}{s['quantized']['flips_vs_fp32']:>8}")
    print(f"{'INT8 ONNX (onnxruntime)':<26}{s['onnx_int8']['top1']:>8.4f}{s['onnx_int8']['flips_vs_fp32']:>8}"
          f"{s['size_bytes']['int8'] / 1024:>10.1f}{lat['int8'][b]:>12.3f}")
    print(f"integer convs in onnxruntime: {s['onnx_int8']['integer_convs']}/{s['onnx_int8']['total_convs']}; "
          f"quantized in {s['time_to_quantize_s']:.2f} s; INT8/FP32 latency "
          + ", ".join(f"{k} {v:.2f}x" for k, v in lat["int8_over_fp32"].items()))
    _float_line(s["onnx_int8"].get("float_ops_profile"))
    if s["onnx_int8"].get("weight_containers", {}).get("uint8"):
        print(f"note: {s['onnx_int8']['weight_containers']['uint8']} layers store uint8 weights: onnxruntime's int8-weight "
              "kernels saturate on this CPU (AVX2 without VNNI); uint8 is exact but not faster. --w-bits 7 keeps int8 "
              "weights exactly (the fast kernel); an export for an ARM / VNNI target keeps int8 (docs/design.md)")
    if "engine" in s:
        e = s["engine_vs_onnx"]
        print(f"integer engine top-1 {s['engine']['top1']:.4f}; vs onnxruntime: {e['mismatch_fraction']:.2%} of output "
              f"elements differ, at most {e['max_abs_diff']:.0f} LSB")
    if "overflow" in s:
        worst = max(s["overflow"]["layers"], key=lambda r: r["sum_int16"]["max"])
        print(f"overflow ({s['overflow']['images']} images): worst INT16 sum overflow {worst['sum_int16']['max']:.2%} "
              f"of pixels in a filter of {worst['name']}; see report.html")
    _tflite_line(s)
    print(f"wrote {out}/summary.json, report.html, model_fp32.onnx, model_int8.onnx, encodings.json")


def _tflite_line(s: dict) -> None:
    """``--formats tflite / tflm``: the .tflite's score in LiteRT (top-1, mAP or worst SQNR), size, float ops, arena."""
    if "tflite" not in s:
        return
    t, mcu = s["tflite"], s.get("mcu")
    score = ""
    if t.get("top1") is not None:
        score = f"top-1 {t['top1']:.4f} in LiteRT, "
    elif "map50" in t:
        score = f"mAP@.5 {t['map50']:.4f}, mAP@.5:.95 {t['map50_95']:.4f} in LiteRT, "
    elif t.get("fidelity_vs_fp32"):
        from .eval.fidelity import headline_db

        db = headline_db(t["fidelity_vs_fp32"])
        score = f"worst SQNR vs FP32 {'exact' if db is None else format(db, '.1f') + ' dB'} in LiteRT, "
    print(f"model_int8.tflite: {score}{t['size_bytes'] / 1024:.1f} KiB, float ops: {', '.join(t['float_ops']) or 'none'}"
          + (f"; TFLM arena {mcu['ram_bytes'] / 1024:.1f} KiB (model_data.h / .cc, op_resolver.txt)" if mcu else ""))


def print_detect_summary(s: dict, out: Path) -> None:
    from .report.provenance import preprocessing_line

    lat = s["latency_ms"]
    if "preprocessing" in s:
        print(preprocessing_line(s["preprocessing"]))
    print(f"\n{s['model']} on {s['images']['test']} images ({s['images']['test_boxes']} boxes) at {s['images']['imgsz']}")
    print(f"{'':<26}{'mAP@.5':>8}{'mAP@.5:.95':>12}{'P':>7}{'R':>7}{'F1':>7}{'ONNX KiB':>10}{'ms':>9}{'FPS':>7}")
    n_sim = s["quantized"].get("images", s["images"]["test"])
    rows = [(f"FP32 (PyTorch, {n_sim} img)", "fp32", None), (f"fake-quant ({n_sim} img)", "quantized", None),
            ("FP32 ONNX", "onnx_fp32", "fp32"), ("INT8 ONNX (onnxruntime)", "onnx_int8", "int8")]
    if "engine" in s:
        rows.append(("integer engine", "engine", None))
    for label, key, size in rows:
        r = s[key]
        extra = (f"{s['size_bytes'][size] / 1024:>10.1f}{lat[size]:>9.2f}{lat['fps_' + size]:>7.1f}" if size else "")
        print(f"{label:<26}{r['map50']:>8.4f}{r['map50_95']:>12.4f}{r['precision']:>7.3f}{r['recall']:>7.3f}"
              f"{r['f1']:>7.3f}{extra}")
    g = s["onnx_int8_graph"]
    print(f"integer convs in onnxruntime: {g['integer_convs']}/{g['total_convs']}; INT8/FP32 latency "
          f"{lat['int8_over_fp32']:.2f}x (batch 1, {lat['threads']} thread(s)); quantized in {s['time_to_quantize_s']:.1f} s")
    _float_line(g.get("float_ops_profile"))
    if "overflow" in s:
        worst = max(s["overflow"]["layers"], key=lambda r: r["sum_int16"]["max"])
        print(f"overflow ({s['overflow']['images']} images): worst INT16 sum overflow {worst['sum_int16']['max']:.2%} "
              f"of pixels in a filter of {worst['name']}")
    if "decoded_output" in s:
        d = s["decoded_output"]
        print(f"decoded-output files ({d['output']} {d['shape']}): mAP@.5 FP32 {d['fp32']['map50']:.4f}, INT8 "
              f"{d['int8']['map50']:.4f} (NMS only after the graph)")
    _tflite_line(s)
    print(f"wrote {out}/summary.json, report.html, model_fp32.onnx, model_int8.onnx, encodings.json")
    if "decoded_output" in s:
        print(f"      {', '.join(s['decoded_output']['files'].values())}")


if __name__ == "__main__":
    sys.exit(main())

"""The argument groups commands share: the model, data, quantization, preprocessing, detection, QAT, mixed-precision
and fine-tuning options, ``--threads`` and ``--out``; and the help formatter every command's parser uses.

A command module adds its own options after the groups it takes; the order of ``add_argument`` calls is the order of
``--help``."""

from __future__ import annotations

import argparse

from .tasks import CLI_TASKS

__all__ = ["THREADS_HELP", "FINAL_FORMATS_HELP", "HelpFormatter", "model_args", "threads_arg", "out_arg",
           "quant_args", "weight_range_arg", "preprocess_args", "qat_args", "mixed_args", "finetune_args"]

# one meaning of --threads in every command
THREADS_HELP = ("onnxruntime threads of the timed latency runs (FP32 vs INT8); accuracy scoring uses all cores")

# --formats of the commands whose final model can also be written as TFLite (mixed, qat, plan)
FINAL_FORMATS_HELP = ("comma-separated: onnx (always written), tflite (the final INT8 model as model_int8.tflite, "
                      "LiteRT int8), tflm (also model_data.h/.cc, op resolver, arena size)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` where there is a default to show: not for options without one (None / False) and not
    where the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or action.required:
            return text
        return super()._get_help_string(action)


def model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and how to load it: --weights, --allow-pickle, --input-shape, --random-init (``common.load_model``)."""
    p.add_argument("model", help="one of: a zoo name (resnet20/32/44/56, resnet18, resnet50, mobilenet_v2, digits_cnn, "
                   "yolov5n, fastestdet, ...); package.module:factory or path/to/file.py:factory (a function or class "
                   "building the nn.Module; needs --input-shape); a float model.onnx file")
    p.add_argument("--weights", help="checkpoint: a state_dict or {'state_dict': ...} file (torch.save)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a checkpoint that needs full unpickling (only for files you trust)")
    p.add_argument("--input-shape", help="C,H,W for user models or to override the zoo's size")
    p.add_argument("--random-init", action="store_true",
                   help="allow a zoo model without --weights (random weights: accuracy at chance; for trying the tool)")


def threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")


def weight_range_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-range", default="auto", choices=("auto", "full", "reduced"),
                   help="8-bit weights on the full 8-bit grid or the 7-bit one (reduced: what onnxruntime's fast int8 "
                   "kernels compute exactly on x86 CPUs with AVX2 and no VNNI). auto (default): reduced on such a "
                   "CPU, full elsewhere; say full when the file is for ARM, a VNNI CPU, an NPU or a microcontroller")


def quant_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that calibrates on ``--calib-data`` and scores on ``--data`` (quantize, analyze,
    sensitivity, mixed): data, PTQ, measurement, ``--out``, the task, preprocessing and the detection options."""
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
    weight_range_arg(p)
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
    threads_arg(p)
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--simulate-size", type=int, default=None,
                   help="score the PyTorch FP32 and fake-quant models on a subset of this many test images (the ONNX "
                   "files are scored on all of them, in onnxruntime); 0 = all (default: 1000 classify, 16 detect)")
    out_arg(p)
    p.add_argument("--task", default="auto", choices=("auto", *CLI_TASKS),
                   help="classify (labelled images: top-1), detect (YOLO-format data: mAP, confusion matrix; see "
                   "--groups), fidelity (no labels: INT8 vs FP32 per output, SQNR / cosine / LSB) or auto "
                   "(default: detect for detectors, classify when the data has labels, else fidelity)")
    preprocess_args(p)
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


def preprocess_args(p: argparse.ArgumentParser, channel_order: bool = True) -> None:
    """How images become model inputs for the fidelity task (read by ``common.input_spec``)."""
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


def qat_args(p: argparse.ArgumentParser) -> None:
    """``qat``: the model, training and test data, the QAT and PTQ-start options, checkpoints and the task."""
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
    threads_arg(p)
    p.add_argument("--torch-threads", type=int, help="PyTorch threads per process for training (default: PyTorch's "
                   "choice)")
    out_arg(p)
    p.add_argument("--task", default="auto", choices=("auto", *CLI_TASKS),
                   help="classify (labelled images: labels + optional --kd), detect (YOLO-format --train-data / --data; "
                   "the loss is distillation of the FP32 model's head outputs, no labels, mAP scored every epoch), "
                   "fidelity (no labels, any model: distillation of every output, SQNR vs FP32 scored every epoch), "
                   "or auto (detect for detectors, classify when the data has labels, else fidelity)")
    p.add_argument("--decoder", help="detect, for models without one (ONNX files): see `quantize --help`")
    p.add_argument("--channel-order", help="detect / fidelity: RGB, BGR or GRAY, the order the model was trained on")
    preprocess_args(p, channel_order=False)


def mixed_args(p: argparse.ArgumentParser, high_default: str | None) -> None:
    """``sensitivity`` / ``mixed``: the high precision, the held-out inputs and what scores each plan."""
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


def finetune_args(p: argparse.ArgumentParser) -> None:
    """``prune`` / ``factorize`` / ``plan``: the model, training and test data, KD fine-tuning, checkpoints, ``--out``
    (read by ``lighten.setup``)."""
    model_args(p)
    p.add_argument("--train-data", required=True, help="training images (fine-tuning): ImageFolder dir / zip, ...")
    p.add_argument("--train-split", help="split / top-level folder of --train-data")
    p.add_argument("--train-size", type=int, help="fine-tune on a seeded class-balanced subset of this many images")
    p.add_argument("--data", required=True, help="test data")
    p.add_argument("--data-split", help="split / top-level folder of --data")
    p.add_argument("--eval-size", type=int, help="score on a seeded class-balanced subset of this many --data images "
                   "(default: all)")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs (fractions allowed)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate (cosine)")
    p.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    p.add_argument("--no-kd", action="store_true", help="fine-tune on labels only (no distillation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets and of fine-tuning")
    threads_arg(p)
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write the fine-tuning checkpoint into --out every "
                   "N optimizer steps and at every epoch end (default: every 5 minutes of training; 0: epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out (refused if the "
                   "model, options or training data differ)")
    out_arg(p)

"""What several commands read from their parsed options: the model, the PTQ config, the task ``--task auto`` stands
for, the data of each task, the preprocessing of image inputs,
the precision plan and the high precision."""

from __future__ import annotations

import sys

from ..errors import EdgeslimError

__all__ = ["load_model", "ptq_config", "task_name", "qat_task_name", "classify_data", "detect_data", "input_spec",
           "fidelity_inputs", "VERBS", "mixed_plan", "high_precision", "simulate_size"]


def load_model(args):
    """The model and its ``ModelInfo``; a zoo model without ``--weights`` needs ``--random-init``."""
    from ..models import DETECTORS, ZOO, build_model, parse_shape

    name = args.model.strip()
    if (name in ZOO or name in DETECTORS) and args.weights is None and not args.random_init \
            and args.command != "inspect":
        raise EdgeslimError(f"model {name} has no --weights: it would be quantized and scored with random weights "
                            "(accuracy at chance); pass --weights FILE, or --random-init to try the tool anyway")
    shape = parse_shape(args.input_shape) if args.input_shape else None
    if shape is not None:
        from ..data.limits import check_input_shape

        check_input_shape(shape)  # refuse, with the size, a shape one forward pass could not hold in memory
    return build_model(args.model, args.weights, allow_pickle=args.allow_pickle, input_shape=shape)


def ptq_config(args):
    """The ``PTQConfig`` of the quantization options (``args.quant_args``); ``--threads`` checked."""
    from ..config import PTQConfig

    config = PTQConfig(w_bits=args.w_bits, a_bits=args.a_bits, granularity=args.granularity, scheme=args.scheme,
                       w_scheme=args.w_scheme,
                       scale=args.scale, calibrator=args.calibrator, fuse=not args.no_fuse,
                       calib_size=args.calib_size, seed=args.seed,
                       algorithms=tuple(a.strip() for a in args.algorithm.split(",") if a.strip()),
                       iters=args.iters, fisher=args.fisher, weight_range=args.weight_range)
    if args.threads < 1:
        raise EdgeslimError(f"invalid --threads {args.threads}: use 1 or more")
    return config


def task_name(args, info, sources: tuple | None = None) -> str:
    """The task ``--task auto`` stands for: detect for detectors, classify when every data source (default
    ``--data`` and ``--calib-data``) is labelled, else fidelity."""
    from ..data.inputs import has_labels

    if args.task != "auto":
        return args.task
    if info.task == "detect":
        return "detect"
    sources = (args.data, args.calib_data) if sources is None else sources
    return "classify" if all(has_labels(s) for s in sources) else "fidelity"


def qat_task_name(args, info) -> str:
    """``qat --task auto``: as ``task_name``, over ``--train-data`` and ``--data``."""
    return task_name(args, info, (args.train_data, args.data))


def classify_data(args, info):
    """The labelled calibration and test sets (``--eval-size`` applied), with the model's own preprocessing."""
    from ..data import Preprocess, open_dataset

    pre = Preprocess(info.input_shape, info.mean, info.std)
    calib, test = open_dataset(args.calib_data, pre, split=args.calib_split), \
        open_dataset(args.data, pre, split=args.data_split)
    import math

    from ..data.limits import check_fits

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


def detect_data(args, info, source: str = "calib_data"):
    """The calibration (``source``: ``calib_data``, or ``train_data`` for ``qat``) and test sets letterboxed to the
    model's size, and the model's detection ``ModelInfo``."""
    from ..data.detection import open_detection
    from ..models import as_detector

    size = info.input_shape[1]
    calib = open_detection(getattr(args, source), getattr(args, source.replace("_data", "_split")), imgsz=size)
    test = open_detection(args.data, args.data_split, imgsz=size)
    if getattr(args, "eval_size", None):
        test = test.subset(args.eval_size, args.seed)
    return calib, test, as_detector(info, args.decoder, test.names, args.channel_order)


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

    from ..data.inputs import InputSpec

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


def fidelity_inputs(args, model, info, calib_limit: int | None = None, source: str = "calib_data"):
    """Model inputs for the label-free task: arrays as they are, images through the preprocessing options.
    ``source``: the option holding the first set (``calib_data``, or ``train_data`` for ``qat``)."""
    from ..data.inputs import open_inputs

    args._model_meta = (getattr(model, "meta", {}) or {}).get("onnx_metadata")
    first = getattr(args, source)
    uses_images = any(not str(p).lower().endswith((".npz", ".npy")) for p in (first, args.data))
    given = any(getattr(args, k, None) is not None for k in ("mean", "std", "channel_order", "input_size", "resize"))
    spec = input_spec(args, info) if uses_images or given else None  # arrays are model inputs as they are
    calib = open_inputs(first, info.input_shape, spec, limit=calib_limit, seed=args.seed)
    test = open_inputs(args.data, info.input_shape, spec, limit=args.eval_size, seed=args.seed)
    return calib, test, spec


VERBS = ("quantize", "score", "qat")



def mixed_plan(args, model, info):
    """The per-layer precisions of ``--plan FILE`` or ``--groups backbone=8,...``; None for neither."""
    from ..config import MixedPlan

    if args.plan and getattr(args, "groups", None):
        raise EdgeslimError("pass either --plan or --groups, not both")
    if getattr(args, "groups", None):
        from ..tasks.detect_parts import group_plan
        from ..models import model_groups

        return group_plan(model_groups(model, info), args.groups)
    return MixedPlan.load(args.plan) if args.plan else None


def high_precision(args, config):
    """``--high``, or int8 when the low precision is below 8 bits, else fp32."""
    from ..quant.precision import LayerPrecision

    if args.high:
        return LayerPrecision.parse(args.high)
    return LayerPrecision.parse("int8" if min(config.w_bits, config.a_bits) < 8 else "fp32")


def simulate_size(args, default: int) -> int | None:
    """``--simulate-size``: the PyTorch-side scoring subset (None = every test image)."""
    n = getattr(args, "simulate_size", None)
    if n is None:
        return default
    if n < 0:
        raise EdgeslimError(f"invalid --simulate-size {n}: use 0 (all images) or a positive number")
    return n or None

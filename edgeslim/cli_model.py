"""The MODEL argument every command takes, and loading it (shared by ``cli`` and ``cli_lighten``)."""

from __future__ import annotations

import argparse

from .errors import EdgeslimError

__all__ = ["model_args", "load_model", "THREADS_HELP", "HelpFormatter"]

# one meaning of --threads in every command
THREADS_HELP = ("onnxruntime threads of the timed latency runs (FP32 vs INT8); accuracy scoring uses all cores")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` where there is a default to show: not for options without one (None / False) and not
    where the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or action.required:
            return text
        return super()._get_help_string(action)


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="one of: a zoo name (resnet20/32/44/56, resnet18, resnet50, mobilenet_v2, digits_cnn, "
                   "yolov5n, fastestdet, ...); package.module:factory or path/to/file.py:factory (a function or class "
                   "building the nn.Module; needs --input-shape); a float model.onnx file")
    p.add_argument("--weights", help="checkpoint: a state_dict or {'state_dict': ...} file (torch.save)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a checkpoint that needs full unpickling (only for files you trust)")
    p.add_argument("--input-shape", help="C,H,W for user models or to override the zoo's size")
    p.add_argument("--random-init", action="store_true",
                   help="allow a zoo model without --weights (random weights: accuracy at chance; for trying the tool)")


def load_model(args):
    """The model and its ``ModelInfo``; a zoo model without ``--weights`` needs ``--random-init``."""
    from .models import DETECTORS, ZOO, build_model, parse_shape

    name = args.model.strip()
    if (name in ZOO or name in DETECTORS) and args.weights is None and not args.random_init \
            and args.command != "inspect":
        raise EdgeslimError(f"model {name} has no --weights: it would be quantized and scored with random weights "
                            "(accuracy at chance); pass --weights FILE, or --random-init to try the tool anyway")
    shape = parse_shape(args.input_shape) if args.input_shape else None
    if shape is not None:
        from .data.limits import check_input_shape

        check_input_shape(shape)  # refuse, with the size, a shape one forward pass could not hold in memory
    return build_model(args.model, args.weights, allow_pickle=args.allow_pickle, input_shape=shape)

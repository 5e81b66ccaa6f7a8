"""``--formats tflite / tflm`` on ``mixed``, ``qat`` and ``plan``: checked before the command's work, and the final
INT8 model written as ``model_int8.tflite`` (+ TFLM files) into ``--out`` after it."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .common import fidelity_inputs, high_precision, load_model, ptq_config, qat_task_name, task_name
from .lines import tflite_line

__all__ = ["DEPLOYED", "deployable", "deploying", "range_inputs"]

DEPLOYED = {"mixed": "model_mixed.onnx", "qat": "model_int8.onnx", "plan": "model_final.onnx"}  # the final model


def deployable(args) -> tuple[str, ...]:
    """``--formats`` on mixed / qat / plan: the extras and what the final model can be, checked before any work."""
    from ..export.tflm import parse_formats, require_litert, require_tflite

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
        from ..export.tflm import check_config

        config = ptq_config(args)
        check_config(config)
        high = high_precision(args, config)
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


def deploying(command):
    """Run ``command`` (mixed / qat / plan); with ``--formats tflite / tflm``, write its final INT8 model (``DEPLOYED``)
    as ``model_int8.tflite`` (+ TFLM files) into ``--out`` afterwards (``jobs.export``; the int8 logits' range observed
    on ``range_inputs``, or bounded from the weights without them), summary.json's ``tflite`` / ``mcu`` fields
    updated."""
    def call(args) -> int:
        formats = deployable(args)
        code = command(args)
        if code != 0 or formats == ("onnx",):
            return code
        from ..train.dist import Dist

        if not Dist.from_env().main:
            return code
        model_file = DEPLOYED[args.command]
        if not (Path(args.out) / model_file).is_file():
            raise EdgeslimError(f"--formats {args.formats}: the run wrote no {model_file} (see summary.json), so there "
                                "is no INT8 model to write as .tflite")
        from ..jobs.export import run_export

        try:
            tflite_line(run_export(Path(args.out), formats, model_file=model_file, calib=range_inputs(args)))
        except EdgeslimError as exc:
            raise EdgeslimError(f"{args.command} finished ({args.out} holds its results), but its {model_file} was not "
                                f"written as TFLite: {exc}") from None
        return code
    return call


def range_inputs(args, n: int = 256):
    """Up to ``n`` of the command's calibration (``--calib-data``) or training (``--train-data``) inputs, preprocessed
    as the run did, whose float logits set the int8 range of the exported final model (classify, fidelity); None
    (the range is then bounded from the weights) for detectors or when they cannot be read."""
    from ..data import calibration_indices

    try:
        model, info = load_model(args)
        source = "calib_data" if getattr(args, "calib_data", None) else "train_data"
        task = qat_task_name(args, info) if args.command == "qat" else \
            (task_name(args, info) if hasattr(args, "task") else "classify")
        if task == "fidelity":
            return fidelity_inputs(args, model, info, calib_limit=n, source=source)[0]
        if task != "classify":
            return None
        from ..data import Preprocess, open_dataset

        ds = open_dataset(getattr(args, source), Preprocess(info.input_shape, info.mean, info.std),
                          split=getattr(args, source.replace("_data", "_split"), None))
        return ds.batch(calibration_indices(len(ds), min(n, len(ds)), getattr(args, "seed", 0), ds.labels))
    except EdgeslimError:
        return None

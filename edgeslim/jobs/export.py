"""``edgeslim export RUN_DIR --format tflite|tflm``: the LiteRT / TFLM files of a finished ``quantize`` run.

The run folder's ``model_int8.onnx`` is read back into an IntGraph (``import_qdq``: edgeslim's own INT8 ONNX) and
written as ``model_int8.tflite`` (and, for ``tflm``, ``model_data.h`` / ``.cc``, ``op_resolver.txt`` and the
arena size). The int8 range of float logits is the one ``quantize --formats tflite`` recorded in ``summary.json``
(``tflite.logit_qparams``: the very same file again); a run quantized without ``--formats tflite`` has none,
and the range is bounded from the weights (coarser logits; no data is read). Every file is replaced atomically,
``summary.json`` last, with its ``tflite`` / ``mcu`` fields rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import EdgeslimError
from ..intgraph import QParams

__all__ = ["run_export", "without_identities"]

TFLM_FILES = ("model_data.h", "model_data.cc", "op_resolver.txt")


def _run_folder(run_dir: Path, model_file: str) -> dict:
    if not run_dir.is_dir():
        raise EdgeslimError(f"{run_dir} is not a folder: pass the --out folder of a finished quantize run")
    missing = [f for f in ("summary.json", model_file) if not (run_dir / f).is_file()]
    if missing:
        raise EdgeslimError(f"{run_dir} is not a finished quantize run (no {' / '.join(missing)}): pass the --out "
                            "folder of edgeslim quantize")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise EdgeslimError(f"{run_dir}/summary.json cannot be read ({exc}): re-run quantize") from None
    if not isinstance(summary, dict):
        raise EdgeslimError(f"{run_dir}/summary.json is not a run summary: re-run quantize")
    return summary


def _recorded_logits(summary: dict) -> list[QParams] | None:
    rows = (summary.get("tflite") or {}).get("logit_qparams")
    if rows is None:
        return None
    try:
        return [QParams(float(r["scale"]), int(r["zero_point"]), 8, True) for r in rows]
    except (TypeError, KeyError, ValueError):
        raise EdgeslimError("summary.json's tflite.logit_qparams is malformed: re-run quantize --formats tflite") \
            from None


def _check_integer(path: Path) -> None:
    """A float model (``plan`` may end at FP32 when it meets the target unquantized) has no int8 form to write."""
    import onnx

    try:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    except Exception as exc:  # noqa: BLE001 - an unreadable file: one line
        raise EdgeslimError(f"{path} cannot be read ({str(exc).splitlines()[0][:120]}): re-run the command") from None
    if not any(op == "QuantizeLinear" or op.startswith("QLinear") or op.endswith("Integer") for op in ops):
        raise EdgeslimError(f"{path.name} is a float model (the run kept FP32), so there is no INT8 model to write as "
                            "TFLite: tighten the target so that the run quantizes, or run quantize --formats tflite")


def without_identities(model):
    """The ONNX model with its Identity nodes removed (their readers read the Identity's input; graph outputs kept):
    edgeslim's gated SiLU ends its float product in an Identity before the QuantizeLinear, which ``import_qdq``
    reads as DQ -> Mul -> Q only without it."""
    outputs = {o.name for o in model.graph.output}
    alias, keep = {}, []
    for n in model.graph.node:
        if n.op_type == "Identity" and len(n.input) == 1 and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def run_export(run_dir: Path, formats: tuple[str, ...], io: str = "float", check_images: int = 2,
               model_file: str = "model_int8.onnx", calib: np.ndarray | None = None) -> dict:
    """Write the ``.tflite`` (and TFLM files) of the run in ``run_dir``; return the new ``tflite`` / ``mcu`` fields.
    ``model_file``: the run's INT8 model (``model_mixed.onnx`` for ``mixed``, ``model_final.onnx`` for ``plan``);
    ``calib``: model inputs whose float logits set their int8 range when the run recorded none (else: the weights).

    ``check_images`` random normal inputs compare the engine's ``tflite`` mode with LiteRT / TFLM on the file
    (``engine_vs_runtimes``; 0 skips it)."""
    from ..export.tflm import agreement, build, require_litert, write_files
    from ..io.onnx_qdq_import import import_qdq

    run_dir = Path(run_dir)
    summary = _run_folder(run_dir, model_file)
    _check_integer(run_dir / model_file)
    try:
        import onnx

        g = import_qdq(without_identities(onnx.load(str(run_dir / model_file))))
    except EdgeslimError as exc:
        raise EdgeslimError(f"{run_dir}/{model_file} cannot be read back into an integer graph ({exc}): "
                            "quantize the model with --formats tflite instead") from None
    logits = _recorded_logits(summary)
    fb, tg, info = build(g, calib if logits is None else None, io=io, logits=logits)
    before = summary.get("tflite") or {}
    fields = write_files(fb, tg, info, run_dir, formats, io)
    if before.get("content_sha256") == info["content_sha256"] and before.get("io") == io:
        # the model quantize wrote (tensor names aside): its scores (top-1, mAP, fidelity) still hold
        for key, value in (summary.get("tflite") or {}).items():
            fields["tflite"].setdefault(key, value)
    fields["tflite"]["exported_from"] = f"{model_file} (read back with import_qdq)"
    fields["tflite"]["logits_range"] = (
        "recorded by quantize --formats tflite" if logits is not None else
        f"observed on {len(calib)} calibration inputs" if calib is not None else
        "bounded from the weights (the run recorded none; no data read)")
    if check_images and io == "float":
        require_litert()
        x = np.random.default_rng(0).standard_normal((check_images, *tg.input_shape)).astype(np.float32)
        fields["tflite"]["engine_vs_runtimes"] = {**agreement(tg, fb, x), "inputs": "random normal"}
    if "tflm" not in formats:  # a TFLM build of an earlier file would no longer match it
        for name in TFLM_FILES:
            (run_dir / name).unlink(missing_ok=True)
        summary.pop("mcu", None)
    summary.update(fields)
    tmp = run_dir / f".summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "summary.json")
    return fields

"""``edgeslim export``: the LiteRT (.tflite) / TFLM files of a finished ``quantize`` run folder
(``jobs.export.run_export``)."""

from __future__ import annotations

from pathlib import Path

from .lines import tflite_line

__all__ = ["HELP", "add_arguments", "run"]

HELP = "LiteRT (.tflite) / TFLM files of a finished quantize run folder"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="the --out folder of edgeslim quantize (model_int8.onnx, summary.json)")
    p.add_argument("--format", required=True, choices=("tflite", "tflm"),
                   help="tflite: model_int8.tflite; tflm: also model_data.h/.cc, op_resolver.txt, arena size")
    p.add_argument("--io", default="float", choices=("float", "int8"), help="the .tflite's input / output type")


def run(args) -> int:
    from ..export.tflm import parse_formats, require_tflite
    from ..jobs.export import run_export

    formats = parse_formats(args.format)
    require_tflite(formats)
    s = run_export(Path(args.run_dir), formats, io=args.io)
    tflite_line(s)
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

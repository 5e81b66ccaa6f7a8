"""LiteRT int8 export on real models: ResNet-20 (CIFAR-10) top-1 in LiteRT (reference kernels and XNNPACK) next to
onnxruntime INT8 and the engine's tflite mode, the share of identical outputs, TFLM on a subset; MobileNetV2 (random
weights, fidelity vs FP32); FastestDet and yolov5n on COCO128 val2017 (mAP of the .tflite in LiteRT next to
onnxruntime INT8, ``quantize --task detect --formats tflm``). Latency of LiteRT XNNPACK (1 thread) vs onnxruntime INT8
(1 thread) paired; flash and arena bytes. Writes the ``tflite-export`` section of BENCHMARKS.md with ``--write``
(from whatever parts have finished: each part's result is kept as JSON under ``--work``).

    python -m bench.tflite_export [--parts resnet20,mobilenet_v2,detect] [--test-size 10000] [--ref-size 10000]
        [--tflm-size 500] [--work runs/bench-tflite] [--write]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench._report import COMMIT, ROOT, table, write_section
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.data import Preprocess, calibration_indices, open_dataset
from edgeslim.engine.run import run
from edgeslim.errors import EdgeslimError
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.export.onnx_qdq import save_onnx, to_onnx
from edgeslim.export.tflite import prepare_graph, to_tflite
from edgeslim.export.tflite_gap import isolated_differences, output_agreement
from edgeslim.export.tflm import arena_bytes
from edgeslim.intgraph import QParams
from edgeslim.models import build_model


def _litert(fb: bytes, reference: bool, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    it = Interpreter(model_content=fb, experimental_op_resolver_type=kind, num_threads=threads)
    it.allocate_tensors()
    return it


def _invoke_all(it, x_nhwc: np.ndarray) -> np.ndarray:
    """One image at a time (the file has batch 1, as microcontrollers need)."""
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    rows = []
    for i in range(len(x_nhwc)):
        it.set_tensor(inp, x_nhwc[i:i + 1])
        it.invoke()
        rows.append(it.get_tensor(out)[0].copy())
    return np.stack(rows)


def _tflm_all(fb: bytes, x_nhwc: np.ndarray) -> np.ndarray:
    from tflite_micro.python.tflite_micro import runtime as tflm

    it = tflm.Interpreter.from_bytes(fb, arena_size=1 << 22)
    rows = []
    for i in range(len(x_nhwc)):
        it.set_input(x_nhwc[i:i + 1], 0)
        it.invoke()
        rows.append(it.get_output(0)[0].copy())
    return np.stack(rows)


def _paired_latency(fb: bytes, onnx_path: Path, shape, rounds: int) -> dict:
    """ms per image at batch 1, one thread each, interleaved round by round (order alternating)."""
    lite = _litert(fb, reference=False, threads=1)
    sess = ort_eval.session(onnx_path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    feed = {sess.get_inputs()[0].name: x}
    inp = lite.get_input_details()[0]["index"]

    def t_lite():
        t0 = time.perf_counter()
        lite.set_tensor(inp, xn)
        lite.invoke()
        return (time.perf_counter() - t0) * 1e3

    def t_ort():
        t0 = time.perf_counter()
        sess.run(None, feed)
        return (time.perf_counter() - t0) * 1e3

    times = {"litert_xnnpack": [], "ort_int8": []}
    for i in range(rounds + 10):
        pair = [("litert_xnnpack", t_lite), ("ort_int8", t_ort)]
        for k, fn in (pair if i % 2 else pair[::-1]):
            v = fn()
            if i >= 10:
                times[k].append(v)
    return {"litert_xnnpack_ms": statistics.median(times["litert_xnnpack"]),
            "ort_int8_ms": statistics.median(times["ort_int8"]),
            "litert_over_ort": ort_eval.paired_ratio(times, "litert_xnnpack", "ort_int8")}


def _gap(onnx_path: Path, fb: bytes, x: np.ndarray, logits: list | None = None) -> dict:
    """The INT8 ONNX file in onnxruntime against the .tflite (LiteRT reference kernels and XNNPACK) on the same float
    inputs ``x``, one image at a time: per output, SQNR and (for outputs dequantized from int8 codes) the share of
    identical outputs; and each layer alone (``isolated_differences``, on ``x[:1]``) for both activation forms, on
    the file read back (``import_qdq``)."""
    import onnx

    from edgeslim.analysis import output_steps
    from edgeslim.export.tflm import litert_runner
    from edgeslim.io.onnx_qdq_import import import_qdq
    from edgeslim.jobs.export import without_identities

    sess = ort_eval.session(onnx_path, threads=1)
    names = [o.name for o in sess.get_outputs()]
    ort = [np.concatenate(c) for c in zip(*[sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})
                                             for i in range(len(x))])]
    try:
        g = import_qdq(without_identities(onnx.load(str(onnx_path))))
        steps = output_steps(g)
    except EdgeslimError as exc:  # the ONNX importer's limits (FastestDet.onnx's batch-folding reshapes)
        print(f"[gap] {onnx_path}: not read back ({exc})", file=sys.stderr, flush=True)
        from edgeslim.io.tflite_import import import_tflite

        lite = import_tflite(fb)  # the output steps of the .tflite, which the ONNX file shares, in output order
        g, steps = None, dict(zip(names, output_steps(lite).values()))
    result: dict = {"images": int(len(x))}
    for key, reference in (("litert_reference", True), ("litert_xnnpack", False)):
        got = litert_runner(fb, reference=reference)(x)
        result[key] = {n: output_agreement(a, b, steps.get(n)) for n, a, b in zip(names, ort, got)}
    if g is not None:
        result["isolated"] = {act: isolated_differences(g, prepare_graph(g, activations=act, logits=logits), x[:1])
                              for act in ("table", "builtin")}
    return result


def _gap_text(gap: dict) -> str:
    parts = []
    for key in ("litert_reference", "litert_xnnpack"):
        per = gap[key].values()
        sq = min(r["sqnr_db"] for r in per)
        same = [r["identical_share"] for r in per if "identical_share" in r]
        parts.append(f"{key} " + (f"{100 * min(same):.2f} % identical outputs (max "
                                  f"{max(r['max_diff_steps'] for r in per if 'max_diff_steps' in r):g} steps), "
                                  if same else "") + f"SQNR {sq:.1f} dB")
    text = f"onnxruntime INT8 vs .tflite on {gap['images']} images (worst output): {'; '.join(parts)}"
    for act, rows in gap.get("isolated", {}).items():
        diff = [f"{op} {100 * r['share']:.3f} % (max {r['max_diff']})" for op, r in rows.items() if r["different"]]
        text += (f"; each layer alone, fed onnxruntime's codes, `{act}` activations: "
                 f"{', '.join(diff) or 'no difference'}, other ops identical")
    return text


def resnet20(args, shared: Path, work: Path) -> dict:
    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    x_cal = train.batch(calibration_indices(len(train), args.calib_size, 0, train.labels))
    idx = np.arange(len(test)) if args.test_size >= len(test) else \
        calibration_indices(len(test), args.test_size, 0, test.labels)
    x, y = test.batch(idx), test.labels[idx]
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    q = api.quantize(model, x_cal, PTQConfig(), input_shape=info.input_shape)
    onnx_path = save_onnx(to_onnx(q.intgraph), work / "int8.onnx")  # what api.export_onnx writes (IO names aside)
    tg = prepare_graph(q.intgraph, x_cal)
    fb, finfo = to_tflite(tg)
    (work / "model_int8.tflite").write_bytes(fb)
    print(f"tflite: {len(fb)} bytes, ops {finfo['ops']}", file=sys.stderr, flush=True)

    logits = {"ort_int8": ort_eval.predict(ort_eval.session(onnx_path, threads=0), x, 500)}
    logits["engine_tflite"] = np.concatenate([run(tg, x[i:i + 500], requant="tflite")[tg.output_names[0]]
                                              for i in range(0, len(x), 500)])
    n_ref = min(args.ref_size, len(x))
    t0 = time.perf_counter()
    logits["litert_ref"] = _invoke_all(_litert(fb, reference=True), xn[:n_ref])
    t_ref = time.perf_counter() - t0
    logits["litert_xnnpack"] = _invoke_all(_litert(fb, reference=False), xn)
    n_tflm = min(args.tflm_size, len(x))
    t0 = time.perf_counter()
    logits["tflm"] = _tflm_all(fb, xn[:n_tflm])
    t_tflm = time.perf_counter() - t0
    print(f"reference kernels: {t_ref / n_ref * 1e3:.1f} ms / image, TFLM {t_tflm / n_tflm * 1e3:.1f} ms / image",
          file=sys.stderr)

    eng = logits["engine_tflite"]
    head = next(n for n in tg.nodes if n.outputs[0] == tg.output_names[0])
    lsb = np.float32(tg.qparams[head.inputs[0]].scale)  # the int8 logits' step
    rows = []
    for k, v in logits.items():
        n = len(v)
        integer = k != "ort_int8"  # onnxruntime returns the float accumulator (no int8 logits)
        same = f"{100 * float(np.mean(np.all(v == eng[:n], axis=1))):.2f} %" if integer else "-"
        worst = f"{float(np.abs(v - eng[:n]).max() / lsb):.0f}" if integer else "-"
        rows.append([k, n, metrics.top1(v, y[:n]), metrics.top1(eng[:n], y[:n]), same, worst,
                     int(np.sum(v.argmax(1) != logits["ort_int8"][:n].argmax(1))),
                     "-" if k == "ort_int8" else f"{output_agreement(logits['ort_int8'][:n], v)['sqnr_db']:.1f}"])
    gap = _gap(onnx_path, fb, x[:args.gap_images], logits=[tg.qparams[o] for o in
                                                           (n.outputs[0] for n in tg.nodes if n.attrs.get("tflite_logits"))])
    lat = _paired_latency(fb, onnx_path, info.input_shape, args.latency_rounds)
    return {"rows": rows, "bytes": len(fb), "arena": arena_bytes(fb, (1, *xn.shape[1:])), "ops": finfo["ops"],
            "latency": lat, "gap": gap, "ref_ms": t_ref / n_ref * 1e3, "tflm_ms": t_tflm / n_tflm * 1e3,
            "convs": finfo["ops"].get("CONV_2D", 0), "float_ops": finfo["float_ops"]}


def _randomize_bn(model):
    """BN statistics and affine parameters away from their init (a fresh random network's outputs are ~0)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.6 - 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.6)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model.eval()


def mobilenet_v2(args, shared: Path, work: Path) -> dict:
    """MobileNetV2 (random weights, 224 x 224): ``quantize --task fidelity --formats tflm`` on CIFAR-10 test images
    upsampled to 224 (ImageNet normalization): SQNR of the .tflite in LiteRT and of the INT8 ONNX vs FP32."""
    from edgeslim.jobs.quantize import run_quantize
    from edgeslim.tasks import Fidelity

    torch.manual_seed(0)
    model, info = build_model("mobilenet_v2")
    model = _randomize_bn(model)
    shape = (3, 224, 224)
    pre = Preprocess(shape, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    calib = train.batch(calibration_indices(len(train), 128, 0, train.labels))
    x = test.batch(calibration_indices(len(test), args.mobilenet_size, 0, test.labels))
    out = work / "mobilenet_v2"
    s = run_quantize(model, replace(info, input_shape=shape), Fidelity(calib, x, batch_size=32),
                     PTQConfig(calib_size=128), out, formats=("onnx", "tflite", "tflm"))
    fb = (out / "model_int8.tflite").read_bytes()
    logits = [QParams(float(r["scale"]), int(r["zero_point"]), 8, True) for r in s["tflite"].get("logit_qparams", [])]
    return {"summary": {k: s[k] for k in ("onnx_int8", "tflite", "mcu", "inputs")},
            "gap": _gap(out / "model_int8.onnx", fb, x[:args.gap_images], logits=logits or None),
            "latency": _paired_latency(fb, out / "model_int8.onnx", shape, args.latency_rounds)}


def detectors(args, shared: Path, work: Path) -> dict:
    """``quantize --task detect --formats tflm`` for FastestDet and yolov5n on COCO128 (calibrated on train2017,
    scored on val2017, as bench.detect_coco128's ptq runs)."""
    import onnx

    from bench.detect_coco128 import CALIB, _data, models
    from edgeslim.tasks.detect_parts import calibration_images
    from edgeslim.config import DetectOptions
    from edgeslim.jobs.quantize import run_quantize
    from edgeslim.tasks import Detect

    zoo = models(shared)
    result = {}
    for name in args.detectors.split(","):
        out = work / f"detect-{name}"
        if not (out / "summary.json").exists():
            model, info = zoo[name]()
            calib, test = _data(shared, info.input_shape[1])
            t0 = time.perf_counter()
            opts = DetectOptions(batch_size=8, simulation_images=args.detect_sim)
            run_quantize(model, info, Detect(calib, test, opts), PTQConfig(calib_size=CALIB), out,
                         formats=("onnx", "tflite", "tflm"))
            print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        s = json.loads((out / "summary.json").read_text())
        fb = (out / "model_int8.tflite").read_bytes()
        dims = onnx.load(str(out / "model_int8.onnx")).graph.input[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value for d in dims[1:])
        model, info = zoo[name]()
        x_gap = calibration_images(_data(shared, info.input_shape[1])[1], args.gap_images, 0, info)
        logits = [QParams(float(r["scale"]), int(r["zero_point"]), 8, True)
                  for r in s["tflite"].get("logit_qparams", [])]
        result[name] = {"summary": {k: s[k] for k in ("onnx_fp32", "onnx_int8", "tflite", "mcu", "images")},
                        "gap": _gap(out / "model_int8.onnx", fb, x_gap, logits=logits or None),
                        "latency": _paired_latency(fb, out / "model_int8.onnx", shape, args.detect_rounds),
                        "activations": _activation_variants(name, out, s, zoo, shared, args)}
    return result


def _activation_variants(name: str, out: Path, s: dict, zoo: dict, shared: Path, args) -> dict:
    """The run's model_int8.onnx read back (``edgeslim export``'s path) and written with each ``activations`` choice:
    ``table`` (SiLU / sigmoid as int8 GATHER tables, the default) and ``builtin`` (LOGISTIC, LOGISTIC + MUL): mAP in
    LiteRT XNNPACK on the same val2017 images, engine vs runtimes on 2 calibration images, paired latency vs
    onnxruntime INT8."""
    import onnx

    from bench.detect_coco128 import _data
    from edgeslim.config import DetectOptions
    from edgeslim.tasks.detect_parts import calibration_images, check_detector, evaluate_models
    from edgeslim.export.tflm import agreement, litert_runner
    from edgeslim.io.onnx_qdq_import import import_qdq
    from edgeslim.jobs.export import without_identities

    model, info = zoo[name]()
    calib, test = _data(shared, info.input_shape[1])
    decoder = check_detector(info, test)
    opts = DetectOptions(batch_size=8)
    x_cal = calibration_images(calib, 2, 0, info)
    try:
        g = import_qdq(without_identities(onnx.load(str(out / "model_int8.onnx"))))
    except EdgeslimError as exc:  # the importer's limits (FastestDet.onnx's batch-folding reshapes): said in the table
        print(f"[{name}] activations: not read back ({exc})", file=sys.stderr, flush=True)
        return {}
    logits = [QParams(float(r["scale"]), int(r["zero_point"]), 8, True) for r in s["tflite"].get("logit_qparams", [])]
    rows = {}
    for activations in ("table", "builtin"):
        tg = prepare_graph(g, activations=activations, logits=logits or None)
        fb, info_fb = to_tflite(tg)
        scored = evaluate_models({"tflite": litert_runner(fb)}, test, decoder, opts, info=info,
                                 desc=f"{name} .tflite ({activations})")["tflite"]
        rows[activations] = {
            "ops": {k: info_fb["ops"].get(k, 0) for k in ("GATHER", "LOGISTIC", "MUL", "CONV_2D")},
            "same_as_quantize_file": info_fb["content_sha256"] == s["tflite"]["content_sha256"],
            "map50": scored["map50"], "map50_95": scored["map50_95"],
            "engine_vs_runtimes": agreement(tg, fb, x_cal),
            "latency": _paired_latency(fb, out / "model_int8.onnx", info.input_shape, args.detect_rounds)}
        print(f"[{name}] activations={activations}: mAP@.5:.95 {scored['map50_95']:.4f}, XNNPACK "
              f"{rows[activations]['latency']['litert_xnnpack_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def _agreement_text(e: dict) -> str:
    """min identical share / max steps over outputs, per runtime, of ``engine_vs_runtimes``."""
    parts = []
    for k in ("litert_reference", "tflm", "litert_xnnpack"):
        per = e[k].values()
        parts.append(f"{k} {100 * min(r['identical_share'] for r in per):.2f} % identical "
                     f"(max {max(r['max_diff_steps'] for r in per):g} steps)")
    return "; ".join(parts)


def report(results: dict, args) -> str:
    lines = ["## LiteRT / TFLM export", ""]
    if args.note:
        lines += [f"_{args.note}_", ""]
    r = results.get("resnet20")
    if r:
        lat = r["latency"]
        lines += [
            "### ResNet-20, CIFAR-10 JPEG",
            "",
            "`export.tflite` writes the IntGraph of the default PTQ config (W8A8, per-channel symmetric weights) as an "
            "int8 flatbuffer (float input / output). Top-1 of each runtime on its first n test images, with the "
            "engine's `tflite` mode on the same images; identical = every logit of the image equal to the engine's.",
            "",
            table(["runtime", "images", "top-1", "engine top-1 (same images)", "identical to engine",
                   "max logit diff (LSB)", "argmax != ORT INT8", "logits SQNR vs ORT INT8 dB"], r["rows"]),
            "",
            f"File {r['bytes']:,} bytes (flash), TFLM arena {r['arena']:,} bytes; {r['convs']} CONV_2D (int8), "
            f"float ops: {', '.join(r['float_ops']) or 'none'}; ops {r['ops']}. Reference kernels "
            f"{r['ref_ms']:.1f} ms / image, TFLM {r['tflm_ms']:.1f} ms / image (Python interpreter).",
            f"Latency at batch 1, one thread, paired over {args.latency_rounds} rounds: LiteRT XNNPACK "
            f"{lat['litert_xnnpack_ms']:.3f} ms, onnxruntime INT8 {lat['ort_int8_ms']:.3f} ms, "
            f"ratio {lat['litert_over_ort']:.2f}x.", *([_gap_text(r["gap"]) + ".", ""] if "gap" in r else [""])]
    m = results.get("mobilenet_v2")
    if m:
        s, lat = m["summary"], m["latency"]
        t = s["tflite"]
        rows = [[name, f"{o['sqnr_db']:.2f}", f"{t['fidelity_vs_fp32'][name]['sqnr_db']:.2f}",
                 f"{o['cosine']:.5f}", f"{t['fidelity_vs_fp32'][name]['cosine']:.5f}"]
                for name, o in s["onnx_int8"]["fidelity_vs_fp32"].items()]
        lines += [
            "### MobileNetV2 (random weights), fidelity",
            "",
            f"`quantize --task fidelity --formats tflm` on {s['inputs']['test']} CIFAR-10 test images upsampled to "
            "224 x 224 (ImageNet normalization; calibrated on 128 train images), random weights with non-trivial BN "
            "statistics: each file's outputs against the FP32 ONNX model's.",
            "",
            table(["output", "ONNX INT8 SQNR dB", ".tflite (LiteRT XNNPACK) SQNR dB", "ONNX INT8 cosine",
                   ".tflite cosine"], rows),
            "",
            f"Engine (`tflite` mode) vs runtimes on {t['engine_vs_runtimes']['images']} images: "
            f"{_agreement_text(t['engine_vs_runtimes'])}. File {t['size_bytes']:,} bytes, TFLM arena "
            f"{s['mcu']['ram_bytes']:,} bytes; ops {t['ops']}.",
            f"Latency at batch 1, one thread, paired over {args.latency_rounds} rounds: LiteRT XNNPACK "
            f"{lat['litert_xnnpack_ms']:.2f} ms, onnxruntime INT8 {lat['ort_int8_ms']:.2f} ms, "
            f"ratio {lat['litert_over_ort']:.2f}x.", *([_gap_text(m["gap"]) + ".", ""] if "gap" in m else [""])]
    d = results.get("detect")
    if d:
        rows, notes = [], []
        for name, v in d.items():
            if not isinstance(v, dict):  # wall_s, code_commit
                continue
            s, lat = v["summary"], v["latency"]
            for key, label in (("onnx_fp32", "ONNX FP32"), ("onnx_int8", "ONNX INT8 (onnxruntime)"),
                               ("tflite", ".tflite (LiteRT XNNPACK)")):
                rows.append([name, label, f"{s[key]['map50']:.4f}", f"{s[key]['map50_95']:.4f}",
                             f"{s[key]['precision']:.3f}", f"{s[key]['recall']:.3f}"])
            t = s["tflite"]
            notes.append(f"- {name} ({s['images']['test']} val2017 images at {s['images']['imgsz']}): "
                         f"{t['ops'].get('CONV_2D', 0)} CONV_2D + {t['ops'].get('DEPTHWISE_CONV_2D', 0)} "
                         f"DEPTHWISE_CONV_2D (int8), float ops: {', '.join(t['float_ops']) or 'none'}; file "
                         f"{t['size_bytes']:,} bytes, TFLM arena {s['mcu']['ram_bytes']:,} bytes; engine vs runtimes on "
                         f"{t['engine_vs_runtimes']['images']} calibration images (raw head outputs): "
                         f"{_agreement_text(t['engine_vs_runtimes'])}; latency batch 1, one thread, paired over "
                         f"{args.detect_rounds} rounds: LiteRT XNNPACK {lat['litert_xnnpack_ms']:.1f} ms, "
                         f"onnxruntime INT8 {lat['ort_int8_ms']:.1f} ms, ratio {lat['litert_over_ort']:.2f}x"
                         + (f"; {_gap_text(v['gap'])} (val2017)." if "gap" in v else "."))
        act_rows = []
        for name, v in d.items():
            for act, r in (v.get("activations", {}) if isinstance(v, dict) else {}).items():
                e, lat = r["engine_vs_runtimes"], r["latency"]
                same = lambda k: min(p["identical_share"] for p in e[k].values())  # noqa: E731
                act_rows.append([name, act, r["ops"]["GATHER"], r["ops"]["LOGISTIC"], f"{r['map50']:.4f}",
                                 f"{r['map50_95']:.4f}", f"{100 * same('litert_reference'):.2f} / "
                                 f"{100 * same('tflm'):.2f} %", f"{100 * same('litert_xnnpack'):.2f} %",
                                 f"{lat['litert_xnnpack_ms']:.1f}", f"{lat['ort_int8_ms']:.1f}",
                                 f"{lat['litert_over_ort']:.2f}x", "yes" if r["same_as_quantize_file"] else "no"])
        if act_rows:
            notes += ["", "SiLU / sigmoid as int8 tables (`activations=\"table\"`, CAST + ADD + GATHER) or as "
                      "TFLite's builtins (`\"builtin\"`: LOGISTIC, LOGISTIC + MUL for SiLU; the default since this "
                      "measurement), each file written "
                      "from the run's model_int8.onnx read back (`edgeslim export`'s path; `same file` = equal content "
                      "digest to the one quantize wrote). mAP in LiteRT XNNPACK on the same images; engine (`tflite` "
                      "mode, which computes each choice's own arithmetic) vs runtimes on 2 calibration images (share "
                      "of identical raw head outputs, worst output); latency batch 1, one thread, paired over "
                      f"{args.detect_rounds} rounds.", "",
                      table(["model", "activations", "GATHER", "LOGISTIC", "mAP@.5", "mAP@.5:.95",
                             "engine = LiteRT ref / TFLM", "engine = XNNPACK", "XNNPACK ms", "ORT INT8 ms",
                             "XNNPACK / ORT", "same file"], act_rows)]
        lines += [
            "### Detectors, COCO128 val2017",
            "",
            "`quantize --task detect --formats tflm` (W8A8 PTQ calibrated on the 128 train2017 images): the same "
            "numpy decoder and NMS score every file.",
            "",
            table(["model", "file", "mAP@.5", "mAP@.5:.95", "P", "R"], rows),
            "",
            *notes, ""]
    return "\n".join(lines)


HEADINGS = {"resnet20": "### ResNet-20", "mobilenet_v2": "### MobileNetV2", "detect": "### Detectors"}


def _kept_parts(results: dict) -> str:
    """The subsections of BENCHMARKS.md's current ``tflite-export`` section for the parts not rerun now, kept with
    the stamp of the run that measured them (so a cheap partial rerun does not erase the expensive parts)."""
    from bench._report import BENCHMARKS

    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    found = re.search(r"<!-- bench:tflite-export -->(.*?)<!-- /bench:tflite-export -->", text, re.S)
    if not found:
        return ""
    old = found.group(1)
    stamp = next((ln for ln in old.splitlines() if ln.startswith("_Command:")), "")
    kept = []
    for part, heading in HEADINGS.items():
        if part in results or heading not in old:
            continue
        block = old[old.index(heading):]
        nxt = [block.find(h, 1) for h in (*HEADINGS.values(), "_Command:") if block.find(h, 1) > 0]
        block = block[:min(nxt)] if nxt else block
        note = stamp.replace("_Command:", "_Kept from the earlier run (not rerun here); its command:", 1)
        kept.append(block.rstrip() + "\n\n" + note)
    return "\n\n" + "\n\n".join(kept) + "\n" if kept else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--parts", default="resnet20,mobilenet_v2,detect")
    ap.add_argument("--work", default=str(ROOT / "runs/bench-tflite"), help="each part's result JSON and run folders")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--ref-size", type=int, default=10000, help="images run in LiteRT's reference kernels")
    ap.add_argument("--tflm-size", type=int, default=500, help="images run in TFLM (slow reference kernels)")
    ap.add_argument("--latency-rounds", type=int, default=300)
    ap.add_argument("--mobilenet-size", type=int, default=200, help="MobileNetV2 test images")
    ap.add_argument("--detectors", default="fastestdet,yolov5n")
    ap.add_argument("--detect-sim", type=int, default=16, help="detect: images the PyTorch simulation scores")
    ap.add_argument("--detect-rounds", type=int, default=30)
    ap.add_argument("--gap-images", type=int, default=4, help="images for onnxruntime INT8 vs .tflite agreement")
    ap.add_argument("--note", default="", help="a line on the conditions (e.g. other work sharing the cores)")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    shared = Path(args.shared)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    parts = {"resnet20": resnet20, "mobilenet_v2": mobilenet_v2, "detect": detectors}
    for name in args.parts.split(","):
        if not name:
            continue
        t0 = time.perf_counter()
        result = parts[name](args, shared, work)
        result["wall_s"] = time.perf_counter() - t0
        result["code_commit"] = COMMIT
        (work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"[{name}] done in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    results = {k: json.loads((work / f"{k}.json").read_text()) for k in parts if (work / f"{k}.json").exists()}
    body = report(results, args) + _kept_parts(results)
    print(body)
    if args.write:
        write_section("tflite-export", body)


if __name__ == "__main__":
    main()

"""Seed 003's lightweighting steps on the shared ResNet-20 and CIFAR-10 JPEG: channel pruning, magnitude pruning,
factorization, and the ``plan`` loop (one target that needs several steps, one that cannot be met).

Sections of BENCHMARKS.md: ``lighten-channel``, ``lighten-magnitude``, ``lighten-factorize``, ``lighten-fp16``,
``lighten-plan``.
Each run writes its job folder under ``--work`` and is skipped when its ``summary.json`` exists; ``--report``
writes the tables from the finished runs. One thread (the machine has 2 cores).

    python -m bench.lighten_resnet20 --runs channel,magnitude,factorize,plan --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench._data import resnet20_cifar
from bench._report import COMMIT, ROOT, table, write_section
from edgeslim.config import FinetuneConfig, PlanOptions, Requirement
from edgeslim.jobs.lighten import run_factorize, run_prune
from edgeslim.jobs.plan import run_plan
from edgeslim.targets import TARGETS

EPOCHS = 2.0  # fine-tuning budget per single-step run (epochs of the 50,000 training images)
FT = FinetuneConfig(epochs=EPOCHS, lr=0.01)
PLAN_DROP = 4.0  # points of top-1 the small plan may lose (1 epoch per weight-changing step)


def runs() -> dict:
    r = {}
    for keep in (0.7, 0.5):
        r[f"channel-{keep}"] = lambda m, i, tr, te, out, k=keep: run_prune(m, i, tr, te, out, method="channel",
                                                                          target_macs=k, finetune_cfg=FT)
    for sp in (0.5, 0.75, 0.9):
        r[f"magnitude-{sp}"] = lambda m, i, tr, te, out, s=sp: run_prune(m, i, tr, te, out, method="magnitude",
                                                                        sparsity=s, finetune_cfg=FT)
    r["factorize-separable"] = lambda m, i, tr, te, out: run_factorize(m, i, tr, te, out, method="separable",
                                                                       share=0.5, macs_reduction=0.5, finetune_cfg=FT)
    r["fp16"] = run_fp16
    # a size target the factorized (G2), magnitude-pruned (G5, sparsity chosen to fit) INT8 (G3) model can reach
    r["plan-small"] = lambda m, i, tr, te, out: run_plan(m, i, tr, te, out, target=TARGETS["cpu-int8"],
                                                         requirement=Requirement(max_drop=PLAN_DROP, max_size_kb=96),
                                                         options=PlanOptions(budget_epochs=EPOCHS, finetune=FT))
    # 8 KiB cannot hold ResNet-20 at any sparsity the pruner allows: the plan must stop and say what it reached
    r["plan-impossible"] = lambda m, i, tr, te, out: run_plan(
        m, i, tr, te, out, target=TARGETS["cpu-int8"], requirement=Requirement(max_drop=0.5, max_size_kb=8),
        options=PlanOptions(steps=("G3", "G4", "G5"), budget_epochs=1.0, finetune=FT))
    return r


def run_fp16(model, info, train, test, out: Path) -> dict:
    """G4 on its own: the whole model in FP16 vs FP32 in onnxruntime (accuracy, file size, paired latency)."""
    import statistics

    from edgeslim import api
    from edgeslim.eval import ort as ort_eval
    from edgeslim.tasks import onnx_top1

    out.mkdir(parents=True, exist_ok=True)
    fp32 = api.export_fp32_onnx(model, info.input_shape, out / "model_fp32.onnx")
    fp16 = api.export_fp16_onnx(fp32, out / "model_fp16.onnx")
    top1 = onnx_top1({"fp32": fp32, "fp16": fp16}, test, 500, "scoring FP32 / FP16")
    res = {}
    for b in (1, 64):
        lat = ort_eval.latency_samples({"fp32": fp32, "fp16": fp16}, info.input_shape, b, threads=1, rounds=100)
        res[f"batch{b}"] = {"fp32_ms": statistics.median(lat["fp32"]), "fp16_ms": statistics.median(lat["fp16"]),
                            "fp16_over_fp32": ort_eval.paired_ratio(lat, "fp16", "fp32")}
    s = {"top1": top1, "bytes": {"fp32": fp32.stat().st_size, "fp16": fp16.stat().st_size}, "latency": res,
         "optimized_ops_fp16": dict(ort_eval.optimized_op_counts(fp16))}
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    return s


def run(groups: list[str], shared: Path, work: Path) -> None:
    model, info, train, test = resnet20_cifar(shared)
    for key, job in runs().items():
        if not any(key.startswith(g) for g in groups) or (work / key / "summary.json").exists():
            continue
        print(f"[{key}]", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        job(model, info, train, test, work / key)
        p = work / key / "summary.json"
        s = json.loads(p.read_text())
        s.update(wall_s=time.perf_counter() - t0, code_commit=COMMIT)
        p.write_text(json.dumps(s, indent=2))


def relatency(shared: Path, work: Path, rounds: int = 200) -> None:
    """``--runs latency``: measure the finished runs' ONNX files again, alone, paired with the FP32 model."""
    import os
    import statistics
    import tempfile

    from edgeslim import api
    from edgeslim.eval import ort as ort_eval

    model, info, _, _ = resnet20_cifar(shared)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = api.export_fp32_onnx(model, info.input_shape, Path(tmp) / "fp32.onnx")
        for key, file in (("factorize-separable", "model_factorized.onnx"), ("plan-small", "model_final.onnx"),
                          ("plan-impossible", "model_final.onnx")):
            s = _load(work, key)
            if not s or not (work / key / file).exists():
                continue
            lat = ort_eval.latency_samples({"fp32": fp32, "m": work / key / file}, info.input_shape, 1, threads=1,
                                           rounds=rounds)
            s["latency_remeasured"] = {"fp32_ms": statistics.median(lat["fp32"]), "ms": statistics.median(lat["m"]),
                                       "vs_fp32": ort_eval.paired_ratio(lat, "m", "fp32"),
                                       "load_avg_1min": os.getloadavg()[0], "code_commit": COMMIT}
            (work / key / "summary.json").write_text(json.dumps(s, indent=2))


def _remeasured(s: dict, what: str) -> str:
    r = s.get("latency_remeasured")
    if not r:
        return ""
    return (f" Re-measured alone (`--runs latency`, 1-min load average {r['load_avg_1min']:.1f}): {what} "
            f"{r['ms']:.3f} ms vs FP32 {r['fp32_ms']:.3f} ms, **{r['vs_fp32']:.2f}x**.")


def _load(work: Path, key: str) -> dict | None:
    p = work / key / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def _commits(ss) -> str:
    return "Runs made from commit(s) " + ", ".join(sorted({s.get("code_commit", "?") for s in ss})) + "."


SHARED_CORES = ("Absolute milliseconds depend on what else ran on the 2 cores (these runs shared them with other "
                "benchmark processes); the ratios are paired (interleaved runs in one process) and are the claim.")


def report(work: Path) -> None:
    ft = (f"Fine-tuning: {EPOCHS:g} epochs of the 50,000 CIFAR-10 JPEG training images, SGD lr {FT.lr} cosine, "
          "batch 128, crop + flip, distillation from the unpruned model (KL, T = 1); test top-1 on the 10,000 test "
          "images in onnxruntime; latency: onnxruntime, batch 1, one thread, median of 200 interleaved runs with "
          "the dense model in the same process.")
    ch = [(k, _load(work, f"channel-{k}")) for k in (0.7, 0.5)]
    ch = [(k, s) for k, s in ch if s]
    if ch:
        d = ch[0][1]["dense"]
        rows = [["dense (FP32)", d["top1"], d["macs"], d["params"], f"{d['latency_ms']:.3f}", "1.00"]]
        for k, s in ch:
            p = s["pruned"]
            rows.append([f"channels pruned to {k:.0%} of MACs", p["top1"], p["macs"], p["params"],
                         f"{p['latency_ms']:.3f}", f"{p['latency_vs_dense']:.2f}"])
        body = ("## Channel pruning (G5, speed) on ResNet-20\n\nL1-norm importance, global ranking of the prunable "
                "channel groups (the channels inside each residual block; the residual stream is coupled to the "
                "option-A zero-padding shortcuts and stays), channels physically removed: a smaller dense model. "
                + ft + "\n\n" + table(["model", "test top-1", "MACs", "params", "ms", "latency vs dense"], rows)
                + "\n\n" + _commits(s for _, s in ch))
        write_section("lighten-channel", body)
    mg = [(k, _load(work, f"magnitude-{k}")) for k in (0.5, 0.75, 0.9)]
    mg = [(k, s) for k, s in mg if s]
    if mg:
        d = mg[0][1]["dense"]
        rows = [["dense (FP32)", d["top1"], "0%", d["size_bytes"], "-", "-"]]
        for k, s in mg:
            p = s["pruned"]
            rows.append([f"{k:.0%} of weights zero", p["top1"], f"{p['sparsity']:.1%}", p["size_bytes"],
                         p["sparse_file_bytes"], p["int8_sparse_bytes"]])
        body = ("## Magnitude pruning (G5, memory) on ResNet-20\n\nGlobal magnitude ranking over conv / linear "
                "weights, gradual (cubic schedule, Zhu & Gupta 2017) during fine-tuning, masks kept fixed after. "
                "Stored size: each tensor in its smallest exact format (dense, bitmask + values, or index lists), "
                "FP32 values; the written `.npz` file; and the same with 8-bit values (after PTQ). " + ft + "\n\n"
                + table(["model", "test top-1", "sparsity", "stored bytes (FP32 values)", "written file bytes",
                         "stored bytes (INT8 values)"], rows) + "\n\n" + _commits(s for _, s in mg))
        write_section("lighten-magnitude", body)
    f = _load(work, "factorize-separable")
    if f:
        o, n = f["original"], f["factorized"]
        rows = [["original", o["top1"], "-", o["macs"], o["params"], f"{o['latency_ms']:.3f}", "1.00"],
                ["depthwise-separable", n["top1"], n["top1_before_finetune"], n["macs"], n["params"],
                 f"{n['latency_ms']:.3f}", f"{n['latency_vs_original']:.2f}"]]
        layers = ", ".join(r["name"] for r in f["record"]["layers"])
        body = ("## Factorization (G2) on ResNet-20\n\nThe heaviest 3x3 convs covering half of the conv MACs "
                f"({layers}) replaced by depthwise + pointwise pairs initialized by a per-input-channel SVD, "
                "each keeping at most half of its MACs. " + ft + "\n\n"
                + table(["model", "test top-1", "before fine-tuning", "MACs", "params", "ms", "latency vs original"],
                        rows) + "\n\n" + SHARED_CORES + _remeasured(f, "the factorized model") + " " + _commits([f]))
        write_section("lighten-factorize", body)
    h = _load(work, "fp16")
    if h:
        rows = [[k.upper(), h["top1"][k], h["bytes"][k], *(f"{h['latency'][b][k + '_ms']:.3f}" for b in ("batch1", "batch64"))]
                for k in ("fp32", "fp16")]
        r1, r64 = (h["latency"][b]["fp16_over_fp32"] for b in ("batch1", "batch64"))
        slower = ("no faster (within 3%)" if max(abs(r1 - 1), abs(r64 - 1)) <= 0.03 else "slower" if min(r1, r64) > 1
                  else "faster" if max(r1, r64) < 1 else "faster at one batch size, slower at the other")
        body = ("## FP16 (G4) on ResNet-20 in onnxruntime (CPU)\n\nThe whole model converted to FP16 "
                "(onnxconverter-common, float32 inputs / outputs). Test top-1 on 10,000 images, onnxruntime, one thread, "
                "median of 100 interleaved runs.\n\n"
                + table(["model", "test top-1", "ONNX bytes", "ms (batch 1)", "ms (batch 64)"], rows)
                + f"\n\nFP16 / FP32 latency: {r1:.2f}x at batch 1, {r64:.2f}x at batch 64: FP16 is **{slower}** on this "
                "CPU. onnxruntime's CPU provider has few FP16 kernels on x86 and inserts casts around the rest; FP16 "
                "halves the file here and pays off only on hardware with FP16 arithmetic (target `fp16-gpu`). "
                "Optimized-graph ops: " + ", ".join(f"{k} {v}" for k, v in sorted(h["optimized_ops_fp16"].items()))
                + ".\n\n" + SHARED_CORES + " " + _commits([h]))
        write_section("lighten-fp16", body)
    plans = [(k, _load(work, k)) for k in ("plan-small", "plan-impossible")]
    plans = [(k, s) for k, s in plans if s]
    if plans:
        parts = ["## The guideline as a plan (seed 003's Table 1) on ResNet-20\n\nTarget `cpu-int8`; each row is the "
                 "cumulative result after one step, measured on the deployed ONNX file: test top-1 (10,000 images), "
                 "latency per image (onnxruntime, batch 1, one thread), stored size (sparse formats counted in their "
                 "real bytes), session initialization time. Fine-tuning: SGD lr 0.01 cosine, batch 128, KD from the "
                 "original model; the plan's epoch budget is shared by the steps that change weights."]
        for k, s in plans:
            req = s["requirement"]
            rows = [[r["step"], r["name"], r["format"], r["top1"], f"{(r['top1'] - s['fp32_top1']) * 100:+.2f}",
                     f"{r['latency_ms']:.3f}", f"{r['latency_vs_fp32']:.2f}", f"{r['size_bytes'] / 1024:.1f}",
                     f"{r['init_s']:.3f}"]
                    for r in s["steps"]]
            parts.append(f"### {k}: max drop {req['max_drop']} points, max size {req['max_size_kb']} KiB\n\n"
                         f"Steps allowed: {', '.join(s['options']['steps'])}; fine-tuning budget "
                         f"{s['options']['budget_epochs']:g} epochs. "
                         f"Order: {', '.join(s['order'])} (memory binds: {s['memory_binds']}). "
                         + " ".join(f"{st}: {why}." for st, why in s["skipped"].items()) + "\n\n"
                         + table(["step", "what", "format", "top-1", "vs FP32", "ms", "latency vs FP32", "KiB", "init s"], rows)
                         + "\n\n" + "\n".join(f"- {n}" for n in s["steps"][-1]["notes"])
                         + f"\n\n**{s['statement']}**" + _remeasured(s, "the final model"))
        write_section("lighten-plan", "\n\n".join(parts) + "\n\n" + SHARED_CORES + " "
                      + _commits(s for _, s in plans))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeslim-lighten"))
    ap.add_argument("--runs", default="", help="comma-separated prefixes: channel, magnitude, factorize, fp16, plan; latency (re-measure alone)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.shared / "models/resnet20_cifar10jpeg.pt").exists():
        raise SystemExit(f"shared data not found under {args.shared}")
    args.work.mkdir(parents=True, exist_ok=True)
    if "latency" in args.runs.split(","):
        relatency(args.shared, args.work)
    if args.runs:
        run([g for g in args.runs.split(",") if g], args.shared, args.work)
    if args.report:
        report(args.work)


if __name__ == "__main__":
    main()

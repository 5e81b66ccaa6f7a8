"""What the integer device computes: the numpy engine's accuracy, its agreement with onnxruntime, and
per-layer / per-filter overflow statistics (Jang et al.'s Tables 1 and 2). Used by ``edgeslim analyze``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .config import AnalyzeOptions
from .cpu import usable_cores
from .data import ImageDataset, batches
from .engine.overflow import OverflowStats
from .engine.run import run
from .errors import EdgeslimError
from .eval import metrics
from .intgraph import IntGraph

__all__ = ["check_requant", "output_lsb", "analyze", "overflow_summary", "output_steps", "analyze_outputs",
           "run_narrow_threads"]


def check_requant(g: IntGraph, requant: str) -> None:
    if requant == "shift" and any("m0" in n.arrays and np.any(n.arrays["m0"] != 2**30) for n in g.nodes):
        raise EdgeslimError("--requant shift needs power-of-two scales: add --scale pow2 (or use --requant fixed)")


def output_lsb(g: IntGraph) -> np.ndarray:
    """Size of one integer step of the model output, per output element (for LSB distances)."""
    last = next(n for n in reversed(g.nodes) if g.output_names[0] in n.outputs)
    if last.op == "QGemm" and last.attrs.get("float_output"):
        return (g.qparams[last.inputs[0]].scale * last.arrays["w_scale"].astype(np.float64)).reshape(1, -1)
    return np.array([[g.qparams[last.inputs[0]].scale]])


def analyze(g: IntGraph, test_ds: ImageDataset, onnx_logits: np.ndarray, options: AnalyzeOptions,
            batch_size: int = 256) -> dict:
    """Engine accuracy and agreement with onnxruntime on ``test_ds``; overflow on its first images (counted in
    the same engine pass where it runs: the engine is exact per image, so splitting a batch changes nothing)."""
    check_requant(g, options.requant)
    result: dict = {"engine_options": options.to_dict()}
    y = test_ds.labels
    n_over = min(options.overflow_images, len(test_ds)) if options.overflow else 0
    stats = OverflowStats()
    if options.engine:
        chunks, start = [], 0
        for x, _ in batches(test_ds, batch_size, desc="integer engine"):
            chunks.append(_run_counting(g, x, options, stats, n_over - start)[g.output_names[0]])
            start += len(x)
        logits = np.concatenate(chunks)
        lsb_diff = np.abs(logits.astype(np.float64) - onnx_logits.astype(np.float64)) / output_lsb(g)
        steps = np.rint(lsb_diff)
        result["engine"] = {"top1": metrics.top1(logits, y), "flips_vs_onnx": metrics.flips(logits, onnx_logits)}
        result["engine_vs_onnx"] = {"mismatch_fraction": float((steps >= 1).mean()),
                                    "max_abs_diff": float(steps.max()), "elements": int(steps.size)}
        if options.overflow:
            result["overflow"] = _overflow_fields(g, stats, n_over, options)
    elif options.overflow:
        idx = np.arange(n_over)
        result["overflow"] = overflow_summary(g, (x for x, _ in batches(test_ds, batch_size, idx,
                                                                         desc="overflow statistics")), options)
    return result


def _run_counting(g: IntGraph, x: np.ndarray, options: AnalyzeOptions, stats: OverflowStats,
                  counted: int) -> dict[str, np.ndarray]:
    """The engine's outputs on ``x``, overflow counted in ``stats`` on its first ``counted`` inputs only."""
    counted = max(0, min(counted, len(x)))
    kw = dict(requant=options.requant, accumulator_bits=options.accumulator_bits, overflow=options.overflow_mode)
    if counted in (0, len(x)):
        return run_narrow_threads(g, x, stats=stats if counted else None, **kw)
    head, tail = run_narrow_threads(g, x[:counted], stats=stats, **kw), run_narrow_threads(g, x[counted:], **kw)
    return {k: np.concatenate([head[k], tail[k]]) for k in head}


def run_narrow_threads(g: IntGraph, x: np.ndarray, *, accumulator_bits: int, stats: OverflowStats | None = None,
                       workers: int | None = None, **kw) -> dict[str, np.ndarray]:
    """``run``, with a narrow accumulator (under 32 bits) on up to ``workers`` contiguous slices of ``x`` at once in
    threads (default: the usable cores). The narrow register's GEMMs are kept small and single-threaded on purpose
    (``narrow.NARROW_GEMM``), and numpy releases the GIL in its array work: ResNet-20 at 16 bits runs 1.6-1.8x
    faster on two cores. The engine is exact per input, so the outputs (concatenated in order) are ``run``'s; each
    slice counts overflow into its own ``OverflowStats``, merged into ``stats`` in slice order. A 32-bit
    accumulator runs as ``run`` (its large GEMMs already use every core)."""
    x = np.asarray(x, dtype=np.float32)
    workers = min(workers or usable_cores(), len(x)) if accumulator_bits < 32 else 1
    if workers <= 1:
        return run(g, x, accumulator_bits=accumulator_bits, stats=stats, **kw)
    bounds = np.linspace(0, len(x), workers + 1).round().astype(int)
    parts = [OverflowStats() if stats is not None else None for _ in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        outs = list(pool.map(lambda i: run(g, x[bounds[i]:bounds[i + 1]], accumulator_bits=accumulator_bits,
                                           stats=parts[i], **kw), range(workers)))
    for part in parts:
        if part is not None:
            stats.merge(part)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def overflow_summary(g: IntGraph, images, options: AnalyzeOptions) -> dict:
    """Per-layer and per-filter overflow counts of the engine over the batches ``images`` yields."""
    stats, seen = OverflowStats(), 0
    for x in images:
        run_narrow_threads(g, x, requant=options.requant, accumulator_bits=options.accumulator_bits,
                           overflow=options.overflow_mode, stats=stats)
        seen += len(x)
    return _overflow_fields(g, stats, seen, options)


def _overflow_fields(g: IntGraph, stats: OverflowStats, seen: int, options: AnalyzeOptions) -> dict:
    layer_name = {n.name: n.attrs.get("module", n.name) for n in g.layers()}
    rows = [{**r, "name": layer_name.get(r["name"], r["name"])} for r in stats.layers()]
    per_filter = {layer_name.get(r["name"], r["name"]): {k: v.tolist() for k, v in stats.per_filter(r["name"]).items()}
                  for r in stats.layers()}
    return {"images": seen, "accumulator_bits": options.accumulator_bits,
            "mode": options.overflow_mode, "layers": rows, "per_filter": per_filter}


def output_steps(g: IntGraph) -> dict[str, float | None]:
    """The quantization step of each model output dequantized from integer codes (None for float outputs)."""
    producer = {o: n for n in g.nodes for o in n.outputs}
    steps: dict[str, float | None] = {}
    for name in g.output_names:
        node = producer.get(name)
        q = g.qparams.get(node.inputs[0]) if node is not None and node.op == "DequantizeLinear" else None
        steps[name] = q.scale if q is not None else None
    return steps


def analyze_outputs(g: IntGraph, x: np.ndarray, onnx_outputs: dict[str, np.ndarray], fp32_outputs: dict[str, np.ndarray],
                    options: AnalyzeOptions, batch_size: int = 64) -> dict:
    """``analyze`` for any model (the fidelity task): per output, the engine's agreement with onnxruntime's INT8
    outputs (in output steps) and with the FP32 model (SQNR); overflow statistics on the first inputs.
    ``onnx_outputs`` / ``fp32_outputs`` are in the model's output order (their names may differ from ``g``'s)."""
    from .eval.fidelity import fidelity

    check_requant(g, options.requant)
    result: dict = {"engine_options": options.to_dict()}
    n_over = min(options.overflow_images, len(x)) if options.overflow else 0
    stats = OverflowStats()
    if options.engine:  # overflow counted in the same pass, on the first inputs
        chunks = [_run_counting(g, x[i:i + batch_size], options, stats, n_over - i) for i in range(0, len(x), batch_size)]
        names = list(onnx_outputs)
        engine = {n: np.concatenate([c[k] for c in chunks]) for n, k in zip(names, g.output_names)}
        steps = dict(zip(names, output_steps(g).values()))
        per_output = {}
        for n in names:
            diff = np.abs(engine[n].astype(np.float64) - onnx_outputs[n].astype(np.float64))
            step = steps[n]
            in_steps = np.rint(diff / step) if step else None
            per_output[n] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
                             **({"max_diff_steps": float(in_steps.max()), "mismatch_fraction":
                                 float((in_steps >= 1).mean())} if in_steps is not None else {})}
        result["engine_vs_onnx"] = per_output
        result["engine"] = {"fidelity_vs_fp32": fidelity(fp32_outputs, engine)}
        if options.overflow:
            result["overflow"] = _overflow_fields(g, stats, n_over, options)
    elif options.overflow:
        result["overflow"] = overflow_summary(g, (x[i:min(i + batch_size, n_over)] for i in range(0, n_over, batch_size)),
                                              options)
    return result

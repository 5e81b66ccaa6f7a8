"""onnxruntime side of evaluation: sessions, accuracy, what the runtime fused, and latency.

Latency is only meaningful as a ratio measured in one process: ``latency_ms`` creates one session per
model with the same options and times them **interleaved** (one run of each in turn, many rounds), so
machine noise hits every model alike, and reports the median.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["INTEGER_CONV_OPS", "FLOAT_CONV_OPS", "session", "predict", "predict_all", "optimized_op_counts", "QDQ_OPS",
           "MOVEMENT_OPS", "op_category", "float_ops_profile", "integer_convs", "latency_ms", "paired_ratio",
           "fp32_int8_latency", "latency_samples"]


INTEGER_CONV_OPS = ("QLinearConv", "NhwcQLinearConv")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "ConvInteger")


def session(path: str | Path | bytes, *, threads: int = 1, optimized_path: str | Path | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle sessions must not steal cores
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    source = path if isinstance(path, bytes) else str(path)  # a file, or a serialized model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def predict_all(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every output of the model, by name, over ``x`` in batches (``batch_size`` 1 for fixed-batch models)."""
    name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    outs = [sess.run(None, {name: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def optimized_op_counts(path: str | Path) -> Counter:
    """Op types in the graph onnxruntime actually runs (after its QDQ fusions), at the EXTENDED level.

    EXTENDED is where the QDQ -> QLinear* fusions happen; the ALL level only adds layout changes
    (NCHWc) that would hide float convs under other names.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        session(path, optimized_path=out, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        return Counter(n.op_type for n in onnx.load(out).graph.node)


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MOVEMENT_OPS = ("Reshape", "Transpose", "Slice", "Gather", "Pad", "Flatten", "Identity", "Squeeze", "Unsqueeze",
                "Concat", "Split", "MaxPool", "Resize", "DepthToSpace", "SpaceToDepth", "Cast", "Shape")


def op_category(op: str) -> str:
    """``integer`` (onnxruntime's integer kernels), ``qdq`` (conversions), ``movement`` or ``float`` compute."""
    if op.startswith("QLinear") or op in ("QGemm", "ConvInteger", "MatMulInteger", "NhwcQLinearConv",
                                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        return "integer"
    if op in QDQ_OPS:
        return "qdq"
    if op in MOVEMENT_OPS or op.startswith("Reorder") or op.endswith("MaxPool"):
        return "movement"
    return "float"


def float_ops_profile(path: str | Path, input_shape: tuple[int, ...], *, runs: int = 10, threads: int = 1,
                      batch: int = 1) -> dict:
    """What keeps an INT8 model from being all-integer: the float compute ops left in the graph onnxruntime runs
    and the share of kernel time per category (onnxruntime's own profiler, ``runs`` batch-1 runs)."""
    import json

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
        for _ in range(runs):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    time_by_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            time_by_op[e.get("args", {}).get("op_name", "?")] += float(e.get("dur", 0))
    total = sum(time_by_op.values()) or 1.0
    share: Counter = Counter()
    for op, t in time_by_op.items():
        share[op_category(op)] += t / total
    counts = optimized_op_counts(path)
    return {"float_ops": {op: n for op, n in sorted(counts.items()) if op_category(op) == "float"},
            "time_share": {k: round(share.get(k, 0.0), 4) for k in ("integer", "float", "qdq", "movement")},
            "float_time_by_op": {op: round(t / total, 4) for op, t in time_by_op.most_common()
                                 if op_category(op) == "float"}}


def integer_convs(path: str | Path) -> tuple[int, int]:
    """(convolutions running as integer kernels, all convolutions) in onnxruntime's optimized graph."""
    counts = optimized_op_counts(path)
    integer = sum(counts[o] for o in INTEGER_CONV_OPS)
    return integer, integer + sum(counts[o] for o in FLOAT_CONV_OPS)


def latency_ms(paths: dict[str, Path], input_shape: tuple[int, ...], batch: int, *, threads: int = 1,
               rounds: int = 100, warmup: int = 10, seed: int = 0) -> dict[str, float]:
    """Median wall time per inference (ms) of each model, measured interleaved in this process."""
    samples = latency_samples(paths, input_shape, batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed)
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(samples: dict[str, list[float]], model: str, reference: str) -> float:
    """Median over rounds of ``model`` time / ``reference`` time *in the same round*.

    Pairing cancels the slow drifts of a shared machine that make two medians disagree.
    """
    return statistics.median(a / b for a, b in zip(samples[model], samples[reference]))


def fp32_int8_latency(fp32: Path, int8: Path, input_shape: tuple[int, ...], *, threads: int = 1, rounds: int = 50,
                      warmup: int = 10) -> dict:
    """The FP32 and INT8 files at batch 1, interleaved: median ms of each, the paired INT8 / FP32 ratio, FPS."""
    lat = latency_samples({"fp32": fp32, "int8": int8}, input_shape, 1, threads=threads, rounds=rounds, warmup=warmup)
    fp32_ms, int8_ms = statistics.median(lat["fp32"]), statistics.median(lat["int8"])
    return {"fp32": fp32_ms, "int8": int8_ms, "int8_over_fp32": paired_ratio(lat, "int8", "fp32"),
            "fps_fp32": 1e3 / fp32_ms, "fps_int8": 1e3 / int8_ms, "batch": 1, "threads": threads}


def latency_samples(paths: dict[str, Path], input_shape: tuple[int, ...], batch: int, *, threads: int = 1,
                    rounds: int = 100, warmup: int = 10, seed: int = 0, seconds: float | None = None,
                    min_rounds: int = 20) -> dict[str, list[float]]:
    """Per-round wall times (ms) of each model, interleaved: one run of each model per round.

    ``seconds``: stop early once the measured rounds took this long and at least ``min_rounds`` are done (a
    large batch on one thread needs fewer rounds for a stable paired median than a 1-ms model)."""
    sessions = {k: session(p, threads=threads) for k, p in paths.items()}
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    start = None
    for i in range(warmup + rounds):
        if i == warmup:
            start = time.perf_counter()
        elif start is not None and seconds is not None and i - warmup >= min_rounds \
                and time.perf_counter() - start > seconds:
            break
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate who goes first each round
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times

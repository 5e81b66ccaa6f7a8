"""Peer quantizers and measurement helpers for side-by-side benchmarks.

Every peer takes the same FP32 ONNX model (one float32 NCHW input with a dynamic batch
dim) and the same calibration images (float32 ``N,C,H,W``, already normalised) and
writes a QDQ INT8 ONNX model.  A peer never raises: failure (or a missing package) is
reported in :attr:`PeerResult.error`.

Measurement helpers run onnxruntime's CPU provider:

* :func:`op_type_counts` / :func:`count_integer_convs` look at the graph onnxruntime
  actually executes (``optimized_model_filepath``), because a QDQ model only runs integer
  kernels where onnxruntime fuses ``DQ -> Conv -> Q`` into ``QLinearConv``.  That fusion
  happens at ORT_ENABLE_EXTENDED; ORT_ENABLE_ALL then rewrites ``QLinearConv`` into
  ``com.microsoft.QLinearConv`` (NHWC, wrapped in Transposes) and float convs into
  ``com.microsoft.nchwc.Conv``.  The ALL-level file loads with ``onnx.load`` (and passes
  ``onnx.checker``) but is tied to the machine that produced it; we only count it.
  On x86, ORT fuses Conv only with uint8 activations: int8 Q->DQ pairs are rewritten to
  uint8 first, and only where a Q feeds exactly one adjacent DQ.  So int8-activation
  models keep every conv that reads a fanned-out tensor (residual inputs) or a kept
  Relu in float (see ``bench/probe_ort_fusion.py``).
* :func:`latency_ms` times models interleaved (round-robin), so drift in machine load
  hits every model alike.
* :func:`evaluate_top1` is plain batched top-1 accuracy.

    python -m bench.peers model.onnx calib.npy --out /tmp/peers
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PeerResult",
    "ort_quantize_static",
    "nncf_quantize",
    "op_type_counts",
    "count_integer_convs",
    "latency_ms",
    "evaluate_top1",
    "INTEGER_CONV_OPS",
    "FLOAT_CONV_OPS",
]

# op_type (any domain) of convolutions that run integer arithmetic / float arithmetic.
INTEGER_CONV_OPS = frozenset({"QLinearConv", "NhwcQLinearConv", "ConvInteger"})
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv"})

_DEFAULT_DOMAINS = ("", "ai.onnx")
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True)
class PeerResult:
    name: str
    path: Path | None
    seconds: float  # time to quantize, pre-processing and calibration included
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _input_name(model_path: Path) -> str:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"expected one graph input, got {names}")
    return names[0]


def _batches(calib: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    for i in range(0, len(calib), batch_size):
        yield calib[i:i + batch_size]


# --------------------------------------------------------------------------- ORT

_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ORT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def ort_quantize_static(
    fp32_onnx: Path,
    calib: np.ndarray,
    out: Path,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    activation_type: str = "uint8",
    activation_symmetric: bool | None = None,
    calib_batch: int = 16,
    preprocess: bool = True,
    num_bins: int | None = None,
    num_quantized_bins: int | None = None,
) -> PeerResult:
    """``onnxruntime.quantization.quantize_static`` in QDQ format (int8 weights).

    ``activation_symmetric=None`` keeps ORT's default (asymmetric activations, also for
    int8).  ``calib_batch`` images go through each calibration run: every ORT calibrator
    reduces over the batch dim (MinMax takes min/max, histograms collect all values), so
    any batch size gives the same ranges with a dynamic batch dim (checked: identical
    scales for 1, 16, 64); 16 is faster than 1 (fewer session runs).
    ``preprocess`` runs ``quant_pre_process`` first (ORT's recommended step: symbolic
    shape inference + basic graph optimisation), timed as part of quantization.

    Histogram size: ``quantize_static`` does not forward ``num_bins`` /
    ``num_quantized_bins``, and ORT's entropy defaults (128 / 128) leave a single KL
    candidate, i.e. the full range: with defaults "entropy" gives the same ranges as
    "minmax" (checked on onnxruntime 1.31).  Passing ``num_bins`` (e.g. 2048, with
    ``num_quantized_bins`` 128 or 256 for entropy) calibrates with ``create_calibrator``
    directly and hands the ranges to ``quantize_static`` through its calibration cache.
    """
    sym = "" if activation_symmetric is None else ("-sym" if activation_symmetric else "-asym")
    bins = "" if num_bins is None else f"-{num_bins}b" + ("" if num_quantized_bins is None else f"{num_quantized_bins}q")
    name = (f"ort-{method}{bins}-{'pc' if per_channel else 'pt'}-"
            f"{'u8' if activation_type == 'uint8' else 's8'}{sym}")
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            create_calibrator,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, 0.0, f"onnxruntime.quantization unavailable: {_one_line(e)}")
    if method not in _ORT_METHODS:
        return PeerResult(name, None, 0.0, f"unknown method {method!r}; use {sorted(_ORT_METHODS)}")
    if activation_type not in _ORT_TYPES:
        return PeerResult(name, None, 0.0, f"unknown activation_type {activation_type!r}")
    if num_bins is not None and method == "minmax":
        return PeerResult(name, None, 0.0, "num_bins applies to entropy/percentile only")
    if preprocess:
        try:  # quant_pre_process imports sympy lazily (~2 s): keep that out of the timing
            import onnxruntime.tools.symbolic_shape_infer  # noqa: F401
        except Exception:  # noqa: BLE001
            pass

    class _Reader(CalibrationDataReader):
        def __init__(self, input_name: str):
            self.input_name = input_name
            self.it = _batches(calib, calib_batch)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {self.input_name: b}

        def rewind(self):  # not called by quantize_static, but harmless
            self.it = _batches(calib, calib_batch)

    extra = {}
    if activation_symmetric is not None:
        extra["ActivationSymmetric"] = bool(activation_symmetric)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = fp32_onnx
            if preprocess:
                src = Path(tmp) / "pre.onnx"
                quant_pre_process(str(fp32_onnx), str(src))
            cal_method = getattr(CalibrationMethod, _ORT_METHODS[method])
            reader, cache = _Reader(_input_name(fp32_onnx)), None
            if num_bins is not None:
                from onnxruntime.quantization.calibrate import save_tensors_data

                opts = {"num_bins": int(num_bins)}
                if num_quantized_bins is not None and method == "entropy":
                    opts["num_quantized_bins"] = int(num_quantized_bins)
                cal = create_calibrator(src, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                        calibrate_method=cal_method, extra_options=opts)
                cal.collect_data(reader)
                cache = Path(tmp) / "ranges.json"
                save_tensors_data(cal.compute_data(), cache)
                reader = None
                del cal
            quantize_static(
                str(src),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=getattr(QuantType, _ORT_TYPES[activation_type]),
                weight_type=QuantType.QInt8,
                calibrate_method=cal_method,
                extra_options=extra,
                # only when needed: the argument is new in recent onnxruntime releases
                **({} if cache is None else {"calibration_cache_path": str(cache)}),
            )
    except Exception as e:  # noqa: BLE001 - a failed peer is a result
        return PeerResult(name, None, time.perf_counter() - t0, _one_line(e))
    return PeerResult(name, out, time.perf_counter() - t0)


# -------------------------------------------------------------------------- NNCF

_NNCF_LAZY_MODULES = (
    "nncf.onnx.quantization.quantize_model",
    "nncf.onnx.statistics.aggregator",
    "nncf.quantization.algorithms.min_max.onnx_backend",
    "nncf.quantization.algorithms.fast_bias_correction.onnx_backend",
    "nncf.quantization.algorithms.bias_correction.onnx_backend",
)


def nncf_quantize(
    fp32_onnx: Path,
    calib: np.ndarray,
    out: Path,
    *,
    preset: str = "performance",
    fast_bias_correction: bool = True,
) -> PeerResult:
    """NNCF post-training quantization with its ONNX backend (one image per sample).

    ``preset="performance"``: symmetric weights and activations; ``"mixed"``: asymmetric
    activations.  The bias-correction pass NNCF runs by default is part of the timing.
    """
    name = f"nncf-{preset}"
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    try:
        import nncf
        import onnx
    except ImportError:
        return PeerResult(name, None, 0.0, "nncf not installed")
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, 0.0, f"nncf import failed: {_one_line(e)}")
    try:
        preset_enum = nncf.QuantizationPreset(preset)
    except ValueError:
        return PeerResult(name, None, 0.0, f"unknown preset {preset!r}; use 'performance' or 'mixed'")
    for mod in _NNCF_LAZY_MODULES:  # imported on first use (~2 s): keep out of the timing
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        model = onnx.load(str(fp32_onnx))
        input_name = _input_name(fp32_onnx)
        samples = list(_batches(calib, 1))
        dataset = nncf.Dataset(samples, lambda x: {input_name: x})
        qmodel = nncf.quantize(
            model,
            dataset,
            preset=preset_enum,
            subset_size=len(samples),
            fast_bias_correction=fast_bias_correction,
        )
        onnx.save(qmodel, str(out))
    except Exception as e:  # noqa: BLE001
        return PeerResult(name, None, time.perf_counter() - t0, _one_line(e))
    return PeerResult(name, out, time.perf_counter() - t0)


# ---------------------------------------------------------------- ORT inspection


def _session_options(threads: int, level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3  # the ALL-level "hardware specific" serialisation warning
    return so


def op_type_counts(onnx_path: Path, *, level: str = "all", threads: int = 1) -> dict[str, int]:
    """Op types of the graph onnxruntime (CPU) runs after optimisation at ``level``.

    Keys are ``op_type`` for the default domain and ``"<domain>.<op_type>"`` otherwise
    (``com.microsoft.QLinearConv``, ``com.microsoft.nchwc.Conv``).
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        so = _session_options(threads, level)
        so.optimized_model_filepath = opt
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(opt)
    c = Counter(
        n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"
        for n in model.graph.node
    )
    return dict(sorted(c.items()))


def count_integer_convs(onnx_path: Path, threads: int = 1, *, level: str = "all") -> tuple[int, int]:
    """(integer convs, all convs) in onnxruntime's optimised graph.

    Integer: ``QLinearConv`` (ONNX or com.microsoft NHWC), ``NhwcQLinearConv``,
    ``ConvInteger``.  Float: ``Conv`` (any domain, incl. com.microsoft.nchwc),
    ``FusedConv``, ``NhwcConv``, ``NhwcFusedConv``.
    """
    counts = op_type_counts(onnx_path, level=level, threads=threads)
    integer = total = 0
    for key, n in counts.items():
        op = key.rsplit(".", 1)[-1]
        if op in INTEGER_CONV_OPS:
            integer += n
            total += n
        elif op in FLOAT_CONV_OPS:
            total += n
    return integer, total


# ----------------------------------------------------------------------- timing


def _session(path: Path, threads: int, allow_spinning: bool):
    import onnxruntime as ort

    so = _session_options(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _input_array(sess, batch: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    shape = list(inp.shape)
    if shape and not isinstance(shape[0], int):
        shape[0] = batch
    elif shape and shape[0] != batch:
        raise ValueError(f"{inp.name} has fixed batch {shape[0]}, asked for {batch}")
    if any(not isinstance(d, int) for d in shape):
        raise ValueError(f"{inp.name}: non-batch dynamic dims in {inp.shape}")
    return inp.name, rng.standard_normal(shape).astype(np.float32)


def latency_ms(
    paths: dict[str, Path],
    batch: int,
    *,
    threads: int = 1,
    runs: int = 200,
    warmup: int = 20,
    allow_spinning: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall-clock ms per ``session.run`` for each model, measured interleaved.

    One session per model (``threads`` intra-op, 1 inter-op, sequential, ORT_ENABLE_ALL).
    Each round runs every model once, in an order rotated every round.  Intra-op spinning
    is off by default so an idle pool of one session cannot steal cores from the next one.
    """
    rng = np.random.default_rng(seed)
    names = list(paths)
    sessions, feeds = {}, {}
    for n in names:
        s = _session(Path(paths[n]), threads, allow_spinning)
        iname, x = _input_array(s, batch, rng)
        sessions[n], feeds[n] = s, {iname: x}
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter_ns()
            sessions[n].run(None, feeds[n])
            times[n].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: statistics.median(times[n]) for n in names}


def evaluate_top1(onnx_path: Path, x: np.ndarray, y: np.ndarray, batch: int = 256, *, threads: int = 0) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the model's first output on ``x``/``y``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    correct = 0
    for i, xb in enumerate(_batches(x, batch)):
        logits = sess.run(None, {name: xb})[0]
        correct += int((logits.argmax(axis=1) == y[i * batch:i * batch + len(xb)]).sum())
    return correct / max(len(y), 1)


# -------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Quantize an FP32 ONNX model with peer tools and compare.")
    p.add_argument("model", type=Path)
    p.add_argument("calib", type=Path, help=".npy float32 N,C,H,W")
    p.add_argument("--out", type=Path, default=Path("peers_out"))
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=100)
    a = p.parse_args(argv)
    calib = np.load(a.calib)
    results = [
        ort_quantize_static(a.model, calib, a.out / "ort_u8.onnx", activation_type="uint8"),
        ort_quantize_static(a.model, calib, a.out / "ort_s8.onnx", activation_type="int8"),
        nncf_quantize(a.model, calib, a.out / "nncf.onnx"),
    ]
    paths = {"fp32": a.model}
    for r in results:
        print(f"{r.name:24s} {r.seconds:7.2f}s  {r.error or r.path}")
        if r.ok:
            paths[r.name] = r.path
    for n, pth in paths.items():
        print(f"{n:24s} integer/total convs = {count_integer_convs(pth, a.threads)}")
    for b in a.batches:
        lat = latency_ms(paths, b, threads=a.threads, runs=a.runs)
        print(f"batch {b}: " + ", ".join(f"{n} {v:.3f} ms ({v / lat['fp32']:.2f}x)" for n, v in lat.items()))


if __name__ == "__main__":
    main()

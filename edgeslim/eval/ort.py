"""onnxruntime side of evaluation: sessions, accuracy, what the runtime fused, and latency.

Latency is only meaningful as a ratio measured in one process: ``latency_ms`` creates one session per
model with the same options and times them **interleaved** (one run of each in turn, many rounds), so
machine noise hits every model alike, and reports the median.

Scoring many models that differ in a few layers on the same inputs (sweeps, group tables, searches): inside
``shared_work()`` the sessions ``session`` returns compute what the models share once (``SharedSession``, see
"shared work across models" below); the outputs are the same bits as each model's own session gives.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from tqdm import tqdm

__all__ = ["SHARED_MIN_INPUTS", "INTEGER_CONV_OPS", "FLOAT_CONV_OPS", "session", "predict", "predict_all",
           "optimized_op_counts", "QDQ_OPS", "MOVEMENT_OPS", "op_category", "float_ops_profile", "integer_convs",
           "latency_ms", "paired_ratio", "fp32_int8_latency", "latency_samples", "paired_latencies",
           "tensor_signatures", "TensorCache", "SharedSession", "NodeArg", "shared_work"]


INTEGER_CONV_OPS = ("QLinearConv", "NhwcQLinearConv")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "ConvInteger")


SHARED_MIN_INPUTS = 256  # inside shared_work(), a model run on fewer inputs gets a session of its own (below)


def session(path: str | Path | bytes, *, threads: int = 1, optimized_path: str | Path | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            inputs: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session of a file or serialized model (inside ``shared_work()``: a ``SharedSession``).

    ``inputs``: how many inputs the caller will run, where it knows. Sharing costs each file a second optimization
    (onnxruntime's saved graph), an analysis of its cuts and a session per part, and each run a digest and copies
    of the tensors it keeps: a file run on fewer than ``SHARED_MIN_INPUTS`` inputs does not earn that back (a
    detector's keep-high sweep on 32 held-out images, one image per run: 59-63 s alone vs 67-72 s shared), and
    gets a session of its own inside ``shared_work()`` too. Every path gives the file's own bits."""
    if _SHARED and optimized_path is None and (inputs is None or inputs >= SHARED_MIN_INPUTS):
        model = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
        runtime = _runtime_graph(path, threads, level)
        if runtime is None:  # onnxruntime could not save its graph: cut the file's own graph at integer codes
            return SharedSession(model, _SHARED[-1], lambda b: _plain_session(b, threads=threads, level=level))
        return SharedSession(runtime, _SHARED[-1], lambda b: _plain_session(b, threads=threads, level=_AS_SAVED),
                             types_from=model)
    return _plain_session(path, threads=threads, optimized_path=optimized_path, level=level)


def _plain_session(path: str | Path | bytes, *, threads: int = 1, optimized_path: str | Path | None = None,
                   level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                   ) -> ort.InferenceSession:
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


_AS_SAVED = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a graph onnxruntime already optimized runs as it is


def _runtime_graph(source: str | Path | bytes, threads: int, level: ort.GraphOptimizationLevel
                   ) -> onnx.ModelProto | None:
    """The graph onnxruntime runs for ``source`` (its fusions and layout changes applied, as it saves them), or
    None where it cannot save it. Run as saved (no further optimization), it gives the file's own bits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "runtime.onnx")
        try:
            _plain_session(source, threads=threads, optimized_path=out, level=level)
            return onnx.load(out)
        except (ort.capi.onnxruntime_pybind11_state.Fail, OSError):  # onnxruntime refused to save it
            return None


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
                      warmup: int = 10, seconds: float | None = None) -> dict:
    """The FP32 and INT8 files at batch 1, interleaved: median ms of each, the paired INT8 / FP32 ratio, FPS and
    the rounds measured (``seconds``: as ``latency_samples``)."""
    lat = latency_samples({"fp32": fp32, "int8": int8}, input_shape, 1, threads=threads, rounds=rounds, warmup=warmup,
                          seconds=seconds)
    fp32_ms, int8_ms = statistics.median(lat["fp32"]), statistics.median(lat["int8"])
    return {"fp32": fp32_ms, "int8": int8_ms, "int8_over_fp32": paired_ratio(lat, "int8", "fp32"),
            "fps_fp32": 1e3 / fp32_ms, "fps_int8": 1e3 / int8_ms, "batch": 1, "threads": threads,
            "rounds": len(lat["int8"])}


def latency_samples(paths: dict[str, Path], input_shape: tuple[int, ...], batch: int, *, threads: int = 1,
                    rounds: int = 100, warmup: int = 10, seed: int = 0, seconds: float | None = None,
                    min_rounds: int = 20, warmup_seconds: float = 0.25) -> dict[str, list[float]]:
    """Per-round wall times (ms) of each model, interleaved: one run of each model per round.

    ``seconds``: stop early once the measured rounds took this long and at least ``min_rounds`` are done (a
    large batch on one thread needs fewer rounds for a stable paired median than a 1-ms model). Warm-up is
    ``warmup`` rounds or, once two are done, ``warmup_seconds`` (a batch-64 round of two models takes 0.1 s:
    its first rounds pay for the allocations, the next ones only repeat the measurement)."""
    sessions = {k: _plain_session(p, threads=threads) for k, p in paths.items()}  # timed: never shared
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    t_warm, start, measured = time.perf_counter(), None, 0
    for i in range(warmup + rounds):
        if start is None and (i >= warmup or (i >= 2 and time.perf_counter() - t_warm > warmup_seconds)):
            start = time.perf_counter()
        if start is not None:
            if measured >= rounds or (seconds is not None and measured >= min_rounds
                                      and time.perf_counter() - start > seconds):
                break
            measured += 1
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate who goes first each round
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            if start is not None:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_latencies(paths: Mapping[str, Path], reference: Path, input_shape: tuple[int, ...], batch: int, *,
                     threads: int = 1, rounds: int = 100, seconds: float | None = None, group: int = 8,
                     desc: str | None = None) -> tuple[float, dict[str, tuple[float, float]]]:
    """Many models timed against one ``reference`` (the FP32 file): ``(reference median ms, {key: (median ms,
    paired ratio to the reference)})``.

    The models are timed interleaved in groups of at most ``group`` (sessions held at once), the reference in
    every group, so each ratio is paired within a round and every model of a group sees the same machine. A
    round runs each model of its group once, so ``seconds`` (the time bound of ``latency_samples``) is scaled by
    the group's size over two: each model is measured about as long as it would be timed alone beside the
    reference, and the reference is run once per round of the group rather than once per model."""
    keys = list(paths)
    ref_key = "\0reference"  # no user key can collide with it
    ref_samples: list[float] = []
    out: dict[str, tuple[float, float]] = {}
    chunks = [keys[i:i + group] for i in range(0, len(keys), max(1, group))]
    for chunk in tqdm(chunks, desc=desc, unit="group", disable=desc is None or len(chunks) < 2, leave=False):
        budget = None if seconds is None else seconds * (len(chunk) + 1) / 2
        s = latency_samples({ref_key: reference, **{k: paths[k] for k in chunk}}, input_shape, batch, threads=threads,
                            rounds=rounds, seconds=budget)
        ref_samples += s[ref_key]
        out.update({k: (statistics.median(s[k]), paired_ratio(s, k, ref_key)) for k in chunk})
    if not ref_samples:  # no models: the reference alone
        ref_samples = latency_samples({ref_key: reference}, input_shape, batch, threads=threads, rounds=rounds,
                                      seconds=seconds)[ref_key]
    return statistics.median(ref_samples), out


# ----------------------------------------------------------------------------- shared work across models

# Many models scored on the same inputs (a sensitivity sweep: one plan per layer; a group table; a search) differ
# in a few layers: everything upstream of the first difference is the same computation on the same data. Inside
# ``shared_work()``, ``session`` returns a ``SharedSession`` that computes such a prefix once: each tensor gets a
# content signature (a Merkle hash of its producer's op, attributes, constant inputs and its inputs' signatures,
# as in common-subexpression elimination), and a run feeds the deepest *frontier* (every live tensor after some
# node) whose values the cache already holds for this input into a session of the rest of the model.
#
# A cut must not change a bit. The graph cut is the one onnxruntime runs: ``session`` has onnxruntime optimize the
# file and save the result (its QDQ fusions, Conv + Add + ReLU fusions, NCHWc layout), and every part is a piece of
# that graph run as saved, with no further optimization, so each node runs the same kernel on the same values as in
# the whole model and any tensor can be cut at, float ones included (a float prefix shared by the rows of a group
# table). Cutting the file's own graph instead, a float ResNet-20 cut after a ReLU differs in the last bits
# (onnxruntime picks other float kernels and fusions for a graph that starts there); so where onnxruntime cannot
# save its graph the file's graph is cut only at integer codes (the output of QuantizeLinear, or of the Clip that
# narrows them to fewer bits), where its QDQ fusions end. tests/jobs/test_mixed_fast.py checks the outputs are the
# whole model's bits. The cache is keyed by the input's digest and the tensor's signature, so a value is only ever
# reused for the same computation on the same data.

_CUT_PRODUCERS = ("QuantizeLinear", "Clip")
# ops whose output has their first input's element type (to type the tensors onnxruntime's saved graph adds)
_SAME_TYPE_OPS = ("Relu", "Clip", "Add", "Sum", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "FusedConv",
                  "Conv", "Sigmoid", "HardSigmoid", "Flatten", "Reshape", "Transpose", "Slice", "Pad", "Concat")
# integer ops whose output has the element type of their output zero point (the input at this index)
_ZERO_POINT_INPUT = {"QuantizeLinear": 2, "QLinearConv": 7, "NhwcQLinearConv": 7, "QLinearAdd": 7, "QLinearMul": 7,
                     "QLinearGlobalAveragePool": 4, "QLinearAveragePool": 4, "QLinearLeakyRelu": 4,
                     "QLinearSigmoid": 4, "QLinearSoftmax": 4, "QLinearConcat": 1, "QGemm": 8, "QLinearMatMul": 7}
_INTEGER_TYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT16}


def _digest(*parts) -> bytes:
    """A 16-byte digest of byte strings or C-contiguous arrays (SHA-256: hardware-accelerated on current x86 and
    ARM CPUs, about 3x blake2b here; a run hashes its whole input batch)."""
    h = hashlib.sha256()
    for p in parts:
        b = memoryview(p).cast("B")
        h.update(b.nbytes.to_bytes(8, "little"))
        h.update(b)
    return h.digest()[:16]


def tensor_signatures(model: onnx.ModelProto) -> dict[str, bytes]:
    """Content signature of every tensor of ``model``: two tensors of any two models with equal signatures hold
    the same values for the same graph inputs (graph inputs are signed by position, constants by content)."""
    g = model.graph
    sig = {i.name: _digest(b"input", str(k).encode()) for k, i in enumerate(g.input)}
    for init in g.initializer:  # by content, not by name
        a = numpy_helper.to_array(init)
        sig[init.name] = _digest(b"const", f"{a.dtype}{a.shape}".encode(), np.ascontiguousarray(a).tobytes())
    sig[""] = b""
    for node in g.node:
        attrs = b"".join(a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name))
        base = [node.op_type.encode(), node.domain.encode(), attrs, *(sig[t] for t in node.input)]
        for j, out in enumerate(node.output):
            sig[out] = _digest(*base, str(j).encode())
    return sig


class TensorCache:
    """Tensor values by (input digest, signature), at most ``max_bytes`` in all.

    Each input's first values, up to ``max_bytes / shares``, are *pinned* together (a reference model scored first
    keeps its values while every plan after it reuses them); later values are kept one by one. When the cache is
    over ``max_bytes``, the least recently used item goes first, an item being an input's pinned values (used when
    any of them is read) or one later value. So a sweep over four held-out batches keeps each batch's reference and
    its latest plans, and a table scored batch after batch drops the batches it is done with."""

    def __init__(self, max_bytes: int, shares: int = 4) -> None:
        self.max_bytes, self.share = max_bytes, max_bytes // shares
        self.pinned: dict[bytes, dict[bytes, np.ndarray]] = {}
        self.pinned_bytes: dict[bytes, int] = {}
        self.later: dict[tuple[bytes, bytes], np.ndarray] = {}
        self.order: OrderedDict[tuple, None] = OrderedDict()  # ("pin", input) or ("one", input, signature): LRU first
        self.bytes = 0

    def get(self, key: tuple[bytes, bytes]) -> np.ndarray | None:
        value = self.pinned.get(key[0], {}).get(key[1])
        if value is not None:
            self.order.move_to_end(("pin", key[0]))
            return value
        value = self.later.get(key)
        if value is not None:
            self.order.move_to_end(("one", *key))
        return value

    def put(self, inp: bytes, values: dict[bytes, np.ndarray]) -> None:
        """Keep one run's ``values`` (by signature) on input ``inp``: pinned if it is the first run kept on it."""
        first = inp not in self.pinned
        if first:
            self.pinned[inp], self.pinned_bytes[inp] = {}, 0
            self.order[("pin", inp)] = None
        for sig, value in values.items():
            if value.nbytes > self.max_bytes or self.get((inp, sig)) is not None:
                continue
            if first and self.pinned_bytes[inp] + value.nbytes <= self.share:
                self.pinned[inp][sig] = value
                self.pinned_bytes[inp] += value.nbytes
            else:
                self.later[inp, sig] = value
                self.order[("one", inp, sig)] = None
            self.bytes += value.nbytes
        self.order.move_to_end(("pin", inp))
        while self.bytes > self.max_bytes:
            item = next(iter(self.order))
            del self.order[item]
            if item[0] == "pin":
                self.bytes -= self.pinned_bytes.pop(item[1])
                del self.pinned[item[1]]
            else:
                self.bytes -= self.later.pop(item[1:]).nbytes


class _Cuts:
    """Where ``model`` can be cut: per position (after node ``i``; -1: before the first), the live tensors."""

    def __init__(self, model: onnx.ModelProto, types_from: onnx.ModelProto | None = None) -> None:
        """``types_from``: ``model`` is onnxruntime's saved graph of this file: every tensor whose element type is
        known can be cut at (element types from the file's shape inference, by name, and the ops in between)."""
        g = model.graph
        self.model, self.sig = model, tensor_signatures(model)
        self.runtime = types_from is not None
        inferred = onnx.shape_inference.infer_shapes(types_from if self.runtime else model)
        self.types = {v.name: v.type for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
        static = {i.name for i in g.initializer} | {""}
        self.static_nodes, self.nodes = [], []
        for node in g.node:  # nodes of constants only (weights' DequantizeLinear) go into every part
            if all(t in static for t in node.input):
                self.static_nodes.append(node)
                static.update(node.output)
            else:
                self.nodes.append(node)
        inputs, outputs = {i.name for i in g.input}, {o.name for o in g.output}
        last_use = {t: len(self.nodes) if t in outputs else -1 for t in self.sig}
        for i, node in enumerate(self.nodes):
            for t in node.input:
                if t not in static:
                    last_use[t] = max(last_use[t], i)
        if self.runtime:
            self._type_runtime_tensors(g)
            self.cuttable = {t for t in self.sig if t in self.types} | inputs | outputs
        else:
            producer = {t: n.op_type for n in self.nodes for t in n.output}
            self.cuttable = {t for t in self.sig if t in outputs or t in inputs
                             or (producer.get(t) in _CUT_PRODUCERS and self._integer(t))}
        self.frontiers: list[tuple[int, tuple[str, ...]]] = []
        live = [i.name for i in g.input]
        for i in range(-1, len(self.nodes)):
            if i >= 0:
                live = [t for t in live if last_use.get(t, -1) > i] + \
                       [t for t in self.nodes[i].output if t and last_use.get(t, -1) > i]
            if live and all(t in self.cuttable for t in live):
                self.frontiers.append((i, tuple(live)))
        # the tensors a run hands the cache: one per single-tensor cut that ends a run of such cuts (a residual
        # block's output; codes after the raw QuantizeLinear output) and, in onnxruntime's graph, every single
        # tensor of integer codes (where quantized plans start to differ: a byte per value, where float tensors
        # would fill the cache four times as fast); each more one costs onnxruntime a copy
        single = {i for i, f in self.frontiers if len(f) == 1}
        by_position = dict(self.frontiers)
        self.kept = (single - {i - 1 for i in single}) | (
            {i for i in single if self._integer(by_position[i][0])} if self.runtime else set())

    def _type_runtime_tensors(self, g: onnx.GraphProto) -> None:
        """Element types (no shapes: onnxruntime's NCHWc tensors are blocked) of the saved graph's tensors: by name
        from the file's inference, else from the op (NCHWc ops and ``_SAME_TYPE_OPS`` keep their input's)."""
        elem = {t: v.tensor_type.elem_type for t, v in self.types.items()
                if v.HasField("tensor_type") and v.tensor_type.elem_type}
        elem.update({i.name: i.data_type for i in g.initializer})
        for node in g.node:
            first = elem.get(node.input[0]) if node.input else None
            zp = _ZERO_POINT_INPUT.get(node.op_type)
            if zp is not None:  # an absent output zero point: uint8 (QuantizeLinear), float (QGemm)
                present = zp < len(node.input) and node.input[zp]
                first = elem.get(node.input[zp]) if present else (
                    onnx.TensorProto.UINT8 if node.op_type == "QuantizeLinear" else
                    onnx.TensorProto.FLOAT if node.op_type == "QGemm" else None)
            elif not (node.domain == "com.microsoft.nchwc" or node.op_type in _SAME_TYPE_OPS):
                first = None
            for out in node.output[:1]:
                if out and out not in elem and first is not None:
                    elem[out] = first
        self.types = {t: helper.make_tensor_type_proto(e, None) for t, e in elem.items()}

    def _integer(self, t: str) -> bool:
        """Whether tensor ``t`` holds integer codes (8- or 16-bit)."""
        tt = self.types.get(t)
        if tt is None or not tt.HasField("tensor_type"):
            return False
        return tt.tensor_type.elem_type in _INTEGER_TYPES


@dataclass(frozen=True)
class NodeArg:
    """A model input or output as ``InferenceSession.get_inputs`` describes it (name, shape, type)."""

    name: str
    shape: list
    type: str


def _arg(v: onnx.ValueInfoProto) -> NodeArg:
    t = v.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in t.shape.dim]
    name = {onnx.TensorProto.FLOAT: "float", onnx.TensorProto.DOUBLE: "double"}.get(t.elem_type)
    return NodeArg(v.name, shape, f"tensor({name or helper.tensor_dtype_to_np_dtype(t.elem_type).name})")


class SharedSession:
    """An onnxruntime session that reuses, through ``cache``, the tensors other models of the same cache already
    computed on the same input (see above). Behaves as ``InferenceSession`` for ``run``, ``get_inputs`` and
    ``get_outputs``; its outputs are the whole model's."""

    def __init__(self, model: onnx.ModelProto, cache: TensorCache, make_session,
                 types_from: onnx.ModelProto | None = None) -> None:
        self.cuts, self.cache, self.make = _Cuts(model, types_from), cache, make_session
        self.file = model if types_from is None else types_from  # inputs and outputs as the file declares them
        self.parts: dict[int, tuple[ort.InferenceSession, list[str]]] = {}

    def get_inputs(self) -> list[NodeArg]:
        return [_arg(v) for v in self.file.graph.input]

    def get_outputs(self) -> list[NodeArg]:
        return [_arg(v) for v in self.file.graph.output]

    def _part(self, position: int, frontier: tuple[str, ...]) -> tuple[ort.InferenceSession, list[str]]:
        """The model after ``position``: inputs the frontier, outputs the model's and every later cut tensor the
        cache keeps."""
        if position not in self.parts:
            c, g = self.cuts, self.cuts.model.graph
            nodes = c.nodes[position + 1:]
            later = [f[0] for i, f in c.frontiers if i > position and i in c.kept and f[0] not in frontier]
            outs = list(dict.fromkeys([o.name for o in g.output] + later))
            used = {t for n in (*c.static_nodes, *nodes) for t in n.input}
            graph = helper.make_graph(
                [*c.static_nodes, *nodes], g.name, [helper.make_value_info(t, c.types[t]) for t in frontier],
                [helper.make_value_info(t, c.types[t]) for t in outs],
                initializer=[i for i in g.initializer if i.name in used])
            part = helper.make_model(graph, opset_imports=c.model.opset_import, ir_version=c.model.ir_version)
            self.parts[position] = (self.make(part.SerializeToString()), outs)
        return self.parts[position]

    def run(self, output_names, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        g, c = self.cuts.model.graph, self.cuts
        x = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        key = _digest(*(p for k, v in sorted(x.items()) for p in (f"{k}{v.dtype}{v.shape}".encode(), v)))
        for position, frontier in reversed(c.frontiers):  # the deepest cut whose values are known (-1: the input)
            known = {t: x[t] if t in x else self.cache.get((key, c.sig[t])) for t in frontier}
            if all(v is not None for v in known.values()):
                break
        if position < len(c.nodes) - 1:
            sess, outs = self._part(position, tuple(known))
            known.update(zip(outs, sess.run(outs, known, run_options)))
            self.cache.put(key, {c.sig[t]: known[t] for t in outs})
        return [known[t].copy() for t in (output_names or [o.name for o in g.output])]  # the cache keeps its own


_SHARED: list[TensorCache] = []


@contextmanager
def shared_work(max_bytes: int = 3 << 29) -> Iterator[TensorCache]:
    """Within the block, ``session`` returns ``SharedSession``s over one cache of ``max_bytes``."""
    _SHARED.append(TensorCache(max_bytes))
    try:
        yield _SHARED[-1]
    finally:
        _SHARED.pop()

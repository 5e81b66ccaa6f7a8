"""Typed results: what the jobs write as ``summary.json``, read back as frozen dataclasses.

Each job (``jobs.quantize``, ``jobs.mixed`` (sensitivity and mixed), ``jobs.qat``, ``jobs.plan``, ``jobs.lighten``) returns its summary as a
plain dict and writes it as ``summary.json``; the keys of that file are the interface users, tests and bench scripts
read. The classes here are the same content with names: ``QuantizeResult.from_summary(d)`` (or ``read_result(path)``
for a run folder) gives the CLI printers, the HTML reports and any script attributes instead of string keys, and
checks on the way in that what they read is there: a summary of another command, an older edgeslim or a hand-edited
file gives one ``EdgeslimError`` naming the file and the missing key, not a ``KeyError`` deep in a printer.

``to_summary()`` gives back exactly the dict read, keys in the same order, so ``from_summary`` / ``to_summary`` is
lossless: what a class does not name (the per-task detail passed on as it is: per-layer tables, overflow statistics,
provenance, ...) is kept in ``extra``, and an optional field (default None) is written back only when it was read
(or, for an object built directly, when it is not None). The dataclasses are frozen; the dicts and lists they hold
are the summary's own (JSON) values, not copied.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..errors import EdgeslimError

__all__ = ["Record", "Sizes", "GraphStats", "ClassifyScore", "ClassifyInt8", "DetectScore", "FidelityInt8",
           "ClassifyLatency", "FileLatency",
           "QuantizeResult", "ClassifyResult", "DetectResult", "FidelityResult", "MixedRow", "MixedResult",
           "SensitivityTable", "GroupTable", "SensitivityResult",
           "QATScore", "QATResult", "PlanStep", "PlanResult", "PairRow", "LightenResult", "read_summary", "read_result"]


def _hints(cls) -> dict[str, Any]:
    cache = cls.__dict__.get("_hints_cache")
    if cache is None:
        cache = typing.get_type_hints(cls)
        type.__setattr__(cls, "_hints_cache", cache)
    return cache


def _record_type(tp) -> tuple[type | None, bool]:
    """(the ``Record`` class a field's type names, whether it is a tuple of them) or (None, False)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp, False
    if origin is tuple and args and isinstance(args[0], type) and issubclass(args[0], Record):
        return args[0], True
    if args and origin in (typing.Union, types.UnionType):
        for a in args:
            rec, many = _record_type(a)
            if rec is not None:
                return rec, many
    return None, False


@dataclass(frozen=True, kw_only=True)
class Record:
    """A JSON object with named fields; ``extra``: its other keys as written; ``keys``: the order they were read in."""

    extra: dict = field(default_factory=dict, repr=False)
    keys: tuple = field(default=(), compare=False, repr=False)

    WHAT: ClassVar[str] = "summary"

    @classmethod
    def from_summary(cls, d: Any, source: str = "summary.json", where: str = "", what: str | None = None):
        """The object of the dict ``d`` (a ``summary.json``, or the part at ``where`` of the summary of the command
        ``what``); a missing key or a value of the wrong kind is an ``EdgeslimError`` naming ``source`` and the key."""
        what = what or cls.WHAT
        if not isinstance(d, dict):
            raise EdgeslimError(f"{source}: {f'{where!r} ' if where else ''}is not a JSON object: it is not an edgeslim "
                                f"{what} summary.json")
        hints, values = _hints(cls), {}
        named = set()
        for f in fields(cls):
            if f.name in ("extra", "keys"):
                continue
            key = f.metadata.get("key", f.name)
            named.add(key)
            path = f"{where}.{key}" if where else key
            if key not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise EdgeslimError(f"{source} has no {path!r}: it is not the summary.json of an edgeslim {what} "
                                        "run of this version (rerun the command to write it again)")
                continue
            rec, many = _record_type(hints[f.name])
            v = d[key]
            if rec is not None and v is not None:
                if many:
                    if not isinstance(v, list):
                        raise EdgeslimError(f"{source}: {path!r} is not a list: it is not an edgeslim {what} "
                                            "summary.json")
                    v = tuple(rec.from_summary(x, source, f"{path}[{i}]", what) for i, x in enumerate(v))
                else:
                    v = rec.from_summary(v, source, path, what)
            values[f.name] = v
        return cls(**values, extra={k: v for k, v in d.items() if k not in named}, keys=tuple(d))

    @classmethod
    def of(cls, s: Any, source: str = "summary"):
        """``s`` itself when it is already this class, else ``from_summary(s)`` (printers and reports take both)."""
        return s if isinstance(s, cls) else cls.from_summary(s, source)

    def to_summary(self) -> dict:
        """The dict this object was read from (the same keys in the same order): ``summary.json``'s content."""
        out = {}
        for f in fields(self):
            if f.name in ("extra", "keys"):
                continue
            key, v = f.metadata.get("key", f.name), getattr(self, f.name)
            if v is None and key not in self.keys:
                continue  # an optional key the summary did not have
            if isinstance(v, Record):
                v = v.to_summary()
            elif isinstance(v, tuple) and v and isinstance(v[0], Record):
                v = [x.to_summary() for x in v]
            out[key] = v
        out.update(self.extra)
        order = {k: i for i, k in enumerate(self.keys)}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))

    def has(self, key: str) -> bool:
        """Whether the summary has ``key`` (a named field that is not None, or an extra key)."""
        names = {f.metadata.get("key", f.name): f.name for f in fields(self)}
        if key in names and key not in ("extra", "keys"):
            return getattr(self, names[key]) is not None
        return key in self.extra


def _key(name: str):
    """A field stored under ``name`` in the JSON (a key that is not an identifier or clashes with a method)."""
    return field(default=None, metadata={"key": name})


def read_summary(path: str | Path) -> dict:
    """``summary.json`` of a run folder (or the file itself) as a dict; a missing or broken file is an
    ``EdgeslimError`` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeslimError(f"{path} does not exist: pass an edgeslim run folder (its --out) or its summary.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EdgeslimError(f"{path} is not a readable JSON file ({exc}): pass the summary.json an edgeslim run "
                            "wrote") from None
    if not isinstance(d, dict):
        raise EdgeslimError(f"{path} is not a JSON object: pass the summary.json an edgeslim run wrote")
    return d


# ----------------------------------------------------------------------------- quantize / analyze

@dataclass(frozen=True, kw_only=True)
class Sizes(Record):
    """Bytes: the FP32 and INT8 ONNX files, and (quantize) the weights stored at FP32 and at their quantized widths."""

    fp32: int
    int8: int
    weights_fp32: int | None = None
    weights_quantized: int | None = None


@dataclass(frozen=True, kw_only=True)
class GraphStats(Record):
    """The INT8 ONNX file in onnxruntime: integer / all convolutions, ops kept in float between integer tensors, the
    optimized graph's op counts, the kernel-time profile and how the weights are stored."""

    integer_convs: int
    total_convs: int
    float_islands: list | None = None
    optimized_ops: dict | None = None
    float_ops_profile: dict | None = None
    weight_containers: dict | None = None


@dataclass(frozen=True, kw_only=True)
class ClassifyScore(Record):
    """A classifier's top-1 where it was scored, and how many test images changed class against FP32."""

    top1: float
    flips_vs_fp32: int | None = None
    images: int | None = None
    pytorch_top1_on_subset: float | None = None


@dataclass(frozen=True, kw_only=True)
class ClassifyInt8(ClassifyScore, GraphStats):
    """The INT8 ONNX file of a classifier: its top-1 and flips, and its graph in onnxruntime."""


@dataclass(frozen=True, kw_only=True)
class DetectScore(Record):
    """A detector's mAP@.5, mAP@.5:.95 and precision / recall / F1 where it was scored; the images of a PyTorch
    subset; the ONNX files' AP per class (``per_class``) and the confusion matrix per class."""

    map50: float
    map50_95: float
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    images: int | None = None
    per_class: dict | None = None
    confusion_matrix: list | None = None


@dataclass(frozen=True, kw_only=True)
class FidelityInt8(GraphStats):
    """The INT8 ONNX file against the FP32 one without labels: per output SQNR, cosine, errors (``fidelity_vs_fp32``)."""

    fidelity_vs_fp32: dict


@dataclass(frozen=True, kw_only=True)
class ClassifyLatency(Record):
    """Milliseconds per batch size (``batch1``, ``batch64``) of each file, and INT8 / FP32 per batch size."""

    fp32: dict
    int8: dict
    int8_over_fp32: dict
    threads: int


@dataclass(frozen=True, kw_only=True)
class FileLatency(Record):
    """Milliseconds per input of each file (batch 1 unless ``batch``), the INT8 / FP32 ratio and frames per second."""

    fp32: float
    int8: float
    int8_over_fp32: float
    threads: int
    fps_fp32: float | None = None
    fps_int8: float | None = None
    batch: int | None = None
    rounds: int | None = None  # paired rounds measured (time-bounded measurements stop early)


@dataclass(frozen=True, kw_only=True)
class QuantizeResult(Record):
    """``quantize`` / ``analyze`` (``jobs.quantize.run_quantize``): what every task has. ``from_summary`` on this
    class gives the task's own (``ClassifyResult``, ``DetectResult``, ``FidelityResult``) by the summary's ``task``."""

    WHAT: ClassVar[str] = "quantize / analyze"
    TASK: ClassVar[str] = ""

    model: str
    task: str
    size_bytes: Sizes
    time_to_quantize_s: float
    config: dict
    preprocessing: Any = None
    plan: dict | None = None
    reconstruction: dict | None = None
    provenance: dict | None = None
    engine_options: dict | None = None
    overflow: dict | None = None
    tflite: dict | None = None
    mcu: dict | None = None

    @classmethod
    def from_summary(cls, d: Any, source: str = "summary.json", where: str = "", what: str | None = None):
        if cls is QuantizeResult and isinstance(d, dict):
            sub = {c.TASK: c for c in (ClassifyResult, DetectResult, FidelityResult)}
            if d.get("task") not in sub:
                raise EdgeslimError(f"{source} has no 'task' of classify, detect or fidelity "
                                    f"({d.get('task')!r}): it is not the summary.json of an edgeslim quantize run")
            return sub[d["task"]].from_summary(d, source, where, what)
        return super().from_summary(d, source, where, what)

    @property
    def command(self) -> str:
        """``analyze`` when the integer engine or the overflow statistics ran, else ``quantize``."""
        return "analyze" if self.engine_options is not None or self.overflow is not None else "quantize"


@dataclass(frozen=True, kw_only=True)
class ClassifyResult(QuantizeResult):
    """``quantize --task classify``: top-1 of FP32 (PyTorch on a subset, the ONNX file), fake-quant and the INT8 file;
    the per-layer error table (``layers``); with ``analyze``, the integer engine and the overflow statistics."""

    TASK: ClassVar[str] = "classify"

    images: dict
    fp32: ClassifyScore
    quantized: ClassifyScore
    onnx_int8: ClassifyInt8
    latency_ms: ClassifyLatency
    layers: list
    onnx_fp32: ClassifyScore | None = None
    chance_top1: float | None = None
    engine: ClassifyScore | None = None
    engine_vs_onnx: dict | None = None


@dataclass(frozen=True, kw_only=True)
class DetectResult(QuantizeResult):
    """``quantize --task detect``: mAP / P / R / F1 of FP32 (PyTorch), fake-quant, both ONNX files (and the engine),
    the INT8 graph's statistics (``onnx_int8_graph``), the scoring options and the decoded-output files."""

    TASK: ClassVar[str] = "detect"

    images: dict
    fp32: DetectScore
    quantized: DetectScore
    onnx_fp32: DetectScore
    onnx_int8: DetectScore
    onnx_int8_graph: GraphStats
    latency_ms: FileLatency
    detect_options: dict
    engine: DetectScore | None = None
    decoded_output: dict | None = None


@dataclass(frozen=True, kw_only=True)
class FidelityResult(QuantizeResult):
    """``quantize --task fidelity`` (no labels): the INT8 file's outputs against the FP32 file's, the worst output's
    SQNR (``headline``), and with ``analyze`` the engine's outputs against both."""

    TASK: ClassVar[str] = "fidelity"

    inputs: dict
    headline: dict
    onnx_int8: FidelityInt8
    latency_ms: FileLatency
    engine: dict | None = None
    engine_vs_onnx: dict | None = None


# ----------------------------------------------------------------------------- mixed

@dataclass(frozen=True, kw_only=True)
class MixedRow(Record):
    """One model of ``mixed``'s table: its test score (PyTorch simulation), held-out score, the ONNX file's test score,
    stored parameter bytes, ONNX bytes and latency (FP32: ms at batch 1; the others: ms and x FP32 per batch size). A
    score of None is an infinite SQNR (identical to FP32). The chosen plan's row also has the plan and its layers."""

    score: float | None
    holdout_score: float | None
    size_bytes: int
    latency_ms: Any
    onnx_score: float | None = None
    onnx_bytes: int | None = None
    latency_over_fp32: dict | None = None
    holdout_drop_se: float | None = None
    plan: dict | None = None
    high_precision_layers: list | None = None
    high_precision_mac_fraction: float | None = None
    high_precision_param_fraction: float | None = None

    @property
    def batch1_ms(self) -> float:
        """Milliseconds at batch 1 (the FP32 row's number, the others' ``batch1``)."""
        return self.latency_ms["batch1"] if isinstance(self.latency_ms, dict) else self.latency_ms


@dataclass(frozen=True, kw_only=True)
class MixedResult(Record):
    """``mixed`` (``jobs.mixed.run_mixed``): the budget, the FP32 / uniform / mixed rows, whether the budget was met
    on the held-out inputs and on the test inputs, the search's steps, frontier and candidates (dicts)."""

    WHAT: ClassVar[str] = "mixed"

    model: str
    task: str
    metric: dict
    images: dict
    budget: dict
    fp32: MixedRow
    uniform: MixedRow
    mixed: MixedRow
    onnx_mixed: dict
    met: bool
    met_on_test: bool
    reason: str
    high: str
    low: str
    search: dict
    frontier: list
    candidates: list
    config: dict
    total_seconds: float | None = None


# ----------------------------------------------------------------------------- sensitivity

@dataclass(frozen=True, kw_only=True)
class SensitivityTable(Record):
    """``sensitivity``'s per-unit table: the metric, FP32 and uniform scores, one row per plan unit (dicts: ``name``
    and, per sweep, ``keep_high`` / ``only_quantized`` with ``score`` and ``delta``), the precisions, seconds per
    sweep; ``inputs`` is ``test`` for sweeps scored on the test inputs (detect; absent for held-out sweeps)."""

    images: int
    metric: dict
    fp32_score: float | None
    uniform: dict
    rows: list
    high: str
    low: str
    seconds: dict
    inputs: str | None = None


@dataclass(frozen=True, kw_only=True)
class GroupTable(Record):
    """``sensitivity``'s group table: the groups, the high / low precisions and one row per combination (dicts:
    ``precision`` per group, ``score``, ``weight_bytes``, ``latency_ms``, ``latency_over_fp32``)."""

    groups: dict
    high: str
    low: str
    rows: list


@dataclass(frozen=True, kw_only=True)
class SensitivityResult(Record):
    """``sensitivity`` (``jobs.mixed.run_sensitivity``): the per-unit table and, unless ``--no-groups``, the group
    table."""

    WHAT: ClassVar[str] = "sensitivity"

    model: str
    task: str
    config: dict
    sensitivity: SensitivityTable
    images: dict
    scored_with: str
    groups: GroupTable | None = None
    total_seconds: float | None = None


# ----------------------------------------------------------------------------- qat

@dataclass(frozen=True, kw_only=True)
class QATScore(Record):
    """A model's score in ``qat``, in the task's metric: top-1 (classify), worst-output SQNR in dB (fidelity) or mAP
    with precision / recall / F1 (detect); ``seconds`` for the PTQ start. For the exported file: ``exported`` False
    and ``reason`` when QAT's levels cannot be written as an integer file, else its graph's convolutions and (fidelity)
    per-output figures."""

    top1: float | None = None
    sqnr_db: float | None = None
    map50: float | None = None
    map50_95: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    seconds: float | None = None
    exported: bool | None = None
    reason: str | None = None
    headline_sqnr_db: float | None = None
    integer_convs: int | None = None
    total_convs: int | None = None
    fidelity_vs_fp32: dict | None = None


@dataclass(frozen=True, kw_only=True)
class QATResult(Record):
    """``qat`` (``jobs.qat.run_qat``): the scores of FP32, the PTQ start and QAT in PyTorch and of the exported INT8
    file (``onnx`` for classify, ``onnx_int8`` for detect / fidelity: ``file``), the training history, the configs."""

    WHAT: ClassVar[str] = "qat"

    model: str
    task: str
    ptq: QATScore
    qat: QATScore
    history: list
    training: dict
    loss: str
    config: dict
    ptq_config: dict
    fp32: QATScore | None = None
    init: QATScore | None = None
    images: dict | None = None
    inputs: dict | None = None
    notes: dict | None = None
    levels: Any = None
    plan: dict | None = None
    onnx: QATScore | None = None
    onnx_int8: QATScore | None = None
    size_bytes: Sizes | None = None
    latency_ms: FileLatency | None = None

    @property
    def file(self) -> QATScore | None:
        """The exported INT8 file's score (or why there is none)."""
        return self.onnx if self.onnx is not None else self.onnx_int8


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True, kw_only=True)
class PlanStep(Record):
    """One measured candidate of ``plan``: the structure it was built on, its road, held-out and test top-1, latency
    (ms and x FP32), stored bytes, seconds, and why it was taken or not."""

    step: str
    top1: float
    holdout_top1: float
    latency_ms: float
    latency_vs_fp32: float
    size_bytes: int
    step_seconds: float
    on: str
    road: str
    taken: bool | None = None
    why: list | None = None


@dataclass(frozen=True, kw_only=True)
class PlanResult(Record):
    """``plan`` (``jobs.plan.run_plan``): every measured step, the skipped steps with their reasons, whether the
    target was met and the one-paragraph statement."""

    WHAT: ClassVar[str] = "plan"

    model: str
    target: dict
    requirement: dict
    steps: tuple[PlanStep, ...]
    skipped: dict
    met: bool
    statement: str
    size_counts: str
    unmet: list | None = None
    best: dict | None = None


# ----------------------------------------------------------------------------- prune / factorize

@dataclass(frozen=True, kw_only=True)
class PairRow(Record):
    """One float model of ``prune`` / ``factorize``: test top-1 (onnxruntime), MACs, parameters, stored bytes, ONNX
    bytes, latency at batch 1 and threads; ``latency_vs_<first model>`` in ``extra`` (``latency_vs``)."""

    top1: float
    macs: int
    params: int
    size_bytes: int
    latency_ms: float
    threads: int
    onnx_bytes: int | None = None

    def latency_vs(self, first: str) -> float:
        """This model's latency over the model ``first``'s, paired in the same run."""
        return self.extra["latency_vs_" + first]


@dataclass(frozen=True, kw_only=True)
class LightenResult(Record):
    """``prune`` (rows ``dense`` / ``pruned``) and ``factorize`` (``original`` / ``factorized``) from ``jobs.lighten``:
    the two models measured side by side, the step, the fine-tuning record."""

    WHAT: ClassVar[str] = "prune / factorize"

    model: str
    step: str
    finetune: dict
    dense: PairRow | None = None
    pruned: PairRow | None = None
    original: PairRow | None = None
    factorized: PairRow | None = None

    def row(self, name: str) -> PairRow:
        """The row of model ``name`` (``dense``, ``pruned``, ``original`` or ``factorized``)."""
        r = getattr(self, name, None) if name in ("dense", "pruned", "original", "factorized") else None
        if r is None:
            raise EdgeslimError(f"this {self.step} summary has no {name!r} model")
        return r


def read_result(path: str | Path) -> Record:
    """The typed result of a run folder's ``summary.json`` (or the file), by what wrote it: ``quantize`` /
    ``analyze``, ``mixed``, ``qat``, ``plan``, ``prune`` / ``factorize``."""
    d = read_summary(path)
    source = str(Path(path) / "summary.json" if Path(path).is_dir() else path)
    if "time_to_quantize_s" in d:
        return QuantizeResult.from_summary(d, source)
    for cls, key in ((MixedResult, "frontier"), (QATResult, "history"), (PlanResult, "statement"),
                     (LightenResult, "step"), (SensitivityResult, "sensitivity")):
        if key in d:
            return cls.from_summary(d, source)
    raise EdgeslimError(f"{source} is not the summary.json of an edgeslim quantize, analyze, sensitivity, mixed, qat, "
                        "plan, prune or factorize run")

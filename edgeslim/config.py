"""Small frozen configs, validated on construction and round-trippable to JSON."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .cpu import int8_weights_saturate
from .errors import EdgeslimError
from .quant.precision import LayerPrecision, Precision
from .quant.primitives import check_bits

GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "asymmetric")
SCALES = ("float", "pow2", "global")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ALGORITHMS = ("cle", "adaround", "brecq", "bias-correction")  # PTQ steps beyond calibration, applied in this order
WEIGHT_RANGES = ("auto", "full", "reduced")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise EdgeslimError(f"invalid {name} {value!r}: use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization settings (the ``quantize`` verb).

    * ``granularity`` applies to weights (activations are always per tensor).
    * ``scheme`` is the activations' scheme (default asymmetric: uint8 codes with a zero point, what
      onnxruntime's integer kernels expect). Symmetric activations that are never negative (ReLU
      outputs) use the unsigned range; see ``primitives.activation_signed``.
    * ``w_scheme`` is the weights' scheme (default symmetric: zero point 0). Asymmetric weights are
      supported and exported, but onnxruntime's QLinearConv runs them about 1.4x slower (measured
      in BENCHMARKS.md), and most NPUs take symmetric weights only.
    * ``scale``: ``float`` (any real scale, fixed-point requantization), ``pow2`` (every scale a power
      of two: shift-only requantization as on VTA), ``global`` (one power-of-two activation scale for
      the whole model, signed, as TVM-VTA's single global scale that Lee et al. (ETRI) improve on).
    * ``fuse``: Conv(+BN)+ReLU and Add+ReLU share one output quantizer (Lee et al.'s scale substitution).
    * ``algorithms``: extra PTQ steps; ``cle`` = cross-layer equalization of Conv-ReLU-Conv pairs
      (``algorithms/cle.py``), run on the folded float graph before quantizers are placed;
      ``adaround`` (layer by layer) or ``brecq`` (block by block) = learned weight rounding after freezing
      (``algorithms/reconstruction.py``; BRECQ also learns activation step sizes), ``iters`` iterations per
      unit, BRECQ's Fisher-weighted loss with ``fisher``;
      ``bias-correction`` = empirical bias correction on the calibration images after freezing
      (``algorithms/bias_correction.py``). Whatever order they are given in, they run in ``ALGORITHMS`` order.
    * ``weight_range``: ``reduced`` quantizes 8-bit weights on the 7-bit grid (codes in [-64, 63], what
      onnxruntime's quantizer calls ``reduce_range``): on x86 CPUs with AVX2 and no VNNI, onnxruntime's fast
      int8-weight kernels add pairs of uint8 x int8 products in saturating int16 (``vpmaddubsw``), which such
      codes cannot overflow, so the file is exact *and* fast there; ``full`` keeps the 8-bit grid (exact
      there only in slower uint8 weight containers, see ``export.onnx_qdq``). ``auto`` (the default) is
      resolved on construction from this machine's CPU flags: ``reduced`` on AVX2-without-VNNI x86, else
      ``full`` (ARM, VNNI, and any target other than onnxruntime on this CPU should say ``full``).
      Depthwise convs keep the 8-bit grid (onnxruntime's depthwise kernel is exact with any int8 weight) and
      weights of fewer than 8 bits are never changed.
    """

    w_bits: int = 8
    a_bits: int = 8
    granularity: str = "channel"
    scheme: str = "asymmetric"
    w_scheme: str = "symmetric"
    scale: str = "float"
    calibrator: str = "minmax"
    fuse: bool = True
    calib_size: int = 512
    seed: int = 0
    algorithms: tuple[str, ...] = ()
    iters: int = 1000
    fisher: bool = False
    weight_range: str = "auto"

    def __post_init__(self) -> None:
        _one_of("--weight-range", self.weight_range, WEIGHT_RANGES)
        if self.weight_range == "auto":
            object.__setattr__(self, "weight_range", "reduced" if int8_weights_saturate() else "full")
        for a in self.algorithms:
            _one_of("--algorithm", a, ALGORITHMS)
        object.__setattr__(self, "algorithms", tuple(a for a in ALGORITHMS if a in self.algorithms))
        if {"adaround", "brecq"} <= set(self.algorithms):
            raise EdgeslimError("--algorithm adaround and brecq both learn the rounding: choose one")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise EdgeslimError(f"invalid --iters {self.iters!r}: use a positive number of iterations per unit")
        if self.fisher and "brecq" not in self.algorithms:
            raise EdgeslimError("--fisher weights BRECQ's loss: add --algorithm brecq or drop --fisher")
        if "cle" in self.algorithms and not self.fuse:
            raise EdgeslimError("--algorithm cle equalizes fused Conv+ReLU pairs: drop --no-fuse")
        check_bits(self.w_bits, "--w-bits")
        check_bits(self.a_bits, "--a-bits")
        _one_of("--granularity", self.granularity, GRANULARITIES)
        _one_of("--scheme", self.scheme, SCHEMES)
        _one_of("--w-scheme", self.w_scheme, SCHEMES)
        _one_of("--scale", self.scale, SCALES)
        _one_of("--calibrator", self.calibrator, CALIBRATORS)
        if not isinstance(self.calib_size, int) or self.calib_size <= 0:
            raise EdgeslimError(f"invalid --calib-size {self.calib_size!r}: use a positive number of images")

    @property
    def symmetric(self) -> bool:
        return self.scheme == "symmetric" or self.scale == "global"

    @property
    def w_symmetric(self) -> bool:
        return self.w_scheme == "symmetric" or self.scale == "global"

    @property
    def pow2(self) -> bool:
        return self.scale in ("pow2", "global")

    def weight_bits(self, bits: int, *, depthwise: bool = False) -> int:
        """The grid an integer weight of ``bits`` bits is quantized on: 7 for 8 under ``weight_range="reduced"``,
        except depthwise convs, whose onnxruntime kernel does not saturate (they keep the 8-bit grid)."""
        return 7 if bits == 8 and self.weight_range == "reduced" and not depthwise else bits

    @property
    def default_precision(self) -> LayerPrecision:
        return LayerPrecision(Precision("int", self.w_bits), Precision("int", self.a_bits))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PTQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeslimError(f"unknown PTQ config keys {unknown}: allowed keys are {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class MixedPlan:
    """Per-layer precisions for mixed-precision quantization, as ordered ``(pattern, LayerPrecision)`` rules.

    Patterns are shell-style (``fnmatch``) over layer names: weighted layers by module name
    (``layer1.0.conv1``, ``linear``), other requantizing ops by their scope and node name
    (``layer1.0.add``). A later rule overrides an earlier one; layers no rule matches use the
    ``PTQConfig``'s ``w_bits`` / ``a_bits``. ``a`` is the precision of the activation a layer *reads*;
    a tensor read by several layers takes the highest precision any of them asks for.

    JSON form (``quantize --plan FILE``), e.g.::

        {"edgeslim_plan": 1,
         "layers": {"conv1": "fp32", "layer3.*": {"w": "int4", "a": "int8"}, "linear": "fp16"}}
    """

    rules: tuple[tuple[str, LayerPrecision], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple((str(p), LayerPrecision.parse(v)) for p, v in self.rules))

    def precision_of(self, name: str, default: LayerPrecision) -> LayerPrecision:
        found = default
        for pattern, prec in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                found = prec
        return found

    def check_patterns(self, names: list[str]) -> None:
        """Every rule must match at least one layer: a typo would silently quantize that layer."""
        for pattern, _ in self.rules:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise EdgeslimError(f"plan pattern {pattern!r} matches no layer: layers are {shown} "
                                    "(see `edgeslim inspect`)")

    def to_dict(self) -> dict:
        return {"edgeslim_plan": 1, "layers": {p: v.to_json() for p, v in self.rules}}

    @classmethod
    def from_dict(cls, d: dict) -> "MixedPlan":
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise EdgeslimError('a plan is a JSON object {"layers": {"pattern": "int8" | "fp32" | {"w": .., "a": ..}}}')
        for pattern, value in d["layers"].items():
            check_precision_value(pattern, value)
            try:
                LayerPrecision.parse(value)
            except EdgeslimError as exc:
                raise EdgeslimError(f"plan entry {pattern!r}: {exc}") from None
        return cls(tuple(d["layers"].items()))

    @classmethod
    def load(cls, path: str | Path) -> "MixedPlan":
        path = Path(path)
        if not path.is_file():
            raise EdgeslimError(f"plan file {path} does not exist: pass the plan.json written by `edgeslim mixed`")
        data = load_json(path, "plan file", "fix or regenerate it")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        from .io.atomic import atomic_write_bytes

        return atomic_write_bytes(Path(path), json.dumps(self.to_dict(), indent=1).encode())


MAX_JSON_BYTES = 1 << 20  # plans and targets are a few KiB
_PRECISION_HELP = 'use "int2".."int16", a number of bits 2..16, "fp16", "fp32" or {"w": ..., "a": ...}'


def load_json(path: str | Path, what: str, fix: str):
    """A small JSON file, every failure one ``EdgeslimError`` (unreadable, too large, not JSON, nested too deep)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise EdgeslimError(f"{what} {path} is {path.stat().st_size >> 10} KiB, too large (at most "
                                f"{MAX_JSON_BYTES >> 10} KiB): {fix}")
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeslimError(f"{what} {path} is not valid JSON ({exc}): {fix}") from None
    except RecursionError:
        raise EdgeslimError(f"{what} {path} is nested too deeply to be a {what}: {fix}") from None
    except OSError as exc:
        raise EdgeslimError(f"{what} {path} cannot be read ({exc.strerror or exc}): check the path") from None


def check_precision_value(pattern, value) -> None:
    """A plan entry's precision must be a plain string / integer (or a ``{"w", "a"}`` object of them): no floats,
    booleans, lists, empty strings or non-ASCII digits (``int٨`` would read as int8)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise EdgeslimError(f"plan pattern {pattern!r} is empty: use a layer name or pattern (see `edgeslim inspect`)")
    parts = list(value.values()) if isinstance(value, dict) and value else [value]
    for v in parts:
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip() and v.isascii())
        if not ok:
            raise EdgeslimError(f"plan entry {pattern!r}: precision {v!r} is not valid: {_PRECISION_HELP}")


@dataclass(frozen=True)
class MeasureOptions:
    """How a job measures: onnxruntime threads and batches for latency, evaluation batch size, how many test
    images the PyTorch models are scored on, and which deployment formats it writes."""

    threads: int = 1
    latency_batches: tuple[int, ...] = (1, 64)
    latency_rounds: int = 200
    batch_size: int = 256
    # the FP32 and INT8 files are scored on every test image in onnxruntime (all cores); the PyTorch models
    # (float and fake-quant simulation) on a seeded class-balanced subset of this many (None: all)
    simulation_images: int | None = 1000
    formats: tuple[str, ...] = ("onnx",)  # + "tflite" / "tflm": LiteRT and microcontroller files (export.tflm)

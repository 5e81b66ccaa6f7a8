"""Quantization settings: ``PTQConfig`` (the ``quantize`` verb), ``Reconstruction`` (one AdaRound / BRECQ run) and
``MixedPlan`` (per-layer precisions), with the small JSON readers plans and targets share."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from ..cpu import int8_weights_saturate
from ..errors import EdgeslimError
from ..quant.precision import LayerPrecision, Precision
from ..quant.primitives import check_bits
from .checks import Config, check_flag, check_int, check_number, one_of

__all__ = ["ALGORITHMS", "CALIBRATORS", "GRANULARITIES", "MAX_JSON_BYTES", "MixedPlan", "PTQConfig", "Reconstruction",
           "SCALES", "SCHEMES", "WEIGHT_RANGES", "check_precision_value", "load_json"]

GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "asymmetric")
SCALES = ("float", "pow2", "global")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ALGORITHMS = ("cle", "adaround", "brecq", "bias-correction")  # PTQ steps beyond calibration, applied in this order
WEIGHT_RANGES = ("auto", "full", "reduced")


@dataclass(frozen=True)
class PTQConfig(Config):
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

    KIND = "PTQ config"

    def __post_init__(self) -> None:
        one_of("--weight-range", self.weight_range, WEIGHT_RANGES)
        if self.weight_range == "auto":
            object.__setattr__(self, "weight_range", "reduced" if int8_weights_saturate() else "full")
        for a in self.algorithms:
            one_of("--algorithm", a, ALGORITHMS)
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
        one_of("--granularity", self.granularity, GRANULARITIES)
        one_of("--scheme", self.scheme, SCHEMES)
        one_of("--w-scheme", self.w_scheme, SCHEMES)
        one_of("--scale", self.scale, SCALES)
        one_of("--calibrator", self.calibrator, CALIBRATORS)
        if not isinstance(self.calib_size, int) or self.calib_size <= 0:
            raise EdgeslimError(f"invalid --calib-size {self.calib_size!r}: use a positive number of images")
        check_flag("--fuse", self.fuse)
        check_flag("--fisher", self.fisher)
        check_int("--seed", self.seed, minimum=0)

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


@dataclass(frozen=True)
class Reconstruction(Config):
    """Settings of one AdaRound / BRECQ run (``algorithms.reconstruction``; defaults follow the papers, with fewer
    iterations)."""

    iters: int = 1000  # per unit (the papers use 10-20k; BENCHMARKS.md measures what fewer give)
    batch_size: int = 32
    lr: float = 1e-3  # Adam, rounding variables
    act_lr: float = 4e-5  # Adam, activation step sizes (BRECQ)
    reg_weight: float = 0.01  # lambda
    warmup: float = 0.2  # fraction of iterations without the rounding regularizer
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second
    learn_act: bool = True  # BRECQ: learn the block's activation step sizes when they are integer
    fisher: bool = False
    seed: int = 0

    KIND = "reconstruction config"

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 1:
            raise EdgeslimError(f"invalid --iters {self.iters!r}: use a positive number of iterations per unit")
        check_int("reconstruction batch_size", self.batch_size)
        check_number("reconstruction lr", self.lr, low=0, open_low=True)
        check_number("reconstruction act_lr", self.act_lr, low=0, open_low=True)
        check_number("reconstruction reg_weight", self.reg_weight, low=0)
        check_number("reconstruction warmup", self.warmup, low=0, high=1, open_high=True)
        b = self.beta
        if not isinstance(b, (tuple, list)) or len(b) != 2 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) or not b[0] >= b[1] > 0:
            raise EdgeslimError(f"invalid reconstruction beta {b!r}: use (start, end) with start >= end > 0, "
                                "e.g. (20.0, 2.0)")
        object.__setattr__(self, "beta", tuple(b))
        check_flag("reconstruction learn_act", self.learn_act)
        check_flag("--fisher", self.fisher)
        check_int("--seed", self.seed, minimum=0)


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
        from ..io.atomic import atomic_write_bytes

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

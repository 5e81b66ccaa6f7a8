"""Small frozen configs, validated on construction and round-trippable to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import EdgeslimError
from .quant.primitives import check_bits

GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "asymmetric")
SCALES = ("float", "pow2", "global")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


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
      the whole model, signed, as TVM-VTA's single global scale that seed 001 improves on).
    * ``fuse``: Conv(+BN)+ReLU and Add+ReLU share one output quantizer (seed 001's scale substitution).
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

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PTQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeslimError(f"unknown PTQ config keys {unknown}: allowed keys are {sorted(known)}")
        return cls(**d)

"""Precisions a tensor or a layer's weights can take: integer 2..16 bits, FP16, FP32.

Written as short tokens in plan files and on the command line: ``int8``, ``int4``, ``int16`` (or just
``8``), ``fp16``, ``fp32`` (or ``32``, Shin and Shin's notation). They are ordered by how much information they keep
(``int2 < ... < int16 < fp16 < fp32``), so a tensor read by several layers takes the highest precision
any of them asks for (``highest``).

>>> Precision.parse("int4"), Precision.parse("fp16").is_float, str(Precision.parse(8))
(Precision(kind='int', bits=4), True, 'int8')
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgeslimError
from .primitives import MAX_BITS, MIN_BITS

__all__ = ["FLOAT_KINDS", "Precision", "FP32", "FP16", "highest", "LayerPrecision"]


FLOAT_KINDS = ("fp16", "fp32")


@dataclass(frozen=True, order=False)
class Precision:
    kind: str  # "int", "fp16" or "fp32"
    bits: int

    def __post_init__(self) -> None:
        if self.kind == "int":
            if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
                raise EdgeslimError(f"invalid precision int{self.bits}: integer precisions are int{MIN_BITS}..int{MAX_BITS}")
        elif self.kind not in FLOAT_KINDS:
            raise EdgeslimError(f"invalid precision kind {self.kind!r}: use int, fp16 or fp32")

    @classmethod
    def parse(cls, token: "str | int | Precision") -> "Precision":
        """``int8`` / ``8`` / ``fp16`` / ``fp32`` (case-insensitive) -> Precision."""
        if isinstance(token, Precision):
            return token
        text = str(token).strip().lower()
        if text in FLOAT_KINDS:
            return cls(text, 16 if text == "fp16" else 32)
        if text == "32":  # Shin and Shin's notation (B,N,H = 8/32): there is no int32 precision, 32 means FP32
            return cls("fp32", 32)
        digits = text[3:] if text.startswith("int") else text
        if digits.isascii() and digits.isdigit():  # ASCII only: int() reads other scripts' digits
            return cls("int", int(digits))
        raise EdgeslimError(f"invalid precision {token!r}: use int2..int16 (or a number of bits), fp16 or fp32")

    @property
    def is_float(self) -> bool:
        return self.kind != "int"

    @property
    def rank(self) -> int:
        return {"int": 0, "fp16": 100, "fp32": 200}[self.kind] + self.bits

    @property
    def storage_bits(self) -> int:
        return self.bits

    def __str__(self) -> str:
        return f"int{self.bits}" if self.kind == "int" else self.kind


FP32 = Precision("fp32", 32)
FP16 = Precision("fp16", 16)


def highest(precisions) -> Precision | None:
    """The precision that keeps the most information (``None`` for an empty input)."""
    best = None
    for p in precisions:
        if best is None or p.rank > best.rank:
            best = p
    return best


@dataclass(frozen=True)
class LayerPrecision:
    """A layer's weight precision and the precision of the activation it reads."""

    w: Precision
    a: Precision

    @classmethod
    def parse(cls, value) -> "LayerPrecision":
        """``"fp32"`` (both), ``{"w": "int4", "a": "int8"}``, or ``"w4a8"``-style shorthand."""
        if isinstance(value, LayerPrecision):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"w", "a"})
            if unknown or not value:
                raise EdgeslimError(f"invalid layer precision {value!r}: use {{'w': ..., 'a': ...}}")
            w = Precision.parse(value.get("w", value.get("a")))
            return cls(w, Precision.parse(value.get("a", value.get("w"))))
        text = str(value).strip().lower()
        if text.startswith("w") and "a" in text[1:]:
            w, a = text[1:].split("a", 1)
            return cls(Precision.parse(w), Precision.parse(a))
        p = Precision.parse(text)
        return cls(p, p)

    def to_json(self):
        return str(self.w) if self.w == self.a else {"w": str(self.w), "a": str(self.a)}

    def __str__(self) -> str:
        return str(self.w) if self.w == self.a else f"w:{self.w} a:{self.a}"

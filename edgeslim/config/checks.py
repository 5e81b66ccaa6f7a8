"""What every config shares: field checks whose one-line ``EdgeslimError`` names the field, the bad value and the fix,
and the ``to_dict`` / ``from_dict`` JSON round trip (unknown keys refused)."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import ClassVar

from ..errors import EdgeslimError

__all__ = ["Config", "check_flag", "check_int", "check_number", "one_of"]


def one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise EdgeslimError(f"invalid {name} {value!r}: use one of {', '.join(allowed)}")


def check_int(name: str, value, *, minimum: int = 1, optional: bool = False) -> None:
    """An integer (not a bool) of at least ``minimum``; ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise EdgeslimError(f"invalid {name} {value!r}: use an integer of at least {minimum}")


def check_number(name: str, value, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False,
                 open_high: bool = False, optional: bool = False) -> None:
    """A finite real number in the interval ``[low, high]`` (``(`` / ``)`` where ``open_low`` / ``open_high``)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if math.isinf(high):
            span = f"{'above' if open_low else 'of at least'} {low:g}"
        else:
            span = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise EdgeslimError(f"invalid {name} {value!r}: use a finite number {span}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise EdgeslimError(f"invalid {name} {value!r}: use true or false")


class Config:
    """Base of the frozen option dataclasses: ``to_dict`` (``dataclasses.asdict``) and ``from_dict``, which refuses
    keys the class does not have and reads JSON lists back as the tuples the fields hold."""

    KIND: ClassVar[str] = "config"  # what the class is called in error messages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise EdgeslimError(f"a {cls.KIND} is a JSON object of settings, not {type(d).__name__}: "
                                f"pass {{key: value}} with keys from {sorted(f.name for f in fields(cls))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise EdgeslimError(f"unknown {cls.KIND} keys {unknown}: allowed keys are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

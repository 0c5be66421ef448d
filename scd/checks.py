"""Range checks for the numbers a user gives (frames, steps, learning rates, seeds...): NaN, infinity,
out-of-range and wrong-type values become one ConfigError naming the parameter."""

from __future__ import annotations

import math
import numbers

from scd.errors import ConfigError

MAX_SEED = 2**63 - 1  # torch and numpy generators take any int64 >= 0
MAX_SAMPLES = 64  # samples a stream may draw per frame for their median (scd.sampling.Rollout's `samples`)


def number(name: str, value, low=None, high=None, *, integer: bool = False, above: bool = False):
    """`value` if it is a finite number in [low, high] (in (low, high] with `above`), else ConfigError
    naming `name`; None bounds are open. Integers must be whole (bools are refused)."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if integer and not whole:
        raise ConfigError(f"{name} must be a whole number, got {value!r}", name)
    if not whole and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", name)
    too_low = low is not None and (value <= low if above else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else (f"> {low}" if above else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(f"{name} must be {' and '.join(p for p in (lo, hi) if p)}, got {value}", name)
    return value


def seed(value, name: str = "seed") -> int:
    return number(name, value, 0, MAX_SEED, integer=True)


def samples(value, name: str = "samples") -> int:
    return number(name, value, 1, MAX_SAMPLES, integer=True)

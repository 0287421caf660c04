"""The value checks behind :mod:`ldm_vae.config`: YAML types accepted exactly as a careful user
writes them, and ranges and choices that fail naming the key, the value and what is allowed."""

from __future__ import annotations

import math
import typing


class ParamError(ValueError):
    """A params.yaml value that is missing, unknown, of the wrong type or out of range."""


def coerce(key: str, value, hint):
    """Accept exactly the YAML types a careful user would write; nothing is silently converted."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML reads 1e-6 (no dot) as a string; accept it when it parses as a number.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan / .inf pass every < and > check: refuse them here
                raise ParamError(f"{key}: {value!r}: must be a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if key == "train.mixed_precision" and value is False:
            return "no"  # YAML 1.1 reads a bare `no` as false
        if (
            key.endswith((".num_processes", "data.num_workers", "data.unit_images"))
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            return str(value)  # `auto` or a count
    elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ParamError(f"{key}: {value!r}: expected a list of non-empty strings (or [])")
    elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is float:
        if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            return tuple(float(v) for v in value)
        raise ParamError(f"{key}: {value!r}: expected a non-empty list of finite numbers")
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise ParamError(f"{key}: {value!r}: expected a non-empty list of integers")
    raise ParamError(f"{key}: {value!r}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def check_processes(key: str, value: str) -> None:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise ParamError(f"{key}: {value!r}: must be auto or a number >= 1")


def check_choice(key: str, value, allowed, shown=None) -> None:
    if value not in allowed:
        raise ParamError(f"{key}: {shown if shown is not None else value!r}: allowed: {', '.join(allowed)}")


def check_at_least(key: str, value, lo) -> None:
    if value < lo:
        raise ParamError(f"{key}: {value!r}: must be >= {lo}")


def check_range(key, value, lo, hi, open_lo=False, open_hi=False) -> None:
    bad = value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi)
    if bad:
        lo_s, hi_s = ("(" if open_lo else "["), (")" if open_hi else "]")
        raise ParamError(f"{key}: {value!r}: must be in {lo_s}{lo}, {hi}{hi_s}")

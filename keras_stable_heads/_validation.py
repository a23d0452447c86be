"""Argument checks shared by the functional ops and the Loss constructors.

Each raises ``ValueError``/``TypeError`` naming the argument, the value received and the fix. They run on Python
values only (never on tensors), so they cost nothing in a compiled step.
"""

import math
import numbers

import numpy as np


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return value


def fraction(name, value, *, closed_right=True):
    """A number in [0, 1] (or [0, 1) with ``closed_right=False``)."""
    value = _number(name, value)
    upper_ok = value <= 1.0 if closed_right else value < 1.0
    if value < 0.0 or not upper_ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return value


def non_negative(name, value):
    value = _number(name, value)
    if value < 0.0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return value


def positive_or_none(name, value):
    if value is None:
        return None
    value = _number(name, value)
    if value <= 0.0:
        raise ValueError(f"`{name}` must be > 0 or None (no cap), got {value!r}.")
    return value


def weights_or_none(name, value, *, allow_scalar=False):
    """None, a non-negative finite scalar (when allowed), or a 1-D sequence of them; returned as float/list."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not allow_scalar:
            raise TypeError(f"`{name}` must be a 1-D sequence with one weight per class, got the scalar {value!r}.")
        return non_negative(name, value)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be a sequence of numbers, got {value!r}.") from error
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`{name}` must be 1-D and non-empty, got shape {array.shape}.")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"`{name}` must hold finite, non-negative numbers, got {array.tolist()}.")
    return array.tolist()


def integer_or_none(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer or None, got {value!r}.")
    return int(value)


def number_or_none(name, value):
    return None if value is None else _number(name, value)


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")
    return value


def axis(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`axis` must be an integer, got {value!r}.")
    return int(value)

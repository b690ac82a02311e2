"""Shared input validation for the math core: fail early with a one-line ValueError saying what was expected."""

from __future__ import annotations

import numbers

import numpy as np


def as_float_array(x: object, name: str, ndim: int | None = None, size: int | None = None) -> np.ndarray:
    """Return ``x`` as a finite float64 array, checking its number of axes and last-axis length."""
    if x is None or isinstance(x, (str, bytes)):
        raise ValueError(f"{name}: expected a real numeric array, got {type(x).__name__}")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a real numeric array, got {type(x).__name__}") from exc
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if size is not None and (arr.ndim == 0 or arr.shape[-1] != size):
        raise ValueError(f"{name}: expected last axis of length {size}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return arr


def as_scalar(x: object, name: str, nonzero: bool = False, nonnegative: bool = False) -> float:
    """Return ``x`` as a finite Python float; optionally require it to be nonzero or nonnegative."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        if not (isinstance(x, np.ndarray) and x.ndim == 0 and np.isrealobj(x)):
            raise ValueError(f"{name}: expected a real scalar, got {type(x).__name__}")
    value = float(x)
    if not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if nonzero and value == 0.0:
        raise ValueError(f"{name}: expected a nonzero rate, got 0")
    if nonnegative and value < 0.0:
        raise ValueError(f"{name}: expected a nonnegative number, got {value}")
    return value


def as_label(label: object, num_classes: int) -> int:
    """Return ``label`` as an int class index in ``[0, num_classes)``."""
    if isinstance(label, bool) or not isinstance(label, (numbers.Integral, np.integer)):
        raise ValueError(f"label: expected an int class index, got {type(label).__name__}")
    value = int(label)
    if not 0 <= value < num_classes:
        raise ValueError(f"label: expected an index in [0, {num_classes}), got {value}")
    return value


def as_count(n: object, name: str, minimum: int = 1) -> int:
    """Return ``n`` as an int >= ``minimum`` (a size or a number of classes)."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, np.integer)):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {type(n).__name__}")
    if int(n) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(n)}")
    return int(n)


def as_logits(z: object, name: str = "z") -> np.ndarray:
    """Return a finite float64 logit vector of shape (K,) with K >= 2."""
    arr = as_float_array(z, name, ndim=1)
    if arr.shape[0] < 2:
        raise ValueError(f"{name}: expected at least 2 classes, got shape {arr.shape}")
    return arr


def as_probs(p: object, name: str = "p", atol: float = 1e-6) -> np.ndarray:
    """Return a probability vector (K,), K >= 2: finite, nonnegative (up to atol), summing to 1 (up to atol)."""
    arr = as_logits(p, name)
    if np.any(arr < -atol) or abs(float(arr.sum()) - 1.0) > atol:
        raise ValueError(f"{name}: expected a probability vector (nonnegative, summing to 1)")
    return arr

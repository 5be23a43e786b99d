"""Argument checks shared by the public API: each failure names the argument, what was expected and what
was received, as a ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


def check_int(value, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """Return ``value`` as a Python int; bools and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"{name}: expected an integer >= {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"{name}: expected an integer <= {max}, got {value}")
    return value


def check_seed(seed) -> int:
    """A seed is an integer in [0, 2**64)."""
    return check_int(seed, "seed", min=0, max=2**64 - 1)


def check_float(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a finite Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value}")
    return value


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_dtype(dtype, name: str = "dtype") -> np.dtype:
    """float32 or float64 (anything numpy reads as one of them)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}") from error
    if resolved not in (np.float32, np.float64):
        raise TypeError(f"{name}: expected float32 or float64, got {resolved}")
    return resolved


def check_array(x, name: str, *, dtype=None, ndim=None, shape=None, contiguous: bool = True) -> np.ndarray:
    """Check a numpy array without copying it.

    ``ndim`` may be an int or a tuple of allowed ranks; ``shape`` a tuple with ``None`` for free extents.
    """
    # Called on every kernel call: the passing path does plain comparisons only; messages are built on failure.
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {x.dtype}")
    if ndim is not None and x.ndim != ndim and (isinstance(ndim, int) or x.ndim not in ndim):
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape {x.shape}")
    if shape is not None:
        extents = x.shape
        mismatch = len(extents) != len(shape)
        for wanted, extent in zip(shape, extents):  # a plain loop: half the cost of all() over a generator
            mismatch = mismatch or (wanted is not None and wanted != extent)
        if mismatch:
            wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {wanted}, got {x.shape}")
    if contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray)")
    return x



def as_array(x, name: str, dtype) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype``, converted as numpy converts it: any array-like of real numbers
    (bool, integer or float, any byte order, read-only or strided) is cast; a copy is made only where ``x`` is not
    already such an array (then it is returned as is). Complex, object and other non-real dtypes raise TypeError
    naming the argument."""
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:  # ragged nested sequences and the like
        raise TypeError(f"{name}: expected an array of real numbers, got {type(x).__name__}: {error}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def as_integer_array(x, name: str) -> np.ndarray:
    """``x`` as a C-contiguous int64 array (``as_array``), refusing non-integer dtypes (float, bool, complex) with a
    TypeError naming the argument rather than truncating them."""
    array = np.asarray(x)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {array.dtype}")
    return as_array(array, name, np.int64)


def check_v0(v0, batch: int, n: int, dtype: np.dtype):
    """A warm start for ``batch`` eigensolvers of size ``n``: None, or real values [batch, n] ([n] for batch 1),
    each row finite and nonzero (at any scale); returned C-contiguous in ``dtype``."""
    if v0 is None:
        return None
    v0 = np.asarray(v0)
    if v0.dtype.kind not in "iuf":
        raise TypeError(f"v0: expected real numbers, got dtype {v0.dtype}")
    if v0.ndim == 1:
        v0 = v0[None]
    if v0.shape != (batch, n):
        raise ValueError(f"v0: expected shape ({batch}, {n}) or ({n},) for batch 1, got {v0.shape}")
    v0 = np.ascontiguousarray(v0, dtype=dtype)
    if not np.isfinite(v0).all() or not np.abs(v0).max(axis=1).all():
        raise ValueError(f"v0: every row must be finite and nonzero in {np.dtype(dtype).name}")
    return v0

"""Input checks shared by every op.

Each check raises `TypeError` (wrong kind of object or dtype) or `ValueError` (wrong rank,
shape, device, value or option) with a message that names the argument and shows what was
given, so a user can fix the call without reading the op's source.

Checks of *values* (index ranges, negative weights, NaN) look at tensor contents. On a CUDA
tensor that costs a host sync, so they can be switched off for production loops with
`ALIGN_TI_VALUE_CHECKS=0` or `set_value_checks(False)`; they are always skipped while
`torch.compile` traces. Shape, dtype and device checks are free and always on.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch

_value_checks = os.environ.get("ALIGN_TI_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the content checks (index ranges, negative weights, NaN) on or off."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether content checks run now (never while torch.compile traces)."""
    if not _value_checks:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def describe(t) -> str:
    """Short description of a tensor for error messages: shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{_shape(t)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_tensor(
    name: str,
    t,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """`t` is a tensor of the given rank(s) and dtype(s); returns it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {describe(t)}")
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """`t.shape[dim] == expected`, where `what` names where `expected` comes from."""
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {t.shape[dim]} in dim {dim} (shape {_shape(t)}), "
            f"but {what} is {expected}"
        )


def check_same_shape(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.shape != other.shape:
        raise ValueError(
            f"{name} must have the same shape as {other_name}: "
            f"got {_shape(t)} vs {_shape(other)}"
        )


def check_same_dtype(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.dtype != other.dtype:
        raise TypeError(
            f"{name} and {other_name} must share one dtype: got {describe(t)} vs {describe(other)}"
        )


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    """All given tensors (None entries skipped) live on one device; returns it."""
    items = [(n, t) for n, t in named.items() if t is not None]
    device = items[0][1].device
    for n, t in items[1:]:
        if t.device != device:
            raise ValueError(
                f"{n} is on {t.device} but {items[0][0]} is on {device}: "
                "all inputs must be on one device"
            )
    return device


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bool(name: str, value) -> None:
    """A real bool (not 0/1, not a string): flags whose truthiness would hide a typo."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_open_unit(name: str, value: float) -> None:
    """0 < value < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number with 0 < {name} < 1, got {value!r}")


def check_index_range(name: str, idx: torch.Tensor, size: int, what: str, allow: int | None = None) -> None:
    """Every entry of the integer tensor `idx` lies in [0, size) (or equals `allow`).

    A content check: skipped when value checks are off.
    """
    if idx.numel() == 0 or not value_checks_enabled():
        return
    valid = (idx >= 0) & (idx < size)
    if allow is not None:
        valid |= idx == allow
    if not bool(valid.all()):
        bad = idx[~valid]
        extra = f" or {allow}" if allow is not None else ""
        raise ValueError(
            f"{name} has entries outside [0, {size}){extra} ({what} is {size}): "
            f"e.g. {bad[:5].tolist()}"
        )


def check_finite_nonnegative(name: str, t: torch.Tensor) -> None:
    """A content check: all entries finite and >= 0."""
    if t.numel() == 0 or not value_checks_enabled():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf ({describe(t)})")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0; it holds negative entries ({describe(t)})")


def normalize_rows(rows, n: int, device: torch.device) -> torch.Tensor | None:
    """Validate `rows` (None, int64/int32 indices [M], or a bool mask [n]) against n rows.

    Returns None (all rows), a bool mask [n], or int64 indices [M] on `device`. A bool mask is
    kept as a mask so that callers need no host sync to count its rows.
    """
    if rows is None:
        return None
    check_tensor("rows", rows, ndim=1)
    if rows.device != device:
        raise ValueError(f"rows is on {rows.device} but the hidden states are on {device}")
    if rows.dtype == torch.bool:
        check_dim("rows", rows, 0, n, "the number of rows N (as a bool mask)")
        return rows
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rows must be int64 indices or a bool mask, got {describe(rows)}")
    check_index_range("rows", rows, n, "the number of rows N")
    return rows.long()

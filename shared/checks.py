"""Input validation shared by every public function: errors name the argument, the expected and the actual."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_same_shape",
    "check_positive_int",
    "check_in",
    "check_finite",
    "check_range",
]


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check type, rank, shape (``None`` entries match anything), dtype and device of a tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if shape is not None:
        for want, got in zip(shape, t.shape, strict=True):
            if want is not None and want != got:
                shown = ", ".join("*" if s is None else str(s) for s in shape)
                raise ValueError(f"{name}: expected shape ({shown}), got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device.type != torch.device(device).type:
        raise ValueError(f"{name}: expected a tensor on {torch.device(device).type}, got one on {t.device}")
    return t


def check_same_shape(names: Sequence[str], *tensors: torch.Tensor) -> None:
    """All tensors have the shape of the first one."""
    first = tuple(tensors[0].shape)
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if tuple(t.shape) != first:
            raise ValueError(f"{name}: expected shape {first} (that of {names[0]}), got {tuple(t.shape)}")


def check_positive_int(name: str, value: object) -> int:
    """A Python int (bools excluded) that is >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def check_in(name: str, value: object, allowed: Sequence[object]) -> object:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)!r}, got {value!r}")
    return value


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """No NaN or inf in ``t``."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} NaN/inf (first at {first})")
    return t


def check_range(name: str, t: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """All elements of ``t`` lie in ``[low, high]`` (either bound may be None)."""
    if low is not None and t.numel() and bool((t < low).any()):
        raise ValueError(f"{name}: expected values >= {low}, got min {float(t.min()):.6g}")
    if high is not None and t.numel() and bool((t > high).any()):
        raise ValueError(f"{name}: expected values <= {high}, got max {float(t.max()):.6g}")
    return t

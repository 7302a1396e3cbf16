"""Test helpers shared by every chapter: error metrics, a verbose ``assert_close``, poisoned outputs, seeded inputs.

The error metric (handbook §4) is the relative L2 error against a higher-precision reference,

    rel_err = ‖out − ref‖₂ / ‖ref‖₂,

plus an optional element-wise max-abs bound, plus "no NaN/inf where the reference is finite".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from nanokimi.triton_utils import interpreting

__all__ = [
    "rel_err",
    "assert_close",
    "check_attempt_like",
    "check_attempt_close",
    "poisoned_like",
    "poisoned_empty",
    "randn",
    "rand",
    "kernel_device",
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64 (the plain ‖out‖₂ when ref is all zeros)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out: expected shape {tuple(ref.shape)} (that of ref), got {tuple(out.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    den = torch.linalg.vector_norm(r)
    num = torch.linalg.vector_norm(o - r)
    return float(num / den) if den > 0 else float(num)


def assert_close(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    rtol_rel: float,
    atol: float = 0.0,
    *,
    show: int = 5,
) -> None:
    """Fail unless ``out`` matches ``ref``: same shape, no NaN/inf where ``ref`` is finite,
    ``rel_err(out, ref) <= rtol_rel``, and, when ``atol > 0``, ``max|out − ref| <= atol``.

    Positions where ``ref`` itself is ±inf must hold the same infinity in ``out``. The failure message
    names the tensor, the rel and max-abs errors and the ``show`` worst elements (index, out, ref).
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    same_inf = torch.isinf(r) & (o == r)
    bad = ~torch.isfinite(o) & ~same_inf
    if bool(bad.any()):
        idx = [tuple(int(i) for i in ix) for ix in bad.nonzero()[:show]]
        raise AssertionError(
            f"{name}: {int(bad.sum())} non-finite values where the reference is finite (first at {idx})"
        )
    ref_nonfinite = ~torch.isfinite(r) & ~same_inf
    if bool(ref_nonfinite.any()):
        idx = [tuple(int(i) for i in ix) for ix in ref_nonfinite.nonzero()[:show]]
        raise AssertionError(f"{name}: out differs from a non-finite reference at {idx}")
    finite = torch.isfinite(r)
    diff = torch.where(finite, (o - r).abs(), torch.zeros_like(r))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    err = rel_err(torch.where(finite, o, 0.0), torch.where(finite, r, 0.0))
    if err <= rtol_rel and (atol <= 0 or max_abs <= atol):
        return
    worst = torch.topk(diff.flatten(), k=min(show, diff.numel())).indices
    lines = []
    for flat in worst.tolist():
        ix = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        lines.append(f"    at {ix}: out={float(o[ix]):.6g} ref={float(r[ix]):.6g} |diff|={float(diff[ix]):.3g}")
    limits = f"rel_err limit {rtol_rel:g}" + (f", max-abs limit {atol:g}" if atol > 0 else "")
    raise AssertionError(
        f"{name}: rel_err={err:.3e}, max_abs={max_abs:.3e} ({limits}); worst elements:\n" + "\n".join(lines)
    )


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN (floats) or the dtype's max (integers), so unwritten elements show."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full_like(t, float("nan"))
    if t.dtype == torch.bool:
        return torch.ones_like(t)
    return torch.full_like(t, torch.iinfo(t.dtype).max)


@contextmanager
def poisoned_empty() -> Iterator[None]:
    """While active, ``torch.empty``/``empty_like`` return poisoned tensors (:func:`poisoned_like`), so an output a
    kernel launcher allocates and the kernel never writes fails the comparison instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(maker):
        return lambda *args, **kwargs: poisoned_like(maker(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned(real_empty), poisoned(real_empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _seeded(kind: str, shape: Sequence[int], seed: int, dtype: torch.dtype, device, requires_grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = getattr(torch, kind)(tuple(shape), generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def randn(
    *shape: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
) -> torch.Tensor:
    """Standard normal values, the same for a seed whatever the device or dtype (drawn in fp64 on the CPU)."""
    return _seeded("randn", shape, seed, dtype, device, requires_grad)


def rand(
    *shape: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
) -> torch.Tensor:
    """Uniform [0, 1) values, the same for a seed whatever the device or dtype."""
    return _seeded("rand", shape, seed, dtype, device, requires_grad)


def kernel_device() -> torch.device:
    """Where Triton kernels run here: CPU under the interpreter, else the current CUDA device."""
    return torch.device("cpu") if interpreting() else torch.device("cuda")


def check_attempt_like(name: str, got: object, want: torch.Tensor) -> None:
    """A student's result must be a tensor of the reference's shape and dtype (AssertionError naming what differs)."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{name}: expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise AssertionError(f"{name}: dtype {got.dtype}, expected {want.dtype}")


def check_attempt_close(
    name: str, got: object, want: torch.Tensor, rtol: float, hint: str = "", atol: float = 0.0
) -> None:
    """``assert_close`` for a student's result: first that it is a tensor of the reference's shape and dtype, then
    the values; ``hint`` is appended to a failure message."""
    check_attempt_like(name, got, want)
    try:
        assert_close(name, got, want, rtol_rel=rtol, atol=atol)
    except AssertionError as err:
        raise AssertionError(f"{err}\n  hint: {hint}" if hint else str(err)) from None

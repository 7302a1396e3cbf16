"""Small helpers for writing Triton kernels that run both compiled (GPU) and interpreted (CPU)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton

__all__ = ["interpreting", "autotune_configs", "ensure_cuda_or_interpreter", "dot_precision"]


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype`` that keeps fp32 inputs at fp32-level accuracy.

    fp32, compiled: ``"tf32x3"``, three TF32 tensor-core products of a big/small split (big·big + big·small +
    small·big, ≈ 2⁻²¹ relative per product); exact ``"ieee"`` dots would run on the CUDA cores instead.
    fp32, interpreted: ``"ieee"`` (NumPy fp32). 16-bit operands run on the tensor cores natively, so the setting is
    unused for them (``"tf32"``).
    """
    if dtype == torch.float32:
        return "ieee" if interpreting() else "tf32x3"
    return "tf32"


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over: all of them compiled, only the first under the interpreter.

    Autotuning under the interpreter would run every config through NumPy for no benefit (and multi-config
    autotune is fragile there), so list the config that suits tiny CPU shapes first.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("autotune_configs: configs must hold at least one triton.Config, got an empty list")
    return configs[:1] if interpreting() else configs


def ensure_cuda_or_interpreter(*tensors: torch.Tensor, names: Sequence[str] | None = None) -> None:
    """Raise ValueError unless every tensor can be handed to a Triton kernel here.

    Compiled kernels need CUDA tensors; the interpreter needs CPU tensors.
    """
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(tensors))]
    if len(names) != len(tensors):
        raise ValueError(f"names: expected {len(tensors)} names, got {len(names)}")
    want = "cpu" if interpreting() else "cuda"
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != want:
            how = "the Triton interpreter (TRITON_INTERPRET=1)" if want == "cpu" else "compiled Triton"
            raise ValueError(f"{name}: expected a {want} tensor for {how}, got one on {t.device}")

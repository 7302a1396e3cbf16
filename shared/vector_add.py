"""The smallest Triton kernel, out = x + y: proves the two-tier test path (interpreted on CPU, compiled on GPU).

One program adds one tile of ``BLOCK`` consecutive elements; the last tile is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_same_shape, check_tensor
from nanokimi.triton_utils import ensure_cuda_or_interpreter

__all__ = ["vector_add"]


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, x + y, mask=mask)


def vector_add(x: torch.Tensor, y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Element-wise ``x + y`` for two tensors of the same shape and floating dtype."""
    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("y", y, dtypes=(x.dtype,))
    check_same_shape(("x", "y"), x, y)
    ensure_cuda_or_interpreter(x, y, names=("x", "y"))
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return out

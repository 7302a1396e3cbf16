"""Exercise 5 (hard, Triton): the grouped GEMM tile loop, gate‖up in one pass with the SwiGLU epilogue.

Task. After ``nanokimi.moe.permute`` every row tile of the expert-sorted layout belongs to one expert, so all E
expert GEMMs run as one launch. Write the kernel that computes, for every real row r of the permuted layout,

    act[r] = silu(x_t W_gate[e]ᵀ) ⊙ (x_t W_up[e]ᵀ),   t = row_token[r],  e = tile_expert[r // BLOCK_M],
    silu(g) = g · sigmoid(g),

with one program per (row tile, column block) output tile of ``[BLOCK_M, BLOCK_N]``:

    1. read the tile's expert; tiles past the last expert hold E and have nothing to do;
    2. gather the A rows straight from x through row_token inside the load (no copy of x is ever made);
       padding rows have row_token = −1: mask them;
    3. loop over D in BLOCK_K steps: one A tile [BLOCK_M, BLOCK_K] feeds two accumulators,
       acc_gate += A · W_gate[e]ᵀ tile and acc_up += A · W_up[e]ᵀ tile (each [BLOCK_K, BLOCK_N]), in fp32;
    4. epilogue: act = acc_gate · sigmoid(acc_gate) · acc_up, stored for the real rows and columns only.

Shapes: x [N, D] fp32; w_gate, w_up [E, F, D] (``nn.Linear`` layout: W[e][f, d]); perm from
``nanokimi.moe.permute(topk_idx, E, block_m)``; returns act [R, F] with R = perm.n_rows (the values of padding
rows do not matter). BLOCK_M = perm.block_m; BLOCK_N and BLOCK_K are the launcher's ``block_n``, ``block_k``.

Hints.
- The element W[e][f, d] is at ``e·F·D + f·D + d``: the [BLOCK_K, BLOCK_N] tile of W[e]ᵀ has offsets
  ``e·F·D + cols[None, :]·D + ks[:, None]``.
- D and F need not be multiples of the blocks: mask the K tail of both operands (load 0.0) and the column tail.
- Use ``tl.dot(a, b, acc, input_precision="ieee")``: exact fp32 under the interpreter, and no TF32 rounding
  when compiled on a GPU.
- A 2-D grid ``(perm.n_tiles, cdiv(F, BLOCK_N))`` is enough (the chapter's kernel reorders programs for L2 reuse).
- The grader calls only ``grouped_swiglu``: change the kernel's signature if you like.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.moe import Permutation


@triton.jit
def _grouped_swiglu_kernel(
    x_ptr,  # [N, D]
    w_gate_ptr,  # [E, F, D]
    w_up_ptr,  # [E, F, D]
    act_ptr,  # [R, F] out
    row_token_ptr,  # [R] int32, −1 on padding rows
    tile_expert_ptr,  # [R / BLOCK_M] int32, E past the last expert's tiles
    n_rows,
    n_experts,
    D,
    F,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of act: row tile program_id(0), column block program_id(1)."""
    # YOUR CODE HERE (roughly 26 lines)
    raise NotImplementedError


def grouped_swiglu(
    x: torch.Tensor,
    perm: Permutation,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """``act [R, F]``: silu(x_t W_gate[e]ᵀ) ⊙ (x_t W_up[e]ᵀ) for every real row of ``perm`` (one launch)."""
    # YOUR CODE HERE (roughly 5 lines)
    raise NotImplementedError

"""Exercise 4 (hard, Triton): the token permutation as kernels (histogram → prefix sum → scatter).

Task. The grouped GEMM wants the N·k token-slots sorted by expert, with each expert's segment padded to a
multiple of the row tile ``block_m`` so that every row tile belongs to one expert. Build the maps of
``nanokimi.moe.permute`` (which does it with a torch argsort, bincount, cumsum and searchsorted) with Triton
kernels instead, as vLLM's ``moe_align_block_size`` does. Slot s = t·k + j is token t's j-th expert, e_s:

    c_e          = #{s : e_s = e}                                   histogram            tokens_per_expert [E]
    tiles_e      = ⌈c_e / block_m⌉;  start_e = Σ_{e' < e} tiles_e'  exclusive prefix sum  expert_tile_start [E+1]
    row(s)       = start_e · block_m + #{s' < s : e_s' = e}          scatter: inside an expert, slots keep their order
    slot_row[t, j] = row(t·k + j);  row_token[row(s)] = s // k;  row_slot[row(s)] = s          (−1 on padding rows)
    tile_expert[i] = e for start_e ≤ i < start_e + tiles_e, and E for the tiles after the last expert's

The number of rows R is fixed without reading c back to the host: n_tiles = ⌊(N·k + E·(block_m − 1)) / block_m⌋
(an upper bound of Σ_e tiles_e) and R = n_tiles · block_m.

Write ``permute_triton(topk_idx, n_experts, block_m)`` returning a ``nanokimi.moe.Permutation`` equal, field by
field, to ``nanokimi.moe.permute(topk_idx, n_experts, block_m)``. The suggested design (you may change the kernel
signatures; the grader only calls ``permute_triton``):

- ``_histogram_kernel``, one program per expert e: walk the flat expert ids in blocks of BLOCK_S and count e.
- ``_scatter_kernel``, one program per expert e: load all counts (BLOCK_E ≥ E lanes), compute tiles and start_e
  (a masked ``tl.sum`` over the experts before e is the prefix sum), write expert_tile_start[e] (and [E] from the
  last program) and tile_expert over e's tiles; then walk the slots again, in order: within a block the rank of
  a slot among e's slots is ``tl.cumsum(hit) − 1`` plus the count of e's slots in the earlier blocks.
- ``expert_order`` (experts by decreasing load, for the backward) stays in torch:
  ``torch.argsort(counts, descending=True, stable=True)``.

Dtypes: tokens_per_expert int64; slot_row [N, k], row_token [R], row_slot [R], tile_expert [n_tiles],
expert_tile_start [E + 1] and expert_order [E] int32.

Hints. Fill row_token and row_slot with −1 and tile_expert with E before the scatter kernel runs: the kernels
only write real rows and used tiles. Mask every load and store (the interpreter does not catch out-of-bounds
accesses). ``triton.next_power_of_2(E)`` sizes BLOCK_E. One program per expert that scans every slot is
O(E·N·k) work: fine here; vLLM instead gives each program a block of slots and merges per-block histograms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.moe import Permutation


@triton.jit
def _histogram_kernel(expert_ids_ptr, counts_ptr, n_slots, BLOCK_S: tl.constexpr):
    """counts[e] = #{s : expert_ids[s] = e} for e = program_id(0)."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError


@triton.jit
def _scatter_kernel(
    expert_ids_ptr,  # [N·k] int32, slot s = t·k + j
    counts_ptr,  # [E] int32
    slot_row_ptr,  # [N·k] int32 out
    row_token_ptr,  # [R] int32 out (pre-filled with −1)
    row_slot_ptr,  # [R] int32 out (pre-filled with −1)
    tile_expert_ptr,  # [n_tiles] int32 out (pre-filled with E)
    tile_start_ptr,  # [E + 1] int32 out
    n_slots,
    n_experts,
    top_k,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program e: the prefix sum of the tile counts up to e, e's entries of the tile maps, and the rows of e's
    slots (in slot order)."""
    # YOUR CODE HERE (roughly 22 lines)
    raise NotImplementedError


def permute_triton(topk_idx: torch.Tensor, n_experts: int, block_m: int) -> Permutation:
    """The maps of ``nanokimi.moe.permute(topk_idx, n_experts, block_m)``, built by Triton kernels.

    Args:
        topk_idx: ``[N, k]`` int64/int32 expert ids in ``[0, E)``. n_experts: E. block_m: the row tile (a power
            of two ≥ 16).
    """
    # YOUR CODE HERE (roughly 16 lines)
    raise NotImplementedError

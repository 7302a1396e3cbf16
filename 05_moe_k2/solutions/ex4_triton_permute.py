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
    expert = tl.program_id(0)
    count = 0
    for start in range(0, n_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ids = tl.load(expert_ids_ptr + slots, mask=slots < n_slots, other=-1)
        count += tl.sum((ids == expert).to(tl.int32), axis=0)
    tl.store(counts_ptr + expert, count)


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
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    counts = tl.load(counts_ptr + experts, mask=experts < n_experts, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_E] row tiles per expert
    first_tile = tl.sum(tl.where(experts < expert, tiles, 0), axis=0)  # exclusive prefix sum at e
    my_tiles = tl.sum(tl.where(experts == expert, tiles, 0), axis=0)
    tl.store(tile_start_ptr + expert, first_tile)
    if expert == n_experts - 1:
        tl.store(tile_start_ptr + n_experts, first_tile + my_tiles)
    for i in range(0, my_tiles):
        tl.store(tile_expert_ptr + first_tile + i, expert)
    seen = 0  # e's slots in the blocks already walked
    for start in range(0, n_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ids = tl.load(expert_ids_ptr + slots, mask=slots < n_slots, other=-1)
        hit = ids == expert
        rank = seen + tl.cumsum(hit.to(tl.int32), axis=0) - 1  # position among e's slots (valid where hit)
        row = first_tile * BLOCK_M + rank
        tl.store(slot_row_ptr + slots, row, mask=hit)
        tl.store(row_token_ptr + row, slots // top_k, mask=hit)
        tl.store(row_slot_ptr + row, slots, mask=hit)
        seen += tl.sum(hit.to(tl.int32), axis=0)


def permute_triton(topk_idx: torch.Tensor, n_experts: int, block_m: int) -> Permutation:
    """The maps of ``nanokimi.moe.permute(topk_idx, n_experts, block_m)``, built by Triton kernels.

    Args:
        topk_idx: ``[N, k]`` int64/int32 expert ids in ``[0, E)``. n_experts: E. block_m: the row tile (a power
            of two ≥ 16).
    """
    n_tokens, top_k = topk_idx.shape
    device = topk_idx.device
    expert_ids = topk_idx.reshape(-1).to(torch.int32).contiguous()  # [N·k]
    n_slots = expert_ids.numel()
    n_tiles = (n_slots + n_experts * (block_m - 1)) // block_m  # host arithmetic only: no sync
    block_s = 64
    counts = torch.empty(n_experts, dtype=torch.int32, device=device)
    _histogram_kernel[(n_experts,)](expert_ids, counts, n_slots, BLOCK_S=block_s)
    slot_row = torch.empty(n_slots, dtype=torch.int32, device=device)
    row_token = torch.full((n_tiles * block_m,), -1, dtype=torch.int32, device=device)
    row_slot = torch.full_like(row_token, -1)
    tile_expert = torch.full((n_tiles,), n_experts, dtype=torch.int32, device=device)
    tile_start = torch.empty(n_experts + 1, dtype=torch.int32, device=device)
    _scatter_kernel[(n_experts,)](
        expert_ids, counts, slot_row, row_token, row_slot, tile_expert, tile_start, n_slots, n_experts, top_k,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_S=block_s,
    )  # fmt: skip
    tokens_per_expert = counts.to(torch.int64)
    return Permutation(
        n_experts=n_experts,
        top_k=top_k,
        block_m=block_m,
        tokens_per_expert=tokens_per_expert,
        slot_row=slot_row.view(n_tokens, top_k),
        row_token=row_token,
        row_slot=row_slot,
        tile_expert=tile_expert,
        expert_tile_start=tile_start,
        expert_order=torch.argsort(tokens_per_expert, descending=True, stable=True).to(torch.int32),
    )

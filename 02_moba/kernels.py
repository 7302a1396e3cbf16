"""MoBA in Triton: a gating kernel and a block-sparse flash-attention forward and backward.

The math is that of ``reference.py`` (per query i at position p_i, current block c_i = ⌊p_i / B⌋):

    S_i = {c_i} ∪ top-(k−1) past blocks by ⟨q_i, K̄_j⟩        o_i = Σ_{s ∈ S_i, s ≤ p_i} softmax(scale·q_i·k_s) v_s

and it is computed as two streams merged by their log-sum-exps (tech report Algorithm 1):

* the **self stream**: query i against its own block, causal (a block-local flash attention);
* the **past stream**: each (query, selected past block) *pair* — a full, unmasked block of B keys;
* the **merge**: with ``lse = log Σ exp(logits)`` per stream, ``o_i = Σ_streams exp(lse_s − lse_i) · o_s`` and
  ``lse_i = log Σ_s exp(lse_s)``. The backward reuses the merged ``lse_i`` and ``Δ_i = rowsum(dO_i ∘ O_i)``, so
  each stream's gradient is the exact gradient of the joint softmax (``dS = P ∘ (dP − Δ)``).

Per query or per tile? A flash kernel is fast because a tile of queries shares each K/V tile it loads. With
per-query selection (the paper's, and the reference's), the 128 queries of a tile may pick 128 different sets of
blocks; a query-major kernel would visit the *union* of their blocks and mask — with random or uncorrelated
queries that union is nearly every block, i.e. dense cost. Selecting per query *tile* (one top-k for 64–128
queries) would keep the query-major kernel simple and cheap, but it changes the model: a query would attend
blocks chosen by its neighbours' average, not by itself. This file keeps the exact per-query semantics and pays
instead with a *gather*: the past stream is computed key-block-major — for block j, gather the queries that
picked it into dense tiles, so every multiply is useful — at the cost of (1) building the gather plan (a counting
sort of the (query, block) pairs), (2) a pair buffer of ``B·H·T·(k−1)·D`` partial outputs written by the past
stream and read by the merge (the input dtype, like the official implementation's flash-attn varlen streams), and
(3) a backward with 7 matmuls per (query, key) pair instead of flash attention's 5: dK/dV are accumulated
key-major (no atomics, deterministic) and dQ is recomputed query-tile-major per pair into a second pair buffer.

Kernels and what one program computes (``BH = B·H``, ``n = ⌈T / B⌉`` blocks, tiles of ``BLOCK_M`` queries and
``BLOCK_N`` keys):

* ``_block_mean_kernel`` — grid (n, BH): one block's mean key ``K̄_j`` in fp32.
* ``_gate_kernel`` — grid (⌈Tq / BLOCK_M⌉, BH): scores of ``BLOCK_M`` queries against the past blocks' means
  (fp32; tf32x3 tensor-core dots on the GPU) and a running top-(k−1) per query, kept as an unordered set of
  (score, block) slots and updated chunk by chunk of ``BLOCK_N`` blocks. A chunk is consumed best first — the
  row max, then the lowest block holding it (ties go to the lower block) replaces the set's weakest slot — for
  only as many rounds as the tile's most demanding row needs: the number of its candidates at or above its
  weakest kept score, at most k−1. The gate is ALU-bound, so this is all fp32/int32 compares and selects.
  ``BLOCK_M = 64`` with 4 warps makes each warp own 16 whole rows of the score tile, so the row reductions are
  warp shuffles, not shared-memory round trips.
* ``_rank_kernel`` — grid (⌈Tq / 32⌉, BH), one warp: the counting sort's bookkeeping for 32 rows. It sorts the
  tile's 32·KP (query, block) pairs by one int32 key (block, row, slot) with ``tl.sort``; a pair's rank among the
  tile's pairs of its block is its distance to the first pair of that block (an associative scan), and the
  per-(block, tile) counts are integer atomics (order-free, deterministic).
* ``_scatter_pairs_kernel`` — same grid: each pair's row in the pair buffers, the prefix sum of the counts over
  (bh, block, tile) plus its rank, so pairs are grouped by (bh, block) and ordered by query (deterministic).
* ``_fwd_pairs_kernel`` — one program per tile of ``BLOCK_M`` gathered queries of one (bh, block): flash attention
  over the block's B keys (online softmax); writes the pairs' partial outputs, log-sum-exps and logit maxima.
* ``_fwd_self_kernel`` — grid (⌈Tq / BLOCK_M⌉, BH): block-local causal flash attention, then the merge of the
  tile's partials; writes o, the merged lse (saved for backward) and, when asked, each row's max logit.
* ``_bwd_dkdv_kernel`` — grid (n·⌈B / BLOCK_N⌉, BH): ``BLOCK_N`` keys of block j, looping over the block's own
  queries (causal) and then over every gathered query that picked it; dK, dV in registers, written once.
* ``_bwd_dq_pairs_kernel`` — the pair tiles again: dQ of each pair from the block's keys, into the dQ pair buffer.
* ``_bwd_dq_self_kernel`` — query tiles: dQ of the self stream plus the query's pair rows from the buffer.

Cost: with ``T ≫ k·B`` each query reads ≤ k·B keys instead of T/2 on average, so the FLOP ratio to dense causal
attention is ≈ T / (2kB) (4× at 32K and 16× at 128K for B = 512, k = 8), minus the pair-buffer traffic
(≈ 2·(k−1)·D·2 bytes per query each way) and the backward's two extra matmuls. Precision: bf16/fp16 tensor-core
dots with fp32 accumulation, softmax statistics in fp32 and base 2 (``exp2``, ``lse`` stored in log2 units);
fp32 inputs use three-pass TF32 dots on the GPU (``input_precision="tf32x3"``, ≈ fp32 accuracy at tensor-core
speed) and exact fp32 under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanokimi.checks import check_positive_int, check_tensor
from nanokimi.moba.reference import check_causal, check_qkv, check_scale
from nanokimi.triton_utils import dot_precision, ensure_cuda_or_interpreter, interpreting

__all__ = ["moba_gate_triton", "moba_attention_triton"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Tile shapes and launch settings. The GPU values were chosen by a sweep on an H100 (B=1, H=16, D=128, bf16,
# block 512, top-8; see the chapter README): 128 gathered queries per pair tile (8 warps, two warpgroups), 128
# keys per dK/dV program, three pipeline stages. Against 64-query / 64-key tiles they measured only 1–5% faster
# per kernel. Under the interpreter the cost is per operation, not per element, so it gets few, medium tiles.
GPU_TILES = {
    "gate": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "rank": {"BLOCK_M": 32, "num_warps": 1},
    "pairs": {"BLOCK_M": 128},  # gathered queries per pair tile; shared by the forward and dQ pair kernels
    "fwd_pairs": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    "fwd_self": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "bwd_dkdv": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    "bwd_dq_pairs": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "bwd_dq_self": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}
# fp32 operands take twice the shared memory of 16-bit ones per pipeline stage (and tf32x3 dots keep split
# copies), so compiled fp32 launches use smaller tiles and fewer stages (with the 16-bit settings of an earlier
# version the dQ kernels asked for 256 KB at D = 128; the H100 has 227 KB per block).
GPU_FP32_TILES = {
    "pairs": {"BLOCK_M": 64},
    "fwd_pairs": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "fwd_self": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "bwd_dq_pairs": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    "bwd_dq_self": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
}
INTERPRETER_TILES = {
    "gate": {"BLOCK_M": 32, "BLOCK_N": 16},
    "rank": {"BLOCK_M": 32},
    "pairs": {"BLOCK_M": 32},
    "fwd_pairs": {"BLOCK_N": 16},
    "fwd_self": {"BLOCK_M": 32, "BLOCK_N": 32},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 16},
    "bwd_dq_pairs": {"BLOCK_N": 16},
    "bwd_dq_self": {"BLOCK_M": 32, "BLOCK_N": 32},
}


def _tiles(kernel: str, dtype: torch.dtype | None = None) -> dict:
    if interpreting():
        return dict(INTERPRETER_TILES[kernel])
    if dtype == torch.float32 and kernel in GPU_FP32_TILES:
        return dict(GPU_FP32_TILES[kernel])
    return dict(GPU_TILES[kernel])


# ---------------------------------------------------------------------------------------------------------------
# Gating: block means, top-(k−1) past blocks per query, and the gather plan (a counting sort of the pairs).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _block_mean_kernel(
    k_ptr,
    kbar_ptr,
    T_k,
    H,
    n_blocks,
    block_size,
    stride_kb,
    stride_kt,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    start = j * block_size
    end = tl.minimum(start + block_size, T_k)
    base = k_ptr + (bh // H).to(tl.int64) * stride_kb + (bh % H) * stride_kh
    acc = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)
    for t0 in range(start, end, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        mask = (t < end)[:, None]
        acc += tl.load(base + t.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / (end - start).to(tl.float32)  # [HEAD_DIM], zero in the padding
    tl.store(kbar_ptr + (bh * n_blocks + j).to(tl.int64) * HEAD_DIM + d, mean)


@triton.jit
def _gate_kernel(
    q_ptr,
    kbar_ptr,
    sel_ptr,
    T_q,
    q_offset,
    H,
    n_blocks,
    block_size,
    stride_qb,
    stride_qt,
    stride_qh,
    KSEL: tl.constexpr,
    KP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T_q
    current = (rows + q_offset) // block_size  # [BM] each query's own block
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + (bh // H).to(tl.int64) * stride_qb + (bh % H) * stride_qh + rows.to(tl.int64)[:, None] * stride_qt
    q = tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)

    # The running top-KSEL is an unordered set of (score, block) slots; empty slots hold (−inf, −1 − slot), distinct
    # ids so that exactly one slot is replaced at a time, and padding slots (KSEL ≤ slot < KP) hold +inf: never
    # the weakest. Order: higher score first, the lower block on equal scores.
    slot = tl.arange(0, KP)
    best_s = tl.where(slot < KSEL, float("-inf"), float("inf"))[None, :] + tl.zeros([BLOCK_M, KP], tl.float32)
    best_b = (-1 - slot)[None, :] + tl.zeros([BLOCK_M, KP], tl.int32)
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, T_q) - 1
    n_candidates = (last_row + q_offset) // block_size  # blocks before the last row's own block
    for n0 in range(0, n_candidates, BLOCK_N):
        blocks = n0 + tl.arange(0, BLOCK_N)
        kbar = tl.load(
            kbar_ptr + (bh * n_blocks + blocks).to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
            mask=(blocks < n_candidates)[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(kbar), input_precision=PRECISION)  # [BM, BN] fp32 scores
        s = tl.where(blocks[None, :] < current[:, None], s, float("-inf"))  # strictly past blocks only
        # Only candidates at or above a row's weakest kept score can enter, and at most KSEL of them: the chunk
        # is consumed best first for as many rounds as the most demanding row of the tile needs (fp32 and int32
        # compares throughout — this loop is the gate's whole cost).
        floor = tl.min(best_s, axis=1)  # [BM]
        n_new = tl.sum(((s >= floor[:, None]) & (s > float("-inf"))).to(tl.int32), axis=1)
        for _ in range(tl.minimum(tl.max(n_new, axis=0), KSEL)):
            top = tl.max(s, axis=1)  # [BM] the chunk's best remaining score
            win = tl.min(tl.where(s == top[:, None], blocks[None, :], 0x7FFFFFFF), axis=1)  # lowest block of a tie
            s = tl.where(blocks[None, :] == win[:, None], float("-inf"), s)
            low = tl.min(best_s, axis=1)  # the weakest kept slot: lowest score, then highest block
            loser = tl.max(tl.where(best_s == low[:, None], best_b, -KP - 1), axis=1)
            enter = (top > float("-inf")) & ((top > low) | ((top == low) & (win < loser)))
            replace = (best_b == loser[:, None]) & enter[:, None]
            best_s = tl.where(replace, top[:, None], best_s)
            best_b = tl.where(replace, win[:, None], best_b)
    sel = tl.where(best_b >= 0, best_b, -1)  # [BM, KP] block ids, −1: no block
    offs = (bh * T_q + rows).to(tl.int64)[:, None] * KSEL + slot[None, :]
    tl.store(sel_ptr + offs, sel, mask=row_ok[:, None] & (slot[None, :] < KSEL))


@triton.jit
def _same_block_first(a_block, a_first, b_block, b_first):
    # Scan operator over a sorted sequence: carry the index of the first element of the current run of equal blocks.
    return b_block, tl.where(a_block == b_block, a_first, b_first)


@triton.jit
def _rank_kernel(
    sel_ptr,
    rank_ptr,
    hist_ptr,
    T_q,
    n_blocks,
    n_rank_tiles,
    KSEL: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Counting-sort bookkeeping for BLOCK_M rows: sort the tile's BLOCK_M·KP pairs by (block, row, slot) — one int32
    # key each — then a pair's rank among the tile's pairs of its block is its distance to the first pair of that
    # block, and the tile's count per block is added to hist[group, tile] (integer atomics: order-free).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    P: tl.constexpr = BLOCK_M * KP
    flat = tl.arange(0, P)  # pair index m·KP + s inside the tile
    rows = tile * BLOCK_M + flat // KP
    slot = flat % KP
    ok = (rows < T_q) & (slot < KSEL)
    offs = (bh * T_q + rows).to(tl.int64) * KSEL + slot
    sel = tl.load(sel_ptr + offs, mask=ok, other=-1)
    keys = tl.where(ok & (sel >= 0), sel * P + flat, 0x7FFFFFFF)  # invalid pairs sort last
    keys = tl.sort(keys)
    block = keys // P
    pair = keys % P
    _, first = tl.associative_scan((block, flat), 0, _same_block_first)
    valid = keys != 0x7FFFFFFF
    rows_s = tile * BLOCK_M + pair // KP
    offs_s = (bh * T_q + rows_s).to(tl.int64) * KSEL + pair % KP
    tl.store(rank_ptr + offs_s, flat - first, mask=valid)
    cell = (bh * n_blocks + block).to(tl.int64) * n_rank_tiles + tile
    tl.atomic_add(hist_ptr + cell, tl.full([P], 1, tl.int32), mask=valid)


@triton.jit
def _scatter_pairs_kernel(
    sel_ptr,
    rank_ptr,
    hist_ptr,
    hist_incl_ptr,
    pair_pos_ptr,
    pair_query_ptr,
    T_q,
    n_blocks,
    n_rank_tiles,
    KSEL: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, KP)
    ok = (rows < T_q)[:, None] & (slot[None, :] < KSEL)
    offs = (bh * T_q + rows).to(tl.int64)[:, None] * KSEL + slot[None, :]
    sel = tl.load(sel_ptr + offs, mask=ok, other=-1)
    rank = tl.load(rank_ptr + offs, mask=ok, other=0)
    valid = ok & (sel >= 0)
    # Pairs are laid out by (group, rank tile): this tile's segment of group g starts at the exclusive prefix sum.
    cell = (bh * n_blocks + sel).to(tl.int64) * n_rank_tiles + tile
    segment_start = tl.load(hist_incl_ptr + cell, mask=valid, other=0) - tl.load(hist_ptr + cell, mask=valid, other=0)
    pos = segment_start + rank
    tl.store(pair_pos_ptr + offs, tl.where(valid, pos, -1), mask=ok)
    query = tl.zeros([BLOCK_M, KP], tl.int32) + rows[:, None]
    tl.store(pair_query_ptr + pos, query, mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Forward: past stream (pair tiles), then self stream + merge (query tiles).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_pairs_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_part_ptr,
    lse_part_ptr,
    max_part_ptr,
    pair_query_ptr,
    group_start_ptr,
    group_count_ptr,
    tile_group_ptr,
    tile_begin_ptr,
    n_groups,
    H,
    n_blocks,
    block_size,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.load(tile_group_ptr + pid)  # (bh, block) group of this tile; n_groups past the last tile
    if g >= n_groups:
        return
    first = (pid - tl.load(tile_begin_ptr + g)) * BLOCK_M
    start = tl.load(group_start_ptr + g).to(tl.int64) + first  # int64: rows × HEAD_DIM may pass 2³¹
    n_rows = tl.load(group_count_ptr + g) - first
    bh = g // n_blocks
    j = g % n_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    m = tl.arange(0, BLOCK_M)
    row_ok = m < n_rows
    d = tl.arange(0, HEAD_DIM)
    qi = tl.load(pair_query_ptr + start + m, mask=row_ok, other=0).to(tl.int64)
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + qi[:, None] * stride_qt + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [BM, D] gathered queries
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = j * block_size
    hi = lo + block_size  # a past block is complete and lies wholly before every query of the group
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = n.to(tl.int64)[:, None] * stride_kt + d[None, :]
        if EVEN_N:
            k = tl.load(k_base + kv_offs)
            v = tl.load(v_base + kv_offs)
        else:
            k = tl.load(k_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
            v = tl.load(v_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BN] q·k; the logits are qk_scale·s
        if not EVEN_N:
            s = tl.where((n < hi)[None, :], s, float("-inf"))
        # Scale after the row max (qk_scale > 0), so that qk_scale·s − m is one fused multiply-add per element.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    rows_out = start + m
    o = acc / l_i[:, None]
    tl.store(
        o_part_ptr + rows_out[:, None] * HEAD_DIM + d[None, :],
        o.to(o_part_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_part_ptr + rows_out, m_i + tl.log2(l_i), mask=row_ok)
    if TRACK_MAX:
        tl.store(max_part_ptr + rows_out, m_i, mask=row_ok)


@triton.jit
def _fwd_self_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    rowmax_ptr,
    o_part_ptr,
    lse_part_ptr,
    max_part_ptr,
    pair_pos_ptr,
    T_q,
    q_offset,
    H,
    block_size,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    KSEL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T_q
    pos = rows + q_offset
    current = pos // block_size
    d = tl.arange(0, HEAD_DIM)
    row_offs = b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr + row_offs, mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = ((tile * BLOCK_M + q_offset) // block_size) * block_size  # first row's block start
    hi = tl.minimum(tile * BLOCK_M + BLOCK_M, T_q) + q_offset  # one past the last row's position
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = n.to(tl.int64)[:, None] * stride_kt + d[None, :]
        k = tl.load(k_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        v = tl.load(v_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        keep = (n[None, :] <= pos[:, None]) & ((n // block_size)[None, :] == current[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see no key of this chunk yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row_max = m_i
    # Merge the past stream: each (query, slot) pair's normalised output o_p with weight 2^(lse_p − m).
    for s_idx in tl.static_range(KSEL):
        pp = tl.load(pair_pos_ptr + (bh * T_q + rows).to(tl.int64) * KSEL + s_idx, mask=row_ok, other=-1)
        has = pp >= 0
        pp64 = pp.to(tl.int64)
        lse_p = tl.load(lse_part_ptr + pp64, mask=has, other=float("-inf"))
        o_p = tl.load(o_part_ptr + pp64[:, None] * HEAD_DIM + d[None, :], mask=has[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse_p - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_p.to(tl.float32)
        l_i = l_i * alpha + w
        m_i = m_new
        if TRACK_MAX:
            row_max = tl.maximum(row_max, tl.load(max_part_ptr + pp64, mask=has, other=float("-inf")))
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(o_ptr + row_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * T_q + rows, m_i + tl.log2(l_safe), mask=row_ok)
    if TRACK_MAX:
        tl.store(rowmax_ptr + bh * T_q + rows, row_max, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Backward: Δ = rowsum(dO ∘ O); dK/dV key-major over each block's queries; dQ per pair, then self + sum.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    T_q,
    H,
    stride_qb,
    stride_qt,
    stride_qh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    mask = (rows < T_q)[:, None]
    offs = (bh // H).to(tl.int64) * stride_qb + (bh % H) * stride_qh + rows.to(tl.int64)[:, None] * stride_qt
    o = tl.load(o_ptr + offs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * T_q + rows, tl.sum(o * do, axis=1), mask=rows < T_q)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    pair_query_ptr,
    group_start_ptr,
    group_count_ptr,
    T_q,
    T_k,
    q_offset,
    H,
    n_blocks,
    block_size,
    n_sub,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    HAS_PAIRS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    j = pid // n_sub
    k0 = j * block_size + (pid % n_sub) * BLOCK_N
    block_end = tl.minimum(j * block_size + block_size, T_k)
    if k0 >= block_end:
        return
    b = (bh // H).to(tl.int64)
    h = bh % H
    n = k0 + tl.arange(0, BLOCK_N)
    key_ok = n < block_end
    d = tl.arange(0, HEAD_DIM)
    kv_offs = b * stride_kb + h * stride_kh + n.to(tl.int64)[:, None] * stride_kt + d[None, :]
    k = tl.load(k_ptr + kv_offs, mask=key_ok[:, None], other=0.0)  # [BN, D]
    v = tl.load(v_ptr + kv_offs, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_qb + h * stride_qh

    # 1) Block j's own queries (self stream): positions k0 … block_end − 1, causal.
    for p0 in range(tl.maximum(k0, q_offset), block_end, BLOCK_M):
        qpos = p0 + tl.arange(0, BLOCK_M)
        ok = qpos < block_end
        qi = (qpos - q_offset).to(tl.int64)
        q = tl.load(q_base + qi[:, None] * stride_qt + d[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(do_base + qi[:, None] * stride_qt + d[None, :], mask=ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh * T_q + qi, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + bh * T_q + qi, mask=ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where((n[:, None] <= qpos[None, :]) & ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    # 2) Every query that picked block j as a past block (past stream): gathered, no mask inside the block.
    if HAS_PAIRS:
        g = bh * n_blocks + j
        start = tl.load(group_start_ptr + g).to(tl.int64)
        count = tl.load(group_count_ptr + g)
        for m0 in range(0, count, BLOCK_M):
            mm = m0 + tl.arange(0, BLOCK_M)
            ok = mm < count
            qi = tl.load(pair_query_ptr + start + mm, mask=ok, other=0).to(tl.int64)
            q = tl.load(q_base + qi[:, None] * stride_qt + d[None, :], mask=ok[:, None], other=0.0)
            do = tl.load(do_base + qi[:, None] * stride_qt + d[None, :], mask=ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + bh * T_q + qi, mask=ok, other=0.0)
            delta = tl.load(delta_ptr + bh * T_q + qi, mask=ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.where(ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    out_mask = key_ok[:, None]
    tl.store(dk_ptr + kv_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_pairs_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_part_ptr,
    pair_query_ptr,
    group_start_ptr,
    group_count_ptr,
    tile_group_ptr,
    tile_begin_ptr,
    n_groups,
    T_q,
    H,
    n_blocks,
    block_size,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.load(tile_group_ptr + pid)
    if g >= n_groups:
        return
    first = (pid - tl.load(tile_begin_ptr + g)) * BLOCK_M
    start = tl.load(group_start_ptr + g).to(tl.int64) + first  # int64: rows × HEAD_DIM may pass 2³¹
    n_rows = tl.load(group_count_ptr + g) - first
    bh = g // n_blocks
    j = g % n_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    m = tl.arange(0, BLOCK_M)
    row_ok = m < n_rows
    d = tl.arange(0, HEAD_DIM)
    qi = tl.load(pair_query_ptr + start + m, mask=row_ok, other=0).to(tl.int64)
    row_offs = b * stride_qb + h * stride_qh + qi[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr + row_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + row_offs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * T_q + qi, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * T_q + qi, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = j * block_size
    hi = lo + block_size
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = n.to(tl.int64)[:, None] * stride_kt + d[None, :]
        if EVEN_N:
            k = tl.load(k_base + kv_offs)
            v = tl.load(v_base + kv_offs)
        else:
            k = tl.load(k_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
            v = tl.load(v_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where((n < hi)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    rows_out = start + m
    tl.store(
        dq_part_ptr + rows_out[:, None] * HEAD_DIM + d[None, :],
        (dq * sm_scale).to(dq_part_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _bwd_dq_self_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dq_part_ptr,
    pair_pos_ptr,
    T_q,
    q_offset,
    H,
    block_size,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    KSEL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T_q
    pos = rows + q_offset
    current = pos // block_size
    d = tl.arange(0, HEAD_DIM)
    row_offs = b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr + row_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + row_offs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * T_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * T_q + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = ((tile * BLOCK_M + q_offset) // block_size) * block_size
    hi = tl.minimum(tile * BLOCK_M + BLOCK_M, T_q) + q_offset
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = n.to(tl.int64)[:, None] * stride_kt + d[None, :]
        k = tl.load(k_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        v = tl.load(v_base + kv_offs, mask=(n < hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = (n[None, :] <= pos[:, None]) & ((n // block_size)[None, :] == current[:, None]) & row_ok[:, None]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    for s_idx in tl.static_range(KSEL):
        pp = tl.load(pair_pos_ptr + (bh * T_q + rows).to(tl.int64) * KSEL + s_idx, mask=row_ok, other=-1)
        has = pp >= 0
        part = tl.load(dq_part_ptr + pp.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=has[:, None], other=0.0)
        dq += part.to(tl.float32)
    tl.store(dq_ptr + row_offs, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host side: validation, the gather plan, the two passes, autograd.
# ---------------------------------------------------------------------------------------------------------------
def _pad_head_dim(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous copies whose head dim is zero-padded to a power of two ≥ 16, the tile width the kernels use.
    Zero columns change no dot product, so the padded problem has the same scores and, sliced, the same outputs
    and gradients; the kernels then need no per-element mask along the head dim (which would stop vectorized
    loads)."""
    D = tensors[0].shape[-1]
    pad = max(16, triton.next_power_of_2(D)) - D
    return [(F.pad(t, (0, pad)) if pad else t).contiguous() for t in tensors]


def _check_inputs(q, k, v, block_size, topk) -> tuple[int, int, int, int, int]:
    B, Tq, T, H, D = check_qkv(q, k, v)
    check_tensor("q", q, dtypes=KERNEL_DTYPES)
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim of at most {MAX_HEAD_DIM} for the Triton kernel, got {D}")
    ensure_cuda_or_interpreter(q, k, v, names=("q", "k", "v"))
    return B, Tq, T, H, D


@dataclass
class GatherPlan:
    """Which queries each key block serves in the past stream (all tensors on the kernel device).

    ``pair_pos[bh, i, s]``: row of query i's s-th selected past block in the pair buffers (−1: none);
    ``pair_query[row]``: the query of each pair row, rows grouped by ``g = bh·n_blocks + block``;
    ``group_start[g]``, ``group_count[g]``: each group's first row and size; ``tile_group[pid]``: the group of
    pair tile ``pid`` (``n_groups`` for surplus programs), ``tile_begin[g]``: the group's first tile.
    """

    n_blocks: int
    ksel: int
    n_pairs_max: int
    pair_pos: torch.Tensor
    pair_query: torch.Tensor
    group_start: torch.Tensor
    group_count: torch.Tensor
    tile_group: torch.Tensor
    tile_begin: torch.Tensor


def _gate(q: torch.Tensor, k: torch.Tensor, block_size: int, ksel: int):
    """Run the gating kernels: block means, then the top-``ksel`` past blocks per query ``[BH, Tq, ksel]``."""
    B, Tq, H, D = q.shape
    T = k.shape[1]
    BH, n_blocks = B * H, -(-T // block_size)
    kbar = torch.empty(BH, n_blocks, D, device=q.device, dtype=torch.float32)
    _block_mean_kernel[(n_blocks, BH)](
        k,
        kbar,
        T,
        H,
        n_blocks,
        block_size,
        *k.stride()[:3],
        HEAD_DIM=D,
        CHUNK=16 if interpreting() else 64,
    )
    cfg = _tiles("gate")
    sel = torch.empty(BH, Tq, ksel, device=q.device, dtype=torch.int32)
    _gate_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]), BH)](
        q,
        kbar,
        sel,
        Tq,
        T - Tq,
        H,
        n_blocks,
        block_size,
        *q.stride()[:3],
        KSEL=ksel,
        KP=max(2, triton.next_power_of_2(ksel)),
        HEAD_DIM=D,
        PRECISION=dot_precision(torch.float32),  # the scores are fp32 whatever q is
        **cfg,
    )
    return sel


def _plan(q: torch.Tensor, k: torch.Tensor, block_size: int, ksel: int) -> GatherPlan:
    """Gate, then counting-sort the (query, past block) pairs by group ``(bh, block)`` into the gather plan.

    ``hist[g, tile]`` counts the pairs of group g found by rank tile ``tile``; one flat prefix sum over
    ``[group, tile]`` gives every (group, tile) segment its first row, and each pair adds its rank inside the tile.
    """
    B, Tq, H, _ = q.shape
    BH, n_blocks = B * H, -(-k.shape[1] // block_size)
    n_pairs_max = BH * Tq * ksel
    if n_pairs_max >= 2**31:
        raise ValueError(
            f"q: B·H·Tq·(topk−1) = {n_pairs_max} pairs exceeds the kernel's int32 pair index; shorten the input"
        )
    sel = _gate(q, k, block_size, ksel)
    KP = max(2, triton.next_power_of_2(ksel))
    cfg = _tiles("rank")
    n_rank_tiles = triton.cdiv(Tq, cfg["BLOCK_M"])
    rank = torch.empty_like(sel)
    hist = torch.zeros(BH * n_blocks, n_rank_tiles, device=q.device, dtype=torch.int32)
    _rank_kernel[(n_rank_tiles, BH)](sel, rank, hist, Tq, n_blocks, n_rank_tiles, KSEL=ksel, KP=KP, **cfg)
    hist_incl = hist.view(-1).cumsum(0, dtype=torch.int32).view_as(hist)  # [G, n_rank_tiles] inclusive
    group_start = (hist_incl[:, 0] - hist[:, 0]).contiguous()  # [G]
    group_count = (hist_incl[:, -1] - group_start).contiguous()
    pair_pos = torch.empty_like(sel)
    pair_query = torch.empty(max(n_pairs_max, 1), device=q.device, dtype=torch.int32)
    _scatter_pairs_kernel[(n_rank_tiles, BH)](
        sel,
        rank,
        hist,
        hist_incl,
        pair_pos,
        pair_query,
        Tq,
        n_blocks,
        n_rank_tiles,
        KSEL=ksel,
        KP=KP,
        BLOCK_M=cfg["BLOCK_M"],
    )
    pair_m = _tiles("pairs", q.dtype)["BLOCK_M"]
    tiles_per_group = (group_count + pair_m - 1) // pair_m
    tile_end = tiles_per_group.cumsum(0, dtype=torch.int32)
    max_tiles = triton.cdiv(n_pairs_max, pair_m) + group_count.numel()
    probe = torch.arange(max_tiles, device=q.device, dtype=torch.int32)
    tile_group = torch.searchsorted(tile_end, probe, right=True, out_int32=True)
    return GatherPlan(
        n_blocks=n_blocks,
        ksel=ksel,
        n_pairs_max=n_pairs_max,
        pair_pos=pair_pos,
        pair_query=pair_query,
        group_start=group_start,
        group_count=group_count,
        tile_group=tile_group,
        tile_begin=tile_end - tiles_per_group,
    )


def moba_gate_triton(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """The kernel's selection as a boolean block mask ``[B, H, Tq, n_blocks]`` (current block included), for
    comparing with ``reference.select_blocks(reference.block_scores(q, k, block_size), topk, block_size)``."""
    B, Tq, T, H, D = _check_inputs(q, k, k, block_size, topk)
    n_blocks = -(-T // block_size)
    q, k = _pad_head_dim(q, k)
    current = (T - Tq + torch.arange(Tq, device=q.device)) // block_size
    mask = torch.zeros(B, H, Tq, n_blocks + 1, device=q.device, dtype=torch.bool)
    mask[:, :, torch.arange(Tq, device=q.device), current] = True
    ksel = min(topk - 1, n_blocks - 1)
    if ksel > 0:
        sel = _gate(q, k, block_size, ksel)
        index = torch.where(sel >= 0, sel, n_blocks).long().view(B, H, Tq, ksel)
        mask.scatter_(-1, index, True)
    return mask[..., :n_blocks]


def _forward(q, k, v, block_size: int, topk: int, scale: float, track_max: bool, out=None):
    """Both streams and the merge on contiguous inputs whose head dim is a power of two ≥ 16; returns
    ``(o, lse [BH, Tq] in log2 units, rowmax [BH, Tq] or empty, plan)``."""
    B, Tq, H, D = q.shape
    T = k.shape[1]
    BH, n_blocks = B * H, -(-T // block_size)
    ksel = min(topk - 1, n_blocks - 1)
    dev = q.device
    qk_scale = scale * LOG2E
    precision = dot_precision(q.dtype)
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty(BH, Tq, device=dev, dtype=torch.float32)
    rowmax = torch.empty(BH, Tq if track_max else 0, device=dev, dtype=torch.float32)
    plan = _plan(q, k, block_size, ksel) if ksel > 0 else None
    n_pairs = plan.n_pairs_max if plan is not None else 0
    o_part = torch.empty(max(n_pairs, 1), D, device=dev, dtype=q.dtype)
    lse_part = torch.empty(max(n_pairs, 1), device=dev, dtype=torch.float32)
    max_part = torch.empty(max(n_pairs, 1) if track_max else 1, device=dev, dtype=torch.float32)
    if plan is not None:
        cfg = _tiles("fwd_pairs", q.dtype)
        _fwd_pairs_kernel[(plan.tile_group.numel(),)](
            q,
            k,
            v,
            o_part,
            lse_part,
            max_part,
            plan.pair_query,
            plan.group_start,
            plan.group_count,
            plan.tile_group,
            plan.tile_begin,
            plan.group_count.numel(),
            H,
            n_blocks,
            block_size,
            qk_scale,
            *q.stride()[:3],
            *k.stride()[:3],
            HEAD_DIM=D,
            BLOCK_M=_tiles("pairs", q.dtype)["BLOCK_M"],
            EVEN_N=block_size % cfg["BLOCK_N"] == 0,
            TRACK_MAX=track_max,
            PRECISION=precision,
            **cfg,
        )
    cfg = _tiles("fwd_self", q.dtype)
    _fwd_self_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]), BH)](
        q,
        k,
        v,
        o,
        lse,
        rowmax,
        o_part,
        lse_part,
        max_part,
        plan.pair_pos if plan is not None else lse,
        Tq,
        T - Tq,
        H,
        block_size,
        qk_scale,
        *q.stride()[:3],
        *k.stride()[:3],
        KSEL=max(ksel, 0),
        HEAD_DIM=D,
        TRACK_MAX=track_max,
        PRECISION=precision,
        **cfg,
    )
    return o, lse, rowmax, plan


def _backward(q, k, v, o, lse, do, plan: GatherPlan | None, block_size: int, scale: float, dq=None, dk=None, dv=None):
    """Gradients of the merged attention; returns ``(dq, dk, dv)`` in the input dtype."""
    B, Tq, H, D = q.shape
    T = k.shape[1]
    BH, n_blocks = B * H, -(-T // block_size)
    dev = q.device
    qk_scale = scale * LOG2E
    precision = dot_precision(q.dtype)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    delta = torch.empty(BH, Tq, device=dev, dtype=torch.float32)
    delta_m = 16 if interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(Tq, delta_m), BH)](o, do, delta, Tq, H, *q.stride()[:3], HEAD_DIM=D, BLOCK_M=delta_m)
    has_pairs = plan is not None
    dummy = lse
    cfg = _tiles("bwd_dkdv", q.dtype)
    n_sub = triton.cdiv(block_size, cfg["BLOCK_N"])
    _bwd_dkdv_kernel[(n_blocks * n_sub, BH)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        plan.pair_query if has_pairs else dummy,
        plan.group_start if has_pairs else dummy,
        plan.group_count if has_pairs else dummy,
        Tq,
        T,
        T - Tq,
        H,
        n_blocks,
        block_size,
        n_sub,
        scale,
        qk_scale,
        *q.stride()[:3],
        *k.stride()[:3],
        HAS_PAIRS=has_pairs,
        HEAD_DIM=D,
        PRECISION=precision,
        **cfg,
    )
    dq_part = torch.empty(max(plan.n_pairs_max, 1) if has_pairs else 1, D, device=dev, dtype=q.dtype)
    if has_pairs:
        cfg = _tiles("bwd_dq_pairs", q.dtype)
        _bwd_dq_pairs_kernel[(plan.tile_group.numel(),)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq_part,
            plan.pair_query,
            plan.group_start,
            plan.group_count,
            plan.tile_group,
            plan.tile_begin,
            plan.group_count.numel(),
            Tq,
            H,
            n_blocks,
            block_size,
            scale,
            qk_scale,
            *q.stride()[:3],
            *k.stride()[:3],
            HEAD_DIM=D,
            BLOCK_M=_tiles("pairs", q.dtype)["BLOCK_M"],
            EVEN_N=block_size % cfg["BLOCK_N"] == 0,
            PRECISION=precision,
            **cfg,
        )
    cfg = _tiles("bwd_dq_self", q.dtype)
    _bwd_dq_self_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]), BH)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        dq_part,
        plan.pair_pos if has_pairs else dummy,
        Tq,
        T - Tq,
        H,
        block_size,
        scale,
        qk_scale,
        *q.stride()[:3],
        *k.stride()[:3],
        KSEL=plan.ksel if has_pairs else 0,
        HEAD_DIM=D,
        PRECISION=precision,
        **cfg,
    )
    return dq, dk, dv


class _MoBAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size, topk, scale, track_max):
        o, lse, rowmax, plan = _forward(q, k, v, block_size, topk, scale, track_max)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.block_size, ctx.scale = plan, block_size, scale
        ctx.mark_non_differentiable(rowmax)
        return o, rowmax

    @staticmethod
    def backward(ctx, do, _drowmax):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do.contiguous(), ctx.plan, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None


def moba_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    scale: float | None = None,
    *,
    causal: bool = True,
    return_max_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention with the Triton kernels; same contract as ``reference.moba_attention``.

    q ``[B, Tq, H, D]``, k/v ``[B, T, H, D]`` (fp16/bf16/fp32, ``Tq ≤ T``: queries are the last Tq positions) →
    o ``[B, Tq, H, D]`` in q's dtype, differentiable in q, k, v (the gate is not). With ``return_max_logits``
    also returns the ``[B, H]`` fp32 maximum attended logit ``scale·q·k`` (a by-product of the online softmax).
    """
    check_causal(causal)
    B, Tq, T, H, D = _check_inputs(q, k, v, block_size, topk)
    scale = check_scale(scale, D)
    q, k, v = _pad_head_dim(q, k, v)  # autograd slices the gradients back
    o, rowmax = _MoBAFunction.apply(q, k, v, block_size, topk, scale, bool(return_max_logits))
    o = o[..., :D]
    if return_max_logits:
        return o, (rowmax.view(B, H, Tq).amax(dim=-1) * LN2).detach()
    return o

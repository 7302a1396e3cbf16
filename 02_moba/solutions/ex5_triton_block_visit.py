"""Exercise 5 (hard, Triton): a query-major MoBA forward that visits the union of a query tile's blocks.

Task. Write the Triton kernel ``_block_visit_kernel``: the flash-attention forward of MoBA for one tile of
``BLOCK_M`` queries of one (batch, head), given the gate as a block mask. It is the simple, query-major design the
chapter's kernel rejects (exercise 4 says why), and it is exact: it walks the key blocks in order, **skips a block
that no query of the tile selected**, and attends to the others with an online softmax, masking per query.

    for j = 0 … c_last:                                   c_last = current block of the tile's last query
        sel_i = block_mask[i, j]                           [BLOCK_M]
        if no sel_i: skip block j                           (not counted as visited)
        visited += 1
        for each chunk of BLOCK_N keys s in block j:        keys s ∈ [j·block_size, min((j+1)·block_size, T))
            x_is  = scale · q_i·k_s   where sel_i and s ≤ p_i, else −∞
            m_new = max(m_i, max_s x_is);   α = e^{m_i − m_new};   p_is = e^{x_is − m_new}
            l_i   = α·l_i + Σ_s p_is;   acc_i = α·acc_i + Σ_s p_is v_s;   m_i = m_new
    o_i = acc_i / l_i

Query i is row i of q and sits at position ``p_i = T − Tq + i``. The block mask follows the gate's rules (own
block selected, no future block), so every valid row meets at least its own key and ``l_i > 0``.

The launcher ``block_visit_attention`` is given: it validates the inputs, lays the mask out as int8
``[B·H, Tq, n_blocks]``, launches a grid ``(⌈Tq / BLOCK_M⌉, B·H)`` and returns ``(o, visited)``:
o ``[B, Tq, H, D]`` in q's dtype, and visited int32 ``[B, H, ⌈Tq / BLOCK_M⌉]`` — the number of key blocks each
program loaded, i.e. ``blocks_visited(block_mask, BLOCK_M)`` of exercise 4.

Shapes and layout. q ``[B, Tq, H, D]``, k and v ``[B, T, H, D]``, made contiguous by the launcher;
``HEAD_DIM = D`` is a power of two ≥ 16 and ``BLOCK_N = 16`` (``tl.dot`` wants every dimension ≥ 16).
The grader runs it under the Triton interpreter on the CPU (fp32, tiny shapes) against
``reference.block_mask_attention`` in fp64 (rel_err ≤ 1e-5), on block sizes that are and are not multiples of
``BLOCK_N``, ``Tq < T``, a single token, and random masks, and checks ``visited`` exactly.

Hints.
* Program ids: ``tile = tl.program_id(0)``, ``bh = tl.program_id(1)``; batch ``bh // H``, head ``bh % H``.
  Rows ``tile·BLOCK_M + tl.arange(0, BLOCK_M)``; mask rows ≥ Tq on every load and store.
* Load q once and cast to fp32. Use ``exp2`` with ``qk_scale = scale · log2(e)`` (already passed in), so
  ``e^{x} = 2^{x·log2 e}``; ``tl.dot(a, b, input_precision=PRECISION)`` (exact fp32 on the GPU with "ieee").
* A row can have seen no key yet in a chunk (all −∞): use ``m_safe = where(m_new = −∞, 0, m_new)`` in both
  exponentials, so that ``e^{−∞ − (−∞)}`` never appears.
* The skip is a scalar branch: ``if tl.max(sel.to(tl.int32), axis=0) > 0:`` inside the ``for j`` loop; the
  running statistics and the visit counter are updated inside it.
* The last block may be partial: mask keys ``s ≥ min((j+1)·block_size, T)`` on the loads and in the logits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_positive_int, check_tensor
from nanokimi.moba.reference import check_qkv
from nanokimi.triton_utils import ensure_cuda_or_interpreter

LOG2E = 1.4426950408889634


@triton.jit
def _block_visit_kernel(
    q_ptr,  # [B, Tq, H, D]
    k_ptr,  # [B, T, H, D]
    v_ptr,  # [B, T, H, D], same strides as k
    mask_ptr,  # int8 [B·H, Tq, n_blocks], contiguous
    o_ptr,  # [B, Tq, H, D], same strides as q
    visited_ptr,  # int32 [B·H, n_tiles]
    T_q,
    T_k,
    H,
    n_blocks,
    n_tiles,
    block_size,
    qk_scale,  # scale · log2(e)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: queries ``tile·BLOCK_M …`` of head ``bh``; o of those rows and the count of visited blocks."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < T_q
    pos = rows + (T_k - T_q)  # [BM] query positions
    d = tl.arange(0, HEAD_DIM)
    q_offs = b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)  # [BM, D]
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    mask_rows = mask_ptr + (bh * T_q + rows).to(tl.int64) * n_blocks  # [BM] each row's block-mask row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the logits (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(x − m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running Σ 2^(x − m_i) v
    n_visited = 0
    last_block = (tl.minimum(tile * BLOCK_M + BLOCK_M, T_q) - 1 + T_k - T_q) // block_size
    for j in range(0, last_block + 1):
        sel = tl.load(mask_rows + j, mask=row_ok, other=0) != 0  # [BM] which rows selected block j
        # The tile loads block j if any of its queries wants it: with per-query selection this is the union.
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            n_visited += 1
            start = j * block_size
            end = tl.minimum(start + block_size, T_k)  # the last block may be partial
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions
                in_block = n < end
                kv_offs = n.to(tl.int64)[:, None] * stride_kt + d[None, :]
                k = tl.load(k_base + kv_offs, mask=in_block[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_base + kv_offs, mask=in_block[:, None], other=0.0).to(tl.float32)
                x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
                keep = sel[:, None] & (n[None, :] <= pos[:, None]) & in_block[None, :]
                x = tl.where(keep, x, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(x, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may have seen no key yet
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(x - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
                m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)  # rows past Tq saw nothing and are not stored
    o = acc / l_safe[:, None]
    tl.store(o_ptr + q_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(visited_ptr + bh * n_tiles + tile, n_visited)


def block_visit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_m: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA forward from a block mask, query-major: q ``[B, Tq, H, D]``, k/v ``[B, T, H, D]``, block_mask bool
    ``[B, H, Tq, ⌈T / block_size⌉]`` → (o ``[B, Tq, H, D]`` in q's dtype, visited int32
    ``[B, H, ⌈Tq / block_m⌉]``: the key blocks each program loaded)."""
    B, Tq, T, H, D = check_qkv(q, k, v)
    check_positive_int("block_size", block_size)
    check_positive_int("block_m", block_m)
    if D < 16 or D & (D - 1):
        raise ValueError(f"q: expected a head dim that is a power of two ≥ 16, got {D}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two ≥ 16, got {block_m}")
    n_blocks = -(-T // block_size)
    check_tensor("block_mask", block_mask, shape=(B, H, Tq, n_blocks), dtypes=(torch.bool,))
    ensure_cuda_or_interpreter(q, k, v, block_mask, names=("q", "k", "v", "block_mask"))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))  # o shares q's strides, v shares k's
    mask = block_mask.to(torch.int8).reshape(B * H, Tq, n_blocks).contiguous()
    n_tiles = triton.cdiv(Tq, block_m)
    o = torch.empty_like(q)
    visited = torch.empty(B * H, n_tiles, dtype=torch.int32, device=q.device)
    _block_visit_kernel[(n_tiles, B * H)](
        q,
        k,
        v,
        mask,
        o,
        visited,
        Tq,
        T,
        H,
        n_blocks,
        n_tiles,
        block_size,
        scale * LOG2E,
        *q.stride()[:3],
        *k.stride()[:3],
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=16,
        PRECISION="ieee",
    )
    return o, visited.view(B, H, n_tiles)

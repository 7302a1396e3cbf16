"""Exercise 5 (hard, Triton): paged-attention decode — one query token per request over a block table.

Task. In decode every request adds one token per step, and its query must attend over all of its cached keys
and values. A paged KV cache keeps them in a pool of fixed-size pages shared by all requests (so memory never
fragments and a shared prefix can be one set of pages)::

    k_cache, v_cache: [n_pages, PAGE, H_kv, D]     block_tables: [B, max_pages] int32     context_lens: [B] int32

Token ``t`` of request ``b`` sits in page ``block_tables[b, t // PAGE]``, row ``t % PAGE``. Pages of a request need
not be contiguous or in order, entries of ``block_tables`` past a request's last page are garbage, and so are the
rows of its last page past ``n_b = context_lens[b]``. With ``q: [B, H, D]`` and ``H = G · H_kv`` (GQA: query head
``h`` reads KV head ``h // G``)::

    s_t     = scale · q[b, h] · K[t, h // G]                         t < n_b
    o[b, h] = Σ_t softmax_t(s)_t · V[t, h // G]                       out: [B, H, D], the dtype of q

Write ``paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)`` with one Triton program per
``(b, h)`` that walks the request's tokens in tiles of ``BLOCK_N`` and keeps an online softmax (the tile's scores
``s`` are masked to −inf past ``n_b``)::

    m' = max(m, max_t s_t),   l' = l · e^{m − m'} + Σ_t e^{s_t − m'},   acc' = acc · e^{m − m'} + Σ_t e^{s_t − m'} V_t
    o  = acc / l                                                      (m starts at −1e30, l and acc at 0)

Shapes in the grader: B ≤ 4, H ≤ 6, D ∈ {8, 16, 24} (not always a power of two), PAGE ∈ {4, 8, 16}, n_b from 1
to ~70, fp32 (checked to 1e-5 against a float64 reference) and bf16 (1e-2); ``q`` may be a strided view.

Hints. Per tile: ``t = n0 + tl.arange(0, BLOCK_N)``, ``page = tl.load(table + t // PAGE, mask=t < n_b)``, then
gather K rows at ``page · stride_kp + (t % PAGE) · stride_kt + kv_head · stride_kh + d`` (a [BLOCK_N, BLOCK_D]
tile; mask both dimensions). ``tl.sum(q[None, :] * k, axis=1)`` gives the scores (no ``tl.dot`` needed here), and
``tl.sum(p[:, None] * v, axis=0)`` the weighted values. Load in the storage dtype and compute in fp32 (``.to(
tl.float32)``); ``BLOCK_D = triton.next_power_of_2(D)``. The loop bound ``n_b`` is loaded in the kernel, so
``for n0 in range(0, n_ctx, BLOCK_N)`` works. Mask every load and store: the interpreter does not catch
out-of-bounds reads, and the grader fills unused rows with 1e4 and the output with NaN. You may change the
kernel's signature: the grader only calls ``paged_decode``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import nanokimi  # noqa: F401 (sets TRITON_INTERPRET=1 on a machine without CUDA, before the kernels are defined)


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [n_pages, PAGE, H_kv, D]
    v_ptr,  # [n_pages, PAGE, H_kv, D]
    table_ptr,  # [B, max_pages] int32
    lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D]
    scale,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(b, h)``: ``o[b, h]`` over the request's ``n_b`` tokens, online softmax over tiles of BLOCK_N."""
    # YOUR CODE HERE (roughly 40 lines)
    raise NotImplementedError


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decode step of attention over a paged KV cache: ``[B, H, D]`` in the dtype of ``q``.

    Args:
        q: ``[B, H, D]`` (any strides over B and H; D contiguous). k_cache, v_cache: ``[n_pages, PAGE, H_kv, D]``.
        block_tables: ``[B, max_pages]`` int32. context_lens: ``[B]`` int32, each in ``[1, max_pages · PAGE]``.
        scale: the softmax scale (usually ``D ** −0.5``).
    """
    # YOUR CODE HERE (roughly 14 lines)
    raise NotImplementedError

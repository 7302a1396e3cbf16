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
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    n_ctx = tl.load(lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]

    m_i = -1.0e30  # running max: finite, so e^{m − m'} stays defined before the first score
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, n_ctx, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        t_ok = t < n_ctx
        page = tl.load(table_ptr + b * stride_tb + t // PAGE, mask=t_ok, other=0).to(tl.int64)  # [BLOCK_N]
        row = t % PAGE
        mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + page[:, None] * stride_kp + row[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_D] gathered from up to BLOCK_N / PAGE + 1 pages
        s = tl.sum(q[None, :] * k, axis=1) * scale  # [BLOCK_N]
        s = tl.where(t_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp(s - m_new)  # [BLOCK_N], 0 past n_b
        v = tl.load(
            v_ptr + page[:, None] * stride_vp + row[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    o = acc / l_i
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


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
    b_size, n_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((b_size, n_heads, head_dim), dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(b_size, n_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=n_heads // kv_heads, HEAD_DIM=head_dim, PAGE=page_size, BLOCK_N=16,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out

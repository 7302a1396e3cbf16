"""Paged decode attention in Triton: one query token per request against its paged KV cache (split-K).

Math (``reference.paged_attention_reference``): for request ``b`` with ``n_b`` cached tokens and query head
``h`` reading KV head ``h // G``::

    o[b, h] = Σ_{t < n_b} softmax_t(scale · q[b, h] · K_b[t]) · V_b[t]

Tiling. Program ``(b, kv_head, part)`` handles the ``G`` query heads that share one KV head (GQA) over one
*partition* of the context, tokens ``[part · PART, min((part + 1) · PART, n_b))``. It walks the partition in tiles
of ``BLOCK_N`` tokens: each token's page comes from the block table (``page = table[b, t // PAGE]``, row
``t % PAGE``), so one tile gathers rows from several pages. The ``G`` query rows are padded to ``G_PAD ≥ 16``
so that ``q·Kᵀ`` and ``p·V`` are ``tl.dot`` calls; the kernel stays memory-bound (each K/V byte is read once for
all ``G`` heads). Online softmax keeps a running max ``m``, normaliser ``l`` and accumulator ``acc``::

    m' = max(m, max_t s_t),   l' = l·e^{m−m'} + Σ_t e^{s_t−m'},   acc' = acc·e^{m−m'} + Σ_t e^{s_t−m'} V_t

(in base 2: ``scale`` is multiplied by log2(e) up front and ``exp2`` is used). With one partition the program
writes ``acc / l`` directly. With several (long contexts or few requests, so that ``B · H_kv`` programs would not
fill the GPU) each writes its ``(m, l, acc)`` and a second kernel merges them::

    M = max_p m_p,   o = Σ_p e^{m_p−M} acc_p / Σ_p e^{m_p−M} l_p

Partitions past a request's context run no tile and leave ``(m, l, acc) = (−1e30, 0, 0)``, which the merge
weighs by zero. The partition size changes the grid (and whether the merge runs), so the launcher picks it the
way ``triton.autotune`` picks tile sizes: it times a few sizes around a fill-the-SMs heuristic on the first call
for a shape and caches the fastest.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_positive_int, check_tensor
from nanokimi.triton_utils import autotune_configs, ensure_cuda_or_interpreter, interpreting

__all__ = ["paged_attention_decode"]

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps e^{m - m'} finite when a tile is fully masked

_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]
)


@triton.autotune(configs=_CONFIGS, key=["GROUP", "HEAD_DIM", "PAGE", "PART", "N_PART"])
@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale_log2,
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
    n_heads,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PART: tl.constexpr,
    N_PART: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    n_ctx = tl.load(lens_ptr + b)
    start = part * PART
    stop = tl.minimum(start + PART, n_ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g  # query heads served by this KV head
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [G_PAD, BLOCK_D]
    q = (q.to(tl.float32) * scale_log2).to(k_ptr.dtype.element_ty)

    m_i = tl.full([G_PAD], _NEG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        page = tl.load(table_ptr + b * stride_tb + t // PAGE, mask=t_ok, other=0)  # [BLOCK_N]
        row = t % PAGE
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr
            + page[:, None].to(tl.int64) * stride_kp
            + row[:, None] * stride_kt
            + kv_head * stride_kh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [G_PAD, BLOCK_N], log2 units
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr
            + page[:, None].to(tl.int64) * stride_vp
            + row[:, None] * stride_vt
            + kv_head * stride_vh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = g_ok[:, None] & d_ok[None, :]
    if N_PART == 1:
        o = acc / l_i[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        row_id = (b * n_heads + heads) * N_PART + part  # [G_PAD] index into [B, H, N_PART]
        tl.store(m_ptr + row_id, m_i, mask=g_ok)
        tl.store(l_ptr + row_id, l_i, mask=g_ok)
        tl.store(acc_ptr + row_id[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)


@triton.jit
def _merge_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    n_heads,
    HEAD_DIM: tl.constexpr,
    N_PART: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, BLOCK_D)
    p_ok = p < N_PART
    d_ok = d < HEAD_DIM
    base = (b * n_heads + h) * N_PART
    m = tl.load(m_ptr + base + p, mask=p_ok, other=_NEG)
    l = tl.load(l_ptr + base + p, mask=p_ok, other=0.0)
    acc = tl.load(acc_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # [P_PAD]
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _heuristic_partition(batch: int, kv_heads: int, max_ctx: int) -> int:
    """Tokens per partition so that ``B · H_kv · n_part`` programs fill the GPU's SMs about 4 times over."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(1, math.ceil(4 * sms / (batch * kv_heads)))
    return _round_part(max(256, math.ceil(max_ctx / want)))


def _round_part(tokens: int) -> int:
    return triton.cdiv(tokens, 128) * 128  # a multiple of every BLOCK_N


_PARTITION_CACHE: dict[tuple, int] = {}


def _tuned_partition(key: tuple, max_ctx: int, heuristic: int, launch) -> int:
    """The fastest of a few partition sizes around the heuristic, timed once per shape and cached.

    Like ``triton.autotune`` for the launch grid: the split-K factor changes the grid and whether the merge
    kernel runs, which a kernel-level autotuner cannot choose. Candidates: the heuristic, half and double it,
    and a single partition.
    """
    if key not in _PARTITION_CACHE:
        single = _round_part(max_ctx)
        cands = sorted(
            {min(c, single) for c in (heuristic, _round_part(max(128, heuristic // 2)), 2 * heuristic, single)}
        )
        times = {c: triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20) for c in cands}
        _PARTITION_CACHE[key] = min(times, key=times.get)
    return _PARTITION_CACHE[key]


def _launch(q, k_cache, v_cache, block_tables, context_lens, scale: float, out: torch.Tensor, part: int) -> None:
    """Run the split-K kernel with ``part`` tokens per partition (and the merge kernel when there are several)."""
    b_size, n_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_ctx = block_tables.shape[1] * page_size
    n_part = triton.cdiv(max_ctx, part)
    group = n_heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if n_part > 1:
        m_buf = torch.empty((b_size, n_heads, n_part), dtype=torch.float32, device=q.device)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty((b_size, n_heads, n_part, head_dim), dtype=torch.float32, device=q.device)
    else:
        m_buf = l_buf = acc_buf = out  # unused: the kernel writes the output directly
    _paged_decode_kernel[(b_size, kv_heads, n_part)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m_buf,
        l_buf,
        acc_buf,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        n_heads,
        HEAD_DIM=head_dim,
        PAGE=page_size,
        GROUP=group,
        G_PAD=g_pad,
        BLOCK_D=block_d,
        PART=part,
        N_PART=n_part,
        IEEE=q.dtype == torch.float32,
    )
    if n_part > 1:
        _merge_kernel[(b_size, n_heads)](
            m_buf,
            l_buf,
            acc_buf,
            out,
            out.stride(0),
            out.stride(1),
            n_heads,
            HEAD_DIM=head_dim,
            N_PART=n_part,
            P_PAD=max(2, triton.next_power_of_2(n_part)),
            BLOCK_D=block_d,
        )


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_tokens: int | None = None,
    check_values: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention over a paged KV cache: ``[B, H, D]`` (the dtype of ``q``).

    ``q: [B, H, D]``; ``k_cache, v_cache: [n_pages, page_size, H_kv, D]`` with ``H % H_kv == 0``;
    ``block_tables: [B, max_pages]`` int32; ``context_lens: [B]`` int32 in ``[1, max_pages · page_size]``.
    ``partition_tokens`` (a multiple of 128) fixes the split-K partition size instead of the tuned choice. ``check_values`` also checks
    that context lengths and the block-table entries they use are in range; that reads them back from the GPU
    (a synchronisation), so benchmarks and hot loops turn it off. ``out`` (``[B, H, D]``, dtype of ``q``,
    contiguous) receives the result when given.
    """
    floats = (torch.float32, torch.float16, torch.bfloat16)
    check_tensor("q", q, ndim=3, dtypes=floats)
    b_size, n_heads, head_dim = q.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,))
    n_pages, page_size, kv_heads, kd = k_cache.shape
    check_tensor("v_cache", v_cache, shape=(n_pages, page_size, kv_heads, head_dim), dtypes=(q.dtype,))
    if kd != head_dim:
        raise ValueError(f"k_cache: expected head dim {head_dim} (that of q), got {kd}")
    if n_heads % kv_heads:
        raise ValueError(f"q: expected a number of heads divisible by k_cache's {kv_heads} KV heads, got {n_heads}")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    if block_tables.shape[0] != b_size:
        raise ValueError(f"block_tables: expected {b_size} rows (the batch of q), got {block_tables.shape[0]}")
    check_tensor("context_lens", context_lens, shape=(b_size,), dtypes=(torch.int32,))
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
    ensure_cuda_or_interpreter(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        names=("q", "k_cache", "v_cache", "block_tables", "context_lens"),
    )
    max_ctx = block_tables.shape[1] * page_size
    if check_values and b_size:
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 1 or hi > max_ctx:
            raise ValueError(
                f"context_lens: expected values in [1, {max_ctx}] (max_pages · page_size), got [{lo}, {hi}]"
            )
        cols = torch.arange(block_tables.shape[1], device=block_tables.device)
        used = cols[None, :] < (context_lens[:, None] + page_size - 1) // page_size
        bad = used & ((block_tables < 0) | (block_tables >= n_pages))
        if bool(bad.any()):
            b, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"block_tables: expected page ids in [0, {n_pages}) for used pages, got {int(block_tables[b, j])} at ({b}, {j})"
            )
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache: expected the head dimension to be contiguous (stride 1)")
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, shape=tuple(q.shape), dtypes=(q.dtype,), device=q.device)
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")
    if b_size == 0:
        return out
    if partition_tokens is not None:
        check_positive_int("partition_tokens", partition_tokens)
        if partition_tokens % 128:
            raise ValueError(f"partition_tokens: expected a multiple of 128, got {partition_tokens}")
        part = partition_tokens
    elif interpreting():
        part = _round_part(max_ctx)  # one partition: the interpreter runs programs one after another
    else:
        key = (b_size, n_heads, kv_heads, head_dim, page_size, block_tables.shape[1], q.dtype, q.device.index)
        launch = lambda p: _launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, p)
        part = _tuned_partition(key, max_ctx, _heuristic_partition(b_size, kv_heads, max_ctx), launch)
    _launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, part)
    return out

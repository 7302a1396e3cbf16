"""The spec of paged decode attention: a paged KV cache, gathering it back, and dense attention over it.

A paged KV cache stores the keys and values of many requests in one pool of fixed-size pages::

    k_cache, v_cache: [n_pages, page_size, H_kv, D]          token-major pages
    block_tables:     [B, max_pages] int32                   page ids of request b, in order
    context_lens:     [B] int32                              tokens of request b (its last page may be partial)

Token ``t`` of request ``b`` lives in page ``block_tables[b, t // page_size]`` at row ``t % page_size``. Pages of
one request need not be contiguous or ordered in the pool, and a page may appear in several block tables (a
shared prefix). One decode step has one query token per request, ``q: [B, H, D]`` with ``H = G · H_kv`` (GQA:
query head ``h`` reads KV head ``h // G``), and computes, over the request's ``n_b = context_lens[b]`` tokens::

    s[b, h, t] = scale · q[b, h] · K_b[t, h // G]            t < n_b
    o[b, h]    = Σ_t softmax_t(s[b, h, :])[t] · V_b[t, h // G]

Cost: it reads every cached K/V byte once (``2 · Σ_b n_b · H_kv · D`` elements) and does ``4 · H · D`` FLOPs per
token, so it is memory-bound: its roofline is the copy bandwidth.
"""

from __future__ import annotations

import torch

from nanokimi.checks import check_positive_int

__all__ = ["gather_kv", "paged_attention_reference", "make_paged_cache"]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` rows of one request's pages, in order: ``[n_tokens, H_kv, D]``."""
    page_size = cache.shape[1]
    n_pages = -(-n_tokens // page_size)
    pages = cache[block_table[:n_pages].long()]  # [n_pages, page_size, H_kv, D]
    return pages.reshape(n_pages * page_size, *cache.shape[2:])[:n_tokens]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense softmax attention of each request's query over its gathered KV, in float64: ``[B, H, D]``.

    A loop over requests: gather ``K_b, V_b`` (``[n_b, H_kv, D]``), repeat KV heads for GQA, softmax over ``t``.
    """
    b_size, n_heads, _ = q.shape
    group = n_heads // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(b_size):
        n = int(context_lens[b])
        k = gather_kv(k_cache, block_tables[b], n).double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = gather_kv(v_cache, block_tables[b], n).double().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,thd->ht", q[b].double(), k) * scale  # [H, n]
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)
    return out


def make_paged_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    page_size: int,
    seed: int = 0,
    spare_pages: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter dense per-request KV ``[B, T, H_kv, D]`` into a shuffled page pool.

    Returns ``(k_cache, v_cache, block_tables)``. Request ``b`` gets ``ceil(context_lens[b] / page_size)``
    pages at random positions of the pool (plus ``spare_pages`` unused ones), so a kernel that ignores the block
    table or reads past a context reads the wrong data. Unused rows and table entries are filled with garbage
    (large values; table entries point at a spare or a random page) that must never be read.
    """
    check_positive_int("page_size", page_size)
    b_size, _, h_kv, d = k.shape
    pages_per_req = [-(-int(n) // page_size) for n in context_lens]
    n_pages = sum(pages_per_req) + spare_pages
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n_pages, generator=gen)
    k_cache = torch.full((n_pages, page_size, h_kv, d), 1e4, dtype=k.dtype, device=k.device)
    v_cache = torch.full((n_pages, page_size, h_kv, d), 1e4, dtype=v.dtype, device=v.device)
    max_pages = max(pages_per_req)
    block_tables = torch.randint(0, n_pages, (b_size, max_pages), generator=gen, dtype=torch.int32)
    nxt = 0
    for b, n_p in enumerate(pages_per_req):
        n = int(context_lens[b])
        for j in range(n_p):
            page = int(order[nxt])
            nxt += 1
            block_tables[b, j] = page
            rows = min(page_size, n - j * page_size)
            k_cache[page, :rows] = k[b, j * page_size : j * page_size + rows]
            v_cache[page, :rows] = v[b, j * page_size : j * page_size + rows]
    return k_cache, v_cache, block_tables.to(k.device)

"""``python -m nanokimi.serving.bench``: paged decode attention on the GPU against SDPA over a contiguous cache.

Shapes (issue 10): batch 64, one query token per request, H = 16 query heads (MHA, and GQA 4:1 with 4 KV heads),
D = 128, bf16, contexts 1K–32K, pages of 16 tokens shuffled through the pool. Decode attention is memory-bound, so
each row reports the achieved bandwidth ``bytes / time`` with ``bytes = K + V read (2 · B · n · H_kv · D · 2) +
q + o + block tables``, and its fraction of the measured 3.0 TB/s copy ceiling (target ≥ 70%). The anchor is
``F.scaled_dot_product_attention`` over the same KV laid out contiguously (``[B, H_kv, n, D]``), timed in the same
run; both outputs are compared (``rel_err`` column).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from nanokimi.bench import H100_COPY_TBPS, Table, time_ms
from nanokimi.serving.kernels import paged_attention_decode
from nanokimi.testing import rel_err

BATCH, HEADS, HEAD_DIM, PAGE = 64, 16, 128, 16
SCALE = HEAD_DIM**-0.5
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def _paged_from_contiguous(k: torch.Tensor, page: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H_kv, n, D]`` → a shuffled page pool ``[B·n/page, page, H_kv, D]`` and block tables ``[B, n/page]``."""
    b, h_kv, n, d = k.shape
    pages = k.transpose(1, 2).reshape(b * n // page, page, h_kv, d)  # request-major pages
    perm = torch.randperm(pages.shape[0], generator=gen).to(k.device)  # page i goes to pool slot perm[i]
    pool = torch.empty_like(pages)
    pool[perm] = pages
    return pool, perm.view(b, n // page).to(torch.int32)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA device (the kernel is timed compiled)")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    table = Table("Paged decode attention (bf16, B=64, H=16, D=128, 16-token pages)")
    for kv_heads in (HEADS, HEADS // 4):
        for n in CONTEXTS:
            q = torch.randn(BATCH, HEADS, HEAD_DIM, device=dev, dtype=dt)
            k = torch.randn(BATCH, kv_heads, n, HEAD_DIM, device=dev, dtype=dt)
            v = torch.randn(BATCH, kv_heads, n, HEAD_DIM, device=dev, dtype=dt)
            k_pool, tables = _paged_from_contiguous(k, PAGE, gen)
            v_pool = torch.empty_like(k_pool)
            v_pool[tables.view(-1).long()] = v.transpose(1, 2).reshape(-1, PAGE, kv_heads, HEAD_DIM)
            lens = torch.full((BATCH,), n, device=dev, dtype=torch.int32)
            q4 = q.unsqueeze(2)  # [B, H, 1, D]
            gqa = kv_heads != HEADS

            def ours(q=q, k_pool=k_pool, v_pool=v_pool, tables=tables, lens=lens):
                return paged_attention_decode(q, k_pool, v_pool, tables, lens, SCALE, check_values=False)

            def anchor(q4=q4, k=k, v=v, gqa=gqa):
                return F.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=gqa)

            err = rel_err(ours().float(), anchor().squeeze(2).float())
            ours_ms, anchor_ms = time_ms(ours), time_ms(anchor)
            nbytes = 2 * BATCH * n * kv_heads * HEAD_DIM * 2 + 2 * q.numel() * 2 + tables.numel() * 4
            gbps = nbytes / ours_ms / 1e6
            table.add(
                "paged_decode" + ("_gqa4" if gqa else ""),
                f"B{BATCH} H{HEADS}/{kv_heads} D{HEAD_DIM} n{n // 1024}K",
                ours_ms,
                "SDPA contiguous",
                anchor_ms,
                roofline_frac=gbps / (H100_COPY_TBPS * 1e3),
                gbps=gbps,
                anchor_gbps=nbytes / anchor_ms / 1e6,
                rel_err=err,
            )
            del q, k, v, k_pool, v_pool, tables
            torch.cuda.empty_cache()
    table.save(Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()

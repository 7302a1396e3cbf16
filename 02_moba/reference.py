"""MoBA, the spec: Mixture of Block Attention as a dense mask (MoBA tech report §2.2, arXiv 2502.13189).

Keys are cut into blocks of ``block_size`` tokens (the last block may be partial). Each query scores every block
with a parameter-free router, keeps the ``topk`` best, and attends with softmax over the tokens of those blocks:

    K̄_j     = mean_{s ∈ block j} k_s                              mean-pooled key of block j
    g_{t,j}  = ⟨q_t, K̄_j⟩                                          router score (fp32)
    c(t)     = ⌊pos_t / block_size⌋                                the query's own ("current") block
    S_t      = {c(t)} ∪ top-(topk−1) of {j < c(t)} by g_{t,j}      ties go to the lower block index
    o_t      = Σ_{s ∈ blocks S_t, s ≤ pos_t} softmax_s(scale · q_t·k_s) v_s,    scale = D^-1/2

Blocks that start after the query never compete; the current block is always kept (like a shared expert) and
attended with a token-level causal mask, because its mean key contains future tokens. ``topk`` counts it, so a
query sees at most ``topk · block_size`` keys. Two consequences follow and are tested: when
``topk · block_size ≥ T`` MoBA *is* dense causal attention, and with ``topk = 1`` it is block-local causal
attention.

Shapes: q ``[B, Tq, H, D]``, k and v ``[B, T, H, D]`` with ``Tq ≤ T``; query i sits at position
``pos_i = T − Tq + i`` (the queries are the last ``Tq`` tokens, as when a prefill continues from a KV cache).
Everything is computed in fp32 (fp64 for fp64 inputs) through an explicit ``[B, H, Tq, T]`` mask: O(T²) memory,
for reading and for testing the Triton kernel, not for long sequences.
"""

from __future__ import annotations

import math

import torch

from nanokimi.checks import check_positive_int, check_tensor

__all__ = ["block_scores", "select_blocks", "block_mask_attention", "moba_attention"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int]:
    """Validate q ``[B, Tq, H, D]``, k and v ``[B, T, H, D]`` (same dtype and device, ``1 ≤ Tq ≤ T``);
    returns ``(B, Tq, T, H, D)``."""
    q = check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    k = check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
    v = check_tensor("v", v, ndim=4, dtypes=(q.dtype,))
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected tensors on {q.device} (that of q), got {k.device} and {v.device}")
    B, Tq, H, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"k: expected shape ({B}, T, {H}, {D}) to match q's batch, heads and head dim, got {tuple(k.shape)}"
        )
    T = k.shape[1]
    if T < 1 or Tq < 1:
        raise ValueError(f"q, k: expected at least one token, got q length {Tq} and k length {T}")
    if Tq > T:
        raise ValueError(f"q: expected at most as many tokens as k ({T}; queries are the last tokens), got {Tq}")
    if D < 1 or H < 1 or B < 1:
        raise ValueError(f"q: expected non-empty batch, heads and head dim, got shape {tuple(q.shape)}")
    return B, Tq, T, H, D


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` is None (→ ``head_dim^-1/2``) or a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected None or a positive finite number, got {scale!r}")
    return float(scale)


def check_causal(causal: object) -> None:
    """MoBA is defined for causal attention only (the router's block means would leak the future otherwise)."""
    if causal is not True:
        raise ValueError(
            f"causal: expected True (MoBA is causal only: future blocks are excluded and the current block is "
            f"causally masked), got {causal!r}"
        )


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Router scores ``g[b, h, i, j] = ⟨q_i, mean of k over block j⟩`` in fp32 (fp64 for fp64 inputs).

    q ``[B, Tq, H, D]``, k ``[B, T, H, D]`` → ``[B, H, Tq, n_blocks]`` with ``n_blocks = ⌈T / block_size⌉``; the
    last block's mean is over its ``T − (n_blocks − 1)·block_size`` real tokens. No causal rule is applied here:
    that is :func:`select_blocks`' job.
    """
    q = check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    k = check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"k: expected shape ({q.shape[0]}, T, {q.shape[2]}, {q.shape[3]}), got {tuple(k.shape)}")
    check_positive_int("block_size", block_size)
    dtype = _compute_dtype(q.dtype)
    B, T, H, D = k.shape
    n_blocks = -(-T // block_size)
    padded = torch.zeros(B, n_blocks * block_size, H, D, dtype=dtype, device=k.device)
    padded[:, :T] = k.to(dtype)
    block_sums = padded.view(B, n_blocks, block_size, H, D).sum(dim=2)  # [B, n_blocks, H, D]
    starts = torch.arange(n_blocks, device=k.device) * block_size
    tokens_per_block = (T - starts).clamp(max=block_size).to(dtype)  # [n_blocks]
    block_means = block_sums / tokens_per_block[None, :, None, None]  # [B, n_blocks, H, D]
    return torch.einsum("bihd,bjhd->bhij", q.to(dtype), block_means)  # [B, H, Tq, n_blocks]


def select_blocks(scores: torch.Tensor, topk: int, block_size: int, *, q_offset: int = 0) -> torch.Tensor:
    """The gate: which key blocks each query attends, as a boolean ``[B, H, Tq, n_blocks]``.

    Query i sits at position ``q_offset + i`` and its current block is ``c = ⌊(q_offset + i) / block_size⌋``.
    Future blocks (``j > c``) are never selected, the current block always is, and the remaining ``topk − 1``
    places go to the past blocks with the highest scores, ties to the lower block index. A query with fewer than
    ``topk − 1`` past blocks selects all of them.
    """
    scores = check_tensor("scores", scores, ndim=4, dtypes=FLOAT_DTYPES)
    check_positive_int("topk", topk)
    check_positive_int("block_size", block_size)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset: expected a non-negative int, got {q_offset!r}")
    _, _, Tq, n_blocks = scores.shape
    positions = q_offset + torch.arange(Tq, device=scores.device)
    if Tq and int(positions[-1]) // block_size >= n_blocks:
        raise ValueError(
            f"scores: expected at least {int(positions[-1]) // block_size + 1} blocks for queries up to position "
            f"{int(positions[-1])} with block_size {block_size}, got {n_blocks}"
        )
    current = positions // block_size  # [Tq]
    block_ids = torch.arange(n_blocks, device=scores.device)
    is_current = block_ids[None, :] == current[:, None]  # [Tq, n_blocks]
    is_future = block_ids[None, :] > current[:, None]
    ranked = scores.masked_fill(is_future, float("-inf")).masked_fill(is_current, float("inf"))
    # A stable descending sort keeps equal scores in index order, so ties go to the lower block index.
    best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :topk]  # [B, H, Tq, topk]
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, best, True)
    # With fewer than topk − 1 past blocks, −∞ future blocks fill the last places of `best`: drop them.
    return chosen & ~is_future


def block_mask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    return_max_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention restricted to selected key blocks.

    Query i (position ``p_i = T − Tq + i``) attends key s iff ``block_mask[b, h, i, ⌊s / block_size⌋]`` and
    ``s ≤ p_i``:  ``o_i = Σ_s softmax_s(scale · q_i·k_s) v_s`` over those keys.

    q ``[B, Tq, H, D]``, k/v ``[B, T, H, D]``, block_mask bool ``[B, H, Tq, ⌈T / block_size⌉]`` → o ``[B, Tq, H, D]``
    in q's dtype (computed in fp32, or fp64 for fp64 inputs). Every query must keep its own block (the diagonal
    key), otherwise its softmax would be empty. With ``return_max_logits`` also returns ``[B, H]``: the largest
    attended logit ``scale · q·k`` per batch and head (what QK-clip watches), detached.
    """
    B, Tq, T, H, D = check_qkv(q, k, v)
    check_positive_int("block_size", block_size)
    n_blocks = -(-T // block_size)
    check_tensor("block_mask", block_mask, shape=(B, H, Tq, n_blocks), dtypes=(torch.bool,))
    scale = check_scale(scale, D)
    dtype = _compute_dtype(q.dtype)
    q_pos = T - Tq + torch.arange(Tq, device=q.device)
    k_pos = torch.arange(T, device=q.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [Tq, T]
    token_mask = block_mask.repeat_interleave(block_size, dim=-1)[..., :T] & causal  # [B, H, Tq, T]
    if not bool(token_mask[:, :, torch.arange(Tq, device=q.device), q_pos].all()):
        raise ValueError("block_mask: expected every query's own block to be selected (its diagonal key is masked)")
    logits = torch.einsum("bihd,bshd->bhis", q.to(dtype), k.to(dtype)) * scale  # [B, H, Tq, T]
    logits = logits.masked_fill(~token_mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhis,bshd->bihd", probs, v.to(dtype)).to(q.dtype)  # [B, Tq, H, D]
    if return_max_logits:
        return out, logits.detach().amax(dim=(-2, -1)).float()
    return out


def moba_attention(
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
    """MoBA, naive: score blocks, select the top-k (current block forced), attend through a dense mask.

    q ``[B, Tq, H, D]``, k/v ``[B, T, H, D]`` (``Tq ≤ T``, queries are the last Tq positions) → o
    ``[B, Tq, H, D]`` in q's dtype; ``scale`` defaults to ``D^-1/2``. With ``return_max_logits`` also returns the
    ``[B, H]`` maximum attended logit. The gate carries no gradient (selection is discrete), as in the paper.
    """
    check_causal(causal)
    _, Tq, T, _, _ = check_qkv(q, k, v)
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    with torch.no_grad():
        gate = select_blocks(block_scores(q, k, block_size), topk, block_size, q_offset=T - Tq)
    return block_mask_attention(q, k, v, gate, block_size, scale, return_max_logits=return_max_logits)

"""Exercise 3 (medium): MoBA attention from the block mask.

Task. With the gate's block mask (exercise 2) the rest of MoBA is ordinary softmax attention under a mask. Query i
(at position ``p_i = T − Tq + i``: the queries are the last Tq tokens, as when a prefill continues from a KV cache)
attends key s iff s's block is selected for i *and* s is not in the future:

    allowed[i, s] = block_mask[i, ⌊s / block_size⌋]  and  s ≤ p_i
    o_i = Σ_{s allowed} softmax_s(scale · q_i·k_s) v_s,          scale = D^-1/2 by default

The current block is always selected, so every query keeps at least its own key (s = p_i): no softmax is empty.
Inside the current block the token-level causal rule does the work; past blocks are wholly before the query.

Write

* ``token_mask(block_mask, T, block_size)``: the ``allowed`` mask above,
* ``moba_attention(q, k, v, block_size, topk, scale=None)``: score the blocks and select them with the chapter's
  ``block_scores`` and ``select_blocks`` (imported below: exercises 1 and 2 are their from-scratch versions),
  then attend through ``token_mask``. The selection is discrete and carries no gradient (as in the paper); the
  output must be differentiable in q, k and v.

Shapes. block_mask bool ``[B, H, Tq, n_blocks]`` → ``token_mask`` bool ``[B, H, Tq, T]``;
q ``[B, Tq, H, D]``, k and v ``[B, T, H, D]`` → o ``[B, Tq, H, D]`` in q's dtype (compute in fp64 for fp64 inputs,
fp32 otherwise). Pass ``q_offset = T − Tq`` to ``select_blocks``.

Hints. ``block_mask.repeat_interleave(block_size, dim=-1)`` gives one column per token of
``n_blocks · block_size`` padded tokens: cut it to T. Fill disallowed logits with −∞ before ``torch.softmax``.
Two checks you can run yourself: with ``topk · block_size ≥ T`` the result is dense causal attention; with
``topk = 1`` it is block-local causal attention. The grader compares outputs and gradients with
``nanokimi.moba.reference.moba_attention`` (do not call it, nor ``block_mask_attention``).
"""

from __future__ import annotations

import math

import torch

from nanokimi.moba.reference import block_scores, select_blocks


def token_mask(block_mask: torch.Tensor, T: int, block_size: int) -> torch.Tensor:
    """Which keys each query attends: bool ``[B, H, Tq, n_blocks]`` → bool ``[B, H, Tq, T]``,
    ``allowed[i, s] = block_mask[i, ⌊s / block_size⌋] and s ≤ T − Tq + i``."""
    Tq = block_mask.shape[2]
    per_token = block_mask.repeat_interleave(block_size, dim=-1)[..., :T]  # [B, H, Tq, T]: block of each key
    q_pos = T - Tq + torch.arange(Tq, device=block_mask.device)
    k_pos = torch.arange(T, device=block_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [Tq, T]
    return per_token & causal


def moba_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int, scale: float | None = None
) -> torch.Tensor:
    """MoBA: q ``[B, Tq, H, D]``, k/v ``[B, T, H, D]`` → o ``[B, Tq, H, D]`` (q's dtype), differentiable in
    q, k, v; each query attends causally to its current block and its ``topk − 1`` best past blocks."""
    Tq, D = q.shape[1], q.shape[3]
    T = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():  # the gate is discrete: no gradient flows through the selection
        gate = select_blocks(block_scores(q, k, block_size), topk, block_size, q_offset=T - Tq)
    allowed = token_mask(gate, T, block_size)  # [B, H, Tq, T]
    logits = torch.einsum("bihd,bshd->bhis", q.to(dtype), k.to(dtype)) * scale  # [B, H, Tq, T]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhis,bshd->bihd", probs, v.to(dtype)).to(q.dtype)  # [B, Tq, H, D]

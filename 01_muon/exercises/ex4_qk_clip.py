"""Exercise 4 (medium): QK-clip, the "Clip" of MuonClip (Kimi K2), for plain multi-head attention and for MLA.

Task. Muon lets attention logits grow fast; K2 caps them without touching the forward pass. During the forward
pass record, per head h, the largest logit over the batch and every attended (query i, key j) pair::

    S_max[h] = max_{b, i, j} scale · q[b, h, i] · k[b, h, j]

and after ``optimizer.step()``, for every head with ``S_max[h] > τ``::

    γ_h = τ / S_max[h]                 (γ_h = 1 for the other heads: their weights stay bit-for-bit unchanged)
    W_q^h ← √γ_h · W_q^h,   W_k^h ← √γ_h · W_k^h

The logit is bilinear in (W_q, W_k), so every logit of head h is multiplied by exactly γ_h.

Write
1. ``max_logit_per_head(q, k, scale, causal=False)`` → ``[H]`` fp32. ``q: [B, H, T, D]``, ``k: [B, H, S, D]``.
   With ``causal=True`` the T queries are the *last* T of the S positions (prefill: T = S; one decode step:
   T = 1), so query i attends keys ``j ≤ S − T + i``. Compute in fp32 (fp64 for fp64 inputs).
2. ``qk_clip_(q_weight, k_weight, max_logits, head_dim, threshold, q_bias=None, k_bias=None)`` → γ ``[H]``
   fp32. Head h owns rows ``h·head_dim:(h+1)·head_dim`` of ``q_weight, k_weight: [H·head_dim, D_model]`` (and
   of the biases ``[H·head_dim]``, if given); scale them in place.
3. ``qk_clip_mla_(q_c_weight, k_c_weight, q_r_weight, max_logits, threshold)`` → γ ``[H]`` fp32, for MLA
   (DeepSeek-V3 / K2 attention). There head h's logit is ``q^C_h·k^C_h + q^R_h·k^R``: a "content" part with
   per-head projections ``q_c_weight, k_c_weight: [H·d_c, D]`` and a rotary part whose query projection
   ``q_r_weight: [H·d_r, D]`` is per head but whose key ``k^R`` is ONE projection ``[d_r, D]`` shared by all
   heads (it is deliberately not an argument: it must not change). Scale so that head h's logits are multiplied
   by exactly γ_h and no other head's logits move. (RoPE rotates q^R and k^R per position; a rotation is linear,
   so it changes nothing here.)

Hints.
- ``torch.einsum("bhtd,bhsd->bhts", q, k)`` gives all logits; mask the future keys with −inf before the max.
- γ as ``threshold / max_logits`` in fp32 (a ``torch.where`` keeps 1 for heads at or below τ).
- Write only the rows of clipped heads (``weight[rows].mul_(...)`` under ``torch.no_grad()``); multiplying an
  untouched head by 1.0 is harmless numerically but the grader checks "bit-for-bit unchanged" with equality.
- For MLA: the content logit is bilinear in (q^C, k^C) like plain attention; the rotary logit is linear in q^R
  alone once k^R is fixed. What factor on q^R makes it scale by γ_h?
"""

from __future__ import annotations

import math  # noqa: F401 (your code will use it)

import torch


def max_logit_per_head(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """``S_max[h] = max_{b, i, j} scale·q[b, h, i]·k[b, h, j]`` over attended pairs; ``[H]`` fp32."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError


def _clip_factors(max_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """γ_h = τ / S_max[h] where S_max[h] > τ, else 1; ``[H]`` fp32."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError


@torch.no_grad()
def qk_clip_(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    max_logits: torch.Tensor,
    head_dim: int,
    threshold: float,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale the rows of every head with ``max_logits[h] > threshold`` by ``√γ_h`` in q and k; returns γ ``[H]``."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError


@torch.no_grad()
def qk_clip_mla_(
    q_c_weight: torch.Tensor,
    k_c_weight: torch.Tensor,
    q_r_weight: torch.Tensor,
    max_logits: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """QK-clip for MLA: ``√γ_h`` on head h's q^C and k^C rows, ``γ_h`` on its q^R rows, shared k^R untouched."""
    # YOUR CODE HERE (roughly 10 lines)
    raise NotImplementedError

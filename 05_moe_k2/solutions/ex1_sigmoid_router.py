"""Exercise 1 (easy): K2's sigmoid router with a selection-only bias.

Task. Score every expert on its own with a sigmoid, choose the top-k experts by score + bias, and weight the
chosen experts by their *unbiased* scores, renormalised to sum to one and multiplied by the routed scaling factor
(Kimi K2 §2.3, DeepSeek-V3 §2.1.2). For a token x ∈ R^D, router weight W_r ∈ R^{E×D} and expert bias b ∈ R^E:

    s   = sigmoid(W_r x)                      [E]   affinities, in fp32 (fp64 when x is fp64)
    sel = s + b                               [E]   the bias only decides *which* experts are chosen
    I   = top-k(sel)                          [k]   ties go to the lower expert id; I sorted ascending
    w_j = c · s_{I_j} / (Σ_{i∈I} s_i + 1e-20)       unbiased scores, renormalised, times c

Shapes: x [N, D] (fp32, fp64 or bf16), router_weight [E, D], expert_bias [E], 1 ≤ top_k ≤ E.
Returns topk_idx [N, k] int64 and topk_weight [N, k] in the score dtype (fp32, or fp64 for fp64 inputs).

Hints.
- Compute the scores in ``torch.promote_types(x.dtype, torch.float32)``: bf16 tokens still get fp32 scores.
- ``torch.topk`` does not promise an order among equal values. A stable descending ``torch.sort`` does: equal
  values keep their index order, so the lower expert id wins.
- The classic bug (vLLM and transformers both shipped it) weights the experts by the biased scores ``s + b``.
  The grader has a case with a large bias that catches it.
"""

from __future__ import annotations

import torch


def sigmoid_route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_idx [N, k] int64 sorted ascending, topk_weight [N, k])`` of the sigmoid router (see the module
    docstring for the equations)."""
    score_dtype = torch.promote_types(x.dtype, torch.float32)
    scores = torch.sigmoid(x.to(score_dtype) @ router_weight.to(score_dtype).T)  # [N, E]
    selection = scores + expert_bias.to(score_dtype)  # [N, E], used for choosing only
    # A stable descending sort keeps tied experts in id order, so the lower id wins a tie.
    chosen_ids = torch.sort(selection, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [N, k]
    topk_idx = chosen_ids.sort(dim=-1).values  # [N, k] ascending
    chosen = scores.gather(1, topk_idx)  # [N, k] unbiased affinities: the bias never reaches the weights
    topk_weight = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * routed_scaling_factor
    return topk_idx, topk_weight

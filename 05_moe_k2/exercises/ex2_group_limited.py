"""Exercise 2 (easy): group-limited routing, as in DeepSeek-V3 (8 groups, a token may use the best 4).

Task. Split the E experts into ``n_groups`` groups of E/G consecutive experts. Score each group by the sum of
the top-2 biased scores ``s + b`` inside it, keep the ``topk_groups`` best groups, and let the token choose its
top-k experts only among the experts of the kept groups. Everything else is exercise 1's router:

    sel          = s + b,  s = sigmoid(W_r x)                          [N, E]
    group_score_g = Σ top-2(sel restricted to group g)                 [N, G]   (top-1 when a group has 1 expert)
    kept         = top-topk_groups(group_score)                        ties → the lower group id
    sel_e        = −inf for every expert e outside the kept groups
    I = top-k(sel) (ties → lower id, sorted ascending),  w_j = c · s_{I_j} / (Σ_{i∈I} s_i + 1e-20)

Shapes: x [N, D], router_weight [E, D], expert_bias [E]; E divisible by n_groups; topk_groups ≤ n_groups;
top_k ≤ topk_groups · E/n_groups. ``limit_to_groups`` takes and returns a selection matrix [N, E].

Hints.
- ``selection.view(N, G, E // G)`` puts each group on its own row; ``.topk(2, dim=-1).values.sum(-1)`` scores it.
- Mask with −inf, not 0: when every kept expert has a negative biased score (a large negative bias), a masked
  expert at 0 would beat them all. The grader has that case.
- Reuse your router from exercise 1 by copying it: exercise files are graded one by one.
"""

from __future__ import annotations

import torch


def limit_to_groups(selection: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """``selection [N, E]`` with −inf written over every expert outside the token's ``topk_groups`` best groups
    (group score = sum of the group's top-2 entries; ties between groups go to the lower group id)."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError


def group_limited_route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float,
    n_groups: int,
    topk_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_idx [N, k] int64 sorted ascending, topk_weight [N, k])``: exercise 1's router with the choice
    limited to the ``topk_groups`` best of ``n_groups`` expert groups."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError

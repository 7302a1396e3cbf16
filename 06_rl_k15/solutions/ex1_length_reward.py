"""Exercise 1 (easy): k1.5's length reward (§2.3.3, "long2short").

Task. Within each group of k responses to one problem, reward short correct answers and penalise long ones:

    λ_j = 0.5 − (len_j − min_len) / (max_len − min_len)        min/max over the group's k lengths
    reward_j = λ_j if correct_j else min(0, λ_j)              a wrong answer is never rewarded for being short
    reward_j = 0 for every j when all the group's lengths are equal (max_len = min_len)

Shapes: lengths [G, k] or [k] (int or float, ≥ 0); correct: the same shape, bool or 0/1 numbers. Returns float32
rewards of that shape, in [−0.5, 0.5].

Hints.
- Compute in fp64 and cast at the end: the grader compares exactly (the values are ½ minus integer ratios).
- A [k] input is one group: ``unsqueeze(0)`` it and reshape the result back.
- A group of equal lengths must give 0, not 0/0 = NaN: divide by ``torch.where(spread > 0, spread, 1.0)``, then
  choose 0 where the spread is 0.
"""

from __future__ import annotations

import torch


def length_reward(lengths: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per-response length reward, float32, shaped like ``lengths`` (see the module docstring)."""
    lens = lengths.to(torch.float64)
    ok = correct != 0  # bool, or 0/1 numbers
    if lens.dim() == 1:  # one group
        lens, ok = lens[None], ok[None]
    lo = lens.min(dim=1, keepdim=True).values  # [G, 1]
    hi = lens.max(dim=1, keepdim=True).values  # [G, 1]
    spread = hi - lo
    safe_spread = torch.where(spread > 0, spread, 1.0)  # never divide by 0, even in the discarded branch
    lam = torch.where(spread > 0, 0.5 - (lens - lo) / safe_spread, 0.0)  # [G, k]
    reward = torch.where(ok, lam, lam.clamp(max=0.0))
    return reward.to(torch.float32).reshape(lengths.shape)

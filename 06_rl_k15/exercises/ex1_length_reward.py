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
    # YOUR CODE HERE (roughly 11 lines)
    raise NotImplementedError

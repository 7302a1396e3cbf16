"""Exercise 3 (medium): auxiliary-loss-free load balancing, and Moonlight's zero-mean variant.

Task. The expert bias b only decides which experts are chosen, so it gets no gradient. Instead, after every
optimizer step, each expert's bias moves by a fixed step γ toward balance (DeepSeek-V3 §2.1.2, used by K2):

    e_i = mean(c) − c_i                       c_i = tokens routed to expert i since the last update   [E]
    b_i ← b_i + γ · sign(e_i)                 overloaded experts (e_i < 0) lose γ, underloaded ones gain γ

Moonlight (arXiv 2502.16982, App. C) subtracts the mean step, so the bias never drifts as a whole:

    b_i ← b_i + γ · (sign(e_i) − mean_j sign(e_j))

Write both updates, then ``balance``: route each batch with the chapter's router (``nanokimi.moe.route``, given),
count the tokens per expert, record max/mean of those counts, and update the bias.

Shapes: bias [E] (any float dtype; keep it), tokens_per_expert [E] (int or float counts), rate γ ≥ 0;
router_weight [E, D]; batches: an iterable of [B, D] token batches.

Hints.
- Compute the load error in fp64 and cast only the step to the bias dtype: the bias is a buffer kept in fp32.
- ``torch.bincount(topk_idx.flatten(), minlength=E)`` counts the tokens per expert.
- The aux-loss-free update adds γ·(#underloaded − #overloaded)/E to the mean bias at every step; the zero-mean
  update adds exactly 0. The grader checks both drifts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nanokimi.moe import route  # noqa: F401 (your code will use it)


@torch.no_grad()
def aux_free_update(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """``b + γ · sign(mean(c) − c)``, returned in the dtype of ``bias``."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError


@torch.no_grad()
def zero_mean_update(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """Moonlight's ``b + γ · (sign(e) − mean(sign(e)))`` with ``e = mean(c) − c``, in the dtype of ``bias``."""
    # YOUR CODE HERE (roughly 3 lines)
    raise NotImplementedError


@torch.no_grad()
def balance(
    router_weight: torch.Tensor,
    batches: Iterable[torch.Tensor],
    top_k: int,
    rate: float,
    zero_mean: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Route every batch with the current bias, then update the bias from that batch's counts.

    Returns the final bias ``[E]`` (fp32, starting from zeros) and the max/mean load of each batch, measured
    before its update (so the first entry is the load of the unbiased router).
    """
    # YOUR CODE HERE (roughly 10 lines)
    raise NotImplementedError

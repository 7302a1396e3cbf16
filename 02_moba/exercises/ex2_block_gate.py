"""Exercise 2 (medium): the block gate with MoBA's causal rules.

Task. Given the router scores ``g[b, h, i, j]`` (exercise 1), decide which key blocks each query attends. Query i
sits at position ``p_i = q_offset + i`` (``q_offset > 0`` when a prefill continues after earlier tokens) and its
own, "current" block is ``c_i = ⌊p_i / block_size⌋``. The rules:

1. **No future block**: a block j > c_i starts after the query and never competes (its keys are all in the future).
2. **The current block is always selected** — whatever its score. Its mean key averages tokens after the query,
   so scoring it would leak the future; attention masks it token by token instead.
3. **topk counts the current block**: the other ``topk − 1`` places go to the past blocks j < c_i with the highest
   scores. A query with fewer than ``topk − 1`` past blocks selects all of them.
4. **Ties go to the lower block index** (so the selection is a deterministic function of the scores — the Triton
   gate must reproduce it bit for bit).

    S_i = {c_i} ∪ top_{topk−1} { j < c_i  by  g[i, j] },    ties → lower j

Shapes. scores ``[B, H, Tq, n_blocks]`` (float) → a bool mask ``[B, H, Tq, n_blocks]``, True where block j ∈ S_i.
You may assume ``n_blocks > c_i`` for every query.

Hints. ``torch.topk`` does not promise which of two equal scores comes first; ``torch.sort(..., descending=True,
stable=True)`` keeps equal scores in index order. Or rank directly: past block j is selected iff fewer than
``topk − 1`` past blocks j' beat it, where j' beats j when ``g[j'] > g[j]``, or ``g[j'] = g[j]`` and ``j' < j``.
Mind the edge cases: ``topk = 1`` (own block only), more places than past blocks, a current block with the
lowest score, future blocks with the highest. The grader compares with ``nanokimi.moba.reference.select_blocks``
(do not call it) for exact equality.
"""

from __future__ import annotations

import torch


def select_blocks(scores: torch.Tensor, topk: int, block_size: int, q_offset: int = 0) -> torch.Tensor:
    """The gate: bool ``[B, H, Tq, n_blocks]`` from scores ``[B, H, Tq, n_blocks]``; query i at position
    ``q_offset + i`` keeps its current block and its ``topk − 1`` best past blocks (ties → lower block index)."""
    # YOUR CODE HERE (roughly 12 lines)
    raise NotImplementedError

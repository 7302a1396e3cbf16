"""Exercise 2 (medium): Block AttnRes by its definition, one sublayer at a time.

Task. Full AttnRes lets sublayer l attend over every earlier output; Block AttnRes groups the L sublayers into
blocks of ``block_size`` S and sums each completed block into one source. With b_0 = embedding::

    sublayer l sits in block n = l // S + 1 at position i = l mod S (blocks of sublayers are numbered from 1)
    sources_l = [b_0, b_1, …, b_{n−1}]  +  [partial]  if i > 0          partial = Σ of block n's outputs so far
    h_l = depth_attention(sources_l, queries[l], norm_weights[l]),   v_l = sublayers[l](h_l)
    partial ← v_l (i = 0) or partial + v_l;  when block n is full (or l = L − 1), b_n = partial
    out = depth_attention([b_0, b_1, …, b_N], final_query, final_norm_weight)        N = ⌈L / S⌉

S = 1 is Full AttnRes (every output its own block); S ≥ L keeps two sources, the embedding and Σ v.

Write ``n_sources`` (how many sources each of the L sublayers, and the final query, attends over) and
``block_attnres_forward`` (the forward pass by the definition above).

Shapes. embedding [..., D] (e.g. [B, T, D]); ``sublayers``: L callables [..., D] → [..., D]; ``queries``: [L, D] (a
tensor, or a list of L tensors [D]); ``norm_weights``: the same or None; final_query [D]; final_norm_weight [D] or
None → out [..., D] in the embedding's dtype. Mix in float32 (float64 for float64 embeddings) and hand each
sublayer its input in the embedding's dtype.

The grader records every sublayer's input, so a wrong source list is reported at the first sublayer it reaches.

Hints.
- ``depth_attention`` (exercise 1, imported from the chapter's reference below) takes the stacked sources
  ``torch.stack(list_of_sources)`` [n, ..., D] and returns (out, weights).
- Keep a Python list of completed block sums and a ``partial`` that is None at the start of each block.
- ``n_sources``: sublayer l sees l // S + 1 completed blocks (b_0 included), plus the partial sum when l mod S > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nanokimi.attnres.reference import depth_attention  # noqa: F401 (yours to use)


def n_sources(n_layers: int, block_size: int) -> list[int]:
    """The number of depth-attention sources of sublayers 0 … L−1 and, last, of the final query (L + 1 ints)."""
    # YOUR CODE HERE (roughly 3 lines)
    raise NotImplementedError


def block_attnres_forward(
    embedding: torch.Tensor,
    sublayers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    queries: torch.Tensor | Sequence[torch.Tensor],
    block_size: int,
    final_query: torch.Tensor,
    norm_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    final_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Block AttnRes over ``sublayers`` (block size S = ``block_size``); returns the final aggregation [..., D]."""
    # YOUR CODE HERE (roughly 15 lines)
    raise NotImplementedError

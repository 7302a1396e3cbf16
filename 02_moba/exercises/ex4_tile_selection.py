"""Exercise 4 (medium): per-query or per-tile selection — what a query-major kernel has to visit.

Background. A flash-attention kernel is fast because a *tile* of queries (say 64) shares every K/V tile it loads.
MoBA selects blocks *per query*, so the 64 queries of a tile may want 64 different sets of blocks: a query-major
kernel would have to visit the **union** of their selections and mask the rest (this chapter's kernel avoids that
with a gather, see the docstring of ``nanokimi.moba.kernels``). The alternative keeps the kernel simple: select
**once per query tile**. Here you build that gate and measure the difference.

Task. Write

* ``select_blocks_per_tile(scores, topk, block_size, tile)``: one selection per tile of ``tile`` consecutive
  queries, made from the tile's **mean score** ``ḡ[τ, j] = mean_{i ∈ tile τ} g[i, j]``, with the same causal rules
  as the per-query gate (own block forced, ``topk`` counts it, no future block, ties to the lower index). Every
  query of the tile gets the tile's selection. Since the score is linear in q, ``ḡ`` is also the score of the
  tile's mean query.
* ``blocks_visited(gate, tile)``: for each tile of ``tile`` consecutive queries, how many distinct key blocks its
  queries select together — the number of blocks a query-major kernel with ``BLOCK_M = tile`` must load:

      visited[b, h, τ] = #{ j : gate[b, h, i, j] for some query i of tile τ }

Assumptions (so that every query of a tile has the same current block and the same past blocks): the queries are
the whole sequence (position i is query i, ``Tq = T``), and ``tile`` divides ``block_size``. The last tile may be
partial when ``tile`` does not divide Tq: average over (and count) its real queries only.

Shapes. scores ``[B, H, T, n_blocks]`` → bool ``[B, H, T, n_blocks]``; gate ``[B, H, T, n_blocks]`` →
int64 ``[B, H, ⌈T / tile⌉]``.

Hints. ``_tile_view`` (given) zero-pads the query axis to a multiple of ``tile`` and views it as
``[B, H, n_tiles, tile, n_blocks]``; divide the sums by the true number of queries per tile (the sum would rank
the blocks the same, but the mean is the score of the mean query). Once each query carries its tile's mean score,
the chapter's ``select_blocks`` (imported below) applies every causal rule for you.
Then try it: T = 1024, block 32, top-3, tile 16, random q and k (``nanokimi.moba.block_scores``). With per-query
selection a tile visits about 13 blocks on average and about 20 of the 31 past blocks near the end of the
sequence; with per-tile selection exactly ``min(topk, c + 1)`` — at most 3. The price is the model: a query now
attends blocks chosen by its neighbours' average (compare the outputs with ``reference.block_mask_attention``:
on random data most queries change their selection). The grader compares with its own per-tile gate and union
count, built on the reference.
"""

from __future__ import annotations

import torch

from nanokimi.moba.reference import select_blocks  # noqa: F401 (yours to use)


def _tile_view(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``[B, H, T, n]`` → zero-padded ``[B, H, ⌈T / tile⌉, tile, n]``."""
    B, H, T, n = x.shape
    n_tiles = -(-T // tile)
    padded = x.new_zeros(B, H, n_tiles * tile, n)
    padded[:, :, :T] = x
    return padded.view(B, H, n_tiles, tile, n)


def select_blocks_per_tile(scores: torch.Tensor, topk: int, block_size: int, tile: int) -> torch.Tensor:
    """One gate per tile of ``tile`` queries, from the tile's mean score: scores ``[B, H, T, n_blocks]`` → bool
    ``[B, H, T, n_blocks]``, every query of a tile holding the tile's selection (own block forced, ties → lower)."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError


def blocks_visited(gate: torch.Tensor, tile: int) -> torch.Tensor:
    """Distinct key blocks selected by the queries of each tile: bool ``[B, H, T, n_blocks]`` → int64
    ``[B, H, ⌈T / tile⌉]`` (padding queries select nothing)."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError

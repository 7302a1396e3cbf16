"""Exercise 1 (easy): the router's scores — mean-pooled keys, one dot product per (query, block).

Task. MoBA's router has no parameters: it cuts the keys into blocks of ``block_size`` tokens, summarises each
block by its mean key, and scores a query against a block by a dot product. Write

* ``block_means(k, block_size)``: the mean key of every block,
* ``block_scores(q, k, block_size)``: every query's score against every block (no causal rule here: which blocks a
  query may pick is exercise 2's job).

Equations (T keys, ``n_blocks = ⌈T / block_size⌉``; the last block may be partial and is averaged over its real
tokens only, never over zero padding):

    I_j       = [j·block_size, min((j+1)·block_size, T))             the tokens of block j
    K̄_j      = (1 / |I_j|) Σ_{s ∈ I_j} k_s                           mean key of block j
    g[i, j]   = ⟨q_i, K̄_j⟩                                           router score

Shapes. q ``[B, Tq, H, D]``, k ``[B, T, H, D]`` (heads are independent);
``block_means`` → ``[B, n_blocks, H, D]``, ``block_scores`` → ``[B, H, Tq, n_blocks]``.
Dtypes: compute and return fp64 for fp64 inputs, fp32 for everything else (fp32, bf16, fp16), like the chapter.

Hints. ``-(-T // block_size)`` is ``⌈T / block_size⌉`` in integers. Either loop over the blocks (a slice
``k[:, start:end]`` and ``.mean(dim=1)`` handles the partial block by itself), or zero-pad k to
``n_blocks · block_size`` tokens, ``view`` it as ``[B, n_blocks, block_size, H, D]``, sum, and divide by the true
token counts. ``torch.einsum("bihd,bjhd->bhij", ...)`` lays the scores out as asked.
The grader compares with ``nanokimi.moba.reference.block_scores`` (do not call it).
"""

from __future__ import annotations

import torch


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each block: k ``[B, T, H, D]`` → ``[B, ⌈T / block_size⌉, H, D]`` (fp64 for fp64 k, else fp32);
    the last block is averaged over its ``T − (n_blocks − 1)·block_size`` real tokens."""
    # YOUR CODE HERE (roughly 5 lines)
    raise NotImplementedError


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Router scores ``g[b, h, i, j] = ⟨q_i, K̄_j⟩``: q ``[B, Tq, H, D]``, k ``[B, T, H, D]`` →
    ``[B, H, Tq, ⌈T / block_size⌉]`` (fp64 for fp64 inputs, else fp32)."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError

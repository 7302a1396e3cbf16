"""Exercise 2 (easy–medium): the two C×C matrices of a chunk, with exact pairwise decays.

Task. Inside a chunk of C tokens, let ``G_r = Σ_{s ≤ r} g_s`` be the cumulative log-decay (per key channel).
The decay from just after token i to token r (i ≤ r) is ``exp(G_r − G_i) ≤ 1``, channel by channel. Write

* ``chunk_cumsum(g)``: G from g, ``[..., C, K] → [..., C, K]``;
* ``intra_chunk_matrices(q, k, G, beta, scale)`` → ``(A_kk, A_qk)``, each ``[..., C, C]``::

      A_kk[r, i] = β_r Σ_c k_rc k_ic exp(G_rc − G_ic)      for i < r  (strictly lower), else 0
      A_qk[r, i] = scale Σ_c q_rc k_ic exp(G_rc − G_ic)    for i ≤ r  (diagonal included), else 0

A_kk is how much token i's write is already recalled by token r's key (the delta rule corrects for it); A_qk is
how much token r's query reads of token i's write. Both are what the chunkwise form needs from inside the chunk.

Numerics (this is the point of the exercise). The tempting factored form ``(e^{G} ⊙ K)(e^{−G} ⊙ K)ᵀ`` needs
``e^{−G}``, which overflows once the decay inside a chunk is strong (G ≈ −5 per token reaches e^{320} in 64
tokens). Build every entry from ``G_r − G_i`` directly, and mask the upper triangle to −∞ *before* the
exponential, so no exponent is ever positive. The grader includes g ≈ −60 per token and checks for inf/NaN.

Shapes. q, k, G ``[..., C, K]`` (any batch dims in front); beta ``[..., C]``. Compute in the inputs' dtype.

Hints.
* ``G.unsqueeze(-2) − G.unsqueeze(-3)`` is ``[..., C(r), C(i), K]`` with entry ``G_r − G_i``.
* ``torch.einsum("...rc,...ic,...ric->...ri", a, b, decay)`` sums over the channel c.
"""

from __future__ import annotations

import torch


def chunk_cumsum(g: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum over the chunk's tokens (dim −2)."""
    # YOUR CODE HERE (roughly 1 lines)
    raise NotImplementedError


def intra_chunk_matrices(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, beta: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_kk, A_qk)`` of one chunk, ``[..., C, C]`` each, from exact pairwise decays."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError

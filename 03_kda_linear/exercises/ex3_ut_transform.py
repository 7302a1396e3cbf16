"""Exercise 3 (medium): the UT transform, then one chunk of the chunkwise forward.

Task. Within a chunk the delta rule couples every token to the ones before it. The report (Eq. 7) solves that
once per chunk with a unit-lower-triangular system::

    M = I + A_kk                                   (A_kk strictly lower, from exercise 2)
    W = M⁻¹ Diag(β) (exp(G) ⊙ K)                   [C, K]
    U = M⁻¹ Diag(β) V                              [C, V]

1. ``forward_substitution(a_kk)``: X = M⁻¹ by forward substitution, row by row — row i of X is
   ``e_i − Σ_{j<i} A_kk[i, j] X_j`` (this is exactly what the Triton kernel's ``_fwd_solve_kernel`` does).
   Do not call ``torch.linalg`` solvers or ``torch.inverse``: the loop is the exercise.
2. ``ut_transform(a_kk, k, v, G, beta)`` → (W, U) using your X.
3. ``chunk_step(q, k, v, G, beta, a_kk, a_qk, S, scale)``: one chunk of the chunkwise form, given the state S
   ``[..., K, V]`` at the chunk's start::

       Δ   = U − W S                                     corrections ("pseudo-values"), [C, V]
       O   = (scale · exp(G) ⊙ Q) S + A_qk Δ             [C, V]   (A_qk already holds the scale)
       S' = Diag(exp G_C) S + (exp(G_C − G) ⊙ K)ᵀ Δ      G_C = the chunk's last row of G

   Returns (O, S'). Chaining ``chunk_step`` over the chunks of a sequence gives the token loop's outputs exactly.

Shapes. a_kk, a_qk ``[..., C, C]``; q, k, G ``[..., C, K]``; v ``[..., C, V]``; beta ``[..., C]``; S
``[..., K, V]``. The grader passes float64 and compares with the chapter's reference and its token loop.

Hints.
* Start from ``X = eye(C)`` (broadcast to the batch dims) and fill rows 1 … C−1 in order: each row only needs
  rows above it. ``torch.einsum("...j,...jc->...c", A_kk[..., i, :i], X[..., :i, :])``.
* Avoid writing into a tensor that autograd may need; building a list of rows and ``torch.stack`` is simplest.
"""

from __future__ import annotations

import torch


def forward_substitution(a_kk: torch.Tensor) -> torch.Tensor:
    """``X = (I + A_kk)⁻¹`` for a strictly lower A_kk ``[..., C, C]``, row by row."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError


def ut_transform(
    a_kk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [..., C, K], U [..., C, V])`` with ``X = (I + A_kk)⁻¹`` from :func:`forward_substitution`."""
    # YOUR CODE HERE (roughly 4 lines)
    raise NotImplementedError


def chunk_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    a_kk: torch.Tensor,
    a_qk: torch.Tensor,
    S: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: ``(O [..., C, V], S' [..., K, V])`` from the state S at the chunk's start."""
    # YOUR CODE HERE (roughly 6 lines)
    raise NotImplementedError

"""Exercise 2 (easy): the cubic Newton–Schulz iteration, and why Muon uses a quintic instead.

Task. The classical Newton–Schulz iteration for the polar factor is cubic::

    X₀ = G / max(‖G‖_F, eps)               (tall matrices transposed, as in exercise 1)
    X ← 1.5·X − 0.5·(X Xᵀ)·X               one singular value: f(σ) = 1.5·σ − 0.5·σ³

``f`` has a fixed point at 1 with ``f'(1) = 0``, so it converges (quadratically near 1) for every σ in (0, √3).
Its slope at 0 is only 1.5, though: a small normalised singular value grows by ~1.5× per step. Muon's quintic
``(3.4445, −4.7750, 2.0315)`` trades convergence for a slope of 3.4445 at 0; it never settles at 1 but lands
in [0.68, 1.13] within five steps.

Write
1. ``cubic_map(sigma, steps)``: ``f^steps(σ)`` element-wise, for a tensor of singular values.
2. ``newton_schulz_cubic(G, steps)``: the cubic iteration on each matrix of ``G: [..., m, n]`` (same
   normalisation, same transpose of tall matrices as exercise 1); returns ``G``'s shape and dtype.
3. ``steps_to_reach(sigma0, target, coefficients, max_steps)``: the smallest n ≥ 0 with ``g^n(σ₀) ≥ target`` for
   the odd polynomial ``g(σ) = a·σ + b·σ³ + c·σ⁵`` given by ``coefficients = (a, b, c)``, or None when no
   n ≤ max_steps gets there. The cubic is ``(1.5, −0.5, 0.0)``.

Then answer for yourself (ungraded): how many steps do the cubic and the quintic need to lift σ = 0.01 above
0.68? Why is the quintic's failure to converge harmless for an optimizer (what would exact orthogonality buy,
given the momentum is itself a noisy estimate)?

Hints. Python floats are fine for ``steps_to_reach`` (iterate the scalar map in a loop). The grader compares
``newton_schulz_cubic`` with the chapter's quintic reference run with coefficients (1.5, −0.5, 0), and checks
that 30 cubic steps reach the exact polar factor ``U Vᵀ`` of a well-conditioned matrix.
"""

from __future__ import annotations

import torch


def cubic_map(sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """``f^steps(σ)`` with ``f(σ) = 1.5·σ − 0.5·σ³``, element-wise; same shape and dtype as ``sigma``."""
    # YOUR CODE HERE (roughly 4 lines)
    raise NotImplementedError


def newton_schulz_cubic(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """``steps`` cubic Newton–Schulz steps on each matrix of ``G: [..., m, n]``; returns ``G``'s shape and dtype."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError


def steps_to_reach(
    sigma0: float, target: float, coefficients: tuple[float, float, float], max_steps: int = 100
) -> int | None:
    """The smallest n in [0, max_steps] with ``g^n(σ₀) ≥ target``, ``g(σ) = a·σ + b·σ³ + c·σ⁵``; None if none."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError

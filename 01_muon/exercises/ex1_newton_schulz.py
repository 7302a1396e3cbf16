"""Exercise 1 (easy): the quintic Newton–Schulz iteration, Muon's orthogonaliser.

Task. Write ``newton_schulz(G, steps, coefficients, eps)``: an approximation of the orthogonal polar factor
``U Vᵀ`` of every matrix ``G = U Σ Vᵀ`` in a batch, using matmuls only::

    X₀ = G / max(‖G‖_F, eps)              per matrix; ‖G‖_F ≥ ‖G‖₂, so every singular value of X₀ is ≤ 1
    if m > n (tall): work on X₀ᵀ          so that the Gram matrix is r×r with r = min(m, n)
    repeat ``steps`` times:
        A = X Xᵀ                          [..., r, r]
        B = b·A + c·A·A                   [..., r, r]
        X ← a·X + B·X                     = U f(Σ) Vᵀ with f(σ) = a·σ + b·σ³ + c·σ⁵
    transpose back if you transposed

With ``(a, b, c) = (3.4445, −4.7750, 2.0315)`` five steps push every normalised singular value above ~0.01
into [0.68, 1.13]: not exactly 1, but close enough for an optimizer step, and it costs a few matmuls instead of
an SVD.

Shapes. ``G: [..., m, n]`` (any number of leading batch dimensions; each matrix is normalised on its own).
Returns a tensor of ``G``'s shape and dtype.

Hints.
- ``torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True)`` is the Frobenius norm of each matrix.
- Divide by ``max(‖G‖_F, eps)`` (``clamp_min``), not by ``‖G‖_F + eps``: the result must not depend on the scale
  of ``G`` as long as ``‖G‖_F ≥ eps``, and a zero matrix must give zeros, not NaN.
- ``X.mT`` transposes the last two dimensions. A tall 4096×1024 matrix iterated without the transpose gives the
  same answer (the polynomial commutes with it) but builds 4096² Gram matrices instead of 1024²; the grader
  watches for that.
"""

from __future__ import annotations

import torch

from nanokimi.muon.reference import DEFAULT_COEFFICIENTS


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """``steps`` quintic Newton–Schulz steps on each matrix of ``G: [..., m, n]``; returns ``G``'s shape and dtype."""
    # YOUR CODE HERE (roughly 10 lines)
    raise NotImplementedError

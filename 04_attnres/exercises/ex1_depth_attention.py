"""Exercise 1 (easy): depth attention, one pseudo-query over RMS-normalised sources, per token.

Task. Attention Residuals replace the residual sum by a softmax over depth. A sublayer's input is a weighted
average of its sources s_0 … s_{N−1} (the embedding and earlier sublayer outputs), with weights from a learned
pseudo-query w ∈ R^D scored against the RMS-normalised sources, independently for every token::

    RMSNorm(x) = x / sqrt(mean_d(x²) + ε) ⊙ g                          (g: an optional weight [D])
    z_i = wᵀ RMSNorm(s_i),   α = softmax_i(z),   out = Σ_i α_i s_i         (keys normalised, values raw)

Write ``rms_norm`` and ``depth_attention``.

Shapes. ``x [..., D]``; ``sources [N, ..., D]`` (N sources first, then any token dims such as B, T), ``query [D]``,
``norm_weight [D]`` or None → ``out [..., D]`` and ``weights [N, ...]``. Compute in float32, or float64 when the
sources are float64 (the grader compares with the chapter's float64 reference to ~1e-13).

Things the grader checks besides random inputs: one source returns itself with weight 1; a zero query gives the
plain average of the sources (that is how every sublayer starts, w is zero-initialised); scaling one source by
10⁶ leaves the weights alone (the keys are normalised) but not the output (the values are not); logits of
size ~1e4 must not overflow.

Hints.
- ``x.pow(2).mean(dim=-1, keepdim=True)`` and ``torch.rsqrt``; the norm weight multiplies the normalised x.
- The logits are a dot product over D for every (source, token): ``torch.einsum("n...d,d->n...", keys, query)``.
- ``torch.softmax(logits, dim=0)`` subtracts the max for you (``exp`` of a raw logit of 1e4 is inf).
- ``torch.promote_types(sources.dtype, torch.float32)`` is the compute dtype.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, times ``weight`` [D] when given. x [..., D] → [..., D]."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError


def depth_attention(
    sources: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """α = softmax over the N sources of queryᵀ RMSNorm(source), per token; returns (Σ_i α_i sources_i, α).

    sources [N, ..., D], query [D], norm_weight [D] or None → out [..., D], weights [N, ...].
    """
    # YOUR CODE HERE (roughly 6 lines)
    raise NotImplementedError

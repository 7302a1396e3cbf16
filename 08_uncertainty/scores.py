"""Single-pass uncertainty baselines from logits, and the interface every scorer in this chapter implements.

For logits z ∈ R^V with p = softmax(z) and lse = log Σ_v e^{z_v} (higher score = more uncertain):

    max-prob (MSP, Hendrycks & Gimpel 2017):  1 − max_v p_v                  ∈ [0, 1 − 1/V]
    predictive entropy:                        H(p) = −Σ_v p_v log p_v        ∈ [0, log V]
    energy (Liu et al., 2020):                 E = −T · logsumexp(z / T)     (T = 1 here: E = −lse)

All three come from the three per-row statistics (max p, H, lse) of ``token_uncertainty_reference`` — what the
fused kernel ``nanokimi.uncertainty.kernels.token_uncertainty`` computes in one pass over the vocabulary.

An answer spans several tokens: per-token scores are reduced over the answer positions (``mask``) by their mean
(default), max or sum.

Interface (``Scorer``): ``score(inputs, mask=None) -> [N]`` plus ``name`` and ``passes`` (forward passes of the
base model per scored example, for the cost table). ``LogitScorer`` wraps the three baselines around any
``logits_fn(inputs) -> [N, V] or [N, T, V]``; MC dropout (``passes`` = N), deep ensembles (M) and the plug-in
CUPID/DRUE scorers (1) implement the same two members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from nanokimi.checks import check_in, check_tensor
from nanokimi.uncertainty.kernels import token_uncertainty

__all__ = [
    "BASELINES",
    "REDUCTIONS",
    "token_uncertainty_reference",
    "baseline_token_scores",
    "reduce_over_tokens",
    "Scorer",
    "LogitScorer",
]

BASELINES = ("msp", "entropy", "energy")
REDUCTIONS = ("mean", "max", "sum")
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def token_uncertainty_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max-prob, entropy, logsumexp) of each row of ``logits`` [..., V], each [...]; math in fp32 (fp64 stays fp64).

    Entries may be −inf (masked vocabulary); a row with no finite entry has lse = −inf and NaN max-prob/entropy,
    as in torch. The spec of the fused kernel.
    """
    check_tensor("logits", logits, dtypes=_FLOATS)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    lse = torch.logsumexp(z, dim=-1)  # [...]
    logp = torch.log_softmax(z, dim=-1)  # [..., V]
    p = logp.exp()
    max_prob = p.amax(dim=-1)
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)  # p log p → 0 as p → 0 (−inf entries)
    dead = torch.isneginf(lse)
    return max_prob, torch.where(dead, float("nan"), entropy), lse


def baseline_token_scores(logits: torch.Tensor, kind: str, *, backend: str = "reference") -> torch.Tensor:
    """Per-row score of one baseline (``kind`` in BASELINES) for logits [..., V] → [...] fp32/fp64."""
    check_in("kind", kind, BASELINES)
    check_in("backend", backend, ("reference", "triton"))
    if backend == "reference":
        max_prob, entropy, lse = token_uncertainty_reference(logits)
    else:
        max_prob, entropy, lse = token_uncertainty(logits)
    if kind == "msp":
        return 1.0 - max_prob
    if kind == "entropy":
        return entropy
    return -lse


def reduce_over_tokens(token_scores: torch.Tensor, mask: torch.Tensor | None, how: str = "mean") -> torch.Tensor:
    """Reduce [N, T] per-token scores to [N] over the positions where ``mask`` [N, T] is true (all if None)."""
    check_in("how", how, REDUCTIONS)
    check_tensor("token_scores", token_scores, ndim=2, dtypes=_FLOATS)
    if mask is None:
        mask = torch.ones_like(token_scores, dtype=torch.bool)
    check_tensor("mask", mask, shape=tuple(token_scores.shape), dtypes=(torch.bool,))
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"mask: expected at least one scored token per example, row {int((counts == 0).nonzero()[0])} has none"
        )
    if how == "max":
        return token_scores.masked_fill(~mask, float("-inf")).amax(-1)
    total = token_scores.masked_fill(~mask, 0.0).sum(-1)
    return total / counts if how == "mean" else total


class Scorer(ABC):
    """An uncertainty scorer: ``score(inputs, mask) -> [N]`` with higher = more uncertain.

    ``name`` labels it in tables and plots; ``passes`` is the number of base-model forward passes it costs per
    example (1 for single-pass methods, N for MC dropout, M for an ensemble).
    """

    name: str
    passes: int

    @abstractmethod
    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: what the wrapped model takes for N examples; mask: [N, T] bool answer positions for
        sequence outputs (None for [N, V] outputs). Returns [N] scores."""


class LogitScorer(Scorer):
    """A single-pass baseline (MSP, entropy or energy) on the logits of ``logits_fn(inputs)``."""

    def __init__(
        self,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        kind: str,
        *,
        reduce: str = "mean",
        backend: str = "reference",
    ):
        check_in("kind", kind, BASELINES)
        check_in("reduce", reduce, REDUCTIONS)
        check_in("backend", backend, ("reference", "triton"))
        if not callable(logits_fn):
            raise TypeError(f"logits_fn: expected a callable inputs -> logits, got {type(logits_fn).__name__}")
        self.logits_fn, self.kind, self.reduce, self.backend = logits_fn, kind, reduce, backend
        self.name = kind
        self.passes = 1

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits_fn(inputs)
        check_tensor("logits", logits, dtypes=_FLOATS)
        if logits.dim() == 2:  # [N, V]: one prediction per example
            if mask is not None:
                raise ValueError(f"mask: expected None for [N, V] logits, got a tensor of shape {tuple(mask.shape)}")
            return baseline_token_scores(logits, self.kind, backend=self.backend)
        if logits.dim() != 3:
            raise ValueError(f"logits: expected [N, V] or [N, T, V] from logits_fn, got {tuple(logits.shape)}")
        per_token = baseline_token_scores(logits, self.kind, backend=self.backend)  # [N, T]
        return reduce_over_tokens(per_token, mask, self.reduce)

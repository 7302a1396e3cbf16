"""nanokimi.uncertainty: CUPID: plug-in aleatoric and epistemic uncertainty.

Public API: metrics (AUROC, AURC, Spearman), the single-pass logit baselines behind the common ``Scorer``
interface, and the fused per-row uncertainty-statistics kernel.
"""

from nanokimi.uncertainty.kernels import token_uncertainty
from nanokimi.uncertainty.metrics import aurc, auroc, average_ranks, risk_coverage, roc_curve, spearman
from nanokimi.uncertainty.scores import (
    BASELINES,
    LogitScorer,
    Scorer,
    baseline_token_scores,
    reduce_over_tokens,
    token_uncertainty_reference,
)

__all__ = [
    "auroc",
    "aurc",
    "roc_curve",
    "risk_coverage",
    "spearman",
    "average_ranks",
    "BASELINES",
    "Scorer",
    "LogitScorer",
    "baseline_token_scores",
    "reduce_over_tokens",
    "token_uncertainty_reference",
    "token_uncertainty",
]

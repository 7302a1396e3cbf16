"""nanokimi.uncertainty: CUPID: plug-in aleatoric and epistemic uncertainty.

Public API: metrics (AUROC, AURC, Spearman), the single-pass logit baselines behind the common ``Scorer``
interface, the fused per-row uncertainty-statistics kernel, the plug-ins CUPID and DRUE on a frozen TinyKimi, and
the multi-pass baselines MC dropout and deep ensembles. The evaluations live in ``nanokimi.uncertainty.evaluate``.
"""

from nanokimi.uncertainty.baselines import (
    ENSEMBLE_KINDS,
    EnsembleScorer,
    MCDropoutScorer,
    model_logits_fn,
    predictive_token_scores,
)
from nanokimi.uncertainty.cupid import CUPID, CUPIDOutputs, CUPIDScorer
from nanokimi.uncertainty.drue import DRUE, DRUEScorer
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
from nanokimi.uncertainty.sites import run_with_sites, site_module

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
    "CUPID",
    "CUPIDOutputs",
    "CUPIDScorer",
    "DRUE",
    "DRUEScorer",
    "ENSEMBLE_KINDS",
    "MCDropoutScorer",
    "EnsembleScorer",
    "model_logits_fn",
    "predictive_token_scores",
    "run_with_sites",
    "site_module",
]

"""Exercise 3 (medium): the Mahalanobis baseline (Lee et al., 2018) on hidden features.

Task. The logit baselines only see the output. The Mahalanobis score looks at a feature f ∈ R^D (for TinyKimi, a
site's hidden state at an answer token; the class of a training feature is its target token) and asks how far it
lies from every class's cloud of training features, all clouds sharing one ("tied") covariance:

    μ_c = mean of the training features of class c                               [C, D]
    Σ   = (1/N) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ + ridge·I                     [D, D]   (within-class, tied)
    P   = Σ⁻¹                                                                     [D, D]   the precision
    score(f) = min_c (f − μ_c)ᵀ P (f − μ_c)                                       higher = farther = more uncertain

The ridge keeps Σ invertible when a class has fewer features than dimensions.

1. ``fit_mahalanobis(features, labels, ridge)``: ``(classes, means, precision)``, where ``classes`` [C] int64
   are the distinct labels in ascending order and ``means[c]`` is the mean of class ``classes[c]``.
2. ``mahalanobis_score(features, means, precision)``: the score of each row of ``features``.

Shapes: training ``features`` [N, D] (fp32 or fp64), ``labels`` [N] int64 (any ids, not necessarily 0 … C − 1);
scored ``features`` [M, D]. Returns ``classes`` [C] int64, ``means`` [C, D], ``precision`` [D, D] and scores [M],
all floats in the features' dtype.

Hints. ``torch.unique(labels, return_inverse=True)`` gives the classes and each row's class index;
``index_add_`` (or a one-hot matrix product) sums the features per class. ``torch.linalg.inv`` inverts Σ. For
the scores, ``diff = f[:, None, :] − means[None]`` is [M, C, D] and
``torch.einsum("mcd,de,mce->mc", diff, precision, diff)`` gives every squared distance. No chapter function
computes this (it is left out of ``nanokimi.uncertainty``); the grader compares with a direct loop in fp64.
"""

from __future__ import annotations

import torch


def fit_mahalanobis(
    features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(classes [C] int64, means [C, D], precision [D, D])`` of training ``features`` [N, D] with ``labels`` [N]."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """min_c (f − μ_c)ᵀ P (f − μ_c) for each row f of ``features`` [M, D] → [M]."""
    # YOUR CODE HERE (roughly 3 lines)
    raise NotImplementedError

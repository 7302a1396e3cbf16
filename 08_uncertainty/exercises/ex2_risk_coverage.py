"""Exercise 2 (medium): the risk–coverage curve and its area (AURC), exact under tied scores.

Task. A model that may abstain answers only the inputs it is most confident about. Sort the n examples by
ascending uncertainty score (most confident first) and keep the first i: the coverage is i/n and the risk is the
mean error of the kept examples,

    risk(i) = (1/i) Σ_{k ≤ i} e_(k),        AURC = (1/n) Σ_{i=1}^{n} risk(i)        (Geifman et al., 2019)

where e_(k) is the error (a 0/1 mistake or any loss ≥ 0) of the k-th most confident example. Lower is better: a
score that puts every mistake last has the smallest AURC the errors allow.

Ties. With equal scores the order inside a tied block is arbitrary, and a sort would pick one by accident. Take
the *expectation over every order of the block* instead: inside a block of size b whose errors sum to S, the
cumulative error grows by S/b per kept example, so for the j-th kept example of the block (j = 1 … b)

    Σ_{k ≤ i} e_(k) = (errors of the blocks before) + j · S / b

1. ``risk_coverage(scores, errors)``: ``(coverage [n], risk [n])`` for i = 1 … n, as above.
2. ``aurc(scores, errors)``: the mean of the risks.

Shapes: ``scores`` and ``errors`` are 1-d NumPy float arrays of length n ≥ 1 (finite; errors ≥ 0). Return two
float64 arrays [n] (1) and a Python float (2).

Example: scores [0.2, 0.1, 0.2], errors [1, 0, 0] → order: 0.1 (e=0), then the tied block {0.2, 0.2} with
S = 1, b = 2; cumulative errors 0, 0.5, 1; risk = [0, 0.25, 1/3]; coverage [1/3, 2/3, 1].

Hints. ``np.argsort(scores, kind="mergesort")``, then find the tied blocks as in exercise 1.
``np.add.reduceat(errors_sorted, starts)`` sums each block; ``np.repeat`` spreads per-block numbers over the
block's positions. Do not call ``nanokimi.uncertainty.risk_coverage`` or ``aurc`` (the grader compares with
them, and with the average over every order of small tied blocks).
"""

from __future__ import annotations

import numpy as np


def risk_coverage(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage i/n, risk(i)) for i = 1 … n, keeping the i lowest-score examples; ties by expectation."""
    # YOUR CODE HERE (roughly 14 lines)
    raise NotImplementedError


def aurc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk–coverage curve, (1/n) Σ_i risk(i)."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError

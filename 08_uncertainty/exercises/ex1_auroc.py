"""Exercise 1 (easy): AUROC from average ranks, ties counting one half.

Task. An uncertainty score is judged by how well it ranks the examples it should flag (wrong answers, OOD inputs:
the positives, label 1) above the others (label 0). AUROC is the probability that a random positive scores above
a random negative, a tie counting one half:

    AUROC = (1/(n₊n₋)) Σ_{i∈+} Σ_{j∈−} ( 1[s_i > s_j] + ½·1[s_i = s_j] )

The double sum costs n₊·n₋ comparisons. Sorting once gives the same number in O(n log n) (Mann–Whitney U): rank
all n scores from 1 (lowest) to n, give every block of tied scores the mean of the ranks it spans, and

    U = Σ_{i∈+} rank_i − n₊(n₊+1)/2,        AUROC = U / (n₊n₋)

(the sum of the positives' ranks counts, for each positive, the examples at or below it; subtracting the
positives' own contribution n₊(n₊+1)/2 leaves the negatives below it, ties counting half through the mean rank).

1. ``average_ranks(values)``: the 1-based ranks of ``values`` [n], ties sharing the mean of their ranks.
   Example: [0.3, 0.1, 0.3, 0.2] → [3.5, 1.0, 3.5, 2.0].
2. ``auroc(scores, labels)``: AUROC by the rank formula. ``labels`` are 0/1 (ints, floats or bools).

Shapes: ``values``, ``scores`` and ``labels`` are 1-d NumPy arrays of length n ≥ 1 (scores finite). Return a
float64 array [n] (1) and a Python float (2). When ``labels`` hold only one class, AUROC is undefined: raise
ValueError naming ``labels`` and the counts of positives and negatives.

Hints. ``np.argsort(x, kind="mergesort")`` gives the sorting order; in the sorted values a tied block starts
where a value differs from the one before it (``np.flatnonzero``). A block covering sorted positions
start … end − 1 (0-based) spans the ranks start + 1 … end, whose mean is (start + 1 + end) / 2; ``np.repeat``
spreads the block means back over the block. Do not call ``nanokimi.uncertainty.auroc`` or ``average_ranks``:
they are what you are rebuilding (the grader compares with them and with the double sum).
"""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` [n], ties sharing the mean of their ranks ([n] float64)."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``scores`` [n] (higher = more likely positive) for 0/1 ``labels`` [n], ties counting one half."""
    # YOUR CODE HERE (roughly 8 lines)
    raise NotImplementedError

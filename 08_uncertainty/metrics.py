"""Evaluation metrics for uncertainty scores (NumPy, float64, exact on small cases).

Convention everywhere in ``nanokimi.uncertainty``: a *higher* score means *more uncertain* (more likely wrong,
more likely out-of-distribution).

* AUROC: the probability that a random positive scores above a random negative, ties counting one half,

      AUROC = (1/(n₊ n₋)) Σ_{i∈+} Σ_{j∈−} ( 1[s_i > s_j] + ½ 1[s_i = s_j] ),

  computed from average ranks (Mann–Whitney U): U = Σ_{i∈+} rank_i − n₊(n₊+1)/2, AUROC = U/(n₊ n₋).
* AURC (Geifman et al., 2019): order the examples from most to least confident (ascending score) and let
  risk(i) be the mean error of the i most confident; AURC = (1/n) Σ_{i=1}^{n} risk(i). Examples with tied scores
  are taken in every order with equal probability: within a tied block the errors accrue at their mean rate.
* Spearman's ρ: the Pearson correlation of average ranks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "roc_curve", "aurc", "risk_coverage", "spearman", "average_ranks"]


def _vector(name: str, values: object) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name}: expected numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least one value, got an empty array (empty evaluation set)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(arr)).sum())} NaN/inf")
    return arr


def _pair(names: tuple[str, str], a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(names[0], a), _vector(names[1], b)
    if x.shape != y.shape:
        raise ValueError(f"{names[1]}: expected shape {x.shape} (that of {names[0]}), got {y.shape}")
    return x, y


def _binary(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name}: expected 0/1 or boolean values, got {sorted(set(arr.tolist()))[:5]}")
    return arr


def average_ranks(values: object) -> np.ndarray:
    """1-based ranks of ``values`` with ties sharing the mean of their ranks ([n] float64)."""
    x = _vector("values", values)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first index of each tied block
    ends = np.r_[starts[1:], x.size]  # one past its last
    block_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks start+1 … end
    ranks = np.empty_like(x)
    ranks[order] = np.repeat(block_rank, ends - starts)
    return ranks


def auroc(scores: object, labels: object) -> float:
    """Area under the ROC curve of ``scores`` ([n], higher = more likely positive) for 0/1 ``labels`` ([n]);
    ties count one half. Needs at least one positive and one negative."""
    s, y = _pair(("scores", "labels"), scores, labels)
    _binary("labels", y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels: expected both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = average_ranks(s)
    u_stat = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def roc_curve(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate), one point per distinct threshold from +∞ down, starting at (0, 0).
    The trapezoid area under these points equals ``auroc``."""
    s, y = _pair(("scores", "labels"), scores, labels)
    _binary("labels", y)
    n_pos, n_neg = y.sum(), y.size - y.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels: expected both classes, got {int(n_pos)} positives and {int(n_neg)} negatives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_block = np.r_[s[1:] != s[:-1], True]  # thresholds fall between distinct scores
    tp = np.cumsum(y)[last_of_block]
    fp = np.cumsum(1 - y)[last_of_block]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def risk_coverage(scores: object, errors: object) -> tuple[np.ndarray, np.ndarray]:
    """(coverage i/n, risk(i)) for i = 1 … n, keeping the i lowest-score (most confident) examples.

    errors: [n] 0/1 mistakes or any non-negative losses. Within a block of tied scores the cumulative error grows
    linearly (the expectation over the block's orders)."""
    s, e = _pair(("scores", "errors"), scores, errors)
    if np.any(e < 0):
        raise ValueError(f"errors: expected non-negative losses, got min {e.min()!r}")
    n = s.size
    order = np.argsort(s, kind="mergesort")
    s, e = s[order], e[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], n]
    block_sum = np.add.reduceat(e, starts)  # errors per tied block
    block_size = ends - starts
    before = np.r_[0.0, np.cumsum(block_sum)[:-1]]  # errors of the blocks before each block
    block_of = np.repeat(np.arange(starts.size), block_size)  # [n] block index of each position
    within = np.arange(n) - starts[block_of] + 1  # 1 … size inside the block
    cum_err = before[block_of] + within * (block_sum / block_size)[block_of]
    kept = np.arange(1, n + 1)
    return kept / n, cum_err / kept


def aurc(scores: object, errors: object) -> float:
    """Area under the risk–coverage curve, (1/n) Σ_i risk(i) (lower is better; see ``risk_coverage``)."""
    _, risk = risk_coverage(scores, errors)
    return float(risk.mean())


def spearman(x: object, y: object) -> float:
    """Spearman's rank correlation (average ranks for ties) of two [n] arrays, n ≥ 2, neither constant."""
    a, b = _pair(("x", "y"), x, y)
    if a.size < 2:
        raise ValueError(f"x: expected at least 2 values, got {a.size}")
    for name, arr in (("x", a), ("y", b)):
        if np.all(arr == arr[0]):
            raise ValueError(
                f"{name}: expected values that vary (a constant has no rank correlation), got all {arr[0]!r}"
            )
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))

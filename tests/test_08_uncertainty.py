"""Chapter 08 (uncertainty): metrics exact on hand-made cases and against brute force, the single-pass baselines,
the fused uncertainty-statistics kernel against torch (−inf entries, V not a multiple of the tile), and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nanokimi.testing import assert_close, randn
from nanokimi.uncertainty import (
    LogitScorer,
    Scorer,
    aurc,
    auroc,
    average_ranks,
    baseline_token_scores,
    reduce_over_tokens,
    risk_coverage,
    roc_curve,
    spearman,
    token_uncertainty,
    token_uncertainty_reference,
)

NEG_INF = float("-inf")


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float tensor made by torch.empty during the test starts as NaN (an unwritten row then fails)."""
    real_empty = torch.empty

    def make(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", make)


# --- metrics ------------------------------------------------------------------------------------------------------
def test_auroc_hand_made_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of the 4 (pos, neg) pairs ordered
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all ties count one half
    assert auroc([0.5, 0.5, 0.7], [0, 1, 1]) == 0.75  # (tie: ½) + (0.7 > 0.5: 1), over 2 pairs
    assert auroc([0.0, 1.0], [False, True]) == 1.0
    assert auroc([1.0, 0.0], [0, 1]) == 0.0
    assert auroc(torch.tensor([0.2, 0.9, 0.1]), torch.tensor([0, 1, 0])) == 1.0


def test_auroc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        labels = rng.integers(0, 2, size=40)
        pos, neg = scores[labels == 1], scores[labels == 0]
        pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert auroc(scores, labels) == pytest.approx(pairs.mean(), abs=1e-12)
        fpr, tpr = roc_curve(scores, labels)
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
        assert np.trapezoid(tpr, fpr) == pytest.approx(pairs.mean(), abs=1e-12)


def test_aurc_hand_made_cases():
    # most confident first: risks 0/1, 0/2, 1/3, 2/4
    assert aurc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4, abs=1e-15)
    assert aurc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4, abs=1e-15)
    assert aurc([0.3, 0.3], [1, 0]) == 0.5  # a tie: either order, expected risk ½ at both coverages
    coverage, risk = risk_coverage([0.2, 0.1, 0.3], [0, 0, 1])
    assert np.allclose(coverage, [1 / 3, 2 / 3, 1]) and np.allclose(risk, [0, 0, 1 / 3])


def test_aurc_ties_equal_the_average_over_orders():
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.9, 0.9])
    errors = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.3])  # losses need not be 0/1
    values = []
    for p in itertools.permutations(range(3)):
        for q in itertools.permutations(range(2)):
            order = np.r_[0, 1 + np.array(p), 4 + np.array(q)]
            kept = np.arange(1, 7)
            values.append(np.mean(np.cumsum(errors[order]) / kept))
    assert aurc(scores, errors) == pytest.approx(np.mean(values), abs=1e-14)


def test_spearman_and_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-14)
    assert average_ranks([10, 30, 20, 30]).tolist() == [1.0, 3.5, 2.0, 3.5]


def test_metrics_bad_input():
    with pytest.raises(ValueError, match=r"scores: expected at least one value, got an empty array \(empty evaluation"):
        auroc([], [])
    with pytest.raises(ValueError, match="labels: expected both classes, got 3 positives and 0 negatives"):
        auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match=r"labels: expected 0/1 or boolean values, got \[0.0, 2.0\]"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\) \(that of scores\), got \(2,\)"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="scores: expected finite values, got 1 NaN/inf"):
        aurc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="errors: expected non-negative losses"):
        aurc([0.1, 0.2], [0, -1])
    with pytest.raises(ValueError, match=r"scores: expected a 1-d array, got shape \(2, 2\)"):
        aurc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(TypeError, match="scores: expected numbers"):
        auroc(["a", "b"], [0, 1])
    with pytest.raises(ValueError, match="y: expected values that vary"):
        spearman([1, 2, 3], [5, 5, 5])
    with pytest.raises(ValueError, match="x: expected at least 2 values, got 1"):
        spearman([1], [2])


# --- baselines and the scorer interface ------------------------------------------------------------------------------
def test_baselines_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, NEG_INF]], dtype=torch.float64)
    assert_close(
        "msp", baseline_token_scores(logits, "msp"), torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64), 1e-15
    )
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    want_entropy = torch.tensor([math.log(2), h, 0.0], dtype=torch.float64)
    assert_close("entropy", baseline_token_scores(logits, "entropy"), want_entropy, 1e-15)
    want_energy = torch.tensor([-math.log(2), -math.log(4), 0.0], dtype=torch.float64)
    assert_close("energy", baseline_token_scores(logits, "energy"), want_energy, 1e-15)


def test_baseline_ranges_on_random_logits():
    n_vocab = 50
    logits = randn(200, n_vocab, seed=0) * torch.linspace(0.01, 10, 200)[:, None]
    msp = baseline_token_scores(logits, "msp")
    entropy = baseline_token_scores(logits, "entropy")
    assert float(msp.min()) >= 0 and float(msp.max()) <= 1 - 1 / n_vocab + 1e-6
    assert float(entropy.min()) >= 0 and float(entropy.max()) <= math.log(n_vocab) + 1e-5
    assert spearman(msp, entropy) > 0.9  # both fall as the logits sharpen


def test_reduce_over_tokens():
    scores = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(reduce_over_tokens(scores, mask, "mean"), torch.tensor([1.5, 2.0]))
    assert torch.equal(reduce_over_tokens(scores, mask, "max"), torch.tensor([2.0, 4.0]))
    assert torch.equal(reduce_over_tokens(scores, mask, "sum"), torch.tensor([3.0, 6.0]))
    assert torch.equal(reduce_over_tokens(scores, None, "max"), torch.tensor([9.0, 4.0]))
    with pytest.raises(ValueError, match="mask: expected at least one scored token per example, row 1 has none"):
        reduce_over_tokens(scores, torch.tensor([[True, False, False], [False, False, False]]))


def test_logit_scorer_interface(device):
    table = randn(10, 3, 7, seed=0, device=device)  # a "model": example index → [T, V] logits
    model = lambda idx: table[idx]
    mask = torch.tensor([[True, True, False]] * 4, device=device)
    idx = torch.tensor([0, 3, 5, 9], device=device)
    for kind in ("msp", "entropy", "energy"):
        scorer = LogitScorer(model, kind, reduce="mean")
        assert isinstance(scorer, Scorer) and scorer.name == kind and scorer.passes == 1
        got = scorer.score(idx, mask)
        want = baseline_token_scores(table[idx].double(), kind)[:, :2].mean(-1)
        assert got.shape == (4,)
        assert_close(kind, got, want, rtol_rel=1e-6)
        fused = LogitScorer(model, kind, backend="triton").score(idx, mask)
        assert_close(f"{kind} (triton)", fused, want, rtol_rel=1e-5)
    flat = LogitScorer(lambda idx: table[idx, 0], "entropy")
    assert flat.score(idx).shape == (4,)
    with pytest.raises(ValueError, match="mask: expected None for"):
        flat.score(idx, mask)
    with pytest.raises(ValueError, match=r"kind: expected one of \['msp', 'entropy', 'energy'\], got 'maxlogit'"):
        LogitScorer(model, "maxlogit")
    with pytest.raises(TypeError, match="logits_fn: expected a callable"):
        LogitScorer(table, "msp")


# --- the fused kernel -----------------------------------------------------------------------------------------------
def _compare(out, ref, rtol):
    """NaN where the reference is NaN (rows without a finite entry), assert_close elsewhere."""
    for name, o, r in zip(("max_prob", "entropy", "lse"), out, ref, strict=True):
        assert o.dtype == torch.float32 and o.shape == r.shape
        nan = torch.isnan(r.cpu())
        assert torch.equal(torch.isnan(o.cpu()), nan), f"{name}: NaN pattern differs"
        assert_close(name, o.cpu()[~nan], r.cpu()[~nan], rtol_rel=rtol)


@pytest.mark.parametrize("n_rows,n_vocab", [(1, 1), (7, 5), (33, 64), (5, 100), (9, 257)])
def test_token_uncertainty_matches_torch(n_rows, n_vocab, device, poison_empty):
    logits = randn(n_rows, n_vocab, seed=n_vocab, dtype=torch.float64) * 4
    _compare(token_uncertainty(logits.float().to(device)), token_uncertainty_reference(logits), rtol=1e-5)


def test_token_uncertainty_with_neg_inf_entries(device, poison_empty):
    logits = randn(6, 100, seed=1, dtype=torch.float64) * 3
    logits[0, :70] = NEG_INF  # the first tiles of the row see only −inf
    logits[1, 30:] = NEG_INF
    logits[2] = NEG_INF  # no finite entry: lse −inf, NaN max-prob/entropy (as torch)
    logits[3, ::2] = NEG_INF
    logits[4, :99] = NEG_INF  # one live entry: max-prob 1, entropy 0
    out = token_uncertainty(logits.float().to(device))
    ref = token_uncertainty_reference(logits)
    _compare(out, ref, rtol=1e-5)
    assert out[2][2] == NEG_INF and out[0][4] == 1.0 and out[1][4] == 0.0


def test_token_uncertainty_leading_dims_and_strides(device):
    logits = randn(2, 3, 40, seed=2, device=device)
    out = token_uncertainty(logits)
    assert all(o.shape == (2, 3) for o in out)
    _compare(out, token_uncertainty_reference(logits.double()), rtol=1e-5)
    rows = randn(8, 50, seed=3, device=device)[::2]  # row stride 100
    _compare(token_uncertainty(rows), token_uncertainty_reference(rows.double()), rtol=1e-5)
    cols = randn(50, 8, seed=4, device=device).t()  # last-dim stride 8: copied to contiguous
    _compare(token_uncertainty(cols), token_uncertainty_reference(cols.double()), rtol=1e-5)
    assert all(o.shape == (0,) for o in token_uncertainty(torch.zeros(0, 7, device=device)))


def test_token_uncertainty_bad_input(device):
    with pytest.raises(TypeError, match=r"logits: expected dtype in \(float32, bfloat16, float16\), got int64"):
        token_uncertainty(torch.zeros(2, 3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="logits: expected dtype in .*got float64"):
        token_uncertainty(torch.zeros(2, 3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"logits: expected shape \[\.\.\., V\] with V >= 1, got \(4, 0\)"):
        token_uncertainty(torch.zeros(4, 0, device=device))
    with pytest.raises(ValueError, match=r"logits: expected shape \[\.\.\., V\] with V >= 1, got \(\)"):
        token_uncertainty(torch.tensor(1.0, device=device))
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor, got list"):
        token_uncertainty([[0.0, 1.0]])


# --- GPU: compiled, bf16, the benchmark's vocabulary ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,n_vocab", [(64, 163_847), (1000, 32_768), (3, 4097)])
def test_token_uncertainty_gpu(dtype, n_rows, n_vocab, poison_empty):
    logits = (randn(n_rows, n_vocab, seed=0, device="cuda") * 4).to(dtype)
    logits[0, : n_vocab // 2] = NEG_INF
    logits[-1, 1:] = NEG_INF
    if n_rows > 2:
        logits[1] = NEG_INF
    # The reference reads the same rounded values in fp64, so only the kernel's fp32 arithmetic differs.
    _compare(token_uncertainty(logits), token_uncertainty_reference(logits.double()), rtol=1e-5)

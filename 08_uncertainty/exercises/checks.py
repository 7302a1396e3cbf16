"""Checks for the chapter 08 exercises: ``python -m nanokimi.grade 08_uncertainty [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter's reference (``nanokimi.uncertainty``: the metrics,
``CUPID``, ``token_uncertainty_reference``) or, where the chapter has none (Mahalanobis), with a direct loop in
fp64. A failure raises AssertionError naming the case, the element and the size of the error.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from nanokimi.grade import call_attempt as _call
from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.testing import check_attempt_close, kernel_device, poisoned_empty, randn
from nanokimi.uncertainty import CUPID, CUPIDOutputs, token_uncertainty_reference
from nanokimi.uncertainty import metrics as ref_metrics
from nanokimi.uncertainty.cupid import cupid_loss_terms

# A tiny TinyKimi with every part (KDA, MoBA, MoE, Block AttnRes): the frozen base of exercise 4's CUPID.
_TINY = {"d_model": 32, "n_heads": 2, "n_layers": 2, "pattern": "KM", "d_ff": 64, "moe_d_ff": 32, "first_k_dense": 1}


# --- helpers ---------------------------------------------------------------------------------------------------
def _float(name: str, got: object, want: float, tol: float, hint: str = "") -> None:
    """A Python number within ``tol`` of ``want``."""
    if isinstance(got, bool) or not isinstance(got, int | float | np.floating):
        raise AssertionError(f"{name}: expected a float, got {type(got).__name__}")
    if not abs(float(got) - want) <= tol:
        raise AssertionError(
            f"{name}: got {float(got)!r}, expected {want!r} (|diff| = {abs(float(got) - want):.3g}, limit {tol:g})"
            + (f"\n  hint: {hint}" if hint else "")
        )


def _array(name: str, got: object, want: np.ndarray, tol: float, hint: str = "") -> None:
    """A NumPy array of ``want``'s shape, every element within ``tol``; names the first bad index."""
    if not isinstance(got, np.ndarray):
        raise AssertionError(f"{name}: expected a numpy array, got {type(got).__name__}")
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {want.shape}")
    diff = np.abs(got.astype(np.float64) - want)
    bad = ~(diff <= tol)  # also catches NaN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {want.size} elements off; first at [{i}]: got {got[i]!r}, expected "
            f"{want[i]!r} (limit {tol:g})" + (f"\n  hint: {hint}" if hint else "")
        )


def _tuple(case: str, got: object, n: int, what: str) -> tuple:
    if not (isinstance(got, tuple) and len(got) == n):
        raise AssertionError(f"[{case}] expected a tuple {what}, got {type(got).__name__}")
    return got


def _tied_scores(n: int, levels: int, seed: int) -> np.ndarray:
    """``n`` scores drawn from ``levels`` distinct values: many ties."""
    return np.random.default_rng(seed).integers(0, levels, n).astype(np.float64) / levels


# --- exercise 1 ------------------------------------------------------------------------------------------------
def _pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The definition: the double sum over (positive, negative) pairs, ties ½."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def check_ex1_auroc(m) -> None:
    rng = np.random.default_rng(0)
    rank_cases = [
        ("the docstring's example", np.array([0.3, 0.1, 0.3, 0.2])),
        ("one value", np.array([5.0])),
        ("all equal (n=6)", np.full(6, 0.25)),
        ("distinct, n=50", rng.normal(size=50)),
        ("many ties, n=200", _tied_scores(200, 7, seed=1)),
    ]
    for case, values in rank_cases:
        _array(
            f"average_ranks [{case}]",
            _call(m.average_ranks, values.copy()),
            ref_metrics.average_ranks(values),
            1e-12,
            hint="1-based ranks; a tied block spanning ranks a … b gets (a + b) / 2 for each member",
        )

    auroc_cases = [
        ("perfect: positives above", np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])),
        ("reversed: positives below", np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])),
        ("all scores tied", np.full(5, 0.3), np.array([1, 0, 0, 1, 0])),
        ("one positive, one negative, tied", np.array([0.5, 0.5]), np.array([1, 0])),
        ("bool labels, n=300", rng.normal(size=300), rng.random(300) < 0.3),
        ("float labels with ties, n=400", _tied_scores(400, 5, seed=2), (rng.random(400) < 0.5).astype(float)),
        ("one positive among 99", rng.normal(size=100), np.eye(1, 100, 37)[0]),
        ("n=3000, few ties", np.round(rng.normal(size=3000), 2), rng.random(3000) < 0.1),
    ]
    for case, scores, labels in auroc_cases:
        want = ref_metrics.auroc(scores, labels)
        if abs(want - _pairwise_auroc(scores, labels.astype(np.float64))) > 1e-12:
            raise RuntimeError(f"checks.py: the reference AUROC disagrees with the double sum on {case}")
        _float(
            f"auroc [{case}]",
            _call(m.auroc, scores.copy(), labels.copy()),
            want,
            1e-12,
            hint="U = Σ over positives of their average rank − n₊(n₊+1)/2; AUROC = U/(n₊n₋); a tie counts ½",
        )

    for case, labels in (("all positive", np.ones(4)), ("all negative", np.zeros(4, dtype=int))):
        try:
            _call(m.auroc, np.arange(4.0), labels)
        except ValueError as err:
            if "labels" not in str(err):
                raise AssertionError(f"auroc [{case}]: the ValueError should name 'labels', got: {err}") from None
        else:
            raise AssertionError(f"auroc [{case}]: expected ValueError (AUROC needs both classes), got a value")


# --- exercise 2 ------------------------------------------------------------------------------------------------
def _risk_over_orders(scores: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """The expectation over every order of the tied blocks, by enumerating the permutations (tiny n only)."""
    total = np.zeros(scores.size)
    perms = list(itertools.permutations(range(scores.size)))
    count = 0
    for perm in perms:
        order = np.array(perm)
        if np.all(np.diff(scores[order]) >= 0):  # a valid ascending order: only tied blocks reshuffle
            total += np.cumsum(errors[order]) / np.arange(1, scores.size + 1)
            count += 1
    return total / count


def _check_risk(case: str, m, scores: np.ndarray, errors: np.ndarray, want_risk: np.ndarray | None = None) -> None:
    want_cov, ref_risk = ref_metrics.risk_coverage(scores, errors)
    if want_risk is not None and not np.allclose(ref_risk, want_risk, rtol=0, atol=1e-14):
        raise RuntimeError(f"checks.py: the reference risk disagrees with the expected one on {case}")
    got = _tuple(case, _call(m.risk_coverage, scores.copy(), errors.copy()), 2, "(coverage, risk)")
    _array(f"coverage [{case}]", got[0], want_cov, 1e-14, hint="coverage i/n for i = 1 … n")
    _array(
        f"risk [{case}]",
        got[1],
        ref_risk,
        1e-12,
        hint="sort by ascending score; inside a tied block of size b with error sum S the cumulative error "
        "grows by S/b per example (the average over the block's orders)",
    )
    _float(f"aurc [{case}]", _call(m.aurc, scores.copy(), errors.copy()), ref_metrics.aurc(scores, errors), 1e-12)


def check_ex2_risk_coverage(m) -> None:
    rng = np.random.default_rng(0)
    _check_risk(
        "the docstring's example", m, np.array([0.2, 0.1, 0.2]), np.array([1.0, 0, 0]), np.array([0, 0.25, 1 / 3])
    )
    _check_risk("no ties", m, np.array([0.3, 0.1, 0.2]), np.array([0.0, 0, 1]), np.array([0, 0.5, 1 / 3]))
    _check_risk("one example", m, np.array([0.7]), np.array([1.0]))
    _check_risk("all tied, n=5", m, np.full(5, 0.4), np.array([1.0, 0, 0, 1, 0]), np.full(5, 0.4))
    for i, n in enumerate((6, 7)):
        scores = _tied_scores(n, 3, seed=10 + i)
        errors = (rng.random(n) < 0.5).astype(np.float64)
        _check_risk(f"n={n}, three score levels (every tie order enumerated)", m, scores, errors,
                    _risk_over_orders(scores, errors))  # fmt: skip
    _check_risk("distinct scores, n=500", m, rng.normal(size=500), (rng.random(500) < 0.2).astype(np.float64))
    _check_risk("many ties, n=1000", m, _tied_scores(1000, 9, seed=3), (rng.random(1000) < 0.3).astype(np.float64))
    _check_risk("non-negative losses, n=300", m, _tied_scores(300, 20, seed=4), rng.exponential(size=300))


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _naive_mahalanobis(features, labels, queries, ridge):
    """Class by class, query by query, in fp64."""
    f, q = features.double(), queries.double()
    classes = sorted(set(labels.tolist()))
    means = torch.stack([f[labels == c].mean(0) for c in classes])  # [C, D]
    covariance = sum(torch.outer(x - means[classes.index(int(y))], x - means[classes.index(int(y))])
                     for x, y in zip(f, labels, strict=True)) / f.shape[0]  # fmt: skip
    precision = torch.linalg.inv(covariance + ridge * torch.eye(f.shape[1], dtype=torch.float64))
    scores = [min(float((x - mu) @ precision @ (x - mu)) for mu in means) for x in q]
    return torch.tensor(classes), means, precision, torch.tensor(scores, dtype=torch.float64)


def check_ex3_mahalanobis(m) -> None:
    cases = [  # (case, N, D, class ids to draw from, M, ridge, dtype, rtol)
        ("N=60 D=4 C=3 fp64", 60, 4, [0, 1, 2], 10, 1e-6, torch.float64, 1e-10),
        ("labels {3, 7, 42} (not 0 … C−1)", 50, 3, [42, 7, 3], 8, 1e-6, torch.float64, 1e-10),
        ("one class", 30, 5, [5], 6, 1e-6, torch.float64, 1e-10),
        ("D=1", 20, 1, [0, 1], 5, 1e-6, torch.float64, 1e-10),
        ("fewer features than dimensions: N=6 D=8, ridge 0.1", 6, 8, [0, 1], 4, 0.1, torch.float64, 1e-10),
        ("fp32, N=80 D=6 C=4, M=1", 80, 6, [0, 1, 2, 3], 1, 1e-4, torch.float32, 1e-4),
    ]
    for i, (case, n, d, ids, n_query, ridge, dtype, rtol) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        labels = torch.tensor(ids)[torch.randint(0, len(ids), (n,), generator=gen)]
        labels[: len(ids)] = torch.tensor(ids)  # every class appears at least once
        centres = 3.0 * randn(max(ids) + 1, d, seed=100 + i, dtype=torch.float64)
        scale = torch.eye(d, dtype=torch.float64) + 0.3 * randn(d, d, seed=200 + i, dtype=torch.float64)  # correlated
        features = (centres[labels] + randn(n, d, seed=300 + i, dtype=torch.float64) @ scale).to(dtype)
        queries = (2.0 * randn(n_query, d, seed=400 + i, dtype=torch.float64)).to(dtype)
        classes, means, precision, scores = _naive_mahalanobis(features, labels, queries, ridge)

        got = _tuple(case, _call(m.fit_mahalanobis, features.clone(), labels.clone(), ridge), 3,
                     "(classes, means, precision)")  # fmt: skip
        got_classes, got_means, got_precision = got
        if not isinstance(got_classes, torch.Tensor) or not torch.equal(got_classes.cpu().long(), classes):
            got_list = got_classes.tolist() if isinstance(got_classes, torch.Tensor) else got_classes
            raise AssertionError(f"[{case}] classes: got {got_list}, expected {classes.tolist()} (sorted, distinct)")
        check_attempt_close(f"means [{case}] (index = class, dim)", got_means, means.to(dtype), rtol,
                hint="means[c] is the mean of the features whose label is classes[c]")  # fmt: skip
        check_attempt_close(f"precision [{case}]", got_precision, precision.to(dtype), rtol * 10,
                hint="Σ = (1/N) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ (within-class, divided by N) + ridge·I")  # fmt: skip
        # Score with the exact fit, so that a fitting error is not counted twice.
        got_scores = _call(m.mahalanobis_score, queries.clone(), means.to(dtype), precision.to(dtype))
        check_attempt_close(f"mahalanobis_score [{case}] (index = query)", got_scores, scores.to(dtype), rtol,
                hint="the smallest (f − μ_c)ᵀ P (f − μ_c) over the classes c")  # fmt: skip

    # It is a useful score: features far from every class cloud score higher (AUROC > 0.95).
    labels = torch.arange(4).repeat(50)
    features = 4.0 * randn(4, 8, seed=7, dtype=torch.float64)[labels] + randn(200, 8, seed=8, dtype=torch.float64)
    near = 4.0 * randn(4, 8, seed=7, dtype=torch.float64)[torch.arange(4).repeat(25)]
    near = near + randn(100, 8, seed=9, dtype=torch.float64)
    far = 12.0 * randn(100, 8, seed=10, dtype=torch.float64)
    _, means, precision = _call(m.fit_mahalanobis, features, labels, 1e-6)
    scores = _call(m.mahalanobis_score, torch.cat([near, far]), means, precision)
    area = ref_metrics.auroc(scores, np.r_[np.zeros(100), np.ones(100)])
    if area <= 0.95:
        raise AssertionError(f"mahalanobis [near vs far toy]: AUROC {area:.3f}, expected > 0.95")


# --- exercise 4 ------------------------------------------------------------------------------------------------
def _reference_loss(out: CUPIDOutputs, targets: torch.Tensor, mask: torch.Tensor, weights: tuple) -> torch.Tensor:
    """The loss ``CUPID.loss`` computes, on given plug-in outputs."""
    return cupid_loss_terms(out, targets, mask, *weights)[0]


def _check_loss(case: str, m, out: CUPIDOutputs, targets: torch.Tensor, mask: torch.Tensor, weights: tuple) -> None:
    """Value and the gradients with respect to ẑ, f̂ and s, against ``CUPID.loss``."""
    names = ("insert_logits", "reconstruction", "log_var")
    leaves = {k: getattr(out, k).detach().clone().requires_grad_(True) for k in names}
    want = _reference_loss(
        CUPIDOutputs(out.base_logits, leaves["insert_logits"], out.features, leaves["reconstruction"],
                     leaves["log_var"]), targets, mask, weights)  # fmt: skip
    want.backward()
    mine = {k: getattr(out, k).detach().clone().requires_grad_(True) for k in names}
    got = _call(m.cupid_loss, out.base_logits, mine["insert_logits"], out.features, mine["reconstruction"],
                mine["log_var"], targets, mask, *weights)  # fmt: skip
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"[{case}] cupid_loss: expected a 0-d tensor, got {shape}")
    check_attempt_close(f"cupid_loss [{case}]", got.detach().reshape(1), want.detach().reshape(1), 1e-5,
            hint="means over the masked tokens only (reduce over V or D first); the feature term enters with "
            "−λ_pert; hetero = ½(b·e^{−s} + s)")  # fmt: skip
    if got.grad_fn is None:
        raise AssertionError(f"[{case}] cupid_loss: the loss has no gradient (keep it differentiable)")
    got.backward()
    for k in names:
        if mine[k].grad is None:
            raise AssertionError(f"[{case}] d loss / d {k}: no gradient reached {k}")
        check_attempt_close(f"d loss / d {k} [{case}]", mine[k].grad, leaves[k].grad, 1e-5,
                hint="positions outside the mask must get zero gradient")  # fmt: skip


def _random_outputs(b: int, t: int, v: int, d: int, seed: int, logit_scale: float = 2.0) -> CUPIDOutputs:
    base = logit_scale * randn(b, t, v, seed=seed)
    return CUPIDOutputs(
        base_logits=base,
        insert_logits=base + 0.3 * randn(b, t, v, seed=seed + 1),
        features=randn(b, t, d, seed=seed + 2),
        reconstruction=randn(b, t, d, seed=seed + 3),
        log_var=2.0 * randn(b, t, seed=seed + 4),
    )


def check_ex4_cupid_loss(m) -> None:
    gen = torch.Generator().manual_seed(0)
    for i, (case, b, t, v, d, weights, mask_rate) in enumerate([
        ("B=3 T=7 V=11 D=6, default λ", 3, 7, 11, 6, (1.0, 0.01, 9e-3), 0.6),
        ("B=2 T=5 V=9 D=4, λ = (0.5, 0.3, 0.7)", 2, 5, 9, 4, (0.5, 0.3, 0.7), 0.5),
        ("one answer token", 2, 6, 7, 3, (1.0, 0.2, 0.5), None),
        ("every token scored", 1, 4, 5, 8, (1.0, 0.01, 9e-3), 1.0),
    ]):  # fmt: skip
        out = _random_outputs(b, t, v, d, seed=10 * i)
        targets = torch.randint(0, v, (b, t), generator=gen)
        if mask_rate is None:
            mask = torch.zeros(b, t, dtype=torch.bool)
            mask[1, 3] = True
        else:
            mask = torch.rand(b, t, generator=gen) < mask_rate
            mask[0, 0] = True
        # Junk where nothing is scored: it must not reach the loss or its gradients.
        junk = ~mask
        out.insert_logits[junk] = 300.0
        out.reconstruction[junk] = -500.0
        out.log_var[junk] = 40.0
        _check_loss(case, m, out, targets, mask, weights)

    # A real plug-in at layer 1 of a frozen tiny TinyKimi: its loss and its scores.
    torch.manual_seed(0)
    base = TinyKimi(TinyKimiConfig(**_TINY)).eval()
    cupid = CUPID(base, 1, hidden=16, seed=1)
    tokens = torch.randint(0, base.cfg.vocab_size, (3, 9), generator=gen)
    targets = torch.roll(tokens, -1, 1)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, 5:] = True
    with torch.no_grad():
        out = cupid.outputs(tokens)
        want_scores = cupid.token_scores(tokens)
    _check_loss("CUPID at layer 1 of a tiny TinyKimi", m, out, targets, mask, (1.0, 0.01, 9e-3))
    got = _tuple("scores", _call(m.cupid_token_scores, out.base_logits, out.insert_logits, out.log_var), 2,
                 "(aleatoric, epistemic)")  # fmt: skip
    check_attempt_close("aleatoric [CUPID at layer 1] (index = example, position)", got[0], want_scores["aleatoric"], 1e-6,
            hint="aleatoric = e^s per token")  # fmt: skip
    check_attempt_close("epistemic [CUPID at layer 1] (index = example, position)", got[1], want_scores["epistemic"], 1e-6,
            hint="epistemic = mean over v of |softmax(ẑ)_v − softmax(z)_v| (probabilities, not logits)")  # fmt: skip


# --- exercise 5 ------------------------------------------------------------------------------------------------
def _check_stats(case: str, m, logits: torch.Tensor, block_n: int, block_v: int) -> None:
    want = token_uncertainty_reference(logits.double())  # fp64 on the same (fp32 or bf16) values
    with poisoned_empty():
        got = _call(m.token_stats, logits, block_n, block_v)
    got = _tuple(case, got, 3, "(max_prob, entropy, lse)")
    hints = {
        "max_prob": "max-prob = 1/s with s = Σ e^{z − m} at the final max m",
        "entropy": "H = log s − u/s; when the max grows, u' = α(u + (m − m')·s) + Σ_tile e^{z−m'}(z − m')",
        "lse": "lse = m + log s; never exponentiate a raw logit",
    }
    for name, g, w in zip(("max_prob", "entropy", "lse"), got, want, strict=True):
        label = f"{name} [{case}] (index = row)"
        if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or tuple(g.shape) != tuple(w.shape):
            what = f"{g.dtype} {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise AssertionError(f"{label}: expected fp32 of shape {tuple(w.shape)}, got {what}")
        g = g.cpu()
        nan_want, nan_got = torch.isnan(w), torch.isnan(g)
        if not torch.equal(nan_want, nan_got):
            row = int((nan_want != nan_got).nonzero()[0])
            raise AssertionError(
                f"{label}: row {row} is {g[row].item()}, expected {w[row].item()} (NaN exactly for the rows "
                "whose logits are all −inf, and nowhere else)\n  hint: the outputs start as NaN, so a row the "
                "grid does not cover stays NaN (cdiv the rows); otherwise shift by 0 while the max is still −inf "
                "and clamp z − m so that a −inf entry adds 0·(finite) to u"
            )
        check_attempt_close(label, g[~nan_want].double(), w[~nan_want], 1e-5, hint=hints[name])


def check_ex5_triton_token_stats(m) -> None:
    dev = kernel_device()
    masked = randn(6, 40, seed=3)
    masked[0, :20] = float("-inf")  # the first tiles of row 0 hold only −inf
    masked[1, ::3] = float("-inf")
    masked[2, :] = float("-inf")  # nothing left: NaN, NaN, −inf
    masked[3, 1:] = float("-inf")  # one finite entry: max-prob 1, entropy 0
    masked[4, 39] = float("-inf")  # the last column, in the tail tile
    wide = randn(5, 64, seed=5)
    cases = [  # (case, logits, block_n, block_v)
        ("fp32 N=6 V=50, tiles of 16 (tail of 2)", randn(6, 50, seed=1), 4, 16),
        ("N=1 V=1", randn(1, 1, seed=2), 4, 16),
        ("N=7 V=37: row and column tails", 3.0 * randn(7, 37, seed=4), 4, 16),
        ("−inf entries: leading tiles, every third, a whole row, all but one", masked, 2, 8),
        ("offset +1e4 (exp of a raw logit overflows)", 1e4 + 3.0 * randn(5, 33, seed=6), 4, 16),
        ("peaked rows (scale 30)", 30.0 * randn(5, 33, seed=7), 4, 16),
        ("bf16 logits N=5 V=70", (2.0 * randn(5, 70, seed=8)).bfloat16(), 4, 32),
        ("a column slice of a wider tensor (row stride 64, V=45)", wide[:, :45], 4, 16),
    ]
    for case, logits, block_n, block_v in cases:
        _check_stats(case, m, logits.to(dev), block_n, block_v)

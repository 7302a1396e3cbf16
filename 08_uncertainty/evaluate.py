"""Chapter 08's evaluations of every scorer on trained TinyKimis (JSON + PNG).

    python -m nanokimi.uncertainty.evaluate --base runs/u08/add400_s0/ckpt.pt \\
        --ensemble runs/u08/add400_s1/ckpt.pt runs/u08/add400_s3/ckpt.pt --noisy runs/u08/noise800_s0/ckpt.pt \\
        --seed 1 --out 08_uncertainty/results/eval

What is measured (higher score = more uncertain everywhere):

1. **Error detection.** The base model answers held-out in-distribution test problems greedily; a wrong answer
   (the task's verifier) is a positive. AUROC and AURC of each score.
2. **OOD detection.** The same model answers the task's out-of-distribution variant (``task.ood()``: more digits,
   longer inputs) and an unseen task; in-distribution test problems are the negatives. AUROC per score and set.
3. **Aleatoric vs epistemic** (``--noisy``): a model trained on addition whose units digit is corrupted with a known,
   input-dependent rate r(a) (``make_task("add", label_noise=...)``); Spearman's ρ of each score with r on test
   problems. An aleatoric score should track r; an epistemic one should not.
4. **Cost.** Base-model passes per example, matmul FLOPs per example (``torch.utils.flop_counter``), wall time on
   this machine, extra parameters.

Every score is computed on the text the model produced: ``<bos> prompt response`` with the response positions as
the answer mask, which is what a deployed model has (no reference answer). The plug-ins (CUPID at every site of
the layer sweep, DRUE) train on teacher-forced training problems of the base task.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanokimi.checks import check_positive_int
from nanokimi.data import TOKENIZER, Batch, Example, Task, collate, make_task, prompt_ids
from nanokimi.model import TinyKimi
from nanokimi.train import load_model
from nanokimi.uncertainty.baselines import EnsembleScorer, MCDropoutScorer, model_logits_fn
from nanokimi.uncertainty.cupid import CUPID
from nanokimi.uncertainty.drue import DRUE
from nanokimi.uncertainty.metrics import aurc, auroc, roc_curve, spearman
from nanokimi.uncertainty.scores import BASELINES, LogitScorer, Scorer
from nanokimi.uncertainty.sites import check_base_model

__all__ = [
    "EvalSet",
    "answer_set",
    "score_set",
    "task_batches",
    "reliability",
    "thin_curve",
    "auroc_difference_ci",
    "cost_row",
    "build_scorers",
    "evaluate_task",
    "evaluate_noise",
    "plot_task",
    "plot_noise",
    "main",
]

SINGLE_PASS = BASELINES  # msp, entropy, energy: the baselines CUPID's target is set against


@dataclass
class EvalSet:
    """Answers of a model to one set of problems: ``inputs`` [N, T] (<bos> prompt response), ``mask`` [N, T] (the
    positions that predict response tokens and <eos>), ``errors`` [N] (1 = wrong; None when there is no verifier)
    and ``noise_rate`` [N] (None unless the task has label noise)."""

    name: str
    inputs: torch.Tensor
    mask: torch.Tensor
    errors: np.ndarray | None
    noise_rate: np.ndarray | None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def answer_set(
    model: TinyKimi,
    examples: Sequence[Example],
    name: str,
    *,
    task: Task | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> EvalSet:
    """Greedy answers of ``model`` to the prompts of ``examples``; ``task`` (the prompts' own task) verifies them."""
    check_base_model(model, "model")
    if len(examples) == 0:
        raise ValueError(f"examples: expected at least one example for set {name!r}, got an empty evaluation set")
    check_positive_int("max_new_tokens", max_new_tokens)
    answered = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        responses = model.generate(prompt_ids(chunk), max_new_tokens, temperature=0.0)
        answered += [
            Example(ex.prompt, TOKENIZER.decode(r), None, ex.meta) for ex, r in zip(chunk, responses, strict=True)
        ]
    batch = collate(answered)
    errors = None
    if task is not None:
        errors = np.array([0.0 if task.check(ex.prompt, ex.response) else 1.0 for ex in answered])
    noise = None
    if task is not None and getattr(task, "label_noise", 0.0) > 0:
        noise = np.array([task.noise_rate(ex.prompt) for ex in answered])
    return EvalSet(name, batch.inputs, batch.loss_mask, errors, noise)


def score_set(scorer: Scorer, data: EvalSet, batch_size: int = 256) -> np.ndarray:
    """``scorer``'s scores [N] (float64) on every answer of ``data``, in chunks of ``batch_size``."""
    if len(data) == 0:
        raise ValueError(f"data: set {data.name!r} is empty")
    out = [
        scorer.score(data.inputs[s : s + batch_size], data.mask[s : s + batch_size]).double().cpu()
        for s in range(0, len(data), batch_size)
    ]
    return torch.cat(out).numpy()


def task_batches(task: Task, steps: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """``steps`` teacher-forced training batches of ``task`` (seeds disjoint from the trainer's (seed, step))."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    return [
        collate(task.examples("train", batch_size, seed=[seed, 1_000_000 + step], distinct=False))
        for step in range(steps)
    ]


def reliability(confidence: object, correct: object, n_bins: int = 10) -> dict:
    """Reliability diagram over ``n_bins`` equal-width confidence bins: per bin the mean confidence, the accuracy
    and the count, and the expected calibration error ECE = Σ_b (n_b/n) |acc_b − conf_b|."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.size == 0 or conf.shape != ok.shape:
        raise ValueError(
            f"confidence: expected a non-empty 1-d array shaped like correct, got {conf.shape}, {ok.shape}"
        )
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence: expected probabilities in [0, 1]")
    check_positive_int("n_bins", n_bins)
    which = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(which, weights=ok, minlength=n_bins)
    filled = counts > 0
    mean_conf = np.where(filled, conf_sum / np.maximum(counts, 1), np.nan)
    accuracy = np.where(filled, acc_sum / np.maximum(counts, 1), np.nan)
    ece = float(np.sum(counts[filled] / conf.size * np.abs(accuracy[filled] - mean_conf[filled])))
    return {
        "edges": np.linspace(0, 1, n_bins + 1).tolist(),
        "confidence": [None if math.isnan(v) else v for v in mean_conf.tolist()],
        "accuracy": [None if math.isnan(v) else v for v in accuracy.tolist()],
        "count": counts.tolist(),
        "ece": ece,
    }


def answer_confidence(model: TinyKimi, data: EvalSet, batch_size: int = 256) -> np.ndarray:
    """Probability of each greedy answer under the model, Π_t max_v p_t (greedy picks the argmax), [N]."""
    logits_fn = model_logits_fn(model)
    out = []
    for s in range(0, len(data), batch_size):
        logp_max = logits_fn(data.inputs[s : s + batch_size]).float().log_softmax(-1).amax(-1)  # [b, T]
        out.append((logp_max * data.mask[s : s + batch_size]).sum(-1).exp())
    return torch.cat(out).double().numpy()


def _sweep_sites(n_layers: int, layers, cupid_layer: int) -> list[int]:
    """The CUPID sites of a layer sweep: ``layers`` (default all, 0 … n_layers), plus the main comparison's site."""
    sites = list(range(n_layers + 1)) if layers is None else list(layers)
    return sites if cupid_layer in sites else [*sites, cupid_layer]


def auroc_difference_ci(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of AUROC(a) − AUROC(b) over a paired bootstrap of the examples, stratified by label
    (the same resampled examples score both a and b, so their correlation is kept)."""
    check_positive_int("n_boot", n_boot)
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"labels: expected both classes, got {pos.size} positives and {neg.size} negatives")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        diffs[i] = auroc(scores_a[idx], labels[idx]) - auroc(scores_b[idx], labels[idx])
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = 41) -> tuple[list[float], list[float]]:
    """At most ``max_points`` points of a monotone curve (for small JSON files), ends kept."""
    keep = np.unique(np.round(np.linspace(0, len(x) - 1, min(max_points, len(x)))).astype(int))
    return [round(float(v), 4) for v in x[keep]], [round(float(v), 4) for v in y[keep]]


def cost_row(scorer: Scorer, data: EvalSet, extra_params: int, n: int = 64, repeats: int = 3) -> dict:
    """Passes, matmul FLOPs and wall time per example of ``scorer`` on the first ``n`` answers of ``data``."""
    inputs, mask = data.inputs[:n], data.mask[:n]
    with FlopCounterMode(display=False) as counter:
        scorer.score(inputs, mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(inputs, mask)
        times.append(time.perf_counter() - start)
    return {
        "score": scorer.name,
        "passes": scorer.passes,
        "mflops_per_example": counter.get_total_flops() / inputs.shape[0] / 1e6,
        "ms_per_example": min(times) / inputs.shape[0] * 1e3,
        "extra_params": int(extra_params),
    }


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _auroc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC, or None when one class is missing (e.g. a model that gets every answer right)."""
    return auroc(scores, labels) if 0 < labels.sum() < labels.size else None


def build_scorers(
    base: TinyKimi,
    ensemble: Sequence[TinyKimi],
    cupid: CUPID,
    drue: DRUE | None,
    *,
    mc_passes: int = 8,
    mc_p: float = 0.1,
) -> tuple[list[Scorer], dict[str, int]]:
    """Every scorer of the comparison, and the extra parameters each needs beyond the base model."""
    logits_fn = model_logits_fn(base)
    scorers: list[Scorer] = [LogitScorer(logits_fn, kind) for kind in SINGLE_PASS]
    scorers += [MCDropoutScorer(base, mc_p, mc_passes, kind) for kind in ("entropy", "mutual_info")]
    extra = {s.name: 0 for s in scorers}
    if ensemble:
        members = [base, *ensemble]
        for kind in ("entropy", "mutual_info"):
            scorers.append(EnsembleScorer(members, kind))
            extra[scorers[-1].name] = sum(m.num_parameters() for m in ensemble)
    for kind in ("aleatoric", "epistemic"):
        scorers.append(cupid.scorer(kind))
        extra[scorers[-1].name] = _params(cupid)
    if drue is not None:
        scorers.append(drue.scorer())
        extra["drue"] = _params(drue)
    return scorers, extra


def _fit_cupid(base, task, layer, args) -> tuple[CUPID, dict]:
    cupid = CUPID(base, layer, hidden=args["hidden"], seed=args["seed"])
    start = time.perf_counter()
    history = cupid.fit(task_batches(task, args["fit_steps"], args["fit_batch"], args["seed"]), lr=args["lr"])
    tail = history[-10:]
    summary = {k: float(np.mean([h[k] for h in tail])) for k in tail[0]}
    return cupid, summary | {"fit_s": time.perf_counter() - start, "params": _params(cupid)}


def evaluate_task(
    base: TinyKimi,
    task: Task,
    *,
    ensemble: Sequence[TinyKimi] = (),
    unseen: Task | None = None,
    layers: Sequence[int] | None = None,
    cupid_layer: int = 1,
    drue_layers: tuple[int, int] | None = (0, None),
    n_examples: int = 500,
    fit_steps: int = 300,
    fit_batch: int = 32,
    hidden: int = 128,
    lr: float = 3e-3,
    mc_passes: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluations 1, 2 and 4 for one base model and its task; the result dict is what ``<name>.json`` holds.

    ``layers``: CUPID sites of the layer sweep (default all, 0 … n_layers); ``cupid_layer``: the site whose scores
    enter the main comparison (default 1, layer 1's FFN output: the site an exploratory sweep on another draw of
    the test problems favoured; the sweep reports every site); ``drue_layers``: DRUE's two sites (None as the
    second entry = n_layers; ``drue_layers=None`` skips DRUE).
    """
    check_base_model(base)
    n_layers = base.cfg.n_layers
    layers = _sweep_sites(n_layers, layers, cupid_layer)
    say = print if progress else (lambda *a, **k: None)
    fit_args = {"hidden": hidden, "fit_steps": fit_steps, "fit_batch": fit_batch, "lr": lr, "seed": seed}

    ood_task = task.ood()
    unseen = unseen if unseen is not None else make_task("reverse", length=6)
    max_new = max(t.max_response_len() for t in (task, ood_task, unseen)) + 1
    t0 = time.perf_counter()
    id_set = answer_set(base, task.examples("test", n_examples, seed=seed), "id", task=task, max_new_tokens=max_new)
    ood_sets = [
        answer_set(
            base,
            ood_task.examples("test", n_examples, seed=seed),
            f"ood: {task.name} {_describe(ood_task)}",
            max_new_tokens=max_new,
        ),
        answer_set(
            base,
            unseen.examples("test", n_examples, seed=seed),
            f"unseen: {unseen.name} {_describe(unseen)}",
            max_new_tokens=max_new,
        ),
    ]
    say(f"answered {len(id_set)} id + {sum(len(s) for s in ood_sets)} ood problems in {time.perf_counter() - t0:.1f} s")
    accuracy = 1.0 - float(id_set.errors.mean())
    ood_labels = {s.name: np.r_[np.zeros(len(id_set)), np.ones(len(s))] for s in ood_sets}  # 0 = id, 1 = ood

    sweep, fits, cupids = {}, {}, {}
    for layer in layers:
        cupid, fit = _fit_cupid(base, task, layer, fit_args)
        cupids[layer], fits[str(layer)] = cupid, fit
        say(f"CUPID at site {layer}: fit {fit['fit_s']:.1f} s, output L1 {fit['output_l1']:.4f}")
        row = {}
        for kind in ("aleatoric", "epistemic"):
            scorer = cupid.scorer(kind)
            id_scores = score_set(scorer, id_set)
            row[kind] = {
                "error_auroc": _auroc_or_none(id_scores, id_set.errors),
                **{s.name: auroc(np.r_[id_scores, score_set(scorer, s)], ood_labels[s.name]) for s in ood_sets},
            }
        sweep[str(layer)] = row

    drue = None
    if drue_layers is not None:
        first, second = drue_layers
        drue = DRUE(base, (first, n_layers if second is None else second), hidden=hidden, seed=seed)
        start = time.perf_counter()
        history = drue.fit(task_batches(task, fit_steps, fit_batch, seed), lr=lr)
        fits["drue"] = {
            "loss": float(np.mean([h["loss"] for h in history[-10:]])),
            "fit_s": time.perf_counter() - start,
        }
        say(f"DRUE at sites {drue.layers}: fit {fits['drue']['fit_s']:.1f} s")

    scorers, extra = build_scorers(base, ensemble, cupids[cupid_layer], drue, mc_passes=mc_passes)
    errors, ood, roc, costs = {}, {s.name: {} for s in ood_sets}, {"error": {}}, []
    roc |= {s.name: {} for s in ood_sets}
    ood_scores: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in ood_sets}  # set → score → [N_id + N_ood]
    for scorer in scorers:
        start = time.perf_counter()
        id_scores = score_set(scorer, id_set)
        if 0 < id_set.errors.sum() < len(id_set):
            errors[scorer.name] = {"auroc": auroc(id_scores, id_set.errors), "aurc": aurc(id_scores, id_set.errors)}
            roc["error"][scorer.name] = thin_curve(*roc_curve(id_scores, id_set.errors))
        for s in ood_sets:
            scores = np.r_[id_scores, score_set(scorer, s)]
            labels = ood_labels[s.name]
            ood[s.name][scorer.name] = auroc(scores, labels)
            ood_scores[s.name][scorer.name] = scores
            roc[s.name][scorer.name] = thin_curve(*roc_curve(scores, labels))
        costs.append(cost_row(scorer, id_set, extra[scorer.name]))
        say(
            f"{scorer.name:<24} {time.perf_counter() - start:6.1f} s  "
            + "  ".join(f"{ood[s.name][scorer.name]:.3f}" for s in ood_sets)
        )

    target = {}
    for s in ood_sets:
        best = max(SINGLE_PASS, key=lambda k: ood[s.name][k])
        cupid_e = ood[s.name]["cupid_epistemic"]
        low, high = auroc_difference_ci(
            ood_scores[s.name]["cupid_epistemic"], ood_scores[s.name][best], ood_labels[s.name]
        )
        target[s.name] = {
            "cupid_epistemic": cupid_e,
            "best_single_pass": best,
            "best_single_pass_auroc": ood[s.name][best],
            "met": cupid_e >= ood[s.name][best],
            "difference_ci95": [low, high],
        }
    return {
        "task": task.spec(),
        "ood_sets": [s.name for s in ood_sets],
        "n": {"id": len(id_set), **{s.name: len(s) for s in ood_sets}},
        "accuracy": accuracy,
        "cupid_layer": cupid_layer,
        "drue_layers": list(drue.layers) if drue is not None else None,
        "error_detection": errors,
        "ood_auroc": ood,
        "target": target,
        "layer_sweep": sweep,
        "fits": fits,
        "cost": costs,
        "roc": roc,
        "reliability": reliability(answer_confidence(base, id_set), 1.0 - id_set.errors),
        "settings": {"n_examples": n_examples, "mc_passes": mc_passes, "mc_p": 0.1, "ensemble_size": 1 + len(ensemble)}
        | fit_args,
    }


def evaluate_noise(
    model: TinyKimi,
    task: Task,
    *,
    layers: Sequence[int] | None = None,
    cupid_layer: int = 1,
    drue_layers: tuple[int, int] = (0, None),
    n_examples: int = 500,
    fit_steps: int = 300,
    fit_batch: int = 32,
    hidden: int = 128,
    lr: float = 3e-3,
    mc_passes: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluation 3: Spearman's ρ between each score and the known label-noise rate, on test problems of ``task``
    (addition with ``label_noise`` > 0) answered by ``model`` (trained on that noisy data). CUPID and DRUE are fitted
    on the same noisy training data; CUPID at every site of ``layers`` (default all) for the layer sweep, the one at
    ``cupid_layer`` entering the main comparison."""
    check_base_model(model)
    if getattr(task, "label_noise", 0.0) <= 0:
        raise ValueError(f"task: expected addition with label_noise > 0, got {task.spec()}")
    say = print if progress else (lambda *a, **k: None)
    n_layers = model.cfg.n_layers
    fit_args = {"hidden": hidden, "fit_steps": fit_steps, "fit_batch": fit_batch, "lr": lr, "seed": seed}
    data = answer_set(
        model,
        task.examples("test", n_examples, seed=seed),
        "noisy",
        task=task,
        max_new_tokens=task.max_response_len() + 1,
    )
    layers = _sweep_sites(n_layers, layers, cupid_layer)
    sweep, fits, cupids = {}, {}, {}
    for layer in layers:
        cupids[layer], fits[str(layer)] = _fit_cupid(model, task, layer, fit_args)
        sweep[str(layer)] = {
            kind: spearman(score_set(cupids[layer].scorer(kind), data), data.noise_rate)
            for kind in ("aleatoric", "epistemic")
        }
        say(f"CUPID at site {layer}: Spearman ρ " + "  ".join(f"{k} {v:+.3f}" for k, v in sweep[str(layer)].items()))
    drue = DRUE(
        model, (drue_layers[0], n_layers if drue_layers[1] is None else drue_layers[1]), hidden=hidden, seed=seed
    )
    drue.fit(task_batches(task, fit_steps, fit_batch, seed), lr=lr)
    scorers, _ = build_scorers(model, (), cupids[cupid_layer], drue, mc_passes=mc_passes)
    levels = np.unique(data.noise_rate)
    rho, by_level = {}, {}
    for scorer in scorers:
        scores = score_set(scorer, data)
        rho[scorer.name] = spearman(scores, data.noise_rate)
        by_level[scorer.name] = [float(scores[data.noise_rate == r].mean()) for r in levels]
        say(f"{scorer.name:<24} Spearman ρ with the noise rate {rho[scorer.name]:+.3f}")
    return {
        "task": task.spec(),
        "n": len(data),
        "accuracy": 1.0 - float(data.errors.mean()),
        "cupid_layer": cupid_layer,
        "fits": fits,
        "spearman": rho,
        "layer_sweep": sweep,
        "noise_levels": levels.tolist(),
        "mean_score_by_level": by_level,
        "settings": {"n_examples": n_examples, "mc_passes": mc_passes} | fit_args,
    }


def _describe(task: Task) -> str:
    spec = task.spec()
    knob = next(k for k in ("digits", "pairs", "length") if k in spec)
    return f"{knob}={spec[knob]}"


# --- figures -----------------------------------------------------------------------------------------------------
_STYLE = {
    "msp": ("tab:gray", ":"),
    "entropy": ("tab:brown", ":"),
    "energy": ("tab:olive", ":"),
    "mc_dropout_entropy": ("tab:cyan", "--"),
    "mc_dropout_mutual_info": ("tab:blue", "--"),
    "ensemble_entropy": ("tab:pink", "--"),
    "ensemble_mutual_info": ("tab:purple", "--"),
    "cupid_aleatoric": ("tab:orange", "-"),
    "cupid_epistemic": ("tab:red", "-"),
    "drue": ("tab:green", "-"),
}


def plot_task(result: dict, path: str | Path) -> None:
    """ROC curves (error detection, OOD variant), AUROC per OOD set, and the layer sweep, in one small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=60)
    panels = [("error", "error detection (id)")] + [(name, name) for name in result["ood_sets"][:1]]
    for ax, (key, title) in zip(axes[:2], panels, strict=False):
        for name, (fpr, tpr) in result["roc"][key].items():
            color, ls = _STYLE.get(name, ("k", "-"))
            ax.plot(fpr, tpr, ls, color=color, lw=1.2, label=name)
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        empty = " (no wrong answers)" if not result["roc"][key] else ""
        ax.set(title=f"ROC: {title}{empty}", xlabel="false-positive rate", ylabel="true-positive rate")
    if result["roc"]["error"]:  # empty when the model got every answer right (or wrong)
        axes[0].legend(fontsize=6.5, loc="lower right")
    names = list(result["ood_auroc"][result["ood_sets"][0]])
    width = 0.8 / len(result["ood_sets"])
    for k, set_name in enumerate(result["ood_sets"]):
        values = [result["ood_auroc"][set_name][n] for n in names]
        axes[2].barh(np.arange(len(names)) + k * width, values, height=width, label=set_name)
    axes[2].set_yticks(np.arange(len(names)) + width / 2, names, fontsize=7)
    axes[2].set(xlim=(0.4, 1.0), title="OOD AUROC", xlabel="AUROC")
    axes[2].legend(fontsize=6.5, loc="lower right")
    sites = sorted(result["layer_sweep"], key=int)
    for kind, marker in (("epistemic", "o"), ("aleatoric", "s")):
        for set_name, ls in zip(["error_auroc", *result["ood_sets"]], ["-", "--", ":"], strict=False):
            values = [result["layer_sweep"][s][kind][set_name] for s in sites]
            values = [np.nan if v is None else v for v in values]
            label = f"{kind}: {'error' if set_name == 'error_auroc' else set_name.split(':')[0]}"
            axes[3].plot(
                [int(s) for s in sites],
                values,
                ls,
                marker=marker,
                ms=4,
                label=label,
                color="tab:red" if kind == "epistemic" else "tab:orange",
            )
    axes[3].set(
        title="CUPID layer-wise sweep", xlabel=f"insertion site ({sites[-1]} = final hidden state)", ylabel="AUROC"
    )
    axes[3].set_xticks([int(s) for s in sites])
    axes[3].legend(fontsize=6.5)
    fig.suptitle(f"TinyKimi on {result['task']['name']} (id accuracy {result['accuracy']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_noise(result: dict, path: str | Path) -> None:
    """Mean score per noise level (each score scaled to [0, 1] over the levels), with Spearman's ρ in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=70)
    levels = result["noise_levels"]
    for name, values in result["mean_score_by_level"].items():
        v = np.asarray(values)
        span = v.max() - v.min()
        color, ls = _STYLE.get(name, ("k", "-"))
        ax.plot(
            levels,
            (v - v.min()) / span if span > 0 else v * 0,
            ls,
            marker="o",
            ms=3,
            color=color,
            label=f"{name} (ρ = {result['spearman'][name]:+.2f})",
        )
    ax.set(
        xlabel="label-noise rate r(a) of the prompt",
        ylabel="mean score (min–max scaled)",
        title="aleatoric vs epistemic on noisy addition",
    )
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanokimi.uncertainty.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="checkpoint of the base model (its task is the in-distribution task)")
    p.add_argument("--ensemble", nargs="*", default=[], help="checkpoints of the other ensemble members (same task)")
    p.add_argument("--noisy", help="checkpoint of a model trained on addition with label noise (evaluation 3)")
    p.add_argument("--unseen", default="reverse", help="the unseen task for OOD detection (default: reverse, length 6)")
    p.add_argument("--out", default="08_uncertainty/results/eval")
    p.add_argument("--name", help="file stem of the base evaluation (default: the task name)")
    p.add_argument("--layers", type=int, nargs="*", help="CUPID sites of the layer sweep (default all)")
    p.add_argument("--cupid-layer", type=int, default=1, help="the CUPID site of the main comparison (default 1)")
    p.add_argument("--drue-layers", type=int, nargs=2, help="DRUE's two sites (default 0 and n_layers)")
    p.add_argument("--n", type=int, default=500, help="problems per evaluation set")
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--fit-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mc-passes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p


def load_for_evaluation(path: str | Path) -> tuple[TinyKimi, Task]:
    """A checkpoint's model (CPU, eval mode, reference backends) and task: the evaluation runs on the CPU.

    The reference backends compute the same functions as the Triton ones; a model trained with ``--backend triton``
    on a GPU must not keep them here, because on a machine with CUDA the compiled kernels refuse CPU tensors.
    """
    return load_model(path, device="cpu", backend="reference")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.base is None and args.noisy is None:
        print("error: nothing to evaluate: pass --base and/or --noisy", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "n_examples": args.n,
        "fit_steps": args.fit_steps,
        "fit_batch": args.fit_batch,
        "hidden": args.hidden,
        "lr": args.lr,
        "mc_passes": args.mc_passes,
        "seed": args.seed,
    }
    machine = {"torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    if args.base is not None:
        base, task = load_for_evaluation(args.base)
        ensemble = [load_for_evaluation(p)[0] for p in args.ensemble]
        unseen_knobs = {"length": 6} if args.unseen in ("copy", "reverse") else {}
        result = evaluate_task(
            base,
            task,
            ensemble=ensemble,
            unseen=make_task(args.unseen, **unseen_knobs),
            layers=args.layers,
            cupid_layer=args.cupid_layer,
            drue_layers=tuple(args.drue_layers) if args.drue_layers else (0, None),
            **common,
        )
        result |= {"checkpoints": {"base": args.base, "ensemble": args.ensemble}, "machine": machine}
        stem = args.name or task.name
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_task(result, out / f"{stem}.png")
        print(f"wrote {out / stem}.json and .png")
    if args.noisy is not None:
        model, task = load_for_evaluation(args.noisy)
        result = evaluate_noise(model, task, layers=args.layers, cupid_layer=args.cupid_layer, **common)
        result |= {"checkpoint": args.noisy, "machine": machine}
        (out / "noise.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_noise(result, out / "noise.png")
        print(f"wrote {out}/noise.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

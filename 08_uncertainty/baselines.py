"""Multi-pass baselines on a TinyKimi: MC dropout (Gal & Ghahramani, 2016) and deep ensembles (Lakshminarayanan
et al., 2017), behind the same ``Scorer`` interface as the single-pass logit baselines of ``scores.py``.

Both average K predictive distributions p⁽ᵏ⁾ ∈ Δ^V per answer token (K = N dropout masks, or M models):

    p̄ = (1/K) Σ_k p⁽ᵏ⁾
    total (predictive entropy)      H(p̄) = −Σ_v p̄_v log p̄_v
    expected data entropy           (1/K) Σ_k H(p⁽ᵏ⁾)
    epistemic (mutual information)  MI = H(p̄) − (1/K) Σ_k H(p⁽ᵏ⁾)  ≥ 0   (the members' disagreement)
    msp                             1 − max_v p̄_v

and reduce the per-token score over the answer by its mean. Cost: K forward passes per example.

MC dropout here is *post hoc*: TinyKimi is trained without dropout, so dropout (rate p, inverted scaling 1/(1−p))
is applied at test time to every sublayer output v_l (mixer and FFN) by forward hooks; the weights are untouched.
Masks come from a seeded generator, so the same call gives the same scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nanokimi.checks import check_in, check_positive_int
from nanokimi.model import TinyKimi
from nanokimi.uncertainty.scores import Scorer, reduce_over_tokens
from nanokimi.uncertainty.sites import check_base_model, check_token_batch, frozen

__all__ = ["ENSEMBLE_KINDS", "predictive_token_scores", "model_logits_fn", "MCDropoutScorer", "EnsembleScorer"]

ENSEMBLE_KINDS = ("entropy", "mutual_info", "msp")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.where(probs > 0, probs * probs.clamp_min(1e-45).log(), 0.0).sum(-1)


def predictive_token_scores(member_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token score from K members' logits [K, ..., V] (see the module docstring) → [...] fp32/fp64."""
    check_in("kind", kind, ENSEMBLE_KINDS)
    if member_logits.dim() < 2 or member_logits.shape[0] == 0:
        raise ValueError(f"member_logits: expected [K, ..., V] with K >= 1, got {tuple(member_logits.shape)}")
    z = member_logits.double() if member_logits.dtype == torch.float64 else member_logits.float()
    probs = z.softmax(-1)  # [K, ..., V]
    mean = probs.mean(0)  # [..., V]
    if kind == "msp":
        return 1.0 - mean.amax(-1)
    total = _entropy(mean)
    if kind == "entropy":
        return total
    # MI ≥ 0 by Jensen; clamp the few ulps of rounding that can make a unanimous ensemble's MI negative
    return (total - _entropy(probs).mean(0)).clamp_min(0.0)


def model_logits_fn(model: TinyKimi) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens [N, T] -> logits [N, T, V]`` of a model in eval mode: what ``LogitScorer`` wraps."""
    check_base_model(model, "model")

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        with frozen(model), torch.no_grad():
            return model(tokens)[0]

    return logits


class MCDropoutScorer(Scorer):
    """``n_passes`` forwards of ``model`` with dropout rate ``p`` on every sublayer output; ``kind`` in ENSEMBLE_KINDS."""

    def __init__(self, model: TinyKimi, p: float = 0.1, n_passes: int = 8, kind: str = "mutual_info", seed: int = 0):
        check_base_model(model, "model")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < 1:
            raise ValueError(f"p: expected a dropout rate in (0, 1), got {p!r}")
        self.model, self.p = model, float(p)
        self.n_passes = check_positive_int("n_passes", n_passes)
        self.kind, self.seed = check_in("kind", kind, ENSEMBLE_KINDS), int(seed)
        self.name = f"mc_dropout_{kind}"
        self.passes = self.n_passes

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of every dropout pass, [n_passes, N, T, V]."""
        gen = torch.Generator(device=inputs.device).manual_seed(self.seed)
        keep = 1.0 - self.p

        def drop(module, args, output):
            mask = torch.rand(output.shape, generator=gen, device=output.device) < keep
            return output * mask / keep

        sublayers = [m for layer in self.model.layers for m in (layer.mixer, layer.ffn)]
        handles = [m.register_forward_hook(drop) for m in sublayers]
        try:
            with frozen(self.model), torch.no_grad():
                return torch.stack([self.model(inputs)[0] for _ in range(self.n_passes)])
        finally:
            for handle in handles:
                handle.remove()

    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_batch(inputs, mask, self.model.cfg.vocab_size)
        return reduce_over_tokens(predictive_token_scores(self.member_logits(inputs), self.kind), mask)


class EnsembleScorer(Scorer):
    """A deep ensemble: ``models`` (M independently trained TinyKimis of one vocabulary); ``kind`` in ENSEMBLE_KINDS."""

    def __init__(self, models: Sequence[TinyKimi], kind: str = "mutual_info"):
        if isinstance(models, TinyKimi) or not isinstance(models, Sequence) or len(models) == 0:
            raise ValueError(f"models: expected a non-empty sequence of TinyKimi models, got {models!r:.80}")
        for i, model in enumerate(models):
            check_base_model(model, f"models[{i}]")
            if model.cfg.vocab_size != models[0].cfg.vocab_size:
                raise ValueError(
                    f"models[{i}]: expected vocab_size {models[0].cfg.vocab_size} (that of models[0]), "
                    f"got {model.cfg.vocab_size}"
                )
        self.models = list(models)
        self.kind = check_in("kind", kind, ENSEMBLE_KINDS)
        self.name = f"ensemble_{kind}"
        self.passes = len(self.models)

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of every member, [M, N, T, V]."""
        return torch.stack([model_logits_fn(model)(inputs) for model in self.models])

    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_batch(inputs, mask, self.models[0].cfg.vocab_size)
        return reduce_over_tokens(predictive_token_scores(self.member_logits(inputs), self.kind), mask)

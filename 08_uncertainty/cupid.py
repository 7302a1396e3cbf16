"""CUPID (Xu & Fan, ICLR 2026): a plug-in that gives a frozen model aleatoric and epistemic uncertainty.

The plug-in g sits at one insertion site of a frozen TinyKimi (``sites.py``: layer i's FFN output v_i, or the final
hidden state). From the site's feature f ∈ R^D of each token it computes a shared trunk and two heads:

    f̂ = recon(f) ∈ R^D            reconstruction head: f̂ replaces f, so the model runs on with f̂ → logits ẑ
    s = logvar(f) ∈ R               uncertainty head: a log-variance per answer token

Loss (the paper's, as in its repository's ``lossfunction.py``), averaged over the answer tokens t of a batch:

    L = λ_out · [ mean_t |ẑ_t − z_t|₁/V  −  λ_pert · mean_t |f̂_t − f_t|₁/D ]  +  λ_het · mean_t ½( b_t e^{−s_t} + s_t )
    b_t = Σ_v (softmax(ẑ_t)_v − 1[v = y_t])²           (Brier error of the inserted prediction vs the label y_t)

* output preservation: the model's output with f̂ inserted must equal its original output z (a Bayesian *identity
  mapping* on what matters);
* structured perturbation (−λ_pert, small): f̂ is pushed *away* from f, so g learns a perturbation that the
  downstream network ignores on in-distribution data. Off the training distribution that perturbation (and g's
  reconstruction) is no longer invisible to the network: the outputs move;
* heteroscedastic term (Kendall & Gal 2017): the Gaussian NLL of the error b_t with variance e^{s_t}; its minimiser
  is e^{s_t} = E[b_t | f_t], the expected error, which irreducible label noise keeps high.

Scores per answer token, reduced over the answer by their mean (higher = more uncertain):

    aleatoric  = e^{s_t}                                   one base pass (the head reads f)
    epistemic  = (1/V) Σ_v |softmax(ẑ_t)_v − softmax(z_t)_v|  base pass + the pass with f̂ inserted

Cost: at the final site the second pass is one extra ``lm_head`` (ẑ = f̂ Wᵀ); at layer i < L the layers after the
site run again (implemented as a second forward, so ``passes = 2``). The λ defaults are the repository's
(T1 = 1, T11 = 0.01, T2 = 9e-3). The base model is never modified: ``fit`` trains only g's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import Batch
from nanokimi.model import TinyKimi
from nanokimi.uncertainty.scores import Scorer, reduce_over_tokens
from nanokimi.uncertainty.sites import check_base_model, check_layer, check_token_batch, frozen, run_with_sites

__all__ = ["CUPID", "CUPIDOutputs", "CUPIDScorer", "ResidualMLP", "cupid_loss_terms", "fit_plugin", "check_weight"]

CUPID_SCORES = ("aleatoric", "epistemic")


def check_weight(name: str, value: object) -> float:
    """A finite loss weight or learning rate ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


class ResidualMLP(nn.Module):
    """x + W₂ GELU(W₁ LayerNorm(x)): one trunk block, [..., H] → [..., H]."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


@dataclass
class CUPIDOutputs:
    """One CUPID forward over tokens [B, T]: logits without (z) and with (ẑ) the insert, the site's feature f, its
    reconstruction f̂ and the log-variance s."""

    base_logits: torch.Tensor  # [B, T, V]
    insert_logits: torch.Tensor  # [B, T, V]
    features: torch.Tensor  # [B, T, D]
    reconstruction: torch.Tensor  # [B, T, D]
    log_var: torch.Tensor  # [B, T]


def cupid_loss_terms(
    out: CUPIDOutputs,
    targets: torch.Tensor,
    mask: torch.Tensor,
    output_weight: float,
    perturb_weight: float,
    hetero_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CUPID loss of given outputs over the tokens selected by ``mask`` [B, T] (targets [B, T] the next tokens):
    ``output_weight · (output_l1 − perturb_weight · feature_l1) + hetero_weight · hetero``, and its three terms."""
    output_l1 = (out.insert_logits.float() - out.base_logits.float()).abs().mean(-1)[mask].mean()
    feature_l1 = (out.reconstruction.float() - out.features.float()).abs().mean(-1)[mask].mean()
    probs = out.insert_logits.float().softmax(-1)  # [B, T, V]
    labels = F.one_hot(targets, probs.shape[-1]).float()
    brier = (probs - labels).pow(2).sum(-1)  # [B, T]
    hetero = (0.5 * (brier * torch.exp(-out.log_var) + out.log_var))[mask].mean()
    total = output_weight * (output_l1 - perturb_weight * feature_l1) + hetero_weight * hetero
    return total, {"output_l1": output_l1, "feature_l1": feature_l1, "hetero": hetero}


class CUPID(nn.Module):
    """The plug-in at site ``layer`` of a frozen ``base_model`` (see the module docstring).

    Per token: trunk = Linear(D→hidden) then ``n_blocks`` residual MLP blocks; recon_head = Linear(hidden→D), with
    no skip from the input (the identity has to be learned, so it need not hold off the training distribution);
    logvar_head = a small MLP hidden→1.
    ``hidden``: trunk width; ``n_blocks``: residual trunk blocks; ``output_weight`` λ_out, ``perturb_weight``
    λ_pert, ``hetero_weight`` λ_het; ``seed`` fixes the plug-in's initialisation (the global RNG is left alone).
    The base is held by reference, not as a submodule: ``parameters()`` and ``state_dict()`` are the plug-in's.
    """

    def __init__(
        self,
        base_model: TinyKimi,
        layer: int,
        hidden: int = 128,
        *,
        n_blocks: int = 2,
        output_weight: float = 1.0,
        perturb_weight: float = 0.01,
        hetero_weight: float = 9e-3,
        seed: int = 0,
    ):
        super().__init__()
        check_base_model(base_model)
        self.layer = check_layer(base_model, layer)
        check_positive_int("hidden", hidden)
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
            raise ValueError(f"n_blocks: expected an int >= 0, got {n_blocks!r}")
        self.output_weight = check_weight("output_weight", output_weight)
        self.perturb_weight = check_weight("perturb_weight", perturb_weight)
        self.hetero_weight = check_weight("hetero_weight", hetero_weight)
        self.__dict__["base"] = base_model  # a plain attribute: nn.Module would register it as a submodule
        d_model = base_model.cfg.d_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trunk = nn.Sequential(nn.Linear(d_model, hidden), *(ResidualMLP(hidden) for _ in range(n_blocks)))
            self.recon_head = nn.Linear(hidden, d_model)
            self.logvar_head = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.to(base_model.embed.weight.device)

    @property
    def final_site(self) -> bool:
        return self.layer == self.base.cfg.n_layers

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plug-in itself: features [..., D] → (reconstruction [..., D], log-variance [...])."""
        trunk = self.trunk(features.float())  # [..., hidden]
        return self.recon_head(trunk).to(features.dtype), self.logvar_head(trunk).squeeze(-1)

    def outputs(self, tokens: torch.Tensor) -> CUPIDOutputs:
        """Base and inserted logits, f, f̂ and s for tokens [B, T]. Gradients reach only the plug-in (the base runs
        frozen: its parameters are not part of the autograd graph)."""
        made: dict[str, torch.Tensor] = {}

        def insert(v: torch.Tensor) -> torch.Tensor:
            made["reconstruction"], made["log_var"] = self(v)
            return made["reconstruction"]

        with frozen(self.base):
            with torch.no_grad():
                base_logits, feats = run_with_sites(self.base, tokens, read=(self.layer,))
            features = feats[self.layer]
            if self.final_site:  # the insert's downstream network is lm_head alone: no second pass
                insert_logits = self.base.lm_head(insert(features))
            else:
                insert_logits, _ = run_with_sites(self.base, tokens, replace=(self.layer, insert))
        return CUPIDOutputs(base_logits, insert_logits, features, made["reconstruction"], made["log_var"])

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The CUPID loss on the answer tokens (``batch.loss_mask``) of a batch, and its parts as floats."""
        check_token_batch(batch.inputs, batch.loss_mask, self.base.cfg.vocab_size)
        if not bool(batch.loss_mask.any()):
            raise ValueError("batch: loss_mask selects no answer token, so the loss is undefined")
        total, terms = cupid_loss_terms(
            self.outputs(batch.inputs),
            batch.targets,
            batch.loss_mask,
            self.output_weight,
            self.perturb_weight,
            self.hetero_weight,
        )
        return total, {name: float(value.detach()) for name, value in {"loss": total, **terms}.items()}

    @torch.no_grad()
    def token_scores(self, tokens: torch.Tensor, kinds: tuple[str, ...] = CUPID_SCORES) -> dict[str, torch.Tensor]:
        """Per-token scores [N, T] (fp32) for each of ``kinds`` ⊆ {aleatoric, epistemic}."""
        for kind in kinds:
            check_in("kinds", kind, CUPID_SCORES)
        was_training = self.training
        self.eval()
        try:
            if "epistemic" not in kinds:  # the log-variance head only reads f: one base pass
                with frozen(self.base):
                    _, feats = run_with_sites(self.base, tokens, read=(self.layer,))
                return {"aleatoric": self(feats[self.layer])[1].float().exp()}
            out = self.outputs(tokens)  # runs the base frozen itself
        finally:
            self.train(was_training)
        scores = {
            "epistemic": (out.insert_logits.float().softmax(-1) - out.base_logits.float().softmax(-1)).abs().mean(-1)
        }
        if "aleatoric" in kinds:
            scores["aleatoric"] = out.log_var.float().exp()
        return scores

    def scores(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Both scores [N] for token ids [N, T], averaged over the answer positions ``mask`` [N, T] (all if None)."""
        check_token_batch(inputs, mask, self.base.cfg.vocab_size)
        per_token = self.token_scores(inputs)
        return {kind: reduce_over_tokens(s, mask) for kind, s in per_token.items()}

    def fit(self, batches: Sequence[Batch], lr: float = 3e-3, min_lr_ratio: float = 0.1) -> list[dict[str, float]]:
        """Train the plug-in on ``batches`` (``fit_plugin``); the base stays frozen. Returns the loss parts per step."""
        return fit_plugin(self, batches, lr=lr, min_lr_ratio=min_lr_ratio)

    def scorer(self, kind: str) -> CUPIDScorer:
        """The ``Scorer`` for one of the two scores."""
        return CUPIDScorer(self, kind)


def fit_plugin(
    plugin: nn.Module, batches: Sequence[Batch], lr: float = 3e-3, min_lr_ratio: float = 0.1, grad_clip: float = 1.0
) -> list[dict[str, float]]:
    """Adam on ``plugin.parameters()`` minimising ``plugin.loss(batch)``, one step per batch of ``batches``, the base
    frozen throughout. The learning rate decays from ``lr`` to ``lr·min_lr_ratio`` on a cosine: the L1 terms have
    gradients of constant size, so a constant rate keeps the outputs jittering around the identity.

    Shared by CUPID and DRUE (both define ``loss(batch) -> (loss, parts)`` and hold the base as ``plugin.base``).
    """
    if not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError(
            f"batches: expected a non-empty sequence of Batch, got {type(batches).__name__} of length "
            f"{len(batches) if isinstance(batches, Sequence) else '?'}"
        )
    lr = check_weight("lr", lr)
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    grad_clip = check_weight("grad_clip", grad_clip)
    params = [p for p in plugin.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    plugin.train()
    with frozen(plugin.base):
        for step, batch in enumerate(batches):
            progress = step / max(1, len(batches) - 1)
            opt.param_groups[0]["lr"] = lr * (
                min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            )
            batch = batch.to(plugin.base.embed.weight.device)
            opt.zero_grad(set_to_none=True)
            loss, parts = plugin.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss: became {float(loss)} at step {step}; lower lr")
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history.append(parts)
    plugin.eval()
    return history


class CUPIDScorer(Scorer):
    """CUPID's aleatoric or epistemic score behind the common interface."""

    def __init__(self, cupid: CUPID, kind: str):
        if not isinstance(cupid, CUPID):
            raise TypeError(f"cupid: expected a CUPID, got {type(cupid).__name__}")
        self.cupid, self.kind = cupid, check_in("kind", kind, CUPID_SCORES)
        self.name = f"cupid_{kind}"
        self.passes = 2 if kind == "epistemic" and not cupid.final_site else 1

    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_batch(inputs, mask, self.cupid.base.cfg.vocab_size)
        per_token = self.cupid.token_scores(inputs, kinds=(self.kind,))[self.kind]
        return reduce_over_tokens(per_token, mask)

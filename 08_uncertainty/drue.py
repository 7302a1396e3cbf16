"""DRUE (Wang, Xu & Fan, arXiv 2601.19341): uncertainty from the disagreement of two reconstructions of the input.

Two decoders read the features of two insertion sites i < j of a frozen TinyKimi (``sites.py``) and each
reconstructs the *input* representation of the same token, its embedding x_t = embed(token_t):

    x̂ᵢ_t = dec_i(f_i,t),   x̂ⱼ_t = dec_j(f_j,t)                 both trained: L = mean_t ( |x̂ᵢ_t − x_t|² + |x̂ⱼ_t − x_t|² ) / D
    score_t = |x̂ᵢ_t − x̂ⱼ_t|² / D                               averaged over the answer tokens

On the training distribution both decoders recover x and agree. Off it, each decoder extrapolates from its own
layer's features in its own way, and the two reconstructions drift apart. Using the *discrepancy* between two
reconstructions, rather than the error of one against the input, is DRUE's answer to the information loss and
surface sensitivity of plain reconstruction error. The abstract is all that is public: the decoders, the
embedding target and the squared distance are this chapter's choices. Cost: one base pass (both sites are read in
the same forward) plus two small decoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nanokimi.checks import check_positive_int
from nanokimi.data import Batch
from nanokimi.model import TinyKimi
from nanokimi.uncertainty.cupid import ResidualMLP, fit_plugin
from nanokimi.uncertainty.scores import Scorer, reduce_over_tokens
from nanokimi.uncertainty.sites import check_base_model, check_layer, check_token_batch, frozen, run_with_sites

__all__ = ["DRUE", "DRUEScorer"]


class DRUE(nn.Module):
    """Two input decoders at sites ``layers = (i, j)``, i ≠ j, of a frozen ``base_model``; see the module docstring."""

    def __init__(
        self,
        base_model: TinyKimi,
        layers: tuple[int, int] = (0, 2),
        hidden: int = 128,
        *,
        n_blocks: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        check_base_model(base_model)
        if not isinstance(layers, tuple | list) or len(layers) != 2:
            raise ValueError(f"layers: expected a pair (i, j) of insertion sites, got {layers!r}")
        first, second = (check_layer(base_model, layer, "layers") for layer in layers)
        if first == second:
            raise ValueError(f"layers: expected two different sites, got ({first}, {second})")
        self.layers = (first, second)
        check_positive_int("hidden", hidden)
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
            raise ValueError(f"n_blocks: expected an int >= 0, got {n_blocks!r}")
        self.__dict__["base"] = base_model  # a plain attribute, not a submodule: parameters() are the decoders'
        d_model = base_model.cfg.d_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoders = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(d_model, hidden),
                    *(ResidualMLP(hidden) for _ in range(n_blocks)),
                    nn.GELU(),
                    nn.Linear(hidden, d_model),
                )
                for _ in range(2)
            )
        self.to(base_model.embed.weight.device)

    def reconstructions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, x̂ᵢ, x̂ⱼ), each [B, T, D] fp32, from one base forward of tokens [B, T]."""
        with torch.no_grad():
            _, feats = run_with_sites(self.base, tokens, read=self.layers)
            target = self.base.embed(tokens).float()
        recon = [dec(feats[layer].float()) for dec, layer in zip(self.decoders, self.layers, strict=True)]
        return target, recon[0], recon[1]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Both decoders' mean squared reconstruction error of the input embedding at the answer positions."""
        check_token_batch(batch.inputs, batch.loss_mask, self.base.cfg.vocab_size)
        if not bool(batch.loss_mask.any()):
            raise ValueError("batch: loss_mask selects no answer token, so the loss is undefined")
        target, first, second = self.reconstructions(batch.inputs)
        mask = batch.loss_mask
        err_first = (first - target).pow(2).mean(-1)[mask].mean()
        err_second = (second - target).pow(2).mean(-1)[mask].mean()
        total = err_first + err_second
        return total, {
            "loss": float(total.detach()),
            "mse_first": float(err_first.detach()),
            "mse_second": float(err_second.detach()),
        }

    @torch.no_grad()
    def token_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token discrepancy |x̂ᵢ − x̂ⱼ|²/D, [N, T] fp32."""
        was_training = self.training
        self.eval()
        try:
            with frozen(self.base):
                _, first, second = self.reconstructions(tokens)
        finally:
            self.train(was_training)
        return (first - second).pow(2).mean(-1)

    def fit(self, batches: Sequence[Batch], lr: float = 3e-3, min_lr_ratio: float = 0.1) -> list[dict[str, float]]:
        """Train both decoders on ``batches`` (``fit_plugin``); the base stays frozen. Returns the loss parts per step."""
        return fit_plugin(self, batches, lr=lr, min_lr_ratio=min_lr_ratio)

    def scorer(self) -> DRUEScorer:
        return DRUEScorer(self)


class DRUEScorer(Scorer):
    """DRUE's discrepancy behind the common interface (one base pass)."""

    def __init__(self, drue: DRUE):
        if not isinstance(drue, DRUE):
            raise TypeError(f"drue: expected a DRUE, got {type(drue).__name__}")
        self.drue = drue
        self.name = "drue"
        self.passes = 1

    def score(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_batch(inputs, mask, self.drue.base.cfg.vocab_size)
        return reduce_over_tokens(self.drue.token_scores(inputs), mask)

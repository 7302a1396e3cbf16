"""QK-clip, the "Clip" of MuonClip (Kimi K2, arXiv 2507.20534): cap each attention head's largest logit at τ by
rescaling that head's query and key weights after the optimizer step.

During the forward pass record, per layer and head h (over the whole batch, every query i and attended key j)::

    S^h_max = max_{i, j} (q^h_i · k^h_j) · scale            scale = 1/√d usually

After ``optimizer.step()``, for every head with ``S^h_max > τ``::

    γ_h = τ / S^h_max
    W_q^h ← √γ_h · W_q^h,   W_k^h ← √γ_h · W_k^h          (the head's rows of q_proj / k_proj, and their bias)

The logit is bilinear in (W_q, W_k), so every logit of head h is multiplied by exactly γ_h and its maximum, on
the same inputs, becomes τ. Heads at or below τ, W_v and everything else are left bit-for-bit unchanged. K2 uses
τ = 100; the clip is active early in training and switches itself off once the logits settle.

MLA (the attention of DeepSeek-V3 and K2). Each head's query is ``[q^C_h, q^R_h]`` (a compressed "content" part
and a rotary part) and its key ``[k^C_h, k^R]``, where the rotary key ``k^R`` is one vector shared by all heads;
the logit is ``q^C_h·k^C_h + q^R_h·k^R``. To scale head h's logits by γ_h without touching other heads:
multiply the head's rows of the q^C and k^C up-projections by √γ_h, the head's rows of the rotary-query
projection by γ_h, and leave the shared ``k^R`` projection alone (scaling it would rescale every head). TinyKimi
uses plain multi-head attention, which is what ``QKClip`` implements; the MLA rule is exercise 4 of the README.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanokimi.checks import check_finite, check_tensor

__all__ = ["QKClip", "max_logit_per_head"]


def max_logit_per_head(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """``S_max[h] = max_{b, i, j} scale · q[b, h, i]·k[b, h, j]`` over attended pairs; returns ``[H]`` fp32.

    ``q: [B, H, T, D]``, ``k: [B, H, S, D]`` (the layout of ``F.scaled_dot_product_attention``). With
    ``causal=True`` the T queries are the last T of the S positions (a prefill has T = S; a decode step T = 1)
    and query i attends keys ``j ≤ S − T + i``. Materialises the ``[B, H, T, S]`` logits: a reference, not a kernel.
    """
    check_tensor("q", q, ndim=4, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    check_tensor("k", k, shape=(q.shape[0], q.shape[1], None, q.shape[3]), dtypes=(q.dtype,))
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
    T, S = q.shape[2], k.shape[2]
    if causal and T > S:
        raise ValueError(f"q: with causal=True expected at most S={S} queries (those of k), got T={T}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bhtd,bhsd->bhts", q.to(compute), k.to(compute)) * scale  # [B, H, T, S]
    if causal:
        query_pos = torch.arange(S - T, S, device=q.device)[:, None]  # [T, 1]
        key_pos = torch.arange(S, device=q.device)[None, :]  # [1, S]
        logits = logits.masked_fill(key_pos > query_pos, -math.inf)
    return logits.amax(dim=(0, 2, 3)).detach().float()  # [H]


class QKClip:
    """Collects per-head max logits during forward passes and clips W_q / W_k after the optimizer step.

    Usage (per training step)::

        clip = QKClip(threshold=100.0)
        ...forward: for each attention layer ``name``: clip.observe(name, layer.max_logits)
        loss.backward(); optimizer.step()
        clip.apply_(model)   # model.get_submodule(name) must have q_proj, k_proj, n_heads, head_dim

    Repeated ``observe`` calls for one layer (micro-batches) keep the running maximum; ``apply_`` uses and then
    forgets them. Head h of a layer is rows ``h·head_dim:(h+1)·head_dim`` of ``q_proj.weight``/``k_proj.weight``.
    """

    def __init__(self, threshold: float = 100.0) -> None:
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold: expected a positive finite number, got {threshold!r}")
        self.threshold = float(threshold)
        self.observed: dict[str, torch.Tensor] = {}

    def observe(self, layer_name: str, max_logits_per_head: torch.Tensor) -> None:
        """Fold one forward pass's ``[n_heads]`` max logits of layer ``layer_name`` into the running maximum."""
        if not isinstance(layer_name, str):
            raise TypeError(f"layer_name: expected a str (a submodule name), got {type(layer_name).__name__}")
        check_tensor("max_logits_per_head", max_logits_per_head, ndim=1)
        if not max_logits_per_head.is_floating_point():
            raise TypeError(f"max_logits_per_head: expected a floating tensor, got {max_logits_per_head.dtype}")
        check_finite("max_logits_per_head", max_logits_per_head)
        value = max_logits_per_head.detach().float().cpu()
        previous = self.observed.get(layer_name)
        if previous is None:
            self.observed[layer_name] = value.clone()
        elif previous.shape != value.shape:
            raise ValueError(
                f"max_logits_per_head: expected {previous.numel()} heads for layer {layer_name!r} (as observed "
                f"before), got {value.numel()}"
            )
        else:
            torch.maximum(previous, value, out=previous)

    def reset(self) -> None:
        """Forget every observation."""
        self.observed.clear()

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Clip every observed layer of ``model`` in place; returns ``{layer_name: γ [n_heads]}`` (1 = untouched).

        Call it after ``optimizer.step()``. The observations are cleared afterwards.
        """
        layers = {}
        for name, max_logits in self.observed.items():  # check everything before changing anything
            try:
                layer = model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"layer_name: {name!r} is not a submodule of the model ({err})") from None
            layers[name] = (layer, self._head_rows(name, layer, max_logits))
        gammas = {}
        for name, (layer, head_dim) in layers.items():
            max_logits = self.observed[name]
            gamma = torch.where(max_logits > self.threshold, self.threshold / max_logits, torch.ones_like(max_logits))
            for head in (gamma < 1).nonzero().flatten().tolist():
                rows = slice(head * head_dim, (head + 1) * head_dim)
                factor = math.sqrt(float(gamma[head]))
                for proj in (layer.q_proj, layer.k_proj):
                    proj.weight[rows].mul_(factor)
                    if proj.bias is not None:
                        proj.bias[rows].mul_(factor)
            gammas[name] = gamma
        self.reset()
        return gammas

    @staticmethod
    def _head_rows(name: str, layer: nn.Module, max_logits: torch.Tensor) -> int:
        """Check the layer has per-head q/k rows matching the observation; return head_dim."""
        for attr in ("q_proj", "k_proj", "n_heads", "head_dim"):
            if not hasattr(layer, attr):
                raise ValueError(f"layer {name!r}: expected attributes q_proj, k_proj, n_heads, head_dim; no {attr}")
        n_heads, head_dim = int(layer.n_heads), int(layer.head_dim)
        for proj_name in ("q_proj", "k_proj"):
            weight = getattr(layer, proj_name).weight
            if weight.dim() != 2 or weight.shape[0] != n_heads * head_dim:
                raise ValueError(
                    f"layer {name!r}: expected {proj_name}.weight with n_heads·head_dim = {n_heads * head_dim} rows "
                    f"(one block per head), got shape {tuple(weight.shape)}"
                )
        if max_logits.numel() != n_heads:
            raise ValueError(
                f"max_logits_per_head: expected {n_heads} values for layer {name!r} (its n_heads), "
                f"got {max_logits.numel()}"
            )
        return head_dim

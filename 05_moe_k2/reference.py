"""The K2 MoE layer in plain PyTorch: the spec every kernel in this chapter is tested against.

Kimi K2 (arXiv 2507.20534, §2.3) keeps DeepSeek-V3's router: sigmoid affinities, an expert bias that only
*chooses* experts (auxiliary-loss-free balancing), renormalised top-k weights times a routed scaling factor,
plus one always-on shared expert. Moonlight (arXiv 2502.16982, App. C) gives the recipe for that factor.

For a token x ∈ R^D, router weight W_r ∈ R^{E×D}, expert bias b ∈ R^E (a buffer, never a gradient):

    s   = sigmoid(W_r x)                          affinities, computed in (at least) fp32          [E]
    sel = s + b                                   the bias only decides *which* experts
    [n_groups > 1] group score = sum of the top-2 of sel inside each group; keep the best topk_groups
                   groups and set sel = −inf in the others
    I   = top-k(sel)                              ties go to the lower expert id; I sorted ascending
    w_j = c · s_{I_j} / Σ_{i∈I} s_i               *unbiased* scores, renormalised, times c = routed_scaling_factor
    y   = Σ_j w_j · FFN_{I_j}(x) + FFN_shared(x)

Each expert is a SwiGLU FFN in ``nn.Linear`` layout ``[out, in]``:

    FFN_e(x) = W_down[e] · (silu(W_gate[e] x) ⊙ W_up[e] x),   W_gate[e], W_up[e] ∈ R^{F×D},  W_down[e] ∈ R^{D×F}.

Aux-loss-free balancing (DeepSeek-V3 §2.1.2): after each optimizer step, with c_e the tokens routed to e,

    b_e ← b_e + γ · sign(mean(c) − c_e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanokimi.checks import check_positive_int, check_tensor

__all__ = [
    "route",
    "swiglu_ffn",
    "routed_experts",
    "moe_forward",
    "update_expert_bias",
    "moonlight_scaling_factor",
    "check_moe_args",
    "check_expert_weights",
]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_moe_args(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    top_k: int,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[int, int, int]:
    """Validate the routing arguments; returns ``(N, D, E)``. Shared by the reference and the kernels."""
    check_tensor("x", x, ndim=2, dtypes=_FLOATS)
    n_tokens, d_model = x.shape
    check_tensor("router_weight", router_weight, shape=(None, d_model), dtypes=_FLOATS, device=x.device)
    n_experts = router_weight.shape[0]
    check_tensor("expert_bias", expert_bias, shape=(n_experts,), dtypes=_FLOATS, device=x.device)
    check_positive_int("top_k", top_k)
    check_positive_int("n_groups", n_groups)
    check_positive_int("topk_groups", topk_groups)
    if n_experts % n_groups:
        raise ValueError(f"n_groups: expected a divisor of the number of experts {n_experts}, got {n_groups}")
    if topk_groups > n_groups:
        raise ValueError(f"topk_groups: expected at most n_groups={n_groups}, got {topk_groups}")
    selectable = topk_groups * (n_experts // n_groups)
    if top_k > selectable:
        raise ValueError(
            f"top_k: expected at most {selectable} (the experts in topk_groups={topk_groups} of n_groups={n_groups} "
            f"groups of {n_experts // n_groups}), got {top_k}"
        )
    return n_tokens, d_model, n_experts


def check_expert_weights(
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, n_experts: int | None, d_model: int, x: torch.Tensor
) -> tuple[int, int]:
    """Validate expert weights ``[E, F, D]``, ``[E, F, D]``, ``[E, D, F]`` (same dtype, on x's device);
    ``n_experts=None`` takes E from w_gate. Returns ``(E, F)``."""
    check_tensor("w_gate", w_gate, shape=(n_experts, None, d_model), dtypes=_FLOATS, device=x.device)
    n_experts, d_ff = w_gate.shape[0], w_gate.shape[1]
    check_tensor("w_up", w_up, shape=(n_experts, d_ff, d_model), dtypes=(w_gate.dtype,), device=x.device)
    check_tensor("w_down", w_down, shape=(n_experts, d_model, d_ff), dtypes=(w_gate.dtype,), device=x.device)
    return n_experts, d_ff


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; equal values go to the lower index.

    ``torch.topk`` does not promise an order among ties, a stable descending sort does.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid router with a selection-only bias and optional group-limited selection.

    Args:
        x: ``[N, D]`` tokens. router_weight: ``[E, D]``. expert_bias: ``[E]``.
    Returns:
        ``topk_idx [N, k]`` int64, sorted ascending per token, and ``topk_weight [N, k]`` in the score dtype
        (fp32, or fp64 for fp64 inputs): the unbiased sigmoid scores of the chosen experts, renormalised to
        sum to 1, times ``routed_scaling_factor``.
    """
    n_tokens, _, n_experts = check_moe_args(x, router_weight, expert_bias, top_k, n_groups, topk_groups)
    score_dtype = torch.promote_types(x.dtype, torch.float32)
    scores = torch.sigmoid(x.to(score_dtype) @ router_weight.to(score_dtype).T)  # [N, E]
    selection = scores + expert_bias.to(score_dtype)  # [N, E], used for choosing only
    if n_groups > 1:
        per_group = n_experts // n_groups
        grouped = selection.view(n_tokens, n_groups, per_group)  # [N, G, E/G]
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [N, G]
        kept = _stable_topk(group_scores, topk_groups)  # [N, topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [N, G]
        # −inf, not 0: a kept expert with a negative biased score must still beat every masked one.
        selection = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n_tokens, n_experts)
    topk_idx = _stable_topk(selection, top_k).sort(dim=-1).values  # [N, k]
    chosen = scores.gather(1, topk_idx)  # [N, k] unbiased affinities
    topk_weight = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * routed_scaling_factor
    return topk_idx, topk_weight


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One dense SwiGLU FFN: ``W_down (silu(W_gate x) ⊙ W_up x)``; x ``[N, D]``, W_gate/W_up ``[F, D]``,
    W_down ``[D, F]`` → ``[N, D]``."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """``y_t = Σ_j w_tj · FFN_{I_tj}(x_t)`` as a loop over experts (each expert sees only its own tokens).

    Args:
        x: ``[N, D]``. topk_idx: ``[N, k]`` expert ids. topk_weight: ``[N, k]``.
        w_gate, w_up: ``[E, F, D]``. w_down: ``[E, D, F]``.
    Returns:
        ``[N, D]`` in the dtype of x.
    """
    check_tensor("x", x, ndim=2, dtypes=_FLOATS)
    n_experts, _ = check_expert_weights(w_gate, w_up, w_down, None, x.shape[1], x)
    check_tensor("topk_idx", topk_idx, shape=(x.shape[0], None), dtypes=(torch.int64, torch.int32), device=x.device)
    check_tensor("topk_weight", topk_weight, shape=tuple(topk_idx.shape), dtypes=_FLOATS, device=x.device)
    y = torch.zeros_like(x)
    for e in range(n_experts):
        token, slot = (topk_idx == e).nonzero(as_tuple=True)  # the tokens that chose e, and where
        if token.numel() == 0:
            continue
        expert_out = swiglu_ffn(x[token], w_gate[e], w_up[e], w_down[e])  # [n_e, D]
        y.index_add_(0, token, topk_weight[token, slot, None].to(x.dtype) * expert_out)
    return y


def moe_forward(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float = 1.0,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> torch.Tensor:
    """The whole MoE layer: route, run the routed experts, add the shared expert unweighted.

    Args:
        x: ``[N, D]``. router_weight ``[E, D]``, expert_bias ``[E]``, expert weights as in :func:`routed_experts`.
        shared: ``(w_gate [F_s, D], w_up [F_s, D], w_down [D, F_s])`` of the always-on shared expert, or None.
    Returns:
        ``[N, D]``.
    """
    _, d_model, n_experts = check_moe_args(x, router_weight, expert_bias, top_k, n_groups, topk_groups)
    check_expert_weights(w_gate, w_up, w_down, n_experts, d_model, x)
    topk_idx, topk_weight = route(x, router_weight, expert_bias, top_k, routed_scaling_factor, n_groups, topk_groups)
    y = routed_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    if shared is not None:
        y = y + swiglu_ffn(x, *shared)
    return y


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step: ``b + γ · sign(mean(c) − c)``.

    Overloaded experts (c_e above the mean) lose γ of selection bias, underloaded ones gain γ; the weights
    never see the bias, so it needs no gradient and is updated after ``optimizer.step()``.

    Args:
        bias: ``[E]``. tokens_per_expert: ``[E]`` counts summed over the batch. rate: γ ≥ 0.
    Returns:
        the new bias ``[E]`` (same dtype as ``bias``).
    """
    check_tensor("bias", bias, ndim=1)
    check_tensor("tokens_per_expert", tokens_per_expert, shape=(bias.shape[0],), device=bias.device)
    if not rate >= 0:
        raise ValueError(f"rate: expected a non-negative float, got {rate!r}")
    load = tokens_per_expert.to(torch.float64)
    return bias + (rate * torch.sign(load.mean() - load)).to(bias.dtype)


def moonlight_scaling_factor(n_experts: int, top_k: int, samples: int = 100_000, seed: int = 0) -> float:
    """Moonlight's recipe for the routed scaling factor (Muon paper, App. C / Fig. 6).

    With Gaussian router logits l ~ N(0, 1)^E, p = renormalised top-k of sigmoid(l), the factor restores the
    output RMS of a dense FFN: ``c = E_l[1 / ‖p‖₂]``. Monte Carlo over ``samples`` draws (fp64, chunked).
    E=64, k=6 gives ≈ 2.446 (Moonlight); E=384, k=8 gives ≈ 2.827 (K2).
    """
    check_positive_int("n_experts", n_experts)
    check_positive_int("top_k", top_k)
    check_positive_int("samples", samples)
    if top_k > n_experts:
        raise ValueError(f"top_k: expected at most n_experts={n_experts}, got {top_k}")
    gen = torch.Generator().manual_seed(seed)
    total, done, chunk = 0.0, 0, 16_384
    while done < samples:
        n = min(chunk, samples - done)
        logits = torch.randn(n, n_experts, generator=gen, dtype=torch.float64)  # [n, E]
        p = torch.sigmoid(logits).topk(top_k, dim=-1).values  # [n, k]
        p = p / p.sum(-1, keepdim=True)
        total += float((1.0 / p.norm(dim=-1)).sum())
        done += n
    return total / samples

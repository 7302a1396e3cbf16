"""Exercise 3 (medium): GRPO's clipped objective (DeepSeekMath §4.1), the baseline k1.5 is compared with.

Task. For G groups of k responses of up to T tokens, with per-token log-probabilities under the new policy
(carries the gradient), the old (sampling) policy and a frozen reference policy:

    A_gj = (r_gj − r̄_g) / (std_g + eps)          std with Bessel's correction (divide by k − 1)
    ρ_t  = exp(log πθ(y_t) − log π_old(y_t))      per-token importance ratio
    o_t  = min(ρ_t A, clip(ρ_t, 1 − clip_eps, 1 + clip_eps) A) − β (e^{q_t} − q_t − 1),  q_t = log π_ref − log πθ
    "sequence": L = −(1/(G k)) Σ_gj (1/|y_gj|) Σ_{t ∈ y_gj} o_t       (mean over each response, then over responses)
    "token":    L = −Σ_gj Σ_{t ∈ y_gj} o_t / Σ_gj |y_gj|              (mean over all generated tokens)

The last term is the k3 estimator of KL(πθ ‖ π_ref); with β = 0 ``logp_ref`` may be None.

Shapes: logp_new, logp_old, logp_ref [G, k, T] float; rewards [G, k]; mask [G, k, T] bool or 0/1 (1 = a generated
token; every response has at least one). Returns a scalar (0-d tensor) to minimise.

Hints.
- Padded positions (mask = 0) may hold anything, even −inf: zero the log-ratio there *before* ``exp``,
  because 0 · inf = NaN. The grader pads ``logp_old`` with −inf.
- ``torch.minimum(ρA, clip(ρ)A)`` is the whole trick: the clip only takes the gradient away when the ratio has
  already moved in the direction the advantage pushes it.
- A group whose rewards are all equal has std 0: the eps keeps A = 0 there instead of 0/0.
- Only logp_new carries a gradient: detach the rest.
"""

from __future__ import annotations

import torch


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    logp_ref: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    eps: float = 1e-6,
    aggregation: str = "sequence",
) -> torch.Tensor:
    """GRPO's loss (scalar), aggregated per ``"sequence"`` or per ``"token"`` (see the module docstring)."""
    m = mask.to(logp_new.dtype)  # [G, k, T]
    n_tokens = m.sum(-1)  # [G, k] |y_gj|
    r = rewards.detach().to(logp_new.dtype)
    adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps))[..., None]  # [G, k, 1]
    log_ratio = torch.where(m > 0, logp_new - logp_old.detach(), 0.0)  # 0 on padding, before exp
    ratio = log_ratio.exp()
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [G, k, T]
    if beta > 0:
        q = torch.where(m > 0, logp_ref.detach() - logp_new, 0.0)
        objective = objective - beta * (q.exp() - q - 1)  # k3 estimator of KL(πθ ‖ π_ref)
    objective = objective * m
    if aggregation == "sequence":
        return -(objective.sum(-1) / n_tokens).mean()
    return -objective.sum() / n_tokens.sum()

"""Policy-optimisation losses of Kimi k1.5 (arXiv 2501.12599 §2.3) and GRPO (DeepSeekMath, arXiv 2402.03300 §4).

Notation: a problem x has a *group* of k responses y_1 … y_k sampled from the old policy π_old with rewards r_j;
``ℓ_j = log πθ(y_j|x) = Σ_t log πθ(y_j,t | x, y_j,<t)`` is a *sequence* log-probability. Batched tensors are
``[G, k]`` (G groups of k responses; a 1-D ``[k]`` tensor is one group) or ``[G, k, T]`` for per-token values.

k1.5 (policy mirror descent, §2.3.2). Iteration i maximises ``E[r] − τ KL(πθ ‖ π_old)``; its optimum satisfies
``r − τ log Z = τ log(π*/π_old)``, so the surrogate is the squared residual of that identity, with ``τ log Z``
replaced by the group's mean reward r̄:

    L_sq(θ)  = (1/k) Σ_j ( r_j − r̄ − τ (ℓ_j − ℓ_j^old) )²
    L_k15(θ) = (1/k) Σ_j [ −(r_j − r̄) ℓ_j + (τ/2) (ℓ_j − ℓ_j^old)² ]   = L_sq/(2τ) − const(θ)

and ``−∇L_k15`` is the paper's Eq. 3: ``(1/k) Σ_j [ ∇ℓ_j (r_j − r̄) − (τ/2) ∇(ℓ_j − ℓ_j^old)² ]``. No clipping, no
value network. Length penalty (§2.3.3): ``λ_j = 0.5 − (len_j − min)/(max − min)`` per group.

GRPO: ``A_j = (r_j − r̄)/(std(r) + ε)``, token ratio ``ρ_t = exp(log πθ − log π_old)``, clipped surrogate
``min(ρ A, clip(ρ, 1−ε_c, 1+ε_c) A)`` and the k3 estimator of KL(πθ ‖ π_ref) weighted by β.

The eager per-token log-probability ``token_logprobs_reference`` is the spec that
``nanokimi.rl.kernels.token_logprobs`` (the fused Triton path) is tested against.
"""

from __future__ import annotations

import math

import torch

from nanokimi.checks import check_finite, check_in, check_range, check_same_shape, check_tensor
from nanokimi.rl.kernels import _check_logprob_inputs, token_logprobs

__all__ = [
    "sequence_logprobs",
    "group_advantages",
    "k15_loss",
    "length_reward",
    "grpo_loss",
    "token_logprobs_reference",
    "policy_token_logprobs",
]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32)


def _check_tau(name: str, tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, int | float):
        raise TypeError(f"{name}: expected a positive float, got {type(tau).__name__} {tau!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {tau!r}")
    return float(tau)


def _as_groups(name: str, t: object, *, dtypes=_FLOATS, min_k: int = 1, why: str = "") -> torch.Tensor:
    """Validate a ``[k]`` or ``[G, k]`` tensor and return it as ``[G, k]``."""
    check_tensor(name, t, dtypes=dtypes)
    if t.dim() not in (1, 2):
        raise ValueError(f"{name}: expected shape [k] or [G, k], got {tuple(t.shape)}")
    groups = t.unsqueeze(0) if t.dim() == 1 else t  # [G, k]
    if groups.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one group, got shape {tuple(t.shape)} (no groups)")
    if groups.shape[1] < min_k:
        raise ValueError(
            f"{name}: expected at least {min_k} response(s) per group{why}, got {groups.shape[1]} "
            f"(shape {tuple(t.shape)})"
        )
    return groups


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ℓ = Σ_t mask_t · log π(y_t | y_<t): sequence log-probabilities from per-token ones.

    token_logp: [..., T] float; mask: [..., T] bool or 0/1 float (1 = a generated token). Returns [...].
    """
    check_tensor("token_logp", token_logp, dtypes=_FLOATS)
    check_tensor("mask", mask, dtypes=(torch.bool, *_FLOATS))
    check_same_shape(("token_logp", "mask"), token_logp, mask)
    return (token_logp * mask.to(token_logp.dtype)).sum(-1)


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A_j = r_j − r̄ per group (k1.5, PMD-mean) or (r_j − r̄)/(std + eps) (GRPO; std with Bessel's correction).

    rewards: [k] or [G, k] with k ≥ 2 (with one response the baseline equals the reward). Returns rewards' shape.
    """
    groups = _as_groups("rewards", rewards, min_k=2, why=" (a group-mean baseline needs k >= 2)")
    check_finite("rewards", groups)
    adv = groups - groups.mean(dim=1, keepdim=True)  # [G, k]
    if scale_by_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def k15_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """The k1.5 surrogate, averaged over groups (scalar):

        L = (1/G) Σ_g (1/k) Σ_j [ −(r_gj − r̄_g) ℓ_gj + (τ/2) (ℓ_gj − ℓ_gj^old)² ],   r̄_g = (1/k) Σ_j r_gj.

    logp_new: [k] or [G, k] sequence log-probs under πθ (carries the gradient); logp_old: same shape, under the
    sampling policy (detached here); rewards: same shape (detached). ``−∇L`` is Eq. 3 of the paper. Needs k ≥ 2
    (a mean baseline over one response is the response itself) and τ > 0.
    """
    tau = _check_tau("tau", tau)
    why = " (the mean-reward baseline of one response is itself: the advantage would be 0)"
    new = _as_groups("logp_new", logp_new, min_k=2, why=why)
    old = _as_groups("logp_old", logp_old, min_k=2, why=why)
    _as_groups("rewards", rewards, min_k=2, why=why)
    check_same_shape(("logp_new", "logp_old", "rewards"), logp_new, logp_old, rewards)
    check_finite("logp_new", new.detach())
    check_finite("logp_old", old)
    adv = group_advantages(rewards.detach()).reshape(new.shape).to(new.dtype)  # [G, k]
    log_ratio = new - old.detach().to(new.dtype)  # [G, k]
    per_response = -adv * new + 0.5 * tau * log_ratio.square()  # [G, k]
    return per_response.mean()


def length_reward(lengths: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """k1.5 length reward (§2.3.3), per group of responses to one problem:

        λ_j = 0.5 − (len_j − min_len)/(max_len − min_len);  reward_j = λ_j if correct_j else min(0, λ_j);
        all lengths equal in the group → 0.

    lengths: [k] or [G, k] (int or float, ≥ 0); correct: same shape, bool or 0/1. Returns float32 of that shape,
    values in [−0.5, 0.5]. It is added to the task reward with a weight, after a warm-up without it.
    """
    lens = _as_groups("lengths", lengths, dtypes=(*_INTS, *_FLOATS)).to(torch.float64)
    ok = _as_groups("correct", correct, dtypes=(torch.bool, *_INTS, *_FLOATS))
    check_same_shape(("lengths", "correct"), lengths, correct)
    check_finite("lengths", lens)
    check_range("lengths", lens, low=0)
    if ok.dtype != torch.bool:
        if bool(((ok != 0) & (ok != 1)).any()):
            raise ValueError(f"correct: expected booleans or 0/1 values, got {sorted(set(ok.flatten().tolist()))}")
        ok = ok != 0
    lo = lens.min(dim=1, keepdim=True).values  # [G, 1]
    hi = lens.max(dim=1, keepdim=True).values  # [G, 1]
    spread = hi - lo
    lam = torch.where(spread > 0, 0.5 - (lens - lo) / torch.where(spread > 0, spread, 1.0), 0.0)  # [G, k]
    reward = torch.where(ok, lam, lam.clamp(max=0.0))
    return reward.to(torch.float32).reshape(lengths.shape)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    logp_ref: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    eps: float = 1e-6,
    aggregation: str = "sequence",
) -> torch.Tensor:
    """GRPO (DeepSeekMath §4.1) for comparison with k1.5 in the same harness (scalar loss, to minimise):

        A_gj = (r_gj − r̄_g)/(std_g + eps),  ρ_t = exp(log πθ(y_t) − log π_old(y_t)),
        o_t = min(ρ_t A, clip(ρ_t, 1 − clip_eps, 1 + clip_eps) A) − β (e^{q_t} − q_t − 1),  q_t = log π_ref − log πθ
        "sequence": L = −(1/(Gk)) Σ_gj (1/|y_gj|) Σ_t o_t        "token": L = −Σ_gjt o_t / Σ_gj |y_gj|

    logp_new/logp_old/logp_ref: [G, k, T] per-token log-probs (only logp_new carries a gradient); rewards: [G, k];
    mask: [G, k, T] bool or 0/1 (every response needs ≥ 1 token). ``logp_ref`` is required when β > 0.
    """
    check_tensor("logp_new", logp_new, ndim=3, dtypes=_FLOATS)
    groups, k, _ = logp_new.shape
    if groups == 0:
        raise ValueError(f"logp_new: expected at least one group, got shape {tuple(logp_new.shape)} (no groups)")
    if k < 2:
        raise ValueError(
            f"logp_new: expected groups of at least 2 responses (GRPO's group-normalised advantage needs k >= 2), "
            f"got {k} (shape {tuple(logp_new.shape)})"
        )
    check_tensor("logp_old", logp_old, dtypes=_FLOATS)
    check_tensor("mask", mask, dtypes=(torch.bool, *_FLOATS))
    check_same_shape(("logp_new", "logp_old", "mask"), logp_new, logp_old, mask)
    check_tensor("rewards", rewards, shape=(groups, k), dtypes=_FLOATS)
    check_in("aggregation", aggregation, ("sequence", "token"))
    if not (math.isfinite(clip_eps) and 0 < clip_eps < 1):
        raise ValueError(f"clip_eps: expected a value in (0, 1), got {clip_eps!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta: expected a finite value >= 0, got {beta!r}")
    if beta > 0:
        if logp_ref is None:
            raise ValueError(
                f"logp_ref: expected the reference policy's per-token log-probs when beta > 0 (beta={beta})"
            )
        check_tensor("logp_ref", logp_ref, dtypes=_FLOATS)
        check_same_shape(("logp_new", "logp_ref"), logp_new, logp_ref)
    m = mask.to(logp_new.dtype)  # [G, k, T]
    n_tokens = m.sum(-1)  # [G, k]
    if bool((n_tokens == 0).any()):
        first = tuple(int(i) for i in (n_tokens == 0).nonzero()[0])
        raise ValueError(f"mask: expected at least one token per response, got an empty response at (g, j) = {first}")
    adv = group_advantages(rewards.detach(), scale_by_std=True, eps=eps).to(logp_new.dtype)[..., None]  # [G, k, 1]
    # Padded positions may hold anything (even -inf): zero their log-ratios before exponentiating.
    log_ratio = torch.where(m > 0, logp_new - logp_old.detach().to(logp_new.dtype), 0.0)  # [G, k, T]
    ratio = log_ratio.exp()
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [G, k, T]
    if beta > 0:
        q = torch.where(m > 0, logp_ref.detach().to(logp_new.dtype) - logp_new, 0.0)
        objective = objective - beta * (q.exp() - q - 1)
    objective = objective * m
    if aggregation == "sequence":
        return -(objective.sum(-1) / n_tokens).mean()
    return -objective.sum() / n_tokens.sum()


def token_logprobs_reference(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager spec of the fused kernel: per-token log-probability of the target and entropy of the next-token law.

        z = h Wᵀ / temperature  [..., V],  logp = log_softmax(z)[target],  H = −Σ_v softmax(z)_v log_softmax(z)_v

    hidden: [..., D]; lm_head_weight: [V, D]; targets: [...] int. Math in fp32 (fp64 if the inputs are fp64);
    this materialises the [..., V] logits, which is exactly what the kernel avoids. Returns (logp, entropy), [...].
    """
    _check_logprob_inputs(hidden, lm_head_weight, targets, temperature)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden.to(acc) @ lm_head_weight.to(acc).t()) / temperature  # [..., V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [..., V]
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [...]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [...]
    return logp, entropy


def policy_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) per token, [...], by the eager reference or the fused Triton kernel (``backend="triton"``).

    The RL loop calls this for the new policy (with gradients) and for the old/reference policies (under no_grad).
    """
    check_in("backend", backend, ("reference", "triton"))
    if backend == "reference":
        return token_logprobs_reference(hidden, lm_head_weight, targets, temperature)
    return token_logprobs(hidden, lm_head_weight, targets, temperature=temperature)

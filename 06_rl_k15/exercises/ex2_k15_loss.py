"""Exercise 2 (easy): the k1.5 policy-mirror-descent loss and its gradient, Eq. 3 of the paper (§2.3.2).

Task. For G groups of k responses sampled from the old policy π_old, with sequence log-probabilities
ℓ_gj = log πθ(y_gj | x_g) (new policy, carries the gradient), ℓ_gj^old (old policy) and rewards r_gj:

    r̄_g = (1/k) Σ_j r_gj                                                    the group's mean reward
    L    = (1/G) Σ_g (1/k) Σ_j [ −(r_gj − r̄_g) ℓ_gj + (τ/2) (ℓ_gj − ℓ_gj^old)² ]

Write three functions:

1. ``k15_loss``: L as a scalar. ``logp_old`` and ``rewards`` are data: no gradient flows into them.
2. ``k15_loss_grad``: ∂L/∂ℓ_gj, written by hand (no autograd):
       ∂L/∂ℓ_gj = (1/(G k)) [ −(r_gj − r̄_g) + τ (ℓ_gj − ℓ_gj^old) ].
3. ``eq3_policy_gradient``: −∇_θ L for a toy policy, a softmax over A whole responses per group,
   πθ(a | g) = softmax(θ_g)_a with θ [G, A]. The k responses of group g are the actions a_gj, so
   ℓ_gj = log softmax(θ_g)_{a_gj} and ∇_{θ_g} ℓ_gj = onehot(a_gj) − softmax(θ_g). Eq. 3 then reads

       −∇_{θ_g} L = (1/G) (1/k) Σ_j [ (r_gj − r̄_g) − τ (ℓ_gj − ℓ_gj^old) ] (onehot(a_gj) − softmax(θ_g)).

   On-policy (θ = θ_old) the penalty term vanishes and this is REINFORCE with a mean-reward baseline.

Shapes: logp_new, logp_old, rewards [G, k] or [k] (one group); τ > 0; k ≥ 2. theta, theta_old [G, A] float;
actions [G, k] int64 in [0, A); rewards [G, k]. ``k15_loss`` returns a 0-d tensor; ``k15_loss_grad`` the shape
of logp_new; ``eq3_policy_gradient`` [G, A].

Hints. ``rewards.mean(-1, keepdim=True)`` works for [k] and [G, k] alike. ``torch.nn.functional.one_hot`` builds
the one-hot rows. The grader compares your gradients with autograd through the chapter's ``k15_loss``.
"""

from __future__ import annotations

import torch


def k15_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """The k1.5 surrogate L (scalar), averaged over groups and responses."""
    # YOUR CODE HERE (roughly 3 lines)
    raise NotImplementedError


def k15_loss_grad(logp_new: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """∂L/∂ℓ_new by hand: (−(r − r̄) + τ (ℓ − ℓ^old)) / (G·k), shaped like ``logp_new``."""
    # YOUR CODE HERE (roughly 2 lines)
    raise NotImplementedError


def eq3_policy_gradient(
    theta: torch.Tensor, theta_old: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, tau: float
) -> torch.Tensor:
    """−∇_θ L of the toy softmax policy, by Eq. 3 (no autograd): ``[G, A]``."""
    # YOUR CODE HERE (roughly 7 lines)
    raise NotImplementedError

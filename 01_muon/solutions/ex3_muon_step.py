"""Exercise 3 (medium): Moonlight's learning-rate adjustment and one Muon step.

Task. One Muon step on a weight ``W: [A, B]`` (or a stack of E independent matrices ``[E, A, B]``, MoE experts)
with gradient ``G_t`` and momentum buffer ``M``, all updated in place::

    M_t = β·M_{t−1} + (1 − β)·G_t                  EMA momentum (the buffer starts at zero)
    U_t = (1 − β)·G_t + β·M_t   if nesterov        the look-ahead
          M_t                   otherwise
    O_t = NS₅(U_t)                                 per matrix: ≈ U Vᵀ of U_t = U Σ Vᵀ
    W_t = (1 − η·λ)·W_{t−1} − η·s(A, B)·O_t        decoupled weight decay with the *unadjusted* η

and the scale ``s(A, B)`` of the last two dimensions, by ``adjust_lr``:

    "match_rms_adamw":  s = 0.2·√max(A, B)         (Moonlight Eq. 4) a full-rank orthogonal A×B matrix has RMS
                                                   1/√max(A, B), so s·O_t has RMS ≈ 0.2, AdamW's; Muon can then
                                                   reuse AdamW's η and λ
    "original":         s = √max(1, A/B)           (Keller Jordan)
    None:               s = 1

Write
1. ``lr_adjustment(shape, adjust_lr)`` → float; any other ``adjust_lr`` raises ValueError naming ``adjust_lr``,
   the modes allowed and the value given.
2. ``muon_step_(param, grad, momentum_buffer, *, lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr)``:
   updates ``param`` and ``momentum_buffer`` in place, leaves ``grad`` unchanged, returns None.

Use ``nanokimi.muon.newton_schulz(U, steps=ns_steps)`` for ``O_t`` (exercise 1 wrote it): it treats the leading
dimension of a 3-D tensor as a batch, which is exactly "each expert matrix on its own".

Hints.
- Keep the buffer in the EMA form above. The classical ``M = β·M + G`` gives the same direction after NS's
  normalisation but a different buffer, and the grader compares the buffer too.
- ``grad`` must survive the step (an in-place ``grad.lerp_``, as in Keller Jordan's original code, is the trap):
  compute the Nesterov look-ahead into a new tensor.
- Weight decay multiplies by ``1 − η·λ`` with the plain η, not ``η·s``.
- A zero gradient gives ``O_t = 0``: the weight then only decays.
"""

from __future__ import annotations

import math

import torch

from nanokimi.muon import newton_schulz

ADJUST_LR_MODES = ("match_rms_adamw", "original", None)


def lr_adjustment(shape: tuple[int, ...] | torch.Size, adjust_lr: str | None) -> float:
    """The factor ``s(A, B)`` of the learning rate for a Muon update of a parameter ``[..., A, B]``."""
    A, B = int(shape[-2]), int(shape[-1])  # the matrix is the last two dimensions
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if adjust_lr == "original":
        return math.sqrt(max(1.0, A / B))
    if adjust_lr is None:
        return 1.0
    raise ValueError(f"adjust_lr: expected one of {list(ADJUST_LR_MODES)!r}, got {adjust_lr!r}")


def muon_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    adjust_lr: str | None,
) -> None:
    """One Muon step on ``param: [A, B]`` or ``[E, A, B]``, in place (``param`` and ``momentum_buffer``)."""
    scale = lr_adjustment(param.shape, adjust_lr)  # validate before touching any state
    momentum_buffer.mul_(momentum).add_(grad, alpha=1 - momentum)  # M_t = β·M + (1 − β)·G
    update = (1 - momentum) * grad + momentum * momentum_buffer if nesterov else momentum_buffer  # U_t, a new tensor
    ortho = newton_schulz(update, steps=ns_steps)  # O_t, each [A, B] matrix on its own
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay with the unadjusted η
    param.add_(ortho, alpha=-lr * scale)  # − η·s(A, B)·O_t

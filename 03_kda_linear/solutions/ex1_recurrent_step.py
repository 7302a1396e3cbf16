"""Exercise 1 (easy): one token of Kimi Delta Attention, the recurrence that defines everything else.

Task. Write ``kda_step``: apply one token to the state of every (batch, head)::

    S ← Diag(exp g) S                    decay: key channel c of the state is multiplied by exp(g_c) ≤ 1
    S ← S + β k (v − Sᵀ k)ᵀ              delta rule: what the decayed state recalls for k is moved towards v
    o = Sᵀ (scale · q)                   read the new state with the query

Equivalently ``S_t = (I − β k kᵀ) Diag(exp g) S_{t−1} + β k vᵀ``. Then write ``kda_token_loop``, which runs
``kda_step`` over a sequence (the chapter's ``kda_recurrent``, the spec every faster form is tested against).

Shapes. q, k, g ``[B, H, K]``; v ``[B, H, V]``; beta ``[B, H]``; state ``[B, H, K, V]``; returns
``(o [B, H, V], new_state [B, H, K, V])``. For the loop: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta
``[B, T, H]`` → ``(o [B, T, H, V], S_T)``. Compute in the inputs' dtype (the grader uses float64).

Hints.
* ``torch.einsum("bhk,bhkv->bhv", k, S)`` is ``Sᵀ k`` per (batch, head).
* The outer product ``β k (v − Sᵀk)ᵀ`` is ``einsum("bhk,bhv->bhkv", ...)``.
* ``scale`` defaults to ``K ** -0.5``.
"""

from __future__ import annotations

import torch


def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``(o [B, H, V], new_state [B, H, K, V])``; ``state`` itself is left unchanged."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = state * g.exp()[..., None]  # decay each key channel (row of S)
    recalled = torch.einsum("bhk,bhkv->bhv", k, S)  # what the decayed state returns for k
    S = S + torch.einsum("bhk,bhv->bhkv", beta[..., None] * k, v - recalled)  # move that recall towards v
    o = torch.einsum("bhk,bhkv->bhv", q * scale, S)
    return o, S


def kda_token_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token loop with ``kda_step``: ``(o [B, T, H, V], S_T [B, H, K, V])``; no initial state means zeros."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        o_t, S = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, scale)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V)
    return o, S

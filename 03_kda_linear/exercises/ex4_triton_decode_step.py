"""Exercise 4 (hard, Triton): the fused decoding step, one token of KDA on a [K, BV] slice of the state.

Task. Write the Triton kernel ``_decode_step_kernel``. During generation each new token applies one step of the
recurrence (exercise 1) to a state that stays in GPU memory::

    S ← Diag(exp g) S;     S ← S + β k (v − Sᵀ k)ᵀ;     o = Sᵀ (scale · q)

One program handles one (batch·head) ``bh = program_id(1)`` and one block of ``BV`` value columns
``program_id(0)``: columns of S evolve independently (every operation above mixes rows, never columns), so the
[K, V] state can be split along V across programs with no communication. The program loads its [BK, BV] slice
of S (BK ≥ K rows, masked), q, k, g ``[BK]``, its slice of v ``[BV]`` and β (a scalar), all as fp32, applies the
three lines, and stores the new slice of S and its slice of o.

Memory layout (all contiguous): q, k, g ``[B·H, K]``; v and o ``[B·H, V]``; beta ``[B·H]``; s_in and s_out
``[B·H, K, V]``, element (bh, c, j) at ``bh·K·V + c·V + j``. The launcher ``decode_step`` below is given: it
validates the inputs and launches the grid ``(⌈V / BV⌉, B·H)``.

The grader runs it under the Triton interpreter (CPU, fp32) against ``nanokimi.kda.reference.kda_step`` in
float64 (rel_err ≤ 1e-5) with K and V that are not powers of two (so masks matter), V not a multiple of BV, and
β = 0 / g = 0 edge cases; it also checks that s_in is left unchanged.

Hints.
* Offsets: ``o_k = tl.arange(0, BK)``, ``o_v = pid_v·BV + tl.arange(0, BV)``; masks ``o_k < K``, ``o_v < V``.
  Every load needs a mask (and ``other=0.0``), every store too.
* ``Sᵀk`` for the slice is ``tl.sum(k[:, None] * S, axis=0)`` → ``[BV]``.
* Use ``bh.to(tl.int64)`` before multiplying by ``K·V`` (large states overflow 32-bit offsets).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_tensor
from nanokimi.triton_utils import ensure_cuda_or_interpreter


@triton.jit
def _decode_step_kernel(
    q,  # [B·H, K]
    k,  # [B·H, K]
    v,  # [B·H, V]
    g,  # [B·H, K]
    beta,  # [B·H]
    s_in,  # [B·H, K, V] fp32
    s_out,  # [B·H, K, V] fp32
    o,  # [B·H, V]
    scale,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """One token on the [BK, BV] slice ``(bh, :, pid_v·BV …)`` of the state."""
    # YOUR CODE HERE (roughly 18 lines)
    raise NotImplementedError


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    block_v: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, g ``[B, H, K]``; v ``[B, H, V]``; beta ``[B, H]``; state ``[B, H, K, V]`` fp32 →
    ``(o [B, H, V] in q's dtype, new_state [B, H, K, V] fp32)``; ``state`` is not modified."""
    check_tensor("q", q, ndim=3)
    B, H, K = q.shape
    check_tensor("state", state, shape=(B, H, K, None), dtypes=(torch.float32,))
    V = state.shape[-1]
    check_tensor("k", k, shape=(B, H, K))
    check_tensor("v", v, shape=(B, H, V))
    check_tensor("g", g, shape=(B, H, K))
    check_tensor("beta", beta, shape=(B, H))
    ensure_cuda_or_interpreter(q, k, v, g, beta, state, names=("q", "k", "v", "g", "beta", "state"))
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g, beta, s_in = (t.contiguous() for t in (q, k, v, g, beta, state))
    s_out = torch.empty_like(s_in)
    o = torch.empty(B, H, V, dtype=q.dtype, device=q.device)
    BK = max(16, triton.next_power_of_2(K))
    _decode_step_kernel[(triton.cdiv(V, block_v), B * H)](
        q, k, v, g, beta, s_in, s_out, o, scale, K=K, V=V, BK=BK, BV=block_v
    )
    return o, s_out

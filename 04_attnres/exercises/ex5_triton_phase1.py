"""Exercise 5 (hard, Triton): phase 1, depth attention with a fused RMSNorm, one pass over the sources.

Task. Phase 1 scores S pseudo-queries against N sources (the completed block sums) for every token and returns
the normalised outputs and the log-sum-exps that phase 2 merges into (exercises 3 and 4)::

    z_{s,i} = r_i (u_s · v_i),   r_i = 1 / sqrt(mean_d(v_i²) + ε),   u_s = q_s ⊙ g_s
    lse_s = log Σ_i e^{z_{s,i}},   out_s = Σ_i e^{z_{s,i} − lse_s} v_i          sources v [N, M, D], queries [S, D]

Write a kernel in which one program takes a tile of BLOCK_M tokens and one query s (grid ``(⌈M / BLOCK_M⌉, S)``)
and reads every source once, in order, keeping an online softmax over depth: running max m, running sum ℓ of
e^{z − m} and running unnormalised output acc, rescaled whenever the max grows. Adding source i is exactly
exercise 3's merge of the sources so far with the one-source set {v_i}::

    m' = max(m, z_i),   ℓ' = ℓ e^{m − m'} + e^{z_i − m'},   acc' = acc e^{m − m'} + e^{z_i − m'} v_i
    after the last source:  out = acc / ℓ,   lse = m + log ℓ          (m = −inf, ℓ = 0, acc = 0 before the first)

(The chapter's kernel instead serves all S queries in one program and walks D in chunks twice; this one keeps
whole rows, BLOCK_D = next power of two ≥ D, and reads the sources S times, once per query.)

Then write the launcher ``depth_attention_triton``: flatten the token dims (sources [N, ..., D] → [N, M, D]),
fold the norm weight into the queries in float32, launch once, and return out [S, ..., D] in the sources' dtype
and lse [S, ...] in float32.

The grader runs N = 1 … 9 sources, S = 1 … 3 queries, M = 1 … 37 tokens, D = 1 … 100 (not powers of two), logits
of several hundred (e^z overflows float32 above 88), a source of all zeros, float32 (out to 1e-5, lse to 1e-6
against the float64 reference ``batched_depth_attention``) and bfloat16 sources (out to 1e-2). It fills the outputs
with NaN first, catches stores past their end, and replaces ``_phase1_kernel`` by a recorder to check the launch
grid, so keep that name.

Hints.
- Source i's [BLOCK_M, BLOCK_D] tile starts at ``values_ptr + i · M · D``; ``for i in range(N)`` with a runtime N
  is fine. Cast offsets to int64 (``rows.to(tl.int64)``) before multiplying by D.
- Rows past M load as zeros: their logits are 0, finite, so the running max never stays −inf after source 0;
  just never store them.
- ``tl.maximum``, ``tl.exp``, ``tl.log``, ``tl.rsqrt``, ``tl.sum(…, axis=1)``; ``tl.full((BLOCK_M,), float("-inf"),
  tl.float32)`` starts m.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import nanokimi  # noqa: F401 (sets TRITON_INTERPRET=1 on a machine without CUDA, before the kernels are defined)


@triton.jit
def _phase1_kernel(
    values_ptr,  # [N, M, D] sources
    u_ptr,  # [S, D] fp32 effective queries q ⊙ g
    out_ptr,  # [S, M, D] normalised outputs (sources' dtype)
    lse_ptr,  # [S, M] fp32
    N,
    M,
    D,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tokens [program_id(0)·BLOCK_M, +BLOCK_M) and query program_id(1): out and lse by an online softmax over N."""
    # YOUR CODE HERE (roughly 25 lines)
    raise NotImplementedError


def depth_attention_triton(
    sources: torch.Tensor,
    queries: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_m: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: sources [N, ..., D], queries [S, D], norm_weight [S, D] or None → out [S, ..., D], lse [S, ...]."""
    # YOUR CODE HERE (roughly 12 lines)
    raise NotImplementedError

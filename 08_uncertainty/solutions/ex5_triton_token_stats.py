"""Exercise 5 (hard, Triton): max-prob, entropy and logsumexp of each row in one online pass over the vocabulary.

Task. The three single-pass baselines (MSP, entropy, energy) need, per row z ∈ R^V of logits, the statistics

    lse = log Σ_v e^{z_v},      max-prob = max_v p_v = e^{max z − lse},      H = −Σ_v p_v log p_v      (p = softmax z)

Eager torch reads the [N, V] logits several times. Write a kernel that reads them once: one program owns BLOCK_N
rows and walks their columns in tiles of BLOCK_V, keeping per row a running max m, s = Σ e^{z−m} and
u = Σ e^{z−m}(z − m). When a tile raises the max from m to m' (α = e^{m−m'}):

    s' = α·s + Σ_tile e^{z−m'}
    u' = α·(u + (m − m')·s) + Σ_tile e^{z−m'}(z − m')          (each old term's (z − m) becomes (z − m'))

and after the last tile, since p_v = e^{z_v−m}/s and log p_v = (z_v − m) − log s:

    lse = m + log s,      max-prob = 1/s,      H = log s − u/s

−inf entries (a masked vocabulary) contribute nothing. A row whose entries are all −inf has s = 0: return
lse = −inf and NaN max-prob and entropy there, as torch does.

Write ``_token_stats_kernel`` and the launcher ``token_stats(logits, block_n, block_v)``. The grader calls only
the launcher, with block sizes smaller than N and V (so the loop over tiles and the row tails matter); change
the kernel's signature if you like.

Shapes: ``logits`` [N, V] fp32 or bf16 (N, V ≥ 1; the row stride may exceed V, the column stride is 1).
Returns ``(max_prob, entropy, lse)``, each [N] fp32.

Hints.
- Load masked-off columns as −inf and convert the tile to fp32 (``.to(tl.float32)``) before any math.
- Until a row has seen a finite value, m = −inf, and e^{m − m'} = e^{−inf + inf} is NaN. Shift by 0 instead
  while the new max is still −inf (``tl.where``): s = u = 0 then, so the correction terms vanish whatever they
  are, as long as they are not NaN.
- A −inf entry gives e^{z−m'} = 0 but (z − m')·0 = −inf·0 = NaN in u. Clamp z − m' to a very negative finite
  number (``tl.maximum(z - m_new[:, None], -3.0e38)``) so that the product is 0.
- ``tl.full([BLOCK_N], float("-inf"), tl.float32)`` and ``tl.zeros([BLOCK_N], tl.float32)`` start m, s and u.
- Do not call ``nanokimi.uncertainty.token_uncertainty`` (the chapter's kernel: the grader compares with its
  fp64 torch reference ``token_uncertainty_reference``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_stats_kernel(
    logits_ptr,  # [N, V] fp32 or bf16, unit column stride
    stride_row,
    max_prob_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    N,
    V,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Rows [program_id(0)·BLOCK_N, +BLOCK_N): the running (m, s, u) over V in BLOCK_V tiles, then the statistics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max
    s = tl.zeros([BLOCK_N], tl.float32)  # Σ e^{z−m}
    u = tl.zeros([BLOCK_N], tl.float32)  # Σ e^{z−m}(z − m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = tl.load(logits_ptr + rows[:, None] * stride_row + cols[None, :], mask=ok, other=float("-inf"))
        z = z.to(tl.float32)  # [BLOCK_N, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no −inf − (−inf) while a row has seen only −inf
        m_old = tl.where(m == float("-inf"), m_safe, m)  # s = u = 0 then: any finite stand-in for m will do
        alpha = tl.exp(m_old - m_safe)
        centred = tl.maximum(z - m_safe[:, None], -3.0e38)  # −inf entries → a finite very negative number
        weight = tl.exp(centred)  # e^{z−m'}, 0 for −inf entries
        u = alpha * (u + (m_old - m_safe) * s) + tl.sum(weight * centred, axis=1)
        s = alpha * s + tl.sum(weight, axis=1)
        m = m_new
    alive = s > 0  # the row had a finite entry
    s_safe = tl.where(alive, s, 1.0)
    log_s = tl.log(s_safe)
    tl.store(lse_ptr + rows, tl.where(alive, m + log_s, float("-inf")), mask=row_ok)
    tl.store(max_prob_ptr + rows, tl.where(alive, 1.0 / s_safe, float("nan")), mask=row_ok)
    tl.store(entropy_ptr + rows, tl.where(alive, log_s - u / s_safe, float("nan")), mask=row_ok)


def token_stats(
    logits: torch.Tensor, block_n: int = 4, block_v: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(max_prob, entropy, lse)``, each [N] fp32, of ``logits`` [N, V] by one pass of ``_token_stats_kernel``."""
    n_rows, n_vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    max_prob, entropy, lse = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    grid = (triton.cdiv(n_rows, block_n),)
    _token_stats_kernel[grid](
        logits, logits.stride(0), max_prob, entropy, lse, n_rows, n_vocab, BLOCK_N=block_n, BLOCK_V=block_v
    )
    return max_prob, entropy, lse

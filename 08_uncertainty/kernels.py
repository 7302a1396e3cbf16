"""Fused per-row uncertainty statistics: max softmax probability, entropy and logsumexp in one pass over V.

Math. For a row z ∈ R^V (entries finite or −inf), walk the vocabulary in tiles keeping a running max m,
s = Σ e^{z−m} and u = Σ e^{z−m}(z − m):

    m' = max(m, max_tile z),   s' = e^{m−m'} s + Σ_tile e^{z−m'},   u' = e^{m−m'} (u + (m − m') s) + Σ_tile e^{z−m'}(z − m')

and at the end lse = m + log s, max-prob = e^{m − lse} = 1/s, entropy H = −Σ p log p = log s − u/s.
(p_v = e^{z_v − m}/s and log p_v = (z_v − m) − log s, so −Σ p log p = log s − u/s.) −inf entries add nothing;
a row with no finite entry keeps s = 0 and gives lse = −inf and NaN max-prob and entropy, as torch does.

Tiling: one program owns BLOCK_N rows and walks their V columns in BLOCK_V tiles, reading every logit once
(in its own dtype, math in fp32) and writing 3 fp32 numbers per row: the kernel is bound by reading the logits,
N·V·bytes, which is what the benchmark compares with the H100's copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_tensor
from nanokimi.triton_utils import autotune_configs, ensure_cuda_or_interpreter

__all__ = ["token_uncertainty"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_CONFIGS = [
    # The first config suits the interpreter's tiny shapes (it is the only one used there). The rest were picked
    # for [8192, 32K–160K] rows on the H100: bf16 rows prefer few warps per row (cheap reductions), fp32 wide tiles.
    triton.Config({"BLOCK_N": 4, "BLOCK_V": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 1024}, num_warps=1, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=1, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 1024}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 1, "BLOCK_V": 8192}, num_warps=16, num_stages=1),
    triton.Config({"BLOCK_N": 2, "BLOCK_V": 2048}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["V"])
@triton.jit
def _uncertainty_kernel(
    x_ptr,  # [N, V] logits
    stride_x,
    max_prob_ptr,  # [N] fp32
    entropy_ptr,  # [N] fp32
    lse_ptr,  # [N] fp32
    N,
    V,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    row_off = rows.to(tl.int64) * stride_x
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While a row has seen only −inf, shift by 0 instead of −inf so that no −inf − (−inf) appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        m_prev = tl.where(m == float("-inf"), shift, m)  # s = u = 0 then, so the correction term is 0
        alpha = tl.exp(m - shift)
        # −inf entries: clamp z − m to the most negative float, so that e^{z−m} = 0 and e^{z−m}(z−m) = 0 (not NaN).
        centred = tl.maximum(z - shift[:, None], -3.0e38)  # [BLOCK_N, BLOCK_V]
        p = tl.exp(centred)
        u = alpha * (u + (m_prev - shift) * s) + tl.sum(p * centred, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    alive = s > 0
    log_s = tl.log(tl.where(alive, s, 1.0))
    lse = tl.where(alive, m + log_s, float("-inf"))
    max_prob = tl.where(alive, 1.0 / tl.where(alive, s, 1.0), float("nan"))
    entropy = tl.where(alive, log_s - u / tl.where(alive, s, 1.0), float("nan"))
    tl.store(max_prob_ptr + rows, max_prob, mask=row_ok)
    tl.store(entropy_ptr + rows, entropy, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


def token_uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max-prob, entropy, logsumexp) of each row of ``logits`` [..., V] (fp32/bf16/fp16), each [...] fp32.

    Entries may be −inf; +inf and NaN entries are not supported (they give NaN). One read of the logits.
    """
    check_tensor("logits", logits, dtypes=_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    ensure_cuda_or_interpreter(logits, names=("logits",))
    lead, n_vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    rows = logits.reshape(-1, n_vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows = rows.shape[0]
    outs = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n_rows:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),)
        _uncertainty_kernel[grid](rows, rows.stride(0), *outs, n_rows, n_vocab)
    return tuple(o.reshape(lead) for o in outs)

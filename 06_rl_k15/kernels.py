"""Fused lm-head log-probabilities and entropies, without materialising the [T, V] logits.

Math. Token t has hidden state h_t ∈ R^D, the lm head W ∈ R^{V×D}, sampling temperature θ and target y_t:

    z_tv = (h_t · w_v)/θ,   lse_t = log Σ_v e^{z_tv},   logp_t = z_{t,y_t} − lse_t,   H_t = lse_t − Σ_v p_tv z_tv

computed *online* over vocabulary tiles with a running max m, s = Σ e^{z−m} and u = Σ e^{z−m}(z−m):

    m' = max(m, max_tile z),  s' = e^{m−m'} s + Σ_tile e^{z−m'},  u' = e^{m−m'} (u + (m−m') s) + Σ_tile e^{z−m'}(z−m')
    lse = m + log s,   H = log s − u/s,   and z_{t,y_t} is picked up by the tile that holds column y_t.

Backward, with upstream gradients a_t = ∂L/∂logp_t and b_t = ∂L/∂H_t (p = softmax(z)):

    ∂L/∂z_tv = a_t (1[v = y_t] − p_tv) − b_t p_tv (log p_tv + H_t)
    ∂L/∂h_t = (1/θ) Σ_v ∂L/∂z_tv w_v,     ∂L/∂w_v = (1/θ) Σ_t ∂L/∂z_tv h_t

Tiling. The vocabulary is cut into chunks of ``chunk`` columns. Per chunk one GEMM (cuBLAS via ``torch.mm``) writes
the [T, chunk] logits into a reused buffer; a Triton program then covers BLOCK_T rows of that buffer, walking its
columns in BLOCK_V tiles, and folds them into the per-row running (m, s, u, z_target) [forward] or overwrites them
with ∂L/∂z in place [backward]. Two GEMMs turn each ∂L/∂z chunk into its rows of ∂L/∂W (written once, no
accumulation) and a contribution to ∂L/∂h (accumulated in fp32 by the GEMM). The backward walks the chunks last to
first: the forward's buffer still holds the last chunk's logits, so that chunk needs no recompute. The GEMMs stay in
cuBLAS on purpose: they are ≥ 95% of the FLOPs and cuBLAS runs them near the H100's peak; what the kernels remove
is the memory traffic and footprint of the fp32 [T, V] logits, softmax and gradient tensors.

Cost: forward 2TVD FLOPs; backward 4TVD for the two gradient GEMMs plus 2T(V − last chunk)D to recompute logits
(eager autograd keeps the logits instead: 6TVD in all). Extra memory: T·chunk logits (input dtype, held from the
forward to the backward) + a T·D fp32 accumulator, versus several fp32 [T, V] tensors in the eager path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_positive_int, check_range, check_tensor
from nanokimi.triton_utils import ensure_cuda_or_interpreter, interpreting

__all__ = ["token_logprobs"]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32)


def _check_logprob_inputs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    dtypes: tuple[torch.dtype, ...] = _FLOATS,
) -> None:
    """Shared validation of the reference and the kernel: hidden [..., D], weight [V, D], targets [...] in [0, V)."""
    check_tensor("hidden", hidden, dtypes=dtypes)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., D], got a 0-d tensor")
    d_model = hidden.shape[-1]
    check_tensor("lm_head_weight", lm_head_weight, shape=(None, d_model), dtypes=(hidden.dtype,))
    check_tensor("targets", targets, shape=tuple(hidden.shape[:-1]), dtypes=_INTS)
    if lm_head_weight.shape[0] == 0:
        raise ValueError(
            f"lm_head_weight: expected a vocabulary of at least 1 entry, got shape {tuple(lm_head_weight.shape)}"
        )
    check_range("targets", targets, low=0, high=lm_head_weight.shape[0] - 1)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature: expected a positive float, got {type(temperature).__name__} {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature!r}")


@triton.jit
def _online_lse_chunk_kernel(
    z_ptr,  # [T, n_cols] logits of one vocabulary chunk (before the 1/θ scale)
    stride_z,
    tgt_ptr,  # [T] target ids (global vocabulary index)
    m_ptr,  # [T] fp32 running max            (read and written)
    s_ptr,  # [T] fp32 running Σ e^{z−m}      (read and written)
    u_ptr,  # [T] fp32 running Σ e^{z−m}(z−m) (read and written)
    zt_ptr,  # [T] fp32 target logit           (read and written)
    T,
    n_cols,
    v_start,  # global vocabulary index of the chunk's first column
    scale,  # 1/θ
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    row_ok = rows < T
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    tgt_col = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64) - v_start  # column in this chunk
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=ok, other=float("-inf"))
        # Padded rows become all-zero rows (finite math, never stored); padded columns stay −inf (weight 0).
        z = tl.where(row_ok[:, None], z.to(tl.float32) * scale, 0.0)  # [BLOCK_T, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has >= 1 real column
        # m = −inf before the first chunk (s = u = 0 then): shift from m_new instead, so no −inf·0 appears.
        m_old = tl.where(m == float("-inf"), m_new, m)
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # [BLOCK_T, BLOCK_V], 0 on padded columns
        centred = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        u = alpha * (u + (m_old - m_new) * s) + tl.sum(p * centred, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
        is_target = (cols[None, :] == tgt_col[:, None]) & col_ok[None, :]  # a padded column may share the index
        zt += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(u_ptr + rows, u, mask=row_ok)
    tl.store(zt_ptr + rows, zt, mask=row_ok)


@triton.jit
def _dlogits_chunk_kernel(
    z_ptr,  # [T, n_cols] logits of one chunk in, ∂L/∂(raw logits) out (in place, same dtype)
    stride_z,
    tgt_ptr,  # [T]
    lse_ptr,  # [T] fp32
    ent_ptr,  # [T] fp32 entropy H
    g_logp_ptr,  # [T] fp32 a = ∂L/∂logp
    g_ent_ptr,  # [T] fp32 b = ∂L/∂H
    T,
    n_cols,
    v_start,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    tgt_col = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64) - v_start
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None].to(tl.int64) * stride_z + cols[None, :]
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale
        logp = z - lse[:, None]  # [BLOCK_T, BLOCK_V]
        p = tl.exp(logp)
        grad = -p * (a[:, None] + b[:, None] * (logp + ent[:, None]))
        grad += tl.where(cols[None, :] == tgt_col[:, None], a[:, None], 0.0)
        tl.store(z_ptr + offs, (grad * scale).to(z_ptr.dtype.element_ty), mask=ok)


def _row_tiles() -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_V, num_warps): tiny tiles for the interpreter; compiled, one row per program in
    2048-wide tiles over 4 warps (the config the uncertainty kernel of chapter 08 autotunes to on bf16 rows)."""
    return (16, 32, 4) if interpreting() else (1, 2048, 4)


def _chunks(n_vocab: int, chunk: int):
    for v_start in range(0, n_vocab, chunk):
        yield v_start, min(chunk, n_vocab - v_start)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, temperature):  # hidden [T, D], weight [V, D], targets [T]
        n_tok, n_vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        scale = 1.0 / temperature
        m = torch.full((n_tok,), float("-inf"), dtype=torch.float32, device=dev)
        s = torch.zeros(n_tok, dtype=torch.float32, device=dev)
        u = torch.zeros(n_tok, dtype=torch.float32, device=dev)
        z_target = torch.zeros(n_tok, dtype=torch.float32, device=dev)
        block_t, block_v, warps = _row_tiles()
        buf = torch.empty(n_tok * min(chunk, n_vocab), dtype=hidden.dtype, device=dev)
        for v_start, n_cols in _chunks(n_vocab, chunk):
            z = buf[: n_tok * n_cols].view(n_tok, n_cols)
            torch.mm(hidden, weight[v_start : v_start + n_cols].t(), out=z)  # [T, n_cols]
            _online_lse_chunk_kernel[(triton.cdiv(n_tok, block_t),)](
                z, z.stride(0), targets, m, s, u, z_target, n_tok, n_cols, v_start, scale,
                BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps,
            )  # fmt: skip
        log_s = s.log()
        lse = m + log_s
        logp = z_target - lse
        entropy = log_s - u / s
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk, ctx.scale = chunk, scale
        # The buffer still holds the last chunk's logits: the backward starts with that chunk and skips its GEMM.
        ctx.logits_buffer = buf if any(ctx.needs_input_grad[:2]) else None
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        n_tok, d_model = hidden.shape
        n_vocab = weight.shape[0]
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        zeros = torch.zeros(n_tok, dtype=torch.float32, device=hidden.device)
        a = zeros if g_logp is None else g_logp.to(torch.float32).contiguous()
        b = zeros if g_entropy is None else g_entropy.to(torch.float32).contiguous()
        dh_acc = torch.zeros(n_tok, d_model, dtype=torch.float32, device=hidden.device) if want_dh else None
        dw = torch.empty_like(weight) if want_dw else None
        block_t, block_v, warps = _row_tiles()
        # Valid once: this backward overwrites the buffer (a second backward, retain_graph=True, recomputes all).
        buf, ctx.logits_buffer = ctx.logits_buffer, None
        last_chunk_cached = buf is not None
        if buf is None:
            buf = torch.empty(n_tok * min(ctx.chunk, n_vocab), dtype=hidden.dtype, device=hidden.device)
        for i, (v_start, n_cols) in enumerate(reversed(list(_chunks(n_vocab, ctx.chunk)))):
            w_chunk = weight[v_start : v_start + n_cols]  # [n_cols, D]
            z = buf[: n_tok * n_cols].view(n_tok, n_cols)
            if i > 0 or not last_chunk_cached:
                torch.mm(hidden, w_chunk.t(), out=z)  # recompute the chunk's logits
            _dlogits_chunk_kernel[(triton.cdiv(n_tok, block_t),)](
                z, z.stride(0), targets, lse, entropy, a, b, n_tok, n_cols, v_start, ctx.scale,
                BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps,
            )  # fmt: skip
            if want_dw:
                torch.mm(z.t(), hidden, out=dw[v_start : v_start + n_cols])  # [n_cols, D]
            if want_dh:  # dh += ∂L/∂z · W_chunk, accumulated in fp32 by the GEMM itself
                if z.dtype == torch.float32:
                    dh_acc.addmm_(z, w_chunk)
                else:
                    torch.addmm(dh_acc, z, w_chunk, out_dtype=torch.float32, out=dh_acc)
        dh = dh_acc.to(hidden.dtype) if want_dh else None
        return dh, dw, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 16384,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(target) and entropy of softmax(hidden·Wᵀ/temperature), fused and differentiable.

    hidden: [..., D] fp32, or bf16/fp16 on the GPU; lm_head_weight: [V, D] same dtype; targets: [...] int64/int32
    in [0, V); chunk: vocabulary columns per GEMM (the [T, chunk] buffer is the only logits ever held; with
    gradients on it is kept from the forward to the backward); temperature: > 0. Returns (logp, entropy), each
    [...] fp32. Gradients flow to hidden and lm_head_weight through both outputs.
    """
    _check_logprob_inputs(hidden, lm_head_weight, targets, temperature, dtypes=_KERNEL_FLOATS)
    check_positive_int("chunk", chunk)
    if interpreting() and hidden.dtype != torch.float32:
        raise TypeError(
            f"hidden: expected float32 under the Triton interpreter (bf16/fp16 run compiled on the GPU), "
            f"got {str(hidden.dtype).replace('torch.', '')}"
        )
    ensure_cuda_or_interpreter(hidden, lm_head_weight, targets, names=("hidden", "lm_head_weight", "targets"))
    lead = tuple(hidden.shape[:-1])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if flat_hidden.shape[0] == 0:
        empty = flat_hidden.sum(-1).float()  # keeps the graph for an empty batch
        return empty.reshape(lead), empty.reshape(lead)
    logp, entropy = _TokenLogprobs.apply(
        flat_hidden.contiguous(),
        lm_head_weight.contiguous(),
        targets.reshape(-1).contiguous(),
        chunk,
        float(temperature),
    )
    return logp.reshape(lead), entropy.reshape(lead)

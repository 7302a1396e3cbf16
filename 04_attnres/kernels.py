"""Fused Triton kernels for Attention Residuals: phase 1 (batched depth attention) and phase 2 (online merge),
forward and backward.

Math (per token; D = width, u_s = q_s ⊙ g_s the query with the RMSNorm weight folded in, r_i = rms(v_i)⁻¹)::

    phase 1   z_{s,i} = r_i (u_s · v_i),  lse_s = log Σ_i e^{z_{s,i}},  p_{s,i} = e^{z_{s,i} − lse_s},
              o_s = Σ_i p_{s,i} v_i                                   sources v [N, M, D], queries u [S, D]
    phase 2   z = r_x (u · x),  w = σ(z − lse1),  h = o1 + w (x − o1)  (= softmax merge of {phase-1 sources, x})

Backward (dz = ∂L/∂z; the RMSNorm Jacobian gives ∂z_{s,i}/∂v_i = r_i u_s − z_{s,i} r_i² v_i / D)::

    phase 1   dp_{s,i} = do_s · v_i,  dz_{s,i} = p_{s,i} (dp_{s,i} − do_s · o_s + dlse_s)
              dv_i = Σ_s p_{s,i} do_s + Σ_s a_{s,i} u_s − (r_i²/D) (Σ_s dz_{s,i} z_{s,i}) v_i,  a_{s,i} = dz_{s,i} r_i
              du_s = Σ_tokens Σ_i a_{s,i} v_i,  dq = du ⊙ g,  dg = du ⊙ q
    phase 2   do1 = (1 − w) dh,  dz = w (1 − w) dh · (x − o1),  dlse1 = −dz,
              dx = w dh + dz r_x u − dz z r_x² x / D (+ the gradient of x's other uses)

What one program computes:

* phase 1: D is walked in chunks of ``BLOCK_D`` twice. Pass 1 reads every source once to build the logits;
  pass 2 walks the chunks in reverse order (the chunks read last are still in L2) to write the S outputs. Forward
  and backward programs take a tile of ``BLOCK_M`` tokens ([BLOCK_M, S, BLOCK_D] tiles of the outputs, or of do;
  the backward's pass 1 also forms dp = do·v, its pass 2 writes the N source gradients). The source count N is a
  runtime loop: one compiled kernel serves every N up to ``N_PAD``.
* phase 2 (fwd and bwd): ``BLOCK_M`` whole rows (``BLOCK_D ≥ D``, so D ≤ 16384) in one pass, like a fused RMSNorm.
* query gradients: du is a reduction over all tokens, so the backward kernels store a = dz·r per token and a
  separate kernel forms du = Σ_i a_iᵀ v_i with ``tl.dot`` over token splits (grid: D chunks × splits,
  deterministic, no atomics); a last kernel adds the splits and applies the chain rule through u = q ⊙ g.

Memory traffic is the cost (the op is memory-bound): phase 1 reads N·D and writes S·D elements per token; the
backward reads N·D + S·D and writes N·D. All math is fp32; outputs are stored in the sources' dtype (the merge
step's running sum x in ``sum_dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_positive_int, check_tensor
from nanokimi.triton_utils import ensure_cuda_or_interpreter

__all__ = [
    "depth_attention_triton",
    "online_merge_triton",
    "merge_step_triton",
    "depth_attention_cached_triton",
    "MAX_MERGE_DIM",
]

MAX_MERGE_DIM = 16384  # phase 2 keeps whole rows in registers
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "M", "S"])
def _phase1_fwd_kernel(
    values_ptr,  # [N, M, D] sources
    u_ptr,  # [S, D] fp32 effective queries
    out_ptr,  # [S, M, D] normalised outputs (sources' dtype)
    lse_ptr,  # [S, M] fp32
    N,
    M,
    D,
    S,
    eps,
    WRITE_OUT: tl.constexpr,
    S_PAD: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    row_off = tl.cast(rows, tl.int64) * D  # [BM]
    plane = tl.cast(M, tl.int64) * D  # elements per source (and per output)
    s_idx = tl.arange(0, S_PAD)
    s_ok = s_idx < S
    n_idx = tl.arange(0, N_PAD)
    cols = tl.arange(0, BLOCK_D)

    # pass 1: Σ v² and u_s·v_i for every (token, query, source)
    sumsq = tl.zeros([BLOCK_M, N_PAD], tl.float32)
    dots = tl.zeros([BLOCK_M, S_PAD, N_PAD], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        c_ok = c < D
        u = tl.load(u_ptr + s_idx[:, None] * D + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        for i in range(N):
            v_ptrs = values_ptr + tl.cast(i, tl.int64) * plane + row_off[:, None] + c[None, :]
            v = tl.load(v_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BM, BD]
            is_i = n_idx == i
            sumsq += tl.where(is_i[None, :], tl.sum(v * v, axis=1)[:, None], 0.0)
            dots += tl.where(is_i[None, None, :], tl.sum(v[:, None, :] * u[None, :, :], axis=2)[:, :, None], 0.0)

    inv_rms = tl.rsqrt(sumsq / D + eps)  # [BM, N_PAD]
    logits = tl.where((n_idx < N)[None, None, :], dots * inv_rms[:, None, :], float("-inf"))  # [BM, S_PAD, N_PAD]
    row_max = tl.max(logits, axis=2)
    lse = row_max + tl.log(tl.sum(tl.exp(logits - row_max[:, :, None]), axis=2))  # [BM, S_PAD]
    s_off = tl.cast(s_idx, tl.int64)
    tl.store(lse_ptr + s_off[None, :] * M + rows[:, None], lse, mask=row_ok[:, None] & s_ok[None, :])

    if WRITE_OUT:
        probs = tl.exp(logits - lse[:, :, None])  # [BM, S_PAD, N_PAD]; 0 for padded sources
        n_chunks = (D + BLOCK_D - 1) // BLOCK_D
        for k in range(n_chunks):
            d0 = (n_chunks - 1 - k) * BLOCK_D  # reverse order: the chunks pass 1 read last are still cached
            c = d0 + cols
            c_ok = c < D
            acc = tl.zeros([BLOCK_M, S_PAD, BLOCK_D], tl.float32)
            for i in range(N):
                v_ptrs = values_ptr + tl.cast(i, tl.int64) * plane + row_off[:, None] + c[None, :]
                v = tl.load(v_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                p_i = tl.sum(tl.where((n_idx == i)[None, None, :], probs, 0.0), axis=2)  # [BM, S_PAD]
                acc += p_i[:, :, None] * v[:, None, :]
            o_ptrs = out_ptr + s_off[None, :, None] * plane + row_off[:, None, None] + c[None, None, :]
            o_mask = row_ok[:, None, None] & s_ok[None, :, None] & c_ok[None, None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["N", "M", "S"])
def _phase1_bwd_kernel(
    values_ptr,  # [N, M, D]
    u_ptr,  # [S, D] fp32
    dout_ptr,  # [S, M, D] (read only if HAS_DOUT)
    dlse_ptr,  # [S, M] fp32 (read only if HAS_DLSE)
    dvalues_ptr,  # [N, M, D] sources' dtype
    a_ptr,  # [N, M, S] fp32: a = dz·r, for the query-gradient reduction
    N,
    M,
    D,
    S,
    eps,
    HAS_DOUT: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    S_PAD: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A tile of BLOCK_M tokens per program, like the forward: [BLOCK_M, S_PAD, BLOCK_D] tiles of do, one
    # [BLOCK_M, BLOCK_D] source tile at a time, [BLOCK_M, S_PAD, N_PAD] statistics.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    row_off = tl.cast(rows, tl.int64) * D  # [BM]
    plane = tl.cast(M, tl.int64) * D
    s_idx = tl.arange(0, S_PAD)
    s_ok = s_idx < S
    s_off = tl.cast(s_idx, tl.int64)
    n_idx = tl.arange(0, N_PAD)
    n_ok = n_idx < N
    cols = tl.arange(0, BLOCK_D)

    # pass 1: Σ v², u_s·v_i and (with an output gradient) dp_{s,i} = do_s·v_i for every token of the tile
    sumsq = tl.zeros([BLOCK_M, N_PAD], tl.float32)
    dots = tl.zeros([BLOCK_M, S_PAD, N_PAD], tl.float32)
    dps = tl.zeros([BLOCK_M, S_PAD, N_PAD], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        c_ok = c < D
        u = tl.load(u_ptr + s_idx[:, None] * D + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DOUT:
            do_ptrs = dout_ptr + s_off[None, :, None] * plane + row_off[:, None, None] + c[None, None, :]
            do_mask = row_ok[:, None, None] & s_ok[None, :, None] & c_ok[None, None, :]
            do = tl.load(do_ptrs, mask=do_mask, other=0.0).to(tl.float32)  # [BM, S_PAD, BD]
        for i in range(N):
            v_ptrs = values_ptr + tl.cast(i, tl.int64) * plane + row_off[:, None] + c[None, :]
            v = tl.load(v_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BM, BD]
            is_i = n_idx == i
            sumsq += tl.where(is_i[None, :], tl.sum(v * v, axis=1)[:, None], 0.0)
            dots += tl.where(is_i[None, None, :], tl.sum(v[:, None, :] * u[None, :, :], axis=2)[:, :, None], 0.0)
            if HAS_DOUT:
                dps += tl.where(is_i[None, None, :], tl.sum(do * v[:, None, :], axis=2)[:, :, None], 0.0)

    inv_rms = tl.rsqrt(sumsq / D + eps)  # [BM, N_PAD]
    logits = tl.where(n_ok[None, None, :], dots * inv_rms[:, None, :], float("-inf"))  # [BM, S_PAD, N_PAD]
    row_max = tl.max(logits, axis=2)
    lse = row_max + tl.log(tl.sum(tl.exp(logits - row_max[:, :, None]), axis=2))  # [BM, S_PAD]
    probs = tl.exp(logits - lse[:, :, None])  # [BM, S_PAD, N_PAD]
    dlogits = tl.zeros([BLOCK_M, S_PAD, N_PAD], tl.float32)
    if HAS_DOUT:
        expected = tl.sum(probs * dps, axis=2)  # do_s · o_s
        dlogits += probs * (dps - expected[:, :, None])
    if HAS_DLSE:
        dlse_mask = row_ok[:, None] & s_ok[None, :]
        dlse = tl.load(dlse_ptr + s_off[None, :] * M + rows[:, None], mask=dlse_mask, other=0.0)  # [BM, S_PAD]
        dlogits += probs * dlse[:, :, None]
    a = dlogits * inv_rms[:, None, :]  # ∂L/∂(u_s · v_i)
    b = tl.sum(dlogits * tl.where(n_ok[None, None, :], logits, 0.0), axis=1) * inv_rms * inv_rms / D  # [BM, N_PAD]
    a_ptrs = a_ptr + (tl.cast(n_idx, tl.int64)[None, None, :] * M + rows[:, None, None]) * S + s_idx[None, :, None]
    tl.store(a_ptrs, a, mask=row_ok[:, None, None] & s_ok[None, :, None] & n_ok[None, None, :])

    # pass 2 (chunks in reverse: the chunks pass 1 read last are still cached): dv_i = Σ_s (p_{s,i} do_s + a_{s,i} u_s)
    # − b_i v_i
    n_chunks = (D + BLOCK_D - 1) // BLOCK_D
    for k in range(n_chunks):
        d0 = (n_chunks - 1 - k) * BLOCK_D
        c = d0 + cols
        c_ok = c < D
        u = tl.load(u_ptr + s_idx[:, None] * D + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DOUT:
            do_ptrs = dout_ptr + s_off[None, :, None] * plane + row_off[:, None, None] + c[None, None, :]
            do_mask = row_ok[:, None, None] & s_ok[None, :, None] & c_ok[None, None, :]
            do = tl.load(do_ptrs, mask=do_mask, other=0.0).to(tl.float32)
        for i in range(N):
            v_ptrs = values_ptr + tl.cast(i, tl.int64) * plane + row_off[:, None] + c[None, :]
            v = tl.load(v_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BM, BD]
            is_i = (n_idx == i)[None, None, :]
            a_i = tl.sum(tl.where(is_i, a, 0.0), axis=2)  # [BM, S_PAD]
            b_i = tl.sum(tl.where((n_idx == i)[None, :], b, 0.0), axis=1)  # [BM]
            mix = a_i[:, :, None] * u[None, :, :]  # [BM, S_PAD, BD]
            if HAS_DOUT:
                mix += tl.sum(tl.where(is_i, probs, 0.0), axis=2)[:, :, None] * do
            dv = tl.sum(mix, axis=1) - b_i[:, None] * v  # [BM, BD]
            dv_ptrs = dvalues_ptr + tl.cast(i, tl.int64) * plane + row_off[:, None] + c[None, :]
            tl.store(dv_ptrs, dv.to(dvalues_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _merge_fwd_kernel(
    out1_ptr,  # [M, D] phase-1 output
    lse1_ptr,  # [M] fp32
    partial_ptr,  # [M, D] running partial sum
    update_ptr,  # [M, D] newest sublayer output (read only if HAS_UPDATE)
    u_ptr,  # [D] fp32
    h_ptr,  # [M, D] merged output
    x_ptr,  # [M, D] partial + update (written only if HAS_UPDATE)
    M,
    D,
    eps,
    HAS_UPDATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    offs = tl.cast(rows, tl.int64)[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    x = tl.load(partial_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BM, BD]
    if HAS_UPDATE:
        x += tl.load(update_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)  # the stored partial sum is what the merge (and its backward) sees
        tl.store(x_ptr + offs, x, mask=mask)
        x = x.to(tl.float32)
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    o1 = tl.load(out1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lse1 = tl.load(lse1_ptr + rows, mask=row_ok, other=0.0)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # [BM]
    z = tl.sum(x * u[None, :], axis=1) * inv_rms
    w = tl.sigmoid(z - lse1)  # softmax weight of x against the phase-1 sources
    h = o1 + w[:, None] * (x - o1)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _merge_bwd_kernel(
    out1_ptr,  # [M, D]
    lse1_ptr,  # [M] fp32
    x_ptr,  # [M, D] the partial sum the forward merged
    u_ptr,  # [D] fp32
    dh_ptr,  # [M, D]
    dx_in_ptr,  # [M, D] gradient of x from its other uses (read only if HAS_DX_IN)
    dout1_ptr,  # [M, D]
    dlse1_ptr,  # [M] fp32
    dx_ptr,  # [M, D]
    a_ptr,  # [M] fp32: dz·r_x
    M,
    D,
    eps,
    HAS_DX_IN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    offs = tl.cast(rows, tl.int64)[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o1 = tl.load(out1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    lse1 = tl.load(lse1_ptr + rows, mask=row_ok, other=0.0)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    z = tl.sum(x * u[None, :], axis=1) * inv_rms
    w = tl.sigmoid(z - lse1)
    dz = tl.sum(dh * (x - o1), axis=1) * w * (1.0 - w)  # [BM]
    a = dz * inv_rms
    b = dz * z * inv_rms * inv_rms / D
    dx = w[:, None] * dh + a[:, None] * u[None, :] - b[:, None] * x
    if HAS_DX_IN:
        dx += tl.load(dx_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dout1_ptr + offs, ((1.0 - w)[:, None] * dh).to(dout1_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dlse1_ptr + rows, -dz, mask=row_ok)
    tl.store(a_ptr + rows, a, mask=row_ok)


@triton.jit(do_not_specialize=["N", "M", "S", "tokens_per_split"])
def _query_grad_partial_kernel(
    values_ptr,  # [N, M, D]
    a_ptr,  # [N, M, S] fp32
    partial_ptr,  # [G, S, D] fp32: one row per token split
    N,
    M,
    D,
    S,
    tokens_per_split,
    S_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # du = Σ_i a_iᵀ v_i over this split's tokens: a matmul [S, T] @ [T, D] per source, one [S_DOT, BLOCK_D] slice of
    # it per program (S padded to tl.dot's minimum of 16; fp32 "ieee" products so the gradient stays fp32-accurate)
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    s_idx = tl.arange(0, S_DOT)
    s_ok = s_idx < S
    plane = tl.cast(M, tl.int64) * D
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, M)
    acc = tl.zeros([S_DOT, BLOCK_D], tl.float32)
    for i in range(N):
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < t_end
            v_ptrs = values_ptr + tl.cast(i, tl.int64) * plane + tl.cast(t, tl.int64)[:, None] * D + c[None, :]
            v = tl.load(v_ptrs, mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BT, BD]
            a_ptrs = a_ptr + (tl.cast(i, tl.int64) * M + t)[:, None] * S + s_idx[None, :]
            a_tile = tl.load(a_ptrs, mask=t_ok[:, None] & s_ok[None, :], other=0.0)  # [BT, S_DOT]
            acc += tl.dot(tl.trans(a_tile), v, input_precision="ieee")  # [S_DOT, BD]
    out_ptrs = partial_ptr + (tl.cast(split, tl.int64) * S + s_idx[:, None]) * D + c[None, :]
    tl.store(out_ptrs, acc, mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _query_grad_finish_kernel(
    partial_ptr,  # [G, S, D] fp32
    q_ptr,  # [S, D] fp32
    g_ptr,  # [S, D] fp32 (read only if HAS_NORM)
    dq_ptr,  # [S, D] fp32
    dg_ptr,  # [S, D] fp32 (written only if HAS_NORM)
    G,
    S,
    D,
    HAS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(1)
    c_ok = c < D
    du = tl.zeros([BLOCK_D], tl.float32)
    for split in range(G):
        du += tl.load(partial_ptr + (split * S + s) * D + c, mask=c_ok, other=0.0)
    if HAS_NORM:
        q = tl.load(q_ptr + s * D + c, mask=c_ok, other=0.0)
        g = tl.load(g_ptr + s * D + c, mask=c_ok, other=0.0)
        tl.store(dq_ptr + s * D + c, du * g, mask=c_ok)
        tl.store(dg_ptr + s * D + c, du * q, mask=c_ok)
    else:
        tl.store(dq_ptr + s * D + c, du, mask=c_ok)


# --------------------------------------------------------------------------------------------------------------
# tile sizes (fixed rules rather than autotuning: one compile per shape class, cheap under test)
# --------------------------------------------------------------------------------------------------------------
def _phase1_meta(d: int, s_pad: int) -> dict:
    """Forward: [BLOCK_M, S_PAD, BLOCK_D] temporaries of ≤ 4096 fp32 (BLOCK_M = 4, BLOCK_D = 128 at S = 8 measured
    best on the H100 among 8 tilings)."""
    block_d = min(128, triton.next_power_of_2(d))
    block_m = max(1, min(16, 4096 // (s_pad * block_d)))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": 4}


def _phase1_bwd_meta(d: int, s_pad: int) -> dict:
    """Backward: [BLOCK_M, S_PAD, BLOCK_D] tiles of ≤ 4096 fp32, like the forward (one token per program left the
    H100 latency-bound: 10.97 ms for fwd+bwd at N = 5, S = 8, 16K tokens, D = 2048)."""
    block_d = min(128, triton.next_power_of_2(d))
    block_m = max(1, min(16, 4096 // (s_pad * block_d)))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": 4}


def _merge_meta(d: int) -> dict:
    """Whole rows; about 4096 elements per tile."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": max(1, min(16, block_m * block_d // 512))}


def _query_grad_meta(m: int, d: int) -> dict:
    """[BLOCK_T, BLOCK_D] tiles of values (tl.dot needs every dim ≥ 16); about 1024 programs over
    (D chunks × token splits)."""
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    block_t = 64
    splits = max(1, min(triton.cdiv(m, block_t), 1024 // triton.cdiv(d, block_d)))
    tokens_per_split = triton.cdiv(triton.cdiv(m, splits), block_t) * block_t
    return {
        "BLOCK_T": block_t,
        "BLOCK_D": block_d,
        "splits": triton.cdiv(m, tokens_per_split),
        "tokens_per_split": tokens_per_split,
    }


# --------------------------------------------------------------------------------------------------------------
# launchers on flat tensors: values [N, M, D], effective queries u [S, D] fp32
# --------------------------------------------------------------------------------------------------------------
def _effective_queries(queries: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """u = q ⊙ g in fp32, [S, D]."""
    u = queries.float() if norm_weight is None else queries.float() * norm_weight.float()
    return u.contiguous()


def _phase1_forward(
    values: torch.Tensor, u: torch.Tensor, eps: float, write_out: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    n, m, d = values.shape
    s = u.shape[0]
    lse = torch.empty((s, m), dtype=torch.float32, device=values.device)
    out = torch.empty((s, m, d), dtype=values.dtype, device=values.device) if write_out else None
    if m:
        s_pad, n_pad = triton.next_power_of_2(s), triton.next_power_of_2(n)
        meta = _phase1_meta(d, s_pad)
        grid = (triton.cdiv(m, meta["BLOCK_M"]),)
        _phase1_fwd_kernel[grid](
            values,
            u,
            out if write_out else lse,
            lse,
            n,
            m,
            d,
            s,
            eps,
            WRITE_OUT=write_out,
            S_PAD=s_pad,
            N_PAD=n_pad,
            **meta,
        )
    return out, lse


def _phase1_backward(
    values: torch.Tensor, u: torch.Tensor, eps: float, dout: torch.Tensor | None, dlse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dvalues [N, M, D] and a = dz·r [N, M, S] (fp32) for the query-gradient reduction."""
    n, m, d = values.shape
    s = u.shape[0]
    dvalues = torch.empty_like(values)
    a = torch.empty((n, m, s), dtype=torch.float32, device=values.device)
    if m:
        s_pad, n_pad = triton.next_power_of_2(s), triton.next_power_of_2(n)
        meta = _phase1_bwd_meta(d, s_pad)
        _phase1_bwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            values,
            u,
            values if dout is None else dout,
            a if dlse is None else dlse,
            dvalues,
            a,
            n,
            m,
            d,
            s,
            eps,
            HAS_DOUT=dout is not None,
            HAS_DLSE=dlse is not None,
            S_PAD=s_pad,
            N_PAD=n_pad,
            **meta,
        )
    return dvalues, a


def _query_grads(
    values: torch.Tensor, a: torch.Tensor, queries: torch.Tensor, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """du_s = Σ_{tokens, i} a[i, t, s] values[i, t]; dq = du ⊙ g, dg = du ⊙ q (dq = du without a norm weight)."""
    n, m, d = values.shape
    s = queries.shape[0]
    meta = _query_grad_meta(max(m, 1), d)
    splits = meta["splits"]
    partial = torch.empty((splits, s, d), dtype=torch.float32, device=values.device)
    _query_grad_partial_kernel[(triton.cdiv(d, meta["BLOCK_D"]), splits)](
        values,
        a,
        partial,
        n,
        m,
        d,
        s,
        meta["tokens_per_split"],
        S_DOT=max(16, triton.next_power_of_2(s)),
        BLOCK_T=meta["BLOCK_T"],
        BLOCK_D=meta["BLOCK_D"],
        num_warps=4,
    )
    q = queries.float().contiguous()
    g = None if norm_weight is None else norm_weight.float().contiguous()
    dq = torch.empty((s, d), dtype=torch.float32, device=values.device)
    dg = None if g is None else torch.empty_like(dq)
    block_d = min(1024, triton.next_power_of_2(d))
    _query_grad_finish_kernel[(triton.cdiv(d, block_d), s)](
        partial,
        q,
        q if g is None else g,
        dq,
        dq if dg is None else dg,
        splits,
        s,
        d,
        HAS_NORM=g is not None,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return dq.to(queries.dtype), None if dg is None else dg.to(norm_weight.dtype)


def _merge_forward(
    out1: torch.Tensor,
    lse1: torch.Tensor,
    partial: torch.Tensor,
    update: torch.Tensor | None,
    u: torch.Tensor,
    eps: float,
    sum_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, D] and the merged partial sum x (= partial + update stored in ``sum_dtype``, or partial itself)."""
    m, d = partial.shape
    h = torch.empty_like(out1)
    x = torch.empty((m, d), dtype=sum_dtype, device=partial.device) if update is not None else partial
    if m:
        meta = _merge_meta(d)
        _merge_fwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            out1,
            lse1,
            partial,
            partial if update is None else update,
            u,
            h,
            x,
            m,
            d,
            eps,
            HAS_UPDATE=update is not None,
            **meta,
        )
    return h, x


def _merge_backward(out1, lse1, x, u, eps, dh, dx_in):
    """do1 [M, D], dlse1 [M], dx [M, D] (including dx_in), a = dz·r [M]."""
    m, d = x.shape
    dout1 = torch.empty_like(out1)
    dx = torch.empty_like(x)
    dlse1 = torch.empty((m,), dtype=torch.float32, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        meta = _merge_meta(d)
        _merge_bwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            out1,
            lse1,
            x,
            u,
            dh,
            x if dx_in is None else dx_in,
            dout1,
            dlse1,
            dx,
            a,
            m,
            d,
            eps,
            HAS_DX_IN=dx_in is not None,
            **meta,
        )
    return dout1, dlse1, dx, a


# --------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------
class _DepthAttention(torch.autograd.Function):
    """Phase 1 on a stacked source tensor [N, ..., D]."""

    @staticmethod
    def forward(ctx, sources, queries, norm_weight, eps):
        n, d = sources.shape[0], sources.shape[-1]
        lead = tuple(sources.shape[1:-1])
        values = sources.contiguous().view(n, -1, d)  # [N, M, D]
        out, lse = _phase1_forward(values, _effective_queries(queries, norm_weight), eps, write_out=True)
        ctx.save_for_backward(values, queries, norm_weight)
        ctx.eps, ctx.source_shape = eps, tuple(sources.shape)
        ctx.set_materialize_grads(False)
        s = queries.shape[0]
        return out.view(s, *lead, d), lse.view(s, *lead)

    @staticmethod
    def backward(ctx, dout, dlse):
        values, queries, norm_weight = ctx.saved_tensors
        s, m, d = queries.shape[0], values.shape[1], values.shape[2]
        dout = None if dout is None else dout.contiguous().view(s, m, d)
        dlse = None if dlse is None else dlse.float().contiguous().view(s, m)
        u = _effective_queries(queries, norm_weight)
        dvalues, a = _phase1_backward(values, u, ctx.eps, dout, dlse)
        dq, dg = _query_grads(values, a, queries, norm_weight)
        return dvalues.view(ctx.source_shape), dq, dg, None


class _DepthAttentionOverBlocks(torch.autograd.Function):
    """Phase 1 over the first ``n`` rows of a block cache, with gradients routed to the block tensors.

    The cache [≥n, ..., D] already holds the values of ``blocks`` (the caller copied each block in once), so no
    stacking copy is made per call. It is kept on ``ctx`` rather than saved: the caller appends rows ≥ n in place
    later in the same forward, which would trip autograd's version check although rows < n never change.
    """

    @staticmethod
    def forward(ctx, cache, queries, norm_weight, eps, with_out, *blocks):
        n, d = len(blocks), cache.shape[-1]
        lead = tuple(cache.shape[1:-1])
        values = cache[:n].view(n, -1, d)
        out, lse = _phase1_forward(values, _effective_queries(queries, norm_weight), eps, write_out=with_out)
        ctx.values = values
        ctx.save_for_backward(queries, norm_weight)
        ctx.eps, ctx.with_out, ctx.block_shape = eps, with_out, tuple(cache.shape[1:])
        ctx.set_materialize_grads(False)
        s = queries.shape[0]
        if with_out:
            return out.view(s, *lead, d), lse.view(s, *lead)
        return lse.view(s, *lead)

    @staticmethod
    def backward(ctx, *grads):
        queries, norm_weight = ctx.saved_tensors
        values = ctx.values
        s, (n, m, d) = queries.shape[0], values.shape
        dout = grads[0] if ctx.with_out else None
        dlse = grads[-1]
        dout = None if dout is None else dout.contiguous().view(s, m, d)
        dlse = None if dlse is None else dlse.float().contiguous().view(s, m)
        u = _effective_queries(queries, norm_weight)
        dvalues, a = _phase1_backward(values, u, ctx.eps, dout, dlse)
        dq, dg = _query_grads(values, a, queries, norm_weight)
        return (None, dq, dg, None, None, *dvalues.view(n, *ctx.block_shape).unbind(0))


class _OnlineMerge(torch.autograd.Function):
    """Phase 2, optionally advancing the partial sum first (x = partial + update)."""

    @staticmethod
    def forward(ctx, out1, lse1, partial, update, query, norm_weight, eps, sum_dtype):
        shape, d = tuple(partial.shape), partial.shape[-1]
        out1_2d = out1.contiguous().view(-1, d)
        lse1_1d = lse1.float().contiguous().view(-1)
        partial_2d = partial.contiguous().view(-1, d)
        update_2d = None if update is None else update.contiguous().view(-1, d)
        u = _effective_queries(query[None], None if norm_weight is None else norm_weight[None])[0]
        h, x = _merge_forward(out1_2d, lse1_1d, partial_2d, update_2d, u, eps, sum_dtype)
        ctx.save_for_backward(out1_2d, lse1_1d, x, query, norm_weight)
        ctx.eps, ctx.shape, ctx.has_update = eps, shape, update is not None
        ctx.lse_dtype = lse1.dtype
        ctx.set_materialize_grads(False)
        if update is None:
            return h.view(shape)
        return h.view(shape), x.view(shape)

    @staticmethod
    def backward(ctx, dh, dx_out=None):
        out1, lse1, x, query, norm_weight = ctx.saved_tensors
        dh = torch.zeros_like(x) if dh is None else dh.contiguous().view_as(x)
        dx_in = None if dx_out is None else dx_out.contiguous().view_as(x)
        u = _effective_queries(query[None], None if norm_weight is None else norm_weight[None])[0]
        dout1, dlse1, dx, a = _merge_backward(out1, lse1, x, u, ctx.eps, dh, dx_in)
        dq, dg = _query_grads(
            x[None], a.view(1, -1, 1), query[None], None if norm_weight is None else norm_weight[None]
        )
        dx = dx.view(ctx.shape)
        return (
            dout1.view(ctx.shape),
            dlse1.view(ctx.shape[:-1]).to(ctx.lse_dtype),
            dx,
            dx if ctx.has_update else None,  # ∂(partial + update)/∂partial = ∂/∂update = identity
            dq[0],
            None if dg is None else dg[0],
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------
def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    return float(eps)


def _check_queries(queries: torch.Tensor, norm_weight: torch.Tensor | None, d: int, device: torch.device) -> None:
    check_tensor("queries", queries, shape=(None, d), dtypes=_KERNEL_DTYPES)
    if queries.shape[0] < 1:
        raise ValueError(f"queries: expected at least one query (shape (S >= 1, {d})), got {tuple(queries.shape)}")
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=tuple(queries.shape), dtypes=_KERNEL_DTYPES)
    for name, t in (("queries", queries), ("norm_weight", norm_weight)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (that of the sources), got one on {t.device}")


def depth_attention_triton(
    sources: torch.Tensor, queries: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 (fused RMSNorm + depth softmax + weighted sum), differentiable in all three tensors.

    sources [N, ..., D] (fp32/bf16/fp16), queries [S, D], norm_weight [S, D] or None →
    out [S, ..., D] (sources' dtype), lse [S, ...] (fp32). Matches ``reference.batched_depth_attention``.
    """
    check_tensor("sources", sources, dtypes=_KERNEL_DTYPES)
    if sources.dim() < 2 or sources.shape[0] < 1:
        raise ValueError(f"sources: expected shape (N >= 1, ..., D), got {tuple(sources.shape)}")
    _check_queries(queries, norm_weight, sources.shape[-1], sources.device)
    eps = _check_eps(eps)
    ensure_cuda_or_interpreter(sources, names=("sources",))
    return _DepthAttention.apply(sources, queries, norm_weight, eps)


def depth_attention_cached_triton(
    cache: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    queries: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    with_out: bool = True,
):
    """Phase 1 over ``blocks`` whose values already sit in ``cache[:len(blocks)]`` (no per-call stacking).

    cache [≥N, ..., D] holds the blocks' values (a no-grad buffer the caller appends to); blocks: N tensors
    [..., D] that receive the gradients. Returns (out [S, ..., D], lse [S, ...]), or lse only when ``with_out`` is
    False (a single source is its own output, so only its logits are needed).
    """
    check_tensor("cache", cache, dtypes=_KERNEL_DTYPES)
    n = check_positive_int("len(blocks)", len(blocks))
    if cache.dim() < 2 or cache.shape[0] < n or not cache.is_contiguous():
        raise ValueError(f"cache: expected a contiguous tensor of shape (>= {n}, ..., D), got {tuple(cache.shape)}")
    for i, b in enumerate(blocks):
        check_tensor(f"blocks[{i}]", b, shape=tuple(cache.shape[1:]))
    _check_queries(queries, norm_weight, cache.shape[-1], cache.device)
    eps = _check_eps(eps)
    ensure_cuda_or_interpreter(cache, names=("cache",))
    return _DepthAttentionOverBlocks.apply(cache, queries, norm_weight, eps, bool(with_out), *blocks)


def _check_merge(out1, lse1, partial, update, query, norm_weight) -> int:
    check_tensor("partial", partial, dtypes=_KERNEL_DTYPES)
    if partial.dim() < 1:
        raise ValueError(f"partial: expected shape (..., D), got {tuple(partial.shape)}")
    d = partial.shape[-1]
    if d > MAX_MERGE_DIM:
        raise ValueError(f"partial: expected D <= {MAX_MERGE_DIM} (phase 2 keeps whole rows on chip), got D = {d}")
    check_tensor("out1", out1, shape=tuple(partial.shape), dtypes=_KERNEL_DTYPES)
    check_tensor("lse1", lse1, shape=tuple(partial.shape[:-1]), dtypes=_KERNEL_DTYPES)
    if update is not None:
        check_tensor("update", update, shape=tuple(partial.shape), dtypes=_KERNEL_DTYPES)
    check_tensor("query", query, shape=(d,), dtypes=_KERNEL_DTYPES)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=(d,), dtypes=_KERNEL_DTYPES)
    tensors = [out1, lse1, partial, query] + [t for t in (update, norm_weight) if t is not None]
    names = ["out1", "lse1", "partial", "query"] + [
        n for n, t in (("update", update), ("norm_weight", norm_weight)) if t is not None
    ]
    ensure_cuda_or_interpreter(*tensors, names=names)
    return d


def online_merge_triton(
    out1: torch.Tensor,
    lse1: torch.Tensor,
    partial: torch.Tensor,
    query: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Phase 2: h = softmax merge of a phase-1 result (out1 [..., D], lse1 [...]) with the partial sum
    (partial [..., D]) under query [D] (norm_weight [D] or None). Matches ``reference.online_merge``."""
    _check_merge(out1, lse1, partial, None, query, norm_weight)
    return _OnlineMerge.apply(out1, lse1, partial, None, query, norm_weight, _check_eps(eps), partial.dtype)


def merge_step_triton(
    out1: torch.Tensor,
    lse1: torch.Tensor,
    partial: torch.Tensor,
    update: torch.Tensor,
    query: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    sum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Block AttnRes step fused: x = partial + update (stored in ``sum_dtype``, default partial's), then phase 2
    with x.

    Returns (h [..., D] in out1's dtype, x [..., D]) = (``online_merge(out1, lse1, x, …)``, x): one pass over the
    rows instead of an add kernel followed by a merge kernel. A bf16 stream passes ``sum_dtype=torch.float32`` so
    that a block's running sum is not rounded to bf16 at every step (the rounding errors would accumulate along
    the block, then be amplified by every later sublayer).
    """
    _check_merge(out1, lse1, partial, update, query, norm_weight)
    if sum_dtype is None:
        sum_dtype = partial.dtype
    if sum_dtype not in _KERNEL_DTYPES:
        raise TypeError(f"sum_dtype: expected one of {_KERNEL_DTYPES}, got {sum_dtype!r}")
    return _OnlineMerge.apply(out1, lse1, partial, update, query, norm_weight, _check_eps(eps), sum_dtype)

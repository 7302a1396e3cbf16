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

* phase 1, forward and backward: a tile of ``BLOCK_M`` = 2 tokens as one small matrix problem per D chunk, so
  that tensor cores do the reductions over D. Rows r = (token, source), R = BLOCK_M·N_ROWS of them; columns
  c = (token, query), C = BLOCK_M·S_COLS; N and S are padded to powers of two (rows and columns past N or S are
  masked). Per chunk, a [R, BLOCK_D] tile of sources V and [C, BLOCK_D] tiles of queries U (u_s repeated per token)
  or of do give every dot product at once: V Uᵀ [R, C] holds u_s·v_i, V doᵀ holds dp_{s,i}. Only the block
  diagonal (row and column of the same token) is used: the softmax of a column runs over its token's rows, and
  P (p_{s,i} on the block diagonal, 0 elsewhere) turns the mixing sums into dots too: out = Pᵀ V [C, BLOCK_D],
  dv = P do + A U [R, BLOCK_D] with A = a on the block diagonal. The off-diagonal blocks are wasted tensor-core
  work (a factor BLOCK_M), which costs far less than the CUDA-core reductions it replaces (one multiply-and-reduce
  over D per source, query and chunk: the previous kernels, 2.9 ms for this backward at the benchmark shape).
  D is walked in chunks of ``BLOCK_D`` twice: pass 1 builds the dot products, pass 2 walks the chunks in reverse
  (the chunks pass 1 read last are still cached) to write out (forward) or dv (backward). The forward also stores
  the logits z [N, M, S] and r [N, M] (fp32, N·S + N values per token); the backward reads them back, so its
  pass 1 only forms dp = do·v (no U, no Σv²). Per token the backward reads N·D + S·D elements twice (the second
  time mostly from L2) and writes N·D.
* phase 1 with one query (S = 1: Full AttnRes, a final aggregation): the tile would pad it to 8 query columns, so
  it runs on row kernels instead. Forward: ``BLOCK_M`` whole rows, an online softmax over the sources (running
  max, running sum, running weighted sum of v), each source read once. Backward: one pass over the sources, because
  do·o = Σ_i p_i dp_i is read off the stored output (as FlashAttention's backward does), so dz_i is known as soon
  as v_i is loaded.
* phase 2 (fwd and bwd): ``BLOCK_M`` whole rows (``BLOCK_D ≥ D``, so D ≤ 16384) in one pass, like a fused RMSNorm.
* query gradients: du is a reduction over all tokens. The tile backward stores a = dz·r per token and a separate
  kernel forms du = Σ_i a_iᵀ v_i with ``tl.dot`` over token splits (grid: D chunks × splits). The backward row
  kernels (merge, one query) run at most ``_ROW_PROGRAMS`` programs that stride over the row tiles, each keeping its
  share of du in registers and writing it as one row of partial sums (no second pass over the sources). A last
  kernel adds the partial rows and applies the chain rule through u = q ⊙ g. Deterministic, no atomics.

Precision: all math is fp32; outputs are stored in the sources' dtype (the merge step's running sum x in
``sum_dtype``). With fp32 sources every ``tl.dot`` runs in IEEE fp32. With 16-bit sources a product of two stored
values (do·v) runs in TF32, which is exact for them (their 8- or 11-bit significands fit TF32's 11 bits), and a
product with an fp32 operand (u, p, a) runs as "tf32x3" (three TF32 products of a big/small split), which keeps
fp32-level accuracy: one TF32 product would put 2⁻¹¹ relative errors into the logits (the bf16 lse test allows
1e-5).
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
_ROW_PROGRAMS = 1024  # striding backward row kernels: several per SM on an H100 (132 SMs)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _token_tile(M, N, S, N_ROWS: tl.constexpr, S_COLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Index vectors of one program's tile of BLOCK_M consecutive tokens: row r = (token r // N_ROWS, source
    r % N_ROWS), column c = (token c // S_COLS, query c % S_COLS), which rows and columns exist, and the [R, C]
    block diagonal (row and column of the same token)."""
    first = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M * N_ROWS)
    c = tl.arange(0, BLOCK_M * S_COLS)
    src, tok_r = r % N_ROWS, first + r // N_ROWS  # [R]
    qry, tok_c = c % S_COLS, first + c // S_COLS  # [C]
    row_ok = (src < N) & (tok_r < M)
    col_ok = (qry < S) & (tok_c < M)
    same_token = (r // N_ROWS)[:, None] == (c // S_COLS)[None, :]  # [R, C]
    return src, tok_r, row_ok, qry, tok_c, col_ok, same_token


@triton.jit
def _row_tile(first, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row kernels' tile: BLOCK_M whole rows of a [M, D] plane from row ``first``: row indices, which rows
    exist, [BM, BD] element offsets (int64) within one plane, and the in-bounds mask."""
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_D)
    offs = tl.cast(rows, tl.int64)[:, None] * D + cols[None, :]
    return rows, row_ok, offs, row_ok[:, None] & (cols < D)[None, :]


@triton.jit(do_not_specialize=["N", "M", "S"])
def _phase1_fwd_kernel(
    values_ptr,  # [N, M, D] sources
    u_ptr,  # [S, D] fp32 effective queries
    out_ptr,  # [S, M, D] normalised outputs (sources' dtype; written only if WRITE_OUT)
    lse_ptr,  # [S, M] fp32
    z_ptr,  # [N, M, S] fp32 logits, kept for the backward
    r_ptr,  # [N, M] fp32 rms(v)⁻¹, kept for the backward
    N,
    M,
    D,
    S,
    eps,
    WRITE_OUT: tl.constexpr,
    N_ROWS: tl.constexpr,
    S_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,  # tl.dot precision of a product with an fp32 operand (u, p): see _dot_precisions
):
    src, tok_r, row_ok, qry, tok_c, col_ok, same_token = _token_tile(M, N, S, N_ROWS, S_COLS, BLOCK_M)
    plane = tl.cast(M, tl.int64) * D  # elements per source (and per output)
    v_row = tl.cast(src, tl.int64) * plane + tl.cast(tok_r, tl.int64) * D  # [R] start of each row's source
    o_row = tl.cast(qry, tl.int64) * plane + tl.cast(tok_c, tl.int64) * D  # [C] start of each column's output
    u_row = tl.where(qry < S, qry, 0) * D  # [C] (a padded query reads row 0, masked to zero)

    # pass 1: Σ v² per row and u_s·v_i for every (row, column) pair, one tensor-core dot per D chunk
    sumsq = tl.zeros([BLOCK_M * N_ROWS, BLOCK_D], tl.float32)  # reduced over D once, after the loop
    dots = tl.zeros([BLOCK_M * N_ROWS, BLOCK_M * S_COLS], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        v = tl.load(values_ptr + v_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        v = v.to(tl.float32)  # [R, BD]
        u = tl.load(u_ptr + u_row[:, None] + d[None, :], mask=(qry < S)[:, None] & d_ok[None, :], other=0.0)
        sumsq += v * v
        dots = tl.dot(v, tl.trans(u), dots, input_precision=SPLIT)  # [R, C]

    # softmax of each column over its token's sources; p = 0 off the block diagonal
    inv_rms = tl.rsqrt(tl.sum(sumsq, axis=1) / D + eps)  # [R]
    z = dots * inv_rms[:, None]  # [R, C]
    logits = tl.where(same_token & (src < N)[:, None], z, float("-inf"))
    col_max = tl.max(logits, axis=0)
    lse = col_max + tl.log(tl.sum(tl.exp(logits - col_max[None, :]), axis=0))  # [C]
    tl.store(lse_ptr + tl.cast(qry, tl.int64) * M + tok_c, lse, mask=col_ok)
    triple = same_token & row_ok[:, None] & (qry < S)[None, :]  # the (token, source, query) entries
    tl.store(z_ptr + (tl.cast(src, tl.int64) * M + tok_r)[:, None] * S + qry[None, :], z, mask=triple)
    tl.store(r_ptr + tl.cast(src, tl.int64) * M + tok_r, inv_rms, mask=row_ok)

    if WRITE_OUT:
        # pass 2 (chunks in reverse: the chunks pass 1 read last are still cached): o_s = Σ_i p_{s,i} v_i
        probs = tl.exp(logits - lse[None, :])  # [R, C]
        n_chunks = tl.cdiv(D, BLOCK_D)
        for k in range(n_chunks):
            d = (n_chunks - 1 - k) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = d < D
            v = tl.load(values_ptr + v_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            out = tl.dot(tl.trans(probs), v.to(tl.float32), input_precision=SPLIT)  # [C, BD]
            o_mask = col_ok[:, None] & d_ok[None, :]
            tl.store(out_ptr + o_row[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["N", "M", "S"])
def _phase1_bwd_kernel(
    values_ptr,  # [N, M, D]
    u_ptr,  # [S, D] fp32
    dout_ptr,  # [S, M, D] (read only if HAS_DOUT)
    dlse_ptr,  # [S, M] fp32 (read only if HAS_DLSE)
    lse_ptr,  # [S, M] fp32, the forward's
    z_ptr,  # [N, M, S] fp32, the forward's logits
    r_ptr,  # [N, M] fp32, the forward's rms(v)⁻¹
    dvalues_ptr,  # [N, M, D] sources' dtype
    a_ptr,  # [N, M, S] fp32: a = dz·r, for the query-gradient reduction
    N,
    M,
    D,
    S,
    HAS_DOUT: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    N_ROWS: tl.constexpr,
    S_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EXACT: tl.constexpr,  # tl.dot precision of a product of two stored values (do·v)
    SPLIT: tl.constexpr,  # tl.dot precision of a product with an fp32 operand (u, p, a)
):
    # The forward's tile: rows (token, source), columns (token, query), [R, C] statistics read back from it.
    src, tok_r, row_ok, qry, tok_c, col_ok, same_token = _token_tile(M, N, S, N_ROWS, S_COLS, BLOCK_M)
    plane = tl.cast(M, tl.int64) * D
    v_row = tl.cast(src, tl.int64) * plane + tl.cast(tok_r, tl.int64) * D  # [R]
    o_row = tl.cast(qry, tl.int64) * plane + tl.cast(tok_c, tl.int64) * D  # [C]
    u_row = tl.where(qry < S, qry, 0) * D  # [C]
    triple = same_token & row_ok[:, None] & (qry < S)[None, :]
    stat_offs = (tl.cast(src, tl.int64) * M + tok_r)[:, None] * S + qry[None, :]  # [R, C] into z and a
    z = tl.load(z_ptr + stat_offs, mask=triple, other=0.0)
    lse = tl.load(lse_ptr + tl.cast(qry, tl.int64) * M + tok_c, mask=col_ok, other=0.0)  # [C]
    probs = tl.where(triple, tl.exp(z - lse[None, :]), 0.0)  # [R, C]
    inv_rms = tl.load(r_ptr + tl.cast(src, tl.int64) * M + tok_r, mask=row_ok, other=0.0)  # [R]

    dz = tl.zeros([BLOCK_M * N_ROWS, BLOCK_M * S_COLS], tl.float32)  # ∂L/∂z, on the block diagonal
    if HAS_DOUT:
        # pass 1: dp_{s,i} = do_s·v_i for every (row, column) pair, one tensor-core dot per D chunk
        dps = tl.zeros([BLOCK_M * N_ROWS, BLOCK_M * S_COLS], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            v = tl.load(values_ptr + v_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do_mask = col_ok[:, None] & d_ok[None, :]
            do = tl.load(dout_ptr + o_row[:, None] + d[None, :], mask=do_mask, other=0.0)  # [C, BD]
            dps = tl.dot(v.to(tl.float32), tl.trans(do.to(tl.float32)), dps, input_precision=EXACT)  # [R, C]
        dz += probs * (dps - tl.sum(probs * dps, axis=0)[None, :])  # p (dp − do·o)
    if HAS_DLSE:
        dlse = tl.load(dlse_ptr + tl.cast(qry, tl.int64) * M + tok_c, mask=col_ok, other=0.0)  # [C]
        dz += probs * dlse[None, :]
    a = dz * inv_rms[:, None]  # [R, C] ∂L/∂(u_s · v_i)
    b = tl.sum(dz * z, axis=1) * inv_rms * inv_rms / D  # [R]
    tl.store(a_ptr + stat_offs, a, mask=triple)

    # pass 2 (chunks in reverse: the chunks pass 1 read last are still cached):
    # dv_i = Σ_s a_{s,i} u_s + Σ_s p_{s,i} do_s − b_i v_i, two tensor-core dots per D chunk
    n_chunks = tl.cdiv(D, BLOCK_D)
    for k in range(n_chunks):
        d = (n_chunks - 1 - k) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        v_mask = row_ok[:, None] & d_ok[None, :]
        v = tl.load(values_ptr + v_row[:, None] + d[None, :], mask=v_mask, other=0.0).to(tl.float32)  # [R, BD]
        u = tl.load(u_ptr + u_row[:, None] + d[None, :], mask=(qry < S)[:, None] & d_ok[None, :], other=0.0)
        dv = tl.dot(a, u, input_precision=SPLIT)  # [R, BD]
        if HAS_DOUT:
            do_mask = col_ok[:, None] & d_ok[None, :]
            do = tl.load(dout_ptr + o_row[:, None] + d[None, :], mask=do_mask, other=0.0).to(tl.float32)
            dv = tl.dot(probs, do, dv, input_precision=SPLIT)
        dv -= b[:, None] * v
        tl.store(dvalues_ptr + v_row[:, None] + d[None, :], dv.to(dvalues_ptr.dtype.element_ty), mask=v_mask)


@triton.jit(do_not_specialize=["N", "M"])
def _one_query_fwd_kernel(
    values_ptr,  # [N, M, D] sources
    u_ptr,  # [D] fp32 effective query
    out_ptr,  # [M, D] sources' dtype (written only if WRITE_OUT)
    lse_ptr,  # [M] fp32
    z_ptr,  # [N, M] fp32 logits, kept for the backward
    r_ptr,  # [N, M] fp32 rms(v)⁻¹, kept for the backward
    N,
    M,
    D,
    eps,
    WRITE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One query (S = 1), BLOCK_M whole rows: an online softmax over the sources, each source read once.
    rows, row_ok, offs, mask = _row_tile(tl.program_id(0) * BLOCK_M, M, D, BLOCK_M, BLOCK_D)  # offs within a source
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    plane = tl.cast(M, tl.int64) * D
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)  # Σ_i e^{z_i − run_max}
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ_i e^{z_i − run_max} v_i
    for i in range(N):
        v = tl.load(values_ptr + i * plane + offs, mask=mask, other=0.0).to(tl.float32)  # [BM, BD]
        inv_rms = tl.rsqrt(tl.sum(v * v, axis=1) / D + eps)  # [BM]
        z = tl.sum(v * u[None, :], axis=1) * inv_rms
        stat = tl.cast(i, tl.int64) * M + rows  # [BM] into z and r
        tl.store(z_ptr + stat, z, mask=row_ok)
        tl.store(r_ptr + stat, inv_rms, mask=row_ok)
        new_max = tl.maximum(run_max, z)
        rescale = tl.exp(run_max - new_max)  # 0 for the first source
        p = tl.exp(z - new_max)
        run_sum = run_sum * rescale + p
        if WRITE_OUT:
            acc = acc * rescale[:, None] + p[:, None] * v
        run_max = new_max
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_ok)
    if WRITE_OUT:
        tl.store(out_ptr + offs, (acc / run_sum[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "M"])
def _one_query_bwd_kernel(
    values_ptr,  # [N, M, D]
    u_ptr,  # [D] fp32
    out_ptr,  # [M, D] the forward's output (read only if HAS_DOUT)
    dout_ptr,  # [M, D] (read only if HAS_DOUT)
    dlse_ptr,  # [M] fp32 (read only if HAS_DLSE)
    lse_ptr,  # [M] fp32, the forward's
    z_ptr,  # [N, M] fp32, the forward's logits
    r_ptr,  # [N, M] fp32, the forward's rms(v)⁻¹
    dvalues_ptr,  # [N, M, D] sources' dtype
    du_ptr,  # [G, D] fp32: this program's Σ_{tokens, i} a_i v_i
    N,
    M,
    D,
    HAS_DOUT: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One query, whole rows, one pass over the sources: do·o = Σ_i p_i dp_i is read off the stored output (as
    # FlashAttention's backward does), so dz_i = p_i (dp_i − do·o + dlse) is known as soon as v_i is loaded.
    # Programs stride over the token tiles and keep their share of du = Σ a_i v_i in registers.
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    plane = tl.cast(M, tl.int64) * D
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    du = tl.zeros([BLOCK_D], tl.float32)
    for first in range(tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows, row_ok, offs, mask = _row_tile(first, M, D, BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        shared = tl.zeros([BLOCK_M], tl.float32)  # dz_i / p_i − dp_i, the same for every source
        if HAS_DOUT:
            do = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BM, BD]
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            shared -= tl.sum(do * o, axis=1)
        if HAS_DLSE:
            shared += tl.load(dlse_ptr + rows, mask=row_ok, other=0.0)
        for i in range(N):
            v = tl.load(values_ptr + i * plane + offs, mask=mask, other=0.0).to(tl.float32)  # [BM, BD]
            stat = tl.cast(i, tl.int64) * M + rows
            z = tl.load(z_ptr + stat, mask=row_ok, other=0.0)
            inv_rms = tl.load(r_ptr + stat, mask=row_ok, other=0.0)  # 0 on padded rows: a = 0 there
            p = tl.exp(z - lse)
            dz = p * shared
            if HAS_DOUT:
                dz += p * tl.sum(do * v, axis=1)
            a = dz * inv_rms  # ∂L/∂(u · v_i)
            dv = a[:, None] * u[None, :] - (a * z * inv_rms / D)[:, None] * v
            if HAS_DOUT:
                dv += p[:, None] * do
            tl.store(dvalues_ptr + i * plane + offs, dv.to(dvalues_ptr.dtype.element_ty), mask=mask)
            du += tl.sum(a[:, None] * v, axis=0)
    tl.store(du_ptr + tl.program_id(0) * D + cols, du, mask=c_ok)


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
    rows, row_ok, offs, mask = _row_tile(tl.program_id(0) * BLOCK_M, M, D, BLOCK_M, BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
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
    dx_ptr,  # [M, D] x's dtype
    dupdate_ptr,  # [M, D] the same gradient in the update's dtype (written only if WRITE_DUPDATE)
    du_ptr,  # [G, D] fp32: this program's Σ_tokens a x, a = dz·r_x
    M,
    D,
    eps,
    HAS_DX_IN: tl.constexpr,
    WRITE_DUPDATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Programs stride over the row tiles and keep their share of du = Σ a x in registers (no second pass over x).
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    u = tl.load(u_ptr + cols, mask=c_ok, other=0.0)
    du = tl.zeros([BLOCK_D], tl.float32)
    for first in range(tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows, row_ok, offs, mask = _row_tile(first, M, D, BLOCK_M, BLOCK_D)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o1 = tl.load(out1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
        if WRITE_DUPDATE:
            tl.store(dupdate_ptr + offs, dx.to(dupdate_ptr.dtype.element_ty), mask=mask)
        tl.store(dlse1_ptr + rows, -dz, mask=row_ok)
        du += tl.sum(a[:, None] * x, axis=0)
    tl.store(du_ptr + tl.program_id(0) * D + cols, du, mask=c_ok)


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
    SPLIT: tl.constexpr,  # tl.dot precision (a is fp32): see _dot_precisions
):
    # du = Σ_i a_iᵀ v_i over this split's tokens: a matmul [S, T] @ [T, D] per source, one [S_DOT, BLOCK_D] slice of
    # it per program (S padded to tl.dot's minimum of 16)
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
            acc += tl.dot(tl.trans(a_tile), v, input_precision=SPLIT)  # [S_DOT, BD]
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
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # du = Σ_G partial: [BLOCK_G, BLOCK_D] tiles summed down the G axis (G is up to _ROW_PROGRAMS = 1024 rows; one
    # row at a time left this kernel latency-bound at 0.3 ms)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(1)
    c_ok = c < D
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        split = g0 + tl.arange(0, BLOCK_G)
        ptrs = partial_ptr + (split[:, None] * S + s) * D + c[None, :]
        acc += tl.load(ptrs, mask=(split < G)[:, None] & c_ok[None, :], other=0.0)
    du = tl.sum(acc, axis=0)
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
def _phase1_meta(n: int, s: int, d: int, backward: bool) -> dict:
    """Phase-1 tiles. BLOCK_M = 2 tokens per program; sources and queries padded to powers of two and to
    ≥ 16 / BLOCK_M, so that both sides of the [R, C] = [BLOCK_M·N_ROWS, BLOCK_M·S_COLS] statistics reach tl.dot's
    minimum of 16. Warps: one per 16 rows of the tile, because a warp holds a 16-row mma slab and more warps than
    slabs would each compute the same [R, C] dot; the backward takes 2 at least (its pass-2 dots are
    [R, BLOCK_D], which warps do split). BLOCK_D: ≤ 1024 values of an [R, BLOCK_D] tile per warp.
    Tile sweep on the H100 at N = 5, S = 8, 16K tokens, D = 2048 bf16 (R = C = 16): forward with BLOCK_D = 64 on
    1 / 2 / 4 warps 0.89 / 1.02 / 1.78 ms; backward on 2 warps with BLOCK_D = 64 / 32 1.05 / 1.23 ms."""
    block_m = 2
    n_rows = max(triton.next_power_of_2(n), 16 // block_m)
    s_cols = max(triton.next_power_of_2(s), 16 // block_m)
    rows = block_m * max(n_rows, s_cols)
    num_warps = min(4, max(2 if backward else 1, rows // 16))
    block_d = max(16, min(64, triton.next_power_of_2(d), 1024 * num_warps // rows))
    return {
        "BLOCK_M": block_m,
        "N_ROWS": n_rows,
        "S_COLS": s_cols,
        "BLOCK_D": block_d,
        "num_warps": num_warps,
        "num_stages": 2,
    }


def _dot_precisions(dtype: torch.dtype) -> dict:
    """tl.dot input precisions. fp32 sources: IEEE fp32 everywhere. 16-bit sources: a product of two stored values
    (do·v) is exact in TF32 (8- or 11-bit significands fit TF32's 11), so one TF32 tensor-core product; a product
    with an fp32 operand (u, p, a) runs as three TF32 products ("tf32x3": big·big + big·small + small·big), which
    keeps fp32-level accuracy."""
    if dtype == torch.float32:
        return {"EXACT": "ieee", "SPLIT": "ieee"}
    return {"EXACT": "tf32", "SPLIT": "tf32x3"}


def _row_meta(d: int) -> dict:
    """Row kernels (phase 2, one-query phase 1): whole rows; about 4096 elements per tile."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": max(1, min(16, block_m * block_d // 512))}


def _row_programs(m: int, block_m: int) -> int:
    """Programs of a backward row kernel that strides over the row tiles (each program writes one [D] row of
    query-gradient partials, summed by ``_query_grad_finish_kernel``): one per tile up to ``_ROW_PROGRAMS``."""
    return max(1, min(triton.cdiv(m, block_m), _ROW_PROGRAMS))


def _one_query(s: int, d: int) -> bool:
    """Phase 1 with one query (Full AttnRes, a final aggregation) runs on the row kernels: the tile kernels would pad
    it to 8 query columns. Rows must fit on chip (D ≤ MAX_MERGE_DIM)."""
    return s == 1 and d <= MAX_MERGE_DIM


def _query_grad_meta(m: int, d: int) -> dict:
    """[BLOCK_T, BLOCK_D] tiles of values (tl.dot needs every dim ≥ 16); about 1024 programs over
    (D chunks × token splits)."""
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    block_t = 32
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
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out [S, M, D] (or None), lse [S, M], and for the backward z [N, M, S] and r = rms(v)⁻¹ [N, M] (fp32)."""
    n, m, d = values.shape
    s = u.shape[0]
    lse = torch.empty((s, m), dtype=torch.float32, device=values.device)
    z = torch.empty((n, m, s), dtype=torch.float32, device=values.device)
    inv_rms = torch.empty((n, m), dtype=torch.float32, device=values.device)
    out = torch.empty((s, m, d), dtype=values.dtype, device=values.device) if write_out else None
    if m and _one_query(s, d):
        meta = _row_meta(d)
        _one_query_fwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            values, u, out if write_out else lse, lse, z, inv_rms, n, m, d, eps, WRITE_OUT=write_out, **meta
        )
    elif m:
        meta = _phase1_meta(n, s, d, backward=False)
        _phase1_fwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            values,
            u,
            out if write_out else lse,
            lse,
            z,
            inv_rms,
            n,
            m,
            d,
            s,
            eps,
            WRITE_OUT=write_out,
            SPLIT=_dot_precisions(values.dtype)["SPLIT"],
            **meta,
        )
    return out, lse, z, inv_rms


def _phase1_backward(
    values: torch.Tensor,
    u: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    out: torch.Tensor | None,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dvalues [N, M, D] and partial sums [G, S, D] (fp32) of du_s = Σ_{tokens, i} a_{s,i} v_i, a = dz·r; stats = the
    forward's (lse, z, r), out = its output (read by the one-query kernel when dout is given)."""
    n, m, d = values.shape
    s = u.shape[0]
    lse, z, inv_rms = stats
    dvalues = torch.empty_like(values)
    if _one_query(s, d):
        meta = _row_meta(d)
        programs = _row_programs(m, meta["BLOCK_M"])
        du_partial = torch.empty((programs, 1, d), dtype=torch.float32, device=values.device)
        _one_query_bwd_kernel[(programs,)](
            values,
            u,
            values if dout is None else out,
            values if dout is None else dout,
            lse if dlse is None else dlse,
            lse,
            z,
            inv_rms,
            dvalues,
            du_partial,
            n,
            m,
            d,
            HAS_DOUT=dout is not None,
            HAS_DLSE=dlse is not None,
            **meta,
        )
        return dvalues, du_partial
    a = torch.empty((n, m, s), dtype=torch.float32, device=values.device)
    if m:
        meta = _phase1_meta(n, s, d, backward=True)
        _phase1_bwd_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            values,
            u,
            values if dout is None else dout,
            lse if dlse is None else dlse,
            lse,
            z,
            inv_rms,
            dvalues,
            a,
            n,
            m,
            d,
            s,
            HAS_DOUT=dout is not None,
            HAS_DLSE=dlse is not None,
            **_dot_precisions(values.dtype),
            **meta,
        )
    return dvalues, _query_grad_partials(values, a)


def _query_grad_partials(values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Partial sums [G, S, D] (fp32) over token splits of du_s = Σ_{tokens, i} a[i, t, s] values[i, t]."""
    n, m, d = values.shape
    s = a.shape[2]
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
        SPLIT=_dot_precisions(values.dtype)["SPLIT"],
        num_warps=4,
    )
    return partial


def _finish_query_grads(
    partial: torch.Tensor, queries: torch.Tensor, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """du = Σ_G partial [G, S, D]; dq = du ⊙ g, dg = du ⊙ q (dq = du without a norm weight)."""
    splits, s, d = partial.shape
    q = queries.float().contiguous()
    g = None if norm_weight is None else norm_weight.float().contiguous()
    dq = torch.empty((s, d), dtype=torch.float32, device=partial.device)
    dg = None if g is None else torch.empty_like(dq)
    block_d = min(32, triton.next_power_of_2(d))  # many narrow column strips: the sum is spread over SMs
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
        BLOCK_G=64,
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
        meta = _row_meta(d)
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


def _merge_backward(out1, lse1, x, u, eps, dh, dx_in, update_dtype):
    """do1 [M, D], dlse1 [M], dx [M, D] (including dx_in), dx in ``update_dtype`` (None: no update, or dx itself when
    the dtypes agree) and partial sums [G, D] of du = Σ_tokens dz·r_x x."""
    m, d = x.shape
    dout1 = torch.empty_like(out1)
    dx = torch.empty_like(x)
    dlse1 = torch.empty((m,), dtype=torch.float32, device=x.device)
    write_dupdate = update_dtype is not None and update_dtype != x.dtype
    dupdate = torch.empty((m, d), dtype=update_dtype, device=x.device) if write_dupdate else None
    meta = _row_meta(d)
    programs = _row_programs(m, meta["BLOCK_M"])
    du_partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _merge_bwd_kernel[(programs,)](
        out1,
        lse1,
        x,
        u,
        dh,
        x if dx_in is None else dx_in,
        dout1,
        dlse1,
        dx,
        dx if dupdate is None else dupdate,
        du_partial,
        m,
        d,
        eps,
        HAS_DX_IN=dx_in is not None,
        WRITE_DUPDATE=write_dupdate,
        **meta,
    )
    if update_dtype is not None and dupdate is None:
        dupdate = dx
    return dout1, dlse1, dx, dupdate, du_partial


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
        out, lse, z, inv_rms = _phase1_forward(values, _effective_queries(queries, norm_weight), eps, write_out=True)
        ctx.save_for_backward(values, queries, norm_weight, out, lse, z, inv_rms)
        ctx.source_shape = tuple(sources.shape)
        ctx.set_materialize_grads(False)
        s = queries.shape[0]
        return out.view(s, *lead, d), lse.view(s, *lead)

    @staticmethod
    def backward(ctx, dout, dlse):
        values, queries, norm_weight, out, *stats = ctx.saved_tensors
        s, m, d = queries.shape[0], values.shape[1], values.shape[2]
        dout = None if dout is None else dout.contiguous().view(s, m, d)
        dlse = None if dlse is None else dlse.float().contiguous().view(s, m)
        u = _effective_queries(queries, norm_weight)
        dvalues, du_partial = _phase1_backward(values, u, stats, out, dout, dlse)
        dq, dg = _finish_query_grads(du_partial, queries, norm_weight)
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
        u = _effective_queries(queries, norm_weight)
        out, lse, z, inv_rms = _phase1_forward(values, u, eps, write_out=with_out)
        ctx.values = values
        ctx.save_for_backward(queries, norm_weight, out, lse, z, inv_rms)
        ctx.with_out, ctx.block_shape = with_out, tuple(cache.shape[1:])
        ctx.set_materialize_grads(False)
        s = queries.shape[0]
        if with_out:
            return out.view(s, *lead, d), lse.view(s, *lead)
        return lse.view(s, *lead)

    @staticmethod
    def backward(ctx, *grads):
        queries, norm_weight, out, *stats = ctx.saved_tensors
        values = ctx.values
        s, (n, m, d) = queries.shape[0], values.shape
        dout = grads[0] if ctx.with_out else None
        dlse = grads[-1]
        dout = None if dout is None else dout.contiguous().view(s, m, d)
        dlse = None if dlse is None else dlse.float().contiguous().view(s, m)
        u = _effective_queries(queries, norm_weight)
        dvalues, du_partial = _phase1_backward(values, u, stats, out, dout, dlse)
        dq, dg = _finish_query_grads(du_partial, queries, norm_weight)
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
        ctx.eps, ctx.shape = eps, shape
        ctx.lse_dtype, ctx.partial_dtype = lse1.dtype, partial.dtype
        ctx.update_dtype = None if update is None else update.dtype
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
        dout1, dlse1, dx, dupdate, du_partial = _merge_backward(out1, lse1, x, u, ctx.eps, dh, dx_in, ctx.update_dtype)
        dq, dg = _finish_query_grads(
            du_partial[:, None], query[None], None if norm_weight is None else norm_weight[None]
        )
        # ∂(partial + update)/∂partial = ∂/∂update = identity: both get dx, from the kernel in their own dtype
        # where it wrote one (so that autograd need not cast it)
        dpartial = dupdate if dupdate is not None and ctx.partial_dtype == dupdate.dtype != dx.dtype else dx
        return (
            dout1.view(ctx.shape),
            dlse1.view(ctx.shape[:-1]).to(ctx.lse_dtype),
            dpartial.view(ctx.shape),
            None if dupdate is None else dupdate.view(ctx.shape),
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

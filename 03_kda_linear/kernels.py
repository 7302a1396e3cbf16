"""Triton kernels for Kimi Delta Attention: the chunkwise forward and backward, and a fused decoding step.

The math is :func:`nanokimi.kda.reference.kda_chunk` (report §3.1). Per (batch, head) and chunk of C tokens, with
G the in-chunk cumulative log-decay, ``G_C`` its last row and S the state at the chunk's start::

    A_kk[r, i] = β_r Σ_c k_rc k_ic e^{G_rc − G_ic}  (i < r),   A_qk[r, i] = scale Σ_c q_rc k_ic e^{G_rc − G_ic}  (i ≤ r)
    X = (I + A_kk)⁻¹,   W = X Diag(β)(e^G ⊙ K),   U = X Diag(β) V                      (UT transform)
    Δ = U − W S,   O = (scale e^G ⊙ Q) S + A_qk Δ,   S ← e^{G_C} ⊙ S + (e^{G_C − G} ⊙ K)ᵀ Δ

Numerics. ``e^{G_r − G_i}`` (i ≤ r) is ≤ 1, but the factored form ``e^{G_r} e^{−G_i}`` that a matmul needs
overflows under strong decay. The C×C matrices are therefore built from 16-row sub-blocks: an off-diagonal
block (rows in sub-block a, columns in an earlier sub-block b) factors around the first row of a,
``e^{G_r − G_ref} · e^{G_ref − G_i}`` with both exponents ≤ 0, and is a ``tl.dot``; a diagonal 16×16 block is
summed pairwise, one column per step, with the exact ``e^{G_r − G_i}``. No exponent is ever positive.

Forward, five launches (B batch, H heads, N = ⌈T/C⌉ chunks); only the state walk is sequential:

* ``_chunk_cumsum_kernel``  grid (N, B·H): G = in-chunk cumsum of g, fp32.
* ``_fwd_intra_kernel``     grid (N·C/16, B·H): one 16-row panel of A_qk and A_kk (10 blocks per 64-chunk).
* ``_fwd_solve_kernel``     grid (N, B·H): X = (I + A_kk)⁻¹ in 16×16 blocks, written over A_kk: the diagonal
  blocks' inverses by forward substitution, all at once (15 dependent steps instead of C − 1), then one block
  row at a time by two small fp32 dots; then W, U, ``qg = scale e^G ⊙ Q``, ``kg = e^{G_C − G} ⊙ K``.
* ``_fwd_state_kernel``     grid (V/BV, B·H): the state walk, chunk after chunk with a [K, BV] slice of S
  (columns of S evolve independently): it saves S at each chunk's start, then ``Δ = U − W S`` (saved) and
  ``S ← e^{G_C} ⊙ S + kgᵀ Δ``; two dependent dots per chunk, the next chunks' tiles pipelined.
* ``_fwd_output_kernel``    grid (N·V/BV, B·H): ``O = qg S + A_qk Δ`` for every chunk at once, from the saved S
  and Δ (it needs nothing of the walk but its results).

Backward, five launches, the reverse of the above (all derivatives by hand, see the README):

* ``_bwd_ddelta_intra_kernel``  grid (N, B·H): the part of dΔ that needs no state gradient, ``A_qkᵀ dO``.
* ``_bwd_state_kernel``  grid (V/BV, B·H), chunks in reverse (dS' is the gradient of the state after the chunk,
  saved per chunk): ``dΔ = A_qkᵀ dO + kg dS'``, ``dS = e^{G_C} ⊙ dS' + qgᵀ dO − Wᵀ dΔ``.
* ``_bwd_dense_kernel``  grid (N, B·H): everything that contracts over V: dV, dA_qk, dA_kk (through X: with
  ``dR = Xᵀ d[W|U]``, ``dA_kk = −StrictTril(dR [W|U]ᵀ)``), and the element-wise gate terms.
* ``_bwd_intra_kernel``  grid (N·C/16, B·H): the pairwise terms of dA_qk, dA_kk into dq, dk, dG, dβ (same
  sub-block split as the forward).
* ``_chunk_cumsum_kernel`` reversed: dg = in-chunk reverse cumsum of dG.

Decoding: ``_decode_kernel`` grid (V/BV, B·H) applies one token of the recurrence to a [K, BV] slice of S.

Dots take the input dtype (bf16 on tensor cores, fp32 accumulate); with fp32 inputs every dot is three TF32
tensor-core passes (``dot_precision``: ``tf32x3``, ≈ fp32 accuracy; exact IEEE dots ran on the CUDA cores, where
its backward state walk and dense kernel took 7.4 and 5.5 ms at TinyKimi's size) and exact fp32 under the interpreter.
Under the Triton interpreter bf16 q, k, v run in fp32: it stores bf16 as raw uint16 and its ``tl.dot``
multiplies those bit patterns as integers (a bf16 call came out ~1e12 off).
Addressing: a 64-bit base per (batch, head), 32-bit offsets inside it (so T·H·max(K, V, C) < 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_in, check_tensor
from nanokimi.kda.reference import FLOATS, resolve_scale, validate_kda_inputs
from nanokimi.triton_utils import autotune_configs, dot_precision, ensure_cuda_or_interpreter, interpreting

__all__ = ["kda_chunk_triton", "kda_decode_step_triton", "CHUNK_SIZES"]

CHUNK_SIZES = (16, 32, 64)
_BC = 16  # rows of a sub-block: the tile of the pairwise diagonal blocks and the smallest tl.dot side
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit(do_not_specialize=["T"])
def _chunk_cumsum_kernel(
    x, out, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr
):
    """out[t] = Σ_{s ≤ t} x[s] (or Σ_{s ≥ t} with REVERSE) inside one chunk of C rows, fp32 accumulation."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    bh = (i_bh // H).to(tl.int64) * T * H + i_bh % H  # row of (b, t=0, h) in the [B, T, H] layout
    o_c, o_k = tl.arange(0, C), tl.arange(0, BK)
    t = i_n * C + o_c
    mask = (t < T)[:, None] & (o_k < K)[None, :]
    offs = t[:, None] * (H * K) + o_k[None, :]
    x_t = tl.load(x + bh * K + offs, mask=mask, other=0.0).to(tl.float32)  # [C, BK]
    acc = tl.cumsum(x_t, 0, reverse=REVERSE)
    tl.store(out + bh * K + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _fwd_intra_kernel(
    q,
    k,
    gc,
    beta,
    aqk,
    akk,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rows [t0, t0 + BC) of A_qk (scale folded in, i ≤ r) and A_kk (β folded in, i < r), all C columns."""
    NC: tl.constexpr = C // BC
    i_tc, i_bh = tl.program_id(0), tl.program_id(1)
    bh = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    q += bh * K
    k += bh * K
    gc += bh * K
    beta += bh
    aqk += bh * C
    akk += bh * C
    i_n, i_a = i_tc // NC, i_tc % NC
    t0 = i_n * C + i_a * BC
    if t0 >= T:
        return
    o_i, o_k = tl.arange(0, BC), tl.arange(0, BK)
    m_k = o_k < K
    t_a = t0 + o_i
    m_a = t_a < T
    m_ak = m_a[:, None] & m_k[None, :]
    p_ak = t_a[:, None] * (H * K) + o_k[None, :]
    q_a = tl.load(q + p_ak, mask=m_ak, other=0.0).to(tl.float32)  # [BC, BK]
    k_a = tl.load(k + p_ak, mask=m_ak, other=0.0).to(tl.float32)
    g_a = tl.load(gc + p_ak, mask=m_ak, other=0.0)
    b_a = tl.load(beta + t_a * H, mask=m_a, other=0.0).to(tl.float32)
    g_ref = tl.load(gc + t0 * (H * K) + o_k, mask=m_k, other=0.0)  # G at the panel's first row
    decay_a = tl.where(m_a[:, None], tl.exp(tl.minimum(g_a - g_ref[None, :], 0.0)), 0.0)  # e^{G_r − G_ref} ≤ 1
    qd_a = q_a * decay_a
    kd_a = k_a * decay_a
    p_out = t_a[:, None] * (H * C) + o_i[None, :]
    m_out = m_a[:, None] & (o_i < BC)[None, :]
    # Off-diagonal blocks: earlier sub-blocks j, factored around G_ref (both exponents ≤ 0).
    for i_j in range(0, i_a):
        p_jk = (i_n * C + i_j * BC + o_i)[:, None] * (H * K) + o_k[None, :]
        k_j = tl.load(k + p_jk, mask=m_k[None, :], other=0.0).to(tl.float32)
        g_j = tl.load(gc + p_jk, mask=m_k[None, :], other=0.0)
        kd_j = k_j * tl.exp(g_ref[None, :] - g_j)  # e^{G_ref − G_i} ≤ 1
        a_qk = tl.dot(qd_a, tl.trans(kd_j), input_precision=PREC) * scale
        a_kk = tl.dot(kd_a, tl.trans(kd_j), input_precision=PREC) * b_a[:, None]
        tl.store(aqk + p_out + i_j * BC, a_qk.to(aqk.dtype.element_ty), mask=m_out)
        tl.store(akk + p_out + i_j * BC, a_kk, mask=m_out)
    # Diagonal block, one column i = t0 + j per step, with the exact pairwise decay.
    a_qk = tl.zeros([BC, BC], dtype=tl.float32)
    a_kk = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(0, BC):
        m_j = m_k & (t0 + j < T)
        k_j = tl.load(k + (t0 + j) * (H * K) + o_k, mask=m_j, other=0.0).to(tl.float32)  # [BK]
        g_j = tl.load(gc + (t0 + j) * (H * K) + o_k, mask=m_j, other=0.0)
        decay = tl.where((o_i >= j)[:, None] & m_a[:, None], tl.exp(tl.minimum(g_a - g_j[None, :], 0.0)), 0.0)
        kd = decay * k_j[None, :]
        a_qk = tl.where(o_i[None, :] == j, tl.sum(q_a * kd, 1)[:, None], a_qk)
        a_kk = tl.where(o_i[None, :] == j, tl.sum(k_a * kd, 1)[:, None], a_kk)
    a_kk = tl.where(o_i[:, None] > o_i[None, :], a_kk * b_a[:, None], 0.0)
    tl.store(aqk + p_out + i_a * BC, (a_qk * scale).to(aqk.dtype.element_ty), mask=m_out)
    tl.store(akk + p_out + i_a * BC, a_kk, mask=m_out)
    zeros = tl.zeros([BC, BC], dtype=tl.float32)
    for i_j in range(i_a + 1, NC):  # the panel's blocks above the diagonal
        tl.store(aqk + p_out + i_j * BC, zeros.to(aqk.dtype.element_ty), mask=m_out)
        tl.store(akk + p_out + i_j * BC, zeros, mask=m_out)


@triton.jit(do_not_specialize=["T"])
def _fwd_solve_kernel(
    q,
    k,
    v,
    gc,
    beta,
    akk,
    w,
    u,
    qg,
    kg,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    SOLVE_PREC: tl.constexpr,
):
    """One chunk: X = (I + A_kk)⁻¹ in BC×BC blocks, written over A_kk, then W, U, qg, kg.

    L = I + A_kk is lower triangular in NC = C/BC block rows. First the inverses of all diagonal blocks at once,
    ``X_bb = L_bb⁻¹`` by forward substitution (row r: ``X_r = e_r − Σ_{j<r} A_bb[r, j] X_j``, BC − 1 steps on a
    [NC, BC, BC] tensor instead of C − 1 steps on [C, C]); then block row by block row,
    ``X_b = X_bb (E_b − A_b,<b X_<b)`` with two small dots, reading the rows X_<b solved before it back from the
    buffer. Dots in fp32 (``SOLVE_PREC``: three TF32 passes on tensor cores; IEEE under the interpreter)."""
    NC: tl.constexpr = C // BC
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    bh = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    q += bh * K
    k += bh * K
    v += bh * V
    gc += bh * K
    beta += bh
    akk += bh * C
    w += bh * K
    u += bh * V
    qg += bh * K
    kg += bh * K
    o_b, o_j, o_c, o_k = tl.arange(0, NC), tl.arange(0, BC), tl.arange(0, C), tl.arange(0, BK)
    m_k = o_k < K
    t = i_n * C + o_c
    m_t = t < T
    p_cc = t[:, None] * (H * C) + o_c[None, :]
    # Diagonal blocks, transposed so that each step sums along the last axis: inv[b, c, j] = X_bb[j, c].
    t_b0 = i_n * C + o_b * BC  # first row of each block [NC]
    inv = tl.zeros([NC, BC, BC], dtype=tl.float32) + (o_j[:, None] == o_j[None, :]).to(tl.float32)[None, :, :]
    for r in tl.static_range(1, BC):
        m_r = (t_b0 + r < T)[:, None] & (o_j < r)[None, :]
        a_r = tl.load(akk + (t_b0 + r)[:, None] * (H * C) + (o_b * BC)[:, None] + o_j[None, :], mask=m_r, other=0.0)
        x_r = (o_j == r).to(tl.float32)[None, :] - tl.sum(inv * a_r[:, None, :], 2)  # [NC, BC]: row r of each X_bb
        inv = tl.where((o_j == r)[None, None, :], x_r[:, :, None], inv)
    # Block rows in order: X_b = X_bb (E_b − A_b,<b X_<b), stored over A_kk's rows of block b.
    for b in tl.static_range(NC):
        x_bb = tl.trans(tl.sum(tl.where((o_b == b)[:, None, None], inv, 0.0), 0))  # [BC, BC]
        t_b = i_n * C + b * BC + o_j
        m_b = t_b < T
        p_b = t_b[:, None] * (H * C) + o_c[None, :]
        rhs = ((b * BC + o_j)[:, None] == o_c[None, :]).to(tl.float32)  # E_b [BC, C]
        if b > 0:
            a_b = tl.load(akk + p_b, mask=m_b[:, None] & (o_c < b * BC)[None, :], other=0.0)  # A_b,<b
            x_prev = tl.load(akk + p_cc, mask=m_t[:, None] & (o_c < b * BC)[:, None], other=0.0)  # X_<b
            rhs -= tl.dot(a_b, x_prev, input_precision=SOLVE_PREC)
        x_b = tl.dot(x_bb, rhs, input_precision=SOLVE_PREC)  # [BC, C]
        tl.debug_barrier()  # every thread has read block row b of A_kk before it is overwritten
        tl.store(akk + p_b, x_b, mask=m_b[:, None])
        tl.debug_barrier()  # and X_b is visible to the whole program before the next block row reads it
    x = tl.load(akk + p_cc, mask=m_t[:, None], other=0.0)  # X [C, C]
    n_valid = tl.minimum(T - i_n * C, C)
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = t[:, None] * (H * K) + o_k[None, :]
    k_t = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    g_t = tl.load(gc + p_tk, mask=m_tk, other=0.0)
    b_t = tl.load(beta + t * H, mask=m_t, other=0.0).to(tl.float32)
    decay = tl.where(m_t[:, None], tl.exp(g_t), 0.0)  # e^{G_r} ≤ 1
    w_t = tl.dot(x, k_t * decay * b_t[:, None], input_precision=PREC)
    tl.store(w + p_tk, w_t.to(w.dtype.element_ty), mask=m_tk)
    g_last = tl.load(gc + (i_n * C + n_valid - 1) * (H * K) + o_k, mask=m_k, other=0.0)
    kg_t = tl.where(m_t[:, None], k_t * tl.exp(g_last[None, :] - g_t), 0.0)  # e^{G_C − G_r} ≤ 1
    tl.store(kg + p_tk, kg_t.to(kg.dtype.element_ty), mask=m_tk)
    q_t = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    tl.store(qg + p_tk, (q_t * decay * scale).to(qg.dtype.element_ty), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = t[:, None] * (H * V) + o_v[None, :]
        v_t = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        u_t = tl.dot(x, v_t * b_t[:, None], input_precision=PREC)
        tl.store(u + p_tv, u_t.to(u.dtype.element_ty), mask=m_tv)


# The state walks (_fwd_state_kernel, _bwd_state_kernel): one program per (batch·head, V-block) carries a
# [K, BV] slice of S (or dS) across the chunks, so only B·H·V/BV programs run and each chunk's step is on the
# critical path. The walks hold only the recurrence itself, two dependent dots per chunk (plus one independent
# dot in the backward); everything that does not need the carried state runs in parallel kernels around them.
# A chunk's loads do not depend on the state, so Triton's software pipeliner (num_stages ≥ 2) fetches the next
# chunks' tiles into shared memory while the current one is multiplied.
# Configs kept from a sweep on the H100 (K=V=128, bf16, chunk 64, T=32K; ms per launch): forward BV=32 with 4 warps
# and 3 stages 0.69, 2 stages 0.91, BV=64 0.94; 8 warps 1.0-1.2; 2 warps 1.7.
_FWD_STATE_CONFIGS = [
    triton.Config({"BV": 32}, num_warps=4, num_stages=3),
    triton.Config({"BV": 64}, num_warps=4, num_stages=3),
]
# Backward: BV=32, 4 warps, 3 stages 1.24, 2 stages 1.40; BV=64 1.5; 8 warps 1.5-1.7; 2 warps 38.
# The backward never uses BV=16: with K=128 and bf16, the ptxas of Triton 3.6 (CUDA 12.8) built the shared-memory
# descriptors of the last wgmma of ``dS ← … − Wᵀ dΔ`` (its B operand, dΔ) from an unrelated register (a global
# pointer's high word), so the wgmma read shared memory out of bounds (compute-sanitizer flagged it, and the
# gradients depended on whatever that memory held). The PTX was correct; BV=32 and 64 compiled correctly (every
# wgmma descriptor traced in the SASS). The GPU test of every config (zero- vs NaN-filled buffers) guards this.
# A stage's tiles grow with operand bytes · K: fp32 at K=128 asks for 256 KB with three stages (the H100 has 227 KB
# per block; 2 stages 144 KB, compiled offline for sm_90a), so ``_prune_bwd_state`` drops the 3-stage config there.
# A 1-stage config was tried and not kept: it gave a wrong dS for bf16 at K=128 (0.83 relative error in its GPU
# test). fp32 at K=256 fits in no config (2 stages: 272 KB with tf32x3 dots, 232 KB with IEEE ones).
_BWD_STATE_CONFIGS = [
    triton.Config({"BV": 32}, num_warps=4, num_stages=3),
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
]
# The output kernel is parallel over (chunk, V-block, batch·head), no loop to pipeline: BV=64 0.26 ms (4 or 8
# warps), BV=128 0.27, BV=32 0.38.
_FWD_OUTPUT_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=1),
    triton.Config({"BV": 64}, num_warps=8, num_stages=1),
]


def _prune_small(configs, named_args, **kwargs):
    """Tiny problems (tests) run the first config only: tuning them costs compiles and measures noise.
    (Triton passes the positional arguments in ``named_args`` and the keyword ones, H here, in ``kwargs``.)"""
    return configs[:1] if named_args["T"] * kwargs["H"] < 16384 else configs


def _prune_bwd_state(configs, named_args, **kwargs):
    """``_prune_small`` after dropping the 3-stage configs where a stage's tiles are too large for them to fit:
    operand bytes · K ≥ 512, i.e. fp32 at K ≥ 128 (256 KB asked; measured on the H100) and 16-bit at K ≥ 256
    (320 KB in an offline sm_90a compile; not run on the GPU)."""
    if named_args["qg"].element_size() * kwargs["K"] >= 512:
        configs = [c for c in configs if c.num_stages < 3]
    return _prune_small(configs, named_args, **kwargs)


@triton.autotune(
    configs=autotune_configs(_FWD_STATE_CONFIGS),
    key=["H", "K", "V", "C", "BK"],
    prune_configs_by={"early_config_prune": _prune_small},
)
@triton.jit(do_not_specialize=["T", "NT"])
def _fwd_state_kernel(
    w,
    u,
    kg,
    gc,
    h0,
    hs,
    delta,
    ht,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Walk the chunks with a [BK, BV] slice of S: save S (the state at the chunk's start), then
    Δ = U − W S and S ← e^{G_C} ⊙ S + kgᵀ Δ."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    bh = i_b * T * H + i_h
    w += bh * K
    u += bh * V
    kg += bh * K
    gc += bh * K
    delta += bh * V
    o_c, o_k = tl.arange(0, C), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        s += tl.load(h0 + (i_b * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_n in range(0, NT):
        tl.store(hs + ((i_b * NT + i_n) * H + i_h) * K * V + p_kv, s.to(hs.dtype.element_ty), mask=m_kv)
        t = i_n * C + o_c
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = t[:, None] * (H * K) + o_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = t[:, None] * (H * V) + o_v[None, :]
        w_t = tl.load(w + p_tk, mask=m_tk, other=0.0)  # [C, BK]
        kg_t = tl.load(kg + p_tk, mask=m_tk, other=0.0)
        u_t = tl.load(u + p_tv, mask=m_tv, other=0.0)  # [C, BV]
        g_last = tl.load(gc + (tl.minimum(i_n * C + C, T) - 1) * (H * K) + o_k, mask=m_k, other=0.0)  # G_C [BK]
        d_t = u_t.to(tl.float32) - tl.dot(w_t, s.to(w_t.dtype), input_precision=PREC)  # Δ [C, BV]
        d_in = d_t.to(w_t.dtype)
        tl.store(delta + p_tv, d_in, mask=m_tv)
        s = s * tl.exp(g_last)[:, None] + tl.dot(tl.trans(kg_t), d_in, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + (i_b * H + i_h) * K * V + p_kv, s, mask=m_kv)


@triton.autotune(
    configs=autotune_configs(_FWD_OUTPUT_CONFIGS),
    key=["H", "K", "V", "C", "BK"],
    prune_configs_by={"early_config_prune": _prune_small},
)
@triton.jit(do_not_specialize=["T", "NT"])
def _fwd_output_kernel(
    qg,
    aqk,
    hs,
    delta,
    o,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk and V-block: O = qg S + A_qk Δ, with S the state at the chunk's start (saved by the walk)."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_nv, i_bh = tl.program_id(0), tl.program_id(1)
    i_n, i_v = i_nv // NV, i_nv % NV
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    bh = i_b * T * H + i_h
    o_c, o_k = tl.arange(0, C), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t = i_n * C + o_c
    m_t = t < T
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = t[:, None] * (H * V) + o_v[None, :]
    qg_t = tl.load(qg + bh * K + t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    a_t = tl.load(aqk + bh * C + t[:, None] * (H * C) + o_c[None, :], mask=m_t[:, None], other=0.0)  # [C, C]
    p_kv = ((i_b * NT + i_n) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    s_t = tl.load(hs + p_kv, mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
    d_t = tl.load(delta + bh * V + p_tv, mask=m_tv, other=0.0)  # [C, BV]
    o_t = tl.dot(qg_t, s_t, input_precision=PREC) + tl.dot(a_t, d_t, input_precision=PREC)
    tl.store(o + bh * V + p_tv, o_t.to(o.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def _bwd_ddelta_intra_kernel(
    aqk,
    do,
    ddelta,
    T,
    H: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk: the in-chunk part of dΔ, A_qkᵀ dO (it does not depend on the state gradient, so it stays out of
    the reverse walk, which adds kg dS to it), one V-block at a time."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    bh = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    a_t = tl.load(aqk + bh * C + t[:, None] * (H * C) + o_c[None, :], mask=m_t[:, None], other=0.0)  # [C, C]
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = bh * V + t[:, None] * (H * V) + o_v[None, :]
        do_t = tl.load(do + p_tv, mask=m_tv, other=0.0).to(a_t.dtype)
        dd = tl.dot(tl.trans(a_t), do_t, input_precision=PREC)
        tl.store(ddelta + p_tv, dd.to(ddelta.dtype.element_ty), mask=m_tv)


@triton.autotune(
    configs=autotune_configs(_BWD_STATE_CONFIGS),
    key=["H", "K", "V", "C", "BK"],
    prune_configs_by={"early_config_prune": _prune_bwd_state},
)
@triton.jit(do_not_specialize=["T", "NT"])
def _bwd_state_kernel(
    qg,
    kg,
    w,
    gc,
    do,
    dd_intra,
    dht,
    dhs,
    ddelta,
    dh0,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    """Chunks in reverse with a [BK, BV] slice of dS (the gradient of the state after the chunk), saved per chunk:
    dΔ = A_qkᵀ dO + kg dS (A_qkᵀ dO precomputed in ``dd_intra``),  dS ← e^{G_C} ⊙ dS + qgᵀ dO − Wᵀ dΔ."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    bh = i_b * T * H + i_h
    qg += bh * K
    kg += bh * K
    w += bh * K
    gc += bh * K
    do += bh * V
    dd_intra += bh * V
    ddelta += bh * V
    o_c, o_k = tl.arange(0, C), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        ds += tl.load(dht + (i_b * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(0, NT):
        i_n = NT - 1 - i_r
        tl.store(dhs + ((i_b * NT + i_n) * H + i_h) * K * V + p_kv, ds.to(dhs.dtype.element_ty), mask=m_kv)
        t = i_n * C + o_c
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = t[:, None] * (H * K) + o_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = t[:, None] * (H * V) + o_v[None, :]
        qg_t = tl.load(qg + p_tk, mask=m_tk, other=0.0)  # [C, BK]
        kg_t = tl.load(kg + p_tk, mask=m_tk, other=0.0)
        w_t = tl.load(w + p_tk, mask=m_tk, other=0.0)
        do_t = tl.load(do + p_tv, mask=m_tv, other=0.0).to(w_t.dtype)  # [C, BV]
        dd_t = tl.load(dd_intra + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # A_qkᵀ dO
        g_last = tl.load(gc + (tl.minimum(i_n * C + C, T) - 1) * (H * K) + o_k, mask=m_k, other=0.0)
        dd = dd_t + tl.dot(kg_t, ds.to(w_t.dtype), input_precision=PREC)  # dΔ [C, BV]
        dd_in = dd.to(w_t.dtype)
        tl.store(ddelta + p_tv, dd_in, mask=m_tv)
        ds = (
            ds * tl.exp(g_last)[:, None]
            + tl.dot(tl.trans(qg_t), do_t, input_precision=PREC)
            - tl.dot(tl.trans(w_t), dd_in, input_precision=PREC)
        )
    if HAS_DH0:
        tl.store(dh0 + (i_b * H + i_h) * K * V + p_kv, ds, mask=m_kv)


@triton.autotune(
    configs=[triton.Config({}, num_warps=8, num_stages=1)],  # 4 warps spill ~5.6 KB per thread (ptxas, sm_90a)
    key=["H", "K", "V", "C", "BK", "BKC", "BV"],
)
@triton.jit(do_not_specialize=["T", "NT"])
def _bwd_dense_kernel(
    q,
    k,
    v,
    gc,
    beta,
    xinv,
    w,
    u,
    hs,
    dhs,
    delta,
    ddelta,
    do,
    dv,
    dq,
    dk,
    dg,
    db,
    daqk,
    dl,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BKC: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk, everything that contracts over V (S the state at the chunk's start, dS' after it):
    dA_qk = dO Δᵀ;  dR_v = Xᵀ dΔ, dV = β dR_v;  dR_k = −dR_v Sᵀ;  dA_kk = −StrictTril(dR_k Wᵀ + dR_v Uᵀ);
    d(qg) = dO Sᵀ;  d(kg) = Δ dS'ᵀ;  then the element-wise chain rule through e^G, e^{G_C − G}, β."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    bh = i_b * T * H + i_h
    q += bh * K
    k += bh * K
    v += bh * V
    gc += bh * K
    beta += bh
    xinv += bh * C
    w += bh * K
    u += bh * V
    delta += bh * V
    ddelta += bh * V
    do += bh * V
    dv += bh * V
    dq += bh * K
    dk += bh * K
    dg += bh * K
    db += bh
    daqk += bh * C
    dl += bh * C
    hs += ((i_b * NT + i_n) * H + i_h) * K * V
    dhs += ((i_b * NT + i_n) * H + i_h) * K * V
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    n_valid = tl.minimum(T - i_n * C, C)
    p_cc = t[:, None] * (H * C) + o_c[None, :]
    x = tl.load(xinv + p_cc, mask=m_t[:, None], other=0.0)  # [C, C] fp32
    b_t = tl.load(beta + t * H, mask=m_t, other=0.0).to(tl.float32)
    d_aqk = tl.zeros([C, C], dtype=tl.float32)
    d_m = tl.zeros([C, C], dtype=tl.float32)
    d_b = tl.zeros([C], dtype=tl.float32)
    # Phase A: the C×C gradients and dV, one V-block at a time.
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = t[:, None] * (H * V) + o_v[None, :]
        dl_t = tl.load(delta + p_tv, mask=m_tv, other=0.0)
        do_t = tl.load(do + p_tv, mask=m_tv, other=0.0).to(dl_t.dtype)
        dd_t = tl.load(ddelta + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        v_t = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        u_t = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        d_aqk += tl.dot(do_t, tl.trans(dl_t), input_precision=PREC)
        d_rv = tl.dot(tl.trans(x), dd_t, input_precision=PREC)  # [C, BV]
        tl.store(dv + p_tv, (d_rv * b_t[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        d_b += tl.sum(d_rv * v_t, 1)
        d_m += tl.dot(d_rv, tl.trans(u_t), input_precision=PREC)
    # Phase B: the [C, K] gradients, one K-block of BKC columns at a time (bounded registers).
    for i_k in range(0, tl.cdiv(K, BKC)):
        o_k = i_k * BKC + tl.arange(0, BKC)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = t[:, None] * (H * K) + o_k[None, :]
        d_qg = tl.zeros([C, BKC], dtype=tl.float32)
        d_kg = tl.zeros([C, BKC], dtype=tl.float32)
        d_rk = tl.zeros([C, BKC], dtype=tl.float32)
        s_ds = tl.zeros([BKC], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            p_tv = t[:, None] * (H * V) + o_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            p_kv = o_k[:, None] * V + o_v[None, :]
            dl_t = tl.load(delta + p_tv, mask=m_tv, other=0.0)
            do_t = tl.load(do + p_tv, mask=m_tv, other=0.0).to(dl_t.dtype)
            dd_t = tl.load(ddelta + p_tv, mask=m_tv, other=0.0).to(tl.float32)
            s_t = tl.load(hs + p_kv, mask=m_kv, other=0.0)  # [BKC, BV] state at chunk start
            ds_t = tl.load(dhs + p_kv, mask=m_kv, other=0.0)  # gradient of the state after the chunk
            d_qg += tl.dot(do_t, tl.trans(s_t), input_precision=PREC)
            d_kg += tl.dot(dl_t, tl.trans(ds_t), input_precision=PREC)
            d_rv = tl.dot(tl.trans(x), dd_t, input_precision=PREC)
            d_rk -= tl.dot(d_rv.to(s_t.dtype), tl.trans(s_t), input_precision=PREC)
            s_ds += tl.sum(s_t.to(tl.float32) * ds_t.to(tl.float32), 1)
        w_t = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        d_m += tl.dot(d_rk, tl.trans(w_t), input_precision=PREC)
        q_t = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        k_t = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        g_t = tl.load(gc + p_tk, mask=m_tk, other=0.0)
        g_last = tl.load(gc + (i_n * C + n_valid - 1) * (H * K) + o_k, mask=m_k, other=0.0)
        decay = tl.where(m_t[:, None], tl.exp(g_t), 0.0)  # e^{G_r}
        to_end = tl.where(m_t[:, None], tl.exp(g_last[None, :] - g_t), 0.0)  # e^{G_C − G_r}
        qg_t = q_t * decay * scale
        rk_t = k_t * decay * b_t[:, None]  # the W right-hand side β e^G ⊙ K
        kg_t = k_t * to_end
        d_glast = tl.exp(g_last) * s_ds + tl.sum(kg_t * d_kg, 0)  # [BKC]
        dg_t = qg_t * d_qg + rk_t * d_rk - kg_t * d_kg
        dg_t += tl.where(o_c[:, None] == n_valid - 1, d_glast[None, :], 0.0)
        d_b += tl.sum(d_rk * k_t * decay, 1)
        tl.store(dq + p_tk, decay * scale * d_qg, mask=m_tk)
        tl.store(dk + p_tk, decay * b_t[:, None] * d_rk + to_end * d_kg, mask=m_tk)
        tl.store(dg + p_tk, dg_t, mask=m_tk)
    d_l = tl.where((o_c[:, None] > o_c[None, :]) & m_t[:, None], -d_m, 0.0)
    d_aqk = tl.where((o_c[:, None] >= o_c[None, :]) & m_t[:, None], d_aqk, 0.0)
    tl.store(dl + p_cc, d_l, mask=m_t[:, None])
    tl.store(daqk + p_cc, d_aqk, mask=m_t[:, None])
    tl.store(db + t * H, d_b, mask=m_t)


@triton.jit(do_not_specialize=["T"])
def _bwd_intra_kernel(
    q,
    k,
    gc,
    beta,
    daqk,
    dl,
    dq_part,
    dk_part,
    dg,
    db,
    dq,
    dk,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rows [t0, t0 + BC): the pairwise terms of P[r, i] = Σ_c a_rc b_ic e^{G_rc − G_ic} for P = A_qk, A_kk:
    row side ``da_r = Σ_i dP[r, i] b_i e^{G_r − G_i}``, column side ``db_i = Σ_r dP[r, i] a_r e^{G_r − G_i}``,
    ``dG += a ⊙ da − b ⊙ db``; added to the dense parts and written out as dq, dk (and dG, dβ in place)."""
    NC: tl.constexpr = C // BC
    i_tc, i_bh = tl.program_id(0), tl.program_id(1)
    bh = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    q += bh * K
    k += bh * K
    gc += bh * K
    beta += bh
    daqk += bh * C
    dl += bh * C
    dq_part += bh * K
    dk_part += bh * K
    dg += bh * K
    db += bh
    dq += bh * K
    dk += bh * K
    i_n, i_a = i_tc // NC, i_tc % NC
    t0 = i_n * C + i_a * BC
    if t0 >= T:
        return
    o_i, o_k = tl.arange(0, BC), tl.arange(0, BK)
    m_k = o_k < K
    t_a = t0 + o_i
    m_a = t_a < T
    m_ak = m_a[:, None] & m_k[None, :]
    p_ak = t_a[:, None] * (H * K) + o_k[None, :]
    q_a = tl.load(q + p_ak, mask=m_ak, other=0.0).to(tl.float32)
    k_a = tl.load(k + p_ak, mask=m_ak, other=0.0).to(tl.float32)
    g_a = tl.load(gc + p_ak, mask=m_ak, other=0.0)
    b_a = tl.load(beta + t_a * H, mask=m_a, other=0.0).to(tl.float32)
    g_ref = tl.load(gc + t0 * (H * K) + o_k, mask=m_k, other=0.0)
    m_cc = m_a[:, None] & (o_i < BC)[None, :]
    # Row side, earlier sub-blocks j (factored around this panel's first row).
    da_qk = tl.zeros([BC, BK], dtype=tl.float32)
    da_l = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_a):
        p_jk = (i_n * C + i_j * BC + o_i)[:, None] * (H * K) + o_k[None, :]
        k_j = tl.load(k + p_jk, mask=m_k[None, :], other=0.0).to(tl.float32)
        g_j = tl.load(gc + p_jk, mask=m_k[None, :], other=0.0)
        kd_j = k_j * tl.exp(g_ref[None, :] - g_j)
        p_cc = t_a[:, None] * (H * C) + i_j * BC + o_i[None, :]
        dp_qk = tl.load(daqk + p_cc, mask=m_cc, other=0.0)
        dp_l = tl.load(dl + p_cc, mask=m_cc, other=0.0)
        da_qk += tl.dot(dp_qk, kd_j, input_precision=PREC)
        da_l += tl.dot(dp_l, kd_j, input_precision=PREC)
    decay_a = tl.where(m_a[:, None], tl.exp(tl.minimum(g_a - g_ref[None, :], 0.0)), 0.0)
    da_qk *= decay_a
    da_l *= decay_a
    # Column side, later sub-blocks j (factored around the first row of j).
    db_qk = tl.zeros([BC, BK], dtype=tl.float32)
    db_l = tl.zeros([BC, BK], dtype=tl.float32)
    n_blocks = tl.cdiv(tl.minimum(T - i_n * C, C), BC)
    for i_j in range(i_a + 1, n_blocks):
        t_j0 = i_n * C + i_j * BC
        t_j = t_j0 + o_i
        m_j = t_j < T
        m_jk = m_j[:, None] & m_k[None, :]
        p_jk = t_j[:, None] * (H * K) + o_k[None, :]
        q_j = tl.load(q + p_jk, mask=m_jk, other=0.0).to(tl.float32)
        k_j = tl.load(k + p_jk, mask=m_jk, other=0.0).to(tl.float32)
        g_j = tl.load(gc + p_jk, mask=m_jk, other=0.0)
        b_j = tl.load(beta + t_j * H, mask=m_j, other=0.0).to(tl.float32)
        g_refj = tl.load(gc + t_j0 * (H * K) + o_k, mask=m_k, other=0.0)
        decay_j = tl.where(m_j[:, None], tl.exp(tl.minimum(g_j - g_refj[None, :], 0.0)), 0.0)  # e^{G_r − G_ref_j} ≤ 1
        decay_to_j = tl.exp(g_refj[None, :] - g_a)  # e^{G_ref_j − G_i} ≤ 1 (rows of a precede j)
        p_cc = t_j[:, None] * (H * C) + i_a * BC + o_i[None, :]
        m_jc = m_j[:, None] & (o_i < BC)[None, :]
        dp_qk = tl.load(daqk + p_cc, mask=m_jc, other=0.0)
        dp_l = tl.load(dl + p_cc, mask=m_jc, other=0.0) * b_j[:, None]
        db_qk += decay_to_j * tl.dot(tl.trans(dp_qk), q_j * decay_j, input_precision=PREC)
        db_l += decay_to_j * tl.dot(tl.trans(dp_l), k_j * decay_j, input_precision=PREC)
    db_qk *= scale
    # Diagonal block, pairwise: step j handles column j (row side) and row j (column side).
    p_cc = t_a[:, None] * (H * C) + i_a * BC + o_i[None, :]
    dp_qk = tl.load(daqk + p_cc, mask=m_cc, other=0.0)
    dp_l = tl.load(dl + p_cc, mask=m_cc, other=0.0)
    for j in range(0, BC):
        m_jj = t0 + j < T
        m_j = m_k & m_jj
        p_j = (t0 + j) * (H * K) + o_k
        q_j = tl.load(q + p_j, mask=m_j, other=0.0).to(tl.float32)
        k_j = tl.load(k + p_j, mask=m_j, other=0.0).to(tl.float32)
        g_j = tl.load(gc + p_j, mask=m_j, other=0.0)
        b_j = tl.load(beta + (t0 + j) * H, mask=m_jj, other=0.0).to(tl.float32)
        decay_r = tl.where((o_i >= j)[:, None] & m_a[:, None], tl.exp(tl.minimum(g_a - g_j[None, :], 0.0)), 0.0)
        col_qk = tl.sum(tl.where(o_i[None, :] == j, dp_qk, 0.0), 1)
        col_l = tl.sum(tl.where(o_i[None, :] == j, dp_l, 0.0), 1)
        da_qk += col_qk[:, None] * decay_r * k_j[None, :]
        da_l += col_l[:, None] * decay_r * k_j[None, :]
        decay_i = tl.where((o_i <= j)[:, None] & m_jj, tl.exp(tl.minimum(g_j[None, :] - g_a, 0.0)), 0.0)
        row_qk = tl.sum(tl.where(o_i[:, None] == j, dp_qk, 0.0), 0)
        row_l = tl.sum(tl.where(o_i[:, None] == j, dp_l, 0.0), 0) * b_j
        db_qk += row_qk[:, None] * decay_i * (q_j * scale)[None, :]
        db_l += row_l[:, None] * decay_i * k_j[None, :]
    dq_t = tl.load(dq_part + p_ak, mask=m_ak, other=0.0) + scale * da_qk
    dk_t = tl.load(dk_part + p_ak, mask=m_ak, other=0.0) + db_qk + b_a[:, None] * da_l + db_l
    dg_t = tl.load(dg + p_ak, mask=m_ak, other=0.0)
    dg_t += scale * q_a * da_qk - k_a * db_qk + b_a[:, None] * k_a * da_l - k_a * db_l
    db_t = tl.load(db + t_a * H, mask=m_a, other=0.0) + tl.sum(k_a * da_l, 1)
    tl.store(dq + p_ak, dq_t.to(dq.dtype.element_ty), mask=m_ak)
    tl.store(dk + p_ak, dk_t.to(dk.dtype.element_ty), mask=m_ak)
    tl.store(dg + p_ak, dg_t, mask=m_ak)
    tl.store(db + t_a * H, db_t, mask=m_a)


@triton.jit
def _decode_kernel(
    q,
    k,
    v,
    g,
    beta,
    s_in,
    s_out,
    o,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """One token on a [BK, BV] slice of S: S ← e^g ⊙ S; S += β k (v − Sᵀk)ᵀ; o = Sᵀ(scale q)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    s = tl.load(s_in + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    q_t = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    k_t = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    g_t = tl.load(g + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    v_t = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_t = tl.load(beta + i_bh).to(tl.float32)
    s = s * tl.exp(g_t)[:, None]
    recalled = tl.sum(k_t[:, None] * s, 0)  # [BV]
    s += k_t[:, None] * (b_t * (v_t - recalled))[None, :]
    o_t = tl.sum((q_t * scale)[:, None] * s, 0)
    tl.store(s_out + p_kv, s, mask=m_kv)
    tl.store(o + i_bh * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests replace it by a NaN-filled allocator)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _chunk_cumsum(x: torch.Tensor, C: int, reverse: bool, out_dtype: torch.dtype) -> torch.Tensor:
    B, T, H, K = x.shape
    out = _alloc(B, T, H, K, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(T, C), B * H)
    _chunk_cumsum_kernel[grid](x, out, T, H=H, K=K, C=C, BK=_block(K, 256), REVERSE=reverse, num_stages=1)
    return out


def _forward(q, k, v, g, beta, h0, scale, output_final_state, C, save):
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    BK = _block(K, 256)
    prec = dot_precision(q.dtype)
    dev, dt = q.device, q.dtype
    gc = _chunk_cumsum(g, C, reverse=False, out_dtype=torch.float32)
    aqk = _alloc(B, T, H, C, dtype=dt, device=dev)
    akk = _alloc(B, T, H, C, dtype=torch.float32, device=dev)  # A_kk, then (after the solve) X = (I + A_kk)⁻¹
    _fwd_intra_kernel[(NT * (C // _BC), B * H)](
        q, k, gc, beta, aqk, akk, scale, T, H=H, K=K, C=C, BC=_BC, BK=BK, PREC=prec, num_stages=1
    )
    w, qg, kg = (_alloc(B, T, H, K, dtype=dt, device=dev) for _ in range(3))
    u = _alloc(B, T, H, V, dtype=dt, device=dev)
    _fwd_solve_kernel[(NT, B * H)](
        q, k, v, gc, beta, akk, w, u, qg, kg, scale, T, H=H, K=K, V=V, C=C, BC=_BC, BK=BK, BV=_block(V, 64),
        PREC=prec, SOLVE_PREC=dot_precision(torch.float32), num_warps=4, num_stages=1,
    )  # fmt: skip
    # The walk saves S at every chunk's start (hs) and Δ; the output kernel then reads both, in parallel.
    hs = _alloc(B, NT, H, K, V, dtype=dt, device=dev)
    delta = _alloc(B, T, H, V, dtype=dt, device=dev)
    ht = _alloc(B, H, K, V, dtype=torch.float32, device=dev) if output_final_state else hs
    _fwd_state_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), B * H)](
        w, u, kg, gc, h0 if h0 is not None else hs, hs, delta, ht, T, NT,
        H=H, K=K, V=V, C=C, BK=BK, HAS_H0=h0 is not None, STORE_HT=output_final_state, PREC=prec,
    )  # fmt: skip
    o = _alloc(B, T, H, V, dtype=dt, device=dev)
    _fwd_output_kernel[lambda meta: (NT * triton.cdiv(V, meta["BV"]), B * H)](
        qg, aqk, hs, delta, o, T, NT, H=H, K=K, V=V, C=C, BK=BK, PREC=prec
    )
    saved = (gc, aqk, akk, w, u, qg, kg, hs, delta) if save else None  # akk holds X = (I + A_kk)⁻¹ now
    return o, (ht if output_final_state else None), saved


def _backward(q, k, v, g, beta, h0, saved, do, dht, scale, C):
    gc, aqk, xinv, w, u, qg, kg, hs, delta = saved
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    BK = _block(K, 256)
    prec = dot_precision(q.dtype)
    dev, dt = q.device, q.dtype
    do = do.contiguous()
    dhs = _alloc(B, NT, H, K, V, dtype=dt, device=dev)
    dd_intra, ddelta = (_alloc(B, T, H, V, dtype=dt, device=dev) for _ in range(2))
    _bwd_ddelta_intra_kernel[(NT, B * H)](aqk, do, dd_intra, T, H=H, V=V, C=C, BV=_block(V, 64), PREC=prec)
    dh0 = _alloc(B, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    _bwd_state_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), B * H)](
        qg, kg, w, gc, do, dd_intra, dht.contiguous() if dht is not None else do, dhs, ddelta,
        dh0 if dh0 is not None else do, T, NT, H=H, K=K, V=V, C=C, BK=BK,
        HAS_DHT=dht is not None, HAS_DH0=dh0 is not None, PREC=prec,
    )  # fmt: skip
    dv = _alloc(*v.shape, dtype=v.dtype, device=dev)
    dq_part, dk_part, dg = (_alloc(B, T, H, K, dtype=torch.float32, device=dev) for _ in range(3))
    db = _alloc(B, T, H, dtype=torch.float32, device=dev)
    daqk, dl = (_alloc(B, T, H, C, dtype=torch.float32, device=dev) for _ in range(2))
    _bwd_dense_kernel[(NT, B * H)](
        q, k, v, gc, beta, xinv, w, u, hs, dhs, delta, ddelta, do, dv, dq_part, dk_part, dg, db, daqk, dl,
        scale, T, NT, H=H, K=K, V=V, C=C, BK=BK, BKC=min(BK, 64), BV=_block(V, 64), PREC=prec,
    )  # fmt: skip
    dq, dk = (_alloc(B, T, H, K, dtype=dt, device=dev) for _ in range(2))
    _bwd_intra_kernel[(NT * (C // _BC), B * H)](
        q, k, gc, beta, daqk, dl, dq_part, dk_part, dg, db, dq, dk, scale, T,
        H=H, K=K, C=C, BC=_BC, BK=BK, PREC=prec, num_stages=1,
    )  # fmt: skip
    dgate = _chunk_cumsum(dg, C, reverse=True, out_dtype=g.dtype)
    return dq, dk, dv, dgate, db.to(beta.dtype), dh0


class _KDAChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, output_final_state, chunk_size):
        save = any(ctx.needs_input_grad[:6])
        o, ht, saved = _forward(q, k, v, g, beta, initial_state, scale, output_final_state, chunk_size, save)
        if save:
            ctx.save_for_backward(q, k, v, g, beta, initial_state, *saved)
            ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, *saved = ctx.saved_tensors
        grads = _backward(q, k, v, g, beta, h0, saved, do, dht, ctx.scale, ctx.chunk_size)
        return (*grads, None, None, None)


def kda_chunk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise KDA on the GPU (or the Triton interpreter), differentiable with a Triton backward.

    Same math and shapes as :func:`nanokimi.kda.reference.kda_chunk`: q, k, g ``[B, T, H, K]`` (K ≤ 256), v ``[B,
    T, H, V]``, beta ``[B, T, H]``, initial_state ``[B, H, K, V]``. q, k, v share one dtype (fp16/bf16/fp32);
    g, beta and the state may be any float dtype (computed in fp32). Returns ``o`` in q's dtype and the final
    state in fp32 (or None). Gradients flow to q, k, v, g, beta and initial_state.

    ``check_values`` checks ``g ≤ 0`` and ``0 ≤ β ≤ 2`` (one device→host sync each); turn it off in hot loops
    whose inputs are valid by construction (the layer's gate is ≤ 0 and its β a sigmoid).

    Under the Triton interpreter (CPU), bf16 q, k, v are computed in fp32 and ``o`` is rounded back to bf16.
    """
    B, T, H, K, V = validate_kda_inputs(q, k, v, g, beta, initial_state, check_values=check_values)
    check_tensor("q", q, dtypes=_KERNEL_DTYPES)
    check_tensor("k", k, dtypes=(q.dtype,))
    check_tensor("v", v, dtypes=(q.dtype,))
    check_in("chunk_size", chunk_size, CHUNK_SIZES)
    if K > 256:
        raise ValueError(f"q: expected head dim K <= 256 (one register tile), got K={K}")
    if T * H * max(K, V, chunk_size) >= 2**31:
        raise ValueError(
            f"q: expected T·H·max(K, V, chunk_size) < 2^31 (32-bit offsets inside one (batch, head)), got "
            f"{T}·{H}·{max(K, V, chunk_size)}; split the sequence"
        )
    names = ("q", "k", "v", "g", "beta")
    ensure_cuda_or_interpreter(q, k, v, g, beta, names=names)
    if initial_state is not None:
        ensure_cuda_or_interpreter(initial_state, names=("initial_state",))
    scale = resolve_scale(scale, K)
    if T == 0:
        o = q.new_zeros(B, 0, H, V)
        ht = (
            initial_state.float().clone() if initial_state is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        )
        return o, (ht if output_final_state else None)
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    in_fp32 = interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 dot: see the module docstring
    if in_fp32:
        q, k, v = q.float(), k.float(), v.float()
    o, ht = _KDAChunkFunction.apply(q, k, v, g, beta, initial_state, scale, bool(output_final_state), chunk_size)
    return (o.to(torch.bfloat16) if in_fp32 else o), ht


def kda_decode_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, fused: ``S ← (I − β k kᵀ) Diag(e^g) S + β k vᵀ``, ``o = Sᵀ(scale · q)``.

    q, k, g ``[B, H, K]``; v ``[B, H, V]``; beta ``[B, H]``; state ``[B, H, K, V]`` (fp32). Returns ``(o [B, H,
    V] in q's dtype, new_state fp32)``. With ``inplace=True`` the new state is written into ``state`` (which
    must then be a contiguous fp32 tensor) and returned. No autograd (decoding only).
    """
    check_tensor("q", q, ndim=3, dtypes=_KERNEL_DTYPES)
    B, H, K = q.shape
    check_tensor("state", state, shape=(B, H, K, None), dtypes=FLOATS, device=q.device)
    V = state.shape[-1]
    check_tensor("k", k, shape=(B, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("v", v, shape=(B, H, V), dtypes=FLOATS, device=q.device)
    check_tensor("g", g, shape=(B, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("beta", beta, shape=(B, H), dtypes=FLOATS, device=q.device)
    if K > 256:
        raise ValueError(f"q: expected head dim K <= 256, got K={K}")
    ensure_cuda_or_interpreter(q, k, v, g, beta, state, names=("q", "k", "v", "g", "beta", "state"))
    if inplace and (state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError(
            f"state: inplace=True needs a contiguous float32 tensor, got {state.dtype} "
            f"(contiguous={state.is_contiguous()})"
        )
    scale = resolve_scale(scale, K)
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    s_in = state.contiguous()
    s_out = s_in if inplace else _alloc(B, H, K, V, dtype=torch.float32, device=q.device)
    o = _alloc(B, H, V, dtype=q.dtype, device=q.device)
    BV = _block(V, 64)
    _decode_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, s_in, s_out, o, scale, H=H, K=K, V=V, BK=_block(K, 256), BV=BV, num_stages=1
    )
    return o, s_out

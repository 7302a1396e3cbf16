"""Kimi Delta Attention (KDA), the spec: the token loop and the chunkwise (UT / WY) form, in plain PyTorch.

Kimi Linear (arXiv 2510.26692) §3, Eq. 1. Per batch element and head, with a state ``S ∈ R^{K×V}``::

    S_t = (I − β_t k_t k_tᵀ) Diag(exp g_t) S_{t−1} + β_t k_t v_tᵀ          (the gated delta rule)
    o_t = S_tᵀ (scale · q_t)                                              (read with the *updated* state)

``g_t ∈ R^K`` is a per-channel log-decay (``g ≤ 0``, so ``α_t = exp g_t ∈ (0, 1]``); ``β_t ∈ [0, 2]`` is the
delta rule's learning rate (sigmoid in the layer, up to 2 for negative eigenvalues). With ``α_t`` equal across
channels this is Gated DeltaNet; with ``α ≡ 1`` it is DeltaNet.

Shapes: q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; state ``[B, H, K, V]``; o ``[B, T, H, V]``.

The ladder: :func:`kda_recurrent` (the token loop, O(T·K·V) sequential steps) → :func:`kda_chunk` (chunks of C
tokens: the C×C intra-chunk system solved once per chunk by the UT transform, the state passed between chunks,
§3.1 Eq. 6–9). Both compute in float32, or float64 when any input is float64, and return outputs in that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from nanokimi.checks import check_positive_int, check_range, check_tensor

__all__ = [
    "kda_recurrent",
    "kda_chunk",
    "kda_step",
    "chunk_cumsum",
    "intra_chunk_matrices",
    "intra_chunk_matrices_factored",
    "intra_chunk_matrices_blocked",
    "in_chunk_decay_range",
    "factored_range_bound",
    "ut_transform",
    "kda_gate",
    "l2norm",
    "kda_flops",
    "attention_flops",
    "validate_kda_inputs",
    "resolve_scale",
]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    check_values: bool = True,
) -> tuple[int, int, int, int, int]:
    """Check shapes/dtypes/devices of a KDA call and (``check_values``) ``g ≤ 0`` and ``0 ≤ β ≤ 2``.

    Returns ``(B, T, H, K, V)``. Errors name the argument, the expected and the actual value.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOATS)
    B, T, H, K = q.shape
    check_tensor("k", k, shape=(B, T, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("v", v, shape=(B, T, H, None), dtypes=FLOATS, device=q.device)
    V = v.shape[-1]
    check_tensor("g", g, shape=(B, T, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("beta", beta, shape=(B, T, H), dtypes=FLOATS, device=q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(B, H, K, V), dtypes=FLOATS, device=q.device)
    if check_values:
        check_range("g", g, high=0.0)
        check_range("beta", beta, low=0.0, high=2.0)
    return B, T, H, K, V


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_scale(scale: float | None, K: int) -> float:
    """``K^-1/2`` for None, else ``scale`` itself, which must be a finite Python number."""
    if scale is None:
        return K**-0.5
    if not isinstance(scale, int | float) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a finite float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _step(q_t, k_t, v_t, g_t, beta_t, S):
    """One token of the recurrence for all (batch, head): inputs ``[B, H, ·]``, state ``[B, H, K, V]``."""
    S = S * g_t.exp()[..., None]  # Diag(α_t) S_{t−1}
    prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)  # what the decayed state recalls for k_t
    S = S + torch.einsum("bhk,bhv->bhkv", beta_t[..., None] * k_t, v_t - prediction)  # delta-rule write
    o_t = torch.einsum("bhk,bhkv->bhv", q_t, S)
    return o_t, S


def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``S ← (I − β k kᵀ) Diag(exp g) S + β k vᵀ``, ``o = Sᵀ (scale · q)``.

    q, k, g ``[B, H, K]``; v ``[B, H, V]``; beta ``[B, H]``; state ``[B, H, K, V]``.
    Returns ``(o [B, H, V], new_state [B, H, K, V])`` in float32 (float64 if an input is float64).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOATS)
    B, H, K = q.shape
    check_tensor("state", state, shape=(B, H, K, None), dtypes=FLOATS, device=q.device)
    V = state.shape[-1]
    check_tensor("k", k, shape=(B, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("v", v, shape=(B, H, V), dtypes=FLOATS, device=q.device)
    check_tensor("g", g, shape=(B, H, K), dtypes=FLOATS, device=q.device)
    check_tensor("beta", beta, shape=(B, H), dtypes=FLOATS, device=q.device)
    check_range("g", g, high=0.0)
    check_range("beta", beta, low=0.0, high=2.0)
    dt = _compute_dtype(q, k, v, g, beta, state)
    q, k, v, g, beta, state = (t.to(dt) for t in (q, k, v, g, beta, state))
    return _step(q * resolve_scale(scale, K), k, v, g, beta, state)


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token loop (the spec). For t = 1..T and every (batch, head)::

        S ← Diag(exp g_t) S                      decay, one rate per key channel
        S ← S + β_t k_t (v_t − Sᵀ k_t)ᵀ          delta rule: replace what k_t recalls by v_t, at rate β_t
        o_t = Sᵀ (scale · q_t)

    q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; initial_state ``[B, H, K, V]`` or None
    (zeros); ``scale`` defaults to ``K^-1/2``. Returns ``(o [B, T, H, V], S_T [B, H, K, V] or None)``.
    """
    B, T, H, K, V = validate_kda_inputs(q, k, v, g, beta, initial_state)
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    q = q * resolve_scale(scale, K)
    S = torch.zeros(B, H, K, V, dtype=dt, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(dt)
    outputs = []
    for t in range(T):
        o_t, S = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1) if outputs else torch.zeros(B, 0, H, V, dtype=dt, device=q.device)
    return o, (S if output_final_state else None)


def chunk_cumsum(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``G[n, r] = Σ_{s ≤ r} g[n, s]``: the inclusive cumulative log-decay inside each chunk.

    g ``[..., N, C, K]`` (already split into chunks) → same shape. ``exp(G_r − G_i)`` (i ≤ r) is the decay
    from just after token i to token r, always ≤ 1.
    """
    if g.shape[-2] != chunk_size:
        raise ValueError(f"g: expected chunks of {chunk_size} tokens in dim -2, got shape {tuple(g.shape)}")
    return g.cumsum(-2)


def intra_chunk_matrices(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, beta: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two C×C matrices of one chunk, computed with exact pairwise decays (no overflow for any g ≤ 0)::

        A_kk[r, i] = β_r Σ_c k_rc k_ic exp(G_rc − G_ic)      for i < r (strictly lower), else 0
        A_qk[r, i] = scale Σ_c q_rc k_ic exp(G_rc − G_ic)    for i ≤ r (lower, diagonal included), else 0

    q, k, G ``[..., C, K]``; beta ``[..., C]`` → ``(A_kk, A_qk)`` each ``[..., C, C]``. (Report App. C; the
    factored form ``(Γ⊙K)(K/Γ)ᵀ`` of Eq. 6 overflows when the decay inside a chunk is strong.)
    """
    C = G.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()  # [C, C], r ≥ i
    log_decay = G.unsqueeze(-2) - G.unsqueeze(-3)  # [..., C(r), C(i), K] = G_r − G_i
    decay = torch.where(causal[..., None], log_decay, float("-inf")).exp()  # 0 above the diagonal
    a_kk = torch.einsum("...rc,...ic,...ric->...ri", k, k, decay)
    a_qk = torch.einsum("...rc,...ic,...ric->...ri", q, k, decay) * scale
    a_kk = (a_kk * beta[..., :, None]).tril(-1)
    return a_kk, a_qk


def in_chunk_decay_range(G: torch.Tensor) -> float:
    """``R = max |G_last − G_first|`` over every chunk and channel of G ``[..., C, K]``: the largest in-chunk decay.

    G is an in-chunk cumulative sum of ``g ≤ 0``, so each channel falls monotonically from its first row to its last
    and every ``G_r − G_i`` inside a chunk lies in ``[−R, R]``.
    """
    return float((G[..., 0, :] - G[..., -1, :]).detach().abs().max()) if G.numel() else 0.0


def factored_range_bound(dtype: torch.dtype) -> float:
    """The largest in-chunk decay range R for which :func:`intra_chunk_matrices_factored` is safe: ``ln(max) / 2``.

    With the reference at each chunk's first row, the row factors ``e^{G_r − G_first}`` lie in ``[e^{−R}, 1]`` and
    the column factors ``e^{G_first − G_i}`` in ``[1, e^{R}] ⊆ [1, max^{1/2}]`` (normal numbers, full precision);
    every product of a row and a column factor, masked entries included, lies in ``[max^{−1/2}, max^{1/2}]``: a
    margin of ``√max`` (≈ 1.8e19 in fp32, 1.3e154 in fp64) is left for ``|q|·|k|·K`` and the gradients.
    fp32: R ≤ 44.4; fp64: R ≤ 354.9.
    """
    return math.log(torch.finfo(dtype).max) / 2


def intra_chunk_matrices_factored(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, beta: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``(A_kk, A_qk)`` as :func:`intra_chunk_matrices`, as two batched matmuls (report Eq. 6's chunk form).

    Split each pairwise decay around the chunk's first row ``G_first`` (per channel)::

        e^{G_rc − G_ic} = e^{G_rc − G_first,c} · e^{G_first,c − G_ic}
        A_qk = scale · Tril((Q ⊙ e^{G − G_first}) (K ⊙ e^{G_first − G})ᵀ)
        A_kk = Diag(β) · StrictTril((K ⊙ e^{G − G_first}) (K ⊙ e^{G_first − G})ᵀ)

    so no ``[C, C, K]`` tensor is built, forward or backward (autograd goes through the matmuls and the two
    ``[C, K]`` factors). The column factors grow as ``e^{R}`` (R: the chunk's decay range,
    :func:`in_chunk_decay_range`), so call it only when R is within :func:`factored_range_bound` of the dtype.
    There it is as accurate as the pairwise form: each exponent carries about the same ``ε·R`` rounding as
    ``G_r − G_i``. The first row (not, say, the midpoint of the range) keeps every entry's rounding causal: row r
    reads only rows ≤ r of the chunk, so tokens after a position cannot change its outputs by even one bit.
    ``A`` does not depend on the reference (it cancels), so the reference is detached (its two gradient paths
    would only cancel).
    q, k, G ``[..., C, K]``; beta ``[..., C]`` → ``(A_kk, A_qk)`` each ``[..., C, C]``.
    """
    g_ref = G[..., :1, :].detach()  # [..., 1, K], each channel's value at the chunk's first row
    to_ref = (G - g_ref).exp()  # e^{G_r − G_first} ∈ [e^{−R}, 1], [..., C, K]
    from_ref = (g_ref - G).exp()  # e^{G_first − G_i} ∈ [1, e^{R}]
    k_cols = (k * from_ref).transpose(-1, -2)  # [..., K, C]
    a_kk = ((k * to_ref) @ k_cols) * beta[..., :, None]  # [..., C(r), C(i)]
    a_qk = ((q * to_ref) @ k_cols) * scale
    return a_kk.tril(-1), a_qk.tril()


def intra_chunk_matrices_blocked(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, beta: torch.Tensor, scale: float, block: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``(A_kk, A_qk)`` as :func:`intra_chunk_matrices`, computed the way the Triton kernel does.

    Cut the C rows into sub-blocks of ``block`` rows. Inside a diagonal sub-block use the exact pairwise decay
    (a ``[block, block, K]`` tensor). For rows r of sub-block a and any earlier column i, factor around the first
    row of a: ``e^{G_r − G_i} = e^{G_r − G_ref} · e^{G_ref − G_i}``. Both exponents are ≤ 0, so nothing
    overflows, and the off-diagonal part becomes one batched matmul. Memory and exps drop from ``C²K`` to about
    ``C·K·(block + C/block)``. :func:`kda_chunk` uses it when the in-chunk decay range is beyond
    :func:`factored_range_bound` (at ``C ≤ block`` it is the pairwise form itself).
    """
    C, K = G.shape[-2:]
    nb = -(-C // block)
    pad = nb * block - C
    if pad:  # zero keys/queries with G held at its last value add nothing
        q, k = (F.pad(t, (0, 0, 0, pad)) for t in (q, k))
        G = torch.cat([G, G[..., -1:, :].expand(*G.shape[:-2], pad, K)], dim=-2)
        beta = F.pad(beta, (0, pad))
    Cp = nb * block
    qb, kb, Gb = (t.unflatten(-2, (nb, block)) for t in (q, k, G))  # [..., nb, block, K]
    # Diagonal sub-blocks, exact pairwise (as in intra_chunk_matrices).
    causal = torch.ones(block, block, dtype=torch.bool, device=G.device).tril()
    log_decay = Gb.unsqueeze(-2) - Gb.unsqueeze(-3)  # [..., nb, block(r), block(i), K]
    decay = torch.where(causal[..., None], log_decay, float("-inf")).exp()
    diag_kk = torch.einsum("...rc,...ic,...ric->...ri", kb, kb, decay)  # [..., nb, block, block]
    diag_qk = torch.einsum("...rc,...ic,...ric->...ri", qb, kb, decay)
    # Earlier columns: rows of sub-block a against every column i < a·block, factored around G_ref(a).
    g_ref = Gb[..., 0, :]  # [..., nb, K]
    row_decay = (Gb - g_ref.unsqueeze(-2)).exp()  # e^{G_r − G_ref} ≤ 1, [..., nb, block, K]
    earlier = torch.arange(Cp, device=G.device)[None, :] < (torch.arange(nb, device=G.device) * block)[:, None]
    col_log = g_ref.unsqueeze(-2) - G.unsqueeze(-3)  # G_ref(a) − G_i, [..., nb, Cp, K]
    col_decay = torch.where(earlier[..., None], col_log, float("-inf")).exp()  # 0 for i ≥ a·block
    k_cols = col_decay * k.unsqueeze(-3)  # [..., nb, Cp, K]
    off_kk = (kb * row_decay) @ k_cols.transpose(-1, -2)  # [..., nb, block, Cp]
    off_qk = (qb * row_decay) @ k_cols.transpose(-1, -2)
    # Assemble: the off-diagonal panels plus the diagonal blocks on the block diagonal.
    eye_blocks = torch.eye(nb, dtype=G.dtype, device=G.device)  # [nb(a), nb(j)]
    a_kk = off_kk + torch.einsum("...ari,aj->...arji", diag_kk, eye_blocks).flatten(-2)
    a_qk = off_qk + torch.einsum("...ari,aj->...arji", diag_qk, eye_blocks).flatten(-2)
    a_kk, a_qk = a_kk.flatten(-3, -2)[..., :C, :C], a_qk.flatten(-3, -2)[..., :C, :C]  # [..., C, C]
    return (a_kk * beta[..., :C, None]).tril(-1), a_qk * scale


def ut_transform(
    a_kk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UT transform (report Eq. 7): solve the chunk's unit-lower-triangular system once for both sides::

        M = I + A_kk,   W = M⁻¹ Diag(β) (exp(G) ⊙ K),   U = M⁻¹ Diag(β) V

    a_kk ``[..., C, C]``; k, G ``[..., C, K]``; v ``[..., C, V]``; beta ``[..., C]`` → ``(W [..., C, K],
    U [..., C, V])``. Then the chunk's delta-rule corrections are ``U − W S`` for the state S at chunk start.
    """
    C = a_kk.shape[-1]
    eye = torch.eye(C, dtype=a_kk.dtype, device=a_kk.device)
    m = a_kk + eye
    rhs = torch.cat([beta[..., None] * (G.exp() * k), beta[..., None] * v], dim=-1)  # [..., C, K + V]
    # Forward substitution. A flat 3-D batch is ~10x faster on the CPU than the same solve on 5-D batch dims.
    wu = torch.linalg.solve_triangular(
        m.reshape(-1, C, C), rhs.reshape(-1, C, rhs.shape[-1]), upper=False, unitriangular=True
    ).view(rhs.shape)
    return wu[..., : k.shape[-1]], wu[..., k.shape[-1] :]


def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise form (report §3.1, Eq. 6–9), same outputs as :func:`kda_recurrent`.

    Split T into chunks of C tokens (the last one zero-padded: g = 0, β = 0 leave the state untouched). For
    each chunk, with S the state at its start, G the in-chunk cumulative log-decay and ``G_C`` its last row::

        A_kk, A_qk = intra_chunk_matrices(q, k, G, β)       C×C (factored if R ≤ bound, else blocked pairwise)
        W, U      = ut_transform(A_kk, k, v, G, β)          the intra-chunk triangular system, solved once
        Δ         = U − W S                                 delta-rule corrections ("pseudo-values")
        O         = (scale · exp(G) ⊙ Q) S + A_qk Δ         Eq. 9
        S        ← Diag(exp G_C) S + (exp(G_C − G) ⊙ K)ᵀ Δ  Eq. 8

    Everything except the last three lines is independent across chunks (parallel); only S is passed on.
    Shapes as in :func:`kda_recurrent`; differentiable (it is the layer's reference backend).
    """
    B, T, H, K, V = validate_kda_inputs(q, k, v, g, beta, initial_state)
    C = check_positive_int("chunk_size", chunk_size)
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    scale = resolve_scale(scale, K)
    n_chunks = max(1, -(-T // C))
    pad = n_chunks * C - T

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, ...] → [B, H, N, C, ...]
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return rearrange(x, "b (n c) h ... -> b h n c ...", c=C)

    qc, kc, vc, gc, bc = (chunked(t) for t in (q, k, v, g, beta))  # [B, H, N, C, ·]
    G = chunk_cumsum(gc, C)  # [B, H, N, C, K]
    if in_chunk_decay_range(G) <= factored_range_bound(dt):  # two matmuls per chunk, no [C, C, K] tensor
        a_kk, a_qk = intra_chunk_matrices_factored(qc, kc, G, bc, scale)  # [B, H, N, C, C]
    else:  # a strong decay somewhere in the batch: exponents that are never positive, any g ≤ 0
        a_kk, a_qk = intra_chunk_matrices_blocked(qc, kc, G, bc, scale)
    W, U = ut_transform(a_kk, kc, vc, G, bc)  # [B, H, N, C, K], [B, H, N, C, V]
    q_decayed = qc * scale * G.exp()  # exp(G) ⊙ Q: reads the start-of-chunk state
    G_last = G[..., -1:, :]  # [B, H, N, 1, K]
    k_to_end = kc * (G_last - G).exp()  # exp(G_C − G) ⊙ K: writes decayed to the chunk end

    S = torch.zeros(B, H, K, V, dtype=dt, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(dt)
    outputs = []
    for n in range(n_chunks):
        delta = U[:, :, n] - W[:, :, n] @ S  # [B, H, C, V]
        outputs.append(q_decayed[:, :, n] @ S + a_qk[:, :, n] @ delta)
        S = G_last[:, :, n].exp().transpose(-1, -2) * S + k_to_end[:, :, n].transpose(-1, -2) @ delta
    o = rearrange(torch.stack(outputs, dim=2), "b h n c v -> b (n c) h v")[:, :T]
    return o, (S if output_final_state else None)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The layer's log-decay (report Eq. 10, FLA's parametrisation): ``g = −exp(A_log_h) · softplus(f + dt_bias)``.

    f ``[..., H, K]`` (the low-rank gate projection), A_log ``[H]``, dt_bias ``[H·K]`` or ``[H, K]`` → g ``[..., H,
    K]`` in float32 (float64 for float64 f), always ≤ 0. ``exp(A_log) ∈ [1, 16]`` at init sets how fast each head can forget.
    """
    H, K = f.shape[-2:]
    check_tensor("A_log", A_log, shape=(H,), dtypes=FLOATS, device=f.device)
    check_tensor("dt_bias", dt_bias, dtypes=FLOATS, device=f.device)
    if dt_bias.numel() != H * K:
        raise ValueError(f"dt_bias: expected {H * K} elements (H·K), got shape {tuple(dt_bias.shape)}")
    acc = torch.promote_types(f.dtype, torch.float32)
    f = f.to(acc) + dt_bias.to(acc).reshape(H, K)
    return -A_log.to(acc).exp()[:, None] * F.softplus(f)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(Σ x² + eps)`` over the last dim (eps inside the root, as FLA's kernels)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def kda_flops(T: int, head_dim: int, chunk_size: int = 64) -> int:
    """Forward FLOPs of chunkwise KDA for one head (report §6.3): ``6·T·d² + 3·T·C·d + T·C²``."""
    return 6 * T * head_dim**2 + 3 * T * chunk_size * head_dim + T * chunk_size**2


def attention_flops(T: int, head_dim: int) -> int:
    """Forward FLOPs of causal softmax attention for one head (the report's comparison): ``2·T²·d``."""
    return 2 * T * T * head_dim

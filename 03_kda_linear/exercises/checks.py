"""Checks for chapter 03's exercises: each ``check_exK_topic(module)`` runs the attempt on seeded random and
edge-case inputs (CPU; Triton under the interpreter at tiny shapes) and compares with ``nanokimi.kda.reference``.
A failure raises AssertionError naming the case, the element and the size of the error."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from nanokimi.grade import call_attempt
from nanokimi.kda import reference
from nanokimi.testing import check_attempt_close, rand, randn


def _tensor(name: str, out: object, shape: tuple) -> torch.Tensor:
    assert isinstance(out, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(out.shape)}"
    return out


def _inputs(B: int, T: int, H: int, K: int, V: int, seed: int, gate: str = "logsigmoid"):
    """float64 q, k (L2-normalised), v, g ≤ 0, β ∈ (0, 1) ``[B, T, H, ·]`` and a state ``[B, H, K, V]``."""
    q = reference.l2norm(randn(B, T, H, K, seed=seed, dtype=torch.float64))
    k = reference.l2norm(randn(B, T, H, K, seed=seed + 1, dtype=torch.float64))
    v = randn(B, T, H, V, seed=seed + 2, dtype=torch.float64)
    if gate == "strong":  # about −60 per token: e^{−G} of a factored form overflows within a few tokens
        g = -60.0 - rand(B, T, H, K, seed=seed + 3, dtype=torch.float64)
    elif gate == "zero":
        g = torch.zeros(B, T, H, K, dtype=torch.float64)
    else:
        g = F.logsigmoid(randn(B, T, H, K, seed=seed + 3, dtype=torch.float64))
    beta = torch.sigmoid(randn(B, T, H, seed=seed + 4, dtype=torch.float64))
    state = randn(B, H, K, V, seed=seed + 5, dtype=torch.float64)
    return q, k, v, g, beta, state


# --- exercise 1 --------------------------------------------------------------------------------------------
def check_ex1_recurrent_step(m: ModuleType) -> None:
    cases = [  # name, B, H, K, V, gate, scale
        ("B=2 H=3 K=8 V=5", 2, 3, 8, 5, "logsigmoid", None),
        ("K=V=16, scale=0.3", 1, 2, 16, 16, "logsigmoid", 0.3),
        ("g = 0 (no decay)", 1, 1, 4, 6, "zero", None),
        ("strong decay (g ≈ −60)", 1, 2, 8, 8, "strong", None),
    ]
    for i, (name, B, H, K, V, gate, scale) in enumerate(cases):
        q, k, v, g, beta, state = _inputs(B, 1, H, K, V, seed=10 * i, gate=gate)
        args = [t[:, 0] for t in (q, k, v, g, beta)]
        before = state.clone()
        o, s = call_attempt(m.kda_step, *args, state, scale)
        o_ref, s_ref = reference.kda_step(*args, state, scale)
        check_attempt_close(f"case {name}: o [B, H, V]", o, o_ref, 1e-12)
        check_attempt_close(f"case {name}: new_state [B, H, K, V]", s, s_ref, 1e-12)
        assert torch.equal(state, before), f"case {name}: kda_step modified its state argument in place"
    beta0 = torch.zeros(1, 2, dtype=torch.float64)
    q, k, v, g, _, state = _inputs(1, 1, 2, 8, 8, seed=99)
    _, s = call_attempt(m.kda_step, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta0, state)
    check_attempt_close("case β = 0 (only the decay acts): new_state", s, state * g[:, 0].exp()[..., None], 1e-12)
    for name, T, use_h0 in (("T=13 with an initial state", 13, True), ("T=1 from zeros", 1, False)):
        q, k, v, g, beta, state = _inputs(2, T, 2, 8, 4, seed=T)
        h0 = state if use_h0 else None
        o, s = call_attempt(m.kda_token_loop, q, k, v, g, beta, h0)
        o_ref, s_ref = reference.kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        check_attempt_close(f"case {name}: o [B, T, H, V]", o, o_ref, 1e-12)
        check_attempt_close(f"case {name}: S_T [B, H, K, V]", s, s_ref, 1e-12)


# --- exercise 2 --------------------------------------------------------------------------------------------
def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, ...] with T a multiple of C → [B, H, N, C, ...]."""
    B, T, H = x.shape[:3]
    return x.reshape(B, T // C, C, H, *x.shape[3:]).movedim(3, 1)


def check_ex2_pairwise_decay(m: ModuleType) -> None:
    cases = [  # name, B, T, H, K, C, gate
        ("2 chunks of 8, K=4", 2, 16, 2, 4, 8, "logsigmoid"),
        ("one chunk of 16, K=8", 1, 16, 1, 8, 16, "logsigmoid"),
        ("chunk of 1 token", 1, 3, 2, 4, 1, "logsigmoid"),
        ("strong decay (g ≈ −60 per token, chunk 16)", 1, 32, 2, 8, 16, "strong"),
    ]
    for i, (name, B, T, H, K, C, gate) in enumerate(cases):
        q, k, _, g, beta, _ = _inputs(B, T, H, K, 1, seed=20 + i, gate=gate)
        qc, kc, gc, bc = (_chunks(t, C) for t in (q, k, g, beta))
        G = call_attempt(m.chunk_cumsum, gc)
        check_attempt_close(f"case {name}: G (chunk_cumsum)", G, reference.chunk_cumsum(gc, C), 1e-12)
        G = reference.chunk_cumsum(gc, C)
        a_kk, a_qk = call_attempt(m.intra_chunk_matrices, qc, kc, G, bc, 0.5)
        kk_ref, qk_ref = reference.intra_chunk_matrices(qc, kc, G, bc, 0.5)
        for label, got, ref in (("A_kk", a_kk, kk_ref), ("A_qk", a_qk, qk_ref)):
            hint = "inf/NaN means a positive exponent: mask before exp"
            check_attempt_close(f"case {name}: {label} [B, H, N, C, C]", got, ref, 1e-12, hint=hint, atol=1e-300)


# --- exercise 3 --------------------------------------------------------------------------------------------
def check_ex3_ut_transform(m: ModuleType) -> None:
    C, K, V = 8, 4, 6
    for i, (name, gate) in enumerate((("random gates", "logsigmoid"), ("strong decay (g ≈ −60)", "strong"))):
        q, k, v, g, beta, _ = _inputs(2, C, 2, K, V, seed=30 + i, gate=gate)
        qc, kc, vc, gc, bc = (_chunks(t, C)[:, :, 0] for t in (q, k, v, g, beta))  # [B, H, C, ·]
        G = reference.chunk_cumsum(gc, C)
        a_kk, a_qk = reference.intra_chunk_matrices(qc, kc, G, bc, 0.5)
        X = _tensor("X", call_attempt(m.forward_substitution, a_kk), a_kk.shape)
        eye = torch.eye(C, dtype=torch.float64).expand_as(a_kk)
        check_attempt_close(f"case {name}: (I + A_kk) X (should be I)", (eye + a_kk) @ X, eye, 1e-12)
        W, U = call_attempt(m.ut_transform, a_kk, kc, vc, G, bc)
        W_ref, U_ref = reference.ut_transform(a_kk, kc, vc, G, bc)
        check_attempt_close(f"case {name}: W [B, H, C, K]", W, W_ref, 1e-12)
        check_attempt_close(f"case {name}: U [B, H, C, V]", U, U_ref, 1e-12)
    # chunk_step chained over a sequence must reproduce the token loop.
    B, T, H = 1, 24, 2
    q, k, v, g, beta, S = _inputs(B, T, H, K, V, seed=40)
    scale = K**-0.5
    o_ref, s_ref = reference.kda_recurrent(q, k, v, g, beta, initial_state=S, output_final_state=True)
    outs = []
    for n, (qc, kc, vc, gc, bc) in enumerate(zip(*(_chunks(t, C).unbind(2) for t in (q, k, v, g, beta)), strict=True)):
        G = reference.chunk_cumsum(gc, C)
        a_kk, a_qk = reference.intra_chunk_matrices(qc, kc, G, bc, scale)
        out, S = call_attempt(m.chunk_step, qc, kc, vc, G, bc, a_kk, a_qk, S, scale)
        _tensor(f"O of chunk {n}", out, (B, H, C, V))
        _tensor(f"S after chunk {n}", S, (B, H, K, V))
        outs.append(out)
    o = torch.stack(outs, 2).movedim(1, 3).reshape(B, T, H, V)  # [B, H, N, C, V] → [B, T, H, V]
    check_attempt_close("case 3 chunks of 8 chained (vs the token loop): o [B, T, H, V]", o, o_ref, 1e-10)
    check_attempt_close("case 3 chunks of 8 chained (vs the token loop): S_T", S, s_ref, 1e-10)


# --- exercise 4 --------------------------------------------------------------------------------------------
def check_ex4_triton_decode_step(m: ModuleType) -> None:
    cases = [  # name, B, H, K, V, block_v, gate
        ("K=V=16, one V-block", 1, 2, 16, 16, 16, "logsigmoid"),
        ("K=12, V=20 (masks; V not a multiple of BV=16)", 2, 1, 12, 20, 16, "logsigmoid"),
        ("g = 0, BV=32 > V=24", 1, 2, 16, 24, 32, "zero"),
        ("strong decay (g ≈ −60)", 1, 1, 8, 16, 16, "strong"),
    ]
    for i, (name, B, H, K, V, bv, gate) in enumerate(cases):
        q, k, v, g, beta, state = (t.float() for t in _inputs(B, 1, H, K, V, seed=50 + i, gate=gate))
        args = [t[:, 0] for t in (q, k, v, g, beta)]
        before = state.clone()
        o, s = call_attempt(m.decode_step, *args, state, None, bv)
        o_ref, s_ref = reference.kda_step(*(a.double() for a in args), state.double())
        check_attempt_close(f"case {name}: o [B, H, V]", o, o_ref.float(), 1e-5)
        check_attempt_close(f"case {name}: new_state [B, H, K, V]", s, s_ref.float(), 1e-5)
        assert torch.equal(state, before), f"case {name}: the kernel wrote into s_in"

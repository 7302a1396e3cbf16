"""Chapter 03: Kimi Delta Attention — reference ladder, Triton kernels (fwd + bwd, decode) and the layer.

Tolerances and why: 03_kda_linear/README.md § Tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton

import nanokimi.kda.kernels as kda_kernels
import nanokimi.kda.reference as kda_reference
from nanokimi.kda import (
    KimiDeltaAttention,
    chunk_cumsum,
    intra_chunk_matrices,
    kda_chunk,
    kda_chunk_triton,
    kda_decode_step_triton,
    kda_gate,
    kda_recurrent,
    kda_step,
    l2norm,
)
from nanokimi.kda.reference import (
    factored_range_bound,
    in_chunk_decay_range,
    intra_chunk_matrices_blocked,
    intra_chunk_matrices_factored,
)
from nanokimi.testing import assert_close, rand, randn
from nanokimi.triton_utils import interpreting

GRAD_NAMES = ("q", "k", "v", "g", "beta", "h0")


def make_inputs(B, T, H, K, V, seed=0, dtype=torch.float64, device="cpu", gate="logsigmoid"):
    """q, k L2-normalised (as the layer feeds them), v ~ N(0, 1), g ≤ 0, β ∈ (0, 1), h0 ~ N(0, 1)."""
    q = l2norm(randn(B, T, H, K, seed=seed, dtype=torch.float64))
    k = l2norm(randn(B, T, H, K, seed=seed + 1, dtype=torch.float64))
    v = randn(B, T, H, V, seed=seed + 2, dtype=torch.float64)
    if gate == "logsigmoid":
        g = F.logsigmoid(randn(B, T, H, K, seed=seed + 3, dtype=torch.float64))
    else:  # "strong": about −5 per step, a few channels at −60 (decay by e^-60 each token)
        g = -5.0 - rand(B, T, H, K, seed=seed + 3, dtype=torch.float64)
        g[..., :2] = -60.0
    beta = torch.sigmoid(randn(B, T, H, seed=seed + 4, dtype=torch.float64))
    h0 = randn(B, H, K, V, seed=seed + 5, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, g, beta)] + [h0.to(device=device)]


def run_with_grads(fn, inputs, use_h0, seed=7):
    """Outputs and gradients of ``loss = Σ o ⊙ do + Σ S_T ⊙ dS`` w.r.t. q, k, v, g, β (and h0)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = fn(q, k, v, g, beta, initial_state=h0 if use_h0 else None, output_final_state=True)
    do = randn(*o.shape, seed=seed, dtype=torch.float64).to(o.device)
    dht = randn(*ht.shape, seed=seed + 1, dtype=torch.float64).to(o.device)
    loss = (o.double() * do).sum() + (ht.double() * dht).sum()
    used = leaves if use_h0 else leaves[:5]
    grads = torch.autograd.grad(loss, used)
    return o.detach(), ht.detach(), dict(zip(GRAD_NAMES, grads, strict=False))


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an element a kernel forgets to write fails."""

    def alloc(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kda_kernels, "_alloc", alloc)


# --------------------------------------------------------------------------------------------------------------
# Reference ladder: chunkwise == token loop


@pytest.mark.parametrize("use_h0", [False, True])
@pytest.mark.parametrize(("T", "chunk_size"), [(1, 64), (63, 16), (100, 32), (257, 64), (257, 7), (64, 64)])
def test_chunk_matches_recurrent_fp64(T, chunk_size, use_h0):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, 16, 8)
    h0 = h0 if use_h0 else None
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = kda_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == torch.float64
    assert_close("o", o, o_ref, 1e-12)
    assert_close("S_T", s, s_ref, 1e-12)


@pytest.mark.parametrize(("T", "chunk_size"), [(63, 64), (257, 32)])
def test_chunk_matches_recurrent_fp32(T, chunk_size):
    inputs = make_inputs(1, T, 2, 32, 16)
    o_ref, s_ref = kda_recurrent(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    q, k, v, g, beta = (t.float() for t in inputs[:5])
    o, s = kda_chunk(q, k, v, g, beta, initial_state=inputs[5].float(), output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == torch.float32
    assert_close("o", o, o_ref, 2e-6)
    assert_close("S_T", s, s_ref, 2e-6)


@pytest.mark.parametrize(("C", "block", "gate"), [(64, 8, "logsigmoid"), (20, 8, "strong"), (7, 16, "logsigmoid")])
def test_blocked_intra_matrices_equal_pairwise(C, block, gate):
    """The sub-block factoring kda_chunk uses gives the pairwise spec's matrices, also under strong decay."""
    q, k, _, g, beta = (t[0, :, 0] for t in make_inputs(1, C, 1, 16, 4, gate=gate)[:5])  # one head: [C, ·]
    G = chunk_cumsum(g, C)
    ref_kk, ref_qk = intra_chunk_matrices(q, k, G, beta, 0.25)
    a_kk, a_qk = intra_chunk_matrices_blocked(q, k, G, beta, 0.25, block=block)
    assert_close("A_kk", a_kk, ref_kk, 1e-13)
    assert_close("A_qk", a_qk, ref_qk, 1e-13)


def uniform_gate(inputs, max_per_step, seed=11):
    """Replace g by ``−max_per_step · U(0, 1)`` per token and channel: in-chunk range R ≤ (C − 1) · max_per_step."""
    q, k, v, g, beta, h0 = inputs
    return [q, k, v, -max_per_step * rand(*g.shape, seed=seed, dtype=g.dtype), beta, h0]


@pytest.mark.parametrize("C", [8, 16, 64])
@pytest.mark.parametrize("max_per_step", [1.0, 5.0])
def test_factored_intra_matrices_equal_pairwise(C, max_per_step):
    """Two matmuls around G_ref give the pairwise matrices while R ≤ the fp64 bound (C = 64 at 5/step: R ≈ 300)."""
    q, k, _, g, beta, _ = uniform_gate(make_inputs(3, C, 2, 16, 4), max_per_step)
    qc, kc, gc = (t.transpose(1, 2) for t in (q, k, g))  # one chunk per (batch, head): [B, H, C, K]
    G = chunk_cumsum(gc, C)
    assert in_chunk_decay_range(G) <= factored_range_bound(torch.float64)
    ref_kk, ref_qk = intra_chunk_matrices(qc, kc, G, beta.transpose(1, 2), 0.25)
    a_kk, a_qk = intra_chunk_matrices_factored(qc, kc, G, beta.transpose(1, 2), 0.25)
    assert_close("A_kk", a_kk, ref_kk, 1e-12)
    assert_close("A_qk", a_qk, ref_qk, 1e-12)


@pytest.mark.parametrize(
    ("C", "gate"), [(8, 1.0), (8, 5.0), (16, 1.0), (16, 5.0), (64, 1.0), (64, 5.0), (8, "strong"), (64, "strong")]
)
def test_chunk_factored_path_matches_pairwise_fallback(C, gate, monkeypatch):
    """kda_chunk takes the factored path iff R ≤ bound; outputs and all six gradients equal the pairwise fallback's.

    "strong" (−60 per step on two channels) exceeds the fp64 bound at every C ≥ 8: the fallback runs and must still
    equal the token loop.
    """
    inputs = make_inputs(1, 2 * C + 5, 2, 8, 8, gate="strong" if gate == "strong" else "logsigmoid")
    inputs = inputs if gate == "strong" else uniform_gate(inputs, gate)
    calls = []

    def spy(*args):
        calls.append(1)
        return intra_chunk_matrices_factored(*args)

    monkeypatch.setattr(kda_reference, "intra_chunk_matrices_factored", spy)
    chunk = lambda *a, **kw: kda_chunk(*a, **kw, chunk_size=C)
    o, s, grads = run_with_grads(chunk, inputs, use_h0=True)
    assert len(calls) == (0 if gate == "strong" else 1)
    if gate == "strong":
        o_ref, s_ref, ref = run_with_grads(kda_recurrent, inputs, use_h0=True)
        grad_tol = 1e-10  # chunk-form autograd vs the token loop, as in test_chunk_gradients_match_recurrent
    else:
        monkeypatch.setattr(kda_reference, "factored_range_bound", lambda dtype: -1.0)  # R ≥ 0 > −1: always fall back
        o_ref, s_ref, ref = run_with_grads(chunk, inputs, use_h0=True)
        assert len(calls) == 1
        grad_tol = 1e-12
    assert_close("o", o, o_ref, 1e-12)
    assert_close("S_T", s, s_ref, 1e-12)
    for name in GRAD_NAMES:
        assert_close(f"d{name}", grads[name], ref[name], grad_tol)


def test_factored_fp32_near_its_bound_is_finite_and_accurate(monkeypatch):
    """fp32 with R just under ln(max)/2 ≈ 44.4 (C = 8, up to 6 per step): factored path, finite, fp32-accurate."""
    calls = []
    monkeypatch.setattr(
        kda_reference, "intra_chunk_matrices_factored", lambda *a: calls.append(1) or intra_chunk_matrices_factored(*a)
    )
    inputs = uniform_gate(make_inputs(2, 37, 2, 16, 16), 6.0)
    q, k, v, g, beta, h0 = inputs
    G = chunk_cumsum(g[:, :32].transpose(1, 2).unflatten(2, (4, 8)), 8)
    assert 30.0 < in_chunk_decay_range(G) <= factored_range_bound(torch.float32)
    o_ref, s_ref, ref = run_with_grads(kda_recurrent, inputs, use_h0=True)
    chunk = lambda *a, **kw: kda_chunk(*(t.float() for t in a), **{**kw, "initial_state": kw["initial_state"].float()})
    o, s, got = run_with_grads(lambda *a, **kw: chunk(*a, **kw, chunk_size=8), inputs, use_h0=True)
    assert_close("o", o, o_ref, 2e-6)
    assert_close("S_T", s, s_ref, 2e-6)
    assert len(calls) == 1
    for name in GRAD_NAMES:
        assert_close(f"d{name}", got[name], ref[name], 2e-6)  # fp32 rounding; the pairwise fallback is as far off


def test_chunk_gradients_match_recurrent():
    inputs = make_inputs(1, 37, 2, 8, 8)
    _, _, ref = run_with_grads(kda_recurrent, inputs, use_h0=True)
    _, _, got = run_with_grads(lambda *a, **kw: kda_chunk(*a, **kw, chunk_size=16), inputs, use_h0=True)
    for name in GRAD_NAMES:
        assert_close(f"d{name}", got[name], ref[name], 1e-10)


def test_scalar_gate_is_gated_deltanet_and_no_gate_is_deltanet():
    """KDA with one α per head (broadcast over channels) is Gated DeltaNet; with α ≡ 1 it is DeltaNet."""
    q, k, v, g, beta, h0 = make_inputs(1, 20, 1, 8, 4)
    g_head = g[..., :1]  # [B, T, H, 1]
    S = h0.clone()
    expected = []
    for t in range(20):  # Gated DeltaNet written out: S = α (I − β k kᵀ) S + β k vᵀ
        kt, vt, bt = k[0, t, 0], v[0, t, 0], beta[0, t, 0]
        S0 = S[0, 0]
        S0 = g_head[0, t, 0].exp() * (S0 - bt * torch.outer(kt, kt @ S0)) + bt * torch.outer(kt, vt)
        S = S0[None, None]
        expected.append(S0.T @ (q[0, t, 0] * 8**-0.5))
    o, s = kda_recurrent(q, k, v, g_head.expand_as(g), beta, initial_state=h0, output_final_state=True)
    assert_close("o (GDN)", o[0, :, 0], torch.stack(expected), 1e-12)
    o_dn, _ = kda_chunk(q, k, v, torch.zeros_like(g), beta, initial_state=h0, chunk_size=8)
    o_dn_ref, _ = kda_recurrent(q, k, v, torch.zeros_like(g), beta, initial_state=h0)
    assert_close("o (DeltaNet)", o_dn, o_dn_ref, 1e-12)


def test_zero_beta_and_zero_gate_keep_the_state():
    q, k, v, g, beta, h0 = make_inputs(1, 9, 2, 8, 4)
    o, s = kda_chunk(q, k, v, torch.zeros_like(g), torch.zeros_like(beta), initial_state=h0, output_final_state=True)
    assert_close("S_T", s, h0, 1e-15)
    assert_close("o", o, torch.einsum("bthk,bhkv->bthv", q * 8**-0.5, h0), 1e-13)


def test_reference_strong_decay_is_finite_and_exact():
    q, k, v, g, beta, h0 = make_inputs(1, 150, 1, 16, 16, gate="strong")
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, output_final_state=True)
    o, s = kda_chunk(*(t.float() for t in (q, k, v, g, beta)), output_final_state=True, chunk_size=64)
    assert_close("o", o, o_ref, 2e-6)
    assert_close("S_T", s, s_ref, 2e-6)


def test_step_matches_one_token_of_recurrent():
    q, k, v, g, beta, h0 = make_inputs(2, 1, 3, 8, 4)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    assert_close("o", o, o_ref[:, 0], 1e-14)
    assert_close("S", s, s_ref, 1e-14)


def test_gate_parametrisation():
    f = randn(2, 3, 4, 8, seed=3)
    A_log = torch.tensor([0.0, math.log(16.0), 1.0, 2.0])
    dt_bias = randn(32, seed=4)
    g = kda_gate(f, A_log, dt_bias)
    expected = -A_log.exp()[:, None] * F.softplus(f + dt_bias.view(4, 8))
    assert_close("g", g, expected, 1e-7)
    assert bool((g <= 0).all())


# --------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU) or compiled (GPU): tiny shapes, fp32


@pytest.mark.parametrize(
    ("B", "T", "H", "chunk_size", "use_h0"),
    [(1, 1, 1, 16, True), (2, 63, 1, 32, False), (1, 130, 1, 64, True)],
)
def test_triton_chunk_fwd_bwd_matches_reference(B, T, H, chunk_size, use_h0, device, poisoned_buffers):
    inputs = make_inputs(B, T, H, 16, 16)
    _, _, ref = run_with_grads(kda_recurrent, inputs, use_h0)
    o_ref, s_ref = kda_recurrent(*inputs[:5], initial_state=inputs[5] if use_h0 else None, output_final_state=True)
    dev_inputs = [t.to(device=device, dtype=torch.float32) for t in inputs]
    kernel = lambda *a, **kw: kda_chunk_triton(*a, **kw, chunk_size=chunk_size)
    o, s, got = run_with_grads(kernel, dev_inputs, use_h0)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close("o", o, o_ref, 1e-5)
    assert_close("S_T", s, s_ref, 1e-5)
    for name in got:
        assert_close(f"d{name}", got[name], ref[name], 3e-5 if name in ("g", "beta") else 1e-5)


def test_triton_head_dim_not_a_power_of_two(device, poisoned_buffers):
    """K = 40 (every K tile partly masked) and V = 24 ≠ K, two heads, chunk 32 with a partial last chunk."""
    inputs = make_inputs(1, 50, 2, 40, 24)
    o_ref, s_ref, ref = run_with_grads(kda_recurrent, inputs, use_h0=True)
    dev_inputs = [t.to(device=device, dtype=torch.float32) for t in inputs]
    kernel = lambda *a, **kw: kda_chunk_triton(*a, **kw, chunk_size=32)
    o, s, got = run_with_grads(kernel, dev_inputs, use_h0=True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("S_T", s, s_ref, 1e-5)
    for name in got:
        assert_close(f"d{name}", got[name], ref[name], 3e-5 if name in ("g", "beta") else 1e-5)


def test_triton_strong_decay_is_finite(device, poisoned_buffers):
    """g ≈ −5 per step (and −60 on two channels) over 64-token chunks: no exponent overflows."""
    inputs = make_inputs(1, 80, 1, 16, 16, gate="strong")
    o_ref, s_ref, ref = run_with_grads(kda_recurrent, inputs, use_h0=True)
    dev_inputs = [t.to(device=device, dtype=torch.float32) for t in inputs]
    o, s, got = run_with_grads(kda_chunk_triton, dev_inputs, use_h0=True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("S_T", s, s_ref, 1e-5)
    for name in got:
        # dg is a reverse cumsum of terms that cancel: even the fp32 chunkwise reference is ~2e-4 off here.
        assert_close(f"d{name}", got[name], ref[name], 1e-3 if name == "g" else 1e-5)


def test_triton_chunk_sizes_agree(device):
    q, k, v, g, beta, h0 = (t.to(device=device, dtype=torch.float32) for t in make_inputs(1, 40, 2, 16, 32))
    outs = [kda_chunk_triton(q, k, v, g, beta, initial_state=h0, chunk_size=c)[0] for c in (16, 32)]
    assert_close("o (C=32 vs C=16)", outs[1], outs[0], 1e-5)


def test_triton_decode_step_matches_reference(device, poisoned_buffers):
    q, k, v, g, beta, h0 = make_inputs(2, 1, 3, 16, 24)
    o_ref, s_ref = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    args = [t[:, 0].to(device=device, dtype=torch.float32) for t in (q, k, v, g, beta)]
    state = h0.to(device=device, dtype=torch.float32)
    o, s = kda_decode_step_triton(*args, state)
    assert_close("o", o, o_ref, 1e-6)
    assert_close("S", s, s_ref, 1e-6)
    assert_close("state untouched", state, h0, 1e-7)
    o2, s2 = kda_decode_step_triton(*args, state, inplace=True)
    assert s2.data_ptr() == state.data_ptr()
    assert_close("S (in place)", state, s_ref, 1e-6)


def test_triton_without_grad_and_empty_sequence(device):
    q, k, v, g, beta, h0 = (t.to(device=device, dtype=torch.float32) for t in make_inputs(1, 5, 1, 16, 16))
    o, s = kda_chunk_triton(q, k, v, g, beta, initial_state=h0)
    assert s is None and o.shape == (1, 5, 1, 16)
    o, s = kda_chunk_triton(
        q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], initial_state=h0, output_final_state=True
    )
    assert o.shape == (1, 0, 1, 16)
    assert_close("S_T (T=0)", s, h0, 0.0)


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter path; the compiled bf16 path is a GPU test")
def test_triton_bf16_under_the_interpreter_matches_reference():
    """The interpreter's tl.dot multiplies bf16 as raw uint16 bit patterns, so on the CPU the launcher runs bf16
    q, k, v in fp32 and rounds o back to bf16 (before that, o came out ~1e12 off)."""
    inputs = make_inputs(1, 40, 2, 16, 16)
    rounded = [t.to(torch.bfloat16) for t in inputs[:5]] + [inputs[5].float()]
    do, dht = randn(1, 40, 2, 16, seed=7).to(torch.bfloat16), randn(1, 2, 16, 16, seed=8)  # dO as autograd gives it
    ref_leaves = [t.double().requires_grad_() for t in rounded]
    o_ref, s_ref = kda_recurrent(*ref_leaves[:5], initial_state=ref_leaves[5], output_final_state=True)
    ref = torch.autograd.grad([o_ref, s_ref], ref_leaves, [do.double(), dht.double()])
    leaves = [t.clone().requires_grad_() for t in rounded]
    o, s = kda_chunk_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    got = torch.autograd.grad([o, s], leaves, [do, dht])
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # fp32 inside, then one rounding to bf16: torch's casts round to nearest (≤ 2^-8 relative), the interpreter's
    # kernel store of dg truncates (≤ 2^-7)
    bf16_tol = {"h0": 1e-5, "g": 8e-3}
    assert_close("o", o, o_ref, 4e-3)
    assert_close("S_T", s, s_ref, 1e-5)
    for name, out, expected in zip(GRAD_NAMES, got, ref, strict=True):
        assert_close(f"d{name}", out, expected, bf16_tol.get(name, 4e-3))


class _GuardedAlloc:
    """An ``_alloc`` whose buffers sit inside NaN-filled storage with ``guard`` elements before and after. A write
    past a buffer shows in its guards; under the interpreter ``check_accesses`` also flags every unmasked load or
    store whose address lies outside all the buffers (on the GPU such an access is an illegal-address error)."""

    def __init__(self, guard: int):
        self.guard = guard
        self.buffers = []
        self.stray = []  # (kind, address) of accesses outside every buffer

    def __call__(self, *shape, dtype, device):
        n = math.prod(shape)
        full = torch.full((n + 2 * self.guard,), float("nan"), dtype=dtype, device=device)
        self.buffers.append((full, n))
        return full[self.guard : self.guard + n].view(shape)

    def holding(self, t):
        out = self(*t.shape, dtype=t.dtype, device=t.device)
        return out.copy_(t)

    def guards_untouched(self):
        g = self.guard
        return all(bool(full[:g].isnan().all() and full[g + n :].isnan().all()) for full, n in self.buffers)

    def _record(self, kind, ptrs, mask, nbytes):
        spans = sorted(
            (full.data_ptr() + self.guard * full.element_size(), n * full.element_size()) for full, n in self.buffers
        )
        starts = np.array([start for start, _ in spans], dtype=np.uint64)
        ends = starts + np.array([nbytes for _, nbytes in spans], dtype=np.uint64)
        shape = np.broadcast_shapes(ptrs.shape, mask.shape)
        addr = np.broadcast_to(ptrs, shape)[np.broadcast_to(mask.astype(bool), shape)]
        i = np.maximum(np.searchsorted(starts, addr, side="right") - 1, 0)
        bad = (addr < starts[i]) | (addr + np.uint64(nbytes) > ends[i])
        self.stray += [(kind, int(a)) for a in addr[bad][:5]]

    def check_accesses(self, monkeypatch):
        """Route the interpreter's loads and stores through ``_record`` (a no-op when kernels run compiled)."""
        if not interpreting():
            return
        from triton.runtime.interpreter import InterpreterBuilder

        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

        def checked_load(builder, ptrs, mask, *args):
            self._record("load", ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
            return load(builder, ptrs, mask, *args)

        def checked_store(builder, ptrs, value, mask, *args):
            self._record("store", ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
            return store(builder, ptrs, value, mask, *args)

        monkeypatch.setattr(InterpreterBuilder, "create_masked_load", checked_load)
        monkeypatch.setattr(InterpreterBuilder, "create_masked_store", checked_store)


def _sequential_reference(w, u, qg, kg, aqk, gc, h0, do, dht, C):
    """What ``_fwd_state_kernel`` + ``_fwd_output_kernel`` and ``_bwd_ddelta_intra_kernel`` + ``_bwd_state_kernel``
    compute, as torch chunk walks, every tensor [B, T, H, ·]: Δ = U − W S, O = qg S + A_qk Δ, S ← e^{G_C} S + kgᵀ Δ;
    then in reverse dΔ = A_qkᵀ dO + kg dS, dS ← e^{G_C} dS + qgᵀ dO − Wᵀ dΔ. Returns o, S_T, hs, Δ, dhs, dΔ, dS_0."""
    w, u, qg, kg, aqk, gc, do = (t.transpose(1, 2) for t in (w, u, qg, kg, aqk, gc, do))  # [B, H, T, ·]
    T = w.shape[2]
    chunks = [slice(s, min(s + C, T)) for s in range(0, T, C)]
    S, o, delta, hs = h0, torch.empty_like(u), torch.empty_like(u), []
    for c in chunks:
        a = aqk[:, :, c, : c.stop - c.start]
        hs.append(S)
        delta[:, :, c] = u[:, :, c] - w[:, :, c] @ S
        o[:, :, c] = qg[:, :, c] @ S + a @ delta[:, :, c]
        S = gc[:, :, c.stop - 1, :, None].exp() * S + kg[:, :, c].transpose(-1, -2) @ delta[:, :, c]
    dS, ddelta, dhs = dht, torch.empty_like(u), [None] * len(chunks)
    for n, c in reversed(list(enumerate(chunks))):
        a = aqk[:, :, c, : c.stop - c.start]
        dhs[n] = dS
        ddelta[:, :, c] = a.transpose(-1, -2) @ do[:, :, c] + kg[:, :, c] @ dS
        dS = (
            gc[:, :, c.stop - 1, :, None].exp() * dS
            + qg[:, :, c].transpose(-1, -2) @ do[:, :, c]
            - w[:, :, c].transpose(-1, -2) @ ddelta[:, :, c]
        )
    seq = lambda t: t.transpose(1, 2)
    return seq(o), S, torch.stack(hs, 1), seq(delta), torch.stack(dhs, 1), seq(ddelta), dS


def _launch_sequential(kernel, config, B, T, H, K, V, C, BK, dtype, device, alloc, prec):
    """Launch one kernel of the state walks directly with one autotune config on random inputs (made by ``alloc``
    too, so guards or fills surround them) and return (outputs, the fp64 torch reference of the same outputs).
    ``fwd``: the forward walk (hs, Δ, S_T); ``out``: the output kernel, fed the reference hs and Δ; ``bwd``: the
    in-chunk dΔ kernel, then the reverse walk with the config (dhs, dΔ, dS_0)."""
    NT = -(-T // C)
    rnd = lambda *shape, seed, std=0.5: alloc.holding((std * randn(*shape, seed=seed, device=device)).to(dtype))
    # W, qg, kg at the scale of L2-normalised keys, so the state walk stays bounded over many chunks (random
    # O(1) entries make S grow ~1e18 over 16 chunks and bf16 rounding then dominates any comparison).
    w, qg, kg = (rnd(B, T, H, K, seed=i, std=0.5 * K**-0.5) for i in range(3))
    u, do = rnd(B, T, H, V, seed=3), rnd(B, T, H, V, seed=4)
    aqk = rnd(B, T, H, C, seed=5)
    gc = alloc.holding(-rand(B, T, H, K, seed=6, device=device))
    h0, dht = (alloc.holding(0.5 * randn(B, H, K, V, seed=s, device=device)) for s in (7, 8))
    expected = _sequential_reference(*(t.double() for t in (w, u, qg, kg, aqk, gc, h0, do, dht)), C)
    meta = dict(BV=config.kwargs["BV"], num_warps=config.num_warps, num_stages=config.num_stages)
    shapes = dict(H=H, K=K, V=V, C=C, BK=BK, PREC=prec)
    if kernel == "fwd":
        delta = alloc(B, T, H, V, dtype=dtype, device=device)
        hs = alloc(B, NT, H, K, V, dtype=dtype, device=device)
        ht = alloc(B, H, K, V, dtype=torch.float32, device=device)
        kda_kernels._fwd_state_kernel.fn[(triton.cdiv(V, meta["BV"]), B * H)](
            w, u, kg, gc, h0, hs, delta, ht, T, NT, HAS_H0=True, STORE_HT=True, **shapes, **meta
        )
        return {"S_T": ht, "hs": hs, "delta": delta}, dict(zip(("S_T", "hs", "delta"), expected[1:4], strict=True))
    if kernel == "out":
        hs, delta = (alloc.holding(t.to(dtype)) for t in expected[2:4])
        o = alloc(B, T, H, V, dtype=dtype, device=device)
        kda_kernels._fwd_output_kernel.fn[(NT * triton.cdiv(V, meta["BV"]), B * H)](
            qg, aqk, hs, delta, o, T, NT, **shapes, **meta
        )
        return {"o": o}, {"o": expected[0]}
    dd_intra, ddelta = (alloc(B, T, H, V, dtype=dtype, device=device) for _ in range(2))
    dhs = alloc(B, NT, H, K, V, dtype=dtype, device=device)
    dh0 = alloc(B, H, K, V, dtype=torch.float32, device=device)
    kda_kernels._bwd_ddelta_intra_kernel[(NT, B * H)](
        aqk, do, dd_intra, T, H=H, V=V, C=C, BV=kda_kernels._block(V, 64), PREC=prec
    )
    kda_kernels._bwd_state_kernel.fn[(triton.cdiv(V, meta["BV"]), B * H)](
        qg, kg, w, gc, do, dd_intra, dht, dhs, ddelta, dh0, T, NT, HAS_DHT=True, HAS_DH0=True, **shapes, **meta
    )
    return {"dhs": dhs, "ddelta": ddelta, "dh0": dh0}, dict(zip(("dhs", "ddelta", "dh0"), expected[4:], strict=True))


SEQ_CASES = (
    [("fwd", c) for c in kda_kernels._FWD_STATE_CONFIGS]
    + [("out", c) for c in kda_kernels._FWD_OUTPUT_CONFIGS]
    + [("bwd", c) for c in kda_kernels._BWD_STATE_CONFIGS]
)
SEQ_IDS = [f"{kernel}-BV{c.kwargs['BV']}-w{c.num_warps}-s{c.num_stages}" for kernel, c in SEQ_CASES]


@pytest.mark.parametrize(("kernel", "config"), SEQ_CASES, ids=SEQ_IDS)
def test_sequential_kernel_configs_stay_in_bounds(kernel, config, device, monkeypatch):
    """Each autotune config of the state walks and the output kernel (the interpreter's autotuner runs only the first),
    launched directly with every buffer inside NaN guards: B·H > 1, three chunks with a partial last one,
    K < BK, V not a multiple of BV; under the interpreter every load and store address is checked as well."""
    B, T, H, K, V, C = 2, 40, 2, 24, 40, 16
    guarded = _GuardedAlloc(guard=C * H * max(K, V, C))  # a whole chunk of rows past either end stays inside
    guarded.check_accesses(monkeypatch)
    got, expected = _launch_sequential(kernel, config, B, T, H, K, V, C, 32, torch.float32, device, guarded, "ieee")
    assert not guarded.stray, f"accesses outside every buffer (kind, address): {guarded.stray[:5]}"
    assert guarded.guards_untouched(), "a kernel wrote outside its buffer"
    for name, out in got.items():
        assert_close(name, out, expected[name], 1e-5)


class _FilledAlloc(_GuardedAlloc):
    """Buffers filled with one value (no guards): results must not depend on what the memory held before."""

    def __init__(self, fill: float):
        super().__init__(guard=0)
        self.fill = fill

    def __call__(self, *shape, dtype, device):
        return torch.full(shape, self.fill, dtype=dtype, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "config"), SEQ_CASES, ids=SEQ_IDS)
@pytest.mark.parametrize("H", [2, 16])
def test_gpu_sequential_kernel_configs_bf16_k128(kernel, config, H):
    """Every config compiled at the benchmark's head size (K=V=128, bf16, chunk 64, T=1000 so the last chunk is
    partial): output buffers zero-filled and NaN-filled give the same finite result, close to fp64 torch. (A
    miscompiled wgmma that reads stray shared memory, as ptxas 12.8 produced for the backward at BV=16, fails
    here; a CPU interpreter test cannot see it.)"""
    B, T, K, C = 1, 1000, 128, 64
    runs = [
        _launch_sequential(kernel, config, B, T, H, K, K, C, K, torch.bfloat16, "cuda", _FilledAlloc(fill), "tf32")
        for fill in (0.0, float("nan"))
    ]
    (zero_filled, expected), (nan_filled, _) = runs
    for name, out in zero_filled.items():
        assert bool(torch.isfinite(out).all()), f"{name}: non-finite values with zero-filled buffers"
        assert torch.equal(out, nan_filled[name]), f"{name}: depends on what the output buffers held"
        assert_close(name, out, expected[name], 1e-2)


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_reference():
    q, k, v, g, beta, h0 = make_inputs(1, 8, 2, 8, 4)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 8, 2, 8\)"):
        kda_chunk(q, k[:, :7], v, g, beta)
    with pytest.raises(ValueError, match="g: expected values <= 0"):
        kda_recurrent(q, k, v, g.abs() + 0.1, beta)
    with pytest.raises(ValueError, match="beta: expected values <= 2"):
        kda_chunk(q, k, v, g, beta + 2.5)
    with pytest.raises(ValueError, match="beta: expected values >= 0"):
        kda_chunk(q, k, v, g, beta - 1.0)
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        kda_chunk(q, k, v, g, beta, initial_state=h0[:, :1])
    with pytest.raises(TypeError, match="q: expected dtype"):
        kda_recurrent(q.long(), k, v, g, beta)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        kda_chunk(q[0], k, v, g, beta)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int, got 0"):
        kda_chunk(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        kda_chunk(q, k, v, g, beta, scale=float("nan"))
    with pytest.raises(TypeError, match="scale: expected a finite float or None, got Tensor"):
        kda_chunk(q, k, v, g, beta, h0)  # the 6th positional argument is scale, not the initial state
    with pytest.raises(ValueError, match="g: expected values <= 0"):
        kda_step(q[:, 0], k[:, 0], v[:, 0], -g[:, 0] + 1, beta[:, 0], h0)


def test_bad_input_triton(device):
    q, k, v, g, beta, h0 = (t.to(device=device, dtype=torch.float32) for t in make_inputs(1, 8, 2, 16, 16))
    with pytest.raises(ValueError, match="chunk_size: expected one of"):
        kda_chunk_triton(q, k, v, g, beta, chunk_size=48)
    with pytest.raises(ValueError, match="g: expected values <= 0"):
        kda_chunk_triton(q, k, v, g + 1.0, beta)
    with pytest.raises(ValueError, match="beta: expected values <= 2"):
        kda_chunk_triton(q, k, v, g, beta * 3.0)
    with pytest.raises(TypeError, match="scale: expected a finite float or None, got Tensor"):
        kda_chunk_triton(q, k, v, g, beta, h0)
    with pytest.raises(TypeError, match="k: expected dtype in \\(float32\\)"):
        kda_chunk_triton(q, k.double(), v, g, beta)
    with pytest.raises(TypeError, match="q: expected dtype"):
        kda_chunk_triton(q.double(), k.double(), v.double(), g, beta)
    big = torch.zeros(1, 2, 1, 512, device=device)
    with pytest.raises(ValueError, match="K <= 256"):
        kda_chunk_triton(big, big, big[..., :4], -big.abs(), big[..., 0])
    with pytest.raises(ValueError, match="state: inplace=True needs a contiguous float32"):
        kda_decode_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0.double(), inplace=True)
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 16\)"):
        kda_decode_step_triton(q[:, 0], k[:, 0], v[:, 0, :, :4], g[:, 0], beta[:, 0], h0)
    if device.type == "cpu":
        return
    with pytest.raises(ValueError, match="q: expected a cuda tensor"):
        kda_chunk_triton(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu())


def test_bad_input_layer():
    with pytest.raises(ValueError, match="backend: expected one of"):
        KimiDeltaAttention(32, 2, backend="cuda")
    with pytest.raises(ValueError, match="head_dim: d_model=30 is not divisible by n_heads=4"):
        KimiDeltaAttention(30, 4)
    with pytest.raises(ValueError, match="conv_size: expected a positive int"):
        KimiDeltaAttention(32, 2, conv_size=0)
    layer = KimiDeltaAttention(32, 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, \*, 32\)"):
        layer(torch.zeros(1, 4, 31))
    with pytest.raises(TypeError, match="cache: expected a dict or None, got list"):
        layer(torch.zeros(1, 4, 32), cache=[])


# --------------------------------------------------------------------------------------------------------------
# The layer


def _pieces(layer, x, cuts):
    """Run x through the layer in pieces [0, c1), [c1, c2), … with one cache; T = 1 pieces are decode steps."""
    cache: dict = {}
    bounds = [0, *cuts, x.shape[1]]
    ys = [layer(x[:, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(ys, dim=1), cache


def test_layer_prefill_then_decode_equals_full_forward():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(48, 3, conv_size=4, chunk_size=16).double()
    x = randn(2, 30, 48, seed=11, dtype=torch.float64)
    y_full = layer(x)
    full_cache: dict = {}
    assert_close("y (cache, one piece)", layer(x, full_cache), y_full, 1e-12)
    y_steps, cache = _pieces(layer, x, [7, 8, 9, 10, 11, 23, 24])
    assert_close("y (prefill + decode)", y_steps, y_full, 1e-12)
    assert_close("state", cache["state"], full_cache["state"], 1e-12)
    for got, ref in zip(cache["conv"], full_cache["conv"], strict=True):
        assert_close("conv state", got, ref, 0.0)
    assert cache["n_tokens"] == 30
    y_tokens, cache_tokens = _pieces(layer, x[:, :6], [1, 2, 3, 4, 5])
    assert_close("y (token by token)", y_tokens, y_full[:, :6], 1e-12)


def test_layer_gradients_reach_every_parameter():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(32, 2)
    x = randn(2, 70, 32, seed=5, requires_grad=True)
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, f"{name}: zero gradient"
    assert float(x.grad.abs().sum()) > 0


def test_layer_initialisation():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(64, 4, head_dim=16)
    assert layer.n_heads == 4 and layer.head_dim == 16
    A = layer.A_log.exp()
    assert bool(((A >= 1.0) & (A <= 16.0)).all())
    dt = F.softplus(layer.dt_bias)
    assert dt.shape == (64,) and bool(((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all())
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    assert layer.f_proj[0].weight.shape == (16, 64) and layer.g_proj[1].bias.shape == (64,)


def test_layer_triton_backend_matches_reference(device):
    torch.manual_seed(0)
    ref_layer = KimiDeltaAttention(32, 2, chunk_size=16).to(device)
    tri_layer = KimiDeltaAttention(32, 2, chunk_size=16, backend="triton").to(device)
    tri_layer.load_state_dict(ref_layer.state_dict())
    x = randn(1, 20, 32, seed=3, device=device)
    assert_close("y (triton vs reference)", tri_layer(x), ref_layer(x), 1e-5)
    y_steps, cache = _pieces(tri_layer, x, [13, 14])
    ref_cache: dict = {}
    ref_layer(x, ref_cache)
    assert_close("y (triton prefill + decode)", y_steps, ref_layer(x), 1e-5)
    assert_close("state (triton)", cache["state"], ref_cache["state"], 1e-5)


# --------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16 and fp32, realistic sizes (fp64 chunkwise reference on the same device)

GPU_TOL = {
    torch.bfloat16: {"o": 5e-3, "S_T": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "h0": 8e-3, "g": 2e-2, "beta": 2e-2},
    torch.float32: {"o": 2e-5, "S_T": 2e-5, "q": 2e-5, "k": 2e-5, "v": 2e-5, "h0": 2e-5, "g": 1e-4, "beta": 1e-4},
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "T", "K"),
    [
        (torch.bfloat16, 63, 64),
        (torch.bfloat16, 1000, 128),
        (torch.bfloat16, 4096, 128),
        (torch.float32, 63, 128),
        (torch.float32, 1000, 64),
        (torch.float32, 1000, 128),
    ],
    ids=["bf16-63-64", "bf16-1000-128", "bf16-4096-128", "fp32-63-128", "fp32-1000-64", "fp32-1000-128"],
)
def test_gpu_chunk_fwd_bwd(dtype, T, K):
    inputs = make_inputs(1, T, 2, K, K, seed=T, device="cuda")
    inputs = [t.to(dtype) for t in inputs[:5]] + [inputs[5].float()]  # the reference sees the rounded inputs
    ref_fn = lambda *a, **kw: kda_chunk(*a, **kw, chunk_size=64)
    o_ref, s_ref, ref = run_with_grads(ref_fn, [t.double() for t in inputs], use_h0=True)
    o, s, got = run_with_grads(kda_chunk_triton, inputs, use_h0=True)
    tol = GPU_TOL[dtype]
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tol["o"])
    assert_close("S_T", s, s_ref, tol["S_T"])
    for name in got:
        assert_close(f"d{name}", got[name], ref[name], tol[name])


@pytest.mark.gpu
@pytest.mark.parametrize(("H", "dtype"), [(2, torch.bfloat16), (16, torch.bfloat16), (16, torch.float32)])
def test_gpu_chunk_bwd_does_not_depend_on_buffer_contents(H, dtype, monkeypatch):
    """fwd + bwd with every launcher buffer zero-filled, then NaN-filled: identical and finite (T=1100 and H=16
    autotune every config; K=128 bf16 is the benchmark's shape, K=128 fp32 TinyKimi's)."""
    inputs = make_inputs(1, 1100, H, 128, 128, seed=3, device="cuda")
    inputs = [t.to(dtype) for t in inputs[:5]] + [inputs[5].float()]
    results = []
    for fill in (0.0, float("nan")):
        monkeypatch.setattr(kda_kernels, "_alloc", _FilledAlloc(fill))
        o, s, got = run_with_grads(kda_chunk_triton, inputs, use_h0=True)
        results.append({"o": o, "S_T": s, **{f"d{n}": g for n, g in got.items()}})
    for name, out in results[0].items():
        assert bool(torch.isfinite(out).all()), f"{name}: non-finite with zero-filled buffers"
        assert torch.equal(out, results[1][name]), f"{name}: depends on what the buffers held"


@pytest.mark.gpu
def test_gpu_strong_decay_bf16_is_finite():
    inputs = make_inputs(1, 4096, 2, 128, 128, gate="strong", device="cuda")
    inputs = [t.bfloat16() for t in inputs[:5]] + [inputs[5].float()]
    o, s, got = run_with_grads(kda_chunk_triton, inputs, use_h0=True)
    for name, t in [("o", o), ("S_T", s), *got.items()]:
        assert bool(torch.isfinite(t).all()), name
    o_ref, _ = kda_chunk(*(t.double() for t in inputs[:5]), initial_state=inputs[5].double())
    assert_close("o", o, o_ref, 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_decode_step(dtype):
    q, k, v, g, beta, h0 = make_inputs(4, 1, 16, 128, 128, device="cuda")
    args = [t[:, 0].to(dtype) for t in (q, k, v, g, beta)]
    o_ref, s_ref = kda_step(*(a.double() for a in args), h0)
    o, s = kda_decode_step_triton(*args, h0.float())
    assert_close("o", o, o_ref, 5e-3 if dtype == torch.bfloat16 else 1e-6)
    assert_close("S", s, s_ref, 1e-6)


@pytest.mark.gpu
def test_gpu_layer_triton_bf16_prefill_decode_and_backward():
    torch.manual_seed(0)
    ref_layer = KimiDeltaAttention(256, 4, chunk_size=64).cuda()
    tri_layer = KimiDeltaAttention(256, 4, chunk_size=64, backend="triton").cuda()
    tri_layer.load_state_dict(ref_layer.state_dict())
    x = randn(2, 300, 256, seed=1, device="cuda")
    y_ref = ref_layer(x)
    assert_close("y fp32 (triton vs reference)", tri_layer(x), y_ref, 1e-4)
    y_steps, _ = _pieces(tri_layer, x, [200, 201, 202, 250])
    assert_close("y fp32 (triton prefill + decode)", y_steps, y_ref, 1e-4)
    tri_layer.bfloat16()
    xb = x.bfloat16().requires_grad_()
    yb = tri_layer(xb)
    assert_close("y bf16", yb, y_ref, 3e-2)
    yb.float().square().mean().backward()
    for name, p in tri_layer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name

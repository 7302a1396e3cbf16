"""Chapter 02 (MoBA): the reference's exact cases, the Triton kernels against it (forward, backward, gate), the
layer's contract (projections, RoPE, cache, the "paged" hook, dense mode, max logits), and bad input.

Tolerances (README "Tolerances"): fp32 kernels use exact fp32 dots (interpreter and GPU alike), so they match the
fp64 reference to ≤ 1e-5; bf16 on the GPU to ≤ 1e-2 (P and dS rounded to bf16 before the tensor-core dots, pair
buffers in bf16). GPU comparisons use the kernel's own block selection (``moba_gate_triton``) for the reference,
because a router score tie within fp32 rounding may legitimately go either way; the selection itself is checked
separately, mismatches allowed only at such near-ties.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanokimi.moba import (
    MoBAAttention,
    apply_rope,
    block_mask_attention,
    block_scores,
    moba_attention,
    moba_attention_triton,
    moba_gate_triton,
    select_blocks,
)
from nanokimi.moba.kernels import _backward, _forward
from nanokimi.testing import assert_close, poisoned_like, randn

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def qkv(B, T, H, D, *, seed=0, dtype=torch.float64, device="cpu", Tq=None):
    q = randn(B, Tq or T, H, D, seed=seed, dtype=dtype, device=device)
    k = randn(B, T, H, D, seed=seed + 1, dtype=dtype, device=device)
    v = randn(B, T, H, D, seed=seed + 2, dtype=dtype, device=device)
    return q, k, v


def dense_causal(q, k, v, scale=None):
    """Plain causal softmax attention, written independently of the chapter (queries are the last Tq)."""
    Tq, T, D = q.shape[1], k.shape[1], q.shape[-1]
    scale = scale or D**-0.5
    logits = torch.einsum("bihd,bshd->bhis", q, k) * scale
    allowed = torch.arange(T)[None, :] <= (T - Tq + torch.arange(Tq))[:, None]
    logits = logits.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.einsum("bhis,bshd->bihd", logits.softmax(-1), v)


def reference_grads(q, k, v, do, fn):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.double())
    return out.detach(), grads


# --- reference: exact cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("T,block_size,topk", [(1, 16, 1), (63, 16, 4), (100, 32, 4), (100, 7, 15), (64, 64, 1)])
def test_reference_is_dense_causal_when_topk_blocks_cover_the_sequence(T, block_size, topk):
    assert topk * block_size >= T
    q, k, v = qkv(2, T, 3, 8, seed=1)
    assert_close("o", moba_attention(q, k, v, block_size, topk), dense_causal(q, k, v), 1e-12)


@pytest.mark.parametrize("T,block_size", [(63, 16), (100, 7), (5, 2)])
def test_reference_with_topk_1_is_block_local_causal(T, block_size):
    q, k, v = qkv(1, T, 2, 8, seed=2)
    out = moba_attention(q, k, v, block_size, topk=1)
    expect = torch.empty_like(out)
    for start in range(0, T, block_size):
        sl = slice(start, min(start + block_size, T))
        expect[:, sl] = dense_causal(q[:, sl], k[:, sl], v[:, sl])
    assert_close("o", out, expect, 1e-12)


def test_reference_with_topk_below_the_blocks_is_not_dense():
    q, k, v = qkv(1, 64, 2, 8, seed=3)
    assert (moba_attention(q, k, v, 16, 2) - dense_causal(q, k, v)).abs().max() > 1e-2


def test_reference_hand_built_example_picks_the_block_its_query_points_at():
    # 3 blocks of 2 tokens, D = 2. Block 0's keys point along e0, block 1's along e1; block 2 holds the queries.
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 3.0], [3.0, 0.0]], dtype=torch.float64)
    v = torch.arange(12, dtype=torch.float64).view(6, 2)
    q, k, v = (x[None, :, None, :] for x in (q, k, v))  # [1, 6, 1, 2]
    scores = block_scores(q, k, 2)
    assert torch.allclose(scores[0, 0, 4], torch.tensor([0.0, 3.0, 1.5], dtype=torch.float64))
    gate = select_blocks(scores, topk=2, block_size=2)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool
    )  # rows: queries 0..5; query 4 points at e1 → block 1, query 5 at e0 → block 0
    assert torch.equal(gate, expected)
    out = moba_attention(q, k, v, block_size=2, topk=2)[0, :, 0]
    for t, keys in ((4, [2, 3, 4]), (5, [0, 1, 4, 5])):
        logits = (q[0, t, 0] @ k[0, keys, 0].T) / math.sqrt(2)
        assert torch.allclose(out[t], logits.softmax(-1) @ v[0, keys, 0])


def test_reference_ties_go_to_the_lower_block_index():
    # Blocks 0, 1 and 2 have the same mean key; the query in block 3 must take block 0 with topk = 2.
    k = torch.zeros(1, 16, 1, 4, dtype=torch.float64)
    k[0, :12, 0, 0] = 1.0
    q = torch.zeros(1, 16, 1, 4, dtype=torch.float64)
    q[0, :, 0, 0] = 1.0
    gate = select_blocks(block_scores(q, k, 4), topk=2, block_size=4)
    assert gate[0, 0, 13].tolist() == [True, False, False, True]
    gate3 = select_blocks(block_scores(q, k, 4), topk=3, block_size=4)
    assert gate3[0, 0, 13].tolist() == [True, True, False, True]


@pytest.mark.parametrize("topk", [1, 2, 5])
def test_select_blocks_keeps_current_drops_future_and_counts_topk(topk):
    scores = randn(2, 3, 50, 7, seed=4)
    gate = select_blocks(scores, topk, block_size=8)
    current = torch.arange(50) // 8
    blocks = torch.arange(7)
    assert gate[:, :, torch.arange(50), current].all()
    assert not (gate & (blocks[None, :] > current[:, None])).any()
    assert torch.equal(gate.sum(-1), torch.clamp(current + 1, max=topk).expand(2, 3, 50))


def test_block_scores_use_the_mean_of_each_block_including_the_partial_last_one():
    q, k, _ = qkv(2, 10, 3, 5, seed=5)
    scores = block_scores(q, k, 4)  # blocks of 4, 4, 2 tokens
    means = torch.stack([k[:, 0:4].mean(1), k[:, 4:8].mean(1), k[:, 8:10].mean(1)], dim=1)  # [B, 3, H, D]
    assert_close("scores", scores, torch.einsum("bthd,bjhd->bhtj", q, means), 1e-12)


def test_reference_continuation_queries_match_the_full_forward():
    q, k, v = qkv(1, 90, 2, 8, seed=6)
    full = moba_attention(q, k, v, 16, 3)
    assert_close("o", moba_attention(q[:, 70:], k, v, 16, 3), full[:, 70:], 1e-12)


# --- Triton against the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 63, 130])
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_triton_forward_and_backward_match_reference(T, topk, device):
    B, H, D, bs = 2, 2, 16, 16
    q, k, v = qkv(B, T, H, D, seed=10 + T + topk)
    do = randn(B, T, H, D, seed=99)
    ref, (dq_ref, dk_ref, dv_ref) = reference_grads(q, k, v, do, lambda a, b, c: moba_attention(a, b, c, bs, topk))
    q32, k32, v32, do32 = (x.to(device, torch.float32) for x in (q, k, v, do))
    scale = D**-0.5
    o, lse, _, plan = _forward(q32, k32, v32, bs, topk, scale, False, out=poisoned_like(q32))
    assert_close("o", o, ref, FP32_TOL)
    dq, dk, dv = _backward(
        q32, k32, v32, o, lse, do32, plan, bs, scale, poisoned_like(q32), poisoned_like(k32), poisoned_like(v32)
    )
    assert_close("dq", dq, dq_ref, FP32_TOL)
    assert_close("dk", dk, dk_ref, FP32_TOL)
    assert_close("dv", dv, dv_ref, FP32_TOL)


@pytest.mark.parametrize(
    "B,T,H,D,block_size,topk",
    [
        (1, 100, 2, 24, 40, 3),  # head dim padded to 32, block not a multiple of the key tile
        (1, 100, 1, 16, 4, 4),  # 25 blocks: the gate merges several chunks of candidate blocks
        (2, 70, 2, 16, 16, 9),  # topk larger than the number of blocks: dense causal
        (1, 50, 2, 16, 64, 3),  # one block
    ],
)
def test_triton_odd_shapes_match_reference_through_autograd(B, T, H, D, block_size, topk, device):
    q, k, v = qkv(B, T, H, D, seed=20 + D + block_size)
    do = randn(B, T, H, D, seed=98)
    ref, grads_ref = reference_grads(q, k, v, do, lambda a, b, c: moba_attention(a, b, c, block_size, topk))
    leaves = [x.to(device, torch.float32).requires_grad_() for x in (q, k, v)]
    out = moba_attention_triton(*leaves, block_size, topk)
    assert_close("o", out, ref, FP32_TOL)
    grads = torch.autograd.grad(out, leaves, do.to(device, torch.float32))
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(name, g, g_ref, FP32_TOL)


def test_triton_continuation_queries_match_reference(device):
    q, k, v = qkv(2, 90, 2, 16, seed=30, Tq=37)  # 37 new queries after 53 cached tokens
    do = randn(2, 37, 2, 16, seed=97)
    ref, grads_ref = reference_grads(q, k, v, do, lambda a, b, c: moba_attention(a, b, c, 16, 3))
    leaves = [x.to(device, torch.float32).requires_grad_() for x in (q, k, v)]
    out = moba_attention_triton(*leaves, 16, 3)
    assert_close("o", out, ref, FP32_TOL)
    grads = torch.autograd.grad(out, leaves, do.to(device, torch.float32))
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(name, g, g_ref, FP32_TOL)


@pytest.mark.parametrize("T,block_size,topk", [(130, 16, 3), (100, 4, 5), (40, 8, 2)])
def test_triton_gate_matches_select_blocks(T, block_size, topk, device):
    q, k, _ = qkv(2, T, 3, 16, seed=40 + T)
    expect = select_blocks(block_scores(q, k, block_size), topk, block_size)
    got = moba_gate_triton(q.to(device, torch.float32), k.to(device, torch.float32), block_size, topk)
    assert torch.equal(got.cpu(), expect)


def test_triton_gate_breaks_ties_towards_the_lower_block(device):
    k = torch.zeros(1, 40, 1, 16)
    k[0, :36, 0, 0] = 1.0  # blocks 0..8 share one mean key
    q = torch.zeros(1, 40, 1, 16)
    q[0, :, 0, 0] = 1.0
    got = moba_gate_triton(q.to(device), k.to(device), 4, 4)[0, 0, 38].cpu()
    assert got.nonzero().flatten().tolist() == [0, 1, 2, 9]


def test_triton_max_logits_match_reference(device):
    q, k, v = qkv(2, 77, 3, 16, seed=50)
    _, ref = moba_attention(q, k, v, 16, 2, return_max_logits=True)
    _, got = moba_attention_triton(*(x.to(device, torch.float32) for x in (q, k, v)), 16, 2, return_max_logits=True)
    assert got.shape == (2, 3)
    assert_close("max_logits", got, ref, FP32_TOL)


def test_triton_is_deterministic(device):
    q, k, v = qkv(1, 70, 2, 16, seed=60, dtype=torch.float32, device=device)
    do = randn(1, 70, 2, 16, seed=61, device=device)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = moba_attention_triton(*leaves, 8, 3)
        runs.append([out, *torch.autograd.grad(out, leaves, do)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [moba_attention, moba_attention_triton], ids=["reference", "triton"])
def test_bad_input_is_rejected_with_clear_errors(fn, device):
    dev = device if fn is moba_attention_triton else "cpu"
    q, k, v = qkv(1, 32, 2, 16, seed=70, dtype=torch.float32, device=dev)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, T, 2, 16\)"):
        fn(q, k[:, :, :1], v[:, :, :1], 16, 2)
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 32, 2, 16\) \(that of k\)"):
        fn(q, k, v[:, :16], 16, 2)
    with pytest.raises(ValueError, match="q: expected at most as many tokens as k"):
        fn(torch.cat((q, q), 1), k, v, 16, 2)
    with pytest.raises(ValueError, match="block_size: expected a positive int, got 0"):
        fn(q, k, v, 0, 2)
    with pytest.raises(ValueError, match="block_size: expected a positive int, got -4"):
        fn(q, k, v, -4, 2)
    with pytest.raises(TypeError, match="block_size: expected a positive int, got float"):
        fn(q, k, v, 16.0, 2)
    with pytest.raises(ValueError, match="topk: expected a positive int, got 0"):
        fn(q, k, v, 16, 0)
    with pytest.raises(ValueError, match="causal: expected True"):
        fn(q, k, v, 16, 2, causal=False)
    with pytest.raises(ValueError, match="scale: expected None or a positive finite number"):
        fn(q, k, v, 16, 2, scale=-1.0)
    with pytest.raises(ValueError, match="q: expected 4 dimensions, got 3"):
        fn(q[0], k, v, 16, 2)
    with pytest.raises(TypeError, match=r"k: expected dtype in \(float32\), got float16"):
        fn(q, k.half(), v, 16, 2)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor, got list"):
        fn([1.0], k, v, 16, 2)


def test_triton_rejects_fp64_and_the_wrong_device(device):
    q, k, v = qkv(1, 8, 1, 16, seed=71)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(float16, bfloat16, float32\), got float64"):
        moba_attention_triton(*(x.to(device) for x in (q, k, v)), 4, 2)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="q: expected a cuda tensor"):
            moba_attention_triton(q.float(), k.float(), v.float(), 4, 2)


def test_block_mask_attention_rejects_a_mask_without_the_own_block():
    q, k, v = qkv(1, 8, 1, 4, seed=72)
    mask = torch.zeros(1, 1, 8, 2, dtype=torch.bool)
    mask[..., 0] = True
    with pytest.raises(ValueError, match="block_mask: expected every query's own block"):
        block_mask_attention(q, k, v, mask, 4)


# --- the layer -----------------------------------------------------------------------------------------------
def make_layer(backend="reference", dense=False, block_size=8, topk=2, seed=0, **kw):
    torch.manual_seed(seed)
    return MoBAAttention(32, 4, block_size=block_size, topk=topk, dense=dense, backend=backend, **kw)


def test_layer_has_the_contract_attributes():
    layer = MoBAAttention(48, 3, head_dim=8)
    assert (layer.n_heads, layer.head_dim) == (3, 8)
    for name, shape in (("q_proj", (24, 48)), ("k_proj", (24, 48)), ("v_proj", (24, 48)), ("o_proj", (48, 24))):
        proj = getattr(layer, name)
        assert isinstance(proj, torch.nn.Linear) and proj.bias is None and tuple(proj.weight.shape) == shape
    assert layer.max_logits is None and layer.track_max_logits is False
    assert MoBAAttention(64, 4).head_dim == 16


def test_dense_layer_is_causal_attention_with_rope():
    layer = make_layer(dense=True)
    x = randn(2, 40, 32, seed=80)
    B, T = 2, 40
    pos = torch.arange(T)
    q = apply_rope(layer.q_proj(x).view(B, T, 4, 8), pos, layer.inv_freq)
    k = apply_rope(layer.k_proj(x).view(B, T, 4, 8), pos, layer.inv_freq)
    v = layer.v_proj(x).view(B, T, 4, 8)
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    expect = layer.o_proj(attn.transpose(1, 2).reshape(B, T, 32))
    assert_close("y", layer(x), expect, FP32_TOL)


def test_rope_rotates_pairs_and_preserves_relative_positions():
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x = randn(1, 1, 1, 8, seed=81, dtype=torch.float64)
    y = randn(1, 1, 1, 8, seed=82, dtype=torch.float64)
    dots = [
        (apply_rope(x, torch.tensor([p + 3]), inv_freq) * apply_rope(y, torch.tensor([p]), inv_freq)).sum()
        for p in (0, 5, 17)
    ]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3))
    assert torch.allclose(apply_rope(x, torch.tensor([0]), inv_freq), x)


def test_rope_keeps_fp64_in_fp64():
    """fp64 inputs are rotated in fp64 (fp32 angles would be off by ~1e-7 at position 1000), other dtypes in fp32."""
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x = randn(1, 2, 1, 8, seed=83, dtype=torch.float64)
    pos = torch.tensor([3, 1000])
    angles = pos.double()[:, None] * inv_freq[None, :]  # [T, 4]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x[..., :4], x[..., 4:]
    expect = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    got = apply_rope(x, pos, inv_freq)
    assert got.dtype == torch.float64
    assert_close("rope fp64", got, expect, 1e-14)
    assert apply_rope(x.bfloat16(), pos, inv_freq).dtype == torch.bfloat16


def test_rope_with_one_position_row_per_sequence_equals_per_row_calls_bitwise():
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    positions = torch.tensor([[0, 1, 2], [7, 8, 9], [1000, 1001, 1002]])  # [B, T]: each row its own offset
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = randn(3, 3, 2, 8, seed=88, dtype=dtype)
        got = apply_rope(x, positions, inv_freq)
        for b in range(3):
            assert torch.equal(got[b], apply_rope(x[b : b + 1], positions[b], inv_freq)[0]), (dtype, b)
        shared = apply_rope(x, positions[1], inv_freq)  # [T] positions broadcast over rows, as before
        assert torch.equal(shared, apply_rope(x, positions[1].expand(3, 3), inv_freq))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_prefill_in_pieces_equals_the_full_forward(backend, device):
    dev = device if backend == "triton" else "cpu"
    layer = make_layer(backend, block_size=8, topk=2).to(dev)  # 44 tokens ≫ topk·block_size = 16: really sparse
    x = randn(2, 44, 32, seed=83, device=dev)
    full = layer(x)
    cache: dict = {}
    pieces = [layer(x[:, a:b], cache) for a, b in ((0, 13), (13, 30), (30, 44))]
    assert cache["k"].shape == (2, 44, 4, 8)
    assert_close("y", torch.cat(pieces, 1), full, FP32_TOL)


@pytest.mark.parametrize("dense", [False, True])
def test_layer_decoding_equals_the_full_forward_where_moba_is_dense(dense):
    # MoBA with 20 tokens ≤ topk·block_size = 24 is dense, so decoding densely is exact; dense layers always are.
    T = 20 if not dense else 44
    layer = make_layer(dense=dense, block_size=8, topk=3)
    x = randn(1, T, 32, seed=84)
    full = layer(x)
    cache: dict = {}
    steps = [layer(x[:, :5], cache)] + [layer(x[:, t : t + 1], cache) for t in range(5, T)]
    assert_close("y", torch.cat(steps, 1), full, FP32_TOL)


def test_layer_decoding_beyond_topk_blocks_attends_the_whole_cache():
    layer = make_layer(block_size=8, topk=2)
    dense = make_layer(dense=True)
    dense.load_state_dict(layer.state_dict())
    x = randn(1, 41, 32, seed=85)
    cache: dict = {}
    layer(x[:, :40], cache)
    step = layer(x[:, 40:], cache)
    assert_close("y", step, dense(x)[:, 40:], FP32_TOL)
    assert (step - layer(x)[:, 40:]).abs().max() > 1e-4  # the full MoBA forward is sparser there


class ListKV:
    """The ``"paged"`` protocol over an explicit per-row KV list: dense causal softmax attention, row by row."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor]):
        self.ks, self.vs = list(ks), list(vs)  # row b: [n_b, H, D], RoPE applied
        self.positions = torch.tensor([k.shape[0] for k in ks])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = []
        for b in range(q.shape[0]):
            self.ks[b], self.vs[b] = torch.cat((self.ks[b], k[b])), torch.cat((self.vs[b], v[b]))
            past, T, S = int(self.positions[b]), q.shape[1], self.ks[b].shape[0]
            logits = torch.einsum("thd,shd->hts", q[b], self.ks[b]) / math.sqrt(q.shape[-1])
            visible = torch.arange(S)[None, :] <= past + torch.arange(T)[:, None]  # [T, S]
            weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out.append(torch.einsum("hts,shd->thd", weights, self.vs[b]))
        return torch.stack(out)


@pytest.mark.parametrize("dense,T", [(False, 1), (True, 3)])
def test_layer_paged_hook_equals_its_own_cache_with_ragged_contexts(dense, T):
    # Decoding (T = 1) is dense attention for MoBA too; several new tokens after a cache are MoBA (sparse beyond
    # topk·block_size = 16 keys), so that case uses a dense layer, where both paths are plain causal attention.
    layer = make_layer(dense=dense, block_size=8, topk=2).double()
    lens = [5, 16, 21]
    want, new, ks, vs, full_k = [], [], [], [], []
    with torch.no_grad():
        for b, n in enumerate(lens):
            x = randn(1, n + T, 32, seed=90 + b, dtype=torch.float64)
            own: dict = {}
            layer(x[:, :n], own)
            ks.append(own["k"][0])
            vs.append(own["v"][0])
            want.append(layer(x[:, n:], own))  # the layer's own cache path: [1, T, 32]
            new.append(x[:, n:])
            full_k.append(own["k"][0])
        kv = ListKV(ks, vs)
        cache = {"paged": kv}
        layer.track_max_logits = True
        got = layer(torch.cat(new), cache)  # one ragged batch: [3, T, 32]
    assert_close("y", got, torch.cat(want), 1e-12)
    assert list(cache) == ["paged"] and layer.max_logits is None
    for b in range(3):  # the keys handed to attend were rotated at positions n_b … n_b + T − 1
        assert_close(f"k row {b}", kv.ks[b], full_k[b], 1e-12)


def test_layer_tracks_max_logits_per_head():
    layer = make_layer(block_size=8, topk=2)
    x = randn(2, 30, 32, seed=86)
    layer(x)
    assert layer.max_logits is None
    layer.track_max_logits = True
    layer(x)
    got = layer.max_logits
    assert got.shape == (4,) and got.dtype == torch.float32 and not got.requires_grad
    pos = torch.arange(30)
    q = apply_rope(layer.q_proj(x).view(2, 30, 4, 8), pos, layer.inv_freq).double()
    k = apply_rope(layer.k_proj(x).view(2, 30, 4, 8), pos, layer.inv_freq).double()
    gate = select_blocks(block_scores(q, k, 8), 2, 8)
    token = gate.repeat_interleave(8, dim=-1)[..., :30] & (pos[None, :] <= pos[:, None])
    logits = torch.einsum("bihd,bshd->bhis", q, k) / math.sqrt(8)
    expect = logits.masked_fill(~token, float("-inf")).amax(dim=(0, 2, 3))
    assert_close("max_logits", got, expect, FP32_TOL)
    # QK-clip's lever: scaling head 1's query rows by γ scales its max logit by γ.
    with torch.no_grad():
        layer.q_proj.weight[8:16] *= 0.5
    layer(x)
    assert torch.isclose(layer.max_logits[1], 0.5 * got[1], rtol=1e-5)
    assert torch.allclose(layer.max_logits[[0, 2, 3]], got[[0, 2, 3]])


def test_layer_triton_backend_matches_reference_backend_forward_and_backward(device):
    ref = make_layer("reference", block_size=8, topk=2, seed=1)
    tri = make_layer("triton", block_size=8, topk=2, seed=1).to(device)
    tri.track_max_logits = ref.track_max_logits = True
    x = randn(2, 37, 32, seed=87)
    y_ref, y_tri = ref(x), tri(x.to(device))
    assert_close("y", y_tri, y_ref, FP32_TOL)
    assert_close("max_logits", tri.max_logits, ref.max_logits, FP32_TOL)
    y_ref.square().sum().backward()
    y_tri.square().sum().backward()
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters(), strict=True):
        assert_close(f"grad {name}", p_tri.grad, p_ref.grad, FP32_TOL)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="backend: expected one of"):
        MoBAAttention(32, 4, backend="cuda")
    with pytest.raises(ValueError, match="d_model: expected a multiple of n_heads"):
        MoBAAttention(30, 4)
    with pytest.raises(ValueError, match="head_dim: expected an even number"):
        MoBAAttention(32, 4, head_dim=7)
    with pytest.raises(ValueError, match="block_size: expected a positive int, got 0"):
        MoBAAttention(32, 4, block_size=0)
    with pytest.raises(ValueError, match="topk: expected a positive int, got 0"):
        MoBAAttention(32, 4, topk=0)
    layer = make_layer()
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        layer(torch.zeros(4, 32))
    with pytest.raises(ValueError, match="x: expected last dimension d_model=32, got 16"):
        layer(torch.zeros(1, 4, 16))
    with pytest.raises(TypeError, match="cache: expected a dict or None, got list"):
        layer(torch.zeros(1, 4, 32), [])
    with pytest.raises(ValueError, match=r"cache\['k'\]: expected shape \(1, \*, 4, 8\)"):
        layer(torch.zeros(1, 4, 32), {"k": torch.zeros(1, 3, 4, 6), "v": torch.zeros(1, 3, 4, 6)})
    kv = ListKV([torch.zeros(2, 4, 8)], [torch.zeros(2, 4, 8)])
    with pytest.raises(ValueError, match="cache: expected either 'paged' or 'k'/'v'"):
        layer(torch.zeros(1, 1, 32), {"paged": kv, "k": torch.zeros(1, 2, 4, 8), "v": torch.zeros(1, 2, 4, 8)})
    with pytest.raises(ValueError, match=r"cache\['paged'\].positions: expected shape \(2\)"):
        layer(torch.zeros(2, 1, 32), {"paged": kv})
    with pytest.raises(ValueError, match=r"positions: expected shape \(4,\) or \(1, 4\)"):
        apply_rope(torch.zeros(1, 4, 4, 8), torch.arange(3), layer.inv_freq)


# --- GPU: compiled, bf16, long and odd shapes -------------------------------------------------------------------
def near_tie_only(q, k, block_size, topk, got_mask):
    """Where the kernel's selection differs from the fp64 reference's, the block it took and the block it left
    must score within rounding of each other (a near-tie); returns the number of differing (query, head) rows."""
    scores = block_scores(q.double(), k.double(), block_size)
    expect = select_blocks(scores, topk, block_size)
    differ = (got_mask != expect).any(-1)
    if differ.any():
        taken = scores.masked_fill(~(got_mask & ~expect), float("-inf")).amax(-1)[differ]
        left = scores.masked_fill(~(expect & ~got_mask), float("inf")).amin(-1)[differ]
        gap = (left - taken) / scores.abs().amax()
        assert float(gap.max()) < 1e-5, f"selection differs beyond rounding (relative gap {float(gap.max()):.2e})"
    return int(differ.sum())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,T,H,D,block_size,topk",
    [(2, 1000, 2, 64, 128, 3), (1, 4096, 2, 128, 256, 4), (1, 8191, 2, 128, 512, 3), (1, 8191, 2, 64, 128, 8)],
)
def test_gpu_bf16_forward_and_backward(B, T, H, D, block_size, topk):
    q, k, v = qkv(B, T, H, D, seed=T + D, dtype=torch.bfloat16, device="cuda")
    do = randn(B, T, H, D, seed=7, dtype=torch.bfloat16, device="cuda")
    gate = moba_gate_triton(q, k, block_size, topk)
    assert near_tie_only(q, k, block_size, topk, gate) <= max(1, B * H * T // 1000)
    ref, grads_ref = reference_grads(q, k, v, do, lambda a, b, c: block_mask_attention(a, b, c, gate, block_size))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = moba_attention_triton(*leaves, block_size, topk)
    assert out.dtype == torch.bfloat16
    assert_close("o", out, ref, BF16_TOL)
    grads = torch.autograd.grad(out, leaves, do)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(name, g, g_ref, BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])  # 128: TinyKimi gpu-small's fp32 training shape (shared-memory limits)
def test_gpu_fp32_odd_shape_matches_reference(D):
    q, k, v = qkv(2, 1000, 3, D, seed=5, dtype=torch.float32, device="cuda")
    do = randn(2, 1000, 3, D, seed=6, device="cuda")
    gate = moba_gate_triton(q, k, 100, 3)
    near_tie_only(q, k, 100, 3, gate)
    ref, grads_ref = reference_grads(q, k, v, do, lambda a, b, c: block_mask_attention(a, b, c, gate, 100))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = moba_attention_triton(*leaves, 100, 3)
    assert_close("o", out, ref, FP32_TOL)
    for name, g, g_ref in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, do), grads_ref, strict=True):
        assert_close(name, g, g_ref, FP32_TOL)


@pytest.mark.gpu
def test_gpu_layer_triton_bf16_matches_reference_backend():
    ref = MoBAAttention(256, 2, block_size=64, topk=3).cuda().to(torch.bfloat16)
    tri = MoBAAttention(256, 2, block_size=64, topk=3, backend="triton").cuda().to(torch.bfloat16)
    tri.load_state_dict(ref.state_dict())
    x = randn(2, 700, 256, seed=8, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert_close("y", tri(x), ref(x), BF16_TOL)

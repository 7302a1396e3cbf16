"""Chapter 05 (K2 MoE): router semantics, bias balancing, permutation maps, Triton grouped GEMMs vs the loop
reference (outputs and gradients), the MoE layer, bad input."""

from __future__ import annotations

import pytest
import torch

from nanokimi.moe import (
    MoE,
    grouped_matmul,
    grouped_swiglu,
    moe_forward,
    moe_forward_triton,
    moonlight_scaling_factor,
    permute,
    route,
    routed_experts,
    routed_experts_triton,
    swiglu_ffn,
    unpermute_combine,
    update_expert_bias,
)
from nanokimi.testing import assert_close, poisoned_like, randn


def _naive_route(x, router_weight, bias, top_k, scale, n_groups=1, topk_groups=1):
    """Token-by-token router written independently of ``route``: Python sorts keyed by (−score, id)."""
    scores = torch.sigmoid(x.double() @ router_weight.double().T)
    sel = scores + bias.double()
    n_experts = sel.shape[1]
    per_group = n_experts // n_groups
    idx_rows, weight_rows = [], []
    for t in range(x.shape[0]):
        allowed = list(range(n_experts))
        if n_groups > 1:
            group_score = [
                sum(sorted((float(sel[t, g * per_group + i]) for i in range(per_group)), reverse=True)[:2])
                for g in range(n_groups)
            ]
            kept = sorted(range(n_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
            allowed = [e for e in allowed if e // per_group in kept]
        chosen = sorted(sorted(allowed, key=lambda e: (-float(sel[t, e]), e))[:top_k])
        s = scores[t, chosen]
        idx_rows.append(chosen)
        weight_rows.append(s / s.sum() * scale)
    return torch.tensor(idx_rows), torch.stack(weight_rows)


def _experts(n_experts, d_model, d_ff, seed, dtype=torch.float64, device="cpu"):
    w_gate = randn(n_experts, d_ff, d_model, seed=seed, dtype=dtype, device=device) / d_model**0.5
    w_up = randn(n_experts, d_ff, d_model, seed=seed + 1, dtype=dtype, device=device) / d_model**0.5
    w_down = randn(n_experts, d_model, d_ff, seed=seed + 2, dtype=dtype, device=device) / d_ff**0.5
    return w_gate, w_up, w_down


# --- router ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "topk_groups"), [(8, 2, 1, 1), (16, 4, 4, 2), (12, 3, 3, 1), (6, 6, 1, 1)]
)
def test_route_matches_token_by_token_router(n_experts, top_k, n_groups, topk_groups):
    x = randn(50, 16, seed=1, dtype=torch.float64)
    router_weight = randn(n_experts, 16, seed=2, dtype=torch.float64)
    bias = 0.3 * randn(n_experts, seed=3, dtype=torch.float64)
    idx, weight = route(x, router_weight, bias, top_k, 2.5, n_groups, topk_groups)
    want_idx, want_weight = _naive_route(x, router_weight, bias, top_k, 2.5, n_groups, topk_groups)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, want_idx)
    assert_close("topk_weight", weight, want_weight, rtol_rel=1e-12, atol=1e-12)


def test_bias_changes_selection_but_never_the_weights():
    x = randn(64, 16, seed=4)
    router_weight = randn(8, 16, seed=5)
    scores = torch.sigmoid(x @ router_weight.T)
    idx0, _ = route(x, router_weight, torch.zeros(8), 2, 1.0)
    bias = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, -3.0])
    idx, weight = route(x, router_weight, bias, 2, 1.0)
    assert not torch.equal(idx, idx0)  # the bias chose differently ...
    assert bool((idx == 0).any(dim=1).all()) and not bool((idx == 7).any())
    unbiased = scores.gather(1, idx)
    assert_close("topk_weight", weight, unbiased / unbiased.sum(-1, keepdim=True), rtol_rel=1e-6)  # ... weights didn't
    biased = (scores + bias).gather(1, idx)
    assert (weight - biased / biased.sum(-1, keepdim=True)).abs().max() > 0.1  # the vLLM/transformers bug differs


@pytest.mark.parametrize("scale", [1.0, 2.446, 2.827])
def test_weights_sum_to_the_scaling_factor(scale):
    x = randn(40, 8, seed=6)
    _, weight = route(x, randn(16, 8, seed=7), randn(16, seed=8), 6, scale)
    assert weight.dtype == torch.float32
    assert_close("sum of weights", weight.sum(-1), torch.full((40,), scale), rtol_rel=1e-6)


def test_ties_go_to_the_lower_expert_id_and_indices_are_sorted():
    x = randn(5, 4, seed=9)
    router_weight = randn(1, 4, seed=10).repeat(6, 1)  # six identical experts: every score ties
    idx, weight = route(x, router_weight, torch.zeros(6), 3, 1.0)
    assert torch.equal(idx, torch.tensor([[0, 1, 2]] * 5))
    assert_close("tied weights", weight, torch.full((5, 3), 1 / 3), rtol_rel=1e-6)
    idx, _ = route(x, router_weight, torch.tensor([0.0, 0, 0, 0, 0, 1.0]), 3, 1.0)
    assert torch.equal(idx, torch.tensor([[0, 1, 5]] * 5))  # sorted ascending, not by score


def test_group_limited_routing_masks_with_minus_inf():
    # Group 0 wins the group vote although all its biased scores are negative; masking the other group with 0
    # instead of −inf would let experts 2, 3 (masked, selection 0) beat experts 0, 1 (selection ≈ −4.5).
    x = randn(20, 8, seed=11)
    bias = torch.tensor([-5.0, -5.0, -6.0, -6.0])
    idx, weight = route(x, randn(4, 8, seed=12), bias, 2, 1.0, n_groups=2, topk_groups=1)
    assert torch.equal(idx, torch.tensor([[0, 1]] * 20))
    assert torch.isfinite(weight).all()


def test_route_handles_fp64_and_bf16_inputs():
    x = randn(10, 8, seed=13)
    router_weight = randn(4, 8, seed=14)
    idx32, w32 = route(x, router_weight, torch.zeros(4), 2)
    idx64, w64 = route(x.double(), router_weight.double(), torch.zeros(4, dtype=torch.float64), 2)
    assert w64.dtype == torch.float64 and torch.equal(idx32, idx64)
    _, w16 = route(x.bfloat16(), router_weight.bfloat16(), torch.zeros(4), 2)
    assert w16.dtype == torch.float32  # scores are computed in fp32 even for bf16 tokens


# --- bias update, scaling factor ------------------------------------------------------------------------------
def test_update_expert_bias_moves_against_the_load():
    bias = torch.zeros(4)
    new = update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), 0.01)
    assert_close("bias", new, torch.tensor([-0.01, 0.01, 0.01, 0.01]), rtol_rel=1e-6)
    assert torch.equal(update_expert_bias(bias, torch.tensor([3, 3, 3, 3]), 0.01), bias)
    assert torch.equal(update_expert_bias(bias, torch.tensor([9, 0, 0, 3]), 0.0), bias)


def test_bias_balancing_brings_max_over_mean_below_1_2():
    n_experts, top_k, d = 16, 2, 32
    router_weight = randn(n_experts, d, seed=15) / d**0.5  # logits ~ N(0, 1), as at initialisation
    router_weight[:3] += randn(d, seed=16) / d**0.5  # three experts share a direction: a biased router
    direction = router_weight[0] / router_weight[0].norm()
    batches = randn(200, 4096, d, seed=17) + 0.5 * direction  # random data, shifted toward those experts
    bias = torch.zeros(n_experts)
    history = []
    for x in batches:
        idx, _ = route(x, router_weight, bias, top_k)
        load = torch.bincount(idx.flatten(), minlength=n_experts)
        history.append(float(load.max() / load.float().mean()))
        bias = update_expert_bias(bias, load, 1e-3)
    assert history[0] > 2.0, history[0]  # unbalanced before any update
    assert max(history[-20:]) < 1.2, history[-20:]


def test_moonlight_scaling_factor_reproduces_moonlight_and_k2():
    assert moonlight_scaling_factor(64, 6, samples=40_000) == pytest.approx(2.446, abs=0.005)
    assert moonlight_scaling_factor(384, 8, samples=20_000) == pytest.approx(2.827, abs=0.005)
    assert moonlight_scaling_factor(8, 1, samples=100) == 1.0  # top-1 renormalises to p = [1]


# --- the loop reference --------------------------------------------------------------------------------------
def test_one_expert_with_top1_is_a_dense_swiglu_ffn():
    x = randn(9, 16, seed=17, dtype=torch.float64)
    w_gate, w_up, w_down = _experts(1, 16, 24, seed=18)
    y = moe_forward(x, randn(1, 16, seed=19, dtype=torch.float64), torch.zeros(1), w_gate, w_up, w_down, 1)
    dense = swiglu_ffn(x, w_gate[0], w_up[0], w_down[0])
    assert_close("moe", y, dense, rtol_rel=1e-12)
    torch.testing.assert_close(swiglu_ffn(x, w_gate[0], w_up[0], w_down[0]), dense)


def test_reference_adds_the_shared_expert_unweighted():
    x = randn(7, 8, seed=20, dtype=torch.float64)
    w_gate, w_up, w_down = _experts(4, 8, 12, seed=21)
    shared = _experts(1, 8, 20, seed=22)
    shared = tuple(w[0] for w in shared)
    args = (x, randn(4, 8, seed=23, dtype=torch.float64), torch.zeros(4), w_gate, w_up, w_down, 2, 2.0)
    assert_close("shared", moe_forward(*args, shared=shared) - moe_forward(*args), swiglu_ffn(x, *shared), 1e-12)


# --- permutation ------------------------------------------------------------------------------------------
def test_permute_maps_on_a_known_example():
    topk_idx = torch.tensor([[2, 3], [1, 2], [1, 3], [2, 3]])  # expert 0 gets no token
    perm = permute(topk_idx, n_experts=4, block_m=16)
    assert perm.tokens_per_expert.tolist() == [0, 2, 3, 3]
    assert perm.expert_tile_start.tolist() == [0, 0, 1, 2, 3]
    assert perm.n_rows == 16 * ((8 + 4 * 15) // 16)
    assert perm.tile_expert.tolist()[:3] == [1, 2, 3] and set(perm.tile_expert.tolist()[3:]) == {4}
    # expert 1 holds slots (t=1, j=0), (t=2, j=0) in rows 0, 1; expert 2 rows 16..18; expert 3 rows 32..34
    assert perm.slot_row.tolist() == [[16, 32], [0, 17], [1, 33], [18, 34]]
    assert perm.row_token[:3].tolist() == [1, 2, -1] and perm.row_token[16:20].tolist() == [0, 1, 3, -1]
    assert perm.expert_order.tolist()[:2] == [2, 3] and perm.expert_order.tolist()[-1] == 0


@pytest.mark.parametrize(("n_tokens", "top_k", "n_experts"), [(1, 1, 1), (37, 2, 4), (100, 3, 7), (300, 8, 64)])
def test_permute_invariants(n_tokens, top_k, n_experts):
    gen = torch.Generator().manual_seed(n_tokens)
    topk_idx = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    perm = permute(topk_idx, n_experts, block_m=16)
    slot_row = perm.slot_row.long().flatten()
    assert len(set(slot_row.tolist())) == n_tokens * top_k  # distinct rows
    assert torch.equal(perm.row_slot.long()[slot_row], torch.arange(n_tokens * top_k))  # inverse maps
    assert torch.equal(perm.row_token.long()[slot_row], torch.arange(n_tokens * top_k) // top_k)
    assert int((perm.row_token >= 0).sum()) == n_tokens * top_k
    tile_of_row = torch.arange(perm.n_rows) // 16
    expert_of_slot = topk_idx.flatten()
    assert torch.equal(perm.tile_expert.long()[tile_of_row[slot_row]], expert_of_slot)  # one expert per tile
    for e in range(n_experts):
        rows = (perm.tile_expert.long()[tile_of_row] == e).nonzero().flatten()
        tokens = perm.row_token.long()[rows]
        tokens = tokens[tokens >= 0]
        assert torch.equal(tokens, (topk_idx == e).any(1).nonzero().flatten())  # token order inside an expert
    assert int(perm.expert_tile_start[-1]) <= perm.n_tiles


# --- Triton kernels vs the reference (interpreter on CPU, compiled on GPU) --------------------------------
def _routing_with_empty_expert(n_tokens, top_k, n_experts, seed, empty=2, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    choices = [e for e in range(n_experts) if e != empty]
    idx = torch.stack(
        [torch.tensor(choices)[torch.randperm(len(choices), generator=gen)[:top_k]] for _ in range(n_tokens)]
    )
    weight = torch.rand(n_tokens, top_k, generator=gen, dtype=torch.float64) + 0.1
    return idx.sort(1).values.to(device), weight.to(device)


def test_grouped_kernels_write_every_valid_row(device):
    n_tokens, d_model, d_ff, n_experts, top_k = 37, 32, 48, 4, 2
    idx, weight = _routing_with_empty_expert(n_tokens, top_k, n_experts, seed=30, device=device)
    x = randn(n_tokens, d_model, seed=31, device=device)
    w_gate, w_up, w_down = _experts(n_experts, d_model, d_ff, seed=32, dtype=torch.float32, device=device)
    perm = permute(idx, n_experts)
    act = grouped_swiglu(x, perm, w_gate, w_up, out=poisoned_like(torch.empty(perm.n_rows, d_ff, device=device)))
    rows = grouped_matmul(act, perm, w_down, out=poisoned_like(torch.empty(perm.n_rows, d_model, device=device)))
    y = unpermute_combine(rows, perm, weight, out=poisoned_like(torch.empty(n_tokens, d_model, device=device)))
    valid = perm.slot_row.long().flatten()
    token = torch.arange(n_tokens * top_k) // top_k
    expert = idx.flatten()
    want_act = torch.stack(
        [
            torch.nn.functional.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])
            for t, e in zip(token.tolist(), expert.tolist(), strict=True)
        ]
    )
    assert_close("act rows", act[valid], want_act, rtol_rel=1e-5)
    assert_close("down rows", rows[valid], torch.einsum("rf,rdf->rd", want_act, w_down[expert]), rtol_rel=1e-5)
    assert_close("combined", y, routed_experts(x, idx, weight.float(), w_gate, w_up, w_down), rtol_rel=1e-5)
    unweighted = unpermute_combine(rows, perm)
    assert_close("unweighted", unweighted, rows[perm.slot_row.long()].sum(1), rtol_rel=1e-6)


@pytest.mark.parametrize(("n_tokens", "top_k", "n_experts"), [(37, 2, 4), (1, 2, 4), (1, 1, 4), (20, 4, 5)])
def test_routed_experts_triton_matches_reference_with_gradients(device, n_tokens, top_k, n_experts):
    d_model, d_ff = 32, 48
    idx, weight = _routing_with_empty_expert(n_tokens, top_k, n_experts, seed=40 + n_tokens)
    inputs64 = [
        randn(n_tokens, d_model, seed=41, dtype=torch.float64),
        weight,
        *_experts(n_experts, d_model, d_ff, seed=42),
    ]
    ref_inputs = [t.clone().requires_grad_() for t in inputs64]
    ours_inputs = [t.to(device, torch.float32).requires_grad_() for t in inputs64]
    dy = randn(n_tokens, d_model, seed=43, dtype=torch.float64)
    ref = routed_experts(ref_inputs[0], idx, *ref_inputs[1:])
    ref.backward(dy)
    out = routed_experts_triton(ours_inputs[0], idx.to(device), *ours_inputs[1:])
    out.backward(dy.to(device, torch.float32))
    assert_close("y", out, ref, rtol_rel=1e-5)
    for name, ours, theirs in zip(
        ("dx", "d_topk_weight", "d_w_gate", "d_w_up", "d_w_down"), ours_inputs, ref_inputs, strict=True
    ):
        assert_close(name, ours.grad, theirs.grad, rtol_rel=1e-5)
    assert float(ours_inputs[2].grad[2].abs().max()) == 0.0  # the expert without tokens gets a zero gradient


def test_moe_forward_triton_matches_reference_through_the_router(device):
    n_tokens, d_model, d_ff, n_experts, top_k = 37, 32, 48, 4, 2
    x = randn(n_tokens, d_model, seed=50, dtype=torch.float64)
    router_weight = randn(n_experts, d_model, seed=51, dtype=torch.float64) / d_model**0.5
    bias = torch.tensor([0.0, 0.1, -0.2, 0.05], dtype=torch.float64)
    experts = _experts(n_experts, d_model, d_ff, seed=52)
    shared = tuple(w[0] for w in _experts(1, d_model, 16, seed=53))
    params64 = [x, router_weight, *experts, *shared]
    ref_p = [t.clone().requires_grad_() for t in params64]
    our_p = [t.to(device, torch.float32).requires_grad_() for t in params64]
    ref = moe_forward(ref_p[0], ref_p[1], bias, *ref_p[2:5], top_k, 2.446, shared=tuple(ref_p[5:]))
    out = moe_forward_triton(
        our_p[0], our_p[1], bias.to(device, torch.float32), *our_p[2:5], top_k, 2.446, tuple(our_p[5:])
    )
    dy = randn(n_tokens, d_model, seed=54, dtype=torch.float64)
    ref.backward(dy)
    out.backward(dy.to(device, torch.float32))
    assert_close("y", out, ref, rtol_rel=1e-5)
    names = ("dx", "d_router_weight", "d_w_gate", "d_w_up", "d_w_down", "d_shared_gate", "d_shared_up", "d_shared_down")
    for name, ours, theirs in zip(names, our_p, ref_p, strict=True):
        assert_close(name, ours.grad, theirs.grad, rtol_rel=1e-5)


def test_one_expert_top1_triton_is_a_dense_swiglu_ffn(device):
    x = randn(23, 32, seed=60, device=device)
    w_gate, w_up, w_down = _experts(1, 32, 48, seed=61, dtype=torch.float32, device=device)
    y = moe_forward_triton(
        x, randn(1, 32, seed=62, device=device), torch.zeros(1, device=device), w_gate, w_up, w_down, 1
    )
    assert_close("moe", y, swiglu_ffn(x.double(), w_gate[0].double(), w_up[0].double(), w_down[0].double()), 1e-5)


def test_triton_inference_path_stores_no_pre_activations(device):
    x = randn(5, 32, seed=63, device=device)
    experts = _experts(2, 32, 32, seed=64, dtype=torch.float32, device=device)
    idx = torch.tensor([[0], [1], [0], [0], [1]], device=device)
    weight = torch.ones(5, 1, device=device)
    with torch.no_grad():
        y = routed_experts_triton(x, idx, weight, *experts)
    assert y.grad_fn is None
    assert_close("y", y, routed_experts(x, idx, weight, *experts), rtol_rel=1e-5)


# --- the MoE layer ---------------------------------------------------------------------------------------------
def test_moe_layer_backends_agree_and_count_tokens(device):
    torch.manual_seed(0)
    ref = MoE(32, 48, 4, 2, n_shared=1, routed_scaling_factor=2.0, bias_update_rate=0.01)
    tri = MoE(32, 48, 4, 2, n_shared=1, routed_scaling_factor=2.0, bias_update_rate=0.01, backend="triton")
    tri.load_state_dict(ref.state_dict())
    tri.to(device)
    x = randn(2, 9, 32, seed=70)
    y_ref = ref(x)
    y_tri = tri(x.to(device))
    assert y_tri.shape == (2, 9, 32)
    assert_close("layer", y_tri, y_ref, rtol_rel=1e-5)
    y_ref.square().sum().backward()
    y_tri.square().sum().backward()
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters(), strict=True):
        assert_close(f"d_{name}", p_tri.grad, p_ref.grad, rtol_rel=1e-5)
    stats = ref.load_stats()
    assert sum(stats["tokens_per_expert"]) == 18 * 2
    assert stats["max_load"] == max(stats["tokens_per_expert"]) and stats["mean_load"] == 9.0
    assert stats["max_over_mean"] == pytest.approx(stats["max_load"] / 9.0)


def test_moe_layer_update_bias_uses_and_resets_the_counts():
    moe = MoE(16, 8, 4, 1, n_shared=0, bias_update_rate=0.1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3] = 1.0  # expert 3 wins for tokens with a positive coordinate sum
    x = torch.ones(10, 16)
    moe(x)
    assert moe.load_stats()["tokens_per_expert"] == [0, 0, 0, 10]
    consumed = moe.update_bias()
    assert consumed["tokens_per_expert"] == [0, 0, 0, 10]
    assert_close("bias", moe.expert_bias, torch.tensor([0.1, 0.1, 0.1, -0.1]), rtol_rel=1e-6)
    assert moe.tokens_per_expert.sum() == 0
    assert moe.load_stats()["tokens_per_expert"] == [0, 0, 0, 10]  # the consumed step, until new tokens come
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0  # no counting outside training
    moe.train()
    moe.update_bias()
    assert_close("bias", moe.expert_bias, torch.tensor([0.1, 0.1, 0.1, -0.1]), rtol_rel=1e-6)  # no tokens: no move


def test_moe_layer_keeps_the_bias_in_fp32_and_in_the_state_dict():
    moe = MoE(8, 8, 4, 2).to(torch.bfloat16)
    assert moe.w_gate.dtype == torch.bfloat16 and moe.expert_bias.dtype == torch.float32
    assert "expert_bias" in moe.state_dict() and "tokens_per_expert" not in moe.state_dict()
    assert moe.w_gate.shape == (4, 8, 8) and moe.w_down.shape == (4, 8, 8) and moe.shared_gate.weight.shape == (8, 8)
    y = moe(randn(3, 8, seed=71, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_moe_layer_group_limited_routing_runs():
    moe = MoE(16, 8, 8, 2, n_groups=4, topk_groups=2)
    moe(randn(30, 16, seed=72))
    used = {e for e, c in enumerate(moe.load_stats()["tokens_per_expert"]) if c}
    assert used


# --- bad input -----------------------------------------------------------------------------------------------
def test_bad_router_input_is_rejected_with_clear_errors():
    x, rw, b = randn(4, 8, seed=80), randn(6, 8, seed=81), torch.zeros(6)
    with pytest.raises(ValueError, match=r"top_k: expected at most 6 .*got 7"):
        route(x, rw, b, 7)
    with pytest.raises(ValueError, match=r"n_groups: expected a divisor of the number of experts 6, got 4"):
        route(x, rw, b, 2, n_groups=4)
    with pytest.raises(ValueError, match=r"top_k: expected at most 3 .*got 4"):
        route(x, rw, b, 4, n_groups=2, topk_groups=1)
    with pytest.raises(ValueError, match=r"router_weight: expected shape \(\*, 8\), got \(6, 7\)"):
        route(x, randn(6, 7, seed=82), b, 2)
    with pytest.raises(ValueError, match=r"expert_bias: expected shape \(6\), got \(5,\)"):
        route(x, rw, torch.zeros(5), 2)
    with pytest.raises(TypeError, match=r"top_k: expected a positive int"):
        route(x, rw, b, 2.0)
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions"):
        route(x[None], rw, b, 2)


def test_mismatched_expert_shapes_are_rejected():
    x, rw, b = randn(4, 8, seed=83), randn(3, 8, seed=84), torch.zeros(3)
    w_gate, w_up, w_down = _experts(3, 8, 12, seed=85, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w_up: expected shape \(3, 12, 8\), got \(3, 10, 8\)"):
        moe_forward(x, rw, b, w_gate, w_up[:, :10], w_down, 2)
    with pytest.raises(ValueError, match=r"w_down: expected shape \(3, 8, 12\), got \(3, 12, 8\)"):
        moe_forward_triton(x, rw, b, w_gate, w_up, w_down.transpose(1, 2), 2)
    with pytest.raises(ValueError, match=r"w_gate: expected shape \(3, \*, 8\), got \(2, 12, 8\)"):
        moe_forward(x, rw, b, w_gate[:2], w_up, w_down, 2)
    with pytest.raises(TypeError, match=r"w_up: expected dtype in \(float32\), got float64"):
        routed_experts_triton(x, torch.zeros(4, 1, dtype=torch.int64), torch.ones(4, 1), w_gate, w_up.double(), w_down)


def test_bad_permute_and_kernel_input_is_rejected(device):
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\), got 4"):
        permute(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"block_m: expected a power of two >= 16, got 24"):
        permute(torch.tensor([[0, 1]]), 4, block_m=24)
    with pytest.raises(TypeError, match=r"topk_idx: expected dtype in \(int64, int32\), got float32"):
        permute(torch.zeros(2, 2), 4)
    perm = permute(torch.tensor([[0, 1], [1, 2]], device=device), 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, \*\), got \(3, 8\)"):
        grouped_swiglu(
            torch.zeros(3, 8, device=device),
            perm,
            torch.zeros(4, 8, 8, device=device),
            torch.zeros(4, 8, 8, device=device),
        )
    with pytest.raises(ValueError, match=r"weight: expected shape \(4, \*, 8\), got \(3, 8, 8\)"):
        grouped_matmul(torch.zeros(perm.n_rows, 8, device=device), perm, torch.zeros(3, 8, 8, device=device))
    with pytest.raises(TypeError, match=r"perm: expected a Permutation"):
        unpermute_combine(torch.zeros(perm.n_rows, 8, device=device), "perm")


def test_bad_layer_config_is_rejected():
    with pytest.raises(ValueError, match=r"backend: expected one of \['reference', 'triton'\], got 'cuda'"):
        MoE(8, 8, 4, 2, backend="cuda")
    with pytest.raises(ValueError, match=r"top_k: expected at most 4 .*got 5"):
        MoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match=r"n_groups: expected a divisor of n_experts=6, got 4"):
        MoE(8, 8, 6, 2, n_groups=4)
    with pytest.raises(ValueError, match=r"bias_update_rate: expected a non-negative float, got -0.1"):
        MoE(8, 8, 4, 2, bias_update_rate=-0.1)
    with pytest.raises(ValueError, match=r"x: expected a last dimension of d_model=8, got shape \(3, 7\)"):
        MoE(8, 8, 4, 2)(torch.zeros(3, 7))


# --- GPU: compiled kernels, bf16, skewed routing, large and odd shapes -------------------------------------
def _skewed_routing(n_tokens, top_k, n_experts, seed, device):
    """Random distinct experts per token, but expert 0 is one of them for half the tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(n_tokens):
        if t % 2 == 0:
            rest = 1 + torch.randperm(n_experts - 1, generator=gen)[: top_k - 1]
            rows.append(torch.cat([torch.zeros(1, dtype=torch.int64), rest]))
        else:
            rows.append(torch.randperm(n_experts, generator=gen)[:top_k])
    idx = torch.stack(rows).sort(1).values
    weight = torch.rand(n_tokens, top_k, generator=gen) + 0.1
    return idx.to(device), weight.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n_experts", "d_model", "d_ff", "n_tokens", "top_k"),
    [(8, 512, 384, 999, 2), (64, 2048, 1024, 1537, 8), (64, 512, 256, 300, 6), (8, 2048, 1024, 4096, 2)],
)
def test_gpu_bf16_skewed_routing_matches_fp32_reference(n_experts, d_model, d_ff, n_tokens, top_k):
    idx, weight = _skewed_routing(n_tokens, top_k, n_experts, seed=90, device="cuda")
    assert int((idx == 0).sum()) >= n_tokens // 2
    x = randn(n_tokens, d_model, seed=91, device="cuda", dtype=torch.bfloat16)
    experts = [w.bfloat16() for w in _experts(n_experts, d_model, d_ff, seed=92, dtype=torch.float32, device="cuda")]
    ours = [t.clone().requires_grad_() for t in (x, weight, *experts)]
    ref = [t.float().clone().requires_grad_() for t in (x, weight, *experts)]  # same bf16 values, fp32 math
    dy = randn(n_tokens, d_model, seed=93, device="cuda")
    y = routed_experts_triton(ours[0], idx, *ours[1:])
    y.backward(dy.bfloat16())
    y_ref = routed_experts(ref[0], idx, *ref[1:])
    y_ref.backward(dy)
    assert y.dtype == torch.bfloat16
    assert_close("y", y, y_ref, rtol_rel=1e-2)
    names = ("dx", "d_topk_weight", "d_w_gate", "d_w_up", "d_w_down")
    limits = (1e-2, 2e-2, 1e-2, 1e-2, 1e-2)  # routing weights are gates: handbook §4 allows 2e-2 for them
    for name, limit, a, b in zip(names, limits, ours, ref, strict=True):
        assert_close(name, a.grad, b.grad, rtol_rel=limit)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128])
def test_gpu_fp32_compiled_matches_fp64_reference(block_m):
    n_tokens, d_model, d_ff, n_experts, top_k = 333, 96, 80, 7, 3  # dims not multiples of any tile
    idx, weight = _routing_with_empty_expert(n_tokens, top_k, n_experts, seed=94, device="cuda")
    inputs64 = [
        randn(n_tokens, d_model, seed=95, dtype=torch.float64),
        weight.cpu(),
        *_experts(n_experts, d_model, d_ff, seed=96),
    ]
    ref_in = [t.clone().requires_grad_() for t in inputs64]
    our_in = [t.to("cuda", torch.float32).requires_grad_() for t in inputs64]
    perm = permute(idx, n_experts, block_m=block_m)
    dy = randn(n_tokens, d_model, seed=97, dtype=torch.float64)
    y = routed_experts_triton(our_in[0], idx, *our_in[1:], perm=perm)
    y.backward(dy.cuda().float())
    y_ref = routed_experts(ref_in[0], idx.cpu(), *ref_in[1:])
    y_ref.backward(dy)
    assert_close("y", y, y_ref, rtol_rel=1e-5)
    for name, a, b in zip(("dx", "d_topk_weight", "d_w_gate", "d_w_up", "d_w_down"), our_in, ref_in, strict=True):
        assert_close(name, a.grad, b.grad, rtol_rel=1e-5)


@pytest.mark.gpu
def test_gpu_moe_layer_bf16_triton_matches_reference_backend():
    torch.manual_seed(1)
    tri = MoE(512, 256, 64, 6, n_shared=1, routed_scaling_factor=2.446, backend="triton").cuda().to(torch.bfloat16)
    ref = MoE(512, 256, 64, 6, n_shared=1, routed_scaling_factor=2.446).cuda()
    ref.load_state_dict({k: v.float() for k, v in tri.state_dict().items()})  # the same bf16 values, fp32 math
    x = randn(4, 250, 512, seed=98, device="cuda", dtype=torch.bfloat16)
    y = tri(x)
    y_ref = ref(x.float())
    assert y.dtype == torch.bfloat16
    assert_close("layer bf16", y, y_ref, rtol_rel=1e-2)
    assert tri.load_stats()["tokens_per_expert"] == ref.load_stats()["tokens_per_expert"]
    y.float().square().mean().backward()
    y_ref.square().mean().backward()
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters(), strict=True):
        assert_close(f"d_{name}", p_tri.grad, p_ref.grad, rtol_rel=2e-2)


def test_routed_experts_triton_backward_with_no_tokens(device):
    """Zero tokens: no row tile exists, the backward kernels never run, and every gradient is zero-sized or zero."""
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    idx = torch.zeros(0, 1, dtype=torch.int64, device=device)
    weight = torch.zeros(0, 1, device=device, requires_grad=True)
    experts = [
        randn(*s, seed=i, device=device, requires_grad=True) for i, s in enumerate([(1, 8, 16), (1, 8, 16), (1, 16, 8)])
    ]
    y = routed_experts_triton(x, idx, weight, *experts)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and weight.grad.shape == (0, 1)
    for w in experts:
        assert w.grad is None or not bool(w.grad.any())

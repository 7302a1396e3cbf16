"""Checks for the chapter 05 exercises: ``python -m nanokimi.grade 05_moe_k2 [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter's reference (``nanokimi.moe``). A failure raises
AssertionError naming the case, the element and the size of the error.
"""

from __future__ import annotations

import torch

from nanokimi.grade import call_attempt as _call
from nanokimi.moe import grouped_matmul, permute, route, routed_experts, unpermute_combine, update_expert_bias
from nanokimi.testing import assert_close, check_attempt_like, kernel_device, poisoned_empty, randn


def _assert_equal(name: str, got: object, want: torch.Tensor) -> None:
    """Exact equality of integer maps: shape, dtype, then the first mismatching position."""
    check_attempt_like(name, got, want)
    got, want = got.cpu(), want.cpu()
    wrong = got != want
    if bool(wrong.any()):
        first = tuple(int(i) for i in wrong.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(wrong.sum())} of {want.numel()} entries differ; first at {first}: "
            f"got {got[first].item()}, expected {want[first].item()}"
        )


def _router_inputs(n_tokens, d_model, n_experts, seed, dtype=torch.float64, bias_scale=0.3):
    x = randn(n_tokens, d_model, seed=seed, dtype=dtype)
    router_weight = randn(n_experts, d_model, seed=seed + 1, dtype=dtype)
    bias = bias_scale * randn(n_experts, seed=seed + 2, dtype=torch.float32)
    return x, router_weight, bias


def _check_routing(
    case: str, got: object, want: tuple[torch.Tensor, torch.Tensor], rtol: float, inputs: tuple[torch.Tensor, ...]
) -> None:
    """Compare ``(topk_idx, topk_weight)`` with the reference's; ``inputs = (x, router_weight, expert_bias)``."""
    if not (isinstance(got, tuple) and len(got) == 2):
        raise AssertionError(f"[{case}] expected a tuple (topk_idx, topk_weight), got {type(got).__name__}")
    idx, weight = got
    want_idx, want_weight = want
    if isinstance(idx, torch.Tensor) and idx.shape == want_idx.shape and not torch.equal(idx.cpu(), want_idx):
        t = int((idx.cpu() != want_idx).any(1).nonzero()[0])
        raise AssertionError(
            f"[{case}] topk_idx of token {t}: got {idx[t].tolist()}, expected {want_idx[t].tolist()} "
            "(top-k of sigmoid score + bias, ties to the lower id, sorted ascending)"
        )
    _assert_equal(f"topk_idx [{case}]", idx, want_idx)
    if not isinstance(weight, torch.Tensor) or weight.dtype != want_weight.dtype:
        got_dtype = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise AssertionError(f"[{case}] topk_weight: dtype {got_dtype}, expected {want_weight.dtype} (the score dtype)")
    try:
        assert_close(f"topk_weight [{case}]", weight, want_weight, rtol_rel=rtol)
    except AssertionError:
        x, router_weight, expert_bias = inputs
        biased = torch.sigmoid(x.double() @ router_weight.double().T) + expert_bias.double()  # [N, E]
        chosen = biased.gather(1, want_idx)
        from_biased = chosen / chosen.sum(-1, keepdim=True) * want_weight.double().sum(-1, keepdim=True)
        if weight.shape == want_weight.shape and torch.allclose(weight.double(), from_biased, rtol=1e-3, atol=1e-4):
            raise AssertionError(
                f"[{case}] topk_weight renormalises the *biased* scores s + b (the vLLM/transformers bug): "
                "the bias only chooses the experts; weight them by the unbiased s"
            ) from None
        raise


# --- exercise 1 ------------------------------------------------------------------------------------------------
def check_ex1_sigmoid_router(m) -> None:
    cases = [  # (case, N, D, E, k, c, dtype, rtol)
        ("fp64 N=50 E=8 k=2 c=2.5", 50, 16, 8, 2, 2.5, torch.float64, 1e-12),
        ("fp32 N=40 E=16 k=6 c=2.827", 40, 8, 16, 6, 2.827, torch.float32, 1e-6),
        ("fp64 N=1 E=5 k=5 (top_k = E)", 1, 4, 5, 5, 1.0, torch.float64, 1e-12),
    ]
    for i, (case, n, d, e, k, c, dtype, rtol) in enumerate(cases):
        x, w, b = _router_inputs(n, d, e, seed=10 * i, dtype=dtype)
        _check_routing(case, _call(m.sigmoid_route, x, w, b, k, c), route(x, w, b, k, c), rtol, (x, w, b))

    # A large bias changes the choice but must not reach the weights.
    x, w, _ = _router_inputs(64, 16, 8, seed=40)
    bias = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, -3.0])
    got = _call(m.sigmoid_route, x, w, bias, 2, 1.0)
    _check_routing("large bias [3, 0, ..., 0, −3]", got, route(x, w, bias, 2, 1.0), 1e-12, (x, w, bias))

    # Ties: six identical experts. Every score ties, so the lower ids win; output sorted ascending.
    x = randn(5, 4, seed=41)
    tied = randn(1, 4, seed=42).repeat(6, 1)
    got = _call(m.sigmoid_route, x, tied, torch.zeros(6), 3, 1.0)
    _check_routing(
        "six tied experts, k=3", got, route(x, tied, torch.zeros(6), 3, 1.0), 1e-6, (x, tied, torch.zeros(6))
    )
    bias = torch.tensor([0.0, 0, 0, 0, 0, 1.0])
    got = _call(m.sigmoid_route, x, tied, bias, 3, 1.0)
    _check_routing(
        "tied experts, expert 5 favoured by its bias", got, route(x, tied, bias, 3, 1.0), 1e-6, (x, tied, bias)
    )

    # bf16 tokens still get fp32 scores and weights.
    x, w, b = _router_inputs(12, 8, 4, seed=43, dtype=torch.float32)
    x16, w16 = x.bfloat16(), w.bfloat16()
    got = _call(m.sigmoid_route, x16, w16, b, 2, 1.0)
    _check_routing("bf16 tokens (fp32 scores)", got, route(x16, w16, b, 2), 1e-6, (x16, w16, b))


# --- exercise 2 ------------------------------------------------------------------------------------------------
def _naive_group_limit(selection: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Token by token, with Python sorts keyed by (−score, group id)."""
    n_tokens, n_experts = selection.shape
    per_group = n_experts // n_groups
    out = torch.full_like(selection, float("-inf"))
    for t in range(n_tokens):
        row = selection[t].tolist()
        score = [sum(sorted(row[g * per_group : (g + 1) * per_group], reverse=True)[:2]) for g in range(n_groups)]
        for g in sorted(range(n_groups), key=lambda g: (-score[g], g))[:topk_groups]:
            out[t, g * per_group : (g + 1) * per_group] = selection[t, g * per_group : (g + 1) * per_group]
    return out


def check_ex2_group_limited(m) -> None:
    for case, n, e, g, kg, seed in [
        ("N=30 E=16 G=4 keep 2", 30, 16, 4, 2, 0),
        ("N=20 E=12 G=3 keep 1", 20, 12, 3, 1, 1),
        ("groups of one expert: E=6 G=6 keep 3", 20, 6, 6, 3, 2),
        ("one group: E=8 G=1 keep 1", 5, 8, 1, 1, 3),
    ]:
        selection = randn(n, e, seed=seed, dtype=torch.float64)
        got = _call(m.limit_to_groups, selection.clone(), g, kg)
        assert_close(f"limit_to_groups [{case}]", got, _naive_group_limit(selection, g, kg), rtol_rel=1e-12)
    ties = torch.full((1, 8), 0.5, dtype=torch.float64)  # four groups of two, all scores equal
    want = torch.where(torch.arange(8) < 4, 0.5, float("-inf")).to(torch.float64)[None]
    got = _call(m.limit_to_groups, ties, 4, 2)
    assert_close("limit_to_groups [four tied groups, keep 2: groups 0 and 1 win]", got, want, rtol_rel=0.0)

    for i, (case, n, e, k, g, kg) in enumerate(
        [
            ("N=50 E=16 k=4 G=4 keep 2", 50, 16, 4, 4, 2),
            ("N=50 E=12 k=3 G=3 keep 1", 50, 12, 3, 3, 1),
            ("DeepSeek-V3 shape: E=64 k=8 G=8 keep 4", 40, 64, 8, 8, 4),
            ("no groups: E=8 k=2 G=1", 30, 8, 2, 1, 1),
            ("N=1, top_k fills the kept groups: E=8 k=4 G=4 keep 2", 1, 8, 4, 4, 2),
        ]
    ):
        x, w, b = _router_inputs(n, 16, e, seed=20 + 3 * i)
        got = _call(m.group_limited_route, x, w, b, k, 2.5, g, kg)
        _check_routing(case, got, route(x, w, b, k, 2.5, g, kg), 1e-12, (x, w, b))

    # The kept group's biased scores are all negative: a 0 mask (not −inf) would let experts 2, 3 win.
    x, w, _ = _router_inputs(20, 8, 4, seed=50)
    bias = torch.tensor([-5.0, -5.0, -6.0, -6.0])
    got = _call(m.group_limited_route, x, w, bias, 2, 1.0, 2, 1)
    want = route(x, w, bias, 2, 1.0, 2, 1)
    _check_routing("negative biased scores in the kept group (mask with −inf)", got, want, 1e-12, (x, w, bias))


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _balancing_setup(n_batches: int):
    """16 experts, top-2, a router biased toward three experts that share a direction, data shifted toward them."""
    n_experts, d = 16, 32
    router_weight = randn(n_experts, d, seed=15) / d**0.5
    router_weight[:3] += randn(d, seed=16) / d**0.5
    direction = router_weight[0] / router_weight[0].norm()
    batches = randn(n_batches, 2048, d, seed=17) + 0.5 * direction
    return router_weight, batches


def check_ex3_bias_balancing(m) -> None:
    gen = torch.Generator().manual_seed(0)
    for case, bias, counts, rate in [
        (
            "fp32 bias, random int64 counts",
            torch.randn(12, generator=gen),
            torch.randint(0, 50, (12,), generator=gen),
            1e-3,
        ),
        (
            "fp64 bias, float counts",
            torch.randn(7, generator=gen, dtype=torch.float64),
            torch.rand(7, generator=gen) * 9,
            0.01,
        ),
        ("counts at the mean move nothing", torch.zeros(4), torch.tensor([10, 2, 6, 6]), 0.5),
        ("all equal counts", torch.ones(5), torch.full((5,), 3), 0.1),
        ("rate 0 freezes the bias", torch.randn(6, generator=gen), torch.arange(6), 0.0),
    ]:
        got = _call(m.aux_free_update, bias.clone(), counts, rate)
        want = update_expert_bias(bias, counts, rate)
        if not isinstance(got, torch.Tensor) or got.dtype != bias.dtype:
            raise AssertionError(f"aux_free_update [{case}]: expected a tensor of the bias dtype {bias.dtype}")
        assert_close(f"aux_free_update [{case}]", got, want, rtol_rel=1e-7, atol=1e-7)

        load = counts.double()
        direction = torch.sign(load.mean() - load)
        want = bias + (rate * (direction - direction.mean())).to(bias.dtype)
        got = _call(m.zero_mean_update, bias.clone(), counts, rate)
        if not isinstance(got, torch.Tensor) or got.dtype != bias.dtype:
            raise AssertionError(f"zero_mean_update [{case}]: expected a tensor of the bias dtype {bias.dtype}")
        assert_close(f"zero_mean_update [{case}]", got, want, rtol_rel=1e-7, atol=1e-7)
        step_sum = float((got.double() - bias.double()).sum())
        if abs(step_sum) > 1e-6:
            raise AssertionError(f"zero_mean_update [{case}]: the steps sum to {step_sum:.3g}, expected 0")

    router_weight, batches = _balancing_setup(150)
    for zero_mean in (False, True):
        name = "balance(zero_mean=True)" if zero_mean else "balance(zero_mean=False)"
        # The first three steps, against the same loop on the chapter's reference.
        bias = torch.zeros(16)
        want_history = []
        for x in batches[:3]:
            idx, _ = route(x, router_weight, bias, 2)
            load = torch.bincount(idx.flatten(), minlength=16)
            want_history.append(float(load.max() / load.double().mean()))
            direction = torch.sign(load.double().mean() - load.double())
            step = direction - direction.mean() if zero_mean else direction
            bias = bias + (1e-3 * step).to(bias.dtype)
        got_bias, got_history = _call(m.balance, router_weight, batches[:3], 2, 1e-3, zero_mean=zero_mean)
        assert_close(
            f"{name} max/mean history, first 3 batches", torch.tensor(got_history), torch.tensor(want_history), 1e-6
        )
        assert_close(f"{name} bias after 3 batches", got_bias, bias, rtol_rel=1e-6, atol=1e-7)

        got_bias, history = _call(m.balance, router_weight, batches, 2, 1e-3, zero_mean=zero_mean)
        if len(history) != len(batches):
            raise AssertionError(f"{name}: history has {len(history)} entries, expected one per batch ({len(batches)})")
        if not history[0] > 2.0:
            raise AssertionError(f"{name}: first max/mean load {history[0]:.3f}, expected > 2 (the unbiased router)")
        if not max(history[-20:]) < 1.2:
            raise AssertionError(
                f"{name}: max/mean load over the last 20 of {len(batches)} batches reached {max(history[-20:]):.3f}, "
                "expected < 1.2 (do overloaded experts lose bias?)"
            )
        drift = float(got_bias.double().mean())
        if zero_mean and abs(drift) > 1e-6:
            raise AssertionError(f"{name}: mean bias drifted to {drift:.3g}, expected 0 (the steps must sum to 0)")
        if not zero_mean and drift < 1e-3:
            raise AssertionError(
                f"{name}: mean bias {drift:.3g}; with 3 overloaded experts of 16 it should drift up by several γ"
            )


# --- exercise 4 ------------------------------------------------------------------------------------------------
_PERM_FIELDS = (
    "tokens_per_expert",
    "expert_tile_start",
    "tile_expert",
    "slot_row",
    "row_token",
    "row_slot",
    "expert_order",
)


def _routing(n_tokens: int, top_k: int, n_experts: int, seed: int, experts: list[int] | None = None) -> torch.Tensor:
    """Distinct experts per token, drawn from ``experts`` (default: all)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else list(range(n_experts)))
    rows = [pool[torch.randperm(len(pool), generator=gen)[:top_k]] for _ in range(n_tokens)]
    return torch.stack(rows).to(kernel_device())


def check_ex4_triton_permute(m) -> None:
    dev = kernel_device()
    cases = [  # (case, topk_idx, E, block_m)
        ("known example, expert 0 empty", torch.tensor([[2, 3], [1, 2], [1, 3], [2, 3]], device=dev), 4, 16),
        ("one token, one expert", torch.zeros(1, 1, dtype=torch.int64, device=dev), 1, 16),
        ("N=37 k=2 E=4", _routing(37, 2, 4, seed=1), 4, 16),
        ("N=100 k=3 E=7 block_m=32 (several slot blocks)", _routing(100, 3, 7, seed=2), 7, 32),
        ("N=60 k=2 E=6, experts 4 and 5 empty", _routing(60, 2, 6, seed=3, experts=[0, 1, 2, 3]), 6, 16),
        ("no padding: 32 tokens each to experts 0 and 1", torch.tensor([[0, 1]] * 32, device=dev), 2, 16),
        ("int32 ids, N=25 k=4 E=9", _routing(25, 4, 9, seed=4).to(torch.int32), 9, 16),
    ]
    for case, topk_idx, n_experts, block_m in cases:
        want = permute(topk_idx, n_experts, block_m)
        with poisoned_empty():
            got = _call(m.permute_triton, topk_idx, n_experts, block_m)
        for field in ("n_experts", "top_k", "block_m"):
            if getattr(got, field, None) != getattr(want, field):
                raise AssertionError(
                    f"[{case}] {field}: got {getattr(got, field, None)!r}, expected {getattr(want, field)}"
                )
        for field in _PERM_FIELDS:
            _assert_equal(f"{field} [{case}]", getattr(got, field, None), getattr(want, field))


# --- exercise 5 ------------------------------------------------------------------------------------------------
def _experts(n_experts: int, d_model: int, d_ff: int, seed: int):
    w_gate = randn(n_experts, d_ff, d_model, seed=seed, dtype=torch.float64) / d_model**0.5
    w_up = randn(n_experts, d_ff, d_model, seed=seed + 1, dtype=torch.float64) / d_model**0.5
    w_down = randn(n_experts, d_model, d_ff, seed=seed + 2, dtype=torch.float64) / d_ff**0.5
    return w_gate, w_up, w_down


def check_ex5_grouped_swiglu(m) -> None:
    dev = kernel_device()
    cases = [  # (case, N, k, E, D, F, block_m, experts to route to)
        ("N=37 k=2 E=4 D=32 F=48, expert 2 empty", 37, 2, 4, 32, 48, 16, [0, 1, 3]),
        ("N=1 k=1 E=4 D=16 F=16", 1, 1, 4, 16, 16, 16, None),
        ("N=20 k=4 E=5 D=40 F=24 (tails in D and F)", 20, 4, 5, 40, 24, 16, None),
        ("N=30 k=2 E=3 D=24 F=40 block_m=32", 30, 2, 3, 24, 40, 32, None),
    ]
    for i, (case, n, k, e, d, f, block_m, experts) in enumerate(cases):
        topk_idx = _routing(n, k, e, seed=60 + i, experts=experts).sort(1).values
        perm = permute(topk_idx, e, block_m)
        x64 = randn(n, d, seed=70 + i, dtype=torch.float64)
        w_gate, w_up, w_down = _experts(e, d, f, seed=80 + 3 * i)
        x, w_gate32, w_up32 = (t.to(dev, torch.float32) for t in (x64, w_gate, w_up))
        with poisoned_empty():
            act = _call(m.grouped_swiglu, x, perm, w_gate32, w_up32)
        if not isinstance(act, torch.Tensor) or tuple(act.shape) != (perm.n_rows, f):
            got = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise AssertionError(f"[{case}] act: got {got}, expected a tensor of shape {(perm.n_rows, f)} ([R, F])")
        row_token = perm.row_token.long().cpu()
        tile_expert = perm.tile_expert.long().cpu()
        for expert in range(e):
            rows = ((row_token >= 0) & (tile_expert[torch.arange(perm.n_rows) // block_m] == expert)).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            xt = x64[row_token[rows]]  # [rows, D]
            want = torch.nn.functional.silu(xt @ w_gate[expert].T) * (xt @ w_up[expert].T)
            assert_close(f"act rows of expert {expert} [{case}] (index = row within the expert, column)",
                         act.cpu()[rows], want, rtol_rel=1e-5)  # fmt: skip
        # Your act drives the chapter's down projection and combine: the routed-expert output must match.
        weight = torch.rand(n, k, generator=torch.Generator().manual_seed(i), dtype=torch.float64) + 0.1
        y = unpermute_combine(grouped_matmul(act, perm, w_down.to(dev, torch.float32)), perm, weight.to(dev))
        want_y = routed_experts(x64, topk_idx.cpu(), weight, w_gate, w_up, w_down)
        assert_close(f"routed-expert output built on your act [{case}]", y, want_y, rtol_rel=1e-5)

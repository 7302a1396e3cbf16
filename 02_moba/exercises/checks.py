"""Checks for chapter 02's exercises: each ``check_exK_topic(module)`` runs the attempt on seeded random and
edge-case inputs (CPU; Triton under the interpreter at tiny shapes) and compares with ``nanokimi.moba.reference``.
A failure raises AssertionError naming the case, the element and the size of the error."""

from __future__ import annotations

import math
from types import ModuleType

import torch

from nanokimi.grade import call_attempt
from nanokimi.moba import reference
from nanokimi.testing import assert_close, rand, randn


def _case(name: str, fn, *args, **kwargs):
    """Run ``fn``; prefix any AssertionError with the case that produced it."""
    try:
        return fn(*args, **kwargs)
    except AssertionError as exc:
        raise AssertionError(f"case {name}: {exc}") from None


def _selected(mask: torch.Tensor, b: int, h: int, i: int) -> list[int]:
    """The block indices a gate selects for query (b, h, i)."""
    return [int(j) for j in mask[b, h, i].nonzero().flatten()]


def _check_shape_dtype(name: str, out: object, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    assert isinstance(out, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(out.shape)}"
    assert out.dtype == dtype, f"{name}: expected dtype {dtype}, got {out.dtype}"
    return out


def _qk(B: int, Tq: int, T: int, H: int, D: int, seed: int, dtype: torch.dtype = torch.float64):
    return randn(B, Tq, H, D, seed=seed, dtype=dtype), randn(B, T, H, D, seed=seed + 1, dtype=dtype)


def _true_block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each block by slicing, in fp64: ``[B, n_blocks, H, D]``."""
    T = k.shape[1]
    return torch.stack([k[:, s : s + block_size].double().mean(1) for s in range(0, T, block_size)], dim=1)


# --- exercise 1 --------------------------------------------------------------------------------------------
def check_ex1_block_scores(m: ModuleType) -> None:
    cases = [  # name, B, Tq, T, H, D, block_size
        ("T a multiple of the block (B=2, T=48, block 16)", 2, 48, 48, 2, 8, 16),
        ("partial last block (T=50, block 16: the last block has 2 tokens)", 1, 50, 50, 3, 8, 16),
        ("one partial block (T=5 < block 8)", 1, 5, 5, 1, 4, 8),
        ("block_size=1 (every key its own block)", 1, 7, 7, 2, 4, 1),
        ("fewer queries than keys (Tq=3, T=29, block 6)", 2, 3, 29, 2, 8, 6),
        ("single token", 1, 1, 1, 1, 4, 4),
    ]
    for i, (name, B, Tq, T, H, D, bs) in enumerate(cases):
        q, k = _qk(B, Tq, T, H, D, seed=10 * i)
        n_blocks = -(-T // bs)
        means = _check_shape_dtype(f"{name}: block_means", m.block_means(k, bs), (B, n_blocks, H, D), torch.float64)
        _case(name, assert_close, "block_means", means, _true_block_means(k, bs), 1e-12)
        scores = m.block_scores(q, k, bs)
        _check_shape_dtype(f"{name}: block_scores", scores, (B, H, Tq, n_blocks), torch.float64)
        _case(name, assert_close, "block_scores [B, H, Tq, n_blocks]", scores, reference.block_scores(q, k, bs), 1e-12)
    # Low-precision inputs are scored in fp32, like the chapter.
    for dtype in (torch.float32, torch.bfloat16):
        name = f"{dtype} inputs (T=37, block 8)"
        q, k = _qk(1, 37, 37, 2, 8, seed=77, dtype=dtype)
        scores = _check_shape_dtype(f"{name}: block_scores", m.block_scores(q, k, 8), (1, 2, 37, 5), torch.float32)
        _case(name, assert_close, "block_scores", scores, reference.block_scores(q, k, 8), 1e-6)


# --- exercise 2 --------------------------------------------------------------------------------------------
def _compare_gates(name: str, got: object, scores: torch.Tensor, topk: int, block_size: int, q_offset: int) -> None:
    expect = reference.select_blocks(scores, topk, block_size, q_offset=q_offset)
    _check_shape_dtype(f"case {name}: select_blocks", got, tuple(expect.shape), torch.bool)
    rows_differ = (got != expect).any(dim=-1)  # [B, H, Tq]
    if bool(rows_differ.any()):
        b, h, i = (int(x) for x in rows_differ.nonzero()[0])
        pos = q_offset + i
        shown = min(pos // block_size + 2, scores.shape[-1])  # the past blocks, the current one and the next
        row = ", ".join(f"{float(x):.4g}" for x in scores[b, h, i, :shown])
        raise AssertionError(
            f"case {name} (topk={topk}, block_size={block_size}, q_offset={q_offset}): {int(rows_differ.sum())} "
            f"of {rows_differ.numel()} queries differ; first at (b={b}, h={h}, i={i}), position {pos}, current "
            f"block {pos // block_size}: selected blocks {_selected(got, b, h, i)}, expected "
            f"{_selected(expect, b, h, i)}; scores of blocks 0..{shown - 1}: [{row}]"
        )


def check_ex2_block_gate(m: ModuleType) -> None:
    ties = torch.randint(0, 3, (2, 2, 64, 8), generator=torch.Generator().manual_seed(5)).float()
    adversarial = randn(1, 1, 40, 5, seed=6)
    current = torch.arange(40) // 8
    blocks = torch.arange(5)
    adversarial[..., blocks[None, :] > current[:, None]] = 100.0  # future blocks score highest: never picked
    adversarial[..., blocks[None, :] == current[:, None]] = -100.0  # own block scores lowest: always picked
    cases = [  # name, scores [B, H, Tq, n_blocks], topk, block_size, q_offset
        ("random (T=40, block 8, top-3)", randn(2, 2, 40, 5, seed=1), 3, 8, 0),
        ("continuation (10 queries at positions 45..54, 7 blocks)", randn(1, 2, 10, 7, seed=2), 3, 8, 45),
        ("ties (integer scores in {0, 1, 2}: ties go to the lower block)", ties, 4, 8, 0),
        ("topk=1 (own block only)", randn(1, 2, 40, 5, seed=3), 1, 8, 0),
        ("topk=10 > blocks (every past block)", randn(1, 1, 40, 5, seed=4), 10, 8, 0),
        ("block_size=1 (T=12, top-4)", randn(1, 2, 12, 12, seed=7), 4, 1, 0),
        ("future blocks +100, own block -100", adversarial, 3, 8, 0),
        ("single query (T=1)", randn(1, 1, 1, 1, seed=8), 3, 4, 0),
        (
            "fp64 scores, partial last block (T=21, block 4, top-2)",
            randn(2, 1, 21, 6, seed=9, dtype=torch.float64),
            2,
            4,
            0,
        ),
    ]
    for name, scores, topk, bs, q_offset in cases:
        got = m.select_blocks(scores.clone(), topk, bs, q_offset=q_offset)
        _compare_gates(name, got, scores, topk, bs, q_offset)


# --- exercise 3 --------------------------------------------------------------------------------------------
def _random_gate(B: int, H: int, Tq: int, T: int, block_size: int, seed: int) -> torch.Tensor:
    """A block mask with the gate's rules (own block selected, no future block), past blocks at random."""
    n_blocks = -(-T // block_size)
    current = (T - Tq + torch.arange(Tq)) // block_size
    blocks = torch.arange(n_blocks)
    coin = rand(B, H, Tq, n_blocks, seed=seed) < 0.4
    return (coin & (blocks[None, :] < current[:, None])) | (blocks[None, :] == current[:, None])


def _true_token_mask(block_mask: torch.Tensor, T: int, block_size: int) -> torch.Tensor:
    Tq = block_mask.shape[2]
    allowed = torch.zeros(*block_mask.shape[:2], Tq, T, dtype=torch.bool)
    for i in range(Tq):
        for s in range(T - Tq + i + 1):
            allowed[:, :, i, s] = block_mask[:, :, i, s // block_size]
    return allowed


def check_ex3_moba_attention(m: ModuleType) -> None:
    for name, B, H, Tq, T, bs in [
        ("T=23, block 5", 2, 2, 23, 23, 5),
        ("Tq=6 last queries of T=30, block 8", 1, 2, 6, 30, 8),
        ("single token", 1, 1, 1, 1, 4),
    ]:
        gate = _random_gate(B, H, Tq, T, bs, seed=len(name))
        got = _check_shape_dtype(f"{name}: token_mask", m.token_mask(gate, T, bs), (B, H, Tq, T), torch.bool)
        expect = _true_token_mask(gate, T, bs)
        if not torch.equal(got, expect):
            b, h, i, s = (int(x) for x in (got != expect).nonzero()[0])
            raise AssertionError(
                f"case {name}: token_mask[{b}, {h}, {i}, {s}] is {bool(got[b, h, i, s])}, expected "
                f"{bool(expect[b, h, i, s])} (query at position {T - Tq + i}, key {s} in block {s // bs}, "
                f"block selected: {bool(gate[b, h, i, s // bs])})"
            )
    cases = [  # name, B, Tq, T, H, D, block_size, topk, scale
        ("T=45, block 8, top-3", 2, 45, 45, 2, 8, 8, 3, None),
        ("Tq=13 last queries of T=50, block 8, top-2", 1, 13, 50, 2, 8, 8, 2, None),
        ("topk=1 (block-local), T=20, block 6", 1, 20, 20, 2, 4, 6, 1, None),
        ("topk·block ≥ T (dense causal), T=30, block 8, top-4", 1, 30, 30, 1, 8, 8, 4, None),
        ("scale=0.3, partial last block, T=27, block 4, top-3", 1, 27, 27, 3, 8, 4, 3, 0.3),
        ("single token", 1, 1, 1, 1, 4, 4, 2, None),
    ]
    for i, (name, B, Tq, T, H, D, bs, topk, scale) in enumerate(cases):
        q, k = _qk(B, Tq, T, H, D, seed=100 + 10 * i)
        v = randn(B, T, H, D, seed=105 + 10 * i, dtype=torch.float64)
        do = randn(B, Tq, H, D, seed=107 + 10 * i, dtype=torch.float64)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = m.moba_attention(*leaves, bs, topk, scale)
        _check_shape_dtype(f"{name}: moba_attention", out, (B, Tq, H, D), torch.float64)
        ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference.moba_attention(*ref_leaves, bs, topk, scale)
        _case(name, assert_close, "o [B, Tq, H, D]", out, ref, 1e-12)
        assert out.requires_grad, f"case {name}: the output carries no gradient (q, k, v require grad)"
        grads = torch.autograd.grad(out, leaves, do, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, ref_leaves, do)
        for g_name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            assert g is not None, f"case {name}: no gradient reaches {g_name} (is something detached?)"
            _case(name, assert_close, g_name, g, r, 1e-10)
    q, k = _qk(1, 19, 19, 2, 8, seed=300, dtype=torch.float32)
    v = randn(1, 19, 2, 8, seed=301)
    out = _check_shape_dtype(
        "fp32 inputs: moba_attention", m.moba_attention(q, k, v, 4, 3), (1, 19, 2, 8), torch.float32
    )
    _case("fp32 inputs", assert_close, "o", out, reference.moba_attention(q, k, v, 4, 3), 1e-5)


# --- exercise 4 --------------------------------------------------------------------------------------------
def _expected_tile_gate(scores: torch.Tensor, topk: int, block_size: int, tile: int) -> torch.Tensor:
    """Per-tile gate: every query gets its tile's mean score, then the per-query rules of the reference."""
    per_query = torch.empty_like(scores)
    for s in range(0, scores.shape[2], tile):
        per_query[:, :, s : s + tile] = scores[:, :, s : s + tile].mean(dim=2, keepdim=True)
    return reference.select_blocks(per_query, topk, block_size)


def _expected_visited(gate: torch.Tensor, tile: int) -> torch.Tensor:
    T = gate.shape[2]
    return torch.stack([gate[:, :, s : s + tile].any(dim=2).sum(-1) for s in range(0, T, tile)], dim=-1)


def check_ex4_tile_selection(m: ModuleType) -> None:
    ties = torch.randint(0, 3, (1, 2, 64, 4), generator=torch.Generator().manual_seed(11)).double()
    cases = [  # name, scores [B, H, T, n_blocks], topk, block_size, tile
        (
            "random (T=70, block 16, top-3, tile 8: the last tile has 6 queries)",
            randn(2, 2, 70, 5, seed=1, dtype=torch.float64),
            3,
            16,
            8,
        ),
        ("tile=1 (must equal the per-query gate)", randn(1, 2, 40, 5, seed=2, dtype=torch.float64), 3, 8, 1),
        ("tile = block (16), integer scores with ties", ties, 2, 16, 16),
        ("topk=9 > blocks", randn(1, 1, 48, 3, seed=3, dtype=torch.float64), 9, 16, 4),
        ("topk=1", randn(1, 1, 32, 4, seed=4, dtype=torch.float64), 1, 8, 8),
    ]
    for name, scores, topk, bs, tile in cases:
        got = m.select_blocks_per_tile(scores.clone(), topk, bs, tile)
        expect = _expected_tile_gate(scores, topk, bs, tile)
        _check_shape_dtype(f"case {name}: select_blocks_per_tile", got, tuple(expect.shape), torch.bool)
        rows_differ = (got != expect).any(dim=-1)
        if bool(rows_differ.any()):
            b, h, i = (int(x) for x in rows_differ.nonzero()[0])
            tile_mean = scores[b, h, i // tile * tile : (i // tile + 1) * tile].mean(0)
            raise AssertionError(
                f"case {name}: {int(rows_differ.sum())} queries differ; first at (b={b}, h={h}, i={i}) in tile "
                f"{i // tile}: selected blocks {_selected(got, b, h, i)}, expected {_selected(expect, b, h, i)} "
                f"(the tile's mean scores: {[round(float(x), 4) for x in tile_mean]})"
            )
    # Union counts on per-query gates, per-tile gates, and a last tile that is partial.
    q, k = _qk(1, 100, 100, 2, 8, seed=20, dtype=torch.float32)
    scores = reference.block_scores(q, k, 16)
    gates = [
        ("per-query gate (T=100, block 16, top-3, tile 16)", reference.select_blocks(scores, 3, 16), 16),
        ("per-query gate, tile 8 (the last tile has 4 queries)", reference.select_blocks(scores, 3, 16), 8),
        ("per-tile gate (tile 16)", _expected_tile_gate(scores, 3, 16, 16), 16),
        ("random mask (T=37, block 4, tile 5)", _random_gate(2, 1, 37, 37, 4, seed=21), 5),
    ]
    for name, gate, tile in gates:
        expect = _expected_visited(gate, tile)
        got = m.blocks_visited(gate.clone(), tile)
        assert isinstance(got, torch.Tensor), f"case {name}: blocks_visited returned {type(got).__name__}"
        assert tuple(got.shape) == tuple(expect.shape), (
            f"case {name}: blocks_visited shape {tuple(got.shape)}, expected {tuple(expect.shape)}"
        )
        assert not got.dtype.is_floating_point, f"case {name}: blocks_visited should count (integers), got {got.dtype}"
        if not torch.equal(got.long(), expect):
            b, h, t = (int(x) for x in (got.long() != expect).nonzero()[0])
            raise AssertionError(
                f"case {name}: tile {t} of (b={b}, h={h}) visits {int(got[b, h, t])} blocks, expected "
                f"{int(expect[b, h, t])} (queries {t * tile}..{min((t + 1) * tile, gate.shape[2]) - 1})"
            )


# --- exercise 5 --------------------------------------------------------------------------------------------
def check_ex5_triton_block_visit(m: ModuleType) -> None:
    import nanokimi  # noqa: F401  (sets TRITON_INTERPRET=1 on a machine without CUDA)
    from nanokimi.testing import kernel_device

    device = kernel_device()
    cases = [  # name, B, Tq, T, H, D, block_size, gate ("topk=K" or "random"), block_m
        ("single token", 1, 1, 1, 1, 16, 8, "topk=2", 16),
        ("T=45, block 8 (< BLOCK_N), top-3", 2, 45, 45, 2, 16, 8, "topk=3", 16),
        ("Tq=20 last queries of T=53, block 12 (partial chunks), D=32", 1, 20, 53, 2, 32, 12, "topk=3", 16),
        ("random mask, T=70, block 16, BLOCK_M=32", 1, 70, 70, 1, 16, 16, "random", 32),
        ("per-tile gate, T=64, block 16, top-2", 1, 64, 64, 2, 16, 16, "tile", 16),
    ]
    for i, (name, B, Tq, T, H, D, bs, kind, block_m) in enumerate(cases):
        q, k = _qk(B, Tq, T, H, D, seed=500 + 10 * i)
        v = randn(B, T, H, D, seed=505 + 10 * i, dtype=torch.float64)
        if kind == "random":
            gate = _random_gate(B, H, Tq, T, bs, seed=509 + i)
        elif kind == "tile":
            gate = _expected_tile_gate(reference.block_scores(q, k, bs), 2, bs, block_m)
        else:
            gate = reference.select_blocks(reference.block_scores(q, k, bs), int(kind[5:]), bs, q_offset=T - Tq)
        args = [x.to(device, torch.float32) for x in (q, k, v)]
        result = call_attempt(m.block_visit_attention, *args, gate.to(device), bs, block_m=block_m)
        assert isinstance(result, tuple) and len(result) == 2, f"case {name}: expected (o, visited), got {result!r}"
        out, visited = result
        _check_shape_dtype(f"case {name}: o", out, (B, Tq, H, D), torch.float32)
        ref = reference.block_mask_attention(q, k, v, gate, bs)
        _case(name, assert_close, "o [B, Tq, H, D] vs fp64 reference", out, ref, 1e-5)
        n_tiles = math.ceil(Tq / block_m)
        expect = _expected_visited(gate, block_m)
        _check_shape_dtype(f"case {name}: visited", visited, (B, H, n_tiles), torch.int32)
        if not torch.equal(visited.cpu().long(), expect):
            b, h, t = (int(x) for x in (visited.cpu().long() != expect).nonzero()[0])
            raise AssertionError(
                f"case {name}: program (tile {t}, b={b}, h={h}) visited {int(visited[b, h, t])} blocks, expected "
                f"{int(expect[b, h, t])}: the blocks selected by at least one of its rows"
            )

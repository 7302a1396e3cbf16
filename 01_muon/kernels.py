"""Symmetric Newton–Schulz in Triton: half the work of two of the three matmuls, epilogues fused, batched.

One Newton–Schulz step on ``X ∈ R^{r×k}`` (r ≤ k, the short side first; see ``reference.newton_schulz``)::

    A = X Xᵀ                  (1) symmetric: only tiles on or above the diagonal are computed, then mirrored
    B = b·A + c·A·A           (2) A is symmetric, so A·A = A·Aᵀ is kernel (1) run on A, with b·A fused in
    X ← a·X + B·X             (3) a plain tiled matmul whose epilogue adds a·X

Full products cost ``4r²k + 2r³`` FLOPs per step, the symmetric ones ``3r²k + r³``: at most
``(4e + 2)/(3e + 1)`` times faster (e = k/r; 1.5× for a square matrix). The elementwise parts (``b·A``,
``a·X``) cost no extra pass over memory because they are added to the accumulator before the store.

Tiling. ``_gram_kernel``: one program owns one ``BLOCK_M×BLOCK_N`` tile ``(i, j)`` of ``C = α·X Xᵀ + β·Y`` of one
matrix of the batch (grid axis 1). Only the tiles of each group of ``GROUP_M`` row tiles from the first column
that reaches the diagonal onwards are launched (``_triangle_tile``); the few of those wholly below the diagonal
return at once. A program accumulates ``Σ_k X[rows, k]·X[cols, k]`` in fp32 over ``BLOCK_K`` slices, applies
the epilogue, stores the elements with ``col ≥ row`` at ``C[row, col]`` and those with ``col > row`` also at
``C[col, row]`` (the transposed tile). Each element of the output is therefore written exactly once from one
accumulator, and ``C`` is bit-for-bit symmetric, which kernel (2) relies on when it treats ``A`` as ``Aᵀ``.
``_poly_kernel``: one program owns a ``BLOCK_M×BLOCK_N`` tile of ``a·X + B·X``. Both order tiles in groups
(``GROUP_M`` row tiles sweep the columns together) so that programs running at the same time share operand
tiles in L2.

Two paths, one schedule per kernel. The launchers pick, per call (``tma=None``):

* the **tensor-descriptor (TMA) kernels** ``_gram_tma_kernel`` / ``_poly_tma_kernel`` when compiled, the
  operands allow it (rows divisible by 128, rows contiguous and 16-byte aligned, the batch stacked so that
  ``[batch, M, ·]`` reads as one ``[batch·M, ·]`` tensor) **and the step's Gram list fills at least two waves**:
  ``batch·T(T + 1)/2 ≥ 2·SMs`` with ``T = M/128``, M the short side r for all three kernels of a step, so a
  step runs on one path (``_tma_fills_waves``). They are *persistent*: one program per SM, and program
  ``p`` takes tiles ``p, p + P, p + 2P, …`` of the list of tiles. The Gram list holds exactly the ``T(T + 1)/2``
  tiles on or above the diagonal (T = M/128), numbered column by column (tile ``t = col·(col + 1)/2 + row``, the
  inverse found with one square root), so no program is spent on a tile below the diagonal, and tiles that run
  together share their column block of X in L2. Operand tiles arrive by the copy engine (TMA), which also
  zero-fills the ragged K edge, so the main loop has no address arithmetic and no masks; off-diagonal tiles are
  stored twice (the tile and its transpose), diagonal tiles once after ``where(col ≥ row, C, Cᵀ)``, so C stays
  bit-for-bit symmetric. Measured on the H100 at 4096² (bf16): the Gram kernel 0.119 ms against 0.182 ms for the
  pointer kernel (528 tiles of 128×128×4096: 596 vs 390 TFLOP/s), the poly kernel 0.191 vs 0.198 ms.
* the **pointer kernels** ``_gram_kernel`` / ``_poly_kernel`` (one program per tile, masked loads) everywhere
  else: odd sizes, tall matrices (iterated as a transposed view, whose rows are not contiguous), Gram lists
  shorter than two waves, and always under the interpreter, where they are the reference rung for the
  descriptor kernels (which the tests also run there, forced with ``tma=True``).

Why two waves. A persistent kernel runs ``⌈tiles/SMs⌉`` rounds of one tile per SM: r = 2048 gives 136 tiles on
132 SMs, two rounds with 4 SMs busy in the second (52% of the SM-rounds used), while the pointer kernels launch
one program per tile and the autotuner may pick smaller tiles or two programs per SM. r = 4096 gives 528 tiles
(4 full waves), r = 8192 2080, the 8 × 4096² Muon.step group 4224. Measured at 2048×8192 (bf16, H100, NS5): the
pointer kernels throughout 1.40 ms and the TMA kernels throughout 2.23 ms (plain torch 1.53–1.56 ms), in two
benchmark runs with identical pointer kernels; the rule sends this shape back to the pointer kernels. The
two-wave threshold is where the argument puts it (between r = 2816, 253 tiles, and r = 2944, 276), not a fitted
value; the wave argument alone does not account for the whole 0.83 ms difference (README, "Schedule").

Precision. On the GPU the operands are bf16, products accumulate in fp32 (tensor cores), and A, B, X are stored
in bf16 between kernels: the same rounding points as a plain bf16 torch implementation. Under the Triton
interpreter (CPU) the buffers are fp32 instead, because the interpreter has no bf16 arithmetic; there the kernels
match the fp32 reference to rounding, which checks every index and mask.

The fused optimizer helpers at the end (momentum, normalisation, update) are single-pass elementwise kernels so
that one Muon step reads and writes each fp32 tensor as few times as possible.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanokimi.checks import check_positive_int, check_tensor
from nanokimi.muon.reference import DEFAULT_COEFFICIENTS
from nanokimi.triton_utils import autotune_configs, ensure_cuda_or_interpreter, interpreting

__all__ = [
    "compute_dtype",
    "gram_triton",
    "poly_apply_triton",
    "newton_schulz_iterate_triton",
    "newton_schulz_triton",
    "momentum_triton",
    "normalize_update_triton",
    "apply_update_triton",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype() -> torch.dtype:
    """The dtype of the Newton–Schulz buffers: bf16 on the GPU, fp32 under the interpreter (no bf16 math there)."""
    return torch.float32 if interpreting() else torch.bfloat16


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# The first config suits the interpreter's tiny shapes; the others are the H100 candidates (128-wide tiles on
# wgmma, 3-4 stages of cp.async pipelining within 228 KB of shared memory; 4 warps leave room for 2 CTAs per SM).
_GRAM_CONFIGS = autotune_configs(
    [
        _cfg(32, 32, 32, 4, 2),
        _cfg(64, 64, 64, 4, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 4, 3),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 128, 8, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 256, 64, 8, 4),
    ]
)
_POLY_CONFIGS = autotune_configs(
    [
        _cfg(32, 32, 32, 4, 2),
        _cfg(64, 64, 64, 4, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 4, 3),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 256, 64, 8, 4),
        _cfg(256, 128, 64, 8, 3),
    ]
)


def _prune_small(configs, named_args, **kwargs):
    """Skip tiles far larger than the matrix (a 37-row Gram matrix needs no 128-row tiles): less autotuning."""
    rows = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, rows)]
    return kept or list(configs[:1])


_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to a tile (pid_m, pid_n): GROUP_M row tiles walk the columns together."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def _triangle_programs(M: int, block_m: int, block_n: int, group_m: int) -> int:
    """How many programs ``_triangle_tile`` maps: per group of row tiles, the columns from the group's first
    column that reaches the diagonal to the last one."""
    num_pid_m, num_pid_n = triton.cdiv(M, block_m), triton.cdiv(M, block_n)
    total = 0
    for first in range(0, num_pid_m, group_m):
        total += min(num_pid_m - first, group_m) * (num_pid_n - (first * block_m) // block_n)
    return total


@triton.jit
def _triangle_tile(pid, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering restricted to the upper triangle: group g (GROUP_M row tiles) owns the columns from
    ``first column that reaches the diagonal`` to the end, so only a few tiles per group lie wholly below it.
    The group of ``pid`` is found by walking the groups' program counts (a scalar loop, ≤ M/(GROUP_M·BLOCK_M))."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(M, BLOCK_N)
    group_first = 0  # first program of the group that holds pid
    group_id = 0
    start = 0
    for g in range(0, tl.cdiv(num_pid_m, GROUP_M)):
        rows_in_group = tl.minimum(num_pid_m - g * GROUP_M, GROUP_M)
        first_col = (g * GROUP_M * BLOCK_M) // BLOCK_N
        mine = pid >= start
        group_id = tl.where(mine, g, group_id)
        group_first = tl.where(mine, start, group_first)
        start += rows_in_group * (num_pid_n - first_col)
    rows_in_group = tl.minimum(num_pid_m - group_id * GROUP_M, GROUP_M)
    local = pid - group_first
    pid_m = group_id * GROUP_M + local % rows_in_group
    pid_n = (group_id * GROUP_M * BLOCK_M) // BLOCK_N + local // rows_in_group
    return pid_m, pid_n


@triton.jit
def _gram_kernel(
    x_ptr,
    y_ptr,
    c_ptr,
    M,
    K,
    stride_xb,
    stride_xm,
    stride_xk,
    stride_yb,
    stride_ym,
    stride_yn,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    HAS_Y: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[b] = alpha·X[b] X[b]ᵀ (+ beta·Y[b]);  X: [batch, M, K], Y and C: [batch, M, M], Y symmetric.
    pid_m, pid_n = _triangle_tile(tl.program_id(0), M, BLOCK_M, BLOCK_N, GROUP_M)
    if (pid_n + 1) * BLOCK_N <= pid_m * BLOCK_M:
        return  # every column of this tile is left of its first row: strictly lower triangle, mirrored by others
    batch = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    x_base = x_ptr + batch * stride_xb
    a_ptrs = x_base + rows[:, None] * stride_xm + ks[None, :] * stride_xk  # [BM, BK] = X[rows, k]
    b_ptrs = x_base + cols[None, :] * stride_xm + ks[:, None] * stride_xk  # [BK, BN] = X[cols, k]ᵀ
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok, other=0.0)
            b = tl.load(b_ptrs, mask=col_ok, other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    out = acc * alpha
    in_bounds = row_ok & col_ok
    if HAS_Y:
        y_ptrs = y_ptr + batch * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        out += beta * tl.load(y_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    out = out.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + batch * stride_cb
    upper = cols[None, :] >= rows[:, None]
    tl.store(c_base + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=in_bounds & upper)
    # the transposed tile: C[col, row] = C[row, col] for col > row (the diagonal is already written)
    mirror_ptrs = c_base + cols[:, None] * stride_cm + rows[None, :] * stride_cn  # [BN, BM]
    mirror_ok = (cols[:, None] > rows[None, :]) & (cols[:, None] < M) & (rows[None, :] < M)
    tl.store(mirror_ptrs, tl.trans(out), mask=mirror_ok)


@triton.jit
def _poly_kernel(
    b_ptr,
    x_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_bb,
    stride_bm,
    stride_bk,
    stride_xb,
    stride_xm,
    stride_xn,
    stride_cb,
    stride_cm,
    stride_cn,
    a_coef,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[b] = a·X[b] + B[b] X[b];  B: [batch, M, M] (K = M), X and C: [batch, M, N].
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    batch = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    x_base = x_ptr + batch * stride_xb
    lhs_ptrs = b_ptr + batch * stride_bb + rows[:, None] * stride_bm + ks[None, :] * stride_bk  # [BM, BK] = B
    rhs_ptrs = x_base + ks[:, None] * stride_xm + cols[None, :] * stride_xn  # [BK, BN] = X
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            lhs = tl.load(lhs_ptrs, mask=row_ok, other=0.0)
            rhs = tl.load(rhs_ptrs, mask=col_ok, other=0.0)
        else:
            k_ok = (k0 + ks) < K
            lhs = tl.load(lhs_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
            rhs = tl.load(rhs_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(lhs, rhs, acc)
        lhs_ptrs += BLOCK_K * stride_bk
        rhs_ptrs += BLOCK_K * stride_xm

    in_bounds = row_ok & col_ok
    x_tile = tl.load(x_base + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=in_bounds, other=0.0)
    out = acc + a_coef * x_tile.to(tl.float32)
    c_ptrs = c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _gram_tma_kernel(
    x_desc,
    y_desc,
    c_desc,
    M,
    K,
    batch,
    alpha,
    beta,
    HAS_Y: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C = alpha·X Xᵀ (+ beta·Y) through tensor descriptors, persistent.  X: [batch·M, K] rows, Y and C:
    # [batch·M, M]; M % BLOCK == 0, so a BLOCK-row tile never straddles two matrices and the K edge is the
    # descriptor's edge (zero-filled by the copy engine).  Program p takes tiles p, p + P, p + 2P, … of the list
    # of upper-triangle tiles (P = programs launched): no program is launched for a tile below the diagonal.
    side = M // BLOCK
    tiles_per_matrix = side * (side + 1) // 2
    for tile in range(tl.program_id(0), batch * tiles_per_matrix, tl.num_programs(0)):
        mat = tile // tiles_per_matrix
        t = tile % tiles_per_matrix
        # t = col·(col + 1)/2 + row with row ≤ col: column-major over the upper triangle, so tiles that run
        # together share the column block X[cols]. The float square root is off by one at most: fix it exactly.
        col_tile = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
        col_tile = tl.where(col_tile * (col_tile + 1) // 2 > t, col_tile - 1, col_tile)
        col_tile = tl.where((col_tile + 1) * (col_tile + 2) // 2 <= t, col_tile + 1, col_tile)
        row_tile = t - col_tile * (col_tile + 1) // 2
        row0 = mat * M + row_tile * BLOCK  # first row of the tile in the [batch·M, ·] views
        col0 = mat * M + col_tile * BLOCK  # first row of X that the tile's columns come from
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([row0, k0])  # [BLOCK, BLOCK_K] = X[rows, k]
            b = x_desc.load([col0, k0])  # [BLOCK, BLOCK_K] = X[cols, k]
            acc = tl.dot(a, b.T, acc)
        out = acc * alpha
        if HAS_Y:
            out += beta * y_desc.load([row0, col_tile * BLOCK]).to(tl.float32)
        out = out.to(c_desc.dtype)
        if row_tile == col_tile:
            # a diagonal tile: keep its upper half and mirror it, so C is bit-for-bit symmetric
            upper = tl.arange(0, BLOCK)[None, :] >= tl.arange(0, BLOCK)[:, None]
            c_desc.store([row0, col_tile * BLOCK], tl.where(upper, out, tl.trans(out)))
        else:
            c_desc.store([row0, col_tile * BLOCK], out)
            c_desc.store([col0, row_tile * BLOCK], tl.trans(out))  # the mirrored tile C[cols, rows]


@triton.jit
def _poly_tma_kernel(
    b_desc,
    x_desc,
    x_out_desc,
    c_desc,
    M,
    N,
    batch,
    a_coef,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C = a·X + B X through tensor descriptors, persistent.  B: [batch·M, M], X and C: [batch·M, N];
    # M % BLOCK_M == 0 == M % BLOCK_K.  x_desc reads [BLOCK_K, BLOCK_N] operand tiles of X, x_out_desc the
    # [BLOCK_M, BLOCK_N] tile added in the epilogue.
    num_pid_m = M // BLOCK_M
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_matrix = num_pid_m * num_pid_n
    for tile in range(tl.program_id(0), batch * tiles_per_matrix, tl.num_programs(0)):
        mat = tile // tiles_per_matrix
        pid_m, pid_n = _grouped_tile(tile % tiles_per_matrix, num_pid_m, num_pid_n, GROUP_M)
        row0 = mat * M + pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            lhs = b_desc.load([row0, k0])  # [BLOCK_M, BLOCK_K] = B[rows, k]
            rhs = x_desc.load([mat * M + k0, col0])  # [BLOCK_K, BLOCK_N] = X[k, cols]
            acc = tl.dot(lhs, rhs, acc)
        out = acc + a_coef * x_out_desc.load([row0, col0]).to(tl.float32)
        c_desc.store([row0, col0], out.to(c_desc.dtype))


_gram_fixed = _EVEN_K(_gram_kernel)
_gram_tuned = triton.autotune(
    configs=_GRAM_CONFIGS, key=["M", "K", "HAS_Y"], prune_configs_by={"early_config_prune": _prune_small}
)(_EVEN_K(_gram_kernel))
_poly_fixed = _EVEN_K(_poly_kernel)
_poly_tuned = triton.autotune(
    configs=_POLY_CONFIGS, key=["M", "N"], prune_configs_by={"early_config_prune": _prune_small}
)(_EVEN_K(_poly_kernel))


# --- tensor-descriptor (TMA) path: the launchers pick it on the GPU when the layout allows ---------------------
_TMA_ROWS = 16 if interpreting() else 128  # every TMA config's BLOCK_M (and BLOCK for the Gram kernel)


def _set_gram_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' block shapes must match the config being launched."""
    block, block_k = nargs["BLOCK"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [block, block_k]
    nargs["y_desc"].block_shape = [block, block]
    nargs["c_desc"].block_shape = [block, block]


def _set_poly_blocks(nargs: dict) -> None:
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["b_desc"].block_shape = [bm, bk]
    nargs["x_desc"].block_shape = [bk, bn]
    nargs["x_out_desc"].block_shape = [bm, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _gram_tma_cfg(block: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages, pre_hook=_set_gram_blocks
    )


def _poly_tma_cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, pre_hook=_set_poly_blocks)


# Measured on the H100 at 4096² bf16 (01_muon/README.md, "Schedule"): Gram 128×128×64, 8 warps, 4 stages 0.119 ms
# (3 stages 0.147, BLOCK_K 128 0.126); poly 128×256×64, 8 warps, 3 stages 0.191 ms (4 stages exceed shared
# memory). The first config of each list is the interpreter's.
_GRAM_TMA_CONFIGS = autotune_configs(
    [
        _gram_tma_cfg(16, 16, 4, 2),
        _gram_tma_cfg(128, 64, 8, 4),
        _gram_tma_cfg(128, 64, 8, 3),
        _gram_tma_cfg(128, 128, 8, 3),
    ]
)
_POLY_TMA_CONFIGS = autotune_configs(
    [
        _poly_tma_cfg(16, 16, 16, 4, 2),
        _poly_tma_cfg(128, 256, 64, 8, 3),
        _poly_tma_cfg(128, 128, 64, 8, 4),
        _poly_tma_cfg(128, 128, 64, 4, 4),
    ]
)
_gram_tma_tuned = triton.autotune(configs=_GRAM_TMA_CONFIGS, key=["M", "K", "HAS_Y"])(_gram_tma_kernel)
_poly_tma_tuned = triton.autotune(configs=_POLY_TMA_CONFIGS, key=["M", "N"])(_poly_tma_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_programs(tiles: int, device: torch.device) -> int:
    """One program per SM (each loops over tiles); 3 under the interpreter, so that a program takes several
    tiles there too and the loop is exercised."""
    return max(1, min(tiles, 3 if interpreting() else _sm_count(device)))


def _descriptor_rows(t: torch.Tensor) -> bool:
    """Can ``t: [batch, rows, cols]`` be read as one ``[batch·rows, cols]`` row-major tensor descriptor?"""
    batch, rows, _ = t.shape
    stacked = batch == 1 or t.stride(0) == rows * t.stride(1)
    aligned = (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    return t.stride(2) == 1 and stacked and aligned


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """The ``[batch·rows, cols]`` descriptor of ``t``; the block shape is set by the config's pre-hook."""
    return TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2]], [t.stride(1), 1], [_TMA_ROWS, _TMA_ROWS])


# The schedule rule (tma=None): the persistent kernels run one program per SM, so they only pay off when every SM
# gets several tiles. A step's Gram list (batch·T(T + 1)/2 tiles of 128², T = rows/128) must fill this many waves;
# otherwise all three kernels of the step take the pointer path (see the module docstring for the measurements).
_TMA_MIN_WAVES = 2


def _tma_fills_waves(batch: int, rows: int, sms: int, tile: int = _TMA_ROWS) -> bool:
    """Does the Gram-sized problem ``[batch, rows, rows]`` hold at least ``_TMA_MIN_WAVES·sms`` upper-triangle
    tiles of ``tile²``? (132 SMs: rows 2048 gives 136 tiles, no; 4096 gives 528, yes; 2048 with batch 2, yes.)
    Both Gram kernels and the poly kernel of a step see the same ``rows`` (the short side r), so a step runs on
    one path."""
    side = rows // tile
    return batch * side * (side + 1) // 2 >= _TMA_MIN_WAVES * sms


def _pick_tma(tma: bool | None, block: tuple | None, rows: int, *tensors: torch.Tensor) -> bool:
    """``tma=None``: the descriptor path when compiled, the layout allows it and the tiles fill the SMs
    (``_tma_fills_waves``); ``True`` requires the layout only. ``tensors[0]`` is ``[batch, rows, ·]``."""
    eligible = rows % _TMA_ROWS == 0 and all(_descriptor_rows(t) for t in tensors)
    if tma is None:
        if not eligible or block is not None or interpreting():
            return False
        return _tma_fills_waves(tensors[0].shape[0], rows, _sm_count(tensors[0].device))
    if tma and block is not None:
        raise ValueError(f"block: applies to the pointer path only (tma=False or None), got tma=True, block={block}")
    if tma and not eligible:
        raise ValueError(
            f"tma: expected rows divisible by {_TMA_ROWS} and row-major operands with 16-byte aligned rows, got "
            f"{rows} rows and strides {[tuple(t.stride()) for t in tensors]}"
        )
    return bool(tma)


def _check_block(block: Sequence[int] | None) -> tuple[int, int, int] | None:
    if block is None:
        return None
    if len(block) != 3 or any(isinstance(b, bool) or not isinstance(b, int) for b in block):
        raise ValueError(f"block: expected (BLOCK_M, BLOCK_N, BLOCK_K) as three ints, got {block!r}")
    for name, b in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), block, strict=True):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block: expected {name} a power of two >= 16 (tl.dot needs it), got {b}")
    return tuple(block)


def gram_triton(
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    Y: torch.Tensor | None = None,
    beta: float = 0.0,
    out: torch.Tensor | None = None,
    block: Sequence[int] | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """``C = alpha·X Xᵀ + beta·Y`` for ``X: [batch, M, K]``, ``Y: [batch, M, M]`` symmetric (optional).

    Kernels (1) and (2): only tiles on or above the diagonal are computed; the result is exactly symmetric.
    Any strides are accepted (a transposed view costs no copy). ``out`` (``[batch, M, M]``, X's dtype) is
    allocated when not given; ``block = (BLOCK_M, BLOCK_N, BLOCK_K)`` bypasses autotuning (for tests).
    ``tma=None`` runs the persistent tensor-descriptor kernel when compiled, the layout allows it (M divisible
    by 128, rows contiguous, 16-byte aligned, batch stacked) and ``batch·T(T + 1)/2 ≥ 2·SMs`` (T = M/128, see
    the module docstring), else the pointer kernel; ``True``/``False`` force one (``True`` raises ValueError
    where the layout does not allow it).
    """
    check_tensor("X", X, ndim=3, dtypes=_KERNEL_DTYPES)
    batch, M, K = X.shape
    if Y is not None:
        check_tensor("Y", Y, shape=(batch, M, M), dtypes=(X.dtype,))
    if out is None:
        out = torch.empty((batch, M, M), device=X.device, dtype=X.dtype)
    check_tensor("out", out, shape=(batch, M, M), dtypes=(X.dtype,))
    ensure_cuda_or_interpreter(X, out, names=("X", "out"))
    if Y is not None:
        ensure_cuda_or_interpreter(Y, names=("Y",))
    block = _check_block(block)
    if out.numel() == 0:
        return out
    y = out if Y is None else Y  # never read when HAS_Y is False
    if _pick_tma(tma, block, M, X, y, out):
        c_desc = _descriptor(out)
        y_desc = c_desc if Y is None else _descriptor(Y)
        side = lambda meta: M // meta["BLOCK"]
        grid = lambda meta: (_persistent_programs(batch * side(meta) * (side(meta) + 1) // 2, X.device),)
        _gram_tma_tuned[grid](
            _descriptor(X), y_desc, c_desc, M, K, batch, float(alpha), float(beta), HAS_Y=Y is not None
        )
        return out
    args = (X, y, out, M, K, *X.stride(), *y.stride(), *out.stride(), float(alpha), float(beta))
    if block is None:
        grid = lambda meta: (_triangle_programs(M, meta["BLOCK_M"], meta["BLOCK_N"], meta["GROUP_M"]), batch)
        _gram_tuned[grid](*args, HAS_Y=Y is not None)
    else:
        bm, bn, bk = block
        grid = (_triangle_programs(M, bm, bn, 2), batch)
        _gram_fixed[grid](*args, HAS_Y=Y is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2)
    return out


def poly_apply_triton(
    B: torch.Tensor,
    X: torch.Tensor,
    *,
    a: float,
    out: torch.Tensor | None = None,
    block: Sequence[int] | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """``C = a·X + B·X`` for ``B: [batch, M, M]``, ``X: [batch, M, N]`` (kernel 3; any strides).

    ``out`` must not overlap ``X`` (other programs still read X while one writes its tile). ``block`` and ``tma``
    as in ``gram_triton`` (the wave rule counts the Gram tiles of B, so a NS step runs on one path).
    """
    check_tensor("X", X, ndim=3, dtypes=_KERNEL_DTYPES)
    batch, M, N = X.shape
    check_tensor("B", B, shape=(batch, M, M), dtypes=(X.dtype,))
    if out is None:
        out = torch.empty((batch, M, N), device=X.device, dtype=X.dtype)
    check_tensor("out", out, shape=(batch, M, N), dtypes=(X.dtype,))
    ensure_cuda_or_interpreter(B, X, out, names=("B", "X", "out"))
    if out.data_ptr() == X.data_ptr() and out.numel():
        raise ValueError("out: expected a buffer distinct from X (programs read X while others write out)")
    block = _check_block(block)
    if out.numel() == 0:
        return out
    if _pick_tma(tma, block, M, B, X, out):
        tiles = lambda meta: batch * (M // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        grid = lambda meta: (_persistent_programs(tiles(meta), X.device),)
        descriptors = (_descriptor(B), _descriptor(X), _descriptor(X), _descriptor(out))
        _poly_tma_tuned[grid](*descriptors, M, N, batch, float(a))
        return out
    args = (B, X, out, M, N, M, *B.stride(), *X.stride(), *out.stride(), float(a))
    if block is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), batch)
        _poly_tuned[grid](*args)
    else:
        bm, bn, bk = block
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), batch)
        _poly_fixed[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2)
    return out


def _check_ns_args(steps: int, coefficients: Sequence[float]) -> tuple[float, float, float]:
    check_positive_int("steps", steps)
    if len(coefficients) != 3 or not all(isinstance(c, int | float) for c in coefficients):
        raise ValueError(f"coefficients: expected three numbers (a, b, c), got {coefficients!r}")
    return tuple(float(c) for c in coefficients)


def newton_schulz_iterate_triton(
    X: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    block: Sequence[int] | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """The ``steps`` NS steps on ``X: [batch, m, n]``, already normalised (‖X[i]‖_F ≤ 1) and in the compute dtype.

    Tall matrices (m > n) are iterated as the transposed view, so the Gram matrix is min(m, n)² and nothing is
    copied. X is overwritten (it is one of the two buffers the steps alternate between); the result, in X's
    dtype and layout, is returned (it is X itself after an even number of steps). ``tma``: see ``gram_triton``.
    """
    a, b, c = _check_ns_args(steps, coefficients)
    check_tensor("X", X, ndim=3, dtypes=_KERNEL_DTYPES)
    tall = X.shape[1] > X.shape[2]
    r = min(X.shape[1], X.shape[2])
    gram = torch.empty((X.shape[0], r, r), device=X.device, dtype=X.dtype)  # A = X Xᵀ
    poly = torch.empty_like(gram)  # B = b·A + c·A·A
    current, spare = X, torch.empty_like(X)
    if tma is None:  # settle the path once, over every operand of the three kernels, so that a step runs on one path
        work, out = (current.mT, spare.mT) if tall else (current, spare)
        tma = _pick_tma(None, block, r, work, gram, poly, out)
    for _ in range(steps):
        work = current.mT if tall else current  # [batch, r, max(m, n)]
        gram_triton(work, out=gram, block=block, tma=tma)  # (1)
        gram_triton(gram, alpha=c, Y=gram, beta=b, out=poly, block=block, tma=tma)  # (2)
        poly_apply_triton(poly, work, a=a, out=spare.mT if tall else spare, block=block, tma=tma)  # (3)
        current, spare = spare, current
    return current


def newton_schulz_triton(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    eps: float = 1e-7,
    *,
    tma: bool | None = None,
) -> torch.Tensor:
    """Quintic Newton–Schulz of ``G: [..., m, n]`` with the symmetric kernels; returns ``G.dtype``.

    Same contract as ``reference.newton_schulz``: ``X₀ = G / max(‖G‖_F, eps)`` per matrix (computed in fp32 and
    rounded once to the compute dtype), then ``steps`` steps of ``X ← a·X + (b·A + c·A²)·X``, ``A = X Xᵀ``. All
    matrices of the batch go through each kernel in one launch. ``tma``: ``None`` picks the tensor-descriptor
    kernels where they apply (compiled, min(m, n) divisible by 128, not tall) and fill two waves of SMs (one
    2048-row matrix does not, 4096 does), ``False`` the pointer kernels, ``True`` requires the descriptor
    kernels (ValueError where they do not apply).
    """
    check_tensor("G", G, dtypes=_FLOAT_DTYPES)
    if G.dim() < 2:
        raise ValueError(f"G: expected at least 2 dimensions [..., m, n], got shape {tuple(G.shape)}")
    _check_ns_args(steps, coefficients)
    if not (isinstance(eps, int | float) and eps > 0):
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    ensure_cuda_or_interpreter(G, names=("G",))
    if G.numel() == 0:
        return torch.zeros_like(G)
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n)  # [batch, m, n]
    norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(G3, dim=(-2, -1), keepdim=True, dtype=norm_dtype)  # [batch, 1, 1]
    X = torch.empty(G3.shape, device=G3.device, dtype=compute_dtype())
    torch.div(G3, norm.clamp_min(eps), out=X)  # one pass: divides in fp32 (or fp64), rounds once into X
    out = newton_schulz_iterate_triton(X, steps, coefficients, tma=tma)
    return out.reshape(G.shape).to(G.dtype)


# --- fused optimizer elementwise kernels -------------------------------------------------------------------
_EW_BLOCK = 1024


@triton.jit
def _momentum_kernel(g_ptr, buf_ptr, partial_ptr, n, beta, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    # M ← β·M + (1 − β)·G, in place; U = (1 − β)·G + β·M (Nesterov) or M; partial[mat, pid] = Σ U² over the block.
    pid = tl.program_id(0)
    mat = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + mat * n + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(buf_ptr + mat * n + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta * m + (1.0 - beta) * g
    tl.store(buf_ptr + mat * n + offs, m.to(buf_ptr.dtype.element_ty), mask=mask)
    m = m.to(buf_ptr.dtype.element_ty).to(tl.float32)  # what the next pass reads back
    if NESTEROV:
        u = (1.0 - beta) * g + beta * m
    else:
        u = m
    tl.store(partial_ptr + mat * tl.num_programs(0) + pid, tl.sum(u * u, axis=0))


@triton.jit
def _normalize_kernel(g_ptr, buf_ptr, inv_norm_ptr, out_ptr, n, beta, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    # out = U / max(‖U‖_F, eps), U recomputed from G and the updated M exactly as in _momentum_kernel.
    pid = tl.program_id(0)
    mat = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m = tl.load(buf_ptr + mat * n + offs, mask=mask, other=0.0).to(tl.float32)
    if NESTEROV:
        g = tl.load(g_ptr + mat * n + offs, mask=mask, other=0.0).to(tl.float32)
        u = (1.0 - beta) * g + beta * m
    else:
        u = m
    inv_norm = tl.load(inv_norm_ptr + mat)
    tl.store(out_ptr + mat * n + offs, (u * inv_norm).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(p_ptr, o_ptr, n, decay, step, BLOCK: tl.constexpr):
    # W ← decay·W − step·O  (decay = 1 − η·λ, step = η·s(A, B))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (decay * w - step * o).to(p_ptr.dtype.element_ty), mask=mask)


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")


def momentum_triton(grad: torch.Tensor, buf: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """``buf ← β·buf + (1 − β)·grad`` in place (one pass); returns ``‖U‖²_F`` partial sums ``[E, blocks]``.

    ``grad`` and ``buf``: ``[A, B]`` or ``[E, A, B]`` (E matrices, each with its own norm), contiguous.
    ``U`` is the Nesterov look-ahead ``(1 − β)·grad + β·buf`` or ``buf``.
    """
    check_tensor("grad", grad, dtypes=_KERNEL_DTYPES)
    check_tensor("buf", buf, shape=tuple(grad.shape), dtypes=_KERNEL_DTYPES)
    if grad.dim() not in (2, 3):
        raise ValueError(f"grad: expected [A, B] or [E, A, B], got shape {tuple(grad.shape)}")
    ensure_cuda_or_interpreter(grad, buf, names=("grad", "buf"))
    _check_contiguous("grad", grad)
    _check_contiguous("buf", buf)
    mats = 1 if grad.dim() == 2 else grad.shape[0]
    n = grad.shape[-2] * grad.shape[-1]
    blocks = max(triton.cdiv(n, _EW_BLOCK), 1)
    partial = torch.empty((mats, blocks), device=grad.device, dtype=torch.float32)
    if n and mats:
        _momentum_kernel[(blocks, mats)](grad, buf, partial, n, float(beta), NESTEROV=bool(nesterov), BLOCK=_EW_BLOCK)
    else:
        partial.zero_()
    return partial


def normalize_update_triton(
    grad: torch.Tensor,
    buf: torch.Tensor,
    partial: torch.Tensor,
    beta: float,
    nesterov: bool,
    eps: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[i] = U[i] / max(‖U[i]‖_F, eps)`` from the momentum already updated by ``momentum_triton``.

    ``out``: a contiguous ``[E, A, B]`` buffer (the NS input, usually in the compute dtype); U is recomputed
    from ``grad`` and ``buf`` in fp32 and rounded once, so normalising costs no extra fp32 tensor.
    """
    check_tensor("partial", partial, ndim=2, dtypes=(torch.float32,))
    check_tensor("buf", buf, shape=tuple(grad.shape), dtypes=_KERNEL_DTYPES)
    mats = partial.shape[0]
    n = grad.shape[-2] * grad.shape[-1]
    check_tensor("out", out, shape=(mats, grad.shape[-2], grad.shape[-1]), dtypes=_KERNEL_DTYPES)
    ensure_cuda_or_interpreter(grad, buf, partial, out, names=("grad", "buf", "partial", "out"))
    _check_contiguous("out", out)
    inv_norm = 1.0 / partial.sum(dim=1).sqrt().clamp_min(eps)  # [E]
    if n and mats:
        grid = (triton.cdiv(n, _EW_BLOCK), mats)
        _normalize_kernel[grid](grad, buf, inv_norm, out, n, float(beta), NESTEROV=bool(nesterov), BLOCK=_EW_BLOCK)
    return out


def apply_update_triton(param: torch.Tensor, update: torch.Tensor, decay: float, step: float) -> torch.Tensor:
    """``param ← decay·param − step·update`` in one pass (in place); both contiguous, same number of elements."""
    check_tensor("param", param, dtypes=_KERNEL_DTYPES)
    check_tensor("update", update, dtypes=_KERNEL_DTYPES)
    if update.numel() != param.numel():
        raise ValueError(f"update: expected {param.numel()} elements (those of param), got {update.numel()}")
    ensure_cuda_or_interpreter(param, update, names=("param", "update"))
    _check_contiguous("param", param)
    _check_contiguous("update", update)
    n = param.numel()
    if n:
        _update_kernel[(triton.cdiv(n, _EW_BLOCK),)](param, update, n, float(decay), float(step), BLOCK=_EW_BLOCK)
    return param

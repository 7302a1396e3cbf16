"""Triton kernels for the routed experts of a K2 MoE layer: permute, grouped GEMMs (forward and backward), combine.

The routed part of the layer is, for token t with experts I_t and weights w_t (see ``reference.py``),

    y_t = Σ_j w_tj · W_down[e] (silu(W_gate[e] x_t) ⊙ W_up[e] x_t),   e = I_tj.

Instead of one small GEMM per expert, the N·k token-slots are sorted by expert into *rows* of one tall
virtual matrix, with each expert's segment padded to a multiple of the GEMM row tile ``BLOCK_M``
(:func:`permute`). Then every row tile belongs to exactly one expert, and one launch covers all experts:

    tile_expert[i]      expert of row tile i (computed once per call; tiles past the end hold E and exit)
    row_token[r]        token whose x feeds row r (−1 for padding rows, which every kernel masks)
    slot_row[t, j]      the row that holds token t's j-th slot (the inverse map, used by the combine)

Kernels (each program computes one ``BLOCK_M × BLOCK_N`` output tile, bf16 ``tl.dot`` with fp32 accumulation):

    grouped_swiglu      act[r] = silu(x[row_token[r]] W_gate[e]ᵀ) ⊙ (x[row_token[r]] W_upᵀ[e])
                        gate‖up in one pass: one A tile (rows of x gathered in the load, never copied)
                        feeds two accumulators; the SwiGLU epilogue runs on them before anything is stored.
    grouped_matmul      rows[r] = act[r] W_down[e]ᵀ                                     (down projection)
    unpermute_combine   y[t] = Σ_j w_tj rows[slot_row[t, j]]   (the weighted scatter-add, written as a
                        gather over each token's k rows so that it needs no atomics and is deterministic)

Backward (``routed_experts_triton`` wraps it all in an ``autograd.Function``; only routing stays in torch):

    swiglu backward     g_r = dy[token_r] W_down[e]  (gathered A, one grouped GEMM), and in the epilogue
                        dw_slot = ⟨g_r, act_r⟩,  d_act = w g_r,  d_gate = d_act ⊙ up ⊙ silu'(gate),
                        d_up = d_act ⊙ silu(gate),  act_w = w act_r
    weight gradients    dW_down[e] = Σ_{r∈e} dy[token_r]ᵀ act_w[r],
                        dW_gate[e] = Σ_{r∈e} d_gate[r]ᵀ x[token_r],  dW_up[e] likewise (one pass, two outputs);
                        one program per output tile loops over its expert's rows, experts by decreasing load
    input gradient      dx_rows[r] = d_gate[r] W_gate[e] + d_up[r] W_up[e];  dx[t] = Σ_j dx_rows[slot_row[t, j]]

FLOPs (forward) = 2 · N·k · 3·D·F; the backward is twice that. The padding rows cost up to E·(BLOCK_M − 1)
extra rows of work: none when each expert's count is a multiple of BLOCK_M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_tensor
from nanokimi.moe.reference import check_expert_weights, check_moe_args, route, swiglu_ffn
from nanokimi.triton_utils import autotune_configs, dot_precision, ensure_cuda_or_interpreter, interpreting

__all__ = [
    "Permutation",
    "default_block_m",
    "permute",
    "grouped_swiglu",
    "grouped_matmul",
    "unpermute_combine",
    "routed_experts_triton",
    "moe_forward_triton",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_block_m() -> int:
    """Row tile of the grouped GEMMs: 128 compiled (H100 tensor-core tiles), 16 under the interpreter."""
    return 16 if interpreting() else 128


# --- permutation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Permutation:
    """Where each token-slot lives in the expert-sorted, tile-padded row layout (all maps on the device).

    Attributes:
        n_experts, top_k, block_m: E, k and the row tile the padding is aligned to.
        tokens_per_expert: ``[E]`` int64 slot counts.
        slot_row: ``[N, k]`` int32, the row of token t's j-th slot.
        row_token: ``[R]`` int32, the token of each row (−1: padding). R = :attr:`n_rows`, an upper bound
            (no host sync): ``block_m · ⌊(N·k + E·(block_m − 1)) / block_m⌋``.
        row_slot: ``[R]`` int32, the flat slot ``t·k + j`` of each row (−1: padding).
        tile_expert: ``[R / block_m]`` int32, the expert of each row tile; E for tiles past the last expert.
        expert_tile_start: ``[E + 1]`` int32, first tile of each expert (exclusive prefix sum; last = tiles used).
        expert_order: ``[E]`` int32, experts by decreasing load (the weight-gradient programs start with
            the busiest expert so that its long reduction does not run last).
    """

    n_experts: int
    top_k: int
    block_m: int
    tokens_per_expert: torch.Tensor
    slot_row: torch.Tensor
    row_token: torch.Tensor
    row_slot: torch.Tensor
    tile_expert: torch.Tensor
    expert_tile_start: torch.Tensor
    expert_order: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.slot_row.shape[0]

    @property
    def n_rows(self) -> int:
        return self.row_token.shape[0]

    @property
    def n_tiles(self) -> int:
        return self.tile_expert.shape[0]


def permute(topk_idx: torch.Tensor, n_experts: int, block_m: int | None = None) -> Permutation:
    """Sort the token-slots by expert and pad each expert's segment to a multiple of ``block_m`` rows.

    Bookkeeping only (a stable sort, a histogram and prefix sums, in torch; only the input check syncs); the rows of x
    themselves are gathered inside the GEMM's loads. Inside an expert, rows keep token order.

    Args:
        topk_idx: ``[N, k]`` expert ids in ``[0, E)``. n_experts: E. block_m: the GEMM row tile
            (a power of two ≥ 16; default :func:`default_block_m`).
    """
    check_tensor("topk_idx", topk_idx, ndim=2, dtypes=(torch.int64, torch.int32))
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts: expected a positive int, got {n_experts!r}")
    block_m = default_block_m() if block_m is None else block_m
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m!r}")
    if topk_idx.numel() and bool(((topk_idx < 0) | (topk_idx >= n_experts)).any()):
        bad = topk_idx[(topk_idx < 0) | (topk_idx >= n_experts)][0]
        raise ValueError(f"topk_idx: expected expert ids in [0, {n_experts}), got {int(bad)}")
    n_tokens, top_k = topk_idx.shape
    device = topk_idx.device
    n_slots = n_tokens * top_k
    flat = topk_idx.reshape(-1).long()  # [N·k], slot s = t·k + j
    order = torch.argsort(flat, stable=True)  # [N·k] slots grouped by expert, token order inside
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    tiles = (counts + block_m - 1) // block_m  # [E] row tiles per expert
    tile_start = torch.zeros(n_experts + 1, dtype=torch.int64, device=device)
    tile_start[1:] = torch.cumsum(tiles, 0)
    slot_start = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    sorted_expert = flat[order]  # [N·k]
    rank = torch.arange(n_slots, device=device) - slot_start[sorted_expert]  # position inside its expert
    row_of_sorted = tile_start[sorted_expert] * block_m + rank  # [N·k]
    n_tiles = (n_slots + n_experts * (block_m - 1)) // block_m  # Σ ⌈c_e / block_m⌉ never exceeds this
    n_rows = n_tiles * block_m
    slot_row = torch.empty(n_slots, dtype=torch.int64, device=device)
    slot_row[order] = row_of_sorted
    row_slot = torch.full((n_rows,), -1, dtype=torch.int64, device=device)
    row_slot[row_of_sorted] = order
    row_token = torch.where(row_slot >= 0, row_slot // top_k, -1)
    tile_expert = torch.searchsorted(tile_start[1:], torch.arange(n_tiles, device=device), right=True)
    expert_order = torch.argsort(counts, descending=True, stable=True)
    return Permutation(
        n_experts=n_experts,
        top_k=top_k,
        block_m=block_m,
        tokens_per_expert=counts,
        slot_row=slot_row.view(n_tokens, top_k).to(torch.int32),
        row_token=row_token.to(torch.int32),
        row_slot=row_slot.to(torch.int32),
        tile_expert=tile_expert.to(torch.int32),
        expert_tile_start=tile_start.to(torch.int32),
        expert_order=expert_order.to(torch.int32),
    )


# --- Triton kernels --------------------------------------------------------------------------------------


def _configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Tiles tuned for the H100 when compiled; one tiny tile under the interpreter (a CPU runs NumPy)."""
    return autotune_configs([interpreter]) if interpreting() else gpu


def _fp32_prune(fp32_configs: list[triton.Config]):
    """Autotune pruning: fp32 operands take 2× the shared memory of bf16 ones (the bf16 candidates would not
    fit), so compiled fp32 launches choose among their own smaller tiles."""

    def prune(configs, named_args, **kwargs):
        first_tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        if first_tensor.dtype == torch.float32 and not interpreting():
            return fp32_configs
        return configs

    return {"early_config_prune": prune}


def _tile(block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


_INTERPRETER_TILE = _tile(32, 32, 4, 1, group_m=4)
# Row tile 128 (the permutation's block_m). The gate‖up kernel holds two [128, BLOCK_N] accumulators, so its
# BLOCK_N = 128 is a 128×256 tile in tensor-core work and registers.
_SWIGLU_CONFIGS = _configs(
    [_tile(128, 64, 8, 3), _tile(128, 64, 8, 4), _tile(128, 32, 8, 4), _tile(64, 64, 4, 4), _tile(64, 64, 8, 4)],
    _INTERPRETER_TILE,
)
_GEMM_CONFIGS = _configs(
    [_tile(256, 64, 8, 3), _tile(256, 64, 8, 4), _tile(128, 64, 8, 3), _tile(128, 64, 8, 4), _tile(128, 128, 8, 3)],
    _INTERPRETER_TILE,
)
# The backward epilogue holds gate, up and their derivatives next to the accumulator: narrower column tiles.
_SWIGLU_BWD_CONFIGS = _configs(
    [_tile(128, 64, 8, 3), _tile(128, 64, 8, 4), _tile(64, 64, 8, 4), _tile(64, 64, 8, 3), _tile(64, 64, 4, 4)],
    _INTERPRETER_TILE,
)


def _wgrad_tile(block_wm: int, block_wn: int, block_r: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_WM": block_wm, "BLOCK_WN": block_wn, "BLOCK_R": block_r}, num_warps=warps, num_stages=stages
    )


_WGRAD_CONFIGS = _configs(
    [
        _wgrad_tile(128, 128, 64, 8, 3),
        _wgrad_tile(128, 128, 64, 8, 4),
        _wgrad_tile(128, 128, 32, 8, 4),
        _wgrad_tile(64, 128, 64, 4, 4),
        _wgrad_tile(64, 128, 64, 8, 4),
        _wgrad_tile(128, 64, 64, 4, 4),
    ],
    _wgrad_tile(32, 32, 16, 4, 1),
)
_FP32_GEMM = [_tile(32, 32, 4, 2), _tile(64, 32, 4, 3)]
_FP32_WGRAD = [_wgrad_tile(64, 64, 32, 4, 2), _wgrad_tile(64, 64, 32, 4, 3)]
_COMBINE_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_T": 16, "BLOCK_D": 256}, num_warps=4),
        triton.Config({"BLOCK_T": 8, "BLOCK_D": 512}, num_warps=4),
    ],
    triton.Config({"BLOCK_T": 16, "BLOCK_D": 32}, num_warps=4),
)


@triton.jit
def _tile_of(pid, n_tiles, n_blocks_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M consecutive row tiles sweep the column blocks together, so the x rows
    and the expert's weight columns they share are read from L2 rather than HBM."""
    per_group = GROUP_M * n_blocks_n
    first_tile = (pid // per_group) * GROUP_M
    group_size = tl.minimum(n_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_size
    block_n = (pid % per_group) // group_size
    return tile, block_n


@triton.autotune(configs=_SWIGLU_CONFIGS, key=["D", "F"], prune_configs_by=_fp32_prune(_FP32_GEMM))
@triton.jit
def _grouped_swiglu_kernel(
    x_ptr,  # [N, D]
    w_gate_ptr,  # [E, F, D]
    w_up_ptr,  # [E, F, D]
    act_ptr,  # [R, F]  out
    gate_ptr,  # [R, F]  out when STORE_PRE (pre-activations kept for the backward)
    up_ptr,  # [R, F]  out when STORE_PRE
    row_token_ptr,  # [R]
    tile_expert_ptr,  # [R / BLOCK_M]
    n_tiles,
    n_experts,
    D,
    F,
    STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile, block_n = _tile_of(tl.program_id(0), n_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < n_experts:  # tiles past the last expert's rows have nothing to do
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        token = tl.load(row_token_ptr + rows, mask=rows < n_tiles * BLOCK_M, other=-1)
        row_ok = token >= 0
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token.to(tl.int64)[:, None] * D + ks[None, :]  # [BM, BK] rows gathered from x
        w_offs = expert.to(tl.int64) * F * D + cols[None, :] * D + ks[:, None]  # [BK, BN] = W[e]ᵀ tile
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = k0 + ks < D
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_gate = tl.load(w_gate_ptr + w_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            b_up = tl.load(w_up_ptr + w_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_offs += BLOCK_K
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SwiGLU epilogue, fp32
        out_offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        out_mask = row_ok[:, None] & col_ok[None, :]
        tl.store(act_ptr + out_offs, act.to(act_ptr.dtype.element_ty), mask=out_mask)
        if STORE_PRE:
            tl.store(gate_ptr + out_offs, acc_gate.to(gate_ptr.dtype.element_ty), mask=out_mask)
            tl.store(up_ptr + out_offs, acc_up.to(up_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _accumulate_tiles(
    acc, a_ptr, b_ptr, a_offs, b_offs, row_ok, col_ok, K, stride_bk, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """acc += A[rows, :K] · B[:K, cols], BLOCK_K columns of A (rows of B) per step."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_ptr + a_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_offs += BLOCK_K
        b_offs += BLOCK_K * stride_bk
    return acc


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K", "TWO_TERMS"], prune_configs_by=_fp32_prune(_FP32_GEMM))
@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [R, K] rows in permuted order
    b_ptr,  # per expert a K×N operand, addressed through strides
    a2_ptr,  # [R, K] second term when TWO_TERMS
    b2_ptr,
    c_ptr,  # [R, N]  out
    row_token_ptr,
    tile_expert_ptr,
    n_tiles,
    n_experts,
    N,
    K,
    stride_be,
    stride_bk,
    stride_bn,
    TWO_TERMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # c[r] = a[r] B[e] (+ a2[r] B2[e]) for the rows r of tiles owned by expert e. The second term runs as its
    # own K loop after the first, so both share the accumulator but not the shared-memory pipeline.
    tile, block_n = _tile_of(tl.program_id(0), n_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < n_experts:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = tl.load(row_token_ptr + rows, mask=rows < n_tiles * BLOCK_M, other=-1) >= 0
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_offs = rows.to(tl.int64)[:, None] * K + ks[None, :]  # [BM, BK]
        b_offs = expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate_tiles(acc, a_ptr, b_ptr, a_offs, b_offs, row_ok, col_ok, K, stride_bk, BLOCK_K, DOT_PRECISION)
        if TWO_TERMS:
            acc = _accumulate_tiles(
                acc, a2_ptr, b2_ptr, a_offs, b_offs, row_ok, col_ok, K, stride_bk, BLOCK_K, DOT_PRECISION
            )
        c_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_SWIGLU_BWD_CONFIGS, key=["D", "F"], prune_configs_by=_fp32_prune(_FP32_GEMM))
@triton.jit
def _swiglu_backward_kernel(
    dy_ptr,  # [N, D] gradient of the layer output
    w_down_ptr,  # [E, D, F]
    gate_ptr,  # [R, F] saved pre-activations
    up_ptr,  # [R, F]
    weight_ptr,  # [N·k] fp32 routing weights by flat slot
    d_gate_ptr,  # [R, F] out
    d_up_ptr,  # [R, F] out
    act_w_ptr,  # [R, F] out: w · act, the right operand of dW_down
    dw_partial_ptr,  # [≥ F / BLOCK_N, R] fp32 out: ⟨g_r, act_r⟩ over this program's columns
    row_token_ptr,
    row_slot_ptr,
    tile_expert_ptr,
    n_tiles,
    n_experts,
    D,
    F,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile, block_n = _tile_of(tl.program_id(0), n_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < n_experts:
        n_rows = n_tiles * BLOCK_M
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        token = tl.load(row_token_ptr + rows, mask=rows < n_rows, other=-1)
        row_ok = token >= 0
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        ks = tl.arange(0, BLOCK_K)
        dy_ptrs = dy_ptr + token.to(tl.int64)[:, None] * D + ks[None, :]  # [BM, BK] gathered dy rows
        w_offs = expert.to(tl.int64) * D * F + ks[:, None] * F + cols[None, :]  # [BK, BN] of W_down[e]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # g = dy W_down[e], before the routing weight
        for k0 in range(0, D, BLOCK_K):
            k_ok = k0 + ks < D
            a = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_down_ptr + w_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_K
            w_offs += BLOCK_K * F
        offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        slot = tl.load(row_slot_ptr + rows, mask=rows < n_rows, other=-1)
        w = tl.load(weight_ptr + slot, mask=row_ok, other=0.0)  # [BM]
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        tl.store(dw_partial_ptr + block_n.to(tl.int64) * n_rows + rows, tl.sum(acc * act, axis=1), mask=row_ok)
        d_act = acc * w[:, None]
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = σ(g)(1 + g(1 − σ(g)))
        d_up = d_act * silu
        tl.store(d_gate_ptr + offs, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
        tl.store(d_up_ptr + offs, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)
        tl.store(act_w_ptr + offs, (act * w[:, None]).to(act_w_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_WGRAD_CONFIGS, key=["WM", "WN", "TWO_OUTPUTS", "GATHER_LEFT"], prune_configs_by=_fp32_prune(_FP32_WGRAD)
)
@triton.jit
def _grouped_weight_grad_kernel(
    left_ptr,  # rows with WM columns: [R, WM] (or [N, WM] gathered through row_token when GATHER_LEFT)
    left2_ptr,  # a second left operand sharing the right one, when TWO_OUTPUTS
    right_ptr,  # rows with WN columns: [R, WN] (or [N, WN] when GATHER_RIGHT)
    out_ptr,  # [E, WM, WN] out
    out2_ptr,  # [E, WM, WN] out when TWO_OUTPUTS
    row_token_ptr,
    expert_tile_start_ptr,
    expert_order_ptr,
    WM,
    WN,
    ROW_TILE: tl.constexpr,  # the permutation's block_m: expert e owns rows [start_e, end_e) · ROW_TILE
    GATHER_LEFT: tl.constexpr,
    GATHER_RIGHT: tl.constexpr,
    TWO_OUTPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_WM: tl.constexpr,
    BLOCK_WN: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # out[e] = Σ_{rows r of e} left[r]ᵀ right[r]: a reduction over the expert's own segment of rows.
    pid = tl.program_id(0)
    blocks_wm = tl.cdiv(WM, BLOCK_WM)
    per_expert = blocks_wm * tl.cdiv(WN, BLOCK_WN)
    expert = tl.load(expert_order_ptr + pid // per_expert)
    block_wm = (pid % per_expert) % blocks_wm
    block_wn = (pid % per_expert) // blocks_wm
    row_start = tl.load(expert_tile_start_ptr + expert) * ROW_TILE
    row_end = tl.load(expert_tile_start_ptr + expert + 1) * ROW_TILE
    ms = block_wm * BLOCK_WM + tl.arange(0, BLOCK_WM)
    ns = block_wn * BLOCK_WN + tl.arange(0, BLOCK_WN)
    m_ok = ms < WM
    n_ok = ns < WN
    acc = tl.zeros((BLOCK_WM, BLOCK_WN), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_WM, BLOCK_WN), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        token = tl.load(row_token_ptr + rows, mask=rows < row_end, other=-1)
        row_ok = token >= 0
        if GATHER_LEFT:
            left_rows = token.to(tl.int64)
        else:
            left_rows = rows.to(tl.int64)
        if GATHER_RIGHT:
            right_rows = token.to(tl.int64)
        else:
            right_rows = rows.to(tl.int64)
        left_mask = m_ok[:, None] & row_ok[None, :]
        left_offs = left_rows[None, :] * WM + ms[:, None]  # [BWM, BR]: the transposed left tile
        lt = tl.load(left_ptr + left_offs, mask=left_mask, other=0.0)
        rt = tl.load(
            right_ptr + right_rows[:, None] * WN + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = tl.dot(lt, rt, acc, input_precision=DOT_PRECISION)
        if TWO_OUTPUTS:
            lt2 = tl.load(left2_ptr + left_offs, mask=left_mask, other=0.0)
            acc2 = tl.dot(lt2, rt, acc2, input_precision=DOT_PRECISION)
    out_offs = expert.to(tl.int64) * WM * WN + ms[:, None] * WN + ns[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if TWO_OUTPUTS:
        tl.store(out2_ptr + out_offs, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_COMBINE_CONFIGS, key=["D", "TOP_K", "HAS_WEIGHT"])
@triton.jit
def _combine_kernel(
    rows_ptr,  # [R, D]
    slot_row_ptr,  # [N, k]
    weight_ptr,  # [N, k] fp32 when HAS_WEIGHT
    out_ptr,  # [N, D] out
    n_tokens,
    D,
    TOP_K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < n_tokens
    mask = token_ok[:, None] & (ds < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(slot_row_ptr + tokens * TOP_K + j, mask=token_ok, other=0)
        value = tl.load(rows_ptr + row.to(tl.int64)[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            value = value * tl.load(weight_ptr + tokens * TOP_K + j, mask=token_ok, other=0.0)[:, None]
        acc += value
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * D + ds[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers -------------------------------------------------------------------------------------------


def _check_perm(perm: object, n_tokens: int | None = None) -> Permutation:
    if not isinstance(perm, Permutation):
        raise TypeError(f"perm: expected a Permutation from permute(), got {type(perm).__name__}")
    if n_tokens is not None and perm.n_tokens != n_tokens:
        raise ValueError(f"perm: expected a permutation of {n_tokens} tokens, got one of {perm.n_tokens}")
    return perm


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_tensor("out", out, shape=shape, dtypes=(like.dtype,), device=like.device)
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    return out


def _swiglu_forward(
    x: torch.Tensor, perm: Permutation, w_gate: torch.Tensor, w_up: torch.Tensor, store_pre: bool, out=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    d_model, d_ff = x.shape[1], w_gate.shape[1]
    act = _check_out(out, (perm.n_rows, d_ff), x)
    gate = torch.empty_like(act) if store_pre else act
    up = torch.empty_like(act) if store_pre else act
    grid = lambda meta: (perm.n_tiles * triton.cdiv(d_ff, meta["BLOCK_N"]),)
    if perm.n_tiles:
        _grouped_swiglu_kernel[grid](
            x, w_gate, w_up, act, gate, up, perm.row_token, perm.tile_expert, perm.n_tiles, perm.n_experts,
            d_model, d_ff, STORE_PRE=store_pre, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=perm.block_m,
        )  # fmt: skip
    return act, (gate if store_pre else None), (up if store_pre else None)


def _grouped_gemm(
    a: torch.Tensor,
    perm: Permutation,
    b: torch.Tensor,
    b_strides: tuple[int, int, int],
    n_out: int,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c[r] = a[r] B[e] (+ a2[r] B2[e])`` with ``B[e][k, n] = b[e·s_e + k·s_k + n·s_n]``."""
    c = _check_out(out, (perm.n_rows, n_out), a)
    grid = lambda meta: (perm.n_tiles * triton.cdiv(n_out, meta["BLOCK_N"]),)
    if perm.n_tiles:
        _grouped_gemm_kernel[grid](
            a, b, a if a2 is None else a2, b if b2 is None else b2, c, perm.row_token, perm.tile_expert,
            perm.n_tiles, perm.n_experts, n_out, a.shape[1], *b_strides, TWO_TERMS=a2 is not None,
            DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=perm.block_m,
        )  # fmt: skip
    return c


def _weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    perm: Permutation,
    gather_left: bool,
    gather_right: bool,
    left2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out[e] = Σ_{r∈e} left[r]ᵀ right[r]`` (and the same with ``left2``): ``[E, WM, WN]`` each."""
    wm, wn = left.shape[1], right.shape[1]
    out = torch.empty((perm.n_experts, wm, wn), dtype=left.dtype, device=left.device)
    out2 = torch.empty_like(out) if left2 is not None else out
    grid = lambda meta: (perm.n_experts * triton.cdiv(wm, meta["BLOCK_WM"]) * triton.cdiv(wn, meta["BLOCK_WN"]),)
    _grouped_weight_grad_kernel[grid](
        left, left if left2 is None else left2, right, out, out2, perm.row_token, perm.expert_tile_start,
        perm.expert_order, wm, wn, ROW_TILE=perm.block_m, GATHER_LEFT=gather_left, GATHER_RIGHT=gather_right,
        TWO_OUTPUTS=left2 is not None, DOT_PRECISION=dot_precision(left.dtype),
    )  # fmt: skip
    return out, (out2 if left2 is not None else None)


def _combine(
    rows: torch.Tensor, perm: Permutation, weight: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    d_model = rows.shape[1]
    y = _check_out(out, (perm.n_tokens, d_model), rows)
    grid = lambda meta: (triton.cdiv(perm.n_tokens, meta["BLOCK_T"]), triton.cdiv(d_model, meta["BLOCK_D"]))
    if perm.n_tokens:
        _combine_kernel[grid](
            rows, perm.slot_row, rows if weight is None else weight, y, perm.n_tokens, d_model, TOP_K=perm.top_k,
            HAS_WEIGHT=weight is not None,
        )  # fmt: skip
    return y


def _check_rows(name: str, t: torch.Tensor, perm: Permutation) -> torch.Tensor:
    check_tensor(name, t, shape=(perm.n_rows, None), dtypes=_KERNEL_DTYPES)
    ensure_cuda_or_interpreter(t, names=(name,))
    return t.contiguous()


def grouped_swiglu(
    x: torch.Tensor,
    perm: Permutation,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    return_pre: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act[r] = silu(W_gate[e] x_t) ⊙ W_up[e] x_t`` for every row r (token t = row_token[r], expert e of
    its tile): one grouped GEMM over gate‖up with the SwiGLU epilogue fused.

    Args:
        x: ``[N, D]`` tokens in their original order. w_gate, w_up: ``[E, F, D]``.
        return_pre: also return the pre-activations ``gate, up`` (what the backward needs).
        out: optional ``[R, F]`` buffer for act.
    Returns:
        ``act [R, F]`` (padding rows unspecified), or ``(act, gate, up)``.
    """
    perm = _check_perm(perm)
    check_tensor("x", x, shape=(perm.n_tokens, None), dtypes=_KERNEL_DTYPES)
    check_tensor("w_gate", w_gate, shape=(perm.n_experts, None, x.shape[1]), dtypes=(x.dtype,), device=x.device)
    check_tensor("w_up", w_up, shape=tuple(w_gate.shape), dtypes=(x.dtype,), device=x.device)
    ensure_cuda_or_interpreter(x, w_gate, w_up, names=("x", "w_gate", "w_up"))
    act, gate, up = _swiglu_forward(x.contiguous(), perm, w_gate.contiguous(), w_up.contiguous(), return_pre, out)
    return (act, gate, up) if return_pre else act


def grouped_matmul(
    a: torch.Tensor, perm: Permutation, weight: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c[r] = W[e] a[r]`` (``a @ W[e]ᵀ``, ``nn.Linear`` layout) for every row r of expert e's tiles.

    Args:
        a: ``[R, K]`` rows in the permuted layout (e.g. the act of :func:`grouped_swiglu`). weight: ``[E, N, K]``.
        out: optional ``[R, N]`` buffer.
    Returns:
        ``[R, N]`` (padding rows unspecified).
    """
    perm = _check_perm(perm)
    a = _check_rows("a", a, perm)
    check_tensor("weight", weight, shape=(perm.n_experts, None, a.shape[1]), dtypes=(a.dtype,), device=a.device)
    weight = weight.contiguous()
    n_out, k_in = weight.shape[1], weight.shape[2]
    return _grouped_gemm(a, perm, weight, (n_out * k_in, 1, k_in), n_out, out=out)


def unpermute_combine(
    rows: torch.Tensor,
    perm: Permutation,
    topk_weight: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t] = Σ_j w_tj · rows[slot_row[t, j]]`` (unweighted when ``topk_weight`` is None).

    Args:
        rows: ``[R, D]`` expert outputs in the permuted layout. topk_weight: ``[N, k]`` or None.
    Returns:
        ``[N, D]`` in the dtype of rows (accumulated in fp32).
    """
    perm = _check_perm(perm)
    rows = _check_rows("rows", rows, perm)
    weight = None
    if topk_weight is not None:
        check_tensor("topk_weight", topk_weight, shape=(perm.n_tokens, perm.top_k), device=rows.device)
        weight = topk_weight.to(torch.float32).contiguous()
    return _combine(rows, perm, weight, out)


class _RoutedExperts(torch.autograd.Function):
    """Forward: grouped SwiGLU → grouped down GEMM → weighted combine. Backward: Triton GEMMs only."""

    @staticmethod
    def forward(ctx, x, topk_weight, w_gate, w_up, w_down, perm):
        weight = topk_weight.to(torch.float32).contiguous().view(-1)  # [N·k] by flat slot
        store_pre = any(ctx.needs_input_grad[:5])
        act, gate, up = _swiglu_forward(x, perm, w_gate, w_up, store_pre)
        d_model, d_ff = x.shape[1], w_gate.shape[1]
        rows = _grouped_gemm(act, perm, w_down, (d_model * d_ff, 1, d_ff), d_model)  # [R, D] = act W_down[e]ᵀ
        y = _combine(rows, perm, weight.view(perm.n_tokens, perm.top_k))
        ctx.perm = perm
        ctx.save_for_backward(x, weight, w_gate, w_up, w_down, gate, up)
        ctx.weight_dtype = topk_weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        perm: Permutation = ctx.perm
        need_x, need_w, need_gate, need_up, need_down = ctx.needs_input_grad[:5]
        dy = dy.to(x.dtype).contiguous()
        d_model, d_ff = x.shape[1], w_gate.shape[1]
        d_gate = torch.empty_like(gate)
        d_up = torch.empty_like(up)
        act_w = torch.empty_like(gate)
        max_blocks_n = triton.cdiv(d_ff, min(c.kwargs["BLOCK_N"] for c in [*_SWIGLU_BWD_CONFIGS, *_FP32_GEMM]))
        dw_partial = torch.empty((max_blocks_n, perm.n_rows), dtype=torch.float32, device=x.device)
        grid = lambda meta: (perm.n_tiles * triton.cdiv(d_ff, meta["BLOCK_N"]),)
        if perm.n_tiles:
            _swiglu_backward_kernel[grid](
                dy, w_down, gate, up, weight, d_gate, d_up, act_w, dw_partial, perm.row_token, perm.row_slot,
                perm.tile_expert, perm.n_tiles, perm.n_experts, d_model, d_ff,
                DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=perm.block_m,
            )  # fmt: skip
        dx = d_topk_weight = d_w_gate = d_w_up = d_w_down = None
        if need_w and not perm.n_tiles:  # no token reached an expert: the kernel did not run
            d_topk_weight = torch.zeros(perm.slot_row.shape, dtype=ctx.weight_dtype, device=x.device)
        elif need_w:
            # Only the column blocks of the config that actually ran hold partial sums.
            blocks_n = triton.cdiv(d_ff, _swiglu_backward_kernel.best_config.kwargs["BLOCK_N"])
            dw_rows = dw_partial[:blocks_n].sum(0)  # [R]
            d_topk_weight = dw_rows[perm.slot_row.long()].to(ctx.weight_dtype)  # [N, k]
        if need_down:
            d_w_down, _ = _weight_grad(dy, act_w, perm, gather_left=True, gather_right=False)  # [E, D, F]
        if need_gate or need_up:
            d_w_gate, d_w_up = _weight_grad(d_gate, x, perm, gather_left=False, gather_right=True, left2=d_up)
        if need_x:
            dx_rows = _grouped_gemm(d_gate, perm, w_gate, (d_ff * d_model, d_model, 1), d_model, d_up, w_up)
            dx = _combine(dx_rows, perm, None)
        return dx, d_topk_weight, d_w_gate, d_w_up, d_w_down, None


def routed_experts_triton(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    perm: Permutation | None = None,
) -> torch.Tensor:
    """Triton version of :func:`nanokimi.moe.reference.routed_experts`, differentiable in x, topk_weight and
    the three expert weights.

    Args:
        x: ``[N, D]``. topk_idx, topk_weight: ``[N, k]``. w_gate, w_up: ``[E, F, D]``; w_down: ``[E, D, F]``
            (same dtype as x: fp32, bf16 or fp16). perm: a precomputed :func:`permute` of topk_idx (optional).
    Returns:
        ``[N, D]`` in the dtype of x.
    """
    check_tensor("x", x, ndim=2, dtypes=_KERNEL_DTYPES)
    n_experts, _ = check_expert_weights(w_gate, w_up, w_down, None, x.shape[1], x)
    if w_gate.dtype != x.dtype:
        raise TypeError(f"w_gate: expected the dtype of x ({x.dtype}), got {w_gate.dtype}")
    check_tensor("topk_idx", topk_idx, shape=(x.shape[0], None), dtypes=(torch.int64, torch.int32), device=x.device)
    check_tensor("topk_weight", topk_weight, shape=tuple(topk_idx.shape), device=x.device)
    ensure_cuda_or_interpreter(x, w_gate, w_up, w_down, names=("x", "w_gate", "w_up", "w_down"))
    perm = permute(topk_idx, n_experts) if perm is None else _check_perm(perm, x.shape[0])
    return _RoutedExperts.apply(
        x.contiguous(), topk_weight, w_gate.contiguous(), w_up.contiguous(), w_down.contiguous(), perm
    )


def moe_forward_triton(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    routed_scaling_factor: float = 1.0,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> torch.Tensor:
    """:func:`nanokimi.moe.reference.moe_forward` with the routed experts on Triton kernels.

    Routing (a [N, E] sigmoid and a sort) and the dense shared expert stay in torch; autograd flows through
    the routing weights into ``x`` and ``router_weight`` as in the reference.
    """
    _, d_model, n_experts = check_moe_args(x, router_weight, expert_bias, top_k, n_groups, topk_groups)
    check_expert_weights(w_gate, w_up, w_down, n_experts, d_model, x)
    topk_idx, topk_weight = route(x, router_weight, expert_bias, top_k, routed_scaling_factor, n_groups, topk_groups)
    y = routed_experts_triton(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    if shared is not None:
        y = y + swiglu_ffn(x, *shared)
    return y

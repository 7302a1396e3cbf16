"""Benchmark the K2 MoE kernels on the GPU: ``python -m nanokimi.moe.bench``.

Shape (handbook §9): 16384 tokens, top-8 of 64 experts, D = 2048 → F = 1024, bf16; routing balanced (router
at initialisation) and skewed (an expert bias that puts expert 0 in half the tokens' top-8, 4× the mean load).
Anchors, timed in the same run:

* ``torch._grouped_mm`` for the expert GEMMs (its input pre-sorted by expert, unpadded; SwiGLU in torch),
* the loop over experts (``reference.moe_forward`` in bf16), forward and forward+backward,
* a dense bf16 matmul with the same FLOPs and shapes (``[N·k, D]·[D, 2F]`` then ``[N·k, F]·[F, D]``): the
  ceiling; ``roofline_frac`` is our TFLOP/s over its TFLOP/s.

TFLOP/s count the expert GEMMs only: 2·N·k·3·D·F forward, 3× that for forward+backward (the router's
2·N·D·E is < 1 %).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from nanokimi.bench import Table, time_ms
from nanokimi.moe.kernels import grouped_matmul, grouped_swiglu, moe_forward_triton, permute
from nanokimi.moe.reference import moe_forward, route
from nanokimi.testing import rel_err

N_TOKENS, N_EXPERTS, TOP_K, D_MODEL, D_FF = 16384, 64, 8, 2048, 1024
SCALE = 2.446


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """bf16 N(0, scale²) drawn on the GPU (the CPU-side ``nanokimi.testing.randn`` is slow at 10⁸ elements)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, device="cuda")).to(torch.bfloat16)


def _skewing_bias(x: torch.Tensor, router_weight: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """An expert bias (only expert 0's entry non-zero) that puts expert 0 in ``share`` of the tokens' top-k."""
    low, high = 0.0, 1.0
    bias = torch.zeros(router_weight.shape[0], device=x.device)
    for _ in range(30):  # bisection: the share grows monotonically with the bias
        bias[0] = (low + high) / 2
        idx, _ = route(x, router_weight, bias, TOP_K)
        if float((idx == 0).any(1).float().mean()) < share:
            low = float(bias[0])
        else:
            high = float(bias[0])
    return bias


def _grouped_mm_experts(x_sorted, offs, w_gate_up_t, w_down_t):
    """The anchor's expert GEMMs: rows already sorted by expert; W passed as ``[E, K, N]`` transposed views."""
    h = torch._grouped_mm(x_sorted, w_gate_up_t, offs=offs)  # [N·k, 2F]
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down_t, offs=offs)  # [N·k, D]


def _grouped_mm_layer(x, router_weight, bias, w_gate_up, w_down):
    """The whole layer on ``torch._grouped_mm`` (autograd through it): route, sort, GEMMs, weighted scatter-add."""
    idx, weight = route(x, router_weight, bias, TOP_K, SCALE)
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=N_EXPERTS), 0).to(torch.int32)
    token = order // TOP_K
    rows = _grouped_mm_experts(x[token], offs, w_gate_up.transpose(1, 2), w_down.transpose(1, 2))
    rows = rows * weight.flatten()[order, None].to(rows.dtype)
    return torch.zeros_like(x).index_add_(0, token, rows)


def _show(row: dict) -> None:
    """Print a row as soon as it is measured (a crash later in the run still leaves the numbers in the log)."""
    shown = {key: f"{v:.4g}" if isinstance(v, float) else v for key, v in row.items()}
    print("   row:", shown, flush=True)


def _bench_routing(table: Table, routing: str, x, weights, dy, flops: float, dense_ms: float) -> None:
    """Three rows for one routing: expert GEMMs vs torch._grouped_mm, layer fwd and fwd+bwd vs the loop."""
    router_weight, w_gate, w_up, w_down, w_gate_up = weights
    n, e, k, d, f = N_TOKENS, N_EXPERTS, TOP_K, D_MODEL, D_FF
    dense_tflops = flops / dense_ms * 1e-9
    leaves = [t.detach().clone().requires_grad_() for t in (x, router_weight, w_gate, w_up, w_down)]
    anchor_leaves = [t.detach().clone().requires_grad_() for t in (x, router_weight, w_gate_up, w_down)]
    bias = torch.zeros(e, device=x.device) if routing == "balanced" else _skewing_bias(x, router_weight)
    idx, weight = route(x, router_weight, bias, k, SCALE)
    counts = torch.bincount(idx.flatten(), minlength=e)
    perm = permute(idx, e)
    shape = f"N={n} k={k} E={e} D={d} F={f} {routing} (max/mean load {float(counts.max() / counts.float().mean()):.2f})"
    print(f"== {shape}; padded rows {int(perm.expert_tile_start[-1]) * perm.block_m} for {n * k} slots")

    # Expert GEMMs only, routing given: ours vs torch._grouped_mm on pre-sorted rows.
    order = torch.argsort(idx.flatten(), stable=True)
    x_sorted = x[order // k].contiguous()
    offs = torch.cumsum(counts, 0).to(torch.int32)
    w_gate_up_t, w_down_t = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    ours = lambda: grouped_matmul(grouped_swiglu(x, perm, w_gate, w_up), perm, w_down)
    anchor = lambda: _grouped_mm_experts(x_sorted, offs, w_gate_up_t, w_down_t)
    ours_rows = ours()[perm.slot_row.long().flatten()[order]]
    print(f"   rel_err(ours, torch._grouped_mm) on the expert outputs: {rel_err(ours_rows, anchor()):.2e}")
    ours_ms, anchor_ms = time_ms(ours), time_ms(anchor)
    tflops = flops / ours_ms * 1e-9
    _show(
        table.add(
            "expert GEMMs fwd (gate‖up+SwiGLU, down)",
            shape,
            ours_ms,
            "torch._grouped_mm",
            anchor_ms,
            tflops=tflops,
            roofline_frac=tflops / dense_tflops,
            anchor_tflops=flops / anchor_ms * 1e-9,
            dense_ms=dense_ms,
        )
    )

    # The whole layer (router + permutation + experts + combine), no shared expert: ours vs the loop.
    args = (bias, w_gate, w_up, w_down, k, SCALE)
    ours = lambda: moe_forward_triton(x, router_weight, *args)
    loop = lambda: moe_forward(x, router_weight, *args)
    print(f"   rel_err(ours, loop) on the layer output: {rel_err(ours(), loop()):.2e}")
    ours_ms, loop_ms = time_ms(ours), time_ms(loop)
    tflops = flops / ours_ms * 1e-9
    _show(
        table.add(
            "MoE layer fwd",
            shape,
            ours_ms,
            "loop over experts (bf16)",
            loop_ms,
            tflops=tflops,
            roofline_frac=tflops / dense_tflops,
        )
    )

    def fwd_bwd(forward, params):
        return lambda: torch.autograd.grad(forward(*params), params, dy)

    ours = fwd_bwd(lambda *p: moe_forward_triton(p[0], p[1], bias, *p[2:], k, SCALE), leaves)
    loop = fwd_bwd(lambda *p: moe_forward(p[0], p[1], bias, *p[2:], k, SCALE), leaves)
    grouped = fwd_bwd(lambda *p: _grouped_mm_layer(p[0], p[1], bias, *p[2:]), anchor_leaves)
    ours_grads, loop_grads = ours(), loop()
    errs = ", ".join(
        f"{name} {rel_err(a, b):.1e}"
        for name, a, b in zip("x rw wg wu wd".split(), ours_grads, loop_grads, strict=True)
    )
    print(f"   rel_err(ours, loop) of the gradients: {errs}")
    ours_ms, loop_ms, grouped_ms = time_ms(ours), time_ms(loop), time_ms(grouped)
    tflops = 3 * flops / ours_ms * 1e-9
    _show(
        table.add(
            "MoE layer fwd+bwd",
            shape,
            ours_ms,
            "loop over experts (bf16)",
            loop_ms,
            tflops=tflops,
            roofline_frac=tflops / dense_tflops,
            grouped_mm_layer_ms=grouped_ms,
        )
    )


def main() -> None:
    n, e, k, d, f = N_TOKENS, N_EXPERTS, TOP_K, D_MODEL, D_FF
    x = _randn(n, d, seed=0)
    router_weight = _randn(e, d, seed=1, scale=d**-0.5)
    w_gate = _randn(e, f, d, seed=2, scale=d**-0.5)
    w_up = _randn(e, f, d, seed=3, scale=d**-0.5)
    w_down = _randn(e, d, f, seed=4, scale=f**-0.5)
    w_gate_up = torch.cat([w_gate, w_up], dim=1)  # [E, 2F, D]: the anchor's preferred layout, built once
    flops = 2 * n * k * 3 * d * f

    dense_a, dense_h = _randn(n * k, d, seed=5), _randn(n * k, f, seed=6)
    dense_w1, dense_w2 = _randn(d, 2 * f, seed=7), _randn(f, d, seed=8)
    dense_ms = time_ms(lambda: (dense_a @ dense_w1, dense_h @ dense_w2))
    dense_tflops = flops / dense_ms * 1e-9
    print(f"dense bf16 matmul, same FLOPs: {dense_ms:.3f} ms = {dense_tflops:.0f} TFLOP/s")

    table = Table("05_moe_k2: K2 MoE grouped GEMM and layer, bf16")
    dy = _randn(n, d, seed=9)
    weights = (router_weight, w_gate, w_up, w_down, w_gate_up)
    for routing in ("balanced", "skewed"):
        _bench_routing(table, routing, x, weights, dy, flops, dense_ms)
    table.save(Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()

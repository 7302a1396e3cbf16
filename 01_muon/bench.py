"""Benchmark (GPU): symmetric Newton–Schulz in Triton vs plain-torch NS in bf16 and its torch.compile; a full
``Muon.step`` over eight 4096² parameters vs ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``.

``python -m nanokimi.muon.bench`` writes ``results/<gpu>.json`` and ``.png`` and refreshes the README table.

Columns: ``tflops`` counts the FLOPs our kernels execute (one triangle of each symmetric product,
``3r²k + r³`` per step); ``roofline_frac`` divides that by the measured dense bf16 ceiling (771 TFLOP/s);
``sym_bound_frac`` is the speedup over the anchor divided by the symmetric bound ``(4e + 2)/(3e + 1)`` — 1.0 means
every saved FLOP turned into saved time at the anchor's efficiency. It can exceed 1: the anchor also spends time
outside its matmuls (the separate ``b·A + c·A²`` and ``a·X + B·X`` passes, the normalisation), which our fused
epilogues do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanokimi.bench import H100_BF16_TFLOPS, Table, time_ms
from nanokimi.muon.kernels import newton_schulz_triton
from nanokimi.muon.optimizer import Muon
from nanokimi.muon.reference import newton_schulz, ns_flops
from nanokimi.testing import randn

NS_SHAPES = [(4096, 4096), (8192, 8192), (2048, 8192)]
STEP_PARAMS, STEP_DIM = 8, 4096


def _check(ours: torch.Tensor, anchor: torch.Tensor, what: str) -> None:
    """A fast wrong kernel must not produce a row: outputs agree to bf16 rounding first."""
    err = float((ours.detach().float() - anchor.detach().float()).abs().max())
    if not err <= 5e-2:
        raise RuntimeError(f"{what}: Triton and anchor outputs differ by {err:.3g} (max-abs); not timing it")


def bench_newton_schulz(table: Table) -> None:
    compiled = torch.compile(newton_schulz, dynamic=False)
    for m, n in NS_SHAPES:
        G = randn(m, n, seed=0, device="cuda", dtype=torch.bfloat16)
        _check(newton_schulz_triton(G), newton_schulz(G), f"NS {m}x{n}")
        ours = time_ms(lambda G=G: newton_schulz_triton(G), rep=200)
        plain = time_ms(lambda G=G: newton_schulz(G), rep=200)
        _check(compiled(G), newton_schulz(G), f"compiled NS {m}x{n}")
        comp = time_ms(lambda G=G: compiled(G), rep=200)
        executed = ns_flops(m, n, symmetric=True)
        bound = ns_flops(m, n) / executed
        tflops = executed / ours / 1e9
        for anchor, anchor_ms in (("plain torch NS (bf16)", plain), ("torch.compile NS (bf16)", comp)):
            table.add(
                "Triton symmetric NS5",
                f"{m}x{n} bf16",
                ours,
                anchor,
                anchor_ms,
                tflops=tflops,
                roofline_frac=tflops / H100_BF16_TFLOPS,
                sym_bound=round(bound, 3),
                sym_bound_frac=anchor_ms / ours / bound,
            )


def bench_muon_step(table: Table) -> None:
    def make(seed: int) -> list[torch.nn.Parameter]:
        params = [
            torch.nn.Parameter(randn(STEP_DIM, STEP_DIM, seed=seed + i, device="cuda")) for i in range(STEP_PARAMS)
        ]
        for i, p in enumerate(params):
            p.grad = randn(STEP_DIM, STEP_DIM, seed=100 + i, device="cuda")
        return params

    ours_params, torch_params = make(0), make(0)
    ours = Muon(ours_params, lr=1e-3, weight_decay=0.1, backend="triton")
    anchor = torch.optim.Muon(torch_params, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours.step()
    anchor.step()
    _check(torch.stack(list(ours_params)), torch.stack(list(torch_params)), "Muon.step")
    ours_ms = time_ms(ours.step, rep=300)
    anchor_ms = time_ms(anchor.step, rep=300)
    executed = STEP_PARAMS * ns_flops(STEP_DIM, STEP_DIM, symmetric=True)
    tflops = executed / ours_ms / 1e9
    table.add(
        "Muon.step, backend=triton",
        f"{STEP_PARAMS}x{STEP_DIM}x{STEP_DIM} fp32",
        ours_ms,
        'torch.optim.Muon("match_rms_adamw")',
        anchor_ms,
        tflops=tflops,
        roofline_frac=tflops / H100_BF16_TFLOPS,
        sym_bound=1.5,
        sym_bound_frac=anchor_ms / ours_ms / 1.5,
    )


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("nanokimi.muon.bench: needs a CUDA device (the kernels are timed compiled)")
    table = Table("01_muon: Newton–Schulz (5 steps) and Muon.step")
    bench_newton_schulz(table)
    bench_muon_step(table)
    table.save(Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()

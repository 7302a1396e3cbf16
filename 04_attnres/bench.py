"""Benchmark: ``python -m nanokimi.attnres.bench [--stream] [--only SECTION ...]`` (GPU). Anchors are timed in the
same run; ``--only`` prints the chosen sections and leaves results/ and the README alone.

Shapes (issue 6): L = 32 sublayers, block 8, B·T = 16384 tokens, D = 2048, bf16, forward and forward+backward.

* phase 1 — N = 5 sources (the embedding and 4 completed blocks), S = 8 queries: a fifth block's phase 1, one
  block deeper than the largest phase-1 call of L = 32 (its last block sees N = 4; N = 5 is its final
  aggregation, which has one query); and N = 17, S = 1: Full AttnRes' average call at L = 32 (sublayer l reads
  l + 1 sources, the final query 33), which runs on the one-query row kernels (anchors: eager torch and
  flash-attn-res; torch.compile would recompile for the new shape);
* phase 2 — one online merge. These rows time one small op at a time, so host-side work (argument checks, autograd)
  is part of them; in a training step it overlaps the GPU work;
* TinyKimi training step — the model the chapters build, preset ``gpu-small`` (8 layers, D = 1024, 16 residual
  sublayers, Block AttnRes block size 4, MoE; fp32, Triton backends), one batch of 8 × 506 random tokens (the shape
  of backend_parity's MQAR batch), residual ``standard`` / ``block`` / ``full`` from the same seed. Timed, per step:
  ``zero_grad``, forward, cross-entropy over all positions, backward (the "fwd+bwd" rows), then the
  ``MuonWithAdamW`` step of ``nanokimi.train.build_optimizer`` (the "step" rows; QK-clip and the MoE bias update are
  left out). The learning rate is 0: the optimizer does all its arithmetic but the weights stay put, so every step
  and every mode routes the same tokens to the same experts. Median wall-clock (synchronised) of 15 steps after 3
  warm-up steps; the first step compiles every chapter's kernels;
* stand-in step — fwd+bwd (no optimizer) of L = 32 pre-norm SwiGLU sublayers (D = 2048, d_ff = 5632, 16384
  tokens, bf16) with each residual mode, the issue's kernel shape. The harsher test: bf16 matmuls are fast, so the
  residual's memory traffic is a larger share of the step than in the fp32 TinyKimi;
* whole stream (only with ``--stream``, about a minute more) — the depth mixing of a 32-sublayer Block AttnRes
  stack (identity sublayers, so only the residual machinery is timed): ours is
  ``ResidualStream("block", backend="triton")``; the anchors run the textbook two-phase loop (stack the blocks,
  phase 1 per block, a merge per sublayer) on their own phase kernels (eager torch and flash-attn-res;
  torch.compile would recompile for every source count 1…5, fwd and bwd).

Anchors: eager torch, ``torch.compile`` (default mode) of the same torch functions, and the flash-attn-res 0.1.12
Triton phase kernels (its autotuner runs on the phase rows; the stream rows reuse the configs it picked there, so
that every source count does not re-run the full autotune). GB/s counts the bytes each op must move at least
(read inputs once, write outputs once), against the measured 3.0 TB/s H100 copy ceiling. Each section prints the
seconds elapsed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.attnres import ResidualStream, depth_attention_triton, online_merge_triton
from nanokimi.bench import H100_COPY_TBPS, Table, time_ms

TOKENS, D, L, BLOCK, N_SOURCES = 16384, 2048, 32, 8, 5
FULL_SOURCES = 17  # Full AttnRes at L = 32: sublayer l reads l + 1 sources, 17 on average over the 33 calls
D_FF = 5632
TINYKIMI_BATCH, TINYKIMI_SEQ = 8, 506  # backend_parity's MQAR batch (26 pairs, gap 400): 4048 tokens
TINYKIMI_WARMUP, TINYKIMI_STEPS = 3, 15
EPS = 1e-6
DTYPE = torch.bfloat16
CHAPTER = Path(__file__).resolve().parent


# --- the torch anchors: plain two-phase functions (the same code runs eager and under torch.compile) -----------------
def torch_phase1(values: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N, B, T, D], queries [S, D] → out [S, B, T, D] (values' dtype), lse [S, B, T] fp32."""
    v = values.float()
    inv_rms = torch.rsqrt(v.pow(2).mean(-1) + EPS)  # [N, B, T]
    logits = torch.einsum("nbtd,sd->snbt", v, queries.float()) * inv_rms  # [S, N, B, T]
    lse = torch.logsumexp(logits, dim=1)  # [S, B, T]
    out = torch.einsum("snbt,nbtd->sbtd", torch.exp(logits - lse[:, None]), v)
    return out.to(values.dtype), lse


def torch_merge(out1: torch.Tensor, lse1: torch.Tensor, partial: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Phase 2: softmax merge of (out1, lse1) with the partial sum; [B, T, D] in, [B, T, D] out."""
    x, o = partial.float(), out1.float()
    z = (x @ query.float()) * torch.rsqrt(x.pow(2).mean(-1) + EPS)
    w = torch.sigmoid(z - lse1).unsqueeze(-1)
    return (o + w * (x - o)).to(partial.dtype)


def two_phase_stream(emb: torch.Tensor, queries: torch.Tensor, phase1: Callable, merge: Callable) -> torch.Tensor:
    """Block AttnRes with identity sublayers, the textbook two-phase loop (queries [L + 1, D], last = final)."""
    blocks = [emb]
    for start in range(0, L, BLOCK):
        stop = min(start + BLOCK, L)
        out1, lse1 = phase1(torch.stack(blocks), queries[start:stop])
        out1, lse1 = out1.unbind(0), lse1.unbind(0)
        partial = None
        for i in range(stop - start):
            h = out1[0] if i == 0 else merge(out1[i], lse1[i], partial, queries[start + i])
            v = h  # identity sublayer
            partial = v if partial is None else partial + v
        blocks.append(partial)
    out, _ = phase1(torch.stack(blocks), queries[L:])
    return out[0]


def far_ops():
    """flash-attn-res 0.1.12's phase ops and kernels, or None when the wheel is not installed."""
    try:
        import flash_attn_res as far
    except ImportError:
        return None
    eps = EPS
    return {
        "phase1": lambda values, queries: far.phase_1_batched_attention_triton_op(values, queries, eps),
        "merge": lambda out1, lse1, partial, query: far.phase_2_online_softmax_merge_triton_op(
            partial, query, out1, lse1, eps
        ),
        "module": far,
    }


def freeze_far_autotune(far) -> None:
    """Keep only the configs flash-attn-res's autotuner chose on the phase rows (via its own set_autotune_configs)."""
    for kernel in (
        far.phase_1_batched_attention_forward_kernel,
        far.phase_1_batched_attention_backward_kernel,
        far.phase_2_online_softmax_merge_forward_kernel,
        far.phase_2_online_softmax_merge_backward_kernel,
        far.reduce_grad_queries_kernel,
    ):
        best = getattr(kernel, "best_config", None)
        if best is not None:
            far.set_autotune_configs(kernel, [best])


# --- timing helpers --------------------------------------------------------------------------------------------------
def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], object]:
    """A closure running fn(*inputs) and the gradients w.r.t. every input that requires grad (nothing accumulates)."""
    wrt = [t for t in inputs if t.requires_grad]

    def run():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, wrt, grads[: len(outs)])

    return run


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def report(table: Table, name: str, shape: str, ours_ms: float, anchors: dict, nbytes: float | None) -> None:
    for anchor, anchor_ms in anchors.items():
        extra = {}
        if nbytes is not None:
            extra = {"gbps": gbps(nbytes, ours_ms), "anchor_gbps": gbps(nbytes, anchor_ms)}
        frac = None if nbytes is None else gbps(nbytes, ours_ms) / (H100_COPY_TBPS * 1e3)
        row = table.add(name, shape, ours_ms, anchor, anchor_ms, roofline_frac=frac, **extra)
        print(
            f"  {name:28s} ours {ours_ms:8.3f} ms | {anchor:22s} {anchor_ms:8.3f} ms | ×{row['speedup']:.2f}",
            flush=True,
        )


# --- benchmarks ------------------------------------------------------------------------------------------------------
def bench_phase1(table: Table, far, compiled: dict | None, n: int, s: int) -> None:
    """Phase 1 at N sources × S queries; torch.compile only where ``compiled`` is given (one shape per compile)."""
    b = 2  # bytes per element of a [B·T, D] plane below
    shape = f"N={n} S={s} BT={TOKENS} D={D} bf16"
    values = (torch.randn(n, 1, TOKENS, D, device="cuda") * torch.rand(n, 1, 1, 1, device="cuda") * 3).to(DTYPE)
    queries = torch.randn(s, D, device="cuda") / D**0.5
    values.requires_grad_(), queries.requires_grad_()
    dout = torch.randn(s, 1, TOKENS, D, device="cuda", dtype=DTYPE)
    dlse = torch.randn(s, 1, TOKENS, device="cuda")
    plane = TOKENS * D * b
    fwd_bytes = (n + s) * plane + s * TOKENS * 4
    bwd_bytes = fwd_bytes + (2 * n + s) * plane + s * TOKENS * 4  # + read V, dO, dlse; write dV
    impls = {"ours": lambda v, q: depth_attention_triton(v, q, None, EPS)}
    anchors = {"eager torch": torch_phase1}
    if compiled is not None:
        anchors["torch.compile"] = compiled["phase1"]
    if far is not None:
        anchors["flash-attn-res 0.1.12"] = far["phase1"]
    for label, nbytes, make in (
        ("phase1 fwd", fwd_bytes, lambda f: lambda: f(values, queries)),
        ("phase1 fwd+bwd", bwd_bytes, lambda f: fwd_bwd(f, [values, queries], [dout, dlse])),
    ):
        ours = time_ms(make(impls["ours"]))
        report(table, label, shape, ours, {k: time_ms(make(f)) for k, f in anchors.items()}, nbytes)


def bench_merge(table: Table, far, compiled: dict) -> None:
    shape = f"BT={TOKENS} D={D} bf16"
    out1 = torch.randn(1, TOKENS, D, device="cuda", dtype=DTYPE).requires_grad_()
    partial = (3 * torch.randn(1, TOKENS, D, device="cuda")).to(DTYPE).requires_grad_()
    lse1 = torch.randn(1, TOKENS, device="cuda").requires_grad_()
    query = (torch.randn(D, device="cuda") / D**0.5).requires_grad_()
    dh = torch.randn(1, TOKENS, D, device="cuda", dtype=DTYPE)
    plane = TOKENS * D * 2
    fwd_bytes = 3 * plane + TOKENS * 4
    bwd_bytes = fwd_bytes + 5 * plane + 2 * TOKENS * 4  # + read dh, out1, partial; write dout1, dpartial, dlse1
    inputs = [out1, lse1, partial, query]
    ours = lambda o, l, p, q: online_merge_triton(o, l, p, q, None, EPS)
    anchors = {"eager torch": torch_merge, "torch.compile": compiled["merge"]}
    if far is not None:
        anchors["flash-attn-res 0.1.12"] = far["merge"]
    for label, nbytes, make in (
        ("phase2 merge fwd", fwd_bytes, lambda f: lambda: f(*inputs)),
        ("phase2 merge fwd+bwd", bwd_bytes, lambda f: fwd_bwd(f, inputs, [dh])),
    ):
        report(table, label, shape, time_ms(make(ours)), {k: time_ms(make(f)) for k, f in anchors.items()}, nbytes)


def bench_stream(table: Table, far) -> None:
    shape = f"L={L} block={BLOCK} BT={TOKENS} D={D} bf16"
    emb = torch.randn(1, TOKENS, D, device="cuda", dtype=DTYPE).requires_grad_()
    queries = (torch.randn(L + 1, D, device="cuda") / D**0.5).requires_grad_()
    dout = torch.randn(1, TOKENS, D, device="cuda", dtype=DTYPE)
    stream = ResidualStream("block", L, D, BLOCK, backend="triton").cuda()
    with torch.no_grad():
        for l, q in enumerate(stream.queries):
            q.copy_(queries[l])
    identity = [lambda h: h] * L
    ours = lambda e, *params: stream(e, identity)
    anchors = {"eager torch": lambda e, q: two_phase_stream(e, q, torch_phase1, torch_merge)}
    if far is not None:
        freeze_far_autotune(far["module"])
        anchors["flash-attn-res 0.1.12"] = lambda e, q: two_phase_stream(e, q, far["phase1"], far["merge"])
    ours_inputs = [emb, *stream.parameters()]
    fwd_ms = time_ms(lambda: ours(emb))
    report(
        table, "stream fwd", shape, fwd_ms, {k: time_ms(lambda f=f: f(emb, queries)) for k, f in anchors.items()}, None
    )
    ours_ms = time_ms(fwd_bwd(ours, ours_inputs, [dout]))
    anchor_ms = {k: time_ms(fwd_bwd(f, [emb, queries], [dout])) for k, f in anchors.items()}
    report(table, "stream fwd+bwd", shape, ours_ms, anchor_ms, None)


class SwiGLU(nn.Module):
    """Pre-norm SwiGLU MLP sublayer: v = W_out (silu(a) ⊙ b), [a, b] = W_in RMSNorm(h)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.w_in = nn.Linear(d, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(self.norm(h)).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


def bench_standin_step(table: Table) -> None:
    """fwd+bwd of the stand-in stack (no optimizer), median of do_bench, for each residual mode."""
    batch, seq = 4, TOKENS // 4
    shape = f"L={L} SwiGLU D={D} ff={D_FF} B={batch} T={seq} bf16"
    sublayers = nn.ModuleList(SwiGLU(D, D_FF) for _ in range(L)).cuda().to(DTYPE)
    emb = torch.randn(batch, seq, D, device="cuda", dtype=DTYPE).requires_grad_()
    dout = torch.randn(batch, seq, D, device="cuda", dtype=DTYPE)

    def step_ms(stream: ResidualStream) -> float:
        def step():
            out = stream(emb, list(sublayers))
            torch.autograd.backward(out, dout)

        ms = time_ms(step, warmup=200, rep=1000)
        sublayers.zero_grad(set_to_none=True)
        stream.zero_grad(set_to_none=True)
        return ms

    standard = step_ms(ResidualStream("standard", L, D).cuda())
    for mode, block in (("block", BLOCK), ("full", None)):
        stream = ResidualStream(mode, L, D, block, backend="triton").cuda()
        with torch.no_grad():
            for q in stream.queries:
                q.normal_(0.0, D**-0.5)
        ms = step_ms(stream)
        name = f"stand-in fwd+bwd {mode}" + (f"={block}" if block else "")
        row = table.add(name, shape, ms, "standard residual", standard, overhead_pct=100 * (ms / standard - 1))
        print(f"  {name:28s} {ms:8.2f} ms vs standard {standard:8.2f} ms: +{row['overhead_pct']:.1f}%", flush=True)


def tinykimi_step_ms(residual: str, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """(fwd+bwd ms, whole-step ms, first-step s) of a fresh gpu-small TinyKimi with this residual mode: medians of
    wall-clock times (synchronised) over TINYKIMI_STEPS steps after TINYKIMI_WARMUP warm-up steps."""
    from nanokimi.model import TinyKimi, TinyKimiConfig
    from nanokimi.train import TrainConfig, build_optimizer

    torch.manual_seed(0)  # the same weights in every mode (the residual's own parameters are zeros and ones)
    model = TinyKimi(TinyKimiConfig.preset("gpu-small", residual=residual)).cuda()
    opt = build_optimizer(model, TrainConfig(preset="gpu-small"))
    for group in opt.param_groups:  # lr 0: the optimizer does all its arithmetic but the weights stay put, so
        group["lr"] = 0.0  # every step (and every mode) routes the same tokens to the same experts
    fwd_bwd, whole = [], []
    first_s = 0.0
    for k in range(TINYKIMI_WARMUP + TINYKIMI_STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits, _ = model(inputs)
        F.cross_entropy(logits.float().transpose(1, 2), targets).backward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if k == 0:
            first_s = t2 - t0
            print(f"  TinyKimi {residual}: first step (compiles and autotunes) {first_s:.1f} s", flush=True)
        if k >= TINYKIMI_WARMUP:
            fwd_bwd.append(1e3 * (t1 - t0))
            whole.append(1e3 * (t2 - t0))
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(fwd_bwd), statistics.median(whole), first_s


def bench_tinykimi_step(table: Table) -> None:
    """A TinyKimi gpu-small training step with each residual mode (same weights, same batch of random tokens)."""
    from nanokimi.model import TinyKimiConfig

    cfg = TinyKimiConfig.preset("gpu-small")
    block = cfg.attnres_block_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (TINYKIMI_BATCH, TINYKIMI_SEQ + 1), generator=gen).cuda()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    shape = f"gpu-small {cfg.n_layers} layers D={cfg.d_model} B={TINYKIMI_BATCH} T={TINYKIMI_SEQ} fp32"
    times = {}
    for residual in ("standard", "block", "full"):
        fwd_bwd, whole, first_s = tinykimi_step_ms(residual, inputs, targets)
        times[residual] = {"fwd+bwd": fwd_bwd, "step": whole}
        print(f"  TinyKimi {residual:8s} fwd+bwd {fwd_bwd:7.2f} ms, step {whole:7.2f} ms (first step {first_s:.1f} s)")
    for residual, label in (("block", f"block={block}"), ("full", "full")):
        for part in ("step", "fwd+bwd"):
            ms, standard = times[residual][part], times["standard"][part]
            name = f"TinyKimi {part} {label}"
            row = table.add(name, shape, ms, "standard residual", standard, overhead_pct=100 * (ms / standard - 1))
            print(f"  {name:28s} {ms:8.2f} ms vs standard {standard:8.2f} ms: {row['overhead_pct']:+.1f}%", flush=True)


SECTIONS = ("phase1", "phase1-one-query", "merge", "stand-in", "tinykimi", "stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", action="store_true", help="also time the whole 32-sublayer stream")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="run these sections only (printed; results and README untouched)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nanokimi.attnres.bench: needs a CUDA device")
    torch.manual_seed(0)
    far = far_ops()
    if far is None:
        print("flash-attn-res is not installed: its anchor rows are skipped")
    table = Table("04_attnres: Block AttnRes depth attention")
    print(table.header(), flush=True)
    # one compiled object per function, shared by all rows (recompiles only when a shape goes dynamic)
    compiled = {"phase1": torch.compile(torch_phase1), "merge": torch.compile(torch_merge)}
    sections = {
        "phase1": lambda: bench_phase1(table, far, compiled, N_SOURCES, BLOCK),
        "phase1-one-query": lambda: bench_phase1(table, far, None, FULL_SOURCES, 1),
        "merge": lambda: bench_merge(table, far, compiled),
        "stand-in": lambda: bench_standin_step(table),
        "tinykimi": lambda: bench_tinykimi_step(table),
        "stream": lambda: bench_stream(table, far),
    }
    chosen = args.only or [name for name in SECTIONS if name != "stream" or args.stream]
    start = time.perf_counter()
    for name in chosen:
        sections[name]()
        print(f"  ({name}: {time.perf_counter() - start:.0f} s elapsed)", flush=True)
    if args.only is None:
        table.save(CHAPTER)


if __name__ == "__main__":
    main()

"""``python -m nanokimi.rl.bench``: the fused token log-prob kernel against the eager path, on the GPU.

Shapes: T = 8192 tokens, D = 4096, V ∈ {32K, 160K} (K2's vocabulary is ~160K), bf16 hidden states and lm head.
Rows: forward+backward (grads of hidden and weight through logp) against eager ``log_softmax(h Wᵀ).gather`` and
against Liger-Kernel's fused linear cross-entropy with ``reduction="none"`` (the same per-token quantity, −logp)
when its wheel imports; forward only (how the old/reference policies' log-probs are computed) against eager.
Peak memory is the allocator's high-water mark during the call minus what was allocated before it (inputs), so
the returned gradients count for every method. Targets (issue 9): peak ≤ 1/4 of eager and time ≤ 1.0× of it.
TFLOP/s counts the model FLOPs 2TVD (forward) or 6TVD (forward+backward); the kernel really spends up to 8TVD on
the latter because its backward recomputes the logits of every chunk but the last.

``--sweep`` also prints the fwd+bwd time and memory for several ``chunk`` sizes.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from nanokimi.bench import H100_BF16_TFLOPS, Table, time_ms
from nanokimi.rl.kernels import token_logprobs

T_TOKENS, D_MODEL = 8192, 4096
VOCABS = (32768, 163840)


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # [T, V] bf16
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def fused_logprobs(hidden, weight, targets, chunk: int | None = None) -> torch.Tensor:
    if chunk is None:  # the kernel's default
        return token_logprobs(hidden, weight, targets)[0]
    return token_logprobs(hidden, weight, targets, chunk=chunk)[0]


def liger_logprobs():
    """−CE per token from Liger's fused linear cross-entropy, or None when the wheel is not importable."""
    try:  # an optional third-party anchor: any failure to import it only drops its rows
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as err:
        print(f"Liger-Kernel anchor skipped: {type(err).__name__}: {err}")
        return None
    return lambda h, w, y: -liger_fused_linear_cross_entropy(h, w, y, reduction="none")


def peak_mib(run) -> float:
    """High-water mark of allocated memory during ``run()`` above what was allocated before, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def inputs(n_vocab: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T_TOKENS, D_MODEL, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(n_vocab, D_MODEL, device="cuda", generator=gen) / D_MODEL**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, n_vocab, (T_TOKENS,), device="cuda", generator=gen)
    upstream = torch.randn(T_TOKENS, device="cuda", generator=gen)  # ∂L/∂logp, never all zero
    return hidden, weight, targets, upstream


def fwd_bwd(fn, hidden, weight, targets, upstream):
    return lambda: torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight), upstream)


def fwd_only(fn, hidden, weight, targets):
    def run():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    return run


def measure(run, big: bool) -> tuple[float, float]:
    """(median ms, peak MiB); the long fwd+bwd calls get a longer timing window so the median has ~10+ samples."""
    ms = time_ms(run, warmup=100, rep=800 if big else 200)
    return ms, peak_mib(run)


def measure_optional(run) -> tuple[float, float] | None:
    """``measure`` for a third-party anchor: a failure prints why and drops the row instead of the whole run."""
    try:
        return measure(run, True)
    except Exception as err:
        print(f"Liger-Kernel anchor failed: {type(err).__name__}: {err}")
        return None


def sweep(chunks=(8192, 16384, 32768)) -> None:
    for n_vocab in VOCABS:
        hidden, weight, targets, upstream = inputs(n_vocab)
        for chunk in chunks:
            run = fwd_bwd(lambda h, w, y, c=chunk: fused_logprobs(h, w, y, c), hidden, weight, targets, upstream)
            ms, mib = measure(run, True)
            print(f"sweep V={n_vocab} chunk={chunk}: fwd+bwd {ms:.2f} ms, peak {mib:.0f} MiB")
        del hidden, weight, targets, upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time several chunk sizes")
    args = parser.parse_args()
    table = Table("06_rl_k15: fused token log-probs (bf16)")
    liger = liger_logprobs()
    for n_vocab in VOCABS:
        shape = f"T={T_TOKENS} D={D_MODEL} V={n_vocab}"
        hidden, weight, targets, upstream = inputs(n_vocab)
        model_flops = 2 * T_TOKENS * D_MODEL * n_vocab
        ours_ms, ours_mib = measure(fwd_bwd(fused_logprobs, hidden, weight, targets, upstream), True)
        eager_ms, eager_mib = measure(fwd_bwd(eager_logprobs, hidden, weight, targets, upstream), True)
        tflops = 3 * model_flops / ours_ms / 1e9
        table.add(
            "logp fwd+bwd", shape, ours_ms, "eager log_softmax+gather", eager_ms,
            tflops=tflops, roofline_frac=tflops / H100_BF16_TFLOPS,
            peak_mib=ours_mib, anchor_peak_mib=eager_mib, mem_ratio=ours_mib / eager_mib,
        )  # fmt: skip
        liger_result = measure_optional(fwd_bwd(liger, hidden, weight, targets, upstream)) if liger else None
        if liger_result is not None:
            liger_ms, liger_mib = liger_result
            table.add(
                "logp fwd+bwd", shape, ours_ms, "liger FLCE (reduction=none)", liger_ms,
                tflops=tflops, roofline_frac=tflops / H100_BF16_TFLOPS,
                peak_mib=ours_mib, anchor_peak_mib=liger_mib, mem_ratio=ours_mib / liger_mib,
            )  # fmt: skip
        ours_ms, ours_mib = measure(fwd_only(fused_logprobs, hidden, weight, targets), False)
        eager_ms, eager_mib = measure(fwd_only(eager_logprobs, hidden, weight, targets), False)
        tflops = model_flops / ours_ms / 1e9
        table.add(
            "logp fwd (no grad)", shape, ours_ms, "eager log_softmax+gather", eager_ms,
            tflops=tflops, roofline_frac=tflops / H100_BF16_TFLOPS,
            peak_mib=ours_mib, anchor_peak_mib=eager_mib, mem_ratio=ours_mib / eager_mib,
        )  # fmt: skip
        del hidden, weight, targets, upstream
    table.save(Path(__file__).resolve().parent)
    for row in table.rows:
        if row["anchor"].startswith("eager"):
            ok = row["mem_ratio"] <= 0.25 and row["speedup"] >= 1.0
            print(
                f"target {row['name']} {row['shape']}: memory {row['mem_ratio']:.3f}× of eager (≤ 0.25), "
                f"time {1 / row['speedup']:.3f}× of eager (≤ 1.0): {'met' if ok else 'MISSED'}"
            )
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()

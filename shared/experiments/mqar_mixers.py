"""Which sequence mixer recalls? MQAR accuracy of KDA-only, MoBA-only, dense and the 3:1 hybrid as pairs grow:
``python -m nanokimi.experiments.mqar_mixers``.

Multi-query associative recall (Zoology; Kimi Linear uses it to probe KDA): ``pairs`` key–value pairs, then
``queries`` keys each followed by its value; only the values are scored. A linear-attention state of size d×d
per head must hold every pair, so recall should degrade as pairs grow relative to the state; softmax attention
looks the key up directly; MoBA attends to its top-k key blocks only, so it must route each query to the block
holding its key. Every mixer is trained with the same budget (model size, steps, optimizer, seed) on each pair
count, with a dense SwiGLU FFN and the standard residual so that only the mixer differs.

Reports held-out exact match (all values of a prompt right, teacher-forced) and per-value accuracy. Writes
``runs/mqar_mixers/mqar_mixers.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from nanokimi.data import collate
from nanokimi.train import TrainConfig, load_model, train

__all__ = ["run", "main", "MIXERS"]

MIXERS = {"KDA only": "KKKK", "MoBA only": "MMMM", "dense": "AAAA", "3:1 hybrid": "KKKM"}
BASE_MODEL = dict(d_model=64, n_heads=2, n_layers=4, ffn="dense", d_ff=128, residual="standard", moba_block_size=8)
SMOKE_MODEL = dict(d_model=32, n_heads=2, n_layers=4, ffn="dense", d_ff=48, residual="standard", moba_block_size=4)


@torch.no_grad()
def value_accuracy(model, task, n: int = 256, seed: int = 0) -> tuple[float, float]:
    """(exact match, per-value accuracy) on ``n`` test prompts, teacher-forced."""
    batch = collate(task.examples("test", n, seed=seed))
    logits, _ = model(batch.inputs)
    right = (logits.argmax(-1) == batch.targets) | ~batch.loss_mask  # [n, T]
    per_value = float(((logits.argmax(-1) == batch.targets) & batch.loss_mask).sum() / batch.loss_mask.sum())
    return float(right.all(dim=1).float().mean()), per_value


def run(
    out: str | Path = "runs/mqar_mixers",
    pairs: tuple[int, ...] = (4, 8, 16),
    queries: int = 4,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    model_overrides: dict | None = None,
    seed: int = 0,
) -> dict:
    out = Path(out)
    overrides = model_overrides or BASE_MODEL
    result: dict = {"model_overrides": overrides, "queries": queries, "steps": steps, "pairs": list(pairs), "runs": {}}
    for mixer, pattern in MIXERS.items():
        result["runs"][mixer] = {"pattern": pattern, "exact_match": [], "value_accuracy": []}
        for n_pairs in pairs:
            run_dir = out / f"{pattern}_pairs{n_pairs}"
            shutil.rmtree(run_dir, ignore_errors=True)  # this experiment owns its run folders
            knobs = {"pairs": n_pairs, "queries": min(queries, n_pairs)}
            cfg = TrainConfig(
                task="mqar",
                task_knobs=knobs,
                model_overrides=overrides | {"pattern": pattern},
                optimizer="muonclip",
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                warmup_steps=max(1, steps // 20),
                eval_every=max(1, steps // 4),
                eval_examples=128,
                test_examples=128,
                ckpt_every=steps,
                seed=seed,
                out=str(run_dir),
                progress=False,
            )
            train(cfg)
            model, task = load_model(run_dir / "ckpt.pt")
            exact, per_value = value_accuracy(model, task, seed=seed)
            result["runs"][mixer]["exact_match"].append(exact)
            result["runs"][mixer]["value_accuracy"].append(per_value)
            print(f"{mixer:>11} pairs={n_pairs:2d}: exact match {exact:.3f}, per-value accuracy {per_value:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "mqar_mixers.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / "mqar_mixers.png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=70)
    for mixer, r in result["runs"].items():
        ax.plot(result["pairs"], r["value_accuracy"], "o-", ms=4, label=f"{mixer} ({r['pattern']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["pairs"], [str(p) for p in result["pairs"]])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("key–value pairs")
    ax.set_ylabel("per-value recall accuracy (test)")
    ax.set_title(f"MQAR, {result['queries']} queries, {result['steps']} steps per run", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokimi.experiments.mqar_mixers", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mqar_mixers")
    p.add_argument("--pairs", type=lambda s: tuple(int(v) for v in s.split(",")), default=(4, 8, 16))
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a tiny model (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        run(args.out, pairs=(3,), queries=2, steps=2, batch_size=8, model_overrides=SMOKE_MODEL)
    else:
        run(args.out, args.pairs, args.queries, args.steps, args.batch_size, args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

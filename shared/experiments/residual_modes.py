"""Standard vs Full vs Block attention residuals in a deep, narrow TinyKimi: ``python -m nanokimi.experiments.residual_modes``.

PreNorm dilution (AttnRes paper §3, Fig. 5): with the standard residual ``h_{l+1} = h_l + v_l`` the hidden state
accumulates every sublayer's output, so its RMS grows with depth and each new sublayer's contribution is diluted;
attention over depth lets each sublayer choose its inputs, keeping magnitudes bounded. For each residual mode the
same model (dense attention + SwiGLU, ``n_layers`` layers = 2·n_layers sublayers) is trained on addition with the
same seed and schedule, then measured on one validation batch:

* RMS of ``h_l``, the input of sublayer l (before its pre-norm), vs depth, at initialisation and after training;
* the gradient norm of each sublayer's parameters (its pre-norm included) vs depth, after training;
* the final validation loss and exact match.

Writes ``runs/residual_modes/residual_modes.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from nanokimi.data import collate, make_task
from nanokimi.model import TinyKimi
from nanokimi.train import TrainConfig, load_model, train

__all__ = ["run", "main"]

MODES = ("standard", "full", "block")
DEEP_NARROW = dict(d_model=64, n_heads=2, n_layers=12, pattern="A", ffn="dense", d_ff=128, attnres_block_size=4)
SMOKE_MODEL = dict(d_model=32, n_heads=2, n_layers=3, pattern="A", ffn="dense", d_ff=48, attnres_block_size=2)


def sublayer_grad_norms(model: TinyKimi, batch) -> list[float]:
    """‖∂loss/∂θ_l‖ for each sublayer l (mixer and FFN of each layer, each with its pre-norm), in depth order."""
    model.zero_grad(set_to_none=True)
    _, loss = model(batch.inputs, batch.targets, batch.loss_mask)
    loss.backward()
    norms = []
    for layer in model.layers:
        for parts in ((layer.mixer_norm, layer.mixer), (layer.ffn_norm, layer.ffn)):
            grads = [p.grad.flatten() for part in parts for p in part.parameters() if p.grad is not None]
            norms.append(float(torch.cat(grads).norm()))
    model.zero_grad(set_to_none=True)
    return norms


def run(
    out: str | Path = "runs/residual_modes",
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    model_overrides: dict | None = None,
    task_knobs: dict | None = None,
    seed: int = 0,
) -> dict:
    out = Path(out)
    overrides = model_overrides or DEEP_NARROW
    task = make_task("add", **(task_knobs or {}))
    probe = collate(task.examples("val", 128, seed=seed + 1))
    result: dict = {"model_overrides": overrides, "task": task.spec(), "steps": steps, "modes": {}}
    for mode in MODES:
        run_dir = out / mode
        shutil.rmtree(run_dir, ignore_errors=True)  # this experiment owns its run folders
        cfg = TrainConfig(
            task="add",
            task_knobs=task_knobs or {},
            model_overrides=overrides | {"residual": mode},
            optimizer="muonclip",
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=max(1, steps // 20),
            eval_every=max(1, steps // 6),
            eval_examples=256,
            test_examples=256,
            ckpt_every=steps,
            seed=seed,
            out=str(run_dir),
            progress=False,
        )
        torch.manual_seed(seed)
        initial = TinyKimi(cfg.model_config())  # the same initial weights train() starts from
        summary = train(cfg)
        model, _ = load_model(run_dir / "ckpt.pt")
        result["modes"][mode] = {
            "hidden_rms_init": initial.sublayer_input_rms(probe.inputs),
            "hidden_rms": model.sublayer_input_rms(probe.inputs),
            "grad_norm": sublayer_grad_norms(model, probe),
            "val_loss": summary["val_loss"],
            "val_exact_match": summary["val_exact_match"],
            "parameters": summary["parameters"],
        }
        print(f"{mode:>8}: val loss {summary['val_loss']:.4f}, val exact match {summary['val_exact_match']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "residual_modes.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / "residual_modes.png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rms, ax_grad) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=70)
    colors = {"standard": "tab:gray", "full": "tab:red", "block": "tab:blue"}
    for mode, r in result["modes"].items():
        depth = range(len(r["hidden_rms"]))
        label = f"{mode} (val loss {r['val_loss']:.3f})"
        ax_rms.plot(depth, r["hidden_rms"], "o-", ms=2.5, color=colors[mode], label=label)
        ax_rms.plot(depth, r["hidden_rms_init"], ":", color=colors[mode], lw=0.8)
        ax_grad.plot(depth, r["grad_norm"], "o-", ms=2.5, color=colors[mode], label=mode)
    ax_rms.set_xlabel("sublayer l")
    ax_rms.set_ylabel("RMS of h_l (dotted: at init)")
    ax_rms.set_yscale("log")
    ax_rms.legend(fontsize=7)
    ax_grad.set_xlabel("sublayer l")
    ax_grad.set_ylabel("‖grad‖ of sublayer parameters")
    ax_grad.set_yscale("log")
    fig.suptitle("PreNorm dilution vs attention residuals (trained)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nanokimi.experiments.residual_modes", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default="runs/residual_modes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a tiny model (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        run(args.out, steps=3, batch_size=8, model_overrides=SMOKE_MODEL, task_knobs={"digits": 2})
    else:
        run(args.out, args.steps, args.batch_size, args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

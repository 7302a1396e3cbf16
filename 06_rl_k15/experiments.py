"""Chapter 06's experiments on TinyKimi: ``python -m nanokimi.rl.experiments NAME [--init CKPT]``.

The starting checkpoints are ``python -m nanokimi.train`` on addition with scratchpads (``--scratchpad 0,1,2``: each
training answer is written at a random verbosity, so the model can answer long or short): ``runs/pretrain`` on 3
digits for ``grpo``, ``long2short`` and ``rollout``, and ``runs/pretrain_mix`` on a mixture of 2, 3 and 4 digits
for ``harder`` (``DEFAULT_INIT``; ``--init`` replaces both).

* ``harder``     — k1.5 with a curriculum over digit counts, easy → hard: held-out (test split) accuracy per level
                   before and after. From a one-count checkpoint (d digits) the levels are d → d+1; from a mixture,
                   its two largest counts (the largest is the harder setting: the pretraining's under-trained
                   tail). Target (issue 9): ≥ +15 points on the hardest level in ≤ 10 min on a CPU. RL needs a
                   starting pass rate strictly between 0 and 1 there: a group whose k samples all fail has zero
                   advantage, so zero gradient (a 3-digit model scores exactly 0 on 4 digits).
* ``grpo``       — k1.5 vs GRPO from the pretrained checkpoint on its own task, same budget (iterations, groups, k,
                   learning rate, seed): accuracy and length curves side by side. The k1.5 arm (``runs/k15``) is
                   also long2short's warm-up.
* ``long2short`` — warm-up: the k1.5 run without the length reward (the "long" model); then the same number of
                   iterations from it with the k1.5 length reward on, and without it as the control: greedy
                   response length and accuracy, the mix of scratchpad verbosities, the same prompts' responses
                   before and after. Target: length −30% or more at equal or better accuracy.
                   ``LONG2SHORT_VARIANTS`` run from the same long model: a gentler weight, and the paper's
                   long2short RL with a smaller maximum rollout length.
* ``rollout``    — Seer-style scheduling (``rollout_sim``) of one rollout step whose [G, k] response lengths are the
                   ones TinyKimi sampled in the k1.5 run (observed, a ``LengthModel`` fitted to them, and a
                   heavier-tailed one): makespan and tail per policy, Gantt charts.

Each writes ``NAME.json`` and ``NAME.png`` into ``--results`` (the chapter's ``results/rl/`` holds the committed
ones); the RL runs themselves (metrics, checkpoints) go under ``--runs``. A run whose ``summary.json`` already
holds the same configuration is reused, so the experiments share the k1.5 run. ``--smoke`` runs everything at a
seconds-long size (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np

from nanokimi.data import prompt_ids, task_from_spec
from nanokimi.rl.rollout import load_policy, response_seed
from nanokimi.rl.rollout_sim import ClusterConfig, LengthModel, compare_policies, plot_gantt
from nanokimi.rl.train import RLConfig, evaluate_policy, response_correct, train_rl
from nanokimi.train import load_checkpoint

__all__ = [
    "EXPERIMENTS",
    "DEFAULT_INIT",
    "harder",
    "harder_levels",
    "grpo",
    "long2short",
    "rollout",
    "rl_config",
    "scratchpad_level",
    "main",
]

EXPERIMENTS = ("harder", "grpo", "long2short", "rollout")
# The starting checkpoint of each experiment when --init is not given (the commands are in the chapter README).
DEFAULT_INIT = {
    "harder": "runs/pretrain_mix/ckpt.pt",
    "grpo": "runs/pretrain/ckpt.pt",
    "long2short": "runs/pretrain/ckpt.pt",
    "rollout": "runs/pretrain/ckpt.pt",
}
# Fields that do not change what a run computes: a saved run with the same other fields is reused.
_NON_RESULT_FIELDS = ("out", "overwrite", "progress", "threads")


def scratchpad_level(response: str) -> int:
    """The verbosity an addition response was written in: 2 (column equations), 1 (column sums) or 0 (answer)."""
    if "=" in response or "+" in response:
        return 2
    return 1 if ";" in response else 0


def _same_run(summary: dict, cfg: RLConfig) -> bool:
    want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NON_RESULT_FIELDS}
    have = {k: v for k, v in summary.get("rl_config", {}).items() if k not in _NON_RESULT_FIELDS}
    return json.loads(json.dumps(want)) == have and summary.get("status") in ("completed", "time_limit")


def _run(cfg: RLConfig) -> tuple[dict, list[dict]]:
    """Train (or reuse a finished identical run); returns (summary, metrics lines)."""
    out = Path(cfg.out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or not _same_run(summary, cfg):
        summary = train_rl(dataclasses.replace(cfg, overwrite=True))
    else:
        print(f"reusing {out} (same configuration)")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, metrics


def _curve(metrics: list[dict], level: int, key: str) -> list[tuple[int, float]]:
    return [(m["iteration"], m["eval"][level][key]) for m in metrics if "eval" in m]


def _run_record(summary: dict, metrics: list[dict]) -> dict:
    """What a result JSON keeps of a run: final numbers, curves, timings and load (no checkpoints)."""
    last = len(summary["level_names"]) - 1
    return {
        "status": summary["status"],
        "iterations": summary["iterations"],
        "wall_s": summary["wall_s"],
        "load_avg_start": summary["load_avg_start"],
        "load_avg_end": summary["load_avg_end"],
        "tokens_generated": summary["tokens_generated"],
        "start_test": {k: summary["start_test"][last][k] for k in ("accuracy", "mean_length")},
        "final_test": {k: summary["final_test"][last][k] for k in ("accuracy", "mean_length")},
        "val_accuracy": {name: _curve(metrics, level, "accuracy") for level, name in enumerate(summary["level_names"])},
        "val_length": {
            name: _curve(metrics, level, "mean_length") for level, name in enumerate(summary["level_names"])
        },
        "train": [
            {k: m[k] for k in ("iteration", "reward", "train_accuracy", "train_length", "entropy") if k in m}
            for m in metrics[1:]
            if "reward" in m
        ],
    }


def _save(results: Path, name: str, result: dict, fig) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    (results / f"{name}.png").write_bytes(buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)


def _figure(ncols: int, width: float = 4.2, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), dpi=70)


# --- the experiments --------------------------------------------------------------------------------------------
# CPU-sized settings shared by the experiments (the RL defaults otherwise: segment_len 16, τ 0.1, AdamW, prioritised
# sampling). ``max_minutes`` is a safety net: a run that hits it says so (status time_limit).
COMMON = dict(groups=8, k=8, lr=1e-4, eval_every=5, eval_examples=128, final_eval_examples=500, max_minutes=10.0)
SMOKE = dict(iterations=4, groups=2, k=4, eval_every=2, eval_examples=8, final_eval_examples=8, pool_size=16)
ITERATIONS = {"rl": 40, "long2short": 100, "harder_easy": 20, "harder": 40}
LENGTH_WEIGHT = 0.3
# long2short variants, each from the same long model for the same iterations: a gentler weight, and the k1.5 paper's
# long2short RL (§2.4), which also shrinks the maximum rollout length so that a longer answer is truncated and
# scores 0 (16 tokens: room for the 3-digit column sums, 14 tokens with <eos>, not for the equations, 32).
LONG2SHORT_VARIANTS = {
    "w0.1": {"length_weight": 0.1},
    "w0.3_max16": {"length_weight": LENGTH_WEIGHT, "max_response_len": 16},
}


def _config(init: str, out: Path, smoke: bool, iterations: int, **overrides) -> RLConfig:
    size = SMOKE if smoke else COMMON | {"iterations": iterations}
    return RLConfig(init=init, out=str(out), progress=not smoke, **(size | overrides))


def rl_config(init: str, runs: Path, smoke: bool = False, method: str = "k15") -> RLConfig:
    """RL on the pretraining task (no length reward): the k1.5 arm is also long2short's warm-up phase."""
    return _config(init, runs / method, smoke, ITERATIONS["rl"], method=method)


def _pretraining_task(init: str) -> dict:
    spec = load_checkpoint(init)["task"]
    if spec.get("name") != "add":
        raise ValueError(f"init: expected a checkpoint pretrained on addition, got task {spec}")
    return spec


def harder_levels(digits: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(easy, hard) digit counts of ``harder``'s curriculum for a checkpoint pretrained on ``digits``: d → d+1 for
    one count, the two largest counts of a mixture."""
    counts = sorted({int(digits)} if isinstance(digits, int) else {int(d) for d in digits})
    if len(counts) == 1:
        return counts[0], counts[0] + 1
    return counts[-2], counts[-1]


def _by_verbosity(ckpt: str, task, examples, max_len: int) -> dict:
    """Greedy test responses per scratchpad verbosity: share of the answers and accuracy within it (addition)."""
    model, _, _ = load_policy(ckpt, max(len(p) for p in prompt_ids(examples)) + max_len)
    samples = evaluate_policy(model, task, examples, max_len, n_samples=len(examples))["samples"]
    rows = [(scratchpad_level(sample["response"]), sample["correct"]) for sample in samples]
    table = {}
    for level in (0, 1, 2):
        hits = [ok for v, ok in rows if v == level]
        table[str(level)] = {"share": len(hits) / len(rows), "accuracy": sum(hits) / len(hits) if hits else None}
    return table


def _sampled_groups(ckpt: str, task, examples, k: int, max_len: int, seed: int) -> dict:
    """k samples (temperature 1) per problem: the mean pass rate, and how many groups carry no signal because all
    k fail or all k pass (equal rewards: r_j − r̄ = 0, so zero gradient)."""
    model, _, _ = load_policy(ckpt, max(len(p) for p in prompt_ids(examples)) + max_len)
    prompts = [p for p in prompt_ids(examples) for _ in range(k)]
    seeds = [response_seed(seed, i, j) for i in range(len(examples)) for j in range(k)]
    outs = model.generate(prompts, max_len, temperature=1.0, seed=seeds)
    ok = [
        response_correct(task, ex.prompt, out)
        for ex, out in zip([ex for ex in examples for _ in range(k)], outs, strict=True)
    ]
    passes = [sum(ok[i * k : (i + 1) * k]) for i in range(len(examples))]
    return {
        "problems": len(examples),
        "k": k,
        "pass_rate": sum(ok) / len(ok),
        "all_fail_groups": passes.count(0),
        "all_pass_groups": passes.count(k),
    }


def harder(init: str, runs: Path, results: Path, smoke: bool = False) -> dict:
    """k1.5 with a curriculum easy → hard digit counts (``harder_levels``); held-out accuracy before and after."""
    pretraining = _pretraining_task(init)
    easy, hard_digits = harder_levels(pretraining["digits"])
    cfg = _config(
        init,
        runs / "harder",
        smoke,
        ITERATIONS["harder"],
        curriculum=f"digits={easy},{hard_digits}",
        stage_iters=(1 if smoke else ITERATIONS["harder_easy"],),
    )
    summary, metrics = _run(cfg)
    record = _run_record(summary, metrics)
    gains = {name: 100 * g for name, g in zip(summary["level_names"], summary["accuracy_gain"], strict=True)}
    hard_name = summary["level_names"][-1]
    hard = str(len(summary["level_names"]) - 1)
    hard_stats = [m["by_level"][hard] for m in metrics[1:] if hard in m.get("by_level", {})]
    hard_groups = sum(h["groups"] for h in hard_stats)
    hard_task = task_from_spec(summary["levels"][-1])
    hard_examples = hard_task.examples("test", cfg.final_eval_examples, seed=cfg.seed)
    result = {
        "experiment": "harder",
        "init": init,
        "pretraining_task": pretraining,
        "levels": summary["level_names"],
        "stage_starts": summary["stage_starts"],
        "held_out": f"test split, {cfg.final_eval_examples} problems per level, greedy decoding",
        "start_test": {
            n: {k: t[k] for k in ("accuracy", "mean_length")}
            for n, t in zip(summary["level_names"], summary["start_test"], strict=True)
        },
        "final_test": {
            n: {k: t[k] for k in ("accuracy", "mean_length")}
            for n, t in zip(summary["level_names"], summary["final_test"], strict=True)
        },
        "accuracy_gain_points": gains,
        "hard_level_groups_trained": hard_groups,
        "hard_level_sampled_accuracy": sum(h["accuracy"] * h["groups"] for h in hard_stats) / hard_groups
        if hard_groups
        else None,
        "hard_level_zero_std_groups": sum(h["zero_std_groups"] for h in hard_stats),
        "hard_level_first_groups": hard_stats[0] if hard_stats else None,
        "hard_level_sampled_test": {
            when: _sampled_groups(ckpt, hard_task, hard_examples[:32], cfg.k, summary["max_response_len"], cfg.seed)
            for when, ckpt in (("start", init), ("final", str(Path(cfg.out) / "ckpt.pt")))
        },
        "hard_level_by_verbosity": {
            "start": _by_verbosity(init, hard_task, hard_examples, summary["max_response_len"]),
            "final": _by_verbosity(
                str(Path(cfg.out) / "ckpt.pt"), hard_task, hard_examples, summary["max_response_len"]
            ),
        },
        "hard_level_samples": {
            "start": summary["start_test"][-1]["samples"][:4],
            "final": summary["final_test"][-1]["samples"][:4],
        },
        "target": f"+15 points or more on {hard_name} in <= 600 s on a CPU",
        "target_met": bool(gains[hard_name] >= 15 and summary["wall_s"] <= 600 and summary["status"] == "completed"),
        "cpu_count": summary["cpu_count"],
        "rl_config": summary["rl_config"],
        "run": record,
    }
    fig, (ax_acc, ax_len) = _figure(2)
    for name, curve in record["val_accuracy"].items():
        ax_acc.plot(*zip(*curve, strict=True), "o-", ms=3, label=f"val, {name}")
    for name, curve in record["val_length"].items():
        ax_len.plot(*zip(*curve, strict=True), "o-", ms=3, label=f"val, {name}")
    for ax in (ax_acc, ax_len):
        for start in summary["stage_starts"][1:]:
            ax.axvline(start, color="k", lw=0.6, ls=":")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    ax_acc.set_ylabel("greedy accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_len.set_ylabel("greedy response length (tokens)")
    fig.suptitle(
        f"k1.5, curriculum {' → '.join(summary['level_names'])} (dotted: switch); test accuracy "
        + ", ".join(
            f"{n}: {result['start_test'][n]['accuracy']:.2f} → {result['final_test'][n]['accuracy']:.2f}"
            for n in summary["level_names"]
        ),
        fontsize=9,
    )
    fig.tight_layout()
    _save(results, "harder", result, fig)
    print(f"harder: gains {gains} (points) in {summary['wall_s']:.0f} s; target met: {result['target_met']}")
    return result


def _level_mix(ckpt: str, task, examples, max_len: int) -> dict:
    """Fraction of greedy test responses written at each scratchpad verbosity (addition only)."""
    return {level: cell["share"] for level, cell in _by_verbosity(ckpt, task, examples, max_len).items()}


def _vs_long(final: dict, long_model: dict) -> dict:
    """Length cut of a run's final test vs the long model, and the target: a cut of ≥ 30% at equal or better
    accuracy."""
    cut = 1 - final["mean_length"] / long_model["mean_length"]
    return {"length_cut_vs_long": cut, "target_met": bool(cut >= 0.3 and final["accuracy"] >= long_model["accuracy"])}


def _numbers(test: dict) -> dict:
    return {k: test[k] for k in ("accuracy", "mean_length")}


def long2short(init: str, runs: Path, results: Path, smoke: bool = False) -> dict:
    """Warm-up = k1.5 RL without the length reward (``rl_config``); then the same number of iterations from its
    checkpoint with the length reward on, and, as the control, without it."""
    warm, warm_metrics = _run(rl_config(init, runs, smoke))
    long_ckpt = str(Path(warm["rl_config"]["out"]) / "ckpt.pt")
    on_cfg = _config(long_ckpt, runs / "long2short_on", smoke, ITERATIONS["long2short"], length_weight=LENGTH_WEIGHT)
    off_cfg = _config(long_ckpt, runs / "long2short_off", smoke, ITERATIONS["long2short"])
    on, on_metrics = _run(on_cfg)
    off, off_metrics = _run(off_cfg)
    variant_cfgs = {
        name: _config(long_ckpt, runs / f"long2short_{name}", smoke, ITERATIONS["long2short"], **knobs)
        for name, knobs in LONG2SHORT_VARIANTS.items()
    }
    variant_runs = {name: _run(cfg) for name, cfg in variant_cfgs.items()}
    task = task_from_spec(on["levels"][-1])
    examples = task.examples("test", on_cfg.final_eval_examples, seed=on_cfg.seed)
    max_len = on["max_response_len"]
    pretrained, long_model = warm["start_test"][0], on["start_test"][0]
    short, control = on["final_test"][0], off["final_test"][0]
    vs_long = _vs_long(short, long_model)
    cut_vs_long = vs_long["length_cut_vs_long"]
    cut_vs_control = 1 - short["mean_length"] / control["mean_length"]
    result = {
        "experiment": "long2short",
        "init": init,
        "task": on["levels"][-1],
        "length_weight": LENGTH_WEIGHT,
        "phases": f"warm-up: {warm['iterations']} k1.5 iterations without the length reward from the pretrained "
        f"checkpoint (the 'long' model); then {on['iterations']} iterations from it with the length reward "
        f"(weight {LENGTH_WEIGHT}), and {off['iterations']} without it (control)",
        "held_out": f"test split, {len(examples)} problems, greedy decoding",
        "pretrained": _numbers(pretrained),
        "long": _numbers(long_model),
        "long2short": _numbers(short),
        "control": _numbers(control),
        "length_cut_vs_long": cut_vs_long,
        "length_cut_vs_control": cut_vs_control,
        "scratchpad_mix": {
            "pretrained": _level_mix(init, task, examples, max_len),
            "long": _level_mix(long_ckpt, task, examples, max_len),
            "long2short": _level_mix(str(Path(on_cfg.out) / "ckpt.pt"), task, examples, max_len),
            "control": _level_mix(str(Path(off_cfg.out) / "ckpt.pt"), task, examples, max_len),
        },
        "target": "mean length -30% or more vs the long model at equal or better accuracy",
        "target_met": vs_long["target_met"],
        "variants": {
            name: {
                "knobs": LONG2SHORT_VARIANTS[name],
                "final": _numbers(v["final_test"][0]),
                **_vs_long(v["final_test"][0], long_model),
                # evaluated at the run's own maximum length (a longer answer is cut off and counts as wrong)
                "max_response_len": v["max_response_len"],
                "scratchpad_mix": _level_mix(
                    str(Path(variant_cfgs[name].out) / "ckpt.pt"), task, examples, v["max_response_len"]
                ),
                "wall_s": v["wall_s"],
                "load_avg": v["load_avg_start"],
                "run": _run_record(v, v_metrics),
            }
            for name, (v, v_metrics) in variant_runs.items()
        },
        "samples": [
            {
                "prompt": a["prompt"],
                "pretrained": a["response"],
                "long": b["response"],
                "long2short": c["response"],
                "correct": [a["correct"], b["correct"], c["correct"]],
            }
            for a, b, c in zip(pretrained["samples"], long_model["samples"], short["samples"], strict=True)
        ],
        "wall_s": {"warm_up": warm["wall_s"], "long2short": on["wall_s"], "control": off["wall_s"]},
        "load_avg": {
            "warm_up": warm["load_avg_start"],
            "long2short": on["load_avg_start"],
            "control": off["load_avg_start"],
        },
        "cpu_count": on["cpu_count"],
        "rl_config": on["rl_config"],
        "runs": {
            "warm_up": _run_record(warm, warm_metrics),
            "long2short": _run_record(on, on_metrics),
            "control": _run_record(off, off_metrics),
        },
    }
    fig, (ax_acc, ax_len) = _figure(2)
    offset = warm["iterations"]
    for label, rec, shift, style in (
        ("warm-up (no length reward)", result["runs"]["warm_up"], 0, "o-"),
        ("long2short (length reward)", result["runs"]["long2short"], offset, "o-"),
        ("control (no length reward)", result["runs"]["control"], offset, "s--"),
    ):
        (name,) = rec["val_accuracy"]
        xs = [i + shift for i, _ in rec["val_accuracy"][name]]
        ax_acc.plot(xs, [a for _, a in rec["val_accuracy"][name]], style, ms=3, label=label)
        ax_len.plot(xs, [v for _, v in rec["val_length"][name]], style, ms=3, label=label)
    for label, variant in result["variants"].items():
        rec = variant["run"]
        (name,) = rec["val_accuracy"]
        xs = [i + offset for i, _ in rec["val_accuracy"][name]]
        ax_acc.plot(xs, [a for _, a in rec["val_accuracy"][name]], ":", lw=1.2, label=f"variant {label}")
        ax_len.plot(xs, [v for _, v in rec["val_length"][name]], ":", lw=1.2, label=f"variant {label}")
    for ax in (ax_acc, ax_len):
        ax.axvline(offset, color="k", lw=0.6, ls=":")
        ax.set_xlabel("iteration")
    ax_len.legend(fontsize=7)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("greedy val accuracy")
    ax_len.set_ylabel("greedy val response length (tokens)")
    fig.suptitle(
        f"long2short: test length {long_model['mean_length']:.1f} → {short['mean_length']:.1f} tokens "
        f"({100 * cut_vs_long:.0f}% shorter), accuracy {long_model['accuracy']:.3f} → {short['accuracy']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    _save(results, "long2short", result, fig)
    print(
        f"long2short: length {long_model['mean_length']:.1f} → {short['mean_length']:.1f} (−{100 * cut_vs_long:.0f}%; "
        f"control {control['mean_length']:.1f}); accuracy {long_model['accuracy']:.3f} → {short['accuracy']:.3f} "
        f"(control {control['accuracy']:.3f}); target met: {result['target_met']}"
    )
    for name, variant in result["variants"].items():
        print(
            f"  variant {name}: length −{100 * variant['length_cut_vs_long']:.0f}%, accuracy "
            f"{variant['final']['accuracy']:.3f}; target met: {variant['target_met']}"
        )
    return result


def grpo(init: str, runs: Path, results: Path, smoke: bool = False) -> dict:
    """k1.5 vs GRPO from the pretrained checkpoint, same budget (iterations, groups, k, lr, seed)."""
    arms = {method: _run(rl_config(init, runs, smoke, method)) for method in ("k15", "grpo")}
    records = {method: _run_record(*arm) for method, arm in arms.items()}
    name = arms["k15"][0]["level_names"][-1]
    result = {
        "experiment": "grpo",
        "init": init,
        "same_budget": "same iterations, groups, k, learning rate, optimizer (reset each iteration), seed, task",
        "held_out": f"test split, {arms['k15'][0]['rl_config']['final_eval_examples']} problems, greedy decoding",
        "k15": records["k15"],
        "grpo": records["grpo"],
        "settings": {
            "k15": {"tau": arms["k15"][0]["rl_config"]["tau"]},
            "grpo": {k: arms["grpo"][0]["rl_config"][k] for k in ("clip_eps", "beta")},
        },
        "cpu_count": arms["k15"][0]["cpu_count"],
    }
    fig, (ax_acc, ax_len) = _figure(2)
    for method, color in (("k15", "tab:red"), ("grpo", "tab:blue")):
        rec = records[method]
        ax_acc.plot(
            *zip(*rec["val_accuracy"][name], strict=True),
            "o-",
            ms=3,
            color=color,
            label=f"{method}: test {rec['start_test']['accuracy']:.3f} → {rec['final_test']['accuracy']:.3f}",
        )
        ax_len.plot(*zip(*rec["val_length"][name], strict=True), "o-", ms=3, color=color, label=method)
        ax_acc.plot(
            [t["iteration"] for t in rec["train"]],
            [t["train_accuracy"] for t in rec["train"]],
            lw=0.6,
            alpha=0.5,
            color=color,
        )
    for ax in (ax_acc, ax_len):
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("accuracy (dots: greedy val; line: sampled)")
    ax_len.set_ylabel("greedy val length (tokens)")
    fig.suptitle("k1.5 vs GRPO, same budget", fontsize=9)
    fig.tight_layout()
    _save(results, "grpo", result, fig)
    print(
        "k1.5 vs GRPO, test accuracy: "
        + ", ".join(
            f"{m} {r['start_test']['accuracy']:.3f} → {r['final_test']['accuracy']:.3f}" for m, r in records.items()
        )
    )
    return result


def rollout(init: str, runs: Path, results: Path, smoke: bool = False) -> dict:
    """Seer-style scheduling on the [G, k] response lengths TinyKimi sampled in the k1.5 run."""
    summary, metrics = _run(rl_config(init, runs, smoke))
    k = summary["rl_config"]["k"]
    groups = [row for m in metrics if "group_lengths" in m for row in m["group_lengths"]]
    observed = np.array(groups[: 8 if smoke else 128], dtype=np.int64)  # [G, k]
    fitted = LengthModel.fit(observed)
    # TinyKimi's median with the spread of the chapter's heavy-tailed synthetic model (README): log-lengths mostly
    # shared within a group (σ_group 1.0 > σ_within 0.5), as for long chains of thought whose length follows the
    # problem, and a maximum 16× TinyKimi's.
    heavy = LengthModel(fitted.median, 1.0, 0.5, 16 * fitted.max_len)
    # 1024 responses on 128 slots (8 waves), chunks of 8 tokens (≈ 1/4 of TinyKimi's longest answer; Seer's chunks
    # are a similar fraction of its 64–98K maximum)
    cluster = ClusterConfig(n_instances=2 if smoke else 8, max_batch=4 if smoke else 16, chunk_size=8)
    length_sets = {
        "observed": observed,
        "fitted": fitted.sample(len(observed), k, seed=0),
        "heavy_tailed": heavy.sample(len(observed), k, seed=0),
    }
    table = {}
    for name, lengths in length_sets.items():
        for kv_time in (0.0, 1 / 64):
            res = compare_policies(lengths, dataclasses.replace(cluster, kv_time=kv_time))
            base = res["static"]
            table[f"{name}, kv_time={kv_time:g}"] = {
                policy: {
                    "makespan": r.makespan,
                    "tail": r.tail_time,
                    "throughput_vs_static": r.throughput / base.throughput,
                    "tail_vs_static": r.tail_time / base.tail_time if base.tail_time > 0 else None,
                }
                for policy, r in res.items()
            }
    result = {
        "experiment": "rollout",
        "source": f"response lengths (tokens, <eos> included) of the first {len(observed)} finished groups of the "
        f"k1.5 run {summary['rl_config']['out']}",
        "observed_stats": {
            "groups": int(observed.shape[0]),
            "k": int(observed.shape[1]),
            "mean": float(observed.mean()),
            "p50": float(np.median(observed)),
            "p90": float(np.quantile(observed, 0.9)),
            "max": int(observed.max()),
        },
        "fitted": dataclasses.asdict(fitted),
        "heavy_tailed": dataclasses.asdict(heavy),
        "cluster": dataclasses.asdict(cluster),
        "table": table,
        "observed_lengths": observed.tolist(),
    }
    fig, axes = _figure(3, width=3.4, height=2.6)
    res = compare_policies(length_sets["heavy_tailed"], cluster, ("static", "divided", "context"))
    for ax, r in zip(axes, res.values(), strict=True):
        plot_gantt(r, ax=ax)
    fig.suptitle("one rollout step, heavy-tailed lengths at TinyKimi's median (bar: chunk, colour: group)", fontsize=9)
    fig.tight_layout()
    _save(results, "rollout", result, fig)
    for key, row in table.items():
        print(f"{key}: " + ", ".join(f"{p} {v['throughput_vs_static']:.2f}x" for p, v in row.items()))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokimi.rl.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", choices=[*EXPERIMENTS, "all"])
    p.add_argument(
        "--init",
        help="a nanokimi.train checkpoint (addition) for every experiment named; default: each one's DEFAULT_INIT "
        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_INIT.items()),
    )
    p.add_argument("--runs", default="runs/rl", help="where the RL runs go")
    p.add_argument("--results", default="runs/rl/results", help="where NAME.json and NAME.png go")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of each (tests)")
    args = p.parse_args(argv)
    runners = {"harder": harder, "long2short": long2short, "grpo": grpo, "rollout": rollout}
    names = EXPERIMENTS if "all" in args.names else args.names
    try:
        for name in names:
            runners[name](args.init or DEFAULT_INIT[name], Path(args.runs), Path(args.results), args.smoke)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

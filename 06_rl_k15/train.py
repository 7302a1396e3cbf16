"""k1.5 RL on TinyKimi: ``python -m nanokimi.rl.train --init runs/pretrain/ckpt.pt --task add --digits 4``.

One iteration i (the policy before its update is π_i, the "old" policy of this iteration):

1. *Problems.* The curriculum (``nanokimi.rl.curriculum``) tops the rollout buffer up to ``groups`` problems of
   the current stage, drawn ∝ (1 − success rate) + floor.
2. *Rollout.* Every unfinished response of the buffer samples up to ``segment_len`` more tokens from π_i
   (``TinyKimi.generate``, temperature θ); the log-probs of those tokens under π_i are kept with the segment
   (``nanokimi.rl.rollout``). A group whose k responses are all done (``<eos>``, or truncated at
   ``max_response_len``) leaves the buffer for the loss; the others continue in iteration i + 1 (partial rollout).
3. *Rewards.* r_j = 1 if the task's verifier accepts response j (a truncated response scores 0), plus
   ``length_weight`` · the k1.5 length reward of the group once ``iteration ≥ length_warmup``.
4. *Update.* ``updates_per_iter`` gradient steps on the finished groups (AdamW, or Muon on the hidden matrices as
   in K2), gradient clipping, and either

       k15:  L = (1/G) Σ_g (1/k) Σ_j [ −(r_gj − r̄_g) ℓ_gj + (τ/2)(ℓ_gj − ℓ_gj^old)² ],  ℓ = Σ_t log πθ(y_t)
       grpo: the clipped token-ratio surrogate with std-normalised advantages and β·KL to the initial policy,

   where ℓ^old sums the stored segment log-probs, each from the policy that sampled it. On the first step of an
   iteration the k1.5 penalty has zero gradient for tokens sampled by π_i (ℓ = ℓ^old there): it acts on tokens
   sampled by earlier policies (continued responses) and on the later steps of the iteration.

   k1.5 resets the optimizer at the start of every iteration (``reset_optimizer``), over many steps per
   iteration. With one step per iteration a fresh AdamW is sign descent (its first step is m̂/√v̂ = g/|g|):
   every parameter moves by the full learning rate whatever the size of its gradient, so even the tiny gradients
   of groups without signal (only the τ term of stale segments) become full steps and the policy drifts. The
   default therefore keeps the optimizer state across iterations.
5. *Evaluation* every ``eval_every`` iterations: greedy decoding of held-out (validation) problems of every
   level, verifier accuracy and mean response length; at the start and the end, the test split.

Outputs in ``--out``: ``metrics.jsonl`` (one line per iteration), ``rl.png`` (reward, accuracy and length
curves), ``summary.json`` (start and final test accuracy and length per level, sample responses, timings, the
machine's load average) and ``ckpt.pt`` (the final policy, in ``nanokimi.train``'s checkpoint format so that
``load_model`` and ``--init`` read it). Files are written atomically; Ctrl-C stops after the iteration in
progress and still writes them (status "interrupted"); ``--max-minutes`` stops the same way on a wall-clock
budget (status "time_limit").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import TASKS, TOKENIZER, Example, Task, prompt_ids, task_from_spec
from nanokimi.model import TinyKimi
from nanokimi.muon import MuonWithAdamW, muon_param_groups
from nanokimi.rl.curriculum import Curriculum
from nanokimi.rl.loss import grpo_loss, k15_loss, length_reward
from nanokimi.rl.rollout import Group, Response, advance_rollouts, load_policy, response_logprobs, response_seed
from nanokimi.train import (
    CKPT_FORMAT,
    StopFlag,
    add_task_knob_arguments,
    atomic_write_bytes,
    load_checkpoint,
    task_knobs_from_args,
)

__all__ = ["RLConfig", "METHODS", "train_rl", "evaluate_policy", "group_rewards", "main", "build_parser"]

METHODS = ("k15", "grpo")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class RLConfig:
    """Every knob of an RL run (the CLI flags, with ``-`` for ``_``)."""

    init: str = "runs/pretrain/ckpt.pt"
    task: str | None = None  # None: the checkpoint's task
    task_knobs: dict = field(default_factory=dict)  # on top of the checkpoint's knobs (same task) or the defaults
    curriculum: str | None = None  # "knob=v1,v2,...": levels easy → hard, e.g. "digits=3,4"
    stage_iters: tuple[int, ...] = ()  # iterations on each level but the last (empty: equal shares)
    method: str = "k15"
    iterations: int = 100
    groups: int = 8  # problems per iteration (the size of the rollout buffer)
    k: int = 8  # responses per problem
    tau: float = 0.1  # k1.5's KL weight τ
    clip_eps: float = 0.2  # GRPO
    beta: float = 0.04  # GRPO's KL weight (to the initial policy)
    lr: float = 1e-4
    optimizer: str = "adamw"
    reset_optimizer: bool = False  # k1.5 resets it every iteration (see the module docstring)
    updates_per_iter: int = 1
    grad_clip: float = 1.0
    temperature: float = 1.0
    segment_len: int = 16  # per-iteration token budget of one response
    max_response_len: int | None = None  # tokens including <eos>; None: the hardest level's longest answer + 1
    length_weight: float = 0.0
    length_warmup: int = 0
    pool_size: int = 512
    prioritized: bool = True
    priority_floor: float = 0.05
    eval_every: int = 10
    eval_examples: int = 128
    final_eval_examples: int = 500
    max_minutes: float | None = None
    seed: int = 0
    out: str = "runs/rl"
    overwrite: bool = False
    logprob_backend: str = "reference"
    device: str = "cpu"
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        check_in("method", self.method, METHODS)
        check_in("optimizer", self.optimizer, OPTIMIZERS)
        check_in("logprob_backend", self.logprob_backend, ("reference", "triton"))
        check_in("device", self.device.split(":")[0], ("cpu", "cuda"))
        if self.task is not None:
            check_in("task", self.task, TASKS)
        for name in ("iterations", "groups", "updates_per_iter", "segment_len", "pool_size", "threads"):
            check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "eval_examples", "final_eval_examples"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("k", self.k)
        if self.k < 2:
            raise ValueError(
                f"k: expected at least 2 responses per problem (the group-mean baseline of one response is the "
                f"response itself, so its advantage is always 0), got {self.k}"
            )
        if self.groups > self.pool_size:
            raise ValueError(f"groups: expected at most pool_size={self.pool_size} problems, got {self.groups}")
        for name in ("tau", "lr", "grad_clip", "temperature"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps: expected a value in (0, 1), got {self.clip_eps!r}")
        for name in ("beta", "length_weight", "priority_floor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if isinstance(self.length_warmup, bool) or not isinstance(self.length_warmup, int) or self.length_warmup < 0:
            raise ValueError(f"length_warmup: expected an int >= 0, got {self.length_warmup!r}")
        if self.max_response_len is not None:
            check_positive_int("max_response_len", self.max_response_len)
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes: expected a number > 0, got {self.max_minutes!r}")
        self.stage_iters = tuple(self.stage_iters)
        for value in self.stage_iters:
            check_positive_int("stage_iters", value)
        if self.curriculum is not None:
            _parse_curriculum(self.curriculum)

    def levels(self, checkpoint_task: Task) -> list[Task]:
        """The tasks of the curriculum, easy → hard (one level without ``curriculum``)."""
        base = checkpoint_task.spec()
        if self.task is not None and self.task != base["name"]:
            base = {"name": self.task}
        base = base | self.task_knobs
        if self.curriculum is None:
            return [task_from_spec(base)]
        knob, values = _parse_curriculum(self.curriculum)
        return [task_from_spec(base | {knob: v}) for v in values]

    def stage_starts(self, n_levels: int) -> list[int]:
        """First iteration of each level."""
        if n_levels == 1:
            return [0]
        spans = list(self.stage_iters) or [self.iterations // n_levels]
        if len(spans) == 1:
            spans = spans * (n_levels - 1)
        if len(spans) != n_levels - 1:
            raise ValueError(
                f"stage_iters: expected 1 or {n_levels - 1} values (one per level but the last), got {list(spans)}"
            )
        starts = [0]
        for span in spans:
            starts.append(starts[-1] + max(1, span))
        return starts


def _parse_value(text: str) -> int | float | bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"curriculum: expected numbers or true/false as values, got {text!r}") from None


def _parse_curriculum(text: str) -> tuple[str, list]:
    knob, sep, values = text.partition("=")
    if not sep or not knob or not values:
        raise ValueError(f"curriculum: expected 'knob=v1,v2,...' (e.g. 'digits=3,4'), got {text!r}")
    parsed = [_parse_value(v) for v in values.split(",")]
    if len(parsed) < 1:
        raise ValueError(f"curriculum: expected at least one value, got {text!r}")
    return knob.strip().replace("-", "_"), parsed


# --- rewards and evaluation -----------------------------------------------------------------------------------
def group_rewards(group: Group, length_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards [k] float32, correct [k] bool, lengths [k] int64) of a finished group.

    correct_j = the response ended with <eos> and the task's verifier accepts it; reward = correct +
    ``length_weight`` · length_reward(lengths, correct) (k1.5 §2.3.3; lengths in tokens, <eos> included).
    """
    if not group.done:
        raise ValueError("group: expected every response to be done (<eos> or truncated)")
    task = group.problem.task
    correct = torch.tensor([r.finished and task.check(group.problem.prompt, r.text) for r in group.responses])
    lengths = torch.tensor([len(r.tokens) for r in group.responses])
    rewards = correct.float()
    if length_weight > 0:
        rewards = rewards + length_weight * length_reward(lengths, correct)
    return rewards, correct, lengths


def response_correct(task: Task, prompt: str, response_ids: Sequence[int]) -> bool:
    """A finished response (it ends with <eos>) whose text the task's verifier accepts."""
    return bool(
        response_ids and response_ids[-1] == TOKENIZER.eos_id and task.check(prompt, TOKENIZER.decode(response_ids))
    )


@torch.no_grad()
def evaluate_policy(model: TinyKimi, task: Task, examples: Sequence[Example], max_len: int, n_samples: int = 8) -> dict:
    """Greedy decoding of ``examples`` (at most ``max_len`` tokens): verifier accuracy, mean length in tokens
    (<eos> included) and the first ``n_samples`` (prompt, response, correct) triples."""
    if len(examples) == 0:
        raise ValueError("examples: expected at least one example, got 0")
    outputs = model.generate(prompt_ids(examples), max_len, temperature=0.0)
    correct = [response_correct(task, ex.prompt, out) for ex, out in zip(examples, outputs, strict=True)]
    return {
        "accuracy": sum(correct) / len(examples),
        "mean_length": sum(len(o) for o in outputs) / len(examples),
        "samples": [
            {"prompt": ex.prompt, "response": TOKENIZER.decode(out), "correct": ok}
            for ex, out, ok in list(zip(examples, outputs, correct, strict=True))[:n_samples]
        ],
    }


# --- the run ------------------------------------------------------------------------------------------------
def _build_optimizer(model: TinyKimi, cfg: RLConfig) -> MuonWithAdamW:
    """01_muon's MuonWithAdamW: Muon on the hidden matrices for ``muon`` (K2's RL optimizer), AdamW elsewhere."""
    groups = [
        {"params": g["params"], "use_muon": g["use_muon"] and cfg.optimizer == "muon"} for g in muon_param_groups(model)
    ]
    return MuonWithAdamW(groups, lr=cfg.lr, weight_decay=0.0, backend=model.cfg.backend)


def _update(model, ref_model, opt, cfg: RLConfig, groups: list[Group], rewards: torch.Tensor) -> dict:
    """``updates_per_iter`` optimizer steps on the finished groups; returns loss, grad norm and log-ratio stats."""
    n_groups, k = rewards.shape
    prompts = [g.problem.prompt_ids for g in groups for _ in range(k)]
    responses = [r.tokens for g in groups for r in g.responses]
    olds = [r.logp_old() for g in groups for r in g.responses]
    longest = max(len(t) for t in responses)
    device = model.embed.weight.device
    old_tok = torch.zeros(len(olds), longest)
    for n, old in enumerate(olds):
        old_tok[n, : len(old)] = old
    old_tok = old_tok.to(device)  # [N, R]
    rewards = rewards.to(device)
    ref_tok = None
    if cfg.method == "grpo" and cfg.beta > 0:
        with torch.no_grad():
            ref_tok = response_logprobs(
                ref_model, prompts, responses, temperature=cfg.temperature, backend=cfg.logprob_backend
            )[0]
    stats: dict = {}
    for step in range(cfg.updates_per_iter):
        opt.zero_grad(set_to_none=True)
        logp, _, mask = response_logprobs(
            model, prompts, responses, temperature=cfg.temperature, backend=cfg.logprob_backend
        )  # [N, R]
        seq_new = logp.sum(-1).view(n_groups, k)
        seq_old = old_tok.sum(-1).view(n_groups, k)
        if cfg.method == "k15":
            loss = k15_loss(seq_new, seq_old, rewards, cfg.tau)
        else:
            loss = grpo_loss(
                logp.view(n_groups, k, -1),
                old_tok.view(n_groups, k, -1),
                rewards,
                mask.view(n_groups, k, -1),
                logp_ref=None if ref_tok is None else ref_tok.view(n_groups, k, -1),
                clip_eps=cfg.clip_eps,
                beta=cfg.beta,
            )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step == 0:
            stats["abs_log_ratio_first"] = float((seq_new - seq_old).detach().abs().mean())
        stats |= {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}
    stats["abs_log_ratio_last"] = float((seq_new - seq_old).detach().abs().mean())
    return stats


def _plot(metrics: list[dict], level_names: list[str], path: Path, title: str, marks: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=70)
    its = [m["iteration"] for m in metrics if "train_accuracy" in m]
    ax_acc.plot(
        its,
        [m["train_accuracy"] for m in metrics if "train_accuracy" in m],
        lw=0.8,
        color="0.6",
        label="sampled (train)",
    )
    ax_len.plot(
        its, [m["train_length"] for m in metrics if "train_length" in m], lw=0.8, color="0.6", label="sampled (train)"
    )
    evals = [m for m in metrics if "eval" in m]
    for level, name in enumerate(level_names):
        xs = [m["iteration"] for m in evals]
        ax_acc.plot(xs, [m["eval"][level]["accuracy"] for m in evals], "o-", ms=3, label=f"greedy val, {name}")
        ax_len.plot(xs, [m["eval"][level]["mean_length"] for m in evals], "o-", ms=3, label=f"greedy val, {name}")
    for label, it in marks.items():
        for ax in (ax_acc, ax_len):
            ax.axvline(it, color="k", lw=0.6, ls=":")
        ax_len.annotate(label, (it, 1), xycoords=("data", "axes fraction"), fontsize=7, va="top")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("verifier accuracy")
    ax_len.set_xlabel("iteration")
    ax_len.set_ylabel("response length (tokens)")
    ax_acc.legend(fontsize=7)
    ax_len.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def train_rl(
    cfg: RLConfig,
    levels: Sequence[Task] | None = None,
    on_iteration: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run RL from ``cfg.init``; returns the summary that is also written to ``summary.json``.

    ``levels``: your own tasks (any ``nanokimi.data.Task`` with a verifier), easy → hard, instead of the ones
    ``cfg.task``/``cfg.curriculum`` name. ``on_iteration(iteration, record)`` is called after each iteration
    (tests use it to send Ctrl-C).
    """
    if not isinstance(cfg, RLConfig):
        raise TypeError(f"cfg: expected an RLConfig, got {type(cfg).__name__}")
    if levels is not None and (len(levels) == 0 or not all(isinstance(t, Task) for t in levels)):
        raise TypeError(f"levels: expected a non-empty sequence of Task objects, got {levels!r}")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    # Everything that can refuse the run does so before anything is written.
    if (out / "metrics.jsonl").exists() and not cfg.overwrite:
        raise ValueError(f"out: {out} already holds an RL run; pass --overwrite to replace it or pick another --out")
    ckpt = load_checkpoint(cfg.init)
    levels = list(levels) if levels is not None else cfg.levels(task_from_spec(ckpt["task"]))
    starts = cfg.stage_starts(len(levels))
    if starts[-1] >= cfg.iterations:
        raise ValueError(
            f"stage_iters: the last level would start at iteration {starts[-1]}, after the run's "
            f"{cfg.iterations} iterations"
        )
    max_len = cfg.max_response_len or max(t.max_response_len() for t in levels) + 1
    curriculum = Curriculum(levels, starts, cfg.pool_size, cfg.seed, cfg.prioritized, cfg.priority_floor)
    longest_prompt = max(len(p.prompt_ids) for pool in curriculum.pools for p in pool)
    model, _, _ = load_policy(cfg.init, longest_prompt + max_len, cfg.device)
    ref_model = None
    if cfg.method == "grpo" and cfg.beta > 0:
        ref_model = copy.deepcopy(model).requires_grad_(False)
    val_sets = [t.examples("val", cfg.eval_examples, seed=cfg.seed) for t in levels]
    test_sets = [t.examples("test", cfg.final_eval_examples, seed=cfg.seed) for t in levels]
    level_names = [_level_name(t, levels) for t in levels]

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    atomic_write_bytes(metrics_path, b"")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    start_test = [evaluate_policy(model, t, s, max_len, 12) for t, s in zip(levels, test_sets, strict=True)]
    start_val = [evaluate_policy(model, t, s, max_len, 0) for t, s in zip(levels, val_sets, strict=True)]
    metrics: list[dict] = [{"iteration": 0, "eval": start_val, "elapsed_s": time.perf_counter() - t0}]
    print(
        f"start: {levels[-1]!r} test accuracy {start_test[-1]['accuracy']:.3f}, mean length "
        f"{start_test[-1]['mean_length']:.1f} tokens",
        file=sys.stderr,
    )

    in_flight: list[Group] = []
    opt = None
    serial = 0
    status = "completed"
    iteration = 0
    bar = tqdm(total=cfg.iterations, disable=not cfg.progress, desc=f"rl {cfg.method}", dynamic_ncols=True)
    with StopFlag() as stop, open(metrics_path, "a") as log:
        log.write(json.dumps(metrics[0]) + "\n")
        while iteration < cfg.iterations:
            started = time.perf_counter()
            busy = {(g.problem.level, g.problem.index) for g in in_flight}
            for problem in curriculum.sample(cfg.groups - len(in_flight), iteration, busy):
                responses = [Response(response_seed(cfg.seed, serial, j)) for j in range(cfg.k)]
                in_flight.append(Group(problem, responses, iteration))
                serial += 1
            roll = advance_rollouts(
                model,
                in_flight,
                segment_len=cfg.segment_len,
                max_len=max_len,
                iteration=iteration,
                temperature=cfg.temperature,
                backend=cfg.logprob_backend,
            )
            ready = [g for g in in_flight if g.done]
            in_flight = [g for g in in_flight if not g.done]
            rollout_s = time.perf_counter() - started
            length_on = cfg.length_weight > 0 and iteration >= cfg.length_warmup
            record: dict = {
                "iteration": iteration + 1,
                "stage": curriculum.stage(iteration),
                "tokens": roll["tokens"],
                "continued": roll["continued"],
                "in_flight": len(in_flight),
                "groups_trained": len(ready),
                "entropy": roll["entropy"],
                "length_reward_on": length_on,
                "rollout_s": rollout_s,
            }
            if ready:
                scored = [group_rewards(g, cfg.length_weight if length_on else 0.0) for g in ready]
                rewards = torch.stack([s[0] for s in scored])  # [G', k]
                correct = torch.stack([s[1] for s in scored])
                lengths = torch.stack([s[2] for s in scored])
                for g, ok in zip(ready, correct, strict=True):
                    curriculum.record(g.problem, float(ok.float().mean()))
                stale = sum(
                    s.end - s.start for g in ready for r in g.responses for s in r.segments if s.iteration < iteration
                )
                update_started = time.perf_counter()
                if opt is None or cfg.reset_optimizer:
                    opt = _build_optimizer(model, cfg)
                record |= _update(model, ref_model, opt, cfg, ready, rewards)
                record |= {
                    "reward": float(rewards.mean()),
                    "train_accuracy": float(correct.float().mean()),
                    "train_length": float(lengths.float().mean()),
                    "truncated": sum(r.truncated for g in ready for r in g.responses) / (len(ready) * cfg.k),
                    "frac_zero_std": float((rewards.std(dim=1) == 0).float().mean()),
                    "stale_token_frac": stale / int(lengths.sum()),
                    "group_lengths": lengths.tolist(),
                    "update_s": time.perf_counter() - update_started,
                }
                # Groups carried over by partial rollouts can belong to an earlier stage: statistics per level.
                group_levels = torch.tensor([g.problem.level for g in ready])
                record["by_level"] = {
                    str(level): {
                        "groups": int((group_levels == level).sum()),
                        "accuracy": float(correct[group_levels == level].float().mean()),
                        "zero_std_groups": int((rewards[group_levels == level].std(dim=1) == 0).sum()),
                    }
                    for level in sorted(set(group_levels.tolist()))
                }
            iteration += 1
            if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
                record["eval"] = [
                    evaluate_policy(model, t, s, max_len, 0) for t, s in zip(levels, val_sets, strict=True)
                ]
            record["elapsed_s"] = time.perf_counter() - t0
            metrics.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(
                acc=f"{record.get('train_accuracy', float('nan')):.2f}",
                len=f"{record.get('train_length', float('nan')):.1f}",
                **({"val": f"{record['eval'][-1]['accuracy']:.2f}"} if "eval" in record else {}),
            )
            if on_iteration is not None:
                on_iteration(iteration, record)
            if stop.requested and iteration < cfg.iterations:
                status = "interrupted"
                break
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                status = "time_limit" if iteration < cfg.iterations else status
                break
    bar.close()
    final_test = [evaluate_policy(model, t, s, max_len, 12) for t, s in zip(levels, test_sets, strict=True)]
    wall = time.perf_counter() - t0

    payload = {
        "format": CKPT_FORMAT,
        "step": iteration,
        "model_config": model.cfg.to_dict(),
        "task": levels[-1].spec(),
        "train_config": dataclasses.asdict(cfg) | {"rl": True},
        "world_size": 1,
        "model": model.state_dict(),
        "optimizer": {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(out / "ckpt.pt", buf.getvalue())

    summary = {
        "status": status,
        "iterations": iteration,
        "wall_s": wall,
        "method": cfg.method,
        "levels": [t.spec() for t in levels],
        "level_names": level_names,
        "stage_starts": starts,
        "max_response_len": max_len,
        "start_test": start_test,
        "final_test": final_test,
        "accuracy_gain": [f["accuracy"] - s["accuracy"] for s, f in zip(start_test, final_test, strict=True)],
        "tokens_generated": sum(m.get("tokens", 0) for m in metrics),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rl_config": dataclasses.asdict(cfg),
        "model_config": model.cfg.to_dict(),
        "parameters": model.num_parameters(),
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    marks = {f"→ {name}": start for name, start in zip(level_names[1:], starts[1:], strict=True)}
    if cfg.length_weight > 0:
        marks["length reward on"] = cfg.length_warmup
    _plot(metrics, level_names, out / "rl.png", f"TinyKimi RL ({cfg.method}) from {cfg.init}", marks)
    print(
        f"{status}: {iteration} iterations in {wall:.0f} s; {level_names[-1]} test accuracy "
        f"{start_test[-1]['accuracy']:.3f} → {final_test[-1]['accuracy']:.3f}, mean length "
        f"{start_test[-1]['mean_length']:.1f} → {final_test[-1]['mean_length']:.1f} tokens",
        file=sys.stderr,
    )
    return summary


def _level_name(task: Task, levels: list[Task]) -> str:
    """What distinguishes a level from the others, e.g. ``digits=4`` (the task name when there is one level)."""
    spec = task.spec()
    differing = [k for k in spec if any(t.spec().get(k) != spec[k] for t in levels)]
    return ", ".join(f"{k}={spec[k]}" for k in differing) or spec["name"]


# --- command line ---------------------------------------------------------------------------------------------
def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    d = RLConfig()
    p = argparse.ArgumentParser(prog="python -m nanokimi.rl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="a nanokimi.train (or nanokimi.rl.train) checkpoint")
    p.add_argument("--task", choices=list(TASKS), help="default: the checkpoint's task")
    p.add_argument("--curriculum", help="levels easy → hard over one task knob, e.g. digits=3,4")
    p.add_argument("--stage-iters", type=_parse_ints, default=(), help="iterations per level but the last, e.g. 20")
    p.add_argument("--method", default=d.method, choices=list(METHODS))
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--groups", type=int, default=d.groups, help="problems per iteration")
    p.add_argument("--k", type=int, default=d.k, help="responses per problem")
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--clip-eps", type=float, default=d.clip_eps)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, choices=list(OPTIMIZERS))
    p.add_argument("--reset-optimizer", action="store_true", help="a fresh optimizer every iteration (k1.5)")
    p.add_argument("--updates-per-iter", type=int, default=d.updates_per_iter)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--segment-len", type=int, default=d.segment_len, help="per-iteration token budget per response")
    p.add_argument("--max-response-len", type=int, help="tokens, <eos> included")
    p.add_argument("--length-weight", type=float, default=d.length_weight)
    p.add_argument("--length-warmup", type=int, default=d.length_warmup)
    p.add_argument("--pool-size", type=int, default=d.pool_size)
    p.add_argument("--uniform-sampling", action="store_true", help="no prioritised sampling")
    p.add_argument("--priority-floor", type=float, default=d.priority_floor)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-examples", type=int, default=d.eval_examples)
    p.add_argument("--final-eval-examples", type=int, default=d.final_eval_examples)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--logprob-backend", default=d.logprob_backend, choices=["reference", "triton"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-progress", action="store_true")
    add_task_knob_arguments(p, "task knobs (override the checkpoint's)")
    return p


def config_from_args(args: argparse.Namespace) -> RLConfig:
    return RLConfig(
        init=args.init,
        task=args.task,
        task_knobs=task_knobs_from_args(args),
        curriculum=args.curriculum,
        stage_iters=args.stage_iters,
        method=args.method,
        iterations=args.iterations,
        groups=args.groups,
        k=args.k,
        tau=args.tau,
        clip_eps=args.clip_eps,
        beta=args.beta,
        lr=args.lr,
        optimizer=args.optimizer,
        reset_optimizer=args.reset_optimizer,
        updates_per_iter=args.updates_per_iter,
        grad_clip=args.grad_clip,
        temperature=args.temperature,
        segment_len=args.segment_len,
        max_response_len=args.max_response_len,
        length_weight=args.length_weight,
        length_warmup=args.length_warmup,
        pool_size=args.pool_size,
        prioritized=not args.uniform_sampling,
        priority_floor=args.priority_floor,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        final_eval_examples=args.final_eval_examples,
        max_minutes=args.max_minutes,
        seed=args.seed,
        out=args.out,
        overwrite=args.overwrite,
        logprob_backend=args.logprob_backend,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train_rl(config_from_args(args))
    except (ValueError, TypeError) as err:  # bad configuration or checkpoint: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 130 if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train TinyKimi on a synthetic task: ``python -m nanokimi.train --preset cpu-tiny --task add --steps 700``.

What one step does (the same on 1 process or N under ``torchrun``):

1. the global batch of step s is drawn from the task with seed (seed, s) — no data-loader state, so a resumed
   run sees exactly the batches an uninterrupted one would; under torchrun rank r takes rows r::N of it;
2. loss = mean cross-entropy over the answer tokens of the *global* batch (each rank divides its sum by the
   global count and DDP averages gradients, so 1 and N processes compute the same number);
3. gradients clipped to ``--grad-clip`` (global norm), learning rate = warm-up then cosine decay to
   ``min_lr_ratio``;
4. optimizer step: ``muonclip`` = Muon (01_muon) on the hidden matrices + AdamW on embeddings, head, norms and
   gates + QK-clip on the attention layers' W_q/W_k; ``muon`` = the same without QK-clip; ``adamw`` = AdamW on
   everything (all through 01_muon's ``MuonWithAdamW``). Distributed Muon as in Moonlight: every rank holds the
   all-reduced gradients, runs Newton–Schulz only for the Muon matrices it owns, and the orthogonalised updates
   are broadcast from their owners to every rank (01_muon's optimizer does this under torch.distributed); QK-clip
   uses the per-head max logits maximised over ranks;
5. MoE router biases (05_moe_k2) updated from the token loads of the step (summed over ranks).

Outputs in ``--out``: ``metrics.jsonl`` (one line per step, plus ``val_*`` on evaluation steps),
``ckpt.pt`` (atomic: written to a temporary file, flushed, fsynced, renamed; every ``--ckpt-every`` steps, at
the end, and when Ctrl-C stops the run after the step in progress), ``train.png`` and ``summary.json``.
``--resume`` continues from ``ckpt.pt`` and reproduces the uninterrupted loss curve exactly on a CPU. A
checkpoint written by another configuration, a corrupt checkpoint, or an existing checkpoint without
``--resume`` stops the run with a clear error before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import TASKS, TOKENIZER, Task, collate, make_task, prompt_ids, task_from_spec
from nanokimi.model import PRESETS, TinyKimi, TinyKimiConfig
from nanokimi.muon import MuonWithAdamW, QKClip, muon_param_groups

__all__ = [
    "CKPT_FORMAT",
    "TrainConfig",
    "train",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "CheckpointError",
    "OPTIMIZERS",
    "build_optimizer",
    "main",
    "StopFlag",
    "atomic_write_bytes",
    "add_task_knob_arguments",
    "task_knobs_from_args",
]

OPTIMIZERS = ("muonclip", "muon", "adamw")
CKPT_FORMAT = "nanokimi.train/1"
# Train-config fields that shape the loss curve: a resumed run must match them exactly.
_CURVE_FIELDS = (
    "preset",
    "task",
    "task_knobs",
    "model_overrides",
    "optimizer",
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "qk_clip_threshold",
    "seed",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, not ours, or written by another configuration."""


@dataclass
class TrainConfig:
    """Every knob of a run. ``task_knobs`` go to ``make_task``; ``model_overrides`` to ``TinyKimiConfig.preset``."""

    preset: str = "cpu-tiny"
    task: str = "add"
    task_knobs: dict = field(default_factory=dict)
    model_overrides: dict = field(default_factory=dict)
    optimizer: str = "muonclip"
    steps: int = 700
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    qk_clip_threshold: float = 100.0
    eval_every: int = 100
    eval_examples: int = 256
    test_examples: int = 1000
    ckpt_every: int = 250
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    device: str = "auto"
    threads: int = 1  # CPU threads for torch; tiny models gain little from more, and a shared CPU loses a lot
    progress: bool = True

    def __post_init__(self) -> None:
        check_in("preset", self.preset, list(PRESETS))
        check_in("task", self.task, TASKS)
        check_in("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("steps", "batch_size", "eval_every", "eval_examples", "test_examples", "ckpt_every", "threads"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        for name in ("lr", "grad_clip", "qk_clip_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        check_in("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))

    def make_task(self) -> Task:
        return make_task(self.task, **self.task_knobs)

    def model_config(self) -> TinyKimiConfig:
        return TinyKimiConfig.preset(self.preset, **self.model_overrides)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up, cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- distributed -------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def on(self) -> bool:
        return self.world > 1


def _setup_distributed(device: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the group (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return _Dist(0, 1, torch.device(device))
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return _Dist(dist.get_rank(), world, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), world, torch.device("cpu"))


def build_optimizer(model: TinyKimi, cfg: TrainConfig) -> MuonWithAdamW:
    """01_muon's ``MuonWithAdamW`` over ``muon_param_groups(model)``, or AdamW alone for ``--optimizer adamw``.

    Both halves share the learning rate and weight decay (Moonlight); vectors (norm gains, biases, gate
    parameters, AttnRes pseudo-queries) are never decayed. For ``adamw`` every group is an AdamW group of the
    same optimizer object, so the AdamW arithmetic is the same code in all three settings. Under torchrun the
    optimizer itself splits the Newton–Schulz work over the ranks (01_muon's distributed step).
    """
    groups = []
    for group in muon_param_groups(model):
        if group["use_muon"] and cfg.optimizer != "adamw":
            groups.append({"params": group["params"], "use_muon": True})
            continue
        vector = [(n, p) for n, p in group["params"] if p.dim() < 2 or getattr(p, "_no_weight_decay", False)]
        matrix = [(n, p) for n, p in group["params"] if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
        if matrix:
            groups.append({"params": matrix, "use_muon": False})
        if vector:
            groups.append({"params": vector, "use_muon": False, "weight_decay": 0.0})
    return MuonWithAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=model.cfg.backend)


def _all_reduce_(t: torch.Tensor, d: _Dist, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over the ranks (nothing on one process)."""
    if d.on:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


# --- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: TinyKimi, task: Task, examples: list, batch_size: int = 256) -> dict:
    """Teacher-forced answer-token loss and exact match on ``examples``.

    Exact match: for a deterministic task (one correct response per prompt) a row is right when the argmax at
    every scored position equals the target — greedy decoding under the training-time attention (MoBA decodes
    densely, which differs only once a context exceeds its top-k blocks); otherwise (random scratchpad
    verbosity, noisy labels) greedy decoding followed by the task's verifier, which checks the clean answer.
    """
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    loss_sum, count, correct = 0.0, 0, 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk).to(device)
            logits, _ = model(batch.inputs)
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")
            loss_sum += float(token_loss[batch.loss_mask].sum())
            count += int(batch.loss_mask.sum())
            if task.deterministic:
                right = (logits.argmax(-1) == batch.targets) | ~batch.loss_mask  # [b, T]
                correct += int(right.all(dim=1).sum())
            else:
                responses = model.generate(prompt_ids(chunk), task.max_response_len() + 1, temperature=0.0)
                correct += sum(
                    task.check(ex.prompt, TOKENIZER.decode(r)) for ex, r in zip(chunk, responses, strict=True)
                )
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "exact_match": correct / len(examples)}


# --- checkpoints -------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush and fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint written by ``train``; CheckpointError says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a nanokimi training checkpoint (format {found!r}, expected {CKPT_FORMAT!r})"
        )
    missing = {"step", "model_config", "task", "train_config", "model", "optimizer", "world_size"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return ckpt


def load_model(
    path: str | Path, device: str | torch.device = "cpu", backend: str | None = None
) -> tuple[TinyKimi, Task]:
    """The model (eval mode) and the task of a checkpoint, e.g. to start RL or uncertainty estimation from it."""
    ckpt = load_checkpoint(path)
    cfg_dict = ckpt["model_config"] | ({"backend": backend} if backend is not None else {})
    model = TinyKimi(TinyKimiConfig.from_dict(cfg_dict))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), task_from_spec(ckpt["task"])


def _check_resumable(ckpt: dict, cfg: TrainConfig, model_cfg: TinyKimiConfig, task: Task, d: _Dist, path: Path) -> None:
    problems = []
    if ckpt["model_config"] != model_cfg.to_dict():
        diff = {
            k: (ckpt["model_config"].get(k), v)
            for k, v in model_cfg.to_dict().items()
            if ckpt["model_config"].get(k) != v
        }
        problems.append(f"model config differs (checkpoint, now): {diff}")
    if ckpt["task"] != task.spec():
        problems.append(f"task differs: checkpoint {ckpt['task']}, now {task.spec()}")
    now = dataclasses.asdict(cfg)
    for name in _CURVE_FIELDS:
        if ckpt["train_config"].get(name) != now[name]:
            problems.append(f"{name}: checkpoint {ckpt['train_config'].get(name)!r}, now {now[name]!r}")
    if problems:
        raise CheckpointError(f"{path}: written by another configuration, cannot resume:\n  " + "\n  ".join(problems))


# --- the run -----------------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT (Ctrl-C) asks the loop to stop after the step in progress; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _plot(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=70)
    ax.plot(steps, [m["loss"] for m in metrics], lw=0.8, color="tab:blue", label="train loss")
    evals = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", ms=3, color="tab:cyan", label="val loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token loss")
    acc = ax.twinx()
    acc.plot(
        [m["step"] for m in evals],
        [m["val_exact_match"] for m in evals],
        "s-",
        ms=3,
        color="tab:red",
        label="val exact match",
    )
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("val exact match")
    lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) a training run; returns the summary that is also written to ``summary.json``.

    ``on_step(step, metrics)`` is called after each completed step (tests use it to send Ctrl-C mid-run).
    """
    torch.set_num_threads(cfg.threads)
    d = _setup_distributed(cfg.device)
    try:
        summary = _train(cfg, d, on_step)
        if d.on:
            dist.barrier()  # every rank done before any tears gloo down (a rank leaving early can abort its peer)
        return summary
    finally:
        if d.on:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, on_step) -> dict:
    task = cfg.make_task()
    model_cfg = cfg.model_config()
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / "ckpt.pt", out / "metrics.jsonl"
    if cfg.batch_size % d.world:
        raise ValueError(
            f"batch_size: expected a multiple of the number of processes ({d.world}), got {cfg.batch_size}"
        )

    # Everything that can refuse the run does so before anything is written.
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, cfg, model_cfg, task, d, ckpt_path)
    elif ckpt_path.exists():
        raise CheckpointError(
            f"{ckpt_path}: a run already lives there; pass --resume to continue it or pick another --out"
        )

    torch.manual_seed(cfg.seed)
    model = TinyKimi(model_cfg).to(d.device)
    opt = build_optimizer(model, cfg)
    qk_clip = QKClip(threshold=cfg.qk_clip_threshold) if cfg.optimizer == "muonclip" else None
    model.track_max_logits(qk_clip is not None)
    start_step, metrics = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step = ckpt["step"]
        if metrics_path.exists():
            metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            metrics = [m for m in metrics if m["step"] <= start_step]
    # Buffers (MoE biases and loads) are kept identical on every rank by construction, so DDP need not copy them.
    train_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if d.on else model
    val_set = task.examples("val", cfg.eval_examples, seed=cfg.seed)

    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
        print(model.describe())
        print(
            f"task {task.spec()}  optimizer {cfg.optimizer}  steps {cfg.steps}  batch {cfg.batch_size}  world {d.world}"
        )

    def save(step: int) -> None:
        if d.rank == 0:  # every rank holds the same parameters and optimizer state
            payload = {
                "format": CKPT_FORMAT,
                "step": step,
                "model_config": model_cfg.to_dict(),
                "task": task.spec(),
                "train_config": dataclasses.asdict(cfg),
                "world_size": d.world,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            buf = io.BytesIO()
            torch.save(payload, buf)
            atomic_write_bytes(ckpt_path, buf.getvalue())

    t0 = time.perf_counter()
    step = start_step
    status = "completed"
    bar = tqdm(
        total=cfg.steps, initial=start_step, disable=not cfg.progress or d.rank != 0, desc="train", dynamic_ncols=True
    )
    with StopFlag() as stop, open(metrics_path, "a") if d.rank == 0 else open(os.devnull, "w") as log:
        while step < cfg.steps:
            record = _train_step(cfg, task, model, train_model, opt, qk_clip, d, step)
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if d.rank == 0:
                    ev = evaluate(model, task, val_set)
                    record |= {"val_loss": ev["loss"], "val_exact_match": ev["exact_match"]}
            record["elapsed_s"] = time.perf_counter() - t0
            metrics.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                **({"val_em": f"{record['val_exact_match']:.3f}"} if "val_exact_match" in record else {}),
            )
            if on_step is not None:
                on_step(step, record)
            # every rank must stop after the same step, whichever of them saw the Ctrl-C
            stop_now = torch.tensor([float(stop.requested)], device=d.device)
            _all_reduce_(stop_now, d, "max")
            if step % cfg.ckpt_every == 0 or step == cfg.steps or bool(stop_now.item()):
                save(step)
            if bool(stop_now.item()) and step < cfg.steps:
                status = "interrupted"
                break
    bar.close()
    wall = time.perf_counter() - t0

    summary: dict = {
        "status": status,
        "step": step,
        "steps": cfg.steps,
        "wall_s": wall,
        "steps_per_s": (step - start_step) / wall if wall > 0 else None,
        "parameters": model.num_parameters(),
        "world_size": d.world,
        "device": str(d.device),
        "torch": torch.__version__,
        "model_config": model_cfg.to_dict(),
        "task": task.spec(),
        "train_config": dataclasses.asdict(cfg),
    }
    if d.rank == 0:
        tail = [m["loss"] for m in metrics[-20:]]
        summary["final_train_loss"] = sum(tail) / len(tail) if tail else None
        evals = [m for m in metrics if "val_exact_match" in m]
        if evals:
            summary |= {"val_loss": evals[-1]["val_loss"], "val_exact_match": evals[-1]["val_exact_match"]}
        if status == "completed":
            test = evaluate(model, task, task.examples("test", cfg.test_examples, seed=cfg.seed))
            summary |= {"test_loss": test["loss"], "test_exact_match": test["exact_match"]}
            print(
                f"done: {step} steps in {wall:.1f} s; val exact match {summary.get('val_exact_match')}, test {test['exact_match']:.4f}"
            )
        else:
            print(
                f"interrupted after step {step}; checkpoint saved to {ckpt_path}; continue with --resume",
                file=sys.stderr,
            )
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if metrics:
            _plot(metrics, out / "train.png", f"TinyKimi {cfg.preset} on {task.spec()['name']} ({cfg.optimizer})")
    return summary


def _train_step(cfg, task, model, train_model, opt, qk_clip, d: _Dist, step: int) -> dict:
    started = time.perf_counter()
    examples = task.examples("train", cfg.batch_size, seed=[cfg.seed, step], distinct=False)
    global_batch = collate(examples)
    n_scored = int(global_batch.loss_mask.sum())  # the same on every rank
    batch = collate(examples[d.rank :: d.world]).to(d.device)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * cfg.lr_factor(step)
    opt.zero_grad(set_to_none=True)
    logits, _ = train_model(batch.inputs)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")  # [b, T]
    loss_sum = token_loss[batch.loss_mask].sum()
    # DDP averages gradients over ranks, hence the factor world / n_scored: the gradient is that of the
    # global mean, identical to one process holding the whole batch.
    (loss_sum * (d.world / n_scored)).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    record: dict = {"step": step + 1, "lr": cfg.lr * cfg.lr_factor(step), "grad_norm": float(grad_norm)}
    if qk_clip is not None:
        # the per-head maximum over the global batch: the max of the ranks' maxima
        max_logits = {
            name: _all_reduce_(per_head.detach().clone(), d, "max") for name, per_head in model.max_logits().items()
        }
        for name, per_head in max_logits.items():
            qk_clip.observe(name, per_head)
        if max_logits:
            record["max_logit"] = max(float(v.max()) for v in max_logits.values())
    opt.step()
    if qk_clip is not None:
        qk_clip.apply_(model)
    moes = model.moe_modules()
    if moes:
        ratios = []
        for moe in moes:
            _all_reduce_(moe.tokens_per_expert, d)
            ratios.append(moe.update_bias()["max_over_mean"])
        record["moe_max_over_mean_load"] = max(ratios)
    record["loss"] = float(_all_reduce_(loss_sum.detach().clone(), d)) / n_scored
    record["step_s"] = time.perf_counter() - started
    return record


# --- command line ------------------------------------------------------------------------------------------
def _int_or_ints(text: str) -> int | tuple[int, ...]:
    """``"3"`` → 3, ``"1,2,3,4"`` → (1, 2, 3, 4): a knob that takes one value or a tuple to draw from."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int or a comma-separated list of ints such as 1,2,3, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


TASK_KNOBS = ("digits", "reverse", "scratchpad", "label_noise", "pairs", "queries", "gap", "length")


def add_task_knob_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """The command-line flags of every task knob (``TASK_KNOBS``), as one argument group; all default to None."""
    task = parser.add_argument_group(title)
    task.add_argument("--digits", type=_int_or_ints, help="operand digits, or a list such as 1,2,3,4 (a mixture)")
    task.add_argument("--reverse", action="store_true", default=None)
    task.add_argument("--scratchpad", type=_int_or_ints, help="verbosity 0, 1 or 2, or a list such as 0,1,2")
    task.add_argument("--label-noise", type=float)
    task.add_argument("--pairs", type=int)
    task.add_argument("--queries", type=int)
    task.add_argument("--gap", type=int)
    task.add_argument("--length", type=int)


def task_knobs_from_args(args: argparse.Namespace) -> dict:
    """The task knobs given on the command line (those left at None are not passed to the task)."""
    return {k: getattr(args, k) for k in TASK_KNOBS if getattr(args, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanokimi.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-tiny", choices=list(PRESETS))
    p.add_argument("--task", default="add", choices=list(TASKS))
    p.add_argument("--optimizer", default="muonclip", choices=list(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=TrainConfig.min_lr_ratio)
    p.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    p.add_argument("--qk-clip-threshold", type=float, default=TrainConfig.qk_clip_threshold)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--eval-examples", type=int, default=TrainConfig.eval_examples)
    p.add_argument("--test-examples", type=int, default=TrainConfig.test_examples)
    p.add_argument("--ckpt-every", type=int, default=TrainConfig.ckpt_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--out", default=TrainConfig.out)
    p.add_argument("--resume", action="store_true", help="continue the run whose ckpt.pt is in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    add_task_knob_arguments(p, "task knobs (only those given are passed to the task)")
    model = p.add_argument_group("model overrides (on top of the preset)")
    model.add_argument("--d-model", type=int)
    model.add_argument("--n-heads", type=int)
    model.add_argument("--n-layers", type=int)
    model.add_argument("--pattern")
    model.add_argument("--residual", choices=["standard", "full", "block"])
    model.add_argument("--ffn", choices=["dense", "moe"])
    model.add_argument("--backend", choices=["reference", "triton"])
    model.add_argument("--tie-embeddings", action="store_true", default=None)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    model_names = ("d_model", "n_heads", "n_layers", "pattern", "residual", "ffn", "backend", "tie_embeddings")
    return TrainConfig(
        preset=args.preset,
        task=args.task,
        task_knobs=task_knobs_from_args(args),
        model_overrides={k: getattr(args, k) for k in model_names if getattr(args, k) is not None},
        optimizer=args.optimizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        qk_clip_threshold=args.qk_clip_threshold,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        test_examples=args.test_examples,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        make_task(cfg.task, **cfg.task_knobs)
        summary = train(cfg)
    except (ValueError, TypeError) as err:  # bad configuration or checkpoint: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 130 if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    raise SystemExit(main())

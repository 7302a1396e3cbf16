"""`make demo` / ``python -m nanokimi.demo``: the end-to-end story on one machine.

1. **pretrain** TinyKimi (``cpu-tiny``: the 3:1 KDA/MoBA hybrid, Block AttnRes, MoE FFN, MuonClip) on addition
   with scratchpads of random verbosity (``nanokimi.train``);
2. **rl**: k1.5 policy optimisation with the length reward from that checkpoint (``nanokimi.rl.train``);
3. **serve**: the live paged-KV engine answers a batch of requests (measured TTFT/TBT,
   ``nanokimi.serving.engine``), and the simulator replays a trace with the Conductor and the baselines
   (``nanokimi.serving.simulate``: the real Mooncake conversation trace when ``../shared`` or ``--trace`` has one,
   a generated trace otherwise);
4. **uncertainty**: CUPID, DRUE and the baselines on the RL model's answers (``nanokimi.uncertainty.evaluate``);
5. **report**: ``<out>/report.md`` with one section per stage (numbers, plots, the command that reproduces it) and
   a summary table on stdout.

Each stage runs its chapter's command-line program in a subprocess (their own progress bars show), writes under
``<out>/<stage>/`` and is reused by later runs unless ``--force``. ``--stage NAME`` runs one stage; a stage whose
prerequisite is missing stops with a message naming the stage to run first. ``--smoke`` runs every stage at a
seconds-long size (the tests use it); ``--gpu`` uses the Triton backends and the ``gpu-small`` preset on CUDA.
``<out>/settings.json`` records the last run's sizes and devices; ``Settings.load`` reads them back (the tour
notebook, ``shared/tour.ipynb``, does to show a run's outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanokimi.bench import fmt_value as _fmt

REPO = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "rl", "serve", "uncertainty", "report")
CONVERSATION_TRACE = REPO.parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"


class StageError(RuntimeError):
    """A stage cannot run (a missing prerequisite) or its program failed."""


@dataclass
class Settings:
    out: Path
    smoke: bool = False
    gpu: bool = False
    force: bool = False
    trace: Path | None = None
    threads: int = 2

    def size(self, smoke: object, cpu: object, gpu: object | None = None) -> str:
        value = smoke if self.smoke else (gpu if self.gpu and gpu is not None else cpu)
        return str(value)

    def save(self) -> None:
        """Record the sizes and devices of this run in ``<out>/settings.json`` (what ``load`` reads back)."""
        trace = None if self.trace is None else str(self.trace)
        record = {"smoke": self.smoke, "gpu": self.gpu, "threads": self.threads, "trace": trace}
        (self.out / "settings.json").write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, out: Path) -> Settings:
        """The settings of the last ``python -m nanokimi.demo`` run into ``out`` (to read its outputs back)."""
        path = Path(out) / "settings.json"
        if not path.exists():
            raise StageError(f"missing {path}: run `python -m nanokimi.demo --out {out}` first")
        d = json.loads(path.read_text())
        trace = None if d["trace"] is None else Path(d["trace"])
        return cls(Path(out), smoke=d["smoke"], gpu=d["gpu"], trace=trace, threads=d["threads"])


def _run(cmd: list[str], log: Path) -> float:
    """Run one stage's program, echoing its output to the terminal and to ``log``; returns the wall time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        code = proc.wait()
    if code != 0:
        raise StageError(f"`{shlex.join(cmd)}` exited with status {code}; its output is in {log}")
    return time.perf_counter() - start


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _done(path: Path, s: Settings) -> bool:
    return path.exists() and not s.force


def _need(path: Path, stage: str) -> None:
    if not path.exists():
        raise StageError(f"missing {path}: run `python -m nanokimi.demo --stage {stage}` first (or the whole demo)")


def pretrain_cmd(s: Settings) -> list[str]:
    return _python(
        "nanokimi.train",
        "--preset", "gpu-small" if s.gpu else "cpu-tiny",
        "--task", "add", "--digits", "3", "--scratchpad", "0,1,2",
        "--optimizer", "muonclip",
        "--steps", s.size(30, 600, 2000),
        *(["--d-model", "32", "--n-heads", "2", "--batch-size", "8"] if s.smoke else []),
        "--eval-every", s.size(10, 100, 200),
        "--eval-examples", s.size(32, 256),
        "--test-examples", s.size(32, 500),
        "--backend", "triton" if s.gpu else "reference",
        "--device", "cuda" if s.gpu else "cpu",
        "--threads", str(s.threads),
        "--out", str(s.out / "pretrain"),
    )  # fmt: skip


def rl_cmd(s: Settings) -> list[str]:
    return _python(
        "nanokimi.rl.train",
        "--init", str(s.out / "pretrain" / "ckpt.pt"),
        "--method", "k15",
        "--iterations", s.size(2, 30, 100),
        "--groups", s.size(2, 16, 64),
        "--k", s.size(2, 8),
        *(["--max-response-len", "16"] if s.smoke else []),
        "--length-weight", "1.0", "--length-warmup", s.size(1, 10),
        "--max-minutes", s.size(1, 3, 10),
        "--eval-examples", s.size(8, 128),
        "--final-eval-examples", s.size(8, 300),
        "--device", "cuda" if s.gpu else "cpu",
        "--threads", str(s.threads),
        "--overwrite",
        "--out", str(s.out / "rl"),
    )  # fmt: skip


def engine_cmd(s: Settings) -> list[str]:
    return _python(
        "nanokimi.serving.engine",
        "--ckpt", str(s.out / "rl" / "ckpt.pt"),
        "--requests", s.size(3, 32),
        "--rate", s.size(0, 8),
        "--backend", "triton" if s.gpu else "reference",
        "--device", "cuda" if s.gpu else "cpu",
        "--threads", "1",
        "--check",
        "--json", str(s.out / "serve" / "engine.json"),
    )  # fmt: skip


def simulate_cmd(s: Settings) -> list[str]:
    trace = s.trace if s.trace is not None else (CONVERSATION_TRACE if CONVERSATION_TRACE.exists() else None)
    src = ["--trace", str(trace)] if trace else ["--synthetic", s.size(300, 4000), "--rate", "3"]
    if trace and s.smoke:
        src += ["--limit", "300"]
    return _python(
        "nanokimi.serving.simulate",
        *src,
        "--policy", "random,least_loaded,local_cache_aware,conductor",
        "--prefill", "4", "--decode", "4",
        "--speed", "2",
        "--loads", "",
        "--out", str(s.out / "serve" / "sim"),
    )  # fmt: skip


def uncertainty_cmd(s: Settings) -> list[str]:
    return _python(
        "nanokimi.uncertainty.evaluate",
        "--base", str(s.out / "rl" / "ckpt.pt"),
        "--n", s.size(12, 300),
        "--fit-steps", s.size(3, 200),
        "--mc-passes", s.size(2, 8),
        "--layers",  # no layer sweep here (chapter 08's notebook has it): CUPID at the final hidden state only
        *(["--hidden", "16"] if s.smoke else []),
        "--name", "demo",
        "--threads", str(s.threads),
        "--out", str(s.out / "uncertainty"),
    )  # fmt: skip


def stage_pretrain(s: Settings) -> None:
    if _done(s.out / "pretrain" / "summary.json", s):
        return
    if s.force:  # the trainer never overwrites a run, so a forced rerun starts from an empty folder
        shutil.rmtree(s.out / "pretrain", ignore_errors=True)
    # A checkpoint without a summary is an interrupted run: continue it (the trainer checks the config matches).
    resume = ["--resume"] if (s.out / "pretrain" / "ckpt.pt").exists() else []
    _run(pretrain_cmd(s) + resume, s.out / "logs" / "pretrain.log")


def stage_rl(s: Settings) -> None:
    _need(s.out / "pretrain" / "ckpt.pt", "pretrain")
    if not _done(s.out / "rl" / "summary.json", s):
        _run(rl_cmd(s), s.out / "logs" / "rl.log")


def stage_serve(s: Settings) -> None:
    _need(s.out / "rl" / "ckpt.pt", "rl")
    if not _done(s.out / "serve" / "engine.json", s):
        _run(engine_cmd(s), s.out / "logs" / "engine.log")
    if not _done(s.out / "serve" / "sim" / "simulate.json", s):
        _run(simulate_cmd(s), s.out / "logs" / "simulate.log")


def stage_uncertainty(s: Settings) -> None:
    _need(s.out / "rl" / "ckpt.pt", "rl")
    if not _done(s.out / "uncertainty" / "demo.json", s):
        _run(uncertainty_cmd(s), s.out / "logs" / "uncertainty.log")


def _load(path: Path, stage: str) -> dict:
    _need(path, stage)
    return json.loads(path.read_text())


def _scalars(d: dict, keys: list[str]) -> list[tuple[str, str]]:
    return [(k, _fmt(d[k])) for k in keys if k in d and not isinstance(d[k], dict | list)]


def _section(title: str, rows: list[tuple[str, str]], images: list[Path], cmd: list[str], out: Path) -> str:
    lines = [f"## {title}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    for img in images:
        if img.exists():
            lines += ["", f"![{img.stem}]({img.relative_to(out).as_posix()})"]
    lines += ["", "Reproduce:", "", "```bash", shlex.join([Path(cmd[0]).name, *cmd[1:]]), "```", ""]
    return "\n".join(lines)


def report(s: Settings) -> tuple[str, list[tuple[str, str, str]]]:
    """Write ``<out>/report.md`` from the stages' outputs; return its text and the summary rows."""
    pre = _load(s.out / "pretrain" / "summary.json", "pretrain")
    rl = _load(s.out / "rl" / "summary.json", "rl")
    eng = _load(s.out / "serve" / "engine.json", "serve")
    sim = _load(s.out / "serve" / "sim" / "simulate.json", "serve")
    unc = _load(s.out / "uncertainty" / "demo.json", "uncertainty")

    sections = ["# nanokimi end-to-end demo", "", f"Device: {'cuda' if s.gpu else 'cpu'}; outputs in `{s.out}`.", ""]
    sections.append(
        _section(
            "1. Pretrain TinyKimi (addition with scratchpads, MuonClip)",
            _scalars(pre, ["steps", "wall_s", "parameters", "final_train_loss", "val_exact_match", "test_exact_match"]),
            [s.out / "pretrain" / "train.png"],
            pretrain_cmd(s),
            s.out,
        )
    )
    rl_rows = _scalars(rl, ["status", "iterations", "wall_s"]) + _rl_rows(rl)
    sections.append(
        _section("2. RL with k1.5 and the length reward", rl_rows, [s.out / "rl" / "rl.png"], rl_cmd(s), s.out)
    )
    eng_rows = _engine_rows(eng, s.out / "logs" / "engine.log")
    sections.append(_section("3a. Serve: the live paged-KV engine", eng_rows, [], engine_cmd(s), s.out))
    sim_rows = _sim_rows(sim)
    sections.append(
        _section(
            "3b. Serve: the Mooncake simulator",
            sim_rows,
            [s.out / "serve" / "sim" / "simulate.png"],
            simulate_cmd(s),
            s.out,
        )
    )
    unc_rows = _uncertainty_rows(unc)
    sections.append(
        _section(
            "4. Uncertainty: CUPID, DRUE and baselines",
            unc_rows,
            [s.out / "uncertainty" / "demo.png"],
            uncertainty_cmd(s),
            s.out,
        )
    )
    text = "\n".join(sections)
    (s.out / "report.md").write_text(text)
    summary = [("pretrain", k, v) for k, v in _scalars(pre, ["test_exact_match", "wall_s"])]
    summary += [("rl", k, v) for k, v in rl_rows[-3:]]
    summary += [("serve", k, v) for k, v in eng_rows[:3] + sim_rows[:4]]
    summary += [("uncertainty", k, v) for k, v in unc_rows[:4]]
    return text, summary


def _rl_rows(rl: dict) -> list[tuple[str, str]]:
    rows = []
    for name, start, final in zip(rl["level_names"], rl["start_test"], rl["final_test"], strict=True):
        rows.append((f"{name}: held-out accuracy before → after", f"{start['accuracy']:.3f} → {final['accuracy']:.3f}"))
        rows.append(
            (f"{name}: mean response length before → after", f"{start['mean_length']:.1f} → {final['mean_length']:.1f}")
        )
    return rows


def _engine_rows(eng: dict, log: Path) -> list[tuple[str, str]]:
    summary = eng["summary"]
    rows = [
        (k, _fmt(summary[k])) for k in ("completed", "ttft_mean", "ttft_p90", "tbt_mean", "tbt_p90") if k in summary
    ]
    rows += [(k, _fmt(summary[k])) for k in ("output_tokens_per_s", "token_hit_rate", "slo_attainment") if k in summary]
    same = [line for line in log.read_text().splitlines() if line.startswith("outputs identical to TinyKimi.generate")]
    if same:
        rows.append(("greedy outputs identical to TinyKimi.generate", same[-1].rsplit(":", 1)[-1].strip()))
    return rows


def _sim_rows(sim: dict) -> list[tuple[str, str]]:
    rows = []
    for name, summ in sim["summaries"].items():
        rows.append((f"{name}: mean TTFT (s)", _fmt(summ.get("ttft_mean"))))
        rows.append((f"{name}: goodput (req/s)", _fmt(summ.get("goodput_rps"))))
    return rows


def _uncertainty_rows(unc: dict) -> list[tuple[str, str]]:
    rows = [("answer accuracy (in distribution)", _fmt(unc["accuracy"]))]
    for name, best in unc["target"].items():
        rows.append((f"OOD AUROC, CUPID epistemic ({name})", _fmt(best["cupid_epistemic"])))
        rows.append(
            (
                f"OOD AUROC, best single-pass baseline ({name})",
                f"{best['best_single_pass']} {_fmt(best['best_single_pass_auroc'])}",
            )
        )
    for scorer, err in unc["error_detection"].items():
        rows.append((f"error-detection AUROC, {scorer}", _fmt(err["auroc"])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanokimi.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--gpu", action="store_true", help="Triton backends and larger presets on a CUDA machine")
    parser.add_argument("--smoke", action="store_true", help="every stage at a seconds-long size")
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    parser.add_argument("--trace", type=Path, help="a Mooncake-format JSONL trace for the simulator")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per stage")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device is visible (torch.cuda.is_available() is False)")
    if args.trace is not None and not args.trace.exists():
        parser.error(f"--trace: expected an existing JSONL file, got {str(args.trace)!r}")
    s = Settings(args.out, args.smoke, args.gpu, args.force, args.trace, args.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    s.save()
    stages = STAGES if args.stage == "all" else (args.stage,)
    runners = {"pretrain": stage_pretrain, "rl": stage_rl, "serve": stage_serve, "uncertainty": stage_uncertainty}
    start = time.perf_counter()
    try:
        for stage in stages:
            if stage in runners:
                print(f"\n=== stage {stage} ===", flush=True)
                runners[stage](s)
        if "report" in stages:
            _, summary = report(s)
    except StageError as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        return 2
    if "report" in stages:
        print(f"\nreport: {s.out / 'report.md'}  ({time.perf_counter() - start:.0f} s)")
        width = max(len(k) for _, k, _ in summary) if summary else 10
        for stage, k, v in summary:
            print(f"  {stage:<12} {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

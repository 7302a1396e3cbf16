"""nanokimi.train: smoke run, outputs, resume equality, Ctrl-C, bad input, and a 2-process gloo run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokimi.data import make_task
from nanokimi.model import TinyKimi
from nanokimi.muon import MuonWithAdamW
from nanokimi.train import (
    CheckpointError,
    TrainConfig,
    build_optimizer,
    build_parser,
    config_from_args,
    evaluate,
    load_checkpoint,
    load_model,
    main,
    train,
)

# A model small enough for a few steps a second on one core that still has every part (KDA, MoBA, Block
# AttnRes, MoE); passed as model overrides on top of the cpu-tiny preset.
SMALL = dict(d_model=32, n_heads=2, n_layers=2, pattern="KM", d_ff=48, moe_d_ff=16, attnres_block_size=2)
CLI_SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--pattern", "KM", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # train() sets its own thread count


def config(out: Path, **kw) -> TrainConfig:
    base = dict(
        task="add",
        task_knobs={"digits": 2},
        model_overrides=SMALL,
        steps=6,
        batch_size=8,
        warmup_steps=2,
        eval_every=3,
        eval_examples=16,
        test_examples=16,
        ckpt_every=3,
        out=str(out),
        device="cpu",  # bit-exact resume and the gloo comparison are CPU properties
        progress=False,
    )
    return TrainConfig(**(base | kw))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --- a whole run -------------------------------------------------------------------------------------------
def test_smoke_run_writes_every_output(tmp_path):
    summary = train(config(tmp_path))
    assert summary["status"] == "completed" and summary["step"] == 6
    assert {"ckpt.pt", "metrics.jsonl", "summary.json", "train.png"} <= {p.name for p in tmp_path.iterdir()}
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert [m["step"] for m in metrics if "val_exact_match" in m] == [3, 6]
    assert all("max_logit" in m and m["moe_max_over_mean_load"] >= 1.0 for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(0.5 * 3e-3) and metrics[1]["lr"] == pytest.approx(3e-3)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "completed" and 0.0 <= on_disk["test_exact_match"] <= 1.0
    assert on_disk["parameters"] == summary["parameters"]
    png = (tmp_path / "train.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 100_000
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["task"] == make_task("add", digits=2).spec()
    model, task = load_model(tmp_path / "ckpt.pt")
    assert not model.training and task.spec() == ckpt["task"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_interrupted_and_resumed_run_reproduces_the_loss_curve(tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    train(config(whole, ckpt_every=100))

    def ctrl_c_at_step_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the run finishes the step, saves, stops

    first = train(config(pieces, ckpt_every=100), on_step=ctrl_c_at_step_2)
    assert first["status"] == "interrupted" and first["step"] == 2
    assert load_checkpoint(pieces / "ckpt.pt")["step"] == 2
    assert len(read_metrics(pieces)) == 2
    second = train(config(pieces, ckpt_every=100, resume=True))
    assert second["status"] == "completed"
    a, b = read_metrics(whole), read_metrics(pieces)
    assert [m["step"] for m in b] == list(range(1, 7))
    # same seed, same batches, same state: bit-identical losses and weights on a CPU
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m.get("val_loss") for m in a] == [m.get("val_loss") for m in b]
    wa, wb = load_checkpoint(whole / "ckpt.pt")["model"], load_checkpoint(pieces / "ckpt.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_optimizer_split_and_settings():
    torch.manual_seed(0)
    model = TinyKimi(TrainConfig(model_overrides=SMALL).model_config())
    opt = build_optimizer(model, TrainConfig(model_overrides=SMALL, weight_decay=0.1))
    assert isinstance(opt, MuonWithAdamW)
    names = {name: g for g in opt.param_groups for name in g["param_names"]}
    assert names["layers.0.mixer.q_proj.weight"]["use_muon"] and names["layers.1.ffn.w_gate"]["use_muon"]
    for adamw in ("embed.weight", "lm_head.weight", "layers.0.mixer_norm.weight", "layers.0.mixer.A_log"):
        assert not names[adamw]["use_muon"], adamw
    assert names["embed.weight"]["weight_decay"] == 0.1
    assert names["layers.0.mixer.A_log"]["weight_decay"] == 0.0  # vectors and _no_weight_decay: never decayed
    assert names["residual.queries.0"]["weight_decay"] == 0.0
    adamw = build_optimizer(model, TrainConfig(model_overrides=SMALL, optimizer="adamw"))
    assert not any(g["use_muon"] for g in adamw.param_groups)
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [cfg.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert TrainConfig(steps=10, warmup_steps=0).lr_factor(0) == pytest.approx(1.0)


def test_qk_clip_and_moe_bias_updates_run_each_step(tmp_path):
    clipped = train(config(tmp_path / "clip", steps=3, eval_every=3, qk_clip_threshold=1e-3))
    plain = train(config(tmp_path / "plain", steps=3, eval_every=3, optimizer="muon"))
    assert clipped["status"] == plain["status"] == "completed"
    wc = load_checkpoint(tmp_path / "clip" / "ckpt.pt")["model"]
    wp = load_checkpoint(tmp_path / "plain" / "ckpt.pt")["model"]
    q = "layers.1.mixer.q_proj.weight"  # the MoBA layer: QK-clip shrank its W_q towards the 1e-3 cap
    assert wc[q].norm() < 0.2 * wp[q].norm()
    assert torch.equal(wc["layers.0.mixer.q_proj.weight"].norm() > 0, torch.tensor(True))
    assert float(wp["layers.1.ffn.expert_bias"].abs().sum()) > 0  # aux-loss-free bias moved
    assert "max_logit" not in read_metrics(tmp_path / "plain")[0]


def test_evaluate_loss_and_generation_path():
    torch.manual_seed(0)
    model = TinyKimi(TrainConfig(model_overrides=SMALL).model_config())
    task = make_task("add", digits=2)
    examples = task.examples("val", 6, seed=0)
    result = evaluate(model, task, examples, batch_size=4)
    from nanokimi.data import collate

    batch = collate(examples)
    with torch.no_grad():
        _, loss = model(batch.inputs, batch.targets, batch.loss_mask)
    assert result["loss"] == pytest.approx(float(loss), rel=1e-6)
    noisy = make_task("add", digits=2, label_noise=0.5)  # not deterministic: greedy decoding + verifier
    assert 0.0 <= evaluate(model, noisy, noisy.examples("val", 4, seed=0))["exact_match"] <= 1.0
    assert model.training


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--task", "chess"], "argument --task: invalid choice: 'chess'"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    ],
)
def test_cli_rejects_unknown_names(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_rejects_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="preset: expected one of"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="task: expected one of"):
        TrainConfig(task="chess")
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)


def test_cli_bad_task_knob_is_one_clear_line(tmp_path, capsys):
    code = main(["--task", "mqar", "--digits", "3", "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    assert "unknown task knobs ['digits']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_digit_mixture_is_parsed_like_scratchpad(tmp_path):
    def knobs(*argv: str) -> dict:
        return config_from_args(build_parser().parse_args(list(argv))).task_knobs

    assert knobs("--digits", "3") == {"digits": 3}  # one count stays an int: the same task as before
    assert knobs("--digits", "1,2,3,4", "--scratchpad", "0,2") == {"digits": (1, 2, 3, 4), "scratchpad": (0, 2)}
    out = tmp_path / "mix"
    assert (
        main(
            [
                "--digits",
                "1,2",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--warmup-steps",
                "0",
                "--eval-every",
                "2",
                "--eval-examples",
                "8",
                "--test-examples",
                "8",
                "--out",
                str(out),
                "--no-progress",
                *CLI_SMALL,
            ]
        )
        == 0
    )
    assert load_checkpoint(out / "ckpt.pt")["task"]["digits"] == [1, 2]
    _, task = load_model(out / "ckpt.pt")
    assert task.digit_counts == (1, 2) and task.check("7+5=", "12") and task.check("07+05=", "012")


@pytest.mark.parametrize("flag", ["--digits", "--scratchpad"])
def test_cli_int_list_flags_name_the_argument(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "2,x"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected an int or a comma-separated list of ints such as 1,2,3, got '2,x'" in (
        capsys.readouterr().err
    )
    assert main(["--digits", "2,2", "--no-progress"]) == 2  # parsed, then refused by the task
    assert "digits: expected distinct digit counts" in capsys.readouterr().err


def test_checkpoint_errors_leave_everything_untouched(tmp_path):
    train(config(tmp_path, steps=3))
    before = snapshot(tmp_path)
    # 1. a run already lives there and --resume was not given
    with pytest.raises(CheckpointError, match="a run already lives there; pass --resume"):
        train(config(tmp_path, steps=3))
    # 2. a checkpoint from another configuration
    with pytest.raises(CheckpointError, match=r"written by another configuration(.|\n)*d_model"):
        train(config(tmp_path, steps=3, resume=True, model_overrides=SMALL | {"d_model": 64}))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.003, now 0.01"):
        train(config(tmp_path, steps=3, resume=True, lr=1e-2))
    with pytest.raises(CheckpointError, match="task differs"):
        train(config(tmp_path, steps=3, resume=True, task_knobs={"digits": 3}))
    assert snapshot(tmp_path) == before
    # 3. a corrupt (truncated) checkpoint
    (tmp_path / "ckpt.pt").write_bytes(before["ckpt.pt"][:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(config(tmp_path, steps=3, resume=True))
    assert (tmp_path / "ckpt.pt").read_bytes() == before["ckpt.pt"][:1000]
    # 4. a foreign file that torch can read
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    foreign = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(CheckpointError, match="not a nanokimi training checkpoint"):
        load_model(tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a nanokimi training checkpoint"):
        train(config(tmp_path, steps=3, resume=True))
    assert (tmp_path / "ckpt.pt").read_bytes() == foreign
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "ckpt.pt"} == {
        k: v for k, v in before.items() if k != "ckpt.pt"
    }
    # 5. nothing to resume
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        train(config(tmp_path / "empty", steps=3, resume=True))
    assert not (tmp_path / "empty").exists()


def test_cli_reports_checkpoint_errors_without_a_traceback(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    code = main(["--out", str(tmp_path), "--resume", "--no-progress", *CLI_SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a readable checkpoint" in err and "Traceback" not in err


# --- distributed -------------------------------------------------------------------------------------------
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP, Muon's Newton–Schulz split over ranks) against 1 process with
    the same global batch: losses and gradient norms agree to 1e-6 relative (measured: last-bit differences,
    ~1e-7, from summing the gradient in two halves)."""
    args = [*CLI_SMALL, "--task", "add", "--digits", "2", "--steps", "3", "--batch-size", "8"]
    args += ["--warmup-steps", "1", "--eval-every", "3", "--eval-examples", "8", "--test-examples", "8"]
    args += ["--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # One retry for one failure only: a rank that has finished training (barrier, destroy_process_group) can still
    # abort in gloo's teardown at interpreter exit with "terminate called without an active exception" (hit CI once
    # here and once in 01's spawn test; not reproduced in 25 local loops, idle and loaded). Other failures fail now.
    for attempt in range(2):
        out = tmp_path / f"ddp{attempt}"
        proc = subprocess.run(
            [*launcher, "-m", "nanokimi.train", *args, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    ddp, single = read_metrics(out), read_metrics(tmp_path / "single")
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert len(ddp) == len(single) == 3
    for a, b in zip(ddp, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


# --- experiments (smoke size) ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["muon_vs_adamw", "residual_modes", "mqar_mixers", "backend_parity"])
def test_experiment_smoke_run_writes_json_and_png(name, tmp_path):
    import importlib

    module = importlib.import_module(f"nanokimi.experiments.{name}")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    if name == "muon_vs_adamw":
        assert result["adamw"]["steps_to_target"] is not None and result["target_val_loss"] > 0
        assert set(result["curves"]) == {"muonclip", "adamw"}
    elif name == "residual_modes":
        assert set(result["modes"]) == {"standard", "full", "block"}
        for r in result["modes"].values():
            assert len(r["hidden_rms"]) == len(r["grad_norm"]) == 6 and min(r["grad_norm"]) > 0
    elif name == "backend_parity":
        assert set(result["loss"]) == {"reference", "triton", "reference_rerun"}
        # the CPU reference is deterministic: its rerun is the floor of zero; the interpreted kernels agree closely
        assert result["max_reference_rerun_rel_diff"] == 0.0
        assert result["max_loss_rel_diff"] < 1e-4 and result["agree"]
    else:
        assert set(result["runs"]) == {"KDA only", "MoBA only", "dense", "3:1 hybrid"}
        assert all(len(r["value_accuracy"]) == 1 for r in result["runs"].values())

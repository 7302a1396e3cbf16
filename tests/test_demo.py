"""`make demo`: stage order and prerequisites, reuse, the report with every section, and one real end-to-end run.

The stages' programs are tested in their own chapters (trainer, RL, engine, simulator, evaluation). Most tests here
stand their outputs in with small files of the same format, so they take milliseconds; the smoke test runs every
stage's real program at ``--smoke`` size (about 30 s of CPU on one thread), so ``make test`` catches a stage whose
command line, outputs or report section no longer fit together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanokimi import demo


def _fake_outputs(out: Path) -> None:
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "summary.json").write_text(
        json.dumps({"steps": 600, "wall_s": 120.0, "parameters": 1177068, "test_exact_match": 0.91})
    )
    (out / "pretrain" / "ckpt.pt").write_bytes(b"")
    (out / "rl").mkdir()
    level = {"accuracy": 0.5, "mean_length": 20.0}
    rl = {"status": "completed", "iterations": 30, "wall_s": 100.0, "level_names": ["add"]}
    rl |= {"start_test": [level], "final_test": [{"accuracy": 0.6, "mean_length": 12.0}]}
    (out / "rl" / "summary.json").write_text(json.dumps(rl))
    (out / "rl" / "ckpt.pt").write_bytes(b"")
    (out / "serve" / "sim").mkdir(parents=True)
    summary = {"completed": 32, "ttft_mean": 0.05, "ttft_p90": 0.08, "tbt_mean": 0.02, "tbt_p90": 0.03}
    (out / "serve" / "engine.json").write_text(json.dumps({"summary": summary}))
    (out / "logs").mkdir()
    (out / "logs" / "engine.log").write_text("outputs identical to TinyKimi.generate (greedy): yes\n")
    sims = {p: {"ttft_mean": t, "goodput_rps": 1.0} for p, t in (("random", 6.6), ("conductor", 0.94))}
    (out / "serve" / "sim" / "simulate.json").write_text(json.dumps({"summaries": sims}))
    (out / "uncertainty").mkdir()
    unc = {"accuracy": 0.8, "error_detection": {"msp": {"auroc": 0.7}}}
    unc["target"] = {"ood": {"cupid_epistemic": 0.9, "best_single_pass": "entropy", "best_single_pass_auroc": 0.8}}
    (out / "uncertainty" / "demo.json").write_text(json.dumps(unc))


def test_report_has_every_section_and_the_numbers(tmp_path, capsys):
    _fake_outputs(tmp_path)
    assert demo.main(["--stage", "report", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for title in ("1. Pretrain", "2. RL", "3a. Serve", "3b. Serve", "4. Uncertainty"):
        assert f"## {title}" in report
    assert report.count("Reproduce:") == 5 and "nanokimi.rl.train" in report
    assert "| add: held-out accuracy before → after | 0.500 → 0.600 |" in report
    assert "| greedy outputs identical to TinyKimi.generate | yes |" in report
    assert "| conductor: mean TTFT (s) | 0.94 |" in report
    assert "| OOD AUROC, best single-pass baseline (ood) | entropy 0.8 |" in report
    assert "test_exact_match" in capsys.readouterr().out


def test_completed_stages_are_reused(tmp_path, monkeypatch):
    _fake_outputs(tmp_path)
    ran = []
    monkeypatch.setattr(demo, "_run", lambda cmd, log: ran.append(cmd) or 0.0)
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert ran == []
    assert demo.main(["--out", str(tmp_path), "--stage", "rl", "--force"]) == 0
    assert len(ran) == 1 and "nanokimi.rl.train" in ran[0]


def test_pretrain_is_resumed_when_interrupted_and_started_afresh_when_forced(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(demo, "_run", lambda cmd, log: ran.append(cmd) or 0.0)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "ckpt.pt").write_bytes(b"")  # a checkpoint, no summary.json: interrupted
    assert demo.main(["--stage", "pretrain", "--out", str(tmp_path)]) == 0
    assert "nanokimi.train" in ran[-1] and ran[-1][-1] == "--resume"
    (tmp_path / "pretrain" / "summary.json").write_text("{}")
    assert demo.main(["--stage", "pretrain", "--out", str(tmp_path), "--force"]) == 0
    assert "--resume" not in ran[-1] and not (tmp_path / "pretrain").exists()


def test_missing_prerequisite_names_the_stage_to_run(tmp_path, capsys):
    assert demo.main(["--stage", "serve", "--out", str(tmp_path)]) == 2
    assert "run `python -m nanokimi.demo --stage rl` first" in capsys.readouterr().err


def test_settings_round_trip_and_a_missing_record_is_named(tmp_path):
    trace = tmp_path / "t.jsonl"
    s = demo.Settings(out=tmp_path, gpu=True, force=True, trace=trace, threads=3)
    s.save()
    assert demo.Settings.load(tmp_path) == demo.Settings(out=tmp_path, gpu=True, trace=trace, threads=3)
    with pytest.raises(demo.StageError, match="settings.json: run `python -m nanokimi.demo --out"):
        demo.Settings.load(tmp_path / "nothing")


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--stage", "nope"])
    with pytest.raises(SystemExit):
        demo.main(["--trace", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])


def test_simulator_uses_the_real_trace_when_present_and_a_generated_one_otherwise(tmp_path):
    s = demo.Settings(out=tmp_path)
    cmd = demo.simulate_cmd(s)
    if demo.CONVERSATION_TRACE.exists():
        assert str(demo.CONVERSATION_TRACE) in cmd
    else:
        assert "--synthetic" in cmd
    trace = tmp_path / "t.jsonl"
    trace.write_text("")
    assert str(trace) in demo.simulate_cmd(demo.Settings(out=tmp_path, trace=trace))


@pytest.mark.slow
def test_smoke_runs_every_stage_for_real_and_writes_the_report(tmp_path, capsys):
    assert demo.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("pretrain", "rl", "serve", "uncertainty"):
        assert f"=== stage {stage} ===" in out
    report = (tmp_path / "report.md").read_text()
    for title in ("1. Pretrain", "2. RL", "3a. Serve", "3b. Serve", "4. Uncertainty"):
        assert f"## {title}" in report
    for image in ("pretrain/train.png", "rl/rl.png", "serve/sim/simulate.png", "uncertainty/demo.png"):
        assert (tmp_path / image).stat().st_size > 0 and f"]({image})" in report
    assert report.count("Reproduce:") == 5
    assert "| greedy outputs identical to TinyKimi.generate | yes |" in report

    pre = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert pre["status"] == "completed" and pre["steps"] == 30 and pre["model_config"]["pattern"] == "KKKM"
    rl = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert rl["status"] == "completed" and rl["iterations"] == 2
    engine = json.loads((tmp_path / "serve" / "engine.json").read_text())["summary"]
    assert engine["completed"] + engine["rejected"] == engine["requests"] == 3
    sims = json.loads((tmp_path / "serve" / "sim" / "simulate.json").read_text())["summaries"]
    assert set(sims) == {"random", "least_loaded", "local_cache_aware", "conductor"}
    for summary in sims.values():  # the simulator accounts for every request of the replayed trace
        assert summary["completed"] + summary["rejected"] == summary["requests"] > 0
    unc = json.loads((tmp_path / "uncertainty" / "demo.json").read_text())
    assert all(0.0 <= auroc <= 1.0 for scores in unc["ood_auroc"].values() for auroc in scores.values())

    assert demo.Settings.load(tmp_path) == demo.Settings(out=tmp_path, smoke=True, threads=1)

    # A second run reuses every stage: nothing is executed again, and the report is rewritten identically.
    assert demo.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "\n$ " not in capsys.readouterr().out
    assert (tmp_path / "report.md").read_text() == report

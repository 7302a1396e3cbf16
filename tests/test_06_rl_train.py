"""Chapter 06, the RL loop on TinyKimi: partial rollouts reproduce uninterrupted samples, teacher-forced log-probs
are those of the sampler, the curriculum and prioritised sampling, rewards, a 20-iteration smoke run whose reward
rises, outputs and Ctrl-C, and bad input."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from nanokimi.data import TOKENIZER, Example, Task, make_task
from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.rl.curriculum import Curriculum
from nanokimi.rl.rollout import (
    Group,
    Problem,
    Response,
    advance_rollouts,
    dense_decoding_config,
    response_logprobs,
    response_seed,
)
from nanokimi.rl.train import (
    RLConfig,
    build_parser,
    config_from_args,
    evaluate_policy,
    group_rewards,
    main,
    train_rl,
)
from nanokimi.testing import assert_close
from nanokimi.train import CheckpointError, TrainConfig, load_checkpoint, train

# Every part of TinyKimi (KDA, MoBA, MoE, Block AttnRes) at a size that samples quickly on a CPU.
SMALL = dict(d_model=32, n_heads=2, n_layers=2, pattern="KM", d_ff=48, moe_d_ff=16, attnres_block_size=2)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> str:
    """A nanokimi.train checkpoint of the small model (one step on 2-digit addition): the RL starting point."""
    out = tmp_path_factory.mktemp("pretrain")
    cfg = TrainConfig(
        task="add",
        task_knobs={"digits": 2},
        model_overrides=SMALL,
        steps=1,
        batch_size=8,
        warmup_steps=0,
        eval_every=1,
        eval_examples=4,
        test_examples=4,
        out=str(out),
        progress=False,
    )
    train(cfg)
    return str(out / "ckpt.pt")


def small_model(seed: int = 0, max_context: int = 64) -> TinyKimi:
    torch.manual_seed(seed)
    return TinyKimi(dense_decoding_config(TinyKimiConfig.preset("cpu-tiny", **SMALL), max_context)).eval()


def make_groups(task: Task, n: int, k: int, run_seed: int = 0) -> list[Group]:
    examples = task.examples("train", n, seed=1)
    problems = [
        Problem(0, i, ex.prompt, tuple(TOKENIZER.encode(ex.prompt, bos=True)), task) for i, ex in enumerate(examples)
    ]
    return [Group(p, [Response(response_seed(run_seed, i, j)) for j in range(k)], 0) for i, p in enumerate(problems)]


class StopEarly(Task):
    """Trivially learnable: any response that ends (<eos>) within ``max_response_len() + 1`` tokens is correct.

    A fresh TinyKimi emits <eos> with probability ≈ 1/65 per token, so the starting reward is ≈ 4.5%."""

    name = "stop_early"

    def sample(self, rng: np.random.Generator) -> Example:
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=3))
        return Example(text + "=", "")

    def check(self, prompt: str, response: str) -> bool:
        return len(response) <= self.max_response_len()

    def max_response_len(self) -> int:
        return 2

    def spec(self) -> dict:
        return {"name": self.name}


# --- partial rollouts ---------------------------------------------------------------------------------------------
def test_partial_rollout_continuation_equals_the_uninterrupted_sample():
    """Segments of 3 tokens over several iterations give the same tokens as one uninterrupted sample under the same
    seeds, and the per-segment old log-probs, concatenated, equal the log-probs of the whole response."""
    model = small_model()
    task = make_task("add", digits=2)
    whole = make_groups(task, 2, 3)
    advance_rollouts(model, whole, segment_len=12, max_len=12, iteration=0)
    parts = make_groups(task, 2, 3)
    iteration = 0
    while not all(g.done for g in parts):
        stats = advance_rollouts(model, parts, segment_len=3, max_len=12, iteration=iteration)
        if iteration > 0:
            assert stats["continued"] == stats["responses"] > 0
        iteration += 1
    assert iteration > 2
    for g_whole, g_parts in zip(whole, parts, strict=True):
        for r_whole, r_parts in zip(g_whole.responses, g_parts.responses, strict=True):
            assert r_parts.tokens == r_whole.tokens
            assert (r_parts.finished, r_parts.truncated) == (r_whole.finished, r_whole.truncated)
            assert len(r_parts.segments) == -(-len(r_parts.tokens) // 3)
            assert [s.iteration for s in r_parts.segments] == list(range(len(r_parts.segments)))
            assert [(s.start, s.end) for s in r_parts.segments][-1][1] == len(r_parts.tokens)
            # fp32 forwards over prefixes of different lengths (KDA's chunking differs): rounding only
            assert_close("logp_old", r_parts.logp_old(), r_whole.logp_old(), 1e-5)


def test_continuation_after_a_policy_change_keeps_each_segments_own_logprobs():
    """Off-policy segments: after an update the continuation is sampled (and scored) by the new policy, while the
    first segment keeps the log-probs of the policy that sampled it."""
    model = small_model()
    task = make_task("add", digits=2)
    groups = make_groups(task, 1, 2)
    advance_rollouts(model, groups, segment_len=2, max_len=8, iteration=0)
    first = [r.segments[0].logp_old.clone() for r in groups[0].responses]
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    advance_rollouts(model, groups, segment_len=2, max_len=8, iteration=1)
    for r, kept in zip(groups[0].responses, first, strict=True):
        assert torch.equal(r.segments[0].logp_old, kept)
        with torch.no_grad():
            now, _, _ = response_logprobs(model, [groups[0].problem.prompt_ids], [r.tokens])
        assert_close("second segment", r.segments[1].logp_old, now[0, 2 : len(r.tokens)], 1e-5)
        assert not torch.allclose(now[0, :2], kept)


def test_response_logprobs_equal_a_full_forward_and_ignore_padding():
    model = small_model()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]]
    responses = [[14, 15, 2], [16], [17, 18, 19, 20, 2]]
    logp, entropy, mask = response_logprobs(model, prompts, responses)
    assert logp.shape == entropy.shape == mask.shape == (3, 5)
    assert mask.sum(1).tolist() == [3, 1, 5]
    with torch.no_grad():
        for n, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            tokens = torch.tensor([p + r])
            logits, _ = model(tokens[:, :-1])
            want = torch.log_softmax(logits[0].double(), -1).gather(1, tokens[0, 1:, None]).squeeze(1)[len(p) - 1 :]
            assert_close(f"row {n}", logp[n, : len(r)].double(), want, 1e-5)
            assert torch.all(logp[n, len(r) :] == 0)
    hot, _, _ = response_logprobs(model, prompts, responses, temperature=2.0)
    assert not torch.allclose(hot, logp)


def test_dense_decoding_config_makes_the_forward_equal_the_decoder():
    """MoBA decodes densely; past topk·block_size tokens its block-sparse forward differs. With
    dense_decoding_config the teacher-forced logits equal step-by-step decoding logits."""
    torch.manual_seed(0)
    sparse_cfg = TinyKimiConfig.preset("cpu-tiny", **SMALL)  # blocks of 8, top-2: sparse beyond 16 tokens
    sparse = TinyKimi(sparse_cfg).eval()
    dense = TinyKimi(dense_decoding_config(sparse_cfg, 28)).eval()
    dense.load_state_dict(sparse.state_dict())
    assert dense.cfg.moba_topk == 4
    tokens = torch.randint(3, TOKENIZER.vocab_size, (2, 28), generator=torch.Generator().manual_seed(1))

    def decoded(model):
        caches = model.new_caches()
        steps = [model(tokens[:, t : t + 1], caches=caches)[0] for t in range(tokens.shape[1])]
        return torch.cat(steps, dim=1)

    with torch.no_grad():
        assert_close("dense forward vs decoder", dense(tokens)[0], decoded(dense), 1e-5)
        gap = (sparse(tokens)[0] - decoded(sparse)).abs()[:, 16:].max()
    assert gap > 1e-3


# --- curriculum, rewards ------------------------------------------------------------------------------------------
def test_curriculum_stages_and_prioritised_sampling():
    easy, hard = make_task("add", digits=2), make_task("add", digits=3)
    cur = Curriculum([easy, hard], [0, 5], pool_size=20, seed=0, floor=0.0)
    assert [cur.stage(i) for i in (0, 4, 5, 99)] == [0, 0, 1, 1]
    assert all(p.level == 0 and len(p.prompt) == 6 for p in cur.sample(5, 0))
    assert all(p.level == 1 and len(p.prompt) == 8 for p in cur.sample(5, 7))
    for p in cur.pools[1][:15]:
        cur.record(p, 1.0)  # solved: weight 1 − 1 + floor = 0
    picks = cur.sample(5, 7)
    assert sorted(p.index for p in picks) == list(range(15, 20))
    assert cur.sample(5, 7, busy={(1, 15), (1, 16)}) and all(
        p.index in (17, 18, 19) for p in cur.sample(5, 7, busy={(1, 15), (1, 16)})
    )
    for p in cur.pools[1][15:]:
        cur.record(p, 1.0)
    assert len(cur.sample(4, 7)) == 4  # everything solved and floor 0: uniform fallback
    assert cur.stats(1) == {"visited": 1.0, "success": 1.0}
    uniform = Curriculum([easy], [0], pool_size=10, prioritized=False)
    assert np.all(uniform.weights(0) == 1)


def test_group_rewards_with_and_without_the_length_reward():
    task = make_task("add", digits=2)
    prompt = "12+34="
    problem = Problem(0, 0, prompt, tuple(TOKENIZER.encode(prompt, bos=True)), task)
    texts = ["046", "04,05;046", "047", "999"]
    responses = [Response(0, TOKENIZER.encode(t, eos=True)) for t in texts]
    responses.append(Response(0, TOKENIZER.encode("046"), truncated=True))  # the right digits, but cut off
    group = Group(problem, responses, 0)
    rewards, correct, lengths = group_rewards(group)
    assert correct.tolist() == [True, True, False, False, False]
    assert lengths.tolist() == [4, 10, 4, 4, 3]
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    shaped, _, _ = group_rewards(group, length_weight=0.5)
    lam = [0.5 - (n - 3) / 7 for n in (4, 10, 4, 4, 3)]
    want = [1 + 0.5 * lam[0], 1 + 0.5 * lam[1], 0.5 * min(0, lam[2]), 0.5 * min(0, lam[3]), 0.5 * min(0, lam[4])]
    assert shaped.tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="group"):
        group_rewards(Group(problem, [Response(0, [5])], 0))


def test_evaluate_policy_counts_only_finished_verified_answers():
    model = small_model()
    task = make_task("add", digits=2)
    result = evaluate_policy(model, task, task.examples("test", 6, seed=0), max_len=4, n_samples=2)
    assert 0.0 <= result["accuracy"] <= 1.0 and 1 <= result["mean_length"] <= 4
    assert len(result["samples"]) == 2 and set(result["samples"][0]) == {"prompt", "response", "correct"}


# --- the loop -----------------------------------------------------------------------------------------------------
def test_smoke_run_reward_rises_on_a_trivially_learnable_task(init_ckpt, tmp_path):
    cfg = RLConfig(
        init=init_ckpt,
        iterations=20,
        groups=8,
        k=8,
        lr=0.03,
        eval_every=10,
        eval_examples=8,
        final_eval_examples=8,
        pool_size=64,
        out=str(tmp_path),
        progress=False,
    )
    summary = train_rl(cfg, levels=[StopEarly()])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in lines if "reward" in m]
    assert len(rewards) == 20
    assert np.mean(rewards[:5]) < 0.2 and np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3, rewards
    assert summary["status"] == "completed" and summary["iterations"] == 20
    assert summary["final_test"][0]["accuracy"] >= summary["start_test"][0]["accuracy"]
    for name in ("summary.json", "rl.png", "ckpt.pt"):
        assert (tmp_path / name).stat().st_size > 0
    saved = load_checkpoint(str(tmp_path / "ckpt.pt"))
    start = load_checkpoint(init_ckpt)
    assert saved["task"] == {"name": "stop_early"} and saved["step"] == 20
    assert not torch.equal(saved["model"]["lm_head.weight"], start["model"]["lm_head.weight"])


def test_grpo_with_muon_partial_rollouts_and_length_reward_runs(init_ckpt, tmp_path):
    """GRPO in the same harness (with Muon, reset every iteration); a 2-token budget forces continuations, whose
    stale tokens are counted."""
    cfg = RLConfig(
        init=init_ckpt,
        method="grpo",
        optimizer="muon",
        reset_optimizer=True,
        iterations=4,
        groups=2,
        k=3,
        segment_len=2,
        max_response_len=6,
        length_weight=0.5,
        length_warmup=2,
        updates_per_iter=2,
        eval_every=2,
        eval_examples=4,
        final_eval_examples=4,
        pool_size=16,
        out=str(tmp_path),
        progress=False,
    )
    summary = train_rl(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert [m["length_reward_on"] for m in lines] == [False, False, True, True]
    assert sum(m["continued"] for m in lines) > 0
    trained = [m for m in lines if m["groups_trained"]]
    assert trained and any(m["stale_token_frac"] > 0 for m in trained)
    for m in trained:
        assert sum(v["groups"] for v in m["by_level"].values()) == m["groups_trained"] == len(m["group_lengths"])
    assert summary["method"] == "grpo" and summary["max_response_len"] == 6


def test_curriculum_run_and_ctrl_c_writes_every_output(init_ckpt, tmp_path):
    def interrupt(iteration, record):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = RLConfig(
        init=init_ckpt,
        curriculum="digits=1,2",
        stage_iters=(1,),
        iterations=10,
        groups=2,
        k=2,
        eval_examples=4,
        final_eval_examples=4,
        pool_size=8,
        out=str(tmp_path),
        progress=False,
    )
    summary = train_rl(cfg, on_iteration=interrupt)
    assert summary["status"] == "interrupted" and summary["iterations"] == 2
    assert summary["level_names"] == ["digits=1", "digits=2"] and summary["stage_starts"] == [0, 1]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("stage") for m in lines] == [None, 0, 1]
    for name in ("summary.json", "rl.png", "ckpt.pt"):
        assert (tmp_path / name).stat().st_size > 0


# --- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k": 1}, "k: expected at least 2"),
        ({"tau": 0.0}, "tau: expected a finite number > 0"),
        ({"tau": -1.0}, "tau"),
        ({"method": "ppo"}, "method"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"groups": 0}, "groups"),
        ({"segment_len": 0}, "segment_len"),
        ({"length_weight": -0.1}, "length_weight"),
        ({"curriculum": "digits"}, "curriculum: expected 'knob=v1,v2"),
        ({"curriculum": "digits=3,x"}, "curriculum: expected numbers"),
        ({"groups": 9, "pool_size": 8}, "groups: expected at most pool_size=8"),
        ({"task": "chess"}, "task"),
        ({"max_minutes": 0}, "max_minutes"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RLConfig(**overrides)


def test_run_rejects_bad_input_before_writing(init_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        train_rl(RLConfig(init=str(tmp_path / "missing.pt"), out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="unknown task knobs"):
        train_rl(RLConfig(init=init_ckpt, curriculum="carries=1,2", out=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="stage_iters: expected 1 or 2 values"):
        train_rl(RLConfig(init=init_ckpt, curriculum="digits=1,2,3", stage_iters=(1, 1, 1), out=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="after the run's"):
        train_rl(
            RLConfig(init=init_ckpt, curriculum="digits=1,2", stage_iters=(50,), iterations=10, out=str(tmp_path / "d"))
        )
    with pytest.raises(TypeError, match="levels"):
        train_rl(RLConfig(init=init_ckpt, out=str(tmp_path / "e")), levels=[])
    assert not any((tmp_path / name).exists() for name in "abcde")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="--overwrite"):
        train_rl(RLConfig(init=init_ckpt, out=str(tmp_path / "f")))


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["--init", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no checkpoint there" in err and "Traceback" not in err
    assert main(["--init", "x.pt", "--k", "1"]) == 2
    assert "k: expected at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--init", "x.pt", "--method", "ppo"])


def test_cli_digit_mixture_reaches_the_levels():
    # --digits comes from nanokimi.train's shared task-knob flags: a list is a mixture, one value an int.
    cfg = config_from_args(build_parser().parse_args(["--init", "x.pt", "--digits", "2,3,4"]))
    (level,) = cfg.levels(make_task("add", digits=3, scratchpad=(0, 1)))
    assert level.digit_counts == (2, 3, 4) and level.levels == (0, 1)
    cfg = config_from_args(build_parser().parse_args(["--init", "x.pt", "--curriculum", "digits=3,4"]))
    levels = cfg.levels(make_task("add", digits=(2, 3, 4)))
    assert [t.digits for t in levels] == [3, 4]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--init", "x.pt", "--digits", "3,four"])


def test_rollout_functions_reject_bad_input():
    model = small_model()
    with pytest.raises(ValueError, match="responses: every response needs at least one token"):
        response_logprobs(model, [[1, 5]], [[]])
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        response_logprobs(model, [[1, 5]], [[4], [5]])
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(model, [[1, 5]], [[4]], temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        response_logprobs(model, [[1, 5]], [[4]], backend="cuda")
    with pytest.raises(TypeError, match="model"):
        response_logprobs(torch.nn.Linear(2, 2), [[1, 5]], [[4]])
    with pytest.raises(ValueError, match="segment_len"):
        advance_rollouts(model, [], segment_len=0, max_len=4, iteration=0)
    with pytest.raises(ValueError, match="starts"):
        Curriculum([make_task("add", digits=2)] * 2, [0, 0], pool_size=4)
    with pytest.raises(ValueError, match="success_rate"):
        cur = Curriculum([make_task("add", digits=2)], [0], pool_size=4)
        cur.record(cur.pools[0][0], 1.5)


def test_harder_levels_follow_the_pretraining_digits():
    from nanokimi.rl.experiments import harder_levels

    assert harder_levels(3) == (3, 4)  # one count: the next one up (pass rate 0 from a 3-digit model)
    assert harder_levels([2, 3, 4]) == (3, 4)  # a mixture: its largest count is the harder setting
    assert harder_levels((4, 1)) == (1, 4)


def test_experiments_smoke_run_writes_json_and_png(init_ckpt, tmp_path):
    from nanokimi.rl.experiments import EXPERIMENTS
    from nanokimi.rl.experiments import main as experiments_main

    args = ["all", "--smoke", "--init", init_ckpt, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "r")]
    assert experiments_main(args) == 0
    for name in EXPERIMENTS:
        result = json.loads((tmp_path / "r" / f"{name}.json").read_text())
        assert result["experiment"] == name
        assert (tmp_path / "r" / f"{name}.png").stat().st_size > 0
    harder = json.loads((tmp_path / "r" / "harder.json").read_text())
    assert harder["levels"] == ["digits=2", "digits=3"]  # a 2-digit checkpoint: d → d+1
    for when in ("start", "final"):
        shares = [v["share"] for v in harder["hard_level_by_verbosity"][when].values()]
        assert sum(shares) == pytest.approx(1.0)
    rollout = json.loads((tmp_path / "r" / "rollout.json").read_text())
    assert set(next(iter(rollout["table"].values()))) == {"static", "divided", "context", "oracle"}
    assert experiments_main(["harder", "--init", str(tmp_path / "none.pt"), "--smoke"]) == 2

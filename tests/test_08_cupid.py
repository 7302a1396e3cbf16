"""Chapter 08 (methods): CUPID and DRUE plugged into a frozen TinyKimi, MC dropout and deep ensembles, and the
evaluation pipeline. The base stays bit-identical, scores have their shapes and ranges, CUPID separates a toy OOD
set, and bad input (sites out of range, empty evaluation sets) fails with clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nanokimi.data import Batch, make_task
from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.testing import assert_close
from nanokimi.uncertainty import (
    CUPID,
    DRUE,
    EnsembleScorer,
    LogitScorer,
    MCDropoutScorer,
    auroc,
    model_logits_fn,
    predictive_token_scores,
)
from nanokimi.uncertainty.evaluate import (
    answer_set,
    auroc_difference_ci,
    evaluate_noise,
    evaluate_task,
    load_for_evaluation,
    plot_task,
    reliability,
    score_set,
)
from nanokimi.uncertainty.evaluate import main as evaluate_main
from nanokimi.uncertainty.sites import run_with_sites, site_module

TOY = {"d_model": 32, "n_heads": 2, "n_layers": 2, "pattern": "KM", "d_ff": 64, "moe_d_ff": 32, "first_k_dense": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_model(seed: int = 0, **overrides) -> TinyKimi:
    """A random TinyKimi with every part (KDA, MoBA, MoE with its bias buffers, Block AttnRes), in eval mode."""
    torch.manual_seed(seed)
    return TinyKimi(TinyKimiConfig(**(TOY | overrides))).eval()


def token_batches(steps: int, low: int, high: int, seed: int = 0, batch: int = 16, length: int = 10) -> list[Batch]:
    """Batches of uniform random tokens in [low, high) whose target is the next token (all positions scored)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(low, high, (batch, length), generator=gen)
        out.append(Batch(x, torch.roll(x, -1, 1), torch.ones_like(x, dtype=torch.bool)))
    return out


def snapshot(model: TinyKimi) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return {"state": state, "flags": [p.requires_grad for p in model.parameters()], "training": model.training}


def assert_bit_identical(model: TinyKimi, before: dict) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after[name].detach(), value), f"{name} changed"
    assert [p.requires_grad for p in model.parameters()] == before["flags"]
    assert model.training == before["training"]
    assert all(p.grad is None for p in model.parameters())


# --- the base model is never modified -----------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2])
def test_base_weights_bit_identical_after_training_cupid(layer):
    base = tiny_model()
    base.train()  # even a base left in training mode comes back exactly as it was
    before = snapshot(base)
    cupid = CUPID(base, layer, hidden=16)
    plugin_before = [p.detach().clone() for p in cupid.parameters()]
    history = cupid.fit(token_batches(3, 3, 13), lr=1e-2)
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    cupid.loss(token_batches(1, 3, 13, seed=5)[0])[0].backward()  # outside fit too: no gradient reaches the base
    assert_bit_identical(base, before)
    assert any(not torch.equal(p, q) for p, q in zip(cupid.parameters(), plugin_before, strict=True)), (
        "plug-in did not train"
    )
    assert not any(
        n.startswith(("embed", "layers", "lm_head")) for n, _ in cupid.named_parameters()
    )  # base not a submodule


def test_base_weights_bit_identical_after_drue_and_scorers():
    base = tiny_model()
    before = snapshot(base)
    drue = DRUE(base, (0, 2), hidden=16)
    drue.fit(token_batches(3, 3, 13), lr=1e-2)
    x = token_batches(1, 3, 13)[0].inputs
    for scorer in (drue.scorer(), MCDropoutScorer(base, 0.2, 2), EnsembleScorer([base, tiny_model(1)])):
        scorer.score(x)
    assert_bit_identical(base, before)


# --- insertion sites -------------------------------------------------------------------------------------------------
def test_sites_identity_replacement_and_hook_cleanup():
    base = tiny_model()
    x = token_batches(1, 3, 40)[0].inputs
    plain, _ = base(x)
    for layer in range(base.cfg.n_layers + 1):
        logits, feats = run_with_sites(base, x, read=(layer,), replace=(layer, lambda v: v.clone()))
        assert torch.equal(logits, plain)
        assert feats[layer].shape == (*x.shape, base.cfg.d_model)

    def fail(v):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_sites(base, x, replace=(1, fail))
    assert all(not site_module(base, i)._forward_hooks for i in range(base.cfg.n_layers + 1))


def test_cupid_final_site_shortcut_equals_the_hooked_forward():
    base = tiny_model()
    cupid = CUPID(base, base.cfg.n_layers, hidden=16, seed=3)
    x = token_batches(1, 3, 40)[0].inputs
    with torch.no_grad():
        out = cupid.outputs(x)
        hooked, _ = run_with_sites(base, x, replace=(base.cfg.n_layers, lambda v: cupid(v)[0]))
    assert_close("insert logits", out.insert_logits, hooked, rtol_rel=1e-6)
    assert torch.equal(out.base_logits, base(x)[0])


def test_cupid_loss_matches_its_formula():
    base = tiny_model()
    cupid = CUPID(base, 1, hidden=16, perturb_weight=0.3, hetero_weight=0.7, seed=1)
    batch = token_batches(1, 3, 40)[0]
    batch.loss_mask[:, :4] = False
    with torch.no_grad():
        loss, parts = cupid.loss(batch)
        out = cupid.outputs(batch.inputs)
    m = batch.loss_mask
    out_l1 = (out.insert_logits - out.base_logits).abs().mean(-1)[m].mean()
    feat_l1 = (out.reconstruction - out.features).abs().mean(-1)[m].mean()
    brier = (
        (out.insert_logits.softmax(-1) - torch.nn.functional.one_hot(batch.targets, base.cfg.vocab_size)).pow(2).sum(-1)
    )
    hetero = (0.5 * brier * torch.exp(-out.log_var) + 0.5 * out.log_var)[m].mean()
    want = out_l1 - 0.3 * feat_l1 + 0.7 * hetero
    assert_close("cupid loss", loss.reshape(1), want.reshape(1), rtol_rel=1e-6)
    assert parts["feature_l1"] == pytest.approx(float(feat_l1), rel=1e-6)


# --- score shapes and ranges -----------------------------------------------------------------------------------------
def test_score_shapes_and_ranges():
    base = tiny_model()
    vocab = base.cfg.vocab_size
    x = token_batches(1, 3, 40, batch=6)[0].inputs
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 4:] = True
    cupid = CUPID(base, 1, hidden=16)
    drue = DRUE(base, (0, 2), hidden=16)
    both = cupid.scores(x, mask)
    assert both["aleatoric"].shape == both["epistemic"].shape == (6,)
    assert bool((both["aleatoric"] > 0).all())
    assert bool((both["epistemic"] >= 0).all()) and bool((both["epistemic"] <= 2 / vocab).all())  # mean_v |Δp| ≤ 2/V
    assert torch.equal(cupid.scorer("epistemic").score(x, mask), both["epistemic"])
    assert torch.equal(cupid.scorer("aleatoric").score(x, mask), both["aleatoric"])
    assert bool((drue.scorer().score(x, mask) >= 0).all())
    members = [base, tiny_model(1), tiny_model(2)]
    for kind, upper in (("entropy", math.log(vocab)), ("mutual_info", math.log(3)), ("msp", 1 - 1 / vocab)):
        for scorer in (EnsembleScorer(members, kind), MCDropoutScorer(base, 0.3, 3, kind)):
            s = scorer.score(x, mask)
            assert s.shape == (6,) and bool((s >= 0).all()) and bool((s <= upper + 1e-6).all()), scorer.name
    assert CUPID(base, 2, hidden=8).scorer("epistemic").passes == 1  # final site: one pass plus lm_head
    assert cupid.scorer("epistemic").passes == 2 and cupid.scorer("aleatoric").passes == 1
    assert MCDropoutScorer(base, n_passes=5).passes == 5 and EnsembleScorer(members).passes == 3


def test_scores_only_read_the_answer_and_what_precedes_it():
    base = tiny_model()
    x = token_batches(1, 3, 40, batch=4)[0].inputs
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 3:6] = True
    changed = x.clone()
    changed[:, 6:] = 5  # after the answer: causal models cannot see it
    for scorer in (
        CUPID(base, 1, hidden=8).scorer("epistemic"),
        DRUE(base, (0, 1), hidden=8).scorer(),
        MCDropoutScorer(base, 0.2, 2),
    ):
        assert torch.equal(scorer.score(changed, mask), scorer.score(x, mask)), scorer.name


def test_mc_dropout_is_seeded_and_perturbs():
    base = tiny_model()
    x = token_batches(1, 3, 40, batch=4)[0].inputs
    first = MCDropoutScorer(base, 0.3, 3, seed=7)
    assert torch.equal(first.member_logits(x), MCDropoutScorer(base, 0.3, 3, seed=7).member_logits(x))
    logits = first.member_logits(x)
    assert not torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], base(x)[0])


def test_predictive_scores_hand_made():
    # two members, p = (0.9, 0.1) and (0.1, 0.9): the mean is uniform
    logits = torch.tensor([[math.log(0.9), math.log(0.1)], [math.log(0.1), math.log(0.9)]], dtype=torch.float64)
    h_member = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    got = {k: float(predictive_token_scores(logits, k)) for k in ("entropy", "mutual_info", "msp")}
    assert got["entropy"] == pytest.approx(math.log(2), rel=1e-14)
    assert got["mutual_info"] == pytest.approx(math.log(2) - h_member, rel=1e-13)
    assert got["msp"] == pytest.approx(0.5, rel=1e-14)
    same = logits[:1].repeat(3, 1)  # unanimous members: no mutual information
    assert float(predictive_token_scores(same, "mutual_info")) == 0.0
    assert float(predictive_token_scores(same, "entropy")) == pytest.approx(h_member, rel=1e-14)


def test_auroc_difference_interval():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)]
    noise = rng.normal(size=400)
    assert auroc_difference_ci(noise, noise, labels, n_boot=50) == (0.0, 0.0)  # paired: identical scores, no spread
    low, high = auroc_difference_ci(labels + 0.5 * noise, noise, labels, n_boot=200)
    assert 0 < low < high  # a separating score beats noise; the interval excludes 0
    with pytest.raises(ValueError, match="labels: expected both classes"):
        auroc_difference_ci(noise, noise, np.zeros(400))


def test_reliability_hand_made():
    rel = reliability([0.05, 0.15, 0.95, 0.95], [0, 0, 1, 0], n_bins=10)
    assert rel["count"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1 + 1]
    assert rel["accuracy"][9] == 0.5 and rel["confidence"][9] == pytest.approx(0.95, abs=1e-15)
    assert rel["accuracy"][2] is None
    assert rel["ece"] == pytest.approx((0.05 + 0.15 + 2 * 0.45) / 4, abs=1e-15)


# --- CUPID on a separable toy ------------------------------------------------------------------------------------------
def test_cupid_separates_a_toy_ood_set():
    """In-distribution: digit tokens; OOD: upper-case letters, which the plug-in never saw. A random base model
    (its features of the two token sets differ) is enough: CUPID's epistemic score must reach AUROC > 0.9."""
    base = tiny_model()
    cupid = CUPID(base, base.cfg.n_layers, hidden=32)
    cupid.fit(token_batches(60, 3, 13, seed=1), lr=3e-3)
    in_dist = token_batches(1, 3, 13, seed=2, batch=64)[0].inputs
    ood = token_batches(1, 45, base.cfg.vocab_size, seed=3, batch=64)[0].inputs
    scorer = cupid.scorer("epistemic")
    scores = torch.cat([scorer.score(in_dist), scorer.score(ood)])
    assert auroc(scores, [0] * 64 + [1] * 64) > 0.9


# --- the evaluation pipeline -----------------------------------------------------------------------------------------
def test_evaluate_task_smoke(tmp_path):
    base = tiny_model()
    result = evaluate_task(
        base,
        make_task("add", digits=2),
        ensemble=[tiny_model(1)],
        layers=[2],
        cupid_layer=2,
        n_examples=12,
        fit_steps=2,
        fit_batch=4,
        hidden=8,
        mc_passes=2,
        progress=False,
    )
    names = {
        "msp",
        "entropy",
        "energy",
        "mc_dropout_entropy",
        "mc_dropout_mutual_info",
        "ensemble_entropy",
        "ensemble_mutual_info",
        "cupid_aleatoric",
        "cupid_epistemic",
        "drue",
    }
    for set_name in result["ood_sets"]:
        assert set(result["ood_auroc"][set_name]) == names
        assert all(0 <= v <= 1 for v in result["ood_auroc"][set_name].values())
        assert result["target"][set_name]["best_single_pass"] in ("msp", "entropy", "energy")
    assert {row["score"]: row["passes"] for row in result["cost"]}["ensemble_entropy"] == 2
    json.dumps(result)  # what evaluate writes must be JSON
    plot_task(result, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_evaluate_noise_smoke():
    base = tiny_model()
    knobs = dict(layers=[2], cupid_layer=2, n_examples=16, fit_steps=2, fit_batch=4, hidden=8, mc_passes=2)
    result = evaluate_noise(base, make_task("add", digits=2, label_noise=0.5), progress=False, **knobs)
    assert set(result["spearman"]) == {
        "msp",
        "entropy",
        "energy",
        "mc_dropout_entropy",
        "mc_dropout_mutual_info",
        "cupid_aleatoric",
        "cupid_epistemic",
        "drue",
    }
    assert all(-1 <= v <= 1 for v in result["spearman"].values())
    assert set(result["layer_sweep"]["2"]) == {"aleatoric", "epistemic"}
    assert len(result["noise_levels"]) == len(result["mean_score_by_level"]["drue"])
    json.dumps(result)
    with pytest.raises(ValueError, match="task: expected addition with label_noise > 0"):
        evaluate_noise(base, make_task("add", digits=2), progress=False, **knobs)


def test_answer_set_verifies_greedy_answers():
    base = tiny_model()
    task = make_task("add", digits=2)
    examples = task.examples("test", 5, seed=0)
    data = answer_set(base, examples, "id", task=task, max_new_tokens=4)
    assert data.inputs.shape[0] == 5 and data.errors.shape == (5,)
    assert bool(data.mask.any(1).all())
    scores = score_set(LogitScorer(model_logits_fn(base), "entropy"), data, batch_size=2)
    assert scores.shape == (5,) and np.isfinite(scores).all()


# --- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_input():
    base = tiny_model()
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 2\].*got 3"):
        CUPID(base, 3)
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 2\].*got -1"):
        CUPID(base, -1)
    with pytest.raises(TypeError, match="layer: expected an int"):
        CUPID(base, 1.0)
    with pytest.raises(TypeError, match="base_model: expected a nanokimi.model.TinyKimi, got Linear"):
        CUPID(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="hidden: expected a positive int, got 0"):
        CUPID(base, 0, hidden=0)
    with pytest.raises(ValueError, match="perturb_weight: expected a finite number >= 0"):
        CUPID(base, 0, perturb_weight=float("nan"))
    with pytest.raises(ValueError, match=r"layers: expected an int in \[0, 2\].*got 5"):
        DRUE(base, (0, 5))
    with pytest.raises(ValueError, match="layers: expected two different sites, got"):
        DRUE(base, (1, 1))
    with pytest.raises(ValueError, match="layers: expected a pair"):
        DRUE(base, (1,))
    with pytest.raises(ValueError, match="p: expected a dropout rate in"):
        MCDropoutScorer(base, p=1.0)
    with pytest.raises(ValueError, match="models: expected a non-empty sequence"):
        EnsembleScorer([])
    with pytest.raises(ValueError, match="kind: expected one of"):
        CUPID(base, 0).scorer("total")
    # empty evaluation sets
    cupid = CUPID(base, 2, hidden=8)
    with pytest.raises(ValueError, match="examples: expected at least one example .* empty evaluation set"):
        answer_set(base, [], "id")
    with pytest.raises(ValueError, match=r"inputs: expected at least one example.*\(0, 5\)"):
        cupid.scorer("epistemic").score(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="batches: expected a non-empty sequence of Batch"):
        cupid.fit([])
    with pytest.raises(ValueError, match="expected at least one value, got an empty array"):
        auroc([], [])
    assert evaluate_main([]) == 2  # the command line with nothing to evaluate
    # wrong tokens and masks
    with pytest.raises(TypeError, match="inputs: expected dtype in"):
        cupid.scores(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="inputs: expected token ids in"):
        cupid.scores(torch.full((2, 5), 999, dtype=torch.long))
    with pytest.raises(ValueError, match="mask: expected shape"):
        cupid.scores(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected at least one scored token per example"):
        cupid.scores(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool))


def test_evaluation_loads_a_triton_checkpoint_with_the_reference_backends(tmp_path):
    """A model trained with the Triton backends on a GPU is evaluated on the CPU: there the compiled kernels would
    refuse CPU tensors (the GPU demo's uncertainty stage failed that way), so evaluation switches to the reference
    backends, which compute the same function."""
    from nanokimi.train import CKPT_FORMAT

    trained = tiny_model(3, backend="triton")
    ckpt = {
        "format": CKPT_FORMAT, "step": 0, "model_config": trained.cfg.to_dict(), "task": make_task("add").spec(),
        "train_config": {}, "model": trained.state_dict(), "optimizer": {}, "world_size": 1,
    }  # fmt: skip
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model, task = load_for_evaluation(tmp_path / "ckpt.pt")
    assert model.cfg.backend == "reference" and not model.training and task.name == "add"
    tokens = torch.randint(0, trained.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_backend = tiny_model(3, backend="reference")(tokens)[0]
        assert torch.equal(model(tokens)[0], ref_backend)

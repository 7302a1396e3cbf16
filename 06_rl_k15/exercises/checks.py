"""Checks for the chapter 06 exercises: ``python -m nanokimi.grade 06_rl_k15 [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter's reference (``nanokimi.rl``). A failure raises
AssertionError naming the case, the element and the size of the error.
"""

from __future__ import annotations

import torch

from nanokimi.grade import call_attempt as _call
from nanokimi.rl import grpo_loss, k15_loss, length_reward, token_logprobs_reference
from nanokimi.testing import assert_close, kernel_device, poisoned_empty, randn

F64 = torch.float64


def _scalar(name: str, got: object) -> torch.Tensor:
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"{name}: expected a 0-d tensor (a scalar loss), got {shape}")
    return got


# --- exercise 1 ------------------------------------------------------------------------------------------------
def check_ex1_length_reward(m) -> None:
    gen = torch.Generator().manual_seed(0)
    hand_lengths = torch.tensor([[10, 20, 30, 20], [10, 30, 20, 10], [7, 7, 7, 7]])
    hand_correct = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    cases = [
        ("hand-made groups (the last has equal lengths)", hand_lengths, hand_correct),
        ("one group as a 1-D tensor, correct as 0/1 floats", hand_lengths[0], hand_correct[0].float()),
        ("one response per group", torch.tensor([[5], [9]]), torch.tensor([[True], [False]])),
        ("all wrong", hand_lengths, torch.zeros(3, 4, dtype=torch.bool)),
        ("float lengths, int 0/1 correct", torch.tensor([[10.5, 3.0, 7.25]]), torch.tensor([[1, 0, 1]])),
        (
            "random: G=50 k=8, int32 lengths",
            torch.randint(1, 200, (50, 8), generator=gen, dtype=torch.int32),
            torch.rand(50, 8, generator=gen) < 0.5,
        ),
    ]
    for case, lengths, correct in cases:
        want = length_reward(lengths, correct)
        got = _call(m.length_reward, lengths.clone(), correct.clone())
        if not isinstance(got, torch.Tensor) or got.dtype != torch.float32 or got.shape != want.shape:
            desc = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"[{case}] expected float32 of shape {tuple(want.shape)}, got {desc}")
        if not torch.equal(got, want):
            wrong = ~((got == want) | (got.isnan() & want.isnan()))
            at = tuple(int(i) for i in wrong.nonzero()[0])
            group = at[0] if lengths.dim() == 2 else None
            shown = lengths[group].tolist() if group is not None else lengths.tolist()
            ok = correct[group].tolist() if group is not None else correct.tolist()
            raise AssertionError(
                f"[{case}] {int(wrong.sum())} rewards differ; first at {at}: got {float(got[at])}, expected "
                f"{float(want[at])} (group lengths {shown}, correct {ok})"
            )


# --- exercise 2 ------------------------------------------------------------------------------------------------
def _toy_policy(n_groups: int, n_actions: int, k: int, seed: int, on_policy: bool = False):
    """A softmax policy per group over n_actions whole responses; k responses sampled from the old policy."""
    gen = torch.Generator().manual_seed(seed)
    theta_old = torch.randn(n_groups, n_actions, generator=gen, dtype=F64)
    theta = (
        theta_old.clone() if on_policy else theta_old + 0.5 * torch.randn(n_groups, n_actions, generator=gen, dtype=F64)
    )
    actions = torch.multinomial(theta_old.softmax(-1), k, replacement=True, generator=gen)  # [G, k]
    rewards = torch.rand(n_groups, n_actions, generator=gen, dtype=F64).gather(1, actions)
    return theta, theta_old, actions, rewards


def check_ex2_k15_loss(m) -> None:
    gen = torch.Generator().manual_seed(1)
    equal = torch.full((2, 4), 0.5, dtype=F64)
    cases = [  # (case, logp_new, logp_old, rewards, tau)
        ("G=3 k=5 τ=0.3", randn(3, 5, seed=0, dtype=F64), randn(3, 5, seed=1, dtype=F64), torch.rand(3, 5, generator=gen, dtype=F64), 0.3),
        ("one group as [k], k=4, τ=2", randn(4, seed=2, dtype=F64), randn(4, seed=3, dtype=F64), torch.rand(4, generator=gen, dtype=F64), 2.0),
        ("k=2, on-policy (logp_old = logp_new)", randn(6, 2, seed=4, dtype=F64), None, torch.rand(6, 2, generator=gen, dtype=F64), 1.0),
        ("equal rewards in every group (advantage 0)", randn(2, 4, seed=5, dtype=F64), randn(2, 4, seed=6, dtype=F64), equal, 0.7),
    ]  # fmt: skip
    for case, new, old, rewards, tau in cases:
        old = new.clone() if old is None else old
        ref_new = new.clone().requires_grad_()
        want = k15_loss(ref_new, old, rewards, tau)
        (want_grad,) = torch.autograd.grad(want, ref_new)

        got_new, got_old = new.clone().requires_grad_(), old.clone().requires_grad_()
        got = _scalar(f"k15_loss [{case}]", _call(m.k15_loss, got_new, got_old, rewards.clone(), tau))
        assert_close(f"k15_loss [{case}]", got, want, rtol_rel=1e-12, atol=1e-12)
        if not got.requires_grad:
            raise AssertionError(f"k15_loss [{case}]: the loss has no gradient path to logp_new")
        got.backward()
        assert_close(f"autograd of your k15_loss, d/dlogp_new [{case}]", got_new.grad, want_grad, rtol_rel=1e-12)
        if got_old.grad is not None and bool((got_old.grad != 0).any()):
            raise AssertionError(f"k15_loss [{case}]: a gradient flows into logp_old; it is data, detach it")

        grad = _call(m.k15_loss_grad, new.clone(), old.clone(), rewards.clone(), tau)
        assert_close(f"k15_loss_grad [{case}] vs autograd of the reference", grad, want_grad, rtol_rel=1e-12)

    for case, groups, actions_n, k, tau, seed, on_policy in [
        ("G=3 A=6 k=8 τ=0.7", 3, 6, 8, 0.7, 0, False),
        ("G=1 A=3 k=2 τ=0.05", 1, 3, 2, 0.05, 1, False),
        ("on-policy G=2 A=5 k=4 τ=10 (REINFORCE)", 2, 5, 4, 10.0, 2, True),
    ]:
        theta, theta_old, actions, rewards = _toy_policy(groups, actions_n, k, seed, on_policy)
        leaf = theta.clone().requires_grad_()
        logp = torch.log_softmax(leaf, -1).gather(1, actions)
        logp_old = torch.log_softmax(theta_old, -1).gather(1, actions)
        (grad,) = torch.autograd.grad(k15_loss(logp, logp_old, rewards, tau), leaf)
        got = _call(m.eq3_policy_gradient, theta.clone(), theta_old.clone(), actions.clone(), rewards.clone(), tau)
        assert_close(f"eq3_policy_gradient [{case}] vs −∇θ of the reference loss", got, -grad, rtol_rel=1e-12)


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _grpo_inputs(groups: int, k: int, steps: int, seed: int):
    new = randn(groups, k, steps, seed=seed, dtype=F64) * 0.3 - 1.0
    old = new + randn(groups, k, steps, seed=seed + 1, dtype=F64) * 0.3  # ratios inside and outside the clip range
    ref = new + randn(groups, k, steps, seed=seed + 2, dtype=F64) * 0.2
    rewards = torch.rand(groups, k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    mask = torch.rand(groups, k, steps, generator=torch.Generator().manual_seed(seed + 3)) < 0.7
    mask[..., 0] = True  # every response has a token
    return new, old, ref, rewards, mask


def _grpo_variant(new, old, rewards, mask, logp_ref=None, clip_eps=0.2, beta=0.04, eps=1e-6, aggregation="sequence",
                  *, mistake: str = ""):  # fmt: skip
    """GRPO's loss with one common mistake made on purpose, to name it in a failure message."""
    msk = mask.to(F64)
    n_tokens = msk.sum(-1)
    std = rewards.std(-1, keepdim=True, unbiased=mistake != "population std")
    adv = ((rewards - rewards.mean(-1, keepdim=True)) / (std + eps))[..., None]
    ratio = torch.where(msk > 0, new - old, 0.0).exp()
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = {"clip without min": clipped, "no clip": ratio * adv}.get(mistake, torch.minimum(ratio * adv, clipped))
    if beta > 0 and mistake != "no KL":
        q = torch.where(msk > 0, logp_ref - new, 0.0)
        sign = -1.0 if mistake == "KL with the wrong sign" else 1.0
        objective = objective - sign * beta * (q.exp() - q - 1)
    objective = objective * msk
    if mistake == "the other aggregation":
        aggregation = "token" if aggregation == "sequence" else "sequence"
    if aggregation == "sequence":
        return -(objective.sum(-1) / n_tokens).mean()
    return -objective.sum() / n_tokens.sum()


_GRPO_MISTAKES = {
    "population std": "the std divides by k; GRPO uses Bessel's correction, k − 1 (torch.std's default)",
    "clip without min": "only the clipped term is used; GRPO takes min(ρA, clip(ρ, 1 − ε, 1 + ε)A)",
    "no clip": "the ratio is not clipped; GRPO takes min(ρA, clip(ρ, 1 − ε, 1 + ε)A)",
    "no KL": "the β·(e^q − q − 1) KL term is missing",
    "KL with the wrong sign": "the KL term is added to the objective; o_t subtracts it",
    "the other aggregation": "the aggregations are swapped: 'sequence' averages each response first, 'token' pools all tokens",
}


def check_ex3_grpo_loss(m) -> None:
    new, old, ref, rewards, mask = _grpo_inputs(2, 4, 6, seed=0)
    rewards_tied = rewards.clone()
    rewards_tied[1] = 0.25  # one group with equal rewards: std 0
    cases = [  # (case, logp_old, rewards, mask, kwargs)
        ("sequence mean, β=0.04", old, rewards, mask, {"logp_ref": ref, "beta": 0.04, "aggregation": "sequence"}),
        ("token mean, β=0.04", old, rewards, mask, {"logp_ref": ref, "beta": 0.04, "aggregation": "token"}),
        ("β=0 without logp_ref", old, rewards, mask, {"beta": 0.0}),
        ("clip_eps=0.05 (most ratios clipped)", old, rewards, mask, {"logp_ref": ref, "clip_eps": 0.05}),
        ("padding of logp_old holds −inf", torch.where(mask, old, float("-inf")), rewards, mask, {"logp_ref": ref}),
        ("one group with equal rewards (std 0)", old, rewards_tied, mask, {"logp_ref": ref}),
        ("mask as 0/1 floats, token mean", old, rewards, mask.to(F64), {"logp_ref": ref, "aggregation": "token"}),
    ]
    for case, logp_old, r, msk, kwargs in cases:
        ref_new = new.clone().requires_grad_()
        want = grpo_loss(ref_new, logp_old, r, msk, **kwargs)
        (want_grad,) = torch.autograd.grad(want, ref_new)
        got_new = new.clone().requires_grad_()
        got = _scalar(f"grpo_loss [{case}]", _call(m.grpo_loss, got_new, logp_old.clone(), r.clone(), msk, **kwargs))
        try:
            assert_close(f"grpo_loss [{case}]", got, want, rtol_rel=1e-12, atol=1e-12)
        except AssertionError as exc:
            for mistake, hint in _GRPO_MISTAKES.items():
                variant = _grpo_variant(new, logp_old, r, msk, **kwargs, mistake=mistake)
                if abs(float(got.detach()) - float(variant)) <= 1e-9 * max(1.0, abs(float(variant))):
                    raise AssertionError(f"{exc}\n  likely mistake: {hint}") from None
            raise
        if not got.requires_grad:
            raise AssertionError(f"grpo_loss [{case}]: the loss has no gradient path to logp_new")
        got.backward()
        assert_close(f"d grpo_loss / d logp_new [{case}] (index g, j, t)", got_new.grad, want_grad, rtol_rel=1e-10)


# --- exercise 4 ------------------------------------------------------------------------------------------------
def check_ex4_online_logsumexp(m) -> None:
    dev = kernel_device()
    gen = torch.Generator().manual_seed(0)
    wide = randn(20, 64, seed=5)
    cases = [  # (case, logits [T, V], launcher kwargs)
        ("T=37 V=100, block_v=32 (tails in T and V)", randn(37, 100, seed=1) * 3, {"block_v": 32}),
        ("T=1 V=1", randn(1, 1, seed=2), {}),
        ("T=5 V=33, block_v=16", randn(5, 33, seed=3), {"block_v": 16}),
        ("logits of size ±1e4 (exp overflows without the running max)", randn(9, 70, seed=4) * 1e4, {"block_v": 16}),
        ("all logits near −1e4 (exp underflows to 0)", randn(6, 40, seed=6) - 1e4, {"block_v": 16}),
        ("increasing rows: the max grows in every tile", torch.arange(200.0).repeat(3, 1) * 0.5, {"block_v": 32}),
        ("a column slice of a wider tensor (row stride 64)", wide[:, :50], {"block_v": 16}),
    ]
    for case, logits, kwargs in cases:
        n_rows, n_vocab = logits.shape
        targets = torch.randint(0, n_vocab, (n_rows,), generator=gen)
        targets[0] = n_vocab - 1  # the last column, in the last (partial) tile
        if n_rows > 1:
            targets[1] = 0
        logits_dev, targets_dev = logits.to(dev), targets.to(dev)
        with poisoned_empty():
            got = _call(m.online_logsumexp, logits_dev, targets_dev, **kwargs)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"[{case}] expected a tuple (lse, target_logit), got {type(got).__name__}")
        lse, target_logit = got
        want_lse = torch.logsumexp(logits.double(), dim=-1)
        want_target = logits.double().gather(1, targets[:, None])[:, 0]
        assert_close(f"lse [{case}] (index = row)", lse, want_lse, rtol_rel=1e-6)
        assert_close(f"target_logit [{case}] (index = row)", target_logit, want_target, rtol_rel=1e-7)

    # Tie-in: logp = z_target − lse is what the chapter's token_logprobs computes from hidden states.
    hidden, weight = randn(21, 16, seed=7), randn(90, 16, seed=8)
    targets = torch.randint(0, 90, (21,), generator=gen)
    lse, target_logit = _call(m.online_logsumexp, (hidden @ weight.T).to(dev), targets.to(dev), block_v=32)
    want_logp, _ = token_logprobs_reference(hidden.double(), weight.double(), targets)
    assert_close("logp = target_logit − lse vs token_logprobs_reference", target_logit - lse, want_logp, rtol_rel=1e-6)

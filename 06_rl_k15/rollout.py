"""Rollouts for k1.5 RL on TinyKimi: k sampled responses per problem, partial rollouts, old-policy log-probs.

A *group* is one problem x with k responses y_1 … y_k sampled from the policy (``TinyKimi.generate``). The loss
needs, for every response token, log π_old(y_t | x, y_<t) under the policy that sampled it, and later
log πθ(y_t | x, y_<t) under the policy being trained. Both are teacher-forced log-probs of the sampled tokens:

    z_t = lm_head(h_t) / θ,   log π(y_t) = log_softmax(z_t)[y_t]          h = TinyKimi.hidden_states(x ⊕ y)

with θ the sampling temperature (``response_logprobs``; the eager path or the fused kernel of this chapter).

Partial rollouts (k1.5 §2.6). Each iteration a response may generate at most ``segment_len`` new tokens (the
per-iteration token budget). A response that has not reached ``<eos>`` by then stays in the rollout buffer and
continues in the next iteration from prompt ⊕ its tokens so far, under the *new* policy. So a long response is
a list of segments, each sampled by a different policy; each ``Segment`` keeps the log-probs of the policy that
sampled it, computed right after sampling, and the loss uses their concatenation as log π_old. The k1.5
objective is built for exactly this: its squared log-ratio term holds for samples of any earlier policy.

Sampling noise comes from ``generate``'s per-row streams, keyed by (response seed, absolute position). So with an
unchanged policy, continuing a response segment by segment reproduces the uninterrupted sample token for token,
and the concatenated segment log-probs equal the log-probs of the whole response (the tests check both).

Attention layers must decode the way they are trained. TinyKimi's MoBA layers decode densely over the KV cache
(MoBA §3.3) but run block-sparse in a teacher-forced forward once a context exceeds ``moba_topk ·
moba_block_size`` tokens; the log-probs would then not be those of the sampler (the training–inference mismatch
that large RL systems correct with importance weights). ``dense_decoding_config`` raises ``moba_topk`` so that
every block is selected for the contexts RL produces: the forward then equals the decoder exactly, and no weight
changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import TOKENIZER, Task, task_from_spec
from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.rl.loss import policy_token_logprobs
from nanokimi.train import load_checkpoint

__all__ = [
    "Problem",
    "Segment",
    "Response",
    "Group",
    "dense_decoding_config",
    "load_policy",
    "response_seed",
    "response_logprobs",
    "advance_rollouts",
]

EOS = TOKENIZER.eos_id


@dataclass(frozen=True)
class Problem:
    """One training or evaluation problem: its curriculum level, index in that level's pool, and prompt."""

    level: int
    index: int
    prompt: str
    prompt_ids: tuple[int, ...]  # <bos> prompt
    task: Task = field(compare=False, repr=False)


@dataclass
class Segment:
    """Tokens [start, end) of a response, sampled in ``iteration`` by that iteration's policy, whose per-token
    log-probs ``logp_old`` [end − start] (fp32, no grad) are what the loss uses as log π_old for these tokens."""

    start: int
    end: int
    iteration: int
    logp_old: torch.Tensor


@dataclass
class Response:
    """One sampled response, possibly spread over several iterations (one ``Segment`` per iteration)."""

    seed: int
    tokens: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    truncated: bool = False  # reached the length limit without <eos>

    @property
    def finished(self) -> bool:
        """Ended with <eos>."""
        return bool(self.tokens) and self.tokens[-1] == EOS

    @property
    def done(self) -> bool:
        return self.finished or self.truncated

    @property
    def text(self) -> str:
        return TOKENIZER.decode(self.tokens)

    def logp_old(self) -> torch.Tensor:
        """[len(tokens)] log π_old per token: the segments' log-probs, each from the policy that sampled it."""
        return torch.cat([s.logp_old for s in self.segments])


@dataclass
class Group:
    """k responses to one problem; the loss can use it once every response is done (the baseline needs all k)."""

    problem: Problem
    responses: list[Response]
    started: int  # iteration in which sampling began

    @property
    def done(self) -> bool:
        return all(r.done for r in self.responses)


def dense_decoding_config(model_config: TinyKimiConfig | dict, max_context: int) -> TinyKimiConfig:
    """The same model with ``moba_topk`` raised so that MoBA selects every block of a ``max_context``-token context:
    teacher-forced log-probs then equal the (dense) decoder's. Weights are unaffected (top-k is not a parameter)."""
    check_positive_int("max_context", max_context)
    cfg = model_config.to_dict() if isinstance(model_config, TinyKimiConfig) else dict(model_config)
    cfg["moba_topk"] = max(int(cfg["moba_topk"]), math.ceil(max_context / int(cfg["moba_block_size"])))
    return TinyKimiConfig.from_dict(cfg)


def load_policy(
    path: str, max_context: int, device: str | torch.device = "cpu", backend: str | None = None
) -> tuple[TinyKimi, Task, dict]:
    """Load a ``nanokimi.train`` checkpoint as an RL policy (``dense_decoding_config``), in eval mode.

    Returns (model, the checkpoint's task, the raw checkpoint dict). Eval mode keeps the MoE router biases as
    trained: RL changes the policy only through its gradient steps.
    """
    ckpt = load_checkpoint(path)
    cfg = ckpt["model_config"] | ({"backend": backend} if backend is not None else {})
    model = TinyKimi(dense_decoding_config(cfg, max_context))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), task_from_spec(ckpt["task"]), ckpt


def response_seed(run_seed: int, group_serial: int, j: int) -> int:
    """The sampling stream of response j of the ``group_serial``-th group of a run (a 63-bit int)."""
    state = np.random.SeedSequence([run_seed, group_serial, j]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def response_logprobs(
    model: TinyKimi,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    backend: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced per-token log-probs (and entropies) of each response given its prompt.

        logp[n, i] = log softmax(lm_head(h)/θ)[y_n,i]  at the position that predicts response token i of row n

    prompts: N token-id lists (``<bos>`` first); responses: N non-empty lists. Rows are right-padded into one
    [N, L] batch (causal layers: padding after a row never reaches it). Returns (logp, entropy, mask), each
    [N, R] with R the longest response; logp and entropy are 0 where ``mask`` (bool) is False. Carries the
    gradient of the model's parameters unless called under ``torch.no_grad()``.
    """
    if not isinstance(model, TinyKimi):
        raise TypeError(f"model: expected a TinyKimi, got {type(model).__name__}")
    check_in("backend", backend, ("reference", "triton"))
    if len(prompts) != len(responses) or len(prompts) == 0:
        raise ValueError(
            f"prompts/responses: expected the same non-zero number of rows, got {len(prompts)} and {len(responses)}"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token (<bos>)")
    if any(len(r) == 0 for r in responses):
        raise ValueError("responses: every response needs at least one token")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(
            f"temperature: expected a number > 0 (log-probs of greedy decoding are undefined), got {temperature!r}"
        )
    device = model.embed.weight.device
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), TOKENIZER.pad_id, dtype=torch.long)
    for n, row in enumerate(rows):
        tokens[n, : len(row)] = torch.tensor(row)
    tokens = tokens.to(device)
    hidden = model.hidden_states(tokens[:, :-1])  # [N, L-1, D]
    logp_all, entropy_all = policy_token_logprobs(
        hidden, model.lm_head.weight, tokens[:, 1:], temperature=float(temperature), backend=backend
    )  # [N, L-1] each
    longest = max(len(r) for r in responses)
    offsets = torch.arange(longest)  # [R]
    starts = torch.tensor([len(p) - 1 for p in prompts])  # [N]: position predicting the first response token
    lengths = torch.tensor([len(r) for r in responses])  # [N]
    mask = (offsets[None, :] < lengths[:, None]).to(device)  # [N, R]
    index = (starts[:, None] + offsets[None, :]).clamp(max=width - 2).to(device)  # [N, R]
    logp = logp_all.gather(1, index).masked_fill(~mask, 0.0)
    entropy = entropy_all.gather(1, index).masked_fill(~mask, 0.0)
    return logp, entropy, mask


def advance_rollouts(
    model: TinyKimi,
    groups: Sequence[Group],
    *,
    segment_len: int,
    max_len: int,
    iteration: int,
    temperature: float = 1.0,
    backend: str = "reference",
) -> dict:
    """Sample the next segment of every unfinished response of ``groups``, in place.

    Each unfinished response generates up to ``min(segment_len, max_len − len(tokens))`` tokens continuing
    prompt ⊕ tokens with its own seed; it is done once it emits ``<eos>`` or holds ``max_len`` tokens
    (truncated). The new tokens' log-probs under ``model`` are stored as a ``Segment``. Returns counts:
    ``tokens`` generated, ``responses`` advanced, ``continued`` (of those, how many had started earlier) and the
    mean token ``entropy`` of the new segments.
    """
    check_positive_int("segment_len", segment_len)
    check_positive_int("max_len", max_len)
    pending = [(g, r) for g in groups for r in g.responses if not r.done]
    if not pending:
        return {"tokens": 0, "responses": 0, "continued": 0, "entropy": float("nan")}
    continued = sum(1 for _, r in pending if r.tokens)
    by_budget: dict[int, list[tuple[Group, Response]]] = {}
    for g, r in pending:
        by_budget.setdefault(min(segment_len, max_len - len(r.tokens)), []).append((g, r))
    starts = {id(r): len(r.tokens) for _, r in pending}
    for budget, items in by_budget.items():
        prefixes = [list(g.problem.prompt_ids) + r.tokens for g, r in items]
        new = model.generate(prefixes, budget, temperature=temperature, seed=[r.seed for _, r in items])
        for (_, r), tokens in zip(items, new, strict=True):
            r.tokens.extend(tokens)
            r.truncated = not r.finished and len(r.tokens) >= max_len
    with torch.no_grad():
        logp, entropy, _ = response_logprobs(
            model,
            [g.problem.prompt_ids for g, _ in pending],
            [r.tokens for _, r in pending],
            temperature=temperature,
            backend=backend,
        )
    n_new, entropy_sum = 0, 0.0
    for n, (_, r) in enumerate(pending):
        start, end = starts[id(r)], len(r.tokens)
        r.segments.append(Segment(start, end, iteration, logp[n, start:end].detach().float().cpu().clone()))
        n_new += end - start
        entropy_sum += float(entropy[n, start:end].sum())
    return {"tokens": n_new, "responses": len(pending), "continued": continued, "entropy": entropy_sum / n_new}

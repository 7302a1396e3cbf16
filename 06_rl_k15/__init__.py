"""nanokimi.rl: k1.5 reinforcement learning: policy mirror descent, length penalty, partial rollouts.

Public API: the k1.5 and GRPO losses and the length reward (``loss``), the fused log-prob/entropy kernel
(``kernels``), the Seer-style rollout scheduling simulator (``rollout_sim``), sampling groups of responses from
TinyKimi with partial rollouts and their old-policy log-probs (``rollout``), and the curriculum with prioritised
sampling (``curriculum``). The RL loop is ``nanokimi.rl.train`` (``train_rl``, ``RLConfig``; ``python -m
nanokimi.rl.train``) and the chapter's experiments are ``nanokimi.rl.experiments``; they are not imported here so
that ``python -m`` runs them as fresh modules.
"""

from nanokimi.rl.curriculum import Curriculum
from nanokimi.rl.kernels import token_logprobs
from nanokimi.rl.loss import (
    group_advantages,
    grpo_loss,
    k15_loss,
    length_reward,
    policy_token_logprobs,
    sequence_logprobs,
    token_logprobs_reference,
)
from nanokimi.rl.rollout import (
    Group,
    Problem,
    Response,
    Segment,
    advance_rollouts,
    dense_decoding_config,
    load_policy,
    response_logprobs,
    response_seed,
)
from nanokimi.rl.rollout_sim import POLICIES, ClusterConfig, LengthModel, RolloutResult, compare_policies, simulate

__all__ = [
    "token_logprobs",
    "token_logprobs_reference",
    "policy_token_logprobs",
    "sequence_logprobs",
    "group_advantages",
    "k15_loss",
    "length_reward",
    "grpo_loss",
    "POLICIES",
    "LengthModel",
    "ClusterConfig",
    "RolloutResult",
    "simulate",
    "compare_policies",
    "Problem",
    "Segment",
    "Response",
    "Group",
    "dense_decoding_config",
    "load_policy",
    "response_seed",
    "response_logprobs",
    "advance_rollouts",
    "Curriculum",
]

"""nanokimi.rl: k1.5 reinforcement learning: policy mirror descent, length penalty, partial rollouts.

Public API: the k1.5 and GRPO losses and the length reward (``loss``), the fused log-prob/entropy kernel
(``kernels``) and the Seer-style rollout scheduling simulator (``rollout_sim``).
"""

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
]

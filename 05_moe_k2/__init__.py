"""nanokimi.moe: the K2 MoE layer: sigmoid router, aux-loss-free bias balancing, Triton grouped GEMM."""

from nanokimi.moe.kernels import (
    Permutation,
    grouped_matmul,
    grouped_swiglu,
    moe_forward_triton,
    permute,
    routed_experts_triton,
    unpermute_combine,
)
from nanokimi.moe.layer import MoE
from nanokimi.moe.reference import (
    moe_forward,
    moonlight_scaling_factor,
    route,
    routed_experts,
    swiglu_ffn,
    update_expert_bias,
)

__all__ = [
    "MoE",
    "route",
    "swiglu_ffn",
    "routed_experts",
    "moe_forward",
    "update_expert_bias",
    "moonlight_scaling_factor",
    "Permutation",
    "permute",
    "grouped_swiglu",
    "grouped_matmul",
    "unpermute_combine",
    "routed_experts_triton",
    "moe_forward_triton",
]

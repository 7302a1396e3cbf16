"""nanokimi.serving: Mooncake: KVCache-centric serving. Public API re-exported here as the chapter lands."""

from nanokimi.serving.kernels import paged_attention_decode
from nanokimi.serving.policies import (
    POLICIES,
    ConductorPolicy,
    LeastLoadedPolicy,
    LocalCacheAwarePolicy,
    PrfaaSPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    least_loaded_decode,
    make_policy,
    predicted_decode_load,
)
from nanokimi.serving.reference import gather_kv, make_paged_cache, paged_attention_reference

__all__ = [
    "POLICIES",
    "ConductorPolicy",
    "LeastLoadedPolicy",
    "LocalCacheAwarePolicy",
    "PrfaaSPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "gather_kv",
    "least_loaded_decode",
    "make_paged_cache",
    "make_policy",
    "paged_attention_decode",
    "paged_attention_reference",
    "predicted_decode_load",
]

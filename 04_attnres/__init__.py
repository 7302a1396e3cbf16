"""nanokimi.attnres: Attention Residuals and Block AttnRes (arXiv 2603.15031).

Reference (the spec), fused Triton phase-1/phase-2 kernels with autograd, and ``ResidualStream``, the residual
connections a model uses between sublayers (modes ``standard`` | ``full`` | ``block``).
"""

from nanokimi.attnres.kernels import (
    depth_attention_cached_triton,
    depth_attention_triton,
    merge_step_triton,
    online_merge_triton,
)
from nanokimi.attnres.layer import ResidualStream
from nanokimi.attnres.reference import (
    attnres_forward,
    batched_depth_attention,
    depth_attention,
    online_merge,
    rms_norm,
    standard_forward,
    two_phase_block,
)

__all__ = [
    "ResidualStream",
    "attnres_forward",
    "batched_depth_attention",
    "depth_attention",
    "depth_attention_cached_triton",
    "depth_attention_triton",
    "merge_step_triton",
    "online_merge",
    "online_merge_triton",
    "rms_norm",
    "standard_forward",
    "two_phase_block",
]

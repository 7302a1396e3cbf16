"""nanokimi.moba: MoBA, Mixture of Block Attention — the dense-mask reference, the block-sparse Triton kernels
(forward and backward) and the attention layer TinyKimi uses."""

from nanokimi.moba.kernels import moba_attention_triton, moba_gate_triton
from nanokimi.moba.layer import MoBAAttention, apply_rope
from nanokimi.moba.reference import block_mask_attention, block_scores, moba_attention, select_blocks

__all__ = [
    "block_scores",
    "select_blocks",
    "block_mask_attention",
    "moba_attention",
    "moba_gate_triton",
    "moba_attention_triton",
    "MoBAAttention",
    "apply_rope",
]

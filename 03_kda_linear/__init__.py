"""nanokimi.kda: Kimi Delta Attention (Kimi Linear) — token loop → chunkwise reference, Triton kernels, the layer."""

from nanokimi.kda.kernels import kda_chunk_triton, kda_decode_step_triton
from nanokimi.kda.layer import KimiDeltaAttention, ShortConv
from nanokimi.kda.reference import (
    attention_flops,
    chunk_cumsum,
    intra_chunk_matrices,
    kda_chunk,
    kda_flops,
    kda_gate,
    kda_recurrent,
    kda_step,
    l2norm,
    ut_transform,
)

__all__ = [
    "KimiDeltaAttention",
    "ShortConv",
    "attention_flops",
    "chunk_cumsum",
    "intra_chunk_matrices",
    "kda_chunk",
    "kda_chunk_triton",
    "kda_decode_step_triton",
    "kda_flops",
    "kda_gate",
    "kda_recurrent",
    "kda_step",
    "l2norm",
    "ut_transform",
]

"""``MoBAAttention``: the attention layer TinyKimi uses — projections, RoPE, MoBA for training and prefill, dense
attention over the KV cache for decoding (MoBA tech report §3.3: "MoBA is used for prefill only, while we switch to
full attention during generation").

    q, k, v = RoPE(x W_qᵀ), RoPE(x W_kᵀ), x W_vᵀ        per head, [B, T, H, D]
    o       = MoBA(q, k, v)  (or causal softmax attention when ``dense=True`` or when decoding)
    y       = o W_oᵀ                                     [B, T, d_model]

Dense causal attention is MoBA with a single block that covers every key (``block_size = T``, ``topk = 1``), so
both modes run through the same reference or Triton path.

Cache contract (shared by every sequence mixer of TinyKimi): ``forward(x, cache)`` with a dict continues from the
keys and values stored in it (``cache["k"]``, ``cache["v"]``: ``[B, T_past, H, D]``, RoPE already applied; an
empty dict means no tokens yet), processes the new tokens and stores the extended keys and values back. RoPE
positions start at ``T_past``. A prefill of several tokens computes MoBA for the new queries against all keys, so
prefilling in pieces gives exactly the full forward's outputs. A single new token after a non-empty cache is a
decode step and attends densely to the whole cache — equal to the full MoBA forward while the context fits in
``topk · block_size`` tokens, and deliberately denser beyond, as in the paper.

Externally managed KV (what a serving engine with a paged, ragged cache uses): when the cache dict holds the key
``"paged"``, its value ``kv`` owns this layer's keys and values and the layer only projects, rotates and calls it:

    kv.positions   LongTensor [B]: tokens already cached in each row (rows may differ)
    kv.attend(q, k, v) -> o      q, k, v, o [B, T, H, D]; q and k already rotated

``attend`` must store the new k, v after each row's cached ones and return causal softmax attention (scale
``1/sqrt(D)``) of each row's queries over its ``positions[b] + T`` keys, the query at offset t seeing keys up to
``positions[b] + t``. The layer rotates at positions ``kv.positions[:, None] + arange(T)``, returns
``o_proj(o)``, and neither reads nor writes ``cache["k"]``/``cache["v"]`` (a dict with both kinds is refused). The
attention itself happens inside ``attend``, so this path does not see the logits: with ``track_max_logits`` it sets
``max_logits`` to None.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanokimi.checks import check_in, check_positive_int, check_tensor
from nanokimi.moba.kernels import moba_attention_triton
from nanokimi.moba.reference import moba_attention

__all__ = ["MoBAAttention", "apply_rope"]

BACKENDS = ("reference", "triton")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (half-split form): for each pair ``(x_i, x_{i+D/2})`` at position p,
    rotate by the angle ``p · inv_freq_i``, ``inv_freq_i = base^(−2i/D)``.

    x ``[B, T, H, D]``, positions ``[T]`` (shared by every row) or ``[B, T]`` (one position per row and step),
    inv_freq ``[D/2]`` → ``[B, T, H, D]`` in x's dtype (angles and rotation in fp32, or fp64 for fp64 x).
    """
    B, T = x.shape[:2]
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(
            f"positions: expected shape ({T},) or ({B}, {T}) for x of shape {tuple(x.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    ct = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16/fp32 → fp32; fp64 stays fp64
    angles = positions.to(ct)[..., None] * inv_freq.to(ct)  # [T, D/2] or [B, T, D/2]
    cos = angles.cos().unsqueeze(-2)  # [T, 1, D/2] or [B, T, 1, D/2]: broadcasts over heads (and rows)
    sin = angles.sin().unsqueeze(-2)
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class MoBAAttention(nn.Module):
    """Multi-head attention with MoBA (or dense causal) attention, RoPE and a KV cache.

    Args: ``d_model``; ``n_heads``; ``head_dim`` (default ``d_model // n_heads``, must be even for RoPE);
    ``block_size`` and ``topk`` of MoBA (``topk`` counts the query's own block); ``rope_base``; ``dense=True``
    for plain causal softmax attention; ``backend`` ``"reference"`` (dense-mask torch, any device) or
    ``"triton"`` (the block-sparse kernels: CUDA, or CPU under the Triton interpreter).

    After a forward with ``self.track_max_logits = True``, ``self.max_logits`` holds the detached fp32 ``[n_heads]``
    maximum pre-softmax logit ``scale · q·k`` over the attended positions of that forward — what QK-clip needs.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        block_size: int = 64,
        topk: int = 3,
        rope_base: float = 10000.0,
        dense: bool = False,
        backend: str = "reference",
    ):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model: expected a multiple of n_heads ({n_heads}) when head_dim is None, got {d_model}"
                )
            head_dim = d_model // n_heads
        check_positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs), got {head_dim}")
        check_positive_int("block_size", block_size)
        check_positive_int("topk", topk)
        if isinstance(rope_base, bool) or not isinstance(rope_base, int | float) or not rope_base > 1:
            raise ValueError(f"rope_base: expected a number > 1, got {rope_base!r}")
        if not isinstance(dense, bool):
            raise TypeError(f"dense: expected a bool, got {type(dense).__name__}")
        check_in("backend", backend, BACKENDS)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.block_size, self.topk, self.dense, self.backend = block_size, topk, dense, backend
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        inv_freq = float(rope_base) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def extra_repr(self) -> str:
        mode = "dense" if self.dense else f"block_size={self.block_size}, topk={self.topk}"
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, {mode}, backend={self.backend}"
        )

    def _check_cache(self, cache: object, x: torch.Tensor) -> int:
        """Validate the cache dict; return how many tokens it holds."""
        if not isinstance(cache, dict):
            raise TypeError(f"cache: expected a dict or None, got {type(cache).__name__}")
        if "k" not in cache and "v" not in cache:
            return 0
        want = (x.shape[0], None, self.n_heads, self.head_dim)
        k = check_tensor("cache['k']", cache.get("k"), shape=want)
        check_tensor("cache['v']", cache.get("v"), shape=tuple(k.shape))
        return k.shape[1]

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x ``[B, T, d_model]`` → ``[B, T, d_model]``; see the module docstring for ``cache``."""
        check_tensor("x", x, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
        B, T, d_model = x.shape
        if d_model != self.d_model:
            raise ValueError(f"x: expected last dimension d_model={self.d_model}, got {d_model}")
        if T < 1:
            raise ValueError(f"x: expected at least one token, got shape {tuple(x.shape)}")
        if cache is not None and "paged" in cache:
            return self._forward_paged(x, cache)
        past = 0 if cache is None else self._check_cache(cache, x)
        H, D = self.n_heads, self.head_dim
        q, k, v = self._qkv(x, torch.arange(past, past + T, device=x.device))
        if cache is not None:
            if past:
                k = torch.cat((cache["k"], k), dim=1)
                v = torch.cat((cache["v"], v), dim=1)
            cache["k"], cache["v"] = k, v
        decoding = past > 0 and T == 1
        if self.dense or decoding:
            block_size, topk = k.shape[1], 1  # one block holding every key: plain causal attention
        else:
            block_size, topk = self.block_size, self.topk
        attend = moba_attention if self.backend == "reference" else moba_attention_triton
        result = attend(q, k, v, block_size, topk, 1.0 / math.sqrt(D), return_max_logits=self.track_max_logits)
        if self.track_max_logits:
            out, max_logits = result
            self.max_logits = max_logits.amax(dim=0).detach().float()  # [H]
        else:
            out = result
        return self.o_proj(out.reshape(B, T, H * D))

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections of x [B, T, d_model] to q, k, v [B, T, H, D], RoPE on q and k at ``positions`` ([T] or [B, T])."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, D), positions, self.inv_freq)
        k = apply_rope(self.k_proj(x).view(B, T, H, D), positions, self.inv_freq)
        return q, k, self.v_proj(x).view(B, T, H, D)

    def _forward_paged(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The ``"paged"`` path of the module docstring: RoPE at each row's own positions, attention by the cache."""
        if "k" in cache or "v" in cache:
            raise ValueError("cache: expected either 'paged' or 'k'/'v' (KV kept by the layer), got both")
        kv = cache["paged"]
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        check_tensor("cache['paged'].positions", kv.positions, shape=(B,), dtypes=(torch.long,))
        q, k, v = self._qkv(x, kv.positions[:, None] + torch.arange(T, device=x.device))  # positions [B, T]
        out = check_tensor("cache['paged'].attend(q, k, v)", kv.attend(q, k, v), shape=(B, T, H, D))
        if self.track_max_logits:
            self.max_logits = None  # the logits never left attend
        return self.o_proj(out.reshape(B, T, H * D))

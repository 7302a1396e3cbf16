"""The Kimi Delta Attention layer (Kimi Linear report §4, Eq. 10; FLA's ``KimiDeltaAttention`` parametrisation).

For x ``[B, T, D]``, H heads of size d (K = V = d)::

    q, k = L2Norm(SiLU(ShortConv(W_q x))), L2Norm(SiLU(ShortConv(W_k x)))      [B, T, H, d]
    v    = SiLU(ShortConv(W_v x))                                               [B, T, H, d]
    β    = sigmoid(W_β x)                                                       [B, T, H]
    g    = −exp(A_log_h) · softplus(W_f↑ W_f↓ x + dt_bias)                      [B, T, H, d], ≤ 0
    o    = KDA(q, k, v, g, β)                                                   [B, T, H, d]
    y    = W_o( sigmoid(W_g↑ W_g↓ x + b_g) ⊙ RMSNorm_head(o) )                  [B, T, D]

ShortConv is a depthwise causal convolution over time (kernel ``conv_size``, no bias). W_f and W_g are low-rank
(rank d). Initialisation: ``A_log = log U(1, 16)``; ``dt_bias = softplus⁻¹(dt)`` with ``dt ~ logU(1e−3, 0.1)``
clamped ≥ 1e−4 (so the initial per-step decay ``exp(−A·dt)`` is mild); both are marked ``_no_weight_decay``.

Cache (``forward(x, cache)``): a dict holding ``"state"`` (the KDA state ``[B, H, d, d]`` fp32), ``"conv"`` (the
last ``conv_size − 1`` pre-convolution inputs of q, k, v) and ``"n_tokens"``. An empty dict means no tokens
yet; T = 1 with a cache runs one recurrent step, T > 1 the chunkwise form started from the cached state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.checks import check_in, check_positive_int, check_tensor
from nanokimi.kda.kernels import kda_chunk_triton, kda_decode_step_triton
from nanokimi.kda.reference import kda_chunk, kda_gate, kda_step, l2norm

__all__ = ["KimiDeltaAttention", "ShortConv"]

BACKENDS = ("reference", "triton")


class ShortConv(nn.Module):
    """Depthwise causal convolution over time followed by SiLU: ``y_t = SiLU(Σ_{j<W} w_j ⊙ x_{t−W+1+j})``.

    ``forward(x [B, T, C], past [B, W−1, C] | None) → (y [B, T, C], new_past [B, W−1, C])``: ``past`` holds the
    inputs just before x (zeros at the start of a sequence), so running a sequence in pieces gives the same y.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        W = self.kernel_size
        if past is None:
            past = x.new_zeros(B, W - 1, C)
        check_tensor("past", past, shape=(B, W - 1, C), device=x.device)
        window = torch.cat([past.to(x.dtype), x], dim=1)  # [B, W − 1 + T, C]
        weight = self.weight.to(x.dtype)
        y = sum(weight[:, j] * window[:, j : j + T] for j in range(W))  # W shifted multiply-adds, [B, T, C]
        return F.silu(y), window[:, window.shape[1] - (W - 1) :]


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention as a sequence mixer: ``forward(x [B, T, D], cache=None) → [B, T, D]``.

    ``backend="reference"`` runs :func:`~nanokimi.kda.reference.kda_chunk` (plain torch, differentiable, CPU
    friendly) and :func:`~nanokimi.kda.reference.kda_step` for decoding; ``backend="triton"`` runs
    :func:`~nanokimi.kda.kernels.kda_chunk_triton` and :func:`~nanokimi.kda.kernels.kda_decode_step_triton`.
    ``chunk_size`` is the chunk length of the chunkwise form (16, 32 or 64 for the Triton backend).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        conv_size: int = 4,
        backend: str = "reference",
        chunk_size: int = 64,
    ):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"head_dim: d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
            head_dim = d_model // n_heads
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.conv_size = check_positive_int("conv_size", conv_size)
        self.backend = check_in("backend", backend, BACKENDS)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        H, d = n_heads, head_dim
        inner = H * d
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.q_conv = ShortConv(inner, conv_size)
        self.k_conv = ShortConv(inner, conv_size)
        self.v_conv = ShortConv(inner, conv_size)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.f_proj = nn.Sequential(nn.Linear(d_model, d, bias=False), nn.Linear(d, inner, bias=False))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1.0, 16.0).log())
        dt = torch.empty(inner).uniform_(math.log(1e-3), math.log(0.1)).exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Sequential(nn.Linear(d_model, d, bias=False), nn.Linear(d, inner, bias=True))
        self.o_norm_weight = nn.Parameter(torch.ones(d))
        self.o_norm_eps = 1e-5
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"conv_size={self.conv_size}, backend={self.backend!r}, chunk_size={self.chunk_size}"
        )

    def _mix(self, q, k, v, g, beta, state, decode_step: bool, want_state: bool):
        """KDA on per-head inputs ``[B, T, H, d]``; returns (o ``[B, T, H, d]``, new state or None)."""
        if decode_step:
            if state is None:
                state = q.new_zeros(q.shape[0], self.n_heads, self.head_dim, self.head_dim, dtype=torch.float32)
            if self.backend == "triton":
                o, state = kda_decode_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
            else:
                o, state = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
            return o[:, None], state
        if self.backend == "triton":
            return kda_chunk_triton(
                q, k, v, g, beta, initial_state=state, output_final_state=want_state,
                chunk_size=self.chunk_size, check_values=False,
            )  # fmt: skip
        return kda_chunk(
            q, k, v, g, beta, initial_state=state, output_final_state=want_state, chunk_size=self.chunk_size
        )

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        check_tensor(
            "x",
            x,
            shape=(None, None, self.d_model),
            dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64),
        )
        if cache is not None and not isinstance(cache, dict):
            raise TypeError(f"cache: expected a dict or None, got {type(cache).__name__}")
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        conv_q, conv_k, conv_v = cache.get("conv", (None, None, None)) if cache is not None else (None, None, None)
        state = cache.get("state") if cache is not None else None
        q, conv_q = self.q_conv(self.q_proj(x), conv_q)
        k, conv_k = self.k_conv(self.k_proj(x), conv_k)
        v, conv_v = self.v_conv(self.v_proj(x), conv_v)
        q = l2norm(q.view(B, T, H, d))
        k = l2norm(k.view(B, T, H, d))
        v = v.view(B, T, H, d)
        acc = torch.promote_types(x.dtype, torch.float32)  # gates and norms in fp32 (fp64 stays fp64)
        beta = torch.sigmoid(self.b_proj(x).to(acc))  # [B, T, H]
        g = kda_gate(self.f_proj(x).view(B, T, H, d), self.A_log, self.dt_bias)  # [B, T, H, d] fp32, ≤ 0
        decode_step = cache is not None and T == 1
        o, new_state = self._mix(q, k, v, g, beta, state, decode_step, want_state=cache is not None)
        o = o.to(acc)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.o_norm_eps) * self.o_norm_weight.to(acc)
        gate = torch.sigmoid(self.g_proj(x).to(acc)).view(B, T, H, d)
        y = self.o_proj((o * gate).reshape(B, T, H * d).to(x.dtype))
        if cache is not None:
            cache["state"] = new_state
            cache["conv"] = (conv_q, conv_k, conv_v)
            cache["n_tokens"] = int(cache.get("n_tokens", 0)) + T
        return y

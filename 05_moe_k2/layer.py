"""``MoE``: the K2 mixture-of-experts FFN as an ``nn.Module`` (what TinyKimi's MoE layers are).

    y = Σ_j w_j · FFN_{I_j}(x) + FFN_shared(x),   (I, w) = route(x; W_r, b)          (see reference.py)

Training loop contract (aux-loss-free balancing, DeepSeek-V3 §2.1.2 / K2 §2.3):

    loss.backward(); optimizer.step(); for moe in moe_layers: moe.update_bias()

``forward`` counts the tokens each expert received while ``self.training``; ``update_bias()`` moves the
selection bias by ``± bias_update_rate`` from those counts and resets them; ``load_stats()`` reports them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanokimi.checks import check_in, check_positive_int, check_tensor
from nanokimi.moe.kernels import routed_experts_triton
from nanokimi.moe.reference import route, routed_experts, swiglu_ffn, update_expert_bias

__all__ = ["MoE"]


class MoE(nn.Module):
    """K2-style MoE FFN: sigmoid router with a selection-only expert bias, E routed SwiGLU experts (top-k),
    ``n_shared`` shared experts fused into one SwiGLU of width ``n_shared · d_ff``.

    Args:
        d_model: D. d_ff: F, the width of each routed expert. n_experts: E. top_k: k.
        n_shared: shared experts (0 for none). routed_scaling_factor: c, multiplies the renormalised weights
            (K2 2.827, Moonlight 2.446; see ``moonlight_scaling_factor``). bias_update_rate: γ of
            ``update_bias`` (0 freezes the bias). n_groups, topk_groups: group-limited routing
            (DeepSeek-V3 8/4; K2 1/1). backend: ``"reference"`` (loop over experts) or ``"triton"``.

    Parameters: ``router`` (``nn.Linear(D, E)``, no bias), ``w_gate``/``w_up`` ``[E, F, D]``, ``w_down``
    ``[E, D, F]``, and ``shared_gate``/``shared_up``/``shared_down`` (``nn.Linear``, no bias) when n_shared > 0.
    Buffers: ``expert_bias`` ``[E]`` (kept in fp32 whatever the module dtype), ``tokens_per_expert`` ``[E]``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        n_shared: int = 1,
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 1e-3,
        n_groups: int = 1,
        topk_groups: int = 1,
        backend: str = "reference",
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("top_k", top_k)):
            check_positive_int(name, value)
        check_positive_int("n_groups", n_groups)
        check_positive_int("topk_groups", topk_groups)
        if isinstance(n_shared, bool) or not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"n_shared: expected a non-negative int, got {n_shared!r}")
        if n_experts % n_groups:
            raise ValueError(f"n_groups: expected a divisor of n_experts={n_experts}, got {n_groups}")
        if topk_groups > n_groups:
            raise ValueError(f"topk_groups: expected at most n_groups={n_groups}, got {topk_groups}")
        if top_k > topk_groups * (n_experts // n_groups):
            raise ValueError(
                f"top_k: expected at most {topk_groups * (n_experts // n_groups)} (n_experts={n_experts}, "
                f"n_groups={n_groups}, topk_groups={topk_groups}), got {top_k}"
            )
        if not (isinstance(routed_scaling_factor, int | float) and routed_scaling_factor > 0):
            raise ValueError(f"routed_scaling_factor: expected a positive float, got {routed_scaling_factor!r}")
        if not (isinstance(bias_update_rate, int | float) and bias_update_rate >= 0):
            raise ValueError(f"bias_update_rate: expected a non-negative float, got {bias_update_rate!r}")
        check_in("backend", backend, ("reference", "triton"))
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.n_shared = n_shared
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.bias_update_rate = float(bias_update_rate)
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.backend = backend

        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        if n_shared:
            self.shared_gate = nn.Linear(d_model, n_shared * d_ff, bias=False)
            self.shared_up = nn.Linear(d_model, n_shared * d_ff, bias=False)
            self.shared_down = nn.Linear(n_shared * d_ff, d_model, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("_consumed_load", torch.zeros(n_experts, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts like ``nn.Linear``'s default: U(−1/√fan_in, 1/√fan_in); the expert bias at zero."""
        with torch.no_grad():
            self.w_gate.uniform_(-1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
            self.w_up.uniform_(-1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
            self.w_down.uniform_(-1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))
            self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16) would also cast the bias; γ = 1e-3 steps vanish in bf16 next to |b| ~ 1.
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D]`` → ``[..., D]``."""
        check_tensor("x", x, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected a last dimension of d_model={self.d_model}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)  # [N, D]
        topk_idx, topk_weight = route(
            flat,
            self.router.weight,
            self.expert_bias,
            self.top_k,
            self.routed_scaling_factor,
            self.n_groups,
            self.topk_groups,
        )
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(topk_idx.reshape(-1), minlength=self.n_experts)
        experts = routed_experts_triton if self.backend == "triton" else routed_experts
        y = experts(flat, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down)
        if self.n_shared:
            y = y + swiglu_ffn(flat, self.shared_gate.weight, self.shared_up.weight, self.shared_down.weight)
        return y.view(x.shape)

    @torch.no_grad()
    def update_bias(self) -> dict:
        """Apply ``b ← b + γ · sign(mean(c) − c)`` with the counts c accumulated since the last call, then reset
        them. Call after ``optimizer.step()``. Returns the :meth:`load_stats` of the counts it consumed."""
        load = self.tokens_per_expert.clone()
        if self.bias_update_rate > 0 and int(load.sum()) > 0:
            self.expert_bias.copy_(update_expert_bias(self.expert_bias, load, self.bias_update_rate))
        self._consumed_load.copy_(load)
        self.tokens_per_expert.zero_()
        return self._stats(load)

    def load_stats(self) -> dict:
        """Token counts per expert since the last :meth:`update_bias` (or, when none were counted since, the
        counts that call consumed): ``tokens_per_expert`` (list), ``max_load``, ``mean_load``,
        ``max_over_mean`` (1.0 is perfect balance; NaN when no token was counted)."""
        pending = int(self.tokens_per_expert.sum()) > 0
        return self._stats(self.tokens_per_expert if pending else self._consumed_load)

    @staticmethod
    def _stats(load: torch.Tensor) -> dict:
        mean = float(load.double().mean())
        max_load = int(load.max())
        return {
            "tokens_per_expert": [int(c) for c in load.tolist()],
            "max_load": max_load,
            "mean_load": mean,
            "max_over_mean": max_load / mean if mean > 0 else float("nan"),
        }

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"n_shared={self.n_shared}, routed_scaling_factor={self.routed_scaling_factor}, "
            f"bias_update_rate={self.bias_update_rate}, n_groups={self.n_groups}, topk_groups={self.topk_groups}, "
            f"backend={self.backend!r}"
        )

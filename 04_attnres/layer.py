"""``ResidualStream``: the object a model uses between its sublayers, with the residual rule as a switch.

    standard   h_{l+1} = h_l + v_l                                   (returns h_L = embedding + Σ v)
    full       h_l = Σ_{i ≤ l} α_{i→l} s_i over every earlier output  (Full AttnRes; block_size = 1)
    block      h_l attends over completed block sums + the current block's partial sum (Block AttnRes)

where v_l = sublayers[l](h_l) and each sublayer applies its own pre-norm. The forward returns the final hidden
state (the final query's aggregation for full/block), before the model's final norm.

Backends: ``reference`` runs the sequential definition (``reference.attnres_forward``); ``triton`` runs the
two-phase algorithm on the fused kernels: per block one phase-1 call over a block cache that grows in place (no
re-stacking), then one fused "partial += v; merge" kernel per sublayer. The running sum inside a block is kept in
fp32 (as the reference keeps it) and rounded once to the stream's dtype when the block completes: a bf16 running sum
rounded at every step made bf16 gradients 1.6× less accurate than the reference computed in the same precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from nanokimi.attnres import reference
from nanokimi.attnres.kernels import depth_attention_cached_triton, merge_step_triton, online_merge_triton
from nanokimi.checks import check_in, check_positive_int, check_tensor

__all__ = ["ResidualStream", "MODES", "BACKENDS"]

MODES = ("standard", "full", "block")
BACKENDS = ("reference", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class ResidualStream(nn.Module):
    """The residual connections of a stack of ``n_sublayers`` sublayers of width ``d_model``.

    Parameters (full/block only): ``queries[l]`` the zero-initialised pseudo-query w_l of sublayer l and
    ``norm_weights[l]`` its key RMSNorm weight (ones); entry ``n_sublayers`` of each is the final aggregation's.
    They are 1-D, so optimizers that treat matrices specially (Muon) leave them to AdamW.

    ``forward(embedding [B, T, D], sublayers) -> [B, T, D]``; with ``return_weights=True`` it also returns the
    depth-attention weights, a list of ``n_sublayers + 1`` detached fp32 tensors [n_sources, B, T] (entry l for
    sublayer l's input, the last for the output). The standard residual's implicit weights are all ones.
    """

    def __init__(
        self,
        mode: str,
        n_sublayers: int,
        d_model: int,
        block_size: int | None = None,
        backend: str = "reference",
        *,
        eps: float = 1e-6,
    ):
        super().__init__()
        check_in("mode", mode, MODES)
        check_positive_int("n_sublayers", n_sublayers)
        check_positive_int("d_model", d_model)
        check_in("backend", backend, BACKENDS)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"eps: expected a positive float, got {eps!r}")
        if mode == "block":
            if block_size is None:
                raise ValueError("block_size: expected a positive int for mode='block', got None")
            check_positive_int("block_size", block_size)
        elif mode == "full" and block_size not in (None, 1):
            raise ValueError(f"block_size: mode='full' is block_size 1; expected None or 1, got {block_size!r}")
        elif mode == "standard" and block_size is not None:
            raise ValueError(f"block_size: mode='standard' has no blocks; expected None, got {block_size!r}")
        self.mode = mode
        self.n_sublayers = n_sublayers
        self.d_model = d_model
        self.block_size = {"standard": None, "full": 1, "block": block_size}[mode]
        self.backend = backend
        self.eps = float(eps)
        if mode != "standard":
            self.queries = nn.ParameterList(nn.Parameter(torch.zeros(d_model)) for _ in range(n_sublayers + 1))
            self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(d_model)) for _ in range(n_sublayers + 1))

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.mode == "block" else ""
        return f"mode={self.mode!r}, n_sublayers={self.n_sublayers}, d_model={self.d_model}{block}, backend={self.backend!r}"

    def forward(
        self,
        embedding: torch.Tensor,
        sublayers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        return_weights: bool = False,
    ):
        check_tensor("embedding", embedding, shape=(None, None, self.d_model), dtypes=_FLOATS)
        if len(sublayers) != self.n_sublayers:
            raise ValueError(f"sublayers: expected {self.n_sublayers} callables, got {len(sublayers)}")
        if self.mode == "standard":
            out, weights = self._forward_standard(embedding, sublayers, return_weights)
        elif self.backend == "reference":
            n = self.n_sublayers
            result = reference.attnres_forward(
                embedding,
                sublayers,
                self.queries[:n],
                self.block_size,
                self.queries[n],
                self.norm_weights[:n],
                self.norm_weights[n],
                self.eps,
                return_weights=return_weights,
            )
            out, weights = result if return_weights else (result, None)
            weights = None if weights is None else [w.detach().float() for w in weights]
        else:
            check_tensor("embedding", embedding, dtypes=_TRITON_FLOATS)
            out, weights = self._forward_triton(embedding, sublayers, return_weights)
        return (out, weights) if return_weights else out

    @staticmethod
    def _run(sublayers, l: int, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        v = sublayers[l](h)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(embedding.shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"sublayers[{l}]: expected an output of shape {tuple(embedding.shape)}, got {got}")
        return v.to(embedding.dtype)  # the stream keeps the embedding's dtype

    def _forward_standard(self, embedding, sublayers, return_weights):
        h = embedding
        for l in range(self.n_sublayers):
            h = h + self._run(sublayers, l, h, embedding)
        weights = None
        if return_weights:
            b, t = embedding.shape[:2]
            ones = [torch.ones(l + 1, b, t, device=embedding.device) for l in range(self.n_sublayers + 1)]
            weights = ones
        return h, weights

    def _weights(self, blocks: list[torch.Tensor], partial: torch.Tensor | None, l: int) -> torch.Tensor:
        """Depth-attention weights of query l over [blocks…, partial] (for plots; no gradient)."""
        with torch.no_grad():
            sources = torch.stack(blocks + ([partial] if partial is not None else []))
            _, weights = reference.depth_attention(sources, self.queries[l], self.norm_weights[l], self.eps)
        return weights.float()

    def _forward_triton(self, embedding, sublayers, return_weights):
        n_layers, block_size, eps = self.n_sublayers, self.block_size, self.eps
        sum_dtype = torch.promote_types(embedding.dtype, torch.float32)  # a block's running sum
        n_blocks = -(-n_layers // block_size)
        # Block cache [n_blocks + 1, B, T, D]: each completed block sum is copied in once; phase 1 reads its first
        # rows directly, and gradients flow to the block tensors themselves (see depth_attention_cached_triton).
        cache = embedding.new_empty((n_blocks + 1, *embedding.shape))
        with torch.no_grad():
            cache[0].copy_(embedding)
        blocks = [embedding]
        weights = [] if return_weights else None
        for start in range(0, n_layers, block_size):
            layers = range(start, min(start + block_size, n_layers))
            block_queries = torch.stack([self.queries[l] for l in layers])  # [S, D]
            block_norms = torch.stack([self.norm_weights[l] for l in layers])  # [S, D]
            if len(blocks) > 1:
                out1, lse1 = depth_attention_cached_triton(cache, blocks, block_queries, block_norms, eps)
                out1, lse1 = out1.unbind(0), lse1.unbind(0)  # [B, T, D], [B, T] each
            else:  # one source (the embedding) is every query's phase-1 output: only its logits are needed
                out1 = [embedding] * len(layers)
                lse1 = None
                if len(layers) > 1:  # (and only by the merges of sublayers 1, 2, …)
                    lse1 = depth_attention_cached_triton(
                        cache, blocks, block_queries, block_norms, eps, with_out=False
                    ).unbind(0)
            partial = None  # the sum of this block's outputs before sublayer i
            v = None
            for i, l in enumerate(layers):
                query, norm = self.queries[l], self.norm_weights[l]
                if i == 0:
                    h = out1[0]
                elif i == 1:
                    partial = v
                    h = online_merge_triton(out1[i], lse1[i], partial, query, norm, eps)
                else:
                    h, partial = merge_step_triton(out1[i], lse1[i], partial, v, query, norm, eps, sum_dtype)
                if return_weights:
                    weights.append(self._weights(blocks, partial, l))
                v = self._run(sublayers, l, h, embedding)
            block = v if partial is None else (partial + v).to(embedding.dtype)  # one rounding per block
            blocks.append(block)
            with torch.no_grad():
                cache[len(blocks) - 1].copy_(block)
        final_query, final_norm = self.queries[n_layers][None], self.norm_weights[n_layers][None]
        out, _ = depth_attention_cached_triton(cache, blocks, final_query, final_norm, eps)
        if return_weights:
            weights.append(self._weights(blocks, None, n_layers))
        return out[0], weights

"""Attention Residuals, the specification: plain PyTorch, fp32 (fp64 for fp64 inputs), readable top to bottom.

Paper: *Attention Residuals*, Kimi Team, arXiv 2603.15031, §3 (formulation) and §4 (two-phase computation).

The standard pre-norm residual adds every sublayer's output with weight 1::

    h_{l+1} = h_l + v_l,   v_l = f_l(h_l),   h_0 = embedding          ⇒ h_L = h_0 + Σ_l v_l

so ‖h_l‖ grows with depth and each new v_l is diluted ("PreNorm dilution"). Attention Residuals replace the fixed
sum by a softmax over depth, per token. With sources s_0 = embedding and s_{i+1} = v_i::

    h_l = Σ_{i ≤ l} α_{i→l} s_i,    α_{·→l} = softmax_i( w_lᵀ RMSNorm(s_i) )                          (Full AttnRes)

``w_l ∈ R^D`` is a learned pseudo-query per sublayer, zero-initialised, so at step 0 every α is uniform and h_l
is the *average* of its sources (not the standard sum). Keys are RMS-normalised sources (the norm may carry a
learnable weight g_l, which folds into the query: w_lᵀ(g_l ⊙ ŝ) = (w_l ⊙ g_l)ᵀ ŝ); values are the raw sources.

Block AttnRes groups the L sublayers into blocks of ``block_size`` S. Completed blocks are summed into one source
each, b_0 = embedding, b_n = Σ_{j ∈ block n} v_j, and sublayer i of block n attends over
``[b_0, …, b_{n-1}, partial_n]`` where partial_n = sum of the outputs of block n produced so far (absent for the
first sublayer of a block). A final query aggregates all blocks into the output. S = 1 is Full AttnRes; S ≥ L is
the standard residual with the embedding kept as a separate source: h = softmax-mix(embedding, Σ v).

Two-phase computation (§4, Algorithm 1): the pseudo-queries do not depend on the forward pass, so

* phase 1 — all S queries of a block attend over the completed blocks in one batched call, returning the
  normalised outputs o_s and log-sum-exps ℓ_s (``batched_depth_attention``);
* phase 2 — each sublayer merges its phase-1 result with the one source phase 1 could not see, the running
  partial sum x, by an online-softmax merge (``online_merge``)::

      z = wᵀ RMSNorm(x),   h = (e^{ℓ} o + e^{z} x) / (e^{ℓ} + e^{z}).

Both orders give the same h (``attnres_forward`` vs ``two_phase_block``; tested to 1e-12 in fp64).

Shapes: D = model width; ``...`` = any leading token dims (e.g. B, T); N = number of sources; S = queries.
Cost per token and sublayer: Full O(l·D) reads, Block O((N + S)·D / S) amortised (paper Table 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nanokimi.checks import check_positive_int, check_tensor

__all__ = [
    "rms_norm",
    "depth_attention",
    "batched_depth_attention",
    "online_merge",
    "standard_forward",
    "attnres_forward",
    "two_phase_block",
]

Sublayer = Callable[[torch.Tensor], torch.Tensor]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for exactness tests); everything else is computed in fp32."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    return float(eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) = x / sqrt(mean_d(x²) + eps) ⊙ weight, over the last dim. x [..., D], weight [D] or None."""
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed if weight is None else normed * weight


def depth_attention(
    sources: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over depth for one pseudo-query, per token.

        α_i = softmax_i( queryᵀ RMSNorm(sources_i) ),   out = Σ_i α_i sources_i

    sources [N, ..., D], query [D], norm_weight [D] or None → out [..., D], weights α [N, ...] (fp32, or fp64
    for fp64 sources). One source returns itself; a zero query gives the uniform average.
    """
    check_tensor("sources", sources, dtypes=_FLOATS)
    if sources.dim() < 2 or sources.shape[0] < 1:
        raise ValueError(f"sources: expected shape (N >= 1, ..., D), got {tuple(sources.shape)}")
    d = sources.shape[-1]
    check_tensor("query", query, shape=(d,), dtypes=_FLOATS)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=(d,), dtypes=_FLOATS)
    eps = _check_eps(eps)
    dt = _compute_dtype(sources)
    values = sources.to(dt)  # [N, ..., D]
    keys = rms_norm(values, None if norm_weight is None else norm_weight.to(dt), eps)  # [N, ..., D]
    logits = torch.einsum("n...d,d->n...", keys, query.to(dt))  # [N, ...]
    weights = torch.softmax(logits, dim=0)  # [N, ...]
    out = torch.einsum("n...,n...d->...d", weights, values)  # [..., D]
    return out, weights


def batched_depth_attention(
    sources: torch.Tensor, queries: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: S pseudo-queries against the same N sources in one call, with the softmax statistics.

        z_{s,i} = (q_s ⊙ g_s)ᵀ ŝ_i,  ŝ_i = sources_i / rms(sources_i)
        lse_s = log Σ_i e^{z_{s,i}},   out_s = Σ_i e^{z_{s,i} − lse_s} sources_i

    sources [N, ..., D], queries [S, D], norm_weight [S, D] or None → out [S, ..., D], lse [S, ...].
    Each source is normalised once for all S queries (the norm weight folds into the query).
    """
    check_tensor("sources", sources, dtypes=_FLOATS)
    if sources.dim() < 2 or sources.shape[0] < 1:
        raise ValueError(f"sources: expected shape (N >= 1, ..., D), got {tuple(sources.shape)}")
    d = sources.shape[-1]
    check_tensor("queries", queries, shape=(None, d), dtypes=_FLOATS)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=tuple(queries.shape), dtypes=_FLOATS)
    eps = _check_eps(eps)
    dt = _compute_dtype(sources)
    values = sources.to(dt)  # [N, ..., D]
    unit_keys = rms_norm(values, None, eps)  # [N, ..., D]
    eff_queries = queries.to(dt) if norm_weight is None else queries.to(dt) * norm_weight.to(dt)  # [S, D]
    logits = torch.einsum("n...d,sd->sn...", unit_keys, eff_queries)  # [S, N, ...]
    lse = torch.logsumexp(logits, dim=1)  # [S, ...]
    weights = torch.exp(logits - lse.unsqueeze(1))  # [S, N, ...]
    out = torch.einsum("sn...,n...d->s...d", weights, values)  # [S, ..., D]
    return out, lse


def online_merge(
    out1: torch.Tensor,
    lse1: torch.Tensor,
    partial: torch.Tensor,
    query: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Phase 2: add one more source (the running partial sum x) to a phase-1 result by online softmax.

        z = queryᵀ RMSNorm(x),   lse = log(e^{lse1} + e^{z}),   h = e^{lse1 − lse} out1 + e^{z − lse} x

    out1 [..., D] (normalised phase-1 output), lse1 [...], partial [..., D], query [D], norm_weight [D] or None
    → h [..., D]. Equal to ``depth_attention`` over [phase-1 sources…, x].
    """
    d = partial.shape[-1]
    check_tensor("partial", partial, dtypes=_FLOATS)
    check_tensor("out1", out1, shape=tuple(partial.shape), dtypes=_FLOATS)
    check_tensor("lse1", lse1, shape=tuple(partial.shape[:-1]), dtypes=_FLOATS)
    check_tensor("query", query, shape=(d,), dtypes=_FLOATS)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=(d,), dtypes=_FLOATS)
    eps = _check_eps(eps)
    dt = _compute_dtype(partial)
    x = partial.to(dt)
    weight = None if norm_weight is None else norm_weight.to(dt)
    logit2 = torch.einsum("...d,d->...", rms_norm(x, weight, eps), query.to(dt))  # [...]
    lse1 = lse1.to(dt)
    lse = torch.logaddexp(lse1, logit2)  # [...]
    return torch.exp(lse1 - lse).unsqueeze(-1) * out1.to(dt) + torch.exp(logit2 - lse).unsqueeze(-1) * x


def standard_forward(embedding: torch.Tensor, sublayers: Sequence[Sublayer]) -> torch.Tensor:
    """The standard residual stream: h_0 = embedding, h_{l+1} = h_l + f_l(h_l); returns h_L."""
    h = embedding
    for f in sublayers:
        h = h + f(h)
    return h


def _check_stream_args(
    embedding: torch.Tensor,
    sublayers: Sequence[Sublayer],
    queries,
    block_size: int,
    final_query: torch.Tensor,
    norm_weights,
    final_norm_weight: torch.Tensor | None,
    eps: float,
) -> None:
    check_tensor("embedding", embedding, dtypes=_FLOATS)
    if embedding.dim() < 1:
        raise ValueError(f"embedding: expected shape (..., D), got {tuple(embedding.shape)}")
    d = embedding.shape[-1]
    n_layers = len(sublayers)
    check_positive_int("len(sublayers)", n_layers)
    check_positive_int("block_size", block_size)
    if len(queries) != n_layers:
        raise ValueError(f"queries: expected {n_layers} pseudo-queries (one per sublayer), got {len(queries)}")
    for l in range(n_layers):
        check_tensor(f"queries[{l}]", queries[l], shape=(d,), dtypes=_FLOATS)
    check_tensor("final_query", final_query, shape=(d,), dtypes=_FLOATS)
    if norm_weights is not None:
        if len(norm_weights) != n_layers:
            raise ValueError(f"norm_weights: expected {n_layers} norm weights, got {len(norm_weights)}")
        for l in range(n_layers):
            check_tensor(f"norm_weights[{l}]", norm_weights[l], shape=(d,), dtypes=_FLOATS)
    if final_norm_weight is not None:
        check_tensor("final_norm_weight", final_norm_weight, shape=(d,), dtypes=_FLOATS)
    _check_eps(eps)


def _run_sublayer(f: Sublayer, h: torch.Tensor, l: int, embedding: torch.Tensor) -> torch.Tensor:
    """Sublayers see h in the embedding's dtype and must return a tensor of the embedding's shape."""
    v = f(h.to(embedding.dtype))
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(embedding.shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"sublayers[{l}]: expected an output of shape {tuple(embedding.shape)}, got {got}")
    return v.to(_compute_dtype(embedding))


def attnres_forward(
    embedding: torch.Tensor,
    sublayers: Sequence[Sublayer],
    queries: torch.Tensor | Sequence[torch.Tensor],
    block_size: int,
    final_query: torch.Tensor,
    norm_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    final_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    return_weights: bool = False,
):
    """Block AttnRes by its definition: each sublayer attends directly over its sources (no two-phase trick).

        b_0 = embedding;  sublayer l (block n = l // S + 1, position i = l mod S) gets
        h_l = depth_attention([b_0, …, b_{n-1}] + ([partial] if i > 0 else []), queries[l], norm_weights[l])
        v_l = sublayers[l](h_l);  partial = v_l if i == 0 else partial + v_l;  a full block becomes b_n.
        out = depth_attention([b_0, …, b_N], final_query, final_norm_weight)

    embedding [..., D]; L sublayers; queries L × [D] ([L, D] tensor or list); block_size S ≥ 1 (1 = Full AttnRes).
    Returns out [..., D] in the embedding's dtype (mixing computed in fp32, fp64 for fp64 inputs); with
    ``return_weights`` also the list of L + 1 depth-attention weights, entry l of shape [n_sources_l, ...].
    """
    _check_stream_args(embedding, sublayers, queries, block_size, final_query, norm_weights, final_norm_weight, eps)
    dt = _compute_dtype(embedding)
    blocks = [embedding.to(dt)]  # completed block sums b_0 … b_{n-1}
    partial = None  # sum of the current block's outputs so far
    all_weights = []
    for l, f in enumerate(sublayers):
        if l % block_size == 0 and partial is not None:  # sublayer l opens a new block
            blocks.append(partial)
            partial = None
        sources = torch.stack(blocks + ([partial] if partial is not None else []))  # [n, ..., D]
        h, weights = depth_attention(sources, queries[l], None if norm_weights is None else norm_weights[l], eps)
        all_weights.append(weights)
        v = _run_sublayer(f, h, l, embedding)
        partial = v if partial is None else partial + v
    blocks.append(partial)
    out, weights = depth_attention(torch.stack(blocks), final_query, final_norm_weight, eps)
    all_weights.append(weights)
    out = out.to(embedding.dtype)
    return (out, all_weights) if return_weights else out


def two_phase_block(
    embedding: torch.Tensor,
    sublayers: Sequence[Sublayer],
    queries: torch.Tensor | Sequence[torch.Tensor],
    block_size: int,
    final_query: torch.Tensor,
    norm_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    final_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Block AttnRes by the two-phase algorithm (paper Algorithm 1); same arguments and result as
    ``attnres_forward``.

    For each block: phase 1 runs all its queries against the completed blocks at once (one pass over the block
    cache), then each sublayer i > 0 merges that result with the running partial sum (phase 2), so the block
    cache is read once per block instead of once per sublayer.
    """
    _check_stream_args(embedding, sublayers, queries, block_size, final_query, norm_weights, final_norm_weight, eps)
    dt = _compute_dtype(embedding)
    n_layers = len(sublayers)
    blocks = [embedding.to(dt)]
    for start in range(0, n_layers, block_size):
        layers = range(start, min(start + block_size, n_layers))
        block_queries = torch.stack([queries[l].to(dt) for l in layers])  # [S, D]
        block_weights = None if norm_weights is None else torch.stack([norm_weights[l].to(dt) for l in layers])
        out1, lse1 = batched_depth_attention(torch.stack(blocks), block_queries, block_weights, eps)  # [S, ..., D]
        partial = None
        for i, l in enumerate(layers):
            if i == 0:  # the first sublayer of a block sees only completed blocks: phase 1 is its answer
                h = out1[0]
            else:
                weight = None if norm_weights is None else norm_weights[l]
                h = online_merge(out1[i], lse1[i], partial, queries[l], weight, eps)
            v = _run_sublayer(sublayers[l], h, l, embedding)
            partial = v if partial is None else partial + v
        blocks.append(partial)
    out, _ = batched_depth_attention(
        torch.stack(blocks),
        final_query.to(dt)[None],
        None if final_norm_weight is None else final_norm_weight.to(dt)[None],
        eps,
    )
    return out[0].to(embedding.dtype)

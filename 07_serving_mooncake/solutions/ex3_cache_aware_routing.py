"""Exercise 3 (medium): the prefill-time model and cache-aware, TTFT-minimising routing.

Task. Build the prefill side of Mooncake's Conductor without the remote pull: send each request to the prefill
instance where its time to first token would be lowest, counting the instance's queue and the part of the prompt
its cache already holds.

1. ``prefill_time(cost, n, p, dram_blocks, layerwise)``: seconds to prefill an ``n``-token prompt whose first
   ``p`` tokens are cached, ``dram_blocks`` of the cached blocks sitting in host DRAM (FAST'25 eq. 1 in roofline
   form; the coefficients are fields of ``cost``, a ``nanokimi.sim.CostModel``)::

       pairs(n, p) = (n(n+1) − p(p+1)) / 2                       causal (query, key) pairs still to compute
       T_compute   = c0 + c1 · (n − p) + c2 · pairs(n, p)
       T_load      = dram_blocks · block_bytes / h2d_bw          block_bytes = block_tokens · kv_bytes_per_token
                                                                               + state_bytes
       T_prefill   = max(T_load + T_compute / L,  T_load / L + T_compute)      layer-wise streaming, L = n_layers
       T_prefill   = T_load + T_compute                                         otherwise

2. ``ttft_estimate(req, inst, cluster, now)``: the TTFT the request would see on prefill instance ``inst``::

       (hit, dram) = inst.match(req.hash_ids)                    leading cached blocks, and how many are in DRAM
       p           = min(hit · block_tokens, n − 1)              at least one token is always computed
       TTFT        = inst.queue_time(now) + T_prefill(n, p, dram)    (cost = inst.cost, layer-wise = cluster.layerwise)

3. ``CacheAwarePolicy.route``: ``prefill = argmin_i TTFT_i`` over ``cluster.prefill_pool`` (ties: the smaller
   queue time, then the lower ``inst.idx``); ``decode = least_loaded_decode(req, cluster, self.tbt_slo)`` (given);
   return ``Route(prefill=..., decode=..., predicted_ttft=TTFT of the chosen instance)``.

Shapes: all scalars (``n, p, dram_blocks`` ints with ``0 ≤ p < n``; times in seconds).

The grader replays small synthetic traces through ``nanokimi.sim.Simulator`` with your policy and, at every
arrival, compares your estimates and your choice with the chapter's ``LocalCacheAwarePolicy`` on the same cluster
state; it names the first request where they differ.

Hints. ``cluster.block_tokens`` is P. ``inst.queue_time(now)`` already adds the running prefill's rest and the
queued work. A prompt whose blocks are *all* cached must still compute its last token (``p = n − 1``), and a
partial last block cached in full must not push ``p`` past ``n``. Do not call ``CostModel.prefill_time``,
``prefill_compute``, ``load_time``, ``Cluster.prefill_seconds`` or ``Cluster.estimate_ttft``.
"""

from __future__ import annotations

from nanokimi.serving import least_loaded_decode
from nanokimi.sim import Cluster, CostModel, Instance, Policy, Request, Route


def prefill_time(cost: CostModel, n: int, p: int, dram_blocks: int, layerwise: bool = True) -> float:
    """``T_prefill``: the compute of tokens ``p..n−1`` overlapped (layer-wise) with loading the DRAM hits."""
    pairs = (n * (n + 1) - p * (p + 1)) / 2.0
    compute = cost.c0 + cost.c1 * (n - p) + cost.c2 * pairs
    block_bytes = cost.block_tokens * cost.kv_bytes_per_token + cost.state_bytes
    load = dram_blocks * block_bytes / cost.h2d_bw
    if not layerwise:
        return load + compute
    n_layers = cost.n_layers
    return max(load + compute / n_layers, load / n_layers + compute)  # the longer stage plus one layer of the other


def ttft_estimate(req: Request, inst: Instance, cluster: Cluster, now: float) -> float:
    """Queue time on ``inst`` plus the prefill of ``req`` given what ``inst``'s cache holds."""
    hit, dram = inst.match(req.hash_ids)
    p = min(hit * cluster.block_tokens, req.input_length - 1)
    return inst.queue_time(now) + prefill_time(inst.cost, req.input_length, p, dram, cluster.layerwise)


class CacheAwarePolicy(Policy):
    """Route to ``argmin_i queue_i + T_prefill(n, hit_i)``; decode on the least loaded decode instance."""

    name = "cache_aware_exercise"

    def __init__(self, tbt_slo: float = 0.1):
        self.tbt_slo = tbt_slo

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        """The prefill instance with the lowest TTFT estimate (ties: smaller queue, lower idx), the least loaded
        decode instance, and the chosen estimate as ``predicted_ttft``."""
        best = min(
            cluster.prefill_pool,
            key=lambda inst: (ttft_estimate(req, inst, cluster, now), inst.queue_time(now), inst.idx),
        )
        return Route(
            prefill=best,
            decode=least_loaded_decode(req, cluster, self.tbt_slo),
            predicted_ttft=ttft_estimate(req, best, cluster, now),
        )

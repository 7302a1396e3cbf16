"""Routing policies for the ``nanokimi.sim`` cluster: baselines, Mooncake's Conductor, overload control, PrfaaS.

Every policy answers one question per request — which prefill instance, which decode instance, what to pull,
or reject — from what the cluster exposes (cache matches, queue times, decode loads, the engine's estimates).

- ``RandomPolicy``, ``RoundRobinPolicy``: ignore load and cache.
- ``LeastLoadedPolicy`` ("load-balancing"): the prefill instance with the least queued work.
- ``LocalCacheAwarePolicy``: Algorithm 1 with each instance's *own* cache only,
  ``argmin_i  queue_i + T_prefill(n, local_hit_i)``.
- ``ConductorPolicy``: Mooncake's Algorithm 1 (FAST'25 §4.1). For each prefill instance ``i`` it also considers
  pulling the longest prefix in the cluster (held by instance ``b``) when ``best_len > threshold · local_len_i``::

      TTFT_i = min( queue_i + T_prefill(n, local_i),                           recompute locally
                    max(queue_i, T_pull(b → i)) + T_prefill(n, best) )          pull, then reuse

  and picks ``argmin_i TTFT_i``. Pulled blocks stay in the puller's cache, which is how hot prefixes get
  replicated (§4.2). Decode goes to the instance with the lowest load after adding the request.
- Overload (arXiv v1 §7), the ``rejection`` modes of ``ConductorPolicy``. All of them reject at arrival a
  request whose estimated TTFT breaks the TTFT SLO, and let the decode instance re-check its load when the KV
  arrives (a rejection there wastes the prefill). ``"decode"`` — that is all: the decode load is only checked
  after prefill (the baseline); ``"early"`` — also reject at arrival when the chosen decode instance is loaded
  *now*; ``"predicted"`` — as early, but the decode load is predicted for the moment prefill finishes:
  requests routed there whose prefill ends by then are added, requests that will by then have decoded for the
  observed mean decode time ``t_d`` or longer are removed (``predicted_decode_load`` has two other readings).
- ``PrfaaSPolicy``: Prefill-as-a-Service. A request whose uncached prompt exceeds ``threshold_tokens`` is
  prefilled in the remote cluster when its KV can cross the inter-cluster link within ``max_kv_delay`` seconds of
  the first token (bandwidth-aware) and the remote TTFT estimate beats the local one.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence

from nanokimi.checks import check_in
from nanokimi.sim import Cluster, Instance, Policy, Request, Route, TTFTEstimate

__all__ = [
    "RandomPolicy",
    "RoundRobinPolicy",
    "LeastLoadedPolicy",
    "LocalCacheAwarePolicy",
    "ConductorPolicy",
    "PrfaaSPolicy",
    "POLICIES",
    "make_policy",
    "least_loaded_decode",
    "predicted_decode_load",
]


def _check_slo(name: str, v: float) -> float:
    if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive finite number of seconds, got {v!r}")
    return float(v)


def least_loaded_decode(req: Request, cluster: Cluster, tbt_slo: float) -> Instance | None:
    """The decode instance whose load (requests waiting and in flight included) is lowest with ``req`` added.

    Returns None on a coupled cluster, where a request decodes where it was prefilled.
    """
    if cluster.coupled:
        return None
    need, ctx = cluster.decode_blocks(req), req.input_length + 1
    return min(cluster.decode_pool, key=lambda d: (d.decode_load(tbt_slo, 1, ctx, need), d.idx))


class RandomPolicy(Policy):
    """Prefill and decode instances drawn uniformly at random (seeded: same seed, same run)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def reset(self, cluster: Cluster) -> None:
        self.rng = random.Random(self.seed)

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        pre = self.rng.choice(cluster.prefill_pool)
        dec = None if cluster.coupled else self.rng.choice(cluster.decode_pool)
        return Route(prefill=pre, decode=dec)


class RoundRobinPolicy(Policy):
    """Prefill and decode instances in turn."""

    name = "round_robin"

    def reset(self, cluster: Cluster) -> None:
        self.turn = 0

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        self.turn += 1
        pre = cluster.prefill_pool[self.turn % len(cluster.prefill_pool)]
        dec = None if cluster.coupled else cluster.decode_pool[self.turn % len(cluster.decode_pool)]
        return Route(prefill=pre, decode=dec)


class LeastLoadedPolicy(Policy):
    """Load-balancing: the prefill instance with the least queued work, the least loaded decode instance."""

    name = "least_loaded"

    def __init__(self, tbt_slo: float = 0.1):
        self.tbt_slo = _check_slo("tbt_slo", tbt_slo)

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        pre = min(cluster.prefill_pool, key=lambda i: (i.queue_time(now), i.idx))
        return Route(prefill=pre, decode=least_loaded_decode(req, cluster, self.tbt_slo))


class LocalCacheAwarePolicy(Policy):
    """Algorithm 1 without remote prefixes: ``argmin_i queue_i + T_prefill(n, local_hit_i)``."""

    name = "local_cache_aware"

    def __init__(self, tbt_slo: float = 0.1):
        self.tbt_slo = _check_slo("tbt_slo", tbt_slo)

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        est = [(cluster.estimate_ttft(req, i, now), i) for i in cluster.prefill_pool]
        e, pre = min(est, key=lambda x: (x[0].ttft, x[0].queue, x[1].idx))
        return Route(prefill=pre, decode=least_loaded_decode(req, cluster, self.tbt_slo), predicted_ttft=e.ttft)


class ConductorPolicy(Policy):
    """Mooncake's Conductor (Algorithm 1) with remote-prefix pulls and optional SLO-based rejection.

    ``threshold``: a remote prefix is considered only when it is longer than ``threshold`` × the local one
    (FAST'25's ``kvcache_balancing_threshold``; the TTFT comparison then decides). ``rejection``: ``"none"``,
    ``"decode"``, ``"early"`` or ``"predicted"`` (module docstring). ``decode_seconds`` seeds ``t_d`` until the
    first requests finish decoding; afterwards the cluster's running mean is used.
    """

    name = "conductor"
    REJECTION = ("none", "decode", "early", "predicted")

    def __init__(
        self,
        ttft_slo: float = 30.0,
        tbt_slo: float = 0.1,
        threshold: float = 1.0,
        rejection: str = "none",
        decode_seconds: float = 10.0,
        departures: str = "age",
    ):
        self.ttft_slo = _check_slo("ttft_slo", ttft_slo)
        self.tbt_slo = _check_slo("tbt_slo", tbt_slo)
        if not (isinstance(threshold, int | float) and threshold >= 1.0):
            raise ValueError(f"threshold: expected a number >= 1, got {threshold!r}")
        self.threshold = float(threshold)
        self.rejection = check_in("rejection", rejection, self.REJECTION)
        self.decode_seconds = _check_slo("decode_seconds", decode_seconds)
        self.departures = check_in("departures", departures, DEPARTURES)
        if rejection != "none":
            self.name = f"conductor+{rejection}" + (f"({departures})" if rejection == "predicted" else "")

    def estimates(
        self, req: Request, cluster: Cluster, now: float
    ) -> list[tuple[Instance, TTFTEstimate, Instance | None]]:
        """Per prefill instance: the better of recomputing locally and pulling the longest remote prefix."""
        pool = cluster.prefill_pool
        hits = [i.match(req.hash_ids)[0] for i in pool]
        best_len = max(hits)
        holder = pool[hits.index(best_len)]
        out = []
        for inst, local_len in zip(pool, hits, strict=True):
            e = cluster.estimate_ttft(req, inst, now)
            source = None
            if best_len > self.threshold * local_len and holder is not inst:
                pulled = cluster.estimate_ttft(req, inst, now, pull_from=holder)
                if pulled.ttft < e.ttft:
                    e, source = pulled, holder
            out.append((inst, e, source))
        return out

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        inst, e, source = min(self.estimates(req, cluster, now), key=lambda x: (x[1].ttft, x[1].queue, x[0].idx))
        dec = least_loaded_decode(req, cluster, self.tbt_slo)
        route = Route(prefill=inst, decode=dec, pull_from=source, predicted_ttft=e.ttft)
        if self.rejection != "none" and e.ttft > self.ttft_slo:
            route.reject = "ttft"
        elif self.rejection in ("early", "predicted") and dec is not None:
            if self._decode_load(req, dec, cluster, now, now + e.ttft) > 1.0:
                route.reject = "tbt"
        return route

    def _decode_load(self, req: Request, dec: Instance, cluster: Cluster, now: float, t_done: float) -> float:
        need, ctx = cluster.decode_blocks(req), req.input_length + 1
        if self.rejection == "early":  # what the decode instance holds now (running and waiting)
            return dec.decode_load(self.tbt_slo, 1, ctx, need, inflight=False)
        t_d = cluster.mean_decode_s if cluster.n_decoded else self.decode_seconds
        return predicted_decode_load(dec, now, t_done, t_d, self.tbt_slo, 1, ctx, need, self.departures)

    def admit_decode(self, req: Request, inst: Instance, cluster: Cluster, now: float) -> bool:
        if self.rejection == "none":
            return True
        need, ctx = cluster.decode_blocks(req), req.input_length + 1
        return inst.decode_load(self.tbt_slo, 1, ctx, need, inflight=False) <= 1.0


DEPARTURES = ("age", "window", "rate")


def predicted_decode_load(
    dec: Instance,
    now: float,
    t_done: float,
    t_d: float,
    tbt_slo: float,
    extra_requests: int = 0,
    extra_context: int = 0,
    extra_kv: int = 0,
    departures: str = "age",
) -> float:
    """System-level prediction of a decode instance's load at ``t_done`` (arXiv v1 §7.3).

    Every request is assumed to decode for ``t_d`` seconds. Requests routed here whose prefill is expected to end
    by ``t_done`` are added (those already in transfer too). Which running requests will have left:

    - ``"age"`` (the paper's rule read literally): those that will have decoded ``t_d`` or longer by
      ``t_done`` — joined at or before ``t_done − t_d``. This also drops requests already past ``t_d`` now, which are
      still running and so evidently long: with varied output lengths it under-predicts the load.
    - ``"window"``: only those whose age crosses ``t_d`` during ``(now, t_done]``.
    - ``"rate"``: ``B · (t_done − now) / t_d`` of them, the departures of a steady population with constant
      ``t_d`` (Little's law).

    Context and KV of the survivors scale with their count.
    """
    jt = dec.join_times  # sorted
    if departures == "age":
        leaving = bisect_right(jt, t_done - t_d)
    elif departures == "window":
        leaving = bisect_right(jt, t_done - t_d) - bisect_right(jt, now - t_d)
    else:
        leaving = min(dec.B, dec.B * (t_done - now) / t_d)
    survivors = dec.B - leaving
    keep = survivors / dec.B if dec.B else 0.0
    arriving = [v for v in dec.inflight.values() if v[0] <= t_done]
    b = survivors + len(dec.waiting) + len(arriving) + extra_requests
    c = dec.C * keep + dec.waiting_c + sum(v[1] for v in arriving) + extra_context
    kv = dec.kv_used * keep + dec.waiting_kv + sum(v[2] for v in arriving) + extra_kv
    return max(dec.cost.decode_step(b, c) / tbt_slo, kv / dec.kv_capacity)


class PrfaaSPolicy(Policy):
    """Prefill-as-a-Service: offload long uncached prefills to a remote cluster when the link can carry the KV.

    ``threshold_tokens``: offload only prompts whose uncached part (after the best local hit) is longer.
    Bandwidth-aware: the decode instance needs the request's whole KV, which crosses the inter-cluster link
    layer by layer behind the remote prefill; the policy estimates how long after the first token it lands,
    ``kv_delay = max(0, backlog + T_x − T_prefill) + T_x / L`` with ``T_x = kv_bytes / link_bw``, and offloads only
    when ``kv_delay ≤ max_kv_delay`` and the remote TTFT estimate beats the local one. Local routing is
    cache-aware (``LocalCacheAwarePolicy``'s rule).
    """

    name = "prfaas"

    def __init__(self, threshold_tokens: int = 8192, max_kv_delay: float = 0.1, tbt_slo: float = 0.1):
        if isinstance(threshold_tokens, bool) or not isinstance(threshold_tokens, int) or threshold_tokens < 0:
            raise ValueError(f"threshold_tokens: expected an int >= 0, got {threshold_tokens!r}")
        self.threshold_tokens = threshold_tokens
        self.max_kv_delay = _check_slo("max_kv_delay", max_kv_delay)
        self.tbt_slo = _check_slo("tbt_slo", tbt_slo)

    @staticmethod
    def _best(req: Request, cluster: Cluster, pool: Sequence[Instance], now: float) -> tuple[TTFTEstimate, Instance]:
        est = [(cluster.estimate_ttft(req, i, now), i) for i in pool]
        return min(est, key=lambda x: (x[0].ttft, x[0].queue, x[1].idx))

    @staticmethod
    def kv_delay(req: Request, cluster: Cluster, inst: Instance, est: TTFTEstimate, now: float) -> float:
        """Seconds between the remote first token and the KV landing on the decode side (link estimate)."""
        link = cluster.remote_link
        t_x = inst.cost.kv_transfer_bytes(req.input_length) / link.bw
        backlog = max(0.0, link.free_at - now - est.queue)  # link work still queued when the prefill starts
        return max(0.0, backlog + t_x - est.prefill) + t_x / inst.cost.n_layers + link.latency

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        dec = least_loaded_decode(req, cluster, self.tbt_slo)
        local, pre = self._best(req, cluster, cluster.prefill_pool, now) if cluster.prefill_pool else (None, None)
        uncached = req.input_length - (min(local.hit_blocks * cluster.block_tokens, req.input_length) if local else 0)
        if cluster.remote_pool and (local is None or uncached > self.threshold_tokens):
            remote, rpre = self._best(req, cluster, cluster.remote_pool, now)
            fits = self.kv_delay(req, cluster, rpre, remote, now) <= self.max_kv_delay
            if local is None or (fits and remote.ttft < local.ttft):
                return Route(prefill=rpre, decode=dec, predicted_ttft=remote.ttft)
        return Route(prefill=pre, decode=dec, predicted_ttft=local.ttft)


POLICIES = ("random", "round_robin", "least_loaded", "local_cache_aware", "conductor", "prfaas")


def make_policy(
    name: str,
    seed: int = 0,
    ttft_slo: float = 30.0,
    tbt_slo: float = 0.1,
    rejection: str = "none",
    prfaas_threshold: int = 8192,
) -> Policy:
    """A policy by name (the CLI's ``--policy``)."""
    check_in("name", name, POLICIES)
    if name == "random":
        return RandomPolicy(seed)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_loaded":
        return LeastLoadedPolicy(tbt_slo)
    if name == "local_cache_aware":
        return LocalCacheAwarePolicy(tbt_slo)
    if name == "conductor":
        return ConductorPolicy(ttft_slo, tbt_slo, rejection=rejection)
    return PrfaaSPolicy(prfaas_threshold, tbt_slo=tbt_slo)

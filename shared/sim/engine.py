"""The discrete-event engine: a KVCache-centric serving cluster replaying a trace under a routing policy.

The cluster (``ClusterSpec``) is either *disaggregated* — prefill instances and decode instances, optionally
plus remote prefill instances behind a bandwidth-limited link (PrfaaS) — or *coupled*: instances that prefill and
decode on the same GPUs, as a non-disaggregated baseline. Every instance owns a ``TieredCache`` (GPU + DRAM pools
of prefix blocks, LRU) and a NIC; decode-capable instances also own a KV pool (in blocks) for running requests.

A request's life (FAST'25 §3.1), one event each:

1. ARRIVE: the policy routes it (prefill instance, decode instance, optional remote prefix to pull) or rejects it.
   A pull starts at once over both NICs; the request joins the prefill instance's FIFO queue.
2. PREFILL_START (when the instance is free and the pull has landed): pulled blocks enter DRAM; the instance's
   cache is matched; ``T_prefill`` (cost model: DRAM load overlapped with compute) is charged; the KV transfer to
   the decode instance is reserved on the links, streamed layer by layer behind the compute.
3. PREFILL_DONE: the first token exists (TTFT); the prompt's blocks enter the instance's cache.
4. DECODE_ARRIVE (the KV has landed): the policy may still reject (SLO re-check); otherwise the request waits for
   KV memory and a batch slot, then joins the running batch at the next step boundary (continuous batching).
5. DECODE_FINISH: decode runs in *epochs* of constant membership. Step ``k`` of an epoch lasts
   ``T_step(B, C + k·B)`` (every member adds one token per step), so the time after ``m`` steps is closed-form,
   ``T0 + m·a + g·m(m−1)/2`` with ``a = T_step(B, C)`` and ``g = d2·B``; only joins and leaves are events.

A coupled instance runs prefills first (vLLM-style): a prefill waits for the current decode step to end, decode
pauses while prefills run, and every request in the batch sees that pause as one long inter-token gap.

At the end every decode instance's step-end times are rebuilt from its epochs (vectorised), each request's
inter-token gaps are read off them (TBT), and request conservation is checked.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nanokimi.sim.cache import TieredCache
from nanokimi.sim.cost import MODEL_PRESETS, CostModel, GPUSpec, ModelSpec, gpu_preset, transfer_end
from nanokimi.sim.metrics import COMPLETED, REJECTED, RequestResult, check_conservation, summarize, tbt_from_gaps
from nanokimi.sim.requests import Request

__all__ = ["ClusterSpec", "Cluster", "Instance", "Link", "Route", "Policy", "Simulator", "SimResult", "TTFTEstimate"]

PREFILL, DECODE, COUPLED = "prefill", "decode", "coupled"
LOCAL, REMOTE = "local", "remote"
_ARRIVE, _PREFILL_START, _PREFILL_DONE, _DECODE_ARRIVE, _DECODE_FINISH = range(5)


@dataclass
class ClusterSpec:
    """A cluster to simulate. Capacities left as None are derived from the specs (see ``Cluster``)."""

    model: ModelSpec = field(default_factory=lambda: MODEL_PRESETS["dense-70b"])
    gpu: GPUSpec = field(default_factory=lambda: gpu_preset("h800"))
    n_prefill: int = 4
    n_decode: int = 4
    n_coupled: int = 0  # > 0: a coupled (non-disaggregated) cluster; n_prefill and n_decode must then be 0
    n_remote_prefill: int = 0  # PrfaaS: prefill instances in another cluster, behind remote_link_bw
    remote_gpu: GPUSpec | None = None  # defaults to ``gpu``
    remote_link_bw: float = 12.5e9  # bytes/s between the clusters (100 Gbps Ethernet, PrfaaS case study)
    remote_link_latency: float = 1e-3
    block_tokens: int = 512
    layerwise: bool = True  # stream KV loads/transfers layer by layer behind the compute
    prefill_gpu_cache_blocks: int | None = None  # default: the node's free HBM, in cache blocks
    dram_cache_blocks: int | None = None  # default: the node's DRAM pool, in cache blocks
    decode_kv_blocks: int | None = None  # default: the node's free HBM, in KV blocks
    coupled_cache_frac: float = 0.25  # share of a coupled node's free HBM kept for the prefix cache
    max_batch: int = 256
    cost: CostModel | None = None  # default: CostModel.from_specs(model, gpu); pass a calibrated one here
    remote_cost: CostModel | None = None

    def validate(self) -> None:
        for name in ("n_prefill", "n_decode", "n_coupled", "n_remote_prefill"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if self.n_coupled and (self.n_prefill or self.n_decode or self.n_remote_prefill):
            raise ValueError(
                f"n_coupled: a coupled cluster has no separate prefill/decode/remote instances, got n_coupled="
                f"{self.n_coupled} with n_prefill={self.n_prefill}, n_decode={self.n_decode}, "
                f"n_remote_prefill={self.n_remote_prefill}"
            )
        if not self.n_coupled and (self.n_prefill + self.n_remote_prefill < 1 or self.n_decode < 1):
            raise ValueError(
                f"n_prefill/n_decode: a disaggregated cluster needs >= 1 prefill and >= 1 decode instance, got "
                f"n_prefill={self.n_prefill}, n_remote_prefill={self.n_remote_prefill}, n_decode={self.n_decode}"
            )
        if self.model.kv_bytes_per_token <= 0:
            raise ValueError(f"model: expected kv_bytes_per_token > 0, got {self.model.kv_bytes_per_token}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {self.max_batch}")
        if not 0.0 <= self.coupled_cache_frac < 1.0:
            raise ValueError(f"coupled_cache_frac: expected a fraction in [0, 1), got {self.coupled_cache_frac}")
        if self.remote_link_bw <= 0:
            raise ValueError(f"remote_link_bw: expected > 0 bytes/s, got {self.remote_link_bw}")

    def describe(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("model", "gpu", "remote_gpu", "cost", "remote_cost")}
        d["model"], d["gpu"] = self.model.name, f"{self.gpu.n_gpus}x{self.gpu.name}"
        if self.n_remote_prefill:
            rg = self.remote_gpu or self.gpu
            d["remote_gpu"] = f"{rg.n_gpus}x{rg.name}"
        return d


class Link:
    """A FIFO link: a transfer starts when every link on its path is free and holds them until it ends."""

    __slots__ = ("name", "bw", "latency", "free_at", "busy_s")

    def __init__(self, name: str, bw: float, latency: float):
        self.name, self.bw, self.latency = name, bw, latency
        self.free_at = 0.0
        self.busy_s = 0.0


class Instance:
    """One serving instance. Read-only helpers (``match``, ``queue_time``, ``step_time``, …) are for policies."""

    __slots__ = (
        "idx",
        "name",
        "role",
        "site",
        "cost",
        "cache",
        "nic",
        "kv_capacity",
        "max_batch",
        # prefill side
        "queue",
        "queued_work",
        "busy",
        "busy_until",
        # decode side
        "B",
        "C",
        "S",
        "T0",
        "ep_a",
        "ep_g",
        "running",
        "join_times",
        "waiting",
        "waiting_c",
        "waiting_kv",
        "kv_used",
        "version",
        "paused",
        "inflight_n",
        "inflight_c",
        "inflight_kv",
        "inflight",
        "epochs",
    )

    def __init__(
        self,
        idx: int,
        name: str,
        role: str,
        site: str,
        cost: CostModel,
        cache: TieredCache,
        nic: Link,
        kv_capacity: int,
        max_batch: int,
    ):
        self.idx, self.name, self.role, self.site = idx, name, role, site
        self.cost, self.cache, self.nic = cost, cache, nic
        self.kv_capacity, self.max_batch = kv_capacity, max_batch
        self.queue: deque[int] = deque()
        self.queued_work = 0.0
        self.busy = False
        self.busy_until = 0.0
        self.B = self.C = self.S = 0
        self.T0 = self.ep_a = self.ep_g = 0.0
        self.running: list[tuple[int, int]] = []  # heap of (exclusive finish step, request position)
        self.join_times: list[float] = []  # sorted join times of running requests
        self.waiting: deque[int] = deque()
        self.waiting_c = self.waiting_kv = 0
        self.kv_used = 0
        self.version = 0
        self.paused = False
        self.inflight_n = self.inflight_c = self.inflight_kv = 0  # routed here, still in prefill or in transfer
        # request position → (expected prefill end, context tokens, KV blocks) of those requests
        self.inflight: dict[int, tuple[float, int, int]] = {}
        self.epochs: list[tuple[float, int, int, float, float]] = []  # (T0, first step, steps, a, g)

    def __repr__(self) -> str:
        return f"Instance({self.name}, {self.role}, {self.site})"

    # --- for policies -------------------------------------------------------------------------------------
    def match(self, keys: Sequence[int]) -> tuple[int, int]:
        """``(hit_blocks, dram_blocks)`` of a prompt's block keys in this instance's cache (see TieredCache)."""
        return self.cache.match(keys)

    def queue_time(self, now: float) -> float:
        """Predicted seconds until a newly queued prefill would start: the running job's rest plus the queue."""
        return max(0.0, self.busy_until - now) + self.queued_work if self.busy else self.queued_work

    @property
    def batch_size(self) -> int:
        return self.B

    @property
    def kv_free(self) -> int:
        """KV blocks neither used nor promised to requests waiting here or routed here."""
        return self.kv_capacity - self.kv_used - self.waiting_kv - self.inflight_kv

    def step_time(
        self, extra_requests: int = 0, extra_context: int = 0, waiting: bool = True, inflight: bool = True
    ) -> float:
        """Predicted decode step time with ``extra_requests`` more requests of ``extra_context`` tokens in all.

        ``waiting`` counts the requests queued here for KV memory or a batch slot as joined; ``inflight`` also
        counts those routed here that are still in prefill or in transfer.
        """
        b, c = self.B + extra_requests, self.C + extra_context
        if waiting:
            b += len(self.waiting)
            c += self.waiting_c
        if inflight:
            b += self.inflight_n
            c += self.inflight_c
        return self.cost.decode_step(b, c)

    def decode_load(
        self,
        tbt_slo: float,
        extra_requests: int = 0,
        extra_context: int = 0,
        extra_kv: int = 0,
        waiting: bool = True,
        inflight: bool = True,
    ) -> float:
        """Load against the SLO: ``max(T_step / TBT_SLO, KV blocks held / KV capacity)``; above 1 is overloaded.

        ``waiting`` and ``inflight`` as in ``step_time``.
        """
        kv = self.kv_used + extra_kv + (self.waiting_kv if waiting else 0) + (self.inflight_kv if inflight else 0)
        step = self.step_time(extra_requests, extra_context, waiting, inflight)
        return max(step / tbt_slo, kv / self.kv_capacity)


@dataclass(slots=True)
class Route:
    """A policy's decision for one request: where to prefill and decode, what to pull, or why to reject."""

    prefill: Instance | None = None
    decode: Instance | None = None  # None on a coupled cluster (decode where prefilled)
    pull_from: Instance | None = None  # copy the leading blocks this instance holds beyond the prefill's own
    reject: str | None = None  # a reason: the request is rejected at arrival (HTTP 429)
    predicted_ttft: float = math.nan


@dataclass(slots=True)
class TTFTEstimate:
    """``ttft = max(queue, pull) + prefill`` (the pull runs while the request waits in the queue)."""

    ttft: float
    queue: float
    pull: float
    prefill: float
    hit_blocks: int
    pulled_blocks: int


class Cluster:
    """The instances and links of one run, plus the estimates policies use (same formulas as the engine)."""

    def __init__(self, spec: ClusterSpec):
        spec.validate()
        self.spec = spec
        self.block_tokens = spec.block_tokens
        self.layerwise = spec.layerwise
        cost = spec.cost or CostModel.from_specs(spec.model, spec.gpu, spec.block_tokens)
        rgpu = spec.remote_gpu or spec.gpu
        rcost = spec.remote_cost or CostModel.from_specs(spec.model, rgpu, spec.block_tokens)
        for name, c in (("cost", cost), ("remote_cost", rcost)):
            if c.block_tokens != spec.block_tokens:
                raise ValueError(f"{name}: block_tokens {c.block_tokens} != the cluster's {spec.block_tokens}")
        self.cost = cost
        self.instances: list[Instance] = []
        self.prefill_pool: list[Instance] = []  # local instances that prefill (prefill or coupled)
        self.decode_pool: list[Instance] = []  # instances that decode (decode or coupled)
        self.remote_pool: list[Instance] = []
        self.remote_link = Link("remote", spec.remote_link_bw, spec.remote_link_latency)
        self.mean_decode_s = 0.0  # running mean of finished requests' decode durations (system-level statistic)
        self.n_decoded = 0
        self.pulled_blocks = 0
        if spec.n_coupled:
            for i in range(spec.n_coupled):
                inst = self._make(f"C{i}", COUPLED, LOCAL, spec.gpu, cost, spec.coupled_cache_frac)
                self.prefill_pool.append(inst)
                self.decode_pool.append(inst)
        else:
            for i in range(spec.n_prefill):
                self.prefill_pool.append(self._make(f"P{i}", PREFILL, LOCAL, spec.gpu, cost, 1.0))
            for i in range(spec.n_decode):
                self.decode_pool.append(self._make(f"D{i}", DECODE, LOCAL, spec.gpu, cost, 0.0))
            for i in range(spec.n_remote_prefill):
                self.remote_pool.append(self._make(f"R{i}", PREFILL, REMOTE, rgpu, rcost, 1.0))
        self.coupled = bool(spec.n_coupled)

    def _make(self, name: str, role: str, site: str, gpu: GPUSpec, cost: CostModel, cache_frac: float) -> Instance:
        spec = self.spec
        budget = gpu.kv_budget_bytes(spec.model)
        gpu_blocks = spec.prefill_gpu_cache_blocks
        if gpu_blocks is None:
            gpu_blocks = int(budget * cache_frac / cost.block_bytes)
        dram_blocks = spec.dram_cache_blocks
        if dram_blocks is None:
            dram_blocks = int(gpu.dram_bytes / cost.block_bytes)
        kv_blocks = spec.decode_kv_blocks
        if kv_blocks is None:
            kv_blocks = int(budget * (1.0 - cache_frac) / (spec.block_tokens * cost.kv_bytes_per_token))
        if role == PREFILL:
            kv_blocks = 0
        elif kv_blocks < 1:
            raise ValueError(f"decode_kv_blocks: instance {name} would hold no KV block; give it more HBM")
        elif role == DECODE:
            gpu_blocks = dram_blocks = 0  # decode instances keep no prefix cache here
        nic = Link(f"{name}.nic", gpu.nic_bw, gpu.nic_latency)
        inst = Instance(
            len(self.instances),
            name,
            role,
            site,
            cost,
            TieredCache(gpu_blocks, dram_blocks),
            nic,
            kv_blocks,
            spec.max_batch,
        )
        self.instances.append(inst)
        return inst

    # --- estimates shared by the engine and the policies --------------------------------------------------
    def decode_blocks(self, req: Request) -> int:
        """KV blocks a request holds while decoding: its whole context plus its recurrent state."""
        bt = self.block_tokens
        kv_block = bt * self.cost.kv_bytes_per_token
        return -(-(req.input_length + req.output_length) // bt) + math.ceil(self.cost.state_bytes / kv_block)

    def prefill_seconds(self, req: Request, inst: Instance, hit_blocks: int, dram_blocks: int) -> float:
        """``T_prefill`` of ``req`` on ``inst`` given its cache hit (at least one token is always computed)."""
        n = req.input_length
        p = min(hit_blocks * self.block_tokens, n - 1)
        return inst.cost.prefill_time(n, p, dram_blocks, self.layerwise)

    def path(self, a: Instance, b: Instance) -> list[Link]:
        links = [a.nic, b.nic]
        if a.site != b.site:
            links.insert(1, self.remote_link)
        return links

    def pull_seconds(self, src: Instance, dst: Instance, n_blocks: int, now: float) -> float:
        """Seconds from ``now`` until ``n_blocks`` cached blocks copied ``src`` → ``dst`` have landed."""
        if n_blocks <= 0:
            return 0.0
        links = self.path(src, dst)
        start = max([now] + [ln.free_at for ln in links])
        nbytes = n_blocks * src.cost.block_bytes
        return start - now + nbytes / min(ln.bw for ln in links) + max(ln.latency for ln in links)

    def estimate_ttft(
        self, req: Request, inst: Instance, now: float, pull_from: Instance | None = None
    ) -> TTFTEstimate:
        """Algorithm 1's estimate for ``req`` on ``inst``: queue, optional remote-prefix pull, then prefill."""
        hit, in_dram = inst.cache.match(req.hash_ids)
        pulled, pull = 0, 0.0
        if pull_from is not None and pull_from is not inst:
            src_hit = pull_from.cache.match(req.hash_ids)[0]
            if src_hit > hit:
                pulled = src_hit - hit
                pull = self.pull_seconds(pull_from, inst, pulled, now)
        queue = inst.queue_time(now)
        prefill = self.prefill_seconds(req, inst, hit + pulled, in_dram + pulled)
        return TTFTEstimate(max(queue, pull) + prefill, queue, pull, prefill, hit + pulled, pulled)


class Policy:
    """A routing policy. Subclasses implement ``route``; ``admit_decode`` may re-check SLOs after prefill."""

    name = "policy"

    def reset(self, cluster: Cluster) -> None:
        """Called once before a run (re-seed random state here, so runs are repeatable)."""

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        raise NotImplementedError

    def admit_decode(self, req: Request, inst: Instance, cluster: Cluster, now: float) -> bool:
        """Whether a request whose KV has just reached ``inst`` may decode there (False: rejected, prefill wasted)."""
        return True


@dataclass
class SimResult:
    """Outcomes of a run: one RequestResult per request (arrival order), the summary, and load samples."""

    results: list[RequestResult]
    summary: dict
    samples: dict[str, list[float]]
    config: dict
    wall_s: float

    def to_json(self, path: str | Path | None = None, include_requests: bool = False) -> dict:
        data = {"config": self.config, "summary": self.summary, "wall_s": self.wall_s, "samples": self.samples}
        if include_requests:
            data["requests"] = [r.as_dict() for r in self.results]
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
            tmp.replace(path)
        return data


class Simulator:
    """Replays requests through a ``ClusterSpec`` under a ``Policy``; see the module docstring for the events."""

    def __init__(
        self, spec: ClusterSpec, policy: Policy, ttft_slo: float = 30.0, tbt_slo: float = 0.1, sample_every: float = 1.0
    ):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy: expected a nanokimi.sim.Policy, got {type(policy).__name__}")
        for name, v in (("ttft_slo", ttft_slo), ("tbt_slo", tbt_slo), ("sample_every", sample_every)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a positive finite number of seconds, got {v!r}")
        spec.validate()
        self.spec, self.policy = spec, policy
        self.ttft_slo, self.tbt_slo, self.sample_every = float(ttft_slo), float(tbt_slo), float(sample_every)

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> SimResult:
        """Simulate every request to its end; returns outcomes, the summary and load samples over time."""
        t_wall = time.perf_counter()
        if not requests:
            raise ValueError("requests: expected at least one request, got an empty sequence")
        reqs = sorted(requests, key=lambda r: r.arrival)
        bt = self.spec.block_tokens
        for r in reqs:
            if not isinstance(r, Request):
                raise TypeError(f"requests: expected nanokimi.sim.Request items, got {type(r).__name__}")
            if len(r.hash_ids) != -(-r.input_length // bt) or r.input_length < 1 or r.output_length < 1:
                raise ValueError(
                    f"requests: request {r.req_id} has input_length {r.input_length}, output_length "
                    f"{r.output_length} and {len(r.hash_ids)} block ids; expected lengths >= 1 and "
                    f"ceil(input_length / {bt}) block ids"
                )
        self.reqs = reqs
        self.cluster = cluster = Cluster(self.spec)
        self.policy.reset(cluster)
        n = len(reqs)
        self.status = [0] * n  # 0 running, 1 completed, 2 rejected
        self.stage: list[str | None] = [None] * n
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.join_step = [-1] * n
        self.join_time = [math.nan] * n
        self.pre_inst = [-1] * n
        self.dec_inst = [-1] * n
        self.route_dec: list[Instance | None] = [None] * n
        self.hit_blocks = [0] * n
        self.pre_s = [0.0] * n
        self.pred = [math.nan] * n
        self.pull_keys: list[tuple[int, ...]] = [()] * n
        self.pull_done = [0.0] * n
        self.job_pred = [0.0] * n
        self.dec_arrive = [0.0] * n
        self.need = [cluster.decode_blocks(r) for r in reqs]
        self.heap: list[tuple] = []
        self.seq = 0
        samples: dict[str, list[float]] = {"t": [], "prefill_load": [], "decode_load": [], "rejected": []}
        self.n_rejected = 0
        next_sample = reqs[0].arrival
        heap = self.heap
        i_arr = 0
        while True:
            if i_arr < n and (not heap or reqs[i_arr].arrival <= heap[0][0]):
                now = reqs[i_arr].arrival
                event = None
            elif heap:
                event = heapq.heappop(heap)
                now = event[0]
            else:
                break
            while next_sample <= now:
                self._sample(samples, next_sample)
                next_sample += self.sample_every
            if event is None:
                self._arrive(i_arr, now)
                i_arr += 1
                continue
            _, _, kind, inst_idx, r, ver = event
            inst = cluster.instances[inst_idx]
            if kind == _PREFILL_START:
                self._prefill_start(inst, r, now)
            elif kind == _PREFILL_DONE:
                self._prefill_done(inst, r, now)
            elif kind == _DECODE_ARRIVE:
                self._decode_arrive(inst, r, now)
            elif ver == inst.version:  # _DECODE_FINISH, unless superseded by a later membership change
                self._commit(inst, inst.running[0][0] - inst.S)
                self._admit(inst)
                self._restart(inst)
        results = self._results()
        check_conservation(results, n)
        summary = summarize(results, self.ttft_slo, self.tbt_slo)
        summary["pulled_blocks"] = cluster.pulled_blocks
        config = {
            "policy": getattr(self.policy, "name", type(self.policy).__name__),
            **self.spec.describe(),
            "ttft_slo": self.ttft_slo,
            "tbt_slo": self.tbt_slo,
        }
        for inst in cluster.instances:
            if inst.queue or inst.busy or inst.B or inst.waiting:
                raise AssertionError(f"conservation: {inst.name} still holds work after the last event")
        return SimResult(results, summary, samples, config, time.perf_counter() - t_wall)

    # --- events -------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, inst: Instance, r: int, ver: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, inst.idx, r, ver))

    def _end(self, r: int, status: int, stage: str | None = None) -> None:
        if self.status[r] != 0:
            raise AssertionError(f"conservation: request {self.reqs[r].req_id} ended twice")
        self.status[r] = status
        self.stage[r] = stage
        if status == 2:
            self.n_rejected += 1

    def _check_route(self, route: Route, req: Request) -> None:
        c = self.cluster
        who = type(self.policy).__name__
        if not isinstance(route, Route):
            raise TypeError(f"{who}.route: expected a Route, got {type(route).__name__}")
        if route.reject is not None:
            return
        if route.prefill not in c.prefill_pool and route.prefill not in c.remote_pool:
            raise ValueError(
                f"{who}.route: request {req.req_id}: prefill must be a prefill instance, got {route.prefill!r}"
            )
        if c.coupled:
            if route.decode not in (None, route.prefill):
                raise ValueError(f"{who}.route: request {req.req_id}: a coupled cluster decodes where it prefills")
        elif route.decode not in c.decode_pool:
            raise ValueError(
                f"{who}.route: request {req.req_id}: decode must be a decode instance, got {route.decode!r}"
            )
        if route.pull_from is not None and (
            route.pull_from not in c.prefill_pool + c.remote_pool or route.pull_from.site != route.prefill.site
        ):
            raise ValueError(
                f"{who}.route: request {req.req_id}: pull_from must be a prefill instance of the same site"
            )

    def _arrive(self, r: int, now: float) -> None:
        req, c = self.reqs[r], self.cluster
        route = self.policy.route(req, c, now)
        self._check_route(route, req)
        self.pred[r] = route.predicted_ttft
        if route.reject is not None:
            self._end(r, 2, "arrival")
            return
        inst = route.prefill
        dec = None if c.coupled else route.decode
        self.route_dec[r] = dec
        hit, in_dram = inst.cache.match(req.hash_ids)
        pulled = 0
        if route.pull_from is not None and route.pull_from is not inst:
            src = route.pull_from
            src_hit = src.cache.match(req.hash_ids)[0]
            if src_hit > hit:
                pulled = src_hit - hit
                self.pull_keys[r] = req.hash_ids[hit:src_hit]
                self.pull_done[r] = self._reserve(c.path(src, inst), now, pulled * src.cost.block_bytes)
                c.pulled_blocks += pulled
        if not self.pull_keys[r]:
            self.pull_done[r] = now
        self.job_pred[r] = c.prefill_seconds(req, inst, hit + pulled, in_dram + pulled)
        inst.queue.append(r)
        inst.queued_work += self.job_pred[r]
        if dec is not None:
            dec.inflight_n += 1
            dec.inflight_c += req.input_length + 1
            dec.inflight_kv += self.need[r]
            expected = route.predicted_ttft if math.isfinite(route.predicted_ttft) else 0.0
            dec.inflight[r] = (now + expected, req.input_length + 1, self.need[r])
        if not inst.busy:
            self._start_next(inst, now)

    def _start_next(self, inst: Instance, now: float) -> None:
        if not inst.queue:
            inst.queued_work = 0.0  # drop float drift
            if inst.role == COUPLED and inst.paused:
                self._resume(inst, now)
            return
        start = now
        if inst.role == COUPLED:
            start = self._pause(inst, now)
        r = inst.queue.popleft()
        inst.queued_work -= self.job_pred[r]
        inst.busy = True
        t = max(start, self.pull_done[r])
        inst.busy_until = t + self.job_pred[r]
        self._push(t, _PREFILL_START, inst, r)

    def _prefill_start(self, inst: Instance, r: int, now: float) -> None:
        req, c = self.reqs[r], self.cluster
        if self.pull_keys[r]:
            inst.cache.insert_dram(self.pull_keys[r])
        hit, in_dram = inst.cache.match(req.hash_ids)
        seconds = c.prefill_seconds(req, inst, hit, in_dram)
        self.hit_blocks[r] = hit
        self.pre_s[r] = seconds
        self.pre_inst[r] = inst.idx
        inst.cache.insert(req.hash_ids[:hit])  # in use now: most recent, and promoted out of DRAM
        inst.busy_until = now + seconds
        dec = self.route_dec[r]
        if dec is not None and req.output_length > 1:
            links = c.path(inst, dec)
            nbytes = inst.cost.kv_transfer_bytes(req.input_length)
            self.dec_arrive[r] = self._stream(links, now, seconds, nbytes, inst.cost.n_layers)
        self._push(now + seconds, _PREFILL_DONE, inst, r)

    def _prefill_done(self, inst: Instance, r: int, now: float) -> None:
        req = self.reqs[r]
        self.first[r] = now
        inst.cache.insert(req.hash_ids)
        inst.busy = False
        dec = self.route_dec[r]
        if req.output_length == 1:
            if dec is not None:
                self._leave_inflight(dec, r)
            self.finish[r] = now
            self._end(r, 1)
        elif inst.role == COUPLED:
            if self.need[r] > inst.kv_capacity:
                self._end(r, 2, "kv_capacity")
            else:
                self._enqueue_decode(inst, r)
        else:
            self._push(self.dec_arrive[r], _DECODE_ARRIVE, dec, r)
        self._start_next(inst, now)

    def _leave_inflight(self, dec: Instance, r: int) -> None:
        dec.inflight_n -= 1
        dec.inflight_c -= self.reqs[r].input_length + 1
        dec.inflight_kv -= self.need[r]
        del dec.inflight[r]

    def _enqueue_decode(self, inst: Instance, r: int) -> None:
        inst.waiting.append(r)
        inst.waiting_c += self.reqs[r].input_length + 1
        inst.waiting_kv += self.need[r]

    def _decode_arrive(self, inst: Instance, r: int, now: float) -> None:
        req = self.reqs[r]
        self._leave_inflight(inst, r)
        if not self.policy.admit_decode(req, inst, self.cluster, now):
            self._end(r, 2, "decode")
            return
        if self.need[r] > inst.kv_capacity:
            self._end(r, 2, "kv_capacity")
            return
        self._enqueue_decode(inst, r)
        if inst.B > 0:
            self._commit(inst, self._steps_until(inst, now))  # join at the next step boundary
        else:
            inst.T0 = max(inst.T0, now)
        self._admit(inst)
        self._restart(inst)

    # --- links --------------------------------------------------------------------------------------------
    def _reserve(self, links: list[Link], now: float, nbytes: float) -> float:
        seconds = nbytes / min(ln.bw for ln in links)
        end = max([now] + [ln.free_at for ln in links]) + seconds
        for ln in links:
            ln.free_at = end
            ln.busy_s += seconds
        return end + max(ln.latency for ln in links)

    def _stream(self, links: list[Link], ready: float, compute: float, nbytes: float, n_layers: int) -> float:
        seconds = nbytes / min(ln.bw for ln in links)
        free = max(ln.free_at for ln in links)
        end, free_after = transfer_end(ready, compute, seconds, free, n_layers, self.cluster.layerwise)
        for ln in links:
            ln.free_at = max(ln.free_at, free_after)
            ln.busy_s += seconds
        return end + max(ln.latency for ln in links)

    # --- decode epochs ------------------------------------------------------------------------------------
    @staticmethod
    def _epoch_time(inst: Instance, m: int) -> float:
        return inst.T0 + inst.ep_a * m + inst.ep_g * m * (m - 1) / 2.0

    def _steps_until(self, inst: Instance, t: float) -> int:
        """Smallest number of steps after which the running epoch has reached time ``t`` (a step boundary ≥ t)."""
        dt = t - inst.T0
        if dt <= 0 or inst.B == 0:
            return 0
        a, g = inst.ep_a, inst.ep_g
        if g == 0.0:
            m = math.ceil(dt / a)
        else:
            half = a - g / 2.0
            m = math.ceil((-half + math.sqrt(half * half + 2.0 * g * dt)) / g)
        while self._epoch_time(inst, m) < t:
            m += 1
        while m > 0 and self._epoch_time(inst, m - 1) >= t:
            m -= 1
        return min(m, inst.running[0][0] - inst.S)

    def _commit(self, inst: Instance, m: int) -> None:
        """Run ``m`` steps of the current epoch, then retire the requests that just produced their last token."""
        if m > 0:
            inst.epochs.append((inst.T0, inst.S, m, inst.ep_a, inst.ep_g))
            inst.T0 = self._epoch_time(inst, m)
            inst.S += m
            inst.C += m * inst.B
        running, reqs, c = inst.running, self.reqs, self.cluster
        while running and running[0][0] <= inst.S:
            _, r = heapq.heappop(running)
            req = reqs[r]
            inst.B -= 1
            inst.C -= req.input_length + req.output_length
            inst.kv_used -= self.need[r]
            del inst.join_times[bisect_left(inst.join_times, self.join_time[r])]
            self.finish[r] = inst.T0
            c.n_decoded += 1
            c.mean_decode_s += (inst.T0 - self.join_time[r] - c.mean_decode_s) / c.n_decoded
            self._end(r, 1)

    def _admit(self, inst: Instance) -> None:
        """Move waiting requests into the batch (FIFO) while a slot and their KV blocks are free."""
        reqs = self.reqs
        while inst.waiting and inst.B < inst.max_batch:
            r = inst.waiting[0]
            need = self.need[r]
            if inst.kv_used + need > inst.kv_capacity:
                break
            inst.waiting.popleft()
            req = reqs[r]
            inst.waiting_c -= req.input_length + 1
            inst.waiting_kv -= need
            self.join_step[r] = inst.S
            self.join_time[r] = inst.T0
            self.dec_inst[r] = inst.idx
            inst.join_times.append(inst.T0)
            inst.B += 1
            inst.C += req.input_length + 1
            inst.kv_used += need
            heapq.heappush(inst.running, (inst.S + req.output_length - 1, r))

    def _restart(self, inst: Instance) -> None:
        """Start a new epoch with the current membership and schedule its first retirement."""
        inst.version += 1
        if inst.B == 0 or inst.paused:
            return
        inst.ep_a = inst.cost.decode_step(inst.B, inst.C)
        inst.ep_g = inst.cost.d2 * inst.B
        m = inst.running[0][0] - inst.S
        self._push(self._epoch_time(inst, m), _DECODE_FINISH, inst, -1, inst.version)

    def _pause(self, inst: Instance, now: float) -> float:
        """Coupled instance: stop decoding at the next step boundary; returns when the GPU is free for prefill."""
        if not inst.paused:
            if inst.B > 0:
                self._commit(inst, self._steps_until(inst, now))
            inst.paused = True
            inst.version += 1
        return max(now, inst.T0)

    def _resume(self, inst: Instance, now: float) -> None:
        inst.paused = False
        inst.T0 = max(inst.T0, now)
        self._admit(inst)
        self._restart(inst)

    # --- samples and results ------------------------------------------------------------------------------
    def _sample(self, samples: dict[str, list[float]], t: float) -> None:
        c = self.cluster
        pre = c.prefill_pool + c.remote_pool
        samples["t"].append(t)
        samples["prefill_load"].append(sum(i.queue_time(t) for i in pre) / len(pre) / self.ttft_slo)
        dec = c.decode_pool
        samples["decode_load"].append(
            sum(i.decode_load(self.tbt_slo, waiting=False, inflight=False) for i in dec) / len(dec)
        )
        samples["rejected"].append(self.n_rejected)

    def _step_ends(self, inst: Instance) -> np.ndarray:
        """End time of every decode step the instance ran, rebuilt from its epochs."""
        if not inst.epochs:
            return np.zeros(0)
        ep = np.array(inst.epochs, dtype=np.float64)  # [E, 5]: T0, first step, steps, a, g
        t0, s0, m, a, g = ep.T
        m = m.astype(np.int64)
        which = np.repeat(np.arange(len(ep)), m)  # epochs cover steps 0, 1, 2, … contiguously
        k = np.arange(int(m.sum())) - np.repeat(s0.astype(np.int64), m)  # step index inside its epoch
        k1 = k + 1.0
        return t0[which] + a[which] * k1 + g[which] * k1 * k / 2.0

    def _results(self) -> list[RequestResult]:
        c, reqs, bt = self.cluster, self.reqs, self.spec.block_tokens
        ends = {inst.idx: self._step_ends(inst) for inst in c.decode_pool}
        out: list[RequestResult] = []
        remote = {inst.idx for inst in c.remote_pool}
        for r, req in enumerate(reqs):
            status = self.status[r]
            res = RequestResult(
                req_id=req.req_id,
                arrival=req.arrival,
                input_length=req.input_length,
                output_length=req.output_length,
                status=COMPLETED if status == 1 else (REJECTED if status == 2 else "running"),
                reject_stage=self.stage[r],
                first_token=self.first[r],
                finish=self.finish[r] if status == 1 else math.nan,
                prefill_instance=self.pre_inst[r],
                decode_instance=self.dec_inst[r],
                hit_blocks=self.hit_blocks[r],
                hit_tokens=min(self.hit_blocks[r] * bt, req.input_length),
                n_blocks=len(req.hash_ids),
                prefill_seconds=self.pre_s[r],
                predicted_ttft=self.pred[r],
                offloaded=self.pre_inst[r] in remote,
            )
            if status == 1:
                if req.output_length == 1:
                    res.tbt = 0.0
                else:
                    e = ends[self.dec_inst[r]]
                    j = self.join_step[r]
                    steps = e[j : j + req.output_length - 1]
                    gaps = np.empty(steps.size)
                    gaps[0] = steps[0] - self.first[r]
                    gaps[1:] = np.diff(steps)
                    res.tbt = tbt_from_gaps(gaps)
            out.append(res)
        return out

"""A discrete-event simulator of one synchronous RL rollout step, after Seer (arXiv 2511.14617 §3).

G problems × k responses ("groups") are decoded on M inference instances. Response r of group g needs L_gr decode
steps. An instance runs at most ``max_batch`` requests at once (continuous batching: requests join and leave at
step boundaries) and one decode step over B requests holding K tokens of KV cache takes

    step(B, K) = step_time + kv_time · K          (decode is memory-bound: weights + KV are read once per step)

so a step grows by kv_time·B as the batch's contexts grow. The rollout step ends when the last response does
(its *makespan*); the *tail* is the time from the 90th-percentile finish to the last one.

Policies (what runs where and in which order):

* ``static``   group-level static assignment (veRL-like): group g goes whole to instance g mod M and every request
               runs to completion there, first come first served.
* ``divided``  divided rollout: requests are cut into chunks of ``chunk_size`` tokens; a chunk that ends sends its
               request back to one global queue (KV lives in a global pool, so moving costs nothing) and every
               chunk is placed on the least-loaded instance (least KV held, then fewest requests) with a free
               slot. Queue order: started requests first, then fresh ones in arrival order.
* ``context``  context-aware scheduling (Seer Alg. 2) on top of divided rollout: one probe request per group in a
               high-priority queue served shortest-generated-first; the others ordered by the group's length
               estimate L̂_g = the longest finished sibling (unknown, i.e. longest, while none has finished),
               longest first.
* ``oracle``   divided rollout served longest-remaining-first with the true lengths (a bound, not a policy).

Every response is generated exactly once, to its full length (``simulate`` checks it). Left out: preemption under
KV-capacity limits, prefill time, speculative decoding, and the starvation guard of Seer's scheduler.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["POLICIES", "LengthModel", "ClusterConfig", "RolloutResult", "simulate", "compare_policies", "plot_gantt"]

POLICIES = ("static", "divided", "context", "oracle")


def _as_lengths(name: str, lengths: object) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [G, k] array of response lengths, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite numbers, got dtype {arr.dtype}")
    if np.any(arr < 1) or np.any(arr != np.round(arr)):
        raise ValueError(f"{name}: expected integer lengths >= 1 (tokens), got min {arr.min()!r}")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class LengthModel:
    """Group-correlated log-normal response lengths, clipped to [1, max_len]:

    log L_gj = log(median) + sigma_group · ε_g + sigma_within · ε_gj,   ε ~ N(0, 1).

    Siblings (same prompt) share ε_g, which is what lets a scheduler learn a group's length from one finished
    response. ``sigma_group² + sigma_within²`` is the variance of log-length; larger sigmas give heavier tails.
    """

    median: float
    sigma_group: float
    sigma_within: float
    max_len: int

    def __post_init__(self):
        if not (np.isfinite(self.median) and self.median >= 1):
            raise ValueError(f"median: expected a finite length >= 1, got {self.median!r}")
        for name in ("sigma_group", "sigma_within"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int | np.integer) or self.max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {self.max_len!r}")

    def sample(self, n_groups: int, group_size: int, seed: int = 0) -> np.ndarray:
        """[n_groups, group_size] int64 lengths."""
        for name, value in (("n_groups", n_groups), ("group_size", group_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        rng = np.random.default_rng(seed)
        log_len = (
            np.log(self.median)
            + self.sigma_group * rng.standard_normal((n_groups, 1))
            + self.sigma_within * rng.standard_normal((n_groups, group_size))
        )
        return np.clip(np.rint(np.exp(log_len)), 1, self.max_len).astype(np.int64)

    @classmethod
    def fit(cls, observed: object, max_len: int | None = None, group_share: float = 0.5) -> LengthModel:
        """Fit to observed lengths: a [G, k] array (groups of siblings) or a flat list.

        Grouped: a one-way ANOVA on log-lengths, sigma_within² = mean within-group variance and
        sigma_group² = max(0, var(group means) − sigma_within²/k). Flat: the groups are unknown, so the
        log-variance is split with ``group_share`` going to sigma_group. ``max_len`` defaults to the longest seen.
        """
        arr = np.asarray(observed, dtype=np.float64)
        if arr.ndim not in (1, 2) or arr.size < 2:
            raise ValueError(
                f"observed: expected at least 2 lengths as a flat list or [G, k] array, got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)) or np.any(arr < 1):
            raise ValueError(f"observed: expected finite lengths >= 1, got min {np.nanmin(arr)!r}")
        if not 0.0 <= group_share <= 1.0:
            raise ValueError(f"group_share: expected a value in [0, 1], got {group_share!r}")
        logs = np.log(arr)
        if arr.ndim == 2:
            n_groups, k = arr.shape
            if k < 2 or n_groups < 2:
                raise ValueError(
                    f"observed: a [G, k] array needs G >= 2 and k >= 2 to separate the variances, got {arr.shape}"
                )
            var_within = float(logs.var(axis=1, ddof=1).mean())
            var_group = max(0.0, float(logs.mean(axis=1).var(ddof=1)) - var_within / k)
        else:
            total = float(logs.var(ddof=1))
            var_group, var_within = group_share * total, (1.0 - group_share) * total
        top = int(arr.max()) if max_len is None else max_len
        return cls(float(np.exp(logs.mean())), float(np.sqrt(var_group)), float(np.sqrt(var_within)), top)


@dataclass(frozen=True)
class ClusterConfig:
    """The inference fleet: M instances of ``max_batch`` slots; decode-step cost model (time units are yours)."""

    n_instances: int = 8
    max_batch: int = 32
    chunk_size: int = 512
    step_time: float = 1.0
    kv_time: float = 0.0
    prompt_len: int = 0

    def __post_init__(self):
        for name in ("n_instances", "max_batch", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not (np.isfinite(self.step_time) and self.step_time > 0):
            raise ValueError(f"step_time: expected a finite value > 0, got {self.step_time!r}")
        if not (np.isfinite(self.kv_time) and self.kv_time >= 0):
            raise ValueError(f"kv_time: expected a finite value >= 0, got {self.kv_time!r}")
        if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int) or self.prompt_len < 0:
            raise ValueError(f"prompt_len: expected an int >= 0, got {self.prompt_len!r}")


@dataclass
class RolloutResult:
    """Outcome of one simulated rollout step. Times are in the units of ``ClusterConfig.step_time``."""

    policy: str
    makespan: float
    finish_time: np.ndarray  # [G, k]
    start_time: np.ndarray  # [G, k] first admission
    tail_time: float  # makespan − time by which 90% of the responses had finished
    throughput: float  # generated tokens per time unit
    busy_time: np.ndarray  # [M] time each instance held at least one request
    migrations: int  # chunks that resumed on a different instance than the one they left
    # One entry per chunk run: (instance, batch slot, request r = g·k + j, start, end, tokens generated).
    segments: list[tuple[int, int, int, float, float, int]] = field(repr=False)


class _Instance:
    def __init__(self, index: int, max_batch: int):
        self.index = index
        self.active: dict[int, int] = {}  # request → tokens left in its current chunk
        self.admitted: dict[int, tuple[float, int, int]] = {}  # request → (time, tokens generated by then, slot)
        self.free_slots = list(range(max_batch))  # a heap: the Gantt chart draws one lane per slot
        self.queue: deque[int] = deque()  # assigned here, waiting for a slot / the next step boundary
        self.plan_start = 0.0  # time of the last step boundary
        self.plan_steps = 0  # steps until the next event
        self.plan_kv = 0  # KV tokens held when the plan started
        self.version = 0  # invalidates superseded events
        self.scheduled = False
        self.busy = 0.0


class _Simulation:
    def __init__(self, lengths: np.ndarray, config: ClusterConfig, policy: str):
        self.cfg, self.policy = config, policy
        self.n_groups, self.group_size = lengths.shape
        self.length = lengths.reshape(-1)  # [R], request r = g·k + j
        self.group = np.repeat(np.arange(self.n_groups), self.group_size)  # [R]
        n_req = self.length.size
        self.generated = np.zeros(n_req, dtype=np.int64)
        self.finish = np.full(n_req, np.nan)
        self.start = np.full(n_req, np.nan)
        self.last_instance = np.full(n_req, -1)
        self.queued = np.zeros(n_req, dtype=bool)  # in the global queue
        self.release_seq = np.zeros(n_req, dtype=np.int64)
        self.n_released = 0
        self.longest_done = np.zeros(self.n_groups)  # longest finished response per group (0: none yet)
        self.is_probe = np.arange(n_req) % self.group_size == 0
        self.instances = [_Instance(i, config.max_batch) for i in range(config.n_instances)]
        self.events: list[tuple[float, int, int, int]] = []  # (time, seq, instance, version)
        self.n_events = 0
        self.segments: list[tuple[int, int, int, float, float, int]] = []
        self.migrations = 0

    # --- step-time model --------------------------------------------------------------------------------------
    def _elapsed(self, steps: np.ndarray | int, batch: int, kv0: int) -> np.ndarray | float:
        """Time of the first ``steps`` decode steps of a batch of ``batch`` requests holding kv0 tokens."""
        return steps * self.cfg.step_time + self.cfg.kv_time * (steps * kv0 + batch * steps * (steps - 1) / 2)

    def _kv(self, inst: _Instance, include_queue: bool = False) -> int:
        reqs = list(inst.active) + (list(inst.queue) if include_queue else [])
        return int(self.generated[reqs].sum()) + self.cfg.prompt_len * len(reqs)

    def _push(self, inst: _Instance, time: float) -> None:
        inst.version += 1
        inst.scheduled = True
        heapq.heappush(self.events, (time, self.n_events, inst.index, inst.version))
        self.n_events += 1

    # --- scheduling -------------------------------------------------------------------------------------------
    def _chunk(self, req: int) -> int:
        remaining = int(self.length[req] - self.generated[req])
        return remaining if self.policy == "static" else min(self.cfg.chunk_size, remaining)

    def _next_request(self) -> int:
        """The queued request the policy serves next (lexicographic keys, first key most significant)."""
        cand = np.flatnonzero(self.queued)
        started = self.generated[cand] > 0
        if self.policy == "divided":
            keys = (np.where(started, 0, 1), np.where(started, self.release_seq[cand], cand))
        elif self.policy == "oracle":
            keys = (-(self.length[cand] - self.generated[cand]), cand)
        else:  # context: probes shortest-generated-first, then longest group estimate, started before fresh
            probe = self.is_probe[cand]
            done = self.longest_done[self.group[cand]]
            est = np.where(done > 0, done, np.inf)  # L̂_g: unknown, i.e. the longest, until a sibling finishes
            keys = (
                np.where(probe, 0, 1),
                np.where(probe, self.generated[cand], 0),
                np.where(probe, 0, -est),
                -self.generated[cand],
                cand,
            )
        return int(cand[np.lexsort(keys[::-1])[0]])

    def _least_loaded(self) -> _Instance | None:
        best, best_key = None, None
        for inst in self.instances:
            if len(inst.active) + len(inst.queue) >= self.cfg.max_batch:
                continue
            key = (self._kv(inst, include_queue=True), len(inst.active) + len(inst.queue), inst.index)
            if best_key is None or key < best_key:
                best, best_key = inst, key
        return best

    def _dispatch(self, now: float, current: _Instance | None) -> None:
        touched: set[int] = set()
        while self.queued.any():
            inst = self._least_loaded()
            if inst is None:
                break
            req = self._next_request()
            self.queued[req] = False
            inst.queue.append(req)
            touched.add(inst.index)
        for index in touched:
            inst = self.instances[index]
            if inst is current:
                continue
            if not inst.scheduled:
                inst.plan_steps = 0
                inst.plan_start = now
                self._push(inst, now)
            else:
                self._cut_plan(inst, now)

    def _cut_plan(self, inst: _Instance, now: float) -> None:
        """End a running plan at the first step boundary at or after ``now``, so new work joins there."""
        steps = np.arange(1, inst.plan_steps + 1)
        ends = inst.plan_start + self._elapsed(steps, len(inst.active), inst.plan_kv)
        cut = int(np.searchsorted(ends, now, side="left"))  # index of the first boundary >= now
        if cut + 1 < inst.plan_steps:
            inst.plan_steps = cut + 1
            self._push(inst, float(ends[cut]))

    # --- one event: the instance reaches a step boundary --------------------------------------------------------
    def _advance(self, inst: _Instance, now: float) -> None:
        """Apply the planned steps; chunks that end leave the instance (finished, or back to the global queue)."""
        if inst.active:
            inst.busy += now - inst.plan_start
        for req in list(inst.active):
            self.generated[req] += inst.plan_steps
            inst.active[req] -= inst.plan_steps
            if inst.active[req] > 0:
                continue
            del inst.active[req]
            t0, generated_then, slot = inst.admitted.pop(req)
            heapq.heappush(inst.free_slots, slot)
            self.segments.append((inst.index, slot, req, t0, now, int(self.generated[req] - generated_then)))
            if self.generated[req] == self.length[req]:
                self.finish[req] = now
                g = self.group[req]
                self.longest_done[g] = max(self.longest_done[g], float(self.length[req]))
            else:
                self.queued[req] = True
                self.release_seq[req] = self.n_released
                self.n_released += 1
                self.last_instance[req] = inst.index

    def _admit(self, inst: _Instance, now: float) -> None:
        while inst.queue and len(inst.active) < self.cfg.max_batch:
            req = inst.queue.popleft()
            if np.isnan(self.start[req]):
                self.start[req] = now
            if self.last_instance[req] >= 0 and self.last_instance[req] != inst.index:
                self.migrations += 1
            inst.active[req] = self._chunk(req)
            inst.admitted[req] = (now, int(self.generated[req]), heapq.heappop(inst.free_slots))

    def run(self) -> None:
        if self.policy == "static":
            for req in range(self.length.size):
                self.instances[self.group[req] % self.cfg.n_instances].queue.append(req)
            for inst in self.instances:
                if inst.queue:
                    self._push(inst, 0.0)
        else:
            self.queued[:] = True
            self._dispatch(0.0, None)
        while self.events:
            now, _, index, version = heapq.heappop(self.events)
            inst = self.instances[index]
            if version != inst.version:
                continue
            inst.scheduled = False
            self._advance(inst, now)
            if self.policy != "static":
                self._dispatch(now, inst)
            self._admit(inst, now)
            if inst.active:
                inst.plan_start = now
                inst.plan_steps = min(inst.active.values())
                inst.plan_kv = self._kv(inst)
                self._push(inst, now + self._elapsed(inst.plan_steps, len(inst.active), inst.plan_kv))


def simulate(lengths: object, config: ClusterConfig, policy: str) -> RolloutResult:
    """Simulate one synchronous rollout step of ``lengths`` ([G, k] decode lengths) under ``policy``."""
    lens = _as_lengths("lengths", lengths)
    if not isinstance(config, ClusterConfig):
        raise TypeError(f"config: expected a ClusterConfig, got {type(config).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {list(POLICIES)!r}, got {policy!r}")
    sim = _Simulation(lens, config, policy)
    sim.run()
    # Conservation: every response finished once, with exactly its length generated, in chunks that add up.
    seg_tokens = np.zeros(lens.size, dtype=np.int64)
    for _, _, req, _, _, tokens in sim.segments:
        seg_tokens[req] += tokens
    if np.isnan(sim.finish).any() or not np.array_equal(sim.generated, sim.length):
        raise RuntimeError(f"simulate({policy}): {int(np.isnan(sim.finish).sum())} responses never finished")
    if not np.array_equal(seg_tokens, sim.length):
        raise RuntimeError(f"simulate({policy}): chunk tokens do not add up to the response lengths")
    finish = sim.finish.reshape(lens.shape)
    makespan = float(finish.max())
    p90 = float(np.quantile(finish, 0.9, method="inverted_cdf"))
    return RolloutResult(
        policy=policy,
        makespan=makespan,
        finish_time=finish,
        start_time=sim.start.reshape(lens.shape),
        tail_time=makespan - p90,
        throughput=float(lens.sum()) / makespan,
        busy_time=np.array([inst.busy for inst in sim.instances]),
        migrations=sim.migrations,
        segments=sim.segments,
    )


def compare_policies(
    lengths: object, config: ClusterConfig, policies: tuple[str, ...] = POLICIES
) -> dict[str, RolloutResult]:
    """``simulate`` under each policy on the same lengths."""
    return {policy: simulate(lengths, config, policy) for policy in policies}


def plot_gantt(result: RolloutResult, ax=None):
    """Gantt chart of a result: one band per instance, one lane per batch slot, one bar per chunk coloured by
    group (returns the axes)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.5), dpi=70)
    group_size = result.finish_time.shape[1]
    lanes = 1 + max(seg[1] for seg in result.segments)
    cmap = plt.get_cmap("tab20")
    for inst, slot, req, t0, t1, _ in result.segments:
        y = inst + slot / lanes
        ax.barh(y, t1 - t0, left=t0, height=0.9 / lanes, align="edge", color=cmap((req // group_size) % 20), lw=0)
    n_instances = 1 + max(seg[0] for seg in result.segments)
    ax.set_yticks([i + 0.5 for i in range(n_instances)], [str(i) for i in range(n_instances)])
    ax.set_ylim(0, n_instances)
    ax.set_ylabel("instance")
    ax.set_xlabel("time")
    ax.set_title(f"{result.policy}: makespan {result.makespan:.0f}, tail {result.tail_time:.0f}", fontsize=9)
    return ax

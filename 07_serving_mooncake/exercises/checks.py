"""Checks for the chapter 07 exercises: ``python -m nanokimi.grade 07_serving_mooncake [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter (``nanokimi.sim``, ``nanokimi.serving``). The
policy exercises are graded inside the simulator: at every decision the attempt and the chapter's policy see the
same cluster state, and the first disagreement is reported. A failure raises AssertionError naming the case, the
request or element, and the size of the error.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import replace

import numpy as np
import torch

from nanokimi.grade import call_attempt as _call
from nanokimi.serving import (
    ConductorPolicy,
    LocalCacheAwarePolicy,
    make_paged_cache,
    paged_attention_reference,
    predicted_decode_load,
)
from nanokimi.sim import (
    MODEL_PRESETS,
    Cluster,
    ClusterSpec,
    CostModel,
    Policy,
    Request,
    RequestResult,
    Route,
    Simulator,
    gpu_preset,
    prefix_hit_rate,
    summarize,
    synthetic_trace,
    tbt_from_token_times,
)
from nanokimi.testing import assert_close, kernel_device, poisoned_empty, randn


def _number(name: str, got: object) -> float:
    if isinstance(got, bool) or not isinstance(got, int | float | np.integer | np.floating):
        raise AssertionError(f"{name}: expected a number, got {type(got).__name__} {got!r:.60}")
    return float(got)


def _close(name: str, got: object, want: float, rtol: float, hint: str = "") -> None:
    """Scalar comparison: ``|got − want| ≤ rtol · |want|`` (exact when ``want`` is 0)."""
    value = _number(name, got)
    err = abs(value - want)
    if not (err <= rtol * abs(want)):  # also catches NaN
        rel = err / abs(want) if want else math.inf
        raise AssertionError(f"{name}: got {value!r}, expected {want!r} (rel err {rel:.2e} > {rtol:g}){hint}")


# --- exercise 1 ------------------------------------------------------------------------------------------------
def _keys(m, tokens: list[int], block_tokens: int, case: str) -> tuple[int, ...]:
    got = _call(m.block_keys, tokens, block_tokens)
    if not isinstance(got, tuple | list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in got):
        raise AssertionError(f"block_keys [{case}]: expected a tuple of ints, got {got!r:.80}")
    want_len = -(-len(tokens) // block_tokens)
    if len(got) != want_len:
        raise AssertionError(
            f"block_keys [{case}]: {len(got)} keys for {len(tokens)} tokens in blocks of {block_tokens}, expected "
            f"ceil({len(tokens)} / {block_tokens}) = {want_len} (the last, partial block gets a key too)"
        )
    return tuple(got)


def _conversations(seed: int, block_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Multi-turn chats: each turn's prompt is the whole history plus a new message; two in three chats start with
    one shared system prompt. Returns the prompts and their arrival times (turns of a chat in order)."""
    rng = random.Random(seed)
    system = [rng.randrange(50_000) for _ in range(int(2.5 * block_tokens))]
    prompts, arrivals = [], []
    for chat in range(12):
        history = list(system) if chat % 3 else []
        for turn in range(4):
            history = history + [rng.randrange(50_000) for _ in range(rng.randint(1, 2 * block_tokens))]
            prompts.append(list(history))
            arrivals.append(10.0 * turn + 0.1 * chat)
            history = history + [rng.randrange(50_000) for _ in range(rng.randint(1, block_tokens))]  # the answer
    return prompts, arrivals


def _check_hit_rate(m, case: str, requests: list[Request], capacity: int | None, block_tokens: int) -> None:
    got = _call(m.hit_rate, requests, capacity, block_tokens)
    want = prefix_hit_rate(requests, capacity, block_tokens)
    if not (isinstance(got, tuple | list) and len(got) == 2):
        raise AssertionError(f"hit_rate [{case}]: expected a tuple (token_rate, block_rate), got {got!r:.80}")
    cap = "infinite" if capacity is None else f"LRU of {capacity} blocks"
    for name, g, w in (("token_rate", got[0], want[0]), ("block_rate", got[1], want[1])):
        _close(f"hit_rate [{case}, {cap}] {name}", g, w, 1e-12)


def check_ex1_prefix_cache(m) -> None:
    rng = random.Random(0)
    block = 8
    tokens = [rng.randrange(1000) for _ in range(45)]  # 6 blocks, the last one 5 tokens long
    keys = _keys(m, tokens, block, "45 tokens, blocks of 8")
    if _keys(m, list(tokens), block, "the same 45 tokens again") != keys:
        raise AssertionError("block_keys: the same prompt gave different keys on a second call")
    if _keys(m, tokens[:24], block, "its first 24 tokens") != keys[:3]:
        raise AssertionError("block_keys: a 24-token prefix must get the first 3 keys of the 45-token prompt")
    part = _keys(m, tokens[:20], block, "its first 20 tokens")
    if part[:2] != keys[:2] or part[2] == keys[2]:
        raise AssertionError(
            "block_keys: the first 20 tokens must share keys 0, 1 with the 45-token prompt and NOT key 2 "
            "(block 2 holds 4 tokens there, 8 here)"
        )
    changed = list(tokens)
    changed[3] += 1  # one token of block 0 differs; blocks 1..5 hold the same tokens as before
    other = _keys(m, changed, block, "45 tokens, token 3 changed")
    same = [i for i in range(len(keys)) if other[i] == keys[i]]
    if same:
        raise AssertionError(
            f"block_keys: changing token 3 (block 0) left key(s) {same} unchanged; every later key must change too "
            "(key_i hashes key_{i-1} with block i's tokens: the chain makes a key stand for the whole prefix)"
        )
    flat = _keys(m, [5] * 24, block, "24 equal tokens")
    if len(set(flat)) != 3:
        raise AssertionError(
            f"block_keys: three blocks of identical tokens got keys {flat}; they must differ (different prefixes)"
        )
    _keys(m, [7], block, "a single token")
    _keys(m, tokens, 16, "45 tokens, blocks of 16")
    firsts = {_keys(m, [rng.randrange(10**6) for _ in range(block)], block, "random block")[0] for _ in range(300)}
    if len(firsts) < 300:
        raise AssertionError(f"block_keys: 300 random one-block prompts got only {len(firsts)} distinct keys")

    # Keys drive the cache: hit rates with your keys must equal those with exact prefix identities.
    prompts, arrivals = _conversations(1, block)
    exact: dict[tuple[int, ...], int] = {}
    mine, ref = [], []
    for i, (p, t) in enumerate(zip(prompts, arrivals, strict=True)):
        ends = range(block, len(p) + block, block)
        ref_keys = tuple(exact.setdefault(tuple(p[:end]), len(exact)) for end in ends)
        mine.append(Request(i, t, len(p), 1, _keys(m, p, block, f"chat prompt {i}")))
        ref.append(Request(i, t, len(p), 1, ref_keys))
    for capacity in (None, 20):
        got, want = prefix_hit_rate(mine, capacity, block), prefix_hit_rate(ref, capacity, block)
        if got != want:
            raise AssertionError(
                f"block_keys: 48 chat prompts (shared system prompt, growing histories), cache capacity {capacity}: "
                f"hit rates (token, block) {got} with your keys, {want} with exact prefix keys"
            )

    # hit_rate against nanokimi.sim.prefix_hit_rate.
    trace = synthetic_trace(300, 5.0, "short", 0.7, seed=1, block_tokens=64)
    for capacity in (None, 0, 1, 40, 400):
        _check_hit_rate(m, "synthetic 300 requests, blocks of 64", trace, capacity, 64)
    shuffled = list(trace)
    random.Random(2).shuffle(shuffled)
    for capacity in (None, 40):
        _check_hit_rate(m, "the same requests passed in shuffled order (replay by arrival)", shuffled, capacity, 64)
    long_trace = synthetic_trace(200, 3.0, "conversation", 0.6, seed=2)
    for capacity in (None, 500):
        _check_hit_rate(m, "synthetic 200 long prompts, blocks of 512", long_trace, capacity, 512)

    def reqs(*rows):
        return [Request(i, float(i), n, 1, keys) for i, (n, keys) in enumerate(rows)]

    hand = [
        ("a hit refreshes its keys (capacity 4: (1,2) (3,4) (1,2) (5,6) (1,2))",
         reqs((16, (1, 2)), (16, (3, 4)), (16, (1, 2)), (16, (5, 6)), (16, (1, 2))), 4),
        ("leading run only: (1,2,3) then (9,2,3) hits nothing", reqs((24, (1, 2, 3)), (24, (9, 2, 3))), None),
        ("a cached partial last block counts n tokens, not 3 blocks' worth", reqs((20, (1, 2, 3)), (20, (1, 2, 3))),
         None),
        ("capacity 2 < a 3-block request: it evicts its own first block", reqs((24, (1, 2, 3)), (24, (1, 2, 3))), 2),
    ]  # fmt: skip
    for case, requests, capacity in hand:
        _check_hit_rate(m, case, requests, capacity, 8)


# --- exercise 2 ------------------------------------------------------------------------------------------------
def _tbt_hint(times: np.ndarray, got: float) -> str:
    gaps = np.diff(times)
    wrong = {
        "the mean of all gaps": gaps.mean(),
        "the 90th percentile of the gaps": np.percentile(gaps, 90),
        "the mean of the int(0.1·m) slowest": np.sort(gaps)[-max(1, int(0.1 * gaps.size)) :].mean(),
        "the slowest gap": gaps.max(),
    }
    for what, value in wrong.items():
        if math.isclose(got, value, rel_tol=1e-9):
            return f"; that is {what}: TBT is the mean of the ceil(0.1·m) slowest of the m gaps"
    return ""


def _overloaded_results() -> list[RequestResult]:
    """A 3P+1D cluster past saturation: completed requests, and rejections at arrival and after prefill."""
    spec = ClusterSpec(n_prefill=3, n_decode=1, decode_kv_blocks=400)
    policy = ConductorPolicy(ttft_slo=10.0, tbt_slo=0.1, rejection="decode")
    return Simulator(spec, policy, 10.0, 0.1).run(synthetic_trace(150, 6.0, "conversation", 0.5, seed=2)).results


def check_ex2_tbt_goodput(m) -> None:
    rng = np.random.default_rng(0)
    cases = [(f"{n} tokens, random gaps", 5.0 + np.cumsum(rng.exponential(0.03, n))) for n in
             (1, 2, 3, 10, 11, 12, 20, 21, 31, 100, 1001)]  # fmt: skip
    stall = 3.0 + np.cumsum(np.r_[0.0, np.full(9, 0.02), 2.0, np.full(39, 0.02)])
    cases += [
        ("50 tokens, one 2 s stall among 0.02 s gaps", stall),
        ("equal gaps", np.arange(25) * 0.05),
        ("all tokens at the same time", np.full(7, 4.0)),
    ]
    for i, (case, times) in enumerate(cases):
        arg = times.tolist() if i % 2 else times  # a list or a NumPy array
        got = _call(m.tbt, arg)
        want = tbt_from_token_times(times)
        _close(f"tbt [{case}]", got, want, 1e-12, _tbt_hint(times, _number("tbt", got)) if times.size > 1 else "")

    results = _overloaded_results()
    hand = [
        RequestResult(0, 1.0, 100, 5, "completed", first_token=1.5, finish=3.0, tbt=0.1),  # TTFT 0.5 s = SLO
        RequestResult(1, 2.0, 100, 5, "completed", first_token=2.25, finish=2.5, tbt=0.05),
        RequestResult(2, 2.0, 100, 5, "rejected", "decode", first_token=2.5),  # prefilled, then rejected
        RequestResult(3, 10.0, 100, 5, "rejected", "arrival"),  # the last event is this arrival
        RequestResult(4, 0.5, 100, 1, "completed", first_token=1.2, finish=1.2, tbt=0.0),
    ]
    lone = [RequestResult(0, 3.0, 100, 5, "rejected", "arrival")]
    groups = [
        ("150 simulated requests (rejections at arrival and at decode)", results),
        ("the same, reversed (the last finish is not last in the list)", results[::-1]),
        ("five hand-made requests, two exactly at the SLOs", hand),
        ("one request, rejected at arrival (span 1e-9 s)", lone),
    ]
    for case, res in groups:
        for ttft_slo, tbt_slo in ((10.0, 0.1), (5.0, 0.05), (0.5, 0.1), (1.0, 0.02)):
            got = _call(m.slo_summary, res, ttft_slo, tbt_slo)
            want = summarize(res, ttft_slo, tbt_slo)
            where = f"[{case}, SLOs TTFT {ttft_slo} s / TBT {tbt_slo} s]"
            if not isinstance(got, dict):
                raise AssertionError(f"slo_summary {where}: expected a dict, got {type(got).__name__}")
            for key in ("effective", "slo_attainment", "goodput_rps"):
                if key not in got:
                    raise AssertionError(f"slo_summary {where}: missing key {key!r}")
            if _number("effective", got["effective"]) != want["effective"]:
                raise AssertionError(
                    f"slo_summary {where}: effective = {got['effective']}, expected {want['effective']} of "
                    f"{want['completed']} completed (TTFT <= SLO and TBT <= SLO, both inclusive; completed only)"
                )
            _close(f"slo_summary {where} slo_attainment", got["slo_attainment"], want["slo_attainment"], 1e-12,
                   " (effective / all requests, rejected ones included)")  # fmt: skip
            _close(f"slo_summary {where} goodput_rps", got["goodput_rps"], want["goodput_rps"], 1e-12,
                   f" (span should be {want['duration_s']!r} s: first arrival to the last finish or arrival)")  # fmt: skip


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _check_prefill_time(m) -> None:
    dense = CostModel.from_specs(MODEL_PRESETS["dense-70b"], gpu_preset("h800"))
    costs = [
        ("dense-70b on 8xH800", dense),
        (
            "kimi-linear hybrid on 2xH20",
            CostModel.from_specs(MODEL_PRESETS["kimi-linear-48b-a3b"], gpu_preset("h20", 2)),
        ),
        ("a 1-layer model with slow PCIe", replace(dense, n_layers=1, h2d_bw=5e9)),
    ]
    rng = random.Random(3)
    for name, cost in costs:
        cases = [(1, 0, 0), (512, 0, 0), (10_000, 9_999, 19), (2000, 1536, 3), (300, 0, 5000)]
        for _ in range(12):
            n = rng.randint(1, 130_000)
            p = rng.choice([0, rng.randint(0, n - 1), (n - 1) // 512 * 512])
            cases.append((n, p, rng.randint(0, p // 512 + 1)))
        for n, p, dram in cases:
            for layerwise in (True, False):
                got = _call(m.prefill_time, cost, n, p, dram, layerwise)
                want = cost.prefill_time(n, p, dram, layerwise)
                _close(f"prefill_time [{name}] n={n} p={p} dram_blocks={dram} layerwise={layerwise}", got, want, 1e-12)


class _RoutingReferee(Policy):
    """Routes with the attempt; at every arrival checks its estimates and its choice against
    ``LocalCacheAwarePolicy`` on the same cluster state."""

    name = "referee"

    def __init__(self, m, case: str):
        self.m, self.case = m, case
        self.attempt = _call(m.CacheAwarePolicy, tbt_slo=0.1)
        self.reference = LocalCacheAwarePolicy(tbt_slo=0.1)
        self.decisions = self.near_ties = 0

    def reset(self, cluster: Cluster) -> None:
        self.attempt.reset(cluster)
        self.reference.reset(cluster)

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        where = f"[{self.case}] request {req.req_id} (n={req.input_length}, {req.n_blocks} blocks) at t={now:.3f} s"
        for inst in cluster.prefill_pool:
            hit, dram = inst.match(req.hash_ids)
            want = cluster.estimate_ttft(req, inst, now).ttft
            got = _call(self.m.ttft_estimate, req, inst, cluster, now)
            _close(f"ttft_estimate {where} on {inst.name} (hit {hit} blocks, {dram} in DRAM, queue "
                   f"{inst.queue_time(now):.4g} s)", got, want, 1e-9)  # fmt: skip
        got = _call(self.attempt.route, req, cluster, now)
        want = self.reference.route(req, cluster, now)
        if not isinstance(got, Route):
            raise AssertionError(f"CacheAwarePolicy.route {where}: expected a Route, got {type(got).__name__}")
        if got.reject is not None or got.pull_from is not None:
            raise AssertionError(f"CacheAwarePolicy.route {where}: expected no rejection and no pull")
        if got.prefill is not want.prefill:
            ttft = {i.name: cluster.estimate_ttft(req, i, now).ttft for i in cluster.prefill_pool}
            chosen = ttft.get(getattr(got.prefill, "name", None), math.nan)
            if not math.isclose(chosen, want.predicted_ttft, rel_tol=1e-9):
                raise AssertionError(
                    f"CacheAwarePolicy.route {where}: prefill on {got.prefill!r}, expected {want.prefill.name} "
                    f"(TTFT estimates {', '.join(f'{k}: {v:.6g} s' for k, v in ttft.items())}; ties go to the "
                    "smaller queue, then the lower idx)"
                )
            self.near_ties += 1  # equal estimates up to rounding: either choice is right
        if got.decode is not want.decode:
            raise AssertionError(
                f"CacheAwarePolicy.route {where}: decode on {got.decode!r}, expected {want.decode!r} "
                "(least_loaded_decode)"
            )
        expected = cluster.estimate_ttft(req, got.prefill, now).ttft
        _close(f"CacheAwarePolicy.route {where}: predicted_ttft", got.predicted_ttft, expected, 1e-9)
        self.decisions += 1
        return got


def _repeated_prompts() -> list[Request]:
    """Prompts sent again (all blocks cached, the last one partial), a partial match, and a long prefill that keeps
    P0 busy while a request whose prefix P0 holds arrives (P1 recomputing it is faster)."""
    return [
        Request(0, 0.0, 2000, 4, (1, 2, 3, 4)),
        Request(1, 5.0, 2000, 4, (1, 2, 3, 4)),
        Request(2, 5.01, 2000, 4, (1, 2, 3, 4)),
        Request(3, 5.02, 1100, 4, (1, 2, 5)),
        Request(4, 6.0, 60_000, 4, tuple(range(100, 218))),
        Request(5, 6.1, 2000, 4, (1, 2, 3, 4)),
        Request(6, 30.0, 512, 4, (1,)),
    ]


def check_ex3_cache_aware_routing(m) -> None:
    _check_prefill_time(m)
    hybrid, h20 = MODEL_PRESETS["kimi-linear-48b-a3b"], gpu_preset("h20", 2)
    runs = [
        ("3P+2D dense-70b, 150 chat requests at 4/s, 30-block GPU cache over DRAM",
         ClusterSpec(n_prefill=3, n_decode=2, prefill_gpu_cache_blocks=30, dram_cache_blocks=3000),
         synthetic_trace(150, 4.0, "conversation", 0.7, seed=3)),
        ("2P+1D hybrid on 2xH20, not layer-wise, 100 requests at 3/s",
         ClusterSpec(model=hybrid, gpu=h20, n_prefill=2, n_decode=1, layerwise=False, prefill_gpu_cache_blocks=20,
                     dram_cache_blocks=500),
         synthetic_trace(100, 3.0, "conversation", 0.7, seed=4)),
        ("2P+1D, repeated prompts and a busy instance", ClusterSpec(n_prefill=2, n_decode=1), _repeated_prompts()),
    ]  # fmt: skip
    for case, spec, requests in runs:
        referee = _RoutingReferee(m, case)
        got = Simulator(spec, referee).run(requests)
        if referee.decisions != len(requests):
            raise AssertionError(f"[{case}] {referee.decisions} routing decisions for {len(requests)} requests")
        if referee.near_ties:
            continue
        want = Simulator(spec, LocalCacheAwarePolicy(tbt_slo=0.1)).run(requests)
        for key in ("ttft_mean", "ttft_p90", "token_hit_rate", "goodput_rps"):
            _close(f"[{case}] run summary {key} vs LocalCacheAwarePolicy", got.summary[key], want.summary[key], 1e-12)


# --- exercise 4 ------------------------------------------------------------------------------------------------
def _check_loads(m, dec, where: str, tbt_slo: float, extras: tuple[int, int, int], now: float, t_done: float,
                 t_d: float) -> None:  # fmt: skip
    got = _call(m.current_load, dec, tbt_slo, *extras)
    want = dec.decode_load(tbt_slo, *extras, inflight=False)
    state = f"B={dec.B}, C={dec.C}, kv_used={dec.kv_used}, waiting={len(dec.waiting)}, extras={extras}"
    _close(f"current_load {where} ({state})", got, want, 1e-12)
    got = _call(m.predicted_load, dec, now, t_done, t_d, tbt_slo, *extras)
    want = predicted_decode_load(dec, now, t_done, t_d, tbt_slo, *extras)
    leaving = sum(j <= t_done - t_d for j in dec.join_times)
    arriving = sum(v[0] <= t_done for v in dec.inflight.values())
    _close(f"predicted_load {where}, now={now:.4g} t_done={t_done:.4g} t_d={t_d:.4g} ({state}; {leaving} of "
           f"{dec.B} should leave, {arriving} of {len(dec.inflight)} in flight should arrive)", got, want, 1e-12)  # fmt: skip


def _check_loads_by_hand(m) -> None:
    cluster = Cluster(ClusterSpec(n_prefill=1, n_decode=1, decode_kv_blocks=100))
    d = cluster.decode_pool[0]
    _check_loads(m, d, "[an idle decode instance]", 0.1, (1, 500, 3), 0.0, 5.0, 2.0)
    _check_loads(m, d, "[an idle decode instance, no extras]", 0.1, (0, 0, 0), 0.0, 5.0, 2.0)
    d.B, d.C, d.kv_used = 4, 40_000, 80
    d.join_times = [0.0, 5.0, 9.0, 9.5]
    d.waiting, d.waiting_c, d.waiting_kv = deque([11, 12]), 3000, 7
    d.inflight = {7: (10.5, 2000, 5), 8: (20.0, 3000, 6), 9: (11.0, 100, 1)}
    d.inflight_n, d.inflight_c, d.inflight_kv = 3, 5100, 12  # the totals of d.inflight
    for now, t_done, t_d, what in (
        (10.0, 11.0, 2.0, "the request that joined at 9.0 is exactly t_d old at t_done: it leaves"),
        (10.0, 10.0, 100.0, "nobody leaves, nothing arrives"),
        (10.0, 30.0, 1.0, "everybody leaves, everything in flight arrives"),
    ):
        for extras in ((1, 500, 3), (0, 0, 0)):
            _check_loads(m, d, f"[hand-made state: {what}]", 0.1, extras, now, t_done, t_d)


class _RejectionReferee(Policy):
    """Decides with the attempt; at every decision checks the loads and the decision against
    ``ConductorPolicy(rejection=mode)`` on the same cluster state."""

    name = "referee"

    def __init__(self, m, mode: str, case: str, ttft_slo: float, tbt_slo: float):
        self.m, self.mode, self.case, self.tbt_slo = m, mode, case, tbt_slo
        self.attempt = _call(m.RejectingConductor, ttft_slo=ttft_slo, tbt_slo=tbt_slo, mode=mode)
        self.reference = ConductorPolicy(ttft_slo, tbt_slo, rejection=mode)

    def reset(self, cluster: Cluster) -> None:
        self.attempt.reset(cluster)
        self.reference.reset(cluster)

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        where = f"[{self.case}, mode {self.mode!r}] request {req.req_id} at t={now:.3f} s"
        want = self.reference.route(req, cluster, now)
        extras = (1, req.input_length + 1, cluster.decode_blocks(req))
        t_d = cluster.mean_decode_s if cluster.n_decoded else self.reference.decode_seconds
        for dec in cluster.decode_pool:
            _check_loads(
                self.m, dec, f"{where} on {dec.name}", self.tbt_slo, extras, now, now + want.predicted_ttft, t_d
            )
        got = _call(self.attempt.route, req, cluster, now)
        if not isinstance(got, Route):
            raise AssertionError(f"RejectingConductor.route {where}: expected a Route, got {type(got).__name__}")
        if (got.prefill, got.decode, got.pull_from) != (want.prefill, want.decode, want.pull_from):
            raise AssertionError(f"RejectingConductor.route {where}: keep the router's instances and pull unchanged")
        if (got.reject is None) != (want.reject is None):
            dec, ttft = want.decode, want.predicted_ttft
            now_load = dec.decode_load(self.tbt_slo, *extras, inflight=False)
            future = predicted_decode_load(dec, now, now + ttft, t_d, self.tbt_slo, *extras)
            raise AssertionError(
                f"RejectingConductor.route {where}: {'rejected' if got.reject else 'accepted'}, expected "
                f"{'a rejection (' + want.reject + ')' if want.reject else 'acceptance'}; TTFT estimate {ttft:.4g} s "
                f"(SLO {self.reference.ttft_slo} s), decode load of {dec.name} now {now_load:.4f}, predicted at "
                f"now + TTFT {future:.4f} (t_d = {t_d:.4g} s)"
            )
        return got

    def admit_decode(self, req: Request, inst, cluster: Cluster, now: float) -> bool:
        got = _call(self.attempt.admit_decode, req, inst, cluster, now)
        want = self.reference.admit_decode(req, inst, cluster, now)
        if bool(got) != want:
            load = inst.decode_load(self.tbt_slo, 1, req.input_length + 1, cluster.decode_blocks(req), inflight=False)
            raise AssertionError(
                f"RejectingConductor.admit_decode [{self.case}, mode {self.mode!r}] request {req.req_id} on "
                f"{inst.name} at t={now:.3f} s: {bool(got)}, expected {want} (its current load with the request "
                f"is {load:.4f})"
            )
        return bool(got)


def check_ex4_overload_rejection(m) -> None:
    _check_loads_by_hand(m)
    case = "3P+1D with 400 KV blocks, 250 chat requests at 6/s (overloaded)"
    spec = ClusterSpec(n_prefill=3, n_decode=1, decode_kv_blocks=400)
    requests = synthetic_trace(250, 6.0, "conversation", 0.5, seed=2)
    for mode in ("decode", "early", "predicted"):
        got = Simulator(spec, _RejectionReferee(m, mode, case, 10.0, 0.1), 10.0, 0.1).run(requests).summary
        want = Simulator(spec, ConductorPolicy(10.0, 0.1, rejection=mode), 10.0, 0.1).run(requests).summary
        for key in ("rejected_arrival", "rejected_decode", "completed", "wasted_prefill_s"):
            _close(f"[{case}, mode {mode!r}] run summary {key}", got[key], want[key], 1e-12)


# --- exercise 5 ------------------------------------------------------------------------------------------------
def _paged_inputs(
    b: int, h: int, h_kv: int, d: int, page: int, lens: list[int], seed: int, extra_columns: int = 0,
    share: tuple[int, int, int] | None = None,
):  # fmt: skip
    """Dense random K/V scattered into a shuffled page pool (unused rows hold 1e4). ``extra_columns`` appends
    garbage block-table columns; ``share = (src, dst, pages)`` points dst's first pages at src's (a shared prefix)."""
    k = randn(b, max(lens), h_kv, d, seed=seed)
    v = randn(b, max(lens), h_kv, d, seed=seed + 1)
    q = randn(b, h, d, seed=seed + 2)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    k_cache, v_cache, tables = make_paged_cache(k, v, context_lens, page, seed=seed, spare_pages=2)
    if extra_columns:
        gen = torch.Generator().manual_seed(seed)
        junk = torch.randint(0, k_cache.shape[0], (b, extra_columns), generator=gen, dtype=torch.int32)
        tables = torch.cat([tables, junk], dim=1)
    if share is not None:
        src, dst, pages = share
        tables[dst, :pages] = tables[src, :pages]
    return q, k_cache, v_cache, tables, context_lens


def check_ex5_triton_paged_decode(m) -> None:
    dev = kernel_device()
    cases = [  # (case, inputs, scale, dtype, rtol)
        ("B=3 H=4 H_kv=2 D=16, pages of 4, n = [1, 4, 37]",
         _paged_inputs(3, 4, 2, 16, 4, [1, 4, 37], seed=0), 0.25, torch.float32, 1e-5),
        ("B=2 H=2 H_kv=2 D=24, pages of 16, n = [16, 33], 3 garbage table columns",
         _paged_inputs(2, 2, 2, 24, 16, [16, 33], seed=10, extra_columns=3), 24**-0.5, torch.float32, 1e-5),
        ("B=4 H=6 H_kv=2 (G=3) D=8, pages of 8, n = [5, 64, 1, 50], request 3 shares request 1's first 4 pages",
         _paged_inputs(4, 6, 2, 8, 8, [5, 64, 1, 50], seed=20, share=(1, 3, 4)), 0.7, torch.float32, 1e-5),
        ("B=2 H=4 H_kv=1 (G=4) D=16, pages of 8, n = [70, 9], bf16",
         _paged_inputs(2, 4, 1, 16, 8, [70, 9], seed=30), 0.25, torch.bfloat16, 1e-2),
    ]  # fmt: skip
    wide = _paged_inputs(2, 3, 3, 16, 4, [13, 30], seed=40)
    strided_q = torch.cat([wide[0], torch.full_like(wide[0], 1e4)], dim=-1)[..., :16]  # [B, H, 16], stride(1) = 32
    cases.append(("q a strided view (stride over heads 32, D=16), pages of 4, n = [13, 30]",
                  (strided_q, *wide[1:]), 0.25, torch.float32, 1e-5))  # fmt: skip
    for case, (q, k_cache, v_cache, tables, lens), scale, dtype, rtol in cases:
        q, k_cache, v_cache = (t.to(dev, dtype) for t in (q, k_cache, v_cache))
        tables, lens = tables.to(dev), lens.to(dev)
        want = paged_attention_reference(q, k_cache, v_cache, tables, lens, scale)  # [B, H, D] float64
        with poisoned_empty():
            got = _call(m.paged_decode, q, k_cache, v_cache, tables, lens, scale)
        if not isinstance(got, torch.Tensor) or got.dtype != dtype:
            what = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"paged_decode [{case}]: expected a {dtype} tensor (the dtype of q), got {what}")
        assert_close(f"paged_decode [{case}] (index = request, head, dim)", got, want, rtol_rel=rtol)

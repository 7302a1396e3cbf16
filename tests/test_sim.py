"""nanokimi.sim: traces, LRU pools, the cost model, the discrete-event engine and its metrics.

The engine is checked against a naive step-by-step decode loop (the rung below its closed-form epochs), against
the cost model's formulas for a lone request, and for conservation of requests. Tests that read Mooncake's
traces resolve them as ``<repo>/../shared/data/mooncake`` and skip when that folder is absent.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from nanokimi.sim import (
    MODEL_PRESETS,
    ClusterSpec,
    CostModel,
    LengthDist,
    LRUBlockPool,
    Policy,
    Request,
    RequestResult,
    Route,
    Simulator,
    TieredCache,
    check_conservation,
    gpu_preset,
    layerwise_overlap,
    load_trace,
    prefix_hit_rate,
    replay_speed,
    summarize,
    synthetic_trace,
    tbt_from_gaps,
    tbt_from_token_times,
    transfer_end,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake"
CONVERSATION = DATA / "conversation_trace.jsonl"
SYNTHETIC = DATA / "synthetic_trace.jsonl"
needs_traces = pytest.mark.skipif(not CONVERSATION.exists(), reason=f"Mooncake traces not found under {DATA}")


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _line(ts=0, n_in=600, n_out=5, ids=(1, 2)) -> str:
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(ids)})


class FirstFree(Policy):
    """Test policy: the prefill and decode instances with the least work, lowest index on ties."""

    name = "first_free"

    def route(self, req, cluster, now):
        pre = min(cluster.prefill_pool, key=lambda i: (i.queue_time(now), i.idx))
        dec = None if cluster.coupled else min(cluster.decode_pool, key=lambda d: (d.B + d.inflight_n, d.idx))
        return Route(prefill=pre, decode=dec, predicted_ttft=cluster.estimate_ttft(req, pre, now).ttft)


# --- traces --------------------------------------------------------------------------------------------
def test_load_trace_parses_fields(tmp_path):
    path = _write(tmp_path, [_line(0, 600, 5, (1, 2)), "", _line(1500, 512, 1, (1,))])
    reqs = load_trace(path)
    assert [r.req_id for r in reqs] == [0, 1]
    assert reqs[1] == Request(1, 1.5, 512, 1, (1,))
    assert reqs[0].n_blocks == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"timestamp": 0, "input_length": 5', r":2: bad JSON"),
        (_line(n_in=-3, ids=()), r":2: input_length: expected an integer >= 1, got -3"),
        (_line(n_out=0), r":2: output_length: expected an integer >= 1, got 0"),
        (_line(n_in=1025, ids=(1, 2)), r":2: hash_ids: expected ceil\(input_length / 512\) = 3 block ids .* got 2"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1}', r":2: hash_ids: expected a list of integers"),
        ('{"input_length": 5, "output_length": 1, "hash_ids": [1]}', r":2: missing field 'timestamp'"),
        (_line(ts=-1), r":2: timestamp: expected an integer >= 0"),
        ("[1, 2]", r":2: expected a JSON object, got list"),
        (_line(n_in=2.5, ids=(1,)), r":2: input_length: expected an integer, got 2.5"),
    ],
)
def test_load_trace_names_the_bad_line(tmp_path, line, message):
    path = _write(tmp_path, [_line(), line])
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_load_trace_rejects_time_going_backwards_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r":2: timestamp: expected non-decreasing timestamps, got 5 after 9"):
        load_trace(_write(tmp_path, [_line(ts=9), _line(ts=5)]))
    with pytest.raises(ValueError, match="empty trace"):
        load_trace(_write(tmp_path, [""]))


@needs_traces
def test_real_traces_load_and_match_the_published_hit_rates():
    conv, syn = load_trace(CONVERSATION), load_trace(SYNTHETIC)
    assert (len(conv), len(syn)) == (12_031, 3_993)
    assert conv[-1].arrival == pytest.approx(3536.999)
    # Parity anchors computed independently (research notes §A.8): infinite cache, then LRU at 10k blocks.
    tok, blk = prefix_hit_rate(conv)
    assert (round(blk, 3), round(tok, 3)) == (0.366, 0.374)
    tok, blk = prefix_hit_rate(syn)
    assert (round(blk, 3), round(tok, 3)) == (0.640, 0.651)
    assert round(prefix_hit_rate(conv, 10_000)[1], 3) == 0.211
    assert round(prefix_hit_rate(syn, 10_000)[1], 3) == 0.423


def test_synthetic_trace_is_seeded_and_well_formed():
    a = synthetic_trace(300, rate=5.0, prefix_sharing=0.6, seed=3)
    assert a == synthetic_trace(300, rate=5.0, prefix_sharing=0.6, seed=3)
    assert a != synthetic_trace(300, rate=5.0, prefix_sharing=0.6, seed=4)
    assert all(len(r.hash_ids) == math.ceil(r.input_length / 512) for r in a)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert 300 / arrivals[-1] == pytest.approx(5.0, rel=0.2)  # Poisson rate


def test_synthetic_prefix_sharing_drives_the_hit_rate():
    rates = [prefix_hit_rate(synthetic_trace(400, 5.0, "short", s, seed=1))[0] for s in (0.0, 0.4, 0.9)]
    assert rates[0] == 0.0
    assert rates[0] < rates[1] < rates[2]


def test_synthetic_trace_bad_arguments():
    with pytest.raises(ValueError, match=r"rate: expected a positive finite number .* got 0"):
        synthetic_trace(10, 0)
    with pytest.raises(ValueError, match=r"prefix_sharing: expected a probability in \[0, 1\], got 1.5"):
        synthetic_trace(10, 1.0, prefix_sharing=1.5)
    with pytest.raises(ValueError, match=r"length_dist: expected one of .* got 'huge'"):
        synthetic_trace(10, 1.0, length_dist="huge")
    with pytest.raises(ValueError, match=r"n: expected a positive int, got 0"):
        synthetic_trace(0, 1.0)
    fixed = LengthDist(1000, 0.0, 1, 10_000, 7, 0.0, 1, 100)
    assert {(r.input_length, r.output_length) for r in synthetic_trace(5, 1.0, fixed, 0.0)} == {(1000, 7)}


def test_replay_speed_scales_arrivals():
    reqs = synthetic_trace(10, 1.0, seed=0)
    fast = replay_speed(reqs, 2.0)
    assert [f.arrival for f in fast] == [r.arrival / 2 for r in reqs]
    with pytest.raises(ValueError, match="speed"):
        replay_speed(reqs, 0)


# --- caches ----------------------------------------------------------------------------------------------
def test_lru_pool_evicts_least_recently_used():
    pool = LRUBlockPool(3)
    for k in (1, 2, 3):
        assert pool.insert(k) == []
    assert pool.insert(1) == []  # touch: 1 becomes most recent
    assert pool.insert(4) == [2]  # so 2 is the least recent
    assert pool.keys_lru_first() == [3, 1, 4]
    assert pool.remove(3) and not pool.remove(3)
    assert LRUBlockPool(0).insert(7) == [7] and len(LRUBlockPool(None)) == 0
    with pytest.raises(ValueError, match=r"capacity: expected None \(infinite\) or an int >= 0 blocks, got -1"):
        LRUBlockPool(-1)


def test_tiered_cache_demotes_to_dram_then_drops():
    cache = TieredCache(gpu_blocks=2, dram_blocks=2)
    cache.insert([1, 2, 3])  # 1 demoted to DRAM
    assert cache.gpu.keys_lru_first() == [2, 3] and cache.dram.keys_lru_first() == [1]
    assert cache.match([1, 2, 3, 9]) == (3, 1)  # three leading hits, one of them in DRAM
    assert cache.match([2, 3]) == (2, 0) and cache.match([9, 2]) == (0, 0)  # a miss ends the run
    cache.insert([4, 5, 6])  # 2, 3, 4 demoted in turn; DRAM keeps the 2 most recent
    assert cache.dram.keys_lru_first() == [3, 4] and 1 not in cache
    cache.insert([3])  # a DRAM hit is promoted back to the GPU tier
    assert 3 in cache.gpu and 3 not in cache.dram
    assert cache.gpu.keys_lru_first() == [6, 3] and cache.dram.keys_lru_first() == [4, 5]  # 5 demoted for 3
    cache.insert_dram([6, 8])  # 6 already on the GPU: unchanged; 8 lands in DRAM (evicting 4)
    assert cache.dram.keys_lru_first() == [5, 8] and 6 in cache.gpu


def test_prefix_hit_rate_counts_leading_runs_only():
    reqs = [Request(0, 0.0, 1024, 1, (1, 2)), Request(1, 1.0, 1100, 1, (1, 2, 3)), Request(2, 2.0, 1024, 1, (9, 2))]
    tok, blk = prefix_hit_rate(reqs)
    assert blk == pytest.approx(2 / 7)  # request 1 hits (1, 2); request 2's block 2 follows a miss
    assert tok == pytest.approx(1024 / (1024 + 1100 + 1024))
    assert prefix_hit_rate(reqs, capacity_blocks=1) == (0.0, 0.0)


# --- cost model --------------------------------------------------------------------------------------------
def test_cost_model_formulas():
    model, gpu = MODEL_PRESETS["dense-70b"], gpu_preset("h800")
    assert model.kv_bytes_per_token == 327_680  # 320 KB/token (FAST'25 Table 1)
    c = CostModel.from_specs(model, gpu)
    g = 8 * 989e12 * gpu.mfu
    n, p = 5000, 1024
    pairs = (n * (n + 1) - p * (p + 1)) / 2
    want = gpu.prefill_overhead + 2 * 70.6e9 * (n - p) / g + 80 * 2 * 64 * 256 * pairs / g
    assert c.prefill_compute(n, p) == pytest.approx(want, rel=1e-12)
    bw = 8 * 3.35e12 * gpu.mbu
    assert c.decode_step(10, 20_000) == pytest.approx(
        gpu.step_overhead + 141.2e9 / bw + 10 * 2 * 70.6e9 / (8 * 989e12 * gpu.decode_mfu) + 20_000 * 327_680 / bw
    )
    load = c.load_time(3)
    assert load == pytest.approx(3 * 512 * 327_680 / gpu.h2d_bw)
    assert c.prefill_time(n, p, 3) == pytest.approx(
        max(load + c.prefill_compute(n, p) / 80, load / 80 + c.prefill_compute(n, p))
    )
    assert c.prefill_time(n, p, 3, layerwise=False) == pytest.approx(load + c.prefill_compute(n, p))


def test_reuse_break_even_bandwidth_is_fast25s_order():
    """FAST'25 §2.2: reusing an 8K prefix beats recomputing on 8×H800 above ~19 GB/s (at peak FLOPs)."""
    c = CostModel.from_specs(MODEL_PRESETS["dense-70b"], gpu_preset("h800", mfu=1.0))
    assert 15e9 < c.reuse_break_even_bw(8192) < 20e9


def test_hybrid_preset_has_a_small_kv_and_a_state():
    dense, hybrid = MODEL_PRESETS["dense-70b"], MODEL_PRESETS["kimi-linear-48b-a3b"]
    assert hybrid.kv_bytes_per_token * 40 < dense.kv_bytes_per_token
    c = CostModel.from_specs(hybrid, gpu_preset("h20", 2))
    assert c.kv_transfer_bytes(1000) == 1000 * hybrid.kv_bytes_per_token + hybrid.state_bytes
    with pytest.raises(ValueError, match=r"gpu: kimi-linear-48b-a3b needs 96 GB of weights"):
        gpu_preset("h20", 1).kv_budget_bytes(hybrid)


def test_layerwise_overlap_and_transfer_end():
    assert layerwise_overlap(2.0, 8.0, 4) == 8.5 and layerwise_overlap(8.0, 2.0, 4) == 8.5
    assert layerwise_overlap(2.0, 8.0, 4, layerwise=False) == 10.0
    # an idle link: the streamed transfer ends one layer's transfer after the compute
    assert transfer_end(0.0, 8.0, 2.0, 0.0, 4, True) == (8.5, 2.0)
    # a link busy until t=20: the transfer queues behind
    assert transfer_end(0.0, 8.0, 2.0, 20.0, 4, True) == (22.0, 22.0)
    assert transfer_end(0.0, 8.0, 2.0, 0.0, 4, False) == (10.0, 10.0)


def test_calibrate_recovers_coefficients():
    true = CostModel.from_specs(MODEL_PRESETS["dense-70b"], gpu_preset("h100"))
    pre = [
        (n, p, true.prefill_compute(n, p)) for n, p in [(100, 0), (2000, 0), (8000, 1000), (30000, 5000), (500, 400)]
    ]
    dec = [(b, c, true.decode_step(b, c)) for b, c in [(1, 100), (8, 5000), (64, 300_000), (128, 10_000)]]
    fit = CostModel.from_specs(MODEL_PRESETS["dense-70b"], gpu_preset("h20")).calibrate(pre, dec)
    for name in ("c0", "c1", "c2", "d0", "d1", "d2"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6), name
    with pytest.raises(ValueError, match=r"prefill_samples: expected >= 3 \(n, p, seconds\) rows"):
        true.calibrate(pre[:2])
    with pytest.raises(ValueError, match=r"prefill_samples: expected 0 <= p < n"):
        true.calibrate([(10, 20, 1.0)] * 3)
    with pytest.raises(ValueError, match=r"decode_samples: expected batch >= 1"):
        true.calibrate(decode_samples=[(0, 1, 1.0)] * 3)


# --- metrics -----------------------------------------------------------------------------------------------
def test_tbt_is_the_mean_of_the_slowest_ten_percent():
    assert tbt_from_gaps([]) == 0.0
    assert tbt_from_gaps([0.1] * 9 + [1.0]) == 1.0  # k = ceil(1.0) = 1
    assert tbt_from_gaps([0.1] * 22 + [1.0, 2.0, 3.0]) == pytest.approx(2.0)  # k = ceil(2.5) = 3
    assert tbt_from_token_times([0.0, 0.1, 0.3, 1.3]) == pytest.approx(1.0)


def test_check_conservation_catches_lost_and_duplicated_requests():
    ok = RequestResult(0, 0.0, 10, 2, "completed", first_token=1.0, finish=2.0, tbt=0.5)
    check_conservation([ok], 1)
    with pytest.raises(AssertionError, match="never ended"):
        check_conservation([ok, None], 2)
    with pytest.raises(AssertionError, match="more than once"):
        check_conservation([ok, ok], 2)
    with pytest.raises(AssertionError, match="unknown status"):
        check_conservation([RequestResult(0, 0.0, 10, 2, "running")], 1)
    with pytest.raises(AssertionError, match="no finish time"):
        check_conservation([RequestResult(0, 0.0, 10, 2, "completed")], 1)


# --- the engine ------------------------------------------------------------------------------------------------
def test_lone_request_timeline_matches_the_cost_model():
    spec = ClusterSpec(n_prefill=1, n_decode=1)
    req = Request(0, 3.0, 6000, 4, tuple(range(12)))
    res = Simulator(spec, FirstFree()).run([req]).results[0]
    c = CostModel.from_specs(spec.model, spec.gpu)
    t_pre = c.prefill_compute(6000, 0)
    assert res.ttft == pytest.approx(t_pre, rel=1e-12)
    assert res.predicted_ttft == pytest.approx(res.ttft, rel=1e-12)
    # KV streamed layer by layer over two idle NICs, then three decode steps of one request
    t_x = c.kv_transfer_bytes(6000) / spec.gpu.nic_bw
    arrive = 3.0 + layerwise_overlap(t_pre, t_x, 80) + spec.gpu.nic_latency
    steps = [c.decode_step(1, 6001 + k) for k in range(3)]
    assert res.finish == pytest.approx(arrive + sum(steps), rel=1e-12)
    gaps = [arrive + steps[0] - res.first_token, steps[1], steps[2]]
    assert res.tbt == pytest.approx(max(gaps), rel=1e-12)
    assert res.hit_blocks == 0 and res.status == "completed"


def test_ttft_estimate_equals_simulated_ttft_with_a_warm_cache():
    spec = ClusterSpec(n_prefill=2, n_decode=1, prefill_gpu_cache_blocks=4)
    keys = tuple(range(10))
    reqs = [Request(0, 0.0, 5000, 2, keys), Request(1, 100.0, 5100, 2, keys[:9] + (99,))]  # reuses 9 blocks
    out = Simulator(spec, FirstFree()).run(reqs).results
    assert out[1].hit_blocks == 9 and out[1].prefill_instance == out[0].prefill_instance
    assert out[1].ttft == pytest.approx(out[1].predicted_ttft, rel=1e-12)
    c = CostModel.from_specs(spec.model, spec.gpu)
    # blocks 6-9 are still in HBM, 0-5 were demoted to DRAM: their load overlaps the compute of the rest
    assert out[1].ttft == pytest.approx(c.prefill_time(5100, 9 * 512, dram_blocks=6), rel=1e-12)


def _naive_decode(arrivals, cost: CostModel, capacity: int, max_batch: int):
    """Reference for one decode instance: simulate every step. ``arrivals`` = (time, ctx, n_decode, kv_blocks)."""
    waiting = sorted(range(len(arrivals)), key=lambda i: (arrivals[i][0], i))
    times: dict[int, list[float]] = {i: [] for i in range(len(arrivals))}
    ctx, left, running, t, used = {}, {}, [], 0.0, 0
    while waiting or running:
        if not running:
            t = max(t, arrivals[waiting[0]][0])
        while waiting and arrivals[waiting[0]][0] <= t and len(running) < max_batch:
            i = waiting[0]
            if used + arrivals[i][3] > capacity:
                break
            waiting.pop(0)
            running.append(i)
            used += arrivals[i][3]
            ctx[i], left[i] = arrivals[i][1], arrivals[i][2]
        if not running:
            continue
        t += cost.decode_step(len(running), sum(ctx[i] for i in running))
        for i in list(running):
            times[i].append(t)
            ctx[i] += 1
            left[i] -= 1
            if left[i] == 0:
                running.remove(i)
                used -= arrivals[i][3]
    return times


@pytest.mark.parametrize("kv_blocks, max_batch", [(10**6, 256), (60, 256), (10**6, 3)])
def test_decode_epochs_match_a_step_by_step_simulation(kv_blocks, max_batch):
    """Closed-form epochs vs simulating every step: the same token times (free links, so KV lands at prefill end)."""
    gpu = gpu_preset("h800", nic_bw=1e30, nic_latency=0.0)
    spec = ClusterSpec(gpu=gpu, n_prefill=3, n_decode=1, decode_kv_blocks=kv_blocks, max_batch=max_batch)
    reqs = synthetic_trace(60, 4.0, "short", 0.5, seed=5)
    sim = Simulator(spec, FirstFree())
    res = sim.run(reqs).results
    done = [r for r in res if r.output_length > 1]
    cost = CostModel.from_specs(spec.model, gpu)
    need = [
        sim.cluster.decode_blocks(Request(0, 0.0, r.input_length, r.output_length, (0,) * r.n_blocks)) for r in done
    ]
    times = _naive_decode(
        [(r.first_token, r.input_length + 1, r.output_length - 1, k) for r, k in zip(done, need, strict=True)],
        cost,
        kv_blocks,
        max_batch,
    )
    assert len(done) > 30
    for i, r in enumerate(done):
        ts = times[i]
        assert r.finish == pytest.approx(ts[-1], rel=1e-9, abs=1e-9)
        assert r.tbt == pytest.approx(tbt_from_token_times([r.first_token, *ts]), rel=1e-9, abs=1e-12)


def test_conservation_with_requests_that_can_never_fit():
    spec = ClusterSpec(n_prefill=2, n_decode=2, decode_kv_blocks=20)  # requests above 20 blocks never fit
    reqs = synthetic_trace(80, 3.0, "conversation", 0.3, seed=2)
    result = Simulator(spec, FirstFree()).run(reqs)
    s = result.summary
    assert s["completed"] + s["rejected"] == 80 and s["rejected"] == s["rejected_kv_capacity"] > 0
    assert len({r.req_id for r in result.results}) == 80
    assert all(
        (r.status == "rejected") == (math.ceil((r.input_length + r.output_length) / 512) > 20) for r in result.results
    )


def test_coupled_instance_pauses_decode_for_prefill():
    spec = ClusterSpec(n_prefill=0, n_decode=0, n_coupled=1)
    reqs = [Request(0, 0.0, 2000, 400, tuple(range(4))), Request(1, 1.0, 60_000, 2, tuple(range(100, 218)))]
    out = Simulator(spec, FirstFree()).run(reqs).results
    c = CostModel.from_specs(spec.model, spec.gpu)
    long_prefill = c.prefill_compute(60_000, 0)
    assert out[1].ttft >= long_prefill  # waited for a step boundary, then prefilled
    assert out[0].tbt > long_prefill / math.ceil(0.1 * 399)  # the pause is one of request 0's slowest gaps
    disagg = Simulator(ClusterSpec(n_prefill=1, n_decode=1), FirstFree()).run(reqs).results
    assert disagg[0].tbt < 0.05 < out[0].tbt


def test_layerwise_streaming_shortens_the_first_gap():
    reqs = [Request(0, 0.0, 30_000, 3, tuple(range(59)))]
    on = Simulator(ClusterSpec(n_prefill=1, n_decode=1), FirstFree()).run(reqs).results[0]
    off = Simulator(ClusterSpec(n_prefill=1, n_decode=1, layerwise=False), FirstFree()).run(reqs).results[0]
    assert on.ttft == off.ttft and on.finish < off.finish


def test_simulator_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match=r"n_coupled: a coupled cluster has no separate"):
        Simulator(ClusterSpec(n_coupled=2), FirstFree())
    with pytest.raises(ValueError, match=r"n_prefill/n_decode: a disaggregated cluster needs"):
        Simulator(ClusterSpec(n_decode=0), FirstFree())
    with pytest.raises(TypeError, match=r"policy: expected a nanokimi.sim.Policy"):
        Simulator(ClusterSpec(), object())
    with pytest.raises(ValueError, match=r"tbt_slo: expected a positive finite number"):
        Simulator(ClusterSpec(), FirstFree(), tbt_slo=0)
    with pytest.raises(ValueError, match=r"request 0 has input_length 600, output_length 1 and 1 block ids"):
        Simulator(ClusterSpec(), FirstFree()).run([Request(0, 0.0, 600, 1, (1,))])

    class Bad(Policy):
        def route(self, req, cluster, now):
            return Route(prefill=cluster.decode_pool[0], decode=cluster.decode_pool[0])

    with pytest.raises(ValueError, match=r"Bad.route: request 0: prefill must be a prefill instance"):
        Simulator(ClusterSpec(), Bad()).run([Request(0, 0.0, 10, 1, (1,))])


def test_summary_metrics():
    reqs = synthetic_trace(100, 2.0, "short", 0.5, seed=0)
    res = Simulator(ClusterSpec(n_prefill=1, n_decode=1), FirstFree(), ttft_slo=1.0, tbt_slo=0.05).run(reqs)
    s = res.summary
    done = res.results
    assert s["completed"] == 100 and s["rejected"] == 0
    assert s["ttft_mean"] == pytest.approx(np.mean([r.ttft for r in done]))
    eff = sum(r.ttft <= 1.0 and r.tbt <= 0.05 for r in done)
    assert s["effective"] == eff and s["slo_attainment"] == eff / 100
    assert s["token_hit_rate"] == pytest.approx(sum(r.hit_tokens for r in done) / sum(r.input_length for r in done))
    assert s == summarize(done, 1.0, 0.05) | {"pulled_blocks": 0}
    assert len(res.samples["t"]) == len(res.samples["decode_load"]) > 10
    data = res.to_json()
    assert data["config"]["policy"] == "first_free" and "requests" not in data


def test_same_input_same_run():
    reqs = synthetic_trace(200, 6.0, seed=1)
    a = Simulator(ClusterSpec(n_prefill=2, n_decode=2), FirstFree()).run(reqs)
    b = Simulator(ClusterSpec(n_prefill=2, n_decode=2), FirstFree()).run(reqs)
    assert a.summary == b.summary and [r.finish for r in a.results] == [r.finish for r in b.results]


def test_replay_speed_smoke_1000_requests():
    reqs = load_trace(CONVERSATION, limit=1000) if CONVERSATION.exists() else synthetic_trace(1000, 3.4, seed=0)
    t = time.perf_counter()
    res = Simulator(ClusterSpec(), FirstFree()).run(reqs)
    assert res.summary["completed"] == 1000
    assert time.perf_counter() - t < 5.0  # the whole 12,031-request trace must take <= 10 s on one core


@needs_traces
@pytest.mark.slow
def test_full_conversation_replay_is_under_ten_seconds():
    reqs = load_trace(CONVERSATION)
    t = time.perf_counter()
    res = Simulator(ClusterSpec(), FirstFree()).run(reqs)
    assert time.perf_counter() - t <= 10.0
    assert res.summary["completed"] == 12_031

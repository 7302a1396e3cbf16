"""Chapter 07: the paged-attention decode kernel, the routing policies and the ``simulate`` CLI.

Kernel: parity with the float64 reference over a gathered cache (interpreter at tiny sizes; compiled bf16 on the
GPU with ragged context lengths including 1 and non-multiples of the page), poisoned outputs, bad inputs.
Policies: determinism, Conductor's choice is the minimum of its own estimates, the estimate equals the simulated
TTFT for a lone request (with a remote-prefix pull too), overload control, PrfaaS routing. Tests on Mooncake's
traces resolve them as ``<repo>/../shared/data/mooncake`` and skip when absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanokimi.serving import (
    ConductorPolicy,
    LeastLoadedPolicy,
    LocalCacheAwarePolicy,
    PrfaaSPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_paged_cache,
    make_policy,
    paged_attention_decode,
    paged_attention_reference,
    predicted_decode_load,
)
from nanokimi.serving.simulate import main as simulate_main
from nanokimi.sim import (
    MODEL_PRESETS,
    Cluster,
    ClusterSpec,
    Request,
    Simulator,
    gpu_preset,
    load_trace,
    replay_speed,
    synthetic_trace,
)
from nanokimi.testing import assert_close, poisoned_like, randn

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake"
CONVERSATION = DATA / "conversation_trace.jsonl"
needs_traces = pytest.mark.skipif(not CONVERSATION.exists(), reason=f"Mooncake traces not found under {DATA}")


# --- kernel ------------------------------------------------------------------------------------------------
def _case(lens, heads, kv_heads, dim, page, dtype, device, seed=0, spare=3):
    b, t = len(lens), max(lens)
    q = randn(b, heads, dim, seed=seed + 1, dtype=dtype, device=device)
    k = randn(b, t, kv_heads, dim, seed=seed + 2, dtype=dtype, device=device)
    v = randn(b, t, kv_heads, dim, seed=seed + 3, dtype=dtype, device=device)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    k_cache, v_cache, tables = make_paged_cache(k, v, lens_t, page, seed=seed, spare_pages=spare)
    return q, k_cache, v_cache, tables, lens_t.to(device)


@pytest.mark.parametrize(
    "lens, heads, kv_heads, dim, page, partition",
    [
        ([1], 2, 2, 16, 4, None),  # a context of one token
        ([1, 7, 13], 4, 2, 16, 4, None),  # ragged, GQA 2:1, partial last pages
        ([100, 63], 4, 1, 32, 16, None),  # GQA 4:1 (multi-query), lengths off the page grid
        ([5, 300], 2, 2, 16, 3, 128),  # odd page size; split-K: 3 partitions, one request ends in the first
        ([129, 1, 256], 8, 2, 64, 16, 128),  # a partition holding a single token
        ([40], 3, 3, 24, 8, None),  # head dim not a power of two
    ],
)
def test_paged_decode_matches_reference(device, lens, heads, kv_heads, dim, page, partition):
    q, kc, vc, tables, lens_t = _case(lens, heads, kv_heads, dim, page, torch.float32, device)
    out = poisoned_like(q)
    got = paged_attention_decode(q, kc, vc, tables, lens_t, dim**-0.5, partition_tokens=partition, out=out)
    assert got is out
    ref = paged_attention_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens_t.cpu(), dim**-0.5)
    assert_close("o", got, ref, rtol_rel=1e-5)  # fp32 (IEEE dots), over at most a few hundred tokens


def test_paged_decode_shares_prefix_pages(device):
    """Two requests whose block tables share their first pages (a shared prefix) read the same KV."""
    q, kc, vc, tables, lens_t = _case([48, 48], 2, 2, 16, 16, torch.float32, device)
    tables[1, :2] = tables[0, :2]  # request 1 now starts with request 0's first 32 tokens
    got = paged_attention_decode(q, kc, vc, tables, lens_t, 0.25)
    ref = paged_attention_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens_t.cpu(), 0.25)
    assert_close("o", got, ref, rtol_rel=1e-5)


def test_paged_decode_bad_inputs(device):
    q, kc, vc, tables, lens_t = _case([5, 9], 4, 2, 16, 4, torch.float32, device)
    call = lambda **kw: paged_attention_decode(
        kw.get("q", q), kw.get("k", kc), kw.get("v", vc), kw.get("t", tables), kw.get("n", lens_t),
        kw.get("scale", 0.25), kw.get("part"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"q: expected 3 dimensions, got 2"):
        call(q=q[0])
    with pytest.raises(TypeError, match=r"k_cache: expected dtype in \(float32\), got float16"):
        call(k=kc.half())
    with pytest.raises(ValueError, match=r"v_cache: expected shape"):
        call(v=vc[:, :2])
    with pytest.raises(ValueError, match=r"q: expected a number of heads divisible by k_cache's 2 KV heads, got 3"):
        call(q=q[:, :3])
    with pytest.raises(TypeError, match=r"block_tables: expected dtype in \(int32\), got int64"):
        call(t=tables.long())
    with pytest.raises(ValueError, match=r"block_tables: expected 2 rows"):
        call(t=tables[:1])
    with pytest.raises(ValueError, match=r"context_lens: expected values in \[1, 12\] .* got \[0, 9\]"):
        call(n=torch.tensor([0, 9], dtype=torch.int32, device=device))
    bad = tables.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(
        ValueError, match=r"block_tables: expected page ids in \[0, \d+\) for used pages, got \d+ at \(1, 0\)"
    ):
        call(t=bad)
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number, got nan"):
        call(scale=math.nan)
    with pytest.raises(ValueError, match=r"partition_tokens: expected a multiple of 128, got 100"):
        call(part=100)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads", [(16, 16), (16, 4)])
def test_paged_decode_bf16_gpu_ragged(heads, kv_heads):
    lens = [1, 15, 16, 17, 1000, 4097, 12_345, 3]
    q, kc, vc, tables, lens_t = _case(lens, heads, kv_heads, 128, 16, torch.bfloat16, "cuda", seed=4)
    out = poisoned_like(q)
    paged_attention_decode(q, kc, vc, tables, lens_t, 128**-0.5, out=out)
    ref = paged_attention_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens_t.cpu(), 128**-0.5)
    assert_close("o bf16", out, ref, rtol_rel=1e-2)  # bf16 inputs; q·scale and p rounded to bf16 for the dots


@pytest.mark.gpu
@pytest.mark.parametrize("partition", [None, 128, 1024])
def test_paged_decode_fp32_gpu_partitions(partition):
    lens = [2000, 1, 777, 4096]
    q, kc, vc, tables, lens_t = _case(lens, 8, 2, 64, 32, torch.float32, "cuda", seed=7)
    out = paged_attention_decode(q, kc, vc, tables, lens_t, 0.125, partition_tokens=partition)
    ref = paged_attention_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens_t.cpu(), 0.125)
    assert_close("o fp32", out, ref, rtol_rel=1e-5)  # IEEE fp32 dots on the GPU


@pytest.mark.gpu
def test_paged_decode_matches_sdpa_at_bench_shape():
    b, h, d, n, page = 8, 16, 128, 8192, 16
    q, kc, vc, tables, lens_t = _case([n] * b, h, 4, d, page, torch.bfloat16, "cuda", seed=9, spare=0)
    out = paged_attention_decode(q, kc, vc, tables, lens_t, d**-0.5)
    k = torch.stack([kc[tables[i].long()].reshape(n, 4, d) for i in range(b)]).transpose(1, 2)
    v = torch.stack([vc[tables[i].long()].reshape(n, 4, d) for i in range(b)]).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=d**-0.5, enable_gqa=True)
    assert_close("o vs sdpa", out, sdpa.squeeze(2).float(), rtol_rel=1e-2)


# --- policies ----------------------------------------------------------------------------------------------
def test_random_policy_is_deterministic_with_a_seed():
    reqs = synthetic_trace(150, 4.0, seed=1)
    spec = ClusterSpec(n_prefill=3, n_decode=2)
    runs = [Simulator(spec, RandomPolicy(seed)).run(reqs) for seed in (7, 7, 8)]
    place = [[(r.prefill_instance, r.decode_instance) for r in run.results] for run in runs]
    assert place[0] == place[1] and runs[0].summary == runs[1].summary
    assert place[0] != place[2]


def test_round_robin_and_least_loaded():
    reqs = synthetic_trace(40, 100.0, "short", 0.0, seed=0)
    rr = Simulator(ClusterSpec(n_prefill=4, n_decode=2), RoundRobinPolicy()).run(reqs).results
    assert [r.prefill_instance for r in rr[:8]] == [1, 2, 3, 0, 1, 2, 3, 0]
    cluster = Cluster(ClusterSpec(n_prefill=3, n_decode=1))
    cluster.prefill_pool[0].queued_work, cluster.prefill_pool[2].queued_work = 5.0, 1.0
    cluster.prefill_pool[1].queued_work = 3.0
    route = LeastLoadedPolicy().route(reqs[0], cluster, 0.0)
    assert route.prefill is cluster.prefill_pool[2]


class CheckedConductor(ConductorPolicy):
    """Asserts, at every routing decision, that the chosen instance has the smallest estimate."""

    def route(self, req, cluster, now):
        est = self.estimates(req, cluster, now)
        route = super().route(req, cluster, now)
        chosen = [e for inst, e, _ in est if inst is route.prefill]
        assert chosen and chosen[0].ttft == min(e.ttft for _, e, _ in est) == route.predicted_ttft
        self.calls = getattr(self, "calls", 0) + 1
        return route


def test_conductor_never_picks_a_worse_instance():
    reqs = synthetic_trace(300, 8.0, "conversation", 0.7, seed=3)
    policy = CheckedConductor()
    res = Simulator(ClusterSpec(n_prefill=3, n_decode=2), policy).run(reqs)
    assert policy.calls == 300 and res.summary["pulled_blocks"] > 0


def test_conductor_estimate_equals_simulated_ttft_with_a_remote_pull():
    prefix = tuple(range(19))
    reqs = [
        Request(0, 0.0, 10_000, 3, (*prefix, 900)),  # fills P0's cache with the prefix
        Request(1, 50.0, 100_000, 3, tuple(range(1000, 1196))),  # a long prefill that keeps P0 busy
        Request(2, 50.5, 9800, 3, (*prefix, 901)),  # shares 19 blocks with request 0, arrives while P0 is busy
    ]
    res = Simulator(ClusterSpec(n_prefill=2, n_decode=1), ConductorPolicy()).run(reqs)
    out = res.results
    assert [r.prefill_instance for r in out] == [0, 0, 1]
    assert out[2].hit_blocks == 19 and res.summary["pulled_blocks"] == 19  # pulled from P0, computed the rest
    for r in out:  # each was alone on its instance when routed: estimate == simulation
        assert r.ttft == pytest.approx(r.predicted_ttft, rel=1e-12)
    local = LocalCacheAwarePolicy()
    assert Simulator(ClusterSpec(n_prefill=2, n_decode=1), local).run(reqs).results[2].ttft > out[2].ttft


def test_pulled_blocks_are_replicated():
    prefix = tuple(range(19))
    reqs = [Request(0, 0.0, 10_000, 3, (*prefix, 900)), Request(1, 50.0, 100_000, 3, tuple(range(1000, 1196)))]
    reqs.append(Request(2, 50.5, 9800, 3, (*prefix, 901)))
    sim = Simulator(ClusterSpec(n_prefill=2, n_decode=1), ConductorPolicy())
    sim.run(reqs)
    for inst in sim.cluster.prefill_pool:
        assert inst.match(prefix)[0] == 19  # the hot prefix now lives on both prefill instances


def _overload_run(mode: str):
    spec = ClusterSpec(n_prefill=3, n_decode=1, decode_kv_blocks=400)
    reqs = synthetic_trace(400, 6.0, "conversation", 0.5, seed=2)
    policy = ConductorPolicy(ttft_slo=10.0, tbt_slo=0.1, rejection=mode)
    return Simulator(spec, policy, ttft_slo=10.0, tbt_slo=0.1).run(reqs).summary


def test_overload_rejection_modes():
    none, decode, early = (_overload_run(m) for m in ("none", "decode", "early"))
    assert none["rejected"] == 0 and none["tbt_p90"] > 1.0  # nobody protected: requests wait for KV memory
    assert decode["rejected_decode"] > 0 and decode["wasted_prefill_s"] > 0  # the decode side rejects late
    assert early["rejected_arrival"] > decode["rejected_arrival"]  # early rejection moves them before prefill
    assert early["rejected_decode"] < decode["rejected_decode"]
    assert early["wasted_prefill_s"] < decode["wasted_prefill_s"]
    predicted = _overload_run("predicted")
    assert predicted["completed"] + predicted["rejected"] == 400 and predicted["rejected_arrival"] > 0


def test_predicted_decode_load_departure_rules():
    cluster = Cluster(ClusterSpec(n_prefill=1, n_decode=1, decode_kv_blocks=100))
    d = cluster.decode_pool[0]
    d.B, d.C, d.kv_used = 4, 40_000, 80
    d.join_times = [0.0, 5.0, 9.0, 9.5]
    d.inflight = {7: (10.5, 2000, 5), 8: (20.0, 3000, 6)}  # only request 7 finishes prefill by t = 11
    now, t_done, t_d = 10.0, 11.0, 2.0
    # "age": joined at or before 9.0 → 3 leave; "window": joined in (8, 9] → 1 leaves; "rate": 4 · 1 / 2 = 2 leave
    for rule, leaving in (("age", 3), ("window", 1), ("rate", 2)):
        keep = (4 - leaving) / 4
        want = max(
            d.cost.decode_step(4 - leaving + 1 + 1, 40_000 * keep + 2000 + 500) / 0.1,
            (80 * keep + 5 + 3) / 100,
        )
        got = predicted_decode_load(d, now, t_done, t_d, 0.1, 1, 500, 3, departures=rule)
        assert got == pytest.approx(want), rule


def test_prfaas_offloads_long_uncached_prefills_when_the_link_allows():
    spec = ClusterSpec(
        gpu=gpu_preset("h20"), n_prefill=2, n_decode=2, n_remote_prefill=1, remote_gpu=gpu_preset("h200")
    )
    cluster = Cluster(spec)
    policy = PrfaaSPolicy(threshold_tokens=8192)
    policy.reset(cluster)
    long, short = Request(0, 0.0, 30_000, 10, tuple(range(59))), Request(1, 0.0, 2000, 10, tuple(range(100, 104)))
    assert policy.route(long, cluster, 0.0).prefill in cluster.remote_pool
    assert policy.route(short, cluster, 0.0).prefill in cluster.prefill_pool
    cluster.remote_link.free_at = 5.0  # 5 s of transfers queued on the inter-cluster link
    assert policy.route(long, cluster, 0.0).prefill in cluster.prefill_pool
    cluster.remote_link.free_at = 0.0
    cached = Request(2, 0.0, 200_000, 10, tuple(range(1000, 1391)))
    cluster.remote_pool[0].cache.insert(cached.hash_ids[:-1])  # the remote holds all but the last block
    assert (
        policy.kv_delay(
            cached, cluster, cluster.remote_pool[0], cluster.estimate_ttft(cached, cluster.remote_pool[0], 0.0), 0.0
        )
        > 1.0
    )
    assert policy.route(cached, cluster, 0.0).prefill in cluster.prefill_pool  # 65 GB of KV cannot cross in time
    res = Simulator(spec, PrfaaSPolicy()).run(synthetic_trace(200, 2.0, seed=4))
    s = res.summary
    assert 0 < s["offloaded"] < 200 and s["completed"] == 200
    assert all(r.input_length > 8192 for r in res.results if r.offloaded)  # only long prompts leave


def test_policy_arguments_are_validated():
    with pytest.raises(ValueError, match=r"name: expected one of .* got 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match=r"rejection: expected one of .* got 'sometimes'"):
        ConductorPolicy(rejection="sometimes")
    with pytest.raises(ValueError, match=r"threshold: expected a number >= 1, got 0.5"):
        ConductorPolicy(threshold=0.5)
    with pytest.raises(ValueError, match=r"departures: expected one of .* got 'never'"):
        ConductorPolicy(departures="never")
    with pytest.raises(ValueError, match=r"ttft_slo: expected a positive finite number of seconds, got -1"):
        ConductorPolicy(ttft_slo=-1)
    with pytest.raises(ValueError, match=r"threshold_tokens: expected an int >= 0, got -5"):
        PrfaaSPolicy(threshold_tokens=-5)
    with pytest.raises(ValueError, match=r"max_kv_delay: expected a positive finite number"):
        PrfaaSPolicy(max_kv_delay=0)


def test_coupled_cluster_routes_to_itself():
    reqs = synthetic_trace(60, 3.0, "short", 0.5, seed=0)
    for policy in (RandomPolicy(), RoundRobinPolicy(), LeastLoadedPolicy(), ConductorPolicy()):
        res = Simulator(ClusterSpec(n_prefill=0, n_decode=0, n_coupled=2), policy).run(reqs)
        assert res.summary["completed"] == 60
        assert all(r.prefill_instance == r.decode_instance for r in res.results if r.output_length > 1)


def test_simulate_cli_writes_table_json_and_png(tmp_path, capsys):
    rc = simulate_main(
        ["--synthetic", "120", "--rate", "4", "--policy", "all", "--loads", "1,2", "--out", str(tmp_path)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| conductor |" in printed and "| random |" in printed
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert set(data["summaries"]) == {
        "random",
        "round_robin",
        "least_loaded",
        "local_cache_aware",
        "conductor",
        "prfaas",
    }
    assert [r["load"] for r in data["goodput_vs_load"]["conductor"]] == [1.0, 2.0]
    assert (tmp_path / "simulate.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        simulate_main(["--synthetic", "10", "--policy", "nope", "--out", str(tmp_path)])


def test_hybrid_model_needs_less_transfer_for_prfaas():
    """The same offloaded prefill moves ~20× fewer bytes over the link with a Kimi-Linear-like hybrid."""
    dense = Cluster(ClusterSpec(n_remote_prefill=1, remote_gpu=gpu_preset("h200")))
    hybrid = Cluster(ClusterSpec(model=MODEL_PRESETS["kimi-linear-48b-a3b"], n_remote_prefill=1))
    ratio = dense.cost.kv_transfer_bytes(32_768) / hybrid.cost.kv_transfer_bytes(32_768)
    assert ratio > 20


@needs_traces
@pytest.mark.slow
def test_ttft_ordering_on_the_conversation_trace():
    """FAST'25 Fig. 5's ordering: random > load-balancing > local cache-aware > Conductor (4P+4D, 2× replay)."""
    reqs = replay_speed(load_trace(CONVERSATION), 2.0)
    spec = ClusterSpec(n_prefill=4, n_decode=4)
    ttft = {
        name: Simulator(spec, make_policy(name)).run(reqs).summary["ttft_mean"]
        for name in ("random", "least_loaded", "local_cache_aware", "conductor")
    }
    assert ttft["random"] > ttft["least_loaded"] > ttft["local_cache_aware"] > ttft["conductor"]

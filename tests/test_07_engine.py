"""Chapter 07's live engine: greedy outputs equal ``TinyKimi.generate``; paged KV, prefix sharing, batching, metrics.

Equality runs on an untrained cpu-tiny TinyKimi (3 KDA + 1 MoBA layer, Block AttnRes, MoE) in float64 for the
reference backend, so near-tied logits cannot flip a token, and in float32 for the Triton kernel (the
interpreter has no float64). Prompts share prefixes, have lengths 1, one page plus one token, exact multiples of
the page, and arrive while others decode.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.serving.engine import (
    Engine,
    PagedKVCache,
    _PagedAttention,
    block_keys,
    main,
    serve,
)
from nanokimi.sim import tbt_from_token_times
from nanokimi.testing import assert_close, randn

PAGE = 16
# The engine's two workers share the CPU; one intra-op thread each keeps them from oversubscribing it.
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype: torch.dtype) -> TinyKimi:
    torch.manual_seed(0)
    return TinyKimi(TinyKimiConfig.preset("cpu-tiny")).to(dtype).eval()


@pytest.fixture(scope="module")
def model64() -> TinyKimi:
    return _model(torch.float64)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(3, 71, (40,), generator=g).tolist()
    return [
        [1, *base[:35]],  # 36 tokens: two full pages and a partial one
        [1, *base[:35], 5, 6, 7],  # shares the first two pages → hits 32 tokens
        [1, 4, 5],
        [1, *base[:31]],  # exactly two pages: the last is recomputed, so it hits one page
        [1, *base[:32]],  # one token past two pages: hits one page (never a 1-token prefill chunk)
        [1],
        [1, *base[:15], *[9] * 17],  # shares only the first page
    ]


EXPECTED_HITS = [0, 32, 0, 16, 16, 0, 16]


def test_reference_backend_equals_generate_with_prefix_hits_and_late_arrivals(model64):
    prompts = _prompts()
    want = model64.generate(prompts, 10, temperature=0)  # default EOS: some rows stop early
    assert any(len(w) < 10 for w in want), "the test should exercise EOS: pick prompts where some row emits it"
    report = serve(model64, prompts, 10, arrivals=[0, 0, 0.02, 0.02, 0.05, 0.05, 0.05], page_size=PAGE, timeout=60)
    assert report.outputs == want
    assert [r.hit_tokens for r in report.results] == EXPECTED_HITS
    assert [r.hit_blocks for r in report.results] == [h // PAGE for h in EXPECTED_HITS]
    assert all(r.status == "completed" for r in report.results)
    assert report.summary["token_hit_rate"] == pytest.approx(sum(EXPECTED_HITS) / sum(map(len, prompts)))
    # Every page went back to the allocator; the two keyed blocks of prompt 0 stay cached for later hits.
    assert report.pool["in_use"] == 0 and report.pool["shared"] == 0
    assert report.pool["free"] + report.pool["cached"] == report.pool["pages"]
    assert report.pool["keyed"] == 2
    cfg = model64.cfg  # a checkpoint per keyed block: 3 KDA layers × (state H·d·d fp64 + conv tails 3·(W−1)·H·d)
    d = cfg.d_model // cfg.n_heads
    per_block = 3 * (cfg.n_heads * d * d + 3 * (cfg.kda_conv_size - 1) * cfg.n_heads * d) * 8
    assert report.pool["checkpoint_bytes"] == 2 * per_block
    assert report.pool["kv_bytes_per_page"] == 2 * PAGE * cfg.n_heads * d * 8  # one attention layer, K and V


def test_triton_backend_equals_generate():
    model = _model(torch.float32)
    prompts = _prompts()[:4]
    want = model.generate(prompts, 4, temperature=0, eos_id=None)
    report = serve(model, prompts, 4, page_size=PAGE, backend="triton", eos_id=None, timeout=120)
    assert report.outputs == want
    assert max(len(s.req_ids) for s in report.steps) > 1


def test_other_layer_patterns_and_residuals():
    # Dense attention ("A") first, standard residual, dense FFN; then attention only (no KDA state to hand over).
    for pattern, residual in (("AK", "standard"), ("A", "full")):
        torch.manual_seed(3)
        cfg = TinyKimiConfig.preset("cpu-tiny", pattern=pattern, n_layers=2, residual=residual, ffn="dense")
        model = TinyKimi(cfg).double().eval()
        prompts = _prompts()[:3]
        want = model.generate(prompts, 5, temperature=0, eos_id=None)
        report = serve(model, prompts, 5, page_size=PAGE, eos_id=None, timeout=60)
        assert report.outputs == want, pattern
        assert report.results[1].hit_tokens == 32


def test_requests_join_while_others_decode(model64):
    prompts = _prompts()
    long_budget = 30
    want_long = model64.generate([prompts[0]], long_budget, temperature=0, eos_id=None)[0]
    want_late = model64.generate(prompts[2:4], 5, temperature=0, eos_id=None)
    with Engine(model64, page_size=PAGE, eos_id=None) as engine:
        first = engine.submit(prompts[0], long_budget)
        deadline = time.perf_counter() + 30
        while engine.tokens_so_far(first) < 3:  # it is decoding now
            assert time.perf_counter() < deadline, "the first request never started decoding"
            time.sleep(0.002)
        late = [engine.submit(p, 5) for p in prompts[2:4]]
        outputs = engine.wait([first, *late], timeout=60)
    assert outputs == [want_long, *want_late]
    steps = engine.report().steps
    joined = [s for s in steps if first in s.req_ids and set(late) & set(s.req_ids)]
    assert joined, f"no decode step ran the first request together with a late one: {[s.req_ids for s in steps]}"
    assert steps[0].req_ids == [first]


def test_small_pool_waits_evicts_and_rejects(model64):
    # 5 pages of 16 tokens. Prompts 0–2 take all 5 (prompt 1 shares two of prompt 0's), so prompt 3 waits for a
    # release; the fresh 60-token prompt needs every page, so it waits for all and evicts the 2 cached prefix
    # pages; the last prompt needs 14 pages and is rejected without waiting.
    fresh = torch.randint(3, 71, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = [*_prompts()[:4], fresh, [1] * 200]
    want = model64.generate(prompts[:5], 6, temperature=0, eos_id=None)
    report = serve(model64, prompts, 6, page_size=PAGE, n_pages=5, max_batch=2, eos_id=None, timeout=60)
    assert report.outputs[:5] == want and report.outputs[5] == []
    assert [r.hit_tokens for r in report.results[:5]] == [0, 32, 0, 16, 0]
    last = report.results[5]
    assert last.status == "rejected" and last.reject_stage == "kv_capacity" and math.isnan(last.ttft)
    assert report.summary["completed"] == 5 and report.summary["rejected_kv_capacity"] == 1
    assert max(len(s.req_ids) for s in report.steps) <= 2
    assert report.pool["evictions"] == 2
    assert report.pool["in_use"] == 0 and report.pool["free"] + report.pool["cached"] == 5


def test_metrics_follow_the_simulator_definitions(model64):
    report = serve(model64, _prompts()[:3], 5, arrivals=[0, 0.01, 0.02], page_size=PAGE, eos_id=None, timeout=60)
    for r, times in zip(report.results, report.token_times, strict=True):
        assert len(times) == r.output_length == 5
        assert all(b >= a for a, b in zip(times[:-1], times[1:], strict=True))
        assert r.first_token == times[0] and r.finish == times[-1]
        assert 0 < r.ttft <= r.e2e
        assert r.tbt == tbt_from_token_times(times) > 0
        assert r.prefill_seconds > 0
    assert report.summary["ttft_mean"] == pytest.approx(sum(r.ttft for r in report.results) / 3)
    assert report.summary["completed"] == 3 and report.summary["output_tokens_per_s"] > 0
    assert [s for s, _, _ in report.prefill_samples] == [36, 39, 3]
    batch, context, seconds = report.decode_samples()[0]
    assert batch >= 1 and context >= 36 and seconds > 0
    assert "TTFT" in report.table() and "TBT" in report.table()
    one = serve(model64, [[1, 5, 6]], 1, page_size=PAGE, timeout=60)  # the first token comes out of prefill
    assert one.outputs == model64.generate([[1, 5, 6]], 1, temperature=0) and one.steps == []
    assert one.results[0].tbt == 0.0 and one.pool["in_use"] == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_view_through_the_layer_hook_matches_the_layer_with_ragged_contexts(backend):
    """One batched decode step with ``{"paged": view}`` (what ``_decode_step`` passes) vs MoBAAttention's own decode
    over its cache dict, request by request (lengths 5, 16, 21)."""
    dtype = torch.float64 if backend == "reference" else torch.float32  # the interpreter has no fp64
    model = _model(dtype)
    layer = model.layers[3]  # the MoBA layer
    lens = [5, 16, 21]
    cache = PagedKVCache([3], n_pages=8, page_size=8, n_heads=4, head_dim=32, dtype=dtype)
    tables = [[6, 1, 0], [3, 7, 0], [2, 4, 5]]  # scattered pages; the padding entries are never read
    want, new = [], []
    with torch.no_grad():
        for b, n in enumerate(lens):
            h = randn(1, n + 1, 128, seed=10 + b, dtype=dtype)
            kv = {}
            layer.mixer_sublayer(h[:, :n], kv)  # prefill n tokens
            cache.write(3, tables[b], 0, kv["k"][0], kv["v"][0])
            want.append(layer.mixer_sublayer(h[:, n:], kv))  # the layer's decode step: [1, 1, D]
            new.append((h[:, n:], kv["k"][0, -1], kv["v"][0, -1]))
        paged = _PagedAttention(cache, 3, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens), backend)
        got = layer.mixer_sublayer(torch.cat([x for x, _, _ in new]), {"paged": paged})  # [3, 1, D]
    assert_close("paged decode step", got, torch.cat(want), rtol_rel=1e-12 if dtype == torch.float64 else 1e-5)
    for b, n in enumerate(lens):  # the new token's K/V landed in page table[n // 8], row n % 8
        page, row = tables[b][n // 8], n % 8
        assert_close("k written", cache.k[3][page, row], new[b][1], rtol_rel=1e-12 if dtype == torch.float64 else 1e-6)
        assert_close("v written", cache.v[3][page, row], new[b][2], rtol_rel=1e-12 if dtype == torch.float64 else 1e-6)


def test_paged_cache_refcounts_prefix_sharing_and_lru_reuse():
    cache = PagedKVCache([3], n_pages=4, page_size=2, n_heads=1, head_dim=2)
    keys = block_keys([1, 2, 3, 4, 5], 2)  # blocks [1,2] [3,4] [5]
    table_a, hit = cache.admit(keys, max_hit=2, pages=3)
    assert hit == 0 and cache.refcount[table_a[0]] == 1
    k = torch.arange(10.0).view(5, 1, 2)
    cache.write(3, table_a, 0, k, -k)
    assert cache.register(table_a[0], keys[0], "ckpt0") and cache.register(table_a[1], keys[1], "ckpt1")
    assert not cache.register(table_a[0], keys[0], "again")
    table_b, hit = cache.admit(keys, max_hit=2, pages=3)  # shares both full blocks, needs one fresh page
    assert hit == 2 and table_b[:2] == table_a[:2]
    assert [cache.refcount[p] for p in table_a[:2]] == [2, 2] and cache.stats()["shared"] == 2
    got_k, got_v = cache.gather(3, table_b, 4)
    assert torch.equal(got_k, k[:4]) and torch.equal(got_v, -k[:4])
    assert cache.checkpoint(table_b[1]) == "ckpt1"
    assert cache.admit(keys, max_hit=0, pages=1) is None  # 0 free pages left: nothing taken
    cache.release(table_a)
    assert [cache.refcount[p] for p in table_a[:2]] == [1, 1]  # still used by b
    assert cache.stats()["free"] == 1
    cache.release(table_b)  # last user: keyed pages become cached (hittable), the others free
    assert cache.stats() == {
        "pages": 4, "in_use": 0, "shared": 0, "cached": 2, "free": 2, "keyed": 2, "evictions": 0,
        "kv_bytes_per_page": 2 * 2 * 1 * 2 * 4, "checkpoint_bytes": 0,  # K and V, 2 rows × 1 head × 2 dims fp32
    }  # fmt: skip
    table_c, hit = cache.admit(block_keys([7, 7, 7], 2), max_hit=1, pages=3)  # no hit: takes 2 free + 1 cached
    assert hit == 0 and cache.evictions == 1
    # Released tail first, so the evicted page is block [3,4]; block [1,2] can still be hit.
    table_d, hit = cache.admit(keys, max_hit=2, pages=1)
    assert hit == 1 and table_d == table_a[:1]
    with pytest.raises(RuntimeError, match="released twice"):
        cache.release(table_d + table_d)


def test_block_keys_identify_prefixes():
    a = block_keys([1, 2, 3, 4, 5, 6, 7], 3)
    b = block_keys([1, 2, 3, 4, 5, 6, 9], 3)
    c = block_keys([1, 2, 0, 4, 5, 6, 7], 3)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert all(x != y for x, y in zip(a, c, strict=True))  # a change in block 0 changes every later key
    assert block_keys([1, 2, 3], 3)[0] != block_keys([1, 2], 3)[0]  # partial vs full block


def test_cli_prints_ttft_tbt_and_checks_generate(capsys):
    assert main(["--requests", "3", "--max-new-tokens", "3", "--rate", "0", "--prefix-len", "20", "--check"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "seed 0" in out
    assert "TTFT mean" in out and "TBT mean" in out
    assert "identical to TinyKimi.generate (greedy): yes" in out


def test_worker_failure_reaches_the_client(model64, monkeypatch):
    engine = Engine(model64, page_size=PAGE)

    def broken(running):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_decode_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        with engine:
            engine.submit([1, 5, 6], 4)
            engine.wait(timeout=30)


def test_bad_inputs(model64):
    with pytest.raises(TypeError, match="model"):
        Engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        Engine(model64, backend="cuda")
    with pytest.raises(ValueError, match="page_size"):
        Engine(model64, page_size=0)
    with pytest.raises(ValueError, match="eos_id"):
        Engine(model64, eos_id=500)
    engine = Engine(model64)
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit([1, 2], 3)
    with engine:
        with pytest.raises(ValueError, match="prompt"):
            engine.submit([], 3)
        with pytest.raises(ValueError, match=r"prompt: expected token ids in \[0, 71\)"):
            engine.submit([1, 71], 3)
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit([1, 2], 0)
        with pytest.raises(ValueError, match="req_ids"):
            engine.wait([7])
    with pytest.raises(ValueError, match="arrivals"):
        serve(model64, [[1], [1]], 2, arrivals=[0.1, 0.0])
    with pytest.raises(ValueError, match="arrivals"):
        serve(model64, [[1]], 2, arrivals=[math.inf])
    with pytest.raises(ValueError, match="max_new_tokens"):
        serve(model64, [[1], [1]], [2])

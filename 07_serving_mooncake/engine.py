"""The live engine: TinyKimi served for real, with a paged KV cache, prefix sharing and continuous batching.

The simulator (``nanokimi.sim``) models a serving cluster; this module *is* one (one node, two workers)::

    submit() ─► request queue ─► prefill worker ──── handoff ────► decode worker ─► tokens, TTFT/TBT
                                 prefix match by hash          (block table,        one token per running
                                 chunked prefill of the rest    KDA state,          request per step; requests
                                 first token                    first token)        join and leave between steps
                                        │                                                │
                                        └──────────── PagedKVCache (shared page pool) ───┘

Paged KV (attention layers). Each attention layer owns a pool ``k, v: [n_pages, P, H, D]``; a request owns a block
table of page ids, and token ``t`` sits in page ``table[t // P]``, row ``t % P``. Pages for the whole request
(``n + max_new − 1`` tokens: the last output token is never fed back) are reserved when its prefill starts, so
decode never runs out of memory mid-request (the simulator reserves the same way).

Prefix sharing. Full prompt blocks are keyed by a hash chain, ``key_i = blake2b(key_{i−1} ‖ tokens of block i)``
(Mooncake's ``hash_ids``): equal keys mean equal prefixes. A new request takes the longest run of leading keys
found in the pool, adds one reference to each of those pages and prefills only the rest. A page goes back to the
allocator when its last reference is released; a keyed page keeps its contents there and can still be hit until the
allocator reuses it (least recently released first). Tables are released tail first, so a prefix outlives its
continuations.

Linear layers (KDA) have no per-token KV: a request carries its state ``S [H, d, d]`` and the short-convolution
tail instead. A prefix hit must restore that state too, so every keyed block stores a *checkpoint* of every KDA
layer's state at its end (the hybrid's price for prefix caching, as in PrfaaS). Prefill therefore runs in
page-aligned chunks, ``model(chunk, caches)``, each continuing from the cache dicts of the chunk before; a final
chunk of one token is merged into the previous one, because one token after a non-empty cache is a decode step
for MoBA (dense attention) and the engine must compute what ``TinyKimi.generate``'s one-shot prefill computes.

Decode. The decode worker keeps up to ``max_batch`` running requests. One step feeds each its last token, at
position ``n_b`` (tokens already cached), through ``model(tokens [B, 1], caches)``: KDA layers run batched from
per-request state slots; attention layers get ``{"paged": view}`` (``MoBAAttention``'s hook for KV it does not
keep), whose ``attend`` writes the new k, v into the request's page and attends over its ``n_b + 1`` cached tokens,
with the chapter's
``paged_attention_reference`` (``backend="reference"``) or the Triton ``paged_attention_decode``
(``backend="triton"``). Greedy tokens equal ``TinyKimi.generate(prompts, temperature=0)``.

Metrics (``nanokimi.sim.metrics``, FAST'25 §5): ``TTFT = first token − arrival`` (arrival = ``submit``);
``TBT`` = mean of the slowest ``ceil(10%)`` inter-token gaps; ``E2E = last token − arrival``. Requests and outcomes
are the simulator's ``Request`` and ``RequestResult``, so ``summarize`` and ``CostModel.calibrate`` apply as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import TOKENIZER
from nanokimi.model import TinyKimi, TinyKimiConfig
from nanokimi.serving.kernels import paged_attention_decode
from nanokimi.serving.reference import gather_kv, paged_attention_reference
from nanokimi.sim.metrics import RequestResult, summarize, tbt_from_token_times
from nanokimi.sim.requests import Request

__all__ = ["block_keys", "PagedKVCache", "Engine", "ServeReport", "DecodeStep", "serve", "main"]

BACKENDS = ("reference", "triton")


def block_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """Chained keys of the ``ceil(n / P)`` blocks of ``tokens`` (the last may be partial).

    ``key_i = blake2b(key_{i−1} ‖ tokens[i·P : (i+1)·P])`` with ``key_{−1}`` empty, so ``key_i`` identifies the whole
    prefix ``tokens[: (i+1)·P]``; a partial block hashes fewer bytes and never equals a full one.
    """
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens), page_size):
        block = np.asarray(tokens[start : start + page_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


class PagedKVCache:
    """A pool of ``n_pages`` KV pages per attention layer, reference counts, and a prefix index.

    ``k[layer], v[layer]: [n_pages, page_size, n_heads, head_dim]``. Thread-safe: the prefill and decode workers
    share it. A page is *in use* (refcount > 0), *cached* (refcount 0 but still keyed: it can be hit, and is
    reclaimed least recently released first) or *free*.
    """

    def __init__(
        self,
        layers: Sequence[int],
        n_pages: int,
        page_size: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.n_pages = check_positive_int("n_pages", n_pages)
        self.page_size = check_positive_int("page_size", page_size)
        check_positive_int("n_heads", n_heads)
        check_positive_int("head_dim", head_dim)
        shape = (n_pages, page_size, n_heads, head_dim)
        self.k = {l: torch.zeros(shape, dtype=dtype, device=device) for l in layers}
        self.v = {l: torch.zeros(shape, dtype=dtype, device=device) for l in layers}
        self.refcount = [0] * n_pages
        self._free: deque[int] = deque(range(n_pages))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount-0 keyed pages, least recently released first
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._checkpoints: dict[int, object] = {}
        self._cv = threading.Condition()
        self.evictions = 0

    def admit(self, keys: Sequence[bytes], max_hit: int, pages: int) -> tuple[list[int], int] | None:
        """Reserve a block table of ``pages`` pages whose first ``h ≤ max_hit`` are the cached pages of ``keys[:h]``.

        Hit pages gain a reference (shared), the rest are fresh (refcount 1). Returns ``(table, h)``, or None when
        the pool cannot supply the fresh pages now (nothing is taken then).
        """
        with self._cv:
            hit: list[int] = []
            for key in keys[:max_hit]:
                page = self._page_of.get(key)
                if page is None:
                    break
                hit.append(page)
            reclaimable = len(self._free) + len(self._cached) - sum(self.refcount[p] == 0 for p in hit)
            if pages - len(hit) > reclaimable:
                return None
            for page in hit:
                if self.refcount[page] == 0:
                    del self._cached[page]
                self.refcount[page] += 1
            fresh = [self._take_page() for _ in range(pages - len(hit))]
            for page in fresh:
                self.refcount[page] = 1
            return hit + fresh, len(hit)

    def _take_page(self) -> int:
        if self._free:
            return self._free.popleft()
        page, _ = self._cached.popitem(last=False)  # the least recently released keyed page
        del self._page_of[self._key_of.pop(page)]
        del self._checkpoints[page]
        self.evictions += 1
        return page

    def register(self, page: int, key: bytes, checkpoint: object) -> bool:
        """Key a full, written page so later requests can hit it; False if the key (or the page) is already keyed."""
        with self._cv:
            if key in self._page_of or page in self._key_of:
                return False
            self._page_of[key], self._key_of[page], self._checkpoints[page] = page, key, checkpoint
            return True

    def checkpoint(self, page: int) -> object:
        """What ``register`` stored with a keyed page (the KDA states at the end of its block)."""
        with self._cv:
            return self._checkpoints[page]

    def release(self, table: Sequence[int]) -> None:
        """Drop one reference to each page of a block table; pages nobody uses any more go back to the allocator."""
        with self._cv:
            for page in reversed(table):  # tail first: the shared prefix is reclaimed last
                if self.refcount[page] <= 0:
                    raise RuntimeError(f"release: page {page} has no reference left (released twice?)")
                self.refcount[page] -= 1
                if self.refcount[page] == 0:
                    if page in self._key_of:
                        self._cached[page] = None
                    else:
                        self._free.append(page)
            self._cv.notify_all()

    def wait_for_release(self, timeout: float) -> None:
        """Block until some table is released (or ``timeout`` seconds pass)."""
        with self._cv:
            self._cv.wait(timeout)

    def gather(self, layer: int, table: Sequence[int], n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n_tokens`` keys and values of one request, in order: two ``[n_tokens, H, D]`` tensors."""
        pages = torch.tensor(table, dtype=torch.long, device=self.k[layer].device)
        return gather_kv(self.k[layer], pages, n_tokens), gather_kv(self.v[layer], pages, n_tokens)

    def write(self, layer: int, table: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [T, H, D]`` as tokens ``start … start + T − 1`` of the request with block table ``table``."""
        positions = range(start, start + k.shape[0])
        device = self.k[layer].device
        pages = torch.tensor([table[t // self.page_size] for t in positions], dtype=torch.long, device=device)
        rows = torch.tensor([t % self.page_size for t in positions], dtype=torch.long, device=device)
        self.k[layer][pages, rows] = k
        self.v[layer][pages, rows] = v

    def stats(self) -> dict:
        """Page counts (in use, shared by > 1 request, cached, free, keyed), evictions, and bytes: the KV of one page
        over all attention layers, and all checkpoints held (what prefix caching costs beyond the KV)."""
        with self._cv:
            return {
                "pages": self.n_pages,
                "in_use": sum(r > 0 for r in self.refcount),
                "shared": sum(r > 1 for r in self.refcount),
                "cached": len(self._cached),
                "free": len(self._free),
                "keyed": len(self._key_of),
                "evictions": self.evictions,
                "kv_bytes_per_page": sum(_nbytes(t[0]) for t in (*self.k.values(), *self.v.values())),
                "checkpoint_bytes": _nbytes(list(self._checkpoints.values())),
            }


def _nbytes(obj: object) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


@dataclass
class DecodeStep:
    """One decode step: wall-clock start/end (seconds since the engine started), who ran, their cached tokens."""

    start: float
    end: float
    req_ids: list[int]
    context_tokens: int


@dataclass
class _Live:
    """A request between submit and finish (what the prefill worker hands to the decode worker, and more)."""

    request: Request
    prompt: list[int]
    max_new: int
    keys: list[bytes]
    table: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens whose KV/state is in the caches (the last output token is not, yet)
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    kda: dict[int, dict] = field(default_factory=dict)  # KDA layer → {"state": [1, H, d, d], "conv": 3 × [1, W−1, C]}
    hit_blocks: int = 0
    prefill_seconds: float = 0.0
    slot: int = -1


@dataclass
class ServeReport:
    """What a run measured: outputs and outcomes in submission order, the decode steps, the pool's counters."""

    outputs: list[list[int]]
    results: list[RequestResult]
    token_times: list[list[float]]
    summary: dict
    steps: list[DecodeStep]
    prefill_samples: list[tuple[int, int, float]]  # (prompt tokens n, prefix hit p, seconds): CostModel.calibrate
    pool: dict
    backend: str

    def decode_samples(self) -> list[tuple[int, int, float]]:
        """``(batch, context tokens, seconds)`` of every decode step, the other input of ``CostModel.calibrate``."""
        return [(len(s.req_ids), s.context_tokens, s.end - s.start) for s in self.steps]

    def table(self) -> str:
        """Per-request TTFT/TBT/E2E and the summary, as text."""
        lines = [f"{'req':>4} {'prompt':>6} {'hit':>4} {'out':>4} {'TTFT ms':>9} {'TBT ms':>8} {'E2E ms':>8}"]
        for r in self.results:
            if r.status != "completed":
                lines.append(f"{r.req_id:>4} {r.input_length:>6} {'':>4} {'':>4} rejected ({r.reject_stage})")
                continue
            lines.append(
                f"{r.req_id:>4} {r.input_length:>6} {r.hit_tokens:>4} {r.output_length:>4} {1e3 * r.ttft:>9.1f} "
                f"{1e3 * r.tbt:>8.1f} {1e3 * r.e2e:>8.1f}"
            )
        s = self.summary
        batch = np.mean([len(st.req_ids) for st in self.steps]) if self.steps else 0.0
        lines += [
            f"TTFT mean {1e3 * s['ttft_mean']:.1f} ms · p90 {1e3 * s['ttft_p90']:.1f} ms   "
            f"TBT mean {1e3 * s['tbt_mean']:.1f} ms · p90 {1e3 * s['tbt_p90']:.1f} ms   "
            f"E2E mean {1e3 * s['e2e_mean']:.1f} ms",
            f"{s['completed']}/{s['requests']} completed · {s['output_tokens_per_s']:.1f} output tokens/s · "
            f"{len(self.steps)} decode steps, mean batch {batch:.2f} · prefix hit rate {s['token_hit_rate']:.3f} of "
            f"prompt tokens · SLO attainment {s['slo_attainment']:.2f} (TTFT ≤ {s['ttft_slo']} s, TBT ≤ {s['tbt_slo']} s)",
            f"pool: {self.pool}",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "summary": self.summary,
            "pool": self.pool,
            "requests": [r.as_dict() | {"tokens": o} for r, o in zip(self.results, self.outputs, strict=True)],
            "token_times": self.token_times,
            "steps": [vars(s) for s in self.steps],
            "prefill_samples": self.prefill_samples,
        }


class _PagedAttention:
    """One decode step's view of one attention layer's pages, passed as ``{"paged": view}`` to ``MoBAAttention``.

    ``positions [B]``: tokens already cached per request (the new token's position); ``tables [B, max_pages]``.
    """

    def __init__(self, cache: PagedKVCache, layer: int, tables: torch.Tensor, positions: torch.Tensor, backend: str):
        self.cache, self.layer, self.tables, self.positions, self.backend = cache, layer, tables, positions, backend

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``[B, 1, H, D]`` (RoPE applied) → ``o [B, 1, H, D]`` over each request's ``positions + 1`` tokens;
        stores the new k, v in the pages first."""
        if q.shape[1] != 1:
            raise ValueError(f"q: expected one new token per request (a decode step), got shape {tuple(q.shape)}")
        page_size = self.cache.page_size
        rows = torch.arange(q.shape[0], device=q.device)
        pages = self.tables[rows, self.positions // page_size].long()
        k_pages, v_pages = self.cache.k[self.layer], self.cache.v[self.layer]
        k_pages[pages, self.positions % page_size] = k[:, 0]
        v_pages[pages, self.positions % page_size] = v[:, 0]
        lens = (self.positions + 1).to(torch.int32)
        scale = 1.0 / math.sqrt(q.shape[-1])  # MoBAAttention's softmax scale
        if self.backend == "triton":
            # A fixed split-K partition: the launcher would otherwise time candidates for every new (batch, table
            # width) shape, and those change from step to step. The engine wrote the tables, so skip their check.
            o = paged_attention_decode(
                q[:, 0].contiguous(),
                k_pages,
                v_pages,
                self.tables,
                lens,
                scale,
                partition_tokens=512,
                check_values=False,
            )
        else:
            o = paged_attention_reference(q[:, 0], k_pages, v_pages, self.tables, lens, scale).to(q.dtype)
        return o[:, None]


class Engine:
    """Serve a TinyKimi: ``submit`` prompts from any thread, ``wait`` for their tokens, ``report`` the metrics.

    ``page_size`` tokens per KV page and prefix block (a multiple of the model's KDA chunk size keeps prefill's
    chunks aligned with ``generate``'s); ``n_pages`` pages per attention layer; ``max_batch`` requests per decode
    step; ``backend`` ``"reference"`` or ``"triton"`` for attention over the pages; ``eos_id`` ends a request (kept
    in its output; None: only ``max_new_tokens`` does). Greedy decoding. Use as a context manager, or
    ``start()`` / ``close()``.
    """

    def __init__(
        self,
        model: TinyKimi,
        *,
        page_size: int = 16,
        n_pages: int = 256,
        max_batch: int = 8,
        backend: str = "reference",
        eos_id: int | None = TOKENIZER.eos_id,
    ):
        if not isinstance(model, TinyKimi):
            raise TypeError(f"model: expected a TinyKimi, got {type(model).__name__}")
        check_positive_int("page_size", page_size)
        check_positive_int("n_pages", n_pages)
        self.max_batch = check_positive_int("max_batch", max_batch)
        self.backend = check_in("backend", backend, BACKENDS)
        vocab = model.cfg.vocab_size
        if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
            raise ValueError(f"eos_id: expected None or a token id in [0, {vocab}), got {eos_id!r}")
        self.model, self.eos_id = model, eos_id
        self.attention_layers = [i for i, layer in enumerate(model.layers) if layer.kind in "MA"]
        self.kda_layers = [i for i, layer in enumerate(model.layers) if layer.kind == "K"]
        weight = model.embed.weight
        mixers = [model.layers[i].mixer for i in self.attention_layers]
        self.cache = PagedKVCache(
            self.attention_layers,
            n_pages,
            page_size,
            mixers[0].n_heads if mixers else 1,
            mixers[0].head_dim if mixers else 1,
            dtype=weight.dtype,
            device=weight.device,
        )
        self.page_size = page_size
        self._requests: queue.Queue[_Live | None] = queue.Queue()
        self._handoffs: queue.Queue[_Live | None] = queue.Queue()
        self._cv = threading.Condition()  # guards the bookkeeping below
        self._live: dict[int, _Live] = {}
        self._results: dict[int, RequestResult] = {}
        self._outputs: dict[int, list[int]] = {}
        self._times: dict[int, list[float]] = {}
        self._order: list[int] = []
        self.steps: list[DecodeStep] = []
        self.prefill_samples: list[tuple[int, int, float]] = []
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        # KDA layer → decode slots {"state": [max_batch, H, d, d], "conv": 3 × [max_batch, W−1, C]}
        self._slots: dict[int, dict] = {}
        self._t0 = 0.0

    # --- client side ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the prefill and decode worker threads (the engine's clock starts here)."""
        if self._threads:
            raise RuntimeError("start: an Engine starts once (this one is running or closed); create a new one")
        self._was_training = self.model.training
        self.model.eval()
        self._t0 = time.perf_counter()
        self._threads = [
            threading.Thread(target=self._worker, args=(self._prefill_loop,), name="prefill", daemon=True),
            threading.Thread(target=self._worker, args=(self._decode_loop,), name="decode", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def now(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self._t0

    def submit(self, prompt: Sequence[int], max_new_tokens: int) -> int:
        """Queue a prompt (token ids, starting with ``<bos>``); returns its request id. Arrival time is now."""
        if not self._threads or self._closed:
            raise RuntimeError("submit: the engine is not running (use it as a context manager or call start())")
        tokens = [int(t) for t in prompt]
        vocab = self.model.cfg.vocab_size
        if not tokens:
            raise ValueError("prompt: expected at least one token (start it with <bos>), got none")
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"prompt: expected token ids in [0, {vocab}), got min {min(tokens)} max {max(tokens)}")
        check_positive_int("max_new_tokens", max_new_tokens)
        keys = block_keys(tokens, self.page_size)
        with self._cv:
            req_id = len(self._order)
            hash_ids = tuple(int.from_bytes(k[:8], "little") for k in keys)
            live = _Live(
                Request(req_id, self.now(), len(tokens), max_new_tokens, hash_ids), tokens, max_new_tokens, keys
            )
            self._live[req_id] = live
            self._order.append(req_id)
        self._requests.put(live)
        return req_id

    def tokens_so_far(self, req_id: int) -> int:
        """How many output tokens request ``req_id`` has produced."""
        with self._cv:
            if req_id in self._live:
                return len(self._live[req_id].tokens)
            return self._results[req_id].output_length if req_id in self._results else 0

    def wait(self, req_ids: Sequence[int] | None = None, timeout: float | None = None) -> list[list[int]]:
        """Block until the requests (all submitted ones by default) have ended; their output tokens, in order.

        A rejected request gives an empty list. Raises RuntimeError if a worker failed, TimeoutError on timeout.
        """
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cv:
            ids = list(self._order) if req_ids is None else list(req_ids)
            unknown = [i for i in ids if i not in self._live and i not in self._results]
            if unknown:
                raise ValueError(f"req_ids: unknown request ids {unknown}")
            while self._error is None and any(i not in self._results for i in ids):
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"wait: requests still running after {timeout} s")
                self._cv.wait(left)
            if self._error is not None:
                raise RuntimeError(f"the engine's worker failed: {self._error!r}") from self._error
            return [list(self._outputs[i]) for i in ids]

    def close(self) -> None:
        """Finish the queued work, stop the workers and restore the model's train/eval mode.

        Raises RuntimeError if a worker failed.
        """
        if not self._closed and self._threads:
            self._requests.put(None)
            for t in self._threads:
                t.join()
            self.model.train(self._was_training)
        self._closed = True
        if self._error is not None:
            raise RuntimeError(f"the engine's worker failed: {self._error!r}") from self._error

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except RuntimeError:
            if exc_type is None:  # otherwise the exception already on its way out says more
                raise

    def report(self, ttft_slo: float = 1.0, tbt_slo: float = 0.25) -> ServeReport:
        """Outcomes of every request submitted so far (all must have ended) and ``summarize``'s metrics."""
        with self._cv:
            pending = [i for i in self._order if i not in self._results]
            if pending:
                raise RuntimeError(f"report: {len(pending)} requests have not ended yet (call wait() first)")
            results = [self._results[i] for i in self._order]
            outputs = [list(self._outputs[i]) for i in self._order]
            times = [list(self._times[i]) for i in self._order]
        return ServeReport(
            outputs,
            results,
            times,
            summarize(results, ttft_slo, tbt_slo),
            list(self.steps),
            list(self.prefill_samples),
            self.cache.stats(),
            self.backend,
        )

    # --- workers -------------------------------------------------------------------------------------------
    def _worker(self, loop) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                loop()
        except BaseException as err:  # surfaced to wait()/close() in the client's thread
            with self._cv:
                if self._error is None:  # keep the first failure, not the other worker's reaction to it
                    self._error = err
                self._cv.notify_all()
            self._handoffs.put(None)

    def _finish(self, live: _Live, status: str = "completed", reject_stage: str | None = None) -> None:
        """Record a request's outcome and give its pages back."""
        if live.table:
            self.cache.release(live.table)
        r = live.request
        done = status == "completed"
        result = RequestResult(
            r.req_id,
            r.arrival,
            r.input_length,
            len(live.tokens),
            status,
            reject_stage=reject_stage,
            first_token=live.token_times[0] if done else math.nan,
            finish=live.token_times[-1] if done else math.nan,
            tbt=tbt_from_token_times(live.token_times) if done else math.nan,
            prefill_instance=0,
            decode_instance=0 if done else -1,
            hit_blocks=live.hit_blocks,
            hit_tokens=live.hit_blocks * self.page_size,
            n_blocks=r.n_blocks,
            prefill_seconds=live.prefill_seconds,
        )
        with self._cv:
            self._outputs[r.req_id], self._times[r.req_id] = live.tokens, live.token_times
            self._results[r.req_id] = result
            del self._live[r.req_id]
            self._cv.notify_all()

    def _emit(self, live: _Live, token: int, when: float) -> bool:
        """Append an output token; True when the request is done (EOS or its token budget)."""
        with self._cv:
            live.tokens.append(token)
            live.token_times.append(when)
        return (self.eos_id is not None and token == self.eos_id) or len(live.tokens) == live.max_new

    def _prefill_loop(self) -> None:
        while True:
            live = self._requests.get()
            if live is None or self._error is not None:
                self._handoffs.put(None)
                return
            if self._prefill(live):
                self._handoffs.put(live)

    def _prefill(self, live: _Live) -> bool:
        """Admit, prefill and emit the first token of one request; True when it goes on to decode."""
        n, size = len(live.prompt), self.page_size
        pages = math.ceil((n + live.max_new - 1) / size)
        if pages > self.cache.n_pages:
            self._finish(live, "rejected", "kv_capacity")
            return False
        # Recompute at least the last prompt token (its logits give the first output token), and never leave a
        # single token after a non-empty cache (that would be a decode step, not prefill).
        max_hit = (n - 1) // size
        if max_hit and (n - 1) % size == 0:
            max_hit -= 1
        while (admitted := self.cache.admit(live.keys, max_hit, pages)) is None:
            if self._error is not None:
                raise RuntimeError("prefill: stopped while waiting for KV pages")
            self.cache.wait_for_release(0.05)
        live.table, live.hit_blocks = admitted
        start = time.perf_counter()
        logits = self._prefill_chunks(live, live.hit_blocks * size)
        first = int(logits.float().argmax())
        live.prefill_seconds = time.perf_counter() - start
        self.prefill_samples.append((n, live.hit_blocks * size, live.prefill_seconds))
        live.n_cached = n
        if self._emit(live, first, self.now()):
            self._finish(live)
            return False
        return True

    def _prefill_chunks(self, live: _Live, hit: int) -> torch.Tensor:
        """Run the prompt from token ``hit`` on, in page-aligned chunks; store KV, key full blocks; last logits [V]."""
        model, size, n = self.model, self.page_size, len(live.prompt)
        caches = model.new_caches()
        if hit:
            for i in self.attention_layers:
                k, v = self.cache.gather(i, live.table, hit)
                caches[i] = {"k": k[None], "v": v[None]}
            checkpoint = self.cache.checkpoint(live.table[hit // size - 1])
            for i in self.kda_layers:
                saved = checkpoint[i]
                caches[i] = {"state": saved["state"].clone(), "conv": saved["conv"], "n_tokens": hit}
        bounds = [*range(hit, n, size), n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]  # a one-token last chunk joins the chunk before it
        device = model.embed.weight.device
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            tokens = torch.tensor([live.prompt[a:b]], dtype=torch.long, device=device)
            logits, _ = model(tokens, caches=caches)  # [1, b − a, V]
            for i in self.attention_layers:
                self.cache.write(i, live.table, a, caches[i]["k"][0, a:b], caches[i]["v"][0, a:b])
            if b % size == 0 and b - a == size:  # the chunk is exactly one full prompt block: key it
                checkpoint = {
                    i: {"state": caches[i]["state"].clone(), "conv": tuple(c.clone() for c in caches[i]["conv"])}
                    for i in self.kda_layers
                }
                self.cache.register(live.table[b // size - 1], live.keys[b // size - 1], checkpoint)
        live.kda = {i: {"state": caches[i]["state"], "conv": caches[i]["conv"]} for i in self.kda_layers}
        return logits[0, -1]

    def _decode_loop(self) -> None:
        running: list[_Live] = []
        free_slots = list(range(self.max_batch - 1, -1, -1))
        waiting: deque[_Live] = deque()
        draining = False
        while True:
            while not draining:  # collect handoffs: block only when there is nothing to run
                try:
                    item = self._handoffs.get(block=not running and not waiting, timeout=0.05)
                except queue.Empty:
                    if running or waiting or self._error is not None:
                        break
                    continue
                if item is None:
                    draining = True
                else:
                    waiting.append(item)
            if self._error is not None:
                return
            while waiting and free_slots:  # continuous batching: join between steps
                live = waiting.popleft()
                live.slot = free_slots.pop()
                self._load_state(live)
                running.append(live)
            if not running:
                if draining:
                    return
                continue
            for live in self._decode_step(running):
                running.remove(live)
                free_slots.append(live.slot)
                self._finish(live)

    def _load_state(self, live: _Live) -> None:
        """Copy a handed-over request's KDA state into its decode slot."""
        for i, saved in live.kda.items():
            if i not in self._slots:
                self._slots[i] = {
                    "state": saved["state"].new_zeros((self.max_batch, *saved["state"].shape[1:])),
                    "conv": tuple(c.new_zeros((self.max_batch, *c.shape[1:])) for c in saved["conv"]),
                }
            slot = self._slots[i]
            slot["state"][live.slot] = saved["state"][0]
            for pool, c in zip(slot["conv"], saved["conv"], strict=True):
                pool[live.slot] = c[0]
        live.kda = {}

    def _decode_step(self, running: list[_Live]) -> list[_Live]:
        """Feed every running request its last token; returns the requests that finished."""
        model, device = self.model, self.model.embed.weight.device
        start = self.now()
        slots = torch.tensor([live.slot for live in running], dtype=torch.long, device=device)
        tokens = torch.tensor([live.tokens[-1] for live in running], dtype=torch.long, device=device)
        positions = torch.tensor([live.n_cached for live in running], dtype=torch.long, device=device)
        width = max(len(live.table) for live in running)
        tables = torch.tensor([live.table + [0] * (width - len(live.table)) for live in running], dtype=torch.int32)
        tables = tables.to(device)
        kda_caches = {
            i: {"state": s["state"][slots], "conv": tuple(c[slots] for c in s["conv"])} for i, s in self._slots.items()
        }
        caches = [
            kda_caches[i]
            if layer.kind == "K"
            else {"paged": _PagedAttention(self.cache, i, tables, positions, self.backend)}
            for i, layer in enumerate(model.layers)
        ]
        logits = model(tokens[:, None], caches=caches)[0][:, -1]  # [B, V]
        chosen = logits.float().argmax(dim=-1).tolist()
        for i, c in kda_caches.items():
            self._slots[i]["state"][slots] = c["state"].to(self._slots[i]["state"].dtype)
            for pool, new in zip(self._slots[i]["conv"], c["conv"], strict=True):
                pool[slots] = new
        end = self.now()
        self.steps.append(
            DecodeStep(start, end, [live.request.req_id for live in running], int(positions.sum()) + len(running))
        )
        finished = []
        for live, token in zip(running, chosen, strict=True):
            live.n_cached += 1
            if self._emit(live, token, end):
                finished.append(live)
        return finished


def serve(
    model: TinyKimi,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    arrivals: Sequence[float] | None = None,
    *,
    ttft_slo: float = 1.0,
    tbt_slo: float = 0.25,
    timeout: float | None = None,
    **engine_kwargs,
) -> ServeReport:
    """Serve ``prompts`` (submitted at ``arrivals`` seconds after the start, default all at once) and report.

    ``max_new_tokens``: one budget for all or one per prompt; ``engine_kwargs`` go to :class:`Engine`.
    """
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts: expected at least one prompt, got none")
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    when = [0.0] * n if arrivals is None else [float(a) for a in arrivals]
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens: expected an int or {n} budgets (one per prompt), got {len(budgets)}")
    if len(when) != n:
        raise ValueError(f"arrivals: expected {n} times (one per prompt), got {len(when)}")
    if any(not math.isfinite(a) or a < 0 for a in when) or any(b < a for a, b in zip(when[:-1], when[1:], strict=True)):
        raise ValueError(f"arrivals: expected finite, non-negative, non-decreasing seconds, got {when}")
    with Engine(model, **engine_kwargs) as engine:
        for prompt, budget, at in zip(prompts, budgets, when, strict=True):
            delay = at - engine.now()
            if delay > 0:
                time.sleep(delay)
            engine.submit(prompt, budget)
        engine.wait(timeout=timeout)
    return engine.report(ttft_slo, tbt_slo)


# --- CLI ----------------------------------------------------------------------------------------------------
def _synthetic_prompts(n: int, prefix_len: int, share: float, max_suffix: int, rng: np.random.Generator) -> list:
    """``<bos>`` + a common prefix (with probability ``share``) + a random suffix of 1…``max_suffix`` tokens."""
    low = len(TOKENIZER.SPECIALS)
    prefix = rng.integers(low, TOKENIZER.vocab_size, prefix_len).tolist()
    prompts = []
    for _ in range(n):
        suffix = rng.integers(low, TOKENIZER.vocab_size, int(rng.integers(1, max_suffix + 1))).tolist()
        head = prefix if rng.random() < share else []
        prompts.append([TOKENIZER.bos_id, *head, *suffix])
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanokimi.serving.engine",
        description="Serve a TinyKimi with the live engine (paged KV, prefix sharing, continuous batching) and "
        "print measured TTFT/TBT per request.",
    )
    p.add_argument("--ckpt", type=Path, help="a nanokimi.train checkpoint (ckpt.pt); default: an untrained cpu-tiny")
    p.add_argument("--requests", type=int, default=12, help="number of requests")
    p.add_argument(
        "--max-new-tokens", type=int, help="output budget per request (default: the task's longest answer + EOS, or 16)"
    )
    p.add_argument("--rate", type=float, default=20.0, help="Poisson arrival rate, requests/s (0: all at once)")
    p.add_argument("--backend", choices=BACKENDS, default="reference", help="attention over the pages")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--pages", type=int, default=256, help="KV pages per attention layer")
    p.add_argument("--max-batch", type=int, default=8, help="requests per decode step")
    p.add_argument("--prefix-len", type=int, default=40, help="synthetic prompts: tokens of the shared prefix")
    p.add_argument("--prefix-share", type=float, default=0.7, help="synthetic prompts: fraction that share it")
    p.add_argument("--max-suffix", type=int, default=24, help="synthetic prompts: longest own suffix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    p.add_argument("--tbt-slo", type=float, default=0.25, help="seconds")
    p.add_argument("--check", action="store_true", help="also run TinyKimi.generate and compare the tokens")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_positive_int("requests", args.requests)
    check_positive_int("threads", args.threads)
    if not (math.isfinite(args.rate) and args.rate >= 0):
        raise ValueError(f"rate: expected a finite number >= 0, got {args.rate}")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    eos_id = TOKENIZER.eos_id
    task = None
    if args.ckpt is not None:
        from nanokimi.train import load_model

        model, task = load_model(args.ckpt, device=args.device)
        examples = task.examples("test", args.requests, seed=args.seed)
        prompts = [TOKENIZER.encode(ex.prompt, bos=True) for ex in examples]
        budget = task.max_response_len() + 1 if args.max_new_tokens is None else args.max_new_tokens
        print(f"serving {args.ckpt} ({task!r}), {model.num_parameters():,} parameters")
    else:
        torch.manual_seed(args.seed)
        model = TinyKimi(TinyKimiConfig.preset("cpu-tiny")).to(args.device).eval()
        prompts = _synthetic_prompts(args.requests, args.prefix_len, args.prefix_share, args.max_suffix, rng)
        budget = 16 if args.max_new_tokens is None else args.max_new_tokens
        eos_id = None  # an untrained model's EOS is noise: run every request to its budget
        print(
            f"no --ckpt: serving an UNTRAINED cpu-tiny TinyKimi built with seed {args.seed} "
            f"({model.num_parameters():,} parameters); its tokens are noise, the timings are real"
        )
    arrivals = (
        np.cumsum(rng.exponential(1.0 / args.rate, args.requests)).tolist() if args.rate > 0 else [0.0] * args.requests
    )
    check_positive_int("max_new_tokens", budget)
    report = serve(
        model,
        prompts,
        budget,
        arrivals,
        ttft_slo=args.ttft_slo,
        tbt_slo=args.tbt_slo,
        page_size=args.page_size,
        n_pages=args.pages,
        max_batch=args.max_batch,
        backend=args.backend,
        eos_id=eos_id,
    )
    print(f"backend {args.backend} · page size {args.page_size} · {args.requests} requests at {args.rate}/s")
    print(report.table())
    status = 0
    if task is not None:
        correct = sum(
            task.check(TOKENIZER.decode(p[1:]), TOKENIZER.decode(o))
            for p, o in zip(prompts, report.outputs, strict=True)
        )
        print(f"task: {correct}/{len(prompts)} responses correct")
    if args.check:
        reference = model.generate(prompts, budget, temperature=0, eos_id=eos_id)
        same = reference == report.outputs
        print(f"outputs identical to TinyKimi.generate (greedy): {'yes' if same else 'NO'}")
        status = 0 if same else 1
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=1))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""KVCache pools in blocks: an LRU pool, a two-tier (GPU HBM + host DRAM) cache, and the trace hit rate.

A request can reuse the KV of its *longest run of leading blocks* already cached: block keys are chained prefix
hashes, so block ``i`` is only useful if blocks ``0..i−1`` are too, and the match stops at the first miss.

Tiers (one ``TieredCache`` per instance, exclusive): new blocks enter the GPU pool; the GPU pool's least recently
used blocks are demoted to the DRAM pool; the DRAM pool's LRU blocks are dropped. A hit in DRAM costs a
host-to-device load before (or, layer-wise, while) prefill runs; a hit in the GPU pool is free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from nanokimi.sim.requests import BLOCK_TOKENS, Request

__all__ = ["LRUBlockPool", "TieredCache", "prefix_hit_rate", "leading_hits"]


def _check_capacity(name: str, capacity: int | None) -> None:
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"{name}: expected None (infinite) or an int >= 0 blocks, got {capacity!r}")


class LRUBlockPool:
    """A set of block keys with least-recently-used eviction; ``capacity=None`` is infinite."""

    __slots__ = ("capacity", "_blocks")

    def __init__(self, capacity: int | None):
        _check_capacity("capacity", capacity)
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def keys_lru_first(self) -> list[int]:
        """Keys from least to most recently used."""
        return list(self._blocks)

    def insert(self, key: int) -> list[int]:
        """Make ``key`` the most recently used block (adding it if absent); return the keys evicted for room."""
        blocks = self._blocks
        if key in blocks:
            blocks.move_to_end(key)
            return []
        if self.capacity == 0:
            return [key]
        blocks[key] = None
        evicted = []
        if self.capacity is not None:
            while len(blocks) > self.capacity:
                evicted.append(blocks.popitem(last=False)[0])
        return evicted

    def remove(self, key: int) -> bool:
        """Drop ``key``; returns whether it was present."""
        if key in self._blocks:
            del self._blocks[key]
            return True
        return False


def leading_hits(keys: Sequence[int], contains) -> int:
    """Length of the longest run of leading ``keys`` for which ``contains(key)`` holds."""
    n = 0
    for k in keys:
        if not contains(k):
            break
        n += 1
    return n


class TieredCache:
    """An instance's prefix cache: an LRU pool in GPU memory over an LRU pool in host DRAM (exclusive tiers)."""

    __slots__ = ("gpu", "dram")

    def __init__(self, gpu_blocks: int | None, dram_blocks: int | None):
        _check_capacity("gpu_blocks", gpu_blocks)
        _check_capacity("dram_blocks", dram_blocks)
        self.gpu = LRUBlockPool(gpu_blocks)
        self.dram = LRUBlockPool(dram_blocks)

    def __contains__(self, key: int) -> bool:
        return key in self.gpu._blocks or key in self.dram._blocks

    def match(self, keys: Sequence[int]) -> tuple[int, int]:
        """``(hit_blocks, dram_blocks)``: the leading run cached in either tier, and how many of it sit in DRAM."""
        gpu, dram = self.gpu._blocks, self.dram._blocks
        hit = in_dram = 0
        for k in keys:
            if k in gpu:
                hit += 1
            elif k in dram:
                hit += 1
                in_dram += 1
            else:
                break
        return hit, in_dram

    def insert(self, keys: Iterable[int]) -> None:
        """The blocks a prefill used or produced: all become most recent in the GPU tier (DRAM copies promoted)."""
        gpu, dram = self.gpu, self.dram
        for k in keys:
            dram._blocks.pop(k, None)
            for old in gpu.insert(k):
                dram.insert(old)

    def insert_dram(self, keys: Iterable[int]) -> None:
        """Blocks copied in from another instance land in DRAM (unless already in the GPU tier)."""
        gpu, dram = self.gpu._blocks, self.dram
        for k in keys:
            if k not in gpu:
                dram.insert(k)

    def __len__(self) -> int:
        return len(self.gpu) + len(self.dram)


def prefix_hit_rate(
    requests: Sequence[Request], capacity_blocks: int | None = None, block_tokens: int = BLOCK_TOKENS
) -> tuple[float, float]:
    """``(token_rate, block_rate)`` of one shared prefix cache replayed in arrival order.

    Each request hits its longest run of leading blocks already in the cache,
    ``hit_tokens = min(hit_blocks · block_tokens, input_length)``, then all its blocks are inserted (most recent
    last). ``token_rate = Σ hit_tokens / Σ input_length``, ``block_rate = Σ hit_blocks / Σ n_blocks``. The cache is
    infinite when ``capacity_blocks`` is None, else LRU with that many blocks.
    """
    _check_capacity("capacity_blocks", capacity_blocks)
    if not requests:
        raise ValueError("requests: expected at least one request, got an empty sequence")
    hit_tok = tot_tok = hit_blk = tot_blk = 0
    if capacity_blocks is None:
        seen: set[int] = set()
        for r in sorted(requests, key=lambda r: r.arrival):
            k = leading_hits(r.hash_ids, seen.__contains__)
            hit_blk += k
            tot_blk += len(r.hash_ids)
            hit_tok += min(k * block_tokens, r.input_length)
            tot_tok += r.input_length
            seen.update(r.hash_ids)
    else:
        pool = LRUBlockPool(capacity_blocks)
        for r in sorted(requests, key=lambda r: r.arrival):
            k = leading_hits(r.hash_ids, pool.__contains__)
            hit_blk += k
            tot_blk += len(r.hash_ids)
            hit_tok += min(k * block_tokens, r.input_length)
            tot_tok += r.input_length
            for key in r.hash_ids:
                pool.insert(key)
    return hit_tok / tot_tok, hit_blk / max(tot_blk, 1)

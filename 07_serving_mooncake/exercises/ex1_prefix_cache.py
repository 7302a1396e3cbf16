"""Exercise 1 (easy): chained block keys, and the prefix-cache hit rate of a trace.

Task. Mooncake never compares prompts token by token. It cuts each prompt into blocks of ``P`` tokens (512 in
its traces) and gives block ``i`` a key that hashes the block's tokens *together with the key of block i − 1*::

    key_0 = H(ROOT, tokens[0 : P])
    key_i = H(key_{i−1}, tokens[i·P : (i+1)·P])            i = 1 … ⌈n / P⌉ − 1   (the last block may be partial)

Because of the chain, equal ``key_i`` means equal prompts up to the end of block ``i``: a cache of blocks keyed
this way can serve a request its *longest run of leading blocks* already cached, and the run stops at the first
miss (a later block with a matching key would be useless without the KV before it).

1. ``block_keys(tokens, block_tokens)``: the ``⌈n / P⌉`` chained keys of one prompt, as Python ints. Any hash
   ``H`` of (previous key, block tokens) will do (``hash`` of a tuple is fine and repeatable for ints).
2. ``hit_rate(requests, capacity_blocks, block_tokens)``: replay ``requests`` (``nanokimi.sim.Request``; use
   ``r.hash_ids``, ``r.input_length``) through ONE shared cache in arrival order::

       h_r          = the number of leading keys of r found in the cache (stop at the first miss)
       hit_tokens_r = min(h_r · P, n_r)                      (a fully cached partial last block counts n_r tokens)
       token_rate   = Σ_r hit_tokens_r / Σ_r n_r,      block_rate = Σ_r h_r / Σ_r len(keys_r)

   After its lookup, every key of ``r`` (in order) is inserted. ``capacity_blocks=None`` is an infinite cache;
   an int ``C`` is an LRU cache of ``C`` keys: inserting a key makes it the most recently used (a key already
   there is *refreshed*, not added twice), and while more than ``C`` keys are held the least recently used one
   is evicted. ``C = 0`` caches nothing.

Shapes: ``tokens`` is a sequence of n ≥ 1 ints; the result of 1 is a tuple of ⌈n / P⌉ ints. 2 returns a tuple
``(token_rate, block_rate)`` of floats.

Hints. ``collections.OrderedDict`` is an LRU list: ``move_to_end(key)`` refreshes, ``popitem(last=False)`` evicts
the oldest. Requests may come in any order: sort them by ``arrival`` (stable, so equal arrivals keep their order).
Do not call ``nanokimi.sim.prefix_hit_rate`` or ``LRUBlockPool``: they are what you are rebuilding (the grader
compares with them).
"""

from __future__ import annotations

from collections import OrderedDict  # noqa: F401 (yours to use)
from collections.abc import Sequence

from nanokimi.sim import BLOCK_TOKENS, Request

ROOT = 0  # the "previous key" of block 0


def block_keys(tokens: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> tuple[int, ...]:
    """The chained keys of a prompt: ``key_i = H(key_{i−1}, tokens of block i)``, one per (possibly partial) block."""
    # YOUR CODE HERE (roughly 6 lines)
    raise NotImplementedError


def hit_rate(
    requests: Sequence[Request], capacity_blocks: int | None = None, block_tokens: int = BLOCK_TOKENS
) -> tuple[float, float]:
    """``(token_rate, block_rate)`` of one shared prefix cache (infinite, or LRU of ``capacity_blocks`` keys)."""
    # YOUR CODE HERE (roughly 22 lines)
    raise NotImplementedError

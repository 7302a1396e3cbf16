"""Requests and traces: Mooncake's JSONL trace format, a validating loader and a synthetic generator.

A request is what a serving system sees before it runs anything: when it arrived, how long its prompt is, how
many tokens it will generate, and one *block key* per ``block_tokens``-token block of its prompt. Keys are chained
prefix hashes (block ``i``'s key hashes the block's tokens together with every token before it), so two requests
whose first ``k`` keys are equal share their first ``k · block_tokens`` prompt tokens and can share that KVCache.

Mooncake's trace format (FAST'25 release, one JSON object per line)::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 2, 3, 4, 48, 49, 50, 51, 52]}

``timestamp`` is in milliseconds since the trace start, lengths are tokens, and
``len(hash_ids) == ceil(input_length / 512)``. Inside the simulator time is in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanokimi.checks import check_positive_int

__all__ = ["BLOCK_TOKENS", "Request", "LengthDist", "LENGTH_PRESETS", "load_trace", "synthetic_trace", "replay_speed"]

BLOCK_TOKENS = 512  # tokens per hashed block in Mooncake's traces


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request (engine-agnostic: the simulator and a live engine both consume it).

    ``arrival`` is in seconds; the first output token comes out of prefill, the other ``output_length − 1`` out
    of decode steps. ``hash_ids[i]`` keys prompt tokens ``[i·block_tokens, (i+1)·block_tokens)``.
    """

    req_id: int
    arrival: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.hash_ids)


def _bad(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _int_field(obj: dict, key: str, where: str, minimum: int) -> int:
    if key not in obj:
        raise _bad(where, f"missing field {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise _bad(where, f"{key}: expected an integer, got {v!r}")
    if v < minimum:
        raise _bad(where, f"{key}: expected an integer >= {minimum}, got {v}")
    return int(v)


def load_trace(path: str | Path, block_tokens: int = BLOCK_TOKENS, limit: int | None = None) -> list[Request]:
    """Read a Mooncake-format JSONL trace, validating every line.

    Each line must be a JSON object with an integer ``timestamp`` (ms, ≥ 0, non-decreasing), ``input_length``
    (≥ 1), ``output_length`` (≥ 1) and a list of integer ``hash_ids`` with
    ``len(hash_ids) == ceil(input_length / block_tokens)``. Any violation raises ``ValueError`` naming the file,
    the line number and the field. Blank lines are skipped. ``limit`` keeps the first ``limit`` requests.
    Returns requests with ``req_id`` = their 0-based order in the file and ``arrival`` in seconds.
    """
    check_positive_int("block_tokens", block_tokens)
    if limit is not None:
        check_positive_int("limit", limit)
    path = Path(path)
    requests: list[Request] = []
    last_ts = 0
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(where, f"bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _bad(where, f"expected a JSON object, got {type(obj).__name__}")
            ts = _int_field(obj, "timestamp", where, 0)
            n_in = _int_field(obj, "input_length", where, 1)
            n_out = _int_field(obj, "output_length", where, 1)
            if ts < last_ts:
                raise _bad(where, f"timestamp: expected non-decreasing timestamps, got {ts} after {last_ts}")
            last_ts = ts
            ids = obj.get("hash_ids")
            if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
                raise _bad(where, f"hash_ids: expected a list of integers, got {ids!r:.80}")
            want = math.ceil(n_in / block_tokens)
            if len(ids) != want:
                raise _bad(
                    where,
                    f"hash_ids: expected ceil(input_length / {block_tokens}) = {want} block ids for "
                    f"input_length {n_in}, got {len(ids)}",
                )
            requests.append(Request(len(requests), ts / 1000.0, n_in, n_out, tuple(ids)))
            if limit is not None and len(requests) == limit:
                break
    if not requests:
        raise ValueError(f"{path}: expected at least one request, got an empty trace")
    return requests


@dataclass(frozen=True)
class LengthDist:
    """Log-normal prompt and output lengths, clipped: ``len = clip(round(median · exp(sigma · z)), min, max)``.

    ``sigma = 0`` gives a fixed length. For a log-normal, ``mean = median · exp(sigma² / 2)``.
    """

    input_median: float
    input_sigma: float
    input_min: int
    input_max: int
    output_median: float
    output_sigma: float
    output_min: int
    output_max: int

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        z_in, z_out = rng.standard_normal(n), rng.standard_normal(n)
        n_in = np.clip(np.rint(self.input_median * np.exp(self.input_sigma * z_in)), self.input_min, self.input_max)
        n_out = np.clip(
            np.rint(self.output_median * np.exp(self.output_sigma * z_out)), self.output_min, self.output_max
        )
        return n_in.astype(np.int64), n_out.astype(np.int64)


# "conversation" matches the conversation trace's median prompt (6.9K) and mean (12K, so sigma = sqrt(2 ln(12035 /
# 6909)) = 1.05), its ~350-token outputs and its 126K longest prompt; "short" is a chat-sized workload.
LENGTH_PRESETS: dict[str, LengthDist] = {
    "conversation": LengthDist(6909, 1.05, 64, 126_000, 350, 0.6, 1, 2000),
    "short": LengthDist(512, 0.8, 16, 4096, 128, 0.7, 1, 1024),
}


def synthetic_trace(
    n: int,
    rate: float,
    length_dist: str | LengthDist = "conversation",
    prefix_sharing: float = 0.5,
    seed: int = 0,
    block_tokens: int = BLOCK_TOKENS,
) -> list[Request]:
    """A locally made trace: Poisson arrivals at ``rate`` requests/s and log-normal lengths.

    With probability ``prefix_sharing`` a request continues an earlier one (uniform over the last 64, as a
    conversation's next turn does): it reuses the earlier prompt's whole blocks as its prefix and appends a fresh
    suffix drawn from ``length_dist``; otherwise its prompt is all fresh. Fresh blocks get new keys, so
    ``prefix_sharing = 0`` gives a trace with no reuse at all. Same seed, same trace.
    """
    check_positive_int("n", n)
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate: expected a positive finite number of requests per second, got {rate!r}")
    if not (isinstance(prefix_sharing, int | float) and 0.0 <= prefix_sharing <= 1.0):
        raise ValueError(f"prefix_sharing: expected a probability in [0, 1], got {prefix_sharing!r}")
    check_positive_int("block_tokens", block_tokens)
    if isinstance(length_dist, str):
        if length_dist not in LENGTH_PRESETS:
            raise ValueError(
                f"length_dist: expected one of {sorted(LENGTH_PRESETS)} or a LengthDist, got {length_dist!r}"
            )
        dist = LENGTH_PRESETS[length_dist]
    elif isinstance(length_dist, LengthDist):
        dist = length_dist
    else:
        raise TypeError(f"length_dist: expected a preset name or a LengthDist, got {type(length_dist).__name__}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))  # Poisson process: exponential gaps
    fresh_in, n_out = dist.sample(rng, n)
    share = rng.random(n) < prefix_sharing
    parent_pick = rng.integers(0, 64, n)
    next_key = 0
    requests: list[Request] = []
    for i in range(n):
        prefix: tuple[int, ...] = ()
        if share[i] and requests:
            window = requests[-64:]
            parent = window[int(parent_pick[i]) % len(window)]
            prefix = parent.hash_ids[: parent.input_length // block_tokens]  # whole blocks only
        n_in = len(prefix) * block_tokens + int(fresh_in[i])
        n_new = math.ceil(n_in / block_tokens) - len(prefix)
        keys = prefix + tuple(range(next_key, next_key + n_new))
        next_key += n_new
        requests.append(Request(i, float(arrivals[i]), n_in, int(n_out[i]), keys))
    return requests


def replay_speed(requests: Sequence[Request], speed: float) -> list[Request]:
    """The same requests arriving ``speed`` times faster (arrival / speed): Mooncake replays traces at 2×."""
    if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed: expected a positive finite factor, got {speed!r}")
    return [Request(r.req_id, r.arrival / speed, r.input_length, r.output_length, r.hash_ids) for r in requests]

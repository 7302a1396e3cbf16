"""Per-request outcomes and the serving metrics (engine-agnostic: the simulator and a live engine both fill them).

- TTFT: first token time − arrival. The first token comes out of prefill.
- TBT (FAST'25 §5): the mean of the slowest 10% of a request's inter-token gaps, ``k = ceil(0.1 · n_gaps)`` of
  them (at least one); a request with one output token has no gaps and TBT 0.
- E2E: last token time − arrival.
- Effective request (FAST'25): completed with TTFT ≤ TTFT SLO and TBT ≤ TBT SLO. SLO attainment = effective
  requests / all requests; goodput = effective requests per second of the run (first arrival → last event).
- Prefix-cache hit rate: Σ hit tokens / Σ prompt tokens (token level) and Σ hit blocks / Σ blocks (block level)
  over the requests that were prefilled.
- Rejections: by stage (at arrival, at decode after prefill, or because the KV can never fit); the prefill
  seconds spent on requests rejected after prefill are wasted work.

Every request must end exactly once, completed or rejected: ``check_conservation`` raises otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["RequestResult", "tbt_from_gaps", "tbt_from_token_times", "summarize", "check_conservation"]

COMPLETED, REJECTED = "completed", "rejected"


@dataclass(slots=True)
class RequestResult:
    """How one request ended. Times are seconds; NaN where a quantity does not apply (e.g. TTFT of a rejection)."""

    req_id: int
    arrival: float
    input_length: int
    output_length: int
    status: str  # "completed" or "rejected"
    reject_stage: str | None = None  # "arrival", "decode" or "kv_capacity" when rejected
    first_token: float = math.nan
    finish: float = math.nan
    tbt: float = math.nan
    prefill_instance: int = -1
    decode_instance: int = -1
    hit_blocks: int = 0
    hit_tokens: int = 0
    n_blocks: int = 0
    prefill_seconds: float = 0.0  # GPU seconds of prefill spent on this request (wasted if rejected afterwards)
    predicted_ttft: float = math.nan  # the router's estimate, when it made one
    offloaded: bool = False  # prefilled on a remote (PrfaaS) instance

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ttft"], d["e2e"] = self.ttft, self.e2e
        return d


def tbt_from_gaps(gaps: Sequence[float] | np.ndarray) -> float:
    """Mean of the slowest ``ceil(10%)`` inter-token gaps (FAST'25's TBT); 0.0 for no gaps."""
    g = np.asarray(gaps, dtype=np.float64)
    if g.size == 0:
        return 0.0
    k = max(1, math.ceil(0.1 * g.size))
    return float(np.partition(g, g.size - k)[g.size - k :].mean())


def tbt_from_token_times(token_times: Sequence[float]) -> float:
    """TBT from the wall-clock times of every output token (first token included), as a live engine records."""
    return tbt_from_gaps(np.diff(np.asarray(token_times, dtype=np.float64)))


def check_conservation(results: Sequence[RequestResult | None], n_requests: int) -> None:
    """Raise AssertionError unless each of the ``n_requests`` requests ended exactly once, completed or rejected."""
    if len(results) != n_requests:
        raise AssertionError(f"conservation: {len(results)} outcomes for {n_requests} requests")
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise AssertionError(f"conservation: {len(missing)} requests never ended (first at position {missing[0]})")
    ids = [r.req_id for r in results]
    if len(set(ids)) != len(ids):
        raise AssertionError("conservation: a request ended more than once")
    bad = [r.req_id for r in results if r.status not in (COMPLETED, REJECTED)]
    if bad:
        raise AssertionError(f"conservation: request {bad[0]} ended with an unknown status")
    done = sum(r.status == COMPLETED for r in results)
    rejected = sum(r.status == REJECTED for r in results)
    if done + rejected != n_requests:
        raise AssertionError(f"conservation: {done} completed + {rejected} rejected != {n_requests} requests")
    unfinished = [r.req_id for r in results if r.status == COMPLETED and not math.isfinite(r.finish)]
    if unfinished:
        raise AssertionError(f"conservation: completed request {unfinished[0]} has no finish time")


def _stats(x: np.ndarray, prefix: str) -> dict:
    if x.size == 0:
        return {
            f"{prefix}_mean": math.nan,
            f"{prefix}_p50": math.nan,
            f"{prefix}_p90": math.nan,
            f"{prefix}_p99": math.nan,
        }
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        f"{prefix}_mean": float(x.mean()),
        f"{prefix}_p50": float(p50),
        f"{prefix}_p90": float(p90),
        f"{prefix}_p99": float(p99),
    }


def summarize(results: Sequence[RequestResult], ttft_slo: float, tbt_slo: float) -> dict:
    """The run's metrics (module docstring): counts, TTFT/TBT/E2E statistics, goodput, hit rates, rejections."""
    check_conservation(results, len(results))
    done = [r for r in results if r.status == COMPLETED]
    rejected = [r for r in results if r.status == REJECTED]
    # Requests rejected at decode or for KV capacity were prefilled too: their prefix hits count.
    prefilled = [r for r in results if r.status == COMPLETED or r.reject_stage in ("decode", "kv_capacity")]
    ttft = np.array([r.ttft for r in done])
    tbt = np.array([r.tbt for r in done])
    e2e = np.array([r.e2e for r in done])
    effective = int(np.sum((ttft <= ttft_slo) & (tbt <= tbt_slo))) if done else 0
    start = min(r.arrival for r in results)
    end = max([r.finish for r in done] + [r.arrival for r in results])
    span = max(end - start, 1e-9)
    stages = {s: sum(r.reject_stage == s for r in rejected) for s in ("arrival", "decode", "kv_capacity")}
    in_tok = sum(r.input_length for r in prefilled)
    n_blk = sum(r.n_blocks for r in prefilled)
    out = {
        "requests": len(results),
        "completed": len(done),
        "rejected": len(rejected),
        **{f"rejected_{s}": n for s, n in stages.items()},
        **_stats(ttft, "ttft"),
        **_stats(tbt, "tbt"),
        **_stats(e2e, "e2e"),
        "effective": effective,
        "slo_attainment": effective / len(results),
        "goodput_rps": effective / span,
        "throughput_rps": len(done) / span,
        "output_tokens_per_s": sum(r.output_length for r in done) / span,
        "duration_s": span,
        "token_hit_rate": sum(r.hit_tokens for r in prefilled) / in_tok if in_tok else 0.0,
        "block_hit_rate": sum(r.hit_blocks for r in prefilled) / n_blk if n_blk else 0.0,
        "prefill_gpu_s": sum(r.prefill_seconds for r in results),
        "wasted_prefill_s": sum(r.prefill_seconds for r in rejected),
        "offloaded": sum(r.offloaded for r in results),
        "ttft_slo": ttft_slo,
        "tbt_slo": tbt_slo,
    }
    return out

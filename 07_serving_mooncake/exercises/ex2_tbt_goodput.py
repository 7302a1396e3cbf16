"""Exercise 2 (easy): TBT as FAST'25 defines it, SLO attainment and goodput.

Task. A serving system is judged per request by two latencies and per run by how many requests met both SLOs.

1. ``tbt(token_times)``: the time between tokens of ONE request, from the wall-clock times of all its output
   tokens (the first one, which comes out of prefill, included). FAST'25 §5 does not average every gap, nor take
   a percentile: it averages the *slowest tenth* of them, so that a few long stalls (a prefill that pauses
   decoding, a wait for KV memory) count even in a long answer::

       gaps_j = t_{j+1} − t_j                       j = 0 … m−1        (m = number of tokens − 1)
       k      = ⌈0.1 · m⌉  (at least 1)
       TBT    = mean of the k largest gaps,          and 0.0 when m = 0 (a one-token answer has no gaps)

2. ``slo_summary(results, ttft_slo, tbt_slo)``: from one ``nanokimi.sim.RequestResult`` per request (fields
   ``status`` — ``"completed"`` or ``"rejected"`` —, ``arrival``, ``finish``, ``tbt`` and the property ``ttft``;
   times in seconds, NaN where they do not apply, e.g. the finish of a rejected request)::

       effective       = #{completed r : TTFT_r ≤ ttft_slo  and  TBT_r ≤ tbt_slo}      (both bounds inclusive)
       slo_attainment  = effective / #results                                  (rejected requests count as misses)
       span            = max(end − start, 1e−9),   start = min_r arrival_r,
                         end = max(finish of every completed request, arrival of every request)
       goodput_rps     = effective / span

   Return ``{"effective": int, "slo_attainment": float, "goodput_rps": float}``.

Shapes: ``token_times`` is a sequence of n ≥ 1 non-decreasing floats; ``results`` a non-empty sequence.

Hints. ``np.diff`` gives the gaps, ``np.sort`` (or ``np.partition``) the largest. Beware ``int(0.1 · m)`` (rounds
down) and ``np.percentile(gaps, 90)`` (a quantile, not a mean). Python's ``max`` over a list holding NaN gives an
answer that depends on the order: keep the finishes of rejected requests out. Do not call
``nanokimi.sim.tbt_from_gaps``, ``tbt_from_token_times`` or ``summarize`` (the grader compares with them).
"""

from __future__ import annotations

import math  # noqa: F401 (yours to use)
from collections.abc import Sequence

import numpy as np  # noqa: F401 (yours to use)

from nanokimi.sim import RequestResult


def tbt(token_times: Sequence[float]) -> float:
    """Mean of the slowest ``⌈10%⌉`` inter-token gaps of one request (0.0 for a single token)."""
    # YOUR CODE HERE (roughly 5 lines)
    raise NotImplementedError


def slo_summary(results: Sequence[RequestResult], ttft_slo: float, tbt_slo: float) -> dict:
    """``effective`` requests (completed within both SLOs), ``slo_attainment`` and ``goodput_rps``."""
    # YOUR CODE HERE (roughly 6 lines)
    raise NotImplementedError

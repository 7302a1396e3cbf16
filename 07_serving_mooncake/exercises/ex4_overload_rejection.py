"""Exercise 4 (medium–hard): overload control — early and prediction-based rejection (Mooncake arXiv v1 §7).

Task. Under overload a request must be turned away (HTTP 429). Rejecting it when its KV reaches the decode
instance wastes its prefill; rejecting it at arrival saves the prefill but decides on the decode load of *now*,
while the request only reaches decode after its prefill — the loads then oscillate. Write the decode load, its
prediction, and a policy that rejects in one of three modes. Routing itself is given: ``self.router`` is the
chapter's ``ConductorPolicy`` without rejection, whose ``route`` returns the prefill and decode instances, the
pull and ``predicted_ttft``.

1. ``current_load(dec, tbt_slo, extra_requests, extra_context, extra_kv)``: the load of decode instance ``dec``
   against the TBT SLO, counting its running batch, the requests waiting there for memory or a slot, and the
   extras (the request being decided)::

       B  = dec.B + len(dec.waiting) + extra_requests           C  = dec.C + dec.waiting_c + extra_context
       kv = dec.kv_used + dec.waiting_kv + extra_kv
       load = max( dec.cost.decode_step(B, C) / tbt_slo,  kv / dec.kv_capacity )          (> 1 is overloaded)

2. ``predicted_load(dec, now, t_done, t_d, tbt_slo, extra_requests, extra_context, extra_kv)``: the same load at
   the future time ``t_done`` (when the request's prefill would end), by the paper's system-level rule: every
   request decodes for ``t_d`` seconds, so

       leaving   = #{running requests that joined at or before t_done − t_d}   (dec.join_times: sorted join times)
       survivors = dec.B − leaving,        keep = survivors / dec.B   (0 when dec.B = 0)
       arriving  = the requests routed here whose prefill ends by t_done:
                   the values (t_end, context, kv) of dec.inflight with t_end ≤ t_done
       B  = survivors + len(dec.waiting) + #arriving + extra_requests
       C  = dec.C · keep + dec.waiting_c + Σ_arriving context + extra_context
       kv = dec.kv_used · keep + dec.waiting_kv + Σ_arriving kv + extra_kv
       load = max( dec.cost.decode_step(B, C) / tbt_slo,  kv / dec.kv_capacity )

3. ``RejectingConductor.route`` and ``.admit_decode``, with ``n`` the prompt length,
   ``extras = (1, n + 1, cluster.decode_blocks(req))`` (one request, its context with its first token, its KV
   blocks), ``e = route.predicted_ttft`` and ``dec = route.decode``:

   - every mode: reject at arrival (``route.reject = "ttft"``) when ``e > self.ttft_slo``;
   - ``"early"``: otherwise also reject (``"tbt"``) when ``current_load(dec, ..., *extras) > 1``;
   - ``"predicted"``: otherwise also reject (``"tbt"``) when ``predicted_load(dec, now, now + e, t_d, ...,
     *extras) > 1``, with ``t_d = cluster.mean_decode_s`` once ``cluster.n_decoded > 0``, else
     ``self.decode_seconds``;
   - ``"decode"``: nothing more at arrival.
   - ``admit_decode`` (every mode; called when the KV has reached ``inst``): admit iff
     ``current_load(inst, ..., *extras) ≤ 1``.

Shapes: scalars; ``dec`` is a ``nanokimi.sim.Instance`` (read its fields, never write them).

The grader checks both loads against the chapter on live cluster states (and on a hand-made one with a request
exactly ``t_d`` old), then replays an overloaded trace in each mode and compares every decision with the
chapter's ``ConductorPolicy(rejection=mode)``.

Hints. ``bisect.bisect_right(dec.join_times, t)`` counts the joins at or before ``t``. The request being decided
is not in ``dec.inflight`` yet at arrival, and no longer in it at ``admit_decode``. Do not call
``Instance.decode_load``, ``Instance.step_time`` or ``nanokimi.serving.predicted_decode_load``.
"""

from __future__ import annotations

from bisect import bisect_right  # noqa: F401 (yours to use)

from nanokimi.serving import ConductorPolicy
from nanokimi.sim import Cluster, Instance, Policy, Request, Route


def current_load(
    dec: Instance, tbt_slo: float, extra_requests: int = 0, extra_context: int = 0, extra_kv: int = 0
) -> float:
    """``max(T_step / TBT_SLO, KV blocks / capacity)`` of the batch, the waiting requests and the extras."""
    # YOUR CODE HERE (roughly 4 lines)
    raise NotImplementedError


def predicted_load(
    dec: Instance,
    now: float,
    t_done: float,
    t_d: float,
    tbt_slo: float,
    extra_requests: int = 0,
    extra_context: int = 0,
    extra_kv: int = 0,
) -> float:
    """The load at ``t_done``: requests older than ``t_d`` by then have left, prefills ending by then have come."""
    # YOUR CODE HERE (roughly 9 lines)
    raise NotImplementedError


class RejectingConductor(Policy):
    """Conductor's routing plus SLO-based rejection: ``mode`` is ``"decode"``, ``"early"`` or ``"predicted"``."""

    name = "rejecting_conductor_exercise"
    MODES = ("decode", "early", "predicted")

    def __init__(self, ttft_slo: float = 30.0, tbt_slo: float = 0.1, mode: str = "early", decode_seconds: float = 10.0):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        self.ttft_slo, self.tbt_slo, self.mode, self.decode_seconds = ttft_slo, tbt_slo, mode, decode_seconds
        self.router = ConductorPolicy(ttft_slo, tbt_slo)  # routing only (rejection="none")

    def route(self, req: Request, cluster: Cluster, now: float) -> Route:
        """The router's ``Route`` (``self.router.route(req, cluster, now)``), with ``reject`` set per the mode."""
        # YOUR CODE HERE (roughly 12 lines)
        raise NotImplementedError

    def admit_decode(self, req: Request, inst: Instance, cluster: Cluster, now: float) -> bool:
        """Whether the request whose KV just reached ``inst`` may decode there: its current load with it ≤ 1."""
        # YOUR CODE HERE (roughly 2 lines)
        raise NotImplementedError

"""``python -m nanokimi.serving.experiments``: the chapter's results on Mooncake's real traces.

Writes commit-sized JSON and PNG files under ``07_serving_mooncake/results/sim/`` (or ``--out``):

- ``hit_rates``: the prefix-cache hit rate of each trace through one shared cache, infinite and LRU-limited.
- ``ttft_ordering``: average TTFT of random, round-robin, load-balancing, local cache-aware and Conductor routing
  on the conversation trace (FAST'25 Fig. 5), for a 4P+4D cluster of 8×H800 nodes serving a 70B dense model,
  at several replay speeds (Mooncake replays at 2×), plus a coupled 8-instance baseline.
- ``overload``: a cluster whose decode pool saturates (3P+1D): rejections and wasted prefill of decode-side
  rejection, early rejection and prediction-based early rejection (arXiv v1 §7) across replay speeds, and the
  prefill/decode load over time.
- ``prfaas``: the highest replay speed each configuration sustains at ≥ 90% SLO attainment — homogeneous PD,
  naive heterogeneous (every prefill may go remote) and PrfaaS (selective, bandwidth-aware offload) — for a
  Kimi-Linear-like hybrid and a 70B dense model on H20 nodes with H200 prefill nodes 100 Gbps away.

Every number the chapter README quotes comes from these files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nanokimi.serving.policies import ConductorPolicy, PrfaaSPolicy, make_policy
from nanokimi.sim import (
    MODEL_PRESETS,
    ClusterSpec,
    Policy,
    Request,
    Simulator,
    gpu_preset,
    load_trace,
    prefix_hit_rate,
    replay_speed,
)

__all__ = ["hit_rates", "ttft_ordering", "overload", "prfaas", "main", "DEFAULT_DATA"]

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake"
ORDERING_POLICIES = ("random", "round_robin", "least_loaded", "local_cache_aware", "conductor")
OVERLOAD_MODES = (
    ("decode", "age"),
    ("early", "age"),
    ("predicted", "age"),
    ("predicted", "window"),
    ("predicted", "rate"),
)
KEEP = ("completed", "rejected", "rejected_arrival", "rejected_decode", "ttft_mean", "ttft_p90", "tbt_mean",
        "tbt_p90", "e2e_mean", "slo_attainment", "goodput_rps", "effective", "token_hit_rate", "block_hit_rate",
        "prefill_gpu_s", "wasted_prefill_s", "pulled_blocks", "offloaded", "duration_s")  # fmt: skip


def _keep(summary: dict) -> dict:
    return {k: summary[k] for k in KEEP}


def hit_rates(
    traces: dict[str, Sequence[Request]], capacities: Sequence[int] = (1000, 10_000, 30_000, 50_000, 100_000)
) -> dict:
    """Token and block hit rates of each trace: infinite cache, then LRU at each capacity (in 512-token blocks)."""
    out = {}
    for name, reqs in traces.items():
        tok, blk = prefix_hit_rate(reqs)
        rows = [{"capacity_blocks": None, "token_rate": tok, "block_rate": blk}]
        for cap in capacities:
            tok, blk = prefix_hit_rate(reqs, cap)
            rows.append({"capacity_blocks": cap, "token_rate": tok, "block_rate": blk})
        out[name] = {"requests": len(reqs), "rows": rows}
    return out


def ordering_spec(**overrides) -> ClusterSpec:
    """The ordering experiment's cluster: 4 prefill + 4 decode nodes of 8×H800, 70B dense model."""
    return ClusterSpec(**{"n_prefill": 4, "n_decode": 4, **overrides})


def ttft_ordering(requests: Sequence[Request], speeds: Sequence[float] = (1.0, 1.5, 2.0, 2.5),
                  policies: Sequence[str] = ORDERING_POLICIES, coupled: int = 8) -> dict:  # fmt: skip
    """Each policy at each replay speed on ``ordering_spec()``; a coupled cluster at each speed too."""
    spec = ordering_spec()
    runs = []
    for speed in speeds:
        reqs = replay_speed(requests, speed)
        for name in policies:
            res = Simulator(spec, make_policy(name)).run(reqs)
            s = res.summary
            util = s["prefill_gpu_s"] / (spec.n_prefill * s["duration_s"])
            runs.append({"speed": speed, "policy": name, "prefill_util": util, "wall_s": res.wall_s, **_keep(s)})
        if coupled:
            cspec = ClusterSpec(n_prefill=0, n_decode=0, n_coupled=coupled)
            res = Simulator(cspec, make_policy("conductor")).run(reqs)
            runs.append(
                {"speed": speed, "policy": f"coupled{coupled}+conductor", "wall_s": res.wall_s, **_keep(res.summary)}
            )
    return {"cluster": spec.describe(), "coupled": coupled, "runs": runs}


def overload_spec() -> ClusterSpec:
    """The overload experiment's cluster: 3 prefill + 1 decode node (the decode pool saturates first)."""
    return ClusterSpec(n_prefill=3, n_decode=1)


def overload(requests: Sequence[Request], speeds: Sequence[float] = (2.0, 2.5, 3.0, 3.5, 4.0),
             ttft_slo: float = 10.0, tbt_slo: float = 0.1, series_speed: float = 3.0,
             series_window: tuple[float, float] = (200.0, 500.0)) -> dict:  # fmt: skip
    """Rejection modes under overload across replay speeds, plus load time series at ``series_speed``."""
    spec = overload_spec()
    runs, series = [], {}
    for speed in speeds:
        reqs = replay_speed(requests, speed)
        for mode, departures in OVERLOAD_MODES:
            policy = ConductorPolicy(ttft_slo, tbt_slo, rejection=mode, departures=departures)
            res = Simulator(spec, policy, ttft_slo, tbt_slo).run(reqs)
            dl, pl = np.array(res.samples["decode_load"]), np.array(res.samples["prefill_load"])
            runs.append({
                "speed": speed, "policy": policy.name, "decode_load_mean": float(dl.mean()),
                "decode_load_std": float(dl.std()), "prefill_load_mean": float(pl.mean()),
                "prefill_load_std": float(pl.std()), "load_corr": float(np.corrcoef(dl, pl)[0, 1]),
                "wall_s": res.wall_s, **_keep(res.summary),
            })  # fmt: skip
            if speed == series_speed and mode in ("early", "predicted") and departures == "age":
                t = np.array(res.samples["t"])
                keep = (t >= series_window[0]) & (t < series_window[1])
                series[policy.name] = {
                    "t": t[keep].round(2).tolist(),
                    "decode_load": dl[keep].round(4).tolist(),
                    "prefill_load": pl[keep].round(4).tolist(),
                }
    return {"cluster": spec.describe(), "ttft_slo": ttft_slo, "tbt_slo": tbt_slo, "runs": runs,
            "series_speed": series_speed, "series": series}  # fmt: skip


def prfaas_configs(model: str) -> dict[str, tuple[ClusterSpec, Callable[[], Policy]]]:
    """The PrfaaS comparison for one model preset: 2 decode nodes of H20 and 3 prefill nodes, one of which is an
    H200 node in another datacenter (100 Gbps away) for the heterogeneous configurations."""
    m = MODEL_PRESETS[model]
    n_gpus = 2 if model == "kimi-linear-48b-a3b" else 8  # the hybrid's 96 GB of weights fit on two H20s
    h20, h200 = gpu_preset("h20", n_gpus), gpu_preset("h200", n_gpus)
    local = dict(model=m, gpu=h20, n_decode=2)
    remote = dict(n_prefill=2, n_remote_prefill=1, remote_gpu=h200, remote_link_bw=100e9 / 8)
    return {
        "homogeneous PD: 3 H20 prefill": (ClusterSpec(**local, n_prefill=3), lambda: make_policy("local_cache_aware")),
        "naive heterogeneous: any prefill may go remote": (
            ClusterSpec(**local, **remote),
            lambda: PrfaaSPolicy(threshold_tokens=0, max_kv_delay=1e9),
        ),
        "PrfaaS: selective, bandwidth-aware offload": (
            ClusterSpec(**local, **remote),
            lambda: PrfaaSPolicy(threshold_tokens=8192),
        ),
        "reference: the H200 prefill node local (no link)": (
            ClusterSpec(**local, n_prefill=2, n_remote_prefill=1, remote_gpu=h200, remote_link_bw=1e15),
            lambda: PrfaaSPolicy(threshold_tokens=0, max_kv_delay=1e9),
        ),
    }


def sustained_speed(requests: Sequence[Request], spec: ClusterSpec, make: Callable[[], Policy],
                    speeds: Sequence[float], ttft_slo: float, tbt_slo: float, target: float = 0.9) -> dict:  # fmt: skip
    """The highest replay speed in ``speeds`` (ascending) whose SLO attainment is ≥ ``target``, and the sweep."""
    sweep, best = [], 0.0
    for speed in speeds:
        s = Simulator(spec, make(), ttft_slo, tbt_slo).run(replay_speed(requests, speed)).summary
        sweep.append({"speed": speed, **{k: s[k] for k in ("slo_attainment", "goodput_rps", "ttft_mean", "offloaded")}})
        if s["slo_attainment"] >= target:
            best = speed
        else:
            break
    return {"sustained_speed": best, "sweep": sweep}


SPEEDS = tuple(round(0.1 * 1.25**i, 3) for i in range(24))  # 0.1× … 17× in 25% steps


def prfaas(requests: Sequence[Request], speeds: Sequence[float] = SPEEDS,
           ttft_slo: float = 10.0, tbt_slo: float = 0.1) -> dict:  # fmt: skip
    """Sustained replay speed (≥ 90% of requests within TTFT/TBT SLOs) of each configuration and model."""
    out = {}
    for model in ("kimi-linear-48b-a3b", "dense-70b"):
        out[model] = {
            name: {"cluster": spec.describe(), **sustained_speed(requests, spec, make, speeds, ttft_slo, tbt_slo)}
            for name, (spec, make) in prfaas_configs(model).items()
        }
    return {"ttft_slo": ttft_slo, "tbt_slo": tbt_slo, "models": out}


def _save(out: Path, name: str, data: dict) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return path


def _plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "hit_rates" in results:
        fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=70)
        for name, d in results["hit_rates"].items():
            rows = d["rows"]
            caps = [r["capacity_blocks"] for r in rows[1:]]
            ax.plot(caps, [r["block_rate"] for r in rows[1:]], marker="o", label=f"{name} (LRU)")
            ax.axhline(rows[0]["block_rate"], ls="--", lw=1, color=ax.lines[-1].get_color())
        ax.set(xscale="log", xlabel="cache capacity (512-token blocks)", ylabel="block hit rate",
               title="prefix hit rate (dashed: infinite cache)")  # fmt: skip
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "hit_rates.png")
        plt.close(fig)
    if "ttft_ordering" in results:
        runs = results["ttft_ordering"]["runs"]
        fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=70)
        for name in dict.fromkeys(r["policy"] for r in runs):
            rs = [r for r in runs if r["policy"] == name]
            ax.plot([r["speed"] for r in rs], [r["ttft_mean"] for r in rs], marker="o", label=name)
        ax.set(yscale="log", xlabel="replay speed (× the trace's arrival rate)", ylabel="mean TTFT (s)",
               title="conversation trace, 4P+4D 8×H800, 70B dense")  # fmt: skip
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ttft_ordering.png")
        plt.close(fig)
    if "overload" in results:
        d = results["overload"]
        fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.2), dpi=70)
        for name in dict.fromkeys(r["policy"] for r in d["runs"]):
            rs = [r for r in d["runs"] if r["policy"] == name]
            axes[0].plot([r["speed"] for r in rs], [r["rejected"] for r in rs], marker="o", label=name)
            axes[1].plot([r["speed"] for r in rs], [r["wasted_prefill_s"] for r in rs], marker="o", label=name)
        axes[0].set(xlabel="replay speed", ylabel="rejected requests", title="rejections (3P+1D)")
        axes[1].set(xlabel="replay speed", ylabel="GPU seconds", title="prefill wasted on late rejections")
        axes[0].legend(fontsize=7)
        for name, s in d["series"].items():
            axes[2].plot(s["t"], s["decode_load"], lw=1, label=f"decode load, {name}")
        axes[2].set(xlabel="time (s)", ylabel="load (1 = SLO)", title=f"decode load over time at {d['series_speed']}×")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "overload.png")
        plt.close(fig)
    if "prfaas" in results:
        models = results["prfaas"]["models"]
        fig, ax = plt.subplots(figsize=(6.0, 3.0), dpi=70)
        names = list(next(iter(models.values())))
        width = 0.8 / len(models)
        for j, (model, cfgs) in enumerate(models.items()):
            ax.barh([i + j * width for i in range(len(names))], [cfgs[n]["sustained_speed"] for n in names],
                    height=width, label=model)  # fmt: skip
        ax.set_yticks([i + width / 2 for i in range(len(names))], [n.split(" (")[0] for n in names], fontsize=8)
        ax.set(xlabel="sustained replay speed (≥ 90% within SLOs)", title="PrfaaS vs homogeneous PD")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "prfaas.png")
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanokimi.serving.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with Mooncake's trace files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sim")
    parser.add_argument("--only", default="hit_rates,ttft_ordering,overload,prfaas", help="comma-separated subset")
    args = parser.parse_args(argv)
    conv_path, syn_path = args.data / "conversation_trace.jsonl", args.data / "synthetic_trace.jsonl"
    if not conv_path.exists() or not syn_path.exists():
        parser.error(f"--data: expected conversation_trace.jsonl and synthetic_trace.jsonl in {args.data}")
    conv, syn = load_trace(conv_path), load_trace(syn_path)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "hit_rates": lambda: hit_rates({"conversation": conv, "synthetic": syn}),
        "ttft_ordering": lambda: ttft_ordering(conv),
        "overload": lambda: overload(conv),
        "prfaas": lambda: prfaas(syn),
    }
    results = {}
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        if name not in jobs:
            parser.error(f"--only: expected names from {list(jobs)}, got {name!r}")
        t = time.perf_counter()
        results[name] = jobs[name]()
        print(f"{name}: {time.perf_counter() - t:.1f} s → {_save(args.out, name, results[name])}", flush=True)
    _plot(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m nanokimi.serving.simulate``: replay a trace through the simulated cluster under routing policies.

Example (the conversation trace, Mooncake's 2× replay, 4 prefill + 4 decode nodes of 8×H800, a 70B dense model)::

    python -m nanokimi.serving.simulate --trace ../shared/data/mooncake/conversation_trace.jsonl \\
        --policy random,least_loaded,local_cache_aware,conductor --prefill 4 --decode 4 --speed 2

prints one row per policy, writes ``<out>/simulate.json`` (config, summaries, goodput-vs-load sweep) and
``<out>/simulate.png`` (TTFT and TBT CDFs, goodput vs load). ``--loads`` lists arrival-rate multipliers for the
sweep (relative to ``--speed``); an empty string skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nanokimi.serving.policies import POLICIES, make_policy
from nanokimi.sim import (
    GPU_PRESETS,
    MODEL_PRESETS,
    ClusterSpec,
    Request,
    SimResult,
    Simulator,
    gpu_preset,
    load_trace,
    replay_speed,
    synthetic_trace,
)

__all__ = ["main", "build_spec", "run_policies", "goodput_sweep", "format_table", "plot"]

COLUMNS = (
    ("completed", "completed", "{:d}"),
    ("rejected", "rejected", "{:d}"),
    ("ttft_mean", "TTFT mean s", "{:.2f}"),
    ("ttft_p90", "TTFT p90 s", "{:.2f}"),
    ("tbt_mean", "TBT mean ms", "{:.1f}"),
    ("tbt_p90", "TBT p90 ms", "{:.1f}"),
    ("e2e_mean", "E2E mean s", "{:.2f}"),
    ("slo_attainment", "SLO attain.", "{:.3f}"),
    ("goodput_rps", "goodput req/s", "{:.2f}"),
    ("token_hit_rate", "token hit", "{:.3f}"),
)


def build_spec(args: argparse.Namespace) -> ClusterSpec:
    """The ClusterSpec named by the command-line arguments."""
    return ClusterSpec(
        model=MODEL_PRESETS[args.model],
        gpu=gpu_preset(args.gpu, args.gpus),
        n_prefill=0 if args.coupled else args.prefill,
        n_decode=0 if args.coupled else args.decode,
        n_coupled=args.coupled,
        n_remote_prefill=args.remote,
        remote_gpu=gpu_preset(args.remote_gpu, args.remote_gpus),
        remote_link_bw=args.remote_link_gbps * 1e9 / 8,
        layerwise=not args.no_layerwise,
    )


def _policy(name: str, args: argparse.Namespace):
    return make_policy(name, args.seed, args.ttft_slo, args.tbt_slo, args.rejection, args.prfaas_threshold)


def run_policies(
    requests: Sequence[Request], spec: ClusterSpec, names: Sequence[str], args: argparse.Namespace
) -> dict[str, SimResult]:
    """One simulation per policy name, same requests and cluster."""
    return {n: Simulator(spec, _policy(n, args), args.ttft_slo, args.tbt_slo).run(requests) for n in names}


def goodput_sweep(
    requests: Sequence[Request], spec: ClusterSpec, names: Sequence[str], loads: Sequence[float], args
) -> dict[str, list[dict]]:
    """Goodput and SLO attainment of each policy with arrivals sped up by each factor in ``loads``."""
    out: dict[str, list[dict]] = {n: [] for n in names}
    for load in loads:
        sped = replay_speed(requests, load)
        for n in names:
            s = Simulator(spec, _policy(n, args), args.ttft_slo, args.tbt_slo).run(sped).summary
            out[n].append(
                {"load": load, **{k: s[k] for k in ("goodput_rps", "slo_attainment", "ttft_mean", "tbt_mean")}}
            )
    return out


def format_table(results: dict[str, SimResult]) -> str:
    """A markdown table, one row per policy (TBT columns in milliseconds)."""
    head = "| policy | " + " | ".join(c[1] for c in COLUMNS) + " | wall s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, res in results.items():
        cells = []
        for key, _, fmt in COLUMNS:
            v = res.summary[key]
            v = v * 1e3 if key.startswith("tbt") else v
            cells.append("–" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res.wall_s:.2f} |")
    return "\n".join(lines)


def plot(results: dict[str, SimResult], sweep: dict[str, list[dict]], path: str | Path) -> Path:
    """TTFT CDF, TBT CDF and (when swept) goodput vs load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if any(sweep.values()) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), dpi=70)
    for name, res in results.items():
        done = [r for r in res.results if r.status == "completed"]
        for ax, values in ((axes[0], [r.ttft for r in done]), (axes[1], [r.tbt * 1e3 for r in done])):
            x = np.sort(np.asarray(values))
            ax.plot(x, np.arange(1, x.size + 1) / max(x.size, 1), label=name)
    axes[0].set(xscale="symlog", xlabel="TTFT (s)", ylabel="CDF", title="time to first token")
    tbt_ms = [r.tbt * 1e3 for res in results.values() for r in res.results if r.status == "completed"]
    axes[1].set(xlabel="TBT (ms)", title="time between tokens (slowest 10%)")
    axes[1].set_xlim(0, float(np.percentile(tbt_ms, 99.5)) * 1.1 if tbt_ms else 1.0)  # outliers would flatten the CDF
    if panels == 3:
        for name, rows in sweep.items():
            axes[2].plot([r["load"] for r in rows], [r["goodput_rps"] for r in rows], marker="o", label=name)
        axes[2].set(xlabel="arrival-rate multiplier", ylabel="goodput (req/s)", title="goodput vs load")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanokimi.serving.simulate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="a Mooncake-format JSONL trace")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N requests locally instead")
    p.add_argument("--rate", type=float, default=3.0, help="requests/s of --synthetic (default 3)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests of --trace")
    p.add_argument("--policy", default="conductor", help=f"comma-separated names from {', '.join(POLICIES)}, or all")
    p.add_argument("--prefill", type=int, default=4)
    p.add_argument("--decode", type=int, default=4)
    p.add_argument("--coupled", type=int, default=0, help="N coupled instances instead of prefill/decode pools")
    p.add_argument("--remote", type=int, default=0, help="remote (PrfaaS) prefill instances")
    p.add_argument("--remote-gpu", default="h200", choices=sorted(GPU_PRESETS))
    p.add_argument("--remote-gpus", type=int, default=8)
    p.add_argument("--remote-link-gbps", type=float, default=100.0)
    p.add_argument("--model", default="dense-70b", choices=sorted(MODEL_PRESETS))
    p.add_argument("--gpu", default="h800", choices=sorted(GPU_PRESETS))
    p.add_argument("--gpus", type=int, default=8, help="GPUs per instance (tensor parallel)")
    p.add_argument("--speed", type=float, default=1.0, help="replay the arrivals this many times faster")
    p.add_argument("--ttft-slo", type=float, default=30.0)
    p.add_argument("--tbt-slo", type=float, default=0.1)
    p.add_argument("--rejection", default="none", choices=("none", "decode", "early", "predicted"))
    p.add_argument("--prfaas-threshold", type=int, default=8192)
    p.add_argument("--no-layerwise", action="store_true", help="no layer-wise overlap of KV loads and transfers")
    p.add_argument("--loads", default="0.5,1,1.5,2", help="rate multipliers for the goodput sweep ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/simulate"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = list(POLICIES) if args.policy == "all" else [s.strip() for s in args.policy.split(",") if s.strip()]
    for n in names:
        if n not in POLICIES:
            parser.error(f"--policy: expected names from {list(POLICIES)}, got {n!r}")
    try:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--loads: expected comma-separated numbers, got {args.loads!r}")
    if args.trace is not None:
        requests = load_trace(args.trace, limit=args.limit)
    else:
        requests = synthetic_trace(args.synthetic, args.rate, seed=args.seed)
    if args.speed != 1.0:
        requests = replay_speed(requests, args.speed)
    spec = build_spec(args)
    results = run_policies(requests, spec, names, args)
    sweep = goodput_sweep(requests, spec, names, loads, args) if loads else {n: [] for n in names}
    print(f"{len(requests)} requests · {json.dumps(spec.describe())}")
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "config": {**spec.describe(), "trace": str(args.trace or f"synthetic:{args.synthetic}"), "speed": args.speed},
        "summaries": {n: r.summary for n, r in results.items()},
        "goodput_vs_load": sweep,
    }
    (args.out / "simulate.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    png = plot(results, sweep, args.out / "simulate.png")
    print(f"wrote {args.out / 'simulate.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

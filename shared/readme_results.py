"""The top-level README's generated tables: numbers come from committed JSON, never typed by hand.

``python -m nanokimi.readme_results`` rewrites two parts of README.md:

* between ``<!-- results:begin -->`` and ``<!-- results:end -->``: every row of every ``0*/results/*.json`` that
  follows the schema of ``nanokimi.bench`` (a ``rows`` list), with its device and date;
* between ``<!-- chapters:begin -->`` and ``<!-- chapters:end -->``: the chapter table's last column, one headline
  result per chapter read from the file named in ``HEADLINES`` and linked to it (the other cells are prose and stay
  as written). A chapter whose file is not committed says so instead of a number.

``--check`` exits non-zero when either part is out of date (``tests/test_readme.py`` runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanokimi.bench import fmt_value as _fmt
from nanokimi.bench import split_at_markers

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CHAPTERS_BEGIN, CHAPTERS_END = "<!-- chapters:begin -->", "<!-- chapters:end -->"
CHAPTER_COLUMNS = ("folder", "paper", "what you build", "runs on CPU?", "headline result")


def results_table(root: Path = REPO) -> str:
    """One markdown table: every row of every chapter's benchmark JSON, with its device and date."""
    lines = [
        "| chapter | kernel | shape | ours (ms) | anchor | anchor (ms) | speedup | TFLOP/s | roofline | device, date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(root.glob("0*/results/*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data:
            continue
        chapter = path.parent.parent.name
        where = f"[{data['device'].replace('NVIDIA ', '')}, {data['date']}]({path.relative_to(root).as_posix()})"
        for r in data["rows"]:
            cells = [chapter, r["name"], r["shape"], _fmt(r["ours_ms"]), r["anchor"], _fmt(r.get("anchor_ms"))]
            cells += [_fmt(r.get("speedup")) + ("×" if r.get("speedup") else ""), _fmt(r.get("tflops"))]
            cells += [_fmt(r.get("roofline_frac")), where]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def bench_row(
    data: dict, name: str, shape: str | None = None, anchor: str | None = None, shape_has: str | None = None
) -> dict:
    """The one row of a ``nanokimi.bench`` JSON with this name (and shape, anchor, a part of the shape when given)."""
    found = [
        r
        for r in data["rows"]
        if r["name"] == name
        and shape in (None, r["shape"])
        and anchor in (None, r["anchor"])
        and (shape_has is None or shape_has in r["shape"])
    ]
    if len(found) != 1:
        want = ", ".join(
            f"{k} {v!r}" for k, v in (("shape", shape), ("anchor", anchor), ("shape with", shape_has)) if v
        )
        raise ValueError(f"expected one row named {name!r}{' (' + want + ')' if want else ''}, found {len(found)}")
    return found[0]


@dataclass(frozen=True)
class Headline:
    """A chapter's headline: ``text(json)`` of the committed file ``path``; ``missing`` while there is none.

    ``text=None`` marks a chapter with no headline chosen yet: once its file is committed, the cell links to it and
    says so (``tests/test_readme.py`` fails until one is chosen).
    """

    path: str | None
    text: Callable[[dict], str] | None = None
    missing: str = "not measured"


def _muon(d: dict) -> str:
    small, large = (
        bench_row(d, "Triton symmetric NS5", f"{n}x{n} bf16", "plain torch NS (bf16)") for n in (4096, 8192)
    )
    return (
        f"Newton–Schulz {small['speedup']:.2f}× (4096²) and {large['speedup']:.2f}× (8192², "
        f"{large['tflops']:.0f} TFLOP/s) plain torch, bf16"
    )


def _moba(d: dict) -> str:
    r = bench_row(d, "moba fwd+bwd", "T=131072")
    return f"fwd+bwd {r['speedup']:.2f}× causal SDPA at T=131072 (target {r['target_speedup']:g}×)"


def _kda(d: dict) -> str:
    rows = {(n, t): bench_row(d, n, f"T={t}") for n in ("KDA fwd", "KDA fwd+bwd") for t in (8192, 32768)}
    return (
        f"fwd {rows['KDA fwd', 8192]['speedup']:.2f}×, fwd+bwd {rows['KDA fwd+bwd', 8192]['speedup']:.2f}× fla's "
        f"chunk_kda at T=8192 ({rows['KDA fwd', 32768]['speedup']:.2f}×, {rows['KDA fwd+bwd', 32768]['speedup']:.2f}× "
        "at T=32768)"
    )


def _attnres(d: dict) -> str:
    far, compiled = (
        bench_row(d, "phase1 fwd+bwd", anchor=a, shape_has="S=8") for a in ("flash-attn-res 0.1.12", "torch.compile")
    )
    step = bench_row(d, "TinyKimi step block=4")
    return (
        f"phase-1 fwd+bwd {far['speedup']:.2f}× flash-attn-res, {compiled['speedup']:.2f}× torch.compile; Block "
        f"AttnRes adds {step['overhead_pct']:.1f}% to a TinyKimi gpu-small training step"
    )


def _backend_parity(d: dict) -> str:
    return (
        f"TinyKimi gpu-small training step {d['speedup']:.2f}× faster on the Triton backends than on the references "
        f"(target 2×); loss curves: first {d['early_steps']} steps within {d['max_early_rel_diff']:.1e} (stated "
        f"{d['early_rtol']:g}), {d['smooth']}-step averages within {100 * d['max_smoothed_rel_diff']:.1f}% over "
        f"{d['steps']} steps (stated {100 * d['loss_rtol']:g}%; the reference against its own rerun: "
        f"{100 * d['max_reference_rerun_smoothed_rel_diff']:.1f}%)"
    )


def _moe(d: dict) -> str:
    gemm = bench_row(d, "expert GEMMs fwd (gate‖up+SwiGLU, down)", shape_has="balanced")
    layer = bench_row(d, "MoE layer fwd+bwd", shape_has="balanced")
    return (
        f"expert GEMMs {gemm['speedup']:.2f}× `torch._grouped_mm`; MoE layer fwd+bwd {layer['speedup']:.2f}× a loop "
        "over experts (bf16, balanced routing)"
    )


def _rl(d: dict) -> str:
    k15, grpo = d["k15"], d["grpo"]
    before, after, grpo_after = (x["accuracy"] for x in (k15["start_test"], k15["final_test"], grpo["final_test"]))
    return f"k1.5 lifts held-out addition accuracy {before:.3f} → {after:.3f} (GRPO, same budget: {grpo_after:.3f})"


def _serving(d: dict) -> str:
    at2 = {r["policy"]: r for r in d["runs"] if r["speed"] == 2.0}
    c, r = at2["conductor"], at2["random"]
    return (
        f"Conductor mean TTFT {c['ttft_mean']:.2f} s vs {r['ttft_mean']:.2f} s random "
        f"({c['completed']} trace requests at 2× speed)"
    )


def _uncertainty(d: dict) -> str:
    name, t = next((k, v) for k, v in d["target"].items() if k.startswith("ood:"))
    return (
        f"CUPID epistemic OOD AUROC {t['cupid_epistemic']:.3f} vs {t['best_single_pass']} "
        f"{t['best_single_pass_auroc']:.3f} ({name.removeprefix('ood: ')})"
    )


HEADLINES: dict[str, Headline] = {
    "01_muon": Headline("01_muon/results/h100.json", _muon),
    "02_moba": Headline("02_moba/results/h100.json", _moba),
    "03_kda_linear": Headline("03_kda_linear/results/h100.json", _kda),
    "04_attnres": Headline("04_attnres/results/h100.json", _attnres),
    "05_moe_k2": Headline("05_moe_k2/results/h100.json", _moe),
    "06_rl_k15": Headline("06_rl_k15/results/rl/grpo.json", _rl),
    "07_serving_mooncake": Headline("07_serving_mooncake/results/sim/ttft_ordering.json", _serving),
    "08_uncertainty": Headline("08_uncertainty/results/eval/add.json", _uncertainty),
    "shared": Headline("shared/results/backend_parity_h100.json", _backend_parity),
}


def headline(folder: str, root: Path = REPO) -> str:
    """The headline cell of ``folder``: the number with a link to its JSON, or the spec's ``missing`` text."""
    if folder not in HEADLINES:
        raise ValueError(
            f"folder: expected one of {sorted(HEADLINES)} (nanokimi.readme_results.HEADLINES), got {folder!r}"
        )
    spec = HEADLINES[folder]
    if spec.path is None or not (root / spec.path).exists():
        return spec.missing
    path = root / spec.path
    if spec.text is None:
        return f"[{path.name}]({spec.path}) (no headline chosen yet)"
    try:
        text = spec.text(json.loads(path.read_text()))
    except (KeyError, ValueError, StopIteration) as exc:
        raise ValueError(f"{spec.path}: cannot read {folder}'s headline from it ({exc!r}); update HEADLINES") from exc
    return f"{text} ([{path.name}]({spec.path}))"


_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_FOLDER_LINK = re.compile(r"\]\(([^)/]+)/?\)")


def chapter_table(table: str, root: Path = REPO) -> str:
    """The chapter table with its headline column regenerated (added when the table has only the first four)."""
    lines = [line for line in table.strip().splitlines() if line.strip()]
    out = ["| " + " | ".join(CHAPTER_COLUMNS) + " |", "|" + "---|" * len(CHAPTER_COLUMNS)]
    for line in lines[2:]:
        cells = [c.strip() for c in _CELL_SPLIT.split(line.strip().strip("|"))]
        if len(cells) not in (len(CHAPTER_COLUMNS) - 1, len(CHAPTER_COLUMNS)):
            raise ValueError(
                f"README.md chapter table: expected {len(CHAPTER_COLUMNS)} cells, got {len(cells)} in {line!r}"
            )
        link = _FOLDER_LINK.search(cells[0])
        if link is None:
            raise ValueError(f"README.md chapter table: expected a link to the folder in the first cell of {line!r}")
        cells = cells[: len(CHAPTER_COLUMNS) - 1] + [headline(link.group(1), root).replace("|", "\\|")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _between(text: str, begin: str, end: str) -> tuple[str, str, str]:
    parts = split_at_markers(text, begin, end)
    if parts is None:
        raise ValueError(f"README.md: expected the markers {begin} and {end}, found none")
    return parts


def render(readme_text: str, table: str) -> str:
    """``readme_text`` with ``table`` between the results markers."""
    pre, _, post = _between(readme_text, BEGIN, END)
    return f"{pre}{BEGIN}\n{table}\n{END}{post}"


def render_chapters(readme_text: str, root: Path = REPO) -> str:
    """``readme_text`` with the chapter table's headline column regenerated from the committed JSON."""
    pre, inner, post = _between(readme_text, CHAPTERS_BEGIN, CHAPTERS_END)
    return f"{pre}{CHAPTERS_BEGIN}\n{chapter_table(inner, root)}\n{CHAPTERS_END}{post}"


def render_all(readme_text: str, root: Path = REPO) -> str:
    return render_chapters(render(readme_text, results_table(root)), root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanokimi.readme_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args(argv)
    readme = REPO / "README.md"
    text = readme.read_text()
    new = render_all(text)
    if args.check:
        if new != text:
            print("README.md's generated tables differ from the committed JSON: run python -m nanokimi.readme_results")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The top-level README's results table, generated from the committed benchmark JSON (never typed by hand).

``python -m nanokimi.readme_results`` rewrites the text between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in README.md from every ``0*/results/*.json`` that follows the schema of
``nanokimi.bench`` (a ``rows`` list); ``--check`` exits non-zero when the README is out of date.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanokimi.bench import fmt_value as _fmt

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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


def render(readme_text: str, table: str) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"README.md: expected the markers {BEGIN} and {END}, found none")
    pre, rest = readme_text.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    return f"{pre}{BEGIN}\n{table}\n{END}{post}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanokimi.readme_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args(argv)
    readme = REPO / "README.md"
    text = readme.read_text()
    new = render(text, results_table())
    if args.check:
        if new != text:
            print("README.md's results table differs from the committed JSON: run python -m nanokimi.readme_results")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

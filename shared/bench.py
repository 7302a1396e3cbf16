"""Benchmark helpers: GPU timing, a results table with a machine header, the JSON of handbook §6, a PNG,
and the README table generated from the JSON.

JSON schema (``results/<gpu>.json``)::

    {"device", "torch", "triton", "cuda", "date", "commit",
     "rows": [{"name", "shape", "ours_ms", "anchor", "anchor_ms", "speedup", "tflops", "roofline_frac", ...}]}

``speedup = anchor_ms / ours_ms`` (> 1: ours is faster). Extra keys per row (``gbps``, ``peak_mib`` …) are kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton

__all__ = [
    "time_ms",
    "machine_info",
    "gpu_slug",
    "Table",
    "markdown_from_json",
    "update_readme",
    "split_at_markers",
    "H100_BF16_TFLOPS",
    "H100_COPY_TBPS",
    "fmt_value",
]

# Ceilings measured on the project's H100 (torch 2.11, handbook §6): dense bf16 matmul at 8192³ and a
# device-to-device copy. Roofline fractions are quoted against these, not against datasheet numbers.
H100_BF16_TFLOPS = 771.0
H100_COPY_TBPS = 3.0

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` with ``triton.testing.do_bench`` (GPU only)."""
    if not torch.cuda.is_available():
        raise RuntimeError("time_ms: benchmarks need a CUDA device (do_bench times GPU events); none is visible")
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _commit() -> str:
    if os.environ.get("NANOKIMI_COMMIT"):
        return os.environ["NANOKIMI_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    """Device name, torch/triton/CUDA versions, UTC date and git commit."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "commit": _commit(),
    }


def gpu_slug(device_name: str) -> str:
    """File stem for a device: ``"NVIDIA H100 80GB HBM3"`` → ``"h100"``."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device_name.upper())
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def fmt_value(v: object) -> str:
    """A table cell: 3 significant digits (integers above 1000 in full), "–" for a missing value."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class Table:
    """Rows of one benchmark run; prints markdown, writes JSON/PNG, refreshes the README table."""

    columns = ("name", "shape", "ours_ms", "anchor", "anchor_ms", "speedup", "tflops", "roofline_frac")

    def __init__(self, title: str):
        self.title = title
        self.info = machine_info()
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        shape: str,
        ours_ms: float,
        anchor: str,
        anchor_ms: float | None,
        tflops: float | None = None,
        roofline_frac: float | None = None,
        **extra: object,
    ) -> dict:
        """Add one row; ``speedup`` is computed as ``anchor_ms / ours_ms``."""
        if not ours_ms > 0:
            raise ValueError(f"ours_ms: expected a positive time, got {ours_ms!r}")
        speedup = anchor_ms / ours_ms if anchor_ms else None
        row = {
            "name": name,
            "shape": shape,
            "ours_ms": ours_ms,
            "anchor": anchor,
            "anchor_ms": anchor_ms,
            "speedup": speedup,
            "tflops": tflops,
            "roofline_frac": roofline_frac,
            **extra,
        }
        self.rows.append(row)
        return row

    def header(self) -> str:
        i = self.info
        return (
            f"{self.title} — {i['device']} · torch {i['torch']} · triton {i['triton']} · CUDA {i['cuda']} · "
            f"{i['date']} · commit {i['commit']}"
        )

    def to_dict(self) -> dict:
        return {**self.info, "title": self.title, "rows": self.rows}

    def markdown(self) -> str:
        return markdown_from_json(self.to_dict())

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def plot(self, path: str | Path, value: str = "speedup") -> Path:
        """Horizontal bar chart of one numeric column per row (speedup by default), 1.0 marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if isinstance(r.get(value), int | float)]
        labels = [f"{r['name']} {r['shape']}" for r in rows]
        # Wide enough for the longest "name shape" label (about 0.065 inch per character at fontsize 8).
        width = 4.5 + 0.065 * max((len(s) for s in labels), default=0)
        fig, ax = plt.subplots(figsize=(width, 0.4 * max(len(rows), 2) + 1.2), dpi=80)
        ax.barh(range(len(rows)), [r[value] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        if value == "speedup":
            ax.axvline(1.0, color="k", lw=1, ls="--")
            ax.set_xlabel("speedup over the anchor (×)")
        else:
            ax.set_xlabel(value)
        ax.set_title(f"{self.title} ({self.info['device']})", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def save(self, chapter_dir: str | Path) -> Path:
        """Print the table, write ``results/<gpu>.json`` and ``.png``, refresh the chapter README table."""
        chapter_dir = Path(chapter_dir)
        stem = gpu_slug(self.info["device"])
        json_path = self.write_json(chapter_dir / "results" / f"{stem}.json")
        self.plot(chapter_dir / "results" / f"{stem}.png")
        print(self.header())
        print(self.markdown())
        readme = chapter_dir / "README.md"
        if readme.exists():
            update_readme(readme, sorted((chapter_dir / "results").glob("*.json")))
        return json_path


def markdown_from_json(data: dict, columns: Sequence[str] = Table.columns) -> str:
    """The markdown table of a results dict (or JSON file contents), machine header line first."""
    extra = [k for r in data["rows"] for k in r if k not in columns]
    cols = list(columns) + list(dict.fromkeys(extra))
    head = (
        f"*{data['device']} · torch {data['torch']} · triton {data['triton']} · {data['date']} · "
        f"commit {data['commit']}*\n\n"
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in data["rows"]:
        lines.append("| " + " | ".join(fmt_value(r.get(c)) for c in cols) + " |")
    return head + "\n".join(lines)


def split_at_markers(text: str, begin: str, end: str) -> tuple[str, str, str] | None:
    """``(before begin, between the markers, after end)``, or None when either marker is missing."""
    if begin not in text or end not in text:
        return None
    pre, rest = text.split(begin, 1)
    inner, post = rest.split(end, 1)
    return pre, inner, post


def update_readme(readme: str | Path, json_paths: Sequence[str | Path]) -> bool:
    """Replace the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` with the tables
    generated from ``json_paths``; returns whether the README had the markers."""
    readme = Path(readme)
    parts = split_at_markers(readme.read_text(), BEGIN, END)
    if parts is None:
        return False
    tables = [markdown_from_json(json.loads(Path(p).read_text())) for p in json_paths]
    body = "\n\n".join(tables) if tables else "No GPU results committed yet."
    readme.write_text(f"{parts[0]}{BEGIN}\n{body}\n{END}{parts[2]}")
    return True

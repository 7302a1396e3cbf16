"""The README's numbers come from files in the repo: its results table equals the one generated from the JSON."""

from __future__ import annotations

import json

import pytest

from nanokimi.readme_results import REPO, render, results_table


def test_readme_results_table_matches_committed_json():
    text = (REPO / "README.md").read_text()
    assert render(text, results_table()) == text, "run `python -m nanokimi.readme_results` and commit README.md"


def test_results_table_lists_every_row(tmp_path):
    (tmp_path / "09_x" / "results").mkdir(parents=True)
    data = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-01", "rows": []}
    data["rows"].append({"name": "k", "shape": "s", "ours_ms": 1.0, "anchor": "a", "anchor_ms": 2.0, "speedup": 2.0})
    (tmp_path / "09_x" / "results" / "h100.json").write_text(json.dumps(data))
    (tmp_path / "09_x" / "results" / "notes.json").write_text("{}")  # not a bench table: ignored
    table = results_table(tmp_path)
    assert "| 09_x | k | s | 1 | a | 2 | 2× | – | – | [H100 80GB HBM3, 2026-01-01](09_x/results/h100.json) |" in table
    assert len(table.splitlines()) == 3
    with pytest.raises(ValueError, match="expected the markers"):
        render("no markers", table)

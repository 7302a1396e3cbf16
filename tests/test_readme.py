"""The README's numbers come from files in the repo: its generated tables equal the ones built from the JSON."""

from __future__ import annotations

import json
import re

import pytest

from nanokimi.readme_results import (
    CHAPTERS_BEGIN,
    CHAPTERS_END,
    HEADLINES,
    REPO,
    Headline,
    chapter_table,
    headline,
    render,
    render_all,
    render_chapters,
    results_table,
)


def test_readme_results_table_matches_committed_json():
    text = (REPO / "README.md").read_text()
    assert render(text, results_table()) == text, "run `python -m nanokimi.readme_results` and commit README.md"


def test_readme_chapter_headlines_match_committed_json():
    text = (REPO / "README.md").read_text()
    assert render_chapters(text) == text, "run `python -m nanokimi.readme_results` and commit README.md"
    assert render_all(text) == text


def test_every_chapter_has_a_headline_and_every_committed_result_is_used():
    text = (REPO / "README.md").read_text()
    table = text.split(CHAPTERS_BEGIN, 1)[1].split(CHAPTERS_END, 1)[0]
    folders = re.findall(r"^\| \[`([^`/]+)/`\]", table, flags=re.M)
    assert sorted(folders) == sorted(HEADLINES)
    chapters_with_results = {p.parent.parent.name for p in REPO.glob("0*/results/*.json")}
    for folder in folders:
        cell = headline(folder)
        assert "no headline chosen yet" not in cell, f"{folder}: pick its headline in nanokimi.readme_results"
        if folder in chapters_with_results:
            assert "not measured" not in cell and f"]({HEADLINES[folder].path})" in cell, cell


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


def _muon_json(speedup: float) -> dict:
    rows = []
    for n in (4096, 8192):
        row = {"name": "Triton symmetric NS5", "shape": f"{n}x{n} bf16", "anchor": "plain torch NS (bf16)"}
        rows.append(row | {"ours_ms": 1.0, "anchor_ms": speedup, "speedup": speedup * n / 8192, "tflops": 500.0})
    return {"rows": rows}


def test_headline_reads_the_json_links_it_and_says_when_it_is_missing(tmp_path, monkeypatch):
    assert headline("01_muon", tmp_path) == HEADLINES["01_muon"].missing == "not measured"
    (tmp_path / "01_muon" / "results").mkdir(parents=True)
    (tmp_path / "01_muon" / "results" / "h100.json").write_text(json.dumps(_muon_json(1.5)))
    cell = headline("01_muon", tmp_path)
    assert (
        cell == "Newton–Schulz 0.75× (4096²) and 1.50× (8192², 500 TFLOP/s) plain torch, bf16 "
        "([h100.json](01_muon/results/h100.json))"
    )
    (tmp_path / "09_new" / "results").mkdir(parents=True)
    (tmp_path / "09_new" / "results" / "h100.json").write_text(json.dumps({"rows": []}))
    monkeypatch.setitem(HEADLINES, "09_new", Headline("09_new/results/h100.json"))
    assert headline("09_new", tmp_path) == "[h100.json](09_new/results/h100.json) (no headline chosen yet)"
    monkeypatch.setitem(HEADLINES, "09_none", Headline(None, missing="not measured (no run yet)"))
    assert headline("09_none", tmp_path) == "not measured (no run yet)"
    with pytest.raises(ValueError, match="expected one of"):
        headline("09_nope", tmp_path)


def test_headline_names_the_file_when_its_row_is_gone(tmp_path):
    (tmp_path / "01_muon" / "results").mkdir(parents=True)
    (tmp_path / "01_muon" / "results" / "h100.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"01_muon/results/h100.json: cannot read 01_muon's headline"):
        headline("01_muon", tmp_path)


def test_chapter_table_adds_or_replaces_the_headline_column_and_keeps_the_prose(tmp_path):
    (tmp_path / "01_muon" / "results").mkdir(parents=True)
    (tmp_path / "01_muon" / "results" / "h100.json").write_text(json.dumps(_muon_json(2.0)))
    four = "| folder | paper | what | cpu |\n|---|---|---|---|\n| [`01_muon/`](01_muon/) | P | a \\| b | yes |"
    table = chapter_table(four, tmp_path)
    assert table.splitlines()[0] == "| folder | paper | what you build | runs on CPU? | headline result |"
    assert table.splitlines()[2].startswith(
        "| [`01_muon/`](01_muon/) | P | a \\| b | yes | Newton–Schulz 1.00× (4096²) and 2.00×"
    )
    assert chapter_table(table, tmp_path) == table
    with pytest.raises(ValueError, match="expected 5 cells, got 2"):
        chapter_table("| h | h |\n|---|---|\n| [`01_muon/`](01_muon/) | x |", tmp_path)
    with pytest.raises(ValueError, match="expected a link to the folder"):
        chapter_table("| h |\n|---|\n| a | b | c | d |", tmp_path)

"""The instructor kit: every chapter's solutions pass its grader, every untouched stub is "not attempted",
the grader's verdicts on a toy chapter, and the student copy leaves the solutions out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nanokimi.grade import REPO, chapters_with_exercises, grade_chapter, main, student_copy
from nanokimi.triton_utils import interpreting

CHAPTERS = chapters_with_exercises()
# Exercises are graded the way students run them: on the CPU, Triton under the interpreter (`make test`).
needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="exercises are graded on the CPU with the Triton interpreter (make test)"
)


@needs_interpreter
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solutions_pass(chapter):
    results = grade_chapter(chapter, solutions=True)
    assert results, f"{chapter}: no exercises found"
    bad = [r for r in results if r.status != "PASS"]
    assert not bad, "\n".join(f"{r.exercise}: {r.status} {r.detail}" for r in bad)


@needs_interpreter
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_stubs_are_not_attempted(chapter):
    results = grade_chapter(chapter)
    assert len(results) >= 3, f"{chapter}: expected 3-5 exercises, found {len(results)}"
    bad = [r for r in results if r.status != "NOT ATTEMPTED"]
    assert not bad, "\n".join(f"{r.exercise}: {r.status} {r.detail}" for r in bad)
    for stub in (REPO / chapter / "exercises").glob("ex*.py"):
        assert "# YOUR CODE HERE (roughly" in stub.read_text(), f"{stub.name}: no '# YOUR CODE HERE' marker"
        assert (REPO / chapter / "solutions" / stub.name).exists(), f"{chapter}: no solution for {stub.name}"


def _toy_chapter(root: Path) -> None:
    ex = root / "09_toy" / "exercises"
    ex.mkdir(parents=True)
    (ex / "checks.py").write_text(
        "def check_ex1_double(m):\n    assert m.double(3) == 6, f'double(3) gave {m.double(3)}, expected 6'\n"
        "def check_ex2_square(m):\n    assert m.square(3) == 9, f'square(3) gave {m.square(3)}, expected 9'\n"
        "def check_ex3_neg(m):\n    assert m.neg(3) == -3\n"
    )
    stub = "def {f}(x):\n    # YOUR CODE HERE (roughly 1 line)\n    raise NotImplementedError\n"
    for name, f in (("ex1_double", "double"), ("ex2_square", "square"), ("ex3_neg", "neg")):
        (ex / f"{name}.py").write_text(stub.format(f=f))


def test_grader_verdicts_on_a_toy_chapter(tmp_path):
    _toy_chapter(tmp_path)
    attempt = tmp_path / "mine"
    attempt.mkdir()
    (attempt / "ex1_double.py").write_text("def double(x):\n    return 2 * x\n")
    (attempt / "ex2_square.py").write_text("def square(x):\n    return 2 * x\n")
    (attempt / "ex3_neg.py").write_text((tmp_path / "09_toy/exercises/ex3_neg.py").read_text())
    got = {r.exercise: r for r in grade_chapter("09_toy", attempt, root=tmp_path)}
    assert got["ex1_double"].status == "PASS"
    assert got["ex2_square"].status == "FAIL" and "square(3) gave 6, expected 9" in got["ex2_square"].detail
    assert got["ex3_neg"].status == "NOT ATTEMPTED"
    untouched = grade_chapter("09_toy", root=tmp_path)
    assert {r.status for r in untouched} == {"NOT ATTEMPTED"}


def test_grader_bad_input(tmp_path):
    with pytest.raises(ValueError, match="chapter: expected a chapter folder"):
        grade_chapter("99_nothing")
    _toy_chapter(tmp_path)
    with pytest.raises(ValueError, match="path: expected a folder"):
        grade_chapter("09_toy", tmp_path / "missing", root=tmp_path)
    with pytest.raises(SystemExit):
        main(["99_nothing"])


def test_student_copy_has_no_solutions(tmp_path):
    dest = student_copy(tmp_path / "student")
    assert (dest / "Makefile").exists() and (dest / "shared" / "grade.py").exists()
    assert not [p for p in dest.rglob("*") if "solutions" in p.parts]
    for chapter in CHAPTERS:
        assert (dest / chapter / "exercises" / "checks.py").exists()
    with pytest.raises(ValueError, match="dest: expected a new or empty folder"):
        student_copy(dest)


@needs_interpreter
def test_grade_command_line_exit_status():
    if not CHAPTERS:
        pytest.skip("no chapter has exercises yet")
    ok = subprocess.run([sys.executable, "-m", "nanokimi.grade", CHAPTERS[0], "--solutions"], capture_output=True)
    assert ok.returncode == 0, ok.stdout.decode() + ok.stderr.decode()
    assert b"PASS" in ok.stdout

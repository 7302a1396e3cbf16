"""The exercise grader: ``python -m nanokimi.grade 03_kda_linear [--path my_copy/]`` (or ``make grade CHAPTER=…``).

Layout of a chapter's exercises (same in every chapter)::

    NN_name/exercises/exK_topic.py   a task: docstring (task, equation, shapes) and stubs that raise
                                     NotImplementedError where it says ``# YOUR CODE HERE (roughly N lines)``
    NN_name/exercises/checks.py      ``check_exK_topic(module)`` for each exercise: runs the attempt against the
                                     chapter's reference on random and edge-case inputs; raises AssertionError
                                     with a hint (which input, which element, how large the error) on failure
    NN_name/solutions/exK_topic.py   the worked solution, same file name (kept out of the student copy)

An attempt whose code still raises NotImplementedError is reported as "not attempted", not as a failure. The exit
status is non-zero when any attempted exercise fails. ``--student-copy DEST`` writes a copy of the repository's
tracked files without any ``solutions/`` folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "Result",
    "call_attempt",
    "grade_chapter",
    "chapters_with_exercises",
    "student_copy",
    "main",
]


@dataclass
class Result:
    exercise: str
    status: str  # "PASS" | "FAIL" | "NOT ATTEMPTED"
    detail: str = ""


def call_attempt(fn, *args, **kwargs):
    """Call a student's function for a check. A ``raise NotImplementedError`` left in a kernel body arrives wrapped
    (once or twice) in triton's InterpreterError under the interpreter, and as a compilation error quoting the
    ``raise`` line on a GPU: either is surfaced as NotImplementedError, so the grader says "not attempted" rather
    than "failed"."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        cause = exc
        while cause is not None:
            if isinstance(cause, NotImplementedError) or "raise NotImplementedError" in str(cause):
                raise NotImplementedError(f"a kernel body still raises NotImplementedError ({exc})") from exc
            cause = cause.__cause__ or cause.__context__
        raise


def chapters_with_exercises(root: Path = REPO) -> list[str]:
    """Chapter folders that ship ``exercises/checks.py``."""
    return sorted(p.parent.parent.name for p in root.glob("0[0-9]_*/exercises/checks.py"))


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _short_trace(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def grade_chapter(
    chapter: str, path: str | Path | None = None, solutions: bool = False, root: Path = REPO
) -> list[Result]:
    """Grade every exercise of ``chapter`` found in ``path`` (default: the chapter's ``exercises/``, or its
    ``solutions/`` when ``solutions`` is true)."""
    chapter_dir = root / chapter
    checks_path = chapter_dir / "exercises" / "checks.py"
    if not checks_path.exists():
        known = ", ".join(chapters_with_exercises(root)) or "none yet"
        raise ValueError(f"chapter: expected a chapter folder with exercises/checks.py ({known}), got {chapter!r}")
    if path is None:
        path = chapter_dir / ("solutions" if solutions else "exercises")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: expected a folder holding the exercise files, got {str(path)!r}")
    checks = _load(checks_path, f"_nanokimi_checks_{chapter}")
    names = sorted(p.stem for p in (chapter_dir / "exercises").glob("ex*.py"))
    results = []
    for name in names:
        check = getattr(checks, f"check_{name}", None)
        if check is None:
            raise RuntimeError(f"{checks_path}: no check_{name} for exercise {name}")
        attempt = path / f"{name}.py"
        if not attempt.exists():
            results.append(Result(name, "NOT ATTEMPTED", f"no file {attempt}"))
            continue
        try:
            check(_load(attempt, f"_nanokimi_attempt_{chapter}_{name}"))
        except NotImplementedError as exc:
            results.append(Result(name, "NOT ATTEMPTED", _short_trace(exc)))
        except Exception as exc:  # a wrong attempt may fail in any way; report it, keep grading the others
            results.append(Result(name, "FAIL", _short_trace(exc)))
        else:
            results.append(Result(name, "PASS"))
    return results


def format_results(chapter: str, results: list[Result]) -> str:
    width = max([len(r.exercise) for r in results] + [8])
    lines = [f"{chapter}:", f"  {'exercise':<{width}}  result         detail"]
    for r in results:
        detail = r.detail.replace("\n", "\n" + " " * (width + 19))
        lines.append(f"  {r.exercise:<{width}}  {r.status:<13}  {detail}")
    return "\n".join(lines)


def student_copy(dest: str | Path) -> Path:
    """Copy the repository's tracked files to ``dest``, leaving out every ``solutions/`` folder."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"dest: expected a new or empty folder, got {str(dest)!r} which has files")
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if "solutions" in Path(rel).parts:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanokimi.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapter", nargs="?", help="chapter folder, e.g. 03_kda_linear (default: all)")
    parser.add_argument("--path", help="folder holding your exercise files (default: the chapter's exercises/)")
    parser.add_argument("--solutions", action="store_true", help="grade the worked solutions instead")
    parser.add_argument("--student-copy", metavar="DEST", help="write a copy of the repo without solutions/")
    args = parser.parse_args(argv)
    if args.student_copy:
        print(f"student copy written to {student_copy(args.student_copy)}")
        return 0
    chapters = [args.chapter] if args.chapter else chapters_with_exercises()
    if args.path and len(chapters) != 1:
        parser.error("--path: name one chapter to grade a copy of its exercises")
    failed = False
    for chapter in chapters:
        try:
            results = grade_chapter(chapter, args.path, solutions=args.solutions)
        except ValueError as exc:
            parser.error(str(exc))
        print(format_results(chapter, results))
        failed |= any(r.status == "FAIL" for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

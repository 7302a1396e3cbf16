"""Synthetic tasks for TinyKimi: a character tokenizer, deterministic problem generators, verifiers, splits.

Nothing is downloaded. Every example is a ``(prompt, response)`` pair of strings; the model reads
``<bos> prompt response <eos>`` and is trained on the response tokens (and ``<eos>``) only.

Tasks (``make_task(name, **knobs)``):

* ``add``     — ``"047+385="`` → ``"0432"``. Operands have exactly ``digits`` digits (zero-padded), the answer
  ``digits + 1``; ``digits`` may be a tuple (one count drawn per example: a mixture of difficulties, so that a
  model trained on it has a pass rate strictly between 0 and 1 on its hardest count). Knobs: ``reverse``
  (answer written least-significant digit first, which lets a left-to-right model emit each digit once its
  carry is known), ``scratchpad`` (verbosity 0, 1 or 2, or a tuple to draw one per example, so response lengths
  vary), ``label_noise`` (input-dependent label noise, see below).
* ``mqar``    — multi-query associative recall: ``pairs`` key–value pairs (lower-case keys, upper-case
  values), ``gap`` filler tokens, ``|``, then ``queries`` query keys each followed by its value. Only the
  values are scored (the query keys are given, as in Zoology's MQAR).
* ``copy`` / ``reverse`` — ``"qwerty="`` → ``"qwerty"`` / ``"ytrewq"`` with ``length`` letters.

Each task has ``ood()``: the out-of-distribution variant (more digits, more pairs, longer inputs), and
``check(prompt, response) -> bool``: a verifier that needs no reference answer (it recomputes it).

Splits. A problem's split is a pure function of its identity (the prompt, plus the query keys for MQAR):
``blake2b(problem) mod 1000`` < 800 → train, < 900 → val, else test. Two splits therefore never share a
problem, whatever the seed, and sampling ``n`` examples of a split is rejection sampling from the task's
distribution. The same seed gives the same examples on every machine (NumPy's PCG64 and blake2b are both
platform-independent).

Label noise (chapter 08's aleatoric-uncertainty experiment). ``add`` with ``label_noise = r_max > 0``
corrupts the units digit of the final answer (replaced by a different, uniformly drawn digit) with
probability ``rate(a, b) = r_max · ⌊a / 10^(digits-1)⌋ / 9``: it grows with the leading digit of the first
operand, so the true noise rate of every prompt is known (``task.noise_rate(prompt)``). The verifier always
checks against the clean sum.
"""

from __future__ import annotations

import hashlib
import inspect
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nanokimi.checks import check_in, check_positive_int

__all__ = [
    "CharTokenizer",
    "TOKENIZER",
    "Example",
    "Batch",
    "Task",
    "AdditionTask",
    "MQARTask",
    "SequenceTask",
    "TASKS",
    "SPLITS",
    "make_task",
    "task_from_spec",
    "split_of",
    "collate",
    "prompt_ids",
]

SPLITS = ("train", "val", "test")
# Fraction of the problem space (per mille) in each split, by the hash of the problem.
_SPLIT_BOUNDS = {"train": (0, 800), "val": (800, 900), "test": (900, 1000)}


class CharTokenizer:
    """One token per character, plus three special tokens.

    ``ids = [<pad>=0, <bos>=1, <eos>=2] + one id per character of ``chars``, in order.``
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str = string.digits + "+=;,.|" + string.ascii_lowercase + string.ascii_uppercase):
        if len(set(chars)) != len(chars):
            raise ValueError(f"chars: expected distinct characters, got duplicates in {chars!r}")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._char_to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self._id_to_char = {i: c for c, i in self._char_to_id.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Characters → ids, optionally wrapped in ``<bos>`` / ``<eos>``."""
        ids = [self.bos_id] if bos else []
        for pos, c in enumerate(text):
            if c not in self._char_to_id:
                raise ValueError(f"text: character {c!r} at position {pos} is not in the vocabulary {self.chars!r}")
            ids.append(self._char_to_id[c])
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, stop_at_eos: bool = True) -> str:
        """Ids → text; special tokens are dropped and, with ``stop_at_eos``, nothing after the first ``<eos>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id and stop_at_eos:
                break
            if i < len(self.SPECIALS):
                continue
            if i not in self._id_to_char:
                raise ValueError(f"ids: {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(self._id_to_char[i])
        return "".join(out)


TOKENIZER = CharTokenizer()


@dataclass
class Example:
    """One problem. ``scored`` marks which response characters count (None: all); ``<eos>`` always counts."""

    prompt: str
    response: str
    scored: tuple[bool, ...] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    """A padded batch. ``inputs[b, t]`` predicts ``targets[b, t]``; ``loss_mask`` marks scored targets."""

    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64 (pad where not scored)
    loss_mask: torch.Tensor  # [B, T] bool

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device))


def split_of(problem: str) -> str:
    """The split a problem belongs to: blake2b of its identity, mod 1000, into 80/10/10 per mille bands."""
    bucket = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "little") % 1000
    for name, (low, high) in _SPLIT_BOUNDS.items():
        if low <= bucket < high:
            return name
    raise AssertionError("unreachable: the bands cover 0..999")


def collate(examples: Sequence[Example], tokenizer: CharTokenizer = TOKENIZER) -> Batch:
    """Right-padded ``<bos> prompt response <eos>`` sequences with next-token targets and the scored mask."""
    if len(examples) == 0:
        raise ValueError("examples: expected at least one example, got 0")
    rows, masks = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt, bos=True)
        response = tokenizer.encode(ex.response, eos=True)
        scored = list(ex.scored) if ex.scored is not None else [True] * len(ex.response)
        if len(scored) != len(ex.response):
            raise ValueError(f"examples: scored has {len(scored)} entries for a response of {len(ex.response)}")
        rows.append(prompt + response)
        # Target t is token t+1: prompt targets (except the last prompt position) are never scored.
        masks.append([False] * (len(prompt) - 1) + scored + [True])
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        n = len(row) - 1
        inputs[b, :n] = torch.tensor(row[:-1])
        targets[b, :n] = torch.tensor(row[1:])
        loss_mask[b, :n] = torch.tensor(mask)
    return Batch(inputs, targets, loss_mask)


def prompt_ids(examples: Sequence[Example], tokenizer: CharTokenizer = TOKENIZER) -> list[list[int]]:
    """``<bos> prompt`` token ids of each example: what ``TinyKimi.generate`` continues."""
    return [tokenizer.encode(ex.prompt, bos=True) for ex in examples]


class Task:
    """A family of problems: ``sample`` draws one, ``examples`` draws a split, ``check`` verifies a response."""

    name: str = ""

    def sample(self, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def check(self, prompt: str, response: str) -> bool:
        raise NotImplementedError

    def ood(self) -> Task:
        raise NotImplementedError

    def spec(self) -> dict:
        """The knobs that rebuild this task with ``task_from_spec``."""
        raise NotImplementedError

    @property
    def deterministic(self) -> bool:
        """True when each prompt has exactly one correct response string (teacher-forced exact match is valid)."""
        return True

    def max_response_len(self) -> int:
        """An upper bound on the response length in characters (without ``<eos>``)."""
        raise NotImplementedError

    def problem_id(self, example: Example) -> str:
        """What identifies a problem for the splits (two examples with the same id are the same problem)."""
        return example.prompt

    def examples(self, split: str, n: int, seed: int | Sequence[int], distinct: bool = True) -> list[Example]:
        """``n`` examples of ``split`` drawn with ``seed``; with ``distinct``, no problem appears twice.

        Raises ValueError when the split holds fewer than ``n`` distinct problems (found by exhausting a
        generous number of draws).
        """
        check_in("split", split, SPLITS)
        check_positive_int("n", n)
        seed_seq = [int(s) for s in (seed if isinstance(seed, Sequence) else [seed])]
        rng = np.random.default_rng(seed_seq + [SPLITS.index(split)])
        out: list[Example] = []
        seen: set[str] = set()
        max_draws = 50 * n + 2000
        for _ in range(max_draws):
            ex = self.sample(rng)
            pid = self.problem_id(ex)
            if split_of(pid) != split or (distinct and pid in seen):
                continue
            seen.add(pid)
            out.append(ex)
            if len(out) == n:
                return out
        raise ValueError(
            f"n: asked for {n} {'distinct ' if distinct else ''}{split} examples of {self.spec()}, "
            f"found only {len(out)} in {max_draws} draws (the problem space is too small)"
        )

    def __repr__(self) -> str:
        return "Task(" + ", ".join(f"{k}={v!r}" for k, v in self.spec().items()) + ")"


def _digit_counts(digits: int | Sequence[int]) -> tuple[int, ...]:
    counts = tuple(digits) if isinstance(digits, Sequence) else (digits,)
    if not counts:
        raise ValueError(f"digits: expected a positive int or a non-empty tuple of them, got {digits!r}")
    for value in counts:
        check_positive_int("digits", value)
    if len(set(counts)) != len(counts):
        raise ValueError(f"digits: expected distinct digit counts, got {digits!r}")
    return counts


def _scratchpad_levels(scratchpad: int | Sequence[int]) -> tuple[int, ...]:
    levels = (scratchpad,) if isinstance(scratchpad, int) else tuple(scratchpad)
    if not levels or any(isinstance(v, bool) or v not in (0, 1, 2) for v in levels):
        raise ValueError(
            f"scratchpad: expected a verbosity in (0, 1, 2) or a non-empty tuple of them, got {scratchpad!r}"
        )
    return levels


class AdditionTask(Task):
    """``a + b`` with ``digits``-digit operands (a tuple of counts: one drawn uniformly per example).

    Response = [scratchpad ";"] answer, where the scratchpad walks the columns from the least significant one,
    with carry-in c and column digits x, y:

    * verbosity 1: ``"15,12,01;"`` — the two-digit column sum ``x + y + c`` per column;
    * verbosity 2: ``"8+7+0=15,5+6+1=12,0+0+1=01;"`` — the whole column equation.

    The answer has ``digits + 1`` digits (zero-padded), reversed when ``reverse``. ``digit_counts`` is always a
    tuple; ``digits`` is that tuple for a mixture, or the int for a single count (whose examples are exactly those
    of ``AdditionTask(digits=d)``).
    """

    name = "add"

    def __init__(
        self,
        digits: int | Sequence[int] = 3,
        reverse: bool = False,
        scratchpad: int | Sequence[int] = 0,
        label_noise: float = 0.0,
        ood_extra_digits: int = 2,
    ):
        self.digit_counts = _digit_counts(digits)
        self.digits: int | tuple[int, ...] = self.digit_counts[0] if len(self.digit_counts) == 1 else self.digit_counts
        self.reverse = bool(reverse)
        self.levels = _scratchpad_levels(scratchpad)
        if not 0.0 <= float(label_noise) <= 1.0:
            raise ValueError(f"label_noise: expected a maximum noise rate in [0, 1], got {label_noise!r}")
        self.label_noise = float(label_noise)
        self.ood_extra_digits = check_positive_int("ood_extra_digits", ood_extra_digits)

    def spec(self) -> dict:
        scratchpad = self.levels[0] if len(self.levels) == 1 else list(self.levels)
        digits = self.digit_counts[0] if len(self.digit_counts) == 1 else list(self.digit_counts)
        return {
            "name": self.name,
            "digits": digits,
            "reverse": self.reverse,
            "scratchpad": scratchpad,
            "label_noise": self.label_noise,
            "ood_extra_digits": self.ood_extra_digits,
        }

    @property
    def deterministic(self) -> bool:
        return len(self.levels) == 1 and self.label_noise == 0.0

    def max_response_len(self) -> int:
        per_column = {0: 0, 1: 3, 2: 9}[max(self.levels)]
        most = max(self.digit_counts)
        return per_column * most + most + 1

    def ood(self) -> AdditionTask:
        """``ood_extra_digits`` more digits than the largest count (one count, never seen in training)."""
        spec = self.spec() | {"digits": max(self.digit_counts) + self.ood_extra_digits}
        return task_from_spec(spec)

    def noise_rate(self, prompt: str) -> float:
        """The probability that this prompt's training label is corrupted (0 without label noise)."""
        a, _, digits = self._parse_prompt(prompt)
        return self.label_noise * (a // 10 ** (digits - 1)) / 9

    def _count(self, digits: int | None) -> int:
        """The digit count to format with: ``digits``, or the task's only count when None."""
        if digits is None:
            if len(self.digit_counts) > 1:
                raise ValueError(f"digits: expected one of {list(self.digit_counts)} for a mixture, got None")
            return self.digit_counts[0]
        return check_in("digits", digits, self.digit_counts)

    def format_prompt(self, a: int, b: int, digits: int | None = None) -> str:
        d = self._count(digits)
        return f"{a:0{d}d}+{b:0{d}d}="

    def format_response(self, a: int, b: int, level: int, digits: int | None = None) -> str:
        d = self._count(digits)
        answer = f"{a + b:0{d + 1}d}"
        if self.reverse:
            answer = answer[::-1]
        if level == 0:
            return answer
        xs, ys = f"{a:0{d}d}"[::-1], f"{b:0{d}d}"[::-1]
        carry, columns = 0, []
        for x, y in zip(xs, ys, strict=True):
            total = int(x) + int(y) + carry
            columns.append(f"{total:02d}" if level == 1 else f"{x}+{y}+{carry}={total:02d}")
            carry = total // 10
        return ",".join(columns) + ";" + answer

    def sample(self, rng: np.random.Generator) -> Example:
        # A single count draws nothing for it, so its examples are bit-for-bit those of the int-only task.
        counts = self.digit_counts
        digits = int(counts[int(rng.integers(len(counts)))]) if len(counts) > 1 else counts[0]
        high = 10**digits
        a, b = int(rng.integers(high)), int(rng.integers(high))
        level = int(self.levels[int(rng.integers(len(self.levels)))]) if len(self.levels) > 1 else self.levels[0]
        prompt = self.format_prompt(a, b, digits)
        response = self.format_response(a, b, level, digits)
        meta = {"a": a, "b": b, "scratchpad": level, "digits": digits}
        if self.label_noise > 0:
            rate = self.noise_rate(prompt)
            corrupted = bool(rng.random() < rate)
            if corrupted:
                # The units digit is the last answer character, or the first one when reversed.
                units_at = len(response) - digits - 1 if self.reverse else len(response) - 1
                wrong = (int(response[units_at]) + 1 + int(rng.integers(9))) % 10
                response = response[:units_at] + str(wrong) + response[units_at + 1 :]
            meta |= {"noise_rate": rate, "corrupted": corrupted}
        return Example(prompt, response, None, meta)

    def _parse_prompt(self, prompt: str) -> tuple[int, int, int]:
        """(a, b, digit count) of ``"a+b="`` whose operands both have one of the task's digit counts."""
        body = prompt[:-1] if prompt.endswith("=") else None
        parts = body.split("+") if body is not None else []
        if (
            len(parts) != 2
            or not all(p.isdigit() for p in parts)
            or len(parts[0]) != len(parts[1])
            or len(parts[0]) not in self.digit_counts
        ):
            shapes = " or ".join(f"'{'d' * d}+{'d' * d}='" for d in self.digit_counts)
            raise ValueError(f"prompt: expected {shapes}, got {prompt!r}")
        return int(parts[0]), int(parts[1]), len(parts[0])

    def check(self, prompt: str, response: str) -> bool:
        """True when the text after the last ``;`` (the whole response without a scratchpad) is the sum."""
        a, b, _ = self._parse_prompt(prompt)
        answer = response.rsplit(";", 1)[-1]
        if not answer.isdigit():
            return False
        return int(answer[::-1] if self.reverse else answer) == a + b


class MQARTask(Task):
    """Multi-query associative recall. Prompt ``"aKbQcZ" + "."*gap + "|"``, response ``"bQaK"`` (scored: values).

    Keys are distinct lower-case letters (so ``pairs ≤ 26``), values upper-case letters drawn with replacement;
    the ``queries`` query keys are distinct keys of the prompt in random order.
    """

    name = "mqar"

    def __init__(self, pairs: int = 8, queries: int | None = None, gap: int = 0, ood_pairs: int | None = None):
        self.pairs = check_positive_int("pairs", pairs)
        if pairs > 26:
            raise ValueError(f"pairs: expected at most 26 (one lower-case letter per key), got {pairs}")
        self.queries = check_positive_int("queries", queries if queries is not None else pairs)
        if self.queries > pairs:
            raise ValueError(f"queries: expected at most pairs={pairs}, got {self.queries}")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap: expected an int >= 0, got {gap!r}")
        self.gap = gap
        self.ood_pairs = ood_pairs if ood_pairs is not None else min(26, 2 * pairs)
        if not self.pairs <= self.ood_pairs <= 26:
            raise ValueError(f"ood_pairs: expected an int in [{pairs}, 26], got {self.ood_pairs}")

    def spec(self) -> dict:
        return {
            "name": self.name,
            "pairs": self.pairs,
            "queries": self.queries,
            "gap": self.gap,
            "ood_pairs": self.ood_pairs,
        }

    def max_response_len(self) -> int:
        return 2 * self.queries

    def ood(self) -> MQARTask:
        """More pairs (the same number of queries, the same gap)."""
        return MQARTask(self.ood_pairs, self.queries, self.gap, self.ood_pairs)

    def problem_id(self, example: Example) -> str:
        return example.prompt + example.response[0::2]

    def sample(self, rng: np.random.Generator) -> Example:
        keys = rng.choice(list(string.ascii_lowercase), size=self.pairs, replace=False)
        values = rng.choice(list(string.ascii_uppercase), size=self.pairs, replace=True)
        prompt = "".join(k + v for k, v in zip(keys, values, strict=True)) + "." * self.gap + "|"
        order = rng.permutation(self.pairs)[: self.queries]
        response = "".join(str(keys[i]) + str(values[i]) for i in order)
        return Example(prompt, response, tuple(i % 2 == 1 for i in range(len(response))))

    def check(self, prompt: str, response: str) -> bool:
        """True when the response is ``queries`` distinct (key, value) pairs, each matching the prompt."""
        table_text = prompt.split("|", 1)[0].rstrip(".")
        table = dict(zip(table_text[0::2], table_text[1::2], strict=False))
        if len(response) != 2 * self.queries:
            return False
        keys, values = response[0::2], response[1::2]
        return len(set(keys)) == len(keys) and all(table.get(k) == v for k, v in zip(keys, values, strict=True))


class SequenceTask(Task):
    """``copy``: ``"qwerty="`` → ``"qwerty"``; ``reverse``: → ``"ytrewq"``. Letters drawn uniformly from a–z."""

    def __init__(self, mode: str = "copy", length: int = 8, ood_length: int | None = None):
        self.name = check_in("mode", mode, ("copy", "reverse"))
        self.length = check_positive_int("length", length)
        self.ood_length = check_positive_int("ood_length", ood_length if ood_length is not None else 2 * length)

    def spec(self) -> dict:
        return {"name": self.name, "length": self.length, "ood_length": self.ood_length}

    def max_response_len(self) -> int:
        return self.length

    def ood(self) -> SequenceTask:
        """Longer inputs."""
        return SequenceTask(self.name, self.ood_length, self.ood_length)

    def sample(self, rng: np.random.Generator) -> Example:
        text = "".join(rng.choice(list(string.ascii_lowercase), size=self.length))
        return Example(text + "=", text if self.name == "copy" else text[::-1])

    def check(self, prompt: str, response: str) -> bool:
        if not prompt.endswith("="):
            raise ValueError(f"prompt: expected letters followed by '=', got {prompt!r}")
        text = prompt[:-1]
        return response == (text if self.name == "copy" else text[::-1])


TASKS = ("add", "mqar", "copy", "reverse")


def make_task(name: str, **knobs) -> Task:
    """Build a task by name; unknown names or knobs raise ValueError listing what exists."""
    check_in("task", name, TASKS)
    builder = {"add": AdditionTask, "mqar": MQARTask, "copy": SequenceTask, "reverse": SequenceTask}[name]
    allowed = [k for k in inspect.signature(builder).parameters if k != "mode"]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown task knobs {unknown} (this task takes {allowed})")
    if builder is SequenceTask:
        return SequenceTask(name, **knobs)
    return builder(**knobs)


def task_from_spec(spec: dict) -> Task:
    """Rebuild a task from ``Task.spec()`` (e.g. the one stored in a checkpoint)."""
    knobs = dict(spec)
    name = knobs.pop("name", None)
    if name is None:
        raise ValueError(f"spec: expected a 'name' entry, got {spec!r}")
    return make_task(name, **knobs)

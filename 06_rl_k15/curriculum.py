"""Which problems an RL iteration trains on: curriculum (easy → hard) and prioritised sampling (k1.5 §2.3.4).

Levels are tasks ordered from easy to hard (e.g. addition with 3, then 4 digits); each has a fixed pool of
training-split problems. Iteration i draws from the pool of the current stage,

    stage(i) = max { s : starts[s] ≤ i },   starts[0] = 0,

and, within it, samples problems without replacement with

    P(p) ∝ (1 − s_p) + floor,

where s_p is the success rate of p's most recent group (the fraction of its k responses that were correct;
0 before p has been tried). Solved problems fade out, the ones the policy fails come back, and ``floor`` keeps
every problem reachable (with ``floor = 0``, once every idle problem is solved, sampling falls back to
uniform). ``prioritized=False`` samples uniformly. Problems whose group is still being sampled
(a partial rollout in flight) are not drawn again until it is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nanokimi.checks import check_positive_int
from nanokimi.data import TOKENIZER, Task
from nanokimi.rl.rollout import Problem

__all__ = ["Curriculum"]


class Curriculum:
    """Problem pools per level, the stage schedule and the per-problem success rates."""

    def __init__(
        self,
        tasks: Sequence[Task],
        starts: Sequence[int],
        pool_size: int,
        seed: int = 0,
        prioritized: bool = True,
        floor: float = 0.05,
    ):
        if len(tasks) == 0:
            raise ValueError("tasks: expected at least one level, got none")
        if any(not isinstance(t, Task) for t in tasks):
            raise TypeError(f"tasks: expected Task objects, got {[type(t).__name__ for t in tasks]}")
        starts = [int(s) for s in starts]
        if (
            len(starts) != len(tasks)
            or starts[0] != 0
            or any(b <= a for a, b in zip(starts[:-1], starts[1:], strict=True))
        ):
            raise ValueError(
                f"starts: expected one increasing start iteration per level, the first 0, got {starts} "
                f"for {len(tasks)} level(s)"
            )
        check_positive_int("pool_size", pool_size)
        if not 0 <= floor <= 1:
            raise ValueError(f"floor: expected a value in [0, 1], got {floor!r}")
        self.tasks = list(tasks)
        self.starts = starts
        self.prioritized = bool(prioritized)
        self.floor = float(floor)
        self.rng = np.random.default_rng([seed, 6])
        self.pools: list[list[Problem]] = []
        for level, task in enumerate(self.tasks):
            examples = task.examples("train", pool_size, seed=[seed, level])
            self.pools.append(
                [
                    Problem(level, i, ex.prompt, tuple(TOKENIZER.encode(ex.prompt, bos=True)), task)
                    for i, ex in enumerate(examples)
                ]
            )
        self.success = [np.zeros(pool_size) for _ in self.tasks]  # s_p of the latest group
        self.visits = [np.zeros(pool_size, dtype=np.int64) for _ in self.tasks]

    def stage(self, iteration: int) -> int:
        """The level iteration ``iteration`` draws from."""
        return max(s for s, start in enumerate(self.starts) if start <= iteration)

    def weights(self, level: int) -> np.ndarray:
        """Unnormalised sampling weights of the level's pool: (1 − s_p) + floor, or 1 when not prioritised."""
        if not self.prioritized:
            return np.ones(len(self.pools[level]))
        return 1.0 - self.success[level] + self.floor

    def sample(self, n: int, iteration: int, busy: set[tuple[int, int]] = frozenset()) -> list[Problem]:
        """Up to ``n`` distinct problems of the current stage, none of them in ``busy`` ((level, index) pairs)."""
        if n <= 0:
            return []
        level = self.stage(iteration)
        weights = self.weights(level).copy()
        idle = np.ones(len(weights), dtype=bool)
        for lv, index in busy:
            if lv == level:
                idle[index] = False
        weights = np.where(idle, weights, 0.0)
        if not (weights > 0).any():  # every idle problem solved (floor = 0): fall back to uniform
            weights = idle.astype(np.float64)
        free = int((weights > 0).sum())
        if free == 0:
            return []
        picks = self.rng.choice(len(weights), size=min(n, free), replace=False, p=weights / weights.sum())
        return [self.pools[level][int(i)] for i in picks]

    def record(self, problem: Problem, success_rate: float) -> None:
        """Store the success rate of the problem's latest group."""
        if not 0.0 <= success_rate <= 1.0:
            raise ValueError(f"success_rate: expected a value in [0, 1], got {success_rate!r}")
        self.success[problem.level][problem.index] = success_rate
        self.visits[problem.level][problem.index] += 1

    def stats(self, level: int) -> dict:
        """Mean success rate over the visited problems of a level, and the fraction of the pool visited."""
        seen = self.visits[level] > 0
        return {
            "visited": float(seen.mean()),
            "success": float(self.success[level][seen].mean()) if seen.any() else float("nan"),
        }

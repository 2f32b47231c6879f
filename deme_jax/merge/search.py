"""Searches for merge weights: the paper's grid search, and coordinate descent for large N.

Both take ``score(weights) -> float`` (lower is better) and return the best
weights, their score and the trace of every candidate in the order scored, so
a search can be logged, plotted and audited.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

Score = Callable[[np.ndarray], float]
SEARCHES = ("grid", "coordinate")


class Trace:
    """Every scored candidate; a repeated candidate is scored once."""

    def __init__(self, score: Score, on_candidate: Callable[[int, np.ndarray, float], None] | None = None):
        self.score, self.on_candidate = score, on_candidate
        self.candidates: list[tuple[tuple[float, ...], float]] = []
        self.seen: dict[tuple[float, ...], float] = {}

    def __call__(self, weights) -> float:
        key = tuple(round(float(w), 10) for w in weights)
        if key not in self.seen:
            value = float(self.score(np.asarray(key, np.float32)))
            self.seen[key] = value
            self.candidates.append((key, value))
            if self.on_candidate:
                self.on_candidate(len(self.candidates) - 1, np.asarray(key), value)
        return self.seen[key]

    def best(self) -> tuple[np.ndarray, float]:
        # Ties go to the earliest candidate, so the result does not depend on float noise in the order.
        key, value = min(self.candidates, key=lambda c: c[1])
        return np.asarray(key, np.float32), value


def grid_search(score: Score, num_replicas: int, values: Sequence[float], on_candidate=None):
    """Every combination of ``values`` for the N weights: ``len(values) ** N`` candidates."""
    _check_values(values)
    trace = Trace(score, on_candidate)
    for weights in itertools.product(values, repeat=num_replicas):
        trace(weights)
    return (*trace.best(), trace.candidates)


def coordinate_descent(score: Score, num_replicas: int, values: Sequence[float], init: float | Sequence[float],
                       max_rounds: int = 3, on_candidate=None):
    """Cyclic coordinate descent over ``values``: N * len(values) candidates per round, not len(values) ** N.

    Each round sets one weight at a time to the value that scores best with the
    others fixed; it stops after a round that changes nothing, or ``max_rounds``.
    """
    _check_values(values)
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds} must be >= 1")
    weights = np.broadcast_to(np.asarray(init, np.float64), (num_replicas,)).copy()
    trace = Trace(score, on_candidate)
    best = trace(weights)
    for _ in range(max_rounds):
        changed = False
        for i in range(num_replicas):
            for value in values:
                candidate = weights.copy()
                candidate[i] = value
                s = trace(candidate)
                if s < best:
                    best, weights, changed = s, candidate, True
        if not changed:
            break
    return (*trace.best(), trace.candidates)


def _check_values(values) -> None:
    if len(values) == 0:
        raise ValueError("the search needs at least one candidate weight value")

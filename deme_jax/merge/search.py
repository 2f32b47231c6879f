"""Searches for merge weights: the paper's grid search, coordinate descent for large N, and gradient descent.

The grid and coordinate descent take ``score(weights) -> float`` (lower is
better) and return the best weights, their score and the trace of every
candidate in the order scored, so a search can be logged, plotted and audited.
Gradient descent takes a differentiable loss instead: a merge is linear in its
weights (TIES piecewise), so the loss of the merged model has a gradient in
them at the cost of one backward pass, whatever the number of weights.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Score = Callable[[np.ndarray], float]
SEARCHES = ("grid", "coordinate", "gradient")


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


def gradient_search(losses, init, fit_args: tuple, stop_args: tuple, max_steps: int, lr: float,
                    penalty: float = 0.0, patience: int = 10, on_step=None):
    """Adam on the weights, minimising ``mean(losses(w, *fit_args)) + penalty * mean((w - init) ** 2)``.

    ``losses(weights, *args) -> (K,)`` (say, the held-out loss per timestep
    interval of the model merged with ``weights``) must be differentiable in the
    weights; ``init`` (any shape) is where the search starts and where the
    penalty pulls. Each step also evaluates ``losses`` on ``stop_args`` (other
    data): the search stops after ``patience`` steps without a new lowest mean
    there, or after ``max_steps``, and returns the weights of that lowest mean,
    so it cannot fit the noise of the fit data for long. Returns ``(weights,
    best_step, trace)``, the trace holding ``(fit losses, stop losses)`` of every
    step from the start (step 0: ``init``).
    """
    if penalty < 0:
        raise ValueError(f"penalty={penalty} must be >= 0: a negative penalty pushes the weights away from init "
                         "without bound; use 0 for none")
    if max_steps < 1 or patience < 1 or lr <= 0:
        raise ValueError(f"max_steps={max_steps} and patience={patience} must be >= 1 and lr={lr} > 0")
    init = jnp.asarray(init, jnp.float32)

    def objective(w, *args):
        fit = losses(w, *args)
        return jnp.mean(fit) + penalty * jnp.mean((w - init) ** 2), fit

    step_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    stop_fn = jax.jit(losses)
    optimizer = optax.adam(lr)
    weights, state = init, optimizer.init(init)
    best, best_step, best_weights, trace = np.inf, 0, init, []
    for step in range(max_steps + 1):
        (_, fit), grad = step_fn(weights, *fit_args)
        stop = np.asarray(stop_fn(weights, *stop_args))
        trace.append((np.asarray(fit), stop))
        if on_step:
            on_step(step, trace[-1][0], stop)
        if stop.mean() < best:
            best, best_step, best_weights = stop.mean(), step, weights
        elif step - best_step >= patience:
            break
        updates, state = optimizer.update(grad, state)
        weights = optax.apply_updates(weights, updates)
    return np.asarray(best_weights), best_step, trace


def _check_values(values) -> None:
    if len(values) == 0:
        raise ValueError("the search needs at least one candidate weight value")

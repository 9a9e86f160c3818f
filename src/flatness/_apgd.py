"""Auto-PGD (Croce and Hein, 2020) on the weights.

Maximises ``f(delta) = L(w + c * delta)`` over a :class:`PerturbationSet`
ball.  Compared with plain projected gradient ascent it has

* a step size that starts at ``2 rho`` (scaled coordinates) and is halved at
  checkpoints when progress stalls, restarting from the best point so far;
* momentum ``alpha = 0.75`` on the iterates;
* best-iterate tracking, with the start (``delta = 0`` unless a random start
  is given) among the candidates, so the maximum is never below ``f(start)``.

Cost: ``n_iters`` new iterates.  The start and the first ``n_iters - 1``
iterates need a gradient, the last one only a forward pass, so one run costs
``n_iters`` forward-backward passes plus one forward pass, and ``f(0)`` (the
clean loss) comes out of the first of them.  Extra memory is a fixed number
of parameter-sized buffers (iterate, previous iterate, gradient, best iterate
and its gradient), independent of ``n_iters``: the old gradient's buffer
becomes the next step and is freed before the next gradient exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _distributed
from ._geometry import PerturbationSet

#: ``objective(delta, need_grad) -> (value, grad_delta or None)``
Objective = Callable[[list[Tensor], bool], tuple[float, list[Tensor] | None]]

MOMENTUM = 0.75
#: A checkpoint halves the step unless at least this fraction of the steps
#: since the previous checkpoint increased the objective.
SUCCESS_FRACTION = 0.75


def checkpoints(n_iters: int) -> list[int]:
    """Iterations at which APGD may halve its step size.

    The schedule of Croce and Hein (2020, Section 3.2): ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j +
    max(p_j - p_{j-1} - 0.03, 0.06)`` and checkpoints ``ceil(p_j * n_iters)``.
    The fractions are kept in integer hundredths, so no rounding noise moves
    a checkpoint.  For ``n = 100``: 22, 41, 57, 70, 80, 87, 93, 99; for
    ``n = 20``: 5, 9, 12, 14, 16, 18, 19.  (The sharpness reference
    evaluator accumulates the fractions in floating point, which moves some;
    see ``flatness._apgd_reference.reference_checkpoints``.)
    """
    prev, cur = 0, 22
    points: list[int] = []
    while True:
        w = -(-cur * n_iters // 100)  # ceil(cur / 100 * n_iters)
        if w >= n_iters:
            break
        if w > 0 and (not points or w > points[-1]):
            points.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)
    return points


@dataclass
class APGDResult:
    """Outcome of one APGD run."""

    best_value: float
    best_delta: list[Tensor]
    start_value: float


def apgd(
    objective: Objective,
    pset: PerturbationSet,
    n_iters: int,
    *,
    start: list[Tensor] | None = None,
) -> APGDResult:
    """Maximise ``objective`` over ``pset`` with APGD.

    Parameters
    ----------
    objective : callable
        ``objective(delta, need_grad)`` returns the value at ``delta`` and,
        if ``need_grad``, its gradient with respect to ``delta``.
    pset : PerturbationSet
        The ball (scaled coordinates).
    n_iters : int
        Number of new iterates (>= 1).
    start : list of Tensor, optional
        Starting point inside the ball (default: the centre).

    Returns
    -------
    APGDResult
    """
    x = pset.zeros() if start is None else [t.clone() for t in start]
    eta = 2.0 * pset.rho
    ckpts = set(checkpoints(n_iters))

    # Fixed buffers, updated in place: iterate, previous iterate, best
    # iterate and its gradient.  Allocating fresh parameter-sized
    # tensors every step costs more than the arithmetic on CPU.
    f_x, g_x = objective(x, True)
    start_value = f_x
    best_x = [t.clone() for t in x]
    best_g = [t.clone() for t in g_x]
    best_f = f_x
    x_prev = [t.clone() for t in x]

    successes = 0
    last_ckpt = 0
    eta_at_last, best_at_last = eta, best_f

    for k in range(n_iters):
        # z = P(x + eta * dir(g)), built in the gradient's own buffer: g_x is
        # not needed after this (best_g holds a copy when it matters).
        z = pset.steepest_ascent_(g_x, scale=eta)
        torch._foreach_add_(z, x)
        pset.project_(z)
        if k == 0:
            x_prev, x = x, z
        else:
            # x_new = P(x + a (z - x) + (1 - a)(x - x_prev))
            #       = P(lerp(t, z, a)) with t = 2 x - x_prev = lerp(x_prev, x, 2),
            # built in x_prev's buffer with two passes.
            torch._foreach_lerp_(x_prev, x, 2.0)
            torch._foreach_lerp_(x_prev, z, MOMENTUM)
            pset.project_(x_prev)
            x_prev, x = x, x_prev
        # z (the old gradient's buffer) is dead now: free it before the next
        # gradient is allocated, so the two never exist at once
        del z, g_x
        last = k == n_iters - 1
        f_new, g_new = objective(x, not last)
        if f_new > f_x:
            successes += 1
        if f_new > best_f:
            best_f = f_new
            _distributed.foreach_copy_(best_x, x)
            if g_new is not None:
                _distributed.foreach_copy_(best_g, g_new)
        f_x, g_x = f_new, g_new  # type: ignore[assignment]

        if (k + 1) in ckpts and not last:
            stalled = successes < SUCCESS_FRACTION * (k + 1 - last_ckpt)
            unchanged = eta_at_last == eta and best_at_last == best_f
            if stalled or unchanged:
                eta /= 2
                # Restart from the best point; momentum restarts with it.
                _distributed.foreach_copy_(x, best_x)
                _distributed.foreach_copy_(x_prev, best_x)
                _distributed.foreach_copy_(g_x, best_g)  # into the buffer it replaces
                f_x = best_f
            successes = 0
            last_ckpt = k + 1
            eta_at_last, best_at_last = eta, best_f

    return APGDResult(best_f, best_x, start_value)

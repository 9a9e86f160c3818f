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
of parameter-sized buffers, independent of ``n_iters``: at most three for
the iterate, the previous iterate and the best iterate (shared while two of
them are the same point, never copied), what a restart needs of the best
point's gradient (its signs, one byte each, for linf; a copy for l2), and
the gradient, whose buffer becomes the step ``z`` and then holds the next
perturbed weights (handed to the objective through
:meth:`PerturbationSet.recycle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _distributed
from ._geometry import PerturbationSet, _global_norm, blocks

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

    # The roles x, x_prev and best are held by at most three buffers, and
    # may share one: the best point is never copied, its buffer is only kept
    # from being overwritten (a step then writes into a free buffer).  Of
    # the best point's gradient only its steepest-ascent direction is ever
    # used (after a restart): its signs, a byte each, for linf, saved
    # during the step that reads the gradient anyway.
    f_x, g_x = objective(x, True)
    start_value = f_x
    best_x, x_prev = x, x
    pool = [x]
    best_f = f_x
    best_g: list[Tensor] | None = None
    pending = True  # g_x is the best point's gradient, not yet saved

    successes = 0
    last_ckpt = 0
    eta_at_last, best_at_last = eta, best_f

    for k in range(n_iters):
        # z = P(x + eta * dir(g)) in the gradient's own buffer, then
        # x_new = P(x + a (z - x) + (1 - a)(x - x_prev)) in x_prev's buffer
        # when nothing else holds it, else in a free one; for the first
        # step x_new = z.
        if pending and best_g is None:
            best_g = pset.direction_buffer(g_x)
        out = None
        if k > 0:
            out = x_prev if x_prev is not x and x_prev is not best_x else _free(pool, x, x_prev, best_x, pset)
        x_new = _step(pset, g_x, x, x_prev, out, eta, save=best_g if pending else None,
                      values=k > 0)
        pending = False
        if k == 0:
            x_prev, x = x, x_new  # x_new is z, in the gradient's buffer
            pool.append(x_new)
        else:
            x_prev, x = x, x_new
            # z (the old gradient's buffer) is dead: the step wrote the next
            # perturbed weights w + c * x_new into it, block by block
            pset.recycle(g_x, holding=x_new)
        del x_new, g_x, out
        last = k == n_iters - 1
        f_new, g_new = objective(x, not last)
        if f_new > f_x:
            successes += 1
        if f_new > best_f:
            best_f = f_new
            best_x = x
            pending = g_new is not None
        f_x, g_x = f_new, g_new  # type: ignore[assignment]
        del g_new  # one name per buffer: it is freed as soon as g_x is

        if (k + 1) in ckpts and not last:
            stalled = successes < SUCCESS_FRACTION * (k + 1 - last_ckpt)
            unchanged = eta_at_last == eta and best_at_last == best_f
            if stalled or unchanged:
                eta /= 2
                # Restart from the best point; momentum restarts with it.
                x, x_prev = best_x, best_x
                if not pending:
                    # the best point's direction, into the buffer of the
                    # gradient it replaces (steepest_ascent of the saved
                    # signs is that of the gradient they came from)
                    _distributed.foreach_copy_(g_x, best_g)  # (also FSDP2 DTensors)
                f_x = best_f
            successes = 0
            last_ckpt = k + 1
            eta_at_last, best_at_last = eta, best_f

    pset.recycle(None)
    return APGDResult(best_f, best_x, start_value)


def _free(
    pool: list[list[Tensor]], x: list[Tensor], x_prev: list[Tensor], best: list[Tensor],
    pset: PerturbationSet,
) -> list[Tensor]:
    """A buffer of ``pool`` that none of the roles holds (a new one if all
    are held; there are never more than three)."""
    for buf in pool:
        if buf is not x and buf is not x_prev and buf is not best:
            return buf
    buf = [torch.empty_like(t) for t in x]
    pool.append(buf)
    return buf


def _step(
    pset: PerturbationSet, g: list[Tensor], x: list[Tensor], x_prev: list[Tensor],
    out: list[Tensor] | None, eta: float, *, save: list[Tensor] | None = None,
    values: bool = False,
) -> list[Tensor]:
    """One APGD step: ``z = P(x + eta dir(g))`` written into ``g``; then,
    with ``out`` (every step but the first), ``x_new = P(lerp(lerp(x_prev, x,
    2), z, a))``, that is ``P(x + a (z - x) + (1 - a)(x - x_prev))``, written
    into ``out`` (which may be ``x_prev``).  Returns the buffer holding the
    new iterate.  ``save``: buffers from :meth:`PerturbationSet.direction_buffer`
    that receive what a restart needs of ``g`` (see
    :meth:`PerturbationSet.save_direction`).  ``values`` (with ``out``): ``z``
    is dead once ``x_new`` is known, and its buffer receives the perturbed
    weights ``w + c * x_new`` of the next evaluation.

    The elementwise operations run block by block (``_geometry.blocks``),
    so each block of ``g``, ``x`` and ``x_prev`` is read from memory once for
    all of them; the operations and their order per element are those of
    the plain formulas, so the values are the same bit for bit.  For l2 the
    global norms need three passes: the gradient's norm, ``z``'s, ``x_new``'s.
    """
    rho = pset.rho
    target = g if out is None else out
    values = values and out is not None
    if pset.norm == "linf":
        for gb, xb, pb, ob, sb, wb in blocks(g, x, x_prev, target, save or g, pset._like):
            gb.sign_()
            if save is not None:
                sb.copy_(gb)  # the signs, exactly, into int8
            torch.add(xb, gb, alpha=eta, out=gb)  # eta * sign(g) is exact: one rounding
            gb.clamp_(-rho, rho)
            if out is not None:
                torch.lerp(pb, xb, 2.0, out=ob)
                ob.lerp_(gb, MOMENTUM)
                ob.clamp_(-rho, rho)
                if values:
                    pset.perturbed_block_(gb, wb, ob)
        pset._zero_unscaled_(target)
        return target
    norm = float(_global_norm(g))
    scale = eta / norm if norm > 0 else None
    for gb, xb, sb in blocks(g, x, save or g):
        if save is not None:
            sb.copy_(gb)
        if scale is not None:
            gb.mul_(scale)
        gb.add_(xb)
    pset.project_(g)
    if out is None:
        return g
    for gb, xb, pb, ob in blocks(g, x, x_prev, out):
        torch.lerp(pb, xb, 2.0, out=ob)
        ob.lerp_(gb, MOMENTUM)
    # P(x_new) and, z being dead, w + c * x_new in z's buffer: one pass
    norm = float(_global_norm(out))
    factor = pset.rho / norm if norm > pset.rho else None
    for gb, ob, wb in blocks(g, out, pset._like):
        if factor is not None:
            ob.mul_(factor)
        if values:
            pset.perturbed_block_(gb, wb, ob)
    pset._zero_unscaled_(out)
    return out

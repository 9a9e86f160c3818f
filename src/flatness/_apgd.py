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

For linf balls the step is elementwise, so it runs inside the backward
pass, tensor by tensor, as each gradient is complete (:meth:`_Run.fused`):
the gradient is read once while fresh and never copied, and the step
writes the next iterate and the next perturbed weights in one pass over
x, x_prev and w.  l2 steps need the gradient's global norm first and take
whole gradients (:meth:`_Run.plain`).
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
#: ``fused(values, plan) -> value``: the loss at the perturbed weights
#: ``values`` (``w + c * delta``, in buffers of APGD's).  With ``plan`` (a
#: :class:`_Plan`), ``plan(value)`` is called after the forward pass and
#: returns ``consume``; the backward pass then calls ``consume(i, grad_i,
#: values[i])`` once per tensor, as soon as ``grad_i`` (the gradient with
#: respect to ``values[i]``, ``None`` where the loss does not depend on it)
#: is complete, and ``consume`` overwrites ``values[i]``.  ``plan=None``:
#: the value only.
FusedObjective = Callable[[list[Tensor], "_Plan | None"], float]

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
    fused: FusedObjective | None = None,
    builds_values: bool = True,
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
    fused : callable, optional
        The same objective in the form of :data:`FusedObjective`, used
        instead of ``objective`` for linf balls: each step then runs inside
        the backward pass, tensor by tensor, as soon as a tensor's gradient
        is complete (see :meth:`_Run.fused`).  The iterates are the same bit
        for bit.
    builds_values : bool
        Whether ``objective`` evaluates at ``pset.perturbed(delta)`` (then
        each step writes those perturbed weights into a dead buffer, which
        :meth:`PerturbationSet.perturbed` hands back); ``False`` for an
        objective that builds its own (no elementwise pass is wasted).

    Returns
    -------
    APGDResult
    """
    run = _Run(pset, n_iters, start)
    if fused is not None and pset.norm == "linf":
        return run.fused(fused)
    return run.plain(objective, builds_values)


class _Run:
    """The state of one APGD run and its two loops.

    The roles x, x_prev and best are held by at most three buffers, and may
    share one: the best point is never copied, its buffer is only kept from
    being overwritten (a step then writes into a free buffer).  Of the best
    point's gradient only its steepest-ascent direction is ever used (after
    a restart): its signs, a byte each, for linf, saved during the step that
    reads the gradient anyway.
    """

    def __init__(self, pset: PerturbationSet, n_iters: int, start: list[Tensor] | None) -> None:
        self.pset, self.n_iters = pset, n_iters
        self.x = pset.zeros() if start is None else [t.clone() for t in start]
        self.x_prev = self.best_x = self.x
        self.pool = [self.x]
        self.eta = 2.0 * pset.rho
        self.ckpts = set(checkpoints(n_iters))
        self.best_g: list[Tensor] | None = None
        self.pending = True  # the gradient at x is the best point's, not yet saved
        self.successes = 0
        self.last_ckpt = 0

    def _start(self, f: float) -> None:
        """Record the value at the start point."""
        self.f_x = self.best_f = self.start_value = f
        self.eta_at_last, self.best_at_last = self.eta, f

    def _observe(self, f: float, k: int, has_grad: bool) -> bool:
        """Bookkeeping after the value ``f`` of the iterate of step ``k``
        (progress, best point, checkpoint).  Returns whether the next step
        restarts from the best point with its saved direction (the gradient
        just computed, if any, is then not used)."""
        if f > self.f_x:
            self.successes += 1
        if f > self.best_f:
            self.best_f = f
            self.best_x = self.x
            self.pending = has_grad
        self.f_x = f
        restart_saved = False
        if (k + 1) in self.ckpts and k < self.n_iters - 1:
            stalled = self.successes < SUCCESS_FRACTION * (k + 1 - self.last_ckpt)
            unchanged = self.eta_at_last == self.eta and self.best_at_last == self.best_f
            if stalled or unchanged:
                self.eta /= 2
                # Restart from the best point; momentum restarts with it.
                self.x = self.x_prev = self.best_x
                restart_saved = not self.pending
                self.f_x = self.best_f
            self.successes = 0
            self.last_ckpt = k + 1
            self.eta_at_last, self.best_at_last = self.eta, self.best_f
        return restart_saved

    def _out(self, k: int) -> list[Tensor] | None:
        """The buffer of the iterate of step ``k`` (``k > 0``): x_prev's when
        nothing else holds it, else a free one."""
        x, x_prev, best = self.x, self.x_prev, self.best_x
        if x_prev is not x and x_prev is not best:
            return x_prev
        return _free(self.pool, x, x_prev, best, self.pset)

    def _advance(self, x_new: list[Tensor]) -> None:
        self.pending = False
        self.x_prev, self.x = self.x, x_new

    def _result(self) -> APGDResult:
        self.pset.recycle(None)
        return APGDResult(self.best_f, self.best_x, self.start_value)

    def plain(self, objective: Objective, builds_values: bool = True) -> APGDResult:
        """Steps over whole gradients returned by ``objective`` (see
        :func:`apgd` for ``builds_values``)."""
        pset = self.pset
        f, g = objective(self.x, True)
        self._start(f)
        for k in range(self.n_iters):
            # z = P(x + eta * dir(g)) in the gradient's own buffer, then
            # x_new = P(x + a (z - x) + (1 - a)(x - x_prev)) in x_prev's
            # buffer when nothing else holds it, else in a free one; for the
            # first step x_new = z.
            if self.pending and self.best_g is None:
                self.best_g = pset.direction_buffer(g)
            out = self._out(k) if k > 0 else None
            x_new = _step(pset, g, self.x, self.x_prev, out, self.eta,
                          save=self.best_g if self.pending else None, values=k > 0 and builds_values)
            self._advance(x_new)
            if k == 0:
                self.pool.append(x_new)  # x_new is z, in the gradient's buffer
            elif builds_values:
                # z (the old gradient's buffer) is dead: the step wrote the
                # next perturbed weights w + c * x_new into it, block by block
                pset.recycle(g, holding=x_new)
            del x_new, g, out  # one name per buffer: each is freed as soon as dead
            f, g = objective(self.x, k < self.n_iters - 1)  # type: ignore[assignment]
            if self._observe(f, k, g is not None) and g is not None:
                # the best point's direction, into the buffer of the gradient
                # it replaces (steepest_ascent of the saved signs is that of
                # the gradient they came from)
                _distributed.foreach_copy_(g, self.best_g)  # (also FSDP2 DTensors)
        return self._result()

    def fused(self, objective: FusedObjective) -> APGDResult:
        """Steps taken inside the backward passes of ``objective`` (linf).

        Everything a step depends on besides the gradient (the step size,
        the restart, which buffers hold which point) is decided by the
        values alone, which the forward pass gives before the backward pass
        starts.  So the step of each tensor runs as soon as its gradient is
        complete, reading it while it is fresh, and writes the new iterate
        and the next perturbed weights ``w + c * x_new`` (into the buffer
        of the weights the gradient was taken at).  The gradient is never
        copied, and the whole step reads x, x_prev and w and writes x_new
        and the weights once per iteration.
        """
        pset = self.pset
        values = pset.perturbed(self.x)
        for k in range(-1, self.n_iters - 1):  # the start (-1), then iterates 0 .. n - 2
            plan = _Plan(self, k)
            objective(values, plan)
            plan.finish()
        f = objective(values, None)  # the last iterate: its value only
        self._observe(f, self.n_iters - 1, False)
        return self._result()


class _Plan:
    """The step after one evaluation of :meth:`_Run.fused`, applied tensor
    by tensor during the backward pass that evaluation runs.

    Calling it with the value (after the forward pass) does the
    bookkeeping of that value and fixes the step (its size, buffers, saved
    direction); it returns the consumer of the gradients, ``consume(i,
    grad, values_i)``.
    """

    def __init__(self, run: _Run, k: int) -> None:
        self.run, self.k = run, k
        self.done: list[bool] = []
        self.out: list[Tensor] = []

    def __call__(self, f: float) -> Callable[[int, Tensor | None, Tensor], None]:
        run, k = self.run, self.k
        if k < 0:
            run._start(f)
            self.restart_saved = False
        else:
            self.restart_saved = run._observe(f, k, True)
        step = k + 1
        pset = run.pset
        if run.pending and run.best_g is None:
            run.best_g = pset.direction_buffer(run.x)
        self.save = run.best_g if run.pending else None
        if step == 0:  # x_new = z, in a buffer of its own
            self.out = _free(run.pool, run.x, run.x_prev, run.best_x, pset)
        else:
            self.out = run._out(step)  # type: ignore[assignment]
        self.first = step == 0
        self.eta = run.eta
        self.done = [False] * len(self.out)
        return self.consume

    def consume(self, i: int, grad: Tensor | None, values: Tensor) -> None:
        """The step of tensor ``i`` from its gradient (``None``: zero),
        written into the next iterate's buffer, and ``w + c * x_new`` into
        ``values`` (the weights the gradient was taken at, dead now)."""
        run = self.run
        saved = run.best_g[i] if self.restart_saved else None  # type: ignore[index]
        save = None if self.save is None else self.save[i]
        _linf_step_tensor(run.pset, i, grad, saved, run.x[i], run.x_prev[i], self.out[i], save, values,
                          self.eta, first=self.first)
        self.done[i] = True

    def finish(self) -> None:
        """After the backward pass: every tensor has stepped (the plan was
        called); the new iterate becomes x."""
        if not self.done or not all(self.done):
            raise RuntimeError("flatness internal error: an APGD step missed parameters in the backward pass")
        self.run._advance(self.out)


def _linf_step_tensor(
    pset: PerturbationSet, i: int, grad: Tensor | None, saved: Tensor | None, x: Tensor, x_prev: Tensor,
    out: Tensor, save: Tensor | None, values: Tensor, eta: float, *, first: bool,
) -> None:
    """The linf step of :func:`_step` for tensor ``i`` alone, from the
    gradient with respect to the weights (its signs, as
    :meth:`PerturbationSet.ascent_grad_into` gives them to :func:`_step`)
    or from the ``saved`` signs of a restart; ``z`` lives in a scratch
    block only.  The same operations per element as :func:`_step`, so the
    same values bit for bit."""
    rho = pset.rho
    w = pset._like[i]
    if grad is not None and not grad.is_contiguous():
        grad = grad.contiguous()
    source = saved if saved is not None else grad
    for xb, pb, ob, vb, wb, sb, src in blocks([x], [x_prev], [out], [values], [w], [save if save is not None else x],
                                              [source if source is not None else x], size=pset.block):
        z = pset.scratch_block(xb, slot=1)
        if saved is not None:
            z.copy_(src)  # the signs, exactly
        else:
            if grad is None:
                z.zero_()
            else:
                # sign(c * g) is sign(g) wherever c > 0, and coordinates
                # with c = 0 never move (zeroed below): no scaling needed
                torch.sign(src, out=z)
            if save is not None:
                sb.copy_(z)  # the signs, exactly, into int8
        torch.add(xb, z, alpha=eta, out=z)  # eta * sign(g) is exact: one rounding
        z.clamp_(-rho, rho)
        if first:
            ob.copy_(z)
        else:
            torch.lerp(pb, xb, 2.0, out=ob)
            ob.lerp_(z, MOMENTUM)
            ob.clamp_(-rho, rho)
        pset.perturbed_block_(vb, wb, ob)
    pset._zero_unscaled_one_(i, out)


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
        for gb, xb, pb, ob, sb, wb in blocks(g, x, x_prev, target, save or g, pset._like, size=pset.block):
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
    for gb, xb, sb in blocks(g, x, save or g, size=pset.block):
        if save is not None:
            sb.copy_(gb)
        if scale is not None:
            gb.mul_(scale)
        gb.add_(xb)
    pset.project_(g)
    if out is None:
        return g
    for gb, xb, pb, ob in blocks(g, x, x_prev, out, size=pset.block):
        torch.lerp(pb, xb, 2.0, out=ob)
        ob.lerp_(gb, MOMENTUM)
    # P(x_new) and, z being dead, w + c * x_new in z's buffer: one pass
    norm = float(_global_norm(out))
    factor = pset.rho / norm if norm > pset.rho else None
    for gb, ob, wb in blocks(g, out, pset._like, size=pset.block):
        if factor is not None:
            ob.mul_(factor)
        if values:
            pset.perturbed_block_(gb, wb, ob)
    pset._zero_unscaled_(out)
    return out

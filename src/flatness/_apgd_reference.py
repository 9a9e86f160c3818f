"""APGD on the weights exactly as the sharpness reference evaluator runs it.

The evaluator of Andriushchenko et al. (2023), "A Modern Look at the
Relationship between Sharpness and Generalization" (repository
``tml-epfl/sharpness-vs-generalization``, ``sharpness.py``:
``eval_APGD_sharpness`` and ``weight_ascent_step_momentum``), departs from
the textbook Auto-PGD of Croce and Hein (2020) that :mod:`flatness._apgd`
implements.  This module reproduces its iteration, so that published numbers
can be compared like with like (``flatness.sharpness(...,
algorithm="reference")``).  One iteration, in weight space ``d``, with
``c = |w|`` for the adaptive sets and ``c = 1`` otherwise:

1. the gradient ``g`` of the loss at the *model point* (``w + d``, or the best
   point after a step-size halving reloaded it);
2. ``z = d + eta * c * g / (||g||_2 + 1e-12)`` (l2; the norm is the plain
   weight-space gradient norm) or ``z = d + eta * c * sign(g)`` (linf);
3. ``z`` projected onto the set in weight space: a clamp to
   ``[-rho c, rho c]`` (linf), a rescaling (l2), or for ``adaptive_l2`` the
   Euclidean projection onto the ellipsoid ``||z / c||_2 <= rho`` found by the
   reference's bisection on the Lagrange multiplier (absolute tolerance
   ``1e-5`` on the scaled norm, so an iterate may lie up to ``1e-5``
   outside);
4. ``d_new = 0.75 z + 0.25 d_prev`` with ``d_prev`` the iterate *before*
   ``d`` (not projected again);
5. the loss at ``w + d_new``; if it exceeds the best loss so far (which
   starts at the clean loss), the best point is updated and the step counts
   as a success.

Checkpoints are the Croce-Hein fractions computed in floating point,
``w_j = ceil(p_j * n_iters)``, tested against the 0-based iteration index
(checkpoint ``w_j`` fires after ``w_j + 1`` iterations).  At a checkpoint the
step is halved if fewer than ``0.75 * (i - i_prev)`` successes occurred since
the previous one, or if neither the step nor the best loss changed; a
halving reloads the best weights into the model *without* resetting ``d`` or
``d_prev``, so only the next gradient is taken at the best point.

The reference evaluates the loss at each new point with a forward pass and
then its gradient with a forward-backward pass.  Here one forward-backward
pass gives both (the gradient at the best point is kept for the reloads), so
a run costs ``n_iters`` forward-backward passes plus one forward pass, as
:func:`flatness._apgd.apgd` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._apgd import APGDResult

#: ``objective(d, need_grad) -> (loss at w + d, gradient in d or None)``,
#: ``d`` in weight space.
Objective = Callable[[list[Tensor], bool], tuple[float, list[Tensor] | None]]

MOMENTUM = 0.75
MIN_UPDATE_RATIO = 0.75
#: Stopping tolerance of the reference's ellipsoid bisection (absolute, on
#: the scaled norm ``||d / |w|||_2``).
BISECTION_TOL = 1e-5
#: The reference bisects without a cap and hangs where the tolerance is below
#: the floating-point resolution of the norm (a large ``rho`` in float32);
#: past this many steps the last candidate is kept.
BISECTION_MAX_STEPS = 500


def reference_normalize_logits(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss_fn`` applied to the logits normalised as the reference does:
    ``(z - mean z) / max(||z - mean z||, 1e-10)`` per sample.

    The library's own normalisation divides by the norm whenever it is
    positive; the two differ only for logit vectors constant to within
    ``1e-10``.
    """

    def wrapped(outputs: Tensor, targets: Tensor) -> Tensor:
        out = outputs - outputs.mean(dim=-1, keepdim=True)
        norms = out.norm(dim=-1, keepdim=True)
        return loss_fn(out / torch.clamp(norms, min=1e-10), targets)

    return wrapped


def reference_checkpoints(n_iters: int) -> list[int]:
    """The reference's checkpoints, as 0-based iteration indices.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06)`` accumulated in floating point, ``w_j = ceil(p_j * n_iters)``, until
    ``w_j >= n_iters`` or two equal values.  Rounding moves some of them: for
    ``n = 20`` they are 5, 9, 12, 15, 16, 18, 19 (``0.7000000000000001 * 20``
    rounds up to 15), for ``n = 100`` 22, 41, 58, 70, 80, 87, 93, 99.
    """
    p = [0.0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return [i for i in w[1:] if i < n_iters]


class ReferenceGeometry:
    """Steps and projections of the reference, in weight space.

    Parameters
    ----------
    norm : {"linf", "l2"}
    rho : float
        Radius (of ``d / |w|`` for adaptive sets).
    weights : sequence of Tensor
        The unperturbed weights ``w``.
    adaptive : bool
        Scale by ``c = |w|``.
    """

    def __init__(self, norm: str, rho: float, weights: Sequence[Tensor], *, adaptive: bool) -> None:
        self.norm, self.rho, self.adaptive = norm, float(rho), adaptive
        self._like = [w.detach() for w in weights]
        self.scales = [w.detach().abs() for w in weights] if adaptive else None
        if self.scales is not None and norm == "l2":
            # 1 / |w|^2 for the bisection (inf where w = 0: such a coordinate
            # is never moved, and d / inf = 0 keeps it there).
            self._inv_c2 = [(1 / c) ** 2 for c in self.scales]
            self._mask = (
                [c > 0 for c in self.scales]
                if any(bool((c == 0).any()) for c in self.scales) else None
            )

    def zeros(self) -> list[Tensor]:
        return [torch.zeros_like(w) for w in self._like]

    def random_start(self, generator: torch.Generator) -> list[Tensor]:
        """The reference's random start: ``rho * c * N(0, 1)`` (l2) or
        ``rho * c * U[-1, 1]`` (linf) per coordinate, not projected.

        Drawn parameter by parameter from ``generator`` (``randn`` for l2,
        ``rand`` for linf), in the order of the perturbed parameters.
        """
        out = []
        for i, w in enumerate(self._like):
            if self.norm == "l2":
                t = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
            else:
                t = 2 * torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype) - 1
            out.append(t * (self.rho * self.scales[i]) if self.scales is not None else t * self.rho)
        return out

    # The scalars below stay tensors of the weights' dtype and the sums run
    # in the reference's order, so that float32 runs round as the reference
    # does (a one-ulp difference in a loss can flip a best-value test).

    def step_(self, g: list[Tensor], d: list[Tensor], eta: float) -> list[Tensor]:
        """Overwrite ``g`` with ``d + eta * c * dir(g)``."""
        if self.norm == "l2":
            gnorm = sum(t.norm() ** 2 for t in g) ** 0.5
            torch._foreach_mul_(g, eta / (gnorm + 1e-12))
        else:
            torch._foreach_sign_(g)
            torch._foreach_mul_(g, eta)
        if self.scales is not None:
            torch._foreach_mul_(g, self.scales)
        torch._foreach_add_(g, d)
        return g

    def project_(self, z: list[Tensor]) -> list[Tensor]:
        """Project ``z`` onto the set in weight space, as the reference does."""
        if self.norm == "linf":
            if self.scales is None:
                torch._foreach_clamp_min_(z, -self.rho)
                torch._foreach_clamp_max_(z, self.rho)
            else:
                for t, c in zip(z, self.scales):
                    torch.maximum(torch.minimum(t, c * self.rho), -1.0 * c * self.rho, out=t)
        elif self.scales is None:
            norm = sum((t**2).sum() for t in z) ** 0.5
            if norm > self.rho:
                torch._foreach_mul_(z, self.rho / norm)
        else:
            self._bisect_(z)
        return z

    def _scaled_norm(self, d: list[Tensor]) -> Tensor:
        assert self.scales is not None
        total: Tensor | int = 0
        for i, (t, c) in enumerate(zip(d, self.scales)):
            q = t / c
            if self._mask is not None:
                # The reference computes 0 / 0 = NaN here (a zero weight) and
                # then never projects; such coordinates hold d = 0.
                q = torch.where(self._mask[i], q, torch.zeros_like(q))
            total = total + (q**2).sum()
        return total ** 0.5  # type: ignore[return-value]

    def _bisect_(self, d: list[Tensor]) -> None:
        """The reference's projection onto the ellipsoid: ``d / (1 + 2 lam /
        c^2)`` with ``lam`` bisected until the scaled norm is within
        ``1e-5`` of ``rho``, the search interval doubling at its top."""
        rho = self.rho
        new_norm = self._scaled_norm(d)
        if new_norm <= rho:
            return
        lmbd, min_lmbd, max_lmbd, max_limit = 0.1, 0.0, 10.0, 10.0
        tmp = d
        for _ in range(BISECTION_MAX_STEPS):
            if not (new_norm - rho).abs() > BISECTION_TOL:
                break
            tmp = [t / (1 + 2 * lmbd * ic2) for t, ic2 in zip(d, self._inv_c2)]
            new_norm = self._scaled_norm(tmp)
            if new_norm > rho:
                lmbd, min_lmbd = (lmbd + max_lmbd) / 2, lmbd
            else:
                lmbd, max_lmbd = (min_lmbd + lmbd) / 2, lmbd
            if max_limit - max_lmbd < 1e-2:
                max_limit, max_lmbd = max_limit * 2, max_lmbd * 2
        torch._foreach_copy_(d, tmp)


def reference_apgd(
    objective: Objective,
    geometry: ReferenceGeometry,
    n_iters: int,
    clean_value: float | None = None,
    *,
    start: list[Tensor] | None = None,
) -> APGDResult:
    """One run of the reference's APGD (``eval_APGD_sharpness``, one restart).

    Parameters
    ----------
    objective : callable
        ``objective(d, need_grad)``: loss at ``w + d`` and, if asked, its
        gradient (weight space).
    geometry : ReferenceGeometry
    n_iters : int
        Iterations (>= 1).
    clean_value : float, optional
        The loss at ``w``, where the best value starts; required with
        ``start`` (the reference never counts the start's own loss).  Without
        ``start`` the run begins at ``d = 0`` and measures it.
    start : list of Tensor, optional
        Starting perturbation (weight space), e.g.
        :meth:`ReferenceGeometry.random_start`.

    Returns
    -------
    APGDResult
        ``best_delta`` in weight space; ``start_value`` is the clean loss.
    """
    d = geometry.zeros() if start is None else [t.clone() for t in start]
    f, g = objective(d, True)
    if start is None:
        clean_value = f
    if clean_value is None:
        raise ValueError("a run from a given start needs the clean loss")
    best_f = clean_value
    best_d = [t.clone() for t in d]
    best_g = [t.clone() for t in g]  # the model point after a reload
    prev = [t.clone() for t in d]
    eta = prev_eta = 2.0 * geometry.rho
    prev_best, prev_cp, successes = best_f, 0, 0
    ckpts = set(reference_checkpoints(n_iters))

    for i in range(n_iters):
        # z in g's buffer, then d_new = 0.75 z + 0.25 d_prev there too.
        z = geometry.project_(geometry.step_(g, d, eta))
        torch._foreach_mul_(z, MOMENTUM)
        torch._foreach_mul_(prev, 1 - MOMENTUM)
        torch._foreach_add_(z, prev)
        d, prev = z, d
        last = i == n_iters - 1
        f, g = objective(d, not last)
        if f > best_f:
            best_f = f
            torch._foreach_copy_(best_d, d)
            if g is not None:
                torch._foreach_copy_(best_g, g)
            successes += 1
        if i in ckpts:
            stalled = successes < MIN_UPDATE_RATIO * (i - prev_cp)
            unchanged = prev_eta == eta and prev_best == best_f
            prev_eta, prev_best, prev_cp, successes = eta, best_f, i, 0
            if stalled or unchanged:
                eta *= 0.5
                if not last:
                    # The model is reloaded with the best weights; d and
                    # d_prev are kept, so only the next gradient moves.
                    g = [t.clone() for t in best_g]
    return APGDResult(best_f, best_d, clean_value)


def reference_worst_case(
    objective: Objective,
    geometry: ReferenceGeometry,
    n_iters: int,
    restarts: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """``(clean loss, max perturbed loss)`` on one batch: a run from ``d = 0``
    (the reference without ``--sharpness_rand_init``), then ``restarts`` runs
    from the reference's random start (its restart loop with
    ``--sharpness_rand_init``); the maximum includes the clean loss."""
    run = reference_apgd(objective, geometry, n_iters)
    clean, best = run.start_value, run.best_value
    for _ in range(restarts):
        start = geometry.random_start(generator)
        best = max(best, reference_apgd(objective, geometry, n_iters, clean, start=start).best_value)
    return clean, best

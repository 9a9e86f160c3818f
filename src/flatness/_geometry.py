"""Perturbation sets around the weights: scaling, projection, sampling.

A perturbation ``d`` of the selected parameters ``w`` lives in one of four
sets (``DESIGN.md``):

========================  ==========================================
``linf``                  ``|d_i| <= rho``
``l2``                    ``||d||_2 <= rho`` (all parameters jointly)
``adaptive_linf``         ``|d_i / w_i| <= rho``
``adaptive_l2``           ``||d / w||_2 <= rho``
========================  ==========================================

The optimizers work in *scaled coordinates* ``delta`` with ``d = c * delta``,
``c = |w|`` for adaptive sets and ``c = 1`` otherwise.  There every set is a
plain box or ball of radius ``rho``, so its Euclidean projection is exact and
cheap, and the step sizes of APGD are those of the scaled geometry, as in the
reference evaluator.  Coordinates with ``w_i = 0`` have ``c_i = 0``: they stay
unperturbed and never produce NaN.  For users who hold a perturbation in
weight space, :func:`project_weight_space` gives the exact Euclidean
projection onto the set in ``d`` (for ``adaptive_l2`` that set is an
ellipsoid, projected by solving for the Lagrange multiplier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _distributed

NORMS = ("linf", "l2")

__all__ = ["NORMS", "PerturbationSet", "project_weight_space"]


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    # One fused reduction over all tensors; float64 accumulation would cost a
    # copy, and the norms here feed step directions, not reported values.
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


class PerturbationSet:
    """A norm ball around the weights, in scaled coordinates.

    Parameters
    ----------
    norm : {"linf", "l2"}
        The norm of the ball.
    rho : float
        Its radius (in scaled coordinates for adaptive sets).
    weights : sequence of Tensor
        The unperturbed parameter values ``w``.
    adaptive : bool
        Scale coordinates by ``|w|`` (ASAM-style adaptive sharpness).
    """

    def __init__(
        self, norm: str, rho: float, weights: Sequence[Tensor], *, adaptive: bool
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.rho = float(rho)
        self.adaptive = adaptive
        self.scales: list[Tensor] | None = (
            [w.detach().abs() for w in weights] if adaptive else None
        )
        self._like = [w.detach() for w in weights]
        # 0/1 masks of the coordinates that may move, kept only when some
        # weight is exactly zero (multiplying by them is one foreach op).
        self._movable: list[Tensor] | None = None
        if self.scales is not None and any(bool((c == 0).any()) for c in self.scales):
            self._movable = [(c != 0).to(c.dtype) for c in self.scales]

    # -- coordinates --------------------------------------------------------

    def zeros(self) -> list[Tensor]:
        """The centre of the set, ``delta = 0``."""
        return [torch.zeros_like(w) for w in self._like]

    def to_weight_space(self, delta: Sequence[Tensor]) -> list[Tensor]:
        """``d = c * delta``."""
        if self.scales is None:
            return list(delta)
        return torch._foreach_mul(list(delta), self.scales)

    def grad_to_scaled_(self, grad: list[Tensor]) -> list[Tensor]:
        """Chain rule, in place: the gradient in ``delta`` is ``c * grad_d``."""
        if self.scales is not None:
            torch._foreach_mul_(grad, self.scales)
        return grad

    def perturbed_(self, out: list[Tensor], weights: Sequence[Tensor], delta: Sequence[Tensor]) -> list[Tensor]:
        """Write ``w + c * delta`` into the buffers ``out`` (no allocation)."""
        _distributed.foreach_copy_(out, list(weights))  # (also FSDP2 DTensors)
        if self.scales is None:
            torch._foreach_add_(out, list(delta))
        else:
            torch._foreach_addcmul_(out, self.scales, list(delta))
        return out

    # -- geometry in scaled coordinates --------------------------------------

    def project_(self, delta: list[Tensor]) -> list[Tensor]:
        """Project ``delta`` onto the ball of radius ``rho``, in place."""
        if self.norm == "linf":
            torch._foreach_clamp_min_(delta, -self.rho)
            torch._foreach_clamp_max_(delta, self.rho)
        else:
            norm = float(_global_norm(delta))
            if norm > self.rho:
                torch._foreach_mul_(delta, self.rho / norm)
        self._zero_unscaled_(delta)
        return delta

    def steepest_ascent_(self, grad: list[Tensor], scale: float = 1.0) -> list[Tensor]:
        """Turn ``grad`` in place into ``scale`` times the unit steepest-ascent
        direction of the norm: ``sign(g)`` for linf, ``g / ||g||_2`` for l2
        (zero where the gradient is zero)."""
        if self.norm == "linf":
            torch._foreach_sign_(grad)
            if scale != 1.0:
                torch._foreach_mul_(grad, scale)
        else:
            norm = float(_global_norm(grad))
            if norm > 0:
                torch._foreach_mul_(grad, scale / norm)
        return grad

    def contains(self, delta: Sequence[Tensor], *, rtol: float = 1e-6) -> bool:
        """Whether ``delta`` lies in the ball (up to ``rtol``)."""
        if self.norm == "linf":
            size = max(float(t.abs().max()) if t.numel() else 0.0 for t in delta)
        else:
            size = float(_global_norm(delta))
        return size <= self.rho * (1 + rtol)

    # -- sampling ------------------------------------------------------------

    def random_start(self, generator: torch.Generator) -> list[Tensor]:
        """A point drawn uniformly from the ball (a random APGD start)."""
        if self.norm == "linf":
            delta = [self._uniform(t, generator).mul_(self.rho) for t in self._like]
        else:
            delta = [self._normal(t, generator) for t in self._like]
            self._zero_unscaled_(delta)
            n = sum(t.numel() for t in delta)
            radius = self.rho * float(
                torch.rand((), generator=generator, device=self._like[0].device,
                           dtype=torch.float64) ** (1.0 / max(n, 1))
            )
            norm = _global_norm(delta)
            if norm > 0:
                torch._foreach_mul_(delta, radius / float(norm))
        self._zero_unscaled_(delta)
        return delta

    def average_case_sample(self, generator: torch.Generator) -> list[Tensor]:
        """A perturbation for average-case sharpness, in weight space:
        ``rho * c * N(0, I)`` for l2, ``rho * c * U[-1, 1]`` for linf."""
        draw = self._normal if self.norm == "l2" else self._uniform
        delta = [draw(t, generator).mul_(self.rho) for t in self._like]
        if self.scales is not None:
            torch._foreach_mul_(delta, self.scales)  # in place: no second copy
        return delta

    # A DTensor (FSDP2) ``like`` gets the draw of its full shape, sharded:
    # the draw of a one-process run (flatness._distributed.shard_like).
    @staticmethod
    def _uniform(like: Tensor, generator: torch.Generator) -> Tensor:
        return _distributed.shard_like(torch.rand(like.shape, generator=generator, device=like.device,
                                                  dtype=like.dtype).mul_(2).sub_(1), like)

    @staticmethod
    def _normal(like: Tensor, generator: torch.Generator) -> Tensor:
        return _distributed.shard_like(torch.randn(like.shape, generator=generator, device=like.device,
                                                   dtype=like.dtype), like)

    def _zero_unscaled_(self, delta: list[Tensor]) -> None:
        # Coordinates with w_i = 0 cannot move in an adaptive set; keeping
        # their delta at zero also keeps them from using up l2 budget.
        if self._movable is not None:
            torch._foreach_mul_(delta, self._movable)


def project_weight_space(
    d: Sequence[Tensor],
    rho: float,
    norm: str,
    scales: Sequence[Tensor] | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> list[Tensor]:
    """Exact Euclidean projection of a weight-space perturbation onto a set.

    Solves ``min ||x - d||_2`` subject to ``x`` in the set
    ``{x : ||x / c||_p <= rho}`` (``c`` = ``scales``, all ones if ``None``;
    coordinates with ``c_i = 0`` must be zero).  For ``linf`` the solution is
    a clamp to ``[-rho c, rho c]``.  For ``l2`` with scales the set is an
    ellipsoid; the KKT conditions give ``x_i = d_i c_i^2 / (c_i^2 + lam)`` with
    ``lam >= 0`` the root of ``sum_i (d_i c_i / (c_i^2 + lam))^2 = rho^2``,
    found by safeguarded Newton iteration in float64.

    Parameters
    ----------
    d : sequence of Tensor
        The perturbation to project.
    rho : float
        Radius of the set.
    norm : {"linf", "l2"}
    scales : sequence of Tensor, optional
        ``|w|`` for adaptive sets.
    tol : float
        Relative tolerance on the constraint for the ellipsoid root finding.
    max_iter : int
        Iteration cap of the root finding.

    Returns
    -------
    list of Tensor
        The projection, same shapes and dtypes as ``d``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    d = list(d)
    if scales is None:
        if norm == "linf":
            return [t.clamp(-rho, rho) for t in d]
        total = _global_norm(d)
        return [t * (rho / total) for t in d] if total > rho else [t.clone() for t in d]
    scales = list(scales)
    if norm == "linf":
        return [torch.maximum(torch.minimum(t, rho * c), -rho * c) for t, c in zip(d, scales)]
    flat_d = torch.cat([t.reshape(-1) for t in d]).double()
    flat_c = torch.cat([c.reshape(-1) for c in scales]).double()
    flat_d = torch.where(flat_c > 0, flat_d, torch.zeros_like(flat_d))
    safe_c = torch.where(flat_c > 0, flat_c, torch.ones_like(flat_c))
    if torch.linalg.vector_norm(flat_d / safe_c) <= rho:
        x = flat_d
    else:
        c2 = flat_c**2
        dc = flat_d * flat_c

        def phi(lam: float) -> tuple[float, float]:
            # phi(lam) = sum (d c / (c^2 + lam))^2 - rho^2, decreasing and convex.
            denom = c2 + lam
            r = dc / denom
            val = float((r**2).sum()) - rho**2
            deriv = float((-2 * r**2 / denom).sum())
            return val, deriv

        lo, hi = 0.0, float(torch.linalg.vector_norm(dc)) / rho  # phi(hi) <= 0
        lam = hi
        for _ in range(max_iter):
            val, deriv = phi(lam)
            if abs(val) <= tol * rho**2:
                break
            if val > 0:
                lo = lam
            else:
                hi = lam
            step = lam - val / deriv if deriv != 0 else hi
            # Newton from the right converges monotonically for a convex
            # decreasing phi; the bracket guards against round-off.
            lam = step if lo < step < hi else 0.5 * (lo + hi)
        x = flat_d * c2 / (c2 + lam)
    out, start = [], 0
    for t in d:
        n = t.numel()
        out.append(x[start : start + n].reshape(t.shape).to(t.dtype))
        start += n
    return out

r"""The ascent directions of the sharpness-aware optimizers, as functions.

Like ``torch.optim``'s functional core (``SGD.step`` calls ``sgd()``), each
optimizer class gathers its parameters and gradients and calls one of these
functions; they take lists of tensors (one list per param group, so that a
group's ``rho`` scales its part of one joint norm) and plain numbers, touch
no optimizer state, and can be tested on tensors alone:

* :func:`sam_direction` - SAM / ASAM, ``e = rho T^2 g / ||T g||``;
* :func:`consistent_momentum_` and :func:`consistent_direction` - the
  second ascent of consistent SAM;
* :func:`nonuniform_scale` and :func:`natural_ascent_` - NonuniformSAM's
  ``e = rho c F^-1 g`` (and consistent SAM's K-FAC ascent);
* :func:`gsam_gradient_` - GSAM's descent gradient ``g_p - alpha g_perp``;
* :func:`add_scaled` - ``w += scale * e``, the update of a
  :class:`ScaledDirection`.

The other variants' arithmetic is in :mod:`flatness.optim._family_functional`.

A zero gradient gives a zero direction (never a NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatness import _distributed
from flatness._checks import LOW_PRECISION

__all__ = [
    "ScaledDirection",
    "add_scaled",
    "asam_weights",
    "consistent_direction",
    "consistent_momentum_",
    "global_norm",
    "gsam_gradient_",
    "natural_ascent_",
    "nonuniform_scale",
    "safe_inv",
    "sam_direction",
]


@dataclass
class ScaledDirection:
    """A perturbation ``e = scale * tensors`` of one group.

    Returning it from :meth:`~SharpnessAwareOptimizer.ascent_direction`
    instead of the product lets :meth:`~SharpnessAwareOptimizer.perturb`
    fuse the scaling into the update (``w += scale * t`` in one pass on CPU,
    no temporary).  ``tensors`` may be the live gradients: they are only read.

    Attributes
    ----------
    tensors : list of Tensor
    scale : Tensor or float
        A 0-d tensor (kept on the device; no host synchronization on CUDA)
        or a number.
    """

    tensors: list[Tensor]
    scale: Tensor | float


def global_norm(tensor_lists: Sequence[Sequence[Tensor]], ord: float = 2.0) -> Tensor:
    """Norm of the concatenation of all tensors in ``tensor_lists``.

    One ``torch._foreach_norm`` per list; the result is a 0-d tensor on the
    first tensor's device, in float64 if any tensor is float64 and float32
    otherwise (so half-precision gradients do not overflow).  An empty input
    gives ``0``.
    """
    flat = [t for ts in tensor_lists for t in ts]
    if not flat:
        return torch.zeros(())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in flat) else torch.float32
    device = flat[0].device
    parts = [
        n if n.device == device else n.to(device)
        for ts in tensor_lists
        if len(ts)
        for n in torch._foreach_norm(list(ts), ord, dtype=dtype)
    ]
    return torch.linalg.vector_norm(torch.stack(parts), ord)


def safe_inv(norm: Tensor) -> Tensor:
    """``1 / norm``, and ``0`` for a zero norm (a zero direction, not a NaN)."""
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def _per_group(value: Any, n: int) -> list[Any]:
    """A per-group setting: a sequence of ``n`` values or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected one value per group ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def asam_weights(params: Sequence[Tensor], eta: float) -> list[Tensor]:
    """ASAM's ``T = |w| + eta`` (new tensors; float32 for float16 /
    bfloat16 parameters: ``T g`` and ``T^2 g`` of small float16 gradients
    fall into subnormals, 2.3% off float64 for ``|g| ~ 1e-5``)."""
    params = list(params)
    if any(p.dtype in LOW_PRECISION for p in params):
        t = [p.float() if p.dtype in LOW_PRECISION else p.clone() for p in params]
        torch._foreach_abs_(t)
    else:
        t = torch._foreach_abs(params)
    if eta:
        torch._foreach_add_(t, eta)
    return t


@torch.no_grad()
def sam_direction(
    grads: Sequence[Sequence[Tensor]],
    params: Sequence[Sequence[Tensor]],
    rho: float | Sequence[float],
    adaptive: bool | Sequence[bool] = False,
    eta: float | Sequence[float] = 0.0,
) -> list[ScaledDirection]:
    r"""SAM's (and ASAM's) ascent direction, one joint norm over all groups.

    .. math::

        e_k = \rho_k \, \frac{T_k^2 g_k}{\lVert T g \rVert_2}, \qquad
        T_k = |w_k| + \eta_k \ \text{(adaptive groups)}, \quad 1 \ \text{(others)}

    where ``k`` runs over the groups and the norm over all of them.

    Parameters
    ----------
    grads, params : list of list of Tensor
        Per group, the gradients and the parameters (``params`` is read by
        adaptive groups only).  The gradients are only read.
    rho, adaptive, eta
        Per group (a sequence) or one value for every group.

    Returns
    -------
    list of ScaledDirection
        Per group, ``e = scale * tensors`` (``tensors`` are the gradients
        themselves for a non-adaptive group).
    """
    n = len(grads)
    rho, adaptive, eta = _per_group(rho, n), _per_group(adaptive, n), _per_group(eta, n)
    scaled: list[Sequence[Tensor]] = []  # T g (g itself for plain SAM)
    weights: list[list[Tensor] | None] = []  # T, adaptive groups only
    for gs, ps, a, et in zip(grads, params, adaptive, eta):
        if a:
            t = asam_weights(ps, et)
            scaled.append(torch._foreach_mul(t, list(gs)))
            weights.append(t)
        else:
            scaled.append(gs)
            weights.append(None)
    inv = safe_inv(global_norm(scaled))
    out = []
    for r, tg, t in zip(rho, scaled, weights):
        if t is not None:
            torch._foreach_mul_(t, list(tg))  # T^2 g, in the buffer of T
            tg = t
        out.append(ScaledDirection(list(tg), (r * inv).to(tg[0].device)))
    return out


@torch.no_grad()
def consistent_momentum_(
    diffs: Sequence[Tensor], momenta: Sequence[Tensor], alpha: float
) -> list[Tensor]:
    """Consistent SAM's running mean of the gradient change, in one group.

    Returns the new mean ``m' = alpha m + (1 - alpha) d`` (new tensors) and
    turns ``diffs`` (``d = g_2 - g_1``) in place into the part the mean does
    not explain, ``d - m'``.
    """
    ms = torch._foreach_mul(list(momenta), alpha)
    torch._foreach_add_(ms, list(diffs), alpha=1 - alpha)
    torch._foreach_sub_(list(diffs), ms)
    return ms


@torch.no_grad()
def consistent_direction(
    residuals: Sequence[Sequence[Tensor]],
    rho2: float | Sequence[float],
    weights: Sequence[Sequence[Tensor] | None] | None = None,
) -> list[list[Tensor]]:
    r"""Consistent SAM's second ascent, one joint norm over all groups.

    .. math::

        e_k = \rho_{2,k} \, \frac{T_k^2 r_k}{\lVert T r \rVert_2}

    with ``r = g_2 - g_1 - m'`` (see :func:`consistent_momentum_`) and
    ``T_k`` the ASAM weights of group ``k`` taken at ``w`` (``None``: 1).
    """
    n = len(residuals)
    rho2 = _per_group(rho2, n)
    weights = [None] * n if weights is None else list(weights)
    scaled = [torch._foreach_mul(list(r), list(t)) if t is not None else list(r) for r, t in zip(residuals, weights)]
    inv = safe_inv(global_norm(scaled))
    out = []
    for r2, s, t in zip(rho2, scaled, weights):
        e = torch._foreach_mul(s, (r2 * inv).to(s[0].device))
        if t is not None:
            torch._foreach_mul_(e, list(t))
        out.append(e)
    return out


def nonuniform_scale(norm: Tensor, mode: str) -> Tensor:
    """The factor ``c`` of NonuniformSAM's ascent ``e = rho c F^-1 g``.

    ``norm = sqrt(q)``, ``q = g^T F^-1 g`` (a 0-d tensor; no host sync).
    ``"second_moment"``: ``1 / sqrt(q)``.  ``"centered"``: ``1 / sqrt(q (1 -
    q))``, with ``1 - q`` replaced by ``1 - exp(-q)`` where ``q >= 1``.
    ``"gam"``: the arithmetic of the authors' ``GAM.ascent_step`` (Zhou et
    al., 2025), ``1 / ((r + 1e-16)(s + 1e-16))`` with ``r = sqrt(q)`` and
    ``s = sqrt(1 - r)`` (``sqrt(1 - exp(-r))`` where ``r > 1``).  A zero
    ``q`` gives 0 (a zero direction).
    """
    q = norm * norm
    if mode == "second_moment":
        return safe_inv(norm)
    if mode == "centered":
        one_minus = torch.where(q < 1, 1 - q, -torch.expm1(-q))
        return torch.where(q > 0, torch.rsqrt(q * one_minus), torch.zeros_like(q))
    if mode != "gam":
        raise ValueError(f"unknown mode {mode!r}; valid: 'second_moment', 'centered', 'gam'")
    # the code takes sqrt_ of g^T F^-1 g in place, so its "x" in
    # sqrt(1 - x) is sqrt(q), not q; it also adds 1e-16 to both factors
    r = norm
    s = torch.where(r > 1, -torch.expm1(-r), 1 - r).clamp_min(0).sqrt()
    return torch.where(q > 0, 1 / ((r + 1e-16) * (s + 1e-16)), torch.zeros_like(q))


@torch.no_grad()
def natural_ascent_(
    solved: Sequence[Sequence[Tensor]], norm: Tensor, rho: float | Sequence[float], mode: str = "second_moment"
) -> None:
    r"""Scale preconditioned directions into the ascent, in place.

    .. math:: e_k = \rho_k \, c(q)\, F^{-1} g_k, \qquad q = g^\top F^{-1} g

    with ``solved`` = :math:`F^{-1} g` per group, ``norm`` = :math:`\sqrt q`
    and ``c`` = :func:`nonuniform_scale` of ``mode``.  ``"second_moment"``
    (``c = 1 / sqrt(q)``) is the natural-gradient ascent of radius ``rho``
    in the metric ``F``: NonuniformSAM with ``centered_covariance=False``
    and consistent SAM's second ascent with ``preconditioner="kfac"``.
    """
    scale = nonuniform_scale(norm, mode)
    for r, e in zip(_per_group(rho, len(solved)), solved):
        torch._foreach_mul_(list(e), (r * scale).to(e[0].device))


@torch.no_grad()
def gsam_gradient_(
    grads: Sequence[Sequence[Tensor]],
    first: Sequence[Sequence[Tensor]],
    alpha: float | Sequence[float],
    scale: float = 1.0,
    *,
    fused: bool | None = None,
) -> None:
    r"""GSAM's descent gradient (Zhuang et al., 2022), in place.

    With ``g_p`` the gradient at ``w + e`` (``grads``) and ``g`` the one at
    ``w`` (``first``), both per group,

    .. math::

        g_\perp = g - \frac{\langle g, g_p \rangle}{\lVert g_p \rVert^2} g_p,
        \qquad g_p \leftarrow g_p - \alpha_k \, s \, g_\perp

    with one projection over all groups.  ``first`` becomes ``g_perp`` in
    groups with ``alpha != 0`` (the others are left as they are).  ``scale``
    ``s`` is a ``GradScaler``'s scale when ``grads`` carries it and ``first``
    does not (the projection coefficient is invariant to it).  ``fused``:
    read the coefficient on the host and update with one multi-tensor add
    (default: on the CPU; elsewhere each tensor is updated by the
    coefficient on its device, without a host sync).
    """
    alpha = _per_group(alpha, len(grads))
    # (FSDP2 DTensors: the shards' products, reduced over the mesh)
    dot = _distributed.dots([x for xs in first for x in xs], [y for ys in grads for y in ys]).sum()
    c = dot * safe_inv(global_norm(grads) ** 2)
    for a, gp, g in zip(alpha, grads, first):
        if not a:
            continue
        # g_perp = g - c g_p in place, without a temporary c g_p of every
        # tensor at once (one parameter size at the step's peak): on the
        # CPU c is read as a number, elsewhere each tensor gets its own
        # fused update (no host sync), on the local shards of FSDP2
        # DTensors (elementwise, sharded alike: no communication)
        if fused if fused is not None else gp[0].device.type == "cpu":
            torch._foreach_add_(list(g), list(gp), alpha=-float(c))
        else:
            neg = -_distributed.local_tensors([c])[0].to(gp[0].device)
            for x, y in zip(_distributed.local_tensors(g), _distributed.local_tensors(gp)):
                x.addcmul_(y, neg)
        torch._foreach_add_(list(gp), list(g), alpha=-a * scale)


def add_scaled(
    params: list[Tensor], tensors: list[Tensor], scale: Tensor | float, *, fused: bool | None = None
) -> None:
    """``params += scale * tensors`` with multi-tensor ops."""
    if fused is None:
        fused = params[0].device.type == "cpu"
    if fused:
        # one pass, no temporary (reading a CPU scalar costs no sync)
        torch._foreach_add_(params, tensors, alpha=float(scale))
    else:
        # no host sync on accelerators: scale on the device, then add
        torch._foreach_add_(params, torch._foreach_mul(tensors, scale))

r"""WSAM (weighted sharpness as a regularization term, Yue et al., KDD 2023)
and Friendly SAM (Li et al., CVPR 2024): SAM variants that change how the
two gradients are combined (WSAM) or what the ascent follows (F-SAM).

Both are :class:`~flatness.optim.SAM` subclasses: perturb / restore, errors,
``GradScaler``, ``same_rng``, ``freeze_bn``, DDP and ``state_dict`` come from
:class:`~flatness.optim.SharpnessAwareOptimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _family as fam
from ._base import AscentGroup, ScaledDirection, global_norm
from ._family_functional import friendly_direction_, friendly_momentum_, wsam_gradient_
from .sam import SAM

__all__ = ["FriendlySAM", "WSAM"]


class WSAM(SAM):
    r"""Weighted SAM: sharpness as a weighted regularization term.

    WSAM minimizes

    .. math::

        L(w) + \frac{\gamma}{1 - \gamma}\,\bigl(L(w + e) - L(w)\bigr),
        \qquad e = \rho\, g / \lVert g\rVert ,

    whose gradient is ``g + a (g_s - g)`` with ``a = gamma / (1 - gamma)``,
    ``g = grad L(w)`` and ``g_s = grad L(w + e)``.  In the paper's
    *decoupled* form (Algorithm 1, the default) the base optimizer steps
    with the plain gradient ``g`` and the sharpness term is applied
    afterwards with the group's learning rate, outside the base optimizer's
    momentum and preconditioning:

    .. math::

        w \leftarrow \mathrm{base\_step}(w, g) - \mathrm{lr}\; a\, (g_s - g) .

    With ``decouple=False`` the base optimizer steps with
    ``(1 - a) g + a g_s``.  ``gamma = 0`` is the base optimizer with the
    plain gradient, bit for bit; ``gamma = 1/2`` (``a = 1``, coupled) is
    SAM.  Cost: two forward-backward passes, as SAM, plus one copy of ``g``.

    Follows the paper and ``pytorch_optimizer.WSAM`` (which follows the
    authors' code); departures: no ``1e-12`` in the ascent norm, no
    built-in gradient clipping (``max_norm``).  Its trajectory agrees with
    ours to ~1e-7 relative (it takes the ascent norm in float32).

    Parameters
    ----------
    params, base_optimizer, adaptive, eta, same_rng, per_replica, model, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    rho : float
        SAM radius.
    gamma : float
        Weight of the sharpness term, in ``[0, 1)`` (the paper: 0.8 to 0.95;
        ``pytorch_optimizer``'s default 0.9).
    decouple : bool
        The paper's decoupled update (default) or the coupled gradient.
    """

    group_defaults = {"rho": 0.05, "gamma": 0.9, "adaptive": False, "eta": 0.0, "perturb": True}

    @dataclass
    class _StepState:
        #: (group, params, copy of g) per group, from ascent_direction to second_step.
        first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None = None

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        decouple: bool = True,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(decouple, bool):
            raise TypeError(f"decouple must be a bool, got {decouple!r}")
        defaults = {"rho": rho, "gamma": gamma, "adaptive": adaptive, "eta": eta, "perturb": True}
        super(SAM, self).__init__(
            params, base_optimizer, defaults, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        self.decouple = decouple

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "gamma":
            return fam.check_number("gamma", value, 0.0, 1.0, high_open=True)
        return super()._check_setting(key, value)

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """SAM's ascent; keeps a copy of ``g``."""
        # perturb=False groups too: e = 0 there, but the rule combines their gradients
        first = [(g.group, list(g.params), fam.clone(g.grads)) for g in [*groups, *self.unperturbed_groups()]]
        self.share_first_pass_([t for *_, copies in first for t in copies])  # (the ascent reads .grad)
        self._stage.variant.first = first
        return super().ascent_direction(groups)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Combine ``g`` and ``g_s``, restore ``w``, take the base step (and,
        decoupled, the sharpness step)."""
        first = self._stage.variant.first
        if not first or self._stage.perturbed is None or self._stage.skip_base_step:
            return super().second_step(zero_grad, scaler=scaler)
        scale = fam.grad_scale(scaler)
        if scale != 1.0:
            gs = [fam.current_grads(params) for _, params, _ in first]
            if not bool(torch.isfinite(global_norm(gs, ord=float("inf")))):
                # leave the non-finite g_s in place: the scaler skips the step
                return super().second_step(zero_grad, scaler=scaler)
        try:
            sharp = self._combine(first, scale)
        except BaseException:
            self.restore()
            raise
        super().second_step(False, scaler=scaler)
        for lr_a, params, d in sharp:
            torch._foreach_add_(params, d, alpha=-lr_a)
        if zero_grad:
            self.zero_grad()

    def _combine(self, first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], scale: float) -> list[Any]:
        sharp = []
        for group, params, g in first:
            a = group["gamma"] / (1.0 - group["gamma"])
            gs = fam.current_grads(params)
            d = wsam_gradient_(gs, g, a, decouple=self.decouple, scale=scale)
            if d is not None:
                sharp.append((group["lr"] * a, params, d))
            for p, x in zip(params, gs):
                if p.grad is None:
                    p.grad = x
        return sharp


class FriendlySAM(SAM):
    r"""Friendly SAM (F-SAM): the ascent follows the batch-specific part of
    the gradient.

    The full gradient's component is estimated by an exponential moving
    average ``m`` of past stochastic gradients and removed from the ascent:

    .. math::

        d = g - \sigma m_{t-1}, \qquad m_t = \lambda m_{t-1} + (1 - \lambda) g,
        \qquad e = \rho\, d / \lVert d\rVert

    (or ASAM's ``rho T^2 d / ||T d||`` with ``adaptive=True``); the base
    optimizer steps with ``grad L(w + e)``.  On the first step ``m`` is set
    to ``g`` and ``d = g`` (SAM), as in the authors' code
    (``nblt/F-SAM``, ``utils.py``, ``FriendlySAM.first_step``), which
    ``pytorch_optimizer.FriendlySAM`` follows too; our trajectories agree to
    ~1e-7 relative (it adds ``1e-12`` to a float32 norm).  ``m`` is kept
    in :attr:`extra_state` (saved by ``state_dict``) and only updated when
    the step completes (an abandoned step or one skipped by a
    ``GradScaler`` leaves it as it was).  Cost: two passes, as SAM, plus
    the moving average; memory: ``m`` between steps, and a buffer for
    ``d`` during one.

    Parameters
    ----------
    params, base_optimizer, rho, adaptive, eta, same_rng, per_replica, model, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    sigma : float
        Weight of the removed full-gradient estimate, ``>= 0`` (paper: 1).
    lmbda : float
        Decay of the moving average, in ``[0, 1]`` (paper: 0.6 to 0.95; 0.9).
    """

    group_defaults = {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9, "adaptive": False, "eta": 0.0, "perturb": True}

    @dataclass
    class _StepState:
        #: (group, [(param, d, m or None)]) per group: the update of ``m``,
        #: from ascent_direction until second_step commits it.
        pending: list[Any] = field(default_factory=list)

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = {"rho": rho, "sigma": sigma, "lmbda": lmbda, "adaptive": adaptive, "eta": eta, "perturb": True}
        super(SAM, self).__init__(
            params, base_optimizer, defaults, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "sigma":
            return fam.check_number("sigma", value, 0.0, float("inf"), high_open=True)
        if key == "lmbda":
            return fam.check_number("lmbda", value, 0.0, 1.0)
        return super()._check_setting(key, value)

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """SAM's ascent along ``d = g - sigma m``; ``m`` is updated in
        :meth:`second_step` (from ``d``: ``lambda m + (1 - lambda) g =
        (lambda + (1 - lambda) sigma) m + (1 - lambda) d``)."""
        pending, shifted = [], []
        for g in groups:
            have = [(p, x, self.extra_state[p].get("fsam_momentum")) for p, x in zip(g.params, g.grads)]
            ps = [p for p, _, m in have if m is not None]
            # d in a copy of g that lives for this step only (kept for the
            # next one it would hold one parameter size between steps)
            ds = fam.clone([x for _, x, m in have if m is not None])
            if ds:
                friendly_direction_(ds, [m for _, _, m in have if m is not None], g.group["sigma"])
            d_of = dict(zip(ps, ds))
            first = {p: x.clone() for p, x, m in have if m is None}
            pending.append((g.group, [(p, d_of[p] if m is not None else first[p], m) for p, x, m in have]))
            shifted.append(AscentGroup(g.group, g.params, [d_of.get(p, x) for p, x, _ in have]))
        self._stage.variant.pending = pending
        return super().ascent_direction(shifted)

    @torch.no_grad()
    def _commit(self, pending: list[Any]) -> None:
        for group, items in pending:
            lam, sigma = group["lmbda"], group["sigma"]
            ms = [m for _, _, m in items if m is not None]
            if ms:
                friendly_momentum_(ms, [d for _, d, m in items if m is not None], lam, sigma)
            for p, d, m in items:
                if m is None:  # first step: m = g (= d, a copy taken in ascent_direction)
                    self.extra_state[p]["fsam_momentum"] = d

    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        pending = self._stage.variant.pending  # (second_step clears the stage)
        super().second_step(False, scaler=scaler)
        if pending and not fam.skipped_by(scaler, self._all_params()):
            self._commit(pending)
        if zero_grad:
            self.zero_grad()

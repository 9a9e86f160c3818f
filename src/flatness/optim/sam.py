"""Sharpness-aware minimization (SAM, Foret et al. 2021) and adaptive SAM
(ASAM, Kwon et al. 2021) around any ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ._base import AscentGroup, SharpnessAwareOptimizer
from ._functional import ScaledDirection, sam_direction

__all__ = ["SAM"]


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around a base optimizer.

    Each step evaluates the gradient at ``w``, moves to

    .. math::

        e = \rho \, \frac{T^2 g}{\lVert T g \rVert_2}, \qquad
        T = \begin{cases} |w| + \eta & \text{adaptive (ASAM)} \\ 1 & \text{otherwise}
        \end{cases}

    evaluates the gradient at ``w + e``, restores ``w`` and lets the base
    optimizer step from ``w`` with that second gradient.  The norm is taken
    over all perturbed parameters jointly; a group's ``rho`` scales its part
    of the direction (as in the community implementation, so a single
    ``rho`` gives ``||e|| = rho`` for SAM).  A zero gradient gives ``e = 0``.

    Parameters
    ----------
    params : iterable or None
        Parameters or param-group dicts.  Groups may set their own
        ``"sam_rho"``, ``"sam_adaptive"``, ``"sam_eta"`` and
        ``"sam_perturb"`` (``False``: not perturbed, still stepped, e.g.
        norms and biases) besides the base optimizer's keys (``lr``, ...;
        the 0.1.0 spelling ``"rho"`` still works, with a ``FutureWarning``,
        where the base optimizer has no ``rho`` of its own).  ``None`` when
        ``base_optimizer`` is an instance.
    base_optimizer : type or torch.optim.Optimizer
        An optimizer class, constructed on the same param groups with
        ``**base_kwargs``, or an already constructed optimizer (its groups may
        carry ``"sam_rho"`` etc.).  Its hyper-parameters are never changed.
    rho : float
        Neighbourhood radius, ``>= 0``.  ``rho=0`` reproduces the base
        optimizer exactly (at twice the cost).
    adaptive : bool
        ASAM: scale the neighbourhood by ``|w| + eta``.
    eta : float
        ASAM's offset, ``>= 0`` (the ASAM paper uses 0.01).
    same_rng : bool
        Replay the RNG state in the second pass so dropout draws the same
        masks in both passes (``step(closure)`` does it; in the two-step
        style wrap the first pass in :meth:`first_pass` and the second in
        :meth:`second_pass`).
    per_replica : bool
        DDP: perturb each replica with its own gradient (first pass inside
        ``model.no_sync()``).  Default: the all-reduced gradient, one global
        perturbation.  Needs ``model``.
    model : nn.Module, optional
        The (DDP-wrapped) model, for ``per_replica`` and ``freeze_bn``.
    freeze_bn : bool
        Freeze BatchNorm running statistics in the second pass (see
        :func:`disable_running_stats`).  Needs ``model``.
    base_kwargs : dict, optional
        Base optimizer arguments whose names SAM also uses:
        ``SAM(params, torch.optim.Adadelta, rho=0.05, base_kwargs={"rho": 0.9})``
        (``rho=`` is always SAM's).
    **base_kwargs
        Arguments of the base optimizer (``lr``, ``momentum``, ...).

    Examples
    --------
    Closure style (the closure is called at ``w`` and at ``w + e``):

    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    >>> def closure():
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)

    Two-step style (as the community single-file SAM):

    >>> loss_fn(model(x), y).backward()
    >>> opt.first_step(zero_grad=True)
    >>> loss_fn(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)
    """

    group_defaults = {"rho": 0.05, "adaptive": False, "eta": 0.0, "perturb": True}

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = {"rho": rho, "adaptive": adaptive, "eta": eta, "perturb": True}
        super().__init__(
            params,
            base_optimizer,
            defaults,
            same_rng=same_rng,
            per_replica=per_replica,
            model=model,
            freeze_bn=freeze_bn,
            **base_kwargs,
        )

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """``e = rho * T^2 g / ||T g||`` per group, with one joint norm (:func:`sam_direction`)."""
        return sam_direction(
            [g.grads for g in groups],
            [g.params for g in groups],
            [g.group["rho"] for g in groups],
            [g.group["adaptive"] for g in groups],
            [g.group["eta"] for g in groups],
        )

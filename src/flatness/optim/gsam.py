r"""GSAM (surrogate gap guided SAM, Zhuang et al., ICLR 2022) and LookSAM
(Liu et al., CVPR 2022): SAM variants that decompose one gradient along
another.

Both reuse :class:`~flatness.optim.SAM`'s ascent (``e = rho g / ||g||``, or
ASAM's with ``adaptive=True``) and the machinery of
:class:`~flatness.optim.SharpnessAwareOptimizer` (perturb / restore, errors,
``GradScaler``, ``same_rng``, ``freeze_bn``, DDP, ``state_dict``); they only
change the gradient the base optimizer steps with (and, for LookSAM, which
steps take the second pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness._checks import is_int

from . import _family as fam
from ._base import AscentGroup, ScaledDirection, global_norm
from ._checks import MissingClosureError
from ._family_functional import gsam_rho, looksam_gradient_, looksam_orthogonal_
from ._functional import gsam_gradient_
from .sam import SAM

__all__ = ["GSAM", "LookSAM"]


class GSAM(SAM):
    r"""Surrogate gap guided sharpness-aware minimization.

    With ``g = grad L(w)`` and ``g_p = grad L(w + e)``, ``e = rho_t g / ||g||``
    (SAM's ascent), GSAM splits ``g`` into its parts parallel and orthogonal
    to ``g_p`` and steps with

    .. math::

        d = g_p - \alpha\, g_\perp, \qquad
        g_\perp = g - \frac{\langle g, g_p\rangle}{\lVert g_p\rVert^2}\, g_p ,

    i.e. it descends the perturbed loss ``L_p`` and, orthogonally to its
    gradient (so ``L_p`` is not increased to first order), ascends ``L``:
    the surrogate gap ``h = L_p - L`` shrinks.  ``alpha = 0`` is SAM, bit
    for bit.  The radius follows the learning rate, as in the paper
    (Algorithm 1, ``rho_t`` proportional to the schedule):

    .. math::

        \rho_t = \rho_{\min} + (\rho - \rho_{\min})
            \frac{\mathrm{lr}_t - \mathrm{lr}_{\min}}{\mathrm{lr}_{\max} - \mathrm{lr}_{\min}}

    with ``lr_t`` the group's current ``lr`` (read at every
    :meth:`first_step`, so any LR scheduler drives it).  With
    ``rho_min=None`` (default) ``rho`` is constant.

    Cost: two forward-backward passes per step, as SAM, plus two inner
    products and one copy of ``g``.

    Follows the authors' code (``juntang-zhuang/GSAM``, ``gsam.py``:
    ``perturb_weights``, ``gradient_decompose``) with these departures:
    no ``1e-12`` in the denominators (a zero gradient gives a zero
    perturbation and ``g_perp = g``); the decomposition uses the gradients
    DDP has all-reduced (the authors run both passes in ``no_sync()`` and
    average the final gradient; pass ``per_replica=True`` for a per-replica
    ascent: the first pass's gradient is then averaged over the replicas
    after the ascent, for the decomposition); the radius is computed from
    ``lr`` rather than through a separate ``ProportionScheduler`` object.  ``pytorch_optimizer.GSAM``
    implements the same update (with ``eps = 1e-12`` and a float32 norm in
    the ascent), its trajectory agrees to ~1e-7 relative.

    Parameters
    ----------
    params, base_optimizer, adaptive, eta, same_rng, per_replica, model, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    rho : float
        Radius at the largest learning rate ``lr_max`` (the paper's
        ``rho_max``; constant if ``rho_min`` is None).
    alpha : float
        Weight of the orthogonal component, in ``[0, 1]`` (the paper uses
        0.01 to 0.3 on ImageNet; ``pytorch_optimizer`` defaults to 0.4).
    rho_min : float or None
        Radius at ``lr_min``; ``None`` for a constant radius.
    lr_max : float or None
        The learning rate mapped to ``rho``; ``None``: the largest ``lr``
        the group has had so far (its first ``lr`` under a decaying
        schedule; under a warmup ``rho_t`` is ``rho`` until the peak, never
        more).  Give the schedule's peak to follow the paper during a warmup.
    lr_min : float
        The learning rate mapped to ``rho_min`` (default 0).  A learning
        rate outside ``[lr_min, lr_max]`` gets the nearer end's radius (the
        authors' scheduler extrapolates, which can make the radius negative:
        a descent step in place of the ascent).

    Examples
    --------
    >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.1, rho_min=0.01, lr=0.1)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    >>> loss = opt.step(closure)      # closure: forward, backward, return loss
    >>> sched.step()                  # rho_t follows lr
    """

    group_defaults = {
        "rho": 0.05, "alpha": 0.1, "rho_min": None, "lr_max": None, "lr_min": 0.0,
        "adaptive": False, "eta": 0.0, "perturb": True,
    }

    @dataclass
    class _StepState:
        #: (group, params, copy of g) per group, from ascent_direction to second_step.
        first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None = None

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = {
            "rho": rho, "alpha": alpha, "rho_min": rho_min, "lr_max": lr_max, "lr_min": lr_min,
            "adaptive": adaptive, "eta": eta, "perturb": True,
        }
        super(SAM, self).__init__(
            params, base_optimizer, defaults, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        for group in self.param_groups:
            self._check_schedule(self.sam_settings(group))

    @staticmethod
    def _check_schedule(group: dict[str, Any]) -> None:
        """The radius schedule's ends: ``rho_min <= rho`` and ``lr_min < lr_max``."""
        if group["rho_min"] is not None and group["rho_min"] > group["rho"]:
            raise ValueError(
                f"rho_min ({group['rho_min']}) must be <= rho ({group['rho']}): the radius goes from rho at "
                "lr_max down to rho_min at lr_min"
            )
        if group["lr_max"] is not None and not group["lr_max"] > group["lr_min"]:
            raise ValueError(f"lr_max ({group['lr_max']}) must be > lr_min ({group['lr_min']})")

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "alpha":
            return fam.check_number("alpha", value, 0.0, 1.0)
        if key in ("rho_min", "lr_max"):
            if value is not None:
                return fam.check_number(key, value, 0.0, float("inf"), high_open=True)
            return None
        if key == "lr_min":
            return fam.check_number(key, value, 0.0, float("inf"), high_open=True)
        return super()._check_setting(key, value)

    def rho_t(self, group: dict[str, Any]) -> float:
        """The group's radius at its current learning rate."""
        if group["rho_min"] is None:
            return group["rho"]
        lr_max = group["lr_max"]
        if lr_max is None:
            # The largest learning rate seen so far, not the first: under a
            # warmup (OneCycleLR, LinearLR) the first lr is a fraction of the
            # peak, and rho_t would grow past rho by the same factor.
            lr_max = group["gsam_lr_max"] = max(group.get("gsam_lr_max", group["lr"]), group["lr"])
        return gsam_rho(group["lr"], group["rho"], group["rho_min"], group["lr_min"], lr_max)

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """SAM's ascent with ``rho_t``; keeps a copy of ``g`` for the decomposition."""
        # perturb=False groups too: e = 0 there, but the rule combines their gradients
        first = [(g.group, list(g.params), fam.clone(g.grads)) for g in [*groups, *self.unperturbed_groups()]]
        self.share_first_pass_([t for *_, copies in first for t in copies])  # (the ascent reads .grad)
        self._stage.variant.first = first
        return SAM.ascent_direction(self, [fam.with_group([g], rho=self.rho_t(g.group))[0] for g in groups])

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Replace the gradient by ``g_p - alpha g_perp``, restore ``w`` and
        take the base step."""
        first = self._stage.variant.first
        if first and self._stage.perturbed is not None and not self._stage.skip_base_step:
            try:
                self._decompose(first, fam.grad_scale(scaler))
            except BaseException:
                self.restore()
                raise
        super().second_step(zero_grad, scaler=scaler)

    def _decompose(self, first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], scale: float) -> None:
        if not any(group["alpha"] for group, _, _ in first):
            return  # SAM, bit for bit
        gp = [fam.current_grads(params) for _, params, _ in first]
        # g_p - alpha g_perp in place of g_p; the projection is invariant to
        # the GradScaler's scale of g_p, g_perp is in unscaled units
        gsam_gradient_(gp, [g for _, _, g in first], [group["alpha"] for group, _, _ in first], scale)
        for (group, params, _), grads in zip(first, gp):
            if group["alpha"]:
                for p, d in zip(params, grads):
                    if p.grad is None:
                        p.grad = d


class LookSAM(SAM):
    r"""LookSAM: the SAM gradient every ``k`` steps, reused in between.

    Every ``k``-th step (steps ``0, k, 2k, ...``) is a full SAM step, which
    also stores the part of the SAM gradient ``g_s`` orthogonal to the plain
    gradient ``g``:

    .. math::

        g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2}\, g .

    The other steps take a single forward-backward pass and step with

    .. math::

        g + \alpha \frac{\lVert g\rVert}{\lVert g_v\rVert}\, g_v

    (the paper's adaptive scaling).  Cost: ``1 + 1/k`` passes per step.
    ``k = 1, alpha = 0`` is SAM, bit for bit.  Norms and inner products
    are over all perturbed parameters, as Algorithm 1 of the paper;
    ``per_tensor=True`` takes them per parameter tensor, as
    ``pytorch_optimizer.LookSAM`` does (its trajectory then agrees to ~1e-7
    relative: it adds ``1e-12`` to the ascent norm, computed in float32,
    and ``1e-8`` to ``||g_v||``).  No public code of the authors was found;
    this follows the paper.

    Call styles.  ``step(closure)`` calls the closure twice on full steps
    and once on the others.  In the two-step style the second pass is
    skipped when :attr:`is_perturbed` is False after :meth:`first_step`::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        if opt.is_perturbed:            # a full step (1 in k)
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    (:attr:`is_full_step` tells before the first pass.)  On a reuse step
    :meth:`first_step` keeps the corrected gradient aside (``.grad`` is
    cleared) and :meth:`second_step` steps with it.  The step count and
    ``g_v`` are saved by ``state_dict`` (an abandoned step, :meth:`restore`,
    leaves them as they were); a step skipped by a ``GradScaler`` (inf/NaN)
    still counts, like ``pytorch_optimizer``.

    Parameters
    ----------
    params, base_optimizer, adaptive, eta, same_rng, per_replica, model, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    rho : float
        SAM radius of the full steps.
    k : int
        A full SAM step every ``k`` steps (the paper uses 5).
    alpha : float
        Weight of ``g_v`` on the reuse steps, ``>= 0`` (the paper: 0.7).
    per_tensor : bool
        Norms and projections per parameter tensor (``pytorch_optimizer``).
    """

    group_defaults = {"rho": 0.05, "alpha": 0.7, "adaptive": False, "eta": 0.0, "perturb": True}

    @dataclass
    class _StepState:
        #: (group, params, copy of g) per group of a full step, until second_step.
        first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None = None
        #: A reuse step between first_step and second_step (no perturbation).
        lazy: bool = False

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        per_tensor: bool = False,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not is_int(k) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be a bool, got {per_tensor!r}")
        defaults = {"rho": rho, "alpha": alpha, "adaptive": adaptive, "eta": eta, "perturb": True}
        super(SAM, self).__init__(
            params, base_optimizer, defaults, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        self.k = int(k)
        self.per_tensor = per_tensor
        self.looksam_step = 0
        self._gv_norm: tuple[tuple[int, ...], Tensor] | None = None

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "alpha":
            return fam.check_number("alpha", value, 0.0, float("inf"), high_open=True)
        return super()._check_setting(key, value)

    @property
    def is_full_step(self) -> bool:
        """True when the next step is a full SAM step (two passes)."""
        return self.looksam_step % self.k == 0

    def _local_first_pass(self) -> bool:
        # a reuse step's only pass gives the gradient it steps with: DDP
        # must average it (per_replica affects the full steps' ascent only)
        return self.per_replica and self.is_full_step

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """SAM's ascent; keeps a copy of ``g`` for ``g_v`` (the copy becomes
        ``g_v`` at the end of the step; nothing is kept for the next one, so
        between steps only ``g_v`` is held beside SAM's weight buffer)."""
        # perturb=False groups too: e = 0 there, but the rule combines their gradients
        first = [(g.group, list(g.params), fam.clone(g.grads)) for g in [*groups, *self.unperturbed_groups()]]
        self.share_first_pass_([t for *_, copies in first for t in copies])  # (the ascent reads .grad)
        self._stage.variant.first = first
        return super().ascent_direction(groups)

    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Full step: move to ``w + e``.  Reuse step: correct the gradient
        with ``g_v`` and keep it for :meth:`second_step` (no perturbation)."""
        if self._stage.variant.lazy:
            raise RuntimeError("first_step() called twice: call second_step() before the next first_step()")
        if self.is_full_step:
            return super().first_step(zero_grad, scaler=scaler)
        if self._stage.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: call second_step() (or restore()) before the next first_step()"
            )
        fam.dense_grads_(self._all_params())  # corrected in place: the base step must see it
        groups = self.ascent_groups()
        if not groups and any(self.sam_settings(g)["perturb"] for g in self.param_groups):
            raise RuntimeError("first_step() found no gradients: run loss.backward() before first_step()")
        self._reuse([*groups, *self.unperturbed_groups()])
        self.stash_grad()  # the corrected gradient waits for second_step
        self._stage.variant.lazy = True

    def _reuse(self, groups: list[AscentGroup]) -> None:
        """``g += alpha ||g|| / ||g_v|| g_v`` in place (scale-equivariant, so
        GradScaler-scaled gradients need no unscaling)."""
        have = []
        for g in groups:
            if not g.group["alpha"]:
                continue
            pairs = [(x, self.extra_state[p]["looksam_gv"]) for p, x in zip(g.params, g.grads)
                     if "looksam_gv" in self.extra_state[p]]
            if pairs:
                have.append((g.group["alpha"], [x for x, _ in pairs], [v for _, v in pairs]))
        if not have:
            return
        alphas, grads, gvs = [a for a, _, _ in have], [gr for _, gr, _ in have], [v for _, _, v in have]
        if self.per_tensor:
            return looksam_gradient_(grads, gvs, alphas, per_tensor=True)
        # ||g_v|| is fixed between full steps: computed once per set of tensors
        key = tuple(id(v) for vs in gvs for v in vs)
        if self._gv_norm is None or self._gv_norm[0] != key:
            self._gv_norm = (key, global_norm(gvs))
        looksam_gradient_(grads, gvs, alphas, gv_norm=self._gv_norm[1])

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Full step: store ``g_v``, restore ``w``, base step with ``g_s``.
        Reuse step: base step with the corrected gradient."""
        if self._stage.variant.lazy:
            if any(p.grad is not None for p in self._all_params()):
                self.restore()
                raise RuntimeError(
                    "LookSAM skipped the second pass on this reuse step (is_perturbed was False after "
                    "first_step()): call second_step() without a backward in between"
                )
            if not self._stage.finish():  # the corrected gradient back in .grad; the step is over
                self._base_step(scaler)
        else:
            first = self._stage.variant.first
            if first and self._stage.perturbed is not None and not self._stage.skip_base_step:
                try:
                    self._store_gv(first, scaler is not None and scaler.is_enabled())
                except BaseException:
                    self.restore()
                    raise
            super().second_step(False, scaler=scaler)
        self.looksam_step += 1
        if zero_grad:
            self.zero_grad()

    def _store_gv(self, first: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], scaled: bool) -> None:
        # g_v only matters through its direction, so g_s may carry a
        # GradScaler's scale; a non-finite g_v (a skipped step) is not kept
        gs = [fam.current_grads(params) for _, params, _ in first]
        # jointly, g_v is computed in the copies of g (which then hold g_v
        # and replace the previous one)
        gvs = looksam_orthogonal_([g for _, _, g in first], gs, per_tensor=self.per_tensor)
        # only a GradScaler step can bring inf/NaN here (then the base step
        # is skipped); the 2-norm is ~15x cheaper than max |.| on CPU, and
        # an overflow of it only keeps the previous g_v
        if scaled and not bool(torch.isfinite(global_norm(gvs))):
            return
        for (_, params, _), vs in zip(first, gvs):
            for p, v in zip(params, vs):
                self.extra_state[p]["looksam_gv"] = v
        self._gv_norm = None

    def step(self, closure: Callable[[], Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """One LookSAM step: the closure runs twice on full steps, once otherwise."""
        if self.is_full_step:
            return super().step(closure, scaler=scaler)
        if closure is None or not callable(closure):
            raise MissingClosureError(
                f"{type(self).__name__}.step() needs a callable closure (forward, backward, return loss)"
            )
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(scaler=scaler)
        self.second_step(scaler=scaler)
        return loss

    def extra_state_dict(self) -> dict[str, Any]:
        sd = super().extra_state_dict()
        sd["looksam_step"] = self.looksam_step
        return sd

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self.looksam_step = int(state.get("looksam_step", 0))
        self._gv_norm = None

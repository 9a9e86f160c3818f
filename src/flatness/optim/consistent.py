r"""Nonuniformity-guided SAM ("Beyond Sharpness: The Role of
Nonuniformity in Generalization").

The update rules follow the authors' public code (``optimizer/minimizer.py``
of their repository: ``CSAM_Identity``, ``ACSAM_Identity``, ``CSAM``; and the
``SAMGCM`` toy in ``additional_experiments/sam_gcm.py``):

* :class:`ConsistentSAM` - three passes on the same batch; the second
  ascent follows the part of the gradient change ``g2 - g1`` that a running
  mean ``m`` does not explain.  Variants: ``adaptive=True`` (ASAM scaling
  of the second ascent, ``ACSAM_Identity``) and ``preconditioner="kfac"``
  (K-FAC natural direction, ``CSAM``).
* :class:`NonuniformSAM` - two passes; the ascent is the gradient
  preconditioned by the inverse of the per-sample gradients' covariance,
  with K-FAC's Kronecker-factored second moment in place of a dense one:
  centred as the code's ``GAM`` computes it (default), centred exactly
  (``SAMGCM``'s ``C/b - g g^T + xi I``; ``gam_scaling=False``) or not
  centred (``centered_covariance=False``).

Both reuse :class:`~flatness.optim.SharpnessAwareOptimizer`: perturb /
restore from one saved copy of ``w``, restore on exceptions, ``GradScaler``,
``same_rng``, ``freeze_bn``, DDP and ``state_dict``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness import _distributed
from flatness._checks import is_int, is_real

from . import _family as fam
from ._base import AscentGroup, SharpnessAwareOptimizer
from ._checks import MissingClosureError
from ._functional import (
    asam_weights,
    consistent_direction,
    consistent_momentum_,
    global_norm,
    natural_ascent_,
    sam_direction,
)
from ._preconditioner import KFACPreconditioner

__all__ = ["ConsistentSAM", "NonuniformSAM"]

_PRECONDITIONERS = (None, "kfac")


def _make_kfac(
    opt: SharpnessAwareOptimizer,
    preconditioner: str | None,
    model: nn.Module | None,
    damping: float,
    stat_decay: float,
    update_freq: int,
) -> KFACPreconditioner:
    """Check the K-FAC arguments and build the optimizer's preconditioner
    (one without a model for ``preconditioner=None``: it only counts steps)."""
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner {preconditioner!r}; valid: None, 'kfac'")
    for name, value, low in (("damping", damping, 0.0), ("stat_decay", stat_decay, 0.0)):
        if not is_real(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (value >= low and value < (1.0 if name == "stat_decay" else float("inf"))):
            raise ValueError(f"{name} out of range: {value}")
    if preconditioner == "kfac" and not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    if not is_int(update_freq) or update_freq < 1:
        raise ValueError(f"update_freq must be a positive int, got {update_freq!r}")
    if preconditioner == "kfac" and model is None:
        raise ValueError("preconditioner='kfac' needs model=<your model> (its layers are hooked)")
    perturbed = [p for g in opt.param_groups if g.get("sam_perturb", True) for p in g["params"]]
    if preconditioner == "kfac":  # Kronecker factors act on whole weight matrices, not on FSDP2 shards
        _distributed.refuse_sharded([(f"param {i}", p) for i, p in enumerate(perturbed)],
                                    f"{type(opt).__name__}(preconditioner='kfac')", hint=_distributed.SAM_HINT)
    return KFACPreconditioner(
        model if preconditioner == "kfac" else None, perturbed, damping=float(damping),
        stat_decay=float(stat_decay), update_freq=int(update_freq), state=opt.extra_state,
    )


class ConsistentSAM(SharpnessAwareOptimizer):
    r"""Consistent SAM: three forward-backward passes on the same batch.

    .. math::

        g_1 &= \nabla L(w), \qquad e_1 = \rho_1 \frac{g_1}{\lVert g_1\rVert}, \qquad
        g_2 = \nabla L(w + e_1), \\
        m &\leftarrow \alpha m + (1 - \alpha)(g_2 - g_1), \qquad d = g_2 - g_1 - m, \\
        e_2 &= \rho_2 \frac{d}{\lVert d\rVert}
            \;\Big|\; \rho_2 \frac{T^2 d}{\lVert T d\rVert}\ (\text{adaptive}, T = |w| + \eta)
            \;\Big|\; \rho_2 \frac{F^{-1} d}{\sqrt{d^\top F^{-1} d}}\ (\text{kfac}), \\
        g_3 &= \nabla L(w + e_2), \qquad \text{base step from } w \text{ with } g_3.

    ``m`` starts at zero and is kept across steps (in the optimizer state,
    saved by ``state_dict``).  ``F = blockdiag(A (x) G)`` has the running
    Kronecker factors of the per-sample gradients' second moment of each
    Linear / Conv2d layer, taken at ``w`` during the first pass, with
    ``damping`` added to the eigenvalues of ``A (x) G``; parameters outside
    those layers are not moved by ``e_2`` in that variant (as in the
    paper's code).  Norms are joint over all perturbed groups; a group's
    ``rho`` / ``rho2`` scale its part.  ``e_1`` is always plain SAM.

    Under DDP with ``per_replica=True`` the passes at ``w`` and at
    ``w + e_1`` both run in ``no_sync()``: each replica forms ``e_1``, ``d``,
    ``m`` and ``e_2`` from its own gradients (``m`` is then each replica's
    own), and only ``g_3`` is averaged for the step.

    Parameters
    ----------
    params, base_optimizer, same_rng, per_replica, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM` (groups may set ``"sam_rho"``,
        ``"sam_rho2"``, ``"sam_alpha"``, ...; RMSprop's own ``alpha`` goes in
        ``base_kwargs={"alpha": 0.99}``).
    rho : float
        ``rho_1``, the first ascent radius (default 0.1, the paper's value).
    rho2 : float
        ``rho_2``, the second ascent radius (the paper uses 0.1 to 0.4).
    alpha : float
        Momentum of the running mean ``m``, in ``[0, 1]`` (the paper uses
        0.2 to 0.9 by model; default 0.9).
    adaptive : bool
        ASAM scaling of ``e_2`` with ``T = |w| + eta``.
    eta : float
        ASAM's offset (default 0.01, the paper's code).
    preconditioner : {None, "kfac"}
        K-FAC natural direction for ``e_2``; needs ``model``.  Not combined
        with ``adaptive``.  A batch's number of samples is the leading
        dimension of the model's first input tensor (batch first), whatever
        the layout inside the model.
    model : nn.Module, optional
        The model (needed for ``preconditioner="kfac"``, ``per_replica`` and
        ``freeze_bn``).
    damping, stat_decay, update_freq
        K-FAC: eigenvalue damping (default 0.1), moving-average decay of the
        factors (0.95) and the number of steps between factor updates (1).
        The ascent is ``rho_2`` in the ``F`` metric, so its Euclidean length
        grows like ``rho_2 / sqrt(damping)`` along directions of little
        gradient noise: with a small damping it can be far larger than
        ``rho_2``.  The authors' code always damps with 1e-3: its
        optimizer's ``damping`` argument (default 1e-3) is never passed to
        ``_get_natural_grad``, which uses its own default 1e-3.  It also
        starts its factors at the identity and refreshes them every 50
        steps, which regularizes more.  0.1 is this library's safer
        default: with 1e-3 and ``rho=0.05`` the digits CNN of
        ``examples/nonuniformity.py`` does not train (train error 0.88
        after 40 epochs, :class:`NonuniformSAM` in each of its modes).

    Examples
    --------
    >>> opt = ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho2=0.2, lr=0.1)
    >>> def closure():
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)          # the closure runs three times

    Step by step:

    >>> with opt.first_pass():
    ...     loss_fn(model(x), y).backward()
    >>> opt.first_step(zero_grad=True)     # w + e1
    >>> with opt.second_pass():
    ...     loss_fn(model(x), y).backward()
    >>> opt.middle_step(zero_grad=True)    # w + e2
    >>> with opt.second_pass():
    ...     loss_fn(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)    # back to w, base step
    """

    group_defaults = {"rho": 0.1, "rho2": 0.2, "alpha": 0.9, "adaptive": False, "eta": 0.01, "perturb": True}

    @dataclass
    class _StepState:
        #: (group, params, copy of g1, T or None) per group, from first_step
        #: until middle_step takes it ([] after a first step skipped by a
        #: GradScaler: nothing to continue from).
        first: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor] | None]] | None = None
        #: (param, new running mean) pairs, from middle_step until second_step.
        pending_m: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.1,
        rho2: float = 0.2,
        alpha: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.01,
        *,
        preconditioner: str | None = None,
        model: nn.Module | None = None,
        damping: float = 0.1,
        stat_decay: float = 0.95,
        update_freq: int = 1,
        same_rng: bool = False,
        per_replica: bool = False,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = {"rho": rho, "rho2": rho2, "alpha": alpha, "adaptive": adaptive, "eta": eta, "perturb": True}
        super().__init__(
            params, base_optimizer, defaults, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        if preconditioner is not None and any(g["sam_adaptive"] for g in self.param_groups):
            raise ValueError("adaptive=True and preconditioner='kfac' cannot be combined; choose one")
        self.preconditioner = preconditioner
        #: The K-FAC collaborator (without a model for ``preconditioner=None``).
        self.kfac = _make_kfac(self, preconditioner, model, damping, stat_decay, update_freq)
        self.update_freq = self.kfac.update_freq  # (checked: a Python int)

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "alpha":
            if not is_real(value):
                raise TypeError(f"alpha must be a number, got {type(value).__name__}")
            if not 0 <= value <= 1:
                raise ValueError(f"alpha must be in [0, 1], got {value}")
            return float(value)
        return super()._check_setting(key, value)

    # -- pass 1: e1 = rho1 g1 / ||g1|| ------------------------------------

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[list[Tensor]]:
        """``e_1 = rho g_1 / ||g_1||``; also keeps a copy of ``g_1`` (and of
        ``T = |w| + eta`` for adaptive groups) for :meth:`middle_step`."""
        first = []
        for g in groups:
            t = asam_weights(g.params, g.group["eta"]) if g.group["adaptive"] else None
            first.append((g.group, list(g.params), [x.clone() for x in g.grads], t))
        self._stage.variant.first = first
        e1 = sam_direction([g.grads for g in groups], [g.params for g in groups], [g.group["rho"] for g in groups])
        return [torch._foreach_mul(d.tensors, d.scale) for d in e1]

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w``; with
        ``preconditioner="kfac"`` it also records the Kronecker factors
        (every ``update_freq`` steps), so the first pass must run inside it
        (``step(closure)`` does this)."""
        with super().first_pass(), self.kfac.recording():
            yield

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w + e_1`` and at ``w + e_2``
        (as :meth:`SharpnessAwareOptimizer.second_pass`); with
        ``per_replica=True`` the pass at ``w + e_1`` runs in ``no_sync()``:
        ``d = g_2 - g_1 - m`` compares one replica's gradients."""
        local = self.per_replica and self._stage.variant.first is not None
        with super().second_pass(), self.model.no_sync() if local else contextlib.nullcontext():
            yield

    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        if self._stage.perturbed is None:
            self.kfac.fold(scaler, pool=not self.per_replica)
        super().first_step(zero_grad, scaler=scaler)
        if self._stage.variant.first is None:  # inf/NaN under a scaler: nothing to continue from
            self._stage.variant.first = []

    # -- pass 2: m, d, e2 ---------------------------------------------------

    @torch.no_grad()
    def middle_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Move from ``w + e_1`` to ``w + e_2`` using the gradients at ``w + e_1``.

        Updates the running mean ``m``.  Under a ``GradScaler`` the gradients
        are divided by its scale; if they contain inf/NaN the step is
        skipped (no update of ``m``, :meth:`second_step` skips the base step).
        Restores ``w`` if anything fails.
        """
        if self._stage.variant.first is None:
            raise RuntimeError("middle_step() called without first_step()")
        try:
            self._middle(scaler)
        except BaseException:
            self.restore()
            raise
        if zero_grad:
            self.zero_grad()

    def _middle(self, scaler: Any) -> None:
        step = self._stage.variant
        first, step.first = step.first, None  # the second pass is under way
        assert first is not None
        inv_scale = 1.0
        if scaler is not None and scaler.is_enabled():
            inv_scale = 1.0 / float(scaler.get_scale())
        groups: list[AscentGroup] = []
        diffs: list[list[Tensor]] = []
        for group, params, g1, _t in first:
            g2 = [
                torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad
                for p in params
            ]
            if inv_scale != 1.0:
                g2 = torch._foreach_mul(g2, inv_scale)  # a copy: .grad is left as it is
            diff = torch._foreach_sub(g2, g1)
            groups.append(AscentGroup(group, params, diff))
            diffs.append(diff)
        if scaler is not None and scaler.is_enabled() and diffs:
            if not bool(torch.isfinite(global_norm(diffs, ord=float("inf")))):
                self._stage.skip_base_step = True
                # the scaler saw only the finite first pass: without this its
                # scale would never come down and every step would overflow
                fam.report_inf(scaler, diffs[0][0].device)
                self.perturb(groups, [[torch.zeros_like(p) for p in g.params] for g in groups])
                return
        pending = []
        for (group, params, _, _), d in zip(first, diffs):
            old = [self.extra_state[p].get("consistent_momentum") for p in params]
            old = [torch.zeros_like(p) if m is None else m for p, m in zip(params, old)]
            # the new m is kept aside until second_step so that an abandoned
            # step leaves m as it was; d becomes g2 - g1 - m
            pending.extend(zip(params, consistent_momentum_(d, old, group["alpha"])))
        step.pending_m = pending
        if self.preconditioner == "kfac":
            directions, norm = self.kfac.solve([g.params for g in groups], diffs)
            natural_ascent_(directions, norm, [g.group["rho2"] for g in groups])
        else:
            directions = consistent_direction(diffs, [g.group["rho2"] for g in groups], [t for *_, t in first])
        self.perturb(groups, directions)

    # -- pass 3: back to w, base step with g3 -------------------------------

    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Restore ``w`` and take the base step with the gradients at ``w + e_2``."""
        if self._stage.variant.first is not None:
            self.restore()
            raise RuntimeError("second_step() called before middle_step(): ConsistentSAM takes three passes")
        # read before the base second_step clears the stage
        skipped, pending = self._stage.skip_base_step, self._stage.variant.pending_m
        super().second_step(False, scaler=scaler)
        skipped = skipped or fam.skipped_by(scaler, self._all_params())
        self.kfac.finish(skipped)
        if not skipped:  # a step the scaler skips leaves m as it was
            for p, m in pending:
                self.extra_state[p]["consistent_momentum"] = m
        if zero_grad:
            self.zero_grad()

    def restore(self) -> None:
        """Put the saved ``w`` back and abandon the step (the running mean
        ``m``, the K-FAC factors and step count keep their values from
        before the step)."""
        self.kfac.discard()
        super().restore()

    def extra_state_dict(self) -> dict[str, Any]:
        return {**super().extra_state_dict(), "kfac_steps": self.kfac.steps}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self.kfac.reset(int(state.get("kfac_steps", 0)), self.extra_state)

    def step(self, closure: Callable[[], Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """One consistent-SAM step; the closure (forward, ``backward()``,
        return the loss) runs at ``w``, ``w + e_1`` and ``w + e_2``.

        Returns the closure's value at ``w``.
        """
        if closure is None or not callable(closure):
            raise MissingClosureError(
                f"{type(self).__name__}.step() needs a callable closure that computes the loss and "
                "calls backward(); or use first_step() / middle_step() / second_step()"
            )
        self.zero_grad()
        with torch.enable_grad(), self.first_pass():
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        with torch.enable_grad(), self.second_pass():
            closure()
        self.middle_step(zero_grad=True, scaler=scaler)
        with torch.enable_grad(), self.second_pass():
            closure()
        self.second_step(scaler=scaler)
        return loss


class NonuniformSAM(SharpnessAwareOptimizer):
    r"""SAM whose ascent is preconditioned by the gradient noise's structure.

    With ``F = blockdiag(A_l (x) G_l) + damping I``, ``A_l (x) G_l`` the
    running Kronecker-factored *uncentred* second moment
    :math:`E[g_i g_i^\top]` of the per-sample gradients of Linear / Conv2d
    layer ``l`` (captured at ``w`` in the first pass, every ``update_freq``
    steps, ``damping`` added to the eigenvalues of ``A_l (x) G_l``), ``g``
    the batch gradient and :math:`q = g^\top F^{-1} g`, the ascent is one of

    .. math::

        e &= \rho \, \frac{F^{-1} g}{\sqrt{q}\,\sqrt{1 - \sqrt{q}}}
            &&\text{(default: the authors' GAM code)}, \\
        e &= \rho \, \frac{\Sigma^{-1} g}{\sqrt{g^\top \Sigma^{-1} g}}
           = \rho \, \frac{F^{-1} g}{\sqrt{q}\,\sqrt{1 - q}},
           \quad \Sigma = F - g g^\top
            &&\text{(gam\_scaling=False: exact centring)}, \\
        e &= \rho \, \frac{F^{-1} g}{\sqrt{q}}
            &&\text{(centered\_covariance=False: the second moment)}.

    Centring uses the covariance of the per-sample gradients,
    :math:`\Sigma = E[g_i g_i^\top] - g g^\top + \text{damping}\, I` (the
    authors' ``SAMGCM``: ``C/b - g g^T + xi I`` with a dense ``C``), with
    K-FAC's second moment in place of ``C/b``.  Exactly
    (``gam_scaling=False``) it costs nothing beyond ``F^{-1} g``: by
    Sherman-Morrison :math:`\Sigma^{-1} g = F^{-1} g / (1 - q)`.  The
    authors' ``GAM`` class intends the same (it divides ``F^{-1} g /
    sqrt(q)`` by ``sqrt(1 - x)``, its comment), but takes the square root of
    ``q`` in place first, so its ``x`` is :math:`\sqrt q`; the default,
    ``gam_scaling=True``, reproduces that arithmetic (with its ``1e-16``
    guards), since it is what the authors' experiments ran.  Where the
    centred matrix is not positive definite (``q >= 1``; for GAM ``sqrt(q)
    > 1``) the ``1 - x`` is replaced by ``1 - exp(-x)``, the fallback of the
    authors' code.  ``centered_covariance=False`` is the plain natural direction of the
    second moment (:math:`e^\top F e = \rho^2`; ``gam_scaling`` has no
    effect then).  In every form the perturbation moves least along
    directions of large gradient noise.  Every perturbed parameter must belong
    to a factored layer (the constructor refuses others, e.g.
    ``nn.MultiheadAttention``'s projections or normalization weights: give
    them a param group with ``perturb=False``).  Two passes, like SAM.

    K-FAC's ``A (x) G`` is not the exact second moment (for which ``q <=
    1`` always), so ``q`` near or above 1 does happen, and the centring
    factor ``1 / sqrt(1 - x)`` is then large.  Training the digits CNN of
    ``examples/nonuniformity.py`` (``rho=0.05``, ``damping=0.1``,
    ``update_freq=5``, seeds 0 to 2), all three forms reach zero training
    error; with seed 1 the exact centring spiked to 17% training error at
    epoch 24 on the way, the GAM form started slowest and the second moment
    trained fastest and smoothest.

    Differences from the authors' code that remain: their ``damping``
    argument never reaches ``_get_natural_grad``, whose own default ``1e-3``
    is always used; their factors start at the identity, are refreshed every
    ``TCov = 50`` steps and their inverses every ``TInv = 50``; their
    eigenvalues below ``1e-10`` are set to 0.  Here ``damping`` defaults to
    0.1 (see :class:`ConsistentSAM`: the ascent's Euclidean length grows
    like ``rho / sqrt(damping)`` along directions of little noise, and with
    ``damping=1e-3`` the example's CNN does not train), the first factors
    are the first batch's and both are refreshed every ``update_freq``
    steps.

    Parameters
    ----------
    params, base_optimizer, same_rng, per_replica, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    model : nn.Module
        The model whose layers are hooked (required).  A batch's number of
        samples is the leading dimension of its first input tensor (batch
        first), whatever the layout inside the model.
    rho : float
        Radius in the metric of the preconditioner (default 0.05).
    centered_covariance : bool
        Precondition with the centred covariance ``F - g g^T`` (default)
        instead of the uncentred second moment ``F``.
    gam_scaling : bool
        Centre as the authors' ``GAM`` code computes it (default), or
        exactly (``False``); see above.  No effect with ``centered_covariance=False``.  (Not ``centered``:
        that is RMSprop's keyword, which goes to the base optimizer.)
    damping, stat_decay, update_freq
        As for :class:`ConsistentSAM`.
    """

    group_defaults = {"rho": 0.05, "perturb": True}
    # Kronecker factors act on whole weight matrices, not on FSDP2 shards
    supports_sharded = False

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        model: nn.Module,
        centered_covariance: bool = True,
        gam_scaling: bool = True,
        damping: float = 0.1,
        stat_decay: float = 0.95,
        update_freq: int = 1,
        same_rng: bool = False,
        per_replica: bool = False,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        for name, value in (("centered_covariance", centered_covariance), ("gam_scaling", gam_scaling)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        super().__init__(
            params, base_optimizer, {"rho": rho, "perturb": True}, same_rng=same_rng,
            per_replica=per_replica, model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        self.preconditioner = "kfac"
        #: The K-FAC collaborator.
        self.kfac = _make_kfac(self, "kfac", model, damping, stat_decay, update_freq)
        self.update_freq = self.kfac.update_freq  # (checked: a Python int)
        if self.kfac.factors is not None and self.kfac.factors.unsupported:
            # They would silently stay unperturbed: refuse instead.
            raise ValueError(
                "NonuniformSAM perturbs Kronecker-factored Linear/Conv2d layers only; these "
                f"parameters would not be perturbed: {self.kfac.factors.unsupported}. Put them in a "
                "param group with perturb=False (or use ConsistentSAM)"
            )
        self.centered_covariance = centered_covariance
        self.gam_scaling = gam_scaling

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w``; it also records the
        Kronecker factors (every ``update_freq`` steps), so the first pass
        must run inside it (``step(closure)`` does this)."""
        with super().first_pass(), self.kfac.recording():
            yield

    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        if self._stage.perturbed is None:
            self.kfac.fold(scaler, pool=not self.per_replica)
        super().first_step(zero_grad, scaler=scaler)

    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        skipped = self._stage.skip_base_step
        super().second_step(False, scaler=scaler)
        self.kfac.finish(skipped or fam.skipped_by(scaler, self._all_params()))
        if zero_grad:
            self.zero_grad()

    def restore(self) -> None:
        """Put the saved ``w`` back and abandon the step (the K-FAC factors
        and step count keep their values from before the step)."""
        self.kfac.discard()
        super().restore()

    def extra_state_dict(self) -> dict[str, Any]:
        return {**super().extra_state_dict(), "kfac_steps": self.kfac.steps}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self.kfac.reset(int(state.get("kfac_steps", 0)), self.extra_state)

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[list[Tensor]]:
        """``e = rho c F^-1 g`` with ``c`` set by ``centered_covariance`` / ``gam_scaling``."""
        try:
            directions, norm = self.kfac.solve([g.params for g in groups], [g.grads for g in groups])
        except RuntimeError:
            self.restore()
            raise
        mode = "second_moment" if not self.centered_covariance else "gam" if self.gam_scaling else "centered"
        natural_ascent_(directions, norm, [g.group["rho"] for g in groups], mode)
        return directions


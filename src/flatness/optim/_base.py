"""The base class of the sharpness-aware optimizers (SAM, ASAM and variants).

Every variant takes the same step::

    g   = grad L(w)                     # first pass (the user's backward)
    e   = ascent_direction(groups)      # the only part a variant changes
    w  <- w + e                         # perturb()   (w saved once)
    g'  = grad L(w + e)                 # second pass (the user's backward)
    w  <- w                             # the saved copy, bit for bit
    base_optimizer.step() with g'       # second_step()

The math of the ascent directions lives in functions on lists of tensors
(:mod:`flatness.optim._functional`, e.g. ``sam_direction``); the classes
gather the groups' parameters and gradients and call them.

What :class:`SharpnessAwareOptimizer` holds:

* the base optimizer, whose ``param_groups`` and ``state`` it shares (the
  variant's settings sit in the same groups as ``"sam_rho"``, ...; see
  :class:`GroupSettings`);
* ``extra_state``: the variant's persistent per-parameter state (a running
  mean), saved by ``state_dict``;
* ``_stage``: a :class:`_Stage`, the step in progress and nothing else
  (which parameters are at ``w + e``, the saved ``w``, the ``GradScaler``'s
  skip flag, gradients stashed at ``w``, the first pass's RNG state, and in
  ``_stage.variant`` the variant's own per-step fields, declared as a
  ``_StepState`` dataclass).  :meth:`~SharpnessAwareOptimizer.restore` and
  the end of :meth:`~SharpnessAwareOptimizer.second_step` reset all of it.

It restores ``w`` before an exception leaves a stage, unscales and skips
inf/NaN steps under a ``GradScaler``, replays dropout masks
(``same_rng``), runs the first pass in ``no_sync()`` (``per_replica``),
freezes BatchNorm statistics in the second pass (``freeze_bn``) and keeps
the ``torch.optim`` protocol (``state_dict`` hooks, schedulers,
``add_param_group``).  Its stage methods run eagerly inside
``torch.compile``.  The plumbing lives beside it: the stage object and the
eager wrapper in :mod:`~flatness.optim._stage`, the constructor's checks in
:mod:`~flatness.optim._checks`, the ``state_dict`` / pickling protocol in
:mod:`~flatness.optim._state`, the ``sam_`` group settings in
:mod:`~flatness.optim._settings`.

A variant overrides :meth:`~SharpnessAwareOptimizer.ascent_direction`.  It
receives one :class:`AscentGroup` per perturbed param group that has a
gradient (``g.group``: the settings by short name, ``g.group["rho"]``;
``g.params``; ``g.grads``, the live ``.grad`` tensors) and returns per group
the tensors ``e`` or a :class:`ScaledDirection` ``(tensors, scale)``::

    class SignSAM(SharpnessAwareOptimizer):
        group_defaults = {"rho": 0.05, "perturb": True}

        def ascent_direction(self, groups):
            return [torch._foreach_mul(torch._foreach_sign(g.grads), g.group["rho"])
                    for g in groups]

Variants with more passes (consistent SAM) call :meth:`perturb` again:
each call starts from the saved ``w``, so ``perturb(e2)`` after
``perturb(e1)`` evaluates at ``w + e2``.  Quantities a variant computes
from local data are averaged over DDP replicas with
:meth:`~SharpnessAwareOptimizer.all_reduce_`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness import _distributed

# Lives with the other model plumbing; re-exported as flatness.optim.disable_running_stats.
from flatness._checks import LOW_PRECISION
from flatness._guard import disable_running_stats

from . import _stage, _state
from ._checks import (
    check_base_optimizer,
    check_closure,
    check_directions,
    check_new_group,
    check_options,
    check_setting,
    checked_setting,
    merge_base_kwargs,
    warn_if_rounded_away,
)
from ._functional import ScaledDirection, add_scaled, global_norm
from ._settings import (
    SAM_PREFIX,
    GroupSettings,
    _prefixed,
    describe,
    fill_settings,
    share_param_groups,
)
from ._stage import _NoStepState, _Stage, run_stages_eagerly

__all__ = [
    "AscentGroup",
    "GroupSettings",
    "ScaledDirection",
    "SharpnessAwareOptimizer",
    "disable_running_stats",
    "global_norm",
]


@dataclass
class AscentGroup:
    """One perturbed param group as seen by :meth:`~SharpnessAwareOptimizer.ascent_direction`.

    Attributes
    ----------
    group : GroupSettings or dict
        The param group as the variant sees it (a :class:`GroupSettings`
        view of the group shared with the base optimizer): the variant's
        settings under their short names (``"rho"``, ``"adaptive"``,
        ``"eta"``; stored as ``"sam_rho"``, ...) and the base optimizer's
        keys (``"lr"``, ...).
    params : list of Tensor
        The group's parameters that have a gradient.
    grads : list of Tensor
        Their gradients (the live ``.grad`` tensors, not copies).
    """

    group: MutableMapping[str, Any]
    params: list[Tensor]
    grads: list[Tensor]


class SharpnessAwareOptimizer(Optimizer):
    """Base class of the sharpness-aware optimizers; see the module docstring.

    It wraps a base optimizer and shares its ``param_groups`` and ``state``
    (so LR schedulers and ``add_param_group`` work on either object).
    Subclasses set :attr:`group_defaults` and override
    :meth:`ascent_direction`.

    Parameters
    ----------
    params, base_optimizer, same_rng, per_replica, model, freeze_bn, base_kwargs, **kwargs
        As for :class:`~flatness.optim.SAM` (``**kwargs`` go to the base
        optimizer class; an instance is used as it is, ``params=None``).
        A base optimizer whose ``step`` requires a closure (LBFGS) is refused.
    defaults : dict, optional
        The variant's group settings (``rho``, ...), overriding
        :attr:`group_defaults`; groups override them in turn as
        ``"sam_rho"``, ... (``"sam_perturb": False``: not perturbed, still
        stepped).
    """

    #: Group keys of the variant and their defaults; subclasses replace it.
    group_defaults: dict[str, Any] = {"rho": 0.05, "perturb": True}
    #: Whether the variant steps FSDP2 (``fully_shard``) models, whose
    #: parameters are sharded ``DTensor`` s; a variant that cannot sets it to
    #: ``False`` and is refused with a ``TypeError`` at construction.
    supports_sharded: bool = True

    #: Attributes never pickled: the model (and anything else holding
    #: modules) and the bookkeeping of a step in progress.  Subclasses extend it.
    _pickle_exclude: frozenset[str] = frozenset({"model", "_stage", "_pending_extra"})

    #: The variant's per-step fields, a dataclass whose defaults are their
    #: values between steps; ``self._stage.variant`` is a fresh instance after
    #: every :meth:`restore` and :meth:`second_step`.  Subclasses replace it.
    _StepState: type = _NoStepState

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run_stages_eagerly(cls)

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any] | None = None,
        *,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        base_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_options(same_rng, per_replica, freeze_bn, model)
        base_kw = merge_base_kwargs(base_kwargs, kwargs)
        settings = {key: checked_setting(self, key, value)
                    for key, value in {**self.group_defaults, **(defaults or {})}.items()}
        check_base_optimizer(base_optimizer, params, base_kw, SharpnessAwareOptimizer)
        #: The variant's group settings and their defaults, by short name
        #: (stored in the param groups as ``"sam_" + name``).
        self.sam_defaults: dict[str, Any] = settings
        base = share_param_groups(self, params, base_optimizer, settings, base_kw)
        named = [(f"param_groups[{i}]['params'][{j}]", p) for i, g in enumerate(base.param_groups)
                 for j, p in enumerate(g["params"])]
        if self.supports_sharded:
            _distributed.refuse_mixed(named, type(self).__name__)
        else:
            _distributed.refuse_sharded(named, type(self).__name__, hint=_distributed.SAM_HINT)
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.state = base.state
        # Tools read the base's hyper-parameters here (LR schedulers check
        # 'momentum' / 'betas' in optimizer.defaults); the variant's are prefixed.
        self.defaults = {**base.defaults, **_prefixed(settings)}
        self.same_rng = same_rng
        self.per_replica = per_replica
        self.freeze_bn = freeze_bn
        self.model = model
        #: Persistent per-parameter state of the variant (saved by state_dict).
        self.extra_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self._reset_transient()
        _state.register_hooks(self)

    def _reset_transient(self) -> None:
        """The per-step bookkeeping (never pickled or saved)."""
        self._stage = _Stage(self._StepState)
        self._pending_extra: dict[str, Any] | None = None
        #: whether the first perturbation of low-precision parameters has
        #: been checked for what rounding loses of it (:meth:`perturb`)
        self._rounding_checked = False

    # -- settings ------------------------------------------------------------

    def _check_setting(self, key: str, value: Any) -> Any:
        """Validate one group setting (by short name) and return it as it is
        stored (a real number as a Python float); subclasses extend it for
        their keys."""
        return check_setting(key, value)

    def sam_settings(self, group: dict[str, Any]) -> GroupSettings:
        """A param group as the variant sees it: its settings by short name
        (``settings["rho"]`` is ``group["sam_rho"]``), the base optimizer's
        keys (``"lr"``, ...) as they are."""
        fill_settings(self, group)
        return GroupSettings(group, self.sam_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (one list)."""
        check_new_group(self, param_group)
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in _prefixed(self.sam_defaults).items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self.param_groups = self.base_optimizer.param_groups

    # -- the hook --------------------------------------------------------------

    def ascent_direction(self, groups: list[AscentGroup]) -> list[list[Tensor] | ScaledDirection]:
        """Perturbation ``e`` for every parameter of every group (override).

        Returns, per group of ``groups`` (the perturbed groups that have
        gradients), ``e`` aligned with ``groups[i].params``: a list of
        tensors, or a :class:`ScaledDirection` ``(tensors, scale)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement ascent_direction()")

    # -- perturb / restore -----------------------------------------------------

    def ascent_groups(self) -> list[AscentGroup]:
        """The groups to perturb, with the parameters that have gradients
        (sparse gradients as dense copies: the perturbation is dense)."""
        return self._groups_with_grads(perturbed=True)

    def unperturbed_groups(self) -> list[AscentGroup]:
        """The groups with ``perturb=False``, with the parameters that have
        gradients.  ``e = 0`` there; a variant whose step combines the
        gradients of its passes (WSAM, GSAM, LookSAM) combines theirs too,
        as its rule does for a coordinate the ascent leaves at zero."""
        return self._groups_with_grads(perturbed=False)

    def _groups_with_grads(self, perturbed: bool) -> list[AscentGroup]:
        out = []
        for group in self.param_groups:
            settings = self.sam_settings(group)
            if bool(settings["perturb"]) != perturbed:
                continue
            params = [p for p in group["params"] if p.grad is not None]  # as torch.optim skips
            if params:
                grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
                out.append(AscentGroup(settings, params, grads))
        return out

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step`."""
        return self._stage.perturbed is not None

    @torch.no_grad()
    def perturb(
        self, groups: Sequence[AscentGroup], directions: Sequence[Sequence[Tensor] | ScaledDirection]
    ) -> None:
        """Set the groups' parameters to ``w + e`` (``directions``: per group
        a list ``e`` or a :class:`ScaledDirection`).  ``w`` is saved the
        first time after a restore; later calls start again from it."""
        check_directions(groups, directions)
        params = [p for g in groups for p in g.params]
        stage = self._stage
        if stage.perturbed is None:
            stage.save(params)
        elif [id(p) for p in stage.perturbed] != [id(p) for p in params]:
            raise RuntimeError("perturb() called again with a different set of parameters")
        elif params:
            _distributed.foreach_copy_(params, stage.saved_w)
        try:
            for g, d in zip(groups, directions):
                if isinstance(d, ScaledDirection):
                    add_scaled(g.params, d.tensors, d.scale)
                else:
                    torch._foreach_add_(g.params, list(d))
        except BaseException:
            self.restore()
            raise
        if not self._rounding_checked:  # the first perturbation only
            self._rounding_checked = True
            if any(p.dtype in LOW_PRECISION for p in params):
                warn_if_rounded_away(self, groups, directions, stage.saved_w)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved ``w`` back (bit for bit) and abandon the step
        (stashed gradients are dropped); a no-op when not perturbed.  Call it
        if your code fails between the two steps outside :meth:`second_pass`."""
        self._stage.clear()

    @torch.no_grad()
    def stash_grad(self) -> None:
        """Move the current gradients aside (``.grad = None``, repeated calls
        accumulate); :meth:`second_step` adds them back.  For gradient terms
        that belong to ``w`` rather than ``w + e`` (a regularizer, the
        samples SharpBalance trains without SAM), backpropagated before the
        backward that feeds :meth:`first_step`."""
        self._stage.stash_grads(self._all_params())

    # -- the two steps -----------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Move to ``w + e`` using the gradients at ``w``.

        With a ``GradScaler`` (``scaler=``) the gradients are unscaled first;
        if they hold inf/NaN the weights are not perturbed and
        :meth:`second_step` skips the base step.  ``zero_grad``: clear the
        gradients afterwards (as the community SAM).
        """
        stage = self._stage
        if stage.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: call second_step() (or restore()) before the next first_step()"
            )
        scaled = scaler is not None and scaler.is_enabled()
        if scaled:
            scaler.unscale_(self)
        groups = self.ascent_groups()
        if not groups and any(g.get(SAM_PREFIX + "perturb", True) for g in self.param_groups):
            raise RuntimeError(
                "first_step() found no gradients: run loss.backward() at the current weights "
                "before first_step()"
            )
        # max |g|: finite iff every entry is finite (no overflow of a sum)
        if scaled and not bool(torch.isfinite(global_norm([g.grads for g in groups], ord=float("inf")))):
            stage.skip_base_step = True
            groups = []
        self.perturb(groups, self.ascent_direction(groups) if groups else [])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Restore ``w`` and take the base optimizer's step with the current
        gradients (those at ``w + e``, plus any :meth:`stash_grad` terms);
        with ``scaler=`` through ``scaler.step`` (call ``scaler.update()``)."""
        if self._stage.perturbed is None:
            raise RuntimeError("second_step() called without first_step()")
        if not self._stage.finish():
            self._base_step(scaler)
        if zero_grad:
            self.zero_grad()

    def _base_step(self, scaler: Any = None) -> None:
        """The base optimizer's step (``scaler.step`` when one is enabled),
        counted as this optimizer's for an LR scheduler (``_opt_called``).

        Package-internal, for the callers in :mod:`flatness.optim` that step
        outside :meth:`second_step` with the weights at ``w``: LookSAM's
        reuse steps, MESA and :func:`~flatness.optim.subset_sam_step` with
        no SAM samples.  It does not touch the step in progress."""
        if scaler is not None and scaler.is_enabled():
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True

    # -- the passes --------------------------------------------------------------

    def first_pass(self) -> contextlib.AbstractContextManager[None]:
        """Context for the forward-backward at ``w`` (optional in the
        two-step style): records the RNG state (``same_rng=True``) and runs
        inside ``model.no_sync()`` (``per_replica=True``)."""
        return _stage.first_pass(self)

    def second_pass(self) -> contextlib.AbstractContextManager[None]:
        """Context for the forward-backward at ``w + e``: replays the RNG
        state of :meth:`first_pass` (``same_rng=True``), freezes BatchNorm
        statistics (``freeze_bn=True``) and restores ``w`` if the block raises."""
        return _stage.second_pass(self)

    def step(self, closure: Callable[[], Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """One full step: the closure (forward, ``backward()`` or
        ``scaler.scale(loss).backward()``, return the loss) runs at ``w`` and
        at ``w + e``, gradients cleared before each.  Returns its value at ``w``."""
        check_closure(self, closure)
        self.zero_grad()
        with torch.enable_grad(), self.first_pass():
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        with torch.enable_grad(), self.second_pass():
            closure()
        self.second_step(scaler=scaler)
        return loss

    # -- distributed -------------------------------------------------------------

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` (quantities a variant computes from local data)
        over the DDP replicas, in place, so every replica perturbs alike; a
        no-op with ``per_replica=True``.  Uses the DDP model's process group."""
        if not self.per_replica:
            _stage.mean_over_replicas_(tensors, getattr(self.model, "process_group", None))

    def share_first_pass_(self, grads: Sequence[Tensor]) -> None:
        """With ``per_replica=True``, average copies of the first pass's
        gradients (taken in ``no_sync()``, so each replica's own) over the
        replicas, in place, once the ascent is formed: a variant that
        combines them into its step (GSAM, WSAM, LookSAM) must step alike on
        every replica, or the replicas' weights drift apart.  A no-op
        otherwise (DDP has averaged them already)."""
        if self.per_replica:
            _stage.mean_over_replicas_(grads, getattr(self.model, "process_group", None))

    def _local_first_pass(self) -> bool:
        """Whether :meth:`first_pass` runs in ``no_sync()``: with
        ``per_replica=True``, the pass the ascent is formed from."""
        return self.per_replica

    # -- delegation and state ----------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the base optimizer's ``zero_grad``)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def extra_state_dict(self) -> dict[str, Any]:
        """The variant's own state; by default :attr:`extra_state` keyed by
        parameter index (the order of ``param_groups``, as in ``torch.optim``)."""
        return _state.extra_state_dict(self)

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state_dict`."""
        _state.load_extra_state_dict(self, state)

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` (its hooks run) of the shared
        ``state`` and ``param_groups`` (the base's keys and the ``sam_``
        settings), plus ``"sharpness_aware"``: the format version, the
        wrapper's and base optimizer's classes, the variant's defaults and
        :meth:`extra_state_dict`."""
        if self._stage.perturbed is not None:
            raise RuntimeError("state_dict() called between first_step() and second_step()")
        return super().state_dict()

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output, a flatness 0.1.0 checkpoint or a
        plain base-optimizer state dict (the current ``sam_`` settings are
        kept) through ``torch.optim.Optimizer.load_state_dict`` (its hooks
        run).  Another wrapper's or base optimizer's state dict is refused
        with a ``ValueError`` before anything changes."""
        if self._stage.perturbed is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step()")
        _state.load(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        """Optimizer state only: not the model (an unpickled optimizer has
        ``model=None``), other modules, the hooks or a step in progress."""
        if self._stage.perturbed is not None:
            raise RuntimeError("cannot pickle the optimizer between first_step() and second_step()")
        return _state.picklable_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _state.set_state(self, state)

    def __repr__(self) -> str:
        return describe(self)


run_stages_eagerly(SharpnessAwareOptimizer)

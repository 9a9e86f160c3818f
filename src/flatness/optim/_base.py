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
  skip flag, gradients stashed at ``w``, the first pass's RNG state).

It restores ``w`` before an exception leaves a stage, unscales and skips
inf/NaN steps under a ``GradScaler``, replays dropout masks
(``same_rng``), runs the first pass in ``no_sync()`` (``per_replica``),
freezes BatchNorm statistics in the second pass (``freeze_bn``) and keeps
the ``torch.optim`` protocol (``state_dict`` hooks, schedulers,
``add_param_group``).  Its stage methods run eagerly inside
``torch.compile`` (:func:`_run_stages_eagerly`).

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
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness import _distributed

# Lives with the other model plumbing; re-exported as flatness.optim.disable_running_stats.
from flatness._guard import disable_running_stats

from ._functional import ScaledDirection, global_norm
from ._settings import (
    SAM_PREFIX,
    GroupSettings,
    _constructor_keys,
    _flatten_params,
    _prefixed,
    _refuse_closure_optimizer,
    add_sam_state,
    fill_settings,
    prepare_load,
    rename_settings,
)

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


def _rng_devices(params: Iterable[Tensor]) -> list[torch.device]:
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)


class _RngSnapshot:
    """Global CPU RNG state plus the CUDA states of the parameters' devices."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


@dataclass
class _Stage:
    """Where the step in progress stands: the base class's only per-step state.

    Never saved or pickled.  ``perturbed is None`` means the weights are
    ``w``; otherwise ``perturbed`` holds the parameters now at ``w + e`` and
    ``saved_w`` the copy of ``w`` they go back to (buffers reused from step
    to step while the parameters stay the same).
    """

    perturbed: list[Tensor] | None = None
    saved_w: list[Tensor] = field(default_factory=list)
    saved_ids: tuple[int, ...] = ()
    #: The GradScaler found inf/NaN in the first pass: no base step.
    skip_base_step: bool = False
    #: Gradient terms taken at ``w`` (:meth:`~SharpnessAwareOptimizer.stash_grad`).
    stash: dict[Tensor, Tensor] = field(default_factory=dict)
    #: The RNG state of the first pass (``same_rng=True``).
    rng: _RngSnapshot | None = None

    def save(self, params: list[Tensor]) -> None:
        """Copy ``w`` of ``params`` aside and mark them perturbed."""
        ids = tuple(map(id, params))
        if ids != self.saved_ids:
            self.saved_w = [torch.empty_like(p) for p in params]
            self.saved_ids = ids
        _distributed.foreach_copy_(self.saved_w, params)
        self.perturbed = params

    def put_back(self) -> None:
        """Copy the saved ``w`` back (bit for bit); the weights are ``w`` again."""
        if self.perturbed:
            _distributed.foreach_copy_(self.perturbed, self.saved_w)
        self.perturbed = None

    def clear(self) -> None:
        """Put ``w`` back and forget the step (the buffers are kept)."""
        self.put_back()
        self.stash = {}
        self.rng = None
        self.skip_base_step = False


class SharpnessAwareOptimizer(Optimizer):
    """Base class of the sharpness-aware optimizers; see the module docstring.

    It wraps a base optimizer and shares its ``param_groups`` and ``state``
    (so LR schedulers and ``add_param_group`` work on either object).
    Subclasses set :attr:`group_defaults` and override
    :meth:`ascent_direction`.

    Parameters
    ----------
    params : iterable or None
        Parameters or param-group dicts, as for any ``torch.optim``
        optimizer.  With an already constructed base optimizer pass ``None``
        (or the same parameters).
    base_optimizer : type or Optimizer
        A ``torch.optim.Optimizer`` subclass (constructed on the same param
        groups with ``**kwargs`` and ``base_kwargs``) or an optimizer
        instance.  One whose ``step`` requires a closure (LBFGS) is refused.
    defaults : dict, optional
        Group-level settings of the variant (``rho``, ``adaptive``, ...),
        overriding the class's :attr:`group_defaults`.  Groups may override
        them in turn, spelled ``"sam_rho"``, ...; ``"sam_perturb": False``
        leaves a group out of the perturbation (it still takes the base
        step).
    same_rng : bool
        Restore the global RNG state (CPU and the parameters' CUDA devices)
        before the second pass, so dropout draws the same masks at ``w`` and
        at ``w + e``.
    per_replica : bool
        Under ``DistributedDataParallel``, compute the ascent direction from
        each replica's own gradient (the first pass runs inside
        ``model.no_sync()``; m-sharpness with m = the local batch).  The
        default uses DDP's all-reduced gradient: one global perturbation.
        Needs ``model``.
    model : nn.Module, optional
        The (possibly DDP-wrapped) model; needed for ``per_replica=True`` and
        ``freeze_bn=True``.
    freeze_bn : bool
        Run the second pass inside :func:`disable_running_stats` (BatchNorm
        running statistics are updated by the first pass only).  Needs
        ``model``.
    base_kwargs : dict, optional
        Arguments of ``base_optimizer`` (when it is a class) whose names the
        variant also uses (Adadelta's ``rho``: ``base_kwargs={"rho": 0.9}``);
        any other base argument may be given here too.  A name given both
        here and as a keyword is refused.
    **kwargs
        Passed to ``base_optimizer`` when it is a class.
    """

    #: Group keys of the variant and their defaults; subclasses replace it.
    group_defaults: dict[str, Any] = {"rho": 0.05, "perturb": True}
    #: Whether the variant steps FSDP2 (``fully_shard``) models, whose
    #: parameters are sharded ``DTensor`` s; a variant that cannot sets it to
    #: ``False`` and is refused with a ``TypeError`` at construction.
    supports_sharded: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _run_stages_eagerly(cls)

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
        for name, flag in (("same_rng", same_rng), ("per_replica", per_replica), ("freeze_bn", freeze_bn)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if (per_replica or freeze_bn) and model is None:
            which = "per_replica=True" if per_replica else "freeze_bn=True"
            raise ValueError(f"{which} needs model=<your model> (the DDP-wrapped one under DDP)")
        if per_replica and not hasattr(model, "no_sync"):
            raise ValueError(
                "per_replica=True needs model to be a torch.nn.parallel.DistributedDataParallel "
                f"model (one with no_sync()), got {type(model).__name__}"
            )
        if base_kwargs is not None and not isinstance(base_kwargs, dict):
            raise TypeError(f"base_kwargs must be a dict, got {type(base_kwargs).__name__}")
        twice = sorted(set(base_kwargs or {}) & set(kwargs))
        if twice:
            raise TypeError(f"base optimizer argument(s) {twice} given both as keywords and in base_kwargs")
        base_kw = {**kwargs, **(base_kwargs or {})}
        settings = {**self.group_defaults, **(defaults or {})}
        for key, value in settings.items():
            self._check_setting(key, value)
        #: The variant's group settings and their defaults, by short name
        #: (stored in the param groups as ``"sam_" + name``).
        self.sam_defaults: dict[str, Any] = settings

        if isinstance(base_optimizer, Optimizer):
            if base_kw:
                raise TypeError(
                    "base_optimizer is already constructed; base optimizer arguments "
                    f"{sorted(base_kw)} cannot be applied (pass the class instead)"
                )
            if isinstance(base_optimizer, SharpnessAwareOptimizer):
                raise TypeError("base_optimizer must be a plain optimizer, not another SAM")
            _refuse_closure_optimizer(type(base_optimizer))
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError(
                        "params differ from the parameters of the given base_optimizer "
                        "instance; pass params=None to use the optimizer's groups"
                    )
            base = base_optimizer
            self._base_keys = frozenset(base.defaults)
            # The instance's groups already hold the base's own keys (an
            # Adadelta "rho" is Adadelta's); 0.1.0-style SAM keys the base does
            # not know are renamed (deprecated alias).
            for group in base.param_groups:
                rename_settings(self, group, strict=False)
            # Optimizer.__init__ fills the variant's defaults into the base
            # optimizer's own group dicts (same objects).
            self._adopting = True
            try:
                super().__init__(base.param_groups, _prefixed(settings))
            finally:
                del self._adopting
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if issubclass(base_optimizer, SharpnessAwareOptimizer):
                raise TypeError("base_optimizer must be a plain optimizer, not another SAM")
            _refuse_closure_optimizer(base_optimizer)
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            self._base_keys = _constructor_keys(base_optimizer)
            super().__init__(params, _prefixed(settings))
            # The base optimizer adds its defaults (lr, momentum, ...) to the
            # same group dicts; both objects then hold one list of groups.
            base = base_optimizer(self.param_groups, **base_kw)
            self._base_keys = frozenset(base.defaults)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
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
        self._register_state_hooks()

    def _reset_transient(self) -> None:
        """The per-step bookkeeping (never pickled or saved)."""
        self._stage = _Stage()
        self._pending_extra: dict[str, Any] | None = None

    # read-only spellings of the stage from before it was one object
    @property
    def _perturbed(self) -> list[Tensor] | None:
        return self._stage.perturbed

    @property
    def _saved_w(self) -> list[Tensor]:
        return self._stage.saved_w

    # ------------------------------------------------------------------
    # settings
    # ------------------------------------------------------------------

    def _check_setting(self, key: str, value: Any) -> None:
        """Validate one group setting (by short name); subclasses extend it for their keys."""
        if key in ("rho", "eta"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{key} must be a number, got {type(value).__name__}")
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{key} must be finite and >= 0, got {value}")
        elif key in ("adaptive", "perturb") and not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool (True or False), got {value!r}")

    def sam_settings(self, group: dict[str, Any]) -> GroupSettings:
        """A param group as the variant sees it: its settings by short name
        (``settings["rho"]`` is ``group["sam_rho"]``), the base optimizer's
        keys (``"lr"``, ...) as they are."""
        fill_settings(self, group)
        return GroupSettings(group, self.sam_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (one list)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        rename_settings(self, param_group, strict=not getattr(self, "_adopting", False))
        for key, value in param_group.items():
            if key.startswith(SAM_PREFIX):
                name = key[len(SAM_PREFIX):]
                if name not in self.sam_defaults:
                    raise ValueError(
                        f"unknown param group key {key!r}; {type(self).__name__}'s settings: "
                        f"{sorted(SAM_PREFIX + k for k in self.sam_defaults)}"
                    )
                self._check_setting(name, value)
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in _prefixed(self.sam_defaults).items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self.param_groups = self.base_optimizer.param_groups

    # ------------------------------------------------------------------
    # the hook
    # ------------------------------------------------------------------

    def ascent_direction(self, groups: list[AscentGroup]) -> list[list[Tensor] | ScaledDirection]:
        """Perturbation ``e`` for every parameter of every group (override).

        Parameters
        ----------
        groups : list of AscentGroup
            The perturbed groups that have gradients.

        Returns
        -------
        list
            Per group, ``e`` aligned with ``groups[i].params``: a list of
            tensors, or a :class:`ScaledDirection` ``(tensors, scale)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement ascent_direction()")

    # ------------------------------------------------------------------
    # perturb / restore
    # ------------------------------------------------------------------

    def ascent_groups(self) -> list[AscentGroup]:
        """The groups to perturb, with the parameters that have gradients.

        Sparse gradients (``nn.Embedding(sparse=True)``) are given as dense
        copies: the perturbation is dense, the base step sees the sparse
        gradient of the second pass as usual.
        """
        out = []
        for group in self.param_groups:
            settings = self.sam_settings(group)
            if not settings["perturb"]:
                continue
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue  # unused this step: skipped, as torch.optim does
                params.append(p)
                grads.append(p.grad.to_dense() if p.grad.is_sparse else p.grad)
            if params:
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
        """Set the groups' parameters to ``w + e``.

        ``w`` is copied once (into buffers reused across steps) the first time
        after a restore; later calls start again from that saved ``w``.
        ``directions`` holds, per group, a list of tensors ``e`` or a
        :class:`ScaledDirection`.
        """
        if len(directions) != len(groups):
            raise RuntimeError(f"ascent_direction returned {len(directions)} groups for {len(groups)}")
        for g, d in zip(groups, directions):
            n = len(d.tensors) if isinstance(d, ScaledDirection) else len(d)
            if n != len(g.params):
                raise RuntimeError(f"ascent_direction returned {n} tensors for {len(g.params)} parameters")
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
                    _add_scaled(g.params, d.tensors, d.scale)
                else:
                    torch._foreach_add_(g.params, list(d))
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved ``w`` back (bit for bit) and abandon the step.

        Safe to call at any time; a no-op when the weights are not perturbed.
        The :meth:`stash_grad` terms are dropped.  Use it if your own code
        fails between :meth:`first_step` and :meth:`second_step` outside
        :meth:`second_pass`.
        """
        self._stage.clear()

    # ------------------------------------------------------------------
    # gradient stash (terms taken at w)
    # ------------------------------------------------------------------

    @torch.no_grad()
    def stash_grad(self) -> None:
        """Move the current gradients aside; :meth:`second_step` adds them back.

        Use it for gradient terms that belong to ``w`` rather than to
        ``w + e``: call it after backpropagating such a term (e.g. the loss
        of the samples that SharpBalance trains without SAM, or a
        regularizer) and before the backward that feeds :meth:`first_step`.
        Repeated calls accumulate.  The ``.grad`` of every parameter is set to
        ``None``.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            held = self._stage.stash.get(p)
            if held is None:
                self._stage.stash[p] = p.grad
            else:
                held.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def _unstash(self) -> None:
        stash, self._stage.stash = self._stage.stash, {}
        have = [(p, s) for p, s in stash.items() if p.grad is not None]
        if have:
            torch._foreach_add_([p.grad for p, _ in have], [s for _, s in have])
        for p, s in stash.items():
            if p.grad is None:
                p.grad = s

    # ------------------------------------------------------------------
    # the two steps
    # ------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Move to ``w + e`` using the gradients at ``w``.

        Parameters
        ----------
        zero_grad : bool
            Clear the gradients afterwards (as the community SAM).
        scaler : torch.amp.GradScaler, optional
            The gradients are scaled: unscale them first.  If they contain
            inf/NaN the weights are not perturbed and :meth:`second_step`
            skips the base step (the scaler lowers its scale in ``update()``).
        """
        if self._stage.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: call second_step() (or restore()) before the next first_step()"
            )
        self._stage.skip_base_step = False
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self)
        groups = self.ascent_groups()
        if not groups and any(g.get(SAM_PREFIX + "perturb", True) for g in self.param_groups):
            raise RuntimeError(
                "first_step() found no gradients: run loss.backward() at the current weights "
                "before first_step()"
            )
        if scaler is not None and scaler.is_enabled():
            # max |g|: finite iff every entry is finite (no overflow of a sum)
            worst = global_norm([g.grads for g in groups], ord=float("inf"))
            if not bool(torch.isfinite(worst)):
                self._stage.skip_base_step = True
                groups = []
        directions = self.ascent_direction(groups) if groups else []
        self.perturb(groups, directions)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Restore ``w`` and take the base optimizer's step with the current
        gradients (those at ``w + e``, plus any :meth:`stash_grad` terms).

        Parameters
        ----------
        zero_grad : bool
            Clear the gradients afterwards.
        scaler : torch.amp.GradScaler, optional
            Steps through ``scaler.step(base_optimizer)`` (unscale, skip on
            inf/NaN).  Call ``scaler.update()`` afterwards as usual.
        """
        stage = self._stage
        if stage.perturbed is None:
            raise RuntimeError("second_step() called without first_step()")
        stage.put_back()
        stage.rng = None
        self._unstash()
        if not stage.skip_base_step:
            self._base_step(scaler)
        stage.skip_base_step = False
        if zero_grad:
            self.zero_grad()

    def _base_step(self, scaler: Any = None) -> None:
        """The base optimizer's step (through ``scaler.step`` when a
        ``GradScaler`` is enabled), counted as a step of this optimizer.

        An LR scheduler attached to this object patches its ``step`` to set
        ``_opt_called`` (its check that the optimizer stepped first); the
        stages step the base optimizer instead, so they set it here, the one
        place that does.
        """
        if scaler is not None and scaler.is_enabled():
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True

    # ------------------------------------------------------------------
    # the passes
    # ------------------------------------------------------------------

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w`` in the two-step style.

        Records the RNG state (``same_rng=True``) and, with
        ``per_replica=True``, runs inside ``model.no_sync()``.  Optional
        otherwise.
        """
        if self._stage.perturbed is not None:
            raise RuntimeError("first_pass() entered while perturbed: call second_step() first")
        self._stage.rng = _RngSnapshot(_rng_devices(self._all_params())) if self.same_rng else None
        with self.model.no_sync() if self.per_replica else contextlib.nullcontext():  # type: ignore[union-attr,operator]
            yield

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w + e``.

        Replays the RNG state of :meth:`first_pass` (``same_rng=True``),
        freezes BatchNorm statistics (``freeze_bn=True``), and restores ``w``
        if the block raises.
        """
        if self._stage.perturbed is None:
            raise RuntimeError("second_pass() entered without first_step()")
        if self.same_rng:
            if self._stage.rng is None:
                self.restore()
                raise RuntimeError(
                    "same_rng=True: run the first forward pass inside `with opt.first_pass():`"
                )
            self._stage.rng.restore()
        try:
            with disable_running_stats(self.model) if self.freeze_bn else contextlib.nullcontext():  # type: ignore[arg-type]
                yield
        except BaseException:
            self.restore()
            raise

    def step(self, closure: Callable[[], Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """One full sharpness-aware step.

        The closure is called twice, at ``w`` and at ``w + e``, with the
        gradients cleared before each call; it runs the forward pass, calls
        ``backward()`` (``scaler.scale(loss).backward()`` with a scaler) and
        returns the loss.

        Parameters
        ----------
        closure : callable
            As for ``torch.optim`` (LBFGS-style).
        scaler : torch.amp.GradScaler, optional
            See :meth:`first_step`; call ``scaler.update()`` after the step.

        Returns
        -------
        The closure's return value at ``w``.
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and calls "
                "backward(); without one, use first_step() ... backward ... second_step()"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self.zero_grad()
        with torch.enable_grad(), self.first_pass():
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        with torch.enable_grad(), self.second_pass():
            closure()
        self.second_step(scaler=scaler)
        return loss

    # ------------------------------------------------------------------
    # distributed
    # ------------------------------------------------------------------

    @torch.no_grad()
    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` over the DDP replicas, in place, in one call.

        For quantities a variant computes from local data (curvature
        factors, statistics of the batch): DDP all-reduces the gradients
        itself, this does the same for anything else, so every replica
        perturbs alike.  A no-op with ``per_replica=True``, outside
        ``torch.distributed`` or with one process.  Uses the DDP model's
        process group when ``model`` was given.
        """
        import torch.distributed as dist

        if self.per_replica or not tensors or not (dist.is_available() and dist.is_initialized()):
            return
        group = getattr(self.model, "process_group", None)
        world = dist.get_world_size(group)
        if world == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        torch._foreach_copy_(list(tensors), views)

    # ------------------------------------------------------------------
    # delegation and state
    # ------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the base optimizer's ``zero_grad``)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def extra_state_dict(self) -> dict[str, Any]:
        """The variant's own state; by default :attr:`extra_state` keyed by
        parameter index (the order of ``param_groups``, as in ``torch.optim``)."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        return {"per_param": {index[id(p)]: dict(s) for p, s in self.extra_state.items() if s}}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state_dict`."""
        params = self._all_params()
        self.extra_state = defaultdict(dict)
        for i, s in state.get("per_param", {}).items():
            p = params[int(i)]
            # Copies, not views: the caller's dict (or another optimizer's
            # live state) must not change under our in-place updates.
            self.extra_state[p] = {
                k: v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in s.items()
            }

    # Attributes never pickled: the model (and anything else holding
    # modules) and the bookkeeping of a step in progress.  Subclasses extend it.
    _pickle_exclude: frozenset[str] = frozenset(
{"model", "_stage", "_pending_extra"}
    )

    def _register_state_hooks(self) -> None:
        # first in line, so that hooks the user registers see the whole state dict
        self.register_state_dict_post_hook(add_sam_state, prepend=True)

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` (the hooks registered on this
        object run) of the shared state and param groups (the base
        optimizer's ``state``: momentum, Adam moments; ``param_groups`` with
        the base's keys and the ``sam_`` settings), plus an entry
        ``"sharpness_aware"``: the format version, the wrapper's and the base
        optimizer's classes, the variant's defaults and
        :meth:`extra_state_dict`."""
        if self._stage.perturbed is not None:
            raise RuntimeError("state_dict() called between first_step() and second_step()")
        return super().state_dict()

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output, a flatness 0.1.0 checkpoint or a
        plain base-optimizer state dict (the current ``sam_`` settings are
        kept), through ``torch.optim.Optimizer.load_state_dict`` (the hooks
        registered on this object run).

        A state dict of another wrapper class or another base optimizer
        class is refused with a ``ValueError`` before anything changes.
        """
        if self._stage.perturbed is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step()")
        sd, extra = prepare_load(self, state_dict)
        self._pending_extra = extra
        try:
            super().load_state_dict(sd)
        finally:
            self._pending_extra = None

    def __getstate__(self) -> dict[str, Any]:
        """Optimizer state only: the model and any other module reference,
        the hooks and a step in progress are not pickled (an unpickled
        optimizer has ``model=None``)."""
        if self._stage.perturbed is not None:
            raise RuntimeError("cannot pickle the optimizer between first_step() and second_step()")
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in self._pickle_exclude
            and not k.startswith("_optimizer_")  # hooks
            and not isinstance(v, (nn.Module, types.FunctionType, types.MethodType))  # e.g. a scheduler's step patch
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "base_optimizer" not in state:
            # From Optimizer.load_state_dict: the loaded state and groups.
            # They become the base optimizer's, whose own __setstate__ brings
            # old states up to date (Adam's step as a tensor, new flags).
            Optimizer.__setstate__(self, state)
            self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
            self.param_groups = self.base_optimizer.param_groups
            self.state = self.base_optimizer.state
            if self._pending_extra is not None:
                self.load_extra_state_dict(self._pending_extra)
            return
        # unpickling (copy.deepcopy, pickle, torch.save of the object)
        Optimizer.__setstate__(self, state)
        self.__dict__.setdefault("model", None)
        self._reset_transient()
        self._register_state_hooks()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            keys = ", ".join(f"{k}={g[k]!r}" for k in _prefixed(self.sam_defaults) if k in g)
            lines.append(f"  group {i}: {keys}")
        lines.append(f"  base_optimizer: {type(self.base_optimizer).__name__}")
        lines.append(")")
        return "\n".join(lines)


#: Methods that change the weights or the optimizer's bookkeeping; they run
#: eagerly inside torch.compile'd code (see the module docstring).
_EAGER_STAGES = ("first_step", "middle_step", "second_step", "restore", "perturb", "stash_grad")


def _run_stages_eagerly(cls: type) -> None:
    """Wrap the stage methods a class defines in ``torch.compiler.disable``.

    Called for every subclass (``__init_subclass__``).  The stages that change
    the weights or the step's bookkeeping then run eagerly inside a compiled
    training step, between the compiled graphs of the forward and backward
    passes, so no traced graph can skip their side effects.  The lazy form,
    ``torch._disable_dynamo``, imports ``torch._dynamo`` at the first call
    only.  ``step`` is disabled for its own frame only (``recursive=False``),
    so the closure it calls, the model's forward and backward, is compiled;
    the base optimizer's step runs eagerly inside ``second_step``.
    """
    for name in (*_EAGER_STAGES, "step"):
        # also stages inherited from a mixin that is not a subclass
        fn = getattr(cls, name, None)
        if fn is None or getattr(fn, "_flatness_eager", False):
            continue
        # torch's lazy form of torch.compiler.disable (as torch.optim uses for
        # zero_grad): torch._dynamo is imported at the first call, not here
        eager = torch._disable_dynamo(fn, recursive=name != "step")
        eager._flatness_eager = True  # type: ignore[attr-defined]
        setattr(cls, name, eager)


def _add_scaled(
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


_run_stages_eagerly(SharpnessAwareOptimizer)

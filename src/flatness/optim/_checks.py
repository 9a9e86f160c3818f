"""Argument checks of the sharpness-aware optimizers.

The constructor's checks raise a ``TypeError`` / ``ValueError`` before
anything changes (the base optimizer, the param groups and the model stay
as they were); :func:`check_new_group` (``add_param_group``) brings a group
to the ``sam_`` spelling first, as it always did; :func:`check_directions`
and :func:`check_closure` check what a variant's hook returned and what
``step`` was given.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness import _distributed
from flatness._checks import LOW_PRECISION, is_real, user_stacklevel
from flatness._geometry import ROUNDING_WARNING, lost_share

from ._settings import SAM_PREFIX, _flatten_params, _refuse_closure_optimizer, rename_settings


def check_options(same_rng: Any, per_replica: Any, freeze_bn: Any, model: Any) -> None:
    """The base class's keyword options and the ``model`` they need."""
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


def merge_base_kwargs(base_kwargs: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's arguments: ``**kwargs`` plus ``base_kwargs``
    (a name given in both is refused)."""
    if base_kwargs is not None and not isinstance(base_kwargs, dict):
        raise TypeError(f"base_kwargs must be a dict, got {type(base_kwargs).__name__}")
    twice = sorted(set(base_kwargs or {}) & set(kwargs))
    if twice:
        raise TypeError(f"base optimizer argument(s) {twice} given both as keywords and in base_kwargs")
    return {key: _plain_number(value) for key, value in {**kwargs, **(base_kwargs or {})}.items()}


def _plain_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (also inside a tuple
    such as Adam's ``betas``), anything else as it is: the base optimizer
    stores its arguments in its param groups, and a NumPy scalar there
    makes ``torch.load(weights_only=True)`` refuse the optimizer's
    ``state_dict``."""
    if isinstance(value, tuple):
        return tuple(_plain_number(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_base_optimizer(
    base_optimizer: Any, params: Iterable[Any] | None, base_kw: dict[str, Any], sam_class: type
) -> None:
    """``base_optimizer`` is a plain ``torch.optim`` class, or an instance
    owning exactly ``params`` (``None``: its own groups), whose ``step``
    works without a closure.  ``sam_class``: the base class of the wrappers
    (a wrapper is not a base optimizer)."""
    if isinstance(base_optimizer, Optimizer):
        if base_kw:
            raise TypeError(
                "base_optimizer is already constructed; base optimizer arguments "
                f"{sorted(base_kw)} cannot be applied (pass the class instead)"
            )
        if isinstance(base_optimizer, sam_class):
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
    elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if issubclass(base_optimizer, sam_class):
            raise TypeError("base_optimizer must be a plain optimizer, not another SAM")
        _refuse_closure_optimizer(base_optimizer)
        if params is None:
            raise ValueError("params is required when base_optimizer is a class")
    else:
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
            f"or an optimizer instance, got {base_optimizer!r}"
        )


def check_setting(key: str, value: Any) -> Any:
    """The base class's group settings: ``rho`` and ``eta`` (and a variant's
    second radius ``rho2``) finite real numbers ``>= 0`` (NumPy scalars too),
    returned as Python floats; ``adaptive`` and ``perturb`` bools (other keys
    pass, returned as given)."""
    if key in ("rho", "rho2", "eta"):
        if not is_real(value):
            raise TypeError(f"{key} must be a number, got {type(value).__name__}")
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"{key} must be finite and >= 0, got {value}")
        return float(value)
    if key in ("adaptive", "perturb") and not isinstance(value, bool):
        raise TypeError(f"{key} must be a bool (True or False), got {value!r}")
    return value


def checked_setting(opt: Any, key: str, value: Any) -> Any:
    """``value`` of setting ``key`` as ``opt._check_setting`` returns it (a
    Python number for a NumPy scalar, so that the param groups and
    ``state_dict()`` hold plain Python values); a ``_check_setting`` that
    returns ``None`` (one written before it returned the value) keeps
    ``value`` as given."""
    checked = opt._check_setting(key, value)
    return value if checked is None else checked


def check_new_group(opt: Any, group: Any) -> None:
    """A param group given to ``opt.add_param_group``: a dict, brought to the
    ``sam_`` spelling (:func:`rename_settings`), whose every ``sam_`` key is
    one of ``opt``'s settings with a valid value (``opt._check_setting``)."""
    if not isinstance(group, dict):
        raise TypeError(f"param_group must be a dict, got {type(group).__name__}")
    rename_settings(opt, group, strict=True)
    for key, value in list(group.items()):
        if key.startswith(SAM_PREFIX):
            name = key[len(SAM_PREFIX):]
            if name not in opt.sam_defaults:
                raise ValueError(
                    f"unknown param group key {key!r}; {type(opt).__name__}'s settings: "
                    f"{sorted(SAM_PREFIX + k for k in opt.sam_defaults)}"
                )
            group[key] = checked_setting(opt, name, value)


def check_directions(groups: Sequence[Any], directions: Sequence[Any]) -> None:
    """What ``ascent_direction`` returned has one entry per group and one
    tensor per parameter (a list, or a ``ScaledDirection``'s ``tensors``)."""
    if len(directions) != len(groups):
        raise RuntimeError(f"ascent_direction returned {len(directions)} groups for {len(groups)}")
    for g, d in zip(groups, directions):
        n = len(d.tensors) if hasattr(d, "tensors") else len(d)
        if n != len(g.params):
            raise RuntimeError(f"ascent_direction returned {n} tensors for {len(g.params)} parameters")


class MissingClosureError(TypeError, RuntimeError):
    """``step()`` of a sharpness-aware optimizer without a callable closure.

    A ``TypeError`` (a missing argument), and a ``RuntimeError`` too: that
    is what SAM's ``step()`` raised in 0.1.0, so code that catches it keeps
    working.
    """


def check_closure(opt: Any, closure: Any) -> None:
    """``opt.step(closure)`` needs a callable closure:
    :class:`MissingClosureError` otherwise, as from the variants with their
    own ``step`` (ESAM, ConsistentSAM, LookSAM's reuse steps)."""
    if closure is None:
        raise MissingClosureError(
            f"{type(opt).__name__}.step() needs a closure that computes the loss and calls "
            "backward(); without one, use first_step() ... backward ... second_step()"
        )
    if not callable(closure):
        raise MissingClosureError(f"closure must be callable, got {type(closure).__name__}")




@torch.no_grad()
def warn_if_rounded_away(opt: Any, groups: Sequence[Any], directions: Sequence[Any], saved_w: Sequence[Tensor]) -> None:
    """After the first perturbation of float16 / bfloat16 parameters: warn
    if storing ``w + e`` in their dtype lost more than
    :data:`ROUNDING_WARNING` of ``e`` along its direction
    (:func:`~flatness._geometry.lost_share`; on those parameters, this
    rank's shards).  SAM's ``e`` is ``rho`` spread over every coordinate,
    so most entries are small against their weights, and bfloat16 keeps 8
    significant bits: on an MLP of 0.27M bfloat16 parameters 9% of ``e``
    is lost at rho 0.05 and 25% at rho 0.005, and the step comes closer to
    the base optimizer's own.  Nothing else shows it.  Runs once per
    optimizer, tensor by tensor (one tensor's float32 temporaries)."""
    from ._functional import ScaledDirection

    def triples() -> Iterator[tuple[Tensor, Tensor, Tensor]]:  # (w, e, w + e as stored)
        saved = iter(saved_w)
        for group, d in zip(groups, directions):
            tensors, scale = (list(d.tensors), d.scale) if isinstance(d, ScaledDirection) else (list(d), 1.0)
            if isinstance(scale, Tensor):
                scale = float(_distributed.local_tensors([scale])[0])
            for p, t in zip(group.params, tensors):
                w = next(saved)
                if p.dtype in LOW_PRECISION:
                    p, t, w = _distributed.local_tensors([p, t, w])
                    yield w, t.float().mul_(scale), p

    share = lost_share(triples())
    if share > ROUNDING_WARNING:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for g in groups for p in g.params
                         if p.dtype in LOW_PRECISION})
        warnings.warn(
            f"{type(opt).__name__}: storing w + e in {' / '.join(dtypes)} lost {share:.0%} of the first "
            "perturbation e along its direction (its entries are below the parameters' resolution), so the "
            "second gradient is taken nearer w than rho asks. Keep the parameters in float32 and compute in "
            "low precision with torch.autocast (mixed precision), or use a larger rho.",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )

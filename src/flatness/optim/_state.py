"""The ``state_dict`` and pickling protocol of the sharpness-aware optimizers.

The state dict is ``torch.optim.Optimizer``'s (the shared ``state`` and
``param_groups``, the ``sam_`` settings included) plus an entry
``"sharpness_aware"`` (:func:`add_sam_state`): the format version, the
wrapper's and the base optimizer's classes, the variant's defaults and its
extra state.  :func:`prepare_load` checks a state dict before anything
changes and reads flatness 0.1.0 checkpoints (settings under their short
names) and plain base-optimizer state dicts; :func:`load` runs
``Optimizer.load_state_dict`` with it, and :func:`set_state` is the
optimizer's ``__setstate__`` for both of its callers (a loaded state dict,
an unpickled object).  A pickled optimizer keeps its optimizer state only
(:func:`picklable_state`).
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._settings import SAM_PREFIX

_SAM_STATE_KEY = "sharpness_aware"
# 1: flatness 0.1.0 (settings under their short names in the param groups);
# 2: settings under "sam_" names, wrapper and base optimizer classes recorded.
_STATE_VERSION = 2


def prepare_load(opt: Any, state_dict: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check ``state_dict`` against the optimizer ``opt`` and bring it to
    the current format, without changing either; returns the state dict for
    ``torch.optim.Optimizer.load_state_dict`` and the variant's extra state."""
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups'")
    ours = state_dict.get(_SAM_STATE_KEY)
    base_name = _qualname(type(opt.base_optimizer))
    saved = state_dict["param_groups"]
    if ours is None:
        # a plain base-optimizer state dict: keep the current settings
        current = [{k: v for k, v in g.items() if k.startswith(SAM_PREFIX)} for g in opt.param_groups]
        check_base_keys(opt, saved, "the plain optimizer state dict")
        groups = [{**g, **c} for g, c in zip(saved, current)] + [dict(g) for g in saved[len(current):]]
        sd = {**state_dict, "param_groups": groups}
        return sd, None
    if not isinstance(ours, Mapping):
        raise ValueError(f"state_dict[{_SAM_STATE_KEY!r}] must be a dict, got {type(ours).__name__}")
    version = ours.get("version", 1)
    if not isinstance(version, int) or version > _STATE_VERSION:
        raise ValueError(
            f"state dict format version {version!r} is newer than this flatness ({_STATE_VERSION}); "
            "upgrade flatness"
        )
    if version >= 2:
        wrapper, mine = ours.get("wrapper"), _qualname(type(opt))
        if wrapper != mine:
            raise ValueError(f"the state dict was saved by {wrapper}; it cannot be loaded into {mine}")
        if ours.get("base") != base_name:
            raise ValueError(
                f"the state dict was saved with base optimizer {ours.get('base')}; it cannot be "
                f"loaded into {type(opt).__name__} around {base_name}"
            )
        groups = [dict(g) for g in saved]
    else:
        # flatness 0.1.0: the variant's settings under their short names,
        # in the same dicts as the base's keys; the base class unrecorded.
        if ours.get("type") != type(opt).__name__:
            raise ValueError(
                f"the state dict was saved by {ours.get('type')}; it cannot be loaded into {type(opt).__name__}"
            )
        check_base_keys(opt, saved, "the flatness 0.1.0 state dict")
        names = set(ours.get("defaults", {})) | set(opt.sam_defaults)
        groups = []
        for g in saved:
            g = dict(g)
            for name in names & set(g):
                # 0.1.0 wrote one value for a shared name (Adadelta's rho
                # was SAM's): both keep it, as that optimizer ran.
                g[SAM_PREFIX + name] = g[name] if name in opt._base_keys else g.pop(name)
            groups.append(g)
    unknown = {
        k for g in groups for k in g
        if k.startswith(SAM_PREFIX) and k[len(SAM_PREFIX):] not in opt.sam_defaults
    }
    if unknown:
        raise ValueError(f"the state dict has settings {sorted(unknown)} that {type(opt).__name__} does not know")
    sd = {k: v for k, v in state_dict.items() if k != _SAM_STATE_KEY}
    sd["param_groups"] = groups
    return sd, dict(ours.get("extra", {}))


def check_base_keys(opt: Any, groups: Sequence[Mapping[str, Any]], what: str) -> None:
    """The base optimizer's hyper-parameters (keys whose defaults are not
    flags) must be in every saved group; catches, e.g., an Adam state
    dict loaded into SGD when the class was not recorded."""
    base = opt.base_optimizer
    needed = {k for k, v in base.defaults.items() if not (v is None or isinstance(v, bool))}
    for i, g in enumerate(groups):
        missing = sorted(needed - set(g))
        if missing:
            raise ValueError(
                f"{what} does not fit base optimizer {type(base).__name__}: param group {i} lacks "
                f"{missing} (was it saved with another base optimizer?)"
            )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def add_sam_state(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """State-dict post hook: the wrapper's own entry."""
    state_dict[_SAM_STATE_KEY] = {
        "version": _STATE_VERSION,
        "type": type(optimizer).__name__,
        "wrapper": _qualname(type(optimizer)),
        "base": _qualname(type(optimizer.base_optimizer)),
        "defaults": dict(optimizer.sam_defaults),
        "extra": optimizer.extra_state_dict(),
    }


def extra_state_dict(opt: Any) -> dict[str, Any]:
    """``opt.extra_state`` keyed by parameter index (the order of
    ``param_groups``, as in ``torch.optim``)."""
    index = {id(p): i for i, p in enumerate(opt._all_params())}
    return {"per_param": {index[id(p)]: dict(s) for p, s in opt.extra_state.items() if s}}


def load_extra_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`extra_state_dict`."""
    params = opt._all_params()
    opt.extra_state = defaultdict(dict)
    for i, s in state.get("per_param", {}).items():
        p = params[int(i)]
        # Copies, not views: the caller's dict (or another optimizer's
        # live state) must not change under our in-place updates.
        opt.extra_state[p] = {
            k: v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor) else v
            for k, v in s.items()
        }


def load(opt: Any, state_dict: Any) -> None:
    """``opt.load_state_dict``: check and convert, then
    ``torch.optim.Optimizer.load_state_dict`` (its hooks run), which hands
    the loaded state to :func:`set_state`; the extra state waits in
    ``opt._pending_extra`` meanwhile."""
    sd, extra = prepare_load(opt, state_dict)
    opt._pending_extra = extra
    try:
        Optimizer.load_state_dict(opt, sd)
    finally:
        opt._pending_extra = None


def picklable_state(opt: Any) -> dict[str, Any]:
    """``opt.__dict__`` without the model and any other module reference,
    the hooks and the step in progress (``opt._pickle_exclude``)."""
    return {
        k: v
        for k, v in opt.__dict__.items()
        if k not in opt._pickle_exclude
        and not k.startswith("_optimizer_")  # hooks
        and not isinstance(v, (nn.Module, types.FunctionType, types.MethodType))  # e.g. a scheduler's step patch
    }


def set_state(opt: Any, state: dict[str, Any]) -> None:
    """``opt.__setstate__``, called by ``Optimizer.load_state_dict`` (the
    loaded ``state`` and ``param_groups`` only) and by unpickling."""
    if "base_optimizer" not in state:
        # From Optimizer.load_state_dict: the loaded state and groups.
        # They become the base optimizer's, whose own __setstate__ brings
        # old states up to date (Adam's step as a tensor, new flags).
        Optimizer.__setstate__(opt, state)
        opt.base_optimizer.__setstate__({"state": opt.state, "param_groups": opt.param_groups})
        opt.param_groups = opt.base_optimizer.param_groups
        opt.state = opt.base_optimizer.state
        if opt._pending_extra is not None:
            opt.load_extra_state_dict(opt._pending_extra)
        return
    # unpickling (copy.deepcopy, pickle, torch.save of the object)
    Optimizer.__setstate__(opt, state)
    opt.__dict__.setdefault("model", None)
    opt._reset_transient()
    register_hooks(opt)


def register_hooks(opt: Any) -> None:
    """The state-dict post hook that adds ``"sharpness_aware"``, first in
    line, so that hooks the user registers see the whole state dict."""
    opt.register_state_dict_post_hook(add_sam_state, prepend=True)

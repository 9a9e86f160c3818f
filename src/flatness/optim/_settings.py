"""Where a sharpness-aware optimizer keeps its settings, and its
``state_dict`` format.

The variant's settings (``group_defaults``: ``rho``, ``adaptive``, ...) live
in the param groups it shares with the base optimizer, under the prefix
``sam_`` (``"sam_rho"``), so they never collide with the base optimizer's
own keys (Adadelta's ``rho``, RMSprop's ``alpha``); :class:`GroupSettings`
shows a group with the short names.  The state dict is
``torch.optim.Optimizer``'s plus an entry ``"sharpness_aware"``
(:func:`add_sam_state`); :func:`prepare_load` checks one before anything
changes and reads flatness 0.1.0 checkpoints (settings under their short
names) and plain base-optimizer state dicts.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

_SAM_STATE_KEY = "sharpness_aware"
# 1: flatness 0.1.0 (settings under their short names in the param groups);
# 2: settings under "sam_" names, wrapper and base optimizer classes recorded.
_STATE_VERSION = 2
#: Prefix of the variant's settings in the (shared) param groups.
SAM_PREFIX = "sam_"


def _prefixed(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {SAM_PREFIX + k: v for k, v in settings.items()}


class GroupSettings(MutableMapping):
    """A param group seen through the variant's eyes.

    The variant's settings (``rho``, ``adaptive``, ...) are stored in the
    shared param group as ``"sam_rho"``, ``"sam_adaptive"``, ... so they
    never collide with a base optimizer's keys (Adadelta's ``rho``,
    RMSprop's ``alpha``).  This view reads and writes them under their
    short names; every other key (``"lr"``, ``"momentum"``, ...) is the
    group's own.  A base key that shares a short name is hidden by the
    variant's setting (read it from the group itself).

    Code that reads a raw group (``opt.param_groups[i]``), and a scheduler
    of a setting, writes ``group["sam_rho"]``; a raw ``group["rho"]`` is
    the base optimizer's.  A bare ``"rho"`` in a group is the flatness 0.1.0
    spelling of ``"sam_rho"`` (moved there with a ``FutureWarning``) where
    the base optimizer has no ``rho`` of its own, and refused as ambiguous
    where it has one.  The constructor's keywords (``rho=``) are the
    variant's; a base keyword of the same name goes in
    ``base_kwargs={"rho": 0.9}``.
    """

    __slots__ = ("group", "_names")

    def __init__(self, group: dict[str, Any], names: Iterable[str]) -> None:
        self.group = group
        self._names = frozenset(names)

    def _key(self, key: str) -> str:
        return SAM_PREFIX + key if key in self._names else key

    def __getitem__(self, key: str) -> Any:
        return self.group[self._key(key)]

    def __setitem__(self, key: str, value: Any) -> None:
        self.group[self._key(key)] = value

    def __delitem__(self, key: str) -> None:
        del self.group[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        for key in self.group:
            if key.startswith(SAM_PREFIX) and key[len(SAM_PREFIX):] in self._names:
                yield key[len(SAM_PREFIX):]
            elif key not in self._names:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def copy(self) -> dict[str, Any]:
        """A plain dict with the short names (as ``dict.copy`` of a group did)."""
        return dict(self)

    def __repr__(self) -> str:
        return f"GroupSettings({dict(self)!r})"


def _constructor_keys(cls: type[Optimizer]) -> frozenset[str]:
    """Hyper-parameter names a base optimizer class takes."""
    try:
        names = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(n for n, p in names.items() if n != "params" and p.kind is not p.VAR_KEYWORD)


def _refuse_closure_optimizer(cls: type[Optimizer]) -> None:
    """Refuse base optimizers whose ``step`` cannot run without a closure."""
    try:
        closure = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{cls.__name__}.step() requires a closure (it re-evaluates the loss during its "
            "step, as LBFGS's line search does); a sharpness-aware optimizer steps the base "
            "optimizer once with the gradient taken at w + e and has no closure that evaluates "
            "the loss at w to give it. Use a base optimizer whose step() works without a closure"
        )


def _user_stacklevel() -> int:
    """Stack level of the first frame outside flatness and torch (for warnings)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith(("flatness.", "torch.")) or name == "flatness"):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


def rename_settings(opt: Any, group: dict[str, Any], *, strict: bool) -> None:
    """Bring a param group to the ``sam_`` spelling of ``opt``'s settings.

    A key the base optimizer does not have (``"rho"`` with SGD) is the
    0.1.0 spelling of the variant's setting: renamed, with a
    ``FutureWarning``.  A key it does have (``"rho"`` with Adadelta) is
    the base's; in a group the user writes (``strict``) it is ambiguous
    unless the ``sam_`` spelling is given too, and refused.
    """
    renamed = []
    for name in opt.sam_defaults:
        if name not in group:
            continue
        key = SAM_PREFIX + name
        if name in opt._base_keys:
            if strict and key not in group:
                raise ValueError(
                    f"param group key {name!r} is ambiguous: the base optimizer has its own "
                    f"{name!r}. Write {key!r} for {type(opt).__name__}'s setting; a group "
                    f"that also has {key!r} passes {name!r} to the base optimizer"
                )
            continue
        if key in group:
            raise ValueError(f"param group gives both {name!r} and {key!r}; keep {key!r}")
        renamed.append(name)
    if renamed:
        warnings.warn(
            f"param group key(s) {renamed} are deprecated for {type(opt).__name__}'s settings; "
            f"write {[SAM_PREFIX + n for n in renamed]} (keys without the prefix belong to the "
            "base optimizer)",
            FutureWarning,
            stacklevel=_user_stacklevel(),
        )
        for name in renamed:
            group[SAM_PREFIX + name] = group.pop(name)


def fill_settings(opt: Any, group: dict[str, Any]) -> None:
    """Give a param group every setting of ``opt`` under its ``sam_`` key.

    A group added through the base optimizer lacks them (the defaults are
    filled in); one written by 0.1.0 code (a ``rho`` schedule) has the short
    name, the latest value, moved to its key with a ``FutureWarning``.
    """
    for name, value in opt.sam_defaults.items():
        key = SAM_PREFIX + name
        if name in group and name not in opt._base_keys:
            warnings.warn(
                f"param group key {name!r} is deprecated for {type(opt).__name__}'s setting; "
                f"write {key!r} (keys without the prefix belong to the base optimizer)",
                FutureWarning,
                stacklevel=_user_stacklevel(),
            )
            group[key] = group.pop(name)
        elif key not in group:
            group[key] = value


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


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    if isinstance(params, Tensor):
        return [params]
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, Tensor) else list(ps))
        else:
            out.append(item)
    return out

"""Where a sharpness-aware optimizer keeps its settings.

The variant's settings (``group_defaults``: ``rho``, ``adaptive``, ...) live
in the param groups it shares with the base optimizer, under the prefix
``sam_`` (``"sam_rho"``), so they never collide with the base optimizer's
own keys (Adadelta's ``rho``, RMSprop's ``alpha``); :class:`GroupSettings`
shows a group with the short names.  The ``state_dict`` format is in
:mod:`flatness.optim._state`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from flatness._checks import user_stacklevel as _user_stacklevel

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


def share_param_groups(
    opt: Any, params: Any, base_optimizer: Any, settings: dict[str, Any], base_kw: dict[str, Any]
) -> Optimizer:
    """Run ``torch.optim.Optimizer.__init__`` on ``opt`` so that it and the
    base optimizer hold one list of param groups (the same dicts, with the
    base's keys and the ``sam_`` settings); returns the base optimizer.

    An instance's groups are adopted: they hold the base's own keys (an
    Adadelta ``rho`` is Adadelta's); 0.1.0-style SAM keys the base does not
    know are renamed (deprecated alias) and the variant's defaults filled
    in.  A class is constructed on ``opt``'s groups, adding its defaults
    (``lr``, ``momentum``, ...) to the same dicts.
    """
    if isinstance(base_optimizer, Optimizer):
        opt._base_keys = frozenset(base_optimizer.defaults)
        for group in base_optimizer.param_groups:
            rename_settings(opt, group, strict=False)
            for key, value in _prefixed(settings).items():
                group.setdefault(key, value)
        Optimizer.__init__(opt, base_optimizer.param_groups, _prefixed(settings))
        return base_optimizer
    opt._base_keys = _constructor_keys(base_optimizer)
    Optimizer.__init__(opt, params, _prefixed(settings))
    base = base_optimizer(opt.param_groups, **base_kw)
    opt._base_keys = frozenset(base.defaults)
    return base


def describe(opt: Any) -> str:
    """``repr(opt)``: the ``sam_`` settings of each group and the base optimizer's class."""
    keys = _prefixed(opt.sam_defaults)
    groups = [f"  group {i}: " + ", ".join(f"{k}={g[k]!r}" for k in keys if k in g)
              for i, g in enumerate(opt.param_groups)]
    base = f"  base_optimizer: {type(opt.base_optimizer).__name__}"
    return "\n".join([f"{type(opt).__name__} (", *groups, base, ")"])

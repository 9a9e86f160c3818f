"""Parameter selection: which tensors a measurement differentiates and
perturbs (:class:`ParamSet`, :func:`select_params`), and the user's module
inside a data-parallel wrapper (:func:`unwrap`)."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """Return the user's module inside a ``DistributedDataParallel`` or
    ``DataParallel`` wrapper (their forward would re-broadcast or all-reduce)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
    ):
        return inner
    return model


def uncompiled(model: nn.Module, ps: ParamSet) -> tuple[nn.Module, ParamSet]:
    """The module a ``torch.compile``'d ``model`` wraps, and ``ps`` with the
    wrapper's ``_orig_mod.`` prefix taken off its names (the same tensors);
    ``(model, ps)`` unchanged for any other model.

    Curvature products differentiate twice, which ``torch.compile``'s
    AOTAutograd backends (the default, inductor) do not support ("does not
    currently support double backward"); the wrapped module computes the
    same function eagerly."""
    # (looked up, not imported: a compiled model means torch._dynamo is
    # loaded, and importing it costs over a second of every first call)
    wrapper = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    module = unwrap(model)
    if wrapper is None or not isinstance(module, wrapper):
        return model, ps
    return module._orig_mod, ParamSet(tuple(uncompiled_name(n) for n in ps.names), ps.params)


def uncompiled_name(name: str) -> str:
    """A parameter's or buffer's name without the ``_orig_mod.`` prefix of a
    ``torch.compile``'d model's names."""
    return name.removeprefix("_orig_mod.")


@dataclass(frozen=True)
class ParamSet:
    """The parameters a measurement is taken with respect to.

    Attributes
    ----------
    names : tuple of str
        Names as in ``model.named_parameters()`` (first name of a tied tensor).
    params : tuple of Tensor
        The parameter tensors themselves (never modified by the library).
    """

    names: tuple[str, ...]
    params: tuple[Tensor, ...]

    @property
    def numel(self) -> int:
        """Total number of scalar entries."""
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def detached(self) -> list[Tensor]:
        """Detached views of the parameters (no copy)."""
        return [p.detach() for p in self.params]

    def as_dict(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """Map ``tensors`` (one per parameter) to their parameter names."""
        return dict(zip(self.names, tensors, strict=True))


def _wanted(params: Any, by_id: dict[int, str], by_name: dict[str, Tensor]) -> dict[int, None]:
    """The ids of the tensors that ``params`` (an iterable of tensors, names,
    modules or ``(name, tensor)`` pairs) names, in the order given (the
    first time each appears)."""
    if isinstance(params, (Tensor, str, nn.Module)):
        params = [params]
    wanted: dict[int, None] = {}
    for item in params:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor):
            item = item[1]  # a (name, tensor) pair, as named_parameters() yields
        if isinstance(item, str):
            if item not in by_name:
                close = difflib.get_close_matches(item, list(by_name), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"unknown parameter name {item!r}{hint}")
            wanted[id(by_name[item])] = None
        elif isinstance(item, nn.Module):
            # A module of another model: its parameters would otherwise be
            # skipped in silence (a module that only groups the model's own
            # parameters, such as a ModuleList built outside it, is fine).
            foreign = [n for n, p in item.named_parameters() if id(p) not in by_id]
            if foreign:
                raise ValueError(
                    f"params= contains a {type(item).__name__} whose parameters {foreign[:3]} are "
                    "not parameters of model; pass model's own submodules, parameters or names"
                )
            for p in item.parameters():
                if p.requires_grad:
                    wanted[id(p)] = None
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError("params= contains a tensor that is not a parameter of model")
            wanted[id(item)] = None
        elif isinstance(item, Mapping) and "params" in item:
            raise TypeError("params= takes tensors, names or modules, not param-group dicts")
        else:
            raise TypeError(
                f"params= items must be tensors, names, modules or (name, tensor) pairs, got {type(item).__name__}"
            )
    return wanted


def select_params(model: nn.Module, params: Iterable[Any] | None = None, *, sharded: bool = False) -> ParamSet:
    """Resolve the ``params=`` argument of the public functions.

    Parameters
    ----------
    model : nn.Module
        The model (a DDP wrapper is looked through).
    params : iterable, optional
        ``None`` selects every parameter with ``requires_grad``.  Otherwise an
        iterable of parameter tensors of ``model``, of their names, of
        ``(name, tensor)`` pairs (``model.named_parameters()``, filtered or
        not), or of submodules (whose trainable parameters are all selected).
    sharded : bool
        The caller measures FSDP2 models (sharded ``DTensor`` parameters);
        otherwise such parameters raise ``TypeError``.

    Returns
    -------
    ParamSet

    Raises
    ------
    ValueError
        If nothing is selected, a name is unknown or a tensor is not a
        parameter of ``model``.
    """
    module = unwrap(model)
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            "a TorchScript module (torch.jit.script / torch.jit.trace) cannot be evaluated at other "
            "weights (torch.func.functional_call refuses it); pass the original nn.Module "
            "(torch.compile'd modules are supported)"
        )
    # remove_duplicate=True: a tied tensor appears once, under its first name.
    named = list(module.named_parameters())
    if not named:
        raise ValueError("model has no parameters")
    lazy = [n for n, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"the model has uninitialized parameters of lazy modules ({', '.join(lazy)}): "
            "run one forward pass on a batch first, which gives them their shapes and values"
        )
    by_id = {id(p): n for n, p in named}
    # Every name of a tied tensor resolves (named_parameters() lists it once,
    # under its first name; state_dict() and the user's code use the others too).
    by_name = dict(module.named_parameters(remove_duplicate=False))
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "model has no parameters with requires_grad=True; pass params= "
                "explicitly to measure with respect to frozen parameters"
            )
    else:
        wanted = _wanted(params, by_id, by_name)
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        if not chosen:
            raise ValueError("params= selects no parameters")
    dtypes = {p.dtype for _, p in chosen}
    if len(dtypes) > 1:
        raise ValueError(f"selected parameters have mixed dtypes {sorted(map(str, dtypes))}")
    if not chosen[0][1].dtype.is_floating_point:
        raise TypeError(f"parameters must be floating point, got {chosen[0][1].dtype}")
    devices = {p.device for _, p in chosen}
    if len(devices) > 1:
        raise ValueError(f"selected parameters live on several devices {sorted(map(str, devices))}")
    if next(iter(devices)).type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device (shapes only, no values); "
            "materialize them first (model.to_empty(device=...) and load a state dict)"
        )
    inference = [n for n, p in chosen if p.is_inference()]
    if inference:
        raise ValueError(
            f"parameters {inference[:3]} are inference tensors (created under torch.inference_mode()) "
            "and cannot be differentiated; build or load the model outside inference_mode"
        )
    if not sharded:
        from flatness._distributed import refuse_sharded

        refuse_sharded(chosen, "flatness")
    names, tensors = zip(*chosen)
    return ParamSet(tuple(names), tuple(tensors))


def given_order(model: nn.Module, params: Iterable[Any] | None, ps: ParamSet) -> list[int]:
    """Positions in ``ps`` (which follows ``model.parameters()``) of the
    selected parameters in the order ``params`` gives them (a module's in
    its own order, a tensor named twice at its first place); ``params=None``
    gives ``ps``'s own order."""
    if params is None:
        return list(range(len(ps.params)))
    module = unwrap(model)
    by_id = {id(p): n for n, p in module.named_parameters()}
    position = {id(p): i for i, p in enumerate(ps.params)}
    wanted = _wanted(params, by_id, dict(module.named_parameters(remove_duplicate=False)))
    return [position[i] for i in wanted if i in position]


def moved_state(model: nn.Module, ps: ParamSet, device: torch.device) -> dict[str, Tensor]:
    """Copies of the unselected parameters and of the buffers on ``device``,
    when it differs from the model's (the module itself is never moved): the
    rest of the module's state for a functional call on another device."""
    if device == ps.device:
        return {}
    module = unwrap(model)
    selected = set(ps.names)
    state = {n: p.detach() for n, p in module.named_parameters() if n not in selected}
    state.update(dict(module.named_buffers()))
    return {n: t.to(device) for n, t in state.items()}

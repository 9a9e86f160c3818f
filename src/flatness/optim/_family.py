"""Small helpers shared by the SAM-family optimizers (GSAM, LookSAM, WSAM, ...):
argument checks, gradient copies, ``GradScaler`` queries and the seeded
generator; their arithmetic is in :mod:`flatness.optim._family_functional`."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from flatness._checks import is_real

from ._base import AscentGroup
from ._functional import global_norm


def clone(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (the live gradients change at the next backward)."""
    return [t.clone() for t in tensors]


def with_group(groups: Sequence[AscentGroup], **overrides: Any) -> list[AscentGroup]:
    """The groups with some group settings replaced (e.g. a scheduled ``rho``),
    so :meth:`SAM.ascent_direction` can be reused on them unchanged."""
    return [AscentGroup({**g.group, **overrides}, g.params, g.grads) for g in groups]


def check_number(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> float:
    """TypeError for a non-number, ValueError outside ``[low, high]`` (or
    ``[low, high)``); returns the value as a Python float (any real number
    is accepted, NumPy scalars included, ``bool`` not)."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return float(value)


def grad_scale(scaler: Any) -> float:
    """The ``GradScaler``'s current scale (1 without an enabled scaler)."""
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


def report_inf(scaler: Any, device: torch.device) -> None:
    """Tell an enabled ``GradScaler`` that a pass overflowed, so that the
    next ``scaler.update()`` lowers the scale.

    A scaler learns of inf/NaN only through ``unscale_`` (or ``step``) of
    some optimizer.  A pass whose gradients it never unscales (ConsistentSAM's
    middle pass) reports through a throwaway optimizer over one parameter with
    an infinite gradient: ``update()`` sums the inf flags of every optimizer
    it saw since the last update, so one flag is enough.
    """
    if scaler is None or not scaler.is_enabled():
        return
    # one probe per scaler and device, kept as long as the scaler: the
    # scaler's records are keyed by id(optimizer), which a throwaway
    # optimizer would hand on to the next object created
    probes = _INF_PROBES.setdefault(scaler, {})
    if device not in probes:
        probe = torch.zeros((), device=device)
        probes[device] = (probe, torch.optim.SGD([probe], lr=0.0))
    probe, opt = probes[device]
    probe.grad = torch.full((), float("inf"), device=device)
    scaler.unscale_(opt)
    probe.grad = None


_INF_PROBES: weakref.WeakKeyDictionary[Any, dict[torch.device, tuple[Tensor, torch.optim.Optimizer]]] = (
    weakref.WeakKeyDictionary()
)


def current_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The live gradients of ``params`` (zeros for a parameter left without one).

    A sparse gradient (``nn.Embedding(sparse=True)``) is first replaced in
    ``.grad`` by its dense form: the variants combine it in place with the
    dense gradient of the other pass, so the base optimizer then receives a
    dense gradient (which rules out base optimizers that take sparse
    gradients only, such as ``torch.optim.SparseAdam``).
    """
    dense_grads_(params)
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def dense_grads_(params: Iterable[Tensor]) -> None:
    """Replace each sparse ``.grad`` of ``params`` by its dense form, for
    variants that change the gradient the base optimizer receives."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def skipped_by(scaler: Any, params: Sequence[Tensor]) -> bool:
    """Whether ``scaler.step()`` just skipped the base step: it has unscaled
    the gradients in place and skips iff one of them is not finite."""
    if scaler is None or not scaler.is_enabled():
        return False
    grads = [p.grad for p in params if p.grad is not None]
    return bool(grads) and not bool(torch.isfinite(global_norm([grads], ord=float("inf"))))


class SeededDraws:
    """A private ``torch.Generator`` for a variant's own random draws (the
    global RNG is never used), saved in the optimizer's state dict so that a
    resumed run draws what the uninterrupted one would.  Mixed in before the
    optimizer base; :meth:`_init_generator` runs in the constructor."""

    _generator: torch.Generator

    def _init_generator(self, seed: int | None) -> None:
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def extra_state_dict(self) -> dict[str, Any]:
        sd = super().extra_state_dict()  # type: ignore[misc]
        sd["generator"] = self._generator.get_state()
        return sd

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)  # type: ignore[misc]
        if "generator" in state:
            # (.cpu(): torch.load(map_location="cuda") moves the saved state
            # to the GPU, and a CPU generator takes a CPU ByteTensor only)
            self._generator.set_state(state["generator"].cpu())

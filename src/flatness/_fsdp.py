"""Sharpness of FSDP2 (``fully_shard``) models: the loss over all ranks at
perturbed sharded weights.

FSDP2 replaces every parameter by a ``DTensor`` holding one shard per rank
(``Shard(0)`` over a 1-d device mesh).  Its forward all-gathers the full
weights from those shards (pre-forward hooks), its backward reduce-scatters
the gradient, averaged over the ranks, into each parameter's ``.grad``.
``torch.func.functional_call`` bypasses both (FSDP gathers from the
parameters it holds, not from the tensors swapped into the module), so the
measurement writes ``w + d`` into the sharded parameters in place, calls
the model itself, and copies the saved ``w`` back, bit for bit, when it
ends, also after an exception.

The perturbation sets and APGD then work on ``DTensor`` s: elementwise
steps act on each rank's shard, norms reduce over the mesh (``DTensor``'s
``_foreach_norm``), and random draws are taken on the full shape from a
generator seeded alike on every rank and then sharded
(:func:`flatness._distributed.shard_like`), so that every draw is the one
of a single-process run.

Every rank holds its own batch, as under DDP; the ranks' ``k``-th batches
together are one batch of the measurement (one perturbation, the loss
averaged over all their samples), so the result is that of one process on
the concatenated batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed
from ._checks import NonFiniteLossError
from ._data import batch_size
from ._functional import LossFn, _loss_of, call_model
from ._params import ParamSet, unwrap
from ._rng import RngSnapshot

__all__ = ["ShardedLoss", "check_sharded"]

#: What to do where the sharded measurement cannot be used.
_WORKAROUND = _distributed.UNSHARDED_HINT


def _refuse(why: str) -> TypeError:
    return TypeError(f"flatness.sharpness on an FSDP2 (fully_shard) model: {why}. {_WORKAROUND}")


def check_sharded(model: nn.Module, ps: ParamSet, *, m: int | None, device: Any, algorithm: str) -> None:
    """Refuse, with a ``TypeError`` and before anything changes, what the
    sharded measurement does not support."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    if not _distributed.enabled():
        raise _refuse("every rank of the mesh must take part (the forward all-gathers the shards), "
                      "so it cannot run inside flatness.local_only()")
    plain = [n for n, p in zip(ps.names, ps.params) if not isinstance(p, DTensor)]
    if plain:
        raise _refuse(f"the selected parameters mix sharded and plain tensors ({plain[:3]} are plain)")
    mesh = ps.params[0].device_mesh
    for name, p in zip(ps.names, ps.params):
        if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise _refuse(f"parameter {name!r} is placed {tuple(p.placements)} on {p.device_mesh}; only "
                          "FSDP2's Shard(0) over one 1-d mesh is supported (not HSDP or tensor parallelism)")
    fsdp = [mod for mod in unwrap(model).modules() if isinstance(mod, FSDPModule)]
    if not fsdp:
        raise _refuse("the DTensor parameters are not managed by fully_shard (tensor parallelism?)")
    for mod in fsdp:
        for group in getattr(mod._get_fsdp_state(), "_fsdp_param_groups", []):
            if not getattr(group, "reduce_grads", True) or getattr(group, "gradient_divide_factor", None):
                raise _refuse("the gradients must be reduced with FSDP's default average (found "
                              "set_requires_gradient_sync(False) or set_gradient_divide_factor)")
    if m is not None:
        raise _refuse("m-sharpness (m=) is not supported: one perturbation covers the ranks' whole batches")
    if device is not None:
        raise _refuse("device= is not supported: the measurement runs where the shards are")
    if algorithm != "apgd":
        raise _refuse(f"algorithm={algorithm!r} is not supported, only 'apgd'")


class ShardedLoss:
    """The mean loss over all ranks' batches at perturbed sharded weights,
    counting passes; the drop-in for the functional loss of a plain model.

    A context manager: on exit the parameters get their saved values back
    (bit for bit).  :attr:`saved` holds them (``DTensor`` s), the ``w`` of
    the measurement.

    The local loss ``L_r`` (mean over the rank's ``n_r`` samples) is
    backpropagated scaled by ``W n_r / N`` (``W`` ranks, ``N`` samples in
    all), so FSDP's average over the ranks gives the gradient of the global
    mean ``sum_r n_r L_r / N``.
    """

    def __init__(self, model: nn.Module, params: ParamSet, loss_fn: LossFn, normalize: bool) -> None:
        self.model, self.loss_fn, self.normalize = unwrap(model), loss_fn, normalize
        self.live: list[Tensor] = list(params.params)
        mesh = self.live[0].device_mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.saved: list[Tensor] = []
        self.forward = 0
        #: the RNG state each evaluation of a chunk starts from (train=True)
        self.replay: RngSnapshot | None = None
        self.backward = 0
        self._targets: Tensor | None = None
        self._in_place: list[Tensor] | None = None
        self._sizes = (0, 0)  # (n_r, N) of the current batch

    def __enter__(self) -> ShardedLoss:
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.live]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            _distributed.foreach_copy_(self.live, self.saved)
        self.saved = []

    # -- batches -----------------------------------------------------------

    def _all_reduce(self, values: Sequence[float]) -> list[float]:
        # on the device the group's backend moves (a CUDA tensor for NCCL)
        dev = _distributed._comm_device(_distributed.local_tensors(self.live[:1])[0].device, self.group)
        buf = torch.tensor(list(values), dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(buf, group=self.group)
        return buf.tolist()

    def global_size(self, targets: Tensor) -> int:
        """``N``, the samples of this batch on all ranks (one collective per
        batch; every rank must have a batch: :meth:`finish` checks the end)."""
        if targets is not self._targets:
            count, total = self._all_reduce([1.0, float(batch_size(targets))])
            if count != self.world:
                raise ValueError("FSDP2: every rank must hold the same number of batches "
                                 f"(only {int(count)} of {self.world} ranks have one more)")
            self._targets, self._sizes = targets, (batch_size(targets), int(total))
        return self._sizes[1]

    def finish(self) -> None:
        """Check that no rank has batches left (pairs with :meth:`global_size`)."""
        count, _ = self._all_reduce([0.0, 0.0])
        if count:
            raise ValueError("FSDP2: every rank must hold the same number of batches "
                             f"({int(count)} of {self.world} ranks have one more)")

    # -- the loss ------------------------------------------------------------

    def buffers(self, weights: list[Tensor]) -> list[Tensor]:
        """Buffers for the perturbed weights ``w + d``: the sharded parameters
        themselves (detached), so ``w + d`` is written where the model reads
        it, without one more copy of the shards."""
        self._in_place = [p.detach() for p in self.live]
        return self._in_place

    def _local(self, values: list[Tensor], inputs: Any, targets: Tensor) -> Tensor:
        if values is not self._in_place:  # already in the parameters otherwise
            with torch.no_grad():
                _distributed.foreach_copy_(self.live, values)
        return _loss_of(call_model(self.model, inputs), targets, self.loss_fn, self.normalize)

    def _mean(self, local: Tensor, targets: Tensor) -> float:
        n = self.global_size(targets)
        (total,) = self._all_reduce([float(local.detach()) * batch_size(targets)])
        return _finite(total / n)

    def value(self, values: list[Tensor], inputs: Any, targets: Tensor) -> float:
        if self.replay is not None:
            self.replay.restore()
        with torch.no_grad():
            local = self._local(values, inputs, targets)
        self.forward += 1
        return self._mean(local, targets)

    def value_and_grad(self, values: list[Tensor], inputs: Any, targets: Tensor) -> tuple[float, list[Tensor]]:
        if self.replay is not None:
            self.replay.restore()
        for p in self.model.parameters():
            p.grad = None
        with torch.enable_grad():
            local = self._local(values, inputs, targets)
            n = self.global_size(targets)
            (local * (self.world * batch_size(targets) / n)).backward()
        value = self._mean(local, targets)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.live]
        for p in self.model.parameters():
            p.grad = None
        self.backward += 1
        return value, grads


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value}; sharpness is undefined (check the data and the model, "
            "or use a smaller rho if it only happens under perturbation)"
        )
    return value

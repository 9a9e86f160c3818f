"""Evaluation engine of :mod:`flatness.landscape`.

A *point* is a vector of coefficients ``c``; the weights there are
``base + sum_i c_i * dirs[i]`` (and, for interpolation, the floating buffers
``buf_base + c_0 * buf_dir``).  Every point is evaluated with
``torch.func.functional_call`` on tensors of our own: the model's parameters
and buffers are never written.

Three ways to evaluate a batch at many points, all exact:

* ``loop``: one forward pass per point;
* ``vmap``: ``g`` points per forward pass through ``torch.func.vmap``
  (pays on a GPU that a small model leaves idle; on a CPU the arithmetic
  dominates and it is slower, so it is chosen there only on request);
* the *first-layer* shortcut (loop only): when the model is a plain
  ``nn.Sequential`` whose first layer is an ``nn.Linear`` applied to the
  input tensor, ``X (W + sum c_i D_i)^T = X W^T + sum c_i X D_i^T``; the
  products are computed once per batch and the remaining layers run per
  point.

Accumulators are size-weighted sums per point, so data-sharded and
grid-split distributed runs both reduce with one sum over ranks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import _distributed
from ._model import (
    LossFn,
    ParamSet,
    _as_args,
    _as_kwargs,
    batch_size,
    iter_batches,
    unwrap,
)

__all__ = ["Evaluator", "bn_layers", "recompute_bn"]

Metric = Callable[[Tensor, Tensor], Tensor]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers that keep running statistics, with their names."""
    return [
        (n, m) for n, m in unwrap(model).named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _first_linear(module: nn.Module, ps: ParamSet) -> bool:
    # Only the plain container: a subclass may override forward.
    if type(module) is not nn.Sequential or len(module) < 2:
        return False
    first = module[0]
    return type(first) is nn.Linear


class Evaluator:
    """Loss, accuracy and metrics of one model at many points.

    Parameters
    ----------
    model : nn.Module
    ps : ParamSet
        The parameters the directions live on.
    base, dirs : tensors on the evaluation device
        ``base`` (one tensor per parameter) and the directions (a list of
        such lists).
    extra : dict
        Further state (unselected parameters, buffers) to use instead of the
        module's; empty when evaluating where the model lives.
    buffers : tuple (names, base, dir) or None
        Floating buffers moved along the first direction (interpolation).
    """

    def __init__(
        self, model: nn.Module, ps: ParamSet, base: list[Tensor], dirs: list[list[Tensor]],
        loss_fn: LossFn, metrics: Mapping[str, Metric], extra: dict[str, Tensor],
        buffers: tuple[list[str], list[Tensor], list[Tensor]] | None = None,
    ) -> None:
        self.module = unwrap(model)
        self.ps, self.base, self.dirs = ps, base, dirs
        self.loss_fn, self.metrics, self.extra = loss_fn, dict(metrics), dict(extra)
        self.buffers = buffers
        self.forward = 0
        self._rows: dict[str, tuple[tuple[float, ...], list[Tensor]]] = {}

    # ---------------------------------------------------------------- states
    def values(self, c: Sequence[float]) -> list[Tensor]:
        """The selected parameters at point ``c``: one pass over the
        parameters per point, the part along all but the last direction
        being kept from the previous point of the same grid row."""
        row = self._row("params", tuple(float(x) for x in c[:-1]), self.base, self.dirs)
        return torch._foreach_add(row, self.dirs[len(c) - 1], alpha=float(c[-1]))

    def _row(self, slot: str, key: tuple[float, ...], base: list[Tensor], dirs: list[list[Tensor]]) -> list[Tensor]:
        # ``base + sum_i key_i dirs[i]``, kept per ``slot`` while ``key`` repeats.
        if not key:
            return base
        cache = self._rows.get(slot)
        if cache is None or cache[0] != key:
            row = [b.clone() for b in base]
            for ci, d in zip(key, dirs):
                if ci != 0.0:
                    torch._foreach_add_(row, d, alpha=ci)
            cache = (key, row)
            self._rows[slot] = cache
        return cache[1]

    def state(self, c: Sequence[float], bn_state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        state = {**self.extra, **self.ps.as_dict(self.values(c))}
        if self.buffers is not None:
            names, b0, db = self.buffers
            state.update({n: b + float(c[0]) * d for n, b, d in zip(names, b0, db)})
        if bn_state:
            state.update(bn_state)
        return state

    # ---------------------------------------------------------------- scores
    def _score(self, outputs: Tensor, targets: Tensor) -> list[float]:
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean loss over the batch), "
                f"got {tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
            )
        row = [float(loss)]
        if self.has_accuracy(outputs, targets):
            row.append(float((outputs.argmax(-1) == targets).double().mean()))
        else:
            row.append(float("nan"))
        for name, fn in self.metrics.items():
            value = fn(outputs, targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"metric {name!r} must return a scalar tensor (a mean over the batch)")
            row.append(float(value))
        return row

    @staticmethod
    def has_accuracy(outputs: Tensor, targets: Tensor) -> bool:
        """Accuracy is defined for class scores ``(n, K)`` and integer labels ``(n,)``."""
        return (
            outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()
            and not targets.is_complex()
        )

    # ---------------------------------------------------------------- engines
    def first_layer_ok(self, inputs: Any) -> bool:
        """Whether the first-layer shortcut is exact and applicable here."""
        return (
            isinstance(inputs, Tensor) and _first_linear(self.module, self.ps)
            and self.buffers is None and inputs.dim() >= 1
        )

    def _first_layer_parts(self, inputs: Tensor) -> tuple[Tensor, list[Tensor], nn.Module, list[str]]:
        first = self.module[0]
        selected = dict(zip(self.ps.names, range(len(self.ps.names))))
        full = {**dict(first.named_parameters(prefix="0")), **self.extra}

        def part(name: str, k: int | None) -> Tensor | None:
            if name not in full and name not in selected:
                return None
            if name in selected:
                i = selected[name]
                return self.base[i] if k is None else self.dirs[k][i]
            return full[name].detach() if k is None else None

        w, b = part("0.weight", None), part("0.bias", None)
        h0 = torch.nn.functional.linear(inputs, w, b)
        hs = []
        for k in range(len(self.dirs)):
            dw, db = part("0.weight", k), part("0.bias", k)
            if dw is None:
                hs.append(torch.zeros_like(h0) if db is None else db.expand_as(h0).clone())
            else:
                hs.append(torch.nn.functional.linear(inputs, dw, db))
        tail = nn.Sequential(OrderedDict(list(self.module._modules.items())[1:]))
        names = [n for n in self.ps.names if not n.startswith("0.")]
        return h0, hs, tail, names

    def batch_loop(self, inputs: Any, targets: Tensor, points: Sequence[Sequence[float]],
                   bn_states: Sequence[Mapping[str, Tensor] | None] | None = None,
                   first_layer: bool = False) -> list[list[float]]:
        """Scores (loss, accuracy, metrics...) of one batch at each point."""
        rows = []
        self._rows.clear()  # cached rows belong to one batch (the first layer's products do)
        if first_layer:
            h0, hs, tail, names = self._first_layer_parts(inputs)
            index = {n: i for i, n in enumerate(self.ps.names)}
            extra = {n: t for n, t in self.extra.items() if not n.startswith("0.")}
            rest = [index[n] for n in names]
            base = [self.base[i] for i in rest]
            dirs = [[d[i] for i in rest] for d in self.dirs]
            for c in points:
                key, last = tuple(float(x) for x in c[:-1]), float(c[-1])
                h = torch.add(self._row("h", key, [h0], [[hk] for hk in hs])[0], hs[-1], alpha=last)
                vals = torch._foreach_add(self._row("tail", key, base, dirs), dirs[-1], alpha=last)
                state = {**extra, **dict(zip(names, vals))}
                outputs = functional_call(tail, state, (h,), strict=False)
                self.forward += 1
                rows.append(self._score(outputs, targets))
            return rows
        args, kwargs = _as_args(inputs), _as_kwargs(inputs)
        for j, c in enumerate(points):
            bn = bn_states[j] if bn_states is not None else None
            outputs = functional_call(self.module, self.state(c, bn), args, kwargs, strict=False)
            self.forward += 1
            rows.append(self._score(outputs, targets))
        return rows

    def batch_vmap(self, inputs: Any, targets: Tensor, points: Sequence[Sequence[float]],
                   chunk: int) -> list[list[float]]:
        """As :meth:`batch_loop`, ``chunk`` points per ``vmap``-ed forward pass."""
        args, kwargs = _as_args(inputs), _as_kwargs(inputs)
        rows: list[list[float]] = []
        for start in range(0, len(points), chunk):
            part = points[start: start + chunk]
            coef = torch.tensor([list(c) for c in part], dtype=self.ps.dtype, device=self.base[0].device)
            stacked = {}
            for i, (n, b) in enumerate(zip(self.ps.names, self.base)):
                v = b.unsqueeze(0).expand(len(part), *b.shape).clone()
                for k, d in enumerate(self.dirs):
                    v.add_(coef[:, k].reshape(-1, *([1] * b.dim())) * d[i].unsqueeze(0))
                stacked[n] = v
            if self.buffers is not None:
                names, b0, db = self.buffers
                for n, b, d in zip(names, b0, db):
                    stacked[n] = b.unsqueeze(0) + coef[:, 0].reshape(-1, *([1] * b.dim())).to(b.dtype) * d.unsqueeze(0)

            def run(state: dict[str, Tensor]) -> Tensor:
                return functional_call(self.module, {**self.extra, **state}, args, kwargs, strict=False)

            outputs = vmap(run)(stacked)
            self.forward += 1
            rows.extend(self._score(outputs[j], targets) for j in range(len(part)))
        return rows


def recompute_bn(
    ev: Evaluator, c: Sequence[float], data: Any, *, device: torch.device, dtype: torch.dtype,
    n_batches: int | None, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
    reduce: bool,
) -> dict[str, Tensor]:
    """BatchNorm running statistics re-estimated at point ``c``.

    As :func:`torch.optim.swa_utils.update_bn`: a training-mode pass over the
    batches; each layer's statistics are the equal-weight mean over batches
    of the batch mean and the unbiased batch variance of its input.  The
    layers update tensors of our own (zeros), from which each batch's
    statistics follow exactly: ``new = momentum * batch`` (``1 * batch`` for
    ``momentum=None``, the cumulative average at its first batch).
    """
    sums: dict[str, Tensor] = {}
    count = 0
    module = ev.module
    modes = [(m, m.training) for m in module.modules()]
    module.train(True)
    try:
        for inputs, _ in iter_batches(data, device=device, dtype=dtype, n_batches=n_batches):
            fresh = {}
            for name, layer in layers:
                fresh[f"{name}.running_mean"] = torch.zeros_like(layer.running_mean, device=device)
                fresh[f"{name}.running_var"] = torch.zeros_like(layer.running_var, device=device)
                fresh[f"{name}.num_batches_tracked"] = torch.zeros_like(layer.num_batches_tracked, device=device)
            with torch.no_grad():
                functional_call(module, ev.state(c, fresh), _as_args(inputs), _as_kwargs(inputs), strict=False)
            ev.forward += 1
            for name, layer in layers:
                m = 1.0 if layer.momentum is None else float(layer.momentum)
                for key in ("running_mean", "running_var"):
                    full = f"{name}.{key}"
                    stat = fresh[full] / m
                    sums[full] = sums[full] + stat if full in sums else stat
            count += 1
    finally:
        for mod, mode in modes:
            mod.training = mode
    if reduce:
        tensors = list(sums.values())
        count = _distributed.sum_(count, *tensors)[0] if tensors else count
    out = {k: v / count for k, v in sums.items()}
    for name, layer in layers:
        out[f"{name}.num_batches_tracked"] = layer.num_batches_tracked.detach().to(device)
    return out


def probe_vmap(ev: Evaluator, inputs: Any, targets: Tensor, points: Sequence[Sequence[float]],
               chunk: int, device: torch.device) -> tuple[bool, dict[str, float]]:
    """Time one chunk of points both ways on one batch; ``True`` if ``vmap`` wins."""
    part = list(points[:chunk])

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up (kernel selection, caches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    first = ev.first_layer_ok(inputs)
    forward = ev.forward
    t_loop = timed(lambda: ev.batch_loop(inputs, targets, part, first_layer=first))
    t_vmap = timed(lambda: ev.batch_vmap(inputs, targets, part, chunk))
    ev.forward = forward  # probe passes are not part of the measurement
    return t_vmap < t_loop, {"loop_s": t_loop, "vmap_s": t_vmap}


def batch_samples(targets: Tensor) -> int:
    return batch_size(targets)

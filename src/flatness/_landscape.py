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

The module also holds the public module's plumbing: argument checks,
direction normalisation, PCA of checkpoints, grid parsing, the evaluation
driver (:func:`evaluate`) and the barrier heights.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import _distributed
from ._checks import LOW_PRECISION, check_int, is_int, maybe_progress
from ._data import batch_size, iter_batches
from ._functional import LossFn, _as_args, _as_kwargs, check_loss_fn
from ._guard import ModelGuard
from ._params import ParamSet, uncompiled_name, unwrap
from ._rng import private_rng

__all__ = [
    "Evaluator",
    "axis",
    "barrier_height",
    "bn_layers",
    "check_common",
    "evaluate",
    "grid_coords",
    "matching_params",
    "normalised",
    "pca",
    "probe_vmap",
    "recompute_bn",
    "resolve_directions",
]

BN_MODES = ("keep", "recompute")
ENGINES = ("auto", "loop", "vmap")

Metric = Callable[[Tensor, Tensor], Tensor]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers that keep running statistics, with their names."""
    return [
        (n, m) for n, m in unwrap(model).named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _first_linear(module: nn.Module) -> bool:
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
        if isinstance(outputs, Tensor) and outputs.dtype in LOW_PRECISION:
            # The loss and metrics of a float16 / bfloat16 model in float32,
            # as everywhere in the library (``_functional._loss_of``): in
            # bfloat16 a loss near 1 is quantized to steps of 0.0078, coarser
            # than most differences across a landscape or a barrier.
            outputs = outputs.float()
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean loss over the batch), "
                f"got {tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
            )
        # the row's values are read back together: one synchronization with
        # a GPU per point and batch, not one per value
        row = [loss.detach().reshape(()).double()]
        if self.has_accuracy(outputs, targets):
            row.append((outputs.argmax(-1) == targets).double().mean())
        else:
            row.append(torch.tensor(float("nan"), dtype=torch.float64, device=loss.device))
        for name, fn in self.metrics.items():
            value = fn(outputs, targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"metric {name!r} must return a scalar tensor (a mean over the batch)")
            row.append(value.detach().reshape(()).to(device=loss.device, dtype=torch.float64))
        return torch.stack(row).tolist()

    @staticmethod
    def has_accuracy(outputs: Any, targets: Any) -> bool:
        """Accuracy is defined for class scores ``(n, K)`` and integer labels
        ``(n,)`` (not for a model returning a tuple or dict: NaN)."""
        return (
            isinstance(outputs, Tensor) and isinstance(targets, Tensor)
            and outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()
            and not targets.is_complex()
        )

    # ---------------------------------------------------------------- engines
    def first_layer_ok(self, inputs: Any) -> bool:
        """Whether the first-layer shortcut is exact and applicable here."""
        return (
            isinstance(inputs, Tensor) and _first_linear(self.module)
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


# --------------------------------------------------------------------------
# argument checks, directions and grids, the evaluation driver
# --------------------------------------------------------------------------


def normalised(d: Tensor, w: Tensor, per_filter: bool, bias: str) -> Tensor:
    """Li et al.'s normalisation of one direction tensor ``d`` against ``w``."""
    if d.dim() <= 1:
        # Biases and BatchNorm parameters: the paper zeroes them by default;
        # its "keep" variant uses the weights themselves as the direction.
        return torch.zeros_like(d) if bias == "zero" else w.detach().clone()
    if not per_filter:
        return d * (w.norm() / d.norm())
    flat_d, flat_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
    scale = flat_w.norm(dim=1) / flat_d.norm(dim=1)
    return (flat_d * scale[:, None]).reshape(d.shape)


def checkpoint_values(ckpt: Any, ps: ParamSet) -> list[Tensor]:
    if isinstance(ckpt, nn.Module):
        named = dict(unwrap(ckpt).named_parameters())
        missing = [n for n in ps.names if n not in named]
        if missing:
            raise ValueError(f"checkpoint model lacks parameters {missing[:3]}")
        values = [named[n].detach() for n in ps.names]
    elif isinstance(ckpt, Mapping):
        missing = [n for n in ps.names if n not in ckpt]
        if missing:
            raise ValueError(f"checkpoint state dict lacks {missing[:3]}")
        values = [ckpt[n] for n in ps.names]
    elif isinstance(ckpt, (list, tuple)):
        if len(ckpt) != len(ps.names):
            raise ValueError(f"checkpoint has {len(ckpt)} tensors, expected {len(ps.names)}")
        values = list(ckpt)
    else:
        raise TypeError("checkpoints must be models, state dicts or lists of tensors, "
                        f"got {type(ckpt).__name__}")
    for n, v, p in zip(ps.names, values, ps.params):
        if not isinstance(v, Tensor) or v.shape != p.shape:
            raise ValueError(f"checkpoint entry {n!r} has shape "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
                             f"expected {tuple(p.shape)}")
    return [v.detach().to(p.device, p.dtype) for v, p in zip(values, ps.params)]


def pca(ps: ParamSet, checkpoints: Sequence[Any], k: int, center: bool) -> dict[str, Any]:
    """The fields of a ``Directions`` result of kind ``"pca"``."""
    if isinstance(checkpoints, (Tensor, nn.Module)) or not isinstance(checkpoints, Sequence):
        raise TypeError("kind='pca' needs checkpoints=, a list of models, state dicts or tensor lists")
    if len(checkpoints) < 2:
        raise ValueError(f"kind='pca' needs at least 2 checkpoints, got {len(checkpoints)}")
    final = torch.cat([p.detach().reshape(-1).double().cpu() for p in ps.params])
    rows = [torch.cat([v.reshape(-1).double().cpu() for v in checkpoint_values(c, ps)]) - final
            for c in checkpoints]
    diffs = torch.stack(rows)  # (n_checkpoints, n_params), relative to the final weights
    if k > min(diffs.shape):
        raise ValueError(f"k={k} exceeds min(checkpoints, parameters) = {min(diffs.shape)}")
    centred = diffs - diffs.mean(dim=0, keepdim=True) if center else diffs
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    comps = vt[:k].clone()
    # A deterministic sign: the entry of largest magnitude is positive.
    idx = comps.abs().argmax(dim=1)
    comps *= torch.sign(comps[torch.arange(k), idx])[:, None]
    var = s**2 / max(len(checkpoints) - 1, 1)
    ratio = (s[:k] ** 2 / (s**2).sum()).tolist()
    coords = torch.cat([diffs, torch.zeros(1, diffs.shape[1], dtype=diffs.dtype)]) @ comps.T
    vectors = []
    for c in comps:
        parts, offset = [], 0
        for p in ps.params:
            parts.append(c[offset: offset + p.numel()].reshape(p.shape).to(p.device, p.dtype))
            offset += p.numel()
        vectors.append(parts)
    return {
        "kind": "pca", "names": list(ps.names), "vectors": vectors,
        "explained_variance": var[:k].tolist(), "explained_variance_ratio": ratio,
        "trajectory": coords.tolist(), "settings": {"k": k, "center": center, "n_checkpoints": len(checkpoints)},
    }


def resolve_directions(dirs: Any, names: list[str] | None, ps: ParamSet, device: torch.device) -> list[list[Tensor]]:
    """The ``directions`` argument of ``slice`` as tensors on ``device``;
    ``names`` are those of a ``Directions`` result (``dirs`` its vectors)."""
    if names is not None:
        if list(names) != list(ps.names):
            raise ValueError("directions were made for other parameters "
                             f"({len(names)} tensors) than the ones selected ({len(ps.names)})")
        raw: list[Any] = list(dirs)
    elif isinstance(dirs, (list, tuple)) and dirs and all(isinstance(t, Tensor) for t in dirs):
        raw = [dirs]  # one direction given as a list of tensors
    elif isinstance(dirs, (list, tuple)):
        raw = list(dirs)
    else:
        raise TypeError("directions must be a Directions result or a list of directions "
                        "(each a list of tensors or a {name: tensor} dict)")
    if not 1 <= len(raw) <= 2:
        raise ValueError(f"a slice takes 1 or 2 directions, got {len(raw)}")
    out = []
    for d in raw:
        if isinstance(d, Mapping):
            missing = [n for n in ps.names if n not in d]
            if missing:
                raise ValueError(f"direction lacks entries for {missing[:3]}")
            d = [d[n] for n in ps.names]
        if not isinstance(d, (list, tuple)) or len(d) != len(ps.params):
            raise ValueError(f"each direction needs one tensor per selected parameter ({len(ps.params)})")
        for t, p, n in zip(d, ps.params, ps.names):
            if not isinstance(t, Tensor) or t.shape != p.shape:
                raise ValueError(f"direction entry for {n!r} must have shape {tuple(p.shape)}")
        out.append([t.detach().to(device, ps.dtype) for t in d])
    return out


def axis(spec: Any) -> list[float]:
    # An integer (a NumPy one too: np.int64(21) is 21 points, not the
    # coordinate 21) is a number of points; a float, even 21.0, a coordinate.
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError("grid must be an int, a (lo, hi, n) tuple or a sequence of coordinates")
    if is_int(spec):
        spec = check_int("grid", spec, 2)
        return torch.linspace(-1.0, 1.0, spec, dtype=torch.float64).tolist()
    if isinstance(spec, tuple) and len(spec) == 3 and is_int(spec[2]):
        lo, hi, n = spec
        n = check_int("grid points", n, 2)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"grid range must satisfy lo < hi, got ({lo}, {hi})")
        return torch.linspace(float(lo), float(hi), n, dtype=torch.float64).tolist()
    values = torch.as_tensor(spec, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise ValueError("grid coordinates must be finite and non-empty")
    return values.tolist()


def grid_coords(grid: Any, n_dirs: int) -> list[list[float]]:
    # One spec for every axis, or a list with one spec per direction (a list
    # of plain numbers is always coordinates).
    if isinstance(grid, list) and len(grid) == n_dirs and all(
        isinstance(g, (list, tuple, Tensor)) or is_int(g) for g in grid
    ) and not all(isinstance(g, numbers.Real) for g in grid):
        return [axis(g) for g in grid]
    return [axis(grid)] * n_dirs


def check_common(model: Any, loss_fn: Any, metrics: Any, bn: str, engine: str, split: str) -> tuple[LossFn, dict]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_fn = check_loss_fn(loss_fn)
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) and callable(f) for k, f in metrics.items()):
        raise TypeError("metrics must map names to callables fn(outputs, targets) -> scalar tensor")
    reserved = {"loss", "accuracy"} & set(metrics)
    if reserved:
        raise ValueError(f"metric names {sorted(reserved)} are reserved")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if split not in ("data", "grid"):
        raise ValueError(f"split must be 'data' or 'grid', got {split!r}")
    return loss_fn, dict(metrics)


def check_reiterable(data: Any, name: str, why: str) -> None:
    """Refuse an iterator or generator where ``data`` is read more than once:
    after the first pass it yields nothing, and the second pass would fail
    with "data yielded no batches", which does not say why."""
    # No iter(data) to find out: on a shuffling DataLoader it would draw from
    # the global RNG.
    if isinstance(data, Iterator):
        raise TypeError(
            f"{name} must be one batch or a re-iterable collection of batches (a list or a "
            f"DataLoader), not an iterator or generator: {why}, and an iterator is exhausted "
            "after one pass"
        )


def evaluate(
    ev: Evaluator, data: Any, points: list[list[float]], *, device: torch.device, dtype: torch.dtype,
    n_batches: int | None, bn: str, bn_data: Any, bn_batches: int | None, engine: str,
    chunk_size: int, split: str, progress: bool, seed: int | None, model: nn.Module,
) -> tuple[Tensor, dict[str, Any]]:
    """Scores of every point: ``(n_points, 2 + n_metrics)`` float64 means
    (loss, accuracy, metrics...), and the engine settings."""
    if bn == "recompute":  # every point re-estimates the statistics, then evaluates
        for name, source in (("data", data), ("bn_data", bn_data)):
            check_reiterable(source, name, "bn='recompute' passes over it once at every point")
    distributed = _distributed.enabled()
    world, rank = _distributed.world_size(), _distributed.rank()
    mine = [i for i in range(len(points)) if split == "data" or i % world == rank]
    ncols = 2 + len(ev.metrics)
    sums = torch.zeros(len(points), ncols, dtype=torch.float64)
    counts = torch.zeros(len(points), dtype=torch.float64)
    info: dict[str, Any] = {}
    error: Exception | None = None
    try:
        evaluate_local(ev, data, points, mine, sums, counts, info, device=device, dtype=dtype,
                        n_batches=n_batches, bn=bn, bn_data=bn_data, bn_batches=bn_batches, engine=engine,
                        chunk_size=chunk_size, split=split, progress=progress, seed=seed, model=model,
                        reduce_bn=distributed and split == "data")
    except Exception as exc:
        if not distributed:
            raise
        error = exc  # raised on every rank together below, instead of a hang
    if distributed:
        _distributed.gather_or_raise(True, error, "landscape")
        _distributed.sum_(sums, counts)
        info.update(world_size=world, split=split)
    return sums / counts[:, None], info


def evaluate_local(
    ev: Evaluator, data: Any, points: list[list[float]], mine: list[int], sums: Tensor, counts: Tensor,
    info: dict[str, Any], *, device: torch.device, dtype: torch.dtype, n_batches: int | None, bn: str,
    bn_data: Any, bn_batches: int | None, engine: str, chunk_size: int, split: str, progress: bool,
    seed: int | None, model: nn.Module, reduce_bn: bool,
) -> None:
    """Fill ``sums`` (size-weighted scores) and ``counts`` for this rank's points."""
    ncols = sums.shape[1]
    with ModelGuard(model, train=False), private_rng(seed, device):
        if bn == "recompute":
            layers = bn_layers(model)
            bar = maybe_progress(None, progress, len(mine), "landscape", unit="point")
            for i in mine:
                stats = recompute_bn(ev, points[i], bn_data, device=device, dtype=dtype,
                                     n_batches=bn_batches, layers=layers, reduce=reduce_bn)
                for inputs, targets in iter_batches(data, device=device, dtype=dtype, n_batches=n_batches):
                    n = batch_size(targets)
                    with torch.no_grad():
                        row = ev.batch_loop(inputs, targets, [points[i]], [stats])[0]
                    sums[i] += n * torch.tensor(row, dtype=torch.float64)
                    counts[i] += n
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            info["engine"] = "loop"
        else:
            chosen = None
            batches = iter_batches(data, device=device, dtype=dtype, n_batches=n_batches)
            for inputs, targets in maybe_progress(batches, progress, n_batches, "landscape"):
                n = batch_size(targets)
                sub = [points[i] for i in mine]
                with torch.no_grad():
                    if chosen is None:
                        chosen = choose_engine(ev, inputs, targets, sub, engine, chunk_size, device, model, info)
                    if chosen == "vmap":
                        rows = ev.batch_vmap(inputs, targets, sub, chunk_size)
                    else:
                        rows = ev.batch_loop(inputs, targets, sub, first_layer=info.get("first_layer", False))
                sums[mine] += n * torch.tensor(rows, dtype=torch.float64).reshape(len(mine), ncols)
                counts[mine] += n
            info["engine"] = chosen


def choose_engine(ev: Evaluator, inputs: Any, targets: Tensor, points: list[list[float]], engine: str,
            chunk: int, device: torch.device, model: nn.Module, info: dict[str, Any]) -> str:
    """The engine: ``vmap`` only where the model allows it and, under
    ``"auto"``, on a GPU where a one-chunk probe shows it faster."""
    rnn = any(isinstance(m, nn.RNNBase) for m in unwrap(model).modules())
    if engine == "vmap" and rnn:
        raise ValueError("engine='vmap' does not support recurrent layers (nn.RNN/LSTM/GRU); use 'loop'")
    info["first_layer"] = ev.first_layer_ok(inputs)
    if engine != "auto":
        return engine
    if rnn or device.type != "cuda" or len(points) < 2:
        return "loop"
    faster, timing = probe_vmap(ev, inputs, targets, points, chunk, device)
    info["probe"] = timing
    return "vmap" if faster else "loop"


def barrier_height(t: list[float], y: Tensor, ya: float, yb: float, kind: str) -> float:
    inside = [i for i, ti in enumerate(t) if 0.0 <= ti <= 1.0]
    if not inside:
        return float("nan")  # a pure extrapolation: no point of the segment
    tt = torch.tensor([t[i] for i in inside], dtype=torch.float64)
    yy = y[inside]
    if kind == "entezari":
        # Rise above the chord (Entezari et al., 2022): <= 0 for a convex loss.
        return float((yy - ((1 - tt) * ya + tt * yb)).max())
    # Frankle et al. (2020): the highest point minus the mean of the end points.
    return float(yy.max() - 0.5 * (ya + yb))


def matching_params(model_a: nn.Module, model_b: nn.Module, ps: ParamSet) -> dict[str, Tensor]:
    if not isinstance(model_b, nn.Module):
        raise TypeError(f"model_b must be a torch.nn.Module, got {type(model_b).__name__}")
    return _matching(unwrap(model_b).named_parameters(), zip(ps.names, ps.params), "parameter",
                     ": the models must have the same architecture")


def matching_buffers(model_b: nn.Module, bufs_a: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """``model_b``'s buffers of the ``names`` of model a's buffers ``bufs_a``
    (same shapes)."""
    return _matching(unwrap(model_b).named_buffers(), ((n, bufs_a[n]) for n in names), "buffer", "")


def _matching(
    named_b: Iterable[tuple[str, Tensor]], wanted: Iterable[tuple[str, Tensor]], what: str, hint: str,
) -> dict[str, Tensor]:
    """Model b's tensor of each of model a's ``wanted`` ``(name, tensor)``,
    of the same shape, by name; either model may be ``torch.compile``'d (its
    names then carry the ``_orig_mod.`` prefix)."""
    by_name = {uncompiled_name(n): t for n, t in named_b}
    out: dict[str, Tensor] = {}
    for n, a in wanted:
        b = by_name.get(uncompiled_name(n))
        if b is None or b.shape != a.shape:
            raise ValueError(f"model_b has no {what} {n!r} of shape {tuple(a.shape)}{hint}")
        out[n] = b
    return out

"""The front door: ``flatness.sharpness(model, data, kind=..., rho=...)``.

Every kind returns a :class:`SharpnessResult`.  The kinds live in one
registry, :data:`KINDS`; adding a kind is one entry there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed, _fsdp
from . import hessian as _hessian
from ._apgd import APGDResult, Objective, apgd
from ._apgd_reference import (
    ReferenceGeometry,
    reference_normalize_logits,
    reference_worst_case,
)
from ._checks import (
    NonFiniteLossError,
    check_bool,
    check_device,
    check_int,
    check_rho,
    maybe_progress,
    user_stacklevel,
)
from ._data import _is_batch, batch_size, check_n_batches, iter_batches, split_batch
from ._functional import (
    LossFn,
    check_loss_fn,
    functional_loss,
    functional_loss_and_grad,
    grad_enabled,
)
from ._geometry import ROUNDING_WARNING, PerturbationSet, rounding_loss
from ._guard import ModelGuard
from ._hvp import CurvatureOperator
from ._options import check_options
from ._params import ParamSet, moved_state, select_params
from ._results import ResultMixin
from ._rng import RngSnapshot, check_seed, private_rng

__all__ = ["KINDS", "NonFiniteLossError", "SharpnessResult", "sharpness"]


@dataclass
class SharpnessResult(ResultMixin):
    """The outcome of :func:`flatness.sharpness`.

    Attributes
    ----------
    kind : str
        The sharpness kind measured.
    rho : float or None
        Perturbation radius (``None`` for curvature kinds).
    value : float
        The sharpness: mean of ``per_batch`` weighted by ``batch_sizes``.
    per_batch : list of float
        Sharpness of each batch.
    batch_sizes : list of int
        Number of samples in each batch.
    clean_loss : float
        Size-weighted mean loss at the unperturbed weights.
    perturbed_loss : float or None
        ``clean_loss + value`` for perturbation kinds, ``None`` otherwise.
    settings : dict
        Every option that determined the value (for reproducibility).
    wall_time : float
        Seconds spent.
    counts : dict
        Work done: ``{"forward": ..., "backward": ...}`` passes (forward
        passes counted separately from forward-backward passes), or
        ``{"hvp": ...}`` for curvature kinds.
    """

    kind: str
    rho: float | None
    value: float
    per_batch: list[float]
    batch_sizes: list[int]
    clean_loss: float
    perturbed_loss: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)


# --------------------------------------------------------------------------
# perturbation kinds
# --------------------------------------------------------------------------

#: kind -> (norm, adaptive)
WORST_CASE: dict[str, tuple[str, bool]] = {
    "linf": ("linf", False),
    "l2": ("l2", False),
    "adaptive_linf": ("linf", True),
    "adaptive_l2": ("l2", True),
}
#: APGD variants of the worst-case kinds: the textbook algorithm (Croce and
#: Hein 2020) and the iteration of the reference evaluator.
ALGORITHMS = ("apgd", "reference")
AVERAGE_CASE: dict[str, tuple[str, bool]] = {
    "avg_linf": ("linf", False),
    "avg_l2": ("l2", False),
    "avg_adaptive_linf": ("linf", True),
    "avg_adaptive_l2": ("l2", True),
}
#: The ``**options`` of :func:`sharpness` that each family of perturbation
#: kinds takes (a test keeps them in step with ``_perturbation_sharpness``).
WORST_CASE_OPTIONS = ("n_iters", "restarts", "m", "normalize_logits", "device", "algorithm")
AVERAGE_CASE_OPTIONS = ("n_samples", "m", "normalize_logits", "device")


class _Loss:
    """Loss at perturbed weights ``w + d`` on one chunk, counting passes."""

    def __init__(
        self,
        model: nn.Module,
        params: ParamSet,
        loss_fn: LossFn,
        normalize: bool,
        extra: dict[str, Tensor],
    ) -> None:
        self.model, self.params, self.loss_fn = model, params, loss_fn
        self.normalize, self.extra = normalize, extra
        self.forward = 0
        self.backward = 0
        #: with train=True, the RNG state every evaluation of the chunk
        #: starts from: one dropout mask for w and every w + d of a chunk
        self.replay: RngSnapshot | None = None
        #: whether gradients may take over the buffers of the values they
        #: are taken at (see ``functional_loss_and_grad``); turned off for
        #: the rest of the call by a model that reads a value again after
        #: its gradient is complete
        self.in_place_grads = True

    def _loss(self, values: list[Tensor], inputs: Any, targets: Tensor) -> Tensor:
        return functional_loss(
            self.model, self.params, values, inputs, targets, self.loss_fn,
            logit_normalization=self.normalize, extra=self.extra,
        )

    def value(self, values: list[Tensor], inputs: Any, targets: Tensor) -> float:
        if self.replay is not None:
            self.replay.restore()
        with torch.no_grad():
            loss = self._loss(values, inputs, targets)
        self.forward += 1
        return _finite(loss)

    def value_and_grad(
        self, values: list[Tensor], inputs: Any, targets: Tensor,
        into_values: Callable[[int, Tensor | None, Tensor], None] | None = None,
        on_value: Callable[[float], None] | None = None,
    ) -> tuple[float, list[Tensor]]:
        # The perturbed weights are leaf tensors of our own, so autograd never
        # reaches the model's parameters or their .grad fields.
        # Forward and backward inside one reparametrization of the module:
        # activation checkpointing recomputes blocks at w + d, not at w.
        # ``into_values``: the gradients come back in the values' buffers.
        # ``on_value``: called with the (finite) value before the backward pass.
        if self.replay is not None:
            self.replay.restore()
        loss, grads = functional_loss_and_grad(
            self.model, self.params, values, inputs, targets, self.loss_fn,
            logit_normalization=self.normalize, extra=self.extra, into_values=into_values,
            on_loss=None if on_value is None else (lambda t: on_value(_finite(t))),
        )
        value = _finite(loss)
        self.backward += 1
        return value, grads


def _finite(loss: Tensor) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value}; sharpness is undefined (check the data and the model, "
            "or use a smaller rho if it only happens under perturbation)"
        )
    return value


def _worst_case_chunk(
    loss: _Loss | _fsdp.ShardedLoss, weights: list[Tensor], pset: PerturbationSet | ReferenceGeometry,
    inputs: Any, targets: Tensor, n_iters: int, restarts: int, generator: torch.Generator,
) -> tuple[float, float]:
    """``(clean loss, max perturbed loss)`` on one chunk."""
    if isinstance(pset, ReferenceGeometry):
        return _reference_chunk(loss, weights, pset, inputs, targets, n_iters, restarts, generator)
    if isinstance(loss, _fsdp.ShardedLoss):
        sharded = _sharded_objective(loss, weights, pset, inputs, targets)
        return _apgd_runs(lambda start: apgd(sharded, pset, n_iters, start=start, builds_values=False), pset,
                          restarts, generator)

    def fused(values: list[Tensor], plan: Any) -> float:
        # APGD's step runs in the gradient hooks, tensor by tensor, and
        # writes the next perturbed weights over these ones
        if plan is None:
            return loss.value(values, inputs, targets)
        consume: Callable[[int, Tensor | None, Tensor], None] | None = None

        def on_value(value: float) -> None:  # after the forward pass: the step is fixed
            nonlocal consume
            consume = plan(value)

        def into_values(i: int, grad: Tensor | None, out: Tensor) -> None:
            assert consume is not None  # on_value runs before the backward pass
            consume(i, grad, out)

        f, _ = loss.value_and_grad(values, inputs, targets, on_value=on_value, into_values=into_values)
        return f

    def objective(delta: list[Tensor], need_grad: bool) -> tuple[float, list[Tensor] | None]:
        # w + c * delta in new buffers, which the gradient then takes over:
        # one parameter-sized set of tensors for both, whatever n_iters is
        with torch.no_grad():
            values = pset.perturbed(delta)
        if not need_grad:
            return loss.value(values, inputs, targets), None
        if loss.in_place_grads:
            try:
                # what the step needs of the gradient, written over the
                # perturbed weights w + c * delta it was taken at
                return loss.value_and_grad(values, inputs, targets, into_values=pset.ascent_grad_into)
            except RuntimeError as exc:
                # A detached alias of a weight used after that weight's
                # gradient was complete: autograd refused the overwritten
                # buffer.  Keep values and gradients apart from now on.
                if "modified by an inplace operation" not in str(exc):
                    raise
                loss.in_place_grads = False
                with torch.no_grad():
                    values = pset.perturbed(delta)
        f, g = loss.value_and_grad(values, inputs, targets)
        del values
        return f, pset.grad_to_scaled_(g)

    def run(start: list[Tensor] | None) -> APGDResult:
        if loss.in_place_grads:
            try:
                return apgd(objective, pset, n_iters, start=start, fused=fused)
            except RuntimeError as exc:
                # as in objective: the step wrote over a weight the model
                # reads again; the run starts over with separate gradients
                if "modified by an inplace operation" not in str(exc):
                    raise
                loss.in_place_grads = False
                pset.recycle(None)
        return apgd(objective, pset, n_iters, start=start)

    return _apgd_runs(run, pset, restarts, generator)


def _apgd_runs(
    run: Callable[[list[Tensor] | None], APGDResult], pset: PerturbationSet, restarts: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """``(objective at the centre, best value)`` of APGD (``run(start)``)
    from the centre and from ``restarts`` random starts."""
    first = run(None)
    clean, best = first.start_value, first.best_value
    for _ in range(restarts):
        start = pset.random_start(generator)
        best = max(best, run(start).best_value)
    return clean, best


def _sharded_objective(
    loss: _fsdp.ShardedLoss, weights: list[Tensor], pset: PerturbationSet, inputs: Any, targets: Tensor,
) -> Objective:
    """APGD's objective on an FSDP2 model: ``w + c * delta`` is written into
    the sharded parameters themselves (:meth:`ShardedLoss.buffers`), where
    the model's all-gather reads it, and the gradient is the one FSDP
    reduce-scatters into ``.grad`` (so the plain path's gradient written
    over the perturbed weights does not apply)."""
    live = loss.buffers(weights)

    def objective(delta: list[Tensor], need_grad: bool) -> tuple[float, list[Tensor] | None]:
        with torch.no_grad():
            # (APGD runs with builds_values=False: these are the only
            # perturbed weights built)
            pset.perturbed_(live, weights, delta)
        if not need_grad:
            return loss.value(live, inputs, targets), None
        f, g = loss.value_and_grad(live, inputs, targets)
        return f, pset.grad_to_scaled_(g)

    return objective


def _reference_chunk(
    loss: _Loss, weights: list[Tensor], geometry: ReferenceGeometry, inputs: Any, targets: Tensor,
    n_iters: int, restarts: int, generator: torch.Generator,
) -> tuple[float, float]:
    """:func:`_worst_case_chunk` for ``algorithm="reference"``, which
    iterates on the weight-space perturbation ``d`` itself."""
    values = [w.clone() for w in weights]  # w + d, rewritten in place each step

    def objective(d: list[Tensor], need_grad: bool) -> tuple[float, list[Tensor] | None]:
        with torch.no_grad():
            torch._foreach_copy_(values, weights)
            torch._foreach_add_(values, d)
        if not need_grad:
            return loss.value(values, inputs, targets), None
        return loss.value_and_grad(values, inputs, targets)

    return reference_worst_case(objective, geometry, n_iters, restarts, generator)


def _average_case_chunk(
    loss: _Loss | _fsdp.ShardedLoss, weights: list[Tensor], pset: PerturbationSet, inputs: Any,
    targets: Tensor, n_samples: int, generator: torch.Generator,
) -> tuple[float, float]:
    """``(clean loss, mean perturbed loss over n_samples draws)`` on one chunk."""
    clean = loss.value(weights, inputs, targets)
    # FSDP2: w + d is copied into the shards, where the model reads it, and
    # the draw's buffers are freed before the forward pass
    live = loss.buffers(weights) if isinstance(loss, _fsdp.ShardedLoss) else None
    total = 0.0
    for _ in range(n_samples):
        with torch.no_grad():
            values = pset.average_case_values(generator)  # w + d in the draw's own buffers
            if live is not None:
                _distributed.foreach_copy_(live, values)
                values = live
        total += loss.value(values, inputs, targets)
        del values  # freed before the next draw exists
    return clean, total / n_samples


def _perturbation_sharpness(
    model: nn.Module,
    data: Any,
    *,
    kind: str,
    rho: float | None,
    loss_fn: LossFn,
    params: Iterable[Any] | None,
    seed: int | None,
    n_batches: int | None,
    progress: bool,
    train: bool,
    n_iters: int = 20,
    n_samples: int = 100,
    m: int | None = None,
    normalize_logits: bool = False,
    restarts: int = 0,
    device: str | torch.device | None = None,
    algorithm: str = "apgd",
) -> SharpnessResult:
    if rho is None:
        raise ValueError(f"kind={kind!r} needs rho= (the perturbation radius)")
    rho = check_rho(rho)
    n_iters = check_int("n_iters", n_iters, 1)
    n_samples = check_int("n_samples", n_samples, 1)
    m = check_int("m", m, 1, allow_none=True)
    restarts = check_int("restarts", restarts, 0)
    seed = check_seed(seed)
    n_batches = check_n_batches(n_batches)
    normalize_logits = check_bool("normalize_logits", normalize_logits)
    worst = kind in WORST_CASE
    norm, adaptive = (WORST_CASE if worst else AVERAGE_CASE)[kind]
    reference = _check_algorithm(algorithm, worst, train)
    if device is not None:
        device = check_device(device)
    ps = select_params(model, params, sharded=True)
    # FSDP2: one perturbation of the sharded weights per batch of all ranks (flatness._fsdp)
    sharded = _distributed.is_sharded(ps.params)
    if sharded:
        _fsdp.check_sharded(model, ps, m=m, device=device, algorithm=algorithm)
    dev = torch.device(device) if device is not None else ps.device
    extra = moved_state(model, ps, dev)
    lost = _check_rounding(ps, kind, rho, norm, adaptive, worst)
    settings = {
        "norm": norm, "adaptive": adaptive, "worst_case": worst, "m": m,
        "rounding_loss": lost,
        "normalize_logits": bool(normalize_logits), "n_batches": n_batches,
        "seed": seed, "train": train, "params": list(ps.names),
        "loss_fn": getattr(loss_fn, "__name__", type(loss_fn).__name__),  # (as the curvature kinds name it)
        "device": str(dev), "dtype": str(ps.dtype),
        **({"n_iters": n_iters, "restarts": restarts, "algorithm": algorithm}
           if worst else {"n_samples": n_samples}),
    }

    start = time.perf_counter()
    per_batch, sizes, clean_losses = [], [], []
    # Under torch.distributed each rank perturbs for its own batches with its
    # own random stream (rank 0 keeps ``seed``), then the lists are gathered.
    # (FSDP2: one stream for all ranks, the draws of a one-process run.)
    local_seed = _distributed.shared_seed(seed) if sharded else _distributed.rank_seed(seed)
    if reference and normalize_logits:
        loss_fn = reference_normalize_logits(loss_fn)
    sharded_loss = _fsdp.ShardedLoss(model, ps, loss_fn, bool(normalize_logits)) if sharded else None
    loss = sharded_loss or _Loss(model, ps, loss_fn, bool(normalize_logits) and not reference, extra)
    size = sharded_loss.global_size if sharded_loss else batch_size  # FSDP2: samples of all ranks
    error: Exception | None = None
    try:
        with ModelGuard(model, train=train), private_rng(local_seed, dev) as gen, \
                sharded_loss or contextlib.nullcontext():
            # FSDP2: the shards are overwritten with w + d; w is the copy the loss saved
            weights = sharded_loss.saved if sharded_loss else [p.detach().to(dev) for p in ps.params]
            pset = (ReferenceGeometry if reference else PerturbationSet)(
                norm, rho, weights, adaptive=adaptive)
            batches = iter_batches(data, device=dev, dtype=ps.dtype, n_batches=n_batches)
            total = _batch_count(data, n_batches)
            for inputs, targets in maybe_progress(batches, progress, total, kind):
                n = size(targets)
                clean_sum = sharp_sum = 0.0
                for x, y in split_batch(inputs, targets, m):
                    if train:  # the same dropout mask at w and at every w + d of the chunk
                        loss.replay = RngSnapshot([dev] if dev.type == "cuda" else [])
                    if worst:
                        clean, pert = _worst_case_chunk(loss, weights, pset, x, y, n_iters, restarts, gen)
                    else:
                        clean, pert = _average_case_chunk(loss, weights, pset, x, y, n_samples, gen)
                    k = size(y)
                    clean_sum += k * clean
                    sharp_sum += k * (pert - clean)
                per_batch.append(sharp_sum / n)
                clean_losses.append(clean_sum / n)
                sizes.append(n)
            if sharded_loss:
                sharded_loss.finish()  # no rank has batches left
    except Exception as exc:
        if not _distributed.enabled() or sharded:  # (FSDP2: every rank raises alike)
            raise
        error = exc  # raised on every rank together below, instead of a hang
    counts = {"forward": loss.forward, "backward": loss.backward}
    if sharded:  # every rank measured every batch of all ranks
        settings["world_size"] = _distributed.world_size()
        settings["sharded"] = "fsdp2"
    elif _distributed.enabled():
        parts = _distributed.gather_or_raise((per_batch, sizes, clean_losses, counts), error, "sharpness")
        # rank-major order: rank 0's batches, then rank 1's, ...
        per_batch = [v for p in parts for v in p[0]]
        sizes = [v for p in parts for v in p[1]]
        clean_losses = [v for p in parts for v in p[2]]
        counts = {key: sum(p[3][key] for p in parts) for key in counts}
        settings["world_size"] = len(parts)
        settings["batches_per_rank"] = [len(p[0]) for p in parts]
    value = _weighted_mean(per_batch, sizes)
    clean_loss = _weighted_mean(clean_losses, sizes)
    return SharpnessResult(
        kind=kind, rho=rho, value=value, per_batch=per_batch, batch_sizes=sizes,
        clean_loss=clean_loss, perturbed_loss=clean_loss + value, settings=settings,
        wall_time=time.perf_counter() - start, counts=counts,
    )


def _check_rounding(ps: ParamSet, kind: str, rho: float, norm: str, adaptive: bool, worst: bool) -> float:
    """What rounding ``w + d`` to the weights' dtype loses of a typical
    perturbation (:func:`~flatness._geometry.rounding_loss`); a warning
    above :data:`ROUNDING_WARNING`: the measured value is then biased
    toward 0 (in bfloat16, ``adaptive_linf`` at ``rho < 2**-9`` is exactly
    0), which no other symptom shows."""
    lost = rounding_loss(ps.params, norm, rho, adaptive=adaptive, average_case=not worst)
    if lost > ROUNDING_WARNING:
        dtype = str(ps.dtype).removeprefix("torch.")
        warnings.warn(
            f"flatness.sharpness: rounding the perturbed weights to {dtype} loses {lost:.0%} of a typical "
            f"perturbation (along its direction) of kind={kind!r} at rho={rho:g} (its entries are below the "
            "weights' resolution), so the value is biased toward 0. Use a larger rho, or measure a float32 copy "
            "of the model: flatness.sharpness(copy.deepcopy(model).float(), ...)",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )
    return round(lost, 4)


def _check_algorithm(algorithm: Any, worst: bool, train: bool) -> bool:
    """Validate ``algorithm=``; whether it asks for the reference iteration."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    if algorithm == "reference" and not worst:
        raise ValueError(
            "algorithm='reference' applies to the worst-case kinds (linf, l2, adaptive_linf, "
            "adaptive_l2); the average-case kinds have no iteration to choose")
    if algorithm == "reference" and train:
        raise ValueError(
            "algorithm='reference' measures in eval mode, as the reference evaluator does; "
            "train=True cannot be honoured")
    return algorithm == "reference"


def _batch_count(data: Any, n_batches: int | None) -> int | None:
    """How many batches ``data`` yields, when it has a length (for the bar)."""
    if _is_batch(data):
        return 1
    try:
        n = len(data)
    except TypeError:
        return n_batches
    return n if n_batches is None else min(n, n_batches)


def _weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# --------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------

SharpnessFn = Callable[..., SharpnessResult]


def _perturbation(kind: str) -> SharpnessFn:
    def fn(model: nn.Module, data: Any, **kwargs: Any) -> SharpnessResult:
        return _perturbation_sharpness(model, data, kind=kind, **kwargs)

    return fn


# --------------------------------------------------------------------------
# Curvature kinds: adapters from flatness.hessian's measures to SharpnessResult
# --------------------------------------------------------------------------


def _clean_loss(op: CurvatureOperator) -> tuple[float, int]:
    """Size-weighted mean loss over the operator's data, and the sample count."""
    total, acc = 0, 0.0
    ps = op.params
    with ModelGuard(op.model, train=op.train), private_rng(op.seed, ps.device), torch.no_grad():
        for inputs, targets in iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=op.n_batches):
            nb = batch_size(targets)
            acc += float(functional_loss(op.model, ps, ps.detached(), inputs, targets, op.loss_fn)) * nb
            total += nb
    acc, total = _distributed.sum_(acc, total)  # over all ranks inside a process group
    return acc / total, total


def _curvature_kind(kind: str, measure: Any) -> SharpnessFn:
    """A ``flatness.sharpness`` kind from ``measure(model, data, **kw) ->
    (value, settings, n_hvp)``; ``rho`` does not apply and is ignored."""

    def fn(model: nn.Module, data: Any, *, rho: Any = None, loss_fn: LossFn | None = None,
           params: Any = None, seed: int | None = 0, n_batches: int | None = None,
           progress: bool = False, train: bool = False, **options: Any) -> Any:
        start = time.perf_counter()
        if params is not None and not isinstance(params, (Tensor, str, nn.Module)):
            params = list(params)  # read twice: the measure, then the clean loss
        common = dict(loss_fn=loss_fn, params=params, n_batches=n_batches, train=train, seed=seed)
        value, settings, n_hvp = measure(model, data, progress=progress, **common, **options)
        loss, total = _clean_loss(_hessian._operator(model, data, **common))
        return SharpnessResult(
            kind=kind, rho=None, value=float(value), per_batch=[float(value)], batch_sizes=[total],
            clean_loss=loss, perturbed_loss=None, settings=settings,
            wall_time=time.perf_counter() - start, counts={"hvp": n_hvp},
        )

    fn.__doc__ = f"``flatness.sharpness(kind={kind!r})``."
    return fn


def _max_eig(model: nn.Module, data: Any, **kw: Any) -> tuple[float, dict[str, Any], int]:
    if kw.get("which", "LA") == "SA":
        # the smallest eigenvalue under the name of the largest would be
        # misread (and "LM" is the spectral norm's eigenvalue, still the
        # sharpest direction)
        raise ValueError(
            "kind='hessian_max_eig' measures the largest eigenvalue; which='SA' (the smallest) is not a "
            "sharpness: use flatness.hessian.top_eigenvalues(model, data, which='SA')"
        )
    r = _hessian.top_eigenvalues(model, data, 1, **kw)
    return float(r.eigenvalues[0]), {**r.settings, "residual": float(r.residuals[0]), "converged": r.converged}, r.n_hvp


def _trace(model: nn.Module, data: Any, **kw: Any) -> tuple[float, dict[str, Any], int]:
    r = _hessian.trace(model, data, **kw)
    return r.value, {**r.settings, "std_error": r.std_error}, r.n_hvp


def _minimum(model: nn.Module, data: Any, **kw: Any) -> tuple[float, dict[str, Any], int]:
    r = _hessian.minimum_sharpness(model, data, **kw)
    return r.value, {**r.settings, "trace": r.trace, "trace_std_error": r.trace_std_error,
                     "layer_std_errors": r.layer_std_errors, "bias_std_errors": r.bias_std_errors}, r.n_hvp


#: Every kind ``flatness.sharpness`` accepts, mapped to the function that
#: measures it: ``fn(model, data, *, rho, loss_fn, params, seed, n_batches,
#: progress, train, **options) -> SharpnessResult``.
KINDS: dict[str, SharpnessFn] = {
    **{kind: _perturbation(kind) for kind in (*WORST_CASE, *AVERAGE_CASE)},
    "hessian_max_eig": _curvature_kind("hessian_max_eig", _max_eig),
    "hessian_trace": _curvature_kind("hessian_trace", _trace),
    "minimum": _curvature_kind("minimum", _minimum),
}


def _curvature_options(kind: str) -> tuple[str, ...] | None:
    """The options of a curvature kind: the keyword arguments of the
    function that measures it, less those :func:`sharpness` sets itself."""
    fn = {"hessian_max_eig": _hessian.top_eigenvalues, "hessian_trace": _hessian.trace,
          "minimum": _hessian.minimum_sharpness}.get(kind)
    if fn is None:
        return None
    fixed = {"model", "data", "k", "loss_fn", "params", "seed", "n_batches", "progress", "train"}
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if n not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def kind_options(kind: str) -> tuple[str, ...] | None:
    """The ``**options`` that ``flatness.sharpness(kind=kind)`` accepts
    (``None`` for a kind registered without a declared set)."""
    if kind in WORST_CASE:
        return WORST_CASE_OPTIONS
    if kind in AVERAGE_CASE:
        return AVERAGE_CASE_OPTIONS
    return _curvature_options(kind)


def _check_sharpness_options(kind: str, rho: float | None, options: dict[str, Any]) -> None:
    valid = kind_options(kind)
    if valid is None:
        return
    perturbation = kind in WORST_CASE or kind in AVERAGE_CASE
    known = {o for k in KINDS for o in (kind_options(k) or ())} | {"rho"}
    given = [*options, *(["rho"] if rho is not None else [])]
    check_options("flatness.sharpness", given, (*valid, *(["rho"] if perturbation else [])),
                  choice=f"kind={kind!r}", known=known)


@grad_enabled
def sharpness(
    model: nn.Module,
    data: Any,
    kind: str = "adaptive_linf",
    rho: float | None = None,
    *,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    seed: int | None = 0,
    n_batches: int | None = None,
    progress: bool = False,
    train: bool = False,
    **options: Any,
) -> SharpnessResult:
    r"""Measure the sharpness of ``model`` on ``data``.

    Parameters
    ----------
    model : nn.Module
        The network (a DDP wrapper is looked through).  It comes back exactly
        as it went in: parameter values bit for bit, storages, train/eval
        mode, ``requires_grad`` and ``.grad``, also if the call raises.
    data : batch or iterable of batches
        One batch ``(inputs, targets)`` or any iterable of them (a
        ``DataLoader``, a list).  Inputs may be tensors, tuples (positional
        arguments) or dicts (keyword arguments).  Batches are moved to the
        parameters' device and floating inputs cast to their dtype (floating
        targets too; float32 for a float16 / bfloat16 model).
    kind : str
        Worst case (APGD): ``"linf"``, ``"l2"``, ``"adaptive_linf"``,
        ``"adaptive_l2"``.  Average case: ``"avg_linf"``, ``"avg_l2"``,
        ``"avg_adaptive_linf"``, ``"avg_adaptive_l2"``.  Curvature:
        ``"hessian_max_eig"``, ``"hessian_trace"``, ``"minimum"``.
        See :doc:`/definitions` for the formulas.
    rho : float
        Perturbation radius (> 0), in scaled coordinates ``d / |w|`` for the
        adaptive kinds.  Required by the perturbation kinds.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)`` returning the *mean* loss of the batch.
        Default: mean cross-entropy.
    params : iterable, optional
        Parameters to perturb (tensors, names, submodules or the ``(name,
        tensor)`` pairs of ``model.named_parameters()``).  Default: all
        with ``requires_grad``.  Buffers are never perturbed.
    seed : int or None
        Seed of the private generator for random starts and samples (and of
        dropout when ``train=True``).  The global RNG state is untouched.
    n_batches : int, optional
        Use at most this many batches of ``data``.
    progress : bool
        Show a tqdm progress bar over batches (needs ``flatness[progress]``).
    train : bool
        Measure in training mode (BatchNorm batch statistics, dropout on).
        Each chunk (batch, or ``m`` samples) draws one dropout mask, from
        ``seed``, and keeps it for ``w`` and every ``w + d`` it evaluates,
        so the value compares one function (as SAM's ``same_rng``), not
        two masks.  Default: eval mode.
    **options
        Options of the kind; one that does not apply to ``kind`` raises
        ``ValueError``, an unknown one ``TypeError``.  Perturbation kinds:

        ``n_iters`` (int, default 20)
            APGD iterations per batch (worst case).
        ``restarts`` (int, default 0)
            Extra APGD runs from random points inside the set; the per-batch
            maximum over all runs is kept (worst case).
        ``algorithm`` (str, default ``"apgd"``)
            Worst case: ``"apgd"``, the Auto-PGD of Croce and Hein (2020), or
            ``"reference"``, the iteration of the evaluator of Andriushchenko
            et al. (2023) as published, to compare with its numbers (random
            restarts then start where it does, unprojected).  See
            :doc:`/definitions` for the differences.
        ``n_samples`` (int, default 100)
            Monte-Carlo draws per batch (average case).
        ``m`` (int, optional)
            m-sharpness: each batch is split into chunks of ``m`` samples,
            each chunk perturbed on its own; the batch value averages the
            chunks (weighted by size).  ``None``: the whole batch.
        ``normalize_logits`` (bool, default False)
            Replace outputs ``z`` by ``(z - mean z) / ||z - mean z||`` per
            sample before the loss.
        ``device`` (str or torch.device, optional)
            Evaluate on this device using copies of the weights (the model
            is not moved).

        Curvature kinds take the keyword options of the function that
        measures them: ``hessian_max_eig`` those of
        :func:`flatness.hessian.top_eigenvalues` (``tol``, ``max_iter``,
        ``curvature`` ...), ``hessian_trace`` those of
        :func:`flatness.hessian.trace` (``method``, ``n_samples``, ``batch``
        ...), ``minimum`` those of :func:`flatness.hessian.minimum_sharpness`.
        They take no ``rho``.

    Returns
    -------
    SharpnessResult

    Notes
    -----
    Inside an initialized ``torch.distributed`` process group each rank
    measures its own shard and the result, the same on every rank, covers
    all ranks' batches: ``per_batch`` and ``batch_sizes`` list rank 0's
    batches first, then rank 1's, and so on.  Random draws (average case,
    restarts) use one stream per rank, rank 0's from ``seed``.  See
    :doc:`/guide/distributed`; :func:`flatness.local_only` turns this off.

    An FSDP2 (``fully_shard``) model is measured in its shards (perturbation
    kinds): the ranks' ``k``-th batches together are one batch with one
    perturbation, and the result equals one process on the concatenated
    batches (same ``seed``, same draws); see :doc:`/guide/distributed`.

    Raises
    ------
    TypeError
        An unknown option (the message suggests the closest valid name).
    ValueError
        Unknown ``kind`` (the message lists the valid ones), an option that
        does not apply to ``kind`` (``n_iters`` with ``avg_l2``, ``rho``
        with ``hessian_trace`` ...), ``rho <= 0``, empty data, a model
        without parameters, mismatched shapes.  A NaN or
        infinite loss raises :class:`NonFiniteLossError` (a ``ValueError``).

    Warns
    -----
    RuntimeWarning
        The perturbation kinds, when rounding ``w + d`` to the weights' dtype
        loses more than 10% of a typical perturbation along its direction
        (estimated from one draw; the share is in
        ``settings["rounding_loss"]``): the value is then biased toward 0.
        In bfloat16 (8 significant bits) an
        ``adaptive_linf`` radius below ``2**-9`` rounds every perturbed
        weight back to itself and the value is exactly 0.  Measure a float32
        copy (``copy.deepcopy(model).float()``) or use a larger ``rho``.

    Examples
    --------
    >>> import torch, flatness
    >>> model = torch.nn.Linear(4, 3)
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> r = flatness.sharpness(model, batch, kind="adaptive_linf", rho=2e-3)
    >>> r.value >= 0
    True
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    _check_sharpness_options(kind, rho, options)
    loss_fn = check_loss_fn(loss_fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return KINDS[kind](
        model, data, rho=rho, loss_fn=loss_fn, params=params, seed=seed,
        # (a string such as "False" from a command line would count as true)
        n_batches=n_batches, progress=check_bool("progress", progress), train=check_bool("train", train),
        **options,
    )

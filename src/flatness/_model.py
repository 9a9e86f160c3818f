"""Shared plumbing for every function that takes a model and data.

This module owns the conventions listed in ``DESIGN.md``:

* parameter selection (:func:`select_params`),
* batch handling: one ``(inputs, targets)`` batch or any iterable of them,
  moved to the parameters' device and dtype (:func:`iter_batches`,
  :func:`to_device`),
* functional evaluation of the loss at perturbed parameters without touching
  the module (:func:`functional_loss`),
* the restore guarantee: the model comes back bit for bit as it went in, also
  when the call raises (:class:`ModelGuard`),
* private randomness that leaves the global RNG untouched
  (:func:`private_rng`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "LossFn",
    "ModelGuard",
    "NonFiniteLossError",
    "ParamSet",
    "ResultMixin",
    "batch_size",
    "call_model",
    "check_bool",
    "check_int",
    "check_rho",
    "default_loss",
    "disable_running_stats",
    "functional_loss",
    "grad_enabled",
    "iter_batches",
    "maybe_progress",
    "normalize_logits",
    "private_rng",
    "require_finite",
    "select_params",
    "split_batch",
    "to_device",
    "unwrap",
]


class NonFiniteLossError(ValueError, FloatingPointError):
    """The loss (or a quantity derived from it) was NaN or infinite, so no
    meaningful measurement exists.

    Raised rather than averaged into a result; it subclasses both
    ``ValueError`` and ``FloatingPointError``.
    """


def require_finite(value: Tensor | float, what: str) -> None:
    """Raise :class:`NonFiniteLossError` naming ``what`` unless every entry
    of ``value`` is finite."""
    ok = bool(torch.isfinite(value).all()) if isinstance(value, Tensor) else math.isfinite(value)
    if not ok:
        raise NonFiniteLossError(
            f"{what} is not finite (NaN or inf): check the data and the model for NaN/inf "
            "inputs or outputs, or the loss_fn"
        )


def maybe_progress(
    iterable: Iterable[Any] | None, progress: bool, total: int | None, desc: str,
    *, unit: str = "batch",
) -> Any:
    """A tqdm bar over ``iterable`` (or, with ``iterable=None``, one to update
    by hand) when ``progress`` is true; otherwise ``iterable`` unchanged."""
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install 'flatness[progress]'") from exc
    return tqdm(iterable, total=total, desc=desc, unit=unit)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy, the default ``loss_fn`` of the library."""
    return F.cross_entropy(outputs, targets)


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


# --------------------------------------------------------------------------
# parameter selection
# --------------------------------------------------------------------------


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


def select_params(model: nn.Module, params: Iterable[Any] | None = None) -> ParamSet:
    """Resolve the ``params=`` argument of the public functions.

    Parameters
    ----------
    model : nn.Module
        The model (a DDP wrapper is looked through).
    params : iterable, optional
        ``None`` selects every parameter with ``requires_grad``.  Otherwise an
        iterable of parameter tensors of ``model``, of their names, or of
        submodules (whose trainable parameters are all selected).

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
    # remove_duplicate=True: a tied tensor appears once, under its first name.
    named = list(module.named_parameters())
    if not named:
        raise ValueError("model has no parameters")
    by_id = {id(p): n for n, p in named}
    by_name = dict(named)
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "model has no parameters with requires_grad=True; pass params= "
                "explicitly to measure with respect to frozen parameters"
            )
    else:
        if isinstance(params, (Tensor, str, nn.Module)):
            params = [params]
        wanted: dict[int, None] = {}
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"unknown parameter name {item!r}")
                wanted[id(by_name[item])] = None
            elif isinstance(item, nn.Module):
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
                    f"params= items must be tensors, names or modules, got {type(item).__name__}"
                )
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
    from flatness._distributed import refuse_sharded

    refuse_sharded(chosen, "flatness")
    names, tensors = zip(*chosen)
    return ParamSet(tuple(names), tuple(tensors))


def check_int(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> Any:
    """Validate an integer option (``bool`` is not accepted as an int)."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


def grad_enabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with autograd on, also when called inside the caller's
    ``torch.no_grad()`` or ``torch.inference_mode()``: the measurements
    differentiate internally, and a grad mode set by the caller (for its own
    evaluation code) must not change their result.  Batches created under
    ``inference_mode`` are copied by :func:`to_device`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean option: only ``True`` / ``False`` (a string such
    as ``"no"`` would otherwise count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_rho(rho: float, *, allow_zero: bool = False) -> float:
    """Validate a perturbation radius."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a number, got {type(rho).__name__}")
    rho = float(rho)
    if not torch.isfinite(torch.tensor(rho)):
        raise ValueError(f"rho must be finite, got {rho}")
    if rho < 0 or (rho == 0 and not allow_zero):
        raise ValueError(f"rho must be {'>= 0' if allow_zero else '> 0'}, got {rho}")
    return rho


# --------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------


def _is_batch(obj: Any) -> bool:
    # A batch is a pair (inputs, targets) whose targets are one tensor.  A
    # DataLoader over a TensorDataset yields lists [x, y], so lists count too;
    # a list of batches has a tuple/list as its second element, never a tensor.
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], Tensor)


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (nested in tuples, lists, dicts) to ``device``.

    Floating-point tensors are cast to ``dtype`` when given; integer tensors
    (token ids, class labels) keep theirs.
    """
    if isinstance(obj, Tensor):
        if obj.is_inference():
            # Tensors made under torch.inference_mode() cannot enter autograd;
            # a copy made outside it can (callers run with inference_mode(False)).
            with torch.inference_mode(False):
                obj = obj.clone()
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device, dtype) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device, dtype) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj


def batch_size(targets: Tensor) -> int:
    """Number of samples in a batch (the leading dimension of the targets)."""
    if targets.dim() == 0:
        raise ValueError("targets must have a batch dimension, got a 0-d tensor")
    return int(targets.shape[0])


def _leading_sizes(obj: Any) -> list[int]:
    if isinstance(obj, Tensor):
        return [int(obj.shape[0])] if obj.dim() > 0 else []
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _leading_sizes(v)]
    if isinstance(obj, (tuple, list)):
        return [s for v in obj for s in _leading_sizes(v)]
    return []


def iter_batches(
    data: Any,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    n_batches: int | None = None,
) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(inputs, targets)`` pairs on ``device``.

    ``data`` is one batch ``(inputs, targets)`` or an iterable of them.  Each
    batch is checked (targets have a batch dimension that matches the inputs'
    leading dimension, the batch is not empty) before it is yielded.  An
    iterable that yields nothing raises ``ValueError``.
    """
    if n_batches is not None and (
        isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1
    ):
        raise ValueError(f"n_batches must be a positive int or None, got {n_batches!r}")
    if _is_batch(data):
        source: Iterable[Any] = [data]
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be a batch (inputs, targets) or an iterable of such batches, "
            f"got {type(data).__name__}"
        )
    else:
        source = data
    count = 0
    for batch in source:
        if not _is_batch(batch):
            raise TypeError(
                "each batch must be a pair (inputs, targets) with targets a tensor, "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, targets = batch
        n = batch_size(targets)
        if n == 0:
            raise ValueError("empty batch (0 samples)")
        sizes = set(_leading_sizes(inputs))
        if sizes and sizes != {n}:
            raise ValueError(
                f"inputs have leading dimension(s) {sorted(sizes)} but targets have {n} samples"
            )
        yield to_device(inputs, device, dtype), to_device(targets, device, dtype)
        count += 1
        if n_batches is not None and count >= n_batches:
            break  # before pulling another item from a shared iterator
    if count == 0:
        raise ValueError("data yielded no batches")


def split_batch(inputs: Any, targets: Tensor, m: int | None) -> list[tuple[Any, Tensor]]:
    """Split a batch into chunks of ``m`` samples (``None``: the whole batch)."""
    n = batch_size(targets)
    if m is None or m >= n:
        return [(inputs, targets)]
    return [
        (_slice(inputs, start, start + m), targets[start : start + m])
        for start in range(0, n, m)
    ]


def _slice(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return type(obj)({k: _slice(v, start, stop) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_slice(v, start, stop) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, start, stop) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Tensor:
    """Call ``model`` on batch inputs: a dict is passed as keyword arguments,
    a tuple as positional arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return model(*inputs)
    return model(inputs)


def normalize_logits(z: Tensor) -> Tensor:
    """``z <- (z - mean z) / ||z - mean z||`` per sample (last dimension)."""
    if not isinstance(z, Tensor):
        raise ValueError(
            "normalize_logits=True needs a model that returns one tensor of logits, got "
            f"{type(z).__name__}; normalize inside loss_fn instead (flatness._model.normalize_logits "
            "on the selected output)"
        )
    centred = z - z.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    # A constant logit vector has no direction; leave it at zero, not NaN.
    return centred / torch.where(norm > 0, norm, torch.ones_like(norm))


_LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def reparametrized(model: nn.Module, state: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """The module with the tensors of ``state`` in place of its own, for the
    duration of the block (as ``torch.func.functional_call`` does for one
    call).

    A gradient taken *inside* the block sees the same tensors as the forward
    pass, also where the backward pass runs the forward again: activation
    checkpointing (``torch.utils.checkpoint``) recomputes a block from the
    module's tensors at backward time, which after ``functional_call`` has
    returned are the module's own again.
    """
    # torch.func.functional_call is this context around one call; the
    # context itself has no public name.
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(unwrap(model), dict(state), tie_weights=True, strict=False):
        yield unwrap(model)


def functional_loss_and_grad(
    model: nn.Module,
    params: ParamSet,
    values: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    logit_normalization: bool = False,
    extra: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """:func:`functional_loss` at ``values`` and its gradient with respect
    to them (zeros for unused values), both computed while the values are in
    the module, so activation checkpointing recomputes at ``values`` too."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    state = {**(extra or {}), **params.as_dict(leaves)}
    with torch.enable_grad(), reparametrized(model, state) as module:
        outputs = module(*_as_args(inputs), **(_as_kwargs(inputs) or {}))
        loss = _loss_of(outputs, targets, loss_fn, logit_normalization)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]


def functional_loss(
    model: nn.Module,
    params: ParamSet,
    values: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    logit_normalization: bool = False,
    extra: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Loss of ``model`` with the selected parameters replaced by ``values``.

    The module itself is not modified: ``torch.func.functional_call`` swaps
    the tensors for the duration of the forward pass only.  Outputs of a
    float16 / bfloat16 model are cast to float32 before ``loss_fn``, so the
    loss and differences of losses are not quantized to the low precision's
    step.  ``extra`` maps
    further parameter or buffer names to tensors to use instead of the
    module's (e.g. copies on another device).
    """
    module = unwrap(model)
    state = params.as_dict(values)
    if extra:
        state = {**extra, **state}
    outputs = functional_call(module, state, _as_args(inputs), _as_kwargs(inputs), strict=False)
    return _loss_of(outputs, targets, loss_fn, logit_normalization)


def _loss_of(outputs: Any, targets: Tensor, loss_fn: LossFn, logit_normalization: bool) -> Tensor:
    """``loss_fn`` on the model's outputs, as a scalar (see :func:`functional_loss`)."""
    if isinstance(outputs, Tensor) and outputs.dtype in _LOW_PRECISION:
        # The loss of a float16 / bfloat16 model in float32: in bfloat16 a
        # loss near 1 has a resolution of 0.0078, coarser than most
        # sharpness values (differences of two losses).
        outputs = outputs.float()
    if logit_normalization:
        outputs = normalize_logits(outputs)
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn must return a scalar tensor (the mean loss over the batch), "
            f"got {tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
        )
    return loss.reshape(())


def _as_args(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, Mapping):
        return ()
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return inputs
    return (inputs,)


def _as_kwargs(inputs: Any) -> dict[str, Any] | None:
    return dict(inputs) if isinstance(inputs, Mapping) else None


# --------------------------------------------------------------------------
# the restore guarantee
# --------------------------------------------------------------------------


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bits (NaNs
    and the sign of zero included, unlike ``torch.equal``)."""
    if a.dtype.is_floating_point and a.element_size() in _INT_OF_SIZE:
        kind = _INT_OF_SIZE[a.element_size()]
        return torch.equal(a.detach().view(kind), b.detach().view(kind))
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return False  # no integer view: treat as changed (it is copied back)
    return torch.equal(a, b)


class ModelGuard(contextlib.AbstractContextManager):
    """Put the model in the measurement mode and restore it on exit.

    On entry it records, for every parameter and buffer of the model, the
    tensor object, its ``requires_grad`` and ``.grad`` reference, and the
    ``training`` flag of every submodule.  On exit (normal, exception or
    ``KeyboardInterrupt``) the flags, modes and ``.grad`` references are put
    back.  Parameter values are never written by the library (it evaluates
    perturbed weights through ``functional_call``), so they need no copy;
    buffers are copied and written back in place (bit for bit, same
    storage), in eval mode too: a ``forward`` may update a counter or a
    running average in any mode, and training-mode passes update BatchNorm
    running statistics.

    Parameters
    ----------
    model : nn.Module
    train : bool
        Run the measurement in training mode (BatchNorm batch statistics,
        active dropout).  Default ``False``: eval mode.
    """

    def __init__(self, model: nn.Module, *, train: bool = False) -> None:
        self.model = model
        self.train = train

    def __enter__(self) -> ModelGuard:
        m = self.model
        self._modes = [(mod, mod.training) for mod in m.modules()]
        self._params = [(p, p.requires_grad, p.grad) for p in m.parameters()]
        # Every buffer, in every mode: forward passes may write buffers in
        # eval mode too (counters, running averages).
        self._buffers = [(b, b.detach().clone()) for b in m.buffers()]
        m.train(self.train)
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, mode in self._modes:
            mod.training = mode
        for p, req, grad in self._params:
            if p.requires_grad != req:
                p.requires_grad_(req)
            p.grad = grad
        with torch.no_grad():
            for b, saved in self._buffers:
                # only if changed: writing an untouched buffer would bump its
                # version counter and invalidate graphs kept across calls.
                # (BatchNorm's kernel updates running statistics without
                # bumping the counter, so the values are compared.)
                if not same_bits(b, saved):
                    b.copy_(saved)


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze BatchNorm running statistics inside the ``with`` block.

    SAM's second forward pass runs at the perturbed weights ``w + e``; letting
    it update ``running_mean`` / ``running_var`` / ``num_batches_tracked``
    would mix statistics of weights that are never kept.  Inside the block
    every ``BatchNorm*`` / ``SyncBatchNorm`` layer in training mode still
    normalizes with the batch statistics (the gradient is the same as
    without the block) but leaves its buffers untouched.  The flags are
    restored on exit, also after an exception.

    Parameters
    ----------
    model : nn.Module

    Examples
    --------
    >>> loss_fn(model(x), y).backward()
    >>> opt.first_step(zero_grad=True)
    >>> with disable_running_stats(model):
    ...     loss_fn(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)

    Notes
    -----
    Only ``torch.nn.modules.batchnorm._BatchNorm`` subclasses are affected
    (``InstanceNorm`` with ``track_running_stats=True`` is not).  The layers'
    ``track_running_stats`` flag is switched off for the duration of the
    block, which is what makes PyTorch skip the buffer update.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    changed = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    # torch.random.fork_rng, for the CPU and this one CUDA device only, without
    # its accelerator lookup (~10 ms per call, paid by every product)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def private_rng(seed: int | None, device: torch.device) -> Iterator[torch.Generator]:
    """A private generator seeded with ``seed``; the global RNG state is saved
    and restored, so dropout inside the measurement is reproducible from
    ``seed`` without disturbing the caller's random stream.  Inside a
    ``torch.distributed`` process group ``seed=None`` draws one seed on
    rank 0 and shares it (see :mod:`flatness._distributed`)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}")
    # Inside a process group, seed=None means one fresh seed for all ranks:
    # random vectors applied to an all-reduced operator must agree.
    from ._distributed import shared_seed

    seed = shared_seed(seed)
    with _forked_rng(device):
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
            # dropout etc. inside the forked state; the generators directly
            # (torch.manual_seed records a stack trace, ~10 ms per call, and
            # seeds every CUDA device, not only the forked one)
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                torch.cuda.default_generators[index].manual_seed(seed)
        yield gen


class ResultMixin:
    """``to_dict`` / ``to_json`` for result dataclasses (mix into a
    ``@dataclass``; override ``to_dict`` for fields JSON cannot hold)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of all fields."""
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self, path: str | None = None, *, indent: int = 2) -> str:
        """The result as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

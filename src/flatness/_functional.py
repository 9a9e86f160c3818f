"""Functional evaluation: the model's outputs and loss at given parameter
values through ``torch.func.functional_call``, without writing the module
(:func:`functional_loss`, :func:`reparametrized`), the default loss and
logit normalization."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flatness._checks import LOW_PRECISION
from flatness._params import ParamSet, unwrap

LossFn = Callable[[Tensor, Tensor], Tensor]


def check_loss_fn(loss_fn: Any) -> LossFn:
    """``loss_fn`` as given, or :func:`default_loss` for ``None``;
    ``TypeError`` for anything not callable (checked before any work)."""
    if loss_fn is None:
        return default_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn


def refuse_summed_loss_over_batches(loss_fn: Any, data: Any, what: str, n_batches: int | None = None) -> None:
    """``ValueError`` for a loss module that sums (``reduction="sum"``) or
    does not reduce (``"none"``) when ``data`` holds several batches.

    Over several batches the library weights each batch's result by its
    share of the samples, ``sum_b (n_b / N) X_b``: the quantity of the mean
    loss over all samples when ``loss_fn`` is a mean, but neither the summed
    loss's nor the mean loss's for a summed one (a loader of 4, 4, 4 samples
    gave a third of the summed loss's Hessian trace, with no warning).  Only
    losses that declare their reduction (``nn.CrossEntropyLoss`` and the
    other ``torch.nn`` losses) can be checked.
    """
    from flatness._data import _is_batch

    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("sum", "none") or _is_batch(data) or n_batches == 1:
        return
    try:
        several = len(data) > 1
    except TypeError:  # an iterable without a length: several, as far as can be told
        several = True
    if several:
        raise ValueError(
            f"{what} averages its batches weighted by their sizes, which needs a loss_fn that is a "
            f"mean over its batch; got a loss with reduction={reduction!r}.  Use reduction='mean' "
            "(and multiply by the number of samples for the summed loss), or give one batch"
        )


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy, the default ``loss_fn`` of the library.

    Outputs that are not a tensor of logits (a dict or an output object as
    Hugging Face models return, a tuple) raise ``TypeError`` saying which
    ``loss_fn`` to pass.
    """
    if not isinstance(outputs, Tensor):
        if hasattr(outputs, "logits"):
            pick = ".logits"
        elif isinstance(outputs, Mapping):
            pick = "['logits']" if "logits" in outputs else f"[{next(iter(outputs), 'KEY')!r}]"
        else:
            pick = "[0]"
        raise TypeError(
            f"the default loss_fn (mean cross-entropy) needs the model to return a tensor of logits, "
            f"got {type(outputs).__name__}; pass loss_fn= to select them, e.g. "
            f"loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out{pick}, y)"
        )
    return F.cross_entropy(outputs, targets)


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
            f"{type(z).__name__}; normalize inside loss_fn instead (flatness._functional.normalize_logits "
            "on the selected output)"
        )
    centred = z - z.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    # A constant logit vector has no direction; leave it at zero, not NaN.
    return centred / torch.where(norm > 0, norm, torch.ones_like(norm))




@contextlib.contextmanager
def dense_gradients(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``nn.Embedding`` and ``nn.EmbeddingBag`` modules
    built with ``sparse=True`` record dense gradients (the same values).

    The library differentiates its own copies of the weights and works on
    whole gradient tensors (sums, norms, steps, curvature products), which
    sparse gradients do not support; the flag only changes how the backward
    pass stores the embedding's gradient.  It is restored on exit, also
    after an exception.
    """
    sparse = [m for m in unwrap(model).modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


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
    into_values: Callable[[int, Tensor | None, Tensor], None] | None = None,
    on_loss: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """:func:`functional_loss` at ``values`` and its gradient with respect
    to them (zeros for unused values), both computed while the values are in
    the module, so activation checkpointing recomputes at ``values`` too.

    With ``into_values``, the gradients are returned in the values' own
    storage: as soon as the gradient ``g`` of ``values[i]`` is complete,
    autograd no longer needs ``values[i]``, and ``into_values(i, g, out)``
    writes the gradient (or a function of it, elementwise) into
    ``out = values[i]`` (after the backward pass, ``into_values(i, None,
    out)`` for each value the loss does not depend on).  The values and
    the gradients then never exist at once: the peak memory is one
    parameter-sized set of tensors less.  (A model that uses a value again
    after its gradient is complete, through a detached alias, fails with
    autograd's in-place modification error, never silently.)

    ``on_loss`` is called with the (detached) loss between the forward and
    the backward pass.  A loss that does not require grad (the graph is
    cut in the model or the loss) raises ``ValueError``.
    """
    leaves = [v.detach().requires_grad_(True) for v in values]
    if into_values is not None:
        for i, leaf in enumerate(leaves):
            # the hook holds a detached alias (same storage and version
            # counter), not the leaf: no reference cycle keeps it alive
            leaf.register_hook(functools.partial(_write_into, into_values, i, leaf.detach()))
    state = {**(extra or {}), **params.as_dict(leaves)}
    with torch.enable_grad(), dense_gradients(model), reparametrized(model, state) as module:
        outputs = module(*_as_args(inputs), **(_as_kwargs(inputs) or {}))
        loss = _loss_of(outputs, targets, loss_fn, logit_normalization)
        if on_loss is not None:
            on_loss(loss.detach())
        if not loss.requires_grad:
            raise ValueError(
                "the loss has no gradient with respect to the parameters: the model or loss_fn cuts the "
                "graph (.detach(), argmax, a 0-1 error, torch.no_grad() ...), and this measurement follows "
                "gradients (the average-case kinds of flatness.sharpness do not)"
            )
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    if into_values is not None:
        with torch.no_grad():
            for i, (v, g) in enumerate(zip(leaves, grads)):
                if g is None:
                    into_values(i, None, v.detach())
        return loss.detach(), [v.detach() if g is None else g for v, g in zip(leaves, grads)]
    return loss.detach(), [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]


def _write_into(fn: Callable[[int, Tensor | None, Tensor], None], i: int, out: Tensor, grad: Tensor) -> Tensor:
    """Gradient hook of :func:`functional_loss_and_grad`: the complete
    gradient of a leaf written into ``out``, the leaf's own storage."""
    with torch.no_grad():
        fn(i, grad, out)
    return out


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
    with dense_gradients(module):
        outputs = functional_call(module, state, _as_args(inputs), _as_kwargs(inputs), strict=False)
    return _loss_of(outputs, targets, loss_fn, logit_normalization)


def _loss_of(outputs: Any, targets: Tensor, loss_fn: LossFn, logit_normalization: bool) -> Tensor:
    """``loss_fn`` on the model's outputs, as a scalar (see :func:`functional_loss`)."""
    if isinstance(outputs, Tensor) and outputs.dtype in LOW_PRECISION:
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

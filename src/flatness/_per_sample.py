"""Per-sample gradients with ``torch.func``.

Every sample's gradient is the gradient of ``loss_fn`` evaluated on a batch
of one: ``g_i = grad_w loss_fn(f(x_i; w), y_i)``.  This is the gradient of the
*sample loss* only when ``loss_fn`` is a mean over the batch (the library's
default, mean cross-entropy, is); with a sum reduction a batch of one gives
the same value, with any other reduction the result is whatever ``loss_fn``
returns on one sample.

The gradients come from ``torch.func.vmap(torch.func.grad(...))`` over
:func:`flatness._model.functional_loss`, so the module is never written and
no ``.grad`` is touched.  Memory is bounded by ``chunk_size``: at most
``chunk_size`` copies of the selected parameters exist at once.

The model is evaluated in whatever mode it is in.  Callers put it in eval
mode first (:class:`flatness._model.ModelGuard`): in training mode a
BatchNorm layer normalizes each sample by its own statistics (and leaves its
running statistics alone: an in-place update cannot run under ``vmap``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from flatness._model import (
    check_int,
    disable_running_stats,
    LossFn,
    ParamSet,
    default_loss,
    functional_loss,
    iter_batches,
    split_batch,
    unwrap,
)

__all__ = ["check_chunk_size", "iter_per_sample_grads", "per_sample_grads", "per_sample_losses"]


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Validate ``chunk_size`` (a positive int, or ``None`` for no chunking)."""
    return check_int("chunk_size", chunk_size, allow_none=True)


def _add_batch_dim(obj: Any) -> Any:
    # Inside vmap each leaf has lost its batch dimension; a batch of one
    # restores it so the model and loss_fn see the shapes they expect.
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, obj)


def per_sample_grads(
    model: nn.Module,
    params: ParamSet,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn = default_loss,
    *,
    values: list[Tensor] | None = None,
    logit_normalization: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Gradients and losses of every sample of one batch.

    Parameters
    ----------
    model : nn.Module
        The model, in the mode it should be evaluated in (eval for
        BatchNorm running statistics).
    params : ParamSet
        The parameters to differentiate with respect to.
    inputs : Tensor, tuple or dict of Tensors
        Batch inputs; every tensor leaf has the batch as its first dimension.
    targets : Tensor
        Batch targets.
    loss_fn : callable
        ``loss_fn(outputs, targets)``, a mean over the batch, so that a batch
        of one gives the sample loss.
    values : list of Tensor, optional
        Parameter values to evaluate at (default: the current ones).
    logit_normalization : bool
        Normalize the logits per sample before the loss.

    Returns
    -------
    grads : list of Tensor
        One tensor per parameter, of shape ``(n, *param.shape)``, detached.
    losses : Tensor
        The ``n`` sample losses.
    """
    if values is None:
        values = params.detached()

    def sample_loss(vals: list[Tensor], x: Any, y: Tensor) -> Tensor:
        return functional_loss(
            model,
            params,
            vals,
            _add_batch_dim(x),
            _add_batch_dim(y),
            loss_fn,
            logit_normalization=logit_normalization,
        )

    # randomness="different": in training mode each sample draws its own
    # dropout mask, as it would in a loop over samples; eval mode draws none.
    fn = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")
    with disable_running_stats(unwrap(model)):
        grads, losses = fn(list(values), inputs, targets)
    return [g.detach() for g in grads], losses.detach()


def iter_per_sample_grads(
    model: nn.Module,
    params: ParamSet,
    data: Any,
    loss_fn: LossFn = default_loss,
    *,
    chunk_size: int | None = 64,
    n_batches: int | None = None,
    logit_normalization: bool = False,
) -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
    """Stream per-sample gradients over ``data`` in chunks.

    Parameters
    ----------
    model, params, loss_fn, logit_normalization
        As in :func:`per_sample_grads`.
    data
        One batch ``(inputs, targets)`` or an iterable of batches; batches are
        moved to the parameters' device and dtype.
    chunk_size : int or None
        At most this many samples are differentiated at once (``None``: a
        whole batch at once).
    n_batches : int, optional
        Stop after this many batches.

    Yields
    ------
    grads : list of Tensor
        Per-sample gradients of the chunk, one ``(c, *param.shape)`` tensor
        per parameter.
    losses : Tensor
        The ``c`` sample losses.
    targets : Tensor
        The chunk's targets (for class-wise statistics).
    """
    chunk_size = check_chunk_size(chunk_size)
    for inputs, targets in iter_batches(
        data, device=params.device, dtype=params.dtype, n_batches=n_batches
    ):
        for x, y in split_batch(inputs, targets, chunk_size):
            grads, losses = per_sample_grads(
                model, params, x, y, loss_fn, logit_normalization=logit_normalization
            )
            yield grads, losses, y



def per_sample_losses(
    model: nn.Module,
    params: ParamSet,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn = default_loss,
) -> Tensor:
    """The loss of every sample of one batch (``loss_fn`` on batches of one),
    without gradients; shape ``(n,)``."""
    values = params.detached()

    def sample_loss(x: Any, y: Tensor) -> Tensor:
        return functional_loss(model, params, values, _add_batch_dim(x), _add_batch_dim(y), loss_fn)

    with torch.no_grad(), disable_running_stats(unwrap(model)):
        return vmap(sample_loss, randomness="different")(inputs, targets)

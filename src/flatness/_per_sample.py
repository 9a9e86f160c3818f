"""Per-sample gradients with ``torch.func``.

Every sample's gradient is the gradient of ``loss_fn`` evaluated on a batch
of one: ``g_i = grad_w loss_fn(f(x_i; w), y_i)``.  This is the gradient of the
*sample loss* only when ``loss_fn`` is a mean over the batch (the library's
default, mean cross-entropy, is); with a sum reduction a batch of one gives
the same value, with any other reduction the result is whatever ``loss_fn``
returns on one sample.

The gradients come from ``torch.func.vmap(torch.func.grad(...))`` over
:func:`flatness._functional.functional_loss`, so the module is never written and
no ``.grad`` is touched.  Memory is bounded by ``chunk_size``: at most
``chunk_size`` copies of the selected parameters exist at once.

Where ``vmap`` has no batching rule (the fused recurrent kernels of
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) or cannot run the model (a forward
pass that writes a buffer in place, which ``vmap`` refuses), a plain loop
over the samples computes the same gradients: :func:`per_sample_engine`
chooses before anything runs, from the module types and a probe forward
pass on copies of the buffers, never by catching an error.

The model is evaluated in whatever mode it is in.  Callers put it in eval
mode first (:class:`flatness._guard.ModelGuard`): in training mode a
BatchNorm layer normalizes each sample by its own statistics (and leaves its
running statistics alone: an in-place update cannot run under ``vmap``).
Where one sample has no statistics to normalize by (``BatchNorm1d`` on
``(n, C)`` inputs in training mode, or without running statistics in any
mode), the model fails on a batch of one, and the error says so and names
the layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from flatness._checks import check_int
from flatness._data import _slice, iter_batches, split_batch
from flatness._functional import LossFn, default_loss, functional_loss, functional_loss_and_grad
from flatness._guard import disable_running_stats
from flatness._params import ParamSet, unwrap

__all__ = [
    "check_chunk_size",
    "iter_per_sample_grads",
    "per_sample_engine",
    "per_sample_grads",
    "per_sample_grads_choosing",
    "per_sample_losses",
]

#: The engines of per-sample gradients.
PER_SAMPLE_ENGINES = ("vmap", "loop")


def _no_batching_rule(model: nn.Module) -> list[str]:
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in unwrap(model).named_modules()
        if isinstance(m, nn.RNNBase)
    ]


def per_sample_engine(
    model: nn.Module, params: ParamSet, inputs: Any, targets: Tensor, loss_fn: LossFn = default_loss,
    *, probe: bool = True,
) -> tuple[str, str]:
    """``("vmap" | "loop", reason)`` for per-sample gradients of ``model``.

    ``"loop"`` where ``vmap`` has no batching rule (recurrent kernels) or
    where the forward pass writes a buffer in place (found by a probe forward
    pass on copies of the buffers: the module's own are not touched), and,
    with ``probe``, where ``vmap`` fails on one sample.
    """
    blocked = _no_batching_rule(model)
    if blocked:
        return "loop", "no vmap batching rule for " + ", ".join(blocked)
    from flatness._products import buffers_written_in_forward

    try:
        written = buffers_written_in_forward(model, params, _slice(inputs, 0, 1), targets[:1], loss_fn)
    except ValueError as exc:
        _refuse_batch_statistics(model, exc)
        raise
    if written:
        return "loop", "buffers written in forward: " + ", ".join(written)
    if not probe:
        return "vmap", "vmap of grad"
    try:  # a probe on one sample: kernels or hooks the transforms refuse
        per_sample_grads(model, params, _slice(inputs, 0, 1), targets[:1], loss_fn, engine="vmap")
    except (RuntimeError, NotImplementedError) as exc:
        # e.g. activation checkpointing: torch.func refuses saved-tensor hooks
        return "loop", f"vmap of grad failed on one sample ({type(exc).__name__})"
    return "vmap", "vmap of grad"


def _refuse_batch_statistics(model: nn.Module, exc: ValueError) -> None:
    """Raise a clear error for ``exc``, a failure of the model on a batch of
    one sample, where the cause is normalization by batch statistics."""
    names = [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in unwrap(model).named_modules()
        # the condition of BatchNorm's own forward: batch statistics in
        # training mode, and in eval mode without running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
    ]
    if names:
        raise ValueError(
            "per-sample gradients evaluate the loss on batches of one sample, on which "
            + ", ".join(names) + " cannot normalize: it uses the statistics of the batch (training mode, "
            "or no running statistics). Use train=False on a model with running statistics, or a "
            f"normalization per sample (LayerNorm, GroupNorm). PyTorch: {exc}"
        ) from exc


def per_sample_grads_choosing(
    model: nn.Module, params: ParamSet, inputs: Any, targets: Tensor, loss_fn: LossFn = default_loss,
) -> tuple[str, list[Tensor], Tensor]:
    """``(engine, grads, losses)``: :func:`per_sample_grads` with the engine
    chosen on this very batch.  ``vmap`` is tried on the batch itself
    instead of on a separate one-sample probe (a pass saved), and where the
    transforms refuse the model (activation checkpointing, kernels without
    batching rules) the loop computes the same gradients."""
    engine, _ = per_sample_engine(model, params, inputs, targets, loss_fn, probe=False)
    if engine == "vmap":
        try:
            return ("vmap", *per_sample_grads(model, params, inputs, targets, loss_fn, engine="vmap"))
        except (RuntimeError, NotImplementedError):
            pass  # what the one-sample probe of per_sample_engine would have found
    return ("loop", *per_sample_grads(model, params, inputs, targets, loss_fn, engine="loop"))


def _loop_grads(
    model: nn.Module, params: ParamSet, values: list[Tensor], inputs: Any, targets: Tensor,
    loss_fn: LossFn, logit_normalization: bool,
) -> tuple[list[Tensor], Tensor]:
    """Per-sample gradients by a loop of single-sample backward passes, each
    with fresh copies of the buffers."""
    module = unwrap(model)
    rows: list[list[Tensor]] = []
    losses = []
    for i in range(int(targets.shape[0])):
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        loss, grads = functional_loss_and_grad(
            model, params, values, _slice(inputs, i, i + 1), targets[i : i + 1], loss_fn,
            logit_normalization=logit_normalization, extra=buffers,
        )
        rows.append([g.detach() for g in grads])
        losses.append(loss)
    return [torch.stack([r[j] for r in rows]) for j in range(len(values))], torch.stack(losses)


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
    engine: str = "auto",
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
    engine : {"auto", "vmap", "loop"}
        ``"auto"`` asks :func:`per_sample_engine`.

    Returns
    -------
    grads : list of Tensor
        One tensor per parameter, of shape ``(n, *param.shape)``, detached.
    losses : Tensor
        The ``n`` sample losses.
    """
    if values is None:
        values = params.detached()
    if engine == "auto":
        engine = per_sample_engine(model, params, inputs, targets, loss_fn)[0]
    try:
        if engine == "loop":
            return _loop_grads(model, params, list(values), inputs, targets, loss_fn, logit_normalization)
        return _vmap_grads(model, params, list(values), inputs, targets, loss_fn, logit_normalization)
    except ValueError as exc:
        _refuse_batch_statistics(model, exc)
        raise


def _vmap_grads(
    model: nn.Module, params: ParamSet, values: list[Tensor], inputs: Any, targets: Tensor, loss_fn: LossFn,
    logit_normalization: bool,
) -> tuple[list[Tensor], Tensor]:
    """:func:`per_sample_grads` by ``vmap`` of ``grad``."""

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
    from flatness._products import curvature_kernels  # math attention: batching rules exist

    fn = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")
    with disable_running_stats(unwrap(model)), curvature_kernels():
        grads, losses = fn(values, inputs, targets)
    # contiguous: an unused parameter's gradient is an expanded zero, which
    # in-place consumers (running moments) cannot write to
    return [g.detach().contiguous() for g in grads], losses.detach()


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
    *,
    values: list[Tensor] | None = None,
) -> Tensor:
    """The loss of every sample of one batch (``loss_fn`` on batches of one),
    without gradients, at ``values`` (default: the current parameters);
    shape ``(n,)``.  Vectorized with ``vmap`` or looped, as
    :func:`per_sample_engine` decides."""
    if values is None:
        values = params.detached()
    if per_sample_engine(model, params, inputs, targets, loss_fn)[0] == "loop":
        module = unwrap(model)
        with torch.no_grad():
            return torch.stack([
                functional_loss(model, params, values, _slice(inputs, i, i + 1), targets[i : i + 1], loss_fn,
                                extra={n: b.clone() for n, b in module.named_buffers()})
                for i in range(int(targets.shape[0]))
            ])

    def sample_loss(x: Any, y: Tensor) -> Tensor:
        return functional_loss(model, params, values, _add_batch_dim(x), _add_batch_dim(y), loss_fn)

    from flatness._products import curvature_kernels

    with torch.no_grad(), disable_running_stats(unwrap(model)), curvature_kernels():
        return vmap(sample_loss, randomness="different")(inputs, targets)

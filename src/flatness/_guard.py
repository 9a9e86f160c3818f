"""The restore guarantee: the model comes back bit for bit as it went in,
also when the call raises (:class:`ModelGuard`), and BatchNorm running
statistics frozen for SAM's second pass (:func:`disable_running_stats`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

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
    running statistics.  So are the parameters the model's own forward
    pass writes (:func:`written_weights`: embeddings with ``max_norm``).
    While a model with recurrent layers is inside, cuDNN is off
    (``torch.backends.cudnn.enabled``, set back on exit): its RNN kernels
    cannot backpropagate in eval mode nor differentiate twice.  Also for a
    model on the CPU: a measurement may run a copy of it on a GPU
    (``device="cuda"``).  The fast path
    of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` is off too
    (``torch.backends.mha``, set back on exit): it runs only in passes
    without autograd and, given a ``src_key_padding_mask``, returns zeros at
    padded positions where the other path returns values, so losses taken
    under ``no_grad`` would be of another function than those with gradients.

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
        # eval mode too (counters, running averages).  And the weights of
        # embeddings with max_norm, which every forward pass renormalizes in
        # place (the rows it looks up).
        written = {id(p): p for p in written_weights(m)}
        self._buffers = [(b, b.detach().clone()) for b in (*m.buffers(), *written.values())]
        # cuDNN's recurrent kernels have no backward pass in eval mode and no
        # double backward: the native kernels run instead while measuring,
        # wherever the model is (a measurement's device= may put a copy of
        # a CPU model on a GPU)
        self._cudnn = torch.backends.cudnn.enabled
        if self._cudnn and any(isinstance(mod, nn.RNNBase) for mod in m.modules()):
            torch.backends.cudnn.enabled = False
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        m.train(self.train)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.enabled = self._cudnn
        torch.backends.mha.set_fastpath_enabled(self._fastpath)
        for mod, mode in self._modes:
            mod.training = mode
        for p, req, grad in self._params:
            if p.requires_grad != req:
                p.requires_grad_(req)
            p.grad = grad
        with torch.no_grad():  # buffers, and weights written by forward
            # only if changed: writing an untouched buffer would bump its
            # version counter and invalidate graphs kept across calls.
            # (BatchNorm's kernel updates running statistics without
            # bumping the counter, so the values are compared.)
            for (b, saved), changed in zip(self._buffers, _changed(self._buffers), strict=True):
                if changed:
                    b.copy_(saved)


#: Buffers up to this many elements are compared with one synchronization
#: for all of them (through a boolean temporary of their size); larger ones
#: one by one, without a temporary (``torch.equal``).
BATCHED_COMPARISON = 1 << 16


def _changed(pairs: list[tuple[Tensor, Tensor]]) -> list[bool]:
    """For each ``(tensor, saved copy)``, whether their bits differ
    (:func:`same_bits`).  The small ones are read back together, one
    synchronization per device: a model's BatchNorm layers hold three
    buffers each, and a GPU would otherwise wait once per buffer."""
    out = [True] * len(pairs)
    flags: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for i, (b, saved) in enumerate(pairs):
        kind = _INT_OF_SIZE.get(b.element_size()) if b.dtype.is_floating_point else b.dtype
        if (b.numel() > BATCHED_COMPARISON or b.shape != saved.shape or kind is None or b.dtype.is_complex
                or not b.is_contiguous() or not saved.is_contiguous()):
            out[i] = not same_bits(b, saved)
        elif b.numel() == 0:
            out[i] = False
        else:
            flags.setdefault(b.device, []).append((i, (b.detach().view(kind) != saved.view(kind)).any()))
    for items in flags.values():
        for (i, _), differs in zip(items, torch.stack([f for _, f in items]).tolist(), strict=True):
            out[i] = bool(differs)
    return out


def written_weights(model: nn.Module) -> list[Tensor]:
    """Parameters the model's forward pass writes in place: the weights of
    ``nn.Embedding`` / ``nn.EmbeddingBag`` modules with ``max_norm``, whose
    looked-up rows are renormalized in every forward pass."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]


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

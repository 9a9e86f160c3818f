"""Batch handling: ``data`` is one ``(inputs, targets)`` batch or any iterable
of them; batches are moved to the parameters' device and dtype
(:func:`iter_batches`, :func:`to_device`) and split into m-sharpness chunks
(:func:`split_batch`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from flatness._checks import is_int, working_dtype


def check_n_batches(n_batches: Any) -> int | None:
    """Validate ``n_batches`` (a positive int, or ``None`` for every batch);
    returns it as a Python int (NumPy integers are accepted, ``bool`` not)."""
    if n_batches is None:
        return None
    if not is_int(n_batches) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int or None, got {n_batches!r}")
    return int(n_batches)


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
        raise ValueError("targets must have a batch dimension, got a 0-d tensor (one sample of a dataset? "
                         "pass batches: a torch.utils.data.DataLoader over the dataset)")
    return int(targets.shape[0])


def _leading_sizes(obj: Any) -> list[int]:
    if isinstance(obj, Tensor):
        return [int(obj.shape[0])] if obj.dim() > 0 else []
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _leading_sizes(v)]
    if isinstance(obj, (tuple, list)):
        return [s for v in obj for s in _leading_sizes(v)]
    return []


def _batch_hint(batch: Any) -> str:
    """How to turn a common batch layout that is not a pair into one."""
    if isinstance(batch, Mapping):
        return (f" with keys {list(batch)[:5]}; make the dataset (or a collate_fn) return "
                "(inputs, targets), e.g. (b['x'], b['y']) (a dict of tensors is fine as inputs)")
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return ("; drop the extra entries (indices, weights ...), e.g. with a collate_fn or "
                "[(x, y) for x, y, *_ in loader]; several model inputs go in one tuple: ((x1, x2), y)")
    return ""


def iter_batches(
    data: Any,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    n_batches: int | None = None,
) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(inputs, targets)`` pairs on ``device``.

    Floating inputs are cast to ``dtype``; floating targets too, except that
    for a float16 / bfloat16 ``dtype`` they are cast to float32: the loss of
    such a model is taken in float32 (``_functional._loss_of``), and
    rounding the targets to the low precision first would change it
    (regression targets near 100 move by up to 0.25 in bfloat16).

    ``data`` is one batch ``(inputs, targets)`` or an iterable of them.  Each
    batch is checked (targets have a batch dimension that matches the inputs'
    leading dimension, the batch is not empty) before it is yielded.  An
    iterable that yields nothing raises ``ValueError``.
    """
    n_batches = check_n_batches(n_batches)
    target_dtype = None if dtype is None else working_dtype(dtype)
    if _is_batch(data):
        source: Iterable[Any] = [data]
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        hint = ("; a Dataset holds samples, not batches: pass torch.utils.data.DataLoader(dataset, "
                "batch_size=...)" if isinstance(data, torch.utils.data.Dataset) else "")
        raise TypeError(
            "data must be a batch (inputs, targets) or an iterable of such batches, "
            f"got {type(data).__name__}{hint}"
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
                + _batch_hint(batch)
            )
        inputs, targets = batch
        n = batch_size(targets)
        if n == 0:
            raise ValueError("empty batch (0 samples)")
        sizes = set(_leading_sizes(inputs))
        if sizes and sizes != {n}:
            raise ValueError(
                f"inputs have leading dimension(s) {sorted(sizes)} but targets have {n} samples: every "
                "input tensor is split by samples along its first dimension; a tensor shared by all "
                "samples (an attention mask of shape (T, T)) belongs in the model (build it in forward, "
                "or keep it as a buffer or attribute), not in the inputs"
            )
        yield to_device(inputs, device, dtype), to_device(targets, device, target_dtype)
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

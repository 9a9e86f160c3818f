"""Hessian- and Gauss-Newton-vector products with ``torch.func``.

Products are taken with respect to the selected parameters (a
:class:`~flatness._model.ParamSet`) of the loss evaluated through
:func:`~flatness._model.functional_loss`, so the module is never written.

* Hessian: forward-over-reverse, ``jvp(grad(loss), (w,), (v,))``; ``k``
  vectors go through one ``vmap`` call (one batched forward and backward
  pass instead of ``k``).
* Generalized Gauss-Newton (GGN) ``G = J^T H_z J``, where ``J`` is the
  Jacobian of the model outputs ``z`` with respect to the parameters and
  ``H_z`` the Hessian of ``loss_fn`` with respect to ``z``: a ``jvp`` through
  the model, a Hessian-vector product of ``loss_fn`` in output space and a
  ``vjp`` back.  It is positive semi-definite whenever ``loss_fn`` is convex
  in the outputs (cross-entropy, mean squared error).

Over several batches the operator is the size-weighted average of the
per-batch operators, ``sum_b (n_b / N) H_b``: the curvature of the mean loss
over all samples when ``loss_fn`` is a mean over its batch.  Batches are
re-streamed for every product and never held together in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from flatness._distributed import sum_
from flatness._model import ResultMixin as _BaseResult
from flatness._model import (
    check_int,
    LossFn,
    ModelGuard,
    ParamSet,
    _as_args,
    _as_kwargs,
    batch_size,
    default_loss,
    functional_loss,
    iter_batches,
    private_rng,
    require_finite,
    select_params,
    unwrap,
)

__all__ = [
    "CURVATURES",
    "CurvatureOperator",
    "ResultMixin",
    "batch_curvature_products",
    "double_backward_hvp",
]

#: The curvature matrices an operator can represent.
CURVATURES = ("hessian", "ggn")

Tangents = tuple[Tensor, ...]


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ResultMixin(_BaseResult):
    """Result dataclasses holding tensors: ``to_dict`` turns them into lists
    and leaves out the fields named in ``_skip`` (such as eigenvectors)."""

    _skip: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of the result."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in self._skip}  # type: ignore[arg-type]


def _outputs(
    model: nn.Module, ps: ParamSet, values: Sequence[Tensor], inputs: Any, extra: dict[str, Tensor]
) -> Tensor:
    state = {**extra, **ps.as_dict(values)}
    return functional_call(unwrap(model), state, _as_args(inputs), _as_kwargs(inputs), strict=False)


def _second_order(f: Any, x: Any, v: Any, reverse_over_forward: bool) -> Any:
    """Hessian of scalar ``f`` at ``x`` times ``v`` (pytrees of tensors)."""
    if reverse_over_forward:
        return grad(lambda y: jvp(f, (y,), (v,))[1])(x)
    return jvp(grad(f), (x,), (v,))[1]


def batch_curvature_products(
    model: nn.Module,
    ps: ParamSet,
    inputs: Any,
    targets: Tensor,
    tangents: Tangents,
    *,
    loss_fn: LossFn = default_loss,
    curvature: str = "hessian",
    chunk_size: int | None = None,
    reverse_over_forward: bool = False,
) -> Tangents:
    """Curvature-vector products of one batch's loss for ``k`` vectors at once.

    Parameters
    ----------
    model : nn.Module
        In the mode it should be evaluated in (the caller guards it).
    ps : ParamSet
        Parameters the curvature is taken with respect to.
    inputs, targets
        One batch, on the parameters' device.
    tangents : tuple of Tensor
        One tensor per parameter, shaped ``(k, *param.shape)``.
    curvature : {"hessian", "ggn"}
    chunk_size : int, optional
        At most this many vectors per ``vmap`` call (bounds memory).
    reverse_over_forward : bool
        Differentiate ``jvp`` with ``grad`` instead of the default
        forward-over-reverse ``jvp`` of ``grad``.  Same result; needed for
        losses whose backward formula has no forward derivative in PyTorch
        (``F.mse_loss`` with ``reduction="mean"`` raises "ZeroTensors are
        immutable" in torch 2.x).

    Returns
    -------
    tuple of Tensor
        ``C v_i`` for each of the ``k`` vectors, shaped like ``tangents``.
    """
    values = tuple(ps.detached())
    module = unwrap(model)
    # In training mode BatchNorm writes its running statistics in place.  The
    # transforms refuse to mutate a captured tensor, so every forward pass
    # gets fresh copies of the buffers (the module's own are never touched).
    buffers = dict(module.named_buffers()) if module.training else {}

    def fresh_buffers() -> dict[str, Tensor]:
        return {name: b.clone() for name, b in buffers.items()}

    if curvature == "hessian":

        def loss(vals: Tangents) -> Tensor:
            return functional_loss(
                model, ps, vals, inputs, targets, loss_fn, extra=fresh_buffers()
            )

        def product(v: Tangents) -> Tangents:
            return _second_order(loss, values, v, reverse_over_forward)

    elif curvature == "ggn":

        def out(vals: Tangents) -> Tensor:
            return _outputs(model, ps, vals, inputs, fresh_buffers())

        def out_loss(z: Tensor) -> Tensor:
            value = loss_fn(z, targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor (the mean loss over the batch)")
            return value.reshape(())

        z, pullback = vjp(out, values)

        def product(v: Tangents) -> Tangents:
            jv = jvp(out, (values,), (v,))[1]
            hjv = _second_order(out_loss, z, jv, reverse_over_forward)
            return pullback(hjv)[0]

    else:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")

    # randomness="same": a dropout layer (train=True) draws one mask for all
    # k vectors, so every vector sees the same function.
    if tangents[0].shape[0] == 1:  # one vector: skip the vmap overhead
        return tuple(o.unsqueeze(0) for o in product(tuple(t[0] for t in tangents)))
    return vmap(product, randomness="same", chunk_size=chunk_size)(tangents)


def double_backward_hvp(
    model: nn.Module,
    ps: ParamSet,
    inputs: Any,
    targets: Tensor,
    tangents: Tangents,
    *,
    loss_fn: LossFn = default_loss,
) -> Tangents:
    """Hessian-vector products by double backward, one vector at a time.

    The textbook method (Pearlmutter 1994 via reverse-over-reverse): one
    forward pass, the gradient with ``create_graph=True``, then one backward
    pass per vector.  The reference the tests and the benchmark compare
    against.
    """
    values = [p.detach().requires_grad_(True) for p in ps.params]
    with torch.enable_grad():
        loss = functional_loss(model, ps, values, inputs, targets, loss_fn)
        g = torch.autograd.grad(loss, values, create_graph=True, allow_unused=True)
        g = tuple(torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, values))
        k = tangents[0].shape[0]
        rows = []
        for i in range(k):
            vec = [t[i] for t in tangents]
            if not any(gi.requires_grad for gi in g):  # loss linear in the params
                rows.append(tuple(torch.zeros_like(v) for v in values))
                continue
            hv = torch.autograd.grad(
                g, values, grad_outputs=vec, retain_graph=i < k - 1, allow_unused=True
            )
            rows.append(tuple(torch.zeros_like(v) if h is None else h.detach() for h, v in zip(hv, values)))
    return tuple(torch.stack([r[j] for r in rows]) for j in range(len(values)))


def _is_one_shot(data: Any) -> bool:
    # A generator or iterator is exhausted after one pass; the operator needs
    # one pass per product.  A single batch (a pair) is fine.
    if isinstance(data, (tuple, list)):
        return False
    return isinstance(data, Iterable) and iter(data) is data


class CurvatureOperator:
    """The Hessian (or GGN) of the loss of ``model`` on ``data`` as a linear
    operator on flat parameter vectors.

    Parameters
    ----------
    model : nn.Module
        The network.  Each product runs under
        :class:`~flatness._model.ModelGuard`, so the model is in eval mode
        (unless ``train=True``) only while a product runs and comes back
        unchanged after each.
    data : batch or re-iterable of batches
        One batch or a list / ``DataLoader`` of batches; re-streamed for every
        product.  With several batches the operator is the size-weighted
        average of the per-batch operators.  A ``DataLoader`` should not
        shuffle when ``n_batches`` is given (each product would see other
        batches).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``, the mean loss of a batch.  Default:
        mean cross-entropy.
    params : iterable, optional
        Parameters (tensors, names or modules).  Default: all with
        ``requires_grad``.
    curvature : {"hessian", "ggn"}
        The Hessian, or the generalized Gauss-Newton matrix (positive
        semi-definite for losses convex in the outputs).
    n_batches : int, optional
        Use only the first ``n_batches`` batches.
    train : bool
        Evaluate in training mode (BatchNorm batch statistics, dropout on with
        the same masks in every product, drawn from ``seed``).
    chunk_size : int, optional
        At most this many vectors per ``vmap`` call.
    seed : int
        Seed of dropout masks when ``train=True``.

    Attributes
    ----------
    shape : tuple of int
        ``(n, n)`` with ``n`` the number of selected scalar parameters.
    dtype, device
        Those of the parameters.
    n_hvp : int
        Number of operator-vector products computed so far (each one a pass
        over all batches).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        loss_fn: LossFn | None = None,
        params: Iterable[Any] | None = None,
        curvature: str = "hessian",
        n_batches: int | None = None,
        train: bool = False,
        chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
        if loss_fn is None:
            loss_fn = default_loss
        elif not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_int("chunk_size", chunk_size, allow_none=True)
        if _is_one_shot(data):
            raise TypeError(
                "data must be one batch or a re-iterable collection of batches (a list or a "
                "DataLoader): every product streams the batches again, and an iterator or "
                "generator is exhausted after one pass"
            )
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.params = select_params(model, params)
        self.curvature = curvature
        self.n_batches = n_batches
        self.train = bool(train)
        self.chunk_size = chunk_size
        self.seed = seed
        n = self.params.numel
        self.shape = (n, n)
        self.n_hvp = 0
        self._reverse_over_forward = False
        self.progress: Any = None  # a tqdm bar updated per product, set by callers

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    # -- conversions between flat vectors and parameter-shaped tensors -------

    def unflatten(self, flat: Tensor) -> Tangents:
        """Split ``(n,)`` or ``(n, k)`` flat vectors into parameter-shaped
        tensors (``(k, *shape)`` for the latter)."""
        cols = flat.dim() == 2
        out = []
        offset = 0
        for p in self.params.params:
            piece = flat[offset : offset + p.numel()]
            offset += p.numel()
            out.append(piece.T.reshape(flat.shape[1], *p.shape) if cols else piece.reshape(p.shape))
        return tuple(out)

    def flatten(self, tensors: Sequence[Tensor], *, batched: bool = False) -> Tensor:
        """Inverse of :meth:`unflatten`: ``(n,)``, or ``(n, k)`` if ``batched``."""
        if batched:
            return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1).T
        return torch.cat([t.reshape(-1) for t in tensors])

    # -- products ------------------------------------------------------------

    def apply(self, tangents: Tangents) -> Tangents:
        """Products with parameter-shaped tangents ``(k, *param.shape)``."""
        k = int(tangents[0].shape[0])
        ps = self.params
        total = 0
        acc: list[Tensor] | None = None
        # no_grad: parameters outside the selection must not record a graph
        # (torch.func transforms differentiate regardless of the outer mode).
        with ModelGuard(self.model, train=self.train), private_rng(self.seed, ps.device), torch.no_grad():
            for inputs, targets in iter_batches(
                self.data, device=ps.device, dtype=ps.dtype, n_batches=self.n_batches
            ):
                nb = batch_size(targets)
                out = self._batch(inputs, targets, tangents)
                if acc is None:
                    acc = [o * nb for o in out]
                else:
                    for a, o in zip(acc, out):
                        a.add_(o, alpha=nb)
                total += nb
        assert acc is not None  # iter_batches raises on empty data
        # Inside a torch.distributed process group: the average over every
        # rank's batches (acc summed in place; no-op otherwise).
        total = sum_(*acc, total)[-1]
        for a in acc:  # a NaN/inf would poison Lanczos and every estimate
            require_finite(a, "a curvature-vector product (Hessian or GGN times a vector)")
        self.n_hvp += k
        if self.progress is not None:
            self.progress.update(k)
        return tuple(a / total for a in acc)

    def _batch(self, inputs: Any, targets: Tensor, tangents: Tangents) -> Tangents:
        def run() -> Tangents:
            return batch_curvature_products(
                self.model, self.params, inputs, targets, tangents, loss_fn=self.loss_fn,
                curvature=self.curvature, chunk_size=self.chunk_size,
                reverse_over_forward=self._reverse_over_forward,
            )

        try:
            return run()
        except RuntimeError as exc:
            # PyTorch lacks forward derivatives of some backward formulas
            # (mse_loss with mean reduction): switch the order for good.
            if self._reverse_over_forward or "ZeroTensor" not in str(exc):
                raise
            self._reverse_over_forward = True
            return run()

    def matmat(self, V: Tensor) -> Tensor:
        """``C V`` for flat vectors as the columns of ``V`` (shape ``(n, k)``).

        ``V`` may have any floating dtype; the product is computed in the
        parameters' dtype and returned in ``V``'s dtype.
        """
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        out = self.apply(self.unflatten(V.to(device=self.device, dtype=self.dtype)))
        return self.flatten(out, batched=True).to(device=V.device, dtype=V.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for one flat vector of shape ``(n,)``."""
        if v.dim() != 1:
            raise ValueError(f"expected a vector of shape ({self.shape[0]},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out),
        e.g. for ``scipy.sparse.linalg.eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mm(x: Any) -> Any:
            X = torch.as_tensor(x, dtype=torch.float64)
            one = X.dim() == 1
            Y = self.matmat(X[:, None] if one else X)
            Y = Y.detach().cpu().numpy()
            return Y[:, 0] if one else Y

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype="float64")

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator(curvature={self.curvature!r}, shape={self.shape}, "
            f"dtype={self.dtype}, device={self.device})"
        )

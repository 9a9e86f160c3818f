"""Hessian- and Gauss-Newton-vector products: two engines, one chosen up front.

Products are taken with respect to the selected parameters (a
:class:`~flatness._params.ParamSet`) of the loss evaluated through
:func:`~flatness._functional.functional_loss`, so the module is never written.

* Hessian: forward-over-reverse, ``jvp(grad(loss), (w,), (v,))``; ``k``
  vectors go through one ``vmap`` call (one batched forward and backward
  pass instead of ``k``).  One vector takes the same order without
  ``torch.func``: the loss at dual tensors and one backward pass that keeps
  each parameter's tangent and drops its gradient
  (:func:`~flatness._products.forward_over_reverse_hvp`), so no gradient
  is held beside the product; where a probe on two samples does not match
  double backward (kernels without plain forward-mode formulas), it is
  ``jvp(grad)``.  The reverse-over-forward ``grad(jvp(loss))`` is not used:
  torch differentiates the forward-mode formulas of ``layer_norm``,
  ``batch_norm`` (training) and ``instance_norm`` wrongly.
* Generalized Gauss-Newton (GGN) ``G = J^T H_z J``, where ``J`` is the
  Jacobian of the model outputs ``z`` with respect to the parameters and
  ``H_z`` the Hessian of ``loss_fn`` with respect to ``z``: a ``jvp`` through
  the model, a Hessian-vector product of ``loss_fn`` in output space and a
  ``vjp`` back.  It is positive semi-definite whenever ``loss_fn`` is convex
  in the outputs (cross-entropy, mean squared error).

Two engines compute the products (:data:`ENGINES`):

* ``"forward-over-reverse"``: the ``torch.func`` transforms above, ``k``
  vectors per ``vmap`` call.
* ``"double-backward"``: reverse-over-reverse (Pearlmutter 1994), one
  ``create_graph`` gradient and one backward pass per vector.  With one
  batch (or a few) the gradient's graph is kept and reused by every later
  product, as PyHessian and hessian-eigenthings do, so a product costs one
  backward pass and no forward pass.

:func:`choose_engine` picks one before any product runs, from the module
types (recurrent kernels and parametrizations have no forward-mode
derivatives in PyTorch), a probe forward pass that looks for buffers written
in ``forward`` (``torch.func`` refuses in-place writes to captured tensors),
a probe forward-mode product on two samples, and the cost (with a kept graph
double backward is cheaper per product).  Attention runs on the math SDPA
kernel and without the fused ``nn.MultiheadAttention`` fast path inside
every curvature computation (:func:`curvature_kernels`): the fused kernels
have neither forward-mode derivatives nor double backward.

Over several batches the operator is the size-weighted average of the
per-batch operators, ``sum_b (n_b / N) H_b``: the curvature of the mean loss
over all samples when ``loss_fn`` is a mean over its batch.  Batches are
re-streamed for every product (unless their graphs are kept) and never held
together in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatness._checks import check_int, require_finite
from flatness._data import batch_size, check_n_batches, iter_batches
from flatness._distributed import enabled, sum_
from flatness._functional import LossFn, check_loss_fn, refuse_summed_loss_over_batches
from flatness._guard import ModelGuard
from flatness._params import select_params, uncompiled, unwrap
from flatness._products import (
    CURVATURES,
    KeptGraph,
    Tangents,
    batch_curvature_products,
    buffers_written_in_forward,
    curvature_kernels,
    dual_hvp_agrees,
    flushed_denormals,
    modules_without_second_derivatives,
    reverse_only_modules,
)
from flatness._rng import check_seed, private_rng

__all__ = ["ENGINES", "CurvatureOperator"]

#: The engines that compute curvature-vector products ("auto" chooses).
ENGINES = ("auto", "forward-over-reverse", "double-backward")

#: Graphs of at most this many batches are kept between products.
MAX_KEPT_BATCHES = 4

#: "auto" uses forward-over-reverse only for at least this many vectors per
#: pass: below it one double-backward product per vector is cheaper, as
#: measured by benchmarks/bench_hessian.py on CPU (MLP, CNN): with graphs
#: rebuilt for every product (many batches) ...
FORWARD_MIN_K = 8
#: ... and with a kept graph (one batch or a few).
FORWARD_MIN_K_KEPT = 32


def _into_columns(products: list[Tensor | None], out: Tensor) -> Tensor:
    """The ``k`` parameter-shaped products ``(k, *shape)`` as the columns of
    ``out.T``, for ``out`` of shape ``(k, n)`` (stored column after column, so
    the result unflattens into views).  Each product is copied into place
    (unless it is there already) and released (``products`` is emptied), so
    the products and the matrix coexist for one parameter only, instead of a
    concatenated copy and a converted one beside them."""
    k = out.shape[0]
    offset = 0
    for j, p in enumerate(products):
        assert p is not None
        m = p[0].numel()
        target = out[:, offset : offset + m]
        if p.data_ptr() != target.data_ptr():
            target.copy_(p.reshape(k, m))
        offset += m
        products[j] = p = None
    return out.T


def _scaled(first: tuple[int, Tangents], out: Callable[[], Tangents] | None) -> list[Tensor]:
    """``n_b C_b v`` of the first batch, formed in ``out()`` when given
    (which may hold the products already: the double-backward engine
    writes them there)."""
    nb, prod = first
    if out is None:
        return [o * nb for o in prod]
    target = list(out())
    for a, o in zip(target, prod):
        torch.mul(o, nb, out=a)
    return target


def _kept_products(g: KeptGraph, tangents: Tangents, out: Tangents | None, forms: bool) -> Tangents:
    """A kept graph's products, or their quadratic forms."""
    return g.forms(tangents) if forms else g.products(tangents, out)


def _forms_of(tangents: Tangents, products: Tangents) -> Tangents:
    """``v_i . C v_i`` (float64, ``(k,)``) from computed products."""
    k = int(tangents[0].shape[0])
    out = torch.zeros(k, dtype=torch.float64, device=tangents[0].device)
    for t, p in zip(tangents, products):
        out += (t.reshape(k, -1) * p.reshape(k, -1)).sum(1, dtype=torch.float64)
    return (out,)


def check_real_floating(t: Tensor, what: str) -> None:
    """Refuse vectors that are not real floating point: an integer or bool
    vector would be cast to the parameters' dtype and its product cast back
    (truncated to integers), a complex one would lose its imaginary part."""
    if not t.is_floating_point():
        hint = (": the curvature of a real loss acts on real vectors, so multiply the real and imaginary "
                "parts separately" if t.is_complex() else ": convert it with .to(torch.float64) or the "
                "parameters' dtype")
        raise TypeError(f"{what} must be a real floating-point tensor, got dtype {t.dtype}{hint}")


def _is_one_shot(data: Any) -> bool:
    # A generator or iterator is exhausted after one pass; the operator needs
    # one pass per product.  A single batch (a pair) is fine.  No iter(data)
    # here: on a shuffling DataLoader it would draw from the global RNG (and
    # start worker processes) outside the private generator.
    return isinstance(data, Iterator)



class CurvatureOperator:
    """The Hessian (or GGN) of the loss of ``model`` on ``data`` as a linear
    operator on flat parameter vectors.

    Parameters
    ----------
    model : nn.Module
        The network.  Each product runs under
        :class:`~flatness._guard.ModelGuard`, so the model is in eval mode
        (unless ``train=True``) only while a product runs and comes back
        unchanged after each.  Products see the parameters' current values
        (changed in place, e.g. by an optimizer step); a parameter replaced
        by another tensor after construction raises ``RuntimeError``.
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
        Parameters (tensors, names, modules or ``(name, tensor)`` pairs).
        Default: all with ``requires_grad``.
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
    engine : {"auto", "forward-over-reverse", "double-backward"}
        How products are computed (see :mod:`flatness._hvp`).  ``"auto"``
        chooses before the first product, from the module types, a probe
        forward pass and the cost; :attr:`engine` and :attr:`engine_reason`
        tell what was chosen and why.
    progress : ProductBar, optional
        Anything with ``update(k)``, called with the number of products
        after each pass (a :class:`ProductBar`).  Default: none.
    reduce : callable or None
        How the products of this rank's batches are summed with those of
        other ranks: ``reduce(*tensors, count)`` sums in place and returns
        the values, as :func:`flatness._distributed.sum_` (the default:
        every rank of the default ``torch.distributed`` process group when
        one is initialized, outside :func:`flatness.local_only`).  ``None``:
        this rank's batches only.

    Attributes
    ----------
    shape : tuple of int
        ``(n, n)`` with ``n`` the number of selected scalar parameters.
    dtype, device
        Those of the parameters.
    n_hvp : int
        Number of operator-vector products computed so far (each one a pass
        over all batches).
    engine : str or None
        The engine in use (``None`` before the first product).
    engine_reason : str
        Why that engine was chosen.
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
        engine: str = "auto",
        progress: Any = None,
        reduce: Callable[..., Any] | None = sum_,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
        loss_fn = check_loss_fn(loss_fn)
        chunk_size = check_int("chunk_size", chunk_size, allow_none=True)
        seed = check_seed(seed)
        n_batches = check_n_batches(n_batches)
        refuse_summed_loss_over_batches(loss_fn, data, "the curvature over several batches", n_batches)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {type(train).__name__}")
        if progress is not None and not callable(getattr(progress, "update", None)):
            raise TypeError(f"progress must have an update(k) method, got {type(progress).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable or None, got {type(reduce).__name__}")
        if _is_one_shot(data):
            raise TypeError(
                "data must be one batch or a re-iterable collection of batches (a list or a "
                "DataLoader): every product streams the batches again, and an iterator or "
                "generator is exhausted after one pass"
            )
        # a torch.compile'd model: its products through the module it wraps
        # (torch.compile has no double backward), the parameters selected by
        # the caller's names
        self.model, self.params = uncompiled(model, select_params(model, params))
        self.data = data
        self.loss_fn = loss_fn
        no_second = modules_without_second_derivatives(self.model, self.params)
        if no_second:
            raise ValueError(
                "curvature products need second derivatives, which PyTorch does not implement through "
                + "; ".join(no_second) + ": leave its parameters out with params=, or compute the bag with "
                "nn.Embedding and a sum or mean over the bag"
            )
        self.curvature = curvature
        self.n_batches = n_batches
        self.train = bool(train)
        self.chunk_size = chunk_size
        self.seed = seed
        n = self.params.numel
        self.shape = (n, n)
        self.n_hvp = 0
        if engine == "forward-over-reverse":
            blocked = reverse_only_modules(self.model)
            if blocked:
                raise ValueError(
                    "engine='forward-over-reverse' cannot differentiate these modules: "
                    + "; ".join(blocked) + "; use engine='double-backward' or 'auto'"
                )
        self._requested = engine
        self.engine: str | None = None if engine == "auto" else engine
        self.engine_reason = "" if engine == "auto" else "requested"
        self._kept: list[tuple[int, KeptGraph]] | None = None
        self._kept_key: Any = None
        # forward-over-reverse: whether one vector runs without torch.func
        # (None: not probed yet), and which requested-engine checks ran
        self._dual: bool | None = None
        self._buffers_checked = False
        self._kernels_probed = False
        self.progress = progress
        self.reduce = reduce

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

    def apply(self, tangents: Tangents, out: Callable[[], Tangents] | None = None, *, forms: bool = False) -> Tangents:
        """Products with parameter-shaped tangents ``(k, *param.shape)``.

        ``out``, called at most once, returns tensors shaped like
        ``tangents`` that may receive the products of the first batch (the
        double-backward engine writes them in place, allocating nothing
        beside them); the returned tensors hold the result either way.
        With ``forms=True`` the result is instead the one-element tuple of
        the quadratic forms ``v_i . C v_i`` (float64, shape ``(k,)``): the
        double-backward engine then never holds a product vector."""
        self._check_current()
        k = int(tangents[0].shape[0])
        ps = self.params
        if forms:
            out = None
        # Grad mode is the library's business: products work the same inside
        # the caller's no_grad() or inference_mode().  no_grad for the
        # transforms: parameters outside the selection must not record a
        # graph (torch.func differentiates regardless of the outer mode).
        if self._kept is not None and self._kept_key == self._state_key():
            # No forward pass: backward passes through the kept graphs only,
            # which touch neither the module nor the RNG.
            with torch.inference_mode(False), torch.no_grad(), curvature_kernels(), flushed_denormals():
                total, acc = self._accumulate(
                    ((nb, _kept_products(g, tangents, out() if i == 0 and out else None, forms))
                     for i, (nb, g) in enumerate(self._kept)), out,
                )
            return self._finish(k, total, acc)
        with ModelGuard(self.model, train=self.train), torch.inference_mode(False), torch.no_grad(), \
                curvature_kernels(), flushed_denormals():
            if self.engine is None:
                with private_rng(self.seed, ps.device):
                    self.engine, self.engine_reason = self._choose(k)
                self._kernels_probed = self.engine == "forward-over-reverse"
            if self.engine == "forward-over-reverse":
                with private_rng(self.seed, ps.device):
                    self._check_forward(k, tangents)
            with private_rng(self.seed, ps.device):
                if self.engine == "double-backward":
                    total, acc = self._double_backward(tangents, out, forms)
                else:
                    total, acc = self._accumulate(
                        ((nb, _forms_of(tangents, self._batch(inputs, targets, tangents)) if forms
                          else self._batch(inputs, targets, tangents))
                         for nb, inputs, targets in self._batches()),
                        out,
                    )
        return self._finish(k, total, acc)

    def _finish(self, k: int, total: int, acc: list[Tensor]) -> Tangents:
        # Inside a torch.distributed process group: the average over every
        # rank's batches (acc summed in place; no-op otherwise).
        if self.reduce is not None:
            total = self.reduce(*acc, total)[-1]
        # a NaN/inf would poison Lanczos and every estimate (one check, one
        # synchronization with a GPU, for all tensors)
        require_finite(acc, "a curvature-vector product (Hessian or GGN times a vector)")
        self.n_hvp += k
        if self.progress is not None:
            self.progress.update(k)
        if total != 1:  # acc is the operator's own sum here: divided in place, no second copy
            for a in acc:
                a.div_(total)
        return tuple(acc)

    def _batches(self) -> Iterator[tuple[int, Any, Tensor]]:
        ps = self.params
        for inputs, targets in iter_batches(self.data, device=ps.device, dtype=ps.dtype, n_batches=self.n_batches):
            yield batch_size(targets), inputs, targets

    def _reduces(self) -> bool:
        """Whether :meth:`_finish` will sum the products over ranks."""
        return self.reduce is not None and (self.reduce is not sum_ or enabled())

    def _accumulate(
        self, products: Iterable[tuple[int, Tangents]], out: Callable[[], Tangents] | None = None
    ) -> tuple[int, list[Tensor]]:
        """``(N, sum_b n_b C_b v)``; with one batch ``(1, C v)`` (no copy).
        The sum is formed in ``out()`` when given (one set of products
        fewer than a separate sum)."""
        total, acc, first = 0, None, None
        for nb, prod in products:
            if first is None:
                first = (nb, prod)
            else:
                if acc is None:
                    acc = _scaled(first, out)
                    first = (first[0], ())  # the first batch's products live on in acc only
                for a, o in zip(acc, prod):
                    a.add_(o, alpha=nb)
            total += nb
            del prod
        assert first is not None  # iter_batches raises on empty data
        if acc is None:
            if not self._reduces():  # one batch: C v itself
                return 1, list(first[1])
            acc = _scaled(first, out)  # ranks are weighted by their sizes
        return total, acc

    def _check_current(self) -> None:
        """Refuse to compute with parameters the model no longer holds: the
        operator differentiates the tensors selected at construction, so a
        parameter replaced since (``module.weight = nn.Parameter(...)``,
        ``load_state_dict(..., assign=True)``) would silently give the
        curvature at the old values.  Values changed in place are fine."""
        now = dict(unwrap(self.model).named_parameters(remove_duplicate=False))
        for name, p in zip(self.params.names, self.params.params):
            if now.get(name) is not p:
                raise RuntimeError(
                    f"parameter {name!r} of the model was replaced (or removed) after this CurvatureOperator "
                    "was created, which would compute with the old tensor; create a new CurvatureOperator "
                    "(values changed in place, e.g. by an optimizer step, are seen without one)"
                )

    def _state_key(self) -> tuple[Any, ...]:
        # Kept graphs hold the values the parameters and buffers had when
        # they were built: any in-place change since invalidates them.
        module = unwrap(self.model)
        return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))

    def _double_backward(
        self, tangents: Tangents, out: Callable[[], Tangents] | None = None, forms: bool = False
    ) -> tuple[int, list[Tensor]]:
        if self._kept is not None and self._kept_key == self._state_key():
            return self._accumulate(
                ((nb, _kept_products(g, tangents, out() if i == 0 and out else None, forms))
                 for i, (nb, g) in enumerate(self._kept)), out,
            )
        self._kept = None
        keep = self._keeps_graph()
        kept: list[tuple[int, KeptGraph]] = []

        def run() -> Iterator[tuple[int, Tangents]]:
            for i, (nb, inputs, targets) in enumerate(self._batches()):
                g = KeptGraph(self.model, self.params, inputs, targets, self.loss_fn, self.curvature)
                if keep:
                    kept.append((nb, g))
                yield nb, _kept_products(g, tangents, out() if i == 0 and out else None, forms)
                del g  # a graph that is not kept goes before the next batch's is built

        result = self._accumulate(run(), out)
        if keep:
            self._kept, self._kept_key = kept, self._state_key()
        return result

    def _keeps_graph(self) -> bool:
        """Whether the data is one batch or a few (a list), whose graphs are
        kept between products instead of being rebuilt for each."""
        from flatness._data import _is_batch

        if _is_batch(self.data):
            return True
        if isinstance(self.data, (list, tuple)):
            n = len(self.data) if self.n_batches is None else min(len(self.data), self.n_batches)
            return n <= MAX_KEPT_BATCHES
        return False

    def _choose(self, k: int) -> tuple[str, str]:
        """The engine for this operator, decided before any product runs."""
        blocked = reverse_only_modules(self.model)
        if blocked:
            return "double-backward", "no forward-mode derivative in " + "; ".join(blocked)
        _, inputs, targets = next(iter(self._batches()))
        written = buffers_written_in_forward(self.model, self.params, inputs, targets, self.loss_fn)
        if written:
            return "double-backward", "buffers written in forward: " + ", ".join(written)
        if self._keeps_graph() and k < FORWARD_MIN_K_KEPT:
            return "double-backward", (
                f"one batch (or a few) and {k} vector(s) per pass: the gradient's graph is kept, "
                "one backward per product"
            )
        if k < FORWARD_MIN_K:
            return "double-backward", f"{k} vector(s) per pass: double backward is cheaper below {FORWARD_MIN_K}"
        attention = [name or "<root>" for name, m in unwrap(self.model).named_modules()
                     if isinstance(m, nn.MultiheadAttention)]
        if attention:
            # vmap over the math attention kernel costs more than k backward
            # passes (measured in benchmarks/bench_hessian.py)
            return "double-backward", "attention modules (" + ", ".join(attention) + ")"
        exc = self._forward_probe(inputs, targets, k)
        if exc is not None:
            return "double-backward", f"forward-mode probe failed ({type(exc).__name__})"
        return "forward-over-reverse", f"{k} vectors per pass over several batches: vmapped jvp of grad"

    def _forward_probe(self, inputs: Any, targets: Tensor, k: int) -> Exception | None:
        """A forward-over-reverse product on two samples: the error it
        raises, or ``None``.  Some kernels (GroupNorm on channels_last
        tensors, fused losses) lack forward-mode formulas that the module
        types do not show."""
        x1, y1 = _probe_batch(inputs, targets)
        # one stored number per parameter tensor, broadcast (no parameter-sized vector)
        probe = tuple(torch.ones((), dtype=p.dtype, device=p.device).expand(1, *p.shape) for p in self.params.params)
        try:
            # the kernel that ``k`` vectors per pass will run
            batch_curvature_products(self.model, self.params, x1, y1, probe, loss_fn=self.loss_fn,
                                     curvature=self.curvature)
        except (RuntimeError, NotImplementedError) as exc:
            return exc
        return None

    def _check_forward(self, k: int, tangents: Tangents) -> None:
        """Before products on the forward-over-reverse engine: for one
        Hessian-vector product, whether it can run without ``torch.func``
        (decided once, on two samples with the caller's vector); for a
        requested engine, its refusals (see
        :meth:`_check_requested_forward`), each run once."""
        one_dual = k == 1 and self.curvature == "hessian"
        requested = self._requested == "forward-over-reverse"
        buffers_due = requested and not self._buffers_checked
        dual_due = one_dual and self._dual is None
        # the torch.func kernels' probe, unless this product runs without them
        kernels_due = requested and not self._kernels_probed and not (one_dual and self._dual)
        if not (buffers_due or dual_due or kernels_due):
            return
        _, inputs, targets = next(iter(self._batches()))
        if buffers_due:
            self._refuse_written_buffers(inputs, targets)
            self._buffers_checked = True
        if dual_due:
            self._dual = dual_hvp_agrees(self.model, self.params, *_probe_batch(inputs, targets),
                                         [t[0] for t in tangents], loss_fn=self.loss_fn)
        if one_dual and self._dual:  # the torch.func kernels do not run for this product
            if self.engine_reason == "requested":
                self.engine_reason = "requested (probe passed)"
            return
        if requested and not self._kernels_probed:
            self._check_requested_forward(k, inputs, targets)
            self._kernels_probed = True
            self.engine_reason = "requested (probe passed)"

    def _refuse_written_buffers(self, inputs: Any, targets: Tensor) -> None:
        """Refuse a requested forward-over-reverse engine on a model that
        writes buffers in ``forward`` (the vmapped transforms cannot write
        them)."""
        written = buffers_written_in_forward(self.model, self.params, inputs, targets, self.loss_fn)
        if written:
            raise ValueError(
                "engine='forward-over-reverse' cannot run a model that writes buffers in forward ("
                + ", ".join(written) + "); use engine='double-backward' or 'auto'"
            )

    def _check_requested_forward(self, k: int, inputs: Any, targets: Tensor) -> None:
        """Refuse a requested forward-over-reverse engine, before the first
        product through ``torch.func``, where a kernel has no forward-mode
        formula (found by the probe product)."""
        exc = self._forward_probe(inputs, targets, k)
        if exc is not None:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ValueError(
                "engine='forward-over-reverse' failed on a probe product of two samples: a kernel of "
                f"this model has no forward-mode derivative ({type(exc).__name__}: {first}); "
                "use engine='double-backward' or 'auto'"
            )

    def _batch(self, inputs: Any, targets: Tensor, tangents: Tangents) -> Tangents:
        return batch_curvature_products(
            self.model, self.params, inputs, targets, tangents, loss_fn=self.loss_fn,
            curvature=self.curvature, chunk_size=self.chunk_size, dual=bool(self._dual),
        )

    def prepare(self, k: int = 1) -> None:
        """Choose the engine for ``k`` vectors per pass and, where the
        double-backward engine keeps the gradient's graphs (one batch or a
        few), build them now.

        Called before the caller allocates its vectors, the construction's
        own peak (the whole gradient beside its graph, and the backward
        pass's temporaries) does not add to theirs; later products only
        run backward passes through the kept graphs.  Optional: the first
        product does the same otherwise.
        """
        self._check_current()
        if self._kept is not None and self._kept_key == self._state_key():
            return
        ps = self.params
        with ModelGuard(self.model, train=self.train), torch.inference_mode(False), torch.no_grad(), \
                curvature_kernels(), flushed_denormals():
            if self.engine is None:
                with private_rng(self.seed, ps.device):
                    self.engine, self.engine_reason = self._choose(k)
            if self.engine != "double-backward" or not self._keeps_graph():
                return
            self._kept = None
            # the same private generator state as the first product's own
            # forward pass would see (dropout masks with train=True)
            with private_rng(self.seed, ps.device):
                kept = [(nb, KeptGraph(self.model, self.params, inputs, targets, self.loss_fn, self.curvature))
                        for nb, inputs, targets in self._batches()]
            self._kept, self._kept_key = kept, self._state_key()

    def matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """``C V`` for flat vectors as the columns of ``V`` (shape ``(n, k)``).

        ``V`` may have any real floating dtype (another dtype raises
        ``TypeError``); the product is computed in the parameters' dtype
        and returned in ``V``'s dtype.  ``out``, of
        ``V``'s shape and dtype with its columns stored one after another
        (the transpose of a contiguous ``(k, n)`` tensor, as the library's
        estimators store vectors), receives the result: the double-backward
        engine writes the products there directly.
        """
        check_real_floating(V, "V")
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        # The columns unflatten into views (no copy of the k vectors); stored
        # one after another, as the library's estimators store them, each
        # vector's pieces are contiguous.
        k, n = V.shape[1], V.shape[0]
        made: list[Tensor] = []
        if out is not None:
            if out.shape != V.shape or out.dtype != V.dtype or out.device != V.device:
                raise ValueError(f"out must match V's shape, dtype and device, got {tuple(out.shape)} {out.dtype}")
            if not out.T.is_contiguous():
                return out.copy_(self.matmat(V))
            made.append(out.T)

        def result() -> Tensor:
            if not made:
                made.append(torch.empty(k, n, dtype=V.dtype, device=V.device))
            return made[0]

        def direct() -> Tangents:  # the double-backward engine writes the products there
            return self.unflatten(result().T)

        same = (V.dtype, V.device) == (self.dtype, self.device)
        products = list(self.apply(self.unflatten(V.to(device=self.device, dtype=self.dtype)),
                                   out=direct if same else None))
        return _into_columns(products, result())

    def matvec_update(self, v: Tensor, out: Tensor, beta: float) -> Tensor:
        """``out <- C v + beta * out`` in place, for flat vectors of shape
        ``(n,)``; returns ``out``.

        With one batch of data on the double-backward engine (the gradient's
        graph kept) and vectors in the parameters' dtype, each parameter's
        product is added to ``out`` as the backward pass forms it, so no
        product vector exists beside ``out`` (what the three-term Lanczos
        recurrence needs: ``A q_j - beta q_{j-1}`` in the buffer of
        ``q_{j-1}``).  Otherwise the product is formed and added.
        """
        n = self.shape[0]
        check_real_floating(v, "v")
        check_real_floating(out, "out")
        if v.shape != (n,) or out.shape != (n,):
            raise ValueError(f"expected vectors of shape ({n},), got {tuple(v.shape)} and {tuple(out.shape)}")
        same = {(v.dtype, v.device), (out.dtype, out.device)} == {(self.dtype, self.device)}
        if same and out.is_contiguous() and v.is_contiguous():
            self.prepare(1)
        kept = self._kept
        if (not same or kept is None or len(kept) != 1 or self._reduces()
                or self._kept_key != self._state_key() or not out.is_contiguous()):
            return out.mul_(beta).add_(self.matvec(v))
        with torch.inference_mode(False), torch.no_grad(), curvature_kernels(), flushed_denormals():
            kept[0][1].update(self.unflatten(v), self.unflatten(out), beta)
        # one batch, no reduction over ranks: _finish only checks and counts
        self._finish(1, 1, [out])
        return out

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """``v_i^T C v_i`` for the columns of ``V`` (shape ``(n, k)``), as a
        float64 tensor of shape ``(k,)``.

        What a trace estimator needs of a product.  The double-backward
        engine dots each parameter's product with its piece of ``v_i`` as
        the backward pass forms it and keeps no product vector (one
        parameter size less than :meth:`matmat`); the other engine forms the
        products and dots them.
        """
        check_real_floating(V, "V")
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        (f,) = self.apply(self.unflatten(V.to(device=self.device, dtype=self.dtype)), forms=True)
        return f

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for one flat vector of shape ``(n,)``."""
        check_real_floating(v, "v")
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


def _probe_batch(inputs: Any, targets: Tensor) -> tuple[Any, Tensor]:
    """The first two samples of a batch (one if it has one), on which the
    engine probes run: one sample would fail where the model itself does
    not, in training mode with batch statistics (``BatchNorm`` without
    running statistics: "Expected more than 1 value per channel")."""
    from flatness._data import _slice

    n = min(2, len(targets))
    return _slice(inputs, 0, n), targets[:n]

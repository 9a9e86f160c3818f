"""Curvature-vector product kernels: one batch's Hessian- or
Gauss-Newton-vector products by forward-over-reverse (``torch.func``) or by
double backward (Pearlmutter 1994), and what decides which one a model
allows.

* :func:`batch_curvature_products`: ``k`` vectors through one ``vmap`` call
  of ``jvp(grad(loss))`` (Hessian) or ``vjp . hvp_z . jvp`` (GGN).
* :func:`forward_over_reverse_hvp`: one Hessian-vector product forward
  over reverse with the plain autograd APIs (dual tensors, one backward
  pass), holding no gradient beside it; :func:`dual_hvp_agrees` checks it
  against double backward on two samples.
* :class:`KeptGraph` / :func:`double_backward_hvp`: the gradient with
  ``create_graph=True``, then one backward pass per vector.
* :func:`curvature_kernels`: kernels with correct second derivatives (math
  attention, composite ``weight_norm``) while products run.
* :func:`reverse_only_modules`, :func:`buffers_written_in_forward`: what rules
  out the forward-mode engine for a model.

:class:`~flatness._hvp.CurvatureOperator` builds the operator (batches,
engine choice, flat vectors) on top of these.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from flatness import _distributed
from flatness._checks import kernel_eps
from flatness._functional import (
    LossFn,
    _as_args,
    _as_kwargs,
    default_loss,
    dense_gradients,
    functional_loss,
)
from flatness._guard import same_bits
from flatness._params import ParamSet, unwrap
from flatness._rng import seed_default_generators

__all__ = [
    "CURVATURES",
    "KeptGraph",
    "batch_curvature_products",
    "buffers_written_in_forward",
    "curvature_kernels",
    "double_backward_hvp",
    "dual_hvp_agrees",
    "flushed_denormals",
    "forward_over_reverse_hvp",
    "reverse_only_modules",
]

#: The curvature matrices an operator can represent.
CURVATURES = ("hessian", "ggn")

Tangents = tuple[Tensor, ...]


def _composite_weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    # w = g v / ||v|| from differentiable primitives.  The fused
    # _weight_norm_interface kernel has a wrong double backward on CPU (its
    # Hessian is not even symmetric) and no forward-mode derivative.
    return v * (g / torch.norm_except_dim(v, 2, dim))


@contextlib.contextmanager
def curvature_kernels() -> Iterator[None]:
    """Kernels with correct second derivatives for curvature computations.

    Attention runs on the math SDPA kernel and without the fused
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path, and
    ``weight_norm`` (``torch._weight_norm``) on a composite of
    differentiable primitives: the fused kernels lack forward-mode
    derivatives or a correct double backward.  Restores everything on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    fused_weight_norm = torch._weight_norm
    torch.backends.mha.set_fastpath_enabled(False)
    torch._weight_norm = _composite_weight_norm  # type: ignore[assignment]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch._weight_norm = fused_weight_norm  # type: ignore[assignment]
        torch.backends.mha.set_fastpath_enabled(previous)


def _flushing_denormals() -> bool:
    # torch has no getter: a subnormal product survives unless this thread
    # flushes them (1e-40 is subnormal in float32)
    return float(torch.tensor([1e-20]) * torch.tensor([1e-20])) == 0.0


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread while products run
    (CPU, where supported), and restore the previous setting.

    Products with vectors whose entries span many orders of magnitude (the
    orthonormalized sketch of Hutch++, Lanczos vectors) create subnormal
    intermediates in the backward pass, which x86 CPUs compute about a
    hundred times slower than normal numbers: a product took 1.5x as long
    on a language model.  Values below ``1.2e-38`` (float32) are dropped,
    far below the rounding of any sum they enter.  The setting is per
    thread: intra-op worker threads keep theirs.
    """
    if _flushing_denormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def modules_without_second_derivatives(model: nn.Module, ps: ParamSet) -> list[str]:
    """Submodules holding selected parameters through which PyTorch has no
    second derivative (neither double backward nor forward-mode AD), each as
    ``"name (Type)"``: ``nn.EmbeddingBag`` (``_embedding_bag_backward`` has
    no derivative)."""
    selected = {id(p) for p in ps.params}
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in unwrap(model).named_modules()
            if isinstance(m, nn.EmbeddingBag) and any(id(p) in selected for p in m.parameters(recurse=False))]


def reverse_only_modules(model: nn.Module) -> list[str]:
    """Submodules whose kernels have no forward-mode derivative in PyTorch,
    each as ``"name (Type: reason)"``: recurrent layers (the fused RNN
    kernels) and parametrized modules (``weight_norm``'s fused kernel,
    parametrizations that run power iterations in training mode)."""
    from torch.nn.utils import parametrize

    found = []
    for name, m in unwrap(model).named_modules():
        label = name or "<root>"
        if isinstance(m, nn.RNNBase):
            found.append(f"{label} ({type(m).__name__}: the recurrent kernel has no forward-mode derivative)")
        elif parametrize.is_parametrized(m):
            found.append(f"{label} ({type(m).__name__}: parametrized weights)")
    return found


def buffers_written_in_forward(
    model: nn.Module, ps: ParamSet, inputs: Any, targets: Tensor, loss_fn: LossFn
) -> list[str]:
    """Names of the buffers that one forward pass writes in place (BatchNorm
    in training mode, counters, running averages), found from the version
    counters of copies (the module's own buffers are not touched)."""
    module = unwrap(model)
    copies = {name: b.clone() for name, b in module.named_buffers()}
    if not copies:
        return []
    originals = {name: b.clone() for name, b in copies.items()}
    versions = {name: b._version for name, b in copies.items()}
    with torch.no_grad():
        functional_loss(model, ps, ps.detached(), inputs, targets, loss_fn, extra=copies)
    # the version counter catches in-place writes by operators; BatchNorm's
    # kernel updates its statistics without bumping it, so compare values too
    return [name for name, b in copies.items()
            if b._version != versions[name] or not same_bits(b, originals[name])]


def _outputs(
    model: nn.Module, ps: ParamSet, values: Sequence[Tensor], inputs: Any, extra: dict[str, Tensor]
) -> Tensor:
    state = {**extra, **ps.as_dict(values)}
    with dense_gradients(model):
        return functional_call(unwrap(model), state, _as_args(inputs), _as_kwargs(inputs), strict=False)


def _second_order(f: Any, x: Any, v: Any) -> Any:
    """Hessian of scalar ``f`` at ``x`` times ``v`` (pytrees of tensors), as
    ``jvp`` of ``grad``.

    The other order, ``grad`` of ``jvp``, holds no gradient beside the
    tangent (one parameter size less) and is the same product in exact
    arithmetic, but torch's reverse-mode derivatives of the forward-mode
    formulas of ``layer_norm``, ``batch_norm`` in training mode and
    ``instance_norm`` are wrong (torch 2.13 on CPU: errors of order one
    against a dense Hessian), so it is not used.
    """
    return jvp(grad(f), (x,), (v,))[1]


def forward_over_reverse_hvp(
    model: nn.Module, ps: ParamSet, inputs: Any, targets: Tensor, vec: Sequence[Tensor],
    *, loss_fn: LossFn = default_loss,
) -> Tangents:
    """One Hessian-vector product ``H v`` of one batch's loss, forward over
    reverse, holding no gradient beside the product.

    The same product as ``jvp(grad(loss), (w,), (v,))`` (the forward-mode
    derivative of the backward pass), composed from the plain autograd
    APIs: the loss runs at dual tensors ``w + eps v`` (``torch.autograd.
    forward_ad``), so the backward pass carries the tangent of every
    gradient beside its value, and each parameter's gradient is split as
    the engine completes it: its tangent (that parameter's piece of
    ``H v``) is kept and its value (the loss gradient) dropped at once.
    ``jvp(grad)`` returns the whole gradient beside ``H v``: one parameter
    size more at the peak.

    Parameters
    ----------
    model : nn.Module
        In the mode it should be evaluated in (the caller guards it).
    ps : ParamSet
        Parameters the Hessian is taken with respect to.
    inputs, targets
        One batch, on the parameters' device.
    vec : sequence of Tensor
        One tensor per parameter, shaped like it.
    loss_fn : callable

    Returns
    -------
    tuple of Tensor
        ``H v``, one tensor per parameter (zeros where the loss does not
        depend on the parameter).
    """
    from torch.autograd import forward_ad as fwAD

    # fresh buffer copies: a forward pass may write them (see
    # batch_curvature_products); the module's own are never touched
    buffers = {name: b.clone() for name, b in unwrap(model).named_buffers()}
    leaves = [p.detach().requires_grad_(True) for p in ps.params]
    products: list[Tensor | None] = [None] * len(leaves)

    def take_tangent(j: int) -> Callable[[Tensor], Tensor]:
        def hook(g: Tensor) -> Tensor:
            # ``g`` is a dual tensor: its tangent is this parameter's piece
            # of H v, its value the loss gradient, which is replaced by a
            # broadcast zero (one stored number) and so freed here.
            products[j] = fwAD.unpack_dual(g).tangent
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
        return hook

    for j, leaf in enumerate(leaves):
        leaf.register_hook(take_tangent(j))
    with torch.enable_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(leaf, v.to(leaf.dtype)) for leaf, v in zip(leaves, vec)]
        loss = functional_loss(model, ps, duals, inputs, targets, loss_fn, extra=buffers)
        del duals
        if loss.requires_grad:
            # autograd.grad, not backward: AccumulateGrad would drop the
            # tangents (and .grad would keep the values)
            torch.autograd.grad(loss, leaves, allow_unused=True)
        del loss
    return tuple(torch.zeros_like(p) if h is None else h for h, p in zip(products, ps.params))


def dual_hvp_agrees(
    model: nn.Module, ps: ParamSet, inputs: Any, targets: Tensor, vec: Sequence[Tensor],
    *, loss_fn: LossFn = default_loss,
) -> bool:
    """Whether :func:`forward_over_reverse_hvp` runs on this model and gives
    the double-backward product, checked on ``inputs`` (the caller passes
    two samples) with ``vec``.

    The plain forward-mode API has fewer formulas for backward kernels than
    ``torch.func.jvp`` (``silu_backward``, ``native_group_norm_backward``
    raise), and a backward kernel whose tangent were silently dropped would
    give a wrong product.  So the reference's pieces are subtracted from the
    forward-mode product as its backward pass forms them (no second product
    vector exists), which must leave only round-off.  Both passes draw the same
    random numbers (dropout).
    """
    devices = [ps.device] if ps.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            seed_default_generators(0, ps.device)  # (the forked ones only)
            dual = forward_over_reverse_hvp(model, ps, inputs, targets, vec, loss_fn=loss_fn)
        scale = max((float(d.abs().max()) for d in dual if d.numel()), default=0.0)
        with torch.random.fork_rng(devices=devices):
            seed_default_generators(0, ps.device)
            reference = KeptGraph(model, ps, inputs, targets, loss_fn)
        dual = list(dual)

        def subtract(j: int, g: Tensor) -> None:  # a weight's piece may come in two parts (see _LeanGradientGraph)
            dual[j] = dual[j].sub_(g) if dual[j].is_contiguous() else dual[j] - g

        reference._one([v.to(p.dtype) for v, p in zip(vec, ps.params)], sink=subtract)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    # what is left: round-off of two orders of evaluation; a dropped term is of order one
    diff = max((float(d.abs().max()) for d in dual if d.numel()), default=0.0)
    tol = min(1e-2, 1e3 * kernel_eps(ps.dtype, ps.device)) * scale if ps.dtype.is_floating_point else 0.0
    return math.isfinite(diff) and diff <= tol


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
    dual: bool = False,
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
    dual : bool
        One Hessian-vector product (``k == 1``) by
        :func:`forward_over_reverse_hvp` (no gradient held beside it)
        instead of ``jvp(grad)``; only where :func:`dual_hvp_agrees`
        passed for the model.

    Returns
    -------
    tuple of Tensor
        ``C v_i`` for each of the ``k`` vectors, shaped like ``tangents``.
    """
    if dual and curvature == "hessian" and tangents[0].shape[0] == 1:
        hv = forward_over_reverse_hvp(model, ps, inputs, targets, tuple(t[0] for t in tangents), loss_fn=loss_fn)
        return tuple(h.unsqueeze(0) for h in hv)
    values = tuple(ps.detached())
    module = unwrap(model)
    # In training mode BatchNorm writes its running statistics in place.  The
    # transforms refuse to mutate a captured tensor, so every forward pass
    # gets fresh copies of the buffers (the module's own are never touched).
    buffers = dict(module.named_buffers())

    def fresh_buffers() -> dict[str, Tensor]:
        return {name: b.clone() for name, b in buffers.items()}

    if curvature == "hessian":

        def loss(vals: Tangents) -> Tensor:
            return functional_loss(
                model, ps, vals, inputs, targets, loss_fn, extra=fresh_buffers()
            )

        def product(v: Tangents) -> Tangents:
            return _second_order(loss, values, v)

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
            hjv = _second_order(out_loss, z, jv)
            return pullback(hjv)[0]

    else:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")

    # randomness="same": a dropout layer (train=True) draws one mask for all
    # k vectors, so every vector sees the same function.
    if tangents[0].shape[0] == 1:  # one vector: skip the vmap overhead
        return tuple(o.unsqueeze(0) for o in product(tuple(t[0] for t in tangents)))
    return vmap(product, randomness="same", chunk_size=chunk_size)(tangents)


def _scalar_loss(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor (the mean loss over the batch)")
    return value.reshape(())


def _zeros_or(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(v) if t is None else t.detach() for t, v in zip(tensors, like))


class _Root(NamedTuple):
    """Where a product's backward pass starts: a gradient tensor, or only
    its place in the graph (see :func:`_roots`), and its dtype."""

    output: Any  # Tensor or torch.autograd.graph.GradientEdge
    dtype: torch.dtype


@functools.cache
def _edges_as_outputs() -> bool:
    """Whether ``torch.autograd.backward`` takes gradient edges as outputs
    (recent torch releases), tried once on a two-element graph."""
    try:
        from torch.autograd.graph import get_gradient_edge

        x = torch.ones(2, requires_grad=True)
        with torch.enable_grad():
            edge = get_gradient_edge(x * 2)
        (g,) = torch.autograd.grad([edge], [x], [torch.ones(2)])
        return bool(torch.equal(g, torch.full((2,), 2.0)))
    except Exception:  # noqa: BLE001 - any failure means: keep the tensors
        return False


def _roots(grads: Sequence[Tensor | None]) -> list[_Root | None]:
    """The starting points of the products' backward passes: ``None`` where
    the gradient does not depend on the parameters.

    A product needs the gradient's graph, not its values: where torch takes
    gradient edges as outputs, only the edges are kept and the gradient
    itself (one parameter size) is freed, unless a node of the graph saved
    it."""
    edges = _edges_as_outputs()
    if edges:
        from torch.autograd.graph import get_gradient_edge
    out: list[_Root | None] = []
    for g in grads:
        if g is None or not g.requires_grad:
            out.append(None)
        else:
            out.append(_Root(get_gradient_edge(g) if edges else g, g.dtype))
    return out


class _SplitLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward pass forms the input's
    gradient with ``alias[0]``, a second leaf equal to ``weight``.

    The alias comes in a list, not as an input: as an input it would get
    an edge from this node, and its leaf would then wait for this node,
    which a product's backward pass reaches last (see :class:`_LeanGradientGraph`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, alias: list[Tensor], bias: Tensor | None) -> Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _, alias, bias = inputs
        ctx.save_for_backward(x)
        ctx.alias = alias[0]
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        gx = gy @ ctx.alias if ctx.needs_input_grad[0] else None
        n = math.prod(gy.shape[:-1])  # the rows of every position (not -1: a size may be 0)
        rows = gy.reshape(n, gy.shape[-1])
        gw = rows.T @ x.reshape(n, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, gw, None, gb


class _SplitConv(torch.autograd.Function):
    """``F.conv1d`` / ``conv2d`` / ``conv3d`` of ``x`` with ``weight`` whose
    backward pass forms the input's gradient with ``alias[0]``, a second
    leaf equal to ``weight`` (as :class:`_SplitLinear` does for
    ``F.linear``).  Both gradients come from ``convolution_backward``, which
    torch differentiates again; each is given the other operand detached,
    whose values it does not read (the input's gradient needs only the
    input's shape, the weight's only the weight's), so that neither has an
    edge it does not use."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, alias: list[Tensor], bias: Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
        conv = (torch.conv1d, torch.conv2d, torch.conv3d)[weight.dim() - 3]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, alias, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x)
        ctx.alias = alias[0]
        ctx.has_bias = bias is not None
        ctx.arguments = (stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        alias = ctx.alias
        backward = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = backward(gy, x.detach(), alias, None, *ctx.arguments, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = backward(gy, x, alias.detach(), None, *ctx.arguments, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = gy.sum([d for d in range(gy.dim()) if d != 1])
        return gx, gw, None, gb, None, None, None, None


class _LeanCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(z, target, ignore_index=..., reduction=...)`` on
    logits ``z`` of shape ``(N, C)`` whose backward pass forms the logits'
    gradient, ``(softmax(z) - onehot(target)) * w``, with differentiable
    operations: a second differentiation then needs the softmax alone
    (beside the gradient itself, which the next layer saves anyway).  The
    native formulas keep ``log_softmax`` and ``nll_loss_backward``'s output
    as well, and each product's pass through ``log_softmax_backward``'s
    derivative forms about four more tensors of the logits' size (measured
    on a 10M-parameter transformer).  For a language model the logits
    (tokens x vocabulary) are the largest activations: ``trace`` on that
    transformer peaks 1.3 P lower at 8 x 64 tokens, 0.2 P at 2 x 64."""

    @staticmethod
    def forward(z: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
        return torch.nn.functional.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, target, ignore_index, reduction = inputs
        ctx.save_for_backward(z, target)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction

    @staticmethod
    def backward(ctx: Any, gout: Tensor) -> tuple[Tensor | None, ...]:
        z, target = ctx.saved_tensors
        keep = target != ctx.ignore_index
        p = torch.softmax(z, dim=1)
        minus_one = torch.full((z.shape[0], 1), -1.0, dtype=p.dtype, device=p.device)
        g = p.scatter_add(1, torch.where(keep, target, 0)[:, None], minus_one)  # p - onehot
        w = keep.to(p.dtype)[:, None]
        if ctx.reduction == "mean":  # the mean over the targets not ignored (nan if none, as natively)
            w = w / keep.sum()
        return g * (w * gout), None, None, None


class _LeanGradientGraph(torch.overrides.TorchFunctionMode):
    """The mode in which :class:`KeptGraph` builds the gradient's graph:
    linear layers, convolutions and the cross-entropy are recorded in forms
    whose graph costs less memory in every product, with the same values.

    * ``F.linear`` with a parameter's value as its weight runs as
      :class:`_SplitLinear`: the gradient's graph then reaches the weight
      through two leaves, the value and its alias.  Why: a
      reverse-over-reverse product of a weight has two parts.  One flows
      through the forward pass's node, which the product's backward pass
      reaches last; the other through the nodes of the gradient's graph
      that used the weight to form the input's gradient, which it reaches
      in the middle.  Through one leaf the engine holds the middle part of
      every layer until the last part arrives: about one parameter size of
      partial products at once (1.0 P of a 10M-parameter transformer's
      5.6 P peak in ``trace``).  Through two leaves each part is handed
      over, and freed, as soon as it is formed; the parts are added.
    * ``F.conv1d``, ``conv2d`` and ``conv3d`` with a parameter's value as
      their weight run as :class:`_SplitConv`, for the same reason (0.9 P
      of a 4.7M-parameter VGG-style CNN's 4.6 P in ``trace``, batch of 8).
    * ``F.cross_entropy`` on ``(N, C)`` logits with class targets runs as
      :class:`_LeanCrossEntropy`, whose gradient's graph keeps the softmax
      alone of the logits' size (1.3 P less in ``trace`` on that
      transformer at 8 x 64 tokens).

    Left to torch's own functions: a weight that is not a parameter's value
    itself (a parametrization's result, a slice), of another dtype or device
    than the input; a convolution with a string ``padding`` (``"same"``,
    ``"valid"``) or an unbatched input, and transposed convolutions;
    ``cross_entropy`` with class weights, label smoothing, probabilities as
    targets, other than 2-D logits or ``reduction="none"``; and, for all of
    them, autocast, a checkpointed
    block (see :func:`_saved_tensors_hooked`) and a compiled module
    (``torch.compile`` would capture the alias as a constant of its graph,
    whose backward then has no edge to it: a product of zero).
    """

    def __init__(self, values: Sequence[Tensor], aliases: Sequence[Tensor]) -> None:
        super().__init__()
        self.index = {id(v): j for j, v in enumerate(values)}
        self.aliases = aliases
        #: the parameters (indices) whose weight was split at least once
        self.split: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        lean_form = self._forms.get(func)
        if lean_form is not None and torch.is_grad_enabled():
            lean = lean_form(self, *args, **kwargs)
            if lean is not None:
                return lean
        return func(*args, **kwargs)

    def _cross_entropy(
        self, input: Any, target: Any, weight: Any = None, size_average: Any = None, ignore_index: int = -100,
        reduce: Any = None, reduction: str = "mean", label_smoothing: float = 0.0,
    ) -> Tensor | None:
        if (not isinstance(input, Tensor) or not isinstance(target, Tensor) or input.dim() != 2
                or target.dim() != 1 or target.dtype != torch.long or not input.requires_grad
                or weight is not None or size_average is not None or reduce is not None
                or label_smoothing != 0 or reduction not in ("mean", "sum") or not _lean_context(input)):
            return None
        return _LeanCrossEntropy.apply(input, target, int(ignore_index), reduction)

    def _split(self, input: Any, weight: Any, bias: Any = None) -> Tensor | None:
        j = self._splittable(input, weight, 2)
        if j is None:
            return None
        return _SplitLinear.apply(input, weight, [self.aliases[j]], bias)

    def _split_conv(self, input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1, *, dim: int) -> Tensor | None:
        # (string paddings, "same" and "valid", an unbatched input and a
        # weight of another rank than the function's are left to torch)
        if isinstance(padding, str) or not isinstance(input, Tensor) or input.dim() != dim + 2:
            return None
        j = self._splittable(input, weight, dim + 2)
        if j is None:
            return None
        stride, padding, dilation = (_expand(a, dim) for a in (stride, padding, dilation))
        return _SplitConv.apply(input, weight, [self.aliases[j]], bias, stride, padding, dilation, int(groups))

    def _splittable(self, input: Any, weight: Any, dim: int) -> int | None:
        """The index of ``weight`` if it is a parameter's value that a lean
        form of this call may split (see the class), else ``None``."""
        j = self.index.get(id(weight))
        if (j is None or not isinstance(input, Tensor) or weight.dim() != dim
                or (input.dtype, input.device) != (weight.dtype, weight.device) or not _lean_context(input)):
            return None
        self.split.add(j)
        return j

    _forms: dict[Any, Callable[..., Tensor | None]] = {
        torch.nn.functional.linear: _split,
        torch.conv1d: functools.partial(_split_conv, dim=1),
        torch.conv2d: functools.partial(_split_conv, dim=2),
        torch.conv3d: functools.partial(_split_conv, dim=3),
        torch.nn.functional.cross_entropy: _cross_entropy,
    }


def _expand(value: Any, dim: int) -> list[int]:
    """A convolution's ``stride``, ``padding`` or ``dilation`` as ``dim`` ints."""
    if isinstance(value, int):
        return [value] * dim
    values = [int(v) for v in value]
    return values * dim if len(values) == 1 else values


def _lean_context(input: Tensor) -> bool:
    """Whether the lean forms of :class:`_LeanGradientGraph` may replace
    torch's own here: not under autocast, in a checkpointed block or while
    ``torch.compile`` traces (see there)."""
    return not (_autocast_enabled(input.device.type) or _saved_tensors_hooked() or torch.compiler.is_compiling())


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active: inside a block of
    ``torch.utils.checkpoint`` (or ``save_on_cpu``).  A checkpointed block
    recomputes its forward pass in each backward pass, outside
    :class:`_LeanGradientGraph` (a mode does not reach into the autograd engine),
    and the recomputation must save what the first pass saved; so such a
    block keeps ``F.linear``.  Unknown (a torch without the query): hooked."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(True) is not None


class KeptGraph:
    """One batch's loss gradient with its graph (``create_graph=True``),
    ready for any number of reverse-over-reverse products.

    Only the graph is kept: the gradient's values are not needed by the
    products and are freed (where torch takes gradient edges as outputs),
    so the graph holds the activations and what the backward pass saved
    for a second differentiation, and no parameter-sized gradient.

    Hessian: ``H v = d(g . v)/dw`` with ``g`` the kept gradient.  GGN:
    ``J v`` by the double-vjp trick (``J^T u`` is linear in a dummy ``u``;
    its gradient with respect to ``u`` along ``v`` is ``J v``), then
    ``H_z J v`` and ``J^T (H_z J v)``, all through graphs built once.
    Buffers are copied, so a forward pass that writes them (BatchNorm in
    training mode, counters) leaves the module's own untouched.
    """

    def __init__(
        self, model: nn.Module, ps: ParamSet, inputs: Any, targets: Tensor,
        loss_fn: LossFn, curvature: str = "hessian",
    ) -> None:
        buffers = {name: b.clone() for name, b in unwrap(model).named_buffers()}
        self.curvature = curvature
        self.values = [p.detach().requires_grad_(True) for p in ps.params]
        self.aliases: list[Tensor] = []
        #: the parameters whose product comes in two parts (see _LeanGradientGraph)
        self.split: set[int] = set()
        with torch.enable_grad():
            if curvature == "hessian":
                self.aliases = [v.detach().requires_grad_(True) for v in self.values]
                with _LeanGradientGraph(self.values, self.aliases) as mode:
                    loss = functional_loss(model, ps, self.values, inputs, targets, loss_fn, extra=buffers)
                self.split = mode.split
                self.grads = _roots(torch.autograd.grad(loss, self.values, create_graph=True, allow_unused=True))
            else:
                z = _outputs(model, ps, self.values, inputs, buffers)
                if not isinstance(z, Tensor):
                    raise ValueError(_GGN_OUTPUTS.format(type(z).__name__))
                loss = _scalar_loss(loss_fn(z, targets))
                self.z = z
                (self.gz,) = torch.autograd.grad(loss, z, create_graph=True)
                self.u = torch.zeros_like(z, requires_grad=True)
                self.grads = _roots(torch.autograd.grad(z, self.values, self.u, create_graph=True, allow_unused=True))

    def products(self, tangents: Tangents, out: Tangents | None = None) -> Tangents:
        """``C v_i`` for the ``k`` vectors of ``tangents`` (``(k, *shape)``).

        ``out``, one ``(k, *shape)`` tensor per parameter (views into the
        caller's result), receives the products: each backward pass copies
        a parameter's product there as soon as it is formed, so no whole
        product exists beside it.  Without ``out``, one vector's product is
        returned as a view (no stacked copy).
        """
        k = int(tangents[0].shape[0])
        if out is None:
            if k == 1:
                return tuple(r.unsqueeze(0) for r in self._one([t[0] for t in tangents]))
            out = tuple(torch.empty((k, *v.shape), dtype=v.dtype, device=v.device) for v in self.values)
        for i in range(k):
            self._one([t[i] for t in tangents], into=[o[i] for o in out])
        return out

    def update(self, vec: Sequence[Tensor], out: Sequence[Tensor], beta: float) -> None:
        """``out <- C v + beta * out`` for one vector ``v`` (parameter-shaped
        tensors), each parameter's product added as the backward pass forms
        it: no product vector beside ``out``."""
        filled: set[int] = set()

        def sink(j: int, g: Tensor) -> None:
            if j in filled:  # a parameter's second part (see _LeanGradientGraph)
                out[j].add_(g)
            else:
                out[j].mul_(beta).add_(g)
                filled.add(j)

        self._one(list(vec), sink=sink)
        for j, t in enumerate(out):
            if j not in filled:  # the loss does not reach this parameter
                t.mul_(beta)

    def forms(self, tangents: Tangents) -> Tangents:
        """The quadratic forms ``v_i . C v_i`` (float64, shape ``(k,)``, as a
        one-element tuple) for the ``k`` vectors of ``tangents``.

        Each parameter's product is dotted with its piece of ``v_i`` as soon
        as the backward pass has formed it and then released: no product
        vector exists, which saves one parameter size beside a product
        (what a trace estimator needs of a product is this number).
        """
        k = int(tangents[0].shape[0])
        out = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            vec = [t[i] for t in tangents]
            parts: list[Tensor] = []
            # (in float32 for half precision: a bfloat16 dot is rounded to 3
            # digits, quadratic forms 0.36% off the dot of their own products)
            # The dots stay on the device until the pass is over: reading each
            # back in the hook would stall the backward pass once per tensor.
            self._one(vec, sink=lambda j, g: parts.append(_distributed.dot(vec[j], g).detach()))
            if parts and not _distributed.is_sharded(parts) and len({p.device for p in parts}) == 1:
                out[i] = math.fsum(torch.stack([p.double() for p in parts]).tolist())
            else:
                out[i] = math.fsum(float(p) for p in parts)
        return (out.to(tangents[0].device),)

    def _one(
        self, vec: list[Tensor], into: list[Tensor] | None = None, sink: Callable[[int, Tensor], None] | None = None
    ) -> tuple[Tensor, ...]:
        """One product; with ``into`` (parameter-shaped tensors) written
        there; with ``sink``, handed over parameter by parameter as
        ``sink(j, product_j)`` and not kept (parameters the loss does not
        reach are skipped: their product is zero)."""
        live = [(g, v) for g, v in zip(self.grads, vec) if g is not None]
        if not live:  # the gradient does not depend on the parameters
            return self._zeros(into, sink)
        outs, grad_outs = [g.output for g, _ in live], [v.to(g.dtype) for g, v in live]
        with torch.enable_grad():
            if self.curvature == "hessian":
                return self._grad(outs, grad_outs, into, sink)
            (jv,) = torch.autograd.grad(outs, self.u, grad_outs, retain_graph=True, allow_unused=True)
            if jv is None or not self.gz.requires_grad:
                return self._zeros(into, sink)
            (hjv,) = torch.autograd.grad(self.gz, self.z, jv, retain_graph=True, allow_unused=True)
            if hjv is None:
                return self._zeros(into, sink)
            return self._grad([self.z], [hjv], into, sink)

    def _zeros(self, into: list[Tensor] | None, sink: Any = None) -> tuple[Tensor, ...]:
        if sink is not None:
            return ()
        if into is None:
            return tuple(torch.zeros_like(v) for v in self.values)
        return tuple(t.zero_() for t in into)

    def _grad(
        self, outs: list[Tensor], grad_outs: list[Tensor], into: list[Tensor] | None,
        sink: Callable[[int, Tensor], None] | None = None,
    ) -> tuple[Tensor, ...]:
        """The last backward pass of a product, onto the parameters.

        A weight's product may arrive in two parts, one per leaf (its value
        and its alias, see :class:`_LeanGradientGraph`), which are added.  Each
        part is copied into ``into`` (or handed to ``sink``, or kept as the
        result) as soon as the engine has formed it, and released: at most
        one layer's part exists beside the result (zero-filling ``into``
        first and accumulating in place would keep all of it resident while
        the backward pass's own temporaries are live)."""
        n = len(self.values)
        result: list[Tensor | None] = [None] * n
        filled: set[int] = set()
        handed = sink is not None
        if sink is None:
            # the caller's own vectors, which a result must not be (see below)
            tangents = {t.untyped_storage().data_ptr() for t in grad_outs} if into is None else set()

            def sink(j: int, g: Tensor) -> None:
                if into is None:  # the engine's tensor becomes the result
                    if result[j] is not None:  # ours: a clone (only a split weight has a second part)
                        result[j] = result[j].add_(g)
                    elif j in self.split or g.untyped_storage().data_ptr() in tangents:
                        # to be added to in place, or the caller's own: not the engine's
                        # tensor, which another leaf's part may share (a sum's inputs do)
                        result[j] = g.clone()
                    else:
                        result[j] = g
                elif j in filled:
                    into[j].add_(g)
                else:
                    into[j].copy_(g)

        def receiver(j: int) -> Callable[[Tensor], Tensor]:
            def hook(g: Tensor) -> Tensor:
                sink(j, g)
                filled.add(j)
                # what the engine keeps for this leaf instead: a broadcast zero (one stored number)
                return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
            return hook

        leaves = [*self.values, *(self.aliases[j] for j in sorted(self.split))]
        index = [*range(n), *sorted(self.split)]
        handles = [v.register_hook(receiver(j)) for j, v in zip(index, leaves)]
        try:
            # autograd.grad, not backward: AccumulateGrad would copy every
            # part laid out unlike its leaf (a transposed weight's) first
            torch.autograd.grad(outs, leaves, grad_outs, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        if handed:
            return ()
        if into is None:
            return _zeros_or(result, self.values)
        for j, t in enumerate(into):
            if j not in filled:  # the loss does not reach this parameter
                t.zero_()
        return tuple(into)


_GGN_OUTPUTS = (
    "curvature='ggn' needs a model that returns one tensor (the Gauss-Newton matrix is "
    "J^T H_z J for outputs z), got {}; use curvature='hessian' with a loss_fn that selects the output"
)


def double_backward_hvp(
    model: nn.Module,
    ps: ParamSet,
    inputs: Any,
    targets: Tensor,
    tangents: Tangents,
    *,
    loss_fn: LossFn = default_loss,
    curvature: str = "hessian",
) -> Tangents:
    """Curvature-vector products by double backward, one vector at a time.

    The textbook method (Pearlmutter 1994 via reverse-over-reverse): one
    forward pass, the gradient with ``create_graph=True``, then one backward
    pass per vector (see :class:`KeptGraph`).
    """
    return KeptGraph(model, ps, inputs, targets, loss_fn, curvature).products(tangents)

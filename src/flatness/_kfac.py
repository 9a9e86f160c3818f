"""Kronecker factors for Linear and Conv2d layers.

For a layer with weight ``W`` (and optionally bias ``b``), the gradient of
one sample's loss is ``g = sum_t e_t a_t^T`` where ``t`` runs over the
positions the layer is applied at (one position for a ``Linear`` on a
``(n, d)`` input; every spatial location for a ``Conv2d``; every sequence
position for a ``Linear`` on ``(n, L, d)``), ``a_t`` is the layer input at
that position (the unfolded patch for a convolution) with a 1 appended when
the bias is selected, and ``e_t`` is the gradient of the *sample loss* with
respect to the layer output there.

The Kronecker-factored approximation (Martens and Grosse 2015; Grosse and
Martens 2016 for convolutions, "KFC") of the uncentered second moment is::

    E[vec(g) vec(g)^T]  ~  A (x) G,
    A = E_i[ (1/T) sum_t a_t a_t^T ],   G = E_i[ sum_t e_t e_t^T ].

With one position (``T = 1``) this is exact for a single sample; for
convolutions it is exact when the patches of a sample are orthogonal with
equal norms (KFC's spatial homogeneity and uncorrelated derivatives).
Its trace is ``tr(A) tr(G)``, computed here without forming the factors:
``tr(A)`` of a convolution comes from a convolution of the squared input with
a kernel of ones, not from unfolding.

Layers are found by :func:`plan`; everything else (other layer types, grouped
convolutions, parameters shared between modules) is returned as
``unsupported`` for the caller to handle exactly - nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from flatness._checks import kernel_eps, working_dtype
from flatness._distributed import sum_
from flatness._params import ParamSet, select_params, unwrap

__all__ = [
    "KFACLayer",
    "capture",
    "factor_dims",
    "factors",
    "hidden_use",
    "plan",
    "trace_terms",
]


@dataclass(frozen=True)
class KFACLayer:
    """A ``Linear`` or ``Conv2d`` module whose selected parameters are
    Kronecker-factored.

    Attributes
    ----------
    name : str
        The module's name in ``model.named_modules()``.
    module : nn.Module
    weight : int or None
        Index of the weight in the :class:`~flatness._params.ParamSet`
        (``None`` if the weight is not selected).
    bias : int or None
        Index of the bias (``None`` if absent or not selected).
    """

    name: str
    module: nn.Module
    weight: int | None
    bias: int | None

    @property
    def indices(self) -> list[int]:
        return [k for k in (self.weight, self.bias) if k is not None]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # Grouped convolutions have one Kronecker block per group; not handled.
    return isinstance(module, nn.Conv2d) and module.groups == 1


def plan(model: nn.Module, params: ParamSet) -> tuple[list[KFACLayer], list[int]]:
    """Split the selected parameters into Kronecker-factored layers and the rest.

    Returns
    -------
    layers : list of KFACLayer
        ``Linear`` and ``Conv2d`` (``groups=1``) modules with at least one
        selected parameter, registered once in the model and owning their
        parameters alone, and not part of an ``nn.MultiheadAttention``
        (whose ``out_proj`` is used without being called, so hooks never
        see it).  :func:`hidden_use` finds the other weights used outside
        their module's call at run time.
    unsupported : list of int
        Indices (into ``params``) of every other selected parameter.
    """
    module = unwrap(model)
    index = {id(p): k for k, p in enumerate(params.params)}
    # Count owners with duplicates kept: a module registered twice, or a
    # parameter tied between two modules, does not factor per module.
    module_count: dict[int, int] = {}
    owners: dict[int, int] = {}
    for _, mod in module.named_modules(remove_duplicate=False):
        module_count[id(mod)] = module_count.get(id(mod), 0) + 1
    for mod in {id(m): m for m in module.modules()}.values():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    hidden = _inside_attention(module)
    layers: list[KFACLayer] = []
    covered: set[int] = set()
    for name, mod in module.named_modules():
        if not _supported(mod) or module_count[id(mod)] > 1 or id(mod) in hidden:
            continue
        slots = []
        for p in (mod.weight, mod.bias):
            k = index.get(id(p)) if p is not None else None
            slots.append(k if k is not None and owners[id(p)] == 1 else None)
        if slots[0] is None and slots[1] is None:
            continue
        layers.append(KFACLayer(name, mod, slots[0], slots[1]))
        covered.update(k for k in slots if k is not None)
    unsupported = [k for k in range(len(params.params)) if k not in covered]
    return layers, unsupported


def _inside_attention(model: nn.Module) -> set[int]:
    # nn.MultiheadAttention uses out_proj's weight and bias through
    # F.multi_head_attention_forward without calling out_proj: no hook fires.
    return {
        id(child)
        for m in unwrap(model).modules()
        if isinstance(m, nn.MultiheadAttention)
        for child in m.children()
    }


def hidden_use(layer: KFACLayer, calls: list[list[Tensor]], true: list[Tensor]) -> str | None:
    """Why the hooks of ``layer`` do not see every use of its weights, or
    ``None`` if they do.

    A Kronecker factor is built from the inputs and output gradients the
    module's hooks record (``calls``, from :func:`capture`); weights used
    without calling the module (``F.linear(x, layer.weight)``, a weight used
    twice) escape them, and the factored variance would be wrong, even
    negative.  The weight gradient rebuilt from the hooks' inputs and
    output gradients must equal ``true``, the gradients of ``layer.indices``
    autograd computed in the same pass (zeros for an unused parameter):
    compared through their products with a fixed random vector, and the
    bias gradients whole.
    """
    scale = max(float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in true]))), 1e-300)
    if len(calls) > 1:
        return f"module called {len(calls)} times per forward pass"
    if not calls or len(calls[0]) < 2:
        return "weights used without calling the module (a functional use)" if scale > 1e-300 else None
    a, e = calls[0]
    if a.numel() == 0 or e.numel() == 0:
        return None  # an empty layer: nothing to factor, nothing hidden
    rebuilt, seen = [], []
    g = _output_grads(layer, e)
    if layer.weight is not None:
        # The weight gradient g^T x would cost the layer's whole backward
        # pass again; its product with a random vector, g^T (x v), costs
        # matrix-vector products (for a convolution, x v is a convolution
        # with one output channel: no unfolded patches), and a difference
        # between the two gradients shows in it almost surely.
        w = true[0]
        v = torch.randn(w[0].numel(), generator=torch.Generator(device=w.device).manual_seed(0),
                        device=w.device, dtype=w.dtype)
        rebuilt.append(torch.einsum("nto,nt->o", g, _inputs_times(layer, a, v)))
        seen.append(w.reshape(w.shape[0], -1) @ v)
    if layer.bias is not None:
        rebuilt.append(g.sum((0, 1)))
        seen.append(true[-1])
    err = float(torch.linalg.vector_norm(torch.cat([(r - t).reshape(-1) for r, t in zip(rebuilt, seen)])))
    scale = max(float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in seen]))), 1e-300)
    # A hidden use adds a whole term; rounding differs by the summation
    # order over samples and positions (3e-6 relative for a float32
    # convolution over 128 images of 32 x 32), so the tolerance follows the
    # dtype: 1e-6 in float64, 1.2e-4 in float32, 1e-2 in half precision.
    # (float32 on a GPU whose convolutions run in TF32: 1e-2)
    tol = min(max(1e-6, 1e3 * kernel_eps(true[0].dtype, true[0].device)), 1e-2)
    if err > tol * scale:
        return "weights also used outside the module's call (shared or functional use)"
    return None


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread
    (a forward call then is a recomputation by activation checkpointing, not
    a use of the module)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _leading_dim(obj: Any) -> int | None:
    """The first dimension of the first tensor (of at least one dimension)
    in ``obj``: the batch size of a model's inputs, batch first by the
    library's convention."""
    for leaf in tree_leaves(obj):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


@contextmanager
def capture(
    layers: list[KFACLayer], *, root: nn.Module | None = None,
    samples: dict[str, list[int | None]] | None = None,
) -> Iterator[dict[str, list[list[Tensor]]]]:
    """Record each layer's inputs and output gradients.

    Yields a dict ``name -> [[input, output_grad], ...]``, one entry per
    call of the module, filled by hooks during forward passes and the
    following ``backward`` / ``autograd.grad`` (an entry has no gradient if
    none reached the module's output).  The hooks are removed on exit, also
    after an exception.

    With ``root`` (the model) and ``samples`` (a dict, filled in place),
    each entry's number of samples is recorded too: ``samples[name][j]`` is
    the leading dimension of the inputs of the model's call during which
    entry ``j`` was recorded (``None`` for a call outside the model's).
    A layer's own leading dimension is not the number of samples when it
    runs sequence first or on flattened positions.
    """
    store: dict[str, list[list[Tensor]]] = {}
    # entries recorded by a forward pass without autograd, whose output
    # gradient a recomputation in the backward pass may still bring
    waiting: dict[str, list[list[Tensor]]] = {}
    handles = []
    current: list[int | None] = [None]  # samples of the model's call in progress

    def root_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not _in_backward():
            current[0] = _leading_dim((args, kwargs))

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
            if _in_backward():
                # Activation checkpointing recomputing the forward pass.  A
                # non-reentrant checkpoint kept the first pass's output, whose
                # hook is set; a reentrant one ran the first pass without
                # autograd, and the gradient reaches this recomputed output.
                queue = waiting.get(name)
                if queue and output.requires_grad:
                    entry = queue.pop(0)
                    output.register_hook(lambda g: entry.append(g.detach()))
                return
            entry = [args[0].detach()]
            store.setdefault(name, []).append(entry)
            if samples is not None:
                samples.setdefault(name, []).append(current[0])
            if output.requires_grad:
                output.register_hook(lambda g: entry.append(g.detach()))
            elif not torch.is_grad_enabled():
                waiting.setdefault(name, []).append(entry)

        return hook

    try:
        if root is not None and samples is not None:
            handles.append(unwrap(root).register_forward_pre_hook(root_hook, with_kwargs=True))
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _padded(module: nn.Conv2d, x: Tensor) -> Tensor:
    # The module pads inside its forward; the hook sees the unpadded input.
    # _reversed_padding_repeated_twice covers int, tuple and "same" padding.
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)


def _positions(layer: KFACLayer, a: Tensor, e: Tensor) -> tuple[Tensor, Tensor, int]:
    """Inputs ``(n, T, d_in)`` (unfolded for conv), output grads ``(n, T, d_out)``, T."""
    n = e.shape[0]
    if isinstance(layer.module, nn.Conv2d):
        m = layer.module
        patches = F.unfold(_padded(m, a), m.kernel_size, dilation=m.dilation, stride=m.stride)
        a = patches.transpose(1, 2)
        e = e.flatten(2).transpose(1, 2)
    else:
        a = a.reshape(n, -1, a.shape[-1])
        e = e.reshape(n, -1, e.shape[-1])
    return a, e, e.shape[1]


def _output_grads(layer: KFACLayer, e: Tensor) -> Tensor:
    """Output gradients ``(n, T, d_out)`` (the second part of :func:`_positions`)."""
    if isinstance(layer.module, nn.Conv2d):
        return e.flatten(2).transpose(1, 2)
    return e.reshape(e.shape[0], -1, e.shape[-1])


def _inputs_times(layer: KFACLayer, a: Tensor, v: Tensor) -> Tensor:
    """``x v`` for the inputs ``x`` of :func:`_positions` (``(n, T)``),
    without unfolding a convolution's patches: a convolution with ``v`` as
    its one output channel's kernel (``v`` in the weight's order)."""
    if isinstance(layer.module, nn.Conv2d):
        m = layer.module
        kernel = v.reshape(1, m.in_channels, *m.kernel_size)
        return F.conv2d(_padded(m, a), kernel, stride=m.stride, dilation=m.dilation).flatten(1)
    return a.reshape(a.shape[0], -1, a.shape[-1]) @ v


def _positions_count(layer: KFACLayer, e: Tensor) -> int:
    """T: output positions per sample (spatial locations, sequence positions)."""
    m = layer.module
    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    return e[0].numel() // out if out else 1  # no outputs: a zero gradient, any T


def _input_sqnorm(layer: KFACLayer, a: Tensor) -> Tensor:
    """``sum_i sum_t ||x_it||^2`` over the layer's input patches of a batch."""
    if isinstance(layer.module, nn.Conv2d):
        m = layer.module
        # Each input pixel counts once per patch covering it: a convolution
        # of the squared input, summed over samples and channels, with a
        # kernel of ones.  Padding (zeros, reflect, circular) only re-indexes
        # pixels, so it commutes with the squaring and the sums and is
        # applied to the small (1, 1, H, W) map.  (vector_norm over dim=1 is
        # ten times slower on CPU than this square-and-sum.)
        sq = _padded(m, a.square().sum((0, 1))[None, None])
        ones = sq.new_ones(1, 1, *m.kernel_size)
        return F.conv2d(sq, ones, stride=m.stride, dilation=m.dilation).sum()
    return torch.linalg.vector_norm(a).square()


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16 / bfloat16: the squared norms and
    the products ``x^T x`` of a layer's inputs and output gradients overflow
    float16 (65504) on ordinary activations (a 64-wide layer of inputs of
    size 40: ``kfac_variance`` raised NonFiniteLossError) and are rounded
    in bfloat16.  One layer's tensors at a time."""
    return t.to(working_dtype(t.dtype))


def trace_terms(
    layer: KFACLayer, a: Tensor, e: Tensor, scale: float = 1.0, n_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """``tr(A_b)`` and ``tr(G_b)`` of one batch.

    Parameters
    ----------
    layer : KFACLayer
    a : Tensor
        The layer's input for the batch.
    e : Tensor
        Gradients with respect to the layer's output.
    scale : float
        Factor that turns ``e`` into gradients of the *sample losses* (the
        batch size when ``e`` comes from a batch-mean loss).
    n_samples : int, optional
        The number of samples in the batch (default: ``e.shape[0]``, right
        for batch-first layouts only).  A layer applied to ``(T, B, d)``
        (sequence first, as ``nn.LSTM`` and ``nn.MultiheadAttention``
        without ``batch_first``) or to ``(B * T, d)`` (flattened positions)
        sees ``B`` samples, not its leading dimension.

    Returns
    -------
    tr_a, tr_g : Tensor
        0-d tensors: ``mean_i (1/T) sum_t ||a_t||^2`` (with the appended 1
        when the bias is selected; the mean over all rows of the input,
        whatever its layout) and ``mean_i sum_t ||scale e_t||^2`` (the sum
        over all rows divided by ``n_samples``).
    """
    a, e = _wide(a), _wide(e)
    rows = e.shape[0] * _positions_count(layer, e)
    tr_a = e.new_zeros(())
    if layer.weight is not None:
        tr_a = _input_sqnorm(layer, a) / rows
    if layer.bias is not None:
        tr_a = tr_a + 1
    n = e.shape[0] if n_samples is None else n_samples
    tr_g = torch.linalg.vector_norm(e).square() * (scale * scale / n)
    return tr_a, tr_g


def factors(
    layer: KFACLayer, a: Tensor, e: Tensor, scale: float = 1.0, n_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """The Kronecker factors ``A_b`` and ``G_b`` of one batch (``a``, ``e``,
    ``scale`` and ``n_samples`` as in :func:`trace_terms`).

    ``A_b`` is indexed by the input features of the weight as it is
    flattened (``in_features``, or ``in_channels * kh * kw`` for a
    convolution), followed by one entry for the bias when it is selected;
    only the bias entry when the weight is not selected.  ``G_b`` is indexed
    by the output features.  Then ``A_b (x) G_b`` approximates the second
    moment of ``vec(dW_i)`` stacked over ``[weight | bias]`` columns, i.e. of
    ``concat([dW_i, db_i[:, None]], 1).T.flatten()``.
    """
    a, e = _wide(a), _wide(e)
    x, g, positions = _positions(layer, a, e)
    rows = e.shape[0] * positions
    cols = []
    if layer.weight is not None:
        cols.append(x)
    if layer.bias is not None:
        cols.append(x.new_ones(*x.shape[:2], 1))
    x = torch.cat(cols, dim=2).reshape(rows, -1)
    g = g.reshape(rows, -1)
    n = e.shape[0] if n_samples is None else n_samples
    return x.T @ x / rows, g.T @ g * (scale * scale / n)


def factor_dims(layer: KFACLayer) -> tuple[int, int]:
    """Sizes of ``A`` and ``G`` for a layer (see :func:`factors`)."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        d_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        d_out = m.out_channels
    else:
        d_in, d_out = m.in_features, m.out_features
    return (d_in if layer.weight is not None else 0) + (layer.bias is not None), d_out


class RunningFactors:
    """Running Kronecker factors of a model's layers and the damped inverse
    ``(A (x) G + damping I)^-1``, for K-FAC-preconditioned ascent directions.

    The factors are exponential moving averages (``stat_decay``) of the
    per-batch factors of :func:`factors`, stored in ``state`` (a dict of
    dicts keyed by the layer's first selected parameter, e.g. an optimizer's
    per-parameter state, so they are saved with it) under ``"kfac_A"`` and
    ``"kfac_G"``.  The eigendecompositions are cached and refreshed with
    every update (as in the paper's code: ``(Q_g^T M Q_a) / (d_g d_a^T +
    damping)``).

    :meth:`update` does not write ``state``: the new factors are *pending*
    (used by :meth:`solve` at once) until :meth:`commit`; :meth:`discard`
    drops them, so an abandoned optimizer step leaves the factors as they
    were.

    Parameters
    ----------
    model : nn.Module
    params : list of Tensor
        Parameters of ``model`` to precondition.
    damping : float
        Added to the eigenvalues of ``A (x) G`` (> 0).
    stat_decay : float
        Weight of the old factors in the moving average, in ``[0, 1)``.
    state : dict
        Where the running factors live.
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[Tensor],
        *,
        damping: float,
        stat_decay: float,
        state: dict[Tensor, dict],
    ) -> None:
        self.params = select_params(model, params)
        #: The model, whose calls tell the number of samples (see :func:`capture`).
        self.root = unwrap(model)
        self.layers, rest = plan(model, self.params)
        if not self.layers:
            raise ValueError(
                "the K-FAC preconditioner needs at least one Linear or Conv2d layer among the "
                "optimizer's parameters"
            )
        self.unsupported = [self.params.names[k] for k in rest]
        self.damping = damping
        self.stat_decay = stat_decay
        self.state = state
        self._eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        # layer name -> new (A, G), not yet in ``state``
        self.pending: dict[str, tuple[Tensor, Tensor]] = {}

    def _slot(self, layer: KFACLayer) -> dict:
        return self.state[self.params.params[layer.indices[0]]]

    @torch.no_grad()
    def update(
        self, store: dict[str, list[list[Tensor]]], *, pool: bool = True, grad_scale: float = 1.0,
        samples: dict[str, list[int | None]] | None = None,
    ) -> None:
        """Fold the batch factors of a :func:`capture` into the running ones,
        as pending factors (see :meth:`commit`).

        Every call of a module counts as one batch; its output gradients are
        multiplied by its batch size (the loss is a batch mean) and divided
        by ``grad_scale`` (the loss scale of a ``GradScaler``, so that ``G``
        does not grow with the scale).  The batch size of a call is its
        entry in ``samples`` (from :func:`capture` with ``root=self.root``),
        else the leading dimension of the layer's output gradient (wrong for
        a layer applied sequence first or to flattened positions).  With
        ``pool=True`` inside a ``torch.distributed`` process group the batch
        factors are the size-weighted average over all ranks (every rank
        must call this), so all replicas keep the same factors.
        """
        ps = self.params
        for layer in self.layers:
            entries = store.get(layer.name, [])
            counts = (samples or {}).get(layer.name, [None] * len(entries))
            calls = [(c, n) for c, n in zip(entries, counts, strict=True) if len(c) == 2]
            dims = factor_dims(layer)
            ref = ps.params[layer.indices[0]]
            # float32 factors for half-precision parameters (see _wide): the
            # running average and the solve would round to 3 digits
            fa = ref.new_zeros(dims[0], dims[0], dtype=working_dtype(ref.dtype))
            fg = ref.new_zeros(dims[1], dims[1], dtype=working_dtype(ref.dtype))
            total = 0
            for (a, e), n in calls:
                n = e.shape[0] if n is None else n
                # the scale goes into the scalar factor, applied after the
                # product: no underflow of small (half-precision) gradients
                ca, cg = factors(layer, a, e, n / grad_scale, n_samples=n)
                fa.add_(ca, alpha=n)
                fg.add_(cg, alpha=n)
                total += n
            if pool:
                total = sum_(total)
                sum_(fa, fg)
            if total == 0:
                continue  # the layer took no part in this pass
            fa.div_(total)
            fg.div_(total)
            old = self._factors(layer)
            if old is not None:
                # new tensors, never in place: the committed ones stay intact
                fa = old[0].to(fa.dtype).mul(self.stat_decay).add_(fa, alpha=1 - self.stat_decay)
                fg = old[1].to(fg.dtype).mul(self.stat_decay).add_(fg, alpha=1 - self.stat_decay)
            self.pending[layer.name] = (fa, fg)
            self._eig.pop(layer.name, None)

    def commit(self) -> None:
        """Write the pending factors of :meth:`update` into ``state``."""
        for layer in self.layers:
            if layer.name in self.pending:
                slot = self._slot(layer)
                slot["kfac_A"], slot["kfac_G"] = self.pending.pop(layer.name)

    def discard(self) -> None:
        """Drop the pending factors (and their cached decompositions)."""
        for name in self.pending:
            self._eig.pop(name, None)
        self.pending = {}

    def _factors(self, layer: KFACLayer) -> tuple[Tensor, Tensor] | None:
        """The layer's pending factors, else its committed ones, else None."""
        if layer.name in self.pending:
            return self.pending[layer.name]
        slot = self._slot(layer)
        return (slot["kfac_A"], slot["kfac_G"]) if "kfac_A" in slot else None

    def ready(self) -> bool:
        """True once some layer has factors (pending or committed)."""
        return any(self._factors(layer) is not None for layer in self.layers)

    def _decomposition(self, layer: KFACLayer) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        if layer.name not in self._eig:
            fac = self._factors(layer)
            if fac is None:
                return None
            dtype = fac[0].dtype
            # float64: float32 eigh fails to converge on the rank-deficient
            # factors that constant input pixels produce
            da, qa = torch.linalg.eigh(fac[0].double())
            dg, qg = torch.linalg.eigh(fac[1].double())
            # round-off can make tiny eigenvalues negative; the factors are PSD
            self._eig[layer.name] = tuple(  # type: ignore[assignment]
                t.to(dtype) for t in (qa, da.clamp_min(0), qg, dg.clamp_min(0))
            )
        return self._eig[layer.name]

    @torch.no_grad()
    def solve(self, vectors: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """``(A (x) G + damping I)^-1 v`` for every layer's parameters found in
        ``vectors`` (``param -> tensor of its shape``).  Parameters outside
        the factored layers, or of layers without factors yet, are absent
        from the result."""
        out: dict[Tensor, Tensor] = {}
        for layer in self.layers:
            ps = [self.params.params[k] for k in layer.indices]
            if not all(p in vectors for p in ps):
                continue
            dec = self._decomposition(layer)
            if dec is None:
                continue
            qa, da, qg, dg = dec
            rows = ps[0].shape[0]
            cols = [vectors[p].reshape(rows, -1) for p in ps]
            m = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
            m = m.to(qa.dtype)  # half-precision vectors against float32 factors: float32
            v = qg.T @ m @ qa
            v = v / (dg[:, None] * da[None, :] + self.damping)
            r = qg @ v @ qa.T
            start = 0
            for p, c in zip(ps, cols, strict=True):
                out[p] = r[:, start : start + c.shape[1]].reshape(p.shape)
                start += c.shape[1]
        return out

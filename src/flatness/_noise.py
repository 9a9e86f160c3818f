"""The magnitude of the gradient noise, ``tr S`` of the per-sample gradient
covariance: exact from per-sample gradients (:func:`gradient_variance`) and
Kronecker-factored (:func:`kfac_variance`), as in Zhou et al., "Beyond
Sharpness" (AAAI 2025); public as :mod:`flatness.nonuniformity`."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatness import _distributed
from flatness._checks import check_bool, check_int, maybe_progress, require_finite
from flatness._data import batch_size as _batch_len
from flatness._data import check_n_batches, iter_batches, split_batch
from flatness._distributed import gather_objects, merge_moments, sum_
from flatness._functional import (
    LossFn,
    check_loss_fn,
    functional_loss,
    grad_enabled,
    refuse_summed_loss_over_batches,
)
from flatness._guard import ModelGuard
from flatness._kfac import KFACLayer, capture, factor_dims, hidden_use, plan, trace_terms
from flatness._kfac import factors as kronecker_factors
from flatness._params import ParamSet, select_params
from flatness._per_sample import check_chunk_size, per_sample_grads, per_sample_grads_choosing
from flatness._results import ResultMixin
from flatness._rng import private_rng


def _layer_of(name: str) -> str:
    """The module a parameter belongs to: ``"0.weight" -> "0"``."""
    return name.rpartition(".")[0] or name


def _check_common(model: Any, loss_fn: Any) -> LossFn:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return check_loss_fn(loss_fn)


def noise_factor(n: int, b: int) -> float:
    """``a = (n - b) / (b (n - 1))``: the covariance of a mini-batch gradient
    of ``b`` samples drawn without replacement from ``n`` is ``a S``.

    ``a = 1/b`` for ``n -> inf`` (sampling with replacement) and ``0`` for
    ``b = n`` (the full batch has no noise).
    """
    n = check_int("n", n)
    b = check_int("b", b)
    if b > n:
        raise ValueError(f"mini-batch size b={b} exceeds the number of samples n={n}")
    if n == 1:
        return 0.0
    return (n - b) / (b * (n - 1))


class _Moments:
    """Streaming mean and sum of squared deviations of per-sample gradients,
    one parameter at a time (Chan et al.'s pairwise update: no cancellation
    between ``E||g||^2`` and ``||E g||^2``).

    The state is one flattened running mean per parameter (1 P in all) and
    one float64 scalar per parameter.  A chunk is folded in parameter by
    parameter (:meth:`fold`), each per-sample gradient tensor is consumed in
    place and released as soon as it is folded (:func:`_stream_moments`), and
    :meth:`advance` then counts the chunk's samples: a chunk may arrive as
    several groups of parameters.
    """

    def __init__(self, count: int) -> None:
        self.n = 0
        self.mean: list[Tensor | None] = [None] * count
        self.m2: list[Tensor | None] = [None] * count

    def fold(self, k: int, g: Tensor) -> None:
        """Fold in parameter ``k``'s per-sample gradients ``(c, *shape)`` of
        a chunk not yet counted (``g`` is centred in place: consumed)."""
        c = g.shape[0]
        total = self.n + c
        g = g.reshape(c, -1)
        if c == 1:  # the sample is the chunk's mean: no copy
            mean_c, m2_c = g[0], torch.zeros((), dtype=torch.float64, device=g.device)
        else:
            mean_c = g.mean(0)
            # in place: no temporary of the chunk's size (memory-bound)
            m2_c = torch.linalg.vector_norm(g.sub_(mean_c)).double().square()
        del g
        mean, m2 = self.mean[k], self.m2[k]
        if mean is None or m2 is None:
            self.mean[k], self.m2[k] = mean_c, m2_c
            return
        delta = mean_c.sub_(mean)  # mean_c is ours: reused for the difference
        self.m2[k] = m2 + m2_c + torch.linalg.vector_norm(delta).double().square() * (self.n * c / total)
        mean.add_(delta, alpha=c / total)

    def advance(self, c: int) -> None:
        """Count the ``c`` samples of the chunk just folded."""
        self.n += c

    def variance(self, k: int) -> float:
        m2 = self.m2[k]
        return 0.0 if m2 is None else float(m2) / self.n

    def mean_sqnorm(self, k: int) -> float:
        mean = self.mean[k]
        if mean is None:
            return 0.0
        # in float64 slice by slice: no parameter-sized float64 copy (and
        # one read-back of all slices' sums, not one per slice)
        return float(torch.stack([part.double().pow(2).sum() for part in mean.split(1 << 16)]).sum())


#: Default bound on the bytes of per-sample gradients held at once.
PER_SAMPLE_MEMORY = 1 << 30


def _plan_chunks(ps: ParamSet, chunk_size: int | None, memory_limit: int | None) -> tuple[int | None, list[list[int]]]:
    """The sample chunk and the parameter groups of a streamed pass.

    ``chunk_size`` samples at most, fewer when their per-sample gradients of
    every parameter would exceed ``memory_limit`` bytes (down to one sample);
    when one sample's gradient alone exceeds it, the parameters are split
    into groups of whole layers (consecutive in ``ps``) of at most
    ``memory_limit`` bytes each (a larger layer forms its own group), each
    group differentiated by its own pass over the chunk.
    """
    every = list(range(len(ps.params)))
    if memory_limit is None:
        return chunk_size, [every]
    sizes = [p.numel() * p.element_size() for p in ps.params]
    fit = max(1, memory_limit // max(1, sum(sizes)))
    chunk = fit if chunk_size is None else min(chunk_size, fit)
    if sum(sizes) * chunk <= memory_limit:
        return chunk, [every]
    groups: list[list[int]] = []
    used = 0
    for k in every:
        same_layer = groups and _layer_of(ps.names[groups[-1][-1]]) == _layer_of(ps.names[k])
        if groups and (same_layer or used + sizes[k] <= memory_limit):
            groups[-1].append(k)
            used += sizes[k]
        else:
            groups.append([k])
            used = sizes[k]
    return chunk, groups


def _stream_moments(
    model: nn.Module, ps: ParamSet, inputs: Any, targets: Tensor, loss_fn: LossFn, moments: _Moments,
    chunk: int | None, groups: list[list[int]], engines: dict[int, str],
) -> None:
    """Fold the per-sample gradients of one batch into ``moments``, chunk by
    chunk and group by group (``engines`` caches each group's engine)."""
    for x, y in split_batch(inputs, targets, chunk):
        for gi, group in enumerate(groups):
            sub = ps if len(groups) == 1 else _subset(ps, group)
            if gi not in engines:  # chosen once per call, on its first chunk
                engines[gi], grads, _ = per_sample_grads_choosing(model, sub, x, y, loss_fn)
            else:
                grads, _ = per_sample_grads(model, sub, x, y, loss_fn, engine=engines[gi])
            grads = _unshared(grads)
            for j, k in enumerate(group):
                g, grads[j] = grads[j], None
                moments.fold(k, g)
            del grads
        moments.advance(_batch_len(y))


def _unshared(grads: list[Tensor]) -> list[Tensor]:
    """``grads`` with every tensor that shares memory with an earlier one
    copied.

    :meth:`_Moments.fold` consumes each tensor in place, and ``vmap`` may
    return one tensor for several parameters (two parameters added to the
    same activation, ``x + p1 + p2``, get the very same per-sample
    gradient): folding the first would change the others.
    """
    seen: set[int] = set()
    out = []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        out.append(g.clone() if ptr in seen and g.numel() else g)
        seen.add(ptr)
    return out


def _subset(params: ParamSet, indices: list[int]) -> ParamSet:
    return ParamSet(
        tuple(params.names[k] for k in indices), tuple(params.params[k] for k in indices)
    )


@dataclass
class VarianceResult(ResultMixin):
    """The outcome of :func:`gradient_variance` and :func:`kfac_variance`.

    Attributes
    ----------
    method : str
        ``"exact"`` or ``"kfac"``.
    total : float
        ``tr S``, the trace of the per-sample gradient covariance (sum of
        ``per_layer``).
    per_layer : dict
        ``tr S`` restricted to each layer's parameters, keyed by module name
        (a parameter registered directly on the root module is its own key).
    second_moment : float
        ``E_i ||g_i||^2`` (approximated by ``sum tr(A) tr(G)`` for the
        Kronecker-factored layers).
    mean_grad_sqnorm : float
        ``||g_bar||^2``, the squared norm of the mean gradient (exact).
    n_samples : int
        ``n``, samples seen.
    batch_size : int
        ``b``, the mini-batch size used for ``noise``.
    noise_factor : float
        ``a = (n - b) / (b (n - 1))``.
    noise : float
        ``a * total``: the magnitude of the mini-batch gradient noise.
    exact_layers : list of str
        Layers computed exactly by :func:`kfac_variance` (``fallback="exact"``).
    unsupported : list of str
        Parameters left out of every value (``fallback="skip"``); empty
        otherwise.
    factors : dict or None
        ``name -> (A, G)``, the data-averaged Kronecker factors of each
        factored layer (``factors=True``), see :func:`kfac_variance`.
        ``to_dict`` lists their shapes, not their entries.
    settings : dict
    wall_time : float
    """

    method: str
    total: float
    per_layer: dict[str, float]
    second_moment: float
    mean_grad_sqnorm: float
    n_samples: int
    batch_size: int
    noise_factor: float
    noise: float
    exact_layers: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    factors: dict[str, tuple[Tensor, Tensor]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary; factors appear as their shapes."""
        fac, self.factors = self.factors, None
        try:
            out = asdict(self)
        finally:
            self.factors = fac
        if fac is not None:
            out["factors"] = {k: [list(a.shape), list(g.shape)] for k, (a, g) in fac.items()}
        return out

    def __float__(self) -> float:
        return float(self.total)


def _finish(
    method: str,
    per_layer: dict[str, float],
    second: float,
    mean_sq: float,
    n: int,
    b: int | None,
    **extra: Any,
) -> VarianceResult:
    b = b if b is not None else n
    if b > n:
        raise ValueError(
            f"batch_size={b} exceeds the {n} samples of data: the noise of a mini-batch of "
            "batch_size samples drawn from the data needs batch_size <= the number of samples"
        )
    a = noise_factor(n, b)
    total = sum(per_layer.values())
    require_finite(total + second + mean_sq, "the gradient variance")
    return VarianceResult(
        method=method, total=total, per_layer=per_layer, second_moment=second,
        mean_grad_sqnorm=mean_sq, n_samples=n, batch_size=b, noise_factor=a,
        noise=a * total, **extra,
    )


@grad_enabled
def gradient_variance(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = 64,
    memory_limit: int | None = PER_SAMPLE_MEMORY,
    n_batches: int | None = None,
    train: bool = False,
    seed: int | None = 0,
    progress: bool = False,
) -> VarianceResult:
    r"""Exact trace of the per-sample gradient covariance, per layer and total.

    .. math::

        \operatorname{tr} S = \frac1n \sum_{i=1}^n \|g_i - \bar g\|^2, \qquad
        \text{noise} = \frac{n - b}{b (n - 1)} \operatorname{tr} S

    with ``g_i`` the gradient of ``loss_fn`` on sample ``i`` alone, over all
    ``n`` samples of ``data``.  Per-sample gradients come from
    ``torch.func.vmap(grad)`` in chunks of ``chunk_size`` samples; the sums
    are streamed, so memory stays at ``chunk_size`` gradient copies plus one
    for the running mean (and fewer where ``memory_limit`` says so).

    Parameters
    ----------
    model : nn.Module
        The network; it comes back exactly as it went in.
    data : batch or iterable of batches
        ``(inputs, targets)`` or a ``DataLoader`` / list of them.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``, a *mean* over the batch (a batch of
        one then gives the sample loss).  Default: mean cross-entropy.
    params : iterable, optional
        Parameters (tensors, names, submodules or ``(name, tensor)`` pairs);
        default all trainable.
    batch_size : int, optional
        The training mini-batch size ``b`` for ``noise``; default: the size
        of the first batch of ``data`` (so one batch gives ``noise = 0``).
        At most the number of samples in ``data`` (``ValueError`` otherwise).
    chunk_size : int or None
        Samples differentiated at once (``None``: a whole batch).
    memory_limit : int or None
        Bytes of per-sample gradients held at once (default 1 GiB; ``None``:
        no limit).  The chunk shrinks below ``chunk_size`` until its
        per-sample gradients fit (down to one sample); where one sample's
        gradient of every selected parameter is larger, the parameters are
        split into groups of whole layers of at most this size, and each
        group costs its own forward-backward pass per chunk.  The state kept
        between chunks is one running mean per parameter (1 P) and a scalar
        per parameter; the peak is about ``chunk * min(P, memory_limit)``
        plus that mean and the pass's activations.  The value does not
        depend on the chunking beyond rounding.
    n_batches : int, optional
        Use at most this many batches.
    train : bool
        Evaluate in training mode.  Each sample is then its own batch:
        BatchNorm normalizes it by its own statistics.  Default eval mode.
    seed : int or None
        Seed for dropout when ``train=True``; the global RNG is untouched.
    progress : bool
        Show a tqdm bar over chunks.

    Returns
    -------
    VarianceResult
        ``method="exact"``.

    Examples
    --------
    >>> import torch, flatness
    >>> model = torch.nn.Linear(4, 3)
    >>> data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> r = flatness.nonuniformity.gradient_variance(model, data, batch_size=4)
    >>> r.total > 0 and abs(r.noise - r.noise_factor * r.total) < 1e-12
    True
    """
    start = time.perf_counter()
    loss_fn = _check_common(model, loss_fn)
    batch_size = check_int("batch_size", batch_size, allow_none=True)
    chunk_size = check_chunk_size(chunk_size)
    memory_limit = check_int("memory_limit", memory_limit, allow_none=True)
    n_batches = check_n_batches(n_batches)
    check_bool("progress", progress)
    ps = select_params(model, params)
    moments = _Moments(len(ps.params))
    chunk, groups = _plan_chunks(ps, chunk_size, memory_limit)
    engines: dict[int, str] = {}
    first: int | None = None
    with ModelGuard(model, train=check_bool("train", train)), private_rng(seed, ps.device), \
            torch.inference_mode(False):
        batches = iter_batches(data, device=ps.device, dtype=ps.dtype, n_batches=n_batches)
        for inputs, targets in maybe_progress(batches, progress, None, "gradient variance"):
            first = first or _batch_len(targets)
            _stream_moments(model, ps, inputs, targets, loss_fn, moments, chunk, groups, engines)
    # Inside a torch.distributed process group: pool every rank's samples.
    merge_moments(moments)
    first = gather_objects(first)[0]
    per_layer: dict[str, float] = {}
    for k, name in enumerate(ps.names):
        per_layer[_layer_of(name)] = per_layer.get(_layer_of(name), 0.0) + moments.variance(k)
    mean_sq = sum(moments.mean_sqnorm(k) for k in range(len(ps.params)))
    result = _finish(
        "exact", per_layer, sum(per_layer.values()) + mean_sq, mean_sq, moments.n,
        batch_size or first,
        settings={"chunk_size": chunk_size, "memory_limit": memory_limit, "chunk": chunk,
                  "param_groups": len(groups), "n_batches": n_batches, "train": bool(train),
                  "params": list(ps.names)},
    )
    result.wall_time = time.perf_counter() - start
    return result


_FALLBACKS = ("exact", "skip")


@grad_enabled
def kfac_variance(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    batch_size: int | None = None,
    fallback: str = "exact",
    factors: bool = False,
    chunk_size: int | None = 64,
    memory_limit: int | None = PER_SAMPLE_MEMORY,
    n_batches: int | None = None,
    train: bool = False,
    seed: int | None = 0,
    progress: bool = False,
) -> VarianceResult:
    r"""Kronecker-factored approximation of the gradient-noise magnitude.

    For each ``Linear`` and ``Conv2d`` layer (weight and bias together),
    hooks record the layer inputs ``a`` and the per-sample output gradients
    ``e`` during one forward-backward pass per batch, and the uncentered
    second moment of the layer's per-sample gradients is approximated by
    ``A (x) G``:

    .. math::

        A_B = \frac{1}{|B|} \sum_{i\in B} \frac1T \sum_t \tilde a_{it} \tilde a_{it}^\top,
        \qquad
        G_B = \frac{1}{|B|} \sum_{i\in B} \sum_t e_{it} e_{it}^\top,

        \widehat{E\|g_i\|^2} = \sum_B \frac{|B|}{n} \operatorname{tr}(A_B)\operatorname{tr}(G_B),
        \qquad
        \widehat{\operatorname{tr} S} = \widehat{E\|g_i\|^2} - \|\bar g\|^2,

    where ``t`` runs over the ``T`` positions the layer is applied at
    (spatial locations of a convolution, whose inputs are the unfolded
    patches, per Grosse and Martens 2016; sequence positions of a Linear
    layer on 3-d inputs, batch first or sequence first, or on positions
    flattened into rows; ``T = 1`` otherwise), ``|B|`` is the number of
    samples (the length of the batch's targets, not the layer's leading
    dimension), ``a~`` has a 1 appended when
    the bias is selected, and ``g_bar`` is the exact mean gradient.  The
    factors are taken per batch (as in the paper's code, which keeps running
    averages of per-batch factors), so a batch of one sample makes a
    ``T = 1`` layer exact.  The traces need no unfolding: only
    ``factors=True`` forms ``A`` and ``G``.  The estimate is not clamped and
    can come out slightly negative when the noise is small.

    Parameters
    ----------
    model, data, loss_fn, params, batch_size, n_batches, train, seed, progress
        As in :func:`gradient_variance`.  ``loss_fn`` must be a mean over the
        batch: the output gradients are multiplied by the batch size to give
        per-sample-loss gradients.
    fallback : {"exact", "skip"}
        Parameters not in a supported layer (other layer types, grouped
        convolutions, parameters shared between modules, and layers whose
        weights are used where their hooks cannot see it: the projections
        of ``nn.MultiheadAttention``, ``F.linear(x, layer.weight)``, a module
        called twice, found in the first batch's pass - on every rank's
        first batch inside a ``torch.distributed`` process group, and then
        treated alike on all ranks - and listed in
        ``settings["hidden_from_hooks"]``): ``"exact"``
        computes their part with per-sample gradients (:func:`gradient_variance`'s
        method, listed in ``exact_layers``); ``"skip"`` leaves them out and
        lists them in ``unsupported``.
    factors : bool
        Also return the data-averaged factors ``A = sum_B |B| A_B / n`` and
        ``G = sum_B |B| G_B / n`` of every factored layer in
        ``result.factors`` (zeros for a layer no gradient reached; costs a
        matrix product per layer and batch; see
        :func:`flatness._kfac.factors` for their index order).
    chunk_size, memory_limit : int or None
        Chunking of the exact fallback, as in :func:`gradient_variance`.

    Notes
    -----
    Memory.  The state kept across batches is, per factored layer, a
    float64 scalar (the running ``sum tr(A_B) tr(G_B)``) and the running
    sum of its batch gradients (the size of the layer's parameters: 1 P
    over all factored layers), plus with ``factors=True`` the two factors
    (``(d_in + 1)^2`` and ``d_out^2`` entries for a Linear layer,
    ``(C_in k_h k_w + 1)^2`` and ``C_out^2`` for a convolution).  During a
    batch the hooks hold each layer's inputs and output gradients (the
    activations of one forward-backward pass) and the batch gradient (1 P).
    No per-sample gradient of a factored layer is ever formed; the exact
    fallback streams as :func:`gradient_variance` does (its running mean
    and at most ``memory_limit`` bytes of per-sample gradients).

    Returns
    -------
    VarianceResult
        ``method="kfac"``.

    Raises
    ------
    ValueError
        Unknown ``fallback``; a factored module called twice in a forward
        pass after the first batch (which decides the plan); ``batch_size``
        above the number of samples; and the conventions' input errors.
    """
    start = time.perf_counter()
    loss_fn = _check_common(model, loss_fn)
    if fallback not in _FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; valid: {', '.join(_FALLBACKS)}")
    batch_size = check_int("batch_size", batch_size, allow_none=True)
    chunk_size = check_chunk_size(chunk_size)
    memory_limit = check_int("memory_limit", memory_limit, allow_none=True)
    n_batches = check_n_batches(n_batches)
    refuse_summed_loss_over_batches(loss_fn, data, "kfac_variance", n_batches)
    check_bool("factors", factors)
    check_bool("progress", progress)
    ps = select_params(model, params)
    layers, rest = plan(model, ps)
    blind: dict[str, str] = {}

    def setup() -> None:
        nonlocal exact, factored, second, grad_sum, moments
        exact = _subset(ps, rest) if rest and fallback == "exact" else None
        factored = [k for layer in layers for k in layer.indices]
        second = {layer.name: torch.zeros((), dtype=torch.float64, device=ps.device) for layer in layers}
        # sum over batches of |B| * batch gradient; None until a gradient arrives
        grad_sum = [None] * len(factored)
        # nothing is computed exactly with fallback="skip" (and nothing pooled)
        moments = _Moments(len(exact.params) if exact is not None else 0)

    exact: ParamSet | None = None
    factored: list[int] = []
    second: dict[str, Tensor] = {}
    grad_sum: list[Tensor | None] = []
    moments = _Moments(0)
    setup()
    fac_sum: dict[str, list[Tensor]] = {}
    plan_exact: tuple[int | None, list[list[int]]] | None = None
    engines: dict[int, str] = {}
    n = 0
    first: int | None = None
    with ModelGuard(model, train=check_bool("train", train)), private_rng(seed, ps.device), \
            torch.inference_mode(False), torch.enable_grad():
        batches = iter_batches(data, device=ps.device, dtype=ps.dtype, n_batches=n_batches)
        for inputs, targets in maybe_progress(batches, progress, None, "kfac variance"):
            nb = _batch_len(targets)
            checking = first is None  # the first batch decides the plan
            if checking:
                for k in factored:
                    ps.params[k].requires_grad_(True)  # restored by the guard
            first = first or nb
            n += nb
            if layers:
                found = _kfac_batch(model, ps, layers, factored, inputs, targets, loss_fn, nb,
                                    second, grad_sum, fac_sum if factors else None, check=checking)
                if checking and _distributed.enabled():
                    # Each rank's first batch judges its own data: a layer
                    # found on any rank is treated alike on every rank (the
                    # ranks then reduce the same running sums).
                    found = {name: why for part in gather_objects(found) for name, why in part.items()}
                if found:
                    # Layers whose weights are used where their hooks cannot
                    # see it are treated exactly or skipped (what this batch
                    # accumulated for them is dropped; the exact part of
                    # this batch comes next).
                    blind = found
                    for name in found:
                        fac_sum.pop(name, None)
                    kept_grads, kept_second = dict(zip(factored, grad_sum)), second
                    rest = sorted(rest + [k for layer in layers if layer.name in blind for k in layer.indices])
                    layers = [layer for layer in layers if layer.name not in blind]
                    setup()
                    grad_sum = [kept_grads[k] for k in factored]
                    second = {name: kept_second[name] for name in second}
            if exact is not None:
                if plan_exact is None:
                    plan_exact = _plan_chunks(exact, chunk_size, memory_limit)
                _stream_moments(model, exact, inputs, targets, loss_fn, moments, *plan_exact, engines)
    grad_sum = [torch.zeros_like(ps.params[k]) if g is None else g for k, g in zip(factored, grad_sum)]
    if factors:
        # every factored layer, in the plan's order (the same on every rank);
        # zeros for a layer no gradient reached (not called, or its output unused)
        fac_sum = {layer.name: fac_sum.get(layer.name) or _zero_factors(layer, ps) for layer in layers}
    _reduce_kfac(second, grad_sum, fac_sum, moments)
    n = sum_(n)
    first = gather_objects(first)[0]

    per_layer: dict[str, float] = {}
    mean_sq = 0.0
    second_total = 0.0
    pos = 0
    for layer in layers:
        sq = sum(float(torch.linalg.vector_norm(grad_sum[pos + j])) ** 2 / n**2 for j in range(len(layer.indices)))
        pos += len(layer.indices)
        sm = float(second[layer.name]) / n
        per_layer[layer.name] = per_layer.get(layer.name, 0.0) + sm - sq
        mean_sq += sq
        second_total += sm
    exact_layers: list[str] = []
    if exact is not None:
        for j, name in enumerate(exact.names):
            key = _layer_of(name)
            per_layer[key] = per_layer.get(key, 0.0) + moments.variance(j)
            sq = moments.mean_sqnorm(j)
            mean_sq += sq
            second_total += moments.variance(j) + sq
            if key not in exact_layers:
                exact_layers.append(key)
    unsupported = [ps.names[k] for k in rest] if fallback == "skip" else []
    fac = None
    if factors:
        fac = {name: (a / n, g / n) for name, (a, g) in fac_sum.items()}
    result = _finish(
        "kfac", per_layer, second_total, mean_sq, n, batch_size or first,
        exact_layers=exact_layers, unsupported=unsupported, factors=fac,
        settings={"fallback": fallback, "chunk_size": chunk_size, "memory_limit": memory_limit,
                  "n_batches": n_batches,
                  "train": bool(train), "params": list(ps.names),
                  "kfac_layers": [layer.name for layer in layers],
                  "hidden_from_hooks": blind},
    )
    result.wall_time = time.perf_counter() - start
    return result


def _zero_factors(layer: KFACLayer, ps: ParamSet) -> list[Tensor]:
    """Zero factors ``[A, G]`` of a layer no gradient reached."""
    ref = ps.params[layer.indices[0]]
    return [ref.new_zeros(d, d) for d in factor_dims(layer)]


def _reduce_kfac(
    second: dict[str, Tensor], grad_sum: list[Tensor], fac_sum: dict[str, list[Tensor]],
    moments: _Moments,
) -> None:
    """Sum :func:`kfac_variance`'s running sums over the ranks of a
    ``torch.distributed`` process group (no-op outside one)."""
    if not _distributed.enabled():
        return
    sum_(*second.values(), *grad_sum)
    keys = _distributed.gather_objects(list(fac_sum))
    if any(k != keys[0] for k in keys):
        raise ValueError(f"ranks saw different factored layers {keys}; every layer must take part on every rank")
    for name in keys[0]:
        sum_(*fac_sum[name])
    merge_moments(moments)


def _kfac_batch(
    model: nn.Module,
    ps: ParamSet,
    layers: list[KFACLayer],
    factored: list[int],
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn,
    nb: int,
    second: dict[str, Tensor],
    grad_sum: list[Tensor | None],
    fac_sum: dict[str, list[Tensor]] | None,
    check: bool = False,
) -> dict[str, str]:
    """One forward-backward pass: accumulate ``|B| tr(A_B) tr(G_B)``, the
    mean gradient and (optionally) the factors.

    ``check`` (the first batch): also find the layers whose hooks do not
    see every use of their weights (:func:`flatness._kfac.hidden_use`, on
    the gradients of this very pass), accumulate nothing for them, and
    return them with the reason (``{}`` otherwise).
    """
    with capture(layers) as store:
        # The real parameter tensors, so gradients flow to them (and the
        # hooks see the module's forward); autograd.grad leaves .grad alone.
        loss = functional_loss(model, ps, list(ps.params), inputs, targets, loss_fn)
        # |B| * the batch-mean loss: its gradient is the batch's share of the
        # sum over samples, and the output gradients the hooks see are the
        # per-sample-loss gradients e_i (loss_fn is a mean)
        grads = torch.autograd.grad(loss * nb, [ps.params[k] for k in factored], allow_unused=True)
    blind: dict[str, str] = {}
    if check:
        position = {k: i for i, k in enumerate(factored)}
        for layer in layers:
            true = [torch.zeros_like(ps.params[k]) if grads[position[k]] is None else grads[position[k]]
                    for k in layer.indices]
            reason = hidden_use(layer, store.get(layer.name, []), true)
            if reason is not None:
                blind[layer.name] = reason
        skip = {position[k] for layer in layers if layer.name in blind for k in layer.indices}
        grads = tuple(None if i in skip else g for i, g in enumerate(grads))
    for i, g in enumerate(grads):
        if g is not None:
            if grad_sum[i] is None:
                grad_sum[i] = g  # a fresh tensor from autograd.grad: no copy needed
            else:
                grad_sum[i].add_(g)
    for layer in layers:
        if layer.name in blind:
            continue
        calls = store.get(layer.name, [])
        if len(calls) > 1:
            raise ValueError(
                f"module {layer.name!r} is called {len(calls)} times per forward pass; "
                "Kronecker factors are defined for one call. Leave it out with params= "
                "or use gradient_variance"
            )
        if not calls or len(calls[0]) < 2:
            continue  # the layer did not take part in this loss: zero gradient
        entry = calls[0]
        a, e = entry
        # nb samples, whatever the layer's layout (sequence first, flattened)
        tr_a, tr_g = trace_terms(layer, a, e, n_samples=nb)
        second[layer.name] += (tr_a * tr_g).double() * nb
        if fac_sum is not None:
            fa, fg = kronecker_factors(layer, a, e, n_samples=nb)
            if layer.name in fac_sum:
                fac_sum[layer.name][0] += fa * nb
                fac_sum[layer.name][1] += fg * nb
            else:
                fac_sum[layer.name] = [fa * nb, fg * nb]
    return blind

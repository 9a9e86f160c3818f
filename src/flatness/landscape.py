"""Loss landscapes: directions, 1-D and 2-D slices, interpolation and loss
barriers between solutions.

* :func:`directions`: random, filter- or layer-normalised random (Li et al.,
  NeurIPS 2018), top Hessian eigenvectors, or the principal components of a
  training trajectory;
* :func:`slice`: loss, accuracy and any metric on a 1-D or 2-D grid
  ``w + a u (+ b v)``, with BatchNorm statistics kept or re-estimated at
  every point;
* :func:`interpolate`: the straight line between two solutions (Goodfellow
  et al., ICLR 2015);
* :func:`loss_barrier`: the barrier height of linear mode connectivity
  (Entezari et al., ICLR 2022; Frankle et al., ICML 2020), pairwise for an
  ensemble.

Every grid point is evaluated with ``torch.func.functional_call`` on tensors
of the library's own; the model comes back bit for bit, the global RNG is
untouched.  See :doc:`/guide/landscape`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_device, check_int, working_dtype
from ._functional import LossFn
from ._landscape import (
    Evaluator,
    axis,
    barrier_height,
    bn_layers,
    check_common,
    check_reiterable,
    evaluate,
    grid_coords,
    matching_buffers,
    matching_params,
    normalised,
    pca,
    resolve_directions,
)
from ._params import moved_state, select_params, unwrap
from ._results import ResultMixin
from ._rng import check_seed, private_rng

__all__ = [
    "BarrierResult",
    "Directions",
    "InterpolationResult",
    "SliceResult",
    "directions",
    "interpolate",
    "loss_barrier",
    "slice",
]

KINDS = ("filter", "layer", "random", "eigen", "pca")
BARRIERS = ("entezari", "frankle")


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot() needs matplotlib: pip install 'flatness[plot]'") from exc
    return plt


# --------------------------------------------------------------------------
# directions
# --------------------------------------------------------------------------


@dataclass
class Directions(ResultMixin):
    """Directions in parameter space (the outcome of :func:`directions`).

    Attributes
    ----------
    kind : str
        ``"filter"``, ``"layer"``, ``"random"``, ``"eigen"`` or ``"pca"``.
    names : list of str
        Names of the parameters the directions live on.
    vectors : list of list of Tensor
        ``vectors[i]`` is direction ``i`` as tensors shaped like the
        parameters (left out of ``to_dict``).  ``len(d)`` and ``d[i]`` index
        them.
    eigenvalues : list of float or None
        Hessian eigenvalues (``kind="eigen"``).
    explained_variance, explained_variance_ratio : list of float or None
        Variance of the checkpoints along each principal direction and its
        share of the total (``kind="pca"``).
    trajectory : list of list of float or None
        Coordinates of the checkpoints (and last, the final weights at the
        origin) in the plane of the directions (``kind="pca"``).
    settings : dict
    """

    kind: str
    names: list[str]
    vectors: list[list[Tensor]]
    eigenvalues: list[float] | None = None
    explained_variance: list[float] | None = None
    explained_variance_ratio: list[float] | None = None
    trajectory: list[list[float]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    _skip = ("vectors",)

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, i: int) -> list[Tensor]:
        return self.vectors[i]


def directions(
    model: nn.Module,
    kind: str = "filter",
    k: int = 2,
    *,
    data: Any = None,
    checkpoints: Sequence[Any] | None = None,
    params: Iterable[Any] | None = None,
    bias: str = "zero",
    center: bool = True,
    seed: int | None = 0,
    **eigen_options: Any,
) -> Directions:
    """Directions in parameter space for :func:`slice`.

    Parameters
    ----------
    model : nn.Module
        The model whose weights the directions start from (not modified).
    kind : {"filter", "layer", "random", "eigen", "pca"}
        ``"random"``: i.i.d. standard normal entries.  ``"filter"``: random,
        then each filter (slice along the first dimension: a row of a
        ``Linear`` weight, an output channel of a convolution) rescaled to
        the norm of the same filter of the weights (Li et al., 2018).
        ``"layer"``: random, each parameter tensor rescaled to the norm of
        the weight tensor.  ``"eigen"``: the top-``k`` Hessian eigenvectors
        (unit norm) from :func:`flatness.hessian.top_eigenvalues` on
        ``data``.  ``"pca"``: the top-``k`` principal directions (unit norm)
        of ``checkpoints`` relative to the model's weights, with the
        explained variance and the trajectory's coordinates.
    k : int
        Number of directions (1 or 2 for a slice).
    data : batch or iterable of batches
        Needed by ``kind="eigen"``.
    checkpoints : list
        Needed by ``kind="pca"``: models, state dicts or lists of tensors
        (one per selected parameter), e.g. the weights after each epoch.
    params : iterable, optional
        Parameters the directions live on (default: all with
        ``requires_grad``).
    bias : {"zero", "keep"}
        ``"filter"``/``"layer"`` only: one-dimensional parameters (biases,
        BatchNorm scales and shifts) get a zero direction (default, the
        paper's choice) or the weights themselves (the paper's code without
        ``--xignore biasbn``).
    center : bool
        ``"pca"`` only: subtract the mean difference before the SVD (as the
        paper's code does through scikit-learn's PCA).
    seed : int or None
        Seed of the private generator (random kinds) and of Lanczos' start.
    **eigen_options
        ``"eigen"`` only: passed to :func:`flatness.hessian.top_eigenvalues`
        (``loss_fn``, ``n_batches``, ``tol``, ...).

    Returns
    -------
    Directions
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    k = check_int("k", k, 1)
    if kind != "pca":  # (which draws nothing)
        seed = check_seed(seed)
    if bias not in ("zero", "keep"):
        raise ValueError(f"bias must be 'zero' or 'keep', got {bias!r}")
    if eigen_options and kind != "eigen":
        raise TypeError(f"unexpected options for kind={kind!r}: {sorted(eigen_options)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ps = select_params(model, params)
    if kind == "eigen":
        if data is None:
            raise ValueError("kind='eigen' needs data=")
        from .hessian import top_eigenvalues

        res = top_eigenvalues(model, data, k=k, params=params, seed=seed, **eigen_options)
        return Directions(
            kind="eigen", names=list(ps.names), vectors=[[t.detach() for t in v] for v in res.eigenvectors],
            eigenvalues=res.eigenvalues.tolist(),
            settings={"k": k, "seed": seed, "converged": res.converged, "n_hvp": res.n_hvp},
        )
    if kind == "pca":
        if checkpoints is None:
            raise ValueError("kind='pca' needs checkpoints=")
        return Directions(**pca(ps, checkpoints, k, bool(center)))
    with private_rng(seed, ps.device) as gen:
        vectors = []
        # A float16 / bfloat16 model gets the float32 draw, normalised in
        # float32 and rounded: randn's stream depends on the dtype, so a
        # draw in the low precision would be another direction than the
        # float32 model's for the same seed (and its filter norms rounded).
        work = working_dtype(ps.dtype)
        for _ in range(k):
            d = [torch.randn(p.shape, generator=gen, device=ps.device, dtype=work) for p in ps.params]
            if kind != "random":
                d = [normalised(t, p.detach().to(work), kind == "filter", bias) for t, p in zip(d, ps.params)]
            vectors.append([t.to(ps.dtype) for t in d])
    return Directions(kind=kind, names=list(ps.names), vectors=vectors,
                      settings={"k": k, "seed": seed, "bias": bias if kind != "random" else None})


# --------------------------------------------------------------------------
# slices
# --------------------------------------------------------------------------


@dataclass
class SliceResult(ResultMixin):
    """Outcome of :func:`slice` (and the grid part of :func:`interpolate`).

    Attributes
    ----------
    coords : list of list of float
        Coordinates along each direction.
    loss : Tensor
        ``(n1,)`` or ``(n1, n2)`` float64, the size-weighted mean loss at
        ``w + coords[0][i] u (+ coords[1][j] v)``.
    accuracy : Tensor or None
        Same shape, for class scores and integer labels; else ``None``.
    metrics : dict of str to Tensor
        The extra metrics, same shape.
    center_loss : float
        The loss at the unperturbed weights (with ``bn="recompute"``: with
        statistics re-estimated there too); evaluated as one more point when
        the grid does not contain the origin.
    directions : dict
        ``kind`` and ``settings`` of the directions (plus ``eigenvalues``,
        ``explained_variance_ratio``).
    trajectory : list of list of float or None
        PCA trajectory in the plane (overlaid by :meth:`plot`).
    settings : dict
    wall_time : float
    counts : dict
        ``{"forward": ...}``: forward passes, each over one batch (a
        ``vmap``-ed pass over several points counts once).
    """

    coords: list[list[float]]
    loss: Tensor
    accuracy: Tensor | None
    metrics: dict[str, Tensor]
    center_loss: float
    directions: dict[str, Any] = field(default_factory=dict)
    trajectory: list[list[float]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def plot(self, ax: Any = None, *, value: str = "loss", levels: int = 30,
             vmin: float | None = None, vmax: float | None = None, log: bool = False,
             colorbar: bool = True, cmap: str = "viridis") -> Any:
        """A line plot (1-D) or a filled contour plot with a colour bar (2-D,
        with the PCA trajectory overlaid when there is one).

        Parameters
        ----------
        ax : matplotlib Axes, optional
        value : str
            ``"loss"``, ``"accuracy"`` or the name of a metric.
        levels : int
            Contour levels (2-D).
        vmin, vmax : float, optional
            Colour range (2-D): give the same to plots meant to be compared.
        log : bool
            Plot ``log10`` of the value.
        colorbar : bool
        cmap : str

        Returns
        -------
        matplotlib Axes
        """
        plt = _pyplot()
        z = self._values(value)
        if log:
            z = torch.log10(z)
        if ax is None:
            _, ax = plt.subplots()
        label = f"log10 {value}" if log else value
        if z.dim() == 1:
            ax.plot(self.coords[0], z.tolist(), marker=".")
            ax.set_xlabel("alpha")
            ax.set_ylabel(label)
            return ax
        x, y = self.coords
        lo = float(z[torch.isfinite(z)].min()) if vmin is None else vmin
        hi = float(z[torch.isfinite(z)].max()) if vmax is None else vmax
        import numpy as np

        cs = ax.contourf(x, y, z.T.numpy(), levels=np.linspace(lo, hi, levels), cmap=cmap, extend="both")
        ax.contour(x, y, z.T.numpy(), levels=np.linspace(lo, hi, levels)[::3], colors="k", linewidths=0.3)
        if self.trajectory is not None:
            t = list(zip(*self.trajectory))
            ax.plot(t[0], t[1], "o-", color="w", markersize=3, linewidth=1)
            ax.plot([t[0][-1]], [t[1][-1]], "r*", markersize=10)
        if colorbar:
            ax.figure.colorbar(cs, ax=ax, label=label)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        return ax

    def _values(self, value: str) -> Tensor:
        if value == "loss":
            return self.loss
        if value == "accuracy":
            if self.accuracy is None:
                raise ValueError("no accuracy was recorded (outputs are not class scores)")
            return self.accuracy
        if value not in self.metrics:
            raise ValueError(f"unknown value {value!r}; recorded: loss, accuracy, {', '.join(self.metrics)}")
        return self.metrics[value]


def slice(
    model: nn.Module,
    data: Any,
    directions: Directions | Sequence[Any],
    grid: Any = 21,
    *,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
    params: Iterable[Any] | None = None,
    bn: str = "keep",
    bn_data: Any = None,
    bn_batches: int | None = None,
    n_batches: int | None = None,
    engine: str = "auto",
    chunk_size: int = 16,
    split: str = "data",
    seed: int | None = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> SliceResult:
    """Loss (accuracy, metrics) on a 1-D or 2-D slice ``w + a u (+ b v)``.

    Parameters
    ----------
    model : nn.Module
        Not modified: every point is evaluated through ``functional_call``.
    data : batch or iterable of batches
        Re-iterable (a list or a ``DataLoader``) when ``bn="recompute"``.
    directions : Directions or list
        From :func:`directions`, or a list of one or two directions, each a
        list of tensors shaped like the selected parameters (or a
        ``{name: tensor}`` dict).
    grid : int, (lo, hi, n), sequence, or a list of one per direction
        Coordinates along each direction: ``n`` points in ``[-1, 1]`` for an
        int (default 21; a NumPy integer too), ``n`` points in ``[lo, hi]``
        for a tuple whose last entry is an int, or explicit values (a list
        or tensor of numbers; a lone float, even ``21.0``, is one
        coordinate).  For two directions, a list of two such specs gives each
        axis its own.
    loss_fn : callable, optional
        Mean loss of a batch (default: cross-entropy).
    metrics : dict, optional
        Extra ``{name: fn(outputs, targets) -> scalar mean}`` to record.
    params : iterable, optional
        The parameters the directions live on (must match the directions).
    bn : {"keep", "recompute"}
        ``"keep"``: BatchNorm uses the model's running statistics at every
        point.  ``"recompute"``: at every point the statistics are
        re-estimated on ``bn_batches`` batches of ``bn_data`` (default:
        ``data``) by a training-mode pass, as
        :func:`torch.optim.swa_utils.update_bn` does (equal-weight mean over
        batches), as the mode-connectivity papers do.
    n_batches : int, optional
        Use at most this many batches of ``data``.
    engine : {"auto", "loop", "vmap"}
        One forward pass per point, or ``chunk_size`` points per ``vmap``-ed
        pass.  ``"auto"`` loops on a CPU (the arithmetic dominates) and
        probes both on a GPU.  A plain ``nn.Sequential`` starting with an
        ``nn.Linear`` computes the first layer once per batch for all points
        (exact by linearity).
    chunk_size : int
        Points per ``vmap`` call.
    split : {"data", "grid"}
        Under ``torch.distributed``: ``"data"`` (default, like every
        measurement of the library) has each rank evaluate all points on its
        shard of the data, summed over ranks; ``"grid"`` has each rank hold
        all the data and evaluate every ``world``-th point, gathered.
    seed : int or None
        Seeds dropout in the training-mode passes of ``bn="recompute"``.
    progress : bool
        tqdm bar over batches (over points with ``bn="recompute"``).
    device : str or torch.device, optional
        Evaluate on this device with copies of the weights.

    Returns
    -------
    SliceResult

    Notes
    -----
    Non-finite losses at far points are kept as they are (``inf``/``nan``),
    since they are part of the picture.
    """
    start = time.perf_counter()
    loss_fn, metrics = check_common(model, loss_fn, metrics, bn, engine, split)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    n_batches = check_int("n_batches", n_batches, 1, allow_none=True)
    bn_batches = check_int("bn_batches", bn_batches, 1, allow_none=True)
    check_bool("progress", progress)
    seed = check_seed(seed)
    ps = select_params(model, params)
    dev = check_device(device) if device is not None else ps.device
    info = directions if isinstance(directions, Directions) else None
    dirs = resolve_directions(info.vectors if info else directions, info.names if info else None, ps, dev)
    coords = grid_coords(grid, len(dirs))
    if bn == "recompute" and not bn_layers(model):
        raise ValueError("bn='recompute' needs a BatchNorm layer with running statistics; the model has none")
    ev = Evaluator(model, ps, [p.detach().to(dev) for p in ps.params], dirs, loss_fn, metrics,
                   moved_state(model, ps, dev))
    if len(dirs) == 1:
        points = [[a] for a in coords[0]]
    else:
        points = [[a, b] for a in coords[0] for b in coords[1]]
    origin = [0.0] * len(dirs)
    extra_centre = origin not in points
    if extra_centre:
        points.append(origin)  # the centre, when the grid misses it
    scores, engine_info = evaluate(
        ev, data, points, device=dev, dtype=ps.dtype, n_batches=n_batches, bn=bn,
        bn_data=data if bn_data is None else bn_data, bn_batches=bn_batches, engine=engine,
        chunk_size=chunk_size, split=split, progress=progress, seed=seed, model=model,
    )
    shape = [len(c) for c in coords]
    centre = scores[-1] if extra_centre else scores[points.index(origin)]
    grid_scores = (scores[:-1] if extra_centre else scores).reshape(*shape, scores.shape[1])
    acc = grid_scores[..., 1]
    desc: dict[str, Any] = {"kind": info.kind if info else "given"}
    if info is not None:
        desc["settings"] = info.settings
        for key in ("eigenvalues", "explained_variance_ratio"):
            if getattr(info, key) is not None:
                desc[key] = getattr(info, key)
    settings = {
        "bn": bn, "bn_batches": bn_batches, "n_batches": n_batches, "params": list(ps.names),
        "device": str(dev), "dtype": str(ps.dtype), "chunk_size": chunk_size, "seed": seed, **engine_info,
    }
    return SliceResult(
        coords=coords, loss=grid_scores[..., 0].clone(),
        accuracy=None if torch.isnan(acc).all() else acc.clone(),
        metrics={name: grid_scores[..., 2 + i].clone() for i, name in enumerate(metrics)},
        center_loss=float(centre[0]), directions=desc,
        trajectory=info.trajectory if info is not None and info.kind == "pca" and len(dirs) == 2 else None,
        settings=settings, wall_time=time.perf_counter() - start, counts={"forward": ev.forward},
    )


# --------------------------------------------------------------------------
# interpolation and barriers
# --------------------------------------------------------------------------


@dataclass
class InterpolationResult(ResultMixin):
    """Outcome of :func:`interpolate`.

    Attributes
    ----------
    t : list of float
        Positions on the line ``(1 - t) a + t b``.
    loss, accuracy, metrics
        As in :class:`SliceResult`, one value per ``t``.
    loss_a, loss_b : float
        Loss of the end points.
    barrier : float
        The barrier height over the points with ``0 <= t <= 1`` (see
        :func:`loss_barrier` for the definitions); NaN when there are none.
    barrier_kind : str
    on : str
        ``"loss"`` or ``"error"`` (one minus accuracy).
    settings : dict
    wall_time : float
    counts : dict
    """

    t: list[float]
    loss: Tensor
    accuracy: Tensor | None
    metrics: dict[str, Tensor]
    loss_a: float
    loss_b: float
    barrier: float
    barrier_kind: str = "entezari"
    on: str = "loss"
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def plot(self, ax: Any = None, *, value: str = "loss") -> Any:
        """Line plot of ``value`` along ``t`` with the chord between the end points."""
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots()
        if value == "loss":
            y = self.loss
        elif value == "accuracy" and self.accuracy is not None:
            y = self.accuracy
        elif value in self.metrics:
            y = self.metrics[value]
        else:
            raise ValueError(f"unknown or unrecorded value {value!r}")
        ax.plot(self.t, y.tolist(), marker=".", label=value)
        if value == "loss":
            ax.plot([0.0, 1.0], [self.loss_a, self.loss_b], "k--", linewidth=0.8, label="chord")
        ax.set_xlabel("t")
        ax.set_ylabel(value)
        ax.legend()
        return ax


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    n_points: int = 21,
    *,
    t: Sequence[float] | None = None,
    barrier: str = "entezari",
    on: str = "loss",
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
    params: Iterable[Any] | None = None,
    bn: str = "keep",
    bn_data: Any = None,
    bn_batches: int | None = None,
    n_batches: int | None = None,
    engine: str = "auto",
    chunk_size: int = 16,
    split: str = "data",
    seed: int | None = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> InterpolationResult:
    """Loss along the straight line ``(1 - t) a + t b`` between two solutions.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Same architecture; neither is modified.  The forward pass is
        ``model_a``'s; parameters outside ``params`` are ``model_a``'s.
    data : batch or iterable of batches
    n_points : int
        Points in ``[0, 1]`` (ignored when ``t`` is given).
    t : sequence of float, optional
        Explicit positions (values outside ``[0, 1]`` extrapolate).
    barrier : {"entezari", "frankle"}
        Which barrier height to report (see :func:`loss_barrier`).
    on : {"loss", "error"}
        The barrier of the loss or of the error rate (one minus accuracy).
    bn : {"keep", "recompute"}
        ``"keep"``: floating buffers (BatchNorm running statistics) are
        interpolated with the weights, so both ends are the models as they
        are.  ``"recompute"``: re-estimated at every point as in
        :func:`slice`.
    loss_fn, metrics, params, bn_data, bn_batches, n_batches, engine, chunk_size, split, seed, progress, device
        As in :func:`slice`.

    Returns
    -------
    InterpolationResult
    """
    start = time.perf_counter()
    loss_fn, metrics = check_common(model_a, loss_fn, metrics, bn, engine, split)
    if barrier not in BARRIERS:
        raise ValueError(f"barrier must be one of {', '.join(BARRIERS)}, got {barrier!r}")
    if on not in ("loss", "error"):
        raise ValueError(f"on must be 'loss' or 'error', got {on!r}")
    n_batches = check_int("n_batches", n_batches, 1, allow_none=True)
    bn_batches = check_int("bn_batches", bn_batches, 1, allow_none=True)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    check_bool("progress", progress)
    seed = check_seed(seed)
    ts = axis(t) if t is not None else axis((0.0, 1.0, check_int("n_points", n_points, 2)))
    ps = select_params(model_a, params)
    named_b = matching_params(model_a, model_b, ps)
    if bn == "recompute" and not bn_layers(model_a):
        raise ValueError("bn='recompute' needs a BatchNorm layer with running statistics; the model has none")
    dev = check_device(device) if device is not None else ps.device
    bufs_a = dict(unwrap(model_a).named_buffers())
    moving = [n for n, b in bufs_a.items() if b.is_floating_point()]
    bufs_b = matching_buffers(model_b, bufs_a, moving)
    base = [p.detach().to(dev) for p in ps.params]
    dirs = [[named_b[n].detach().to(dev, ps.dtype) - b for n, b in zip(ps.names, base)]]
    b0 = [bufs_a[n].detach().to(dev) for n in moving]
    db = [bufs_b[n].detach().to(dev, bufs_a[n].dtype) - b for n, b in zip(moving, b0)]
    ev = Evaluator(model_a, ps, base, dirs, loss_fn, metrics, moved_state(model_a, ps, dev),
                   buffers=(moving, b0, db) if moving else None)
    points = [[x] for x in ts] + [[0.0], [1.0]]
    scores, engine_info = evaluate(
        ev, data, points, device=dev, dtype=ps.dtype, n_batches=n_batches, bn=bn,
        bn_data=data if bn_data is None else bn_data, bn_batches=bn_batches, engine=engine,
        chunk_size=chunk_size, split=split, progress=progress, seed=seed, model=model_a,
    )
    line, ends = scores[:-2], scores[-2:]
    if on == "error":
        if torch.isnan(scores[:, 1]).any():
            raise ValueError("on='error' needs class scores and integer labels (accuracy)")
        y, ya, yb = 1 - line[:, 1], 1 - float(ends[0, 1]), 1 - float(ends[1, 1])
    else:
        y, ya, yb = line[:, 0], float(ends[0, 0]), float(ends[1, 0])
    acc = line[:, 1]
    settings = {
        "bn": bn, "bn_batches": bn_batches, "n_batches": n_batches, "params": list(ps.names),
        "device": str(dev), "dtype": str(ps.dtype), "seed": seed, "interpolated_buffers": moving,
        **engine_info,
    }
    return InterpolationResult(
        t=ts, loss=line[:, 0].clone(), accuracy=None if torch.isnan(acc).all() else acc.clone(),
        metrics={name: line[:, 2 + i].clone() for i, name in enumerate(metrics)},
        loss_a=float(ends[0, 0]), loss_b=float(ends[1, 0]), barrier=barrier_height(ts, y, ya, yb, barrier),
        barrier_kind=barrier, on=on, settings=settings, wall_time=time.perf_counter() - start,
        counts={"forward": ev.forward},
    )


@dataclass
class BarrierResult(ResultMixin):
    """Outcome of :func:`loss_barrier`.

    Attributes
    ----------
    matrix : Tensor
        ``(m, m)`` float64: the barrier between members ``i`` and ``j``
        (symmetric, zero diagonal).
    value : float
        Mean over the pairs (the barrier itself for two models).
    kind : str
    on : str
    t : list of float
    curves : dict
        ``"i-j"`` -> the loss (or error) along the line from member ``i``
        to member ``j``.
    settings : dict
    wall_time : float
    """

    matrix: Tensor
    value: float
    kind: str
    on: str
    t: list[float]
    curves: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def __float__(self) -> float:
        return float(self.value)

    def plot(self, ax: Any = None, *, cmap: str = "magma", annotate: bool = True) -> Any:
        """Heat map of the pairwise barrier matrix with a colour bar."""
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots()
        m = self.matrix.numpy()
        im = ax.imshow(m, cmap=cmap)
        ax.figure.colorbar(im, ax=ax, label=f"{self.on} barrier ({self.kind})")
        if annotate:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    color = "w" if m[i, j] < m.max() / 2 else "k"
                    ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", color=color)
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_xlabel("member")
        ax.set_ylabel("member")
        return ax


def loss_barrier(
    models: Sequence[nn.Module],
    data: Any,
    n_points: int = 11,
    *,
    kind: str = "entezari",
    on: str = "loss",
    **options: Any,
) -> BarrierResult:
    r"""Loss barrier of linear mode connectivity, for every pair of models.

    With :math:`L(t)` the loss of :math:`(1 - t)\,a + t\,b` on the points
    ``t`` in ``[0, 1]``:

    * ``kind="entezari"`` (default; Entezari et al., ICLR 2022):
      :math:`\max_t L(t) - ((1 - t) L(a) + t L(b))`, the largest rise above
      the chord: 0 when the line is (numerically) convex, as it is inside
      one convex bowl (the end points give 0, the inside is below).
    * ``kind="frankle"`` (Frankle et al., ICML 2020): :math:`\max_t L(t) -
      (L(a) + L(b)) / 2`.

    Parameters
    ----------
    models : sequence of nn.Module
        Two or more models of the same architecture (none is modified).
    data : batch or iterable of batches
        Re-iterable (a list or a ``DataLoader``) for three or more models:
        each pair reads it again.
    n_points : int
        Points on each line, end points included.
    kind : {"entezari", "frankle"}
    on : {"loss", "error"}
        Barrier of the loss, or of the error rate (Frankle et al.).
    **options
        Passed to :func:`interpolate` (``loss_fn``, ``bn``, ``params``,
        ``n_batches``, ``device``, ...).

    Returns
    -------
    BarrierResult
    """
    start = time.perf_counter()
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError("models must be a sequence of nn.Module")
    if len(models) < 2:
        raise ValueError(f"a barrier needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
    if kind not in BARRIERS:
        raise ValueError(f"kind must be one of {', '.join(BARRIERS)}, got {kind!r}")
    if "t" in options or "barrier" in options:
        raise TypeError("loss_barrier takes n_points= and kind=, not t= or barrier=")
    m = len(models)
    if m > 2:
        check_reiterable(data, "data", f"each of the {m * (m - 1) // 2} pairs of models reads it again")
    matrix = torch.zeros(m, m, dtype=torch.float64)
    curves: dict[str, list[float]] = {}
    ts: list[float] = []
    settings: dict[str, Any] = {}
    for i in range(m):
        for j in range(i + 1, m):
            r = interpolate(models[i], models[j], data, n_points, barrier=kind, on=on, **options)
            matrix[i, j] = matrix[j, i] = r.barrier
            curves[f"{i}-{j}"] = (1 - r.accuracy if on == "error" else r.loss).tolist()
            ts, settings = r.t, r.settings
    value = float(matrix[torch.triu_indices(m, m, 1).unbind()].mean())
    return BarrierResult(matrix=matrix, value=value, kind=kind, on=on, t=ts, curves=curves,
                         settings={**settings, "n_models": m}, wall_time=time.perf_counter() - start)

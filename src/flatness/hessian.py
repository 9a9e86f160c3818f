"""Curvature of the loss: Hessian-vector products, top eigenvalues, trace,
spectral density and minimum sharpness.

Every function takes a model and data with the library's conventions (one
batch or an iterable of batches, ``loss_fn``, ``params``, ``seed``,
``n_batches``, ``progress``, ``train``) and leaves the model exactly as it
was.  Over several batches the curvature is that of the size-weighted mean
loss, ``sum_b (n_b / N) H_b``; the batches are streamed again for every
product, so ``data`` must be re-iterable (a list or a ``DataLoader``; a
shuffling loader is fine when all batches are used).

Products come from ``torch.func`` (forward-over-reverse, ``k`` vectors per
``vmap`` call); see :class:`CurvatureOperator` for using them with your own
solver.  The algorithms are described in :doc:`/guide/curvature`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flatness._checks import (
    LOW_PRECISION,
    check_bool,
    check_int,
    is_real,
    kernel_eps,
    product_bar,
    user_stacklevel,
    working_dtype,
)
from flatness._functional import LossFn, grad_enabled
from flatness._hvp import CurvatureOperator, check_real_floating
from flatness._lanczos import (
    check_max_basis,
    exact_diagonal,
    gaussian_density,
    hutchinson,
    hutchpp,
    lanczos,
    slq_nodes,
)
from flatness._minimum import MinimumSharpnessResult, minimum_sharpness
from flatness._params import given_order
from flatness._results import ResultMixin
from flatness._rng import check_seed, private_rng

__all__ = [
    "CurvatureOperator",
    "EigenResult",
    "MinimumSharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "hvp",
    "minimum_sharpness",
    "spectral_density",
    "top_eigenvalues",
    "trace",
]

TRACE_METHODS = ("hutch++", "hutchinson", "exact")

#: Sketch vectors of Hutch++ by default (at most ``n_samples // 3``): each
#: is held through the call, one parameter size, and on large models (whose
#: Hessian's bulk dominates the variance) a larger sketch only leaves fewer
#: products to the Hutchinson part.
DEFAULT_SKETCH = 1


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------


@dataclass
class EigenResult(ResultMixin):
    """Outcome of :func:`top_eigenvalues`.

    Attributes
    ----------
    eigenvalues : Tensor
        ``(k,)`` float64, ordered as requested (largest first for ``"LA"``).
    eigenvectors : list of list of Tensor
        ``eigenvectors[i]`` is the ``i``-th unit eigenvector as tensors shaped
        like the selected parameters (left out of ``to_dict``).
    names : list of str
        Names of the selected parameters.
    residuals : Tensor
        ``||H y_i - lambda_i y_i||`` for each pair.
    n_hvp : int
        Curvature-vector products spent (each one a pass over the data).
    n_iter : int
        Lanczos steps.
    converged : bool
    settings : dict
    wall_time : float
    engine : str
        ``"forward-over-reverse"`` or ``"double-backward"``: how the products
        were computed (``settings["engine_reason"]`` says why).
    """

    eigenvalues: Tensor
    eigenvectors: list[list[Tensor]]
    names: list[str]
    residuals: Tensor
    n_hvp: int
    n_iter: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    engine: str = ""
    _skip = ("eigenvectors",)


@dataclass
class TraceResult(ResultMixin):
    """Outcome of :func:`trace`.

    Attributes
    ----------
    value : float
        The trace estimate.
    std_error : float
        Its standard error (0 for ``method="exact"``).
    method : str
    n_hvp : int
    samples : Tensor
        The random quadratic forms the estimate averages (empty for exact).
    settings : dict
    wall_time : float
    engine : str
        ``"forward-over-reverse"`` or ``"double-backward"``: how the products
        were computed (``settings["engine_reason"]`` says why).
    """

    value: float
    std_error: float
    method: str
    n_hvp: int
    samples: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    engine: str = ""

    def __float__(self) -> float:
        return float(self.value)


@dataclass
class SpectralDensity(ResultMixin):
    """Outcome of :func:`spectral_density`.

    Attributes
    ----------
    grid : Tensor
        Eigenvalue axis.
    density : Tensor
        Smoothed density on ``grid`` (integrates to about 1).
    nodes, weights : Tensor
        ``(n_vectors, n_steps)`` Gauss quadrature nodes and weights, one row
        per start vector; ``mean_v sum_i w_vi theta_vi**p`` estimates
        ``tr(H**p) / n``.
    sigma : float
        Width of the Gaussian kernel.
    n_hvp : int
    settings : dict
    wall_time : float
    engine : str
        ``"forward-over-reverse"`` or ``"double-backward"``: how the products
        were computed (``settings["engine_reason"]`` says why).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    n_hvp: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    engine: str = ""

    def moment(self, p: int) -> float:
        """Estimate of ``tr(H**p) / n`` from the quadrature (no smoothing)."""
        return float((self.weights * self.nodes**p).sum(1).mean())

    def plot(self, ax: Any = None, *, log: bool = False, floor: float = 1e-6, **kwargs: Any) -> Any:
        """Plot the density with matplotlib (``pip install flatness[plot]``);
        returns the axes.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw (default: a new figure).
        log : bool
            A logarithmic density axis, which shows the small outlying
            eigenvalues next to the bulk.  Its lower end is ``floor`` times
            the peak density: the Gaussian smoothing's tails fall to 1e-300
            and would otherwise stretch the axis over 300 decades.
        floor : float
            Lower end of the log axis, relative to the peak.
        **kwargs
            Passed to ``ax.plot``.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("SpectralDensity.plot needs matplotlib: pip install 'flatness[plot]'") from exc
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.grid.numpy(), self.density.numpy(), **kwargs)
        if log:
            peak = float(self.density.max())
            ax.set_yscale("log")
            ax.set_ylim(peak * floor, peak * 2)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    if not is_real(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)





def _operator(model: nn.Module, data: Any, **kwargs: Any) -> CurvatureOperator:
    seed = kwargs.pop("seed")
    return CurvatureOperator(model, data, seed=0 if seed is None else seed, **kwargs)


def _common_settings(op: CurvatureOperator, seed: int | None) -> dict[str, Any]:
    return {
        "curvature": op.curvature,
        "params": list(op.params.names),
        "n_params": op.shape[0],
        "n_batches": op.n_batches,
        "train": op.train,
        "seed": seed,
        "dtype": str(op.dtype),
        "loss_fn": getattr(op.loss_fn, "__name__", type(op.loss_fn).__name__),
        "engine": op.engine,
        "engine_reason": op.engine_reason,
    }


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


@grad_enabled
def hvp(
    model: nn.Module,
    data: Any,
    vectors: Sequence[Tensor],
    *,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    curvature: str = "hessian",
    n_batches: int | None = None,
    train: bool = False,
    chunk_size: int | None = None,
    engine: str = "auto",
) -> list[Tensor]:
    """Hessian-vector (or GGN-vector) products of the loss.

    Parameters
    ----------
    model : nn.Module
    data : batch or re-iterable of batches
        With several batches, the product with the size-weighted average of
        the per-batch matrices.
    vectors : sequence of Tensor
        One tensor per selected parameter, shaped like it (one vector) or
        with an extra leading dimension ``k`` (``k`` vectors, computed in one
        batched pass), in the order of ``params`` as given (a module's
        parameters in the order of its ``parameters()``; a parameter given
        twice counts at its first place), or of ``model.parameters()``
        (those with ``requires_grad``) when ``params`` is ``None``: the
        vector is the concatenation of the pieces in that order.  Real
        floating point of any precision (computed in the parameters'
        dtype); complex, integer or bool tensors raise ``TypeError``.
    loss_fn, params, n_batches, train
        As everywhere in the library.
    curvature : {"hessian", "ggn"}
        The Hessian, or the generalized Gauss-Newton matrix ``J^T H_z J``.
    chunk_size : int, optional
        At most this many vectors per ``vmap`` call.
    engine : {"auto", "forward-over-reverse", "double-backward"}
        How the products are computed; ``"auto"`` chooses up front from the
        module types, a probe and the cost (see :class:`CurvatureOperator`).

    Returns
    -------
    list of Tensor
        The products, shaped like ``vectors`` and in their order.
    """
    vectors = list(vectors)
    for i, v in enumerate(vectors):
        if isinstance(v, Tensor):
            check_real_floating(v, f"vectors[{i}]")
    if params is not None and not isinstance(params, (Tensor, str, nn.Module)):
        params = list(params)  # read twice: the selection, then its order
    op = CurvatureOperator(
        model, data, loss_fn=loss_fn, params=params, curvature=curvature,
        n_batches=n_batches, train=train, chunk_size=chunk_size, engine=engine,
    )
    # the vectors follow params= as given; the operator, model.parameters()
    order = given_order(model, params, op.params)
    shapes = [op.params.params[i].shape for i in order]
    if len(vectors) != len(shapes) or not all(isinstance(v, Tensor) for v in vectors):
        names = ", ".join(op.params.names[i] for i in order)
        raise ValueError(f"vectors must be {len(shapes)} tensors, one per selected parameter, in this order: {names}")
    if all(v.shape == s for v, s in zip(vectors, shapes)):
        batched = False
    elif all(v.dim() == len(s) + 1 and v.shape[1:] == s for v, s in zip(vectors, shapes)) and len(
        {v.shape[0] for v in vectors}
    ) == 1:
        batched = True
    else:
        raise ValueError(
            "each vector must have its parameter's shape, or (k, *shape) for k vectors; "
            f"parameters have shapes {[tuple(s) for s in shapes]}, got {[tuple(v.shape) for v in vectors]}"
        )
    tangents: list[Tensor] = [torch.empty(0)] * len(order)
    for i, v in zip(order, vectors):
        tangents[i] = (v if batched else v.unsqueeze(0)).to(device=op.device, dtype=op.dtype)
    out = op.apply(tuple(tangents))
    return [out[i] if batched else out[i][0] for i in order]


def _warn_if_copies(values: Tensor, dtype: torch.dtype) -> None:
    """Warn when eigenvalues of a low-memory run at half precision are closer
    than the products' rounding (``eps * max |lambda|``).

    Without a basis, copies of an eigenvalue are told apart from distinct
    eigenvalues by how closely they agree; in float16 / bfloat16 the
    products are only that accurate, and a copy still converging can sit
    half an eps from the value (a bfloat16 transformer layer's top two came
    back as 3.7547 and 3.7385 for 3.77 and 1.32), as close as distinct
    eigenvalues can be (a small MLP's 0.4387 and 0.4357, 0.8 eps apart).
    """
    if values.numel() < 2:
        return
    v = values.sort().values
    floor = float(torch.finfo(dtype).eps) * float(v.abs().max())
    close = [(float(a), float(b)) for a, b in zip(v[:-1], v[1:]) if float(b - a) < floor]
    if close:
        pairs = ", ".join(f"{b:.6g} and {a:.6g}" for a, b in reversed(close))
        warnings.warn(
            f"top_eigenvalues(low_memory=True) on a {str(dtype).removeprefix('torch.')} model: eigenvalues "
            f"{pairs} are closer than the products' rounding ({floor:.3g}) and may be one eigenvalue counted "
            "twice (the recurrence has no basis to tell a copy from a distinct eigenvalue). Check with "
            "low_memory=False, or measure a float32 copy: copy.deepcopy(model).float()",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )


@grad_enabled
def top_eigenvalues(
    model: nn.Module,
    data: Any,
    k: int = 1,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    which: str = "LA",
    block_size: int = 1,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    curvature: str = "hessian",
    seed: int | None = 0,
    n_batches: int | None = None,
    progress: bool = False,
    train: bool = False,
    chunk_size: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    low_memory: bool = False,
    engine: str = "auto",
    max_basis: int | None = None,
) -> EigenResult:
    """Top eigenpairs of the Hessian by Lanczos with full reorthogonalization.

    ``k`` pairs come back also when the Hessian has fewer distinct
    eigenvalues than ``k`` (a multiple of the identity, a rank-deficient
    Hessian): where the Krylov space becomes invariant, Lanczos restarts
    from a random vector orthogonal to the vectors found so far.

    Parameters
    ----------
    model : nn.Module
    data : batch or re-iterable of batches
    k : int
        Number of eigenpairs.
    tol : float
        Stop when every residual ``||H y - lambda y||`` is below
        ``tol * max |lambda|``.  The eigenvalue error is then at most about
        ``tol**2 * |lambda|**2 / gap``.
    max_iter : int, optional
        Maximum Lanczos steps (default ``max(20 k, 100)``); each costs
        ``block_size`` products.  At least ``k / block_size`` (fewer
        vectors cannot give ``k`` values: ``ValueError``).
    which : {"LA", "LM", "SA"}
        Largest algebraic (default: the sharpest directions), largest
        magnitude, or smallest algebraic (most negative curvature).
    block_size : int
        Vectors per Lanczos step, computed in one batched ``vmap`` pass.
    curvature : {"hessian", "ggn"}
    seed : int or None
        Seed of the random start vector.
    progress : bool
        tqdm bar over products.
    loss_fn, params, n_batches, train, chunk_size, engine
        As in :func:`hvp`.
    basis_dtype : torch.dtype, optional
        Dtype of the Lanczos vectors: ``torch.float64`` (the default for the
        stored basis, 2x the parameter bytes per step for a float32 model)
        or ``torch.float32`` (half that; eigenvalues accurate to about
        ``1e-6 * max |lambda|``, so ``tol`` below about ``1e-5`` buys
        nothing).  With ``low_memory=True`` the default is the parameters'
        dtype (float32 for half-precision models): the products are
        computed in that dtype anyway, the recurrence's coefficients are
        float64 dot products, and the eigenvalues agree with a float64
        recurrence to about ``1e-6 * max |lambda|``; eigenvalues closer
        than about ``3e-4 * max |lambda|`` are then reported once.
    basis_device : torch.device or str, optional
        Keep the basis there instead of on the model's device, e.g. ``"cpu"``
        for a model on a GPU: the device then holds one vector and the
        product, and the reorthogonalization runs on the host.
    low_memory : bool
        Eigenvalues only, without a stored basis: the three-term recurrence
        holds a few vectors whatever the number of steps; repeated and
        spurious Ritz values (loss of orthogonality) are removed by the
        Cullum-Willoughby test.  ``eigenvectors`` is then empty and
        ``block_size`` must be 1; it may need more products than the default.
        Without a basis there is nothing to restart against: each distinct
        eigenvalue comes back once, so a Hessian with fewer distinct
        eigenvalues than ``k`` yields fewer values (``converged=False``).
        On a float16 / bfloat16 model, eigenvalues closer than the products'
        rounding (``eps * max |lambda|``) cannot be told from a copy of one
        eigenvalue and raise a ``RuntimeWarning``.
        For a float16 / bfloat16 model the recurrence's residuals stop near
        the products' precision (about ``1e-3 * scale``): pass ``tol=1e-2``
        or so, else the run ends at ``max_iter`` with ``converged=False``.
        The same holds for a float32 model on a GPU that runs its
        convolutions or matrix products in TF32 (cuDNN's default for
        convolutions on Ampere and later; ``torch.backends.cudnn.allow_tf32
        = False`` turns it off): its products keep 10 bits, as float16's.
        Memory: two vectors (``q_j`` and ``q_{j-1}``, in whose buffer the
        next product is formed: 2 P in the default dtype for a model of
        ``P`` parameter bytes; three where the products cannot be added in
        place: several batches, the forward-over-reverse engine, another
        dtype or ``basis_device``) beside what one product needs (with one
        batch of data, the gradient's graph that the double-backward engine
        keeps, the activations and what the backward pass saved, and the
        backward pass's temporaries while a product runs: one layer's part
        of the product and activation-sized buffers).  Measured 3.0 P on a
        5.1M MLP, 4.5 P on a 10M transformer with 128 tokens, 3.4 P at 125M.
    max_basis : int, optional
        Most Lanczos blocks (of ``block_size`` vectors) the basis holds.  By
        default the basis grows with every step, up to ``max_iter`` blocks
        (each ``2 P`` in float64 for a float32 model of ``P`` parameter
        bytes).  With ``max_basis``, a full basis is thick-restarted (Wu and
        Simon 2000, the restart of ARPACK and of SciPy's ``eigsh``): the
        wanted Ritz vectors and half the others are kept, and the iteration
        goes on from the residual, so the basis never exceeds ``max_basis``
        blocks however many steps convergence takes; a small basis needs
        more products.  At least ``ceil(k / block_size) + 1``, and 4 more
        for ``which="LM"`` (with less, a restart keeps nothing from one end
        of the spectrum and can settle on an eigenvalue of the wrong sign).
        Not with ``low_memory=True``, which stores no basis.  As with
        ARPACK, a restarted run may return an eigenvalue repeated more than
        ``block_size`` times fewer times than ``k`` asks.
        A ``RuntimeWarning`` before any product says when the basis's
        worst case (``max_iter`` blocks, or ``max_basis``) exceeds the
        memory free on its device (``MemAvailable`` on a Linux CPU, the free and cached
        memory of a GPU); the run goes on, as it may converge sooner.

    Returns
    -------
    EigenResult
        ``eigenvalues``, ``eigenvectors`` (parameter-shaped; empty with
        ``low_memory=True``), ``n_hvp``.
    """
    start = time.perf_counter()
    check_bool("progress", progress)
    k = check_int("k", k, 1)
    tol = _check_positive("tol", tol)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter, 1)
    block_size = check_int("block_size", block_size, 1)
    seed = check_seed(seed)
    if which not in ("LA", "LM", "SA"):
        raise ValueError(f"which must be 'LA', 'LM' or 'SA', got {which!r}")
    _check_basis_dtype(basis_dtype)
    low_memory = check_bool("low_memory", low_memory)
    if low_memory and block_size != 1:
        raise ValueError(f"low_memory=True runs single-vector Lanczos: block_size must be 1, got {block_size}")
    if max_iter is not None and max_iter * block_size < k:
        raise ValueError(
            f"max_iter * block_size = {max_iter} * {block_size} Lanczos vectors cannot give k={k} eigenvalues: "
            f"raise max_iter to at least {math.ceil(k / block_size)} (or block_size)"
        )
    if max_basis is not None:
        max_basis = check_int("max_basis", max_basis, 1)
        if low_memory:
            raise ValueError("max_basis bounds the stored Lanczos basis; low_memory=True stores none")
        check_max_basis(max_basis, k, block_size, which)
    if basis_device is not None:
        basis_device = torch.device(basis_device)
    bar = product_bar(progress, "lanczos")
    op = _operator(
        model, data, loss_fn=loss_fn, params=params, curvature=curvature,
        n_batches=n_batches, train=train, chunk_size=chunk_size, seed=seed, engine=engine,
        progress=bar,
    )
    n = op.shape[0]
    if k > n:
        raise ValueError(f"k={k} exceeds the number of selected parameters ({n})")
    if block_size > n:
        raise ValueError(f"block_size={block_size} exceeds the number of selected parameters ({n})")
    limit = max_iter if max_iter is not None else max(20 * k, 100)
    if basis_dtype is None:
        # the recurrence in the parameters' dtype (float32 at least): each
        # vector is P bytes, not 2 P
        basis_dtype = working_dtype(op.dtype) if low_memory else torch.float64
    if not low_memory:
        _warn_if_basis_may_not_fit(n, block_size, min(max_basis or limit, math.ceil(n / block_size)), basis_dtype,
                                   basis_device if basis_device is not None else op.device)
    if bar is not None:
        bar.total = limit * block_size
    try:
        op.prepare(block_size)  # the gradient's graph before the Lanczos vectors
        with private_rng(seed, op.device) as gen:
            res = lanczos(
                op.matmat, n, k, which=which, tol=tol, max_iter=max_iter,
                block_size=block_size, generator=gen, device=op.device,
                basis_dtype=basis_dtype, basis_device=basis_device, store_basis=not low_memory,
                matvec_update=op.matvec_update if low_memory and basis_device is None else None,
                product_dtype=_product_dtype(op), max_basis=max_basis,
            )
    finally:
        if bar is not None:
            bar.close()
    vecs = [
        [t.clone() for t in op.unflatten(res.eigenvectors[:, i].to(device=op.device, dtype=op.dtype))]
        for i in range(res.eigenvectors.shape[1])
    ]
    if low_memory and op.dtype in LOW_PRECISION:
        _warn_if_copies(res.eigenvalues, op.dtype)
    settings = _common_settings(op, seed)
    settings.update(
        k=k, tol=tol, max_iter=limit, which=which, block_size=block_size,
        basis_dtype=str(basis_dtype).removeprefix("torch."), low_memory=low_memory,
        basis_device=None if basis_device is None else str(basis_device), max_basis=max_basis,
    )
    return EigenResult(
        eigenvalues=res.eigenvalues,
        eigenvectors=vecs,
        names=list(op.params.names),
        residuals=res.residuals,
        n_hvp=op.n_hvp,
        n_iter=res.n_iter,
        converged=res.converged,
        settings=settings,
        wall_time=time.perf_counter() - start,
        engine=op.engine or "",
    )


def _warn_if_basis_may_not_fit(n: int, b: int, blocks: int, dtype: torch.dtype, device: torch.device) -> None:
    """Warn before any product when the Lanczos basis, grown to ``blocks``
    blocks, would not fit in the memory free on ``device`` now (it stops
    growing when the run converges, so this is a warning, not a refusal)."""
    need = n * b * blocks * torch.finfo(dtype).bits // 8
    free = _free_memory(device)
    if free is None or need <= free:
        return
    warnings.warn(
        f"top_eigenvalues: the Lanczos basis may grow to {need / 2**30:.1f} GiB ({blocks} blocks of {b} "
        f"vector(s) of {n} {str(dtype).removeprefix('torch.')}), more than the {free / 2**30:.1f} GiB free on "
        f"{device}; it stops growing when the run converges.  To bound it: max_basis= (thick restarts, e.g. "
        "max_basis=20), basis_dtype=torch.float32 (half), basis_device='cpu' (beside a GPU model) or "
        "low_memory=True (eigenvalues only)",
        RuntimeWarning, stacklevel=user_stacklevel(),
    )


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now: ``torch.cuda.mem_get_info`` on a GPU
    (plus what PyTorch's cache holds free), ``MemAvailable`` of
    ``/proc/meminfo`` on a Linux CPU; ``None`` where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _product_dtype(op: CurvatureOperator) -> torch.dtype | None:
    """The dtype whose rounding the operator's products carry: the model's,
    or float16 for float32 products on a GPU that may run them in TF32
    (float16's 10 bits; copies of an eigenvalue in a low-memory run then
    agree to that rounding only, and are merged at it)."""
    if not op.dtype.is_floating_point:
        return None
    if op.dtype == torch.float32 and kernel_eps(op.dtype, op.device) > torch.finfo(op.dtype).eps:
        return torch.float16
    return op.dtype


def _check_basis_dtype(basis_dtype: Any) -> None:
    if basis_dtype is not None and basis_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"basis_dtype must be torch.float32 or torch.float64, got {basis_dtype!r}")


@grad_enabled
def trace(
    model: nn.Module,
    data: Any,
    *,
    method: str = "hutch++",
    n_samples: int | None = None,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    curvature: str = "hessian",
    seed: int | None = 0,
    n_batches: int | None = None,
    progress: bool = False,
    train: bool = False,
    batch: int | None = None,
    chunk_size: int | None = None,
    engine: str = "auto",
    sketch: int | None = None,
) -> TraceResult:
    """Trace of the Hessian with a standard error.

    Parameters
    ----------
    method : {"hutch++", "hutchinson", "exact"}
        ``"hutch++"`` (default): products with ``sketch`` random vectors
        sketch the dominant subspace, whose trace is taken exactly, the rest
        estimate the remainder by Hutchinson (Meyer et al. 2021); much
        better than Hutchinson when a few eigenvalues dominate the Hessian,
        about equal when the bulk does (untrained networks, language
        models).  ``"hutchinson"``: the mean of ``z^T H z`` over Rademacher
        ``z``.  ``"exact"``: ``n`` products with the unit vectors (small
        models).
    n_samples : int, optional
        Products to spend (default 90); ``"exact"`` takes none (it spends
        one per parameter), and passing it there raises ``ValueError``.
    batch : int, optional
        Vectors per batched product pass.  Only ``batch`` random vectors (in
        the parameters' dtype) exist at a time, and with the double-backward
        engine no product vector (each parameter's product is dotted with
        its vector as it is formed); the forward-over-reverse engine holds
        the ``batch`` products too.  Hutch++ also keeps its ``sketch``
        vectors.  The vectors are drawn one by one whatever ``batch`` is, so
        the estimate does not depend on it.  Default: 1 when the data is one batch (or a
        few) and the engine is not ``"forward-over-reverse"`` (the
        double-backward engine then keeps the gradient's graph and runs one
        backward pass per vector however many share a pass, so larger passes
        only cost memory), else 8 (each pass streams the data once).
    sketch : int, optional
        Hutch++ only: the number of sketch vectors, which Hutch++ holds
        through the whole call, one parameter size each, and which cost two
        products each (at most ``(n_samples - 2) // 2``).  Default: 1 (at
        most ``n_samples // 3``), so that the default call holds one vector
        beside Hutchinson's whatever ``n_samples`` is; the classic split
        ``n_samples // 3`` pays off when a few eigenvalues dominate and the
        model is small enough for that many vectors.  Any size leaves the
        estimate unbiased; ``0`` is Hutchinson.

        Memory of the call, in units of the parameter bytes ``P`` (float32,
        one batch of data, double-backward engine): the gradient's kept
        graph (the activations and what the backward pass saved for a
        second differentiation; 1.5 P on a 10M-parameter transformer with
        2 x 64 tokens), ``batch`` vectors, the backward pass's temporaries
        while it runs (one layer's part of the product and activation-sized
        buffers: about 1 P on that transformer, 0.5 P on an MLP) and the
        ``sketch`` vectors: measured 3.4 P for Hutchinson and ``sketch`` +
        3.4 P for Hutch++ on that transformer, 1.5 and 2.5 P on a 5.1M MLP
        (``benchmarks/bench_trace_memory.py``, ``bench_memory.py``).
    loss_fn, params, curvature, seed, n_batches, progress, train, chunk_size, engine
        As in :func:`top_eigenvalues`.

    Returns
    -------
    TraceResult
        ``value`` and ``std_error`` (the standard deviation of the estimate,
        estimated from its own samples).
    """
    start = time.perf_counter()
    check_bool("progress", progress)
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(TRACE_METHODS)}")
    if method == "exact" and n_samples is not None:
        raise ValueError("flatness.hessian.trace: option n_samples= does not apply to method='exact' "
                         "(it spends one product per parameter)")
    n_samples = 90 if n_samples is None else n_samples
    n_samples = check_int("n_samples", n_samples, 4 if method == "hutch++" else 2)
    batch = check_int("batch", batch, 1, allow_none=True)
    seed = check_seed(seed)
    if sketch is not None:
        if method != "hutch++":
            raise ValueError(f"flatness.hessian.trace: option sketch= applies to method='hutch++' only, got {method!r}")
        sketch = check_int("sketch", sketch, 0)
        if 2 * sketch + 2 > n_samples:
            raise ValueError(
                f"sketch must be at most (n_samples - 2) // 2 = {(n_samples - 2) // 2} (Hutch++ spends 2 products "
                f"per sketch vector and needs 2 more for a standard error), got {sketch}"
            )
    bar = product_bar(progress, "trace")
    op = _operator(
        model, data, loss_fn=loss_fn, params=params, curvature=curvature,
        n_batches=n_batches, train=train, chunk_size=chunk_size, seed=seed, engine=engine,
        progress=bar,
    )
    n = op.shape[0]
    if batch is None:
        batch = 1 if engine != "forward-over-reverse" and op._keeps_graph() else 8
    if bar is not None:
        bar.total = n if method == "exact" else n_samples
    try:
        if method == "exact":
            value = float(exact_diagonal(op.matmat, n, batch=batch, device=op.device).sum())
            std_error, samples = 0.0, torch.zeros(0, dtype=torch.float64)
        else:
            if method == "hutch++" and sketch is None:
                sketch = min(n_samples // 3, DEFAULT_SKETCH)
            estimator = partial(hutchpp, sketch=sketch, matmat_out=op.matmat) if method == "hutch++" else hutchinson
            # the gradient's graph is built before any vector exists
            op.prepare(batch)
            with private_rng(seed, op.device) as gen:
                # random signs are exact in any dtype: vectors as small as the
                # parameters (float32 for half-precision models)
                dtype = op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32
                value, std_error, samples = estimator(
                    op.matmat, n, n_samples, generator=gen, device=op.device, batch=batch, dtype=dtype,
                    quadform=op.quadratic_forms,
                )
    finally:
        if bar is not None:
            bar.close()
    settings = _common_settings(op, seed)
    settings.update(method=method, n_samples=n_samples, batch=batch)
    if method == "hutch++":
        settings["sketch"] = min(n_samples // 3, DEFAULT_SKETCH, n) if sketch is None else min(sketch, n)
    return TraceResult(
        value=value, std_error=std_error, method=method, n_hvp=op.n_hvp, samples=samples,
        settings=settings, wall_time=time.perf_counter() - start, engine=op.engine or "",
    )


@grad_enabled
def spectral_density(
    model: nn.Module,
    data: Any,
    *,
    n_vectors: int = 4,
    n_steps: int = 64,
    grid_size: int = 1024,
    sigma: float | None = None,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    curvature: str = "hessian",
    seed: int | None = 0,
    n_batches: int | None = None,
    progress: bool = False,
    train: bool = False,
    chunk_size: int | None = None,
    engine: str = "auto",
    basis_dtype: torch.dtype | None = None,
    low_memory: bool = False,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature.

    ``n_vectors`` runs of ``n_steps`` Lanczos steps from random unit vectors
    give Gauss quadrature rules of the spectral measure
    ``(1/n) sum_i delta(t - lambda_i)``; the density is their average,
    smoothed with a Gaussian of width ``sigma`` (Ghorbani, Krishnan and Xiao
    2019; Ubaru, Chen and Saad 2017).

    Parameters
    ----------
    n_vectors : int
        Random start vectors (the estimate's variance falls as ``1/n_vectors``).
    n_steps : int
        Lanczos steps per vector: moments of order ``< 2 n_steps`` are
        exact for each vector.
    grid_size : int
        Points of the eigenvalue grid, which spans the nodes plus ``5 sigma``.
    sigma : float, optional
        Kernel width; default 1 % of the spectral range.
    loss_fn, params, curvature, seed, n_batches, progress, train, chunk_size, engine
        As in :func:`top_eigenvalues`.
    basis_dtype : torch.dtype, optional
        The Lanczos vectors' dtype: ``torch.float64`` (default) or
        ``torch.float32`` (half the memory of the basis).  With
        ``low_memory=True`` the default is the parameters' dtype (float32 at
        least).
    low_memory : bool
        The three-term recurrence without reorthogonalization, which holds
        two or three vectors whatever ``n_steps`` is, instead of a basis of
        ``n_steps`` vectors.  The quadrature stays that of the start
        vector's spectral measure to working precision (Greenbaum 1989);
        loss of orthogonality only splits a converged eigenvalue's node into
        several whose weights add up, which the smoothed density does not
        see.

    Returns
    -------
    SpectralDensity

    Notes
    -----
    Memory: the basis of ``n_steps`` vectors, ``8 n`` bytes each by default
    (128 times the parameters' bytes ``P`` of a float32 model at the
    default 64 steps; 64 times with ``basis_dtype=torch.float32``), plus
    what one product needs; one start vector at a time.  With
    ``low_memory=True``: about 2 P beside what one product needs (float32
    model), whatever ``n_steps`` is.
    """
    start = time.perf_counter()
    check_bool("progress", progress)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    n_steps = check_int("n_steps", n_steps, 1)
    grid_size = check_int("grid_size", grid_size, 2)
    seed = check_seed(seed)
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
    _check_basis_dtype(basis_dtype)
    low_memory = check_bool("low_memory", low_memory)
    bar = product_bar(progress, "slq")
    op = _operator(
        model, data, loss_fn=loss_fn, params=params, curvature=curvature,
        n_batches=n_batches, train=train, chunk_size=chunk_size, seed=seed, engine=engine,
        progress=bar,
    )
    n = op.shape[0]
    if bar is not None:
        bar.total = n_vectors * min(n_steps, n)
    if basis_dtype is None:
        basis_dtype = working_dtype(op.dtype) if low_memory else torch.float64
    try:
        op.prepare(1)  # the gradient's graph before the Lanczos vectors
        with private_rng(seed, op.device) as gen:
            nodes, weights = slq_nodes(
                op.matmat, n, n_vectors, n_steps, generator=gen, device=op.device, basis_dtype=basis_dtype,
                store_basis=not low_memory, matvec_update=op.matvec_update if low_memory else None,
            )
    finally:
        if bar is not None:
            bar.close()
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-6 * max(abs(lo), abs(hi), 1e-12))
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    density = gaussian_density(nodes, weights, grid, sigma)
    settings = _common_settings(op, seed)
    settings.update(n_vectors=n_vectors, n_steps=n_steps, grid_size=grid_size,
                    basis_dtype=str(basis_dtype).removeprefix("torch."), low_memory=low_memory)
    return SpectralDensity(
        grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma, n_hvp=op.n_hvp,
        settings=settings, wall_time=time.perf_counter() - start, engine=op.engine or "",
    )

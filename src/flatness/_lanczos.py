"""Lanczos, Hutchinson, Hutch++ and stochastic Lanczos quadrature on a matvec.

Every function takes ``matmat(V) -> A V`` for a symmetric ``n x n`` operator
``A`` and a float64 matrix ``V`` of shape ``(n, k)``: the columns are
independent vectors, so a caller can compute them in one batched pass.  The
functions never see a model, which makes them testable on explicit matrices.

By default the Lanczos vectors are kept in float64 whatever the operator's
dtype: the basis is reorthogonalized in full (twice, "twice is enough"),
which costs ``8 n m`` bytes for ``m`` basis vectors (allocated in chunks as
the steps are taken, never copied).  Two options trade that memory away:
a float32 basis (``basis_dtype``, half the bytes; the Ritz values are then
accurate to about float32's resolution times ``||A||``), kept on another
device if asked (``basis_device``, e.g. host memory beside a GPU model), and
an eigenvalues-only mode without a stored basis (``store_basis=False``: the
plain three-term recurrence, three vectors whatever the number of steps,
with the spurious and repeated Ritz values that loss of orthogonality creates
removed by the Cullum-Willoughby test).  The small projected eigenproblem is
solved by SciPy (``eigh_tridiagonal`` for one vector per step, ``eigh`` on
the block tridiagonal matrix otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = [
    "LanczosResult",
    "exact_diagonal",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "rademacher",
    "slq_nodes",
    "gaussian_density",
]

MatMat = Callable[[Tensor], Tensor]
_WHICH = ("LA", "SA", "LM")


def rademacher(
    n: int,
    k: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """An ``(n, k)`` matrix of independent random signs (exact in any
    floating dtype).

    Drawn vector by vector and stored column after column (the transpose of
    a contiguous ``(k, n)`` tensor): ``k`` vectors drawn at once are the
    vectors of ``k`` draws of one, so an estimate does not depend on how
    many vectors go through a pass, and a curvature operator unflattens each
    column into contiguous parameter-shaped views."""
    signs = torch.randint(0, 2, (k, n), generator=generator, device=device, dtype=dtype)
    return signs.mul_(2).sub_(1).T


def _orthogonalize(W: Tensor, Q: Tensor) -> Tensor:
    # Classical Gram-Schmidt against all previous basis vectors, done twice:
    # one pass leaves errors of order eps * cond; the second removes them
    # (Giraud et al. 2005, "twice is enough").
    if Q.shape[1] == 0:
        return W
    for _ in range(2):
        W = W - Q @ (Q.T @ W)
    return W


_CHUNK = 8  # Lanczos blocks per chunk of the basis


class _Basis:
    """The Lanczos vectors, of one dtype and device, in chunks of ``_CHUNK`` blocks of ``b``
    columns allocated as the iteration goes.

    Memory follows the steps taken, at most ``_CHUNK - 1`` blocks beyond
    them and never beyond ``max_blocks``; vectors are never copied to grow
    the basis (growing one tensor by doubling holds the old and the new one
    at once, about twice the basis).
    """

    def __init__(
        self, n: int, b: int, max_blocks: int, device: torch.device, dtype: torch.dtype = torch.float64
    ) -> None:
        self.n, self.b, self.max_blocks, self.device, self.dtype = n, b, max_blocks, device, dtype
        self.chunks: list[Tensor] = []
        self.blocks = 0

    def append(self, Q: Tensor) -> None:
        if self.blocks == sum(c.shape[1] for c in self.chunks) // self.b:
            size = min(_CHUNK, self.max_blocks - self.blocks)
            if size < 1:
                raise RuntimeError("Lanczos basis is full")
            self.chunks.append(torch.empty(self.n, size * self.b, dtype=self.dtype, device=self.device))
        self.blocks += 1
        self.block(self.blocks - 1).copy_(Q)

    def block(self, i: int) -> Tensor:
        """Block ``i`` (a view, ``(n, b)``)."""
        c, r = divmod(i, _CHUNK)
        return self.chunks[c][:, r * self.b : (r + 1) * self.b]

    def filled(self) -> list[Tensor]:
        """Views of the stored columns, one per chunk."""
        left = self.blocks * self.b
        out = []
        for c in self.chunks:
            if left <= 0:
                break
            out.append(c[:, : min(c.shape[1], left)])
            left -= c.shape[1]
        return out

    def orthogonalize_(self, W: Tensor) -> None:
        """Remove the basis' components from ``W``, in place.

        Classical Gram-Schmidt against all stored vectors, done twice: one
        pass leaves errors of order eps * cond; the second removes them
        (Giraud et al. 2005, "twice is enough").  The coefficients are small
        ``(columns, b)`` matrices; nothing of size ``n x steps`` is formed.
        """
        for _ in range(2):
            parts = self.filled()
            coefs = [Q.T @ W for Q in parts]
            for Q, c in zip(parts, coefs):
                W.addmm_(Q, c, alpha=-1)

    def rotate_(self, S: Tensor) -> None:
        """Replace the basis by its first ``l = S.shape[1]`` columns after
        rotation, ``basis @ S`` (``S`` of shape ``(stored columns, l)`` with
        orthonormal columns; ``l`` a multiple of ``b``), in place: row
        block by row block, as the new rows depend on the old rows alone,
        with temporaries of at most one vector (or 8 MiB) and no second
        basis."""
        ell = S.shape[1]
        S = S.to(device=self.device, dtype=self.dtype)
        parts = self.filled()
        rows = max(1, min(1 << 20, self.n) // ell)  # at most one vector, or 8 MiB
        for r in range(0, self.n, rows):
            new = torch.zeros(min(rows, self.n - r), ell, dtype=self.dtype, device=self.device)
            start = 0
            for Q in parts:
                new.addmm_(Q[r : r + rows], S[start : start + Q.shape[1]])
                start += Q.shape[1]
            for i in range(ell // self.b):
                self.block(i)[r : r + rows].copy_(new[:, i * self.b : (i + 1) * self.b])
        self.blocks = ell // self.b

    def combine(self, S: Tensor) -> Tensor:
        """``basis @ S`` for ``S`` of shape ``(stored columns, k)``."""
        out = torch.zeros(self.n, S.shape[1], dtype=self.dtype, device=self.device)
        start = 0
        for Q in self.filled():
            out.addmm_(Q, S[start : start + Q.shape[1]].to(self.dtype))
            start += Q.shape[1]
        return out


def _pick(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        order = np.argsort(-theta, kind="stable")
    elif which == "SA":
        order = np.argsort(theta, kind="stable")
    else:
        order = np.argsort(-np.abs(theta), kind="stable")
    return order[:k]


@dataclass
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes
    ----------
    eigenvalues : Tensor
        ``(k,)`` float64 Ritz values, ordered as ``which`` asks.
    eigenvectors : Tensor
        ``(n, k)`` float64 orthonormal Ritz vectors.
    residuals : Tensor
        ``(k,)`` residual norms ``||A y - theta y||`` (from the recurrence).
    n_matvec : int
        Products with ``A`` spent.
    n_iter : int
        Lanczos steps taken (each one ``block_size`` products).
    converged : bool
        Whether every residual is below ``tol * max |theta|`` (after a
        restart, also that the rest of the space holds no further copy of
        a wanted eigenvalue), or the basis spans the whole space (the Ritz
        pairs are then exact).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_matvec: int
    n_iter: int
    converged: bool


def lanczos(
    matmat: MatMat,
    n: int,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    block_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    v0: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
    store_basis: bool = True,
    matvec_update: Callable[[Tensor, Tensor, float], Tensor] | None = None,
    product_dtype: torch.dtype | None = None,
    max_basis: int | None = None,
) -> LanczosResult:
    """Extreme eigenpairs of a symmetric operator by (block) Lanczos with full
    reorthogonalization.

    Where the Krylov space becomes invariant (a column of the next block
    vanishes: ``A`` has fewer distinct eigenvalues than wanted, is
    rank-deficient, or a start column is an eigenvector), the iteration
    restarts that column from a random vector orthogonal to the basis, so
    ``k`` values come back whatever the multiplicities.  A Krylov space
    from one start block holds an eigenvalue at most ``block_size`` times;
    after a breakdown of the whole block the run stops only once the
    restarted space shows that the rest of ``A`` holds no further copy of
    a wanted value.  With ``store_basis=False`` there is no basis to
    restart against: each distinct eigenvalue is found once, and fewer
    than ``k`` values come back (``converged=False``) when ``A`` has fewer.

    Parameters
    ----------
    matmat : callable
        ``V -> A V`` on ``(n, b)`` matrices, returning ``V``'s dtype and
        device.
    n : int
        Dimension of ``A``.
    k : int
        Number of eigenpairs.
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest algebraic or largest magnitude.
    tol : float
        Stop when every wanted Ritz pair has residual norm
        ``||A y - theta y|| <= tol * max |theta|``.  The eigenvalue error is
        at most the residual, and about ``residual**2 / gap`` once converged.
    max_iter : int, optional
        Maximum number of steps (default ``max(20 * k, 100)``); each step
        costs ``block_size`` products.  ``max_iter * block_size < k``
        raises ``ValueError`` (that few vectors cannot give ``k`` values).
    block_size : int
        Vectors per step (all computed in one ``matmat`` call).  ``1`` needs
        the fewest products; larger blocks find clustered eigenvalues more
        reliably and batch better.
    generator : torch.Generator, optional
        Source of the random start.
    v0 : Tensor, optional
        Start block ``(n,)`` or ``(n, block_size)`` instead of a random one.
        What the run learns after a breakdown (that the rest of the space
        holds only copies of the values found) assumes a start with a
        component along every eigenvector, as a random one has almost
        surely: started from an eigenvector, it reports that eigenvalue.
    callback : callable, optional
        Called as ``callback(n_matvec, ritz_values)`` after every step with
        the wanted Ritz values so far (used to trace convergence).
    basis_dtype : torch.dtype
        Dtype of the Lanczos vectors (``torch.float64`` or ``torch.float32``).
        A float32 basis halves the memory; its Ritz values are accurate to
        about ``1e-6 * max |theta|`` (float32's resolution), so a smaller
        ``tol`` buys nothing.  The small projected problem is float64 either
        way.
    basis_device : torch.device or str, optional
        Where the basis lives (default ``device``).  ``"cpu"`` beside a GPU
        operator keeps only the vector being multiplied on the GPU; the
        reorthogonalization then runs on the host.
    store_basis : bool
        ``False`` runs the plain three-term recurrence without
        reorthogonalization and without storing the basis (three vectors,
        whatever the number of steps): eigenvalues only (``eigenvectors`` is
        empty), ``block_size`` 1.  Loss of orthogonality makes converged
        eigenvalues reappear as copies and leaves spurious Ritz values; the
        copies are merged and the spurious values removed by the
        Cullum-Willoughby test, so more steps may be needed than with a
        stored basis.
    matvec_update : callable, optional
        ``matvec_update(q, w, c)`` sets ``w <- A q + c w`` in place (and
        returns ``w``), for ``store_basis=False``: the recurrence then forms
        ``A q_j - beta_j q_{j-1}`` in the buffer of ``q_{j-1}`` (Paige's
        order of the updates) and holds two vectors, not three, where the
        operator adds its product without forming it apart
        (:meth:`~flatness._hvp.CurvatureOperator.matvec_update`).
    product_dtype : torch.dtype, optional
        The dtype ``matmat`` computes in, when coarser than the vectors'
        (a float32 model's products of float64 vectors), for
        ``store_basis=False``: copies of one eigenvalue then agree only to
        that dtype's rounding, and are merged at its resolution.
    max_basis : int, optional
        Most blocks the basis holds (default: ``max_iter``, no restart).
        When the basis is full, a thick restart (Wu and Simon 2000) keeps
        the wanted Ritz vectors and half the others and goes on from the
        residual block, so memory stays at ``max_basis`` blocks however
        many steps convergence takes.  Needs room for the wanted values and
        one more block, ``max_basis >= ceil(k / block_size) + 1``, and for
        ``which="LM"`` four more (:func:`min_basis`: with less, a restart
        keeps no Ritz vector from one end of the spectrum, and a run can
        converge to an eigenvalue of the other sign than the one wanted).
        What a restarted run gives up, as ARPACK's does: an eigenvalue
        repeated more than ``block_size`` times may come back fewer times
        than ``k`` asks (the Krylov space no longer breaks down, see above,
        when it has more dimensions than the basis holds).  A run whose
        Krylov space broke down stops when the basis is full instead of
        restarting.  A bound that leaves less than one block of the space
        unheld (``(max_basis + 1) * block_size > n``, small operators) is
        not applied: the run is exact within ``ceil(n / block_size)``
        blocks.

    Returns
    -------
    LanczosResult
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {', '.join(_WHICH)}, got {which!r}")
    if k < 1 or k > n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    if block_size < 1 or block_size > n:
        raise ValueError(f"block_size must be between 1 and n={n}, got {block_size}")
    if basis_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"basis_dtype must be torch.float32 or torch.float64, got {basis_dtype}")
    if max_basis is not None:
        if not store_basis:
            raise ValueError("max_basis bounds the stored basis; store_basis=False stores none")
        check_max_basis(max_basis, k, block_size, which)
    if not store_basis and block_size != 1:
        raise ValueError(f"store_basis=False runs single-vector Lanczos: block_size must be 1, got {block_size}")
    if max_iter is None:
        max_iter = max(20 * k, 100)
    elif max_iter * block_size < k:
        raise ValueError(
            f"max_iter * block_size = {max_iter} * {block_size} Lanczos vectors cannot give k={k} eigenvalues: "
            f"raise max_iter to at least {math.ceil(k / block_size)}"
        )
    b = block_size
    where = torch.device(device if basis_device is None else basis_device)
    if v0 is None:
        # drawn in float64 whatever the basis dtype, so a float32 run starts
        # from the same vector as a float64 one
        X = torch.randn(n, b, generator=generator, device=device, dtype=torch.float64)
    else:
        X = v0.reshape(n, -1).to(device=device, dtype=torch.float64)
        if X.shape[1] != b:
            raise ValueError(f"v0 must have {b} column(s), got {X.shape[1]}")
    X = X.to(device=where, dtype=basis_dtype)
    if not store_basis:
        # normalized in place by the recurrence, which alone holds it: a
        # reference kept here would hold the start vector through every step
        start = [X[:, 0] if v0 is None else X[:, 0].clone()]
        del X
        return _lanczos_recurrence(matmat, start, n, k, which, tol, max(1, max_iter), callback, matvec_update,
                                   product_dtype)
    if max_basis is not None and (max_basis + 1) * b > n:
        # the basis (nearly) spans the space: no restart, the run is exact
        # (a restart would go on from a block that the space's end cut short)
        max_basis = None
    if max_basis is None:
        max_iter = max(1, min(max_iter, math.ceil(n / b)))
    capacity = max_iter if max_basis is None else min(max_basis, max(1, max_iter))
    basis = _Basis(n, b, capacity, where, basis_dtype)
    draw = _restart_draw(n, generator, device, where, basis_dtype)
    Q0, _, _ = _next_block(X, basis, n, _invariance_threshold(basis_dtype) * float(X.norm(dim=0).max()), draw)
    basis.append(Q0)
    del X, Q0
    # Since the latest thick restart (or the start): the diagonal blocks
    # (b, b) and the sub-diagonal blocks B_{j+1} (W = Q_{j+1} B_{j+1}) of
    # the projected matrix.  After a restart, the basis starts with the
    # kept Ritz vectors: the projected matrix has their Ritz values on its
    # diagonal and ``coupling`` (b, kept) between them and the next block.
    alphas: list[np.ndarray] = []
    betas: list[np.ndarray] = []
    kept: np.ndarray | None = None
    coupling: np.ndarray | None = None
    Bprev: Tensor | None = None
    n_matvec = 0
    theta = S = idx = None
    residuals = np.zeros(k)
    converged = False
    steps = 0
    segment = None  # first column of the Krylov space started at the latest restart (None: no breakdown yet)
    for step in range(max_iter):
        steps = step + 1
        j = basis.blocks - 1  # the current block's place in the basis
        Qj = basis.block(j)
        W = matmat(Qj)
        n_matvec += b
        A = Qj.T @ W
        A = (A + A.T) / 2
        # in place (a copy first only if matmat's result shares the basis'
        # memory): no n-sized temporaries beyond W
        W = _own(W, Qj)
        W.addmm_(Qj, A, alpha=-1)
        if Bprev is not None:
            W.addmm_(basis.block(j - 1), Bprev.T, alpha=-1)
        # (after a thick restart, the first block's components on the kept
        # Ritz vectors, the coupling, are removed by the reorthogonalization)
        alphas.append(A.double().cpu().numpy())
        live = min(n, (j + 1) * b)  # columns of the basis that are vectors (the rest are zero)
        theta, S = _ritz(alphas, betas, live) if kept is None else scipy.linalg.eigh(
            _projected(kept, coupling, alphas, betas))
        idx = _pick(theta, min(k, len(theta)), which)
        scale = max(np.max(np.abs(theta)), np.finfo(float).tiny)
        if live == n:
            # the basis spans the whole space: the Ritz pairs are exact
            del W
            residuals = np.zeros(len(idx))
            if callback is not None:
                callback(n_matvec, torch.as_tensor(theta[idx].copy()))
            converged = True
            break
        basis.orthogonalize_(W)
        Qnext, B, restarted = _next_block(W, basis, n - live, _invariance_threshold(basis_dtype) * scale, draw)
        del W
        betas.append(B)
        # Residual of Ritz pair i: ||B_{j+1} s_i[last block]||.
        residuals = np.linalg.norm(B @ S[-b:, idx], axis=0)
        if callback is not None:
            callback(n_matvec, torch.as_tensor(theta[idx].copy()))
        if restarted == b and segment is None:
            segment = 0  # the first Krylov space is invariant
        if len(idx) == k and np.all(residuals <= tol * scale) and (
                segment is None or _complement_settled(
                    theta[idx[-1]], _projected(kept, coupling, alphas, betas[:-1]), B, segment, which, tol * scale)):
            converged = True
            break
        if step + 1 == max_iter:
            break  # the next vector would never be used
        if basis.blocks == capacity:
            if segment is not None:
                break  # full after a breakdown: no thick restart (see max_basis)
            # Thick restart (Wu and Simon 2000): keep the best Ritz vectors,
            # A Y = Y diag(theta) + Q_next B S[last block], and go on from
            # Q_next; memory stays at ``capacity`` blocks.
            keep = _kept(theta, _kept_columns(capacity, k, b), k, which)
            basis.rotate_(torch.as_tensor(S[:, keep]))
            kept, coupling = theta[keep], B @ S[-b:, keep]
            alphas, betas, Bprev = [], [], None
            basis.append(Qnext)
            del Qnext
            continue
        basis.append(Qnext)
        del Qnext
        Bprev = torch.as_tensor(B, dtype=basis_dtype, device=where)
        if restarted == b:
            # the whole block broke down: a new Krylov space starts from
            # random vectors orthogonal to the basis
            segment = (0 if kept is None else len(kept)) + len(alphas) * b  # (a column of the whole basis)
    assert theta is not None and S is not None and idx is not None
    Y = basis.combine(torch.as_tensor(S[:, idx], device=basis.device))
    return LanczosResult(
        eigenvalues=torch.as_tensor(theta[idx].copy()),
        eigenvectors=Y,
        residuals=torch.as_tensor(np.asarray(residuals, dtype=np.float64)),
        n_matvec=n_matvec,
        n_iter=steps,
        converged=converged,
    )


def _restart_draw(
    n: int, generator: torch.Generator | None, device: torch.device | str, where: torch.device, dtype: torch.dtype
) -> Callable[[], Tensor]:
    """A random unit-scale vector ``(n,)`` in the basis' dtype and device,
    drawn in float64 on ``device`` from ``generator`` (as the start block)."""

    def draw() -> Tensor:
        return torch.randn(n, generator=generator, device=device, dtype=torch.float64).to(device=where, dtype=dtype)

    return draw


def _next_block(
    W: Tensor, basis: _Basis, room: int, threshold: float, draw: Callable[[], Tensor]
) -> tuple[Tensor, np.ndarray, int]:
    """``W = Q B`` with orthonormal ``Q`` orthogonal to the basis, in place of
    ``W`` (whose columns are orthogonal to the basis already).

    The usual case is a QR factorization.  Where a column of ``W`` vanishes
    (its norm, once the previous columns are removed, is at most
    ``threshold``: the Krylov space of that column is invariant), ``Q`` gets
    a random unit vector orthogonal to the basis and to the previous columns
    instead, with a zero row in ``B``: the iteration goes on in the rest of
    the space (a restart) instead of on a column of rounding noise.  Only
    ``room`` columns fit (the space has dimension ``n``); the columns beyond
    are zero.  Returns ``Q``, ``B`` (float64 NumPy) and the number of
    columns that do not continue the Krylov space: replaced, or zero beyond
    the room (``b`` of them: the whole block broke down).
    """
    b = W.shape[1]
    Q, R = torch.linalg.qr(W)
    if room >= b and bool((R.diagonal().abs() > threshold).all()):
        return Q, R.double().cpu().numpy(), 0
    del Q
    # Gram-Schmidt column by column (twice), in place
    B = np.zeros((b, b))
    replaced = 0
    for i in range(b):
        w = W[:, i : i + 1]
        prev = W[:, :i]
        for _ in range(2):
            if i:
                c = prev.T @ w
                w.sub_(prev @ c)
                B[:i, i] += c[:, 0].double().cpu().numpy()
        norm = float(w.norm())
        if i >= room:
            w.zero_()
        elif norm > threshold:
            B[i, i] = norm
            w.div_(norm)
        else:
            replaced += 1
            w.copy_(draw()[:, None])
            for _ in range(2):
                basis.orthogonalize_(w)
                if i:
                    w.sub_(prev @ (prev.T @ w))
            w.div_(w.norm())
    return W, B, replaced + max(0, b - room)


def _complement_settled(
    kth: float, T: np.ndarray, B: np.ndarray, segment: int, which: str, slack: float
) -> bool:
    """After a breakdown: whether the rest of the space can still change the
    wanted values.

    A Krylov space from one start block holds each eigenvalue at most
    ``b`` times; once it is invariant, further copies of the eigenvalues
    it found (the only eigenvalues left, with a random start) lie in the
    rest of the space.  That rest is explored from a random restart; the
    extreme Ritz value of the latest Krylov space (``segment``: its first
    column), once converged, bounds what the rest holds.  The wanted
    values are final when the ``k``-th of them (``kth``) is at least as
    extreme as that bound (up to ``slack``: copies tie).  ``T`` is the
    whole projected matrix (:func:`_projected`, also the kept Ritz values
    of a thick restart), ``B`` the block of the step just taken.
    """
    b = B.shape[0]
    T = T[segment:, segment:]
    values, U = scipy.linalg.eigh(T)
    if which == "LA":
        i = int(np.argmax(values))
    elif which == "SA":
        i = int(np.argmin(values))
    else:
        i = int(np.argmax(np.abs(values)))
    if np.linalg.norm(B @ U[-b:, i]) > slack:
        return False  # the latest Krylov space's extreme has not converged yet
    e = values[i]
    if which == "LA":
        return kth >= e - slack
    if which == "SA":
        return kth <= e + slack
    return abs(kth) >= abs(e) - slack


def _own(w: Tensor, q: Tensor) -> Tensor:
    """``w``, or a copy of it where it shares memory with ``q`` (a matmat
    may return its argument or a view of it): safe to update in place
    without an ``n``-sized temporary in the usual case of a fresh result."""
    if w.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():
        return w.clone()
    return w


def _invariance_threshold(dtype: torch.dtype) -> float:
    # A new Lanczos vector this small relative to ||A|| is rounding noise:
    # the Krylov space is invariant to working precision.
    return 1e-10 if dtype == torch.float64 else 1e-5


def _dot(x: Tensor, y: Tensor) -> float:
    """``x . y`` accumulated in float64, for vectors of any floating dtype,
    converting a block at a time into two float64 scratch blocks allocated
    once per call (no ``n``-sized float64 copy, and no allocation per
    block: a fresh 2 MiB block per conversion page-faulted in every time
    cost 0.8 forward-backward passes per Lanczos step on a 10M model)."""
    if x.dtype == torch.float64:
        return float(torch.dot(x, y))
    n = x.shape[0]
    if n == 0:
        return 0.0
    size = min(n, _DOT_BLOCK)
    xs = torch.empty(size, dtype=torch.float64, device=x.device)
    ys = xs if y is x else torch.empty(size, dtype=torch.float64, device=x.device)
    sums = []
    for i in range(0, n, size):
        m = min(size, n - i)
        a = xs[:m].copy_(x[i : i + m])
        b = a if y is x else ys[:m].copy_(y[i : i + m])
        sums.append(torch.dot(a, b))
    # the block sums stay on the device until one transfer (a GPU syncs
    # once per dot, not once per block), then add up exactly
    return math.fsum(torch.stack(sums).tolist())


_DOT_BLOCK = 1 << 18  # elements converted to float64 at a time (2 MiB)


def _lanczos_recurrence(
    matmat: MatMat,
    start: list[Tensor],
    n: int,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    callback: Callable[[int, Tensor], None] | None,
    matvec_update: Callable[[Tensor, Tensor, float], Tensor] | None = None,
    product_dtype: torch.dtype | None = None,
) -> LanczosResult:
    """Single-vector Lanczos by the three-term recurrence, no stored basis.

    Holds ``q_{j-1}``, ``q_j`` and ``A q_j`` only (two vectors with
    ``matvec_update``, which forms ``A q_j - beta_j q_{j-1}`` in the buffer
    of ``q_{j-1}``), in the dtype of the start vector (``start``, a one-element list this function empties, so
    that no caller keeps the first vector alive); the recurrence's
    coefficients are float64 dot products whatever that dtype.  After each
    step the tridiagonal ``T_j`` is diagonalized and cleaned by
    :func:`_good_ritz`; the residual of Ritz value ``theta_i`` is
    ``beta_j |s_{j,i}|`` (Paige: it bounds the true residual in finite
    precision too, up to rounding).
    """
    q = start.pop()
    q = q.div_(math.sqrt(_dot(q, q)))  # the caller's own copy: no second vector
    # the working precision: the coarser of the vectors' and the products'
    # (float64 vectors do not make a float32 model's products exact)
    eps = max(float(torch.finfo(q.dtype).eps), float(torch.finfo(product_dtype or q.dtype).eps))
    q_prev: Tensor | None = None
    d: list[float] = []
    e: list[float] = []
    beta_prev = 0.0
    values = np.zeros(0)
    residuals = np.zeros(0)
    converged = False
    steps = 0
    for j in range(max_iter):
        steps = j + 1
        if q_prev is not None and matvec_update is not None:
            # A q - beta q_prev in q_prev's own buffer, then alpha from it
            # (Paige's order): two vectors instead of three
            w, q_prev = matvec_update(q, q_prev, -beta_prev), None
            a = _dot(q, w)
            w.sub_(q, alpha=a)
        else:
            w = _own(matmat(q[:, None])[:, 0], q)
            a = _dot(q, w)
            w.sub_(q, alpha=a)
            if q_prev is not None:
                w.sub_(q_prev, alpha=beta_prev)
        beta = math.sqrt(_dot(w, w))
        d.append(a)
        theta, last = _tridiagonal_eig(d, e)
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        values, residuals = _good_ritz(theta, last * beta, d, e, scale, eps)
        order = _pick(values, min(k, len(values)), which)
        values, residuals = values[order], residuals[order]
        if callback is not None:
            callback(j + 1, torch.as_tensor(values.copy()))
        invariant = beta <= _invariance_threshold(q.dtype) * scale
        if len(values) == k and (np.all(residuals <= tol * scale) or invariant):
            converged = True
            break
        if invariant:
            break
        e.append(beta)
        q_prev, q = q, w.div_(beta)
        beta_prev = beta
    return LanczosResult(
        eigenvalues=torch.as_tensor(values.copy()),
        eigenvectors=torch.zeros(n, 0, dtype=q.dtype, device=q.device),
        residuals=torch.as_tensor(np.asarray(residuals, dtype=np.float64)),
        n_matvec=steps,
        n_iter=steps,
        converged=converged,
    )


def _tridiagonal_eig(d: list[float], e: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of the tridiagonal ``(d, e)`` and the last components of
    its eigenvectors."""
    theta, U = scipy.linalg.eigh_tridiagonal(np.array(d), np.array(e[: len(d) - 1]))
    return theta, np.abs(U[-1, :])


def _good_ritz(
    theta: np.ndarray, residual: np.ndarray, d: list[float], e: list[float], scale: float,
    working_eps: float = float(np.finfo(np.float64).eps),
) -> tuple[np.ndarray, np.ndarray]:
    """The Ritz values of a Lanczos run without reorthogonalization that
    approximate eigenvalues of ``A``, each once (Cullum and Willoughby 1985).

    Loss of orthogonality makes a converged eigenvalue appear again as a
    copy, and makes ``T`` have *spurious* eigenvalues that belong to no
    eigenvalue of ``A``.  Copies agree to the rounding of the run's vectors
    and products and are merged (keeping the smallest residual): values
    closer than ``sqrt(working_eps) * scale`` count as one, ``working_eps``
    being the machine epsilon of the vectors and products (float32 copies
    differ by up to about ``1e-5 * scale``, float64 ones by far less), or
    closer than ``working_eps / 2 * scale`` at half precision (float16 and
    bfloat16 products, whose copies agree to a fraction of their
    epsilon).  A spurious value is a simple eigenvalue of ``T`` that is also an eigenvalue of ``T`` with
    its first row and column removed: its eigenvector has a negligible first
    component, so the start vector does not see it (a property of ``T``,
    tested in float64 whatever the vectors' dtype).
    """
    m = len(theta)
    eps = np.finfo(np.float64).eps
    # copies of one eigenvalue: within sqrt(eps) (float32 copies differ by
    # up to about 1e-5 * scale, 80 eps); at half precision that would merge
    # distinct eigenvalues (sqrt(eps) is 9% in bfloat16), and the copies
    # agree to a fraction of eps there (measured: bfloat16 0.1 eps, float16
    # 0.3 eps), so half an eps
    half_precision = working_eps > 1e-4
    multiple_tol = (0.5 * working_eps if half_precision else math.sqrt(max(eps, working_eps))) * scale
    spurious_tol = 8 * eps * m * scale     # a coincidence with T-hat's spectrum
    groups: list[list[int]] = []
    for i in range(m):  # theta is sorted ascending
        if groups and theta[i] - theta[groups[-1][-1]] <= multiple_tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    if m > 1:
        hat = scipy.linalg.eigh_tridiagonal(np.array(d[1:]), np.array(e[1 : m - 1]), eigvals_only=True)
    else:
        hat = np.zeros(0)
    values, residuals = [], []
    for g in groups:
        if len(g) == 1 and len(hat) and np.min(np.abs(hat - theta[g[0]])) <= spurious_tol:
            continue
        best = min(g, key=lambda i: residual[i])
        values.append(theta[best])
        residuals.append(residual[best])
    return np.asarray(values), np.asarray(residuals)


def _block_tridiagonal(alphas: list[np.ndarray], betas: list[np.ndarray]) -> np.ndarray:
    """The (block) tridiagonal Lanczos matrix as a dense array."""
    b = alphas[0].shape[0]
    m = len(alphas) * b
    T = np.zeros((m, m))
    for i, a in enumerate(alphas):
        T[i * b : (i + 1) * b, i * b : (i + 1) * b] = a
    for i, bb in enumerate(betas):
        T[(i + 1) * b : (i + 2) * b, i * b : (i + 1) * b] = bb
        T[i * b : (i + 1) * b, (i + 1) * b : (i + 2) * b] = bb.T
    return T


def _ritz(alphas: list[np.ndarray], betas: list[np.ndarray], live: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the (block) tridiagonal Lanczos matrix.

    Only the first ``live`` basis columns are vectors (the last block of a
    basis that spans the whole space may end in zero columns, which would
    add spurious zero eigenvalues): the eigenvectors have zero rows there.
    """
    b = alphas[0].shape[0]
    m = len(alphas) * b
    live = m if live is None else live
    if b == 1:
        d = np.array([a[0, 0] for a in alphas])
        e = np.array([bb[0, 0] for bb in betas])
        return scipy.linalg.eigh_tridiagonal(d, e)
    theta, U = scipy.linalg.eigh(_block_tridiagonal(alphas, betas)[:live, :live])
    if live < m:
        U = np.vstack([U, np.zeros((m - live, live))])
    return theta, U


def _projected(
    kept: np.ndarray | None, coupling: np.ndarray | None, alphas: list[np.ndarray], betas: list[np.ndarray]
) -> np.ndarray:
    """The projected matrix ``Q^T A Q`` as a dense array: the (block)
    tridiagonal Lanczos matrix, after a thick restart preceded by the kept
    Ritz values on the diagonal and ``coupling`` between them and the first
    block after the restart."""
    T = _block_tridiagonal(alphas, betas)
    if kept is None or coupling is None:
        return T
    ell, b = len(kept), alphas[0].shape[0]
    H = np.zeros((ell + T.shape[0],) * 2)
    H[:ell, :ell] = np.diag(kept)
    H[ell : ell + b, :ell] = coupling
    H[:ell, ell : ell + b] = coupling.T
    H[ell:, ell:] = T
    return H


def min_basis(k: int, b: int, which: str) -> int:
    """The smallest ``max_basis`` (in blocks of ``b``) for ``k`` wanted
    values: room for them and one more block; for ``"LM"`` four more, so
    that a restart keeps a block from each end of the spectrum beside the
    wanted ones (:func:`_kept`).  With less, LM settled on an eigenvalue of
    the wrong sign in 10 to 14 of 24 random spectra (n=60) and reported
    it converged; with four more blocks, in none."""
    wanted = math.ceil(k / b)
    return wanted + (4 if which == "LM" else 1)


def check_max_basis(max_basis: int, k: int, b: int, which: str) -> None:
    """``ValueError`` for a ``max_basis`` below :func:`min_basis`."""
    need = min_basis(k, b, which)
    if max_basis < need:
        why = (f"the k={k} wanted Ritz vectors and a block from each end of the spectrum "
               "(which='LM' settles on eigenvalues of the wrong sign with less)"
               if which == "LM" else f"the k={k} wanted Ritz vectors and one more block")
        raise ValueError(f"max_basis={max_basis} blocks of {b} cannot hold {why}: use at least {need}")


def _kept(theta: np.ndarray, count: int, k: int, which: str) -> np.ndarray:
    """The ``count`` Ritz values a thick restart keeps: the ``k`` wanted
    ones first, then the next ones in the order of ``which``; for ``"LM"``
    the next ones alternately from the top and the bottom of the spectrum.
    Ordered by magnitude alone, the extra vectors all came from the side
    that leads, and a Ritz value still on its way to a wanted eigenvalue of
    the other sign was dropped: on 24 random spectra (n=60, 6 vectors for
    k=3) 8 runs settled on a wrong value, 3 with both ends kept."""
    if which != "LM":
        return _pick(theta, count, which)
    out = list(_pick(theta, min(k, count), "LM"))
    ends = [list(_pick(theta, len(theta), "LA")), list(_pick(theta, len(theta), "SA"))]
    side = 0
    while len(out) < count:
        nxt = next(i for i in ends[side] if i not in out)
        out.append(nxt)
        side = 1 - side
    return np.asarray(out)


def _kept_columns(capacity: int, k: int, b: int) -> int:
    """How many Ritz vectors a thick restart of a basis of ``capacity``
    blocks keeps: the ``k`` wanted ones and half the rest, so that both the
    kept space and the new Krylov steps are large (as in Stewart's
    Krylov-Schur method), in whole blocks, leaving room for one block."""
    wanted = math.ceil(k / b)
    return b * min(capacity - 1, max(wanted, (capacity + wanted) // 2))


# --------------------------------------------------------------------------
# trace estimators
# --------------------------------------------------------------------------


def _column_dots(X: Tensor, Y: Tensor) -> Tensor:
    """``x_i^T y_i`` for the columns, in float64, without an ``n x k``
    temporary."""
    return torch.stack([torch.dot(X[:, i], Y[:, i]).double() for i in range(X.shape[1])])


def _blocks(total: int, batch: int) -> list[int]:
    return [min(batch, total - start) for start in range(0, total, batch)]


def exact_diagonal(matmat: MatMat, n: int, *, batch: int = 8, device: torch.device | str = "cpu") -> Tensor:
    """The diagonal of ``A`` from ``n`` products with the unit vectors."""
    diag = torch.empty(n, dtype=torch.float64, device=device)
    for start in range(0, n, batch):
        cols = torch.arange(start, min(start + batch, n), device=device)
        E = torch.zeros(n, len(cols), dtype=torch.float64, device=device)
        E[cols, torch.arange(len(cols), device=device)] = 1
        diag[cols] = (E * matmat(E)).sum(0)
    return diag


def hutchinson(
    matmat: MatMat,
    n: int,
    n_samples: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    batch: int = 8,
    dtype: torch.dtype = torch.float64,
    quadform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float, Tensor]:
    """Hutchinson's trace estimator with Rademacher vectors.

    The vectors are drawn ``batch`` at a time, so at most ``batch`` of them
    (and their products) exist at once; ``dtype`` is theirs (random signs
    are exact in any dtype; the quadratic forms are summed in float64).
    ``quadform(V)``, if given, returns the forms ``v_i^T A v_i`` of the
    columns directly (float64, ``(k,)``; e.g. without holding the products,
    :meth:`~flatness._hvp.CurvatureOperator.quadratic_forms`); by default
    they are dotted from ``matmat(V)``.

    Returns
    -------
    estimate : float
        Mean of ``z^T A z`` over ``n_samples`` vectors (unbiased).
    std_error : float
        Sample standard deviation over ``sqrt(n_samples)``.
    samples : Tensor
        The ``n_samples`` quadratic forms.
    """
    if n_samples < 2:
        raise ValueError(f"hutchinson needs n_samples >= 2 for a standard error, got {n_samples}")
    form = _quadform(matmat, quadform)
    forms = []
    for b in _blocks(n_samples, batch):
        Z = rademacher(n, b, generator=generator, device=device, dtype=dtype)
        forms.append(form(Z))
        del Z
    q = torch.cat(forms).cpu()
    return float(q.mean()), float(q.std(unbiased=True) / math.sqrt(n_samples)), q


def _quadform(matmat: MatMat, quadform: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
    if quadform is not None:
        return lambda V: quadform(V).double().cpu()
    return lambda V: _column_dots(V, matmat(V)).cpu()


def _orthonormalize_(X: Tensor) -> Tensor:
    """Orthonormalize the columns of ``X`` in place (Gram-Schmidt, each
    column twice: "twice is enough"), so no second ``n x k`` matrix exists as
    it would with a QR factorization.  A column in the span of the previous
    ones becomes zero: it adds nothing to the range."""
    scale = float(X.norm()) if X.numel() else 0.0
    for i in range(X.shape[1]):
        x = X[:, i]
        for _ in range(2):
            if i:
                x.sub_(X[:, :i] @ (X[:, :i].T @ x))
        norm = float(x.norm())
        if norm <= 1e3 * torch.finfo(X.dtype).eps * scale:
            x.zero_()
        else:
            x.div_(norm)
    return X


def hutchpp(
    matmat: MatMat,
    n: int,
    n_samples: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    batch: int = 8,
    dtype: torch.dtype = torch.float64,
    sketch: int | None = None,
    quadform: Callable[[Tensor], Tensor] | None = None,
    matmat_out: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[float, float, Tensor]:
    """Hutch++ (Meyer, Musco, Musco and Woodruff 2021) with ``n_samples``
    products.

    A third of the products sketch the range of ``A`` (``Q = orth(A S)``),
    a third compute ``tr(Q^T A Q)`` exactly, and the rest run Hutchinson on
    the deflated operator ``(I - QQ^T) A (I - QQ^T)``.  The estimate is
    unbiased for any ``Q``; its standard error is that of the Hutchinson part
    (the deflated part is all that is random once ``Q`` is fixed).

    Memory: the ``s = n_samples // 3`` columns of ``A S`` (then ``Q``), plus
    ``batch`` vectors and their products at a time.  ``sketch`` sets ``s``
    (at most ``(n_samples - 2) // 2``) to bound that memory; the products it
    frees go to the Hutchinson part, and the estimate stays unbiased (with
    ``sketch=0`` it is Hutchinson's).  ``matmat_out(V, out)``, if given,
    writes ``A V`` into ``out`` (the sketch's columns: no product beside
    them), and ``quadform`` gives the quadratic forms of the other two
    phases without their products (see :func:`hutchinson`): the vectors of
    one pass are then all that exists beside ``Q``.

    Returns
    -------
    estimate, std_error, samples
        ``samples`` are the deflated quadratic forms.
    """
    if n_samples < 4:
        raise ValueError(f"hutch++ needs n_samples >= 4 (sketch, projection, >= 2 samples), got {n_samples}")
    if sketch is None:
        s = min(n_samples // 3, n)
    elif sketch < 0 or 2 * sketch + 2 > n_samples:
        raise ValueError(f"sketch must be between 0 and (n_samples - 2) // 2 = {(n_samples - 2) // 2}, got {sketch}")
    else:
        s = min(sketch, n)
    g = n_samples - 2 * s
    AS = torch.empty(s, n, dtype=dtype, device=device).T  # column after column, as rademacher
    start = 0
    for b in _blocks(s, batch):
        S = rademacher(n, b, generator=generator, device=device, dtype=dtype)
        if matmat_out is not None:  # written in place: no product beside the sketch
            matmat_out(S, AS[:, start : start + b])
        else:
            AS[:, start : start + b] = matmat(S)
        del S
        start += b
    Q = _orthonormalize_(AS)
    del AS
    form = _quadform(matmat, quadform)
    exact_part = 0.0
    for start in range(0, s, batch):
        exact_part += float(form(Q[:, start : start + batch]).sum())
    forms = []
    for b in _blocks(g, batch):
        G = rademacher(n, b, generator=generator, device=device, dtype=dtype)
        G.addmm_(Q, Q.T @ G, alpha=-1)
        forms.append(form(G))
        del G
    q = torch.cat(forms).cpu()
    return exact_part + float(q.mean()), float(q.std(unbiased=True) / math.sqrt(g)), q


# --------------------------------------------------------------------------
# stochastic Lanczos quadrature
# --------------------------------------------------------------------------


def slq_nodes(
    matmat: MatMat,
    n: int,
    n_vectors: int,
    n_steps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    vectors: Tensor | None = None,
    basis_dtype: torch.dtype = torch.float64,
    store_basis: bool = True,
    matvec_update: Callable[[Tensor, Tensor, float], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of the spectral measure.

    For each start vector ``v`` (Rademacher, normalized), ``n_steps`` Lanczos
    steps give the tridiagonal ``T = U diag(theta) U^T``; the nodes are
    ``theta`` and the weights ``U[0, :]**2`` (they sum to 1), so
    ``sum_i w_i f(theta_i)`` equals ``v^T f(A) v`` for polynomials ``f`` of
    degree below ``2 * n_steps`` (Golub and Meurant).  Averaged over vectors
    this estimates ``tr f(A) / n`` (Ubaru, Chen and Saad 2017).

    Parameters
    ----------
    vectors : Tensor, optional
        ``(n, n_vectors)`` start vectors to use instead of random ones (each
        is normalized).  Random ones are drawn one at a time (the same signs
        as drawn at once), so only one exists.
    basis_dtype : torch.dtype
        The Lanczos vectors' dtype (float64 by default; float32 halves the
        basis).
    store_basis : bool
        ``True``: full reorthogonalization against a stored basis of
        ``n_steps`` vectors.  ``False``: the three-term recurrence, which
        holds two or three vectors whatever ``n_steps`` is
        (:func:`_recurrence_tridiagonal`).  Without reorthogonalization the
        quadrature is still that of the start vector's measure to the
        working precision for the low moments, which is what a density
        needs (Greenbaum 1989; Golub and Meurant 2010, ch. 4): converged
        eigenvalues come back as several nodes whose weights add up to the
        one node's weight.
    matvec_update : callable, optional
        ``matvec_update(v, out, beta)``: ``out <- A v + beta out`` in place
        (the recurrence then holds two vectors, not three).

    Returns
    -------
    nodes, weights : Tensor
        ``(n_vectors, m)`` float64, ``m <= n_steps``; weights of each row sum
        to 1 (rows padded with zero weights when a run stops early).
    """
    count = n_vectors if vectors is None else vectors.shape[1]
    nodes = torch.zeros(count, n_steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    for i in range(count):
        if vectors is None:
            assert generator is not None
            v = rademacher(n, 1, generator=generator, device=device, dtype=basis_dtype)[:, 0].contiguous()
        else:
            v = vectors[:, i].to(basis_dtype, copy=True)
        v.div_(v.norm())
        start = [v]
        del v  # (the callee's own: no second reference held during the run)
        if store_basis:
            theta, U = _tridiagonal(matmat, start, n_steps)
        else:
            theta, U = _recurrence_tridiagonal(matmat, start, n_steps, matvec_update)
        nodes[i, : len(theta)] = torch.as_tensor(theta)
        weights[i, : len(theta)] = torch.as_tensor(U[0, :] ** 2)
    return nodes, weights


def _tridiagonal(matmat: MatMat, start: list[Tensor], m: int) -> tuple[np.ndarray, np.ndarray]:
    """``m`` Lanczos steps from the unit vector in ``start`` (a one-element
    list this function empties) with full reorthogonalization (the basis in
    its dtype); returns the eigen-decomposition of the tridiagonal matrix.

    The basis is stored vector after vector (rows of an ``(m, n)`` tensor),
    and each new vector is orthogonalized in place (``w -= Q^T (Q w)``,
    twice), so the basis is the only ``n``-sized storage beside the product:
    a column-major basis and out-of-place updates held about 5 more vectors
    at the peak (10 P for a float32 model and a float64 basis)."""
    q = start.pop()
    n = q.shape[0]
    m = min(m, n)
    Q = torch.empty(m, n, dtype=q.dtype, device=q.device)
    Q[0] = q
    del q
    d: list[float] = []
    e: list[float] = []
    for j in range(m):
        w = _own(matmat(Q[j][:, None])[:, 0].to(Q.dtype), Q)
        a = _dot(Q[j], w)
        d.append(a)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            w.addmv_(Q[: j + 1].T, Q[: j + 1] @ w, alpha=-1)
        beta = float(w.norm()) if w.dtype == torch.float64 else math.sqrt(_dot(w, w))
        if j == m - 1 or beta <= 1e-12 * max(abs(x) for x in d + [1e-300]):
            break
        e.append(beta)
        torch.div(w, beta, out=Q[j + 1])
        del w
    return scipy.linalg.eigh_tridiagonal(np.array(d), np.array(e[: len(d) - 1]))


def _recurrence_tridiagonal(
    matmat: MatMat, start: list[Tensor], m: int,
    matvec_update: Callable[[Tensor, Tensor, float], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` steps of the three-term Lanczos recurrence from the unit vector
    in ``start`` (a one-element list this function empties, so that no
    caller keeps it alive), no basis kept: ``q_{j-1}``, ``q_j`` and the
    product (two vectors with ``matvec_update``, as in
    :func:`_lanczos_recurrence`), in ``q``'s dtype, the coefficients as
    float64 dot products.  Returns the eigen-decomposition of ``T``.  Stops
    early when the Krylov space is invariant to working precision."""
    q = start.pop()
    m = min(m, q.shape[0])
    q_prev: Tensor | None = None
    d: list[float] = []
    e: list[float] = []
    beta_prev = 0.0
    for j in range(m):
        if q_prev is not None and matvec_update is not None:
            w, q_prev = matvec_update(q, q_prev, -beta_prev), None  # A q - beta q_prev in q_prev's buffer
            a = _dot(q, w)
            w.sub_(q, alpha=a)
        else:
            w = _own(matmat(q[:, None])[:, 0].to(q.dtype), q)
            a = _dot(q, w)
            w.sub_(q, alpha=a)
            if q_prev is not None:
                w.sub_(q_prev, alpha=beta_prev)
        d.append(a)
        beta = math.sqrt(_dot(w, w))
        scale = max(abs(x) for x in d + e) or 1.0
        if j == m - 1 or beta <= _invariance_threshold(q.dtype) * scale:
            break
        e.append(beta)
        q_prev, q = q, w.div_(beta)
        beta_prev = beta
    return scipy.linalg.eigh_tridiagonal(np.array(d), np.array(e[: len(d) - 1]))


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Smooth the quadrature measure with a Gaussian of width ``sigma``:
    ``phi(t) = mean_v sum_i w_vi N(t; theta_vi, sigma^2)`` (integrates to 1)."""
    diff = grid[:, None, None] - nodes[None]
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(-1).mean(-1)

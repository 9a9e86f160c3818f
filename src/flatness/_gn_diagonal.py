"""The exact Hessian diagonal of a piecewise-linear network from the
Gauss-Newton factors, for minimum sharpness (``method="gn"``).

The per-layer traces are exact by default (``method="gn"``), as in the
paper.  Within one layer the network is linear in that layer's weights and
bias (the activation pattern is fixed almost everywhere), so the second
derivative of the outputs along a single parameter vanishes and every
*diagonal* entry of the Hessian equals that of the generalized Gauss-Newton
matrix ``J^T H_z J``.  With ``H_z = U diag(lambda) U^T`` the Hessian of sample
``i``'s loss in its outputs,

    diag H = (1/N) sum_i sum_r lambda_{i,r} (J_i^T u_{i,r})**2,

which takes one backward pass per factor column ``r`` and sample: about
``K`` per-sample gradient passes for ``K`` outputs.  For mean cross-entropy
the factor is closed-form, ``u_k = sqrt(p_k) (e_k - p)`` (so that
``sum_k u_k u_k^T = diag(p) - p p^T``); for any other loss it comes from
``torch.func.hessian`` of the loss of one sample and ``eigh``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import hessian as func_hessian
from torch.func import vjp, vmap

from flatness._checks import kernel_eps, require_finite
from flatness._data import batch_size, iter_batches, split_batch
from flatness._distributed import sum_
from flatness._functional import LossFn, _as_args, _as_kwargs, default_loss, dense_gradients
from flatness._guard import ModelGuard, disable_running_stats
from flatness._hvp import CurvatureOperator
from flatness._params import unwrap
from flatness._per_sample import _add_batch_dim
from flatness._products import double_backward_hvp
from flatness._rng import private_rng

#: Bytes of per-sample gradients held at once by ``method="gn"``.
_GN_CHUNK_BYTES = 1 << 26


def _check_gn_structure(model: nn.Module, train: bool) -> None:
    """Per-sample passes cannot reproduce a normalization by the statistics
    of the batch (BatchNorm in training mode)."""
    if not train:
        return
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(  # noqa: TRY004 - a bad option, not a bad type
                f"method='gn' works sample by sample, but {name} ({type(m).__name__}) normalizes by "
                "the statistics of the batch when train=True: use train=False, method='exact' "
                "(small models) or method='hutchinson'"
            )


def _verify_exactness(op: CurvatureOperator, inputs: Any, targets: Tensor, gn_diag: Tensor) -> None:
    """Compare the Gauss-Newton diagonal of one batch with the Hessian's at
    the largest entry of every parameter tensor (one Hessian-vector product
    each): they agree only if the outputs are linear in each layer's
    parameters, which the rescaling symmetry alone does not guarantee (a
    norm pooling is positively homogeneous, yet smooth)."""
    ps = op.params
    sizes = [p.numel() for p in ps.params]
    T = len(sizes)
    picks, offset = [], 0
    for k in sizes:
        picks.append(offset + int(gn_diag[offset:offset + k].abs().argmax()))
        offset += k
    E = torch.zeros(ps.numel, T, dtype=ps.dtype, device=ps.device)
    E[picks, torch.arange(T)] = 1
    # one batch, few vectors: double backward, which works for every loss
    HE = op.flatten(
        double_backward_hvp(op.model, ps, inputs, targets, op.unflatten(E), loss_fn=op.loss_fn), batched=True
    )
    h = HE[picks, torch.arange(T)].double()
    gn = gn_diag[picks]
    scale = torch.maximum(gn.abs(), h.abs()).clamp_min(float(gn.abs().max()) * 1e-6)
    rel = 1e3 * torch.finfo(ps.dtype).eps
    if kernel_eps(ps.dtype, ps.device) > torch.finfo(ps.dtype).eps:
        rel = max(rel, 1e-2)  # float32 products in TF32 on a GPU: rounding of 1e-3
    tol = rel * scale
    bad = ((h - gn).abs() > tol).nonzero().flatten().tolist()
    if bad:
        names = [ps.names[t] for t in bad]
        raise ValueError(
            "method='gn' needs a network that is linear in each layer's parameters (Linear/Conv "
            "layers joined by piecewise-linear activations and pooling), but its Hessian diagonal "
            f"differs from the Gauss-Newton one in {', '.join(names)} (Hessian {float(h[bad[0]]):.6g}, "
            f"Gauss-Newton {float(gn[bad[0]]):.6g}): use method='exact' (small models) or "
            "method='hutchinson'"
        )


def _check_gn_outputs(op: CurvatureOperator, z0: Any) -> None:
    """``method="gn"`` factors the loss's Hessian in the outputs of each
    sample, vmapped: one output tensor, no buffer written in ``forward``."""
    from flatness._products import buffers_written_in_forward

    if not isinstance(z0, Tensor):
        raise ValueError(
            "method='gn' factors the Hessian of the loss in the model's outputs, which must be "
            f"one tensor, but this model returns a {type(z0).__name__}; use method='exact' or "
            "method='hutchinson'"
        )
    ps = op.params
    with ModelGuard(op.model, train=op.train):
        inputs, targets = next(iter(iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=1)))
        written = buffers_written_in_forward(op.model, ps, inputs, targets, op.loss_fn)
    if written:
        raise ValueError(
            "method='gn' differentiates the model sample by sample with torch.func, which cannot "
            f"write the buffers this model writes in forward ({', '.join(written)}); use "
            "method='exact' or method='hutchinson'"
        )


def _loss_factors(loss_fn: LossFn, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Factor the Hessian of each sample's loss in its outputs,
    ``H_i = sum_r sign_{i,r} u_{i,r} u_{i,r}^T``.

    Returns ``U`` of shape ``(c, r, *z.shape[1:])`` and ``sign`` of shape
    ``(c, r)``.
    """
    c = z.shape[0]
    if loss_fn is default_loss and z.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        # Mean cross-entropy: diag(p) - p p^T = sum_k u_k u_k^T with
        # u_k = sqrt(p_k) (e_k - p), since sum_k p_k = 1.
        p = torch.softmax(z.double(), dim=1)
        eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
        U = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
        return U.to(z.dtype), torch.ones(c, z.shape[1], dtype=z.dtype, device=z.device)

    def sample_loss(zi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(zi[None], yi[None]).reshape(())

    # A loop, not vmap: a user's loss may call .item() or one_hot (few
    # outputs per sample, so these Hessians are cheap next to the passes).
    m = z[0].numel()
    H = torch.stack([func_hessian(sample_loss)(z[i], y[i]).reshape(m, m) for i in range(c)]).double()
    lam, V = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    # Rounding leaves eigenvalues of order eps * |H| where the exact ones are
    # 0 (the softmax's constant direction): drop them, keep the sign of the rest.
    tiny = lam.abs().amax(1, keepdim=True) * lam.shape[1] * torch.finfo(torch.float64).eps
    lam = torch.where(lam.abs() <= tiny, 0.0, lam)
    U = (lam.abs().sqrt()[:, None, :] * V).transpose(1, 2)  # rows: sqrt|lambda_r| v_r
    return U.reshape(c, -1, *z.shape[1:]).to(z.dtype), lam.sign().to(z.dtype)


def _reduction_scale(loss_fn: LossFn, z: Tensor, y: Tensor) -> float:
    """``1 / n`` if ``loss_fn`` on the batch is the mean of its per-sample
    values (each a batch of one), ``1`` if it is their sum; else ValueError
    (the Gauss-Newton factors are per sample)."""
    n = z.shape[0]
    whole = float(loss_fn(z, y))
    per = torch.stack([loss_fn(z[i:i + 1], y[i:i + 1]).reshape(()) for i in range(n)]).double()
    tol = 1e3 * torch.finfo(z.dtype).eps
    for scale, ref in ((1.0 / n, float(per.mean())), (1.0, float(per.sum()))):
        if abs(whole - ref) <= tol * max(abs(ref), abs(whole), 1e-30) + 1e-300:
            return scale
    raise ValueError(
        f"loss_fn on a batch ({whole:.6g}) is neither the mean ({float(per.mean()):.6g}) nor the "
        f"sum ({float(per.sum()):.6g}) of its values on single samples; method='gn' needs a "
        "per-sample loss: use method='exact' or method='hutchinson'"
    )


def _gn_diagonal(op: CurvatureOperator, chunk_size: int | None, bar: Any) -> tuple[Tensor, int]:
    """The exact Hessian diagonal of a network that is linear in each layer's
    parameters: ``(1/N) sum_i sum_r sign_{i,r} (J_i^T u_{i,r})**2`` over all
    samples of the data (the size-weighted average over batches).

    Returns the flat diagonal (float64) and the number of per-sample
    backward passes.
    """
    ps = op.params
    module = unwrap(op.model)
    n = ps.numel
    values = tuple(ps.detached())
    itemsize = torch.finfo(ps.dtype).bits // 8
    acc = torch.zeros(n, dtype=torch.float64, device=ps.device)
    total = 0
    n_backward = 0

    def outputs(vals: tuple[Tensor, ...], x: Any) -> Tensor:
        xb = _add_batch_dim(x)
        with dense_gradients(module):
            out = torch.func.functional_call(module, ps.as_dict(vals), _as_args(xb), _as_kwargs(xb), strict=False)
        return out[0]

    def pulled(x: Any, U: Tensor) -> tuple[Tensor, ...]:
        # J_i^T u for every row u of U: one backward pass per row.
        _, pull = vjp(lambda *vals: outputs(vals, x), *values)
        return vmap(pull)(U)

    with ModelGuard(op.model, train=op.train), private_rng(op.seed, ps.device), torch.no_grad(), \
            disable_running_stats(module):
        for inputs, targets in iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=op.n_batches):
            nb = batch_size(targets)
            z = vmap(outputs, in_dims=(None, 0), randomness="different")(values, inputs)
            require_finite(z.sum(), "the model's outputs")
            # The default loss on class indices is a mean by definition; any
            # other is checked.
            plain = (op.loss_fn is default_loss and z.dim() == 2 and targets.dim() == 1
                     and not targets.is_floating_point() and bool((targets >= 0).all()))
            scale = 1.0 / nb if plain else _reduction_scale(op.loss_fn, z, targets)
            m = z[0].numel()
            chunk = chunk_size or max(1, _GN_CHUNK_BYTES // max(1, m * n * itemsize))
            batch_acc = torch.zeros(n, dtype=torch.float64, device=ps.device)
            start = 0
            for x, y in split_batch(inputs, targets, chunk):
                c = batch_size(y)
                zc = z[start:start + c]
                start += c
                U, sign = _loss_factors(op.loss_fn, zc, y)
                grads = vmap(pulled, randomness="different")(x, U)  # each (c, r, *shape)
                # sum_{i,r} sign * g**2 as one matrix-vector product per tensor,
                # in the parameters' dtype (no float64 copy of the gradients).
                w = sign.reshape(1, -1)
                offset = 0
                for g in grads:
                    k = g[0, 0].numel()
                    flat = g.reshape(-1, k)
                    batch_acc[offset:offset + k] += (w @ flat.mul_(flat))[0].double()
                    offset += k
                n_backward += c * U.shape[1]
                if bar is not None:
                    bar.update(c)
            if total == 0:  # first batch
                _verify_exactness(op, inputs, targets, batch_acc * scale)
            acc += batch_acc * (scale * nb)
            total += nb
    acc, total = sum_(acc, total)
    return acc / total, n_backward

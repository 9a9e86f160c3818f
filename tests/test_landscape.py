"""flatness.landscape against closed forms and plain reference loops (float64)."""

from __future__ import annotations

import copy
import datetime
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import cases
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatness import landscape as L

DT = torch.float64


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


class Quadratic(nn.Module):
    """``0.5 (w - w*)^T A (w - w*)`` as a model: the output is the loss."""

    def __init__(self, a: torch.Tensor, w_star: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w[:6].reshape(2, 3).clone())
        self.bias = nn.Parameter(w[6:].clone())
        self.register_buffer("a", a)
        self.register_buffer("w_star", w_star)

    def flat(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight.reshape(-1), bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.flat(self.weight, self.bias) - self.w_star
        return 0.5 * r @ self.a @ r + 0.0 * x.sum()


def _identity_loss(outputs, targets):
    return outputs


def _quadratic(seed=0, w=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(9, 9, generator=g, dtype=DT)
    a = q @ q.T / 9 + torch.eye(9, dtype=DT)
    w_star = torch.randn(9, generator=g, dtype=DT)
    w = torch.randn(9, generator=g, dtype=DT) if w is None else w
    return Quadratic(a, w_star, w), a, w_star


QBATCH = (torch.zeros(4, 1, dtype=DT), torch.zeros(4, dtype=DT))


def _flat(vectors):
    return torch.cat([t.reshape(-1) for t in vectors])


def _mlp(seed=0, width=8):
    return cases.mlp(seed, (5, width, 3), act=nn.ReLU, dtype=DT)


class CNN(nn.Module):
    def __init__(self, bn=True, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=momentum) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(4, momentum=momentum) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.flatten(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.layer(self.emb(tokens)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _image_batches(n_batches=3, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 7, 7, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n_batches)]


def _reference_slice(model, batches, ps_names, dirs, points, loss_fn=nn.functional.cross_entropy):
    """A plain loop: copy the model, write the weights, evaluate in eval mode."""
    out = []
    for c in points:
        m = copy.deepcopy(model).eval()
        named = dict(m.named_parameters())
        with torch.no_grad():
            for i, n in enumerate(ps_names):
                named[n].add_(sum(ci * d[i] for ci, d in zip(c, dirs)))
            total = sum(loss_fn(m(x), y).item() * len(y) for x, y in batches)
        out.append(total / sum(len(y) for _, y in batches))
    return torch.tensor(out, dtype=DT)


def _snapshot(model):
    return (
        [(n, p.detach().clone(), p.data_ptr(), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [(n, b.detach().clone(), b.data_ptr()) for n, b in model.named_buffers()],
        [m.training for m in model.modules()],
    )


def _assert_same(model, snap):
    params, buffers, modes = snap
    for (n, v, ptr, req, grad), p in zip(params, model.parameters()):
        assert torch.equal(p.detach(), v) and p.data_ptr() == ptr and p.requires_grad == req and p.grad is grad, n
    for (n, v, ptr), b in zip(buffers, model.buffers()):
        assert torch.equal(b, v) and b.data_ptr() == ptr, n
    assert [m.training for m in model.modules()] == modes


# --------------------------------------------------------------------------
# closed forms on a quadratic
# --------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_slices_equal_the_analytic_parabola_and_paraboloid(engine):
    model, a, w_star = _quadratic()
    w = _flat([model.weight, model.bias]).detach()
    d = L.directions(model, "random", k=2, seed=3)
    u, v = _flat(d[0]), _flat(d[1])
    g = a @ (w - w_star)
    l0 = 0.5 * (w - w_star) @ a @ (w - w_star)
    grid = torch.linspace(-2, 1.5, 7, dtype=DT)
    one = L.slice(model, QBATCH, [d[0]], grid=grid, loss_fn=_identity_loss, engine=engine)
    expected = l0 + grid * (g @ u) + 0.5 * grid**2 * (u @ a @ u)
    assert torch.allclose(one.loss, expected, rtol=0, atol=1e-10)
    assert one.accuracy is None and math.isclose(one.center_loss, float(l0), abs_tol=1e-12)
    two = L.slice(model, QBATCH, d, grid=[(-1.0, 1.0, 5), grid], loss_fn=_identity_loss, engine=engine)
    aa, bb = torch.meshgrid(torch.linspace(-1, 1, 5, dtype=DT), grid, indexing="ij")
    expected = (l0 + aa * (g @ u) + bb * (g @ v) + 0.5 * aa**2 * (u @ a @ u)
                + 0.5 * bb**2 * (v @ a @ v) + aa * bb * (u @ a @ v))
    assert two.loss.shape == (5, 7)
    assert torch.allclose(two.loss, expected, rtol=0, atol=1e-10)


def test_interpolation_and_barriers_equal_the_closed_form():
    model_a, a, w_star = _quadratic(0)
    model_b, _, _ = _quadratic(0, w=torch.randn(9, generator=torch.Generator().manual_seed(9), dtype=DT))
    wa, wb = _flat([model_a.weight, model_a.bias]).detach(), _flat([model_b.weight, model_b.bias]).detach()

    def loss(w):
        return 0.5 * (w - w_star) @ a @ (w - w_star)

    r = L.interpolate(model_a, model_b, QBATCH, n_points=11, loss_fn=_identity_loss)
    t = torch.tensor(r.t, dtype=DT)
    expected = torch.stack([loss((1 - ti) * wa + ti * wb) for ti in t])
    assert torch.allclose(r.loss, expected, rtol=0, atol=1e-10)
    la, lb = float(loss(wa)), float(loss(wb))
    assert math.isclose(r.loss_a, la, abs_tol=1e-12) and math.isclose(r.loss_b, lb, abs_tol=1e-10)
    # One convex bowl: the rise above the chord is -t(1-t)/2 d^T A d <= 0;
    # over [0, 1] its maximum is 0, at the end points.
    dad = float((wb - wa) @ a @ (wb - wa))
    assert r.barrier <= 1e-10 and abs(r.barrier) < 1e-10
    inner = L.interpolate(model_a, model_b, QBATCH, t=[0.25, 0.5, 0.75], loss_fn=_identity_loss)
    assert inner.barrier < 0
    assert math.isclose(inner.barrier, -0.5 * 0.25 * 0.75 * dad, rel_tol=1e-10)
    fr = L.interpolate(model_a, model_b, QBATCH, t=[0.25, 0.5, 0.75], loss_fn=_identity_loss, barrier="frankle")
    inner_losses = [float(loss((1 - ti) * wa + ti * wb)) for ti in (0.25, 0.5, 0.75)]
    assert math.isclose(fr.barrier, max(inner_losses) - 0.5 * (la + lb), rel_tol=1e-10)
    # extrapolation beyond the end points follows the same parabola
    ext = L.interpolate(model_a, model_b, QBATCH, t=[-0.5, 1.5], loss_fn=_identity_loss)
    assert torch.allclose(ext.loss, torch.stack([loss(1.5 * wa - 0.5 * wb), loss(-0.5 * wa + 1.5 * wb)]), atol=1e-10)
    assert math.isnan(ext.barrier)  # no point of the segment itself


def test_barrier_matrix_is_pairwise_interpolation():
    models = [_quadratic(0, w=torch.randn(9, generator=torch.Generator().manual_seed(s), dtype=DT))[0]
              for s in (1, 2, 3)]
    res = L.loss_barrier(models, QBATCH, n_points=9, kind="frankle", loss_fn=_identity_loss)
    assert res.matrix.shape == (3, 3) and torch.equal(res.matrix, res.matrix.T)
    assert torch.all(res.matrix.diagonal() == 0)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        r = L.interpolate(models[i], models[j], QBATCH, 9, barrier="frankle", loss_fn=_identity_loss)
        assert res.matrix[i, j] == r.barrier
    assert math.isclose(res.value, float(res.matrix[0, 1] + res.matrix[0, 2] + res.matrix[1, 2]) / 3)
    default = L.loss_barrier(models, QBATCH, n_points=9, loss_fn=_identity_loss)
    assert default.kind == "entezari" and torch.all(default.matrix.abs() < 1e-10)
    assert "0-2" in res.to_dict()["curves"]


def test_eigen_directions_are_the_hessian_eigenvectors():
    model, a, _ = _quadratic()
    d = L.directions(model, "eigen", k=2, data=QBATCH, loss_fn=_identity_loss, tol=1e-12)
    evals, evecs = torch.linalg.eigh(a)
    assert np.allclose(d.eigenvalues, evals.flip(0)[:2].tolist(), atol=1e-8)
    for i in range(2):
        assert abs(abs(float(_flat(d[i]) @ evecs[:, -1 - i])) - 1) < 1e-8
    # the slice's curvature along the top eigenvector is the top eigenvalue
    r = L.slice(model, QBATCH, d, grid=(-1.0, 1.0, 3), loss_fn=_identity_loss)
    for i in range(2):
        line = r.loss[:, 1] if i == 0 else r.loss[1, :]
        assert math.isclose(float(line[0] + line[2] - 2 * line[1]), d.eigenvalues[i], rel_tol=1e-8)
    assert r.directions["kind"] == "eigen" and r.directions["eigenvalues"] == d.eigenvalues


# --------------------------------------------------------------------------
# filter normalisation
# --------------------------------------------------------------------------


def test_filter_normalisation_matches_each_filter_norm():
    model = CNN().to(DT)
    d = L.directions(model, "filter", seed=1)
    for (n, p), t in zip(model.named_parameters(), d[0]):
        if p.dim() <= 1:
            assert torch.all(t == 0), n  # biases and BatchNorm: zero (the paper's default)
        else:
            got = t.reshape(t.shape[0], -1).norm(dim=1)
            want = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(got, want, rtol=0, atol=1e-12), n
    keep = L.directions(model, "filter", bias="keep", seed=1)
    for p, t in zip(model.parameters(), keep[0]):
        if p.dim() <= 1:
            assert torch.equal(t, p.detach())
    layer = L.directions(model, "layer", seed=1)
    for p, t in zip(model.parameters(), layer[0]):
        if p.dim() > 1:
            assert math.isclose(float(t.norm()), float(p.detach().norm()), rel_tol=1e-12)
    # the same seed gives the same draw; another seed another one
    assert all(torch.equal(x, y) for x, y in zip(d[1], L.directions(model, "filter", seed=1)[1]))
    assert not torch.equal(d[0][0], L.directions(model, "filter", seed=2)[0][0])


def test_relu_rescaling_leaves_the_filter_normalised_slice_unchanged():
    model = _mlp(0)
    x, y = torch.randn(20, 5, dtype=DT), torch.randint(0, 3, (20,))
    scaled = copy.deepcopy(model)
    c = 5.0
    with torch.no_grad():
        scaled[0].weight.mul_(c)
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c)
    grid = (-1.0, 1.0, 5)
    f1 = L.slice(model, (x, y), L.directions(model, "filter", seed=4), grid=grid)
    f2 = L.slice(scaled, (x, y), L.directions(scaled, "filter", seed=4), grid=grid)
    assert torch.allclose(f1.loss, f2.loss, rtol=0, atol=1e-10)
    r1 = L.slice(model, (x, y), L.directions(model, "random", seed=4), grid=grid)
    r2 = L.slice(scaled, (x, y), L.directions(scaled, "random", seed=4), grid=grid)
    assert (r1.loss - r2.loss).abs().max() > 1e-2  # the control: without normalisation it changes


# --------------------------------------------------------------------------
# PCA directions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_pca_directions_equal_numpy_svd(center):
    model = _mlp(0)
    g = torch.Generator().manual_seed(5)
    ckpts = []
    for i in range(6):
        ckpts.append({n: p.detach() + torch.randn(p.shape, generator=g, dtype=DT) * (0.1 * (6 - i))
                      for n, p in model.named_parameters()})
    d = L.directions(model, "pca", k=2, checkpoints=ckpts, center=center)
    final = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    diffs = np.stack([np.concatenate([c[n].numpy().ravel() for n, _ in model.named_parameters()]) - final
                      for c in ckpts])
    mat = diffs - diffs.mean(0) if center else diffs
    _, s, vt = np.linalg.svd(mat, full_matrices=False)
    for i in range(2):
        ref = vt[i] * np.sign(vt[i][np.argmax(np.abs(vt[i]))])
        assert np.allclose(_flat(d[i]).numpy(), ref, atol=1e-10)
    ratio = d.explained_variance_ratio
    assert np.allclose(ratio, (s[:2] ** 2 / (s**2).sum()), atol=1e-12)
    assert sum(ratio) <= 1 + 1e-12 and ratio[0] >= ratio[1]
    traj = np.array(d.trajectory)
    assert traj.shape == (7, 2) and np.allclose(traj[-1], 0)
    assert np.allclose(traj[:-1], diffs @ np.stack([_flat(d[0]).numpy(), _flat(d[1]).numpy()]).T, atol=1e-10)
    # checkpoints as models or tensor lists give the same
    as_models = []
    for c in ckpts:
        m = copy.deepcopy(model)
        m.load_state_dict(c)
        as_models.append(m)
    d2 = L.directions(model, "pca", checkpoints=as_models, center=center)
    d3 = L.directions(model, "pca", checkpoints=[list(c.values()) for c in ckpts], center=center)
    for other in (d2, d3):
        assert torch.allclose(_flat(other[0]), _flat(d[0]), atol=1e-12)
    x, y = torch.randn(10, 5, dtype=DT), torch.randint(0, 3, (10,))
    s2 = L.slice(model, (x, y), d, grid=3)
    assert s2.trajectory == d.trajectory and s2.directions["explained_variance_ratio"] == ratio


# --------------------------------------------------------------------------
# BatchNorm statistics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_recompute_equals_recomputing_by_hand(momentum):
    torch.manual_seed(0)
    model = CNN(momentum=momentum).to(DT)
    model.train()
    with torch.no_grad():  # running statistics far from the true ones
        for b in model.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.fill_(0.5)
                b.running_var.fill_(3.0)
    model.eval()
    batches = _image_batches(3)
    bn_batches = _image_batches(2, seed=7)
    d = L.directions(model, "filter", seed=0)
    grid = (-0.5, 0.5, 3)
    snap = _snapshot(model)
    res = L.slice(model, batches, d, grid=grid, bn="recompute", bn_data=bn_batches)
    keep = L.slice(model, batches, d, grid=grid)
    _assert_same(model, snap)
    coords = torch.linspace(-0.5, 0.5, 3, dtype=DT).tolist()
    for i, j in [(0, 0), (1, 1), (2, 0)]:
        want = cases.recomputed_bn_loss(model, d, coords[i], coords[j], [x for x, _ in bn_batches], batches)
        assert abs(float(res.loss[i, j]) - want) < 1e-10
        assert abs(float(keep.loss[i, j]) - want) > 1e-4  # the kept statistics give another value
    with pytest.raises(ValueError, match="BatchNorm"):
        L.slice(_mlp(), (torch.randn(3, 5, dtype=DT), torch.tensor([0, 1, 2])), [[torch.zeros(8, 5, dtype=DT),
                torch.zeros(8, dtype=DT), torch.zeros(3, 8, dtype=DT), torch.zeros(3, dtype=DT)]], bn="recompute")


def test_data_read_more_than_once_refuses_an_iterator():
    """bn='recompute' reads data (and bn_data) at every point, a barrier of
    three or more models once per pair: an iterator was exhausted after the
    first and the call failed with "data yielded no batches"."""
    torch.manual_seed(0)
    a, b, c = CNN().to(DT), CNN().to(DT), CNN().to(DT)
    batches = _image_batches(2)
    d = L.directions(a, "filter", k=1, seed=0)
    snap = _snapshot(a)
    with pytest.raises(TypeError, match="data must be .* re-iterable.*bn='recompute'"):
        L.slice(a, iter(batches), d, grid=3, bn="recompute")
    with pytest.raises(TypeError, match="bn_data must be .* re-iterable"):
        L.interpolate(a, b, batches, 3, bn="recompute", bn_data=(x for x in batches))
    with pytest.raises(TypeError, match="data must be .* re-iterable.*3 pairs"):
        L.loss_barrier([a, b, c], iter(batches), 3)
    _assert_same(a, snap)
    # read once: an iterator is fine
    one_pass = L.loss_barrier([a, b], iter(batches), 3)
    assert one_pass.value == L.loss_barrier([a, b], batches, 3).value
    keep = L.slice(a, iter(batches), d, grid=3)
    assert torch.equal(keep.loss, L.slice(a, batches, d, grid=3).loss)


def test_interpolation_moves_the_bn_buffers_with_the_weights():
    torch.manual_seed(0)
    a, b = CNN().to(DT), CNN().to(DT)
    for m in (a, b):
        m.train()
        with torch.no_grad():
            for x, _ in _image_batches(2, seed=int(torch.randint(0, 99, ()))):
                m(x)
        m.eval()
    batches = _image_batches(2)
    r = L.interpolate(a, b, batches, n_points=3)
    for model, value in ((a, r.loss_a), (b, r.loss_b)):
        with torch.no_grad():
            want = sum(nn.functional.cross_entropy(model(x), y).item() * len(y) for x, y in batches) / 12
        assert abs(value - want) < 1e-10
    assert abs(float(r.loss[0]) - r.loss_a) < 1e-12 and abs(float(r.loss[-1]) - r.loss_b) < 1e-10
    assert "bn.running_mean" in r.settings["interpolated_buffers"]


# --------------------------------------------------------------------------
# real architectures against a plain loop
# --------------------------------------------------------------------------


def _tokens():
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]


def _sequences():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 7, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "encoder", "lstm"])
def test_architectures_match_a_plain_loop(name):
    torch.manual_seed(0)
    model, batches = {
        "mlp": lambda: (_mlp(), [(torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))) for _ in range(2)]),
        "cnn_bn": lambda: (CNN().to(DT), _image_batches(2)),
        "encoder": lambda: (Encoder().to(DT), _tokens()),
        "lstm": lambda: (LSTMClassifier().to(DT), _sequences()),
    }[name]()
    d = L.directions(model, "filter", seed=1)
    grid = (-0.6, 0.6, 3)
    snap = _snapshot(model)
    res = L.slice(model, batches, d, grid=grid)
    coords = torch.linspace(-0.6, 0.6, 3, dtype=DT).tolist()
    points = [[x, y] for x in coords for y in coords]
    ref = _reference_slice(model, batches, [n for n, _ in model.named_parameters()], d.vectors, points)
    assert torch.allclose(res.loss.reshape(-1), ref, rtol=0, atol=1e-10)
    if name == "lstm":
        with pytest.raises(ValueError, match="recurrent"):
            L.slice(model, batches, d, grid=grid, engine="vmap")
    else:
        vm = L.slice(model, batches, d, grid=grid, engine="vmap", chunk_size=4)
        assert torch.allclose(vm.loss.reshape(-1), ref, rtol=0, atol=1e-10)
        assert vm.settings["engine"] == "vmap"
    assert res.settings["engine"] == "loop"
    assert res.settings["first_layer"] == (name == "mlp")
    _assert_same(model, snap)


def test_first_layer_shortcut_equals_the_full_forward():
    model = _mlp(3, width=16)
    batch = (torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,)))
    d = L.directions(model, "random", seed=2)
    short = L.slice(model, batch, d, grid=4)

    class Wrapped(nn.Module):  # same function, not a plain Sequential: no shortcut
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Wrapped(model)
    full = L.slice(wrapped, batch, d.vectors, grid=4)
    assert short.settings["first_layer"] and not full.settings["first_layer"]
    assert torch.allclose(short.loss, full.loss, rtol=0, atol=1e-12)
    # only some parameters selected: the first layer's direction is zero
    sub_d = [torch.randn(3, 16, dtype=DT), torch.randn(3, dtype=DT)]
    sub = L.slice(model, batch, [sub_d], grid=3, params=[model[2]])
    ref = _reference_slice(model, [batch], ["2.weight", "2.bias"], [sub_d], [[-1.0], [0.0], [1.0]])
    assert sub.settings["first_layer"] and torch.allclose(sub.loss, ref, rtol=0, atol=1e-12)


def test_metrics_and_accuracy():
    model = _mlp(1)
    batch = (torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,)))
    d = L.directions(model, "filter", k=1)

    def nll_sum(z, y):
        return nn.functional.cross_entropy(z, y, reduction="sum") / len(y)

    r = L.slice(model, batch, d, grid=5, metrics={"nll": nll_sum})
    assert torch.allclose(r.metrics["nll"], r.loss, atol=1e-12)
    mid = (model(batch[0]).argmax(1) == batch[1]).double().mean()
    assert math.isclose(float(r.accuracy[2]), float(mid))
    # the origin is on the grid: no extra pass for the centre
    assert r.counts["forward"] == 5 and r.center_loss == float(r.loss[2])
    off = L.slice(model, batch, d, grid=[0.5, 1.0], metrics={"nll": nll_sum})
    assert off.counts["forward"] == 3 and math.isclose(off.center_loss, float(r.loss[2]), rel_tol=1e-14)
    assert r.to_dict()["metrics"]["nll"] == r.loss.tolist()


class _TwoHeads(nn.Module):
    """Returns ``(logits, aux)`` or ``{"logits": ..., "aux": ...}``."""

    def __init__(self, as_dict):
        super().__init__()
        self.as_dict = as_dict
        self.body, self.aux = nn.Linear(5, 3), nn.Linear(5, 1)

    def forward(self, x):
        out = (self.body(x), self.aux(x))
        return dict(zip(("logits", "aux"), out)) if self.as_dict else out


@pytest.mark.parametrize("as_dict", [False, True])
def test_models_returning_a_tuple_or_dict(as_dict):
    # the accuracy column called .dim() on the outputs: AttributeError
    torch.manual_seed(0)
    model = _TwoHeads(as_dict).to(DT)
    batch = (torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,)))

    def loss_fn(out, y):
        logits, aux = (out["logits"], out["aux"]) if as_dict else out
        return nn.functional.cross_entropy(logits, y) + aux.pow(2).mean()

    d = L.directions(model, "random", k=1, seed=0)
    r = L.slice(model, batch, d, grid=[-1.0, 0.0, 1.0], loss_fn=loss_fn)
    assert r.accuracy is None or torch.isnan(r.accuracy).all()
    with torch.no_grad():
        assert math.isclose(float(r.loss[1]), float(loss_fn(model(batch[0]), batch[1])), rel_tol=1e-12)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    i = L.interpolate(model, other, batch, 3, loss_fn=loss_fn)
    with torch.no_grad():
        assert math.isclose(i.loss_b, float(loss_fn(other(batch[0]), batch[1])), rel_tol=1e-12)


# --------------------------------------------------------------------------
# conventions
# --------------------------------------------------------------------------


def test_model_restored_and_rng_untouched_also_after_an_error():
    torch.manual_seed(0)
    model = CNN().to(DT).train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv.weight.requires_grad_(False)
    other = CNN().to(DT)
    batches = _image_batches(2)
    snap = _snapshot(model)
    state = torch.get_rng_state()
    d = L.directions(model, "filter", seed=0, params=[model.fc, model.conv2])
    L.slice(model, batches, d, grid=3, params=[model.fc, model.conv2], bn="recompute")
    L.interpolate(model, other, batches, n_points=3, bn="recompute")
    _assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), state)
    calls = []

    def bad_loss(z, y):
        calls.append(1)
        if len(calls) == 3:
            raise ArithmeticError("boom")
        return nn.functional.cross_entropy(z, y)

    with pytest.raises(ArithmeticError):
        L.slice(model, batches, d, grid=3, params=[model.fc, model.conv2], loss_fn=bad_loss, bn="recompute")
    _assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input_raises_before_anything_changes():
    model = _mlp()
    batch = (torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,)))
    d = L.directions(model, "filter")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="valid kinds"):
        L.directions(model, "hessian")
    with pytest.raises(ValueError, match="checkpoints"):
        L.directions(model, "pca")
    with pytest.raises(ValueError, match="data"):
        L.directions(model, "eigen")
    with pytest.raises(ValueError, match="bias"):
        L.directions(model, "filter", bias="drop")
    with pytest.raises(ValueError, match="bn must be"):
        L.slice(model, batch, d, bn="update")
    with pytest.raises(ValueError, match="engine"):
        L.slice(model, batch, d, engine="fast")
    with pytest.raises(ValueError, match="1 or 2 directions"):
        L.slice(model, batch, L.directions(model, "filter", k=3))
    with pytest.raises(ValueError, match="shape"):
        L.slice(model, batch, [[torch.zeros(2, 2, dtype=DT)] * 4])
    with pytest.raises(ValueError, match="grid"):
        L.slice(model, batch, d, grid=1)
    with pytest.raises(ValueError, match="lo < hi"):
        L.slice(model, batch, d, grid=(1.0, -1.0, 5))
    with pytest.raises(ValueError, match="other parameters"):
        L.slice(model, batch, d, params=[model[0]])
    with pytest.raises(ValueError, match="same architecture"):
        L.interpolate(model, nn.Sequential(nn.Linear(5, 4)).to(DT), batch)
    with pytest.raises(ValueError, match="barrier"):
        L.interpolate(model, model, batch, barrier="max")
    with pytest.raises(ValueError, match="at least 2"):
        L.loss_barrier([model], batch)
    with pytest.raises(TypeError, match="sequence"):
        L.loss_barrier(model, batch)
    with pytest.raises(ValueError, match="no batches"):
        L.slice(model, [], d)
    _assert_same(model, snap)


def test_results_serialise_and_plot(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    model = _mlp()
    batch = (torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,)))
    ckpts = [{n: p.detach() + 0.1 * i * torch.randn_like(p) for n, p in model.named_parameters()} for i in range(4)]
    d = L.directions(model, "pca", checkpoints=ckpts)
    s2 = L.slice(model, batch, d, grid=4)
    s1 = L.slice(model, batch, [d[0]], grid=4)
    i = L.interpolate(model, _mlp(1), batch, n_points=4)
    b = L.loss_barrier([model, _mlp(1), _mlp(2)], batch, n_points=3)
    for r in (d, s1, s2, i, b):
        r.to_json(str(tmp_path / "r.json"))
    assert "vectors" not in d.to_dict()
    fig, axes = plt.subplots(1, 4)
    s2.plot(axes[0], vmin=0.5, vmax=3.0)
    s1.plot(axes[1], value="accuracy")
    i.plot(axes[2])
    b.plot(axes[3])
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown value"):
        s2.plot(value="nope")


# --------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = CNN().to(DT)
        batches = _image_batches(4)
        d = L.directions(model, "filter", seed=0)
        out = {
            "grid": L.slice(model, batches, d, grid=3, split="grid").loss,
            "data": L.slice(model, batches[rank::world], d, grid=3).loss,
            "bn_data": L.slice(model, batches[rank::world], d, grid=3, bn="recompute").loss,
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_grid_and_data_split_over_ranks_equal_one_process(tmp_path):
    world = 2
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    job = mp.start_processes(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                             join=False, start_method=method)
    deadline = time.monotonic() + 150
    while not job.join(timeout=2):
        if time.monotonic() > deadline:
            for p in job.processes:
                p.kill()
            pytest.fail("the 2-process job did not finish in 150 s")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    model = CNN().to(DT)
    batches = _image_batches(4)
    d = L.directions(model, "filter", seed=0)
    one = L.slice(model, batches, d, grid=3).loss
    # equal batch sizes: the per-rank statistics average to the global ones
    bn_one = L.slice(model, batches[0::2] + batches[1::2], d, grid=3, bn="recompute").loss
    for out in outs:
        assert torch.allclose(out["grid"], one, rtol=0, atol=1e-12)
        assert torch.allclose(out["data"], one, rtol=0, atol=1e-12)
        assert torch.allclose(out["bn_data"], bn_one, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------
# the example
# --------------------------------------------------------------------------


def test_example_runs_tiny(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = Path(__file__).resolve().parents[1] / "examples" / "landscape.py"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(example), "--tiny", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "barrier" in proc.stdout
    for name in ("landscape_sgd_vs_sam.png", "landscape_pca_trajectory.png", "landscape_barriers.png",
                 "landscape.json", "landscape.md"):
        assert (tmp_path / name).exists(), name


def test_error_barrier_progress_and_the_engine_probe():
    pytest.importorskip("tqdm")
    models = [_mlp(s) for s in (1, 2)]
    batch = (torch.randn(30, 5, dtype=DT), torch.randint(0, 3, (30,)))
    r = L.interpolate(*models, batch, n_points=5, on="error", barrier="frankle", progress=True)
    err = 1 - r.accuracy
    ends = [1 - float((m(batch[0]).argmax(1) == batch[1]).double().mean()) for m in models]
    assert math.isclose(r.barrier, float(err.max()) - 0.5 * sum(ends), abs_tol=1e-12)
    with pytest.raises(ValueError, match="accuracy"):
        L.interpolate(*_quadratic_pair(), QBATCH, on="error", loss_fn=_identity_loss)
    # the probe that picks an engine on a GPU also runs on a CPU
    from flatness._landscape import Evaluator, probe_vmap
    from flatness._params import select_params

    model = models[0]
    ps = select_params(model)
    d = L.directions(model, "random")
    ev = Evaluator(model, ps, [p.detach() for p in ps.params], d.vectors, nn.functional.cross_entropy, {}, {})
    faster, timing = probe_vmap(ev, batch[0], batch[1], [[0.1, 0.2], [0.3, -0.1]], 2, torch.device("cpu"))
    assert isinstance(faster, bool) and set(timing) == {"loop_s", "vmap_s"} and ev.forward == 0


def _quadratic_pair():
    return _quadratic(0)[0], _quadratic(0, w=torch.zeros(9, dtype=DT))[0]


def test_grid_specs():
    model = _mlp()
    batch = (torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,)))
    d = L.directions(model, "filter")
    assert L.slice(model, batch, d, grid=3).coords == [[-1.0, 0.0, 1.0]] * 2
    assert L.slice(model, batch, d, grid=[-1, 1]).coords == [[-1.0, 1.0]] * 2  # numbers: coordinates
    r = L.slice(model, batch, d, grid=[(0.0, 1.0, 3), [0.5]])
    assert r.coords == [[0.0, 0.5, 1.0], [0.5]] and r.loss.shape == (3, 1)
    assert L.slice(model, batch, [d[0]], grid=torch.tensor([0.0, 2.0])).coords == [[0.0, 2.0]]


# --------------------------------------------------------------------------
# half precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_half_precision_losses_in_float32(dtype, engine):
    """The losses of a float16 / bfloat16 model are taken in float32, as in
    the rest of the library: in bfloat16 they were quantized to 0.0078 near
    1 (a slice 5e-3 off the float32 model's, a barrier of 4e-4 read 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    half = copy.deepcopy(model).to(dtype)
    d = L.directions(model, "random", k=1, seed=0)
    grid = (-0.2, 0.2, 5)
    ref = L.slice(model, [(x, y)], d, grid=grid, engine=engine).loss
    got = L.slice(half, [(x, y)], L.directions(half, "random", k=1, seed=0), grid=grid, engine=engine).loss
    # the model's own rounding leaves 9e-4 (bfloat16) / 6e-5 (float16); a
    # loss taken in the low precision was 4.4e-3 / 3.2e-4 off
    assert torch.allclose(got, ref, rtol=2e-3 if dtype == torch.bfloat16 else 1.5e-4, atol=0)
    with torch.no_grad():
        center = torch.nn.functional.cross_entropy(half(x.to(dtype)).float(), y)
    at = L.slice(half, [(x, y)], [[torch.zeros_like(p) for p in half.parameters()]], grid=[0.0, 1.0],
                 engine=engine).loss
    # (vmap's batched kernels round differently: 9e-5 in bfloat16; a loss in
    # bfloat16 is on a grid of 0.0078, in float16 of 0.001)
    assert at[0].item() == pytest.approx(center.item(), rel=2e-4 if dtype == torch.bfloat16 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "filter", "layer"])
def test_half_precision_directions_are_the_float32_draw(dtype, kind):
    """A float16 / bfloat16 model's random directions are the float32
    model's for the same seed, rounded: ``randn`` draws another stream in
    another dtype (a small CNN's filter directions were 128% off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
    ref = L.directions(model, kind, k=2, seed=3)
    got = L.directions(copy.deepcopy(model).to(dtype), kind, k=2, seed=3)
    for i in range(2):
        for r, g in zip(ref[i], got[i]):
            assert g.dtype == dtype
            if kind == "random":
                assert torch.equal(g, r.to(dtype))
            else:  # scaled to the norms of the rounded weights
                assert torch.allclose(g.float(), r, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-6)


def test_interpolation_pairs_a_compiled_model_with_an_eager_one():
    # torch.compile names parameters "_orig_mod." + the wrapped module's
    # names; either end point may be compiled (a checkpoint loaded into a
    # plain module, the live model compiled) and the path is the same.
    model_a, _, _ = _quadratic(0)
    model_b, _, _ = _quadratic(0, w=torch.randn(9, generator=torch.Generator().manual_seed(9), dtype=DT))
    want = L.interpolate(model_a, model_b, QBATCH, n_points=5, loss_fn=_identity_loss).loss
    for a, b in ((torch.compile(model_a, backend="eager"), model_b), (model_a, torch.compile(model_b, backend="eager"))):
        got = L.interpolate(a, b, QBATCH, n_points=5, loss_fn=_identity_loss).loss
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

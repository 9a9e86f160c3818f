"""Hessian- and GGN-vector products against double backward and dense
float64 matrices, over one batch and over loaders of uneven batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cases import (
    DT,
    assert_unchanged,
    classification_batches,
    cnn,
    counting_loss,
    dense_ggn,
    dense_hessian,
    mlp,
    snapshot,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatness import hessian
from flatness._hvp import CurvatureOperator
from flatness._params import select_params
from flatness._products import double_backward_hvp


def _dense_from_operator(op: CurvatureOperator) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=DT))


@pytest.mark.parametrize("make, shape", [(mlp, (5,)), (cnn, (1, 6, 6))])
def test_hvp_matches_double_backward_one_batch(make, shape):
    model = make()
    (batch,) = classification_batches((9,), shape, 4 if make is mlp else 3)
    op = CurvatureOperator(model, batch)
    V = torch.randn(op.shape[0], 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    ours = op.matmat(V)
    model.eval()
    ref = double_backward_hvp(model, op.params, *batch, op.unflatten(V), loss_fn=F.cross_entropy)
    assert torch.allclose(ours, op.flatten(ref, batched=True), rtol=0, atol=1e-10)
    # and against the dense Hessian
    H = dense_hessian(model, [batch])
    assert torch.allclose(ours, H @ V, rtol=0, atol=1e-10)


def test_hvp_over_loader_of_uneven_batches_is_the_full_data_hessian():
    model = mlp()
    batches = classification_batches((7, 5, 3), (5,), 4)
    H = dense_hessian(model, batches)  # loss of the concatenated 15 samples
    op = CurvatureOperator(model, batches)
    assert torch.allclose(_dense_from_operator(op), H, rtol=0, atol=1e-10)
    # a DataLoader with a short last batch gives the same operator
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 4, 4, 4, 3
    op2 = CurvatureOperator(model, loader)
    assert torch.allclose(_dense_from_operator(op2), H, rtol=0, atol=1e-10)
    # each product streamed the batches once: n products counted, not n * batches
    assert op2.n_hvp == op2.shape[0]
    # n_batches restricts the operator to the first batches
    op3 = CurvatureOperator(model, batches, n_batches=2)
    assert torch.allclose(_dense_from_operator(op3), dense_hessian(model, batches[:2]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_matches_dense_jacobian_product(loss):
    model = mlp(sizes=(4, 6, 3), act=nn.Tanh)
    (batch,) = classification_batches((8,), (4,), 3)
    if loss == "mse":
        batch = (batch[0], torch.randn(8, 3, dtype=DT))
        loss_fn = F.mse_loss
    else:
        loss_fn = F.cross_entropy
    op = CurvatureOperator(model, batch, curvature="ggn", loss_fn=loss_fn)
    G = _dense_from_operator(op)
    ref = dense_ggn(model, batch, loss_fn)
    assert torch.allclose(G, ref, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD for convex losses
    # for a linear model the GGN is the Hessian
    lin = mlp(sizes=(4, 3))
    opl = CurvatureOperator(lin, batch, curvature="ggn", loss_fn=loss_fn)
    assert torch.allclose(_dense_from_operator(opl), dense_hessian(lin, [batch], loss_fn), atol=1e-10)


def test_public_hvp_shapes_single_and_batched():
    model = mlp()
    (batch,) = classification_batches((6,), (5,), 4)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(3, *p.shape, dtype=DT, generator=g) for p in params]
    batched = hessian.hvp(model, batch, vs)
    assert [b.shape for b in batched] == [v.shape for v in vs]
    for i in range(3):
        single = hessian.hvp(model, batch, [v[i] for v in vs])
        for s, b in zip(single, batched):
            assert torch.allclose(s, b[i], atol=1e-12)
    with pytest.raises(ValueError, match="one per selected parameter"):
        hessian.hvp(model, batch, vs[:-1])
    with pytest.raises(ValueError, match="shape"):
        hessian.hvp(model, batch, [v[0].T if v.dim() == 3 else v for v in vs])


def test_train_mode_batchnorm_matches_double_backward_and_leaves_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    (batch,) = classification_batches((10,), (5,), 3)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[3].bias.requires_grad_(False)
    snap = snapshot(model)
    op = CurvatureOperator(model, batch, train=True)
    V = torch.randn(op.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    ours = op.matmat(V)
    G = CurvatureOperator(model, batch, train=True, curvature="ggn").matmat(torch.eye(op.shape[0], dtype=DT))
    assert_unchanged(model, snap)  # running statistics untouched, eval mode back
    ref_model = copy.deepcopy(model).train()  # batch statistics; its buffers may move
    ref = double_backward_hvp(ref_model, select_params(ref_model), *batch, op.unflatten(V), loss_fn=F.cross_entropy)
    assert torch.allclose(ours, op.flatten(ref, batched=True), rtol=0, atol=1e-10)
    assert torch.allclose(G, dense_ggn(copy.deepcopy(model), batch, train=True)[:-3, :-3], rtol=0, atol=1e-10)


def test_batch_statistics_without_running_stats_on_the_forward_engine():
    # BatchNorm in training mode without running statistics writes no
    # buffer, so the forward-over-reverse engine may run it; its probes
    # used one sample, on which batch statistics fail ("Expected more than
    # 1 value per channel"): auto crashed over a loader, a requested engine
    # raised that error instead of running.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(),
                          nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    auto = hessian.trace(model, loader, method="exact", train=True)
    assert auto.engine == "forward-over-reverse"
    ref = hessian.trace(model, loader, method="exact", train=True, engine="double-backward")
    assert auto.value == pytest.approx(ref.value, rel=1e-10)
    one = hessian.top_eigenvalues(model, (x, y), k=2, tol=1e-10, train=True, engine="forward-over-reverse")
    dense = hessian.top_eigenvalues(model, (x, y), k=2, tol=1e-10, train=True, engine="double-backward")
    assert torch.allclose(one.eigenvalues, dense.eigenvalues, rtol=1e-9, atol=0)


def test_dict_inputs_and_scipy_operator():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, left, right):
            return torch.tanh(self.a(left)) * self.b(right)

    torch.manual_seed(0)
    model = DictNet().to(DT)
    g = torch.Generator().manual_seed(0)
    batch = ({"left": torch.randn(6, 3, dtype=DT, generator=g), "right": torch.randn(6, 2, dtype=DT, generator=g)},
             torch.randint(0, 4, (6,), generator=g))
    op = CurvatureOperator(model, batch)
    H = _dense_from_operator(op)
    assert torch.allclose(H, H.T, atol=1e-12)
    from scipy.sparse.linalg import eigsh

    lin = op.to_scipy()
    assert lin.shape == op.shape
    top = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    assert sorted(top) == pytest.approx(sorted(torch.linalg.eigvalsh(H)[-2:].tolist()), rel=1e-8)


def test_operator_input_errors():
    model = mlp()
    batches = classification_batches((4, 4), (5,), 4)
    n = CurvatureOperator(model, batches).shape[0]
    with pytest.raises(TypeError, match="re-iterable"):
        CurvatureOperator(model, (b for b in batches))
    with pytest.raises(ValueError, match="curvature"):
        CurvatureOperator(model, batches, curvature="fisher")
    with pytest.raises(ValueError, match="no batches"):
        CurvatureOperator(model, []).matvec(torch.zeros(n, dtype=DT))
    with pytest.raises(ValueError, match="no parameters"):
        CurvatureOperator(nn.ReLU(), batches)
    with pytest.raises(ValueError, match="shape"):
        CurvatureOperator(model, batches).matvec(torch.zeros(3, dtype=DT))
    mismatched = (torch.zeros(3, 5, dtype=DT), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="leading dimension"):
        CurvatureOperator(model, mismatched).matvec(torch.zeros(n, dtype=DT))
    # a tensor shared by all samples: the message says where it belongs
    shared = ((torch.zeros(4, 5, dtype=DT), torch.zeros(7, 7, dtype=DT)), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention mask of shape \(T, T\)\) belongs in the model"):
        CurvatureOperator(model, shared).matvec(torch.zeros(n, dtype=DT))


def test_restore_after_an_exception_inside_a_product():
    model = mlp()
    model.train()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    snap = snapshot(model)
    calls = {"n": 0}

    def bad_loss(z, y):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("injected")
        return F.cross_entropy(z, y)

    batches = classification_batches((4, 4), (5,), 4)
    op = CurvatureOperator(model, batches, loss_fn=bad_loss)
    with pytest.raises(RuntimeError, match="injected"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))
    assert_unchanged(model, snap)


def test_float32_model_and_float64_vectors():
    model = mlp().float()
    (batch,) = classification_batches((6,), (5,), 4)
    batch = (batch[0].double(), batch[1])  # inputs are cast to the parameters' dtype
    op = CurvatureOperator(model, batch)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    out = op.matvec(v)
    assert out.dtype == DT
    ref = dense_hessian(mlp(), [(batch[0], batch[1])]) @ v
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = mlp()
    (batch,) = classification_batches((6,), (5,), 4)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    cpu = CurvatureOperator(model, batch).matvec(v)
    gpu = CurvatureOperator(model.cuda(), batch).matvec(v.cuda())
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.int64, torch.int32, torch.bool])
def test_vectors_that_are_not_real_floating_point_are_refused(dtype):
    # A complex vector lost its imaginary part, an integer one came back
    # truncated to integers (all zeros here): both are refused up front.
    model = mlp()
    batch = classification_batches((6,), (5,), 4)[0]
    snap = snapshot(model)
    calls = []
    counting = counting_loss(calls)

    vectors = [torch.ones(p.shape, dtype=dtype) for p in model.parameters()]
    with pytest.raises(TypeError, match=rf"vectors\[0\] must be a real floating-point tensor.*{dtype}"):
        hessian.hvp(model, batch, vectors, loss_fn=counting)
    op = CurvatureOperator(model, batch, loss_fn=counting)
    n = op.shape[0]
    V = torch.ones(n, 2, dtype=dtype)
    for product in (op.matmat, op.quadratic_forms, op.__matmul__):
        with pytest.raises(TypeError, match=rf"V must be a real floating-point tensor.*{dtype}"):
            product(V)
    for product in (op.matvec, op.__matmul__):
        with pytest.raises(TypeError, match="v must be a real floating-point tensor"):
            product(V[:, 0])
    with pytest.raises(TypeError, match="v must be a real floating-point tensor"):
        op.matvec_update(V[:, 0], torch.zeros(n, dtype=DT), 0.5)
    with pytest.raises(TypeError, match="out must be a real floating-point tensor"):
        op.matvec_update(torch.ones(n, dtype=DT), V[:, 0], 0.5)
    assert calls == [] and op.n_hvp == 0
    assert_unchanged(model, snap)
    # every real floating dtype is accepted (computed in the parameters' dtype)
    v = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0))
    H = dense_hessian(model, [batch], loss_fn=counting)
    assert torch.allclose(op.matvec(v.float()).double(), H @ v.float().double(), rtol=1e-5, atol=1e-6)


def test_vectors_follow_the_order_of_params_as_given():
    model = mlp()  # 0.weight, 0.bias, 2.weight, 2.bias
    batch = classification_batches((6,), (5,), 4)[0]
    H = dense_hessian(model, [batch])  # model.parameters() order
    named = dict(model.named_parameters())
    offsets, i = {}, 0
    for name, p in named.items():
        offsets[name] = slice(i, i + p.numel())
        i += p.numel()
    g = torch.Generator().manual_seed(0)
    cases = [
        (["2.bias", model[0], "2.weight"], ["2.bias", "0.weight", "0.bias", "2.weight"]),
        ([model[2].weight, "0.weight"], ["2.weight", "0.weight"]),  # a subset: the block of H
        ((p for p in reversed(list(model.parameters()))), ["2.bias", "2.weight", "0.bias", "0.weight"]),
        (["0.bias", "0.bias", model[0]], ["0.bias", "0.weight"]),  # first place counts
        (None, list(named)),
    ]
    for params, order in cases:
        vs = [torch.randn(2, *named[n].shape, dtype=DT, generator=g) for n in order]
        out = hessian.hvp(model, batch, vs, params=params)
        rows = torch.cat([torch.arange(H.shape[0])[offsets[n]] for n in order])
        block = H[rows][:, rows]
        flat = torch.cat([v.reshape(2, -1) for v in vs], dim=1)
        want = flat @ block
        got = torch.cat([o.reshape(2, -1) for o in out], dim=1)
        assert [o.shape for o in out] == [v.shape for v in vs]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), order
    with pytest.raises(ValueError, match="in this order: 2.bias, 0.weight"):
        hessian.hvp(model, batch, [torch.zeros(3, dtype=DT)], params=["2.bias", "0.weight"])


@pytest.mark.parametrize("data", ["one", "several"])
def test_a_parameter_replaced_after_construction_is_refused(data):
    model = mlp()
    batches = classification_batches((6, 5, 4, 3, 2, 2), (5,), 4)
    batches = batches[0] if data == "one" else batches
    op = CurvatureOperator(model, batches)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    before = op.matvec(v)
    # values changed in place are seen (the kept graph is rebuilt)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    changed = op.matvec(v)
    assert not torch.allclose(changed, before)
    assert torch.allclose(changed, dense_hessian(model, batches if data == "several" else [batches]) @ v,
                          rtol=1e-10, atol=1e-12)
    # a replaced parameter would give the curvature at the old tensor
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2)
    for product in (lambda: op.matvec(v), lambda: op.matmat(v[:, None]), lambda: op.quadratic_forms(v[:, None]),
                    lambda: op.matvec_update(v, torch.zeros_like(v), 0.0), op.prepare):
        with pytest.raises(RuntimeError, match=r"'0\.weight'.*replaced.*new CurvatureOperator"):
            product()
    fresh = CurvatureOperator(model, batches).matvec(v)
    assert torch.allclose(fresh, dense_hessian(model, batches if data == "several" else [batches]) @ v,
                          rtol=1e-10, atol=1e-12)


class _Linears(nn.Module):
    """``F.linear`` in every way the double-backward engine's weight split
    (``_products._LeanGradientGraph``) meets it: a 3-D input, keyword arguments,
    a weight used four times, a 1-D input, a slice of a weight (left to
    ``F.linear``), no bias, and the head under autocast (left to it)."""

    def __init__(self, autocast: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6, bias=False)
        self.c = nn.Linear(6, 3)
        self.autocast = autocast

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h.unsqueeze(1).expand(-1, 2, -1), self.b.weight)).mean(1)
        h = torch.tanh(F.linear(input=h, weight=self.b.weight, bias=None))
        h = h + torch.tanh(F.linear(h[0], self.b.weight))
        h = h + torch.tanh(F.linear(h, self.b.weight[:, :], self.a.bias))
        if self.autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.c(h).float()
        return self.c(h)


@pytest.mark.parametrize("autocast", [False, True])
def test_weight_split_products_equal_the_dense_hessian(autocast):
    # The double-backward engine reaches a weight through two leaves (its
    # value, and an alias in the input's gradient) and adds the parts; the
    # products are those of the dense float64 Hessian whichever way
    # F.linear is called.  Under autocast (a float32 model whose head runs
    # in bfloat16) the head keeps F.linear, and the products run, to
    # bfloat16's accuracy.
    from cases import classification_batch

    torch.manual_seed(0)
    model = _Linears(autocast).to(torch.float32 if autocast else DT)
    batch = classification_batch(7, (5,), 3, seed=2, dtype=DT)
    reference = copy.deepcopy(model).to(DT)
    reference.autocast = False
    want = dense_hessian(reference, [batch])
    if autocast:
        batch = (batch[0].float(), batch[1])
    got = _dense_from_operator(CurvatureOperator(model, batch, engine="double-backward"))
    if autocast:
        torch.testing.assert_close(got, want, rtol=0, atol=3e-2 * float(want.abs().max()))
    else:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _parameters_reaching_their_alias(model, batch):
    """The indices of the parameters whose alias leaf (see
    ``_products._LeanGradientGraph``) receives a part in a product pass of
    the kept graph."""
    from flatness._products import KeptGraph

    ps = select_params(model)
    g = KeptGraph(model, ps, *batch, F.cross_entropy)
    seen = []
    handles = [a.register_hook(lambda t, j=j: seen.append(j)) for j, a in enumerate(g.aliases)]
    try:
        g.products(tuple(torch.ones(1, *p.shape, dtype=p.dtype) for p in ps.params))
    finally:
        for h in handles:
            h.remove()
    return sorted(set(seen))


def test_weight_split_reaches_the_alias():
    # The split is in effect for nn.Linear: the graph of the kept gradient
    # has the alias leaves, and every product pass hands parts to them.
    model = mlp()
    (batch,) = classification_batches((6,), (5,), 4)
    weights = [j for j, p in enumerate(model.parameters()) if p.dim() == 2]
    # the first layer's input needs no gradient: its weight has no second part
    assert _parameters_reaching_their_alias(model, batch) == weights[1:], weights


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))

    def forward(self, x):
        return self.body(x)


_CROSS_ENTROPY_LOSSES = {
    "mean": F.cross_entropy,
    "sum": lambda z, y: F.cross_entropy(z, y, reduction="sum"),
    "ignore_index": lambda z, y: F.cross_entropy(z, y, ignore_index=0),
    "module": nn.CrossEntropyLoss(ignore_index=1),
    "positional": lambda z, y: F.cross_entropy(z, y, None, None, 3),
    # left to F.cross_entropy:
    "label_smoothing": lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
    "weight": lambda z, y: F.cross_entropy(z, y, weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)),
    "3-D logits": lambda z, y: F.cross_entropy(z.unsqueeze(-1).expand(-1, -1, 2), y.unsqueeze(-1).expand(-1, 2)),
}


@pytest.mark.parametrize("name", sorted(_CROSS_ENTROPY_LOSSES))
def test_lean_cross_entropy_products_equal_the_dense_hessian(name):
    # The double-backward engine records F.cross_entropy on (N, C) logits
    # so that its graph keeps only the softmax (_products._LeanCrossEntropy);
    # the products are the dense float64 Hessian's for every form of the
    # call, including ignored targets (the batch's are 1 1 1 0 0 3 1 0 0)
    # and the cases left to torch.
    from cases import classification_batch

    torch.manual_seed(0)
    model = _Classifier().to(DT)
    batch = classification_batch(9, (5,), 4, seed=3, dtype=DT)
    loss_fn = _CROSS_ENTROPY_LOSSES[name]
    got = _dense_from_operator(CurvatureOperator(model, batch, loss_fn=loss_fn, engine="double-backward"))
    want = dense_hessian(model, [batch], loss_fn=loss_fn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_lean_cross_entropy_is_in_effect():
    # the kept graph of a classifier holds the softmax, not log_softmax
    from flatness._products import KeptGraph

    model = _Classifier().to(DT)
    (batch,) = classification_batches((6,), (5,), 4)
    g = KeptGraph(model, select_params(model), *batch, F.cross_entropy)
    names, stack, seen = set(), [r.output.node for r in g.grads if r is not None], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert "SoftmaxBackward0" in names and "LogSoftmaxBackward0" not in names, names


@pytest.mark.filterwarnings("ignore:torch.is_autocast_cpu_enabled:DeprecationWarning")
def test_autocast_query_of_torch_before_2_4(monkeypatch):
    # torch < 2.4 has no device argument to is_autocast_enabled (it means
    # CUDA) and a separate query for the CPU; _autocast_enabled falls back
    # to them, so the lean forms stay out of CPU and CUDA autocast alike.
    import sys

    from flatness import _products

    state = {"cuda": False, "cpu": False}
    new_query, cpu_query = torch.is_autocast_enabled, torch.is_autocast_cpu_enabled

    def old_query(*args):
        if args:
            # (torch.autocast itself, entered below, asks the new way)
            if sys._getframe(1).f_globals["__name__"] != _products.__name__:
                return new_query(*args)
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return state["cuda"]

    monkeypatch.setattr(torch, "is_autocast_enabled", old_query)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: state["cpu"])
    assert not _products._autocast_enabled("cpu") and not _products._autocast_enabled("cuda")
    state["cpu"] = True
    assert _products._autocast_enabled("cpu") and not _products._autocast_enabled("cuda")
    state["cpu"], state["cuda"] = False, True
    assert _products._autocast_enabled("cuda") and not _products._autocast_enabled("cpu")
    # and the products under the fallback: CPU autocast keeps the head's F.linear
    state["cuda"] = False
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", cpu_query)
    test_weight_split_products_equal_the_dense_hessian(autocast=True)


def test_without_the_saved_tensor_hooks_query_products_keep_f_linear(monkeypatch):
    # A torch without the private query of the saved-tensor hooks: the
    # engine cannot tell a checkpointed block apart, so no weight is split
    # and no cross-entropy replaced; the products stay exact.
    from flatness import _products
    from flatness._products import KeptGraph

    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert _products._saved_tensors_hooked()
    model = _Linears().to(DT)
    (batch,) = classification_batches((7,), (5,), 3)
    g = KeptGraph(model, select_params(model), *batch, F.cross_entropy)
    assert not g.split
    got = _dense_from_operator(CurvatureOperator(model, batch, engine="double-backward"))
    torch.testing.assert_close(got, dense_hessian(model, [batch]), rtol=1e-10, atol=1e-12)


class _Convs(nn.Module):
    """Convolutions in the ways the double-backward engine's weight split
    meets them: 1-D with stride and padding, 2-D with dilation and no bias,
    grouped after a reflect padding (``F.pad``, then padding 0), a weight
    called again through ``F.conv2d`` with positional arguments, 3-D; and,
    left to torch, ``padding="same"`` and an unbatched input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, padding=(1, 0), dilation=(1, 2), bias=False)
        self.grouped = nn.Conv2d(4, 4, 2, groups=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(1, 2, 2)
        self.same = nn.Conv2d(4, 2, 3, padding="same")
        self.unbatched = nn.Conv2d(1, 1, 2)
        # a fixed mixing of every feature into the logits (a mean added to
        # all of them would be lost to the softmax's shift invariance)
        self.register_buffer("mix", torch.randn(187, 3, generator=torch.Generator().manual_seed(0)) / 8)

    def forward(self, x):
        a = torch.tanh(self.c1(x[:, :2, :6, 0]))
        h = torch.tanh(self.grouped(torch.tanh(self.c2(x[:, :1]))))
        h2 = torch.tanh(self.same(h))
        h3 = torch.tanh(F.conv2d(h, self.grouped.weight, self.grouped.bias, 1, 1, 1, 2))
        v = torch.tanh(self.c3(x[:, :1, :3, :3].unsqueeze(2).expand(-1, -1, 2, -1, -1)))
        u = torch.stack([self.unbatched(s[:1]).sum() for s in x])
        feats = torch.cat([a.flatten(1), h2.flatten(1), h3.flatten(1), v.flatten(1)], 1)
        return feats @ self.mix.to(feats.dtype) + u[:, None] * self.mix[0]


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_conv_weight_split_products_equal_the_dense_hessian(memory_format):
    # As for F.linear: convolutions with a parameter as weight reach it
    # through two leaves, whose parts are added; the products are the dense
    # float64 Hessian's for every form above.
    from flatness._products import KeptGraph

    torch.manual_seed(0)
    model = _Convs().to(DT)
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    if memory_format == "channels_last":
        for conv in (model.c2, model.grouped, model.same, model.unbatched):
            conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    batch = (x, torch.tensor([0, 2, 1]))
    names = [n for n, _ in model.named_parameters()]
    g = KeptGraph(model, select_params(model), *batch, F.cross_entropy)
    assert sorted(names[j] for j in g.split) == ["c1.weight", "c2.weight", "c3.weight", "grouped.weight"]
    got = _dense_from_operator(CurvatureOperator(model, batch, engine="double-backward"))
    torch.testing.assert_close(got, dense_hessian(model, [batch]), rtol=1e-10, atol=1e-12)


def test_conv_weight_split_reaches_the_alias():
    # every product pass hands a part to the alias of each split conv weight
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(8, 3)).to(DT)
    (batch,) = classification_batches((4,), (1, 6, 6), 3)
    # the first convolution's input needs no gradient: no second part
    assert _parameters_reaching_their_alias(model, batch) == [2, 4]


def test_compiled_model_products_run_through_the_module_it_wraps():
    # torch.compile's AOTAutograd backends (inductor, the default; aot_eager
    # here, which compiles in a moment) have no double backward: the
    # products, eigenvalues and trace of a compiled model are those of the
    # module it wraps, also for parameters named with the wrapper's prefix.
    from flatness.hessian import top_eigenvalues, trace

    model = mlp()
    (batch,) = classification_batches((6,), (5,), 4)
    compiled = torch.compile(model, backend="aot_eager")
    want = dense_hessian(model, [batch])
    before = snapshot(compiled)
    got = _dense_from_operator(CurvatureOperator(compiled, batch, engine="double-backward"))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    first = dict(model.named_parameters())["0.weight"]
    ours = top_eigenvalues(compiled, batch, k=1, params=["_orig_mod.0.weight"])
    eager = top_eigenvalues(model, batch, k=1, params=[first])
    torch.testing.assert_close(ours.eigenvalues, eager.eigenvalues, rtol=1e-10, atol=0)
    assert trace(compiled, batch, method="exact").value == pytest.approx(float(torch.trace(want)), rel=1e-10)
    assert_unchanged(compiled, before)


def test_an_eager_curvature_call_does_not_import_dynamo():
    # Telling a compiled model apart must not import torch._dynamo (over a
    # second): in a fresh process, a curvature call on a plain model leaves
    # it unloaded.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from flatness.hessian import top_eigenvalues\n"
        "m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))\n"
        "top_eigenvalues(m, (torch.randn(6, 4), torch.randint(0, 3, (6,))), k=1)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

"""flatness.nonuniformity: exact gradient variance, the noise factor, the
descriptive metrics, and the library conventions (restore, RNG, bad input)."""

from __future__ import annotations

import itertools
import json
import math

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatness
from flatness import nonuniformity as nu


def _mlp(seed=0):
    return cases.mlp(seed, (5, 6, 3))


def _cnn(seed=1):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 4)
    ).double()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _data(n, shape, classes, seed=2):
    return cases.classification_batch(n, shape, classes, seed)


def _loop_grads(model, x, y):
    """Reference per-sample gradients: one autograd.grad call per sample."""
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, list(model.parameters())))
    return names, [torch.stack(col) for col in zip(*rows)]


@pytest.mark.parametrize("make, shape, classes", [(_mlp, (5,), 3), (_cnn, (2, 5, 5), 4)], ids=["mlp", "cnn"])
def test_gradient_variance_matches_autograd_loop(make, shape, classes):
    model = make().eval()
    x, y = _data(13, shape, classes)
    names, grads = _loop_grads(model, x, y)
    ref: dict[str, float] = {}
    mean_sq = 0.0
    for name, g in zip(names, grads):
        g = g.reshape(13, -1)
        layer = name.rpartition(".")[0]
        ref[layer] = ref.get(layer, 0.0) + float((g - g.mean(0)).pow(2).sum(1).mean())
        mean_sq += float(g.mean(0).pow(2).sum())
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    r = nu.gradient_variance(model, loader, chunk_size=3, batch_size=4)
    assert r.per_layer.keys() == ref.keys()
    for k in ref:
        assert r.per_layer[k] == pytest.approx(ref[k], rel=1e-10)
    assert r.total == pytest.approx(sum(ref.values()), rel=1e-10)
    assert r.mean_grad_sqnorm == pytest.approx(mean_sq, rel=1e-10)
    assert r.second_moment == pytest.approx(r.total + mean_sq, rel=1e-10)
    a = (13 - 4) / (4 * 12)
    assert r.noise_factor == pytest.approx(a) and r.noise == pytest.approx(a * r.total)
    assert r.n_samples == 13 and r.method == "exact"
    # chunking and batching do not change the result
    r2 = nu.gradient_variance(model, (x, y), chunk_size=None, batch_size=4)
    assert r2.total == pytest.approx(r.total, rel=1e-12)


class _Offsets(nn.Module):
    """Two learned offsets of a sample's shape, as a ViT's ``(1, T, D)``
    position embedding: ``vmap`` gives both the very same per-sample
    gradient tensor (one memory)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.seg = nn.Parameter(torch.randn(1, 3, 4))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.tanh(x + self.pos + self.seg).mean(1))


class _TiedLM(nn.Module):
    """An embedding tied to the output head (one tensor, two modules)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x).mean(1))))


@pytest.mark.parametrize("make", [_Offsets, _TiedLM], ids=["shared-grads", "tied"])
def test_shared_gradient_tensors_and_tied_weights_match_vmap_reference(make):
    # The running moments consume each per-sample gradient in place; where
    # vmap returns one tensor for two parameters, folding the first changed
    # the second (its mean came out centred: wrong mean and variance).
    torch.manual_seed(0)
    model = make().double()
    n = 7
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 3, 4, generator=g, dtype=torch.float64) if make is _Offsets
         else torch.randint(0, 5, (n, 3), generator=g))
    y = torch.randint(0, 5, (n,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    ref: dict[str, float] = {}
    mean_sq = 0.0
    for name, gi in grads.items():
        gi = gi.reshape(n, -1)
        layer = name.rpartition(".")[0] or name
        ref[layer] = ref.get(layer, 0.0) + float((gi - gi.mean(0)).pow(2).sum(1).mean())
        mean_sq += float(gi.mean(0).pow(2).sum())
    for chunk_size in (None, 1, 3):
        r = nu.gradient_variance(model, (x, y), chunk_size=chunk_size)
        assert r.per_layer == pytest.approx(ref, rel=1e-10), chunk_size
        assert r.mean_grad_sqnorm == pytest.approx(mean_sq, rel=1e-10), chunk_size
    # kfac_variance's exact part streams the same moments
    k = nu.kfac_variance(model, (x, y), chunk_size=2)
    for layer in k.exact_layers:
        assert k.per_layer[layer] == pytest.approx(ref[layer], rel=1e-10), layer
    assert k.mean_grad_sqnorm == pytest.approx(mean_sq, rel=1e-10)


def test_noise_factor_is_the_without_replacement_minibatch_variance():
    # Var of the mean of b of n values drawn without replacement = a * population variance.
    vals = torch.tensor([0.3, -1.2, 2.0, 0.7, 5.1, -0.4], dtype=torch.float64)
    n = len(vals)
    pop_var = float(vals.var(unbiased=False))
    for b in range(1, n + 1):
        means = torch.tensor(
            [float(vals[list(c)].mean()) for c in itertools.combinations(range(n), b)], dtype=torch.float64
        )
        assert float(means.var(unbiased=False)) == pytest.approx(nu.noise_factor(n, b) * pop_var, abs=1e-12)
    assert nu.noise_factor(1, 1) == 0.0
    with pytest.raises(ValueError, match="exceeds"):
        nu.noise_factor(3, 4)


def test_default_batch_size_is_first_batch_and_single_batch_has_no_noise():
    model = _mlp()
    x, y = _data(12, (5,), 3)
    r = nu.gradient_variance(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert r.batch_size == 4 and r.noise_factor == pytest.approx((12 - 4) / (4 * 11))
    r1 = nu.gradient_variance(model, (x, y))
    assert r1.batch_size == 12 and r1.noise == 0.0 and r1.total > 0


def _state(model):
    return (
        [(p.detach().clone(), p.data_ptr(), p.requires_grad, p.grad) for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
    )


def _assert_same(model, state):
    params, buffers, modes = state
    for p, (v, ptr, req, grad) in zip(model.parameters(), params):
        assert torch.equal(p, v) and p.data_ptr() == ptr and p.requires_grad == req and p.grad is grad
    for b, v in zip(model.buffers(), buffers):
        assert torch.equal(b, v)
    assert [m.training for m in model.modules()] == modes
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def _calls():
    model_fns = {
        "gradient_variance": lambda m, d, **k: nu.gradient_variance(m, d, **k),
        "kfac_variance": lambda m, d, **k: nu.kfac_variance(m, d, factors=True, **k),
        "channel_gradient_norms": lambda m, d, **k: nu.channel_gradient_norms(m, d, **k),
        "class_loss_imbalance": lambda m, d, **k: nu.class_loss_imbalance(m, d, **k),
    }
    return list(model_fns.items())


@pytest.mark.parametrize("name, fn", _calls(), ids=[c[0] for c in _calls()])
@pytest.mark.parametrize("train", [False, True])
def test_model_restored_and_global_rng_untouched(name, fn, train):
    model = _cnn()
    model.train()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model[0].bias.requires_grad_(False)
    x, y = _data(6, (2, 5, 5), 4)
    state = _state(model)
    rng = torch.get_rng_state()
    fn(model, [(x[:3], y[:3]), (x[3:], y[3:])], train=train)
    _assert_same(model, state)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name, fn", _calls(), ids=[c[0] for c in _calls()])
def test_model_restored_after_exception(name, fn):
    model = _cnn()
    model.train()
    x, y = _data(6, (2, 5, 5), 4)
    state = _state(model)
    calls = []

    def failing_loss(out, target):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected failure")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="injected"):
        # with vmap the loss is traced once per chunk: the second chunk fails
        fn(model, [(x[:3], y[:3]), (x[3:], y[3:])], loss_fn=failing_loss, train=True)
    _assert_same(model, state)


def test_frozen_params_selected_explicitly():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = _data(8, (5,), 3)
    with pytest.raises(ValueError, match="requires_grad"):
        nu.gradient_variance(model, (x, y))
    r = nu.kfac_variance(model, [(x[i : i + 1], y[i : i + 1]) for i in range(8)], params=["0.weight", "2.bias"])
    e = nu.gradient_variance(model, (x, y), params=["0.weight", "2.bias"])
    assert r.total == pytest.approx(e.total, rel=1e-10)
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(fallback="nope"), ValueError, "fallback"),
        (dict(batch_size=0), ValueError, "batch_size"),
        # more than the 4 samples of the data: was taken as 4 (noise 0) in silence
        (dict(batch_size=5), ValueError, "batch_size=5 exceeds the 4 samples"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(loss_fn=3), TypeError, "loss_fn"),
        (dict(n_batches=0), ValueError, "n_batches"),
    ],
)
def test_bad_input(kwargs, err, match):
    model = _mlp()
    x, y = _data(4, (5,), 3)
    state = _state(model)
    with pytest.raises(err, match=match):
        nu.kfac_variance(model, (x, y), **kwargs)
    if "fallback" not in kwargs:
        with pytest.raises(err, match=match):
            nu.gradient_variance(model, (x, y), **kwargs)
    _assert_same(model, state)


def test_bad_data():
    model = _mlp()
    with pytest.raises(ValueError, match="no batches"):
        nu.gradient_variance(model, [])
    with pytest.raises(TypeError, match="model"):
        nu.kfac_variance("model", [])
    x, y = _data(4, (5,), 3)
    with pytest.raises(ValueError, match="leading dimension"):
        nu.kfac_variance(model, (x, y[:3]))


def test_channel_gradient_norms_matches_manual():
    model = _cnn().eval()
    x, y = _data(10, (2, 5, 5), 4)
    r = nu.channel_gradient_norms(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    g = dict(zip([n for n, _ in model.named_parameters()], grads))
    conv = torch.cat([g["0.weight"].reshape(3, -1), g["0.bias"][:, None]], 1).norm(dim=1)
    bn = torch.stack([g["1.weight"], g["1.bias"]], 1).norm(dim=1)
    lin = torch.cat([g["4.weight"], g["4.bias"][:, None]], 1).norm(dim=1)
    pooled = torch.cat([conv, bn, lin])
    assert r.n_channels == 10
    assert r.variance == pytest.approx(float(pooled.var(unbiased=False)), rel=1e-10)
    assert r.cv == pytest.approx(float(pooled.std(unbiased=False) / pooled.mean()), rel=1e-10)
    assert r.per_layer["0"]["variance"] == pytest.approx(float(conv.var(unbiased=False)), rel=1e-10)
    assert r.norms["4"] == pytest.approx(lin.tolist(), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_parameters_have_no_channels():
    # A parameter with no elements has no channels; with only such
    # parameters selected torch.cat failed on the empty list of norms.
    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.e = nn.Parameter(torch.zeros(0, 3))
            self.z = nn.Linear(0, 4)  # weight (4, 0): no elements; bias (4,)

        def forward(self, x):
            return self.a(x) + self.e.sum() + self.z(x[:, :0])

    torch.manual_seed(0)
    model = WithEmpty().double()
    x, y = _data(6, (3,), 4)
    state = _state(model)
    for params in ([model.e], [model.e, model.z.weight]):
        r = nu.channel_gradient_norms(model, (x, y), params=params)
        assert (r.n_channels, r.per_layer, r.norms, r.mean, r.variance) == (0, {}, {}, 0.0, 0.0)
        assert math.isnan(r.cv)
        json.loads(r.to_json())
        assert nu.gradient_variance(model, (x, y), params=params).total == 0
        assert nu.kfac_variance(model, (x, y), params=params).total == 0
    full = nu.channel_gradient_norms(model, (x, y))
    assert set(full.norms) == {"a", "z"} and full.n_channels == 8
    _assert_same(model, state)


def test_update_moments_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(3)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)]).double()
    before = nu.snapshot(model)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn_like(p) * (i + 1) ** 1.5 * 0.01)
    r = nu.update_moments(before, model)
    mags = []
    for i in range(6):
        d = sum(float((dict(model.named_parameters())[f"{i}.{k}"].detach() - before[f"{i}.{k}"]).pow(2).sum())
                for k in ("weight", "bias"))
        mags.append(math.sqrt(d))
    assert list(r.magnitudes.values()) == pytest.approx(mags, rel=1e-12)
    assert r.skewness == pytest.approx(stats.skew(mags, bias=True), rel=1e-10)
    assert r.kurtosis == pytest.approx(stats.kurtosis(mags, fisher=True, bias=True), rel=1e-10)
    rel = nu.update_moments(before, nu.snapshot(model), relative=True)
    base = [math.sqrt(sum(float(before[f"{i}.{k}"].pow(2).sum()) for k in ("weight", "bias"))) for i in range(6)]
    assert list(rel.magnitudes.values()) == pytest.approx([m / b for m, b in zip(mags, base)], rel=1e-12)
    json.loads(r.to_json())


def test_update_moments_bad_input():
    a = {"0.weight": torch.zeros(2), "1.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="different parameters"):
        nu.update_moments(a, {"0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least 2 layers"):
        nu.update_moments({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        nu.update_moments([1], a)
    same = nu.update_moments(a, {k: v + 1 for k, v in a.items()})
    assert math.isnan(same.skewness) and same.std == 0
    # relative="False" (a string from a command line) counted as true
    for bad in ("False", 1, None):
        with pytest.raises(TypeError, match="relative must be True or False"):
            nu.update_moments(a, a, relative=bad)


def test_class_loss_imbalance_matches_manual():
    model = _mlp()
    x, y = _data(30, (5,), 3)
    r = nu.class_loss_imbalance(model, [(x[:7], y[:7]), (x[7:], y[7:])])
    losses = F.cross_entropy(model(x), y, reduction="none").detach()
    per = torch.stack([losses[y == c].mean() for c in range(3)])
    assert list(r.per_class.values()) == pytest.approx(per.tolist(), rel=1e-10)
    assert r.counts == {c: int((y == c).sum()) for c in range(3)}
    assert r.cv == pytest.approx(float(per.std(unbiased=False) / per.mean()), rel=1e-10)
    assert r.max_min_ratio == pytest.approx(float(per.max() / per.min()), rel=1e-10)
    with pytest.raises(ValueError, match="integer class labels"):
        nu.class_loss_imbalance(model, (x, torch.randn(30, 3, dtype=torch.float64)))


def test_results_serialize():
    model = _mlp()
    x, y = _data(8, (5,), 3)
    for r in (
        nu.gradient_variance(model, (x, y)),
        nu.kfac_variance(model, (x, y), factors=True),
        nu.channel_gradient_norms(model, (x, y)),
        nu.class_loss_imbalance(model, (x, y)),
    ):
        d = json.loads(r.to_json())
        assert d.keys() == r.to_dict().keys()
    assert float(nu.gradient_variance(model, (x, y))) > 0
    assert flatness.nonuniformity is nu


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    model = _mlp()
    x, y = _data(8, (5,), 3)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    quiet = nu.kfac_variance(model, batches)
    loud = nu.kfac_variance(model, batches, progress=True)
    nu.gradient_variance(model, batches, progress=True)
    assert loud.total == quiet.total
    assert "kfac variance" in capsys.readouterr().err


def test_moments_merge_over_uneven_shards_by_size():
    """``merge_moments`` pools each rank's (n, mean, m2) into the moments of
    the union: ranks of 5, 2 and 9 samples (uneven, as shards without
    padding are) against the mean and sum of squared deviations of all 16.
    The ranks are threads and the all-reduce a sum over them."""
    import threading
    from types import SimpleNamespace

    from flatness import _distributed

    sizes = [5, 2, 9]
    g = torch.Generator().manual_seed(4)
    shards = [[torch.randn(n, 3, 2, generator=g, dtype=torch.float64) * (r + 1) + r,
               torch.randn(n, 4, generator=g, dtype=torch.float64)] for r, n in enumerate(sizes)]
    world = len(sizes)
    slots: list = [None] * world
    barrier = threading.Barrier(world)
    local = threading.local()

    def fake_sum(value):
        slots[local.rank] = value.clone() if isinstance(value, torch.Tensor) else value
        barrier.wait()
        total = slots[0]
        for v in slots[1:]:
            total = total + v
        barrier.wait()  # every rank has read the slots
        if isinstance(value, torch.Tensor):
            return value.copy_(total)
        return total

    results: list = [None] * world
    errors: list = []

    def rank_main(r):
        local.rank = r
        try:
            shard = shards[r]
            moments = SimpleNamespace(
                n=sizes[r],
                mean=[t.mean(0) for t in shard],
                m2=[(t - t.mean(0)).pow(2).sum() for t in shard],
            )
            _distributed.merge_moments(moments)
            results[r] = moments
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            barrier.abort()

    mp = pytest.MonkeyPatch()
    mp.setattr(_distributed, "enabled", lambda: True)
    mp.setattr(_distributed, "sum_", fake_sum)
    try:
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        mp.undo()
    assert not errors, errors
    union = [torch.cat([s[k] for s in shards]) for k in range(2)]
    for moments in results:
        assert moments.n == sum(sizes)
        for k, t in enumerate(union):
            torch.testing.assert_close(moments.mean[k], t.mean(0), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(moments.m2[k], (t - t.mean(0)).pow(2).sum(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("train, running_stats", [(True, True), (False, False)])
def test_per_sample_gradients_refuse_batch_statistics_clearly(train, running_stats):
    # A sample's gradient is that of the loss on a batch of one, on which
    # BatchNorm with batch statistics (training mode, or no running
    # statistics in any mode) cannot normalize 2-D inputs: PyTorch's
    # "Expected more than 1 value per channel" came out of the probe.  The
    # refusal names the layer and the way out; the model is unchanged.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=running_stats), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    snap = cases.snapshot(model)
    for fn in (nu.gradient_variance, nu.kfac_variance):
        with pytest.raises(ValueError, match=r"batches of one sample.*1 \(BatchNorm1d\).*train=False"):
            fn(model, (x, y), train=train)
        cases.assert_unchanged(model, snap)
    if running_stats:  # eval mode normalizes by the running statistics: defined
        assert math.isfinite(nu.gradient_variance(model, (x, y)).total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kfac_variance_at_half_precision_takes_the_factors_in_float32(dtype):
    # ||a||^2 of this layer's inputs (64 features of size ~40) is 1e5: in
    # float16 it overflowed (kfac_variance raised NonFiniteLossError, the
    # float32 model's value being 569.6); bfloat16 rounded it (0.6% off).
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    batch = (40 * torch.randn(64, 64), torch.randint(0, 3, (64,)))
    want = nu.kfac_variance(model, [batch], batch_size=4).total
    got = nu.kfac_variance(copy.deepcopy(model).to(dtype), [batch], batch_size=4).total
    assert got == pytest.approx(want, rel=3e-3)

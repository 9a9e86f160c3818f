"""Determinism: the same ``seed`` gives the same result twice, bit for bit on
CPU, for every public function with a seed; another seed gives another
result where randomness is involved; the global RNG is never touched (also
with ``seed=None`` and with dropout active under ``train=True``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatness
from flatness.diversity import random_split
from flatness.hessian import minimum_sharpness, spectral_density, top_eigenvalues, trace
from flatness.nonuniformity import channel_gradient_norms, class_loss_imbalance, gradient_variance, kfac_variance

# Many tiny ops: one intra-op thread (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def _data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


def _plain(result):
    """Everything a result holds except its wall time, as comparable data."""
    if hasattr(result, "to_dict"):
        d = result.to_dict()
        d.pop("wall_time", None)
        for key in ("eigenvectors",):
            if hasattr(result, key):
                d[key] = [[t.tolist() for t in v] for v in getattr(result, key)]
        return d
    if isinstance(result, tuple):
        return [t.tolist() for t in result]
    return result.tolist() if isinstance(result, torch.Tensor) else result


# name -> (call(model, data, seed), random: another seed changes the result)
SEEDED = {
    **{f"sharpness_{k}": (lambda m, d, s, k=k: flatness.sharpness(
        m, d, kind=k, rho=0.05, seed=s,
        **({"n_samples": 3} if k.startswith("avg") else {"n_iters": 3, "restarts": 1})), True)
       for k in ("linf", "l2", "adaptive_linf", "adaptive_l2", "avg_linf", "avg_l2",
                 "avg_adaptive_linf", "avg_adaptive_l2")},
    "sharpness_train_dropout": (lambda m, d, s: flatness.sharpness(
        m, d, kind="l2", rho=0.05, seed=s, n_iters=3, train=True), True),
    "sharpness_hessian_max_eig": (lambda m, d, s: flatness.sharpness(
        m, d, kind="hessian_max_eig", seed=s, max_iter=4), True),
    "sharpness_hessian_trace": (lambda m, d, s: flatness.sharpness(
        m, d, kind="hessian_trace", seed=s, n_samples=6), True),
    "sharpness_minimum": (lambda m, d, s: flatness.sharpness(
        m, d, kind="minimum", seed=s, method="hutchinson", n_samples=4), True),
    "sharpness_minimum_gn": (lambda m, d, s: flatness.sharpness(m, d, kind="minimum", seed=s), False),
    "top_eigenvalues": (lambda m, d, s: top_eigenvalues(m, d, k=2, seed=s, max_iter=4), True),
    "top_eigenvalues_train_dropout": (lambda m, d, s: top_eigenvalues(m, d, seed=s, max_iter=3, train=True), True),
    "trace_hutchpp": (lambda m, d, s: trace(m, d, seed=s, n_samples=6), True),
    "trace_hutchinson": (lambda m, d, s: trace(m, d, method="hutchinson", seed=s, n_samples=4), True),
    "spectral_density": (lambda m, d, s: spectral_density(m, d, seed=s, n_vectors=2, n_steps=4), True),
    "minimum_sharpness_neuron": (lambda m, d, s: minimum_sharpness(
        m, d, seed=s, method="hutchinson", n_samples=4, granularity="neuron"), True),
    "gradient_variance_train_dropout": (lambda m, d, s: gradient_variance(m, d, seed=s, train=True), True),
    "kfac_variance_train_dropout": (lambda m, d, s: kfac_variance(m, d, seed=s, train=True, factors=True), True),
    "channel_gradient_norms_train_dropout": (lambda m, d, s: channel_gradient_norms(m, d, seed=s, train=True), True),
    "class_loss_imbalance_train_dropout": (lambda m, d, s: class_loss_imbalance(m, d, seed=s, train=True), True),
    "random_split": (lambda m, d, s: random_split(20, 1, 0.4, seed=s), True),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_same_seed_same_result_and_global_rng_untouched(name):
    call, random = SEEDED[name]
    # minimum sharpness needs a ReLU chain: no dropout between the layers
    model = _model(0.0 if "minimum" in name else 0.3)
    data = _data()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = _plain(call(model, data, 5))
    second = _plain(call(model, data, 5))
    assert first == second  # bit for bit: floats compared exactly
    if random:
        assert _plain(call(model, data, 6)) != first
    if name != "random_split":
        call(model, data, None)  # a fresh seed, still a private generator
    assert torch.equal(torch.get_rng_state(), state), "global RNG state changed"


def test_dropout_masks_come_from_seed_not_global_rng():
    """With train=True the dropout masks depend on seed only: the result is
    the same whatever the global RNG state was before the call."""
    model, data = _model(), _data()
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(flatness.sharpness(model, data, kind="avg_l2", rho=0.05, seed=3, n_samples=2, train=True).value)
    assert results[0] == results[1]
    # and dropout really acts: eval mode gives another value
    assert flatness.sharpness(model, data, kind="avg_l2", rho=0.05, seed=3, n_samples=2).value != results[0]


def test_sam_same_rng_reproduces_dropout_and_leaves_rng_alone():
    """SAM has no seed: with same_rng=True the second pass replays the first
    pass's dropout mask, so two identical runs from the same global seed
    give identical weights."""
    from flatness.optim import SAM

    runs = []
    for _ in range(2):
        model = _model()
        model.train()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, same_rng=True)
        torch.manual_seed(9)
        for x, y in _data():
            def closure(x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _loader():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    # shuffle=False: still, every iteration draws a base seed from the global RNG
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)


# the public functions without a seed that read data
def _unseeded_calls():
    from flatness import diversity as D
    from flatness import landscape as L

    pair = [_model(0.0), _model(0.0)]
    with torch.no_grad():
        pair[1][0].weight.add_(0.5)
    return {
        "disagreement": lambda d: D.disagreement(pair, d),
        "disagreement_error_ratio": lambda d: D.disagreement_error_ratio(pair, d),
        "prediction_variance": lambda d: D.prediction_variance(pair, d),
        "ensemble_metrics": lambda d: D.ensemble_metrics(pair, d),
        "per_sample_sharpness_fisher": lambda d: D.per_sample_sharpness(pair[0], d),
        "per_sample_sharpness_sam": lambda d: D.per_sample_sharpness(pair[0], d, kind="sam"),
        "interpolate": lambda d: L.interpolate(pair[0], pair[1], d, 3),
        "loss_barrier": lambda d: L.loss_barrier(pair, d, n_points=3),
    }


@pytest.mark.parametrize("name", list(_unseeded_calls()))
def test_functions_reading_a_loader_leave_the_global_rng_alone(name):
    # the diversity functions iterated the loader outside any saved state:
    # each call moved the caller's random stream on
    call = _unseeded_calls()[name]
    loader = _loader()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    call(loader)
    assert torch.equal(torch.get_rng_state(), state), "global RNG state changed"


@pytest.mark.parametrize("loss_fn, error", [(None, None), ("ce", TypeError)])
def test_loss_fn_none_is_the_default_and_a_string_is_refused(loss_fn, error):
    from flatness.diversity import per_sample_sharpness
    from flatness.optim import SAM, subset_sam_step

    model = _model(0.0)
    (x, y), _ = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    mask = torch.arange(len(y)) % 2 == 0
    w = [p.detach().clone() for p in model.parameters()]
    if error is not None:
        with pytest.raises(error, match="loss_fn must be callable"):
            per_sample_sharpness(model, (x, y), loss_fn=loss_fn)
        with pytest.raises(error, match="loss_fn must be callable"):
            subset_sam_step(opt, model, x, y, mask, loss_fn=loss_fn)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
        return
    torch.testing.assert_close(per_sample_sharpness(model, (x, y), loss_fn=None),
                               per_sample_sharpness(model, (x, y)), rtol=0, atol=0)
    ref = _model(0.0)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1)
    assert subset_sam_step(opt, model, x, y, mask, loss_fn=None) == subset_sam_step(ref_opt, ref, x, y, mask)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))

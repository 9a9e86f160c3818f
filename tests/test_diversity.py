"""flatness.diversity metrics against direct NumPy computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatness import diversity as dv

# --------------------------------------------------------------------------
# NumPy references, written from the definitions (no code shared with the
# library)
# --------------------------------------------------------------------------


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_disagreement_matrix(logits):
    pred = logits.argmax(-1)  # first maximal index on ties
    m = pred.shape[0]
    mat = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            mat[i, j] = np.mean(pred[i] != pred[j])
    return mat


def np_mean_pairwise(mat):
    m = mat.shape[0]
    vals = [mat[i, j] for i in range(m) for j in range(i + 1, m)]
    return float(np.mean(vals))


def np_der(logits, y):
    pred = logits.argmax(-1)
    err = np.mean([np.mean(p != y) for p in pred])
    return np_mean_pairwise(np_disagreement_matrix(logits)) / err


def np_variance(logits, space, reduction):
    q = np_softmax(logits) if space == "probs" else logits
    m, n, c = q.shape
    total = 0.0
    for s in range(n):
        per_class = [np.sum((q[:, s, k] - q[:, s, k].mean()) ** 2) / (m - 1) for k in range(c)]
        total += np.mean(per_class) if reduction == "mean" else np.sum(per_class)
    return total / n


def np_nll(p, y):
    with np.errstate(divide="ignore"):  # a zero probability costs +inf, as it should
        return float(np.mean(-np.log(p[np.arange(len(y)), y])))


def np_temperature_nll(p, y, t):
    return np_nll(np_softmax(np.log(p) / t), y)


def np_ece(p, y, n_bins):
    conf = p.max(-1)
    pred = p.argmax(-1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(np.mean(pred[inside] == y[inside]) - conf[inside].mean())
    return ece


def np_brier(p, y):
    onehot = np.eye(p.shape[-1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, -1)))


def np_metrics(p, y, t=None, n_bins=15):
    out = {
        "accuracy": float(np.mean(p.argmax(-1) == y)),
        "nll": np_nll(p, y),
        "ece": np_ece(p, y, n_bins),
        "brier": np_brier(p, y),
    }
    if t is not None:
        out["cnll"] = np_temperature_nll(p, y, t)
    return out


def np_grid_temperature(p, y):
    """Brute force: the best T on a fine log grid, refined once."""
    grid = np.exp(np.linspace(math.log(1e-2), math.log(1e2), 4001))
    vals = [np_temperature_nll(p, y, t) for t in grid]
    i = int(np.argmin(vals))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 2001)
    vals = [np_temperature_nll(p, y, t) for t in fine]
    return float(fine[int(np.argmin(vals))])


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


def random_logits(m=4, n=50, c=5, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    # Coarse integers make exact ties in the argmax frequent.
    z = rng.integers(-2, 3, size=(m, n, c)).astype(np.float64) if ties else rng.normal(size=(m, n, c))
    y = rng.integers(0, c, size=n)
    return z, y


def overconfident_logits(m, n, c, seed, scale=3.0):
    """Labels drawn from softmax(mean member logit), logits ``scale`` times too
    large: the best temperature is finite and near ``scale``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, c)) * 2.0
    z = base[None] + 0.5 * rng.normal(size=(m, n, c))
    p = np_softmax(base)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z * scale, y


class Table(nn.Module):
    """A 'model' that looks its logits up by sample id (the input)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(logits, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.dropout = nn.Dropout(0.5)  # must be off: members run in eval mode

    def forward(self, idx):
        return self.dropout(self.table[idx] * self.scale)


def as_models(z):
    return [Table(zm) for zm in z]


def uneven_loader(y, sizes=(7, 1, 20, 13, 9)):
    y = torch.as_tensor(y)
    assert sum(sizes) == len(y)
    batches, start = [], 0
    for s in sizes:
        idx = torch.arange(start, start + s)
        batches.append((idx, y[idx]))
        start += s
    return batches


# --------------------------------------------------------------------------
# disagreement, DER, variance
# --------------------------------------------------------------------------


def test_ties_are_present():
    z, _ = random_logits()
    top = z.max(-1, keepdims=True)
    assert ((z == top).sum(-1) > 1).any()


@pytest.mark.parametrize("ties", [True, False])
def test_disagreement_matches_numpy(ties):
    z, _ = random_logits(ties=ties)
    ref = np_disagreement_matrix(z)
    mat = dv.disagreement(torch.tensor(z), pairwise=True)
    np.testing.assert_allclose(mat.numpy(), ref, rtol=0, atol=1e-15)
    assert dv.disagreement(torch.tensor(z)) == pytest.approx(np_mean_pairwise(ref), abs=1e-15)
    # probabilities give the same argmax (softmax maps equal logits to equal probs)
    probs = torch.softmax(torch.tensor(z), -1)
    assert dv.disagreement(probs, outputs="probs") == pytest.approx(np_mean_pairwise(ref), abs=1e-15)


def test_der_matches_numpy():
    z, y = random_logits(seed=3)
    assert dv.disagreement_error_ratio(torch.tensor(z), targets=torch.tensor(y)) == pytest.approx(
        np_der(z, y), rel=1e-14
    )


def test_der_nan_when_all_members_perfect():
    y = np.array([0, 1, 2, 1])
    z = np.stack([np.eye(3)[y] * 5.0] * 3)
    assert math.isnan(dv.disagreement_error_ratio(torch.tensor(z), targets=torch.tensor(y)))


@pytest.mark.parametrize("space", ["probs", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prediction_variance_matches_numpy(space, reduction):
    z, _ = random_logits(ties=False, seed=5)
    got = dv.prediction_variance(torch.tensor(z), space=space, class_reduction=reduction)
    assert got == pytest.approx(np_variance(z, space, reduction), rel=1e-12)


def test_prediction_variance_is_authors_running_formula():
    """SharpBalance's compute_bias_variance: sum_c of E||o||^2 - ||E o||^2 per
    sample (population variance of the raw outputs), times M/(M-1)."""
    z, _ = random_logits(ties=False, seed=6)
    m = z.shape[0]
    mean_sq = (np.linalg.norm(z, axis=-1) ** 2).mean(0)
    sq_mean = np.linalg.norm(z.mean(0), axis=-1) ** 2
    authors = np.mean(mean_sq - sq_mean) * m / (m - 1)
    got = dv.prediction_variance(torch.tensor(z), space="logits", class_reduction="sum")
    assert got == pytest.approx(authors, rel=1e-12)


@pytest.mark.parametrize(
    "fn", [dv.disagreement, dv.disagreement_error_ratio, dv.prediction_variance]
)
def test_single_member_is_a_clear_error(fn):
    z, y = random_logits(m=1)
    kwargs = {"targets": torch.tensor(y)} if fn is dv.disagreement_error_ratio else {}
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        fn(torch.tensor(z), **kwargs)
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        fn(as_models(z), uneven_loader(y))


def test_streaming_uneven_batches_equals_one_batch():
    z, y = random_logits(m=3, n=50)
    models = as_models(z)
    loader = uneven_loader(y)
    whole = (torch.arange(50), torch.as_tensor(y))
    t = torch.tensor(z)
    for kw in [{}, {"pairwise": True}]:
        a = dv.disagreement(models, loader, **kw)
        b = dv.disagreement(models, whole, **kw)
        c = dv.disagreement(t, **kw)
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=1e-15)
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(c), rtol=0, atol=1e-15)
    assert dv.disagreement(nn.ModuleList(models), loader) == dv.disagreement(t)
    assert dv.disagreement_error_ratio(models, loader) == pytest.approx(
        dv.disagreement_error_ratio(t, targets=torch.as_tensor(y)), rel=1e-14
    )
    assert dv.prediction_variance(models, loader) == pytest.approx(
        dv.prediction_variance(models, whole), rel=1e-12
    )
    ma = dv.ensemble_metrics(models, loader, calibration=whole)
    mb = dv.ensemble_metrics(t, targets=torch.as_tensor(y), calibration=t,
                             calibration_targets=torch.as_tensor(y))
    for key in ma.ensemble:
        assert ma.ensemble[key] == pytest.approx(mb.ensemble[key], rel=1e-12, abs=1e-15), key


# --------------------------------------------------------------------------
# ensemble metrics
# --------------------------------------------------------------------------


def test_ensemble_metrics_match_numpy():
    z, y = overconfident_logits(m=3, n=60, c=4, seed=7)
    zc, yc = overconfident_logits(m=3, n=80, c=4, seed=8)
    res = dv.ensemble_metrics(
        torch.tensor(z), targets=torch.tensor(y),
        calibration=torch.tensor(zc), calibration_targets=torch.tensor(yc), n_bins=10,
    )
    p, pc = np_softmax(z), np_softmax(zc)
    for m in range(3):
        t = np_grid_temperature(pc[m], yc)
        ref = np_metrics(p[m], y, n_bins=10)
        got = res.members[m]
        for key, val in ref.items():
            assert got[key] == pytest.approx(val, rel=1e-12, abs=1e-14), (m, key)
        assert got["temperature"] == pytest.approx(t, rel=1e-3)
        # cNLL evaluated at our T agrees with NumPy at that T, and the NumPy
        # objective at our T is no worse than at the grid optimum
        assert got["cnll"] == pytest.approx(np_temperature_nll(p[m], y, got["temperature"]), rel=1e-12)
        assert np_temperature_nll(pc[m], yc, got["temperature"]) <= np_temperature_nll(pc[m], yc, t) + 1e-12
    pe, pce = p.mean(0), pc.mean(0)
    ref = np_metrics(pe, y, n_bins=10)
    for key, val in ref.items():
        assert res.ensemble[key] == pytest.approx(val, rel=1e-12, abs=1e-14), key
    te = np_grid_temperature(pce, yc)
    assert res.ensemble["temperature"] == pytest.approx(te, rel=1e-3)
    assert res.ensemble["cnll"] == pytest.approx(np_temperature_nll(pe, y, res.ensemble["temperature"]), rel=1e-12)
    assert res.n_samples == 60
    assert json.loads(res.to_json())["ensemble"]["accuracy"] == res.ensemble["accuracy"]


def test_ensemble_metrics_ties_and_single_member():
    z, y = random_logits(m=1, n=40, c=3, seed=9)  # integer logits: ties
    res = dv.ensemble_metrics(torch.tensor(z), targets=torch.tensor(y))
    p = np_softmax(z[0])
    ref = np_metrics(p, y)
    for key, val in ref.items():
        assert res.members[0][key] == pytest.approx(val, rel=1e-12, abs=1e-14), key
        assert res.ensemble[key] == pytest.approx(val, rel=1e-12, abs=1e-14), key
    assert res.ensemble["cnll"] is None and res.ensemble["temperature"] is None


def test_ece_with_confidences_on_bin_edges_by_hand():
    """Bins ``(k/B, (k+1)/B]``: with B = 4, confidence 0.5 belongs to the
    second bin (0.25, 0.5] and 0.75 to the third (0.5, 0.75].

    bin (0.25, 0.5]: confidences 0.5 (right) and 0.4375 (wrong):
        |0.9375 - 1| = 0.0625 (sum of confidences minus hits);
    bin (0.5, 0.75]: confidences 0.75 (wrong) and 0.625 (right):
        |1.375 - 1| = 0.375;
    ECE = (0.0625 + 0.375) / 4 = 0.109375.  (With 0.5 and 0.75 in the bins
    above it would be (0.4375 + 0.125) / 4 = 0.140625.)
    """
    p = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125], [0.625, 0.25, 0.125],
                      [0.25, 0.4375, 0.3125]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 2])
    res = dv.ensemble_metrics(p[None], targets=y, outputs="probs", n_bins=4)
    assert res.members[0]["ece"] == 0.109375
    assert res.members[0]["accuracy"] == 0.5


def test_temperature_fit_on_calibration_split_lowers_its_nll():
    z, y = overconfident_logits(m=1, n=200, c=5, seed=10)
    logp = torch.log_softmax(torch.tensor(z[0]), -1)
    t = dv.fit_temperature(logp, torch.tensor(y))
    assert t > 1.0
    # stationary point: d/dT NLL(T) ~ 0
    f = lambda s: np_temperature_nll(np_softmax(z[0]), y, s)  # noqa: E731
    h = 1e-5 * t
    assert abs((f(t + h) - f(t - h)) / (2 * h)) < 1e-5
    # logits and log-probabilities give the same temperature
    assert dv.fit_temperature(torch.tensor(z[0]), torch.tensor(y)) == pytest.approx(t, rel=1e-6)


def test_probs_input_matches_logits_input():
    z, y = random_logits(m=2, n=30, seed=11, ties=False)
    t, p = torch.tensor(z), torch.softmax(torch.tensor(z), -1)
    a = dv.ensemble_metrics(t, targets=torch.tensor(y), calibration=t, calibration_targets=torch.tensor(y))
    b = dv.ensemble_metrics(p, targets=torch.tensor(y), calibration=p, calibration_targets=torch.tensor(y),
                            outputs="probs")
    for key in a.ensemble:
        # the temperature's minimum is flat: Brent pins T to ~sqrt(eps)
        assert a.ensemble[key] == pytest.approx(b.ensemble[key], rel=1e-6 if key == "temperature" else 1e-9), key


# --------------------------------------------------------------------------
# models: eval mode, restoration, validation
# --------------------------------------------------------------------------


def test_members_run_in_eval_mode_and_are_restored():
    z, y = random_logits(m=2, n=50, ties=False)
    models = as_models(z)
    models[0].train()
    models[1].eval()
    models[1].scale.requires_grad_(False)
    before = [(m.scale.data_ptr(), m.scale.detach().clone()) for m in models]
    rng = torch.get_rng_state()
    # dropout is active in train mode: the result matches the tensor path only in eval mode
    assert dv.disagreement(models, uneven_loader(y)) == dv.disagreement(torch.tensor(z))
    assert models[0].training and not models[1].training
    assert models[0].scale.requires_grad and not models[1].scale.requires_grad
    for m, (ptr, val) in zip(models, before, strict=True):
        assert m.scale.data_ptr() == ptr and torch.equal(m.scale, val) and m.scale.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, idx):
        raise RuntimeError("boom")


def test_modes_restored_after_exception():
    z, y = random_logits(m=1, n=50)
    models = [as_models(z)[0].train(), Boom().train()]
    with pytest.raises(RuntimeError, match="boom"):
        dv.disagreement(models, uneven_loader(y))
    assert all(m.training for m in models)


def test_bad_input():
    z, y = random_logits(m=2)
    t = torch.tensor(z)
    with pytest.raises(ValueError, match="outputs must be one of"):
        dv.disagreement(t, outputs="softmax")
    with pytest.raises(ValueError, match=r"shape \(members, samples, classes\)"):
        dv.disagreement(t[0])
    with pytest.raises(ValueError, match="needs targets"):
        dv.disagreement_error_ratio(t)
    with pytest.raises(ValueError, match="targets must lie in"):
        dv.ensemble_metrics(t, targets=torch.tensor(y) + 10)
    with pytest.raises(ValueError, match="sum to 1"):
        dv.ensemble_metrics(t, targets=torch.tensor(y), outputs="probs")
    with pytest.raises(ValueError, match="data is required"):
        dv.disagreement(as_models(z))
    with pytest.raises(TypeError, match="list of models or a tensor"):
        dv.disagreement(as_models(z)[0], uneven_loader(y))
    with pytest.raises(ValueError, match="space must be one of"):
        dv.prediction_variance(t, space="entropy")
    with pytest.raises(ValueError, match="needs logits"):
        dv.prediction_variance(torch.softmax(t, -1), space="logits", outputs="probs")
    with pytest.raises(ValueError, match="n_bins"):
        dv.ensemble_metrics(t, targets=torch.tensor(y), n_bins=0)
    with pytest.raises(ValueError, match="calibration has 3 members"):
        dv.ensemble_metrics(t, targets=torch.tensor(y), calibration=torch.cat([t, t[:1]]),
                            calibration_targets=torch.tensor(y))
    with pytest.raises(ValueError, match="no batches"):
        dv.disagreement(as_models(z), [])


class DictTable(Table):
    def forward(self, idx, scale):  # keyword inputs from a dict batch
        return self.table[idx] * self.scale * scale


def test_dict_inputs_and_float32_members():
    z, y = random_logits(m=3, n=50, ties=False)
    models = [DictTable(zm).float() for zm in z]
    loader = [({"idx": idx, "scale": torch.ones(len(idx), 1)}, t) for idx, t in uneven_loader(y)]
    got = dv.prediction_variance(models, loader)
    ref = np_variance(z.astype(np.float32).astype(np.float64), "probs", "mean")
    assert got == pytest.approx(ref, rel=1e-5)


def test_label_free_metrics_ignore_the_targets_of_the_data():
    """disagreement and prediction_variance do not use labels: placeholder
    targets (-1 on unlabelled data) or regression targets were refused
    ("targets must lie in [0, C)")."""
    z, y = random_logits(m=3, ties=False)
    models = as_models(z)
    labelled = uneven_loader(y)
    for placeholder in (torch.full((len(y),), -1), torch.randn(len(y), dtype=torch.float64)):
        unlabelled = [(idx, placeholder[idx]) for idx, _ in labelled]
        assert dv.disagreement(models, unlabelled) == dv.disagreement(models, labelled)
        assert dv.prediction_variance(models, unlabelled) == dv.prediction_variance(models, labelled)
        with pytest.raises((ValueError, TypeError), match="targets must"):
            dv.disagreement_error_ratio(models, unlabelled)  # uses the labels


def test_one_class_outputs_and_empty_temperature_fit_are_errors():
    """One score per sample made every metric trivial (disagreement 0), and
    fit_temperature on no samples returned an arbitrary temperature."""
    z, y = random_logits(m=2, c=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dv.disagreement(torch.tensor(z))
    with pytest.raises(ValueError, match="at least 2 classes"):
        dv.prediction_variance(as_models(z), uneven_loader(y))
    with pytest.raises(ValueError, match="at least one sample and two classes"):
        dv.fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="not finite"):
        dv.fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    # -inf (a class of probability 0) is a valid log-probability
    assert math.isfinite(dv.fit_temperature(torch.log(torch.tensor([[1.0, 0.0], [0.3, 0.7]])), torch.tensor([0, 1])))

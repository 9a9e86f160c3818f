"""NumPy (and other ``numbers.Integral`` / ``numbers.Real``) scalars as options.

Hyper-parameters often come from a NumPy grid or a config file: an
``np.int64`` must mean what the Python int means (same result, bit for bit),
and what the library records (results' ``settings``, the optimizers'
``param_groups`` and ``state_dict()``) must hold plain Python numbers. Bools
(``True``, ``np.bool_``) and floats stay refused where an int is expected.
"""

from __future__ import annotations

import io
import json

import cases
import numpy as np
import pytest
import torch
from torch import nn

import flatness
from flatness import diversity as dv
from flatness import hessian
from flatness import landscape as L
from flatness import nonuniformity as nu
from flatness._checks import check_int, is_int, is_real
from flatness.optim import ESAM, GSAM, MESA, SAM, BayesianSAM, ConsistentSAM, LookSAM

NP_INTS = [np.int64, np.int32]
#: Refused wherever an int is expected.
NOT_INTS = [True, np.bool_(True), 2.0, np.float64(2.0)]


def _json(result) -> str:
    """The result as ``to_json`` would write it, without the wall time; a
    NumPy scalar shows up as ``<int64 5>`` (to_json would write ``"5"``)."""
    d = result.to_dict()
    d.pop("wall_time", None)
    return json.dumps(d, sort_keys=True, default=lambda v: f"<{type(v).__name__} {v}>")


def _assert_python_ints(settings: dict, *names: str) -> None:
    for name in names:
        assert type(settings[name]) is int, (name, type(settings[name]))


def _model():
    return cases.mlp(0, (5, 6, 4))


def _batches():
    return cases.classification_batches((6, 6), (5,), 4)


# ----------------------------------------------------------------------
# the shared checks
# ----------------------------------------------------------------------


def test_check_int_returns_python_int():
    for v in (np.int64(3), np.int32(3), np.uint8(3), np.int16(3), 3):
        out = check_int("n", v)
        assert out == 3 and type(out) is int
    assert check_int("n", None, allow_none=True) is None
    assert is_int(np.int64(1)) and not is_int(True) and not is_int(np.bool_(True)) and not is_int(1.0)
    assert is_real(np.float32(1)) and is_real(np.int8(1)) and not is_real(True) and not is_real(np.bool_(True))


@pytest.mark.parametrize("bad", [*NOT_INTS, "2", None])
def test_check_int_refuses_bools_and_floats(bad):
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got"):
        check_int("n", bad)


# ----------------------------------------------------------------------
# flatness.sharpness
# ----------------------------------------------------------------------


@pytest.mark.parametrize("np_int", NP_INTS)
def test_sharpness_worst_case(np_int):
    kw = dict(kind="linf", rho=0.01, n_iters=3, restarts=1, m=3, seed=5, n_batches=2)
    ref = flatness.sharpness(_model(), _batches(), **kw)
    got = flatness.sharpness(_model(), _batches(), **{k: np_int(v) if type(v) is int else v for k, v in kw.items()})
    assert got.value == ref.value
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_iters", "restarts", "m", "seed", "n_batches")


@pytest.mark.parametrize("np_int", NP_INTS)
def test_sharpness_average_case_and_curvature(np_int):
    ref = flatness.sharpness(_model(), _batches(), kind="avg_l2", rho=0.05, n_samples=4, seed=2)
    got = flatness.sharpness(_model(), _batches(), kind="avg_l2", rho=0.05, n_samples=np_int(4), seed=np_int(2))
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_samples", "seed")
    ref = flatness.sharpness(_model(), _batches(), kind="hessian_trace", method="hutchinson", n_samples=6, seed=1)
    got = flatness.sharpness(_model(), _batches(), kind="hessian_trace", method="hutchinson",
                             n_samples=np_int(6), seed=np_int(1))
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_samples", "seed")


# ----------------------------------------------------------------------
# flatness.hessian
# ----------------------------------------------------------------------


@pytest.mark.parametrize("np_int", NP_INTS)
def test_top_eigenvalues(np_int):
    kw = dict(k=2, max_iter=30, block_size=1, seed=3, n_batches=1, chunk_size=4)
    ref = hessian.top_eigenvalues(_model(), _batches(), **kw)
    got = hessian.top_eigenvalues(_model(), _batches(), **{k: np_int(v) for k, v in kw.items()})
    assert torch.equal(got.eigenvalues, ref.eigenvalues)
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "k", "max_iter", "block_size", "seed", "n_batches")
    assert type(hessian.top_eigenvalues(_model(), _batches(), tol=np.float32(1e-3)).settings["tol"]) is float


@pytest.mark.parametrize("np_int", NP_INTS)
def test_trace_and_spectral_density(np_int):
    ref = hessian.trace(_model(), _batches(), n_samples=10, batch=2, sketch=2, seed=4)
    got = hessian.trace(_model(), _batches(), n_samples=np_int(10), batch=np_int(2), sketch=np_int(2),
                        seed=np_int(4))
    assert got.value == ref.value and _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_samples", "batch", "sketch", "seed")
    ref = hessian.spectral_density(_model(), _batches(), n_vectors=2, n_steps=5, grid_size=16, seed=1)
    got = hessian.spectral_density(_model(), _batches(), n_vectors=np_int(2), n_steps=np_int(5),
                                   grid_size=np_int(16), seed=np_int(1))
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_vectors", "n_steps", "grid_size", "seed")


def test_hvp_and_minimum_sharpness():
    model, batches = _model(), _batches()
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(0)) for p in model.parameters()]
    ref = hessian.hvp(model, batches, v, n_batches=1, chunk_size=2)
    got = hessian.hvp(model, batches, v, n_batches=np.int64(1), chunk_size=np.int32(2))
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    relu = cases.mlp(1, (4, 6, 3), act=nn.ReLU)
    data = cases.classification_batches((8,), (4,), 3)
    kw = dict(method="hutchinson", n_samples=4, batch=2, seed=1, n_batches=1)
    ref = hessian.minimum_sharpness(relu, data, **kw)
    got = hessian.minimum_sharpness(relu, data, **{k: np.int64(v) if type(v) is int else v for k, v in kw.items()})
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "n_samples", "seed", "n_batches")


# ----------------------------------------------------------------------
# flatness.nonuniformity
# ----------------------------------------------------------------------


@pytest.mark.parametrize("np_int", NP_INTS)
def test_nonuniformity(np_int):
    kw = dict(batch_size=4, chunk_size=3, memory_limit=10**6, n_batches=2, seed=0)
    npkw = {k: np_int(v) for k, v in kw.items()}
    for fn in (nu.gradient_variance, nu.kfac_variance):
        ref, got = fn(_model(), _batches(), **kw), fn(_model(), _batches(), **npkw)
        assert _json(got) == _json(ref), fn.__name__
        assert type(got.batch_size) is int
        _assert_python_ints(got.settings, "chunk_size", "memory_limit", "n_batches")
    for fn in (nu.channel_gradient_norms, nu.class_loss_imbalance):
        ref = fn(_model(), _batches(), n_batches=1, seed=0)
        got = fn(_model(), _batches(), n_batches=np_int(1), seed=np_int(0))
        assert _json(got) == _json(ref), fn.__name__
        _assert_python_ints(got.settings, "n_batches")
    assert nu.noise_factor(np_int(10), np_int(4)) == nu.noise_factor(10, 4)


# ----------------------------------------------------------------------
# flatness.landscape
# ----------------------------------------------------------------------


def _slice(grid, **kw):
    model = _model()
    dirs = L.directions(model, "filter", k=2, seed=0)
    return L.slice(model, _batches()[0], dirs, grid, **kw)


@pytest.mark.parametrize("np_int", NP_INTS)
def test_landscape_directions(np_int):
    ref = L.directions(_model(), "filter", k=2, seed=4)
    got = L.directions(_model(), "filter", k=np_int(2), seed=np_int(4))
    assert all(torch.equal(a, b) for u, v in zip(got.vectors, ref.vectors, strict=True)
               for a, b in zip(u, v, strict=True))
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "k", "seed")


@pytest.mark.parametrize(
    "np_grid, grid",
    [
        (np.int64(3), 3),  # 3 points in [-1, 1], not the coordinate 3
        (np.int32(3), 3),
        ((-0.5, 0.5, np.int64(3)), (-0.5, 0.5, 3)),  # 3 points, not the coordinates -0.5, 0.5, 3
        ([np.int64(3), [0.0, 0.5]], [3, [0.0, 0.5]]),  # one spec per axis
        ([np.int64(3), np.int64(2)], [3, 2]),  # a list of plain numbers: coordinates
        (np.float64(0.5), 0.5),  # a float is a coordinate
        (np.float64(3.0), 3.0),  # even a whole one
        (np.float32(0.5), 0.5),
        ([np.float64(0.25), np.float32(0.5)], [0.25, 0.5]),
    ],
)
def test_landscape_grid(np_grid, grid):
    ref, got = _slice(grid), _slice(np_grid)
    assert got.coords == ref.coords
    assert _json(got) == _json(ref)


def test_landscape_grid_meaning():
    assert _slice(np.int64(3)).coords == [[-1.0, 0.0, 1.0]] * 2
    assert _slice(np.float64(3.0)).coords == [[3.0]] * 2
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="grid must be an int"):
            _slice(bad)
    with pytest.raises(ValueError, match="grid must be an int >= 2"):
        _slice(np.int64(1))


@pytest.mark.parametrize("np_int", NP_INTS)
def test_landscape_slice_interpolate_barrier(np_int):
    kw = dict(chunk_size=2, n_batches=1, seed=1)
    ref, got = _slice(3, **kw), _slice(np_int(3), **{k: np_int(v) for k, v in kw.items()})
    assert _json(got) == _json(ref)
    _assert_python_ints(got.settings, "chunk_size", "n_batches", "seed")
    a, b, batch = cases.mlp(0, (5, 6, 4)), cases.mlp(1, (5, 6, 4)), _batches()[0]
    ref = L.interpolate(a, b, batch, 5, chunk_size=2, seed=0)
    got = L.interpolate(a, b, batch, np_int(5), chunk_size=np_int(2), seed=np_int(0))
    assert got.t == ref.t and _json(got) == _json(ref)
    _assert_python_ints(got.settings, "seed")
    ref, got = L.loss_barrier([a, b], batch, 3), L.loss_barrier([a, b], batch, np_int(3))
    assert _json(got) == _json(ref)


# ----------------------------------------------------------------------
# flatness.diversity
# ----------------------------------------------------------------------


@pytest.mark.parametrize("np_int", NP_INTS)
def test_diversity(np_int):
    for seed in (3, 2**40):  # (a NumPy seed * 1_000_003 would wrap around in int64)
        ref = dv.random_split(20, 1, 0.3, seed=seed)
        got = dv.random_split(np_int(20), np_int(1), np.float32(0.3), seed=np.int64(seed))
        assert all(torch.equal(x, y) for x, y in zip(got, ref, strict=True))
    scores = torch.arange(24, dtype=torch.float64).reshape(3, 8).flip(1)
    ref, got = dv.sharpbalance_split(scores, 1, 0.25), dv.sharpbalance_split(scores, np_int(1), np.float64(0.25))
    assert all(torch.equal(x, y) for x, y in zip(got, ref, strict=True))
    ref = dv.per_sample_sharpness(_model(), _batches(), trials=2, chunk_size=3)
    assert torch.equal(dv.per_sample_sharpness(_model(), _batches(), trials=np_int(2), chunk_size=np_int(3)), ref)
    members = [cases.mlp(0, (5, 6, 4)), cases.mlp(1, (5, 6, 4))]
    ref, got = dv.ensemble_metrics(members, _batches(), n_bins=5), dv.ensemble_metrics(members, _batches(), n_bins=np_int(5))
    assert _json(got) == _json(ref) and type(got.n_bins) is int


# ----------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------


def _tiny():
    return cases.mlp(0, (5, 3))


REFUSING = {
    "sharpness n_iters": (lambda v: flatness.sharpness(_tiny(), _batches()[0], kind="linf", rho=0.1, n_iters=v),
                          ValueError),
    "top_eigenvalues k": (lambda v: hessian.top_eigenvalues(_tiny(), _batches()[0], k=v), ValueError),
    "top_eigenvalues seed": (lambda v: hessian.top_eigenvalues(_tiny(), _batches()[0], seed=v), TypeError),
    "trace n_samples": (lambda v: hessian.trace(_tiny(), _batches()[0], method="hutchinson", n_samples=v),
                        ValueError),
    "gradient_variance batch_size": (lambda v: nu.gradient_variance(_tiny(), _batches()[0], batch_size=v),
                                     ValueError),
    "gradient_variance n_batches": (lambda v: nu.gradient_variance(_tiny(), _batches()[0], n_batches=v),
                                    ValueError),
    "directions k": (lambda v: L.directions(_tiny(), k=v), ValueError),
    "slice chunk_size": (lambda v: L.slice(_tiny(), _batches()[0], L.directions(_tiny(), k=1), 3, chunk_size=v),
                         ValueError),
    "random_split member": (lambda v: dv.random_split(10, v, 0.5), ValueError),
    "random_split seed": (lambda v: dv.random_split(10, 0, 0.5, seed=v), TypeError),
    "ensemble_metrics n_bins": (lambda v: dv.ensemble_metrics([_tiny()], _batches()[0], n_bins=v), ValueError),
    "LookSAM k": (lambda v: LookSAM(_tiny().parameters(), torch.optim.SGD, k=v, lr=0.1), ValueError),
    "ConsistentSAM update_freq": (lambda v: ConsistentSAM(_tiny().parameters(), torch.optim.SGD, update_freq=v,
                                                          lr=0.1), ValueError),
    "MESA start_step": (lambda v: MESA(_tiny().parameters(), torch.optim.SGD, model=_tiny(), start_step=v, lr=0.1),
                        ValueError),
    "BayesianSAM num_data": (lambda v: BayesianSAM(_tiny().parameters(), num_data=v), ValueError),
    "ESAM seed": (lambda v: ESAM(_tiny().parameters(), torch.optim.SGD, seed=v, lr=0.1), TypeError),
}


@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
@pytest.mark.parametrize("what", sorted(REFUSING))
def test_bools_and_floats_still_refused(what, bad):
    fn, err = REFUSING[what]
    with pytest.raises(err):
        fn(bad)


# ----------------------------------------------------------------------
# flatness.optim: same steps, Python numbers in param_groups / state_dict
# ----------------------------------------------------------------------


def _weights_only_roundtrip(opt) -> dict:
    """``opt.state_dict()`` holds no NumPy scalar and loads with
    ``torch.load(weights_only=True)``."""
    state = opt.state_dict()
    assert _plain_numbers(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train(make, steps=3):
    model = cases.sam_mlp()
    opt = make(model)
    x, y = cases.sam_data()
    for _ in range(steps):
        opt.step(cases.closure_for(model, opt, x, y, zero_grad=True))
    return model, opt


def _plain_numbers(obj) -> bool:
    if isinstance(obj, dict):
        return all(_plain_numbers(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_plain_numbers(v) for v in obj)
    return type(obj).__module__ != "numpy"


def test_sam_settings_are_python_floats():
    model = cases.sam_mlp()
    head = list(model.parameters())
    opt = SAM([{"params": head[:2], "sam_rho": np.float32(0.25)}, {"params": head[2:]}], torch.optim.SGD,
              rho=np.float64(0.05), eta=np.int64(0), lr=0.1)
    assert type(opt.defaults["sam_rho"]) is float and type(opt.defaults["sam_eta"]) is float
    assert opt.param_groups[0]["sam_rho"] == float(np.float32(0.25))
    assert all(type(g[k]) is float for g in opt.param_groups for k in ("sam_rho", "sam_eta"))
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "sam_rho": np.float64(0.5)})
    assert type(opt.param_groups[-1]["sam_rho"]) is float
    _weights_only_roundtrip(opt)
    gsam = GSAM(cases.sam_mlp().parameters(), torch.optim.SGD, alpha=np.float64(0.2), rho_min=np.float32(0.01),
                lr=0.1)
    assert all(type(gsam.param_groups[0][k]) is float for k in ("sam_alpha", "sam_rho_min", "sam_lr_min"))
    _weights_only_roundtrip(gsam)


@pytest.mark.parametrize("np_int", NP_INTS)
def test_sam_family_int_options(np_int):
    makers = {
        "LookSAM": (lambda k: lambda m: LookSAM(m.parameters(), torch.optim.SGD, k=k, alpha=np.float64(0.7),
                                                lr=0.1), 2, "k"),
        "ConsistentSAM": (lambda f: lambda m: ConsistentSAM(m.parameters(), torch.optim.SGD, preconditioner="kfac",
                                                            model=m, update_freq=f, lr=0.1), 2, "update_freq"),
        "MESA": (lambda s: lambda m: MESA(m.parameters(), torch.optim.SGD, model=m, start_step=s, lr=0.1),
                 1, "start_step"),
        "BayesianSAM": (lambda n: lambda m: BayesianSAM(m.parameters(), num_data=n, lr=np.float64(0.05),
                                                        betas=(np.float32(0.5), 0.9), seed=np_int(7)),
                        50, "num_data"),
    }
    for name, (make, value, attr) in makers.items():
        ref_model, _ = _train(make(value))
        model, opt = _train(make(np_int(value)))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters(), strict=True)), name
        assert type(getattr(opt, attr)) is int, name
        _weights_only_roundtrip(opt)
    bsam = BayesianSAM(cases.sam_mlp().parameters(), num_data=np_int(50), lr=np.float64(0.05),
                       betas=(np.float32(0.5), 0.9))
    group = bsam.param_groups[0]
    assert type(group["lr"]) is float and all(type(b) is float for b in group["betas"])
    a = ESAM(cases.sam_mlp().parameters(), torch.optim.SGD, seed=np_int(3), lr=0.1)
    b = ESAM(cases.sam_mlp().parameters(), torch.optim.SGD, seed=3, lr=0.1)
    extra = [o.state_dict()["sharpness_aware"]["extra"]["generator"] for o in (a, b)]
    assert torch.equal(*extra)


def test_base_optimizer_arguments_are_stored_as_python_numbers():
    # SAM builds the base optimizer from its keyword arguments; a NumPy
    # scalar there (lr from a grid, Adam's betas from a config) was stored
    # as is in the param groups, and the state_dict then failed
    # torch.load(weights_only=True).
    model, opt = _train(lambda m: SAM(m.parameters(), torch.optim.Adam, lr=np.float32(1e-3),
                                      betas=(np.float64(0.9), np.float64(0.99)),
                                      base_kwargs={"weight_decay": np.float64(1e-4)}))
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == float(np.float32(1e-3))
    assert all(type(b) is float for b in group["betas"]) and type(group["weight_decay"]) is float
    _weights_only_roundtrip(opt)
    # the same steps as with the Python numbers
    ref_model, _ = _train(lambda m: SAM(m.parameters(), torch.optim.Adam, lr=float(np.float32(1e-3)),
                                        betas=(0.9, 0.99), weight_decay=1e-4))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)

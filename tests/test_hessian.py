"""flatness.hessian public API against dense float64 Hessians."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cases import (
    DT,
    assert_unchanged,
    classification_batches,
    cnn,
    counting_loss,
    dense_hessian,
    mlp,
    snapshot,
)
from torch import nn

import flatness
from flatness import hessian


@pytest.mark.parametrize("max_basis", [None, 5], ids=["basis", "bounded_basis"])
def test_top3_eigenvalues_match_dense(curvature_case, max_basis):
    # max_basis=5: thick restarts keep the basis at 5 blocks; the eigenpairs
    # are those of the dense Hessian, as without a bound
    make, shape, classes = curvature_case
    model = make()
    batches = classification_batches((7, 5), shape, classes)
    H = dense_hessian(model, batches)
    evals, evecs = torch.linalg.eigh(H)
    before = snapshot(model)
    res = hessian.top_eigenvalues(model, batches, k=3, tol=1e-8, max_basis=max_basis, max_iter=2000)
    assert_unchanged(model, before)
    assert res.converged and res.settings["max_basis"] == max_basis
    if max_basis is not None:
        assert res.n_iter > max_basis  # it restarted
    want = evals.flip(0)[:3]
    assert torch.allclose(res.eigenvalues, want, rtol=1e-6, atol=0)
    # eigenvectors come back parameter-shaped, unit norm, aligned with dense ones
    params = list(model.parameters())
    for i in range(3):
        vec = res.eigenvectors[i]
        assert [v.shape for v in vec] == [p.shape for p in params]
        flat = torch.cat([v.reshape(-1) for v in vec])
        assert abs(float(flat @ evecs[:, -1 - i])) == pytest.approx(1.0, abs=1e-6)
    assert res.n_hvp == res.n_iter  # block size 1
    assert res.names == [n for n, _ in model.named_parameters()]


def test_top_eigenvalues_block_ggn_and_which():
    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((9,), (5,), 4)
    H = dense_hessian(model, batches)
    evals = torch.linalg.eigvalsh(H)
    r = hessian.top_eigenvalues(model, batches, k=2, block_size=3, tol=1e-8)
    assert torch.allclose(r.eigenvalues, evals.flip(0)[:2], rtol=1e-6)
    assert r.n_hvp == 3 * r.n_iter
    r = hessian.top_eigenvalues(model, batches, k=1, which="SA", tol=1e-8)
    assert r.eigenvalues[0].item() == pytest.approx(evals[0].item(), rel=1e-6)
    op = hessian.CurvatureOperator(model, batches, curvature="ggn")
    G = op.matmat(torch.eye(op.shape[0], dtype=DT))
    r = hessian.top_eigenvalues(model, batches, k=1, curvature="ggn", tol=1e-8)
    assert r.eigenvalues[0].item() == pytest.approx(torch.linalg.eigvalsh(G)[-1].item(), rel=1e-6)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_unbiased_over_seeds(method):
    model = mlp(sizes=(5, 6, 4))
    batches = classification_batches((6, 5), (5,), 4)
    exact = float(torch.trace(dense_hessian(model, batches)))
    values, errors = [], []
    for seed in range(25):
        r = hessian.trace(model, batches, method=method, n_samples=12, seed=seed)
        values.append(r.value)
        errors.append(r.std_error)
        assert r.n_hvp == 12
    t = torch.tensor(values, dtype=DT)
    spread = float(t.std())
    assert abs(float(t.mean()) - exact) <= 3 * spread / math.sqrt(len(values))
    assert 0.4 <= sum(errors) / len(errors) / spread <= 2.5
    assert hessian.trace(model, batches, method="exact").value == pytest.approx(exact, rel=1e-10)


def test_spectral_density_moments_and_mass():
    model = mlp(sizes=(4, 6, 3))
    batches = classification_batches((6, 4), (4,), 3)
    H = dense_hessian(model, batches)
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    d = hessian.spectral_density(model, batches, n_vectors=8, n_steps=16, seed=0)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    assert d.n_hvp == 8 * 16
    for p in (1, 2, 3):
        per_vector = (d.weights * d.nodes**p).sum(1)
        se = float(per_vector.std() / math.sqrt(len(per_vector)))
        want = float(torch.trace(torch.linalg.matrix_power(H, p))) / n
        assert abs(d.moment(p) - want) <= 4 * se + 1e-12 * abs(want), p
    # the extreme nodes bracket the spectrum's ends closely
    assert float(d.nodes.max()) == pytest.approx(float(ev[-1]), rel=1e-6)
    json.loads(d.to_json())


def test_spectral_density_plot_helper():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = mlp()
    d = hessian.spectral_density(model, classification_batches((6,), (5,), 4)[0], n_vectors=2, n_steps=8)
    ax = d.plot()
    assert ax.get_xlabel() == "eigenvalue"


def test_results_serialize_and_seed_reproducible_with_global_rng_untouched():
    model = mlp()
    batch = classification_batches((8,), (5,), 4)[0]
    state = torch.get_rng_state()
    a = hessian.trace(model, batch, seed=3)
    b = hessian.trace(model, batch, seed=3)
    c = hessian.trace(model, batch, seed=4)
    e = hessian.top_eigenvalues(model, batch, k=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.value == b.value and a.value != c.value
    d = json.loads(e.to_json())
    assert "eigenvectors" not in d and len(d["eigenvalues"]) == 2 and d["n_hvp"] == e.n_hvp
    assert json.loads(a.to_json())["method"] == "hutch++"


def test_model_restored_and_errors_raised_before_anything_changes():
    model = cnn()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[4].bias.requires_grad_(False)
    batches = classification_batches((5, 3), (1, 6, 6), 3)
    snap = snapshot(model)
    hessian.top_eigenvalues(model, batches, k=2, max_iter=6)
    hessian.trace(model, batches, n_samples=4)
    hessian.spectral_density(model, batches, n_vectors=1, n_steps=4)
    hessian.hvp(model, batches, [torch.ones_like(p) for p in model.parameters() if p.requires_grad])
    assert_unchanged(model, snap)
    bad = [
        (dict(k=0), ValueError, "k must"),
        (dict(k=10_000), ValueError, "exceeds"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(which="XX"), ValueError, "which"),
        (dict(curvature="fisher"), ValueError, "curvature"),
        (dict(params=["nope"]), ValueError, "unknown parameter"),
    ]
    for kwargs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            hessian.top_eigenvalues(model, batches, **kwargs)
    with pytest.raises(ValueError, match="method"):
        hessian.trace(model, batches, method="magic")
    with pytest.raises(ValueError, match="n_samples"):
        hessian.trace(model, batches, n_samples=3)
    with pytest.raises(TypeError, match="re-iterable"):
        hessian.trace(model, iter(batches))
    with pytest.raises(ValueError, match="no batches"):
        hessian.trace(model, [])

    def boom(z, y):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hessian.top_eigenvalues(model, batches, loss_fn=boom)
    assert_unchanged(model, snap)


def test_params_selection_and_eval_mode_batchnorm():
    model = cnn()
    batches = classification_batches((6,), (1, 6, 6), 3)
    head = model[4]
    r = hessian.top_eigenvalues(model, batches, k=1, params=[head], tol=1e-9)
    H = dense_hessian(model, batches)
    n_head = head.weight.numel() + head.bias.numel()
    block = H[-n_head:, -n_head:]
    assert r.eigenvalues[0].item() == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-6)
    # training mode uses batch statistics: a different Hessian
    t_train = hessian.trace(model, batches, method="exact", train=True).value
    t_eval = hessian.trace(model, batches, method="exact").value
    assert t_eval == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert abs(t_train - t_eval) > 1e-6 * abs(t_eval)


def test_sharpness_kinds_match_hessian_functions():
    model = mlp(sizes=(5, 6, 4), act=nn.ReLU)
    batches = classification_batches((6, 5), (5,), 4)
    r = flatness.sharpness(model, batches, kind="hessian_max_eig", seed=1)
    assert r.value == hessian.top_eigenvalues(model, batches, seed=1).eigenvalues[0].item()
    assert r.counts["hvp"] > 0 and r.rho is None and r.batch_sizes == [11]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert r.clean_loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    r = flatness.sharpness(model, batches, kind="hessian_trace", seed=2, method="hutchinson", n_samples=10)
    t = hessian.trace(model, batches, seed=2, method="hutchinson", n_samples=10)
    assert r.value == t.value and r.settings["std_error"] == t.std_error
    r = flatness.sharpness(model, batches, kind="minimum", seed=0, method="exact")
    assert r.value == hessian.minimum_sharpness(model, batches, method="exact").value
    json.loads(r.to_json())


def test_matches_curvlinops():
    curvlinops = pytest.importorskip("curvlinops")
    model = mlp(sizes=(5, 6, 4))
    batches = classification_batches((6, 5, 3), (5,), 4)
    params = [p for p in model.parameters()]
    ours = hessian.CurvatureOperator(model, batches)
    eye = torch.eye(ours.shape[0], dtype=DT)
    loss = nn.CrossEntropyLoss()
    for cls, curvature in ((curvlinops.HessianLinearOperator, "hessian"), (curvlinops.GGNLinearOperator, "ggn")):
        theirs = cls(model, loss, params, batches, check_deterministic=False)
        ref = torch.as_tensor(theirs.to_scipy() @ eye.numpy()) if hasattr(theirs, "to_scipy") else theirs @ eye
        mine = hessian.CurvatureOperator(model, batches, curvature=curvature).matmat(eye)
        assert torch.allclose(mine, ref.to(DT), atol=1e-10), curvature


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_top_eigenvalues_and_trace():
    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((7, 5), (5,), 4)
    cpu = hessian.top_eigenvalues(model, batches, k=2, tol=1e-8)
    gpu = hessian.top_eigenvalues(model.cuda(), batches, k=2, tol=1e-8)
    assert torch.allclose(cpu.eigenvalues, gpu.eigenvalues, rtol=1e-6)
    assert gpu.eigenvectors[0][0].is_cuda
    assert hessian.trace(model, batches, method="exact").value == pytest.approx(
        hessian.trace(model.cpu(), batches, method="exact").value, rel=1e-10
    )


def test_progress_bars_count_products(capsys):
    pytest.importorskip("tqdm")
    model = mlp()
    batch = classification_batches((6,), (5,), 4)[0]
    r = hessian.trace(model, batch, n_samples=6, progress=True)
    e = hessian.top_eigenvalues(model, batch, progress=True, max_iter=5)
    m = hessian.minimum_sharpness(mlp(act=nn.ReLU), batch, method="hutchinson", n_samples=4, progress=True)
    err = capsys.readouterr().err
    assert "trace" in err and "lanczos" in err and "minimum sharpness" in err
    # Hutchinson for minimum sharpness probes each of the 4 parameter tensors
    assert f"{r.n_hvp}/6" in err and f"{m.n_hvp}/{4 * 4}" in err and e.n_hvp <= 5
    g = hessian.minimum_sharpness(mlp(act=nn.ReLU), batch, progress=True)
    assert "6/6 [" in capsys.readouterr().err and g.n_backward == 6 * 4  # samples


def test_top_eigenvalues_memory_saving_modes_match_dense(curvature_case):
    make, shape, classes = curvature_case
    model = make()
    batches = classification_batches((7, 5), shape, classes)
    H = dense_hessian(model, batches)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    scale = float(want.abs().max())
    f32 = hessian.top_eigenvalues(model, batches, k=3, tol=1e-5, basis_dtype=torch.float32, basis_device="cpu")
    assert f32.converged and torch.allclose(f32.eigenvalues, want, rtol=0, atol=1e-5 * scale)
    assert f32.settings["basis_dtype"] == "float32"
    lean = hessian.top_eigenvalues(model, batches, k=3, tol=1e-8, low_memory=True)
    assert lean.converged and lean.eigenvectors == []
    assert torch.allclose(lean.eigenvalues, want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="block_size"):
        hessian.top_eigenvalues(model, batches, k=2, block_size=2, low_memory=True)
    with pytest.raises(ValueError, match="basis_dtype"):
        hessian.top_eigenvalues(model, batches, basis_dtype=torch.float16)


def test_top_eigenvalues_warns_before_a_basis_that_may_not_fit(monkeypatch):
    # the worst case (max_iter blocks) against the memory free now: a
    # warning before any product, naming the ways to bound it; none once
    # max_basis (or low_memory) bounds it below what is free
    import warnings

    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((7,), (5,), 4)
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(hessian, "_free_memory", lambda device: 10 * 8 * n)  # ten float64 vectors
    with pytest.warns(RuntimeWarning, match=r"may grow to .* max_basis=") as record:
        hessian.top_eigenvalues(model, batches, k=1, max_iter=30)
    assert record[0].filename == __file__  # (at the caller)
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning):
            hessian.top_eigenvalues(model, batches, k=1, max_iter=30, loss_fn=counting_loss(calls))
    assert calls == []  # before any product
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hessian.top_eigenvalues(model, batches, k=1, max_iter=30, max_basis=8)
        hessian.top_eigenvalues(model, batches, k=1, max_iter=9)
        hessian.top_eigenvalues(model, batches, k=1, max_iter=30, low_memory=True)


def test_top_eigenvalues_max_basis_is_checked():
    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((7,), (5,), 4)
    with pytest.raises(ValueError, match="max_basis=3 blocks of 1 cannot hold the k=3"):
        hessian.top_eigenvalues(model, batches, k=3, max_basis=3)
    with pytest.raises(ValueError, match="a block from each end of the spectrum.*at least 7"):
        hessian.top_eigenvalues(model, batches, k=3, max_basis=6, which="LM")
    with pytest.raises(ValueError, match="low_memory=True stores none"):
        hessian.top_eigenvalues(model, batches, k=1, max_basis=4, low_memory=True)
    with pytest.raises(ValueError, match="max_basis must be an int"):
        hessian.top_eigenvalues(model, batches, k=1, max_basis=4.5)


def test_low_memory_lanczos_in_float32_matches_dense_float64():
    # low_memory=True keeps its recurrence vectors in the parameters' dtype
    # by default: a float32 model's top eigenvalues agree with the dense
    # float64 Hessian of the same weights to float32's resolution
    import copy

    model64 = mlp(sizes=(6, 12, 10, 4))
    batches = classification_batches((9, 7), (6,), 4)
    want = torch.linalg.eigvalsh(dense_hessian(model64, batches)).flip(0)[:3]
    model32 = copy.deepcopy(model64).float()
    batches32 = [(x.float(), y) for x, y in batches]
    lean = hessian.top_eigenvalues(model32, batches32, k=3, tol=1e-5, low_memory=True)
    assert lean.settings["basis_dtype"] == "float32" and lean.converged
    scale = float(want.abs().max())
    assert torch.allclose(lean.eigenvalues, want, rtol=0, atol=2e-5 * scale), (lean.eigenvalues, want)
    # float64 vectors on request: the same eigenvalues
    wide = hessian.top_eigenvalues(model32, batches32, k=3, tol=1e-5, low_memory=True, basis_dtype=torch.float64)
    assert wide.settings["basis_dtype"] == "float64"
    assert torch.allclose(wide.eigenvalues, lean.eigenvalues, rtol=0, atol=2e-5 * scale)
    # the stored basis keeps its float64 default
    assert hessian.top_eigenvalues(model32, batches32, k=1, max_iter=3).settings["basis_dtype"] == "float64"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_memory_lanczos_at_half_precision_keeps_close_eigenvalues_apart(dtype):
    # Copies of a converged eigenvalue used to be merged within sqrt(eps):
    # 9% of the scale in bfloat16, which merged this MLP's top two (0.470
    # and 0.448) and returned one value for k=3; float16's 3% let the
    # unconverged copies through.  At half precision the copies agree to a
    # fraction of eps.  (tol=1e-2: the residuals of a recurrence in half
    # precision stop near eps * scale.)
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    batch = (torch.randn(256, 20), torch.randint(0, 5, (256,)))
    want = hessian.top_eigenvalues(model, batch, k=3).eigenvalues
    low = hessian.top_eigenvalues(copy.deepcopy(model).to(dtype), batch, k=3, tol=1e-2, low_memory=True)
    assert low.converged and low.eigenvalues.shape == (3,)
    assert torch.allclose(low.eigenvalues, want, rtol=2e-3, atol=0), (low.eigenvalues, want)


def test_low_memory_lanczos_at_half_precision_warns_of_possible_copies():
    # Without a basis, copies of an eigenvalue are told apart from distinct
    # eigenvalues by how closely they agree; in half precision a copy still
    # converging can sit about an eps from the value.  This attention
    # layer's top three came back as 1.6696, 1.6687, 1.1411 in float16
    # (float32: 1.6692, 1.1413, 0.7124), converged.  (Before the products
    # added a weight's two parts in the vectors' float32, see
    # _products._LeanGradientGraph, seed 0 gave such copies in bfloat16 and
    # float16; it no longer does.)  Values closer than eps * scale warn.
    import copy
    import warnings

    import zoo

    torch.manual_seed(1)
    model = zoo.TransformerClassifier(dropout=0.0).eval()
    batch = (torch.randn(8, 4, 4), torch.randint(0, 3, (8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = hessian.top_eigenvalues(model, batch, k=3, tol=1e-2, low_memory=True)
    assert ref.eigenvalues[0] - ref.eigenvalues[1] > 0.5
    with pytest.warns(RuntimeWarning, match="may be one eigenvalue counted twice") as rec:
        hessian.top_eigenvalues(copy.deepcopy(model).half(), batch, k=3, tol=1e-2, low_memory=True)
    assert rec[0].filename == __file__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copy_warning_threshold_is_the_dtypes_rounding(dtype):
    # the check itself: values closer than eps * max|lambda| warn (a
    # bfloat16 layer's copy 3.7545 / 3.7385 was one), distinct ones do not
    import warnings

    from flatness.hessian import _warn_if_copies

    eps = torch.finfo(dtype).eps
    with pytest.warns(RuntimeWarning, match="counted twice"):
        _warn_if_copies(torch.tensor([4.0, 4.0 * (1 - 0.6 * eps), 1.3], dtype=torch.float64), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_copies(torch.tensor([4.0, 4.0 * (1 - 1.5 * eps), 1.3], dtype=torch.float64), dtype)


def test_trace_estimate_does_not_depend_on_batch():
    # The random vectors are drawn one by one whatever the pass size, so the
    # pass size is a memory / speed setting only.  Reference: the quadratic
    # forms z^T H z with the dense Hessian and the same signs.
    from flatness._lanczos import rademacher
    from flatness._rng import private_rng

    model = mlp()
    batches = classification_batches((6,), (5,), 4)
    H = dense_hessian(model, batches)
    n, m = H.shape[0], 10
    with private_rng(5, torch.device("cpu")) as gen:
        Z = rademacher(n, m, generator=gen, dtype=DT)
    forms = (Z * (H @ Z)).sum(0)
    for b in (1, 3, 8, 10):
        r = hessian.trace(model, batches, method="hutchinson", n_samples=m, seed=5, batch=b)
        assert r.settings["batch"] == b
        assert torch.allclose(r.samples, forms, rtol=1e-10, atol=1e-12), b
        assert r.value == pytest.approx(float(forms.mean()), rel=1e-10)
    pp = [hessian.trace(model, batches, n_samples=9, seed=5, batch=b).value for b in (1, 2, 9)]
    assert pp[1] == pytest.approx(pp[0], rel=1e-9) and pp[2] == pytest.approx(pp[0], rel=1e-9)


def test_trace_default_batch_follows_the_engine():
    # one batch: the double-backward engine keeps the graph and runs one
    # backward per vector, so one vector per pass; a re-streamed loader
    # (more batches than are kept) gets 8 per pass
    model = mlp()
    one = classification_batches((6,), (5,), 4)
    assert hessian.trace(model, one, n_samples=4).settings["batch"] == 1
    many = classification_batches((2,) * 6, (5,), 4)
    assert hessian.trace(model, many, n_samples=4).settings["batch"] == 8
    assert hessian.trace(model, one, n_samples=4, engine="forward-over-reverse").settings["batch"] == 8


def test_trace_hutchpp_default_sketch_is_one_vector():
    # the default holds one sketch vector whatever n_samples (at most a
    # third of them), and is the estimate of sketch=1
    model = mlp(sizes=(5, 6, 4))
    batches = classification_batches((6, 5), (5,), 4)
    for n_samples, want in ((4, 1), (12, 1), (90, 1)):
        r = hessian.trace(model, batches, n_samples=n_samples, seed=3)
        assert r.settings["sketch"] == want and r.n_hvp == n_samples
        assert r.value == hessian.trace(model, batches, n_samples=n_samples, seed=3, sketch=1).value


def test_trace_hutchpp_sketch_bounds_the_sketch():
    # the sketch size is a memory setting: any size is unbiased, so on a
    # small model with many samples every size lands near the dense trace
    model = mlp()
    batches = classification_batches((6,), (5,), 4)
    exact = float(torch.trace(dense_hessian(model, batches)))
    n = sum(p.numel() for p in model.parameters())
    for sketch in (0, 1, 5):
        r = hessian.trace(model, batches, n_samples=2 * n, sketch=sketch, seed=1)
        assert r.settings["sketch"] == sketch and r.n_hvp == 2 * n
        assert r.value == pytest.approx(exact, abs=4 * r.std_error + 1e-9 * abs(exact))
    # a sketch of the whole space makes the estimate exact
    full = hessian.trace(model, batches, n_samples=2 * n + 2, sketch=n, seed=1)
    assert full.value == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="sketch"):
        hessian.trace(model, batches, n_samples=10, sketch=5)
    with pytest.raises(ValueError, match="sketch"):
        hessian.trace(model, batches, method="hutchinson", n_samples=10, sketch=1)


def test_embedding_bag_is_refused_for_curvature_naming_the_module():
    # PyTorch implements neither double backward nor forward-mode AD through
    # embedding_bag: refused up front; leaving the bag's weight out works
    class BagModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = torch.nn.EmbeddingBag(9, 4, mode="mean")
            self.head = torch.nn.Linear(4, 3)

        def forward(self, tokens):
            return self.head(torch.tanh(self.bag(tokens)))

    torch.manual_seed(0)
    model = BagModel().to(DT)
    batch = (torch.randint(0, 9, (6, 3)), torch.randint(0, 3, (6,)))
    for call in (lambda **kw: hessian.trace(model, batch, method="exact", **kw),
                 lambda **kw: hessian.top_eigenvalues(model, batch, k=1, **kw)):
        with pytest.raises(ValueError, match=r"second derivatives.*bag \(EmbeddingBag\).*params="):
            call()
    head_only = hessian.trace(model, batch, method="exact", params=model.head.parameters()).value
    h = torch.autograd.functional.hessian(
        lambda w, b: F.cross_entropy(F.linear(torch.tanh(model.bag(batch[0])).detach(), w, b), batch[1]),
        (model.head.weight.detach(), model.head.bias.detach()))
    assert head_only == pytest.approx(float(h[0][0].reshape(12, 12).trace() + h[1][1].trace()), rel=1e-10)


def _mse(z, y):
    return ((z - y) ** 2).sum(1).mean()


def _linear_with_spectrum(eigenvalues, seed=0):
    """A linear model whose MSE Hessian ``2/N X^T X`` has the given
    eigenvalues (with their multiplicities), and one batch."""
    d = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=g))
    x = (d / 2) ** 0.5 * torch.diag(torch.tensor(eigenvalues, dtype=DT).sqrt()) @ Q.T
    model = nn.Linear(d, 1, bias=False).to(DT)
    return model, (x, torch.randn(d, 1, dtype=DT, generator=g))


@pytest.mark.parametrize("eigenvalues, block_size", [
    ([5.0] + [2.0] * 6 + [1.0] * 5, 2),  # the block Krylov space loses a column after 2 steps
    ([5.0, 4.0] + [2.0] * 6 + [1.0] * 5, 3),  # ... two columns after 2 steps
])
def test_block_lanczos_claims_convergence_only_when_accurate(eigenvalues, block_size):
    model, batch = _linear_with_spectrum(eigenvalues)
    H = dense_hessian(model, [batch], loss_fn=_mse)  # independent float64 reference
    assert torch.allclose(torch.linalg.eigvalsh(H), torch.tensor(sorted(eigenvalues), dtype=DT), atol=1e-12)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    tol = 1e-8
    r = hessian.top_eigenvalues(model, batch, k=3, block_size=block_size, loss_fn=_mse, tol=tol)
    # the reported residuals are those of the returned pairs
    for lam, vec, res in zip(r.eigenvalues, r.eigenvectors, r.residuals):
        y = torch.cat([v.reshape(-1) for v in vec])
        assert float(torch.linalg.norm(H @ y - lam * y)) == pytest.approx(float(res), abs=1e-10)
    assert r.converged  # (the vanishing column restarts from a random vector)
    assert float(r.residuals.max()) <= tol * float(r.eigenvalues.abs().max())
    assert torch.allclose(r.eigenvalues, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("eigenvalues, k", [
    ([1.5] * 8, 3),                          # the Hessian is a multiple of the identity
    ([2.0, 0.5] + [0.0] * 7, 4),             # rank-deficient: fewer samples than features
    ([3.0] + [1.0] * 4 + [0.25] * 4, 4),     # fewer distinct eigenvalues than k
])
def test_top_eigenvalues_returns_k_values_when_the_hessian_has_fewer_distinct_ones(eigenvalues, k, block_size):
    model, batch = _linear_with_spectrum(eigenvalues, seed=3)
    H = dense_hessian(model, [batch], loss_fn=_mse)  # independent float64 reference
    want = torch.linalg.eigvalsh(H).flip(0)[:k]
    r = hessian.top_eigenvalues(model, batch, k=k, block_size=block_size, loss_fn=_mse, tol=1e-10)
    assert r.converged and len(r.eigenvalues) == k and len(r.eigenvectors) == k
    assert torch.allclose(r.eigenvalues, want, rtol=0, atol=1e-10), (r.eigenvalues, want)
    Y = torch.stack([torch.cat([v.reshape(-1) for v in vec]) for vec in r.eigenvectors], dim=1)
    assert torch.allclose(Y.T @ Y, torch.eye(k, dtype=DT), atol=1e-10)
    assert torch.allclose(H @ Y, Y * r.eigenvalues, atol=1e-9)


@pytest.mark.parametrize("low_memory, block_size", [(False, 1), (False, 2), (True, 1)])
def test_too_few_lanczos_steps_for_k_is_refused_up_front(low_memory, block_size):
    model = mlp()
    batches = classification_batches((6,), (5,), 4)
    snap = snapshot(model)
    calls = []
    counting = counting_loss(calls)

    with pytest.raises(ValueError, match="max_iter"):
        hessian.top_eigenvalues(model, batches, k=5, max_iter=2, block_size=block_size,
                                low_memory=low_memory, loss_fn=counting)
    with pytest.raises(ValueError, match="max_iter"):
        flatness.sharpness(model, batches, kind="hessian_max_eig", max_iter=0, loss_fn=counting)
    assert calls == []
    assert_unchanged(model, snap)


@pytest.mark.parametrize("seed, exc", [("x", TypeError), (1.5, TypeError), (True, TypeError), (2**70, ValueError)])
def test_a_bad_seed_is_refused_before_any_work(seed, exc):
    model = mlp(sizes=(4, 6, 3), act=nn.ReLU)
    batches = classification_batches((6,), (4,), 3)
    snap = snapshot(model)
    calls = []
    counting = counting_loss(calls)

    for fn, kwargs in [
        (hessian.top_eigenvalues, {}),
        (hessian.trace, {}),
        (hessian.trace, {"method": "exact"}),
        (hessian.spectral_density, {}),
        (hessian.minimum_sharpness, {}),
        (hessian.minimum_sharpness, {"method": "hutchinson"}),
        (hessian.CurvatureOperator, {}),
    ]:
        with pytest.raises(exc, match="seed"):
            fn(model, batches, seed=seed, loss_fn=counting, **kwargs)
    with pytest.raises(exc, match="seed"):
        flatness.sharpness(model, batches, kind="hessian_max_eig", seed=seed, loss_fn=counting)
    assert calls == []
    assert_unchanged(model, snap)


def test_spectral_density_low_memory_and_float32_basis_give_the_same_density():
    # The three-term recurrence (no basis) splits converged nodes into ghost
    # copies whose weights add up: after smoothing the density is the
    # reorthogonalized run's to rounding; a float32 basis to float32's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    batch = (torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,)))
    full = hessian.spectral_density(model, batch, n_vectors=2, n_steps=80)
    lean = hessian.spectral_density(model, batch, n_vectors=2, n_steps=80, low_memory=True)
    half = hessian.spectral_density(model, batch, n_vectors=2, n_steps=80, basis_dtype=torch.float32)
    assert full.settings["low_memory"] is False and full.settings["basis_dtype"] == "float64"
    assert lean.settings["low_memory"] is True and lean.settings["basis_dtype"] == "float64"  # the parameters'
    peak = float(full.density.max())
    assert torch.allclose(lean.grid, full.grid, rtol=1e-9, atol=1e-12)
    assert float((lean.density - full.density).abs().max()) <= 1e-5 * peak
    assert float((half.density - full.density).abs().max()) <= 1e-3 * peak
    with pytest.raises(ValueError, match="basis_dtype"):
        hessian.spectral_density(model, batch, basis_dtype=torch.float16)
    with pytest.raises(TypeError, match="low_memory"):
        hessian.spectral_density(model, batch, low_memory="yes")


def test_a_summed_loss_over_several_batches_is_refused():
    # each batch's curvature is weighted by its share of the samples: right
    # for a mean loss, a third of the summed loss's trace on 4, 4, 4 samples
    from flatness.nonuniformity import kfac_variance

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    summed = nn.CrossEntropyLoss(reduction="sum")
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    for call in (lambda d, **kw: hessian.trace(model, d, loss_fn=summed, method="exact", **kw),
                 lambda d, **kw: hessian.top_eigenvalues(model, d, loss_fn=summed, max_iter=3, **kw),
                 lambda d, **kw: hessian.minimum_sharpness(model, d, loss_fn=summed, **kw),
                 lambda d, **kw: kfac_variance(model, d, loss_fn=summed, **kw)):
        with pytest.raises(ValueError, match="reduction='sum'"):
            call(batches)
        with pytest.raises(ValueError, match="reduction='sum'"):
            call(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4))
        call((x, y))  # one batch: the summed loss's own curvature
        call(batches, n_batches=1)
    # one batch with the summed loss is the dense Hessian of the summed loss
    dense = torch.autograd.functional.hessian(
        lambda *w: summed(torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), w)), (x,)), y),
        tuple(p.detach() for p in model.parameters()))
    exact = sum(float(dense[i][i].reshape(p.numel(), p.numel()).trace()) for i, p in enumerate(model.parameters()))
    assert hessian.trace(model, (x, y), loss_fn=summed, method="exact").value == pytest.approx(exact, rel=1e-10)
    # the mean loss over the batches: as before
    hessian.trace(model, batches, loss_fn=nn.CrossEntropyLoss(), method="exact")

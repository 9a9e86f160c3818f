"""Every public family on a CUDA device against the same call on the CPU.

Skipped without a GPU (``pytest -m cuda`` selects them on a machine that
has one).  The models are float64 (CUDA float64 kernels sum in another
order than the CPU's, so values agree to rounding, not bit for bit); random
draws on a CUDA device come from the device's generator, so the estimates
that draw random vectors are compared on their exact variants or within
their standard errors.  Each test also checks the restore guarantee on the
device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import assert_unchanged, classification_batch, classification_batches, mlp, sam_data, sam_mlp, snapshot

import flatness
from flatness import diversity, hessian, landscape, nonuniformity
from flatness.optim import GSAM, SAM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
DT = torch.float64


def _on(data, device):
    x, y = data
    return x.to(device), y.to(device)


@pytest.mark.parametrize("kind", ["linf", "adaptive_linf", "l2", "adaptive_l2"])
def test_worst_case_sharpness_on_cuda_matches_cpu(kind):
    # APGD from the centre draws nothing: the same iterates on both devices
    model = mlp(sizes=(5, 16, 4))
    with torch.no_grad():
        model[0].weight[0, :2] = 0.0  # weights that cannot move (adaptive kinds)
    data = classification_batch(24, (5,), 4)
    cpu = flatness.sharpness(model, data, kind=kind, rho=0.05, n_iters=8)
    model.to(DEVICE)
    snap = snapshot(model)
    gpu = flatness.sharpness(model, _on(data, DEVICE), kind=kind, rho=0.05, n_iters=8)
    assert_unchanged(model, snap)
    assert gpu.value == pytest.approx(cpu.value, rel=1e-6)
    assert gpu.clean_loss == pytest.approx(cpu.clean_loss, rel=1e-10)
    assert gpu.settings["device"].startswith("cuda")


@pytest.mark.parametrize("kind", ["avg_l2", "avg_adaptive_linf"])
def test_average_case_sharpness_on_cuda(kind):
    # other draws on the device: within five standard deviations of the
    # CPU estimates (their spread measured over seeds)
    model = mlp(sizes=(5, 16, 4))
    data = classification_batch(24, (5,), 4)
    cpu = torch.tensor([flatness.sharpness(model, data, kind=kind, rho=0.05, n_samples=200, seed=s).value
                        for s in range(8)], dtype=DT)
    model.to(DEVICE)
    snap = snapshot(model)
    gpu = flatness.sharpness(model, _on(data, DEVICE), kind=kind, rho=0.05, n_samples=200)
    assert_unchanged(model, snap)
    assert abs(gpu.value - float(cpu.mean())) <= 5 * float(cpu.std()) + 1e-12


def test_model_on_cuda_measured_on_the_cpu():
    # device="cpu": the model stays on the GPU, the measurement runs on copies
    model = mlp(sizes=(5, 16, 4))
    data = classification_batch(24, (5,), 4)
    cpu = flatness.sharpness(model, data, kind="adaptive_linf", rho=0.05, n_iters=8)
    model.to(DEVICE)
    snap = snapshot(model)
    moved = flatness.sharpness(model, data, kind="adaptive_linf", rho=0.05, n_iters=8, device="cpu")
    assert_unchanged(model, snap)
    assert moved.value == pytest.approx(cpu.value, rel=1e-12)


@pytest.mark.parametrize("opt_cls, kwargs", [(SAM, {}), (SAM, {"adaptive": True}), (GSAM, {"alpha": 0.1})])
def test_sam_steps_on_cuda_match_cpu(opt_cls, kwargs):
    x, y = sam_data()
    models = {dev: sam_mlp().to(dev) for dev in ("cpu", DEVICE)}
    for dev, model in models.items():
        opt = opt_cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kwargs)
        xd, yd = x.to(dev), y.to(dev)
        for _ in range(3):
            def closure(model=model, xd=xd, yd=yd, opt=opt):
                opt.zero_grad()
                loss = F.cross_entropy(model(xd), yd)
                loss.backward()
                return loss

            opt.step(closure)
    for p, q in zip(models["cpu"].parameters(), models[DEVICE].parameters(), strict=True):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-12)


def test_sam_with_autocast_and_grad_scaler_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(DEVICE)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(64, 16, device=DEVICE)
    y = torch.randint(0, 4, (64,), device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure, scaler=scaler)
        scaler.update()
    assert torch.isfinite(torch.as_tensor(loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lanczos_basis_in_host_memory_beside_a_cuda_model():
    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((7, 5), (5,), 4)
    cpu = hessian.top_eigenvalues(model, batches, k=2, tol=1e-8)
    model.to(DEVICE)
    snap = snapshot(model)
    host = hessian.top_eigenvalues(model, batches, k=2, tol=1e-8, basis_device="cpu")
    low = hessian.top_eigenvalues(model, batches, k=2, tol=1e-8, low_memory=True)
    assert_unchanged(model, snap)
    torch.testing.assert_close(host.eigenvalues, cpu.eigenvalues, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(low.eigenvalues, cpu.eigenvalues, rtol=1e-6, atol=1e-10)
    assert host.eigenvectors[0][0].is_cuda


@pytest.mark.parametrize("engine", ["forward-over-reverse", "double-backward"])
def test_one_hvp_per_engine_on_cuda_matches_cpu(engine):
    # One vector on the forward engine runs forward-mode AD through the
    # autograd engine's backward pass, which runs on a device thread on
    # CUDA; its probe against double backward decides whether it is used.
    model = mlp(sizes=(5, 8, 4))
    x, y = classification_batch(9, (5,), 4)
    v = [torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(i))
         for i, p in enumerate(model.parameters())]
    cpu = hessian.hvp(model, (x, y), v, engine=engine)
    model.to(DEVICE)
    snap = snapshot(model)
    gpu = hessian.hvp(model, _on((x, y), DEVICE), [t.to(DEVICE) for t in v], engine=engine)
    assert_unchanged(model, snap)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


def test_trace_estimates_on_cuda():
    model = mlp(sizes=(5, 8, 4))
    batches = classification_batches((7, 5), (5,), 4)
    exact = hessian.trace(model, batches, method="exact").value
    model.to(DEVICE)
    for method in ("hutchinson", "hutch++"):
        est = hessian.trace(model, batches, method=method, n_samples=60)
        assert abs(est.value - exact) <= 5 * est.std_error + 1e-8 * abs(exact), method
    assert hessian.trace(model, batches, method="exact").value == pytest.approx(exact, rel=1e-10)


def test_nonuniformity_on_cuda_matches_cpu():
    model = mlp(sizes=(5, 8, 4))
    data = classification_batch(16, (5,), 4)
    cpu_var = nonuniformity.gradient_variance(model, data)
    cpu_kfac = nonuniformity.kfac_variance(model, data)
    model.to(DEVICE)
    gpu_var = nonuniformity.gradient_variance(model, _on(data, DEVICE))
    gpu_kfac = nonuniformity.kfac_variance(model, _on(data, DEVICE))
    for gpu, cpu in ((gpu_var, cpu_var), (gpu_kfac, cpu_kfac)):
        assert gpu.total == pytest.approx(cpu.total, rel=1e-8)
        assert gpu.noise_factor == pytest.approx(cpu.noise_factor, rel=1e-8)


def test_diversity_and_landscape_on_cuda_match_cpu():
    members = [mlp(seed=s, sizes=(5, 8, 4)) for s in range(3)]
    data = classification_batch(32, (5,), 4)
    cpu_metrics = diversity.ensemble_metrics(members, data)
    cpu_barrier = landscape.loss_barrier(members[:2], data, n_points=5)
    for m in members:
        m.to(DEVICE)
    gpu_metrics = diversity.ensemble_metrics(members, _on(data, DEVICE))
    gpu_barrier = landscape.loss_barrier(members[:2], _on(data, DEVICE), n_points=5)
    for key, value in cpu_metrics.to_dict().items():
        if isinstance(value, float):
            assert gpu_metrics.to_dict()[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    assert gpu_barrier.value == pytest.approx(cpu_barrier.value, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("cell", [torch.nn.LSTM, torch.nn.GRU])
def test_recurrent_models_on_cuda_in_eval_mode(cell):
    # cuDNN's RNN kernels refuse backward in eval mode and double backward;
    # the measurements run the native kernels and set cuDNN back afterwards
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(4, 6, batch_first=True)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = Recurrent().to(DT)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(8, 5, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    cpu = [flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=5).value,
           hessian.trace(model, data, method="exact").value,
           float(hessian.top_eigenvalues(model, data, k=1).eigenvalues[0]),
           nonuniformity.gradient_variance(model, data).total]
    model.to(DEVICE)
    snap = snapshot(model)
    enabled = torch.backends.cudnn.enabled
    gpu_data = _on(data, DEVICE)
    gpu = [flatness.sharpness(model, gpu_data, kind="l2", rho=0.05, n_iters=5).value,
           hessian.trace(model, gpu_data, method="exact").value,
           float(hessian.top_eigenvalues(model, gpu_data, k=1).eigenvalues[0]),
           nonuniformity.gradient_variance(model, gpu_data).total]
    assert torch.backends.cudnn.enabled == enabled
    assert_unchanged(model, snap)
    assert gpu == pytest.approx(cpu, rel=1e-6)
    # a CPU model measured on the GPU (device=): cuDNN off there too
    model.cpu()
    snap = snapshot(model)
    moved = flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=5, device=DEVICE).value
    assert torch.backends.cudnn.enabled == enabled
    assert_unchanged(model, snap)
    assert moved == pytest.approx(cpu[0], rel=1e-6)


def test_seeded_draws_resume_from_a_checkpoint_loaded_to_the_gpu():
    # torch.load(map_location="cuda") moves every saved tensor to the GPU,
    # the CPU generator's state too: ESAM's draws resume as from a CPU load
    import io

    from flatness.optim import ESAM

    x, y = sam_data()
    xd, yd = x.to(DEVICE), y.to(DEVICE)

    def run(opt, model, steps):
        for _ in range(steps):
            def closure(mask=None):  # ESAM's: per-sample losses of the selected samples
                xb, yb = (xd, yd) if mask is None else (xd[mask], yd[mask])
                return F.cross_entropy(model(xb), yb, reduction="none")

            opt.step(closure)

    model = sam_mlp().to(DEVICE)
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, seed=3, lr=0.1)
    run(opt, model, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    resumed = {}
    for where in ("cpu", DEVICE):
        buf.seek(0)
        ckpt = torch.load(buf, map_location=where, weights_only=True)
        m = sam_mlp().to(DEVICE)
        m.load_state_dict(ckpt["model"])
        o = ESAM(m.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, seed=0, lr=0.1)
        o.load_state_dict(ckpt["opt"])
        run(o, m, 2)
        resumed[where] = [p.detach().cpu() for p in m.parameters()]
    run(opt, model, 2)  # uninterrupted
    for a, b, c in zip(resumed["cpu"], resumed[DEVICE], model.parameters(), strict=True):
        assert torch.equal(a, c.detach().cpu()) and torch.equal(b, a)


def test_curvature_products_leave_every_cuda_random_stream_alone():
    # the forward-over-reverse engine's check seeds its own draws: only
    # the generators it forks (the CPU's and the model's device's), never
    # another device's or, for a CPU model, the GPU's
    model = mlp(sizes=(5, 8, 3))
    data = classification_batch(6, (5,), 3)
    vec = [torch.randn_like(p) for p in model.parameters()]
    for where in ("cpu", DEVICE):
        model.to(where)
        cuda_state = torch.cuda.get_rng_state()
        cpu_state = torch.get_rng_state()
        hessian.hvp(model, _on(data, where), [v.to(where) for v in vec], engine="forward-over-reverse")
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state), where
        assert torch.equal(torch.get_rng_state(), cpu_state), where


def test_float32_convolutions_in_tf32_pass_the_exactness_checks():
    # cuDNN runs float32 convolutions in TF32 by default on Ampere and
    # later (10-bit inputs): the checks that compare two computations of
    # one quantity must not read that rounding as a missing term
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    cpu_min = hessian.minimum_sharpness(model, data, method="gn").value
    cpu_kfac = nonuniformity.kfac_variance(model, data)
    model.to(DEVICE)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        gpu_min = hessian.minimum_sharpness(model, _on(data, DEVICE), method="gn").value
        gpu_kfac = nonuniformity.kfac_variance(model, _on(data, DEVICE))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert gpu_min == pytest.approx(cpu_min, rel=2e-2)
    assert gpu_kfac.settings["hidden_from_hooks"] == cpu_kfac.settings["hidden_from_hooks"]
    assert gpu_kfac.total == pytest.approx(cpu_kfac.total, rel=2e-2)
    # low-memory Lanczos: the top three, each once (copies merged at TF32's rounding)
    model.cpu()
    cpu_top = hessian.top_eigenvalues(model, data, k=3, tol=1e-6).eigenvalues
    model.to(DEVICE)
    torch.backends.cudnn.allow_tf32 = True
    try:
        lean = hessian.top_eigenvalues(model, _on(data, DEVICE), k=3, tol=1e-2, low_memory=True, max_iter=300)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    torch.testing.assert_close(lean.eigenvalues, cpu_top, rtol=2e-2, atol=2e-2 * float(cpu_top.abs().max()))

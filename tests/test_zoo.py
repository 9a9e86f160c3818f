"""Every curvature function over the model zoo (``tests/zoo.py``), against
dense float64 double-backward Hessians and per-sample gradient loops; the
model must come back bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    CASES,
    RELU_CASES,
    Case,
    _images,
    _reference_kernels,
    _seeded,
    _singletons,
    _vectors,
    assert_same_state,
    dense_ggn,
    dense_hessian,
    flat_loss,
    forward,
    per_sample_gradients,
    state,
)

import flatness
from flatness import diversity, hessian, landscape
from flatness import nonuniformity as nu
from flatness._hvp import CurvatureOperator

DT = torch.float64

# Cases whose kernels all have forward-mode derivatives (the others need
# double backward: recurrent kernels, parametrizations, GroupNorm on
# channels_last tensors, buffers written in forward).
FORWARD_OK = ["mlp", "cnn_bn", "resnet_block", "transformer", "attention", "encoder_decoder",
              "tied_embeddings", "dict_outputs", "pre_hook", "frozen_unused"]


def _dense_from(op: CurvatureOperator) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=DT))


def test_operator_matches_dense_hessian(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    op = CurvatureOperator(model, batch, loss_fn=zoo_case.loss_fn, train=zoo_case.train)
    H = _dense_from(op)
    ref = dense_hessian(zoo_case, model, batch)
    assert op.engine in ("forward-over-reverse", "double-backward") and op.engine_reason
    scale = ref.abs().max()
    assert torch.allclose(ref, ref.T, rtol=0, atol=1e-12 * scale)  # a Hessian
    assert torch.allclose(H, ref, rtol=0, atol=1e-10 * scale), (H - ref).abs().max()
    assert_same_state(before, state(model))


@pytest.mark.parametrize("name", FORWARD_OK)
def test_forward_over_reverse_matches_dense_where_supported(name):
    case = CASES[name]
    model, batch = case.build(), case.batch()
    op = CurvatureOperator(model, batch, loss_fn=case.loss_fn, engine="forward-over-reverse")
    ref = dense_hessian(case, model, batch)
    assert torch.allclose(_dense_from(op), ref, rtol=0, atol=1e-10 * ref.abs().max())


def _bn_train_cnn() -> nn.Module:
    # batch statistics and no running ones: training-mode batch_norm with
    # nothing written in forward (which the forward engine refuses)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(27, 3))


def _silu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 3))


# One vector on the forward-over-reverse engine: the loss at dual tensors and
# one backward pass (no torch.func), checked against the dense Hessian where
# torch differentiates normalization layers' forward-mode formulas wrongly in
# the other order (layer_norm, batch_norm in training mode, instance_norm).
# SiLU's backward has no plain forward-mode formula: the one-sample probe
# fails and the product is jvp(grad).
@pytest.mark.parametrize("case, dual", [
    (CASES["transformer"], True),
    (Case("bn_train", _seeded(_bn_train_cnn), _images, train=True), True),
    (Case("instance_norm", _seeded(lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))), _images),
     True),
    (Case("silu", _seeded(_silu_mlp), _vectors), False),
])
def test_forward_over_reverse_one_vector_matches_dense(case, dual):
    model, batch = case.build(), case.batch()
    before = state(model)
    ref = dense_hessian(case, model, batch)
    op = CurvatureOperator(model, batch, loss_fn=case.loss_fn, train=case.train, engine="forward-over-reverse")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(op.shape[0], dtype=DT, generator=g)
        assert torch.allclose(op.matvec(v), ref @ v, rtol=0, atol=1e-10 * ref.abs().max())
    assert op._dual is dual and op.engine_reason == "requested (probe passed)"
    assert_same_state(before, state(model))


def test_top_eigenvalue_and_trace_match_dense(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    kw = {"loss_fn": zoo_case.loss_fn, "train": zoo_case.train}
    eig = hessian.top_eigenvalues(model, batch, k=1, tol=1e-10, **kw)
    tr = hessian.trace(model, batch, method="exact", **kw)
    ref = dense_hessian(zoo_case, model, batch)
    evals = torch.linalg.eigvalsh(ref)
    assert float(eig.eigenvalues[0]) == pytest.approx(float(evals[-1]), rel=1e-8)
    assert tr.value == pytest.approx(float(ref.diagonal().sum()), rel=1e-8)
    assert eig.engine == eig.settings["engine"] and eig.engine in ("forward-over-reverse", "double-backward")
    # a basis of three vectors, thick-restarted: the same top eigenvalue
    bounded = hessian.top_eigenvalues(model, batch, k=1, tol=1e-10, max_basis=3, max_iter=3000, **kw)
    assert bounded.converged and bounded.n_iter > 3  # (it restarted)
    assert float(bounded.eigenvalues[0]) == pytest.approx(float(evals[-1]), rel=1e-8)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("name, why", [("lstm", "LSTM"), ("gru", "GRU"), ("weight_norm", "parametrized"),
                                       ("buffer_in_forward", "calls")])
def test_auto_engine_names_the_module_that_needs_double_backward(name, why):
    case = CASES[name]
    batches = [case.batch()] * 6  # several batches: no kept graph, 8 vectors per pass
    op = CurvatureOperator(case.build(), batches, loss_fn=case.loss_fn)
    op.matmat(torch.ones(op.shape[0], 8, dtype=DT))
    assert op.engine == "double-backward" and why in op.engine_reason
    with pytest.raises(ValueError, match="forward-over-reverse") if case.tags & {"rnn", "parametrized"} else _nothing():
        CurvatureOperator(case.build(), batches, engine="forward-over-reverse")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_auto_engine_choice_by_cost():
    case = CASES["mlp"]
    model = case.build()
    one = CurvatureOperator(model, case.batch())
    one.matvec(torch.ones(one.shape[0], dtype=DT))
    assert one.engine == "double-backward" and "kept" in one.engine_reason
    many = CurvatureOperator(model, [case.batch()] * 6)
    many.matmat(torch.ones(many.shape[0], 8, dtype=DT))
    assert many.engine == "forward-over-reverse"
    few = CurvatureOperator(model, [case.batch()] * 6)
    few.matvec(torch.ones(few.shape[0], dtype=DT))
    assert few.engine == "double-backward"
    # channels_last GroupNorm has no working forward-mode formula: the probe sees it
    cl = CASES["cnn_channels_last"]
    op = CurvatureOperator(cl.build(), [cl.batch()] * 6)
    op.matmat(torch.ones(op.shape[0], 8, dtype=DT))
    assert op.engine == "double-backward" and "probe" in op.engine_reason


def test_kept_graph_is_rebuilt_after_the_parameters_change():
    case = CASES["mlp"]
    model, batch = case.build(), case.batch()
    op = CurvatureOperator(model, batch)
    v = torch.ones(op.shape[0], dtype=DT)
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ref = dense_hessian(case, model, batch)
    assert torch.allclose(op.matvec(v), ref @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_curvature_under_no_grad_and_inference_mode(mode):
    case = CASES["transformer"]
    model, batch = case.build(), case.batch()
    ref = hessian.trace(model, batch, method="exact").value
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        batch = case.batch()  # inference tensors when created inside inference_mode
        assert hessian.trace(model, batch, method="exact").value == pytest.approx(ref, rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype stage")
def test_no_grad_passes_see_the_function_the_gradient_passes_see():
    """The fused attention fast path (eval mode, no autograd) zeroes padded
    positions: the loss surface's centre must be the loss with gradients,
    and the caller's fast-path setting comes back."""
    case = CASES["masked_encoder"]
    model, batch = case.build(), case.batch()
    (x, y) = batch
    ref = float(case.loss_fn(model(**x), y).detach())
    with torch.no_grad():
        assert float(case.loss_fn(model(**x), y)) != pytest.approx(ref, rel=1e-6)  # the fast path differs
    d = landscape.directions(model, seed=0)
    centre = landscape.slice(model, batch, d, grid=3, loss_fn=case.loss_fn).loss[1, 1]
    assert float(centre) == pytest.approx(ref, rel=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()


def test_cudnn_is_off_inside_for_recurrent_models_wherever_they_are():
    """cuDNN's RNN kernels cannot backpropagate in eval mode: a measurement
    with ``device="cuda"`` runs a copy of a CPU model on the GPU, so the
    guard turns cuDNN off for a CPU model with recurrent layers too (and
    sets it back, also after an exception); a model without them keeps it."""
    from flatness._guard import ModelGuard

    before = torch.backends.cudnn.enabled
    try:
        torch.backends.cudnn.enabled = True
        with ModelGuard(CASES["lstm"].build()):
            assert not torch.backends.cudnn.enabled
        assert torch.backends.cudnn.enabled
        with pytest.raises(RuntimeError, match="inside"), ModelGuard(CASES["lstm"].build()):
            raise RuntimeError("inside")
        assert torch.backends.cudnn.enabled
        with ModelGuard(CASES["mlp"].build()):
            assert torch.backends.cudnn.enabled
    finally:
        torch.backends.cudnn.enabled = before


def test_buffer_comparison_is_by_bits_batched_or_not():
    """The guard copies back exactly the buffers whose bits changed: NaNs
    compare equal to themselves, -0.0 differs from 0.0, for small buffers
    (read back together) and large ones (one by one) alike."""
    from flatness._guard import BATCHED_COMPARISON, _changed

    def pairs(n):
        a = torch.tensor([float("nan"), 0.0, 1.5] * n)
        signed = a.clone()
        signed[1] = -0.0
        ints = torch.arange(3 * n)
        bumped = ints.clone()
        bumped[-1] += 1
        c = torch.ones(2, dtype=torch.complex64)
        return [(a, a.clone()), (a, signed), (ints, ints.clone()), (ints, bumped),
                (torch.empty(0), torch.empty(0)), (c, c.clone()), (a.bfloat16(), a.bfloat16())]

    want = [False, True, False, True, False, True, False]
    assert _changed(pairs(1)) == want
    assert _changed(pairs(BATCHED_COMPARISON)) == want  # past the batched size


def test_compiled_model_top_eigenvalue():
    case = CASES["compiled"]
    model, batch = case.build(), case.batch()
    before = state(model)
    eig = hessian.top_eigenvalues(model, batch, tol=1e-10)
    ref = torch.linalg.eigvalsh(dense_hessian(CASES["mlp"], CASES["mlp"].build(), batch))
    assert float(eig.eigenvalues[0]) == pytest.approx(float(ref[-1]), rel=1e-8)
    assert_same_state(before, state(model))


# -- per-sample gradients and K-FAC ---------------------------------------------


def test_gradient_variance_matches_per_sample_loop(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    G = per_sample_gradients(zoo_case, model, batch)
    ref = float((G - G.mean(0)).square().sum(1).mean())
    r = nu.gradient_variance(model, batch, loss_fn=zoo_case.loss_fn)
    assert r.total == pytest.approx(ref, rel=1e-10)
    assert_same_state(before, state(model))


SEVERAL_POSITIONS = {"cnn_bn", "cnn_channels_last", "resnet_block", "transformer", "transformer_train",
                     "masked_encoder", "encoder_decoder"}


def test_kfac_variance_exact_on_one_sample_batches_and_nonnegative(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    one = _singletons(batch)
    exact = nu.gradient_variance(model, one, loss_fn=zoo_case.loss_fn).total
    approx = nu.kfac_variance(model, one, loss_fn=zoo_case.loss_fn)
    assert approx.total >= 0 and nu.kfac_variance(model, batch, loss_fn=zoo_case.loss_fn).total >= 0
    if "transformer" in zoo_case.name:
        # out_proj is used without being called: computed exactly
        assert "layer.self_attn.out_proj" in approx.exact_layers
    if zoo_case.name == "encoder_decoder":
        # the cross-attention's projections are used without being called
        assert "transformer.decoder.layers.0.multihead_attn.out_proj" in approx.exact_layers
    if zoo_case.name in SEVERAL_POSITIONS:
        # layers applied at several positions per sample (convolutions,
        # linear1 / linear2 of the transformer): A (x) G is an approximation
        # even for one sample (Grosse and Martens 2016)
        assert approx.total == pytest.approx(exact, rel=0.3)
    else:
        assert approx.total == pytest.approx(exact, rel=1e-10)
    assert_same_state(before, state(model))


def test_kfac_detects_functional_weight_use():
    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 5)
            self.b = torch.nn.Linear(5, 3)

        def forward(self, x):  # b's weight used without calling b, and a's twice
            h = torch.tanh(self.a(x))
            return torch.nn.functional.linear(h, self.b.weight, self.b.bias) * (1 + self.a.weight[0, 0])

    torch.manual_seed(0)
    model = Functional().to(DT)
    batch = CASES["mlp"].batch()
    one = _singletons(batch)
    r = nu.kfac_variance(model, one)
    assert set(r.settings["hidden_from_hooks"]) == {"a", "b"}
    assert r.total == pytest.approx(nu.gradient_variance(model, one).total, rel=1e-10)


def test_nonuniform_sam_refuses_parameters_it_cannot_perturb():
    from flatness.optim import NonuniformSAM

    model = CASES["attention"].build()
    with pytest.raises(ValueError, match="attn.in_proj_weight"):
        NonuniformSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    head = [p for n, p in model.named_parameters() if n.startswith("head")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = NonuniformSAM([{"params": head}, {"params": rest, "perturb": False}], torch.optim.SGD,
                        lr=0.1, model=model)
    assert opt is not None


# -- grad modes, RNG, options -----------------------------------------------------



@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("fn", ["l2", "minimum", "kfac", "gvar", "sam_scores", "eig"])
def test_every_measure_under_the_callers_grad_mode(mode, fn):
    relu = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(DT)
    run = {
        "l2": lambda m, b: flatness.sharpness(m, b, kind="l2", rho=1e-2, n_iters=3).value,
        "minimum": lambda m, b: flatness.sharpness(m, b, kind="minimum").value,
        "kfac": lambda m, b: nu.kfac_variance(m, b).total,
        "gvar": lambda m, b: nu.gradient_variance(m, b).total,
        "sam_scores": lambda m, b: diversity.per_sample_sharpness(m, b, kind="sam").sum().item(),
        "eig": lambda m, b: hessian.top_eigenvalues(m, b).eigenvalues[0].item(),
    }[fn]
    batch = CASES["mlp"].batch()
    ref = run(relu, batch)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        batch = CASES["mlp"].batch()
        assert run(relu, batch) == pytest.approx(ref, rel=1e-12)


def test_callers_rng_untouched_by_shuffled_loaders_and_generators():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = CASES["mlp"].batch()
    model = CASES["mlp"].build()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    hessian.trace(model, loader, method="hutchinson", n_samples=4)
    nu.kfac_variance(model, loader)
    nu.gradient_variance(model, (b for b in [(x, y)]))
    flatness.sharpness(model, loader, kind="avg_l2", rho=1e-2, n_samples=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_n_batches_consumes_exactly_k_batches():
    x, y = CASES["mlp"].batch()
    model = CASES["mlp"].build()
    source = iter([(x, y)] * 5)
    nu.gradient_variance(model, source, n_batches=2)
    assert len(list(source)) == 3


def test_options_seeds_devices_and_outputs_are_checked():
    model, batch = CASES["mlp"].build(), CASES["mlp"].batch()
    with pytest.raises(TypeError, match="train must be True or False"):
        nu.kfac_variance(model, batch, train="no")
    with pytest.raises(TypeError, match="train must be"):
        hessian.trace(model, batch, train="no")
    with pytest.raises(ValueError, match="64 bits"):
        hessian.trace(model, batch, seed=2**70)
    with pytest.raises(ValueError, match="meta device"):
        hessian.trace(CASES["mlp"].build().to("meta"), batch)
    dict_case = CASES["dict_outputs"]
    with pytest.raises(ValueError, match="one tensor of logits"):
        flatness.sharpness(dict_case.build(), dict_case.batch(), kind="avg_l2", rho=1e-2,
                           loss_fn=dict_case.loss_fn, normalize_logits=True)


@pytest.mark.parametrize("fn", [
    lambda m, b: flatness.sharpness(m, b, kind="l2", rho=0.1),
    lambda m, b: hessian.trace(m, b),
    lambda m, b: nu.gradient_variance(m, b),
    lambda m, b: landscape.directions(m, seed=0),
], ids=["sharpness", "trace", "gradient_variance", "landscape_directions"])
def test_lazy_and_torchscript_models_are_refused_up_front(fn):
    batch = CASES["mlp"].batch()
    lazy = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    with pytest.raises(ValueError, match=r"uninitialized parameters of lazy modules \(0.weight, 0.bias\)"):
        fn(lazy, batch)
    scripted = torch.jit.script(CASES["mlp"].build())
    before = state(scripted)
    with pytest.raises(TypeError, match="TorchScript module"):
        fn(scripted, batch)
    assert_same_state(before, state(scripted))


# -- sharpness kinds and SAM --------------------------------------------------------


FIRST_ORDER = {  # max of the linearized loss over each set, for small rho
    "l2": lambda g, w: g.norm(),
    "linf": lambda g, w: g.abs().sum(),
    "adaptive_l2": lambda g, w: (w.abs() * g).norm(),
    "adaptive_linf": lambda g, w: (w.abs() * g).abs().sum(),
}


@pytest.mark.parametrize("kind", list(FIRST_ORDER))
def test_worst_case_sharpness_matches_first_order_value_for_small_rho(zoo_case, kind):
    if zoo_case.train:
        pytest.skip("dropout: the loss is random")
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    rho = 1e-6
    f, w0, _, _ = flat_loss(zoo_case, model, batch)
    w = w0.clone().requires_grad_(True)
    with _reference_kernels():
        (g,) = torch.autograd.grad(f(w), w)
    ref = rho * float(FIRST_ORDER[kind](g, w0))
    r = flatness.sharpness(model, batch, kind=kind, rho=rho, loss_fn=zoo_case.loss_fn)
    assert r.value == pytest.approx(ref, rel=1e-3)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("kind", ["avg_l2", "avg_adaptive_linf"])
def test_average_case_sharpness_matches_its_definition(zoo_case, kind):
    """E_d L(w + d) - L(w) by a plain loop over the same draws of a private
    generator seeded with ``seed``: d = rho N(0, I) (l2) or rho |w| U[-1, 1]
    (adaptive linf), one tensor after another in parameter order."""
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    rho, n, seed = 1e-2, 4, 3
    r = flatness.sharpness(model, batch, kind=kind, rho=rho, n_samples=n, loss_fn=zoo_case.loss_fn,
                           train=zoo_case.train, seed=seed)
    assert_same_state(before, state(model))
    if zoo_case.train:
        assert torch.isfinite(torch.tensor(r.value))
        return  # dropout: the loss is random
    f, w0, _, _ = flat_loss(zoo_case, model, batch)
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    with _reference_kernels(), torch.no_grad():
        clean = float(f(w0))
        total = 0.0
        for _ in range(n):
            if kind == "avg_l2":
                d = torch.cat([torch.randn(s, generator=gen, dtype=DT).reshape(-1) for s in shapes])
                d = rho * d
            else:
                d = torch.cat([(torch.rand(s, generator=gen, dtype=DT) * 2 - 1).reshape(-1) for s in shapes])
                d = rho * w0.abs() * d
            total += float(f(w0 + d))
    assert r.value == pytest.approx(total / n - clean, rel=1e-9, abs=1e-13)
    assert r.clean_loss == pytest.approx(clean, rel=1e-12)


def test_one_sam_step_matches_a_hand_written_step(zoo_case):
    """SAM's update written out with plain autograd on the flat parameters."""
    if zoo_case.train or "buffer" in zoo_case.tags:
        pytest.skip("dropout / forward-written buffers: the two passes see different functions")
    model, batch = zoo_case.build(), zoo_case.batch()
    rho, lr = 0.05, 0.1
    f, w0, _, _ = flat_loss(zoo_case, model, batch)
    with _reference_kernels():
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(w), w)
        e = rho * g / g.norm()
        w = (w0 + e).requires_grad_(True)
        (g2,) = torch.autograd.grad(f(w), w)
    expected = w0 - lr * g2
    opt = flatness.optim.SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD,
                             rho=rho, lr=lr)
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = zoo_case.loss_fn(forward(model, x), y)
        loss.backward()
        return loss

    with _reference_kernels():
        opt.step(closure)
    got = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_bfloat16_losses_are_computed_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(128, 20, generator=g), torch.randint(0, 10, (128,), generator=g))
    ref = flatness.sharpness(model, batch, kind="avg_l2", rho=1e-2, n_samples=20).value
    low = flatness.sharpness(model.to(torch.bfloat16), batch, kind="avg_l2", rho=1e-2, n_samples=20).value
    # in bfloat16 the loss (about 2.3) has a step of 0.0156: the value would be a multiple of it
    assert low == pytest.approx(ref, rel=0.1) and ref > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linf", "avg_l2", "hessian_trace"])
def test_low_precision_models_see_their_float_targets_unrounded(dtype, kind):
    """A float16 / bfloat16 model's loss is taken in float32, and so are its
    float targets: regression targets near 100 are not rounded to the low
    precision's step (0.5 in bfloat16) before the loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(dtype)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), 100 + torch.randn(32, 1, generator=g)
    options = {"hessian_trace": {"method": "exact"}, "linf": {"rho": 0.01, "n_iters": 2},
               "avg_l2": {"rho": 0.01, "n_samples": 2}}[kind]
    r = flatness.sharpness(model, (x, y), kind=kind, loss_fn=F.mse_loss, **options)
    with torch.no_grad():
        exact = float(F.mse_loss(model(x.to(dtype)).float(), y))
        rounded = float(F.mse_loss(model(x.to(dtype)).float(), y.to(dtype).float()))
    assert abs(rounded - exact) > 1e-5 * exact  # the rounding this test would see
    assert r.clean_loss == pytest.approx(exact, rel=1e-7)


def test_worker_loader_leaves_the_callers_rng_alone():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = CASES["mlp"].batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, num_workers=1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    hessian.top_eigenvalues(CASES["mlp"].build(), loader, max_iter=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_ggn_of_a_dict_output_model_is_refused_clearly():
    case = CASES["dict_outputs"]
    with pytest.raises(ValueError, match="returns one tensor"):
        hessian.top_eigenvalues(case.build(), case.batch(), loss_fn=case.loss_fn, curvature="ggn")
    with pytest.raises(ValueError, match="LSTM"):
        hessian.trace(CASES["lstm"].build(), CASES["lstm"].batch(), engine="forward-over-reverse")


@pytest.mark.parametrize("name, why", [("cnn_channels_last", "probe product"),
                                       ("buffer_in_forward", r"writes buffers in forward \(calls, ema\)"),
                                       # torch.func refuses checkpointing's saved-tensor hooks
                                       ("checkpointed", "probe product.*saved tensor hooks")])
def test_requested_forward_over_reverse_is_refused_before_any_product(name, why):
    case = CASES[name]
    model, batch = case.build(), case.batch()
    before = state(model)
    with pytest.raises(ValueError, match=f"engine='forward-over-reverse'.*{why}"):
        hessian.trace(model, batch, method="exact", engine="forward-over-reverse")
    if name != "checkpointed":  # one vector at a time runs there: the test below
        with pytest.raises(ValueError, match=why):
            hessian.top_eigenvalues(model, batch, engine="forward-over-reverse")
    assert_same_state(before, state(model))


def test_one_vector_forward_over_reverse_runs_under_checkpointing():
    # The vmapped torch.func products refuse checkpointing's saved-tensor
    # hooks (above); one vector at a time runs through the plain autograd
    # APIs, which support them, and gives the dense Hessian's eigenvalues.
    case = CASES["checkpointed"]
    model, batch = case.build(), case.batch()
    before = state(model)
    res = hessian.top_eigenvalues(model, batch, k=2, tol=1e-10, engine="forward-over-reverse")
    dense = torch.linalg.eigvalsh(dense_hessian(case, model, batch)).flip(0)[:2]
    assert torch.allclose(res.eigenvalues, dense, rtol=1e-8, atol=0), (res.eigenvalues, dense)
    assert_same_state(before, state(model))


# -- minimum sharpness ----------------------------------------------------------------

#: Every zoo case is refused by minimum sharpness (Ibayashi et al. 2021): it is
#: defined for chains of Linear/Conv layers joined by ReLU-like activations.
#: The message names the module and the reason.
MINIMUM_REFUSED = {
    "mlp": r"not positively homogeneous: 1 \(Tanh\)",
    "cnn_bn": r"outside such a chain .*1 \(BatchNorm2d\): weight, bias",
    "cnn_channels_last": r"outside such a chain .*1 \(GroupNorm\): weight, bias",
    "resnet_block": r"no such module is registered: look for a functional activation",  # torch.tanh
    "transformer": r"outside such a chain .*layer.self_attn \(MultiheadAttention\): in_proj_weight",
    "transformer_train": r"outside such a chain .*layer.self_attn \(MultiheadAttention\): in_proj_weight",
    "masked_encoder": r"outside such a chain .*enc.layers.0.self_attn \(MultiheadAttention\): in_proj_weight",
    "attention": r"outside such a chain .*attn \(MultiheadAttention\): in_proj_weight, in_proj_bias",
    # the two input projections are not a chain
    "encoder_decoder": r"layer 1, tgt_proj \(Linear\), takes 4 inputs, which do not map onto the 8 units of "
                       r"layer 0, src_proj \(Linear\)",
    "lstm": r"outside such a chain .*emb \(Embedding\): weight; rnn \(LSTM\): weight_ih_l0",
    "gru": r"outside such a chain .*rnn \(GRU\): weight_ih_l0",
    "tied_embeddings": r"weights tied to a layer\): emb \(Embedding\): weight",
    "sparse_embeddings": r"outside such a chain .*emb \(Embedding\): weight; bias \(Embedding\): weight",
    "weight_norm": r"cannot use 0 \(ParametrizedLinear\): its weight is computed by a parametrization",
    "spectral_norm": r"cannot use 0 \(ParametrizedLinear\): its weight is computed by a parametrization",
    "dict_outputs": r"change under a layer-wise rescaling.*look for a functional activation",  # torch.tanh
    "pre_hook": r"not positively homogeneous: 1 \(Tanh\)",
    "compiled": r"not positively homogeneous: _orig_mod.1 \(Tanh\)",
    "frozen_unused": r"outside such a chain .*<root> \(FrozenUnused\): unused",
    "buffer_in_forward": r"not positively homogeneous: net.1 \(Tanh\)",
    "checkpointed": r"not positively homogeneous: block.1 \(Tanh\)",
}


def test_minimum_sharpness_refuses_every_zoo_model_naming_the_module(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    for method in ("gn", "exact"):
        with pytest.raises(ValueError, match=MINIMUM_REFUSED[zoo_case.name]):
            hessian.minimum_sharpness(model, batch, loss_fn=zoo_case.loss_fn, train=zoo_case.train,
                                      method=method)
    with pytest.raises(ValueError, match=MINIMUM_REFUSED[zoo_case.name]):
        flatness.sharpness(model, batch, kind="minimum", loss_fn=zoo_case.loss_fn, train=zoo_case.train)
    assert_same_state(before, state(model))


def test_minimum_sharpness_refuses_the_compiled_tanh_model():
    case = CASES["compiled"]
    with pytest.raises(ValueError, match=MINIMUM_REFUSED["compiled"]):
        hessian.minimum_sharpness(case.build(), case.batch())


def _minimum_reference(model: torch.nn.Module, H: torch.Tensor, granularity: str) -> float:
    """min over log-scales g of the Hessian trace of the rescaled chain,
    from the dense Hessian's diagonal, minimized by SciPy's BFGS (the
    library uses its own log-sum-exp L-BFGS-B)."""
    import numpy as np
    import scipy.optimize

    from flatness._params import unwrap

    layers = [m for m in unwrap(model).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    d = H.diagonal().numpy()
    blocks, i = [], 0
    for m in layers:  # the twins have no parameters outside the chain
        w = m.weight
        D = d[i:i + w.numel()].reshape(w.shape[0], w.shape[1], -1).sum(-1)
        i += w.numel()
        E = d[i:i + m.bias.numel()] if m.bias is not None else None
        i += 0 if m.bias is None else m.bias.numel()
        blocks.append((D, E))
    assert i == len(d)
    L = len(layers)
    hidden = [m.weight.shape[0] for m in layers[:-1]]
    starts = np.cumsum([0, *hidden])

    def unit_scales(g, l):
        if l < 0 or l == L - 1:
            return np.zeros(layers[max(l, 0)].weight.shape[0] if l >= 0 else 1)
        return np.full(hidden[l], g[l]) if granularity == "layer" else g[starts[l]:starts[l + 1]]

    def f(g):
        total = 0.0
        for l, (D, E) in enumerate(blocks):
            out = unit_scales(g, l)
            inp = np.zeros(D.shape[1]) if l == 0 else np.repeat(unit_scales(g, l - 1), D.shape[1] // hidden[l - 1])
            total += (D * np.exp(2 * (inp[None, :] - out[:, None]))).sum()
            if E is not None:
                total += (E * np.exp(-2 * out)).sum()
        return total

    n = L - 1 if granularity == "layer" else sum(hidden)
    best = scipy.optimize.minimize(f, np.zeros(n), method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
    return float(best.fun)


#: method='gn' refusals on the ReLU twins (it vmaps over samples and factors
#: the loss's Hessian in one output tensor); method='exact' gives the value.
GN_REFUSED = {
    "relu_dict_outputs": r"method='gn' factors the Hessian .* returns a dict; use method='exact'",
    "relu_buffer_in_forward": r"method='gn' .* cannot write the buffers this model writes in forward \(calls\)",
}


@pytest.mark.parametrize("name", list(RELU_CASES))
def test_minimum_sharpness_matches_a_dense_hessian_reference_on_relu_twins(name):
    case = RELU_CASES[name]
    model, batch = case.build(), case.batch()
    before = state(model)
    H = dense_hessian(case, model, batch)
    for method in ("gn", "exact"):
        if method == "gn" and name in GN_REFUSED:
            with pytest.raises(ValueError, match=GN_REFUSED[name]):
                hessian.minimum_sharpness(model, batch, loss_fn=case.loss_fn, method=method)
            continue
        for granularity in ("layer", "neuron"):
            r = hessian.minimum_sharpness(model, batch, loss_fn=case.loss_fn, method=method,
                                          granularity=granularity)
            assert r.trace == pytest.approx(float(H.diagonal().sum()), rel=1e-10)
            assert r.value == pytest.approx(_minimum_reference(model, H, granularity), rel=1e-7)
            assert r.value < r.trace
    assert_same_state(before, state(model))


# -- per-sample scores, class losses, channel norms: single-sample loops ---------------


def _sample_losses_loop(case, model, batch, w):
    """Each sample's loss at flat weights ``w``, one batch of one at a time."""
    out = []
    with _reference_kernels(), torch.no_grad():
        for one in _singletons(batch):
            f, _, _, _ = flat_loss(case, model, one)
            out.append(float(f(w)))
    return torch.tensor(out, dtype=DT)


def test_per_sample_sharpness_matches_single_sample_loops(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()  # eval mode, as the function runs
    before = state(model)
    fisher = diversity.per_sample_sharpness(model, batch, kind="fisher", loss_fn=zoo_case.loss_fn)
    G = per_sample_gradients(zoo_case, model, batch)
    assert torch.allclose(fisher, G.square().sum(1), rtol=1e-10, atol=1e-14)
    rho = 0.05
    sam = diversity.per_sample_sharpness(model, batch, kind="sam", rho=rho, loss_fn=zoo_case.loss_fn)
    f, w0, _, _ = flat_loss(zoo_case, model, batch)
    w = w0.clone().requires_grad_(True)
    with _reference_kernels():
        (g,) = torch.autograd.grad(f(w), w)
    moved = w0 + rho * g / g.norm()
    ref = _sample_losses_loop(zoo_case, model, batch, moved) - _sample_losses_loop(zoo_case, model, batch, w0)
    assert torch.allclose(sam, ref, rtol=1e-9, atol=1e-13)
    assert_same_state(before, state(model))


def test_class_loss_imbalance_matches_a_single_sample_loop(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    r = nu.class_loss_imbalance(model, batch, loss_fn=zoo_case.loss_fn)
    _, w0, _, _ = flat_loss(zoo_case, model, batch)
    losses = _sample_losses_loop(zoo_case, model, batch, w0)
    y = batch[1]
    ref = {int(c): float(losses[y == c].mean()) for c in torch.unique(y)}
    assert r.per_class.keys() == ref.keys()
    for c in ref:
        assert r.per_class[c] == pytest.approx(ref[c], rel=1e-10)
    v = torch.tensor(list(ref.values()), dtype=DT)
    assert r.cv == pytest.approx(float(v.std(unbiased=False) / v.mean()), rel=1e-9)
    assert r.max_min_ratio == pytest.approx(float(v.max() / v.min()), rel=1e-10)
    assert_same_state(before, state(model))


def test_channel_gradient_norms_match_the_batch_gradient(zoo_case):
    """Norm of each output row (unit / channel) of the mean gradient,
    pooled over the parameters of one module."""
    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    r = nu.channel_gradient_norms(model, batch, loss_fn=zoo_case.loss_fn)
    f, w0, names, ref_model = flat_loss(zoo_case, model, batch)
    w = w0.clone().requires_grad_(True)
    with _reference_kernels():
        (g,) = torch.autograd.grad(f(w), w, allow_unused=True)
    g = torch.zeros_like(w0) if g is None else g
    shapes = dict((n, p.shape) for n, p in ref_model.named_parameters() if p.requires_grad)
    rows: dict[str, list[torch.Tensor]] = {}
    i = 0
    for n in names:
        s = shapes[n]
        part = g[i:i + s.numel()].reshape(s)
        i += s.numel()
        rows.setdefault(n.rpartition(".")[0] or n, []).append(part.reshape(s[0] if len(s) else 1, -1))
    ref = {}
    for layer, mats in rows.items():
        if len({m.shape[0] for m in mats}) == 1:
            ref[layer] = torch.cat(mats, 1).square().sum(1).sqrt()
        else:
            for n, m in zip([n for n in names if (n.rpartition(".")[0] or n) == layer], mats):
                ref[f"{layer}/{n.rpartition('.')[2]}"] = m.square().sum(1).sqrt()
    assert r.norms.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(torch.tensor(r.norms[k], dtype=DT), ref[k], rtol=1e-10, atol=1e-14), k
    pooled = torch.cat(list(ref.values()))
    assert r.variance == pytest.approx(float(pooled.var(unbiased=False)), rel=1e-9, abs=1e-18)
    assert_same_state(before, state(model))


# -- spectral density and the Gauss-Newton matrix ---------------------------------------


@pytest.mark.parametrize("low_memory", [False, True], ids=["basis", "low-memory"])
def test_spectral_density_moments_match_the_dense_hessian(zoo_case, low_memory):
    """Each start vector's Gauss quadrature reproduces ``v^T H^k v`` for
    ``k < 2 n_steps`` (Golub and Meurant), the terms whose mean over the
    Rademacher vectors estimates ``tr(H^k) / n``; the vectors are redrawn from
    a generator seeded as the library's private one.  The same with
    ``low_memory=True`` (the recurrence without a basis, whose products go
    through ``matvec_update``)."""
    from flatness._lanczos import rademacher

    model, batch = zoo_case.build(), zoo_case.batch()
    before = state(model)
    seed, n_vectors, n_steps = 2, 3, 3
    r = hessian.spectral_density(model, batch, n_vectors=n_vectors, n_steps=n_steps, seed=seed,
                                 loss_fn=zoo_case.loss_fn, train=zoo_case.train, low_memory=low_memory)
    assert_same_state(before, state(model))
    H = dense_hessian(zoo_case, model, batch, seed=seed)
    V = rademacher(H.shape[0], n_vectors, generator=torch.Generator().manual_seed(seed), device="cpu")
    V = V / V.norm(dim=0)
    assert torch.allclose(r.weights.sum(1), torch.ones(n_vectors, dtype=DT), rtol=0, atol=1e-12)
    Hk_V, top = V, float(torch.linalg.eigvalsh(H).abs().max())
    for k in range(1, 2 * n_steps):
        Hk_V = H @ Hk_V
        exact = (V * Hk_V).sum(0)  # v^T H^k v per vector
        quad = (r.weights * r.nodes**k).sum(1)
        scale = top**k
        assert torch.allclose(quad, exact, rtol=0, atol=1e-8 * scale), (k, quad, exact)


def test_ggn_top_eigenvalue_and_trace_match_a_dense_gauss_newton_matrix(zoo_case):
    model, batch = zoo_case.build(), zoo_case.batch()
    if "dict" in zoo_case.tags:
        pytest.skip("refused: test_ggn_of_a_dict_output_model_is_refused_clearly")
    before = state(model)
    kw = {"loss_fn": zoo_case.loss_fn, "curvature": "ggn"}
    eig = hessian.top_eigenvalues(model, batch, k=1, tol=1e-10, **kw)
    tr = hessian.trace(model, batch, method="exact", **kw)
    G = dense_ggn(zoo_case, model, batch)
    assert torch.allclose(G, G.T, rtol=0, atol=1e-12 * G.abs().max())
    evals = torch.linalg.eigvalsh(G)
    assert float(evals[0]) > -1e-10 * float(evals[-1])  # positive semi-definite
    assert float(eig.eigenvalues[0]) == pytest.approx(float(evals[-1]), rel=1e-8)
    assert tr.value == pytest.approx(float(G.diagonal().sum()), rel=1e-8)
    assert_same_state(before, state(model))


def test_minimum_sharpness_of_an_explicit_chain_in_a_recurrent_model():
    """layers=[head]: the Hessian of the head's parameters, the LSTM held
    fixed; one layer, so no rescaling: the value is the head's trace."""
    case = CASES["lstm"]
    model, batch = case.build(), case.batch()
    before = state(model)
    with pytest.raises(ValueError, match=r"method='gn' .* no batching rule for rnn \(LSTM\)"):
        hessian.minimum_sharpness(model, batch, layers=[model.head])
    r = hessian.minimum_sharpness(model, batch, layers=[model.head], method="exact")
    H = dense_hessian(case, model, batch)
    _, _, names, _ = flat_loss(case, model, batch)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    offsets = torch.cumsum(torch.tensor([0] + [sizes[n] for n in names]), 0)
    head = [i for n, a, b in zip(names, offsets[:-1], offsets[1:]) if n.startswith("head.") for i in range(a, b)]
    assert r.value == pytest.approx(float(H.diagonal()[head].sum()), rel=1e-10)
    assert_same_state(before, state(model))

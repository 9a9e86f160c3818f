"""``algorithm="reference"`` against the reference evaluator's own iteration.

The reference is the worst-case evaluator of Andriushchenko et al. (2023), "A
Modern Look at the Relationship between Sharpness and Generalization",
https://github.com/tml-epfl/sharpness-vs-generalization (``sharpness.py``:
``eval_APGD_sharpness``, ``weight_ascent_step_momentum``,
``random_init_lw``; ``models.py``: ``LogitNormalizationWrapper``; commit
6d73be9).  That repository carries no licence file, so its code is not copied
here: ``_ref_*`` below re-implement those functions statement by statement
from it, in its own style (the module's parameters rewritten in place,
dictionaries keyed by parameter, ``state_dict`` reloads, a separate forward
pass for each loss), with three changes that do not touch the arithmetic:
CPU instead of ``.cuda()``, random draws from an explicit
``torch.Generator`` instead of the global one (so both sides see the same
noise), and ``init_fn`` called as a function (the original's trailing comma
makes it a tuple, so ``--sharpness_rand_init`` raises ``TypeError`` there).
Each call also returns the loss at every iterate, so the whole trajectory is
compared, not only its maximum.  (Outside the suite, the unmodified original
``eval_APGD_sharpness`` was run on CPU with ``Tensor.cuda`` patched to the
identity on these models, all four kinds, with and without logit
normalisation: ``algorithm="reference"`` matched it bit for bit in float32
and to 2e-16 in float64.)
"""

from __future__ import annotations

import copy
import math

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatness
from flatness._apgd_reference import reference_checkpoints

KINDS = {"linf": ("linf", False), "l2": ("l2", False),
         "adaptive_linf": ("linf", True), "adaptive_l2": ("l2", True)}
RHO = {"linf": 0.02, "l2": 0.5, "adaptive_linf": 0.1, "adaptive_l2": 0.5}
TOL = 1e-6
#: Both sides run the same floating-point operations in the same order, so
#: float64 trajectories agree to rounding (bit for bit on the machines tried);
#: this tighter bound also catches changes that the bisection's own 1e-5
#: tolerance would otherwise hide.
FINE = 1e-12


# --------------------------------------------------------------------------
# the reference, re-implemented from its source (see the module docstring)
# --------------------------------------------------------------------------

class _RefLogitNormalization(nn.Module):
    def __init__(self, model, normalize_logits=False):
        super().__init__()
        self.model = model
        self.normalize_logits = normalize_logits

    def forward(self, x):
        out = self.model(x)
        if self.normalize_logits:
            out = out - out.mean(dim=-1, keepdim=True)
            out_norms = out.norm(dim=-1, keepdim=True)
            out_norms = torch.max(out_norms, 10**-10 * torch.ones_like(out_norms))
            out = out / out_norms
        return out


def _ref_random_init_lw(delta_dict, rho, orig_param_dict, norm, adaptive, generator):
    for param in delta_dict:
        p = delta_dict[param]
        if norm == "l2":
            delta_dict[param] = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        else:
            delta_dict[param] = 2 * torch.rand(p.shape, generator=generator, dtype=p.dtype) - 1
    for param in delta_dict:
        param_norm_curr = orig_param_dict[param].abs() if adaptive else 1
        delta_dict[param] *= rho * param_norm_curr
    return delta_dict


def _ref_ascent_step(model, x, y, loss_f, orig_param_dict, delta_dict, prev_delta_dict,
                     step_size, rho, momentum, adaptive, norm, counters):
    delta_dict_backup = {param: delta_dict[param].clone() for param in delta_dict}
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    obj = loss_f(model(x), y)
    obj.backward()
    with torch.no_grad():
        if norm == "l2":
            grad_norm = sum([param.grad.norm() ** 2 for _, param in model.named_parameters()]) ** 0.5
            for _, param in model.named_parameters():
                delta_dict[param] += (step_size / (grad_norm + 1e-12) * param.grad * (
                    1 if not adaptive else orig_param_dict[param].abs()))
        else:
            for _, param in model.named_parameters():
                delta_dict[param] += step_size * param.grad.sign() * (
                    1 if not adaptive else orig_param_dict[param].abs())
    for p in model.parameters():
        p.grad.zero_()

    with torch.no_grad():
        if norm == "l2":
            def weighted_norm(delta_dict):
                return sum([((delta_dict[param] / (orig_param_dict[param].abs() if adaptive else 1)) ** 2).sum()
                            for param in delta_dict]) ** 0.5

            if not adaptive:
                delta_norm = weighted_norm(delta_dict)
                if delta_norm > rho:
                    for param in delta_dict:
                        delta_dict[param] *= rho / delta_norm
            else:
                lmbd = 0.1
                max_lmbd_limit = 10.0
                min_lmbd, max_lmbd = 0.0, max_lmbd_limit
                delta_dict_tmp = {param: delta_dict[param].clone() for param in delta_dict}
                curr_norm = new_norm = weighted_norm(delta_dict_tmp)
                if curr_norm > rho:
                    counters["bisections"] += 1
                    while (new_norm - rho).abs() > 10**-5:
                        curr_norm = new_norm
                        for param in delta_dict:
                            c = 1 / orig_param_dict[param].abs() if adaptive else 1
                            delta_dict_tmp[param] = delta_dict[param] / (1 + 2 * lmbd * c**2)
                        new_norm = weighted_norm(delta_dict_tmp)
                        if new_norm > rho:
                            lmbd, min_lmbd = (lmbd + max_lmbd) / 2, lmbd
                        else:
                            lmbd, max_lmbd = (min_lmbd + lmbd) / 2, lmbd
                        if (max_lmbd_limit - max_lmbd) < 10**-2:
                            max_lmbd_limit, max_lmbd = max_lmbd_limit * 2, max_lmbd * 2
                delta_dict = {param: delta_dict_tmp[param].clone() for param in delta_dict_tmp}
        else:
            for param in delta_dict:
                param_curr = orig_param_dict[param].abs() if adaptive else torch.ones_like(orig_param_dict[param])
                delta_dict[param] = torch.max(torch.min(delta_dict[param], param_curr * rho), -1.0 * param_curr * rho)

        for _, param in model.named_parameters():
            delta_dict[param] = momentum * delta_dict[param] + (1 - momentum) * prev_delta_dict[param]
        for param in model.parameters():
            param.data = orig_param_dict[param] + delta_dict[param]
        for _, param in model.named_parameters():
            prev_delta_dict[param] = delta_dict_backup[param]
    return delta_dict, prev_delta_dict


def _ref_eval_apgd_sharpness(model, batches, loss_f, rho, n_iters, norm, adaptive,
                             n_restarts=1, rand_init=False, generator=None,
                             min_update_ratio=0.75, counters=None):
    """Per-batch worst-case sharpness and the loss at every iterate."""
    assert n_restarts == 1 or rand_init
    counters = counters if counters is not None else {"bisections": 0, "reloads": 0}

    def get_loss(model, x, y):
        with torch.no_grad():
            return loss_f(model(x), y).item()

    orig_model_state_dict = copy.deepcopy(model.state_dict())
    orig_param_dict = {param: param.clone() for param in model.parameters()}
    p = [0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    w = w[1:]

    per_batch, trajectory = [], []
    for x, y in batches:
        init_loss = get_loss(model, x, y)
        worst_loss_over_restarts = init_loss
        for _ in range(n_restarts):
            delta_dict = {param: torch.zeros_like(param) for param in model.parameters()}
            if rand_init:
                delta_dict = _ref_random_init_lw(delta_dict, rho, orig_param_dict, norm, adaptive, generator)
                for param in model.parameters():
                    param.data += delta_dict[param]
            prev_delta_dict = {param: delta_dict[param].clone() for param in delta_dict}
            worst_model_dict = copy.deepcopy(model.state_dict())
            prev_worst_loss, worst_loss = init_loss, init_loss
            step_size, prev_step_size = 2 * rho, 2 * rho
            prev_cp, num_of_updates = 0, 0
            for i in range(n_iters):
                delta_dict, prev_delta_dict = _ref_ascent_step(
                    model, x, y, loss_f, orig_param_dict, delta_dict, prev_delta_dict,
                    step_size, rho, 0.75, adaptive, norm, counters)
                curr_loss = get_loss(model, x, y)
                trajectory.append(curr_loss)
                if curr_loss > worst_loss:
                    worst_loss = curr_loss
                    worst_model_dict = copy.deepcopy(model.state_dict())
                    num_of_updates += 1
                if i in w:
                    cond1 = num_of_updates < (min_update_ratio * (i - prev_cp))
                    cond2 = (prev_step_size == step_size) and (prev_worst_loss == worst_loss)
                    prev_step_size, prev_worst_loss, prev_cp = step_size, worst_loss, i
                    num_of_updates = 0
                    if cond1 or cond2:
                        step_size *= 0.5
                        model.load_state_dict(worst_model_dict)
                        counters["reloads"] += 1
            worst_loss_over_restarts = max(worst_loss_over_restarts, worst_loss)
            model.load_state_dict(orig_model_state_dict)
        per_batch.append(worst_loss_over_restarts - init_loss)
    return per_batch, trajectory


# --------------------------------------------------------------------------
# models, data and our side
# --------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 4)).double()


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3)).double()


def _data(model_name, n, seed=2):
    if model_name == "mlp":
        return cases.classification_batch(n, (6,), 4, seed)
    return cases.classification_batch(n, (2, 8, 8), 3, seed)


MODELS = {"mlp": _mlp, "cnn": _cnn}


class _Recorder:
    """Mean cross-entropy that remembers every value it returns."""

    def __init__(self):
        self.values = []

    def __call__(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        self.values.append(float(loss.detach()))
        return loss


def _reference(model_name, kind, batches, normalize, n_iters, **kw):
    norm, adaptive = KINDS[kind]
    model = _RefLogitNormalization(MODELS[model_name](), normalize).eval()
    return _ref_eval_apgd_sharpness(model, batches, F.cross_entropy, RHO[kind], n_iters,
                                    norm, adaptive, **kw)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def test_checkpoints_as_the_reference_computes_them():
    assert reference_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19]
    assert reference_checkpoints(100) == [22, 41, 58, 70, 80, 87, 93, 99]
    for n in range(1, 300):
        p, w = [0, 0.22], [0, math.ceil(n * 0.22)]
        while w[-1] < n and w[-1] != w[-2]:
            p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
            w.append(math.ceil(p[-1] * n))
        assert reference_checkpoints(n) == [i for i in w[1:] if i < n]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_reference_mode_follows_the_reference_iteration(model_name, kind, normalize):
    n_iters = 20
    batch = _data(model_name, 16)
    ref_values, ref_traj = _reference(model_name, kind, [batch], normalize, n_iters)
    rec = _Recorder()
    r = flatness.sharpness(MODELS[model_name](), batch, kind=kind, rho=RHO[kind],
                           n_iters=n_iters, normalize_logits=normalize, loss_fn=rec,
                           algorithm="reference")
    # Our passes: the clean loss, then one per iterate.
    assert len(rec.values) == n_iters + 1
    assert r.counts == {"forward": 1, "backward": n_iters}
    ours = torch.tensor(rec.values[1:], dtype=torch.float64)
    assert torch.allclose(ours, torch.tensor(ref_traj, dtype=torch.float64), rtol=0, atol=FINE)
    assert r.per_batch[0] == pytest.approx(ref_values[0], abs=TOL)
    assert r.settings["algorithm"] == "reference"


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_mode_rounds_as_the_reference_in_float32(kind):
    # Scalars and sums follow the reference's order, so float32 runs take
    # the same path (a one-ulp change in a loss can flip a best-value test).
    batch = (_data("cnn", 16)[0].float(), _data("cnn", 16)[1])
    model = _RefLogitNormalization(_cnn().float(), True).eval()
    norm, adaptive = KINDS[kind]
    ref_values, ref_traj = _ref_eval_apgd_sharpness(model, [batch], F.cross_entropy, RHO[kind], 20,
                                                    norm, adaptive)
    rec = _Recorder()
    r = flatness.sharpness(_cnn().float(), batch, kind=kind, rho=RHO[kind], n_iters=20,
                           normalize_logits=True, loss_fn=rec, algorithm="reference")
    # Bit for bit here; the tolerance only absorbs platform rounding, a
    # different path (an operation order that flips one test) moves the
    # losses by ~1e-4.
    assert rec.values[1:] == pytest.approx(ref_traj, abs=TOL, rel=0)
    assert r.per_batch[0] == pytest.approx(ref_values[0], abs=TOL, rel=0)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_comparison_exercises_reloads_and_bisections(model_name):
    # The configurations compared above halve the step (reloading the best
    # weights) and project onto the ellipsoid, so those paths are covered.
    counters = {"bisections": 0, "reloads": 0}
    _reference(model_name, "adaptive_l2", [_data(model_name, 16)], False, 20, counters=counters)
    assert counters["reloads"] >= 3
    assert counters["bisections"] == 20


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_and_textbook_apgd_differ(kind):
    # The comparison above can fail: the default algorithm takes another path.
    batch = _data("mlp", 16)
    rec_a, rec_r = _Recorder(), _Recorder()
    flatness.sharpness(_mlp(), batch, kind=kind, rho=RHO[kind], loss_fn=rec_a)
    flatness.sharpness(_mlp(), batch, kind=kind, rho=RHO[kind], loss_fn=rec_r, algorithm="reference")
    assert max(abs(a - b) for a, b in zip(rec_a.values[1:], rec_r.values[1:])) > 1e-4


@pytest.mark.parametrize("kind", ["linf", "adaptive_l2"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_m_sharpness_is_the_reference_batch_size(model_name, kind):
    # The reference measures m-sharpness with --bs_sharpness m.
    x, y = _data(model_name, 24)
    chunks = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    ref_values, _ = _reference(model_name, kind, chunks, True, 10)
    r = flatness.sharpness(MODELS[model_name](), (x, y), kind=kind, rho=RHO[kind], n_iters=10,
                           m=8, normalize_logits=True, algorithm="reference")
    assert r.per_batch[0] == pytest.approx(sum(ref_values) / 3, abs=TOL)
    r = flatness.sharpness(MODELS[model_name](), chunks, kind=kind, rho=RHO[kind], n_iters=10,
                           normalize_logits=True, algorithm="reference")
    assert r.per_batch == pytest.approx(ref_values, abs=TOL)
    assert r.value == pytest.approx(sum(ref_values) / 3, abs=TOL)  # equal batches: same mean


@pytest.mark.parametrize("kind", list(KINDS))
def test_restarts_are_the_reference_random_restarts(kind):
    # restarts=r: the run from d = 0 and the reference's r runs from its
    # random start; per batch the larger value.
    seed, r_, n = 5, 2, 10
    chunks = [_data("cnn", 8, seed=s) for s in (3, 4)]
    zero, zero_traj = _reference("cnn", kind, chunks, False, n)
    rand, rand_traj = _reference("cnn", kind, chunks, False, n, n_restarts=r_, rand_init=True,
                                 generator=torch.Generator().manual_seed(seed))
    rec = _Recorder()
    res = flatness.sharpness(_cnn(), chunks, kind=kind, rho=RHO[kind], n_iters=n, restarts=r_,
                             seed=seed, loss_fn=rec, algorithm="reference")
    assert res.per_batch == pytest.approx([max(a, b) for a, b in zip(zero, rand)], abs=TOL)
    assert res.counts == {"forward": 2 * (1 + r_), "backward": 2 * n * (1 + r_)}
    # Every iterate of every run: per batch, our passes are the clean loss and
    # n iterates from d = 0, then per restart the random start and n iterates.
    per_batch = 1 + n + r_ * (1 + n)
    for b in range(2):
        ours = rec.values[b * per_batch:(b + 1) * per_batch]
        expected = zero_traj[b * n:(b + 1) * n]
        assert ours[1:1 + n] == pytest.approx(expected, abs=FINE, rel=0)
        for k in range(r_):
            got = ours[1 + n + k * (1 + n) + 1:1 + n + (k + 1) * (1 + n)]
            expected = rand_traj[(b * r_ + k) * n:(b * r_ + k + 1) * n]
            assert got == pytest.approx(expected, abs=FINE, rel=0)


def test_reference_mode_restores_the_model_and_the_global_rng():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    model.train()
    state = torch.get_rng_state()
    flatness.sharpness(model, _data("cnn", 8), kind="adaptive_l2", rho=0.5, n_iters=5,
                       restarts=1, algorithm="reference")
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_zero_weights_stay_unperturbed_instead_of_nan():
    # The reference divides 0 / 0 in its adaptive-l2 norm (a zero weight) and
    # then never projects; here such coordinates are left out of the norm.
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, :3] = 0
    r = flatness.sharpness(model, _data("mlp", 16), kind="adaptive_l2", rho=0.5,
                           algorithm="reference")
    assert math.isfinite(r.value) and r.value >= 0


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "avg_l2", "algorithm": "reference"}, "algorithm= does not apply to kind=.avg_l2."),
    ({"kind": "l2", "algorithm": "reference", "train": True}, "eval mode"),
    ({"kind": "l2", "algorithm": "textbook"}, "unknown algorithm"),
    ({"kind": "l2", "algorithm": None}, "unknown algorithm"),
])
def test_reference_mode_rejects_what_it_cannot_honour(kwargs, match):
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        flatness.sharpness(model, _data("mlp", 8), rho=0.1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

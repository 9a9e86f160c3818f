"""Kind-dependent options: one that does not apply is an error, never ignored."""

import inspect
import sys

import pytest
import torch

import flatness
from flatness.hessian import trace

SHARPNESS = sys.modules["flatness.sharpness"]


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, (torch.randn(8, 4), torch.randint(0, 3, (8,)))


@pytest.mark.parametrize(("kind", "options", "option"), [
    ("avg_l2", {"rho": 0.1, "n_iters": 3}, "n_iters"),
    ("avg_adaptive_linf", {"rho": 0.1, "restarts": 1}, "restarts"),
    ("l2", {"rho": 0.1, "n_samples": 3}, "n_samples"),
    ("hessian_trace", {"rho": 0.1}, "rho"),
    ("hessian_max_eig", {"n_iters": 3}, "n_iters"),
    ("minimum", {"normalize_logits": True}, "normalize_logits"),
])
def test_option_of_another_kind_raises_naming_option_and_kind(kind, options, option):
    model, batch = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"option {option}= does not apply to kind='{kind}'"):
        flatness.sharpness(model, batch, kind=kind, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(("kind", "typo", "suggestion"), [
    ("l2", "n_iter", "n_iters"), ("avg_l2", "n_sample", "n_samples"),
    ("hessian_trace", "metod", "method"), ("adaptive_linf", "normalise_logits", "normalize_logits"),
])
def test_misspelt_option_names_the_public_function_and_the_closest_name(kind, typo, suggestion):
    model, batch = _setup()
    rho = None if kind.startswith("hessian") else 0.1
    with pytest.raises(TypeError) as info:
        flatness.sharpness(model, batch, kind=kind, rho=rho, **{typo: 3})
    message = str(info.value)
    assert message.startswith("flatness.sharpness()") and f"did you mean {suggestion}=?" in message
    assert "_perturbation" not in message and "_kind" not in message


def test_valid_options_still_work():
    model, batch = _setup()
    assert flatness.sharpness(model, batch, kind="l2", rho=0.1, n_iters=2, restarts=1, m=4).value >= 0
    assert flatness.sharpness(model, batch, kind="avg_l2", rho=0.1, n_samples=2, m=4).value == pytest.approx(
        flatness.sharpness(model, batch, kind="avg_l2", rho=0.1, n_samples=2, m=4).value)
    assert flatness.sharpness(model, batch, kind="hessian_trace", method="exact").value == pytest.approx(
        trace(model, batch, method="exact").value)


def test_option_lists_match_the_implementation():
    """Every option of the perturbation kinds is classified, and only those."""
    sig = inspect.signature(SHARPNESS._perturbation_sharpness).parameters
    common = {"model", "data", "kind", "rho", "loss_fn", "params", "seed", "n_batches", "progress", "train"}
    declared = set(SHARPNESS.WORST_CASE_OPTIONS) | set(SHARPNESS.AVERAGE_CASE_OPTIONS)
    assert declared == set(sig) - common
    for kind in SHARPNESS.KINDS:
        assert SHARPNESS.kind_options(kind) is not None, kind


def test_trace_exact_takes_no_n_samples():
    model, batch = _setup()
    with pytest.raises(ValueError, match=r"n_samples= does not apply to method='exact'"):
        trace(model, batch, method="exact", n_samples=10)
    assert trace(model, batch, method="hutchinson").settings["n_samples"] == 90  # the default


def test_sharpness_progress_bar_has_a_total(monkeypatch):
    pytest.importorskip("tqdm")
    import tqdm.auto

    totals = []

    class Recorder:
        def __init__(self, iterable=None, total=None, **kwargs):
            totals.append(total)
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    model, (x, y) = _setup()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    flatness.sharpness(model, loader, kind="avg_l2", rho=0.1, n_samples=1, progress=True)
    flatness.sharpness(model, list(loader), kind="l2", rho=0.1, n_iters=1, progress=True, n_batches=2)
    flatness.sharpness(model, (x, y), kind="l2", rho=0.1, n_iters=1, progress=True)
    flatness.sharpness(model, iter(list(loader)), kind="l2", rho=0.1, n_iters=1, progress=True)
    assert totals == [3, 2, 1, None]


@pytest.mark.parametrize(("kind", "options"), [
    ("avg_l2", {"rho": 0.1, "n_samples": 2, "train": "False"}),
    ("linf", {"rho": 0.1, "n_iters": 2, "train": 0}),
    ("hessian_trace", {"train": "no"}),
    ("l2", {"rho": 0.1, "n_iters": 2, "normalize_logits": "False"}),
])
def test_boolean_options_refuse_non_booleans(kind, options):
    """``train="False"`` (a command-line string) counted as true: the
    measurement ran in training mode without a word."""
    model, batch = _setup()
    name = "train" if "train" in options else "normalize_logits"
    with pytest.raises(TypeError, match=rf"{name} must be True or False"):
        flatness.sharpness(model, batch, kind=kind, **options)

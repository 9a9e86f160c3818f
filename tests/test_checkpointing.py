"""Activation checkpointing inside the user's model (``torch.utils.checkpoint``,
how large models are trained) gives every measurement and SAM the same
result as the same model without it."""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import flatness
from flatness import hessian, nonuniformity
from flatness.optim import SAM, ConsistentSAM, NonuniformSAM

DT = torch.float64


class Checkpointed(nn.Module):
    """An input layer, a block recomputed in the backward pass when ``ck``,
    and a head.  (The block's input comes from a layer: reentrant
    checkpointing backpropagates only into blocks whose inputs require
    gradients.)"""

    def __init__(self, ck: bool, reentrant: bool = False) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 5)
        self.block = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.ck = ck
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.pre(x))
        h = checkpoint(self.block, x, use_reentrant=self.reentrant) if self.ck else self.block(x)
        return self.head(h)


def _pair(reentrant: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = Checkpointed(False).to(DT)
    ck = Checkpointed(True, reentrant).to(DT)
    ck.load_state_dict(plain.state_dict())
    return plain, ck


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return cases.classification_batch(6, (5,), 3, seed=1, dtype=DT)


MEASURES = {
    "linf": lambda m, b: flatness.sharpness(m, b, kind="linf", rho=0.05).value,
    "adaptive_l2": lambda m, b: flatness.sharpness(m, b, kind="adaptive_l2", rho=0.05).value,
    "avg_l2": lambda m, b: flatness.sharpness(m, b, kind="avg_l2", rho=0.05, seed=0).value,
    "top_eigenvalues": lambda m, b: float(hessian.top_eigenvalues(m, b, k=1, tol=1e-10).eigenvalues[0]),
    "trace": lambda m, b: hessian.trace(m, b, method="exact").value,
    "spectral_density": lambda m, b: hessian.spectral_density(m, b, n_vectors=2, n_steps=5, seed=0).moment(1),
    "gradient_variance": lambda m, b: nonuniformity.gradient_variance(m, b).total,
    "kfac_variance": lambda m, b: nonuniformity.kfac_variance(m, b).total,
}


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_measurements_equal_without_checkpointing(name):
    plain, ck = _pair()
    batch = _batch()
    before = {k: v.clone() for k, v in ck.state_dict().items()}
    want = MEASURES[name](plain, batch)
    got = MEASURES[name](ck, batch)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    for k, v in ck.state_dict().items():
        assert torch.equal(v, before[k])


OPTIMIZERS = {
    "SAM": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "ConsistentSAM": lambda m: ConsistentSAM(m.parameters(), torch.optim.SGD, lr=0.1),
    "NonuniformSAM": lambda m: NonuniformSAM(m.parameters(), torch.optim.SGD, model=m, lr=0.1),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sam_steps_equal_without_checkpointing(name, reentrant):
    # (reentrant checkpointing too: the optimizers only call backward())
    plain, ck = _pair(reentrant)
    x, y = _batch()
    opts = [OPTIMIZERS[name](m) for m in (plain, ck)]
    for _ in range(3):
        for m, opt in zip((plain, ck), opts):
            def closure(m=m):
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
    for p, q in zip(plain.parameters(), ck.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpointing_is_refused_by_pytorch_and_the_model_left_alone():
    # torch.utils.checkpoint(use_reentrant=True) supports neither
    # torch.autograd.grad nor double backward: the measurements fail with
    # PyTorch's error, which names the fix (docs/guide/reliability.rst)
    _, ck = _pair(reentrant=True)
    batch = _batch()
    before = {k: v.clone() for k, v in ck.state_dict().items()}
    for name in ("linf", "trace", "gradient_variance"):
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            MEASURES[name](ck, batch)
    for k, v in ck.state_dict().items():
        assert torch.equal(v, before[k])

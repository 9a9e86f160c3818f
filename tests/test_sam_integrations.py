"""The integration examples: a Hugging Face style loop (torch schedulers
only) and PyTorch Lightning manual optimization (skipped without
``lightning``).  With ``rho=0`` each must be the plain loop, bit for bit."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_style_loop_rho_zero_is_adamw_and_sam_trains():
    hf = _load("sam_hf_loop")
    plain = hf.train(rho=None, epochs=2)
    zero = hf.train(rho=0.0, epochs=2)
    assert zero["losses"] == plain["losses"] and zero["lrs"] == plain["lrs"]
    for p, q in zip(zero["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(p, q)
    # get_scheduler("linear"): 10% warmup from 0, then linear decay to 0
    lrs, total, warmup = plain["lrs"], 16, 1
    assert lrs[0] == 0.0 and math.isclose(lrs[warmup], 3e-3)
    for t in range(warmup, total):
        assert math.isclose(lrs[t], 3e-3 * (total - t) / (total - warmup), rel_tol=1e-9)
    # weight decay only where Hugging Face puts it, on the SAM object's groups
    assert [g["weight_decay"] for g in zero["optimizer"].param_groups] == [0.01, 0.0]
    sam = hf.train(rho=0.05, epochs=3)
    assert all(math.isfinite(v) for v in sam["losses"])
    assert sum(sam["losses"][-4:]) / 4 < sam["losses"][0]


def test_lightning_manual_optimization_rho_zero_is_the_plain_loop():
    pytest.importorskip("lightning")
    example = _load("sam_lightning")
    module = example.train(rho=0.0, epochs=2)
    # the same training by hand: SGD with momentum and OneCycleLR
    torch.manual_seed(0)
    import lightning as L

    L.seed_everything(0, verbose=False)
    ref = example.SAMClassifier(rho=0.0, total_steps=module.total_steps)
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ref.lr, total_steps=ref.total_steps)
    losses = []
    for _ in range(2):
        for x, y in example.data():
            opt.zero_grad()
            loss = F.cross_entropy(ref.net(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    assert module.losses == losses
    for p, q in zip(module.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    sam = example.train(rho=0.05, epochs=4)
    assert sam.losses[-1] < sam.losses[0]

"""Writes tests/data/sam_checkpoint_0_1_0.pt with flatness 0.1.0 (run once).

The fixture checks that checkpoints of the first release still load.  Run
with flatness 0.1.0 on the path:

    PYTHONPATH=src python tests/data/make_sam_checkpoint_0_1_0.py
"""

import copy
from pathlib import Path

import torch
from torch import nn

import flatness
from flatness.optim import SAM, ConsistentSAM


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)


def train(opt: torch.optim.Optimizer, net: nn.Module, steps: int = 2) -> None:
    x, y = data()

    def closure():
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def main() -> None:
    assert flatness.__version__ == "0.1.0", flatness.__version__
    out = {"version": flatness.__version__, "torch": str(torch.__version__)}
    net = model()
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    train(sam, net)
    out["sam"] = copy.deepcopy(sam.state_dict())  # torch returns live state tensors
    out["sam_weights"] = {k: v.clone() for k, v in net.state_dict().items()}
    train(sam, net, 1)  # what 0.1.0 does next: a loaded checkpoint must continue alike
    out["sam_weights_next"] = {k: v.clone() for k, v in net.state_dict().items()}
    net = model()
    csam = ConsistentSAM(net.parameters(), torch.optim.SGD, rho=0.1, rho2=0.2, alpha=0.5, lr=0.1)
    train(csam, net)
    out["consistent"] = copy.deepcopy(csam.state_dict())
    out["consistent_weights"] = {k: v.clone() for k, v in net.state_dict().items()}
    train(csam, net, 1)
    out["consistent_weights_next"] = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(out, Path(__file__).with_name("sam_checkpoint_0_1_0.pt"))


if __name__ == "__main__":
    main()

"""Time per training step: plain base optimizer vs flatness SAM vs pytorch_optimizer's SAM.

All three run side by side in one process, on the same model, data and base
optimizer (SGD with momentum), interleaved round-robin so that machine load
hits them alike.  Reported: the median over repeats of the mean time per step
in a block of steps, after warm-up.

* plain: zero_grad, forward, backward, step (one forward-backward);
* flatness: ``SAM.step(closure)`` (two forward-backwards);
* pytorch_optimizer: its documented usage, ``backward`` then ``step(closure)``.

The floor for a SAM step is 2.0x a plain step (two forward-backward passes,
one base step); the target is <= 2.05x.

Usage::

    python benchmarks/bench_sam.py                 # CPU, ~1 minute
    python benchmarks/bench_sam.py --device cuda
    python benchmarks/bench_sam.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import types

import torch
import torch.nn.functional as F
from _timing import seconds
from torch import nn

from flatness.optim import ESAM, GSAM, MESA, SAM, WSAM, BayesianSAM, FriendlySAM, LookSAM

try:  # optional peer
    from pytorch_optimizer import SAM as PeerSAM
except ImportError:  # pragma: no cover - depends on the environment
    PeerSAM = None
try:  # the peer's SAM family (pytorch_optimizer >= 3)
    import pytorch_optimizer as peer_lib
except ImportError:  # pragma: no cover - depends on the environment
    peer_lib = None


class TransformerBlock(nn.Module):
    def __init__(self, d=128, heads=4, ff=256, classes=10):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=1))


def cases(device):
    g = torch.Generator().manual_seed(0)

    def batch(shape, n_classes=10):
        x = torch.randn(*shape, generator=g).to(device)
        y = torch.randint(0, n_classes, (shape[0],), generator=g).to(device)
        return x, y

    mlp = lambda: nn.Sequential(  # noqa: E731
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    cnn = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    return [
        ("MLP 784-512-512-10, batch 128", mlp, batch((128, 784))),
        ("CNN 2 conv+BN, 32x32x3, batch 32", cnn, batch((32, 3, 32, 32))),
        ("Transformer block d=128, seq 32, batch 16", TransformerBlock, batch((16, 32, 128))),
    ]


def loss_closure(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def make_steppers(make_model, data, device, rho):
    x, y = data

    def fresh():
        torch.manual_seed(0)  # the same initial weights for every contender
        model = make_model().to(device)
        return model.parameters(), loss_closure(model, x, y)

    params, plain_closure = fresh()
    opt_plain = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def plain():
        opt_plain.zero_grad()
        plain_closure()
        opt_plain.step()

    params, ours_closure = fresh()
    opt_ours = SAM(params, torch.optim.SGD, rho=rho, lr=0.01, momentum=0.9)
    out = {"plain": plain, "flatness": lambda: opt_ours.step(ours_closure)}

    if PeerSAM is not None:
        params, peer_closure = fresh()
        opt_peer = PeerSAM(params, torch.optim.SGD, rho=rho, lr=0.01, momentum=0.9)

        def peer():  # its documented usage: first backward outside step()
            opt_peer.zero_grad()
            peer_closure()
            opt_peer.step(peer_closure)

        out["pytorch_optimizer"] = peer
    return out


def optimizer_only_steppers(make_model, device, rho):
    """The optimizers' own work, without forward/backward: fixed gradients,
    a base step vs a SAM first_step + second_step (perturb, restore, step)."""
    out = {}
    contenders = [("plain", None), ("flatness", SAM)] + ([("pytorch_optimizer", PeerSAM)] if PeerSAM else [])
    for name, cls in contenders:
        torch.manual_seed(0)
        model = make_model().to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if cls is None:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            out[name] = opt.step
        else:
            opt = cls(model.parameters(), torch.optim.SGD, rho=rho, lr=0.01, momentum=0.9)
            out[name] = lambda opt=opt: (opt.first_step(), opt.second_step())
    return out


# ----------------------------------------------------------------------
# the SAM family: one row per optimizer, time per step / plain step
# ----------------------------------------------------------------------

#: Targets on the CPU MLP (time per step / plain step) from the issue; the
#: floors are LookSAM(k=5) 1.2x and MESA 1 + one forward without graph.
FAMILY_TARGETS = {"LookSAM": 1.4, "MESA": 1.45, "ESAM": 1.6}


def family_steppers(make_model, data, device, rho):
    """plain SGD and every family member (ours and, where it exists,
    pytorch_optimizer's), each with its documented usage."""
    x, y = data
    sgd = dict(lr=0.01, momentum=0.9)

    def fresh():
        torch.manual_seed(0)
        return make_model().to(device)

    def two_pass(opt, model):
        return lambda: opt.step(loss_closure(model, x, y))

    out = {}
    m = fresh()
    plain_opt = torch.optim.SGD(m.parameters(), **sgd)
    plain_closure = loss_closure(m, x, y)

    def plain():
        plain_opt.zero_grad()
        plain_closure()
        plain_opt.step()

    out["plain"] = plain
    m = fresh()
    out["SAM"] = two_pass(SAM(m.parameters(), torch.optim.SGD, rho=rho, **sgd), m)
    m = fresh()
    out["GSAM"] = two_pass(GSAM(m.parameters(), torch.optim.SGD, rho=rho, alpha=0.1, **sgd), m)
    m = fresh()
    out["LookSAM"] = two_pass(LookSAM(m.parameters(), torch.optim.SGD, rho=rho, k=5, alpha=0.7, **sgd), m)
    m = fresh()
    out["WSAM"] = two_pass(WSAM(m.parameters(), torch.optim.SGD, rho=rho, gamma=0.9, **sgd), m)
    m = fresh()
    out["FriendlySAM"] = two_pass(FriendlySAM(m.parameters(), torch.optim.SGD, rho=rho, **sgd), m)
    m = fresh()
    out["BayesianSAM"] = two_pass(BayesianSAM(m.parameters(), num_data=50000, lr=0.01, rho=rho, seed=0), m)

    m = fresh()
    esam = ESAM(m.parameters(), torch.optim.SGD, rho=rho, beta=0.6, gamma=0.5, seed=0, **sgd)

    def esam_closure(mask=None, m=m):
        xb, yb = (x, y) if mask is None else (x[mask], y[mask])
        return F.cross_entropy(m(xb), yb, reduction="none")

    out["ESAM"] = lambda: esam.step(esam_closure)

    m = fresh()
    mesa = MESA(m.parameters(), torch.optim.SGD, model=m, **sgd)

    def mesa_step(m=m):
        mesa.zero_grad()
        out_ = m(x)
        (F.cross_entropy(out_, y) + mesa.trajectory_loss(out_, x)).backward()
        mesa.step()

    out["MESA"] = mesa_step

    if peer_lib is None:
        return out

    def backward_then_step(opt, model):  # the peer's documented usage
        closure = loss_closure(model, x, y)

        def fn():
            opt.zero_grad()
            closure()
            opt.step(closure)

        return fn

    m = fresh()
    base = torch.optim.SGD(m.parameters(), **sgd)
    sched = peer_lib.ProportionScheduler(types.SimpleNamespace(last_lr=[0.01]), max_lr=0.01, min_lr=0.01,
                                         max_value=rho, min_value=rho)
    peer_gsam = peer_lib.GSAM(m.parameters(), base, m, sched, alpha=0.1)

    def gsam_closure(m=m, base=base):
        base.zero_grad()
        with torch.enable_grad():
            o = m(x)
            loss = F.cross_entropy(o, y)
        loss.backward()
        return o, loss.detach()

    out["p_opt GSAM"] = lambda: peer_gsam.step(gsam_closure)
    m = fresh()
    out["p_opt LookSAM"] = backward_then_step(
        peer_lib.LookSAM(m.parameters(), torch.optim.SGD, rho=rho, k=5, alpha=0.7, **sgd), m)
    m = fresh()
    peer_wsam = peer_lib.WSAM(m, m.parameters(), torch.optim.SGD, rho=rho, gamma=0.9, **sgd)
    wsam_closure = loss_closure(m, x, y)
    out["p_opt WSAM"] = lambda: (peer_wsam.zero_grad(), peer_wsam.step(wsam_closure))
    m = fresh()
    out["p_opt FriendlySAM"] = backward_then_step(
        peer_lib.FriendlySAM(m.parameters(), torch.optim.SGD, rho=rho, **sgd), m)
    m = fresh()
    peer_bsam = peer_lib.BSAM(m.parameters(), num_data=50000, lr=0.01, rho=rho)

    def bsam_closure(m=m):
        peer_bsam.zero_grad()
        return loss_closure(m, x, y)()

    bsam_closure()  # its state is created from existing gradients (first call only)
    # It never removes its noise and ascent from the weights, so they drift
    # and overflow after some tens of steps: start again every 10 steps
    # (a weight copy, ~1% of a step).
    start = ({k: v.clone() for k, v in m.state_dict().items()}, copy.deepcopy(peer_bsam.state_dict()))
    calls = [0]

    def peer_bsam_step(m=m):
        calls[0] += 1
        if calls[0] % 10 == 0:
            m.load_state_dict(start[0])
            peer_bsam.load_state_dict(start[1])
        peer_bsam.step(bsam_closure)

    out["p_opt BayesianSAM"] = peer_bsam_step
    return out


def print_family_table(title, rows):
    names = ["SAM", "GSAM", "LookSAM", "WSAM", "FriendlySAM", "BayesianSAM", "ESAM", "MESA"]
    print(title)
    for case, med in rows:
        print(f"  {case}  (plain step {med['plain']:.2f} ms)")
        header = f"    {'optimizer':<14}{'ms/step':>10}{'x plain':>10}{'p_opt ms':>10}{'p_opt x':>10}{'ours/p_opt':>12}{'target':>9}"
        print(header)
        for n in names:
            ours = med[n]
            peer = med.get(f"p_opt {n}")
            target = FAMILY_TARGETS.get(n)
            print(
                f"    {n:<14}{ours:>10.2f}{ours / med['plain']:>9.2f}x"
                + (f"{peer:>10.2f}{peer / med['plain']:>9.2f}x{ours / peer:>11.2f}x" if peer else f"{'-':>10}{'-':>10}{'-':>12}")
                + (f"{'<=' + format(target, '.2f'):>9}" if target else f"{'':>9}")
            )
    print()


def measure(steppers, args, device):
    """Median (ms) over repeats of the mean time per step in a block; the
    contenders are interleaved so that machine load hits them alike."""
    for fn in steppers.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in steppers}
    for _ in range(args.repeats):
        for k, fn in steppers.items():
            times[k].append(seconds(fn, device, args.steps))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def print_table(title, rows):
    print(title)
    header = f"{'model':<44}{'plain ms':>10}{'flatness ms':>13}{'p_opt ms':>10}{'ours/plain':>12}{'ours/p_opt':>12}"
    print(header)
    print("-" * len(header))
    for name, med in rows:
        peer = med.get("pytorch_optimizer")
        print(
            f"{name:<44}{med['plain']:>10.2f}{med['flatness']:>13.2f}"
            + (f"{peer:>10.2f}" if peer else f"{'-':>10}")
            + f"{med['flatness'] / med['plain']:>11.2f}x"
            + (f"{med['flatness'] / peer:>11.2f}x" if peer else f"{'-':>12}")
        )
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads on CPU (default 1: stable timings on a shared machine; 0 keeps torch's default)")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="2 repeats of 2 steps (smoke run)")
    ap.add_argument("--family-only", action="store_true",
                    help="only the SAM-family table (GSAM, LookSAM, WSAM, F-SAM, bSAM, ESAM, MESA)")
    ap.add_argument("--cases", default="all", help="comma-separated case indices (0 MLP, 1 CNN, 2 Transformer)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 2, 1
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})")
          + f", threads {torch.get_num_threads()}, base SGD(momentum=0.9), rho={args.rho}")
    print(f"median over {args.repeats} repeats of {args.steps} steps, after {args.warmup} warm-up steps, "
          "contenders interleaved")
    if PeerSAM is None:
        print("pytorch_optimizer is not installed: its column is skipped (pip install pytorch_optimizer)")
    print()
    t_start = time.perf_counter()
    full, alone, family = [], [], []
    chosen = cases(device)
    if args.cases != "all":
        chosen = [chosen[int(i)] for i in args.cases.split(",")]
    for name, make_model, data in chosen:
        if not args.family_only:
            full.append((name, measure(make_steppers(make_model, data, device, args.rho), args, device)))
            alone.append((name, measure(optimizer_only_steppers(make_model, device, args.rho), args, device)))
        family.append((name, measure(family_steppers(make_model, data, device, args.rho), args, device)))
    if not args.family_only:
        print_table("Training step (forward-backward passes included; floor for SAM: 2.0x plain):", full)
        print_table("Optimizer work only (fixed gradients; plain = base step, SAM = first_step + second_step):", alone)
    print_family_table("SAM family, training step / plain step (LookSAM k=5; ESAM beta=0.6, gamma=0.5; "
                       "MESA with its EMA forward every step; p_opt = pytorch_optimizer):", family)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

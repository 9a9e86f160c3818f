"""Peak memory per rank of SAM and sharpness on an FSDP2 (``fully_shard``) model.

Two gloo processes on CPU; each ``nn.Linear`` of a wide MLP and the root
are wrapped by ``fully_shard``, so each rank holds half of every parameter
(``P_r`` bytes, the local shard).  For each operation the peak resident
memory of each rank's process above its level before the call (``VmHWM``,
reset through ``/proc/self/clear_refs``, with glibc returning freed blocks
at once, as ``bench_memory.py`` measures on CPU) is reported as a multiple
of ``P_r``; "held" is what the call leaves allocated (SAM's saved
weights).  (The profiler's allocation records miss FSDP's frees of the
all-gathered weights, which it releases by resizing their storage.)  The same operations on the
unsharded model in one process are reported as multiples of its ``P``, for
comparison.  Every operation runs once before it is measured (FSDP's lazy
initialisation, optimizer state).

What to expect per rank: the gradients' shards (1 P_r) as in training; the
forward all-gathers one layer at a time (a layer's full weights: ``world``
times its shard, freed after the layer); SAM adds the saved weights
(1 P_r, held) and its direction; sharpness adds the buffers of the
measurement in shards (the copy of ``w``, the shards themselves holding
``w + d``; APGD: up to three iterate buffers, the gradient, and for linf
the best gradient's signs, one byte each; average case: one draw, freed
before the forward), and each random draw is taken on the full shape of one
parameter before it is sharded (``world`` times that parameter's shard,
briefly).

Usage::

    python benchmarks/bench_fsdp_memory.py            # width 1024, 6 layers (5.3M parameters)
    python benchmarks/bench_fsdp_memory.py --width 2048
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# The resident-memory probe of bench_memory.py (same directory).
from bench_memory import _fixed_mmap_threshold, _status
from torch import nn

import flatness
from flatness.optim import SAM

WORLD = 2


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def peak_and_held(fn) -> tuple[int, int]:
    """Peak and final resident bytes above the level before ``fn`` runs
    (``VmHWM`` reset through ``/proc/self/clear_refs``, Linux)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    peak = _status("VmHWM") - base
    gc.collect()
    return peak, _status("VmRSS") - base


def operations(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``(name, set-up, call)`` per measured operation."""
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)

    def fwd_bwd():
        F.cross_entropy(model(x), y).backward()

    def sam_step():
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        sam.step(closure)

    def clear():
        model.zero_grad(set_to_none=True)

    def with_grads():
        clear()
        fwd_bwd()

    def measure(kind, **kw):
        return lambda: flatness.sharpness(model, (x, y), kind=kind, rho=1e-3, **kw)

    return [
        ("forward-backward", clear, fwd_bwd),
        ("SGD step (momentum)", with_grads, sgd.step),
        ("SAM step (SGD momentum)", clear, sam_step),
        ("sharpness linf, n_iters=5", clear, measure("linf", n_iters=5)),
        ("sharpness adaptive_l2, n_iters=5", clear, measure("adaptive_l2", n_iters=5)),
        ("sharpness avg_l2, n_samples=5", clear, measure("avg_l2", n_samples=5)),
    ]


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, local_bytes: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, setup, call in operations(model, x, y):
        setup()
        call()  # warm: lazy initialisation, optimizer state
        setup()
        if dist.is_initialized():
            dist.barrier()
        peak, held = peak_and_held(call)
        out[name] = (peak / local_bytes, held / local_bytes)
    return out


def _rank(rank: int, init: str, width: int, depth: int, out: str) -> None:
    _fixed_mmap_threshold()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        model = mlp(width, depth)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(4, 64, generator=g), torch.randint(0, 10, (4,), generator=g)
        torch.save((local, run(model, x, y, local)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="cpu only (gloo); any other device is skipped")
    parser.add_argument("--quick", action="store_true", help="smoke run: width 256, 3 layers")
    args = parser.parse_args()
    if args.device != "cpu":
        print(f"# FSDP2 memory per rank is measured on CPU with gloo; skipped on {args.device}")
        return
    if args.quick:
        args.width, args.depth = 256, 3
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(os.path.join(tmp, "init"), args.width, args.depth, tmp), nprocs=WORLD)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    _fixed_mmap_threshold()
    torch.set_num_threads(1)
    model = mlp(args.width, args.depth)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * WORLD, 64, generator=g), torch.randint(0, 10, (4 * WORLD,), generator=g)
    single = run(model, x, y, full)
    print(f"MLP width {args.width}, {args.depth} layers: P = {full / 2**20:.2f} MiB; FSDP2 over {WORLD} "
          f"gloo ranks: P_r = {', '.join(f'{b / 2**20:.2f}' for b, _ in ranks)} MiB (local shards)")
    print()
    print("| operation | 1 process: peak / P | held / P | FSDP2, per rank: peak / P_r | held / P_r |")
    print("| --- | ---: | ---: | ---: | ---: |")
    def spread(values: list[float]) -> str:  # the ranks' range
        low, high = f"{min(values):.2f}", f"{max(values):.2f}"
        return low if low == high else f"{low}-{high}"

    for name, (peak, held) in single.items():
        peaks = spread([r[1][name][0] for r in ranks])
        helds = spread([r[1][name][1] for r in ranks])
        print(f"| {name} | {peak:.2f} | {held:.2f} | {peaks} | {helds} |")


if __name__ == "__main__":
    main()

"""Loss-landscape planes: points per second of ``flatness.landscape.slice``,
side by side with

* ``loss-landscapes`` (``random_plane``, filter-normalised, its defaults:
  it writes the weights of the model it is given, ``deepcopy_model=False``),
* a lean functional loop: ``functional_call`` at each point, nothing else.

All three evaluate the same model on the same data at the same points: the
directions and the grid are the ones ``random_plane`` draws (reconstructed
from its own functions and the same seed), and the values are checked equal
to 1e-6.  The weights ``random_plane`` leaves moved on the model it was
given are reported too.  One thread on CPU.

    python benchmarks/bench_landscape.py [--device cuda] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from _timing import interleaved_medians, sync
from torch import nn
from torch.func import functional_call

import flatness.landscape as L


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn():
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def digits(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target[:n])
    except ImportError:  # the numbers do not depend on the data
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def ll_plane(model, x, y, steps, seed):
    """``loss_landscapes.random_plane`` as users call it (default
    ``deepcopy_model=False``)."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    torch.manual_seed(seed)
    return loss_landscapes.random_plane(model, Loss(F.cross_entropy, x, y), distance=1, steps=steps,
                                        normalization="filter")


def ll_directions(model, steps, seed):
    """The start point, step vectors and grid ``random_plane`` uses, rebuilt
    from its own functions with the same seed."""
    from loss_landscapes.model_interface.model_parameters import (
        orthogonal_to,
        rand_u_like,
    )
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    torch.manual_seed(seed)
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    d1.filter_normalize_(start)
    d2.filter_normalize_(start)
    d1.mul_(((start.model_norm() / 1) / steps) / d1.model_norm())
    d2.mul_(((start.model_norm() / 1) / steps) / d2.model_norm())
    u = [t.detach().clone() for t in d1.parameters]
    v = [t.detach().clone() for t in d2.parameters]
    # Column i sits at i - steps/2 along u; even columns at j + 1 - steps/2
    # along v, odd columns at j - steps/2 (its serpentine walk).
    return u, v


def medians(fns, device, repeats, clock):
    """Median seconds per call, contenders run in rotation after a warm-up.
    ``clock="cpu"`` counts this thread's CPU time: on a shared machine the
    wall clock mostly measures the other processes (one thread does all the
    work here)."""
    if clock == "wall":
        return interleaved_medians(fns, device, repeats)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lean_loop(model, x, y, u, v, a_coords, b_coords):
    params = dict(model.named_parameters())
    names = list(params)
    base = [p.detach() for p in params.values()]
    out = torch.empty(len(a_coords), len(b_coords))
    with torch.no_grad():
        for i, a in enumerate(a_coords):
            for j, b in enumerate(b_coords):
                vals = [w + a * du + b * dv for w, du, dv in zip(base, u, v)]
                out[i, j] = F.cross_entropy(functional_call(model, dict(zip(names, vals)), (x,)), y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, a smaller grid")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="default: this thread's CPU time on CPU (1 thread), wall time on CUDA")
    args = ap.parse_args()
    try:
        import loss_landscapes  # noqa: F401
    except ImportError:
        print("loss-landscapes is not installed (pip install loss-landscapes --no-deps): nothing to compare")
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    steps, repeats = (7, 1) if args.quick else (args.steps, args.repeats)
    x, y = digits(args.samples, device)
    print(f"# device={device}, {steps}x{steps} filter-normalised plane, {len(y)} samples, "
          f"{torch.get_num_threads()} thread(s), median of {repeats}, {clock} clock")
    rows = []
    for name, make in (("MLP 64-256-256-10", mlp), ("CNN 16-32 conv", cnn)):
        torch.manual_seed(0)
        model = make().to(device).eval()
        # 1. loss-landscapes leaves the weights of the model it was given moved
        victim = copy.deepcopy(model)
        before = [p.detach().clone() for p in victim.parameters()]
        ll_values = torch.tensor(ll_plane(victim, x, y, steps, seed=1), dtype=torch.float32)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(victim.parameters(), before))
        # 2. the same points through flatness and the lean loop
        u, v = ll_directions(model, steps, seed=1)
        a = [i - steps / 2 for i in range(steps)]
        b_all = [k - steps / 2 for k in range(steps + 1)]
        ours = L.slice(model, (x, y), [u, v], grid=[a, b_all])
        want = torch.stack([ll_values[i] for i in range(steps)])
        got = torch.stack([ours.loss[i, 1:] if i % 2 == 0 else ours.loss[i, :-1] for i in range(steps)]).float()
        err = float((got - want).abs().max() / want.abs().max())
        lean = lean_loop(model, x, y, u, v, a, b_all)
        err_lean = float((lean - ours.loss.float()).abs().max() / lean.abs().max())
        assert err < 1e-6 and err_lean < 1e-6, (err, err_lean)
        # 3. timing, interleaved: the same steps x steps points each
        b_even = b_all[1:]
        fns = {
            "loss-landscapes": lambda m=model: ll_plane(copy.deepcopy(m), x, y, steps, seed=1),
            "lean loop": lambda m=model, u=u, v=v, a=a, b=b_even: lean_loop(m, x, y, u, v, a, b),
            "flatness": lambda m=model, u=u, v=v, a=a, b=b_even: L.slice(m, (x, y), [u, v], grid=[a, b]),
            "flatness vmap": lambda m=model, u=u, v=v, a=a, b=b_even: L.slice(
                m, (x, y), [u, v], grid=[a, b], engine="vmap", chunk_size=steps),
        }
        sync(device)
        t = medians(fns, device, repeats, clock)
        pts = steps * steps
        rows.append((name, pts / t["loss-landscapes"], pts / t["lean loop"], pts / t["flatness"],
                     t["loss-landscapes"] / t["flatness"], t["lean loop"] / t["flatness"], err, moved,
                     ours.settings["engine"], ours.settings["first_layer"], pts / t["flatness vmap"]))
    print()
    print("| model | loss-landscapes pts/s | lean loop pts/s | flatness pts/s | vs loss-landscapes | vs lean loop "
          "| max rel. diff | loss-landscapes moved weights by | engine (auto) | first-layer shortcut "
          f"| flatness vmap pts/s ({steps} per call) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.2f}x | {r[5]:.2f}x | {r[6]:.1e} "
              f"| {r[7]:.3f} | {r[8]} | {r[9]} | {r[10]:.0f} |")
    print()
    print("The grids have an even number of points, so flatness evaluates one more point, the centre; "
          "the deep copy handed to loss-landscapes in the timed runs costs it under 1 ms.")


if __name__ == "__main__":
    main()

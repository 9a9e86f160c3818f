"""Worst-case sharpness on a language model, against its floor, repeated.

``sharpness(kind="adaptive_linf", n_iters=5)`` on the GPT models of
``bench_scale.py`` (random tokens, no downloads), timed against the median
of three forward-backward passes run beside each call, ``--repeats`` times
in one process (``bench_scale.py`` runs each operation once, under its
memory probe).  For each size it prints the median wall-time ratio (the
floor is 6: five forward-backward passes and one forward pass), the
user-CPU-time ratio and the system time per call.  On a CPU the system
time is the kernel mapping in the call's new buffers page by page (glibc
returns the previous call's to the kernel); run the script with and
without ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch for transparent huge
pages) or glibc's tunables that keep freed memory (both read when the
process starts), or with ``--keep-freed`` (the same two glibc settings made
at run time through ``mallopt``), to see what that costs.  ``--step`` also times APGD's
elementwise step alone over the model's tensors, at two piece sizes of the
fused passes (CPU time, interleaved).

    python benchmarks/bench_sharpness_lm.py                      # 10M, batch 2 x 64, 5 repeats
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_sharpness_lm.py --sizes 10M 50M --step
    GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=1073741824 \
        python benchmarks/bench_sharpness_lm.py --sizes 10M 50M
    python benchmarks/bench_sharpness_lm.py --keep-freed --sizes 10M 50M  # the same, set at run time
    python benchmarks/bench_sharpness_lm.py --quick              # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_scale import GPT, QUICK, SIZES, lm_loss, sharpness_rho

import flatness
from flatness import _apgd, _geometry

try:  # user and system CPU time (Unix)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]


def _times(fn, device: torch.device) -> tuple[float, float, float]:
    """(wall, user, system) seconds of one call of ``fn``."""
    r0 = resource.getrusage(resource.RUSAGE_SELF) if resource else None
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    if r0 is None:
        return wall, 0.0, 0.0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks of up to ``limit`` bytes for reuse.

    ``mallopt(M_MMAP_THRESHOLD)`` serves allocations up to ``limit`` from the
    heap and ``mallopt(M_TRIM_THRESHOLD)`` keeps up to ``limit`` of freed heap
    in the process: the run-time form of ``GLIBC_TUNABLES=
    glibc.malloc.trim_threshold=...:glibc.malloc.mmap_threshold=...``.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1; mallopt returns 1 on success
    return bool(mallopt(-3, limit)) and bool(mallopt(-1, limit))


def step_ms(model: torch.nn.Module, pieces: list[int], repeats: int) -> dict[int, float]:
    """CPU milliseconds of one APGD linf step (``_apgd._linf_step_tensor``
    over every tensor, adaptive) per piece size, interleaved, median."""
    weights = [p.detach() for p in model.parameters()]
    g, x, x_prev, out, values = ([torch.randn_like(w) * 1e-3 for w in weights] for _ in range(5))
    result: dict[int, list[float]] = {n: [] for n in pieces}
    saved = _geometry.BLOCK
    try:
        for _ in range(repeats):
            for n in pieces:
                _geometry.BLOCK = n  # caps the set's piece size
                pset = _geometry.PerturbationSet("linf", 2e-3, weights, adaptive=True)

                def step() -> None:
                    for i in range(len(weights)):
                        _apgd._linf_step_tensor(pset, i, g[i], None, x[i], x_prev[i], out[i], None, values[i],
                                                4e-3, first=False)

                step()  # scratch blocks
                ts = []
                for _ in range(3):
                    t0 = time.process_time()
                    step()
                    ts.append(time.process_time() - t0)
                result[n].append(statistics.median(ts) * 1e3)
    finally:
        _geometry.BLOCK = saved
    return {n: statistics.median(v) for n, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one tiny model, two repeats (smoke test)")
    parser.add_argument("--sizes", nargs="*", default=["10M"], help="of " + ", ".join(SIZES))
    parser.add_argument("--batch", type=int, default=None, help="sequences of 64 tokens (default 2 CPU, 8 CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also time the step alone at two piece sizes")
    parser.add_argument("--keep-freed", action="store_true",
                        help="keep freed memory in the process (glibc's mallopt, set at run time)")
    args = parser.parse_args()
    kept = keep_freed_memory() if args.keep_freed else False
    device = torch.device(args.device)
    batch = args.batch or (2 if device.type == "cpu" else 8)
    sizes = QUICK if args.quick else {k: SIZES[k] for k in args.sizes}
    repeats = 2 if args.quick else args.repeats
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
          f"batch {batch} x 64 tokens; {repeats} repeats; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"mallopt keep-freed: {'set' if kept else 'no'}")
    print()
    print("| model | sharpness / fb, wall (floor / ours) | user CPU / fb's | system time per call | walls |")
    print("|---|---:|---:|---:|---|")
    models = {}
    for label, (vocab, d, layers, heads) in sizes.items():
        torch.manual_seed(0)
        model = models[label] = GPT(vocab, d, layers, heads, 64).to(device)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (batch, 65), generator=g).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def fb() -> None:
            lm_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        def measure() -> None:
            flatness.sharpness(model, (x, y), kind="adaptive_linf", rho=sharpness_rho(model), n_iters=5,
                               loss_fn=lm_loss)

        fb()
        measure()  # warm-up
        walls, users, system = [], [], []
        for _ in range(repeats):
            base = sorted(_times(fb, device) for _ in range(3))[1]
            call = _times(measure, device)
            walls.append(call[0] / base[0])
            users.append(call[1] / max(base[1], 1e-9))
            system.append(call[2])
        wall = statistics.median(walls)
        print(f"| {label} | {wall:.2f} ({6 / wall:.2f}) | {statistics.median(users):.2f} | "
              f"{statistics.median(system) * 1e3:.0f} ms | {' '.join(f'{w:.2f}' for w in walls)} |", flush=True)
    if args.step and device.type == "cpu":
        pieces = [1 << 16, 1 << 18]
        print()
        print("| model | " + " | ".join(f"step, pieces of 2**{n.bit_length() - 1} (CPU ms)" for n in pieces) + " |")
        print("|---|" + "---:|" * len(pieces))
        for label, model in models.items():
            ms = step_ms(model, pieces, repeats)
            print(f"| {label} | " + " | ".join(f"{ms[n]:.1f}" for n in pieces) + " |", flush=True)


if __name__ == "__main__":
    main()

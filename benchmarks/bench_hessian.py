"""Curvature benchmarks, measured side by side in one run.

(a) Batched Hessian-vector products: ``k`` vectors through one ``vmap`` of
    forward-over-reverse (``flatness._products.batch_curvature_products``) versus
    loops of ``k`` double-backward products: (A) reusing one gradient graph
    (one forward, one ``create_graph`` backward, then ``k`` backward passes:
    the strongest form, possible only while one batch's graph is kept) and
    (B) recomputing forward and gradient per vector (what a product over a
    loader costs when graphs are not kept), for k = 1, 8, 32.
(b) Top Hessian eigenvalue to 1e-3 relative error: products and seconds for
    ``flatness.hessian.top_eigenvalues`` (Lanczos), PyHessian's power
    iteration (``pyhessian.hessian.eigenvalues``) and SciPy's ARPACK
    ``eigsh`` on curvlinops' ``HessianLinearOperator``.  The reference value
    is Lanczos run to a residual of 1e-10.  "to 1e-3" counts the products
    until the estimate is first within 1e-3 of the reference (an oracle
    count, fair to every method); "own stop" is each method's own stopping
    rule at tolerance 1e-3, with the error it actually reached.

(c) Engine choice of :class:`flatness._hvp.CurvatureOperator`: for k = 1, 8,
    32 vectors per pass on an MLP, a CNN, a transformer encoder layer and an
    LSTM classifier, the steady-state seconds per ``matmat`` of the engine
    ``"auto"`` picks versus each engine forced, on one batch (graph kept)
    and on a list of 8 batches (graphs rebuilt for every product).
(d) ``top_eigenvalues`` on one batch at tolerance 1e-6, first call included
    (each contender's first call in this process), against
    hessian-eigenthings' Lanczos (same number of Lanczos steps) and
    PyHessian's power iteration (its own stopping rule at the same tol).

The model is an MLP trained for a few epochs on scikit-learn's digits (or
generated data when scikit-learn is missing), float32, batch of 512.  Runs on
CUDA when available (``--device``).  Target: Lanczos needs >= 3x fewer
products than power iteration.

    python benchmarks/bench_hessian.py [--device cuda] [--repeats 5] [--only c,d]

PyHessian declares torchvision, which this project never installs; if
``import pyhessian`` fails for that reason, a stub ``torchvision`` module is
put into ``sys.modules`` here (and only here) so the import succeeds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types

import torch
import torch.nn.functional as F
from _timing import interleaved_medians, sync
from torch import nn

from flatness import hessian
from flatness._params import select_params
from flatness._products import batch_curvature_products, double_backward_hvp


def import_pyhessian():
    try:
        import pyhessian

        return pyhessian, ""
    except ImportError:
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms"):
            sys.modules.setdefault(name, types.ModuleType(name))
        try:
            import pyhessian

            return pyhessian, " (torchvision stubbed in sys.modules)"
        except ImportError:
            return None, ""


def data(device, n=1024):
    try:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.float32)
        y = torch.tensor(y)
    except ImportError:  # pragma: no cover
        g = torch.Generator().manual_seed(0)
        X = torch.randn(n, 64, generator=g)
        y = (X[:, :10].argmax(1) + 0).long()
    return X[:n].to(device), y[:n].to(device)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn():
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def trained(make, X, y, device, epochs=30):
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(y), 128):
            opt.zero_grad()
            F.cross_entropy(model(X[i : i + 128]), y[i : i + 128]).backward()
            opt.step()
    return model.eval()


def bench_batched(device, repeats):
    X, y = data(device, 256)
    rows = []
    for name, make in (("mlp", mlp), ("cnn", cnn)):
        model = trained(make, X, y, device, epochs=3)
        ps = select_params(model)
        for k in (1, 8, 32):
            g = torch.Generator(device=device).manual_seed(k)
            tangents = tuple(torch.randn(k, *p.shape, generator=g, device=device) for p in ps.params)
            one = [tuple(t[i : i + 1] for t in tangents) for i in range(k)]
            fns = {
                "vmap": lambda: batch_curvature_products(model, ps, X, y, tangents, loss_fn=F.cross_entropy),
                "reuse": lambda: double_backward_hvp(model, ps, X, y, tangents, loss_fn=F.cross_entropy),
                "redo": lambda: [double_backward_hvp(model, ps, X, y, t, loss_fn=F.cross_entropy) for t in one],
            }
            t = interleaved_medians(fns, device, repeats)
            rows.append((name, k, t["reuse"] * 1e3, t["redo"] * 1e3, t["vmap"] * 1e3))
    print(f"\n(a) k Hessian-vector products on one batch of 256, {device}  [median of {repeats}]")
    print("    loop A: one forward + create_graph backward, then k backward passes (graph kept)")
    print("    loop B: forward + create_graph backward + backward per vector (as over a loader)")
    print(f"{'model':<6}{'k':>4}{'loop A ms':>11}{'loop B ms':>11}{'vmap ms':>10}{'A/vmap':>9}{'B/vmap':>9}")
    for r in rows:
        print(f"{r[0]:<6}{r[1]:>4}{r[2]:>11.1f}{r[3]:>11.1f}{r[4]:>10.1f}{r[2] / r[4]:>8.2f}x{r[3] / r[4]:>8.2f}x")


def first_within(trace, ref, rel):
    """(products, seconds) when the estimate first came within ``rel``."""
    for n, t, value in trace:
        if abs(value - ref) <= rel * abs(ref):
            return n, t
    return None, None


def bench_top_eigenvalue(device, name, make):
    X, y = data(device, 1024)
    model = trained(make, X, y, device)
    batch = (X[:512], y[:512])
    rel = 1e-3
    ref = hessian.top_eigenvalues(model, batch, tol=1e-10, max_iter=300).eigenvalues[0].item()
    rows = []

    # ours, with the convergence traced through the Lanczos callback
    from flatness._hvp import CurvatureOperator
    from flatness._lanczos import lanczos

    op = CurvatureOperator(model, batch)
    trace = []
    start = time.perf_counter()

    def record(n, ritz):
        sync(device)
        trace.append((n, time.perf_counter() - start, float(ritz[0])))

    lanczos(op.matmat, op.shape[0], 1, tol=1e-12, max_iter=40, generator=torch.Generator(device=device).manual_seed(0),
            device=device, callback=record)
    n_ours, t_ours = first_within(trace, ref, rel)
    start = time.perf_counter()
    own = hessian.top_eigenvalues(model, batch, tol=rel, seed=0)
    t_own = time.perf_counter() - start
    rows.append(("flatness Lanczos", n_ours, t_ours, own.n_hvp, t_own, own.eigenvalues[0].item()))

    pyh, note = import_pyhessian()
    n_pow = None
    if pyh is not None:
        ph = sys.modules["pyhessian.hessian"]  # the package re-exports a class of that name

        original = ph.hessian_vector_product
        trace = []
        state = {"start": 0.0}

        def counted(gradsH, params, v):
            Hv = original(gradsH, params, v)
            sync(device)
            rq = sum(float((a * b).sum()) for a, b in zip(Hv, v))
            trace.append((len(trace) + 1, time.perf_counter() - state["start"], rq))
            return Hv

        ph.hessian_vector_product = counted
        try:
            torch.manual_seed(0)
            m = copy.deepcopy(model)
            state["start"] = time.perf_counter()
            comp = ph.hessian(m, nn.CrossEntropyLoss(), data=batch, cuda=device.type == "cuda")
            comp.eigenvalues(maxIter=300, tol=0.0)  # oracle run: 300 steps at most
            n_pow, t_pow = first_within(trace, ref, rel)
            trace.clear()
            torch.manual_seed(0)
            m = copy.deepcopy(model)
            state["start"] = time.perf_counter()
            comp = ph.hessian(m, nn.CrossEntropyLoss(), data=batch, cuda=device.type == "cuda")
            values, _ = comp.eigenvalues(maxIter=2000, tol=rel)
            t_pow_own = time.perf_counter() - state["start"]
            rows.append(("PyHessian power iteration" + note, n_pow, t_pow, len(trace), t_pow_own, values[0]))
        finally:
            ph.hessian_vector_product = original

    try:
        import curvlinops
        from scipy.sparse.linalg import eigsh

        lin = curvlinops.HessianLinearOperator(
            model, nn.CrossEntropyLoss(), list(model.parameters()), [batch], check_deterministic=False
        ).to_scipy()
        count = {"n": 0}

        def mv(x):
            count["n"] += 1 if x.ndim == 1 else x.shape[1]
            return lin @ x

        from scipy.sparse.linalg import LinearOperator

        wrapped = LinearOperator(lin.shape, matvec=mv, dtype=lin.dtype)
        start = time.perf_counter()
        value = eigsh(wrapped, k=1, which="LA", tol=rel, return_eigenvectors=False)[0]
        rows.append(("curvlinops + scipy eigsh (ARPACK)", None, None, count["n"], time.perf_counter() - start, float(value)))
    except Exception as exc:  # pragma: no cover - peer library missing or changed
        print(f"curvlinops skipped: {exc!r}")

    print(f"\n(b) top Hessian eigenvalue to {rel:g} relative, {name} on digits (trained), batch 512, {device}")
    print(f"    reference (Lanczos, residual 1e-10): {ref:.6f};  n = {op.shape[0]} parameters")
    print(f"{'method':<46}{'HVPs to 1e-3':>13}{'s to 1e-3':>11}{'HVPs own stop':>15}{'s own stop':>12}{'rel. error':>12}")
    for name, n1, t1, n2, t2, value in rows:
        a = "-" if n1 is None else str(n1)
        b = "-" if t1 is None else f"{t1:.3f}"
        print(f"{name:<46}{a:>13}{b:>11}{n2:>15}{t2:>12.3f}{abs(value - ref) / abs(ref):>12.1e}")
    if n_pow is not None and n_ours is not None:
        print(f"power iteration / Lanczos products to 1e-3: {n_pow / n_ours:.1f}x (target >= 3x)")


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


def engine_models(device):
    """(name, model, batch) for the engine benchmark; batches of 64."""
    g = torch.Generator().manual_seed(0)
    X, y = data(device, 256)
    torch.manual_seed(0)
    seq = torch.randn(64, 8, 32, generator=g).to(device)
    tokens = torch.randint(0, 50, (64, 10), generator=g).to(device)
    labels = torch.randint(0, 10, (64,), generator=g).to(device)
    return [
        ("mlp", trained(mlp, X, y, device, epochs=3), (X[:64], y[:64])),
        ("cnn", trained(cnn, X, y, device, epochs=3), (X[:64], y[:64])),
        ("transformer", _Transformer().to(device).eval(), (seq, labels)),
        ("lstm", _LSTM().to(device).eval(), (tokens, labels)),
    ]


def bench_engines(device, repeats):
    from flatness._hvp import CurvatureOperator

    print(f"\n(c) engine choice: ms per matmat with k vectors, batches of 64, {device}  [median of {repeats}]")
    print(f"{'model':<12}{'data':<10}{'k':>4}{'auto picks':>22}{'auto ms':>10}{'fwd-rev ms':>12}{'dbl-bwd ms':>12}"
          f"{'auto/best':>11}")
    for name, model, batch in engine_models(device):
        for label, source in (("1 batch", batch), ("8 batches", [batch] * 8)):
            for k in (1, 8, 32):
                ops = {e: CurvatureOperator(model, source, engine=e)
                       for e in ("auto", "forward-over-reverse", "double-backward")
                       if not (e == "forward-over-reverse" and name == "lstm")}
                n = ops["auto"].shape[0]
                V = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(device)
                t = interleaved_medians({e: (lambda op=op: op.matmat(V)) for e, op in ops.items()}, device, repeats)
                best = min(v for e, v in t.items() if e != "auto")
                fr = t.get("forward-over-reverse")
                print(f"{name:<12}{label:<10}{k:>4}{ops['auto'].engine:>22}{t['auto'] * 1e3:>10.1f}"
                      f"{'n/a' if fr is None else f'{fr * 1e3:.1f}':>12}{t['double-backward'] * 1e3:>12.1f}"
                      f"{t['auto'] / best:>10.2f}x")


FIRST_CALL_CONTENDERS = ("flatness", "hessian-eigenthings", "pyhessian")


def _first_call_setup(device):
    X, y = data(device, 1024)
    model = trained(mlp, X, y, device)
    return model, (X[:256], y[:256])


def first_call_row(device, contender, tol=1e-6, steps=None):
    """One contender's whole run on one batch, timed from its first call in
    a fresh process: ``(label, seconds, products, eigenvalue, steps)``."""
    model, batch = _first_call_setup(device)
    start = time.perf_counter()
    if contender == "flatness":
        r = hessian.top_eigenvalues(model, batch, tol=tol, seed=0)
        return f"flatness top_eigenvalues ({r.engine})", time.perf_counter() - start, r.n_hvp, \
            r.eigenvalues[0].item(), r.n_iter
    if contender == "hessian-eigenthings":
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [batch], he.supervised_loss(F.cross_entropy))
        res = he.lanczos(op, k=1, max_iter=steps, tol=tol, which="LA", seed=0)
        return f"hessian-eigenthings lanczos ({steps} steps)", time.perf_counter() - start, steps, \
            float(res.eigenvalues[0]), steps
    pyh, note = import_pyhessian()
    ph = sys.modules["pyhessian.hessian"]
    torch.manual_seed(0)
    comp = ph.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=device.type == "cuda")
    values, _ = comp.eigenvalues(maxIter=1000, tol=tol)
    return "PyHessian power iteration" + note, time.perf_counter() - start, None, float(values[0]), None


def bench_first_call(device):
    """Each contender in its own process, so that each pays its own first
    call (lazy initialisation, ``torch.func`` decompositions) and nothing
    is warmed up by another; hessian-eigenthings runs as many Lanczos steps
    as flatness needed to reach the tolerance (it has no stopping rule)."""
    import json
    import subprocess

    tol, rows, steps = 1e-6, [], None
    for contender in FIRST_CALL_CONTENDERS:
        cmd = [sys.executable, __file__, "--device", str(device), "--first-call", contender,
               "--steps", str(steps or 0)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
        if not line:
            print(f"{contender} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(line[0][4:])
        steps = steps or row[4]
        rows.append(row)
    model, batch = _first_call_setup(device)
    ref = hessian.top_eigenvalues(model, batch, tol=1e-10, max_iter=300).eigenvalues[0].item()
    print(f"\n(d) top eigenvalue, one batch of 256, tol {tol:g}, first call included "
          f"(each in a fresh process), {device}")
    print(f"{'method':<52}{'seconds':>9}{'HVPs':>7}{'rel. error':>12}")
    for name, sec, n, value, _ in rows:
        print(f"{name:<52}{sec:>9.3f}{'-' if n is None else n:>7}{abs(value - ref) / abs(ref):>12.1e}")

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated sections to run")
    parser.add_argument("--first-call", choices=FIRST_CALL_CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.first_call:  # a child process of section (d)
        import json

        print("ROW " + json.dumps(first_call_row(device, args.first_call, steps=args.steps or None)))
        return
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if "d" in only:  # first: the first-call cost is part of what it measures
        bench_first_call(device)
    if "c" in only:
        bench_engines(device, args.repeats)
    if "a" in only:
        bench_batched(device, args.repeats)
    if "b" in only:
        for name, make in (("MLP", mlp), ("CNN", cnn)):
            bench_top_eigenvalue(device, name, make)


if __name__ == "__main__":
    main()

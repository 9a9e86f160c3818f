r"""The ``python -m flatness`` command line (also installed as ``flatness``).

Two subcommands, each loading a model, an optional checkpoint and a data file,
and writing one JSON document (to ``--output`` or stdout)::

    python -m flatness sharpness --model mymodels:resnet --checkpoint model.pt \
        --data test.npz --n-eval 1024 --batch-size 128 \
        --kind adaptive_linf --rho 0.001 --normalize-logits --n-iters 20
    python -m flatness hessian --model path/to/models.py:make_mlp --data train.pt \
        --quantity eigenvalues --k 3

The reference evaluator's spellings (Andriushchenko et al. 2023,
``eval_sharpness.py``) are accepted too: ``--algorithm m_apgd_linf
--adaptive``, ``--n_eval_sharpness``, ``--bs_sharpness``, ``--model_path``,
``--n_iters``, ``--normalize_logits``, ``--layer_name_pattern``.

Model: ``module:factory`` where ``module`` is an importable dotted name or
a path to a ``.py`` file (run as Python runs a script: the modules beside it
are importable), and ``factory`` a callable (a function or an
``nn.Module`` class, dotted attributes allowed) returning the model;
``--model-kwargs`` passes a JSON object of keyword arguments to it.
Checkpoint: a ``state_dict`` saved with ``torch.save`` (also accepted: a
dict holding it under ``"state_dict"`` / ``"model_state_dict"`` /
``"model"``; a DDP ``"module."`` prefix and a ``torch.compile``
``"_orig_mod."`` prefix are stripped, and a LightningModule's
``"state_dict"`` gives the entries under the attribute holding the model).
Data: a ``.pt`` file holding ``(inputs, targets)`` or a dict with keys
``x``/``y`` or ``inputs``/``targets``, or a ``.npz`` file with those keys.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import flatness
from flatness import hessian as _hessian
from flatness._functional import call_model
from flatness._guard import ModelGuard
from flatness._params import unwrap
from flatness.sharpness import AVERAGE_CASE, KINDS, WORST_CASE, kind_options

DATA_KEYS = (("x", "y"), ("inputs", "targets"), ("X", "y"))
#: reference evaluator's ``--algorithm`` -> our kind (``--adaptive`` prefixes ``adaptive_``)
ALGORITHMS = {"m_apgd_linf": "linf", "m_apgd_l2": "l2", "avg_linf": "avg_linf", "avg_l2": "avg_l2"}
QUANTITIES = ("eigenvalues", "trace", "density", "minimum")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the options of ``hessian`` that each ``--quantity`` takes (argparse dests)
QUANTITY_OPTIONS = {
    "eigenvalues": ("k", "tol", "max_iter", "max_basis", "curvature", "low_memory"),
    "trace": ("method", "n_samples", "curvature"),
    "density": ("n_vectors", "n_steps", "curvature", "low_memory"),
    "minimum": ("method", "n_samples", "granularity"),
}
#: the options of ``sharpness`` that depend on the kind (argparse dests)
SHARPNESS_OPTIONS = ("rho", "n_iters", "restarts", "n_samples", "m", "normalize_logits")


class CLIError(Exception):
    """A problem with the command line's inputs (reported without a traceback)."""


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``module:factory`` (``module`` a dotted name or a ``.py`` path)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise CLIError(f"--model must look like 'module:factory' or 'path/to/file.py:factory', got {spec!r}")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise CLIError(f"model file {str(path)!r} does not exist")
        name = f"_flatness_cli_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise CLIError(f"cannot import {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(file_spec)
        # Registered before exec so that dataclasses/pickling inside it work.
        sys.modules[name] = module
        # As for a script run with python: the file's own directory first on
        # sys.path, so that it imports the modules beside it.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        file_spec.loader.exec_module(module)
    else:
        # ``python -m flatness`` finds modules in the current directory; the
        # installed ``flatness`` script must too.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise CLIError(f"cannot import module {module_part!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{module_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec!r} is not callable (need a function or class returning an nn.Module)")
    return obj


#: what to save instead of a pickled object, by the role of the file
SAVE_INSTEAD = {
    "checkpoint": "save the weights instead: torch.save(model.state_dict(), PATH)",
    "data file": "save the tensors instead: torch.save({'x': inputs, 'y': targets}, PATH) "
                 "or numpy.savez(PATH, x=inputs, y=targets)",
}


def _torch_load(path: str, role: str) -> Any:
    # weights_only: a checkpoint or data file never runs code when loaded.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch.save(model) or a saved TensorDataset: unpickling them could
        # run arbitrary code, and torch's message suggests an option this
        # command line does not have.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CLIError(f"{role} {path!r} holds a pickled Python object{what}, which is not loaded "
                       f"because unpickling can run code; {SAVE_INSTEAD[role]}") from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        # a file that is not torch.save's (text, empty, truncated): the
        # legacy unpickler fails with whatever the first bytes lead it to
        raise CLIError(f"cannot load {role} {path!r} with torch.load (is it a file written by torch.save?): "
                       f"{type(exc).__name__}: {exc}") from exc


def _state_dict(obj: Any, path: str, expected: set[str] | None = None) -> dict[str, Tensor]:
    """The ``state_dict`` a checkpoint holds, with the prefixes of a DDP
    wrapper (``module.``) and of ``torch.compile`` (``_orig_mod.``) removed
    until its names are ``expected`` (the model's own, when given); failing
    that, the entries under one attribute of a wrapper (``model.`` of a
    LightningModule) when their names are exactly ``expected``."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CLIError(f"checkpoint {path!r} does not hold a state_dict (a dict of tensors)")
    # saved from a DDP wrapper (module.) or a torch.compile'd model
    # (_orig_mod.), or both, in either order
    while obj and set(obj) != expected:
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in obj)), None)
        if prefix is None:
            break
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    if expected and set(obj) != expected:
        # a training wrapper's state_dict (a LightningModule holding the
        # network as self.model, beside metrics or a loss module): the
        # entries under one attribute whose names are exactly the model's
        for attr in dict.fromkeys(k.split(".", 1)[0] for k in obj if "." in k):
            inner = {k[len(attr) + 1:]: v for k, v in obj.items() if k.startswith(attr + ".")}
            if set(inner) == expected:
                return inner
    return obj


def load_model(spec: str, kwargs: dict[str, Any], checkpoint: str | None) -> nn.Module:
    """Build the model from its factory and load the checkpoint into it."""
    model = load_factory(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise CLIError(f"checkpoint {checkpoint!r} does not exist")
        state = _state_dict(_torch_load(checkpoint, "checkpoint"), checkpoint, set(unwrap(model).state_dict()))
        try:
            unwrap(model).load_state_dict(state)
        except RuntimeError as exc:
            raise CLIError(f"checkpoint {checkpoint!r} does not fit the model: {exc}") from exc
    return model


def _pick(obj: dict[str, Any], path: str) -> tuple[Any, Any]:
    for kx, ky in DATA_KEYS:
        if kx in obj and ky in obj:
            return obj[kx], obj[ky]
    raise CLIError(
        f"data file {path!r} has keys {sorted(obj)}; expected one of the pairs "
        + ", ".join(f"{a}/{b}" for a, b in DATA_KEYS)
    )


def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype == object:
        raise CLIError("data arrays must be numeric (got an object array)")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_data(path: str) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from a ``.pt`` or ``.npz`` file."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"data file {path!r} does not exist")
    if p.suffix == ".npz":
        # (np.load reads a file that is not a zip archive as a pickle, and
        # refuses it as one)
        if not zipfile.is_zipfile(p):
            raise CLIError(f"data file {path!r} is not a .npz archive (a zip file such as numpy.savez writes)")
        try:
            with np.load(p, allow_pickle=False) as npz:
                x, y = _pick(dict(npz), path)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise CLIError(f"cannot read data file {path!r} as a .npz archive: {type(exc).__name__}: {exc}") from exc
    elif p.suffix in (".pt", ".pth"):
        obj = _torch_load(path, "data file")
        if isinstance(obj, dict):
            x, y = _pick(obj, path)
        elif isinstance(obj, (tuple, list)) and len(obj) == 2:
            x, y = obj
        else:
            raise CLIError(f"data file {path!r} must hold (inputs, targets) or a dict, got {type(obj).__name__}")
    else:
        raise CLIError(f"data file {path!r}: unknown format {p.suffix!r}; use .pt or .npz")
    x, y = _as_tensor(x), _as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise CLIError(f"data file {path!r}: {x.shape[0]} inputs but {y.shape[0]} targets")
    if x.shape[0] == 0:
        raise CLIError(f"data file {path!r} holds no samples")
    if y.dtype.is_floating_point and y.dim() == 1:
        raise CLIError(f"data file {path!r}: the targets are {str(y.dtype).replace('torch.', '')} numbers, "
                       "but the loss is the cross-entropy of class labels: save them as integers "
                       "(e.g. y.astype(numpy.int64))")
    if not y.dtype.is_floating_point:
        y = y.long()  # cross-entropy wants int64 class indices (npz often has int32)
    return x, y


def make_batches(x: Tensor, y: Tensor, n_eval: int | None, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n_eval`` samples in batches of ``batch_size``."""
    if n_eval is not None:
        x, y = x[:n_eval], y[:n_eval]
    return list(zip(x.split(batch_size), y.split(batch_size)))


def accuracy(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device,
             dtype: torch.dtype) -> float | None:
    """Accuracy in eval mode, or ``None`` when the task is not classification."""
    correct = total = 0
    with ModelGuard(model), torch.no_grad():
        for x, y in batches:
            if y.dtype.is_floating_point or y.dim() != 1:
                return None
            x = x.to(device, dtype) if x.dtype.is_floating_point else x.to(device)
            out = call_model(model, x)
            if out.dim() != 2:
                return None
            correct += int((out.argmax(1).cpu() == y).sum())
            total += y.shape[0]
    return correct / total


# --------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"width\": 64}'")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="importable module or .py file path, and the callable that builds the model")
    g.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments for the factory, as a JSON object")
    g.add_argument("--checkpoint", "--model_path", dest="checkpoint", metavar="PATH",
                   help="state_dict saved with torch.save (.pt)")
    g.add_argument("--data", required=True, metavar="PATH",
                   help=".pt holding (inputs, targets) or a dict; .npz with keys x/y or inputs/targets")
    g.add_argument("--n-eval", "--n_eval_sharpness", dest="n_eval", type=_positive_int, metavar="N",
                   help="use the first N samples (default: all)")
    g.add_argument("--batch-size", "--bs_sharpness", dest="batch_size", type=_positive_int, default=128,
                   help="samples per batch (default 128)")
    g.add_argument("--params", "--layer_name_pattern", dest="params", metavar="REGEX",
                   help="measure only parameters whose names match this regular expression")
    g.add_argument("--device", help="e.g. cpu, cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model (default: keep its dtype)")
    g.add_argument("--seed", type=int, default=0, help="seed of the private generator (default 0)")
    g.add_argument("--train", action="store_true", help="measure in train mode (default: eval mode)")
    g.add_argument("--progress", action="store_true", help="tqdm progress bar (needs tqdm)")
    g.add_argument("--output", "-o", metavar="PATH", help="write the JSON here (default: stdout)")


def program_name(argv0: str | None = None) -> str:
    """How the user invoked the command line: ``flatness`` for the installed
    script, ``python -m flatness`` otherwise."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    return "flatness" if Path(argv0).stem == "flatness" else "python -m flatness"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or program_name(),
        description="Measure sharpness and curvature of a saved model; prints JSON.",
    )
    parser.add_argument("--version", action="version", version=f"flatness {flatness.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sharpness,hessian}")

    s = sub.add_parser("sharpness", help="flatness.sharpness: worst-case, average-case or curvature kinds",
                       description="Run flatness.sharpness on a saved model and write the result as JSON.")
    _common(s)
    k = s.add_argument_group("sharpness")
    k.add_argument("--kind", choices=list(KINDS), help="sharpness kind (default adaptive_linf)")
    k.add_argument("--algorithm", choices=list(ALGORITHMS),
                   help="reference evaluator's spelling of the kind (with --adaptive)")
    k.add_argument("--adaptive", action="store_true", help="with --algorithm: the adaptive variant")
    k.add_argument("--rho", type=float, help="perturbation radius (required by perturbation kinds)")
    k.add_argument("--n-iters", "--n_iters", dest="n_iters", type=_positive_int, help="APGD iterations")
    k.add_argument("--restarts", type=int, help="extra APGD runs from random starts")
    k.add_argument("--n-samples", dest="n_samples", type=_positive_int,
                   help="Monte-Carlo draws (average case) or Hessian-vector products (curvature kinds)")
    k.add_argument("--m", type=_positive_int, help="m-sharpness: samples per perturbation (default: the batch)")
    k.add_argument("--normalize-logits", "--normalize_logits", dest="normalize_logits", action="store_true",
                   help="normalize the logits per sample before the loss")

    h = sub.add_parser("hessian", help="flatness.hessian: top eigenvalues, trace, spectral density, minimum sharpness",
                       description="Curvature of the loss of a saved model, written as JSON.")
    _common(h)
    c = h.add_argument_group("curvature")
    c.add_argument("--quantity", choices=QUANTITIES, default="eigenvalues",
                   help="what to compute (default eigenvalues)")
    c.add_argument("--curvature", choices=("hessian", "ggn"), help="Hessian (default) or Gauss-Newton")
    c.add_argument("--k", type=_positive_int, help="eigenvalues: how many (default 1)")
    c.add_argument("--tol", type=float, help="eigenvalues: relative residual tolerance")
    c.add_argument("--max-iter", dest="max_iter", type=_positive_int, help="eigenvalues: Lanczos steps at most")
    c.add_argument("--max-basis", dest="max_basis", type=_positive_int,
                   help="eigenvalues: Lanczos blocks the basis holds at most (thick restarts beyond)")
    c.add_argument(
        "--method", help="trace: hutch++, hutchinson or exact; minimum: gn (default, exact), exact or hutchinson"
    )
    c.add_argument("--n-samples", dest="n_samples", type=_positive_int, help="trace/minimum: products to spend")
    c.add_argument("--granularity", choices=("layer", "neuron"), help="minimum: rescaling per layer or neuron")
    c.add_argument("--n-vectors", dest="n_vectors", type=_positive_int, help="density: random start vectors")
    c.add_argument("--n-steps", dest="n_steps", type=_positive_int, help="density: Lanczos steps per vector")
    c.add_argument("--low-memory", dest="low_memory", action="store_true",
                   help="eigenvalues/density: the three-term Lanczos recurrence without a stored basis "
                        "(memory independent of the steps; eigenvalues only)")
    return parser


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options the user actually set (the library's defaults stay the defaults)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _resolve_kind(args: argparse.Namespace) -> str:
    if args.algorithm is not None:
        if args.kind is not None:
            raise CLIError("give either --kind or --algorithm, not both")
        base = ALGORITHMS[args.algorithm]
        if not args.adaptive:
            return base
        return base.replace("avg_", "avg_adaptive_") if base.startswith("avg_") else f"adaptive_{base}"
    if args.adaptive:
        raise CLIError("--adaptive goes with --algorithm; with --kind name the adaptive kind directly")
    return args.kind or "adaptive_linf"


def _selected(model: nn.Module, pattern: str | None) -> list[str] | None:
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise CLIError(f"--params is not a valid regular expression: {exc}") from exc
    names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and regex.search(n)]
    if not names:
        raise CLIError(f"--params {pattern!r} matches no trainable parameter")
    return names


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _not_applicable(args: argparse.Namespace, valid: Sequence[str], candidates: Sequence[str], choice: str) -> None:
    given = [d for d in candidates if getattr(args, d) not in (None, False)]
    for dest in given:
        if dest not in valid:
            takes = ", ".join(_flag(d) for d in candidates if d in valid) or "none of these options"
            raise CLIError(f"{_flag(dest)} does not apply to {choice} (it takes {takes})")


def check_options(args: argparse.Namespace) -> None:
    """Reject options the chosen measurement does not use (before any work)."""
    if args.command == "sharpness":
        kind = _resolve_kind(args)
        valid = list(kind_options(kind) or ())
        if kind in WORST_CASE or kind in AVERAGE_CASE:
            valid.append("rho")
        _not_applicable(args, valid, SHARPNESS_OPTIONS, f"--kind {kind}")
    else:
        candidates = sorted({d for opts in QUANTITY_OPTIONS.values() for d in opts})
        _not_applicable(args, QUANTITY_OPTIONS[args.quantity], candidates, f"--quantity {args.quantity}")
    if args.progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            raise CLIError("--progress needs tqdm: pip install tqdm (or 'flatness[progress]')") from None


def _open_output(path: str) -> bool:
    """Check that ``--output`` can be written, before the measurement;
    returns whether the file was created here (removed again on failure)."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"--output {path!r} is a directory")
    existed = p.exists()
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise CLIError(f"--output {path!r} cannot be written: {exc.strerror or exc}") from exc
    return not existed


def run(args: argparse.Namespace, prog: str = "python -m flatness",
        argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Carry out one parsed command; returns the JSON document as a dict.

    ``argv`` is the command line recorded in the document (default:
    ``sys.argv[1:]``).
    """
    start = time.perf_counter()
    check_options(args)
    if args.checkpoint is None:
        print(f"{prog} {args.command}: note: no --checkpoint given; measuring the model as "
              f"{args.model} initialises it", file=sys.stderr)
    model = load_model(args.model, args.model_kwargs, args.checkpoint)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise CLIError(f"--device {args.device!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    model = model.to(device)
    if args.dtype is not None:
        model = model.to(DTYPES[args.dtype])
    x, y = load_data(args.data)
    batches = make_batches(x, y, args.n_eval, args.batch_size)
    first = next((p for p in model.parameters()), None)
    if first is None:
        raise CLIError(f"{args.model!r} built a model without parameters")
    common = dict(params=_selected(model, args.params), seed=args.seed, train=args.train, progress=args.progress)

    if args.command == "sharpness":
        kind = _resolve_kind(args)
        options = _given(args, ("n_iters", "restarts", "n_samples", "m"))
        if args.normalize_logits:
            options["normalize_logits"] = True
        result = flatness.sharpness(model, batches, kind=kind, rho=args.rho, **common, **options).to_dict()
    else:
        quantity = args.quantity
        common.update(_given(args, ("curvature",)))
        if quantity == "eigenvalues":
            r = _hessian.top_eigenvalues(model, batches, args.k or 1, **common,
                                         **_given(args, ("tol", "max_iter", "max_basis")), low_memory=args.low_memory)
        elif quantity == "trace":
            r = _hessian.trace(model, batches, **common, **_given(args, ("method", "n_samples")))
        elif quantity == "density":
            r = _hessian.spectral_density(model, batches, **common, **_given(args, ("n_vectors", "n_steps")),
                                          low_memory=args.low_memory)
        else:
            if "curvature" in common:
                raise CLIError("--curvature does not apply to --quantity minimum (it is Hessian-based)")
            r = _hessian.minimum_sharpness(model, batches, **common,
                                           **_given(args, ("method", "n_samples", "granularity")))
        result = {"quantity": quantity, **r.to_dict()}

    return {
        "command": "sharpness" if args.command == "sharpness" else "hessian",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "flatness_version": flatness.__version__,
        "torch_version": torch.__version__,
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "checkpoint": args.checkpoint,
        "data": args.data,
        "n_eval": sum(b[1].shape[0] for b in batches),
        "batch_size": args.batch_size,
        "accuracy": accuracy(model, batches, device, first.dtype),
        "result": result,
        "total_time": time.perf_counter() - start,
    }


def _strict_json(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"``: ``json.dumps`` would write them as
    bare tokens, which strict JSON readers refuse (a NaN can come in with
    ``--model-kwargs``, which Python's JSON reader accepts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m flatness`` and the ``flatness`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    created = False
    try:
        if args.output:
            created = _open_output(args.output)
        doc = run(args, parser.prog, argv)
    except (CLIError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        if created:
            Path(args.output).unlink(missing_ok=True)
        # Bad input is reported like an argparse error: one line, exit code 2
        # (torch's and the library's messages can span lines).
        message = " ".join(str(exc).split())
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")
    text = json.dumps(_strict_json(doc), indent=2, default=str, allow_nan=False)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        return 0
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the reader stopped early (``| head``): no traceback; as the Python
        # docs advise, stdout goes to devnull so the exit flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0

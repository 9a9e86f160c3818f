"""Option checks and errors shared by every measurement: integer, boolean
and radius options, finite losses (:class:`NonFiniteLossError`), and the
optional tqdm progress bars (over an iterable, and :class:`ProductBar` over
curvature-vector products)."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


class NonFiniteLossError(ValueError, FloatingPointError):
    """The loss (or a quantity derived from it) was NaN or infinite, so no
    meaningful measurement exists.

    Raised rather than averaged into a result; it subclasses both
    ``ValueError`` and ``FloatingPointError``.
    """


def require_finite(value: Tensor | float | Sequence[Tensor], what: str) -> None:
    """Raise :class:`NonFiniteLossError` naming ``what`` unless every entry
    of ``value`` (a number, a tensor, or a sequence of tensors, checked
    with one device synchronization for all of them) is finite."""
    if isinstance(value, Tensor):
        ok = _all_finite([value])
    elif isinstance(value, (list, tuple)):
        ok = _all_finite(value)
    else:
        ok = math.isfinite(value)  # type: ignore[arg-type]
    if not ok:
        raise NonFiniteLossError(
            f"{what} is not finite (NaN or inf): check the data and the model for NaN/inf "
            "inputs or outputs, or the loss_fn"
        )


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    # The extremes are finite exactly when every entry is (NaN propagates
    # through them): one pass and two scalars per tensor, where
    # torch.isfinite would build a temporary of the tensor's size and two
    # boolean masks (a parameter-sized check of a curvature product costs
    # about one P).  The flags of all tensors on a device are read back
    # together: one synchronization with a GPU, not one per tensor.
    flags: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.is_floating_point():
            flag = torch.isfinite(torch.stack(_extremes(t.detach()))).all()
        else:
            flag = torch.isfinite(t).all()  # (integers are; complex numbers need the test)
        flags.setdefault(t.device, []).append(flag)
    return all(bool(torch.stack(fs).all()) for fs in flags.values())


def _extremes(t: Tensor) -> list[Tensor]:
    """``aminmax`` of ``t``: of the whole tensor where its elements fill
    their memory (any order of dimensions: a channels-last gradient is read
    in place), else row by row (no contiguous copy of an overlapping or
    gappy view)."""
    if t.dim() <= 1 or _dense(t):
        return list(torch.aminmax(t))
    return [x for row in t for x in _extremes(row)]


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a block of memory without gaps or
    overlaps, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def maybe_progress(
    iterable: Iterable[Any] | None, progress: bool, total: int | None, desc: str,
    *, unit: str = "batch",
) -> Any:
    """A tqdm bar over ``iterable`` (or, with ``iterable=None``, one to update
    by hand) when ``progress`` is true; otherwise ``iterable`` unchanged."""
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install 'flatness[progress]'") from exc
    return tqdm(iterable, total=total, desc=desc, unit=unit)


class ProductBar:
    """A tqdm bar counting curvature-vector products, handed to
    :class:`CurvatureOperator` as ``progress=``.

    The bar opens at the first product, so no bar shows when the inputs are
    refused; ``total`` may be set once the operator's size is known.  tqdm is
    imported here, so a missing tqdm is reported before any work.
    """

    def __init__(self, desc: str, total: int | None = None) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("progress=True needs tqdm: pip install 'flatness[progress]'") from exc
        self._tqdm = tqdm
        self.desc = desc
        self.total = total
        self._bar: Any = None

    def update(self, k: int) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=self.total, desc=self.desc, unit="hvp")
        self._bar.update(k)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def product_bar(progress: bool, desc: str) -> ProductBar | None:
    """A :class:`ProductBar` when ``progress`` is true, else ``None``."""
    return ProductBar(desc) if progress else None


#: The half-precision dtypes: their sums, dot products and small increments
#: are taken in float32 (:func:`working_dtype`), and their perturbed weights
#: checked for what rounding loses.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to reduce, accumulate or draw in for tensors of ``dtype``:
    float32 for float16 / bfloat16 (a half-precision sum keeps 3 significant
    digits, float16 overflows past 65504, ``randn`` draws another stream),
    ``dtype`` itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


#: TF32's relative rounding (10 explicit mantissa bits, as float16)
TF32_EPS = 2.0 ** -10


def kernel_eps(dtype: torch.dtype, device: torch.device) -> float:
    """The relative rounding of ``dtype``'s convolutions and matrix products
    on ``device``, for tolerances that compare two computations of one
    quantity: ``finfo(dtype).eps``, except float32 on a CUDA GPU where
    TF32 may run them (cuDNN's default for convolutions on Ampere and
    later: ``torch.backends.cudnn.allow_tf32``; for matrix products
    ``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul
    precision below ``"highest"``), whose inputs keep 10 bits."""
    eps = float(torch.finfo(dtype).eps)
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        return max(eps, TF32_EPS)
    return eps


def _tf32_allowed() -> bool:
    try:
        conv = torch.backends.cudnn.enabled and torch.backends.cudnn.allow_tf32
        matmul = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    except (AttributeError, RuntimeError):  # a torch that drops the legacy switches: assume it may
        return True
    return bool(conv or matmul)


def is_int(value: Any) -> bool:
    """Whether ``value`` can stand for an integer option: any
    ``numbers.Integral`` (a Python int, a NumPy integer such as ``np.int64``
    from a grid or a config file), not ``bool`` (``np.bool_`` is not
    ``Integral``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` can stand for a real option: any ``numbers.Real``
    (Python ints and floats, NumPy scalars such as ``np.float32``), not
    ``bool`` (``np.bool_`` is not ``Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> Any:
    """Validate an integer option; returns it as a Python int (``None`` as is
    where allowed).

    Any integer (:func:`is_int`: NumPy integers included) is accepted,
    ``bool`` and non-integers such as ``2.0`` are not.
    """
    if value is None and allow_none:
        return value
    if not is_int(value) or value < low:
        raise ValueError(
            f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}"
        )
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean option: only ``True`` / ``False`` (a string such
    as ``"no"`` would otherwise count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_rho(rho: float, *, allow_zero: bool = False) -> float:
    """Validate a perturbation radius; returns it as a Python float.

    Any real number is accepted (NumPy scalars such as ``np.float32`` from a
    grid of radii included), ``bool`` is not.
    """
    if not is_real(rho):
        raise TypeError(f"rho must be a real number, got {type(rho).__name__}")
    rho = float(rho)
    if not math.isfinite(rho):
        raise ValueError(f"rho must be finite, got {rho}")
    if rho < 0 or (rho == 0 and not allow_zero):
        raise ValueError(f"rho must be {'>= 0' if allow_zero else '> 0'}, got {rho}")
    return rho


def check_device(device: Any, name: str = "device") -> torch.device:
    """Validate a device option and return it as a ``torch.device``.

    A ``torch.device``, a string (``"cpu"``, ``"cuda:1"``) or a device index
    is accepted when it names a device that can hold values: ``"meta"``
    (shapes only), a misspelt type and a device that is not available (an
    index past the device count) raise ``ValueError``, anything else
    ``TypeError``.
    """
    if is_int(device):
        device = int(device)  # a NumPy integer index too
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a torch.device, a string such as 'cuda:0' or a device index, "
                        f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{name}={device!r} is not an available device: {exc}") from None
    if dev.type == "meta":
        raise ValueError(f"{name}='meta' holds shapes only, no values; choose a device such as 'cpu' or 'cuda'")
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"{name}={str(dev)!r}: no {dev.type} device is available")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"{name}={str(dev)!r}: there are {count()} {dev.type} device(s)")
    if dev.type == "cuda" and dev.index is None:
        # "cuda" is the current device: with its index it compares equal to
        # a model's device (torch.device("cuda") != torch.device("cuda:0")),
        # so a model already there is not copied
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def user_stacklevel() -> int:
    """Stack level of the first frame outside flatness and torch, for
    ``warnings.warn`` called in the function that calls this one."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith(("flatness.", "torch.")) or name == "flatness"):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1

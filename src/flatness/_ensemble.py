"""An ensemble's outputs, streamed: a list of models and ``data`` or a
precomputed ``(members, samples, classes)`` tensor, in float64 (shared by
the diversity and the calibration metrics of :mod:`flatness.diversity`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatness._checks import require_finite
from flatness._data import iter_batches, to_device
from flatness._distributed import sum_
from flatness._functional import call_model
from flatness._guard import ModelGuard
from flatness._params import unwrap
from flatness._rng import keep_global_rng

OUTPUTS = ("logits", "probs")


def _check_outputs_kind(outputs: str) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")


def _log_probs(raw: Tensor, outputs: str) -> Tensor:
    """Log-probabilities (float64) from logits or probabilities."""
    if outputs == "logits":
        return torch.log_softmax(raw, dim=-1)
    if (raw < 0).any() or not torch.allclose(
        raw.sum(-1), torch.ones((), dtype=raw.dtype, device=raw.device), atol=1e-3
    ):
        raise ValueError(
            "outputs='probs' needs non-negative rows that sum to 1; pass outputs='logits' "
            "for unnormalized scores"
        )
    return torch.log(raw)


def _check_targets(targets: Tensor, n: int, n_classes: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be a 1-d tensor of {n} class indices, got "
            f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
    if n and (targets.min() < 0 or targets.max() >= n_classes):
        raise ValueError(f"targets must lie in [0, {n_classes}), got values outside")
    return targets.long()


def _check_classes(c: int) -> None:
    # One score per sample: the argmax is always class 0 and the softmax
    # always 1, so every metric would come out trivially (no disagreement).
    if c < 2:
        raise ValueError(
            f"members must return scores of at least 2 classes, got {c}; for a binary classifier "
            "with one logit z, return torch.cat([torch.zeros_like(z), z], dim=-1)"
        )


def _member_devices(members: Sequence[nn.Module]) -> list[tuple[torch.device, torch.dtype]]:
    out = []
    for i, m in enumerate(members):
        if not isinstance(m, nn.Module):
            raise TypeError(f"members[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        p = next(unwrap(m).parameters(), None)
        if p is None:
            raise ValueError(f"members[{i}] has no parameters")
        out.append((p.device, p.dtype))
    return out


class _Ensemble:
    """Validated ensemble input: models + data, or a tensor of outputs.

    :meth:`chunks` yields ``(raw, log_probs, targets)`` with ``raw`` and
    ``log_probs`` of shape ``(members, b, classes)`` in float64 and
    ``targets`` of shape ``(b,)`` (``None`` when none were given, and for
    models with data when the metric needs none).
    """

    def __init__(
        self,
        members: Any,
        data: Any,
        targets: Tensor | None,
        outputs: str,
        *,
        min_members: int,
        need_targets: bool,
        what: str,
    ) -> None:
        _check_outputs_kind(outputs)
        self.outputs = outputs
        self.need_targets = need_targets
        if isinstance(members, Tensor):
            if data is not None:
                raise TypeError(
                    "pass either models with data, or a tensor of outputs with targets=; "
                    "got a tensor and data"
                )
            if members.dim() != 3 or not members.is_floating_point():
                raise ValueError(
                    "precomputed outputs must be a floating tensor of shape "
                    f"(members, samples, classes), got {tuple(members.shape)} {members.dtype}"
                )
            m, n, c = members.shape
            if n == 0 or c == 0:
                raise ValueError(f"outputs have no samples or no classes: shape {(m, n, c)}")
            _check_classes(c)
            self.tensor: Tensor | None = members.detach().to(torch.float64)
            require_finite(self.tensor, "the precomputed outputs")
            self.n_members = m
            if targets is not None:
                targets = _check_targets(targets, n, c).to(self.tensor.device)
            elif need_targets:
                raise ValueError(f"{what} needs targets= (the labels) with precomputed outputs")
            self.targets = targets
            self.models: list[nn.Module] = []
        else:
            if isinstance(members, nn.ModuleList):
                members = list(members)
            if isinstance(members, nn.Module) or not isinstance(members, Sequence):
                raise TypeError(
                    "members must be a list of models or a tensor of shape "
                    f"(members, samples, classes), got {type(members).__name__}"
                )
            if data is None:
                raise ValueError("data is required when members are models")
            if targets is not None:
                raise TypeError("targets= is only for precomputed outputs; data carries the labels")
            self.models = list(members)
            self.n_members = len(self.models)
            self.devices = _member_devices(self.models)
            self.data = data
            self.tensor = None
        if self.n_members < min_members:
            raise ValueError(
                f"{what} needs at least {min_members} members, got {self.n_members}"
            )

    def chunks(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        if self.tensor is not None:
            raw = self.tensor
            yield raw, _log_probs(raw, self.outputs), self.targets
            return
        device, dtype = self.devices[0]
        # the loader's base seed comes from the global RNG
        with contextlib.ExitStack() as stack, torch.no_grad(), keep_global_rng(torch.device("cpu")):
            for m in self.models:
                stack.enter_context(ModelGuard(m))
            for inputs, targets in iter_batches(self.data, device=device, dtype=dtype):
                rows = []
                for m, (dev, dt) in zip(self.models, self.devices, strict=True):
                    # unwrap: a DDP forward would broadcast buffers (a collective)
                    out = call_model(unwrap(m), to_device(inputs, dev, dt))
                    if not isinstance(out, Tensor) or out.dim() != 2:
                        raise ValueError(
                            "each member must return a (batch, classes) tensor, got "
                            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                        )
                    rows.append(out.to(device=device, dtype=torch.float64))
                if len({r.shape for r in rows}) > 1:
                    raise ValueError(
                        f"members return different output shapes {sorted({tuple(r.shape) for r in rows})}"
                    )
                raw = torch.stack(rows)
                _check_classes(raw.shape[2])
                require_finite(raw, "a member's outputs")
                # Labels only where the metric uses them: disagreement and the
                # prediction variance also run on unlabelled data (placeholder
                # targets such as -1, or regression targets).
                t = _check_targets(targets, raw.shape[1], raw.shape[2]) if self.need_targets else None
                yield raw, _log_probs(raw, self.outputs), t


def _predictions(raw: Tensor) -> Tensor:
    # torch.argmax returns the first maximal index, like numpy.argmax.
    return raw.argmax(dim=-1)


def _pairwise_counts(ens: _Ensemble) -> tuple[Tensor, Tensor | None, int]:
    """Pairwise disagreement counts, member error counts and sample count."""
    m = ens.n_members
    counts = torch.zeros(m, m, dtype=torch.float64)
    errors: Tensor | None = torch.zeros(m, dtype=torch.float64)
    n = 0
    for raw, _, targets in ens.chunks():
        pred = _predictions(raw).cpu()
        counts += (pred[:, None, :] != pred[None, :, :]).sum(-1).double()
        if targets is None:
            errors = None
        elif errors is not None:
            errors += (pred != targets.cpu()[None]).sum(-1).double()
        n += pred.shape[1]
    return sum_(counts, errors, n)  # over all ranks inside a process group


def _mean_offdiagonal(matrix: Tensor) -> float:
    m = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (m * (m - 1)))

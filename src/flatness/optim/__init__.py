"""Sharpness-aware optimizers.

:class:`SAM` (and ASAM with ``adaptive=True``) wraps any ``torch.optim``
optimizer.  Variants build on :class:`SharpnessAwareOptimizer`, which owns the
perturb / restore machinery and exposes :meth:`~SharpnessAwareOptimizer.ascent_direction`
as the one hook to override (see ``flatness/optim/_base.py``).
"""

from __future__ import annotations

from ._base import (
    AscentGroup,
    GroupSettings,
    ScaledDirection,
    SharpnessAwareOptimizer,
    disable_running_stats,
    global_norm,
)
from .consistent import ConsistentSAM, NonuniformSAM
from .sam import SAM
from .subset import subset_sam_step

__all__ = [
    "SAM",
    "AscentGroup",
    "GroupSettings",
    "ScaledDirection",
    "ConsistentSAM",
    "NonuniformSAM",
    "SharpnessAwareOptimizer",
    "disable_running_stats",
    "global_norm",
    "subset_sam_step",
]

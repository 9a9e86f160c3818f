"""Sharpness-aware optimizers.

:class:`SAM` (and ASAM with ``adaptive=True``) wraps any ``torch.optim``
optimizer.  Variants build on :class:`SharpnessAwareOptimizer`, which owns the
perturb / restore machinery and exposes :meth:`~SharpnessAwareOptimizer.ascent_direction`
as the one hook to override (see ``flatness/optim/_base.py``); the math of
the built-in variants is in functions on lists of tensors
(``flatness/optim/_functional.py``, ``flatness/optim/_family_functional.py``).

The SAM family on that base: :class:`GSAM`, :class:`LookSAM`, :class:`WSAM`,
:class:`FriendlySAM`, :class:`ESAM`, :class:`MESA` and :class:`BayesianSAM`.
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
from .bsam import BayesianSAM
from .consistent import ConsistentSAM, NonuniformSAM
from .esam import ESAM
from .gsam import GSAM, LookSAM
from .mesa import MESA
from .sam import SAM
from .subset import subset_sam_step
from .wsam import WSAM, FriendlySAM

__all__ = [
    "SAM",
    "AscentGroup",
    "BayesianSAM",
    "GroupSettings",
    "ScaledDirection",
    "ConsistentSAM",
    "ESAM",
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "MESA",
    "NonuniformSAM",
    "SharpnessAwareOptimizer",
    "WSAM",
    "disable_running_stats",
    "global_norm",
    "subset_sam_step",
]

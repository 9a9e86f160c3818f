"""flatness: measure and optimize the flatness of neural-network minima."""

from __future__ import annotations

__version__ = "0.1.0"

from . import diversity, hessian, landscape, nonuniformity, optim
from ._distributed import local_only

# The function shadows its module on purpose: ``flatness.sharpness(...)`` is
# the front door; the module stays importable as ``flatness.sharpness``
# through ``sys.modules`` (``from flatness.sharpness import KINDS``).
from .sharpness import NonFiniteLossError, SharpnessResult, sharpness

__all__ = [
    "NonFiniteLossError",
    "SharpnessResult",
    "__version__",
    "diversity",
    "hessian",
    "landscape",
    "local_only",
    "nonuniformity",
    "optim",
    "sharpness",
]

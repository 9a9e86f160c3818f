"""Ensemble diversity, ensemble metrics and the pieces of SharpBalance.

Every metric takes the ensemble in one of two forms:

* a list of models and ``data`` (one batch ``(inputs, targets)`` or any
  iterable of batches, e.g. a ``DataLoader``).  The batches are streamed: each
  batch goes through every member (in eval mode, under ``torch.no_grad``) and
  only running sums are kept.  The members come back in the mode they were in.
* precomputed outputs: a tensor of shape ``(members, samples, classes)``
  holding logits (``outputs="logits"``, the default) or probabilities
  (``outputs="probs"``), plus ``targets=`` (shape ``(samples,)``) where the
  metric needs labels.

All arithmetic is in float64.  A member's prediction is the ``argmax`` of its
outputs; ties go to the lowest class index (as ``numpy.argmax``).  The
ensemble predicts with the mean of the members' probabilities.

SharpBalance (Lu et al., 2024) trains each member
with SAM on a subset of the data chosen from every member's per-sample
sharpness: :func:`per_sample_sharpness` gives the scores,
:func:`sharpbalance_split` the subsets (and :func:`random_split` the
baselines), and :func:`flatness.optim.subset_sam_step` takes the mixed step.
"""

from __future__ import annotations

from flatness._calibration import EnsembleMetrics, ensemble_metrics, fit_temperature
from flatness._diversity import disagreement, disagreement_error_ratio, prediction_variance
from flatness._ensemble import OUTPUTS as OUTPUTS
from flatness._sharpbalance import SHARPNESS_KINDS as SHARPNESS_KINDS
from flatness._sharpbalance import per_sample_sharpness, random_split, sharpbalance_split

__all__ = [
    "EnsembleMetrics",
    "disagreement",
    "disagreement_error_ratio",
    "ensemble_metrics",
    "fit_temperature",
    "per_sample_sharpness",
    "prediction_variance",
    "random_split",
    "sharpbalance_split",
]

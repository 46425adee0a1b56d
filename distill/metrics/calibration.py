"""Calibration of segmentation and classification outputs: expected calibration error (ECE) and
reliability-diagram bins.

Segmentation (teachers and students alike): the foreground probability of every voxel
(1 - softmax background) against the voxel's foreground label, 15 equal-width confidence bins,
ECE = sum over bins of (voxels in bin / voxels) x |mean foreground rate - mean probability|
(the value of torchmetrics' ``binary_calibration_error``, ``norm="l1"``, computed from bin sums so
that a volume is scored chunk by chunk), per volume; tables average the per-volume values. Frame classifiers: torchmetrics' ``MulticlassCalibrationError`` (top-1
confidence, 15 bins).

Bins follow torchmetrics: bin ``i`` holds probabilities in ``[i / 15, (i + 1) / 15)`` and a 16th
slot holds probability exactly 1.
"""

from __future__ import annotations

import torch

N_BINS = 15


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) logits -> (N, ...) probability of any foreground class (1 - softmax background), float64."""
    return 1.0 - logits.double().softmax(dim=1)[:, 0]


def reliability_bins(probability: torch.Tensor, label: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """(3, n_bins + 1) float64 sums per bin, on ``probability``'s device: voxel count, probability sum,
    foreground-label sum, of probabilities and binary labels of the same shape (any shape). Sums of
    several chunks add up to the sums of their union."""
    probability = probability.reshape(-1).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probability.device)
    index = torch.bucketize(probability, edges, right=True) - 1
    sums = torch.zeros(3, n_bins + 1, dtype=torch.float64, device=probability.device)
    for row, values in enumerate((torch.ones_like(probability), probability, label.reshape(-1).double())):
        sums[row].scatter_add_(0, index, values)
    return sums


def ece_of_bins(bins: torch.Tensor) -> float:
    """ECE of :func:`reliability_bins` sums: torchmetrics' ``binary_calibration_error(n_bins, norm="l1")`` of
    the voxels they count."""
    count, probability, frequency = bins.double()
    return float(((frequency - probability).abs()).sum() / count.sum())


#: The file a segmentation test run writes in its log folder: its test volumes' pooled reliability bins.
CALIBRATION_FILE = "calibration.json"


def reliability_record(bins: torch.Tensor) -> dict:
    """JSON-ready :func:`reliability_bins` sums: ``{"bins", "count", "probability_sum", "foreground_sum", "ece"}``
    (``ece``: of the pooled voxels)."""
    count, probability, foreground = bins.double().cpu().tolist()
    return {
        "bins": len(count) - 1,
        "count": count,
        "probability_sum": probability,
        "foreground_sum": foreground,
        "ece": ece_of_bins(bins),
    }

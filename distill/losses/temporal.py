"""Phase-segmentation losses for temporal models (MS-TCN, Farha & Gall, CVPR 2019)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["phase_segmentation_loss", "truncated_mse_smoothing"]


def truncated_mse_smoothing(logits: Tensor, clamp: float = 16.0, valid: Tensor | None = None) -> Tensor:
    """MS-TCN smoothing loss: truncated squared difference of consecutive frame log-probabilities.

    ``mean over (b, c, t) of min((log p_t - log p_{t-1})^2, clamp)``, with ``log p_{t-1}``
    detached and ``clamp`` = tau^2 = 16 as in MS-TCN; the mean runs over the frame pairs whose
    two frames are both valid.

    Args:
        logits: (B, C, T).
        clamp: upper bound of each squared difference.
        valid: optional (B, T) bool, False on padding / unlabelled frames.

    Returns:
        scalar (0 when no valid pair).
    """
    log_probs = F.log_softmax(logits, dim=1)
    squared = (log_probs[:, :, 1:] - log_probs[:, :, :-1].detach()).pow(2).clamp(0, clamp)  # (B, C, T-1)
    if valid is None:
        return squared.mean() if squared.numel() else squared.sum()
    pairs = (valid[:, 1:] & valid[:, :-1]).unsqueeze(1)  # (B, 1, T-1)
    return (squared * pairs).sum() / (pairs.sum() * logits.shape[1]).clamp_min(1)


def phase_segmentation_loss(
    stage_logits: Tensor,
    target: Tensor,
    smoothing_weight: float = 0.15,
    ignore_index: int = -1,
    class_weights: Tensor | None = None,
    clamp: float = 16.0,
) -> Tensor:
    """Sum over stages of cross-entropy + ``smoothing_weight`` x :func:`truncated_mse_smoothing`.

    MS-TCN uses ``smoothing_weight`` 0.15 (the reference code of Ding et al. used 1.0).

    Args:
        stage_logits: (S, B, C, T) logits of every stage, or (B, C, T) for one stage.
        target: (B, T) phase indices, ``ignore_index`` on padding / unlabelled frames.
        class_weights: optional (C,) cross-entropy weights.

    Returns:
        scalar.
    """
    if stage_logits.ndim == 3:
        stage_logits = stage_logits.unsqueeze(0)
    num_stages, batch, _, frames = stage_logits.shape
    if target.shape != (batch, frames):
        raise ValueError(
            f"phase_segmentation_loss: target {tuple(target.shape)} must be (B, T) = {(batch, frames)} "
            f"for logits {tuple(stage_logits.shape)}"
        )
    # Every stage has the same target, so the sum of per-stage means is S x the mean over stages.
    logits = stage_logits.flatten(0, 1)  # (S * B, C, T)
    targets = target.repeat(num_stages, 1)  # (S * B, T)
    cross_entropy = F.cross_entropy(logits, targets, weight=class_weights, ignore_index=ignore_index)
    smoothing = truncated_mse_smoothing(logits, clamp, valid=targets != ignore_index)
    return num_stages * (cross_entropy + smoothing_weight * smoothing)

"""Momentum-contrast losses: (1 + K) similarity logits, InfoNCE, and their distillation.

The module weights the terms; the paper's total is ``info_nce_loss + 5 * similarity_distillation_loss``
(the reference code's total was accidentally ``2 * info_nce_loss + 5 * ...``, which is the same
pieces with other weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.kd import soft_kl_divergence

__all__ = ["contrastive_logits", "info_nce_loss", "similarity_distillation_loss"]


def contrastive_logits(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo logits ``[q . k, q . queue_1, ..., q . queue_K] / tau``, the positive first.

    Args:
        query: (B, D) unit-norm query embeddings.
        key: (B, D) unit-norm key embeddings of the other view (no gradient needed).
        queue: (K, D) unit-norm negatives (:class:`~distill.models.ssl.MemoryQueue` output).
        temperature: tau > 0 (checked where it is configured: the module's ``PositiveFloat`` option).

    Returns:
        (B, 1 + K).
    """
    if query.shape != key.shape or query.ndim != 2 or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"contrastive_logits: query {tuple(query.shape)} and key {tuple(key.shape)} must be (B, D) "
            f"and the queue {tuple(queue.shape)} (K, D)"
        )
    positive = (query * key).sum(1, keepdim=True)
    negatives = query @ queue.T
    return torch.cat([positive, negatives], dim=1) / temperature


def info_nce_loss(logits: Tensor) -> Tensor:
    """InfoNCE: cross-entropy of (B, 1 + K) logits with the positive (column 0) as target; scalar."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def similarity_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))`` over the (1 + K) similarities, batch mean.

    The logits already carry the contrastive temperature tau (:func:`contrastive_logits`);
    ``temperature`` is an extra KD softening T, scaled by ``T^2`` as in
    :func:`~distill.losses.kd.soft_kl_divergence`. The default T = 1 is the paper's loss.
    Column j of both must come from the same sample (queues filled from the same batches).

    Args:
        student_logits: (B, 1 + K).
        teacher_logits: (B, 1 + K), detached.
    """
    return soft_kl_divergence(student_logits, teacher_logits, temperature, dim=1)

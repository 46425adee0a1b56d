"""Combining several teachers' soft predictions into one distillation target.

Teacher logits arrive stacked as ``(K, B, C, H, W)``. A weighting rule gives each teacher a
weight per pixel (or per sample, broadcast over its pixels), ``(K, B, H, W)``, summing to 1
over K; the target is the weighted mixture of the teachers' softened distributions:

    p_target = sum_k w_k * softmax(z_k / T)

and the student learns it through the one ``T^2``-scaled KL,
:func:`distill.losses.kd.soft_target_kl` (re-exported here).

Rules:
- ``mean``: ``w_k = 1 / K``.
- ``confidence``: ``w = softmax_k(-H_k)``, with ``H_k`` the entropy of teacher k's (T = 1)
  prediction: sure teachers count more.
- ``performance`` (CA-MKD, Zhang et al. 2022): ``w = (1 - softmax_k(L_k)) / (K - 1)``, with ``L_k``
  teacher k's cross-entropy against the ground truth: teachers that are right on this sample
  count more. Needs the labels: on unlabelled samples (semi-supervised batches) it gives the
  ``mean`` weights, as no label says which teacher is right there.
- ``learned``: ``w = softmax_k(g)`` from a gating network's logits ``g`` (B, K, H, W), trained
  with :func:`gate_nll_loss` on the labelled samples only; the gate, which sees the image and
  the teachers' predictions but no label, then weighs the teachers on unlabelled samples too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.kd import soft_target_kl

__all__ = [
    "WEIGHTING_RULES",
    "combine_soft_targets",
    "gate_nll_loss",
    "soft_target_kl",
    "teacher_weights",
]

WEIGHTING_RULES = ("mean", "confidence", "performance", "learned")
Granularity = Literal["pixel", "sample"]


def _per_sample(values: Tensor, granularity: Granularity) -> Tensor:
    """(K, B, H, W) -> same shape, averaged over pixels when ``granularity == "sample"``."""
    return values.mean(dim=(-2, -1), keepdim=True).expand_as(values) if granularity == "sample" else values


def teacher_weights(
    rule: str,
    teacher_logits: Tensor,
    label: Tensor | None = None,
    gate_logits: Tensor | None = None,
    granularity: Granularity = "pixel",
    labelled: Tensor | None = None,
) -> Tensor:
    """Per-teacher weights of the distillation target.

    Args:
        rule: one of :data:`WEIGHTING_RULES`.
        teacher_logits: (K, B, C, H, W).
        label: (B, H, W) int64 class indices (``performance`` only).
        gate_logits: (B, K, H, W) or (B, K, 1, 1) (``learned`` only).
        granularity: ``"pixel"`` (a weight per pixel) or ``"sample"`` (one per image).
        labelled: (B,) bool, True where ``label`` is a real mask (``None``: all are);
            ``performance`` gives the unlabelled samples the ``mean`` weights.

    Returns:
        (K, B, H, W) weights, non-negative, summing to 1 over K.
    """
    num_teachers, batch, _, height, width = teacher_logits.shape
    if rule == "mean":
        return teacher_logits.new_full((num_teachers, batch, height, width), 1.0 / num_teachers)
    if rule == "confidence":
        log_probs = F.log_softmax(teacher_logits.float(), dim=2)
        entropy = -(log_probs.exp() * log_probs).sum(dim=2)  # (K, B, H, W)
        return torch.softmax(-_per_sample(entropy, granularity), dim=0)
    if rule == "performance":
        if label is None:
            raise ValueError("teacher_weights: rule 'performance' needs the labels")
        target = label.unsqueeze(0).expand(num_teachers, -1, -1, -1).reshape(-1, height, width)
        flat = teacher_logits.float().reshape(-1, *teacher_logits.shape[2:])
        loss = F.cross_entropy(flat, target, reduction="none").reshape(num_teachers, batch, height, width)
        if num_teachers == 1:
            return torch.ones_like(loss)
        weights = (1.0 - torch.softmax(_per_sample(loss, granularity), dim=0)) / (num_teachers - 1)
        if labelled is None:
            return weights
        return torch.where(labelled[None, :, None, None], weights, 1.0 / num_teachers)
    if rule == "learned":
        if gate_logits is None:
            raise ValueError("teacher_weights: rule 'learned' needs gate_logits")
        weights = torch.softmax(gate_logits.float(), dim=1).movedim(1, 0)  # (K, B, h, w)
        return weights.expand(num_teachers, batch, height, width) if weights.shape[-2:] == (1, 1) else weights
    raise ValueError(f"unknown teacher weighting rule {rule!r}; available: {', '.join(WEIGHTING_RULES)}")


def combine_soft_targets(teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """``sum_k w_k softmax(z_k / T)``: (K, B, C, H, W) logits, (K, B, H, W) weights -> (B, C, H, W)."""
    probs = torch.softmax(teacher_logits.float() / temperature, dim=2)
    return (weights.unsqueeze(2) * probs).sum(dim=0)


def gate_nll_loss(teacher_logits: Tensor, weights: Tensor, label: Tensor) -> Tensor:
    """How well the gated mixture of teachers (at T = 1) explains the ground truth.

    ``-log sum_k w_k p_k(label)`` averaged over batch and pixels; trains the gate of the
    ``learned`` rule to trust the teacher that is right where it is right.

    Args:
        teacher_logits: (K, B, C, H, W); weights: (K, B, H, W) (with gradient); label: (B, H, W).
    """
    log_probs = F.log_softmax(teacher_logits.float(), dim=2)
    index = label.unsqueeze(0).unsqueeze(2).expand(teacher_logits.shape[0], -1, 1, -1, -1)
    label_log_probs = log_probs.gather(2, index).squeeze(2)  # (K, B, H, W)
    mixture = torch.logsumexp(torch.log(weights.clamp_min(1e-12)) + label_log_probs, dim=0)
    return -mixture.mean()

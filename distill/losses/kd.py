"""Logit distillation: one temperature-scaled soft KL (:func:`soft_target_kl`), used by
pixel-wise Hinton KD and channel-wise distillation here, by the multi-teacher mixture target
(``distill.losses.multi_teacher``) and by the similarity-distribution KL of self-supervised
distillation (``distill.losses.contrastive``).

Teacher logits are the target distribution; pass them detached (or computed under
``torch.no_grad()``) unless the teacher is meant to learn too. Temperatures are checked once,
where they are configured (the modules' ``PositiveFloat`` options, the constructors here); the
functions check only that the two tensors of a call have the same shape, once per call.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ChannelWiseKDLoss",
    "KDLoss",
    "channel_wise_divergence",
    "pixel_kl_divergence",
    "soft_kl_divergence",
    "soft_target_kl",
]

Reduction = Literal["mean", "none"]


def check_temperature(temperature: float, owner: str) -> None:
    """ValueError unless the softening temperature T is > 0 (a constructor's check)."""
    if not temperature > 0:
        raise ValueError(f"{owner}: temperature must be > 0, got {temperature}")


def _check_same_shape(student: Tensor, target: Tensor, owner: str) -> None:
    """ValueError unless the student's tensor and the target's have the same shape."""
    if student.shape != target.shape:
        raise ValueError(
            f"{owner}: student logits {tuple(student.shape)} and teacher logits {tuple(target.shape)} "
            "must have the same shape"
        )


def _kl_to_target(
    student_logits: Tensor, target_probs: Tensor, temperature: float, dim: int, reduction: Reduction
) -> Tensor:
    """:func:`soft_target_kl` without the shape check (every caller makes it once)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=dim)
    divergence = F.kl_div(student_log_probs, target_probs, reduction="none").sum(dim) * temperature**2
    if reduction == "mean":
        return divergence.mean()
    if reduction == "none":
        return divergence
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def soft_target_kl(
    student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0, dim: int = 1, reduction: Reduction = "mean"
) -> Tensor:
    """``T^2 * KL(target || softmax(s / T))`` with the distributions along ``dim``: the one KL.

    The ``T^2`` factor (Hinton et al.) keeps the gradient scale independent of T; at T = 1 this
    is the plain KL divergence.

    Args:
        student_logits: any shape, e.g. (B, C, H, W) class maps or (B, 1 + K) similarities.
        target_probs: same shape, a distribution along ``dim`` (e.g. a teacher's softened
            prediction, or a mixture of several teachers').
        temperature: softening temperature T > 0 of the student.
        dim: the axis that holds each distribution.
        reduction: "mean" averages the KL over all other positions (batch, pixels, ...; for
            (B, N) logits that is the batch mean); "none" returns it per position (``dim`` removed).
    """
    _check_same_shape(student_logits, target_probs, "soft_target_kl")
    return _kl_to_target(student_logits, target_probs, temperature, dim, reduction)


def soft_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    dim: int = 1,
    reduction: Reduction = "mean",
) -> Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``: :func:`soft_target_kl` to a teacher's logits.

    Args:
        student_logits: any shape, e.g. (B, C, H, W) class maps or (B, 1 + K) similarities.
        teacher_logits: same shape.
        temperature, dim, reduction: as in :func:`soft_target_kl`.
    """
    _check_same_shape(student_logits, teacher_logits, "soft_kl_divergence")
    teacher_probs = F.softmax(teacher_logits / temperature, dim=dim)
    return _kl_to_target(student_logits, teacher_probs, temperature, dim, reduction)


def pixel_kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Reduction = "mean"
) -> Tensor:
    """Hinton KD per pixel: :func:`soft_kl_divergence` over the classes (``T^2`` scaled).

    Args:
        student_logits: (B, C, H, W).
        teacher_logits: (B, C, H, W).
        temperature: softening temperature T > 0.
        reduction: "mean" averages over batch and pixels (scalar); "none" returns the (B, H, W)
            per-pixel map, e.g. for per-pixel teacher weighting.
    """
    return soft_kl_divergence(student_logits, teacher_logits, temperature, dim=1, reduction=reduction)


class KDLoss(nn.Module):
    """Pixel-wise Hinton KD (batch and pixel mean of :func:`pixel_kl_divergence`).

    Args:
        temperature: softening temperature T > 0 (4 is the usual choice in medical segmentation).
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature, "KDLoss")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """student_logits, teacher_logits (B, C, H, W) -> scalar."""
        return pixel_kl_divergence(student_logits, teacher_logits, self.temperature)


def channel_wise_divergence(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel becomes a distribution over the H*W positions (softmax of ``x / T``);
    the loss is ``T^2 * KL(teacher || student)`` summed over positions, averaged over B*C.

    Args:
        student: (B, C, H, W) logits or features.
        teacher: (B, C, H, W) logits or features.
        temperature: softening temperature T > 0.

    Returns:
        scalar.
    """
    _check_same_shape(student, teacher, "channel_wise_divergence")  # before flattening: H x W must agree too
    teacher_probs = F.softmax(teacher.flatten(2) / temperature, dim=-1)
    return _kl_to_target(student.flatten(2), teacher_probs, temperature, -1, "mean")


class ChannelWiseKDLoss(nn.Module):
    """Channel-wise distillation loss (:func:`channel_wise_divergence`).

    Args:
        temperature: softening temperature T > 0 (Shu et al. use 4 with loss weight 3).
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature, "ChannelWiseKDLoss")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student, teacher (B, C, H, W) -> scalar."""
        return channel_wise_divergence(student, teacher, self.temperature)

"""Feature-based distillation on intermediate feature maps.

Each module takes lists of student and teacher feature maps (one pair per distilled layer,
e.g. captured with forward hooks) and the batch's labels (only region affinity reads them),
and returns the mean loss over the pairs: ``loss(student_feats, teacher_feats, labels)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.kd import channel_wise_divergence, check_temperature

__all__ = [
    "AdaptedFeatureLoss",
    "AttentionTransferLoss",
    "ChannelWiseFeatureLoss",
    "FeatureMSELoss",
    "RegionAffinityLoss",
    "attention_map",
    "attention_transfer_loss",
    "region_affinity_loss",
]


def _check_pair_count(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], owner: str) -> None:
    """ValueError unless there is one teacher feature map per student feature map, at least one."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"{owner}: got {len(student_feats)} student and {len(teacher_feats)} teacher feature "
            "maps; need the same number, at least one"
        )


def attention_map(features: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (attention transfer, ICLR 2017).

    Args:
        features: (B, C, H, W).
        p: exponent of ``|f|^p`` before the channel mean (2 or 4 are usual).
        size: if given, the channel-pooled map is bilinearly resized to this (H', W') before
            flattening and normalising, so maps of different resolutions can be compared.

    Returns:
        (B, H*W) (or (B, H'*W')): channel mean of ``|f|^p``, flattened, unit L2 norm per sample.
    """
    pooled = features.abs().pow(p).mean(1, keepdim=True)  # (B, 1, H, W)
    if size is not None and tuple(pooled.shape[-2:]) != tuple(size):
        pooled = F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
    return F.normalize(pooled.flatten(1), dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the student and teacher attention maps.

    Needs no channel adapter. The student map is resized to the teacher's spatial size.

    Args:
        student: (B, Cs, Hs, Ws) features.
        teacher: (B, Ct, Ht, Wt) features.
        p: attention exponent.

    Returns:
        scalar ``(a_s - a_t).pow(2).mean()``.
    """
    teacher_map = attention_map(teacher, p)
    student_map = attention_map(student, p, size=tuple(teacher.shape[-2:]))
    return (student_map - teacher_map).pow(2).mean()


class AttentionTransferLoss(nn.Module):
    """Attention transfer over pairs of feature maps (mean of :func:`attention_transfer_loss`).

    Args:
        p: attention exponent.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def forward(
        self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """Lists of (B, Cs_i, Hs_i, Ws_i) and (B, Ct_i, Ht_i, Wt_i) features -> scalar (labels unused)."""
        _check_pair_count(student_feats, teacher_feats, "AttentionTransferLoss")
        pairs = zip(student_feats, teacher_feats)
        losses = [attention_transfer_loss(s, t, self.p) for s, t in pairs]
        return sum(losses) / len(losses)


class AdaptedFeatureLoss(nn.Module):
    """A distance between teacher features and 1x1-conv-adapted student features (FitNets style).

    One trainable 1x1 convolution per pair maps the student's channels to the teacher's; it
    is optimised together with the student. Adapted student features are bilinearly resized
    to the teacher's spatial size when the sizes differ.

    Args:
        student_channels: channels of each student feature map.
        teacher_channels: channels of the matching teacher feature maps.

    Subclasses give the :meth:`distance` of one pair.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        owner = type(self).__name__
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ValueError(
                f"{owner}: student_channels {list(student_channels)} and teacher_channels "
                f"{list(teacher_channels)} need the same length, at least one"
            )
        self.student_channels = list(student_channels)
        self.teacher_channels = list(teacher_channels)
        self.adapters = nn.ModuleList(
            nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_channels, teacher_channels)
        )

    def distance(self, adapted: Tensor, teacher: Tensor) -> Tensor:
        """(B, Ct, Ht, Wt) adapted student and teacher features -> scalar."""
        raise NotImplementedError

    def forward(
        self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """Lists of (B, Cs_i, Hs_i, Ws_i) and (B, Ct_i, Ht_i, Wt_i) features -> scalar (labels unused)."""
        if not len(student_feats) == len(teacher_feats) == len(self.adapters):
            raise ValueError(
                f"{type(self).__name__}: got {len(student_feats)} student and {len(teacher_feats)} teacher feature "
                f"maps, built for {len(self.adapters)} pairs (student_channels={self.student_channels})"
            )
        losses = []
        for adapter, student, teacher in zip(self.adapters, student_feats, teacher_feats):
            adapted = adapter(student)
            if adapted.shape[-2:] != teacher.shape[-2:]:
                adapted = F.interpolate(adapted, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
            losses.append(self.distance(adapted, teacher))
        return sum(losses) / len(losses)


class FeatureMSELoss(AdaptedFeatureLoss):
    """MSE between teacher features and 1x1-conv-adapted student features (FitNets style).

    Args:
        student_channels: channels of each student feature map.
        teacher_channels: channels of the matching teacher feature maps.
    """

    def distance(self, adapted: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(adapted, teacher)


class ChannelWiseFeatureLoss(AdaptedFeatureLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021) of 1x1-conv-adapted student features:
    :func:`~distill.losses.kd.channel_wise_divergence` per pair, as the paper aligns channels.

    Args:
        student_channels: channels of each student feature map.
        teacher_channels: channels of the matching teacher feature maps.
        temperature: softening temperature T of the per-channel spatial distributions.
    """

    def __init__(
        self, student_channels: Sequence[int], teacher_channels: Sequence[int], temperature: float = 4.0
    ) -> None:
        super().__init__(student_channels, teacher_channels)
        check_temperature(temperature, "ChannelWiseFeatureLoss")
        self.temperature = temperature

    def distance(self, adapted: Tensor, teacher: Tensor) -> Tensor:
        return channel_wise_divergence(adapted, teacher, self.temperature)


def _region_affinity(features: Tensor, labels: Tensor) -> Tensor:
    """Cosine similarity of the foreground-mean and background-mean feature vectors.

    Args:
        features: (B, C, H, W).
        labels: (B, H0, W0) integer labels, foreground = label > 0; resized (nearest) to (H, W).

    Returns:
        (B,). An empty region gives a zero vector and so an affinity of 0.
    """
    mask = F.interpolate(labels.unsqueeze(1).float(), size=features.shape[-2:], mode="nearest") > 0
    foreground = mask.to(features.dtype)
    background = 1.0 - foreground
    # Cosine similarity ignores the vectors' scale, so clamping the pixel counts only guards 0/0.
    fg_mean = (features * foreground).sum((2, 3)) / foreground.sum((2, 3)).clamp_min(1.0)
    bg_mean = (features * background).sum((2, 3)) / background.sum((2, 3)).clamp_min(1.0)
    return F.cosine_similarity(fg_mean, bg_mean, dim=1)


def region_affinity_loss(student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    """Region affinity distillation of EMKD (Qin et al., IEEE TMI 2021).

    Per sample, the affinity is the cosine similarity between the mean feature vector of the
    foreground and of the background; the loss is the MSE between student and teacher
    affinities. Channel counts and spatial sizes of student and teacher may differ.

    Args:
        student: (B, Cs, H, W) features.
        teacher: (B, Ct, H', W') features.
        labels: (B, H0, W0) integer labels (foreground = label > 0).

    Returns:
        scalar.
    """
    return F.mse_loss(_region_affinity(student, labels), _region_affinity(teacher, labels))


class RegionAffinityLoss(nn.Module):
    """EMKD region affinity over feature-map pairs (mean of :func:`region_affinity_loss`)."""

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], labels: Tensor) -> Tensor:
        """Lists of (B, Cs_i, H_i, W_i) and (B, Ct_i, H'_i, W'_i) features, labels (B, H0, W0).

        Returns a scalar.
        """
        _check_pair_count(student_feats, teacher_feats, "RegionAffinityLoss")
        pairs = zip(student_feats, teacher_feats)
        losses = [region_affinity_loss(s, t, labels) for s, t in pairs]
        return sum(losses) / len(losses)

"""Distillation losses chosen by name in the config: the feature term and the logit term.

In YAML a term is its name, or a mapping of the name and that loss's options::

    feature_loss: attention                              # attention transfer, p = 2
    feature_loss: {name: channel_wise, temperature: 4}   # channel-wise distillation on adapted features
    logit_loss: kd                                        # T^2 KL to the teachers' mixture target

Feature losses (:data:`FEATURE_LOSSES`, one module per teacher, built once the feature shapes
are known) take ``(student_feats, teacher_feats, labels)``: lists of (B, C_i, H_i, W_i) maps
and the (B, H, W) labels. Logit losses (:data:`LOGIT_LOSSES`) take the student's (B, C, H, W)
logits, the teachers' (K, B, C, H, W) logits, their (K, B, H, W) weights (summing to 1 over K)
and the temperature T of the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distill.errors import DataError
from distill.losses.feature import AttentionTransferLoss, ChannelWiseFeatureLoss, FeatureMSELoss, RegionAffinityLoss
from distill.losses.kd import soft_kl_divergence, soft_target_kl
from distill.losses.multi_teacher import combine_soft_targets

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "LossChoice",
    "LossConfig",
    "build_feature_loss",
    "choose_loss",
    "logit_loss",
]

#: A loss as the config writes it: its name, or ``{name: ..., <option>: <number>, ...}``.
LossConfig = str | dict[str, float | str]


def mixture_kd(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Hinton KD to the weighted mixture of the teachers' softened predictions (mean over pixels)."""
    target = combine_soft_targets(teacher_logits, weights, temperature)
    return soft_target_kl(student_logits.float(), target, temperature)


def mixture_channel_wise(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Channel-wise distillation (Shu et al.) of the logits to each teacher, weighted per sample by
    the teacher's mean weight over the image; with one teacher
    :func:`~distill.losses.kd.channel_wise_divergence`."""
    student = student_logits.float().flatten(2)
    per_teacher = torch.stack(
        [  # (K, B): KL per channel over the H*W positions, mean over channels
            soft_kl_divergence(student, teacher.float().flatten(2), temperature, dim=-1, reduction="none").mean(1)
            for teacher in teacher_logits
        ]
    )
    return (weights.flatten(2).mean(2) * per_teacher).sum(0).mean()


@dataclass(frozen=True)
class LossEntry:
    """One registered loss: what builds or computes it, and its options with their defaults."""

    make: Callable
    options: Mapping[str, float] = field(default_factory=dict)


FEATURE_LOSSES: dict[str, LossEntry] = {
    "attention": LossEntry(lambda student_channels, teacher_channels, p: AttentionTransferLoss(p), {"p": 2.0}),
    "mse": LossEntry(FeatureMSELoss),
    "channel_wise": LossEntry(ChannelWiseFeatureLoss, {"temperature": 4.0}),
    "region_affinity": LossEntry(lambda student_channels, teacher_channels: RegionAffinityLoss()),
}

LOGIT_LOSSES: dict[str, LossEntry] = {
    "kd": LossEntry(mixture_kd),
    "channel_wise": LossEntry(mixture_channel_wise),
}


@dataclass(frozen=True)
class LossChoice:
    """A registered loss and its options (defaults filled in)."""

    name: str
    options: dict[str, float]


def choose_loss(config: LossConfig, registry: Mapping[str, LossEntry], where: str) -> LossChoice:
    """Check a configured loss against ``registry``; raise a one-line DataError naming ``where``.

    Args:
        config: ``"name"`` or ``{"name": ..., <option>: <number > 0>, ...}``.
        registry: :data:`FEATURE_LOSSES` or :data:`LOGIT_LOSSES`.
        where: the config key, for the message (``"feature_loss"``).
    """
    options = dict(config) if isinstance(config, Mapping) else {"name": config}
    name = options.pop("name", None)
    if name is None:
        raise DataError(f"{where}: give the loss's name; known: {', '.join(sorted(registry))}")
    if name not in registry:
        raise DataError(f"{where}: unknown loss {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    for key, value in options.items():
        if key not in entry.options:
            accepted = ", ".join(entry.options) or "none"
            raise DataError(f"{where}: loss {name!r} has no option {key!r}; its options: {accepted}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise DataError(f"{where}.{key} must be a number > 0, got {value!r}")
    return LossChoice(name, {**entry.options, **{k: float(v) for k, v in options.items()}})


def build_feature_loss(
    choice: LossChoice, student_channels: Sequence[int], teacher_channels: Sequence[int]
) -> nn.Module:
    """The feature loss of one teacher: ``(student_feats, teacher_feats, labels) -> scalar``."""
    return FEATURE_LOSSES[choice.name].make(student_channels, teacher_channels, **choice.options)


def logit_loss(
    choice: LossChoice, student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float
) -> Tensor:
    """The chosen logit loss: (B, C, H, W) student, (K, B, C, H, W) teachers, (K, B, H, W) weights -> scalar."""
    return LOGIT_LOSSES[choice.name].make(student_logits, teacher_logits, weights, temperature, **choice.options)

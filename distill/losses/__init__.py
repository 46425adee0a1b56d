"""Distillation and segmentation losses: pure functions plus small ``nn.Module`` wrappers.

- ``segmentation``: supervised Dice (MONAI), Lovasz hinge and Lovasz-softmax.
- ``kd``: the one temperature-scaled (T^2) soft KL; pixel-wise Hinton KD and channel-wise distillation.
- ``multi_teacher``: weighting rules and the mixture target of several teachers.
- ``contrastive``: MoCo (1 + K) similarity logits, InfoNCE, similarity-distribution KL.
- ``temporal``: phase segmentation (cross-entropy + MS-TCN truncated-MSE smoothing).
- ``feature``: attention transfer, 1x1-adapter feature MSE and channel-wise, EMKD region affinity.
- ``registry``: the feature and logit distillation losses a config chooses by name, with options.
- ``terms``: named, weighted loss terms, config-time checks of their names, label terms over labelled samples.
"""

from distill.losses.contrastive import contrastive_logits, info_nce_loss, similarity_distillation_loss
from distill.losses.feature import (
    AdaptedFeatureLoss,
    AttentionTransferLoss,
    ChannelWiseFeatureLoss,
    FeatureMSELoss,
    RegionAffinityLoss,
    attention_map,
    attention_transfer_loss,
    region_affinity_loss,
)
from distill.losses.kd import (
    ChannelWiseKDLoss,
    KDLoss,
    channel_wise_divergence,
    pixel_kl_divergence,
    soft_kl_divergence,
    soft_target_kl,
)
from distill.losses.registry import FEATURE_LOSSES, LOGIT_LOSSES, LossChoice, LossConfig, choose_loss
from distill.losses.segmentation import (
    DiceLoss,
    LovaszLoss,
    lovasz_grad,
    lovasz_hinge,
    lovasz_softmax,
)
from distill.losses.temporal import phase_segmentation_loss, truncated_mse_smoothing
from distill.losses.terms import check_loss_weights, over_labelled, weighted_sum

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "AdaptedFeatureLoss",
    "AttentionTransferLoss",
    "ChannelWiseFeatureLoss",
    "ChannelWiseKDLoss",
    "DiceLoss",
    "FeatureMSELoss",
    "KDLoss",
    "LossChoice",
    "LossConfig",
    "LovaszLoss",
    "RegionAffinityLoss",
    "attention_map",
    "attention_transfer_loss",
    "channel_wise_divergence",
    "check_loss_weights",
    "choose_loss",
    "contrastive_logits",
    "info_nce_loss",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_softmax",
    "over_labelled",
    "phase_segmentation_loss",
    "pixel_kl_divergence",
    "region_affinity_loss",
    "similarity_distillation_loss",
    "soft_kl_divergence",
    "soft_target_kl",
    "truncated_mse_smoothing",
    "weighted_sum",
]

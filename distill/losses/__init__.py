"""Distillation and segmentation losses: pure functions plus small ``nn.Module`` wrappers.

- ``segmentation``: supervised Dice (MONAI), Lovasz hinge and Lovasz-softmax.
- ``kd``: one temperature-scaled soft KL; pixel-wise Hinton KD and channel-wise distillation.
- ``contrastive``: MoCo (1 + K) similarity logits, InfoNCE, similarity-distribution KL.
- ``temporal``: phase segmentation (cross-entropy + MS-TCN truncated-MSE smoothing).
- ``feature``: attention transfer, 1x1-adapter feature MSE, EMKD region affinity.
- ``terms``: named, weighted loss terms and config-time checks of their names.
"""

from distill.losses.contrastive import contrastive_logits, info_nce_loss, similarity_distillation_loss
from distill.losses.feature import (
    AttentionTransferLoss,
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
)
from distill.losses.segmentation import (
    DiceLoss,
    LovaszLoss,
    lovasz_grad,
    lovasz_hinge,
    lovasz_softmax,
)
from distill.losses.temporal import phase_segmentation_loss, truncated_mse_smoothing
from distill.losses.terms import check_loss_weights, weighted_sum

__all__ = [
    "AttentionTransferLoss",
    "ChannelWiseKDLoss",
    "DiceLoss",
    "FeatureMSELoss",
    "KDLoss",
    "LovaszLoss",
    "RegionAffinityLoss",
    "attention_map",
    "attention_transfer_loss",
    "channel_wise_divergence",
    "check_loss_weights",
    "contrastive_logits",
    "info_nce_loss",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_softmax",
    "phase_segmentation_loss",
    "pixel_kl_divergence",
    "region_affinity_loss",
    "similarity_distillation_loss",
    "soft_kl_divergence",
    "truncated_mse_smoothing",
    "weighted_sum",
]

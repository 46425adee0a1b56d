"""Distillation and segmentation losses: pure functions plus small ``nn.Module`` wrappers.

- ``segmentation``: supervised Dice (MONAI), Lovasz hinge and Lovasz-softmax.
- ``kd``: pixel-wise Hinton KD (KL, times T^2) and channel-wise distillation.
- ``feature``: attention transfer, 1x1-adapter feature MSE, EMKD region affinity.
- ``terms``: named, weighted loss terms and config-time checks of their names.
"""

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
)
from distill.losses.segmentation import (
    DiceLoss,
    LovaszLoss,
    lovasz_grad,
    lovasz_hinge,
    lovasz_softmax,
)
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
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_softmax",
    "pixel_kl_divergence",
    "region_affinity_loss",
    "weighted_sum",
]

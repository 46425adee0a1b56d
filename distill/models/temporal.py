"""Temporal convolutional networks for phase recognition over per-frame feature sequences.

``SingleStageTCN`` is the dilated residual TCN of MS-TCN (Farha & Gall, CVPR 2019); with
``causal=True`` (default) every convolution is padded on the left only, so the output at frame t
depends on frames <= t (online recognition, as in the reference of Ding et al. 2022: 12 layers,
64 maps). ``MultiStageTCN`` stacks stages that refine the softmax of the previous stage.

Inputs are (B, D, T) features; pad a batch of videos at the end and label the padding with the
loss's ``ignore_index`` (in causal mode the padding cannot change earlier outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DilatedResidualLayer", "MultiStageTCN", "SingleStageTCN"]


class DilatedResidualLayer(nn.Module):
    """x + dropout(conv1x1(relu(dilated conv3(x)))); (B, C, T) -> (B, C, T).

    Causal: pads ``2 * dilation`` frames on the left; otherwise ``dilation`` on each side.
    """

    def __init__(self, channels: int, dilation: int, dropout: float = 0.5, causal: bool = True) -> None:
        super().__init__()
        self.padding = (2 * dilation, 0) if causal else (dilation, dilation)
        self.conv_dilated = nn.Conv1d(channels, channels, 3, dilation=dilation)
        self.conv_1x1 = nn.Conv1d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv_dilated(F.pad(x, self.padding)))
        return x + self.dropout(self.conv_1x1(out))


class SingleStageTCN(nn.Module):
    """1x1 conv (D -> channels), ``num_layers`` dilated residual layers (dilation 2^i), 1x1 conv
    to classes; (B, D, T) -> (B, num_classes, T) logits. Receptive field: 2^(num_layers+1) - 1 frames.

    Args:
        in_dim: feature dimension D.
        num_classes: number of phases.
        num_layers: dilated layers (12 in the reference).
        channels: feature maps (64).
        dropout: dropout inside each layer (0.5).
        causal: left padding only (online); False for the acausal MS-TCN.
        feature_dropout: probability of zeroing whole input feature channels (``Dropout1d``); the
            reference single-stage TCN uses 0.5.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_layers: int = 12,
        channels: int = 64,
        dropout: float = 0.5,
        causal: bool = True,
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_dropout = nn.Dropout1d(feature_dropout)
        self.conv_in = nn.Conv1d(in_dim, channels, 1)
        self.layers = nn.Sequential(*(DilatedResidualLayer(channels, 2**i, dropout, causal) for i in range(num_layers)))
        self.conv_out = nn.Conv1d(channels, num_classes, 1)

    def forward(self, features: Tensor) -> Tensor:
        """(B, D, T) -> (B, num_classes, T)."""
        return self.conv_out(self.layers(self.conv_in(self.feature_dropout(features))))


class MultiStageTCN(nn.Module):
    """MS-TCN: a :class:`SingleStageTCN` on the features, then ``num_stages - 1`` stages on the
    softmax of the previous stage's logits; (B, D, T) -> (num_stages, B, num_classes, T).

    Train with a loss on every stage (:func:`~distill.losses.temporal.phase_segmentation_loss`);
    predict from the last stage. ``num_stages=1`` gives the single-stage model.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_stages: int = 4,
        num_layers: int = 10,
        channels: int = 64,
        dropout: float = 0.5,
        causal: bool = True,
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"MultiStageTCN: num_stages must be >= 1, got {num_stages}")
        self.stages = nn.ModuleList(
            SingleStageTCN(
                in_dim if stage == 0 else num_classes,
                num_classes,
                num_layers,
                channels,
                dropout,
                causal,
                feature_dropout if stage == 0 else 0.0,
            )
            for stage in range(num_stages)
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, D, T) -> (num_stages, B, num_classes, T) logits of every stage."""
        logits = [self.stages[0](features)]
        for stage in self.stages[1:]:
            logits.append(stage(F.softmax(logits[-1], dim=1)))
        return torch.stack(logits)

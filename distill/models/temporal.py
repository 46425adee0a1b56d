"""Temporal convolutional networks for phase recognition over per-frame feature sequences.

``SingleStageTCN`` is the dilated residual TCN of MS-TCN (Farha & Gall, CVPR 2019); with
``causal=True`` (default) every convolution is padded on the left only, so the output at frame t
depends on frames <= t (online recognition, as in the reference of Ding et al. 2022: 12 layers,
64 maps). ``MultiStageTCN`` stacks stages that refine the softmax of the previous stage.

Inputs are (B, D, T) features; pad a batch of videos at the end and label the padding with the
loss's ``ignore_index`` (in causal mode the padding cannot change earlier outputs). A
:class:`TCNShape` says which of the two and how deep (:meth:`TCNShape.build`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DilatedResidualLayer", "MultiStageTCN", "SingleStageTCN", "TCNShape"]


@dataclasses.dataclass(frozen=True)
class TCNShape:
    """The shape of a temporal phase model; the defaults are the reference of Ding et al. 2022.

    Attributes:
        num_stages: 1: a :class:`SingleStageTCN` (the reference); > 1: an MS-TCN
            (:class:`MultiStageTCN`; Farha & Gall use 4 stages of 10 layers).
        num_layers: dilated residual layers per stage (12 in the reference); dilation 2^i, receptive
            field 2^(num_layers+1) - 1 frames.
        channels: feature maps of every layer (64).
        dropout: dropout inside each layer (0.5).
        causal: left padding only (online recognition); False for the acausal MS-TCN.
    """

    num_stages: int = 1
    num_layers: int = 12
    channels: int = 64
    dropout: float = 0.5
    causal: bool = True

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"TCNShape: num_stages must be >= 1, got {self.num_stages}")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> TCNShape:
        """The shape a module's hyper-parameters name (keys ``num_stages``, ``num_layers``, ``channels``, ...)."""
        return cls(**{field.name: hparams[field.name] for field in dataclasses.fields(cls)})

    def build(self, in_dim: int, num_classes: int) -> nn.Module:
        """(B, in_dim, T) -> (B, num_classes, T) :class:`SingleStageTCN` when ``num_stages`` is 1, else
        (num_stages, B, num_classes, T) :class:`MultiStageTCN`."""
        if self.num_stages == 1:
            return SingleStageTCN(in_dim, num_classes, self)
        return MultiStageTCN(in_dim, num_classes, self)

    def describe(self) -> str:
        """E.g. ``"causal single-stage TCN, 12 layers"``, ``"offline (sees future frames) MS-TCN, 4 stages"``."""
        timing = "causal" if self.causal else "offline (sees future frames)"
        model = (
            f"single-stage TCN, {self.num_layers} layers"
            if self.num_stages == 1
            else f"MS-TCN, {self.num_stages} stages"
        )
        return f"{timing} {model}"


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
    to classes, as ``shape`` says (its ``num_stages`` is not read: this is one stage);
    (B, D, T) -> (B, num_classes, T) logits.

    Args:
        in_dim: feature dimension D.
        num_classes: number of phases.
        shape: layers, channels, dropout and padding of the stage.
        feature_dropout: probability of zeroing whole input feature channels (``Dropout1d``); the
            reference single-stage TCN uses 0.5.
    """

    def __init__(self, in_dim: int, num_classes: int, shape: TCNShape, feature_dropout: float = 0.0) -> None:
        super().__init__()
        self.feature_dropout = nn.Dropout1d(feature_dropout)
        self.conv_in = nn.Conv1d(in_dim, shape.channels, 1)
        self.layers = nn.Sequential(
            *(DilatedResidualLayer(shape.channels, 2**i, shape.dropout, shape.causal) for i in range(shape.num_layers))
        )
        self.conv_out = nn.Conv1d(shape.channels, num_classes, 1)

    def forward(self, features: Tensor) -> Tensor:
        """(B, D, T) -> (B, num_classes, T)."""
        return self.conv_out(self.layers(self.conv_in(self.feature_dropout(features))))


class MultiStageTCN(nn.Module):
    """MS-TCN: a :class:`SingleStageTCN` on the features, then ``shape.num_stages - 1`` stages on the
    softmax of the previous stage's logits; (B, D, T) -> (num_stages, B, num_classes, T).

    Train with a loss on every stage (:func:`~distill.losses.temporal.phase_segmentation_loss`);
    predict from the last stage. ``num_stages=1`` gives the single-stage model.

    Args:
        in_dim, num_classes, feature_dropout: as :class:`SingleStageTCN` (``feature_dropout`` on the first stage).
        shape: the number of stages and the shape of each.
    """

    def __init__(self, in_dim: int, num_classes: int, shape: TCNShape, feature_dropout: float = 0.0) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            SingleStageTCN(
                in_dim if stage == 0 else num_classes, num_classes, shape, feature_dropout if stage == 0 else 0.0
            )
            for stage in range(shape.num_stages)
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, D, T) -> (num_stages, B, num_classes, T) logits of every stage."""
        logits = [self.stages[0](features)]
        for stage in self.stages[1:]:
            logits.append(stage(F.softmax(logits[-1], dim=1)))
        return torch.stack(logits)

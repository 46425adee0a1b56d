"""2D segmentation networks (2.5D input: adjacent slices as channels) in a small registry.

Every network maps ``(B, in_channels, H, W)`` to logits ``(B, num_classes, H, W)`` for any H, W
divisible by 32 (16 for the U-Nets). Teachers and students come from the same registry so that
a teacher checkpoint records ``network`` + ``network_kwargs`` and can be rebuilt from it.

=============  ==========================================  ==========================
name           what                                        parameters (3 in, 2 out)
=============  ==========================================  ==========================
``unet``       MONAI BasicUNet, ``width`` 64 (default)     31.1M (width 32: 7.8M)
``slim_unet``  the same U-Net at ``width`` 8               0.49M
``mobile_unet``timm MobileNetV3/V2 encoder + light decoder 0.3-1M (encoder dependent)
=============  ==========================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from monai.networks.nets import BasicUNet
from torch import nn
from torch.nn import functional as F

from distill.errors import DataError


def unet(in_channels: int, num_classes: int, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """U-Net (Ronneberger et al.) via MONAI ``BasicUNet``; channels ``(w, 2w, 4w, 8w, 16w, w)``.

    Batch norm (MONAI's default is instance norm, whose backward pass is about 6x slower on CPU).

    Module paths for feature distillation: ``conv_0``, ``down_1`` .. ``down_4`` (encoder,
    stride 2..16), ``upcat_4`` .. ``upcat_1`` (decoder, stride 8..1).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise DataError(f"network_kwargs.width must be an integer >= 1, got {width!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise DataError(f"network_kwargs.dropout must be a number in [0, 1), got {dropout!r}")
    features = (width, 2 * width, 4 * width, 8 * width, 16 * width, width)
    return BasicUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        features=features,
        norm="batch",
        dropout=dropout,
    )


def slim_unet(in_channels: int, num_classes: int, width: int = 8, dropout: float = 0.0) -> nn.Module:
    """The :func:`unet` architecture at a student width (default 8: 64x fewer parameters than width 64)."""
    return unet(in_channels, num_classes, width=width, dropout=dropout)


class _DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip, depthwise-separable conv: cheap on CPU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        channels = in_channels + skip_channels
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class MobileUNet(nn.Module):
    """Lightweight encoder-decoder: a timm mobile encoder (``features_only``) + a U-Net-like decoder.

    Module paths for feature distillation: ``encoder.<timm name>`` (e.g. ``encoder.blocks.3``),
    ``decoder.0`` (stride 16) .. ``decoder.3`` (stride 2).

    Args:
        encoder: timm model name; randomly initialised (nothing downloads). Pretrained encoder
            weights can be loaded by the user from a file before training.
        decoder_channels: output channels of the 4 decoder blocks, deep to shallow.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder: str = "mobilenetv3_small_100",
        decoder_channels: tuple[int, int, int, int] = (48, 32, 24, 16),
    ) -> None:
        super().__init__()
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False, in_chans=in_channels)
        skips = self.encoder.feature_info.channels()  # strides 2, 4, 8, 16, 32
        blocks, deep = [], skips[-1]
        for skip, out in zip(reversed(skips[:-1]), decoder_channels):
            blocks.append(_DecoderBlock(deep, skip, out))
            deep = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(deep, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1])):
            y = block(y, skip)
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


SEGMENTATION_NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "unet": unet,
    "slim_unet": slim_unet,
    "mobile_unet": MobileUNet,
}


def build_segmentation_network(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered network; ``kwargs`` are its own options (e.g. ``width``)."""
    try:
        builder = SEGMENTATION_NETWORKS[name]
    except KeyError:
        raise DataError(f"unknown network {name!r}; registered: {', '.join(sorted(SEGMENTATION_NETWORKS))}") from None
    try:
        return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except DataError as err:
        raise DataError(f"network {name!r}: {err}") from None
    except (TypeError, RuntimeError) as err:  # an unknown option or timm encoder, a size beyond memory
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"network {name!r}: cannot build it with network_kwargs {kwargs} ({reason})") from None


@torch.no_grad()
def init_output_prior(
    net: nn.Module, num_classes: int, foreground_prior: float, weight_std: float | None = None
) -> None:
    """Start ``net`` predicting about the class prior at every pixel, whatever the seed.

    The last ``Conv2d`` with ``num_classes`` outputs gets the bias ``log(1 - prior),
    log(prior / (C - 1)), ...`` (the prior initialisation of Lin et al., ICCV 2017); its
    weights stay random. A random output layer with its random bias makes some seeds start with
    foreground almost everywhere, where the soft Dice gradient of a rare foreground
    (~ intersection / (sum of p)^2) nearly vanishes and training stalls for many epochs.

    Args:
        net: a segmentation network (B, in, H, W) -> (B, num_classes, H, W).
        num_classes: C >= 2 (softmax over background and the C - 1 foreground classes).
        foreground_prior: total initial probability of the foreground classes, in (0, 1).
        weight_std: None keeps the network's own random output weights (the mean foreground
            probability then starts within ~2x of the prior); a number draws them from
            normal(0, weight_std) (RetinaNet: 0.01); 0 zeroes them (every pixel starts exactly at
            the prior, but every earlier layer gets a zero gradient at the first step and Adam
            grows the weights by at most ~lr per step).
    """
    if not 0.0 < foreground_prior < 1.0 or num_classes < 2:
        raise DataError(
            f"foreground_prior must be in (0, 1) with num_classes >= 2, got {foreground_prior}, {num_classes}"
        )
    if weight_std is not None and weight_std < 0:
        raise DataError(f"foreground_prior_weight_std must be >= 0 or null, got {weight_std}")
    heads = [
        m for m in net.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.bias is not None
    ]
    if not heads:
        raise ValueError(f"init_output_prior: {type(net).__name__} has no Conv2d with {num_classes} outputs and a bias")
    head = heads[-1]
    if weight_std is not None:
        head.weight.normal_(0.0, weight_std)
    prior = torch.full((num_classes,), foreground_prior / (num_classes - 1))
    prior[0] = 1.0 - foreground_prior
    head.bias.copy_(prior.log())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

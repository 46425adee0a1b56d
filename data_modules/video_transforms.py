"""Frames as uint8 RGB (3, H, W) tensors, and the OpenCV transforms that turn them into float (3, S, S) inputs.

Frames are decoded by OpenCV into channels-last memory (:func:`read_frame`), so the OpenCV
steps chain without copies. Each ``OpenCV*`` transform samples its parameters as the torchvision
``v2`` transform it subclasses and computes the result with OpenCV kernels (faster on CPU; each
class says how close it stays to torchvision). The pipelines end ImageNet-normalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from distill.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) tensor -> contiguous (H, W, C) array for OpenCV (no copy for channels-last data).

    Frames are decoded channels-last (:func:`read_frame`), so the OpenCV steps chain without copies.
    """
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)


def read_frame(path: Path) -> torch.Tensor:
    """Decode a JPEG/PNG frame to a uint8 RGB (3, H, W) tensor (channels-last memory, OpenCV decoder)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot read frame image")
    return _chw(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


class OpenCVRandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` (same sampling) resized by OpenCV: area filter when shrinking, bilinear when enlarging."""

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        top, left, height, width = (params[key] for key in ("top", "left", "height", "width"))
        crop = _hwc(inpt)[top : top + height, left : left + width]
        out_height, out_width = self.size
        interpolation = cv2.INTER_AREA if height > out_height else cv2.INTER_LINEAR
        return _chw(cv2.resize(crop, (out_width, out_height), interpolation=interpolation))


class OpenCVGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (same sampling) computed by OpenCV on uint8 (3, H, W) tensors.

    The kernel stops at 3 sigma (dropping 0.3% of the weight) when that is shorter than
    ``kernel_size``: with sigma <= 2 and a 23-tap kernel, 4-10x faster than torch's
    depthwise convolution on CPU and within one grey level of it.
    """

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        sigma = params["sigma"][0]
        size = [min(k, 2 * math.ceil(3 * sigma) + 1) for k in self.kernel_size]
        return _chw(cv2.GaussianBlur(_hwc(inpt), size, sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101))


def adjust_brightness_opencv(image: torch.Tensor, brightness_factor: float) -> torch.Tensor:
    """``F.adjust_brightness`` for uint8 RGB (3, H, W) tensors: scale, saturate to [0, 255]."""
    array = _hwc(image)
    return _chw(cv2.addWeighted(array, brightness_factor, array, 0.0, 0.0))


def adjust_contrast_opencv(image: torch.Tensor, contrast_factor: float) -> torch.Tensor:
    """``F.adjust_contrast`` for uint8 RGB (3, H, W) tensors: blend with the mean grey level."""
    array = _hwc(image)
    mean = float(cv2.cvtColor(array, cv2.COLOR_RGB2GRAY).mean())
    return _chw(cv2.addWeighted(array, contrast_factor, array, 0.0, (1.0 - contrast_factor) * mean))


def adjust_saturation_opencv(image: torch.Tensor, saturation_factor: float) -> torch.Tensor:
    """``F.adjust_saturation`` for uint8 RGB (3, H, W) tensors: blend with the grey image."""
    array = _hwc(image)
    grey = cv2.cvtColor(cv2.cvtColor(array, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return _chw(cv2.addWeighted(array, saturation_factor, grey, 1.0 - saturation_factor, 0.0))


def adjust_hue_opencv(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """``F.adjust_hue`` for uint8 RGB (3, H, W) tensors via OpenCV's 8-bit HSV (hue step 1/256 turn)."""
    hsv = cv2.cvtColor(_hwc(image), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(hue_factor * 256) % 256)  # wraps around the colour circle
    return _chw(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


class OpenCVColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` (same parameters, sampling and random order) with OpenCV kernels.

    Each step matches torchvision's uint8 result up to rounding and is 5-10x faster on CPU,
    which makes the MoCo v2 augmentation cheap enough for a 2-core loader.
    """

    KERNELS = {
        F.adjust_brightness: adjust_brightness_opencv,
        F.adjust_contrast: adjust_contrast_opencv,
        F.adjust_saturation: adjust_saturation_opencv,
        F.adjust_hue: adjust_hue_opencv,
    }

    def _call_kernel(self, functional: Callable, inpt: Any, *args: Any, **kwargs: Any) -> Any:
        return self.KERNELS[functional](inpt, *args, **kwargs)


def _normalise() -> list[v2.Transform]:
    """uint8 (3, H, W) -> float32 ImageNet-normalised; contiguous first (3x faster than on channels-last)."""
    return [
        v2.Lambda(torch.Tensor.contiguous),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def moco_v2_augmentation(image_size: int = 224, strength: float = 1.0) -> v2.Compose:
    """MoCo v2 "aug-plus": uint8 (3, H, W) -> float32 (3, S, S), ImageNet-normalised.

    RandomResizedCrop (scale 1 - 0.8 * strength .. 1) first, so the colour and blur steps run on
    S x S pixels; colour jitter (p 0.8, 0.4 / 0.4 / 0.4 / 0.1 x strength), grey (p 0.2 x strength),
    Gaussian blur (p 0.5 x strength, sigma 0.1-2 px at 224 px and in proportion at other sizes:
    MoCo's 2 px at 48 px would blur away most of the frame), flip. ``strength=1`` is the paper's
    recipe; short runs on small frames need less (at 48 px, 1.0 leaves the two views of a frame
    barely more alike than two frames, and MoCo stays at chance: README, "Surgical pre-training").
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"moco_v2_augmentation: strength must be in [0, 1], got {strength}")
    pixel = image_size / 224  # MoCo v2's pixel sizes are at 224 px
    kernel = max(3, 2 * round(11 * pixel) + 1)  # 23 at 224 px
    return v2.Compose(
        [
            OpenCVRandomResizedCrop(image_size, scale=(1.0 - 0.8 * strength, 1.0)),
            v2.RandomApply([OpenCVColorJitter(*(0.4 * strength,) * 3, 0.1 * strength)], p=0.8),
            v2.RandomGrayscale(p=0.2 * strength),
            v2.RandomApply([OpenCVGaussianBlur(kernel, sigma=(0.1 * pixel, 2.0 * pixel))], p=0.5 * strength),
            v2.RandomHorizontalFlip(),
            *_normalise(),
        ]
    )


def finetune_augmentation(image_size: int = 224, resize_size: int = 250) -> v2.Compose:
    """Phase fine-tuning: resize (shorter side), random crop, horizontal flip, normalise."""
    return v2.Compose(
        [v2.Resize(resize_size, antialias=True), v2.RandomCrop(image_size), v2.RandomHorizontalFlip(), *_normalise()]
    )


def eval_transform(image_size: int = 224, resize_size: int = 250) -> v2.Compose:
    """Evaluation: resize (shorter side), centre crop, normalise (the reference code forgot the last step)."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size), *_normalise()])


class TwoViews:
    """Two independent draws of ``transform`` of one image: ``(view1, view2)``."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)

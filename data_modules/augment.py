"""Seeded augmentation of training samples, and a fast paired 2D augmentation for 2.5D slice training.

:func:`seeded_augmentation` runs any augmentation (torchvision transforms, :class:`SliceAugmentation`)
on torch's CPU random stream seeded from ``(seed, epoch, index)``, so a sample's augmentation
depends on these three only (what resumable training needs, :mod:`data_modules.resumable`).

:class:`SliceAugmentation`: flips, rotation/scaling, intensity jitter. One random draw moves every
spatial key together: the image stack and any cached teacher logits bilinearly, the label with
nearest neighbour, so they stay aligned (the teacher-output cache relies on it). Random numbers
come from torch's global generator (seeded per sample by :func:`seeded_augmentation`).

Why not MONAI's ``RandAffined``: on CPU it costs 15-30 ms per 64x64 sample (meta-tensor and
grid bookkeeping around one ``grid_sample``), a hundred times the ``grid_sample`` itself, and
the data loader could not keep up with a small student. The geometry here is MONAI's
(rotation about the image centre, isotropic scale, border padding, ``align_corners=False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F

from data_modules.resumable import sample_seed

Sample = TypeVar("Sample")
Augmented = TypeVar("Augmented")


def seeded_augmentation(
    augment: Callable[[Sample], Augmented], sample: Sample, seed: int, epoch: int | None, index: int
) -> Augmented:
    """``augment(sample)``, its random numbers drawn from torch's CPU generator seeded with
    :func:`~data_modules.resumable.sample_seed` ``(seed, epoch, index)`` and its state restored after,
    for a :class:`~data_modules.resumable.ResumableSampler` key; with ``epoch`` None (a plain index)
    from the global stream as it runs on.

    Args:
        augment: draws from torch's global generator (torchvision ``v2`` transforms,
            :class:`SliceAugmentation`).
        sample: what ``augment`` takes, e.g. a uint8 (3, H, W) frame or a slice sample mapping.
        seed, epoch, index: the DataModule's seed and the key of the sample (:func:`~data_modules.resumable.split_key`).
    """
    if epoch is None:
        return augment(sample)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
        return augment(sample)


class SliceAugmentation:
    """Random flips, rotation/scaling and intensity jitter of a slice sample.

    Sample: ``{"image": (C, H, W) float, "label": (1, H, W), ...}``; ``spatial_keys`` besides
    image and label (e.g. ``"teacher_logits"`` (K*C, H, W)) are resampled bilinearly too.

    Args:
        flip_prob: probability of each of the two flips (vertical, horizontal).
        affine_prob: probability of a rotation by U(-max_rotation, max_rotation) radians with a
            scale of 1 + U(-max_scale, max_scale).
        intensity: with probability ``intensity_prob`` each, multiply the image by
            1 + U(-0.1, 0.1) and add U(-0.1, 0.1) (images only: cached logits cannot follow).
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        affine_prob: float = 0.5,
        max_rotation: float = math.pi / 12,
        max_scale: float = 0.1,
        intensity: bool = True,
        intensity_prob: float = 0.5,
        spatial_keys: tuple[str, ...] = (),
    ) -> None:
        self.flip_prob, self.affine_prob = flip_prob, affine_prob
        self.max_rotation, self.max_scale = max_rotation, max_scale
        self.intensity, self.intensity_prob = intensity, intensity_prob
        self.bilinear_keys = ("image", *spatial_keys)

    def __call__(self, sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        draws = iter(torch.rand(9).tolist())  # every draw, in a fixed order

        def chance(probability: float) -> bool:
            return next(draws) < probability

        def uniform(bound: float) -> float:
            return (2.0 * next(draws) - 1.0) * bound

        out = dict(sample)
        keys = [k for k in (*self.bilinear_keys, "label") if k in out]
        for dim in (-2, -1):
            if chance(self.flip_prob):
                for key in keys:
                    out[key] = out[key].flip(dim)
        if chance(self.affine_prob):
            angle, scale = uniform(self.max_rotation), 1.0 + uniform(self.max_scale)
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
            height, width = out["image"].shape[-2:]
            grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
            for key in keys:
                mode = "nearest" if key == "label" else "bilinear"
                value = out[key]
                warped = F.grid_sample(value[None].float(), grid, mode=mode, padding_mode="border", align_corners=False)
                out[key] = warped[0].to(value.dtype)
        if self.intensity:
            if chance(self.intensity_prob):
                out["image"] = out["image"] * (1.0 + uniform(0.1))
            if chance(self.intensity_prob):
                out["image"] = out["image"] + uniform(0.1)
        return out

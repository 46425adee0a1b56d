"""The prostate datasets: 2.5D training slices (:class:`ProstateSliceDataset`) and whole volumes for
evaluation (:class:`ProstateVolumeDataset`), over volumes :func:`data_modules.volumes.load_volume` read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.augment import SliceAugmentation, seeded_augmentation
from data_modules.resumable import split_key
from data_modules.splits import round_half_up
from data_modules.volumes import ProstateVolume, volume_stacks


def training_augmentation(intensity: bool = True, cached_logits: bool = False) -> SliceAugmentation:
    """Flips, small rotation/scaling (geometric) and intensity scale and shift (``intensity``) for
    {"image": (C, H, W), "label": (1, H, W)}.

    With ``cached_logits`` the geometric transforms also move ``"teacher_logits"`` (K*C, H, W),
    bilinearly, so cached teacher outputs stay aligned with the augmented image.
    """
    return SliceAugmentation(intensity=intensity, spatial_keys=("teacher_logits",) if cached_logits else ())


class ProstateSliceDataset(Dataset):
    """Training samples: 2.5D stacks of adjacent slices with the centre slice's mask.

    Item: ``{"image": float32 (channels * num_slices, H, W) (see :func:`~data_modules.volumes.volume_stacks`),
    "label": int64 (H, W) class indices[, "labeled": bool ()]}``, plus ``"teacher_logits"`` float16
    (K, C, H, W) once cached teacher outputs are attached. ``labeled`` is False for slices of
    unlabelled volumes, whose ``label`` is an all-zero placeholder; it is left out when every volume
    is labelled, so a fully supervised training step never reads it back to the host.
    Slices with foreground are always used; with ``foreground_only`` False all slices are, otherwise
    a seeded ``background_fraction`` of the others is added. Unlabelled volumes give every slice
    (which of them hold the gland is unknown without a mask). Keys are indices or
    ``(epoch, index)`` (:class:`~data_modules.resumable.ResumableSampler`); the latter augment
    with a random state drawn from ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        volumes: Sequence[ProstateVolume],
        num_slices: int = 3,
        foreground_only: bool = True,
        background_fraction: float = 0.0,
        transform: SliceAugmentation | None = None,
        seed: int = 0,
    ) -> None:
        self.volumes = list(volumes)
        self.num_slices = num_slices
        self.transform = transform
        self.seed = seed
        labeled = [v for v, volume in enumerate(self.volumes) if volume.labeled]
        slices = [(v, s) for v in labeled for s in range(self.volumes[v].mask.shape[0])]
        has_gland = torch.cat([self.volumes[v].mask.flatten(1).any(1) for v in labeled]).tolist() if slices else []
        background = [pair for pair, gland in zip(slices, has_gland) if not gland]
        if foreground_only:
            kept = round_half_up(background_fraction * len(background))
            background = [background[i] for i in np.random.default_rng(seed).permutation(len(background))[:kept]]
        unlabeled = [
            (v, s) for v, volume in enumerate(self.volumes) if not volume.labeled for s in range(volume.mask.shape[0])
        ]
        self.samples = sorted([pair for pair, gland in zip(slices, has_gland) if gland] + background + unlabeled)
        self.semi_supervised = bool(unlabeled)
        self.teacher_logits: torch.Tensor | None = None  # (N, K, C, H, W), see attach_teacher_outputs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key)
        volume_index, slice_index = self.samples[index]
        volume = self.volumes[volume_index]
        sample = {
            "image": volume_stacks(volume.image, self.num_slices, slice_index),
            "label": volume.mask[slice_index][None],
        }
        if self.teacher_logits is not None:
            sample["teacher_logits"] = self.teacher_logits[index].float().flatten(0, 1)
        if self.transform is not None:
            sample = seeded_augmentation(self.transform, sample, self.seed, epoch, index)
        item = {"image": sample["image"].float(), "label": sample["label"][0].long()}
        if self.semi_supervised:
            item["labeled"] = torch.tensor(volume.labeled)
        if self.teacher_logits is not None:
            item["teacher_logits"] = sample["teacher_logits"].half().unflatten(0, self.teacher_logits.shape[1:3])
        return item


class ProstateVolumeDataset(Dataset):
    """Evaluation items, one whole volume each (use with ``batch_size=None``).

    Item: ``{"image": float32 (S, channels * num_slices, H, W), "label": int64 (S, H0, W0) class indices,
    "spacing": float64 (3,) mm, "site": str, "case": str, "image_path": str, "affine": float64 (4, 4)}``.
    """

    def __init__(self, volumes: Sequence[ProstateVolume], num_slices: int = 3) -> None:
        self.volumes = list(volumes)
        self.num_slices = num_slices

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict:
        volume = self.volumes[index]
        return {
            "image": volume_stacks(volume.image, self.num_slices),
            "label": volume.label.long(),
            "spacing": volume.spacing,
            "site": volume.case.site,
            "case": volume.case.case,
            "image_path": str(volume.case.image_path),
            "affine": volume.affine,
        }

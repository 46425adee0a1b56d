"""Reading and checking one prostate case, and the per-process cache of its volume at network size.

Volumes are nibabel (X, Y, Z[, C]) arrays with Z axial; they are transposed to (C, S, H0, W0) =
(channel, Z, X, Y) so slices come first. Masks become class indices through ``labels``
(:func:`mask_classes`). Each volume is normalised (per channel) and resized to ``image_size`` once,
when it enters the cache (:func:`load_volume`); :func:`volume_stacks` turns it into 2.5D network inputs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles
from monai.utils import convert_to_tensor

from data_modules.layouts import ProstateCase
from distill.errors import DataError
from distill.formats.nifti import NIFTI_READ_ERRORS, read_nifti

#: Mask and image must share one grid: their voxel spacings and affines may differ this much (mm).
GRID_TOLERANCE_MM = 1e-3
#: ``labels: whole_gland``: every gland label of the release (1 peripheral, 2 central/transition zone) is class 1.
WHOLE_GLAND: dict[str, list[int]] = {"gland": [1, 2]}
#: ``normalization`` as written in YAML: "zscore" (mean 0, std 1) or "percentile" (1st/99th clip, rescale to [0, 1]).
Normalization = Literal["zscore", "percentile"]


@dataclass(frozen=True)
class ProstateVolume:
    """One case ready for training and evaluation.

    Attributes:
        image: float32 (C, S, H, W), every channel normalised and resized to ``image_size``.
        mask: uint8 (S, H, W), class indices resized (nearest) like ``image``; all 0 when unlabelled.
        label: uint8 (S, H0, W0), class indices at the original resolution; all 0 when unlabelled.
        spacing: float64 (3,), voxel size in mm along (S, H0, W0).
        affine: float64 (4, 4), the NIfTI affine of the image file.
    """

    case: ProstateCase
    image: torch.Tensor
    mask: torch.Tensor
    label: torch.Tensor
    spacing: torch.Tensor
    affine: torch.Tensor

    @property
    def labeled(self) -> bool:
        """Whether ``mask`` / ``label`` come from a mask file (else they are an all-zero placeholder)."""
        return self.case.labeled


def nifti_slices(path: Path) -> int:
    """Axial slices (Z) of a NIfTI file, from its header alone; 0 when unreadable (:func:`read_case` says why)."""
    try:
        shape = nib.load(path).shape
    except NIFTI_READ_ERRORS:
        return 0
    return int(shape[2]) if len(shape) >= 3 else 0


def _check_grid(path: Path, nifti, reference: Path, ref_nifti, what: str) -> None:
    """``path`` (a mask or a channel file) must share the grid of ``reference`` (its image)."""
    spacing = np.asarray(ref_nifti.header.get_zooms()[:3], dtype=np.float64)
    other = np.asarray(nifti.header.get_zooms()[:3], dtype=np.float64)
    if not np.allclose(other, spacing, rtol=0, atol=GRID_TOLERANCE_MM):
        raise DataError(
            f"{path}: voxel spacing {other.tolist()} mm differs from {spacing.tolist()} mm "
            f"of its image {reference} (tolerance {GRID_TOLERANCE_MM} mm)"
        )
    offset = float(np.abs(np.asarray(nifti.affine) - np.asarray(ref_nifti.affine)).max())
    if offset > GRID_TOLERANCE_MM:
        raise DataError(
            f"{path}: affine differs from that of its image {reference} by up to {offset:.4g} "
            f"({what} and image must share one grid; tolerance {GRID_TOLERANCE_MM} mm)"
        )


def read_image_channels(case: ProstateCase, channels: int = 1) -> tuple[np.ndarray, object]:
    """The first ``channels`` channels of a case, float32 (X, Y, Z, C), and the first file's NIfTI image.

    A 4D file holds all channels (MSD: T2, ADC); otherwise each channel is its own file. Reading only
    some of a case's channels is refused unless the dataset names them (``case.named_channels``):
    a 4D image of another layout may be a time series, whose first volume is no choice at all.
    """
    image, nifti = read_nifti(case.image_path, channels=True)
    held = image.shape[3] + len(case.channel_paths)
    if held > channels and not case.named_channels:
        what = (
            f"4D image of {image.shape[3]} volumes"
            if held == image.shape[3]
            else f"case {case.key} of {held} channel files"
        )
        raise DataError(
            f"{case.image_path}: {what}, but data.init_args.channels={channels} would read only the first "
            f"{channels}; set data.init_args.channels={held} if they are channels (e.g. T2 + ADC), "
            "or keep one volume per file"
        )
    if case.channel_paths:
        arrays = [image]
        for path in case.channel_paths[: channels - 1]:
            channel, channel_nifti = read_nifti(path)
            if channel.shape != image.shape[:3]:
                raise DataError(
                    f"{path}: channel shape {channel.shape} differs from {image.shape[:3]} of {case.image_path}"
                )
            _check_grid(path, channel_nifti, case.image_path, nifti, "channel")
            arrays.append(channel[..., None])
        image = np.concatenate(arrays, axis=3)
    if image.shape[3] < channels:
        files = len(case.image_paths)
        raise DataError(
            f"{case.image_path}: {image.shape[3]} channel(s) in {files} file(s), data.init_args.channels={channels} "
            f"(model input channels = channels x num_slices)"
        )
    return image[..., :channels], nifti


def mask_classes(mask: np.ndarray, labels: Mapping[str, int | Sequence[int]], path: Path) -> np.ndarray:
    """Class indices uint8 of a mask of file values: class k (1, 2, ...) = the k-th entry of ``labels``,
    0 = background (value 0); any other value is refused, naming ``path``."""
    classes = np.zeros(mask.shape, dtype=np.uint8)
    valid = mask == 0
    for index, values in enumerate(labels.values(), start=1):
        inside = np.isin(mask, np.atleast_1d(values))
        classes[inside] = index
        valid |= inside
    if not valid.all():
        bad_values = np.unique(mask[~valid])[:5].tolist()
        allowed = sorted({0, *(int(v) for values in labels.values() for v in np.atleast_1d(values))})
        named = ", ".join(f"{name}: {values}" for name, values in labels.items())
        raise DataError(
            f"{path}: mask values must be in {{{', '.join(map(str, allowed))}}} (labels {{{named}}}), found {bad_values}"
        )
    return classes


def read_case(
    case: ProstateCase, channels: int = 1, labels: Mapping[str, int | Sequence[int]] = WHOLE_GLAND
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Read and check one case.

    Returns:
        image float32 (S, H0, W0) for one channel, (C, S, H0, W0) for ``channels`` > 1; mask of class
        indices uint8 (S, H0, W0) (None for an unlabelled case); spacing float64 (3,) in mm for
        (S, H0, W0); affine float64 (4, 4).
    """
    image, nifti = read_image_channels(case, channels)
    spacing = np.asarray(nifti.header.get_zooms()[:3], dtype=np.float64)
    non_finite = np.count_nonzero(~np.isfinite(image))
    if non_finite:
        raise DataError(f"{case.image_path}: {non_finite} NaN/inf voxels")
    _refuse_constant_channels(case, image)
    image = np.ascontiguousarray(image.transpose(3, 2, 0, 1))
    classes = None
    if case.mask_path is not None:
        mask, mask_nifti = read_nifti(case.mask_path)
        if mask.shape != tuple(nifti.shape[:3]):
            raise DataError(
                f"{case.mask_path}: mask shape {mask.shape} differs from image shape {tuple(nifti.shape[:3])}"
            )
        _check_grid(case.mask_path, mask_nifti, case.image_path, nifti, "mask")
        classes = np.ascontiguousarray(mask_classes(mask, labels, case.mask_path).transpose(2, 0, 1))
        if not classes.any():
            rank_zero_warn(
                f"{case.mask_path}: empty mask (no foreground voxel); scored with MONAI's empty-mask conventions "
                "(distill.metrics.segmentation.volume_dice_hd95) and flagged as empty_label in the per-volume metrics"
            )
    return (
        image[0] if channels == 1 else image,
        classes,
        spacing[[2, 0, 1]],
        np.asarray(nifti.affine, dtype=np.float64),
    )


def _channel_source(case: ProstateCase, num_channels: int, channel: int) -> str:
    """Where channel ``channel`` of a case comes from: its own file, or a channel of the 4D image."""
    if len(case.image_paths) > 1:
        return str(case.image_paths[channel])
    return f"{case.image_path}: channel {channel}" if num_channels > 1 else str(case.image_path)


def _refuse_constant_channels(case: ProstateCase, image: np.ndarray) -> None:
    """A channel of (X, Y, Z, C) ``image`` with one value everywhere has no anatomy (and no z-score): refused."""
    flat = image.reshape(-1, image.shape[3])
    constant = np.flatnonzero(flat.min(axis=0) == flat.max(axis=0))
    if constant.size:
        channel = int(constant[0])
        raise DataError(
            f"{_channel_source(case, image.shape[3], channel)}: constant image (every voxel {flat[0, channel]:g}): "
            "no anatomy to segment or normalise"
        )


def normalize_volume(image: torch.Tensor, method: Normalization) -> torch.Tensor:
    """Per-volume intensity normalisation of (S, H, W): "zscore" (mean 0, std 1) or
    "percentile" (clip at the 1st/99th percentile, rescale to [0, 1])."""
    transform = (
        NormalizeIntensity()
        if method == "zscore"
        else ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    )
    return convert_to_tensor(transform(image), dtype=torch.float32, track_meta=False)


def resize_slices(volume: torch.Tensor, size: int, mode: Literal["bilinear", "nearest-exact"]) -> torch.Tensor:
    """Resize every slice of (S, H0, W0) to (S, size, size): "bilinear" (antialiased) or "nearest-exact"."""
    if volume.shape[-2:] == (size, size):
        return volume
    options = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(volume[:, None].float(), size=(size, size), mode=mode, **options)[:, 0].to(volume.dtype)


_VOLUME_CACHE: dict[tuple, ProstateVolume] = {}
_VOLUME_CACHE_LOCK = threading.Lock()


def load_volume(
    case: ProstateCase,
    image_size: int,
    normalization: Normalization,
    channels: int = 1,
    labels: Mapping[str, int | Sequence[int]] = WHOLE_GLAND,
) -> ProstateVolume:
    """Read, normalise (each channel) and resize one case, cached per process (keyed by the case,
    its files' mtime and size and the options)."""
    files = [*case.image_paths[:channels], *([case.mask_path] if case.mask_path is not None else [])]
    stats = [path.stat() for path in files]
    label_key = tuple((name, tuple(np.atleast_1d(values).tolist())) for name, values in labels.items())
    key = (case, *((s.st_mtime_ns, s.st_size) for s in stats), image_size, normalization, channels, label_key)
    with _VOLUME_CACHE_LOCK:
        cached = _VOLUME_CACHE.get(key)
    if cached is not None:
        return cached
    image, mask, spacing, affine = read_case(case, channels, labels)
    image = torch.from_numpy(image).reshape(channels, *image.shape[-3:])
    if mask is None:  # unlabelled: an all-zero placeholder, never scored (batch["labeled"] is False)
        mask = np.zeros(image.shape[1:], dtype=np.uint8)
    label = torch.from_numpy(mask)
    if normalization == "percentile":
        for index, channel in enumerate(image):
            low, high = np.percentile(channel.numpy(), (1, 99))
            if low == high:
                raise DataError(
                    f"{_channel_source(case, channels, index)}: 1st and 99th intensity percentiles are equal "
                    f"({low:g}); percentile normalisation cannot scale it (use normalization: zscore)"
                )
    normalised = torch.stack([normalize_volume(channel, normalization) for channel in image])
    volume = ProstateVolume(
        case=case,
        image=resize_slices(normalised.flatten(0, 1), image_size, "bilinear").unflatten(0, (channels, -1)),
        mask=resize_slices(label, image_size, "nearest-exact"),
        label=label,
        spacing=torch.from_numpy(spacing),
        affine=torch.from_numpy(affine),
    )
    with _VOLUME_CACHE_LOCK:
        return _VOLUME_CACHE.setdefault(key, volume)


def volume_stacks(image: torch.Tensor, num_slices: int, slices: torch.Tensor | int | None = None) -> torch.Tensor:
    """2.5D network inputs of a (C, S, H, W) volume: for each centre slice, its ``num_slices``
    neighbours of every channel, channel-major (channel 0's slices s-k..s+k, then channel 1's, ...).

    Returns (S, C * num_slices, H, W), or (C * num_slices, H, W) for one centre slice ``slices``.
    """
    rows = neighbour_slices(image.shape[1], num_slices)
    rows = rows if slices is None else rows[slices]
    return image[:, rows].movedim(0, -4).flatten(-4, -3)


def neighbour_slices(num_total: int, num_slices: int) -> torch.Tensor:
    """int64 (num_total, num_slices): row s holds slices s - k .. s + k (k = num_slices // 2), edges replicated."""
    half = num_slices // 2
    return (torch.arange(num_total)[:, None] + torch.arange(-half, half + 1)).clamp_(0, num_total - 1)

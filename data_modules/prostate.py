"""Multi-site prostate T2 MRI (MS-Net/SAML release): reader, splits and DataModule.

Layout read::

    <data_root>/RUNMC/Case00.nii.gz  Case00_segmentation.nii.gz  ...   (alias folder ISBI)
    <data_root>/BMC/Case00.nii.gz    Case00_Segmentation.nii.gz  ...   (alias folder ISBI_1.5)
    <data_root>/I2CVB/  UCL/  BIDMC/  HK/

Volumes are nibabel (X, Y, Z) arrays with Z axial; they are transposed to (S, H0, W0) = (Z, X, Y)
so slices come first. Masks {0, 1, 2} (zonal) are merged into the binary whole gland. Each volume
is normalised and resized to ``image_size`` once, when it enters a per-process cache; training
draws 2.5D stacks of ``num_slices`` adjacent slices predicting the centre slice, evaluation gets
whole volumes with the mask at the original resolution (3D Dice / HD95 in mm).
Splits are always by case, derived from ``seed`` only (identical on every DDP rank).
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, Dataset

from data_modules.augment import SliceAugmentation
from data_modules.resumable import ResumableTraining, sample_seed, split_key
from distill.errors import DataError
from distill.formats.nifti import read_nifti
from distill.formats.sites import PROSTATE_SITES, SITE_ALIASES
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt
from distill.utils import read_yaml

SITES: tuple[str, ...] = PROSTATE_SITES
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_METHODS: tuple[str, ...] = ("per_site", "leave_one_site_out", "case_list")
MASK_SUFFIXES: tuple[str, ...] = ("_segmentation", "_Segmentation")
_CASE_FILE = re.compile(rf"^Case(\d+)({'|'.join(map(re.escape, MASK_SUFFIXES))})?(\.nii(?:\.gz)?)$")
#: Mask and image must share one grid: their voxel spacings and affines may differ this much (mm).
GRID_TOLERANCE_MM = 1e-3
_SITE_LOOKUP = {name.upper(): name for name in SITES} | {alias.upper(): site for alias, site in SITE_ALIASES.items()}
_KNOWN_SITES = f"known sites: {', '.join(SITES)} (aliases: {', '.join(f'{a} = {s}' for a, s in SITE_ALIASES.items())})"


@dataclass(frozen=True)
class ProstateCase:
    """One case on disk: canonical site name, case id ("Case05"), image and mask paths."""

    site: str
    case: str
    image_path: Path
    mask_path: Path

    @property
    def key(self) -> str:
        """ "SITE/CaseXX", the name used in case lists."""
        return f"{self.site}/{self.case}"


@dataclass(frozen=True)
class ProstateVolume:
    """One case ready for training and evaluation.

    Attributes:
        image: float32 (S, H, W), normalised and resized to ``image_size``.
        mask: uint8 (S, H, W), binary gland mask resized (nearest) like ``image``.
        label: uint8 (S, H0, W0), binary gland mask at the original resolution.
        spacing: float64 (3,), voxel size in mm along (S, H0, W0).
        affine: float64 (4, 4), the NIfTI affine of the image file.
    """

    case: ProstateCase
    image: torch.Tensor
    mask: torch.Tensor
    label: torch.Tensor
    spacing: torch.Tensor
    affine: torch.Tensor


def canonical_site(name: str, key: str = "sites") -> str:
    """Canonical site name for ``name`` (case-insensitive, aliases accepted); ``key`` names the option in errors."""
    site = _SITE_LOOKUP.get(str(name).upper())
    if site is None:
        raise DataError(f"{key}: unknown site {name!r}; {_KNOWN_SITES}")
    return site


def discover_cases(data_root: str | Path, sites: Sequence[str] | None = None) -> list[ProstateCase]:
    """Find every case of the requested sites (all site folders when ``sites`` is None).

    Returns cases ordered by site (``SITES`` order) and case number.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(
            f"{root}: prostate data root not found; expected site folders {'/, '.join(SITES)}/ holding "
            f"CaseXX.nii.gz + CaseXX_segmentation.nii.gz (write a synthetic tree with "
            f"`distill data synth-prostate --out {root}`)"
        )
    folders: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        site = _SITE_LOOKUP.get(folder.name.upper())
        if site is None:
            if sites is None:
                raise DataError(f"{folder}: unknown site folder; {_KNOWN_SITES}; list the sites to read with `sites:`")
            continue
        if site in folders:
            raise DataError(f"{folder}: site {site} is also at {folders[site]}; keep one folder per site")
        folders[site] = folder
    wanted = [canonical_site(name) for name in sites] if sites is not None else [s for s in SITES if s in folders]
    for site in wanted:
        if site not in folders:
            raise DataError(f"{root / site}: site folder not found (found: {', '.join(folders) or 'none'})")
    if not wanted:
        raise DataError(f"{root}: no site folders; {_KNOWN_SITES}")
    return [case for site in wanted for case in _site_cases(site, folders[site])]


def _site_cases(site: str, folder: Path) -> list[ProstateCase]:
    """Cases of one site folder, ordered by case number; every image needs its mask.

    Files are matched to cases by case number, so two files that claim one case's image or mask
    (``Case01.nii`` and ``Case01.nii.gz``, ``Case1.nii.gz`` and ``Case01.nii.gz``, both mask
    spellings) are refused: they would become two cases of one patient, possibly on both sides of a split.
    """
    claimed: dict[tuple[int, bool], Path] = {}
    for path in sorted(folder.iterdir()):
        match = _CASE_FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        key = (int(match.group(1)), match.group(2) is not None)
        if key in claimed:
            raise DataError(
                f"{claimed[key]}, {path}: two files claim the {'mask' if key[1] else 'image'} of case "
                f"{site}/Case{match.group(1)}; keep one"
            )
        claimed[key] = path
    images = sorted((number, path) for (number, is_mask), path in claimed.items() if not is_mask)
    if not images:
        raise DataError(f"{folder}: empty site folder (no CaseXX.nii.gz images)")
    cases = []
    for number, image in images:
        case = image.name.split(".", 1)[0]
        extension = image.name[len(case) :]
        mask = claimed.get((number, True))
        if mask is None:
            masks = [f"{case}{suffix}{extension}" for suffix in MASK_SUFFIXES]
            raise DataError(f"{image}: mask {masks[0]} (or {masks[1]}) not found")
        cases.append(ProstateCase(site, case, image, mask))
    return cases


def read_case(case: ProstateCase) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check one case.

    Returns:
        image float32 (S, H0, W0); binary mask uint8 (S, H0, W0); spacing float64 (3,) in mm for
        (S, H0, W0); affine float64 (4, 4).
    """
    image, nifti = read_nifti(case.image_path)
    mask, mask_nifti = read_nifti(case.mask_path)
    if mask.shape != image.shape:
        raise DataError(f"{case.mask_path}: mask shape {mask.shape} differs from image shape {image.shape}")
    spacing = np.asarray(nifti.header.get_zooms()[:3], dtype=np.float64)
    mask_spacing = np.asarray(mask_nifti.header.get_zooms()[:3], dtype=np.float64)
    if not np.allclose(mask_spacing, spacing, rtol=0, atol=GRID_TOLERANCE_MM):
        raise DataError(
            f"{case.mask_path}: voxel spacing {mask_spacing.tolist()} mm differs from {spacing.tolist()} mm "
            f"of its image {case.image_path} (tolerance {GRID_TOLERANCE_MM} mm)"
        )
    offset = float(np.abs(np.asarray(mask_nifti.affine) - np.asarray(nifti.affine)).max())
    if offset > GRID_TOLERANCE_MM:
        raise DataError(
            f"{case.mask_path}: affine differs from that of its image {case.image_path} by up to {offset:.4g} "
            f"(mask and image must share one grid; tolerance {GRID_TOLERANCE_MM} mm)"
        )
    non_finite = np.count_nonzero(~np.isfinite(image))
    if non_finite:
        raise DataError(f"{case.image_path}: {non_finite} NaN/inf voxels")
    valid = (mask == 0) | (mask == 1) | (mask == 2)
    if not valid.all():
        bad_values = np.unique(mask[~valid])[:5].tolist()
        raise DataError(f"{case.mask_path}: mask values must be in {{0, 1, 2}}, found {bad_values}")
    gland = np.ascontiguousarray(mask.transpose(2, 0, 1) > 0, dtype=np.uint8)
    if not gland.any():
        rank_zero_warn(
            f"{case.mask_path}: empty mask (no gland voxel); scored with MONAI's empty-mask conventions "
            "(distill.metrics.segmentation.volume_dice_hd95) and flagged as empty_label in the per-volume metrics"
        )
    return (
        np.ascontiguousarray(image.transpose(2, 0, 1)),
        gland,
        spacing[[2, 0, 1]],
        np.asarray(nifti.affine, dtype=np.float64),
    )


def normalize_volume(image: torch.Tensor, method: str) -> torch.Tensor:
    """Per-volume intensity normalisation of (S, H, W): "zscore" (mean 0, std 1) or
    "percentile" (clip at the 1st/99th percentile, rescale to [0, 1])."""
    transform = (
        NormalizeIntensity()
        if method == "zscore"
        else ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    )
    return convert_to_tensor(transform(image), dtype=torch.float32, track_meta=False)


def resize_slices(volume: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize every slice of (S, H0, W0) to (S, size, size): "bilinear" (antialiased) or "nearest-exact"."""
    if volume.shape[-2:] == (size, size):
        return volume
    options = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(volume[:, None].float(), size=(size, size), mode=mode, **options)[:, 0].to(volume.dtype)


_VOLUME_CACHE: dict[tuple, ProstateVolume] = {}
_VOLUME_CACHE_LOCK = threading.Lock()


def load_volume(case: ProstateCase, image_size: int, normalization: str) -> ProstateVolume:
    """Read, normalise and resize one case, cached per process (keyed by the files' mtime and size)."""
    stats = [path.stat() for path in (case.image_path, case.mask_path)]
    key = (str(case.image_path.resolve()), *((s.st_mtime_ns, s.st_size) for s in stats), image_size, normalization)
    with _VOLUME_CACHE_LOCK:
        cached = _VOLUME_CACHE.get(key)
    if cached is not None:
        return cached
    image, mask, spacing, affine = read_case(case)
    label = torch.from_numpy(mask)
    volume = ProstateVolume(
        case=case,
        image=resize_slices(normalize_volume(torch.from_numpy(image), normalization), image_size, "bilinear"),
        mask=resize_slices(label, image_size, "nearest-exact"),
        label=label,
        spacing=torch.from_numpy(spacing),
        affine=torch.from_numpy(affine),
    )
    with _VOLUME_CACHE_LOCK:
        return _VOLUME_CACHE.setdefault(key, volume)


def neighbour_slices(num_total: int, num_slices: int) -> torch.Tensor:
    """int64 (num_total, num_slices): row s holds slices s - k .. s + k (k = num_slices // 2), edges replicated."""
    half = num_slices // 2
    return (torch.arange(num_total)[:, None] + torch.arange(-half, half + 1)).clamp_(0, num_total - 1)


def _round_half_up(value: float) -> int:
    return int(np.floor(value + 0.5))


def _split_site(cases: list[ProstateCase], val_fraction: float, test_fraction: float, seed: int):
    """Shuffle one site's cases (seeded by seed and site) into (train, val, test).

    A site with >= 3 cases gets at least one val and one test case (when the fraction is > 0);
    a site with 2 cases gets one test case; train always keeps at least one case.
    """
    n = len(cases)
    n_test = max(_round_half_up(test_fraction * n), int(test_fraction > 0 and n >= 2))
    n_val = max(_round_half_up(val_fraction * n), int(val_fraction > 0 and n >= 3))
    n_val = max(0, min(n_val, n - 1 - n_test))
    n_test = max(0, min(n_test, n - 1 - n_val))
    site_index = SITES.index(cases[0].site)
    order = np.random.default_rng([seed, site_index]).permutation(n)
    shuffled = [cases[i] for i in order]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


def _by_site(cases: list[ProstateCase]) -> dict[str, list[ProstateCase]]:
    groups: dict[str, list[ProstateCase]] = {}
    for case in cases:
        groups.setdefault(case.site, []).append(case)
    return groups


def _sorted(cases: list[ProstateCase]) -> list[ProstateCase]:
    return sorted(cases, key=lambda c: (SITES.index(c.site), int(c.case[4:])))


def _read_case_list(path: str | Path, cases: list[ProstateCase]) -> dict[str, list[ProstateCase]]:
    """Splits from a YAML file ``{train: [SITE/CaseXX, ...], val: [...], test: [...]}``."""
    path = Path(path)
    spec = read_yaml(path, "case list")
    if not spec or set(spec) - set(SPLITS):
        raise DataError(f"{path}: expected a mapping with keys {', '.join(SPLITS)}")
    known = {case.key: case for case in cases}
    splits: dict[str, list[ProstateCase]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = spec.get(split) or []
        if not isinstance(entries, list):
            raise DataError(f"{path}: {split} must be a list of SITE/CaseXX entries")
        splits[split] = []
        for entry in entries:
            site, _, case = str(entry).partition("/")
            key = f"{_SITE_LOOKUP.get(site.upper(), site)}/{case}"
            if key not in known:
                raise DataError(f"{path}: unknown case {entry!r} in {split} (not among the cases read from data_root)")
            if key in seen:
                raise DataError(f"{path}: case {entry!r} is in both {seen[key]} and {split}")
            seen[key] = split
            splits[split].append(known[key])
    return splits


def split_cases(
    cases: list[ProstateCase],
    split: str = "per_site",
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    held_out_site: str | None = None,
    case_list: str | Path | None = None,
    seed: int = 0,
) -> dict[str, list[ProstateCase]]:
    """Case-level train/val/test splits ({"train", "val", "test"} -> cases); no case is in two splits.

    Args:
        split: "per_site" (fractions within every site), "leave_one_site_out" (test = all of
            ``held_out_site``, val = ``val_fraction`` of every other site) or "case_list"
            (YAML file ``case_list``).
    """
    if split == "case_list":
        return {name: _sorted(chosen) for name, chosen in _read_case_list(case_list, cases).items()}
    parts: dict[str, list[ProstateCase]] = {name: [] for name in SPLITS}
    held_out = canonical_site(held_out_site, "held_out_site") if split == "leave_one_site_out" else None
    groups = _by_site(cases)
    if held_out is not None and held_out not in groups:
        raise DataError(f"held_out_site: {held_out} is not among the sites read ({', '.join(groups)})")
    for site, site_cases in groups.items():
        if site == held_out:
            parts["test"] += site_cases
            continue
        site_test_fraction = 0.0 if held_out else test_fraction
        for name, chosen in zip(SPLITS, _split_site(site_cases, val_fraction, site_test_fraction, seed)):
            parts[name] += chosen
    return {name: _sorted(chosen) for name, chosen in parts.items()}


def restrict_training_cases(
    train: list[ProstateCase],
    train_sites: Sequence[str] | None,
    train_num_cases: int | None,
    seed: int,
    train_cases: Sequence[str] | None = None,
) -> list[ProstateCase]:
    """Training subset for limit-trained teachers: only ``train_cases`` ("SITE/CaseXX") or
    ``train_sites``, then the first ``train_num_cases`` after a shuffle seeded by ``seed``."""
    if train_cases is not None:
        by_key = {case.key: case for case in train}
        unknown = [key for key in train_cases if key not in by_key]
        if unknown:
            raise DataError(f"train_cases: {', '.join(unknown)} not among the training cases of this split")
        if not train_cases:
            raise DataError("train_cases: empty list (a teacher needs at least one training case)")
        train = [by_key[key] for key in sorted(set(train_cases))]
    if train_sites is not None:
        keep = {canonical_site(name, "train_sites") for name in train_sites}
        available = {case.site for case in train}
        if keep - available:
            raise DataError(f"train_sites: {', '.join(sorted(keep - available))} has no training cases")
        train = [case for case in train if case.site in keep]
    if train_num_cases is not None:
        if not 1 <= train_num_cases <= len(train):
            raise DataError(f"train_num_cases: {train_num_cases} requested, {len(train)} training cases available")
        chosen = np.random.default_rng(seed).permutation(len(train))[:train_num_cases]
        train = [train[i] for i in sorted(chosen)]
    return train


def training_augmentation(intensity: bool = True, cached_logits: bool = False) -> SliceAugmentation:
    """Flips, small rotation/scaling (geometric) and intensity scale and shift (``intensity``) for
    {"image": (C, H, W), "label": (1, H, W)}.

    With ``cached_logits`` the geometric transforms also move ``"teacher_logits"`` (K*C, H, W),
    bilinearly, so cached teacher outputs stay aligned with the augmented image.
    """
    return SliceAugmentation(intensity=intensity, spatial_keys=("teacher_logits",) if cached_logits else ())


class ProstateSliceDataset(Dataset):
    """Training samples: 2.5D stacks of adjacent slices with the centre slice's mask.

    Item: ``{"image": float32 (num_slices, H, W), "label": int64 (H, W) in {0, 1}}``, plus
    ``"teacher_logits"`` float16 (K, C, H, W) once cached teacher outputs are attached.
    Slices with gland are always used; with ``foreground_only`` False all slices are, otherwise
    a seeded ``background_fraction`` of the gland-free slices is added. Keys are indices or
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
        slices = [(v, s) for v, volume in enumerate(self.volumes) for s in range(volume.mask.shape[0])]
        has_gland = torch.cat([volume.mask.flatten(1).any(1) for volume in self.volumes]).tolist() if slices else []
        background = [pair for pair, gland in zip(slices, has_gland) if not gland]
        if foreground_only:
            kept = _round_half_up(background_fraction * len(background))
            background = [background[i] for i in np.random.default_rng(seed).permutation(len(background))[:kept]]
        self.samples = sorted([pair for pair, gland in zip(slices, has_gland) if gland] + background)
        self.teacher_logits: torch.Tensor | None = None  # (N, K, C, H, W), see attach_teacher_outputs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key)
        volume_index, slice_index = self.samples[index]
        volume = self.volumes[volume_index]
        neighbours = neighbour_slices(volume.image.shape[0], self.num_slices)[slice_index]
        sample = {"image": volume.image[neighbours], "label": volume.mask[slice_index][None]}
        if self.teacher_logits is not None:
            sample["teacher_logits"] = self.teacher_logits[index].float().flatten(0, 1)
        if self.transform is not None:
            if epoch is None:
                sample = self.transform(sample)
            else:  # a ResumableSampler key: the augmentation depends on (seed, epoch, index) only
                sample = self.transform(sample, torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)))
        item = {"image": sample["image"].float(), "label": sample["label"][0].long()}
        if self.teacher_logits is not None:
            item["teacher_logits"] = sample["teacher_logits"].half().unflatten(0, self.teacher_logits.shape[1:3])
        return item


class ProstateVolumeDataset(Dataset):
    """Evaluation items, one whole volume each (use with ``batch_size=None``).

    Item: ``{"image": float32 (S, num_slices, H, W), "label": int64 (S, H0, W0) binary,
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
            "image": volume.image[neighbour_slices(volume.image.shape[0], self.num_slices)],
            "label": volume.label.long(),
            "spacing": volume.spacing,
            "site": volume.case.site,
            "case": volume.case.case,
            "image_path": str(volume.case.image_path),
            "affine": volume.affine,
        }


class ProstateDataModule(ResumableTraining, L.LightningDataModule):
    """Multi-site prostate T2 MRI for 2.5D segmentation with case-level splits.

    Train batches: ``{"image": float32 (B, num_slices, H, W), "label": int64 (B, H, W)}``.
    Val/test/predict: one volume per item (see :class:`ProstateVolumeDataset`); predict serves
    the test cases (``predict_split="test"``) or every case read (``"all"``).

    Args:
        data_root: folder holding the site folders.
        sites: sites to read (aliases accepted); None reads every site folder.
        split: "per_site", "leave_one_site_out" (needs ``held_out_site``) or "case_list"
            (needs ``case_list``, a YAML file with train/val/test lists of "SITE/CaseXX").
        val_fraction, test_fraction: per-site fractions ("per_site"; val only for leave-one-site-out).
        train_sites, train_num_cases, train_cases: restrict the training cases (limit-trained
            teachers) to sites, a seeded number of cases, or a list of "SITE/CaseXX"; val/test are
            unaffected.
        num_slices: adjacent slices stacked as channels (odd).
        image_size: in-plane size the network sees.
        normalization: "zscore" or "percentile" (1st/99th clip, rescale to [0, 1]), per volume.
        foreground_only, background_fraction: train on gland slices plus this fraction of the others.
        augment: MONAI flips, small rotations/scaling and intensity jitter on training samples.
        intensity_augmentation: include the intensity jitter (cached teacher outputs cannot follow it).
        seed: fixes splits, subsets, background slices, the shuffle order of every epoch and the
            augmentation of every sample (same on every rank; checkpoints hold the position in the
            epoch, so a resumed run continues exactly, see :mod:`data_modules.resumable`).
        load_threads: volumes read in parallel in ``setup``.
    """

    def __init__(
        self,
        data_root: str = "data/prostate",
        sites: list[str] | None = None,
        split: Literal["per_site", "leave_one_site_out", "case_list"] = "per_site",
        val_fraction: ClosedUnitInterval = 0.15,
        test_fraction: ClosedUnitInterval = 0.25,
        held_out_site: str | None = None,
        case_list: str | None = None,
        train_sites: list[str] | None = None,
        train_num_cases: PositiveInt | None = None,
        train_cases: list[str] | None = None,
        num_slices: PositiveInt = 3,
        image_size: PositiveInt = 384,
        normalization: Literal["zscore", "percentile"] = "zscore",
        foreground_only: bool = True,
        background_fraction: ClosedUnitInterval = 0.0,
        augment: bool = True,
        intensity_augmentation: bool = True,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
        predict_split: Literal["test", "all"] = "test",
        load_threads: PositiveInt = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        checks = {
            "split": (split in SPLIT_METHODS, " or ".join(SPLIT_METHODS)),
            "held_out_site": (split != "leave_one_site_out" or held_out_site, "required for split=leave_one_site_out"),
            "case_list": (split != "case_list" or case_list is not None, "required for split=case_list"),
            "val_fraction": (
                0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1,
                "val_fraction and test_fraction must be in [0, 1) with a sum below 1",
            ),
            "num_slices": (num_slices >= 1 and num_slices % 2 == 1, "must be odd and positive"),
            "image_size": (image_size >= 8, "must be at least 8"),
            "normalization": (normalization in ("zscore", "percentile"), "zscore or percentile"),
            "background_fraction": (0 <= background_fraction <= 1, "must be in [0, 1]"),
            "predict_split": (predict_split in ("test", "all"), "test or all"),
        }
        for key, (ok, requirement) in checks.items():
            if not ok:
                raise DataError(f"{key}: {requirement} (got {self.hparams[key]!r})")
        self._case_splits: dict[str, list[ProstateCase]] | None = None
        self._volumes: dict[str, list[ProstateVolume]] = {}
        self._train_set: ProstateSliceDataset | None = None

    @property
    def in_channels(self) -> int:
        """Network input channels (= ``num_slices``)."""
        return self.hparams.num_slices

    @property
    def num_classes(self) -> int:
        """Background and gland."""
        return 2

    @property
    def case_splits(self) -> dict[str, list[ProstateCase]]:
        """{"train", "val", "test", "all"} -> cases; found and split once per DataModule."""
        if self._case_splits is None:
            hp = self.hparams
            cases = discover_cases(hp.data_root, hp.sites)
            splits = split_cases(
                cases, hp.split, hp.val_fraction, hp.test_fraction, hp.held_out_site, hp.case_list, hp.seed
            )
            splits["train"] = restrict_training_cases(
                splits["train"], hp.train_sites, hp.train_num_cases, hp.seed, hp.train_cases
            )
            splits["all"] = cases
            self._case_splits = splits
        return self._case_splits

    def setup(self, stage: str | None = None) -> None:
        """Load (once) the volumes the stage needs: fit -> train + val, validate -> val, test, predict.

        Fitting on a case list needs its train and val lists (val chooses ``best.ckpt``).
        """
        hp = self.hparams
        if stage == "fit" and hp.split == "case_list":
            for name in ("train", "val"):
                if not self.case_splits[name]:
                    raise DataError(
                        f"{hp.case_list}: the case list has no {name} cases; fitting needs them "
                        "(validation chooses best.ckpt)"
                    )
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (hp.predict_split,),
        }.get(stage, ("train", "val", "test"))
        for name in needed:
            self._split_volumes(name)

    def _split_volumes(self, name: str) -> list[ProstateVolume]:
        """Volumes of one split ("train", "val", "test" or "all"), read in parallel threads once."""
        if name not in self._volumes:
            hp = self.hparams
            load = functools.partial(load_volume, image_size=hp.image_size, normalization=hp.normalization)
            with ThreadPoolExecutor(max_workers=max(1, hp.load_threads)) as pool:
                self._volumes[name] = list(pool.map(load, self.case_splits[name]))
        return self._volumes[name]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self.resumable_loader(
            self.train_set,
            hp.seed,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    @property
    def train_set(self) -> ProstateSliceDataset:
        """Training slices, built once: their augmentation random stream runs on across epochs."""
        if self._train_set is None:
            hp = self.hparams
            self._train_set = ProstateSliceDataset(
                self._split_volumes("train"),
                num_slices=hp.num_slices,
                foreground_only=hp.foreground_only,
                background_fraction=hp.background_fraction,
                transform=training_augmentation(hp.intensity_augmentation) if hp.augment else None,
                seed=hp.seed,
            )
        return self._train_set

    # ------------------------------------------- teacher-output cache protocol
    def teacher_cache_fingerprint(self) -> dict:
        """What cached teacher outputs depend on: the training samples, size, slices, normalisation."""
        hp, train = self.hparams, self.train_set
        samples = [f"{train.volumes[v].case.key}:{s}" for v, s in train.samples]
        digest = hashlib.sha256("\n".join(samples).encode()).hexdigest()
        return {
            "samples": digest,
            "num_samples": len(samples),
            "image_size": hp.image_size,
            "num_slices": hp.num_slices,
            "normalization": hp.normalization,
        }

    def teacher_cache_inputs(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Un-augmented training inputs (B, num_slices, H, W) in sample order, for the teachers."""
        train = self.train_set
        for start in range(0, len(train.samples), batch_size):
            stacks = []
            for volume_index, slice_index in train.samples[start : start + batch_size]:
                volume = train.volumes[volume_index]
                stacks.append(volume.image[neighbour_slices(volume.image.shape[0], train.num_slices)[slice_index]])
            yield torch.stack(stacks)

    def attach_teacher_outputs(self, logits: torch.Tensor) -> None:
        """Serve ``logits`` (N, K, C, H, W) as ``batch["teacher_logits"]``, augmented with the image."""
        hp = self.hparams
        if hp.augment and hp.intensity_augmentation:
            raise DataError(
                "teacher_cache: intensity augmentation changes what the teachers would predict and "
                "cannot be applied to cached outputs; set data.init_args.intensity_augmentation=false"
            )
        train = self.train_set
        if logits.shape[0] != len(train.samples):
            raise DataError(f"teacher_cache: {logits.shape[0]} cached samples for {len(train.samples)} training slices")
        train.teacher_logits = logits
        if hp.augment:
            train.transform = training_augmentation(intensity=False, cached_logits=True)

    def _volume_loader(self, name: str) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            ProstateVolumeDataset(self._split_volumes(name), self.hparams.num_slices),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._volume_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._volume_loader(self.hparams.predict_split)

"""Prostate MRI segmentation data (the MS-Net/SAML release and the common public layouts):
readers, splits and the DataModule.

Layouts (``layout:``, see :mod:`data_modules.layouts`): ``sites`` (default, the release)::

    <data_root>/RUNMC/Case00.nii.gz  Case00_segmentation.nii.gz  ...   (alias folder ISBI)
    <data_root>/BMC/Case00.nii.gz    Case00_Segmentation.nii.gz  ...   (alias folder ISBI_1.5)
    <data_root>/I2CVB/  UCL/  BIDMC/  HK/   (other folder names: list them in ``sites:``)

``datalist`` (MONAI Decathlon-style ``dataset.json``), ``msd`` (Task05_Prostate) and ``nnunet``
(nnU-Net v2 raw). Volumes are nibabel (X, Y, Z[, C]) arrays with Z axial; they are transposed to
(C, S, H0, W0) = (channel, Z, X, Y) so slices come first. Masks become class indices through
``labels``: the whole gland (any of {1, 2} -> 1, the default) or a mapping such as zonal
``{PZ: 1, TZ: 2}`` (class k = the k-th entry). Each volume is normalised (per channel) and resized
to ``image_size`` once, when it enters a per-process cache; training draws 2.5D stacks of
``num_slices`` adjacent slices of every channel predicting the centre slice, evaluation gets whole
volumes with the mask at the original resolution (3D Dice / HD95 in mm).
Splits are always by case, derived from ``seed`` only (identical on every DDP rank).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, Dataset

from data_modules.augment import SliceAugmentation
from data_modules.layouts import (
    LAYOUTS,
    SITE_LOOKUP,
    ProstateCase,
    datalist_cases,
    image_folder_cases,
    msd_cases,
    nifti_stem,
    nnunet_cases,
)
from data_modules.resumable import ResumableTraining, sample_seed, split_key
from distill.errors import DataError
from distill.formats.nifti import NIFTI_READ_ERRORS, read_nifti
from distill.formats.sites import PROSTATE_SITES, SITE_ALIASES
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt
from distill.utils import read_yaml, refuse_unless_memory_fits

SITES: tuple[str, ...] = PROSTATE_SITES
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_METHODS: tuple[str, ...] = ("per_site", "leave_one_site_out", "case_list", "datalist")
MASK_SUFFIXES: tuple[str, ...] = ("_segmentation", "_Segmentation")
_CASE_FILE = re.compile(rf"^Case(\d+)({'|'.join(map(re.escape, MASK_SUFFIXES))})?(\.nii(?:\.gz)?)$")
#: Mask and image must share one grid: their voxel spacings and affines may differ this much (mm).
GRID_TOLERANCE_MM = 1e-3
_SITE_LOOKUP = SITE_LOOKUP
_KNOWN_SITES = f"known sites: {', '.join(SITES)} (aliases: {', '.join(f'{a} = {s}' for a, s in SITE_ALIASES.items())})"
#: ``labels: whole_gland``: every gland label of the release (1 peripheral, 2 central/transition zone) is class 1.
WHOLE_GLAND: dict[str, list[int]] = {"gland": [1, 2]}
#: Labels as written in YAML: ``whole_gland`` or {class name: file value or values}.
LabelMap = Literal["whole_gland"] | dict[str, int | list[int]]
#: ``labeled_cases`` as written in YAML: a number of cases, a fraction of them, or a list of "SITE/Case" keys.
LabeledCases = int | float | list[str]


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


def _site_order(site: str) -> tuple[int, str]:
    """Sort key of a site: the release's sites in their usual order, then other names alphabetically."""
    return (SITES.index(site), "") if site in SITES else (len(SITES), site)


def _natural(text: str) -> tuple:
    """Sort key ordering digits by value ("Case2" < "Case10")."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def canonical_site(name: str, key: str = "sites", available: Sequence[str] = ()) -> str:
    """Canonical site name for ``name``: a release site (case-insensitive, aliases accepted) or one of
    the ``available`` sites of the data read; ``key`` names the option in errors."""
    site = _SITE_LOOKUP.get(str(name).upper())
    if site is not None:
        return site
    other = next((s for s in available if s.upper() == str(name).upper()), None)
    if other is None:
        read = f"; sites read: {', '.join(available)}" if available else ""
        raise DataError(f"{key}: unknown site {name!r}; {_KNOWN_SITES}{read}")
    return other


def discover_cases(
    data_root: str | Path, sites: Sequence[str] | None = None, exclude: Sequence[str | Path] = ()
) -> list[ProstateCase]:
    """Find every case of the requested sites (all site folders when ``sites`` is None) of the
    ``sites`` layout. A folder with another name than the release's sites is read when ``sites``
    lists it (by its exact name, case-insensitively); ``exclude`` folders (unlabelled images) are skipped.

    Returns cases ordered by site (``SITES`` order, then other names) and case number.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(
            f"{root}: prostate data root not found; expected site folders {'/, '.join(SITES)}/ holding "
            f"CaseXX.nii.gz + CaseXX_segmentation.nii.gz (write a synthetic tree with "
            f"`distill data synth-prostate --out {root}`)"
        )
    listed = {str(name).upper() for name in sites or ()}
    skipped = {(root / folder).resolve() for folder in exclude}
    folders: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.resolve() in skipped:
            continue
        site = _SITE_LOOKUP.get(folder.name.upper())
        if site is None:
            if sites is None:
                raise DataError(f"{folder}: unknown site folder; {_KNOWN_SITES}; list the sites to read with `sites:`")
            if folder.name.upper() not in listed:
                continue
            site = folder.name
        if site in folders:
            raise DataError(f"{folder}: site {site} is also at {folders[site]}; keep one folder per site")
        folders[site] = folder
    wanted = (
        [canonical_site(name, available=[s for s in folders if s not in SITES]) for name in sites]
        if sites is not None
        else [s for s in SITES if s in folders]
    )
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
    A mask without its image is refused; other NIfTI files are left unread, with a warning.
    """
    claimed: dict[tuple[int, bool], Path] = {}
    unread = []
    for path in sorted(folder.iterdir()):
        match = _CASE_FILE.match(path.name)
        if match is None or not path.is_file():
            if nifti_stem(path) is not None and not path.name.startswith("."):
                unread.append(path.name)
            continue
        key = (int(match.group(1)), match.group(2) is not None)
        if key in claimed:
            raise DataError(
                f"{claimed[key]}, {path}: two files claim the {'mask' if key[1] else 'image'} of case "
                f"{site}/Case{match.group(1)}; keep one"
            )
        claimed[key] = path
    images = sorted((number, path) for (number, is_mask), path in claimed.items() if not is_mask)
    orphan = next(
        (path for (number, is_mask), path in sorted(claimed.items()) if is_mask and (number, False) not in claimed),
        None,
    )
    if orphan is not None:
        case = orphan.name.split("_", 1)[0]
        raise DataError(f"{orphan}: mask of case {site}/{case} without its image ({case}.nii.gz not found)")
    if not images:
        raise DataError(f"{folder}: empty site folder (no CaseXX.nii.gz images)")
    if unread:
        rank_zero_warn(
            f"{folder}: {len(unread)} NIfTI file(s) not named CaseXX.nii.gz or CaseXX_segmentation.nii.gz "
            f"left unread ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''})"
        )
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


def load_volume(
    case: ProstateCase,
    image_size: int,
    normalization: str,
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
    site = cases[0].site  # release sites keep their historical seeding; others by a stable hash of the name
    site_index = SITES.index(site) if site in SITES else zlib.crc32(site.encode()) + len(SITES)
    order = np.random.default_rng([seed, site_index]).permutation(n)
    shuffled = [cases[i] for i in order]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


def _by_site(cases: list[ProstateCase]) -> dict[str, list[ProstateCase]]:
    groups: dict[str, list[ProstateCase]] = {}
    for case in cases:
        groups.setdefault(case.site, []).append(case)
    return groups


def _sorted(cases: list[ProstateCase]) -> list[ProstateCase]:
    return sorted(cases, key=lambda c: (_site_order(c.site), _natural(c.case)))


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
                where = f"listed twice in {split}" if seen[key] == split else f"in both {seen[key]} and {split}"
                raise DataError(f"{path}: case {entry!r} is {where}")
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
            ``held_out_site``, val = ``val_fraction`` of every other site), "case_list"
            (YAML file ``case_list``) or "datalist" (each case's ``listed_split``: the
            training / validation / test lists of a datalist layout).
    """
    if split == "case_list":
        return {name: _sorted(chosen) for name, chosen in _read_case_list(case_list, cases).items()}
    if split == "datalist":
        return {name: _sorted([c for c in cases if c.listed_split == name]) for name in SPLITS}
    parts: dict[str, list[ProstateCase]] = {name: [] for name in SPLITS}
    groups = _by_site(cases)
    held_out = canonical_site(held_out_site, "held_out_site", list(groups)) if split == "leave_one_site_out" else None
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
        available = {case.site for case in train}
        keep = {canonical_site(name, "train_sites", sorted(available)) for name in train_sites}
        if keep - available:
            raise DataError(f"train_sites: {', '.join(sorted(keep - available))} has no training cases")
        train = [case for case in train if case.site in keep]
    if train_num_cases is not None:
        if not 1 <= train_num_cases <= len(train):
            raise DataError(f"train_num_cases: {train_num_cases} requested, {len(train)} training cases available")
        chosen = np.random.default_rng(seed).permutation(len(train))[:train_num_cases]
        train = [train[i] for i in sorted(chosen)]
    return train


def keep_labels_of(
    train: list[ProstateCase], labeled_cases: int | float | Sequence[str] | None, seed: int
) -> list[ProstateCase]:
    """Semi-supervised training: every training case stays, but only the chosen ones keep their mask.

    ``labeled_cases`` N (int) keeps the masks of the first N labelled training cases after the
    shuffle ``np.random.default_rng(seed).permutation`` (the cases ``train_num_cases: N`` keeps,
    so both compare on the same labels); a float f in (0, 1) keeps round(f x count) (half up, at
    least 1); a list keeps those "SITE/Case" keys. The others become unlabelled (``mask_path`` None).
    """
    if labeled_cases is None:
        return train
    labeled = [case for case in train if case.labeled]
    if isinstance(labeled_cases, (list, tuple)):
        by_key = {case.key: case for case in labeled}
        unknown = [str(key) for key in labeled_cases if key not in by_key]
        if unknown:
            raise DataError(f"labeled_cases: {', '.join(unknown)} not among the labelled training cases of this split")
        keep = set(labeled_cases)
    else:
        count = (
            labeled_cases if isinstance(labeled_cases, int) else max(1, _round_half_up(labeled_cases * len(labeled)))
        )
        if not 1 <= count <= len(labeled):
            raise DataError(
                f"labeled_cases: {labeled_cases} requested, {len(labeled)} labelled training cases available"
            )
        chosen = np.random.default_rng(seed).permutation(len(labeled))[:count]
        keep = {labeled[i].key for i in chosen}
    return [case if case.key in keep else dataclasses.replace(case, mask_path=None) for case in train]


def training_augmentation(intensity: bool = True, cached_logits: bool = False) -> SliceAugmentation:
    """Flips, small rotation/scaling (geometric) and intensity scale and shift (``intensity``) for
    {"image": (C, H, W), "label": (1, H, W)}.

    With ``cached_logits`` the geometric transforms also move ``"teacher_logits"`` (K*C, H, W),
    bilinearly, so cached teacher outputs stay aligned with the augmented image.
    """
    return SliceAugmentation(intensity=intensity, spatial_keys=("teacher_logits",) if cached_logits else ())


def _label_map(labels: str | Mapping) -> dict[str, list[int]]:
    """``labels`` as {class name: file values}, checked (one line naming ``labels`` when wrong)."""
    if labels == "whole_gland":
        return dict(WHOLE_GLAND)
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"labels: 'whole_gland' or a mapping {{class name: mask value(s)}}, got {labels!r}")
    mapping, seen = {}, {}
    for name, values in labels.items():
        values = [values] if isinstance(values, int) else list(values)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise DataError(f"labels: class {name!r} needs positive integer mask values, got {labels[name]!r}")
        for value in values:
            if value in seen:
                where = f"listed twice in {name!r}" if seen[value] == name else f"in both {seen[value]!r} and {name!r}"
                raise DataError(f"labels: mask value {value} is {where}")
            seen[value] = name
        mapping[str(name)] = values
    return mapping


class ProstateSliceDataset(Dataset):
    """Training samples: 2.5D stacks of adjacent slices with the centre slice's mask.

    Item: ``{"image": float32 (channels * num_slices, H, W) (see :func:`volume_stacks`),
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
            kept = _round_half_up(background_fraction * len(background))
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
            if epoch is None:
                sample = self.transform(sample)
            else:  # a ResumableSampler key: the augmentation depends on (seed, epoch, index) only
                sample = self.transform(sample, torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)))
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


class ProstateDataModule(ResumableTraining, L.LightningDataModule):
    """Prostate MRI (any layout of :mod:`data_modules.layouts`) for 2.5D segmentation with case-level splits.

    Train batches: ``{"image": float32 (B, channels * num_slices, H, W), "label": int64 (B, H, W),
    "labeled": bool (B,)}`` (``labeled`` False: an unlabelled slice with an all-zero ``label``; only
    when ``labeled_cases`` leaves some training cases unlabelled).
    Val/test/predict: one volume per item (see :class:`ProstateVolumeDataset`); predict serves
    the test cases (``predict_split="test"``) or every labelled case read (``"all"``).

    Args:
        data_root: folder holding the data (site folders, or a datalist / MSD / nnU-Net dataset folder).
        sites: sites to read (aliases accepted; with ``layout: sites`` other folder names are read
            when listed here); None reads every site.
        split: "per_site", "leave_one_site_out" (needs ``held_out_site``), "case_list"
            (needs ``case_list``, a YAML file with train/val/test lists of "SITE/CaseXX") or
            "datalist" (the training / validation / test lists of ``layout: datalist``; other
            splits pool every labelled entry and split it).
        val_fraction, test_fraction: per-site fractions ("per_site"; val only for leave-one-site-out).
        train_sites, train_num_cases, train_cases: restrict the training cases (limit-trained
            teachers) to sites, a seeded number of cases, or a list of "SITE/CaseXX"; val/test are
            unaffected.
        num_slices: adjacent slices of each channel stacked as input channels (odd).
        image_size: in-plane size the network sees.
        normalization: "zscore" or "percentile" (1st/99th clip, rescale to [0, 1]), per volume and channel.
        foreground_only, background_fraction: train on foreground slices plus this fraction of the others.
        augment: MONAI flips, small rotations/scaling and intensity jitter on training samples.
        intensity_augmentation: include the intensity jitter (cached teacher outputs cannot follow it).
        seed: fixes splits, subsets, background slices, labelled cases, the shuffle order of every
            epoch and the augmentation of every sample (same on every rank; checkpoints hold the
            position in the epoch, so a resumed run continues exactly, see :mod:`data_modules.resumable`).
        load_threads: volumes read in parallel in ``setup``.
        layout: "sites", "datalist", "msd" or "nnunet" (:mod:`data_modules.layouts`).
        datalist: the datalist JSON of ``layout: datalist`` (default ``<data_root>/dataset.json``;
            paths in it are relative to its folder).
        channels: MRI channels read per case (1: T2; 2: T2 + ADC), the first ``channels`` of a 4D
            file or channel files; the network sees ``channels * num_slices`` input channels.
        labels: "whole_gland" (mask values 1 and 2 -> class 1) or ``{class name: value(s)}``, e.g.
            zonal ``{PZ: 1, TZ: 2}`` (class k = the k-th entry; other nonzero values are refused).
        labeled_cases: keep masks for only these training cases (an int N, a fraction in (0, 1) or a
            list of "SITE/Case"; see :func:`keep_labels_of`); every training image is still used.
        unlabeled_images: folders (relative to ``data_root``) of images without masks, added to the
            training images as unlabelled (never to val/test).
    """

    def __init__(
        self,
        data_root: str = "data/prostate",
        sites: list[str] | None = None,
        split: Literal["per_site", "leave_one_site_out", "case_list", "datalist"] = "per_site",
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
        layout: Literal["sites", "datalist", "msd", "nnunet"] = "sites",
        datalist: str | None = None,
        channels: PositiveInt = 1,
        labels: LabelMap = "whole_gland",
        labeled_cases: LabeledCases | None = None,
        unlabeled_images: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        labeled_ok = (
            labeled_cases is None
            or isinstance(labeled_cases, (list, tuple))
            or (isinstance(labeled_cases, float) and 0 < labeled_cases < 1)
            or (isinstance(labeled_cases, int) and not isinstance(labeled_cases, bool) and labeled_cases >= 1)
        )
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
            "layout": (layout in LAYOUTS, " or ".join(LAYOUTS)),
            "labeled_cases": (labeled_ok, "a number of cases >= 1, a fraction in (0, 1) or a list of SITE/Case keys"),
        }
        if split == "datalist":
            checks["split"] = (layout == "datalist", "split=datalist needs layout=datalist")
        for key, (ok, requirement) in checks.items():
            if not ok:
                raise DataError(f"{key}: {requirement} (got {self.hparams[key]!r})")
        self.label_map = _label_map(labels)
        self._case_splits: dict[str, list[ProstateCase]] | None = None
        self._volumes: dict[str, list[ProstateVolume]] = {}
        self._train_set: ProstateSliceDataset | None = None

    @property
    def in_channels(self) -> int:
        """Network input channels (= ``channels * num_slices``)."""
        return self.hparams.channels * self.hparams.num_slices

    @property
    def num_classes(self) -> int:
        """Background and the classes of ``labels`` (2 for the whole gland)."""
        return 1 + len(self.label_map)

    @property
    def class_names(self) -> list[str]:
        """Names of the foreground classes 1, 2, ... ("gland" for the whole gland)."""
        return list(self.label_map)

    @property
    def site_names(self) -> list[str]:
        """Sites of the labelled cases read (release order first), for per-site metrics."""
        return sorted({case.site for case in self.case_splits["all"]}, key=_site_order)

    def _read_cases(self) -> list[ProstateCase]:
        """Every case of ``layout``, labelled or not, restricted to ``sites`` (when given)."""
        hp = self.hparams
        root = Path(hp.data_root)
        if hp.layout == "sites":
            return discover_cases(root, hp.sites, exclude=hp.unlabeled_images or ())
        if not root.is_dir():
            raise DataError(f"{root}: data root not found (layout: {hp.layout})")
        if hp.layout == "datalist":
            cases = datalist_cases(hp.datalist or root / "dataset.json", default_site=root.name)
        elif hp.layout == "msd":
            cases = msd_cases(root)
        else:
            cases = nnunet_cases(root, hp.channels)
        if hp.sites is not None:
            available = sorted({case.site for case in cases}, key=_site_order)
            keep = {canonical_site(name, "sites", available) for name in hp.sites}
            missing = keep - set(available)
            if missing:
                raise DataError(
                    f"sites: {', '.join(sorted(missing))} not among the sites read ({', '.join(available)})"
                )
            cases = [case for case in cases if case.site in keep]
        return cases

    @property
    def case_splits(self) -> dict[str, list[ProstateCase]]:
        """{"train", "val", "test", "all"} -> cases; found and split once per DataModule.

        "all" holds the labelled cases; "train" ends with the unlabelled images (datalist entries
        without ``label``, ``unlabeled_images`` folders) and holds cases whose mask
        ``labeled_cases`` drops (``mask_path`` None).
        """
        if self._case_splits is None:
            hp = self.hparams
            cases = self._read_cases()
            labeled = [case for case in cases if case.labeled]
            if not labeled:
                raise DataError(f"{hp.data_root}: no labelled case (every case lacks a mask)")
            splits = split_cases(
                labeled, hp.split, hp.val_fraction, hp.test_fraction, hp.held_out_site, hp.case_list, hp.seed
            )
            train = restrict_training_cases(
                splits["train"], hp.train_sites, hp.train_num_cases, hp.seed, hp.train_cases
            )
            unlabeled = [case for case in cases if not case.labeled]
            for folder in hp.unlabeled_images or ():
                unlabeled += image_folder_cases(Path(hp.data_root) / folder, hp.layout, hp.channels)
            splits["train"] = keep_labels_of(train, hp.labeled_cases, hp.seed) + unlabeled
            known = {case.key for case in labeled}
            clash = next((case for case in unlabeled if case.key in known), None)
            if clash is not None:
                raise DataError(f"{clash.image_path}: unlabelled image named like the labelled case {clash.key}")
            splits["all"] = _sorted(labeled)
            self._case_splits = splits
        return self._case_splits

    def setup(self, stage: str | None = None) -> None:
        """Load (once) the volumes the stage needs: fit -> train + val, validate -> val, test, predict.

        Fitting needs train and val cases (val chooses ``best.ckpt``), and every class of ``labels``
        in some training mask (a class no mask holds cannot be learnt: the labels do not fit the data).
        """
        hp = self.hparams
        if stage == "fit":
            for name in ("train", "val"):
                if self.case_splits[name]:
                    continue
                if hp.split == "case_list":
                    raise DataError(
                        f"{hp.case_list}: the case list has no {name} cases; fitting needs them "
                        "(validation chooses best.ckpt)"
                    )
                counts = ", ".join(f"{part} {len(self.case_splits[part])}" for part in SPLITS)
                raise DataError(
                    f"{hp.data_root}: split={hp.split} gives no {name} cases ({counts}); "
                    "fitting needs them (validation chooses best.ckpt): read more cases or change the split"
                )
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (hp.predict_split,),
        }.get(stage, ("train", "val", "test"))
        self._refuse_volumes_beyond_memory([name for name in needed if name not in self._volumes])
        for name in needed:
            self._split_volumes(name)
        if stage == "fit":
            self._check_classes_occur(self._split_volumes("train"))

    def _check_classes_occur(self, volumes: Sequence[ProstateVolume]) -> None:
        """Refuse a class of ``labels`` that none of the labelled ``volumes`` holds, naming the masks read."""
        masks = [volume for volume in volumes if volume.labeled]
        present = torch.zeros(self.num_classes, dtype=torch.bool)
        for volume in masks:
            present |= torch.bincount(volume.label.flatten().long(), minlength=self.num_classes).bool()
        for index, (name, values) in enumerate(self.label_map.items(), start=1):
            if not present[index]:
                paths = [str(volume.case.mask_path) for volume in masks]
                shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
                raise DataError(
                    f"labels: class {name!r} (mask value {' or '.join(map(str, values))}) occurs in none of the "
                    f"{len(paths)} training masks read ({shown})"
                )

    def _split_volumes(self, name: str) -> list[ProstateVolume]:
        """Volumes of one split ("train", "val", "test" or "all"), read in parallel threads once."""
        if name not in self._volumes:
            hp = self.hparams
            load = functools.partial(
                load_volume,
                image_size=hp.image_size,
                normalization=hp.normalization,
                channels=hp.channels,
                labels=self.label_map,
            )
            with ThreadPoolExecutor(max_workers=max(1, hp.load_threads)) as pool:
                self._volumes[name] = list(pool.map(load, self.case_splits[name]))
        return self._volumes[name]

    def _refuse_volumes_beyond_memory(self, names: Sequence[str]) -> None:
        """Refuse, in one line and before reading any voxel, splits whose volumes at ``image_size`` would not
        fit in memory: float32 images (every channel) and uint8 masks, slice counts read from the headers."""
        cases = list({case.key: case for name in names for case in self.case_splits[name]}.values())
        if not cases:
            return
        hp = self.hparams
        slices = sum(nifti_slices(case.image_path) for case in cases)
        num_bytes = slices * hp.image_size**2 * (4 * hp.channels + 1)
        refuse_unless_memory_fits(
            num_bytes,
            f"image_size={hp.image_size}: the {' and '.join(names)} volumes ({len(cases)} cases, {slices} slices "
            f"at {hp.image_size}x{hp.image_size})",
            "lower data.init_args.image_size",
        )

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
        """Un-augmented training inputs (B, in_channels, H, W) in sample order (unlabelled slices
        included), for the teachers."""
        train = self.train_set
        for start in range(0, len(train.samples), batch_size):
            yield torch.stack(
                [
                    volume_stacks(train.volumes[v].image, train.num_slices, s)
                    for v, s in train.samples[start : start + batch_size]
                ]
            )

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

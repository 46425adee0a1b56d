"""Cholec80 / M2CAI16 readers, video splits and the three surgical DataModules.

Layouts read (names exactly as released)::

    cholec80/videos/videoXX.mp4
    cholec80/phase_annotations/videoXX-phase.txt    Frame<TAB>Phase, one line per 25 fps frame
    cholec80/tool_annotations/videoXX-tool.txt      Frame<TAB>Grasper...SpecimenBag, every 25th frame
    m2cai16/train_dataset/workflow_video_XX.mp4       + workflow_video_XX.txt        (27 videos)
    m2cai16/test_dataset/test_workflow_video_XX.mp4   + test_workflow_video_XX.txt   (14 videos)

M2CAI16 files are found anywhere under the root with the label file next to its video, so the
flat layouts of some mirrors work too. A video's name is its file stem (``video01``,
``test_workflow_video_03``); frame folders, feature files and predictions are keyed by it.

**Annotation length.** A phase file must annotate exactly as many frames as the video decodes
to (the real Cholec80 and M2CAI16 files do); ``frame_tolerance`` accepts a few frames of
difference for decoders that drop trailing frames.

**Splits** (``split=``):

- ``"paper"`` (Cholec80, default): videos 1-40 train, 41-80 test (Ding et al. 2022);
- ``"tecno"`` (Cholec80): 1-40 train, 41-48 validation, 49-80 test (TeCNO, EndoNet);
- ``"official"`` (M2CAI16, default): ``workflow_video_*`` train, ``test_workflow_video_*`` test;
- or a mapping ``{"train": [...], "val": [...], "test": [...]}`` of video names.

Cholec80 splits are positions in the number-sorted video list. With all 80 videos they are
exactly the canonical ids; a tree with another number of videos (a synthetic one) keeps the
proportions, every non-empty part getting at least one video. A split without its own
validation part gives the last ``val_fraction`` of its training videos (at least one) to
validation, so model selection never sees a test video; ``val_fraction=0`` keeps the paper's
40 training videos and no validation. The label budget ``train_videos`` (the low-data regime)
then keeps the first N (int) or the first fraction (float) of the training videos.

**Frames** come from ``distill data extract-frames`` or any folder matching a
:class:`~data_modules.frames.FramePattern`; a DataModule at ``fps`` reads the frames whose
25 fps index is a multiple of ``25 / fps`` (a 5 fps extraction serves 1 fps and 5 fps).

**Features on disk** (written by :func:`save_video_features`, read by
:class:`PhaseFeatureDataModule`): ``<features_dir>/<video>.npy`` (T, D) float16/float32 and
``<features_dir>/<video>_frames.npy`` (T,) int64, the 25 fps index of each feature row; labels
are looked up in the phase annotation at those indices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data_modules.frames import (
    DEFAULT_FRAME_PATTERN,
    FramePattern,
    VideoSource,
    extract_frames,
    frame_step,
    natural_sorted,
)
from data_modules.phases import CHOLEC80_TOOLS, phase_names, read_phase_file
from data_modules.resumable import ResumableTraining, sample_seed, split_key
from distill.errors import DataError
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt

UNLABELED = "unlabeled"  # any .mp4 files / frame folders, no annotations (self-supervision only)
CHOLEC80_SPLITS = {"paper": (40, 0, 40), "tecno": (40, 8, 32)}  # (train, val, test) video counts
DEFAULT_SPLITS = {"cholec80": "paper", "m2cai16": "official"}
SPLIT_PARTS = ("train", "val", "test")
M2CAI16_NAME = re.compile(r"(test_)?workflow_video_\d+")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------
# Dataset readers


def phase_annotation_files(root: str | Path, dataset: str) -> dict[str, Path]:
    """``{video name: phase annotation path}`` of every annotated video under ``root``, sorted."""
    root = Path(root)
    dataset = _check_dataset(dataset)
    if dataset == "cholec80":
        paths = {p.name.removesuffix("-phase.txt"): p for p in root.glob("phase_annotations/*-phase.txt")}
        expected = "phase_annotations/videoXX-phase.txt"
    else:
        paths = {p.stem: p for p in root.rglob("*workflow_video_*.txt") if M2CAI16_NAME.fullmatch(p.stem)}
        expected = "[test_]workflow_video_XX.txt"
    if not paths:
        raise DataError(f"{root}: no {dataset} phase annotations found (expected {expected})")
    return {name: paths[name] for name in natural_sorted(paths)}


def video_files(root: str | Path, dataset: str) -> dict[str, Path]:
    """``{video name: video path}`` under ``root``: Cholec80 ``videos/*.mp4``, M2CAI16 ``**/*workflow_video_*.mp4``,
    ``unlabeled`` every ``**/*.mp4``; sorted by name."""
    root = Path(root)
    if dataset != UNLABELED:
        dataset = _check_dataset(dataset)
    glob = {"cholec80": "videos/*.mp4", "m2cai16": "**/*workflow_video_*.mp4", UNLABELED: "**/*.mp4"}[dataset]
    paths = sorted(p for p in root.glob(glob) if dataset != "m2cai16" or M2CAI16_NAME.fullmatch(p.stem))
    if not paths:
        raise DataError(f"{root}: no videos found (expected {glob})")
    by_name = {p.stem: p for p in paths}
    if len(by_name) != len(paths):
        raise DataError(f"{root}: several videos share a file name; frame folders are named by file stem")
    return {name: by_name[name] for name in natural_sorted(by_name)}


def annotation_path_of(root: str | Path, dataset: str, video_path: Path) -> Path:
    """Where the phase annotation of ``video_path`` lives (Cholec80 folder, or next to the M2CAI16 video)."""
    if _check_dataset(dataset) == "cholec80":
        return Path(root) / "phase_annotations" / f"{video_path.stem}-phase.txt"
    return video_path.with_suffix(".txt")


def read_tool_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Cholec80 ``Frame\\tGrasper...SpecimenBag`` tool file.

    Returns:
        ``(frames, flags)``: (N,) int64 25 fps frame indices and (N, 7) uint8 presence flags in
        ``CHOLEC80_TOOLS`` order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tool annotation file not found")
    header = path.read_text().split("\n", 1)[0].split()
    if header != ["Frame", *CHOLEC80_TOOLS]:
        raise DataError(f"{path}: expected header 'Frame' + {', '.join(CHOLEC80_TOOLS)}, got {' '.join(header)!r}")
    try:
        table = np.loadtxt(path, skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise DataError(f"{path}: {str(err).splitlines()[0]}") from None
    if table.shape[1] != 1 + len(CHOLEC80_TOOLS) or not np.isin(table[:, 1:], (0, 1)).all():
        raise DataError(f"{path}: expected rows of a frame number and {len(CHOLEC80_TOOLS)} 0/1 flags")
    return table[:, 0], table[:, 1:].astype(np.uint8)


def phase_labels_at(path: Path, dataset: str, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotated frames (K,) int64 at ``fps`` (25 fps indices divisible by 25 / fps) and their labels (K,)."""
    frames, labels = read_phase_file(path, dataset)
    keep = frames % frame_step(fps) == 0
    return frames[keep], labels[keep]


def extract_dataset_frames(
    data_root: str | Path,
    out_dir: str | Path,
    dataset: str = "cholec80",
    *,
    frame_tolerance: int = 0,
    **extract_kwargs: Any,
) -> list[str]:
    """Extract the frames of every video of a Cholec80 / M2CAI16 / unlabeled tree.

    Each annotated video must have its phase file, which must name known phases and annotate
    as many frames as the video decodes to (+- ``frame_tolerance``). ``extract_kwargs`` go to
    :func:`~data_modules.frames.extract_frames` (fps, size, frame_pattern, workers, progress).

    Returns:
        names of the videos extracted by this call (already finished ones are skipped).
    """
    sources = []
    for name, path in video_files(data_root, dataset).items():
        if dataset == UNLABELED:
            sources.append(VideoSource(name, path))
            continue
        annotation = annotation_path_of(data_root, dataset, path)
        if not annotation.is_file():
            raise DataError(f"{annotation}: annotation file not found (needed for {path})")
        sources.append(VideoSource(name, path, len(read_phase_file(annotation, dataset)[0]), annotation))
    return extract_frames(sources, out_dir, frame_tolerance=frame_tolerance, **extract_kwargs)


def _check_dataset(dataset: str) -> str:
    phase_names(dataset)  # raises DataError for an unknown dataset
    return dataset.lower()


# --------------------------------------------------------------------------------------------
# Splits


def scale_split(counts: Sequence[int], num_videos: int) -> tuple[int, ...]:
    """Part sizes for ``num_videos`` videos with the proportions of ``counts``.

    Exactly ``counts`` when ``num_videos == sum(counts)``; otherwise floor of the proportional
    size, at least 1 for every non-empty part, remainders to the largest shortfall.
    """
    counts = np.asarray(counts)
    if num_videos == counts.sum():
        return tuple(int(c) for c in counts)
    nonempty = counts > 0
    if num_videos < nonempty.sum():
        raise DataError(f"{num_videos} videos cannot fill the {int(nonempty.sum())} non-empty parts of a {tuple(counts)} split")
    ideal = counts * num_videos / counts.sum()
    scaled = np.where(nonempty, np.maximum(np.floor(ideal), 1), 0).astype(int)
    while scaled.sum() > num_videos:
        scaled[np.argmax(scaled)] -= 1
    while scaled.sum() < num_videos:
        scaled[np.argmax(ideal - scaled)] += 1
    return tuple(int(c) for c in scaled)


def split_videos(
    videos: Sequence[str],
    dataset: str,
    split: str | Mapping[str, Sequence[str]] | None = None,
    val_fraction: float = 0.2,
) -> dict[str, list[str]]:
    """Assign ``videos`` to ``{"train", "val", "test"}`` (see the module docstring for the rules).

    Returns:
        the three parts as lists of video names, disjoint, in natural order.
    """
    dataset = _check_dataset(dataset)
    videos = natural_sorted(videos)
    split = DEFAULT_SPLITS[dataset] if split is None else split
    if isinstance(split, Mapping):
        parts = {part: natural_sorted(split.get(part, ())) for part in SPLIT_PARTS}
        unknown = set(split) - set(SPLIT_PARTS)
        missing = sorted(set(sum(parts.values(), [])) - set(videos), key=str)
        if unknown or missing:
            raise DataError(f"split: unknown parts {sorted(unknown)} or videos without annotations {missing[:3]}")
        if sum(map(len, parts.values())) != len(set(sum(parts.values(), []))):
            raise DataError(f"split: a video is in more than one part: {split}")
        return parts
    if dataset == "cholec80" and split in CHOLEC80_SPLITS:
        counts = scale_split(CHOLEC80_SPLITS[split], len(videos))
        if sum(CHOLEC80_SPLITS[split]) != len(videos):
            rank_zero_info(f"cholec80 split {split!r}: {len(videos)} videos instead of {sum(CHOLEC80_SPLITS[split])}; parts scaled to {counts}")
        bounds = np.cumsum((0, *counts))
        parts = {part: videos[bounds[i]:bounds[i + 1]] for i, part in enumerate(SPLIT_PARTS)}
    elif dataset == "m2cai16" and split == "official":
        test = [v for v in videos if v.startswith("test_")]
        parts = {"train": [v for v in videos if v not in test], "val": [], "test": test}
    else:
        known = list(CHOLEC80_SPLITS) if dataset == "cholec80" else ["official"]
        raise DataError(f"split={split!r}: unknown {dataset} split; use one of {known} or a mapping of video names")
    if not parts["val"] and val_fraction > 0 and len(parts["train"]) > 1:
        num_val = min(len(parts["train"]) - 1, max(1, round(val_fraction * len(parts["train"]))))
        parts["train"], parts["val"] = parts["train"][:-num_val], parts["train"][-num_val:]
    return parts


def first_videos(videos: Sequence[str], budget: int | float | None) -> list[str]:
    """The label budget: the first ``budget`` videos (int) or the first fraction of them (float)."""
    videos = list(videos)
    if budget is None:
        return videos
    if isinstance(budget, float) and 0 < budget <= 1:
        count = max(1, round(budget * len(videos)))
    elif isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget <= len(videos):
        count = budget
    else:
        raise DataError(f"train_videos={budget!r}: need an int in [1, {len(videos)}] (the training split) or a fraction in (0, 1]")
    return videos[:count]


# --------------------------------------------------------------------------------------------
# Transforms (uint8 (3, H, W) tensors in, float (3, S, S) normalised tensors out)


def _hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) tensor -> contiguous (H, W, C) array for OpenCV (no copy for channels-last data).

    Frames are decoded channels-last (:func:`read_frame`), so the OpenCV steps chain without copies.
    """
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)


class OpenCVRandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` (same sampling) resized by OpenCV: area filter when shrinking, bilinear when enlarging."""

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        top, left, height, width = (params[key] for key in ("top", "left", "height", "width"))
        crop = _hwc(inpt)[top:top + height, left:left + width]
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
    return [v2.Lambda(torch.Tensor.contiguous), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def moco_v2_augmentation(image_size: int = 224) -> v2.Compose:
    """MoCo v2 "aug-plus": uint8 (3, H, W) -> float32 (3, S, S), ImageNet-normalised.

    RandomResizedCrop (scale 0.2-1) first, so the colour and blur steps run on S x S pixels.
    """
    return v2.Compose([
        OpenCVRandomResizedCrop(image_size, scale=(0.2, 1.0)),
        v2.RandomApply([OpenCVColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([OpenCVGaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        *_normalise(),
    ])


def finetune_augmentation(image_size: int = 224, resize_size: int = 250) -> v2.Compose:
    """Phase fine-tuning: resize (shorter side), random crop, horizontal flip, normalise."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.RandomCrop(image_size), v2.RandomHorizontalFlip(), *_normalise()])


def eval_transform(image_size: int = 224, resize_size: int = 250) -> v2.Compose:
    """Evaluation: resize (shorter side), centre crop, normalise (the reference code forgot the last step)."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size), *_normalise()])


class TwoViews:
    """Two independent draws of ``transform`` of one image: ``(view1, view2)``."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class FrameIndex:
    """Frames of several videos, one row per frame: ``videos[video_ids[i]]`` frame ``frames[i]``, label ``labels[i]`` (-1 = none)."""

    videos: list[str]
    video_ids: np.ndarray  # (N,) int64
    frames: np.ndarray  # (N,) int64, 25 fps index
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.frames)


def labelled_frame_index(
    frames_dir: str | Path, pattern: FramePattern, annotations: Mapping[str, Path], videos: Sequence[str], dataset: str, fps: int
) -> FrameIndex:
    """The annotated frames of ``videos`` at ``fps``; every one must exist under ``frames_dir``."""
    per_video = []
    for video in videos:
        frames, labels = phase_labels_at(annotations[video], dataset, fps)
        missing = np.setdiff1d(frames, pattern.list_frames(frames_dir, video))
        if missing.size:
            raise DataError(
                f"{pattern.path(frames_dir, video, missing[0])}: frame missing ({missing.size} of the {frames.size} frames "
                f"that {annotations[video].name} labels at {fps} fps; extract frames at {fps} fps or a multiple of it)"
            )
        per_video.append((frames, labels))
    return _concatenate_index(list(videos), per_video)


def unlabelled_frame_index(frames_dir: str | Path, pattern: FramePattern, videos: Sequence[str], fps: int) -> FrameIndex:
    """Every frame of ``videos`` present under ``frames_dir`` at ``fps`` (labels -1)."""
    per_video = []
    for video in videos:
        frames = pattern.list_frames(frames_dir, video)
        frames = frames[frames % frame_step(fps) == 0]
        if not frames.size:
            raise DataError(f"{pattern.video_dir(frames_dir, video)}: no frames at {fps} fps matching {pattern.pattern!r}")
        per_video.append((frames, np.full(frames.size, -1, dtype=np.int64)))
    return _concatenate_index(list(videos), per_video)


def _concatenate_index(videos: list[str], per_video: list[tuple[np.ndarray, np.ndarray]]) -> FrameIndex:
    sizes = [frames.size for frames, _ in per_video]
    return FrameIndex(
        videos,
        np.repeat(np.arange(len(videos)), sizes),
        np.concatenate([frames for frames, _ in per_video]) if per_video else np.zeros(0, np.int64),
        np.concatenate([labels for _, labels in per_video]) if per_video else np.zeros(0, np.int64),
    )


def read_frame(path: Path) -> torch.Tensor:
    """Decode a JPEG/PNG frame to a uint8 RGB (3, H, W) tensor (channels-last memory, OpenCV decoder)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot read frame image")
    return _chw(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


class FrameDataset(Dataset):
    """Item i: ``{image_key: transform(frame), "label": int64, "video": str, "frame": int64, "index": i}``.

    Frames are decoded to uint8 RGB (3, H, W) tensors (:func:`read_frame`) before ``transform``; ``image_key`` is ``"image"`` or ``"views"`` (with a :class:`TwoViews` transform).
    Keys are indices or ``(epoch, i)`` (:class:`~data_modules.resumable.ResumableSampler`); the latter
    run ``transform`` with torch's random state seeded from ``(seed, epoch, i)`` (the global state is left as it was).
    """

    def __init__(self, frames_dir: str | Path, pattern: FramePattern, index: FrameIndex, transform: Callable, image_key: str = "image", seed: int = 0) -> None:
        self.frames_dir, self.pattern, self.index = Path(frames_dir), pattern, index
        self.transform, self.image_key, self.seed = transform, image_key, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = split_key(key)
        video = self.index.videos[self.index.video_ids[i]]
        frame = int(self.index.frames[i])
        image = read_frame(self.pattern.path(self.frames_dir, video, frame))
        if epoch is None:
            transformed = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, i))
                transformed = self.transform(image)
        return {self.image_key: transformed, "label": int(self.index.labels[i]), "video": video, "frame": frame, "index": i}


def save_video_features(features_dir: str | Path, video: str, features: np.ndarray | torch.Tensor, frames: np.ndarray | torch.Tensor) -> None:
    """Write one video's features: ``features`` (T, D) float16/float32 and ``frames`` (T,) 25 fps indices."""
    features = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    frames = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if features.ndim != 2 or frames.shape != (features.shape[0],) or not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{video}: expected float features (T, D) and frames (T,), got {features.dtype} {features.shape} and {frames.shape}")
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    np.save(features_dir / f"{video}.npy", features)
    np.save(features_dir / f"{video}_frames.npy", frames.astype(np.int64))


def load_video_features(features_dir: str | Path, video: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one video's ``(features (T, D), frames (T,) int64)`` written by :func:`save_video_features`
    (``mmap``: map the features instead of reading them)."""
    paths = [Path(features_dir) / f"{video}.npy", Path(features_dir) / f"{video}_frames.npy"]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: feature file not found (write it with save_video_features)")
    features, frames = np.load(paths[0], mmap_mode="r" if mmap else None), np.load(paths[1])
    if features.ndim != 2 or frames.shape != (features.shape[0],):
        raise DataError(f"{paths[0]}: features {features.shape} do not match frames {frames.shape} in {paths[1].name}")
    return features, frames.astype(np.int64)


class VideoFeatureDataset(Dataset):
    """Item: ``{"features": (D, T) float32, "label": (T,) int64, "video": str, "frame": (T,) int64}``, one video.

    ``feature_dim`` is D, the same for every video (checked).
    """

    def __init__(self, features_dir: str | Path, videos: Sequence[str], annotations: Mapping[str, Path], dataset: str) -> None:
        self.features_dir, self.videos = Path(features_dir), list(videos)
        self.frames, self.labels = [], []
        self.feature_dim: int | None = None
        for video in self.videos:
            features, frames = load_video_features(features_dir, video, mmap=True)
            if self.feature_dim is None:
                self.feature_dim = features.shape[1]
            elif features.shape[1] != self.feature_dim:
                raise DataError(f"{self.features_dir / (video + '.npy')}: {features.shape[1]} features per frame, "
                                f"{self.videos[0]}.npy has {self.feature_dim}")
            annotated, labels = read_phase_file(annotations[video], dataset)
            label_at = np.full(max(annotated.max(), frames.max()) + 1, -1, dtype=np.int64)
            label_at[annotated] = labels
            frame_labels = label_at[frames]
            if (frame_labels < 0).any():
                raise DataError(
                    f"{self.features_dir / (video + '_frames.npy')}: frame {frames[frame_labels < 0][0]} is not annotated in {annotations[video]}"
                )
            self.frames.append(frames)
            self.labels.append(frame_labels)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, i = split_key(key)
        features, _ = load_video_features(self.features_dir, self.videos[i])
        return {
            "features": torch.from_numpy(features.astype(np.float32).T.copy()),
            "label": torch.from_numpy(self.labels[i]),
            "video": self.videos[i],
            "frame": torch.from_numpy(self.frames[i]),
        }


# --------------------------------------------------------------------------------------------
# DataModules


class SurgicalDataModule(ResumableTraining, L.LightningDataModule):
    """Shared by the surgical DataModules: which annotated videos are train / val / test, and the loaders.

    Subclasses fill ``self.sets`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``) in ``setup``
    with the parts that the stage needs (:data:`STAGE_PARTS`); an empty validation part gives no
    validation loader.

    Args:
        data_root: dataset root in the Cholec80 or M2CAI16 layout (annotations are read from it).
        dataset: ``"cholec80"`` or ``"m2cai16"``.
        split: a named split or a ``{"train", "val", "test"}`` mapping (module docstring).
        val_fraction: share of the training videos given to validation by splits without one.
        batch_size, num_workers: DataLoader settings.
        seed: the shuffle order of every epoch and the augmentation of every training sample
            (checkpoints hold the position in the epoch: a resumed run continues exactly,
            see :mod:`data_modules.resumable`).
    """

    def __init__(
        self,
        data_root: str | Path | None,
        dataset: str = "cholec80",
        split: str | dict[str, list[str]] | None = None,
        val_fraction: ClosedUnitInterval = 0.2,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        self.data_root, self.dataset, self.split, self.val_fraction = data_root, dataset, split, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.splits: dict[str, list[str]] = {}
        self.annotations: dict[str, Path] = {}
        self.sets: dict[str, Dataset] = {}

    def _read_splits(self, train_videos: int | float | None = None) -> None:
        """Annotated videos and their split, with the label budget applied to the training part."""
        self.annotations = phase_annotation_files(self.data_root, self.dataset)
        self.splits = split_videos(list(self.annotations), self.dataset, self.split, self.val_fraction)
        self.splits["train"] = first_videos(self.splits["train"], train_videos)

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """Evaluation loader in order, or (``shuffle``) a resumable training loader seeded by ``seed``."""
        options = {
            "batch_size": self.batch_size,
            "drop_last": drop_last,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": _single_threaded_opencv,
        }
        if not shuffle:
            return DataLoader(dataset, **options)
        return self.resumable_loader(dataset, self.seed, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.sets["val"]) if len(self.sets.get("val", ())) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.sets["test"])


STAGE_PARTS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",), None: SPLIT_PARTS}


def _single_threaded_opencv(worker_id: int) -> None:
    """Loader workers already run one per core; OpenCV's own thread pool would oversubscribe them."""
    cv2.setNumThreads(1)


class SurgicalSSLDataModule(SurgicalDataModule):
    """Unlabelled frames for self-supervised pre-training (MoCo v2 "aug-plus" pairs).

    Trains on every frame at ``fps`` of the non-test videos (train + val parts of the split;
    Cholec80 "paper": videos 1-40), or with ``dataset="unlabeled"`` on every video folder
    under ``frames_dir`` (custom data; ``data_root`` unused). The last incomplete batch is
    dropped (fixed-size batches for the MoCo queue) unless it is the only one.

    Train batch: ``{"views": [view1, view2], "label": (B,) int64, "video": list[str],
    "frame": (B,) int64, "index": (B,) int64}`` with views (B, 3, S, S) float32 ImageNet-normalised,
    label the phase (-1 without annotations) for an online linear probe. Validation / test batch
    (annotated datasets; validation / test videos): the :class:`SurgicalPhaseDataModule` batch, eval transform.
    """

    def __init__(
        self,
        frames_dir: str | Path,
        data_root: str | Path | None = None,
        dataset: str = "cholec80",
        split: str | dict[str, list[str]] | None = None,
        val_fraction: ClosedUnitInterval = 0.2,
        frame_pattern: str = DEFAULT_FRAME_PATTERN,
        fps: Literal[1, 5, 25] = 1,
        image_size: PositiveInt = 224,
        resize_size: PositiveInt = 250,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__(data_root, dataset, split, val_fraction, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.frames_dir, self.pattern, self.fps = Path(frames_dir), FramePattern(frame_pattern), fps
        self.image_size, self.resize_size = image_size, resize_size
        if dataset != UNLABELED and data_root is None:
            raise DataError(f"data_root: needed for the {dataset} annotations (or use dataset='unlabeled')")

    def setup(self, stage: str | None = None) -> None:
        if self.dataset == UNLABELED:
            videos = self.pattern.list_videos(self.frames_dir)
            if not videos:
                raise DataError(f"{self.frames_dir}: no video frame folders")
            self.splits = {"train": videos, "val": [], "test": []}
            train_index = unlabelled_frame_index(self.frames_dir, self.pattern, videos, self.fps)
        else:
            self._read_splits()
            videos = self.splits["train"] + self.splits["val"]
            train_index = labelled_frame_index(self.frames_dir, self.pattern, self.annotations, videos, self.dataset, self.fps)
            val_index = labelled_frame_index(self.frames_dir, self.pattern, self.annotations, self.splits["val"], self.dataset, self.fps)
            self.sets["val"] = FrameDataset(self.frames_dir, self.pattern, val_index, eval_transform(self.image_size, self.resize_size))
            if stage in ("test", None):  # the linear probe's test accuracy
                test_index = labelled_frame_index(self.frames_dir, self.pattern, self.annotations, self.splits["test"], self.dataset, self.fps)
                self.sets["test"] = FrameDataset(self.frames_dir, self.pattern, test_index, eval_transform(self.image_size, self.resize_size))
        self.sets["train"] = FrameDataset(self.frames_dir, self.pattern, train_index, TwoViews(moco_v2_augmentation(self.image_size)), "views", self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sets["train"], shuffle=True, drop_last=len(self.sets["train"]) >= self.batch_size)


class SurgicalPhaseDataModule(SurgicalDataModule):
    """Labelled frames for phase fine-tuning / linear probing, and frames for feature extraction.

    Train: the first ``train_videos`` training videos (label budget; all when None) at ``fps``
    with a light augmentation; val / test: the validation / test videos at ``fps``, eval
    transform; predict: every annotated video at ``predict_fps`` (feature extraction, 5 fps in
    the paper), in video and frame order, eval transform.

    Batch: ``{"image": (B, 3, S, S) float32 ImageNet-normalised, "label": (B,) int64,
    "video": list[str], "frame": (B,) int64 25 fps index, "index": (B,) int64}``.
    """

    def __init__(
        self,
        frames_dir: str | Path,
        data_root: str | Path,
        dataset: str = "cholec80",
        split: str | dict[str, list[str]] | None = None,
        val_fraction: ClosedUnitInterval = 0.2,
        train_videos: int | float | None = None,
        frame_pattern: str = DEFAULT_FRAME_PATTERN,
        fps: Literal[1, 5, 25] = 1,
        predict_fps: Literal[1, 5, 25] = 5,
        image_size: PositiveInt = 224,
        resize_size: PositiveInt = 250,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__(data_root, dataset, split, val_fraction, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.frames_dir, self.pattern = Path(frames_dir), FramePattern(frame_pattern)
        self.train_videos, self.fps, self.predict_fps = train_videos, fps, predict_fps
        self.image_size, self.resize_size = image_size, resize_size

    def setup(self, stage: str | None = None) -> None:
        self._read_splits(self.train_videos)
        for part in STAGE_PARTS[stage]:
            videos = list(self.annotations) if part == "predict" else self.splits[part]
            fps = self.predict_fps if part == "predict" else self.fps
            index = labelled_frame_index(self.frames_dir, self.pattern, self.annotations, videos, self.dataset, fps)
            if part == "train":
                transform = finetune_augmentation(self.image_size, self.resize_size)
            else:
                transform = eval_transform(self.image_size, self.resize_size)
            self.sets[part] = FrameDataset(self.frames_dir, self.pattern, index, transform, seed=self.seed)

    def class_weights(self) -> torch.Tensor:
        """(C,) float32 median-frequency weights of the training labels (TeCNO); absent phases get 0."""
        counts = np.bincount(self.sets["train"].index.labels, minlength=len(phase_names(self.dataset))).astype(np.float64)
        frequency = counts / counts.sum()
        weights = np.divide(np.median(frequency[counts > 0]), frequency, out=np.zeros_like(frequency), where=counts > 0)
        return torch.as_tensor(weights, dtype=torch.float32)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.sets["predict"])


class PhaseFeatureDataModule(SurgicalDataModule):
    """Per-video feature sequences for the temporal model (TCN), one video per batch.

    Reads ``<features_dir>/<video>.npy`` and ``<video>_frames.npy`` (:func:`save_video_features`)
    and the phase labels at those frames. Train uses the first ``train_videos`` training videos.

    Batch: ``{"features": (1, D, T) float32, "label": (1, T) int64, "video": [name],
    "frame": (1, T) int64 25 fps index}``.
    """

    def __init__(
        self,
        features_dir: str | Path,
        data_root: str | Path,
        dataset: str = "cholec80",
        split: str | dict[str, list[str]] | None = None,
        val_fraction: ClosedUnitInterval = 0.2,
        train_videos: int | float | None = None,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__(data_root, dataset, split, val_fraction, 1, num_workers, seed)
        self.save_hyperparameters()
        self.features_dir, self.train_videos = Path(features_dir), train_videos

    def setup(self, stage: str | None = None) -> None:
        self._read_splits(self.train_videos)
        for part in STAGE_PARTS[stage]:
            if part != "predict":
                self.sets[part] = VideoFeatureDataset(self.features_dir, self.splits[part], self.annotations, self.dataset)

    @property
    def feature_dim(self) -> int:
        """D of the feature arrays (after :meth:`setup`); the TCN's input width follows it."""
        dims = {s.feature_dim for s in self.sets.values() if s.feature_dim is not None}
        if len(dims) != 1:
            raise DataError(f"{self.features_dir}: " + ("no feature arrays" if not dims else
                                                         f"videos of different feature widths {sorted(dims)}"))
        return dims.pop()

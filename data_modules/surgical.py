"""The three surgical DataModules and their datasets: frames for pre-training and phase models, feature sequences.

Videos, annotations and splits come from :mod:`data_modules.surgical_layout` (layouts as
released, ``split=`` rules); images go through :mod:`data_modules.video_transforms`.

**Frames** come from ``distill data extract-frames`` or any folder matching a
:class:`~data_modules.frames.FramePattern`; a DataModule at ``fps`` reads the frames whose
25 fps index is a multiple of ``25 / fps`` (a 5 fps extraction serves 1 fps and 5 fps).

**Features on disk** (:mod:`distill.formats.features`, written by ``distill predict`` with
:class:`~distill.callbacks.PhaseFeatureWriter`, read by :class:`PhaseFeatureDataModule`):
``<features_dir>/<video>.npy`` (T, D) float16/float32 and ``<features_dir>/<video>_frames.npy``
(T,) int64, the 25 fps index of each feature row; labels are looked up in the phase annotation
at those indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.frames import DEFAULT_FRAME_PATTERN, FramePattern
from data_modules.resumable import ResumableTraining, sample_seed, split_key
from data_modules.surgical_layout import (
    DEFAULT_SPLITS,
    SPLIT_PARTS,
    UNLABELED,
    first_videos,
    phase_labels_at,
    split_videos,
)
from data_modules.video_transforms import (
    TwoViews,
    eval_transform,
    finetune_augmentation,
    moco_v2_augmentation,
    read_frame,
)
from distill.errors import DataError
from distill.formats.features import load_video_features
from distill.formats.phases import frame_step, phase_annotation_files, phase_names, read_phase_file
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt

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
    frames_dir: str | Path,
    pattern: FramePattern,
    annotations: Mapping[str, Path],
    videos: Sequence[str],
    dataset: str,
    fps: int,
) -> FrameIndex:
    """The annotated frames of ``videos`` at ``fps``; every one must exist under ``frames_dir``."""
    per_video = []
    for video in videos:
        frames, labels = phase_labels_at(annotations[video], dataset, fps)
        if not pattern.video_dir(frames_dir, video).is_dir():
            raise DataError(
                f"{pattern.video_dir(frames_dir, video)}: no frame folder for the annotated video {video} "
                f"({annotations[video]}); extract its frames, or move its annotation out of the dataset"
            )
        missing = np.setdiff1d(frames, pattern.list_frames(frames_dir, video))
        if missing.size:
            raise DataError(
                f"{pattern.path(frames_dir, video, missing[0])}: frame missing ({missing.size} of the {frames.size} frames "
                f"that {annotations[video].name} labels at {fps} fps; extract frames at {fps} fps or a multiple of it)"
            )
        per_video.append((frames, labels))
    return _concatenate_index(list(videos), per_video)


def unlabelled_frame_index(
    frames_dir: str | Path, pattern: FramePattern, videos: Sequence[str], fps: int
) -> FrameIndex:
    """Every frame of ``videos`` present under ``frames_dir`` at ``fps`` (labels -1)."""
    per_video = []
    for video in videos:
        frames = pattern.list_frames(frames_dir, video)
        frames = frames[frames % frame_step(fps) == 0]
        if not frames.size:
            raise DataError(
                f"{pattern.video_dir(frames_dir, video)}: no frames at {fps} fps matching {pattern.pattern!r}"
            )
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


class FrameDataset(Dataset):
    """Item i: ``{image_key: transform(frame), "label": int64, "video": str, "frame": int64, "index": i}``.

    Frames are decoded to uint8 RGB (3, H, W) tensors (:func:`read_frame`) before ``transform``; ``image_key`` is ``"image"`` or ``"views"`` (with a :class:`TwoViews` transform).
    Keys are indices or ``(epoch, i)`` (:class:`~data_modules.resumable.ResumableSampler`); the latter
    run ``transform`` with torch's random state seeded from ``(seed, epoch, i)`` (the global state is left as it was).
    """

    def __init__(
        self,
        frames_dir: str | Path,
        pattern: FramePattern,
        index: FrameIndex,
        transform: Callable,
        image_key: str = "image",
        seed: int = 0,
    ) -> None:
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
        return {
            self.image_key: transformed,
            "label": int(self.index.labels[i]),
            "video": video,
            "frame": frame,
            "index": i,
        }


class VideoFeatureDataset(Dataset):
    """Item: ``{"features": (D, T) float32, "label": (T,) int64, "video": str, "frame": (T,) int64}``, one video.

    ``feature_dim`` is D, the same for every video (checked).
    """

    def __init__(
        self, features_dir: str | Path, videos: Sequence[str], annotations: Mapping[str, Path], dataset: str
    ) -> None:
        self.features_dir, self.videos = Path(features_dir), list(videos)
        self.frames, self.labels = [], []
        self.feature_dim: int | None = None
        for video in self.videos:
            features, frames = load_video_features(features_dir, video, mmap=True)
            if self.feature_dim is None:
                self.feature_dim = features.shape[1]
            elif features.shape[1] != self.feature_dim:
                raise DataError(
                    f"{self.features_dir / (video + '.npy')}: {features.shape[1]} features per frame, "
                    f"{self.videos[0]}.npy has {self.feature_dim}"
                )
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
        split: a named split or a ``{"train", "val", "test"}`` mapping (:mod:`data_modules.surgical_layout`).
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

    def _require_validation(self, stage: str | None) -> None:
        """Fitting needs validation videos: they choose ``best.ckpt`` (without them it is chosen on nothing)."""
        if stage == "fit" and not self.splits["val"]:
            counts = ", ".join(f"{part} {len(self.splits[part])}" for part in SPLIT_PARTS)
            raise DataError(
                f"{self.data_root}: split={self.split if self.split is not None else DEFAULT_SPLITS[self.dataset]!r} "
                f"gives no validation videos ({counts}; val_fraction={self.val_fraction}); fitting needs them "
                "(validation chooses best.ckpt): add videos, raise val_fraction or give the split a val part"
            )

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


STAGE_PARTS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: SPLIT_PARTS,
}


def _single_threaded_opencv(worker_id: int) -> None:
    """Loader workers already run one per core; OpenCV's own thread pool would oversubscribe them."""
    cv2.setNumThreads(1)


class SurgicalSSLDataModule(SurgicalDataModule):
    """Unlabelled frames for self-supervised pre-training (MoCo v2 "aug-plus" pairs).

    Trains on every frame at ``fps`` of the training videos of the split only (the validation
    videos only score the online probe, whose accuracy chooses checkpoints: a frame seen in
    training would leak into that score; the test videos are never read when fitting), or with
    ``dataset="unlabeled"`` on every video folder under ``frames_dir`` (custom data;
    ``data_root`` unused). The last incomplete batch is
    dropped (fixed-size batches for the MoCo queue) unless it is the only one.

    Train batch: ``{"views": [view1, view2], "label": (B,) int64, "video": list[str],
    "frame": (B,) int64, "index": (B,) int64}`` with views (B, 3, S, S) float32 ImageNet-normalised,
    label the phase (-1 without annotations) for an online linear probe. ``augmentation_strength``
    scales the MoCo v2 augmentation (1: the paper's; see :func:`moco_v2_augmentation`). Validation / test batch
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
        augmentation_strength: ClosedUnitInterval = 1.0,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__(data_root, dataset, split, val_fraction, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.frames_dir, self.pattern, self.fps = Path(frames_dir), FramePattern(frame_pattern), fps
        self.image_size, self.resize_size = image_size, resize_size
        self.augmentation_strength = augmentation_strength
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
            train_index = labelled_frame_index(
                self.frames_dir, self.pattern, self.annotations, self.splits["train"], self.dataset, self.fps
            )
            val_index = labelled_frame_index(
                self.frames_dir, self.pattern, self.annotations, self.splits["val"], self.dataset, self.fps
            )
            self.sets["val"] = FrameDataset(
                self.frames_dir, self.pattern, val_index, eval_transform(self.image_size, self.resize_size)
            )
            if stage in ("test", None):  # the linear probe's test accuracy
                test_index = labelled_frame_index(
                    self.frames_dir, self.pattern, self.annotations, self.splits["test"], self.dataset, self.fps
                )
                self.sets["test"] = FrameDataset(
                    self.frames_dir, self.pattern, test_index, eval_transform(self.image_size, self.resize_size)
                )
            self._require_validation(stage)
        self.sets["train"] = FrameDataset(
            self.frames_dir,
            self.pattern,
            train_index,
            TwoViews(moco_v2_augmentation(self.image_size, self.augmentation_strength)),
            "views",
            self.seed,
        )

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
        self._require_validation(stage)

    def class_weights(self) -> torch.Tensor:
        """(C,) float32 median-frequency weights of the training labels (TeCNO); absent phases get 0."""
        counts = np.bincount(self.sets["train"].index.labels, minlength=len(phase_names(self.dataset))).astype(
            np.float64
        )
        frequency = counts / counts.sum()
        weights = np.divide(np.median(frequency[counts > 0]), frequency, out=np.zeros_like(frequency), where=counts > 0)
        return torch.as_tensor(weights, dtype=torch.float32)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.sets["predict"])


class PhaseFeatureDataModule(SurgicalDataModule):
    """Per-video feature sequences for the temporal model (TCN), one video per batch.

    Reads ``<features_dir>/<video>.npy`` and ``<video>_frames.npy`` (:func:`~distill.formats.features.save_video_features`)
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
                self.sets[part] = VideoFeatureDataset(
                    self.features_dir, self.splits[part], self.annotations, self.dataset
                )
        self._require_validation(stage)

    @property
    def feature_dim(self) -> int:
        """D of the feature arrays (after :meth:`setup`); the TCN's input width follows it."""
        dims = {s.feature_dim for s in self.sets.values() if s.feature_dim is not None}
        if len(dims) != 1:
            raise DataError(
                f"{self.features_dir}: "
                + ("no feature arrays" if not dims else f"videos of different feature widths {sorted(dims)}")
            )
        return dims.pop()

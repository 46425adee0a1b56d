"""The surgical datasets: frames of several videos (:class:`FrameDataset`, indexed by a
:class:`FrameIndex`) and per-video feature sequences (:class:`VideoFeatureDataset`).

:mod:`data_modules.surgical` builds them from the split videos; frame files follow a
:class:`~data_modules.frames.FramePattern`, feature files :mod:`distill.formats.features`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.augment import seeded_augmentation
from data_modules.frames import FramePattern
from data_modules.resumable import split_key
from data_modules.surgical_layout import phase_labels_at
from data_modules.video_transforms import read_frame
from distill.errors import DataError
from distill.formats.features import load_video_features
from distill.formats.phases import frame_step, read_phase_file


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
    run ``transform`` with torch's random state seeded from ``(seed, epoch, i)`` (:func:`~data_modules.augment.seeded_augmentation`).
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
        return {
            self.image_key: seeded_augmentation(self.transform, image, self.seed, epoch, i),
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

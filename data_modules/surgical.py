"""The three surgical DataModules: frames for pre-training and phase models, feature sequences.

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.frames import DEFAULT_FRAME_PATTERN, FramePattern
from data_modules.resumable import ResumableTraining
from data_modules.surgical_datasets import (
    FrameDataset,
    FrameIndex,
    VideoFeatureDataset,
    labelled_frame_index,
    unlabelled_frame_index,
)
from data_modules.surgical_layout import (
    DEFAULT_SPLITS,
    SPLIT_PARTS,
    UNLABELED,
    first_videos,
    split_videos,
)
from data_modules.video_transforms import (
    TwoViews,
    eval_transform,
    finetune_augmentation,
    moco_v2_augmentation,
)
from distill.errors import DataError
from distill.formats.phases import phase_annotation_files, phase_names
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt

# --------------------------------------------------------------------------------------------
# DataModules


class SurgicalDataModule(ResumableTraining, L.LightningDataModule):
    """Shared by the surgical DataModules: which annotated videos are train / val / test, and the loaders.

    A subclass saves its arguments as hyper-parameters (``self.hparams``, where they are kept and
    read), among them:

    - ``data_root``: dataset root in the Cholec80 or M2CAI16 layout (annotations are read from it);
    - ``dataset``: ``"cholec80"`` or ``"m2cai16"``;
    - ``split``: a named split or a ``{"train", "val", "test"}`` mapping (:mod:`data_modules.surgical_layout`);
    - ``val_fraction``: share of the training videos given to validation by splits without one;
    - ``batch_size`` (or a fixed class attribute), ``num_workers``: DataLoader settings;
    - ``seed``: the shuffle order of every epoch and the augmentation of every training sample
      (checkpoints hold the position in the epoch: a resumed run continues exactly, see
      :mod:`data_modules.resumable`).

    In ``setup`` it fills ``self.sets`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``) with the
    parts that the stage needs (:data:`STAGE_PARTS`); an empty validation part gives no validation loader.
    """

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, list[str]] = {}
        self.annotations: dict[str, Path] = {}
        self.sets: dict[str, Dataset] = {}

    @property
    def batch_size(self) -> int:
        """Items per training and evaluation batch."""
        return self.hparams.batch_size

    # what the model takes from the data (:class:`distill.data_links.PhaseData`)
    @property
    def dataset(self) -> str:
        """The phase vocabulary and evaluation protocol: ``"cholec80"`` or ``"m2cai16"``."""
        return self.hparams.dataset

    @property
    def num_classes(self) -> int:
        """The dataset's number of phases (7 for Cholec80, 8 for M2CAI16)."""
        return len(phase_names(self.hparams.dataset))

    def _read_splits(self, train_videos: int | float | None = None) -> None:
        """Annotated videos and their split, with the label budget applied to the training part."""
        h = self.hparams
        self.annotations = phase_annotation_files(h.data_root, h.dataset)
        self.splits = split_videos(list(self.annotations), h.dataset, h.split, h.val_fraction)
        self.splits["train"] = first_videos(self.splits["train"], train_videos)

    def _require_validation(self, stage: str | None) -> None:
        """Fitting needs validation videos: they choose ``best.ckpt`` (without them it is chosen on nothing)."""
        h = self.hparams
        if stage == "fit" and not self.splits["val"]:
            counts = ", ".join(f"{part} {len(self.splits[part])}" for part in SPLIT_PARTS)
            raise DataError(
                f"{h.data_root}: split={h.split if h.split is not None else DEFAULT_SPLITS[h.dataset]!r} "
                f"gives no validation videos ({counts}; val_fraction={h.val_fraction}); fitting needs them "
                "(validation chooses best.ckpt): add videos, raise val_fraction or give the split a val part"
            )

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """Evaluation loader in order, or (``shuffle``) a resumable training loader seeded by ``seed``."""
        options = {
            "batch_size": self.batch_size,
            "drop_last": drop_last,
            "num_workers": self.hparams.num_workers,
            "persistent_workers": self.hparams.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": _single_threaded_opencv,
        }
        if not shuffle:
            return DataLoader(dataset, **options)
        return self.resumable_loader(dataset, self.hparams.seed, **options)

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


class FrameDataModule(SurgicalDataModule):
    """Shared by the DataModules that read video frames: besides :class:`SurgicalDataModule`'s, the
    hyper-parameters ``frames_dir`` (the frame folders), ``frame_pattern``
    (:class:`~data_modules.frames.FramePattern`, checked here), ``fps`` (the rate of the frames read),
    ``image_size`` and ``resize_size`` (the network's input S and the shorter side before cropping).
    """

    def __init__(self, frame_pattern: str) -> None:
        super().__init__()
        FramePattern(frame_pattern)  # refuses a pattern it cannot read now, not at setup

    @property
    def frames_dir(self) -> Path:
        return Path(self.hparams.frames_dir)

    @property
    def image_size(self) -> int:
        """Frame side S of the (B, 3, S, S) images a network sees."""
        return self.hparams.image_size

    @property
    def pattern(self) -> FramePattern:
        return FramePattern(self.hparams.frame_pattern)

    def labelled_index(self, videos: Sequence[str], fps: int) -> FrameIndex:
        """The annotated frames of ``videos`` at ``fps`` (:func:`labelled_frame_index`)."""
        return labelled_frame_index(self.frames_dir, self.pattern, self.annotations, videos, self.hparams.dataset, fps)

    def frame_set(self, index: FrameIndex, transform: Callable, image_key: str = "image") -> FrameDataset:
        """A :class:`FrameDataset` of ``index``, its augmentation seeded by the DataModule's ``seed``."""
        return FrameDataset(self.frames_dir, self.pattern, index, transform, image_key, self.hparams.seed)

    def eval_transform(self) -> Callable:
        """Resize, centre crop, normalise (:func:`~data_modules.video_transforms.eval_transform`)."""
        return eval_transform(self.hparams.image_size, self.hparams.resize_size)


class SurgicalSSLDataModule(FrameDataModule):
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
    Arguments: see :class:`FrameDataModule` and :class:`SurgicalDataModule`.
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
        super().__init__(frame_pattern)
        self.save_hyperparameters()
        if dataset != UNLABELED and data_root is None:
            raise DataError(f"data_root: needed for the {dataset} annotations (or use dataset='unlabeled')")

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if h.dataset == UNLABELED:
            videos = self.pattern.list_videos(self.frames_dir)
            if not videos:
                raise DataError(f"{self.frames_dir}: no video frame folders")
            self.splits = {"train": videos, "val": [], "test": []}
            train_index = unlabelled_frame_index(self.frames_dir, self.pattern, videos, h.fps)
        else:
            self._read_splits()
            train_index = self.labelled_index(self.splits["train"], h.fps)
            self.sets["val"] = self.frame_set(self.labelled_index(self.splits["val"], h.fps), self.eval_transform())
            if stage in ("test", None):  # the linear probe's test accuracy
                test_index = self.labelled_index(self.splits["test"], h.fps)
                self.sets["test"] = self.frame_set(test_index, self.eval_transform())
            self._require_validation(stage)
        augmentation = TwoViews(moco_v2_augmentation(h.image_size, h.augmentation_strength))
        self.sets["train"] = self.frame_set(train_index, augmentation, "views")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sets["train"], shuffle=True, drop_last=len(self.sets["train"]) >= self.batch_size)


class SurgicalPhaseDataModule(FrameDataModule):
    """Labelled frames for phase fine-tuning / linear probing, and frames for feature extraction.

    Train: the first ``train_videos`` training videos (label budget; all when None) at ``fps``
    with a light augmentation; val / test: the validation / test videos at ``fps``, eval
    transform; predict: every annotated video at ``predict_fps`` (feature extraction, 5 fps in
    the paper), in video and frame order, eval transform.

    Batch: ``{"image": (B, 3, S, S) float32 ImageNet-normalised, "label": (B,) int64,
    "video": list[str], "frame": (B,) int64 25 fps index, "index": (B,) int64}``.
    Arguments: see :class:`FrameDataModule` and :class:`SurgicalDataModule`.
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
        super().__init__(frame_pattern)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self._read_splits(h.train_videos)
        for part in STAGE_PARTS[stage]:
            videos = list(self.annotations) if part == "predict" else self.splits[part]
            index = self.labelled_index(videos, h.predict_fps if part == "predict" else h.fps)
            if part == "train":
                transform = finetune_augmentation(h.image_size, h.resize_size)
            else:
                transform = self.eval_transform()
            self.sets[part] = self.frame_set(index, transform)
        self._require_validation(stage)

    def class_weights(self) -> torch.Tensor:
        """(C,) float32 median-frequency weights of the training labels (TeCNO); absent phases get 0."""
        counts = np.bincount(self.sets["train"].index.labels, minlength=self.num_classes).astype(np.float64)
        frequency = counts / counts.sum()
        weights = np.divide(np.median(frequency[counts > 0]), frequency, out=np.zeros_like(frequency), where=counts > 0)
        return torch.as_tensor(weights, dtype=torch.float32)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.sets["predict"])


class PhaseFeatureDataModule(SurgicalDataModule):
    """Per-video feature sequences for the temporal model (TCN), one video per batch.

    Reads ``<features_dir>/<video>.npy`` and ``<video>_frames.npy`` (:func:`~distill.formats.features.save_video_features`)
    and the phase labels at those frames. Train uses the first ``train_videos`` training videos.
    Other arguments: see :class:`SurgicalDataModule`.

    Batch: ``{"features": (1, D, T) float32, "label": (1, T) int64, "video": [name],
    "frame": (1, T) int64 25 fps index}``.
    """

    batch_size = 1  # one video per batch: videos differ in length
    image_size = None  # features, not images

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
        super().__init__()
        self.save_hyperparameters()

    @property
    def features_dir(self) -> Path:
        return Path(self.hparams.features_dir)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self._read_splits(h.train_videos)
        for part in STAGE_PARTS[stage]:
            if part != "predict":
                self.sets[part] = VideoFeatureDataset(self.features_dir, self.splits[part], self.annotations, h.dataset)
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

"""Callbacks referenced from the experiment YAMLs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from distill.errors import DataError
from distill.types import NonNegativeInt


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every epoch, and every ``every_n_train_steps`` optimizer
    steps when that is > 0, whatever the monitored metric did: resuming from it never rolls back.

    (Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when it
    also saves a top-k checkpoint.) Use it next to the ``best`` checkpoint callback.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: NonNegativeInt = 0) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            every_n_train_steps=every_n_train_steps or None,
            enable_version_counter=False,
        )
        # Lightning takes steps and epochs as exclusive triggers; the end of every epoch is always wanted.
        self._every_n_epochs = 1


class FitCompletion(Callback):
    """Records in the checkpoint folders how a fit ended; every ``distill fit`` and table run has it.

    - finished: ``fit_complete.json`` (epoch, step; ``distill.modules.checkpoints.FIT_COMPLETE``),
      written once fit has ended normally, so a run directory given as ``teacher_checkpoint``
      counts only when its training finished (:func:`distill.modules.checkpoints.resolve_checkpoint`);
    - no training batch at all (an empty training split; Lightning only warns "No training batches"):
      a one-line :class:`~distill.errors.DataError` and no marker, so nothing passes as a trained run;
    - stopped by SIGTERM or Ctrl-C (Lightning's ``SIGTERMException``, raised by its loops at the next batch):
      ``last.ckpt`` is written where the run keeps it (a :class:`LastCheckpoint`'s or ``save_last``
      folder, else the first checkpoint callback's), so the run resumes from where it stopped.
    """

    def __init__(self) -> None:
        self.saved_on_sigterm: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from distill.modules.checkpoints import FIT_COMPLETE
        from distill.utils import write_text_atomic

        if trainer.num_training_batches == 0:
            raise DataError(
                "fit: the training data gave no batch (an empty training split, or limit_train_batches=0), "
                "so nothing was trained; no checkpoint or completion marker was written"
            )
        if not trainer.is_global_zero:
            return
        marker = json.dumps({"epoch": trainer.current_epoch, "global_step": trainer.global_step})
        for folder in dict.fromkeys(c.dirpath for c in trainer.checkpoint_callbacks if c.dirpath):
            Path(folder).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(folder) / FIT_COMPLETE, marker + "\n")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        keepers = [
            c for c in trainer.checkpoint_callbacks if c.dirpath and (isinstance(c, LastCheckpoint) or c.save_last)
        ]
        folders = [c.dirpath for c in keepers + trainer.checkpoint_callbacks if c.dirpath]
        if folders:
            self.saved_on_sigterm = Path(folders[0]) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
            trainer.save_checkpoint(self.saved_on_sigterm, weights_only=False)  # the full state: resumable


def sigterm_note(trainer: L.Trainer | None, resume_hint: bool = False) -> str:
    """Where a fit stopped by SIGTERM stopped and what it wrote (:class:`FitCompletion`), for its message:
    ``" at epoch E, step S; wrote P"``, ``resume_hint``: ``" (resume: --ckpt_path=P)"`` after it; "" if nothing."""
    saved = next((c.saved_on_sigterm for c in getattr(trainer, "callbacks", []) if isinstance(c, FitCompletion)), None)
    if saved is None:
        return ""
    hint = f" (resume: --ckpt_path={saved})" if resume_hint else ""
    return f" at epoch {trainer.current_epoch}, step {trainer.global_step}; wrote {saved}{hint}"


class RandomStateCheckpoint(Callback):
    """Puts the global torch / numpy / python (and CUDA) random states into checkpoints and restores
    them when training resumes, so random draws of the model (dropout, shuffled batch norm ...)
    continue as in the uninterrupted run (exactly for checkpoints written within an epoch)."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=True)
        name, keys, position, has_gauss, gauss = states["numpy"]  # as tensors and numbers: loadable with weights_only
        states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None:
            name, keys, position, has_gauss, gauss = self._loaded["numpy"]
            _set_rng_states(
                {**self._loaded, "numpy": (name, keys.numpy().astype(np.uint32), position, has_gauss, gauss)}
            )
            self._loaded = None


class NiftiPredictionWriter(BasePredictionWriter):
    """Writes each predicted volume as ``<output_dir>/<SITE>/<Case>_prediction.nii.gz``.

    The mask has the input volume's shape and affine, so it overlays the image in any viewer.
    Existing files are never overwritten unless ``overwrite`` is set.
    """

    def __init__(self, output_dir: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module,
        prediction: dict,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from distill.formats.nifti import save_mask_like
        from distill.utils import child_path

        site_dir = child_path(self.output_dir, prediction["site"], prediction["image_path"])
        out = child_path(site_dir, f"{prediction['case']}_prediction.nii.gz", prediction["image_path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        save_mask_like(prediction["mask"].numpy(), prediction["image_path"], out, overwrite=self.overwrite)


SHARDS = ".shards"  # PhaseFeatureWriter: each DDP process's share of the videos, merged by process 0


class PhaseFeatureWriter(BasePredictionWriter):
    """Writes what ``distill predict`` of a :class:`~distill.modules.phase.PhaseClassifierModule` gives.

    Per video: ``<output_dir>/features/<video>.npy`` (T, D) and ``<video>_frames.npy`` (T,) (the
    :func:`~distill.formats.features.save_video_features` format, read by ``PhaseFeatureDataModule``),
    and ``<output_dir>/predictions/<video>-pred.txt`` (``Frame<TAB>Phase``) at ``prediction_fps``
    (default: every predicted frame). Batches arrive in video and frame order (the predict
    loader does not shuffle); a video is written once complete, each file through a temporary
    name and a rename. An output folder that already holds results stops the run before any
    prediction (never overwritten).

    Under DDP the distributed sampler deals the frames out round-robin, so each process holds every
    ``W``-th frame of every video (and the padding repeats a few): each writes its share of a video to
    ``<output_dir>/.shards/``, and process 0 merges the shares by frame number (each frame once) into
    the same files a single process writes.

    Args:
        output_dir: where ``features/`` and ``predictions/`` go.
        dataset: phase names of the prediction files (``${data.init_args.dataset}``).
        prediction_fps: rate of the prediction files (a divisor of the predicted rate).
        dtype: ``"float16"`` (half the disk) or ``"float32"`` features.
    """

    def __init__(
        self, output_dir: str, dataset: str = "cholec80", prediction_fps: int | None = None, dtype: str = "float16"
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.dataset, self.prediction_fps, self.dtype = (
            Path(output_dir),
            dataset,
            prediction_fps,
            dtype,
        )
        self.current: str | None = None
        self.parts: list[dict] = []
        self.shard_rank: int | None = None  # this process's rank when writing shares (DDP)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        for folder in (self.output_dir / "features", self.output_dir / "predictions"):
            if folder.is_dir() and any(folder.iterdir()):
                raise DataError(
                    f"{folder}: already exists and holds results; predict into a new output_dir (results are never overwritten)"
                )
        self.current, self.parts = None, []
        self.shard_rank = trainer.global_rank if trainer.world_size > 1 else None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module,
        prediction: dict,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for video in dict.fromkeys(prediction["video"]):
            rows = [i for i, v in enumerate(prediction["video"]) if v == video]
            if video != self.current:
                self.flush()
                self.current = video
            self.parts.append({key: prediction[key][rows] for key in ("features", "prediction", "frame")})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.flush()
        if self.shard_rank is not None:
            trainer.strategy.barrier("phase_feature_shards")
            if trainer.is_global_zero:
                self.merge_shards()
            trainer.strategy.barrier("phase_features_merged")

    def flush(self) -> None:
        """Write the finished video held in memory (under DDP: this process's share of it)."""
        from distill.utils import atomic_write, child_path

        if self.current is None:
            return
        video, parts, self.current, self.parts = self.current, self.parts, None, []
        features, predictions, frames = (
            torch.cat([p[key] for p in parts]).numpy() for key in ("features", "prediction", "frame")
        )
        if self.shard_rank is None:
            self.write_video(video, features, predictions, frames)
            return
        shard = child_path(self.output_dir / SHARDS, f"{video}.{self.shard_rank}.npz")
        shard.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(shard) as temporary, open(temporary, "wb") as stream:
            np.savez(stream, features=features, prediction=predictions, frame=frames)

    def merge_shards(self) -> None:
        """Process 0, after every process flushed: each video's shares, ordered by frame number and each
        frame once (the sampler's padding repeats some), written as one process writes them."""
        folder = self.output_dir / SHARDS
        videos: dict[str, list] = {}
        for shard in sorted(folder.glob("*.npz")):
            videos.setdefault(shard.name.rsplit(".", 2)[0], []).append(shard)
        for video, shards in videos.items():
            loaded = [np.load(shard, allow_pickle=False) for shard in shards]
            frames = np.concatenate([part["frame"] for part in loaded])
            frames, first = np.unique(frames, return_index=True)  # sorted, each frame once
            features, predictions = (
                np.concatenate([part[key] for part in loaded])[first] for key in ("features", "prediction")
            )
            self.write_video(video, features, predictions, frames)
        shutil.rmtree(folder, ignore_errors=True)

    def write_video(self, video: str, features, predictions, frames) -> None:
        """Write one whole video's (T, D) features, (T,) predicted phases and (T,) frame numbers."""
        from distill.formats.features import save_video_features
        from distill.formats.phases import frame_step, write_phase_file
        from distill.utils import atomic_write, child_path

        feature_dir, prediction_dir = self.output_dir / "features", self.output_dir / "predictions"
        targets = [
            child_path(feature_dir, f"{video}.npy"),
            child_path(feature_dir, f"{video}_frames.npy"),
            child_path(prediction_dir, f"{video}-pred.txt"),
        ]
        for target in targets:
            if target.exists():
                raise DataError(
                    f"{target}: already exists; predict into a new output_dir (results are never overwritten)"
                )
        staging = feature_dir / f".{video}.partial"
        save_video_features(staging, video, features.astype(self.dtype), frames)
        for name in (f"{video}.npy", f"{video}_frames.npy"):
            os.replace(staging / name, feature_dir / name)
        staging.rmdir()
        keep = (
            frames % frame_step(self.prediction_fps) == 0 if self.prediction_fps else np.ones(len(frames), dtype=bool)
        )
        prediction_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(prediction_dir / f"{video}-pred.txt") as temporary:
            write_phase_file(temporary, frames[keep], predictions[keep], self.dataset)

"""Callbacks referenced from the experiment YAMLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

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
            _set_rng_states({**self._loaded, "numpy": (name, keys.numpy().astype(np.uint32), position, has_gauss, gauss)})
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

    def write_on_batch_end(self, trainer: L.Trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        from data_modules.prostate import save_mask_like

        out = self.output_dir / prediction["site"] / f"{prediction['case']}_prediction.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_mask_like(prediction["mask"].numpy(), prediction["image_path"], out, overwrite=self.overwrite)

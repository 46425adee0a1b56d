"""Callbacks referenced from the experiment YAMLs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


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

"""Quiet table runs: one progress display (runs done / total, current run, epoch, ETA) instead of
Lightning's per-run start-up logs, tips, model summaries, progress bars and warnings.

``distill table`` and ``distill demo`` use it unless ``--verbose``; ``distill fit`` never does.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import Callback

# Lightning's info/warning logs ("GPU available", "LOCAL_RANK", "Seed set to", tips ...) go to these.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# Trainer flags of a quiet run; put before the user's overrides, so that theirs win.
QUIET_TRAINER_OVERRIDES = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside the block: Lightning's loggers at ERROR, every warning ignored, W&B silent; restored after."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), _environment(WANDB_SILENT=os.environ.get("WANDB_SILENT", "true")):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Environment variables set inside the block, restored after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TableProgress:
    """One tqdm bar over a table's runs; the current run's epochs and batches advance it by fractions,
    so the ETA follows the training actually done. ``enabled=False``: no bar, every method a no-op."""

    def __init__(self, total_runs: int, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_runs,
            unit="run",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}<{remaining}{postfix}]",
        )
        self.runs_done = 0
        self.name = ""

    def start_run(self, name: str) -> None:
        self.name = name
        self.bar.set_description_str(name, refresh=False)
        self.bar.set_postfix_str("starting")

    def advance_to(self, fraction_of_run: float, status: str) -> None:
        """Progress within the current run (0..1) and a short status, e.g. ``epoch 3/10``."""
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(self.runs_done + min(fraction_of_run, 1.0) - self.bar.n)

    def finish_run(self) -> None:
        self.runs_done += 1
        self.advance_to(0.0, "done")

    def close(self) -> None:
        self.bar.close()

    def callback(self) -> Callback:
        """A Lightning callback reporting the run's epoch/batch progress to this bar."""
        return EpochProgress(self)


class EpochProgress(Callback):
    """Reports training progress (epoch, batch) of one run to a :class:`TableProgress`."""

    def __init__(self, progress: TableProgress) -> None:
        self.progress = progress

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        max_epochs = trainer.max_epochs or 1
        if not batches or batches == float("inf") or max_epochs < 0:
            return
        done = trainer.current_epoch + (batch_idx + 1) / batches
        self.progress.advance_to(done / max_epochs, f"epoch {trainer.current_epoch + 1}/{max_epochs}")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress.advance_to(1.0, "testing")

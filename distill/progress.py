"""Quiet table runs: one progress display (runs done / total, current run, epoch, ETA; in a log
file one line per run) instead of Lightning's per-run start-up logs, tips, model summaries,
progress bars and warnings.

``distill table`` and ``distill demo`` use it unless ``--verbose``; ``distill fit`` never does.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

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
    """Progress of a table's runs, weighted by their expected work, on stderr.

    Each run's work is its epochs x training batches per epoch. ``plan`` gives each run up front,
    in order, as (epochs, kind): 0 epochs for a run that trains nothing (a ``train_once`` run's
    reuse); ``kind`` (e.g. its config file) names runs that share a dataset. A run's batches are
    known when it starts training; until then they are those of the last run of its kind that
    trained, else of the last run that trained. The ETA is the seconds per unit of work so far times
    the work left, so it holds across runs of different lengths.

    On a terminal: one tqdm bar (runs done / total, current run, epoch, ETA), redrawn in place.
    Otherwise (a log file): one line per finished run, its name, seconds and validation score.
    ``enabled=False``: nothing is shown. ``clock`` and ``stream`` are for tests.
    """

    def __init__(
        self,
        plan: list[tuple[int, str]],
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self.plan = list(plan)
        self.clock, self.stream = clock, stream or sys.stderr
        self.enabled = enabled
        self.redraw = enabled and self.stream.isatty()
        self.started = clock()
        self.runs_done = 0
        self.name = ""
        self.run_started = self.started
        self.batches: int | None = None  # per epoch, of the last run that trained
        self.batches_by_kind: dict[str, int] = {}
        self.work_done = 0.0  # epochs x batches trained so far, all runs
        self.run_work_done = 0.0  # of the current run, trainers that finished (limit-trained teachers: several)
        self.trainer_work = 0.0  # of the current trainer
        self.bar = None
        if self.redraw:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=len(self.plan),
                unit="run",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} runs [{elapsed}{postfix}]",
            )

    # ---------------------------------------------------------------- the table's calls
    def start_run(self, name: str) -> None:
        self.name, self.run_started = name, self.clock()
        self.run_work_done = self.trainer_work = 0.0
        self.show("starting")

    def finish_run(self, result: Any = None) -> None:
        """The current run is done; ``result`` (a :class:`~distill.runs.RunResult`, a list of them or
        None for a reused run) gives the score of its line."""
        self.runs_done += 1
        self.run_work_done = self.trainer_work = 0.0
        if self.enabled and not self.redraw and result is not None:
            results = result if isinstance(result, list) else [result]
            score = sum(r.val_score for r in results) / len(results)
            label = results[0].monitor + (f" (mean of {len(results)})" if len(results) > 1 else "")
            # a checkpoint chosen by epoch or step is the last one, not a validation score
            chosen = f"last {label} {score:.0f}" if label in ("epoch", "step") else f"{label} {score:.4f}"
            elapsed = self.clock() - self.run_started
            print(
                f"[{self.runs_done}/{len(self.plan)}] {self.name}: {elapsed:.0f} s, {chosen}",
                file=self.stream,
                flush=True,
            )
        self.show("done")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def callback(self) -> Callback:
        """A Lightning callback reporting the run's epoch/batch progress here."""
        return EpochProgress(self)

    # ---------------------------------------------------------------- the callback's calls
    def training_started(self, batches: int) -> None:
        """A trainer of the current run starts: ``batches`` training batches per epoch."""
        self.run_work_done += self.trainer_work
        self.trainer_work = 0.0
        self.batches = self.batches_by_kind[self.plan[self.runs_done][1]] = batches

    def trained(self, epochs_done: float, status: str) -> None:
        """The current trainer has trained ``epochs_done`` epochs (fractional) so far."""
        work = epochs_done * (self.batches or 0)
        self.work_done += work - self.trainer_work
        self.trainer_work = work
        self.show(status)

    # ---------------------------------------------------------------- estimates
    def work_left(self) -> float | None:
        """Expected epochs x batches still to train (None before any run has trained)."""
        if self.batches is None:
            return None
        planned = [
            epochs * self.batches_by_kind.get(kind, self.batches) for epochs, kind in self.plan[self.runs_done :]
        ]
        if planned:  # the current run: what is left of it
            planned[0] = max(planned[0] - self.run_work_done - self.trainer_work, 0.0)
        return float(sum(planned))

    def eta_seconds(self) -> float | None:
        """Seconds left: the seconds per unit of work so far times the work left."""
        left = self.work_left()
        if left is None or self.work_done <= 0:
            return None
        return (self.clock() - self.started) / self.work_done * left

    def show(self, status: str) -> None:
        """Redraw the bar (on a terminal) with the current run's ``status``, e.g. ``epoch 3/10``."""
        if self.bar is None:
            return
        eta = self.eta_seconds()
        remaining = "?" if eta is None else self.bar.format_interval(eta)
        self.bar.set_description_str(self.name, refresh=False)
        self.bar.set_postfix_str(f"ETA {remaining}, {status}", refresh=False)
        epochs = self.plan[self.runs_done][0] if self.runs_done < len(self.plan) else 0
        current = (self.run_work_done + self.trainer_work) / (epochs * self.batches) if epochs and self.batches else 0.0
        self.bar.update(self.runs_done + min(current, 1.0) - self.bar.n)


class EpochProgress(Callback):
    """Reports training progress (epoch, batch) of one run to a :class:`TableProgress`."""

    def __init__(self, progress: TableProgress) -> None:
        self.progress = progress

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = trainer.num_training_batches
        if batches and batches != float("inf"):
            self.progress.training_started(int(batches))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        max_epochs = trainer.max_epochs or 1
        if not batches or batches == float("inf") or max_epochs < 0:
            return
        done = trainer.current_epoch + (batch_idx + 1) / batches
        self.progress.trained(done, f"epoch {trainer.current_epoch + 1}/{max_epochs}")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress.show("testing")

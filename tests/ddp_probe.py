"""A callback for the DDP tests: what each rank split, served and computed, written as JSON files.

``<out_dir>/<fn>_rank<R>.json`` per rank (``fn``: fit, validate, test): the DataModule's case
split (``SITE/CaseXX`` per split) and the volumes this rank evaluated per loop (``SITE/CaseXX``, sanity
check left out); ``<out_dir>/<fn>_<loop>_metrics.json`` (rank 0): the module's per-volume metrics over all
ranks, ``[[SITE/CaseXX, dice, hd95], ...]`` in the metric's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from distill.metrics.segmentation import volume_key


class RecordEvaluation(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.served: dict[str, list[str]] = {"val": [], "test": []}

    def _rank_file(self, trainer: L.Trainer) -> Path:
        return self.out_dir / f"{trainer.state.fn.value}_rank{trainer.global_rank}.json"

    def on_validation_batch_end(self, trainer, pl_module, outputs, volume, *args) -> None:
        if not trainer.sanity_checking:
            self.served["val"].append(f"{volume['site']}/{volume['case']}")

    def on_test_batch_end(self, trainer, pl_module, outputs, volume, *args) -> None:
        self.served["test"].append(f"{volume['site']}/{volume['case']}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write_metrics(trainer, pl_module.val_metrics, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write_metrics(trainer, pl_module.test_metrics, "test")

    def _write_metrics(self, trainer: L.Trainer, metrics, loop: str) -> None:
        """Runs before the module's epoch end (which resets the metrics); a collective: on every rank."""
        volumes = metrics.per_volume()
        cases = {volume_key(str(case.image_path)): case.key for case in trainer.datamodule.case_splits["all"]}
        per_volume = [
            [cases[int(key)], float(dice), float(hd95)]
            for key, dice, hd95 in zip(volumes["volume"], volumes["dice"], volumes["hd95"])
        ]
        if trainer.global_rank == 0:
            (self.out_dir / f"{trainer.state.fn.value}_{loop}_metrics.json").write_text(json.dumps(per_volume))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        splits = {name: [case.key for case in cases] for name, cases in trainer.datamodule.case_splits.items()}
        self._rank_file(trainer).write_text(json.dumps({"splits": splits, "served": self.served}))

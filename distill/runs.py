"""Run one experiment: what ``distill table``, ``distill teachers`` and ``distill sweep`` all call.

:func:`run_experiment` fits an experiment YAML in its own folder, tests the checkpoint chosen on
validation data, measures the deployable network (parameters, CPU latency) and leaves a
:class:`RunResult` as ``result.json``, so a re-started table or teachers command skips finished
runs: those with the same resolved configuration (its fingerprint is in ``result.json``; a run
finished with other settings is refused, naming them). SIGTERM or Ctrl-C stops a run with a one-line
:class:`~distill.errors.Terminated` naming it (:mod:`distill.termination`). :func:`run_cli_subprocess` runs a ``distill <subcommand> ...`` command line as a child
process instead (a sweep point: the command as ``wandb agent`` would run it, isolated from the
parent) and reads its metric back from the CSV log.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from distill.errors import DataError, Terminated
from distill.termination import EXIT_STATUSES, received_stop_signal, stop_on_signal, stop_signal_name
from distill.utils import load_yaml_text, read_json, read_yaml, write_text_atomic


@dataclass
class RunResult:
    """One finished run (one row, one seed)."""

    name: str
    seed: int
    metrics: dict[str, float]
    monitor: str
    val_score: float
    parameters: int
    ms_per_input: float
    best_checkpoint: str
    log_dir: str
    manifest: str | None = None
    predictions: str | None = None
    config_sha256: str | None = None  # of the resolved configuration it was trained with (:func:`settings_sha256`)


# Trainer flags that change what a run shows, not what it trains: left out of its fingerprint.
DISPLAY_ONLY_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary")


def slug(name: str) -> str:
    """A run name as a folder name: "student + KD" -> "student_kd"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_config(result: RunResult) -> dict:
    """The configuration a finished run was trained with (its saved ``config.yaml``)."""
    return read_yaml(Path(result.log_dir) / "config.yaml", "saved run config")


def resolved_settings(config: dict) -> dict:
    """A run's resolved configuration (as saved in its ``config.yaml``) without the display-only trainer flags."""
    trainer = {k: v for k, v in (config.get("trainer") or {}).items() if k not in DISPLAY_ONLY_TRAINER_KEYS}
    return {**config, "trainer": trainer}


def settings_sha256(settings: dict) -> str:
    """Fingerprint of :func:`resolved_settings`: two runs share it exactly when they were configured alike."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def setting_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"dotted.key: A then, B now"`` for every leaf on which two configurations differ."""
    differences = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += setting_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return differences


def read_run_result(path: Path) -> RunResult:
    """A finished run's ``result.json``; a damaged or incomplete one is a one-line DataError naming it."""
    remedy = f"delete {path.parent} to train that run again"
    try:
        data = read_json(path, "run result")
    except DataError as err:
        raise DataError(f"{err}; {remedy}") from None
    known = {f.name for f in fields(RunResult)}
    missing = {f.name for f in fields(RunResult) if f.default is MISSING} | {"config_sha256"}
    missing -= {key for key, value in data.items() if value is not None}
    if missing or set(data) - known:
        problem = f"lacks {', '.join(sorted(missing))}" if missing else f"unknown keys {sorted(set(data) - known)}"
        raise DataError(f"{path}: incomplete run result ({problem}); {remedy}")
    return RunResult(**data)


def check_same_settings(done: Path, finished: RunResult, settings: dict) -> None:
    """Refuse a finished run whose configuration differs from ``settings``, naming the differences."""
    if finished.config_sha256 == settings_sha256(settings):
        return
    saved = Path(finished.log_dir) / "config.yaml"
    differences = (
        setting_differences(resolved_settings(read_yaml(saved, "saved run config")), settings)
        if saved.is_file()
        else []
    )
    shown = "; ".join(differences[:3]) + (f"; {len(differences) - 3} more" if len(differences) > 3 else "")
    raise DataError(
        f"{done}: this run finished with other settings ({shown or 'configuration fingerprint differs'}); "
        f"use another --out, or delete {done.parent} to train it again"
    )


def checkpoint_callback(trainer):
    """The run's checkpoint callback that monitors a validation metric (model selection)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            return callback
    return None


def run_experiment(
    config: str,
    overrides: list[str],
    root_dir: Path,
    name: str,
    seed: int = 0,
    predict: bool = False,
    callbacks: list | None = None,
    group: str | None = None,
) -> RunResult:
    """Fit ``config`` in ``root_dir``, test the checkpoint chosen on validation data, measure the network
    (``predict``: then predict with that checkpoint, the config's prediction writer recording).
    ``callbacks`` are added to the config's (e.g. a progress display). A W&B run (if the config logs
    to W&B) is named ``<name>/seed_<seed>`` in the group ``group`` unless the config names them.

    A finished run (``root_dir/result.json``) is read back instead of trained again when its resolved
    configuration is the same (its fingerprint, ``config_sha256``), else refused in one line naming
    what differs. SIGTERM or Ctrl-C stops the run with :class:`~distill.errors.Terminated` naming it.
    """
    from distill.callbacks import sigterm_note
    from distill.lightning_cli import DistillCLI
    from distill.wandb_logging import finish_wandb_runs, label_wandb_runs

    done = root_dir / "result.json"
    finished = read_run_result(done) if done.is_file() else None
    if not Path(config).is_file():
        raise DataError(f"{config}: experiment config not found")
    trainer = None

    def interrupted() -> str:
        return f"run {name!r} (seed {seed}) in {root_dir}: interrupted by {stop_signal_name()}{sigterm_note(trainer)}; rerun to train it again"

    with stop_on_signal(interrupted):
        with warnings.catch_warnings():  # the caller passes ``args`` on purpose while ``sys.argv`` holds its own
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = DistillCLI(
                args=[
                    "--config",
                    config,
                    *overrides,
                    f"--seed_everything={seed}",
                    f"--trainer.default_root_dir={root_dir}",
                ],
                run=False,
            )
        trainer = cli.trainer
        settings = resolved_settings(
            load_yaml_text(cli.parser.dump(cli.config, skip_none=False), f"{config} (resolved)")
        )
        if finished is not None:
            check_same_settings(done, finished, settings)
            return finished
        trainer.callbacks.extend(callbacks or [])
        label_wandb_runs(trainer, group or slug(name), f"{name}/seed_{seed}")
        try:
            return _fit_test_measure(cli, config, name, seed, predict, done, settings_sha256(settings))
        finally:
            finish_wandb_runs(trainer)


def _fit_test_measure(
    cli, config: str, name: str, seed: int, predict: bool, done: Path, config_sha256: str
) -> RunResult:
    """The body of :func:`run_experiment` once the run is configured: its callbacks are checked
    before it trains, the checkpoint chosen after."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    from distill.benchmarking import latency_ms
    from distill.models import count_parameters

    no_checkpoint = DataError(
        f"{config}: no checkpoint chosen on validation data; a table run needs a ModelCheckpoint with a monitor"
    )
    selector = checkpoint_callback(cli.trainer)
    if selector is None:
        raise no_checkpoint
    writers = [c for c in cli.trainer.callbacks if isinstance(c, BasePredictionWriter)]
    if predict and not writers:
        raise DataError(f"{config}: 'predict: true' needs a prediction writer callback in the config")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not selector.best_model_path:  # e.g. no validation ran
        raise no_checkpoint
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=selector.best_model_path, verbose=False)[
        0
    ]
    predictions = None
    if predict:
        cli.trainer.predict(
            cli.model, datamodule=cli.datamodule, ckpt_path=selector.best_model_path, return_predictions=False
        )
        predictions = str(writers[0].output_dir)
    net = cli.model.deployable_network()
    result = RunResult(
        name=name,
        seed=seed,
        metrics={k: float(v) for k, v in metrics.items()},
        monitor=selector.monitor,
        val_score=float(selector.best_model_score),
        parameters=count_parameters(net),
        ms_per_input=latency_ms(net, cli.model.example_input_shape(cli.datamodule)),
        best_checkpoint=selector.best_model_path,
        log_dir=str(cli.trainer.log_dir),
        predictions=predictions,
        config_sha256=config_sha256,
    )
    if received_stop_signal():  # it came in the last batch or while testing: the run is not marked finished
        raise Terminated()
    write_text_atomic(done, json.dumps(asdict(result), indent=2))
    return result


# ------------------------------------------------------------ one command line in a child process
def lightning_argv(argv: list[str], run_dir: Path, overrides: Sequence[str] = ()) -> list[str]:
    """``argv`` of ``distill <subcommand> ...`` as a subprocess of this interpreter, logging to a
    CSV file under ``run_dir``, then ``overrides`` (appended arguments win over the command's own)."""
    if not argv or Path(argv[0]).name != "distill":
        raise DataError(f"command {argv[:3]}: the local runner runs `distill fit ...` commands (program: distill)")
    return [
        sys.executable,
        "-m",
        "distill.cli",
        *argv[1:],
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *overrides,
    ]


def last_logged(run_dir: Path, metric: str) -> float | None:
    """Last value of ``metric`` in the newest ``metrics.csv`` under ``run_dir`` (None if never logged)."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    with open(files[-1], newline="") as stream:
        values = [row[metric] for row in csv.DictReader(stream) if row.get(metric) not in (None, "")]
    return float(values[-1]) if values else None


class ProcessKilled(Exception):
    """A child process was stopped by a signal (killed, SIGTERM or Ctrl-C), not by an error of its own."""


def stopped_by_signal(returncode: int) -> bool:
    """Whether a child's exit status means a signal stopped it: killed by one (negative status: the
    OOM killer's SIGKILL, a SIGTERM without handler) or ``distill``'s own exit after SIGTERM or Ctrl-C (143, 130)."""
    return returncode < 0 or returncode in EXIT_STATUSES


def run_cli_subprocess(argv: list[str], run_dir: Path, metric: str, overrides: Sequence[str] = ()) -> float | None:
    """Run a ``distill ...`` command line in a child process with W&B disabled (output in
    ``run_dir/output.log``); its last logged ``metric``, or None when it failed or never logged it.
    Raises :class:`ProcessKilled` when a signal stopped it (:func:`stopped_by_signal`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(run_dir / "output.log", "w") as log:
        result = subprocess.run(lightning_argv(argv, run_dir, overrides), env=env, stdout=log, stderr=subprocess.STDOUT)
    if stopped_by_signal(result.returncode):
        raise ProcessKilled(f"exit status {result.returncode}")
    return last_logged(run_dir, metric) if result.returncode == 0 else None

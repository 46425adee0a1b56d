"""Exact resume: a training process killed with SIGKILL or SIGTERM mid-epoch and resumed from ``last.ckpt``
ends with the same weights and logged metrics as the uninterrupted run, bit for bit."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS, SAVE_EVERY, KILL_AT = 4, 2, 3, 7  # last.ckpt at steps 3, 4 (epoch end), 6; killed at 7


def write_config(path: Path, data_root: Path, run_dir: Path, num_workers: int, kill: str | None = None) -> Path:
    """The teacher experiment at toy scale, last.ckpt every SAVE_EVERY steps, optionally sent the signal
    ``kill`` (e.g. "SIGKILL") at step KILL_AT."""
    config = yaml.safe_load((REPO / "experiments/prostate/teacher.yaml").read_text())
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/dice", "mode": "max", "filename": "best"},
        },
        {"class_path": "distill.callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": SAVE_EVERY}},
    ]
    if kill:
        callbacks.append(
            {"class_path": "kill_callback.KillAtStep", "init_args": {"step": KILL_AT, "signal_name": kill}}
        )
    config["trainer"].update(
        default_root_dir=str(run_dir),
        max_epochs=EPOCHS,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=2,
        deterministic=True,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    config["model"]["init_args"]["network_kwargs"] = {"width": 4}
    config["data"]["init_args"].update(
        data_root=str(data_root), image_size=32, batch_size=4, num_workers=num_workers, load_threads=1
    )
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def distill_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``distill fit`` in a child process, in a session of its own (its Ctrl-C reaches its group only)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", "fit", "--config", str(config), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def logged_rows(run_dir: Path, version: int) -> dict[tuple, dict[str, str]]:
    """Every non-empty metric row of a CSVLogger version, keyed by (step, metric names)."""
    with open(run_dir / "lightning_logs" / f"version_{version}" / "metrics.csv") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return {(int(row["step"]), tuple(sorted(row))): row for row in rows}


@pytest.fixture(scope="module")
def full_run(synthetic_prostate_root, tmp_path_factory) -> Path:
    """The uninterrupted run (data loaded in the main process)."""
    tmp_path = tmp_path_factory.mktemp("full")
    full = distill_fit(write_config(tmp_path / "full.yaml", synthetic_prostate_root, tmp_path / "run", 0))
    assert full.returncode == 0, full.stderr[-2000:]
    return tmp_path / "run"


@pytest.mark.parametrize("kill", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_mid_epoch_then_resume_matches_uninterrupted_run(full_run, synthetic_prostate_root, tmp_path, kill):
    """The killed and resumed runs load with 2 workers: order and augmentation depend on (seed,
    epoch, sample) only, so the results are the same as the uninterrupted run's. SIGKILL: the
    newest last.ckpt (step 6) is resumed; SIGTERM (a scheduler's, `timeout`'s) and SIGINT (Ctrl-C, to
    the process group, workers included): the run stops at the next batch, writes last.ckpt there
    (step 7) and exits 143 / 130 saying so."""
    killed_dir = tmp_path / "killed"
    killed = distill_fit(write_config(tmp_path / "killed.yaml", synthetic_prostate_root, killed_dir, 2, kill=kill))
    last = killed_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if kill == "SIGKILL":
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    else:
        assert killed.returncode == 128 + signal.Signals[kill], killed.stderr[-2000:]
        said = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT (Ctrl-C)"}[kill]
        assert killed.stderr.strip().splitlines()[-1] == (
            f"error: fit: interrupted by {said} at epoch 1, step 7; wrote {last} (resume: --ckpt_path={last})"
        )
        assert not (last.parent / "fit_complete.json").exists()  # not a finished run
    saved = torch.load(last, weights_only=True)
    saved_step = {"SIGKILL": 6, "SIGTERM": 7, "SIGINT": 7}[kill]
    assert saved["global_step"] == saved_step and saved["epoch"] == 1  # mid-epoch

    resume_config = write_config(tmp_path / "resume.yaml", synthetic_prostate_root, killed_dir, 2)
    resumed = distill_fit(resume_config, f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (killed_dir / "lightning_logs" / "version_1" / "checkpoints" / "fit_complete.json").is_file()

    final = {
        name: torch.load(run / "lightning_logs" / f"version_{v}" / "checkpoints" / "last.ckpt", weights_only=True)
        for name, run, v in (("full", full_run, 0), ("resumed", killed_dir, 1))
    }
    assert final["full"]["global_step"] == final["resumed"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    for key, weights in final["full"]["state_dict"].items():
        assert torch.equal(weights, final["resumed"]["state_dict"][key]), key

    expected, got = logged_rows(full_run, 0), logged_rows(killed_dir, 1)
    assert got and {step for step, _ in got} == {step for step, _ in expected if step >= saved_step}
    for key, row in got.items():
        assert row == expected[key], key

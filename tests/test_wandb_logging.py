"""W&B logging: offline without an API key, one labelled run per table row, metrics and plots in the run."""

from __future__ import annotations

import struct
from pathlib import Path

import wandb
from conftest import QUIET, TINY

from distill.runs import run_experiment
from distill.wandb_logging import default_wandb_offline

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [*TINY, *QUIET]


def test_offline_unless_a_key_or_a_mode_is_configured(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    environ = dict(no_netrc)
    default_wandb_offline(environ)
    assert environ["WANDB_MODE"] == "offline"
    for configured in ({"WANDB_API_KEY": "k"}, {"WANDB_MODE": "online"}):
        environ = {**no_netrc, **configured}
        default_wandb_offline(environ)
        assert environ.get("WANDB_MODE") == configured.get("WANDB_MODE")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    environ = {"NETRC": str(netrc)}
    default_wandb_offline(environ)
    assert "WANDB_MODE" not in environ


def test_table_run_with_wandb_logger_writes_an_offline_run(synthetic_prostate_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    root = tmp_path / "run"
    loggers = (
        f"[{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}}}}}, "
        f"{{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {{project: distill-test, save_dir: {root}, tags: [tiny]}}}}]"
    )
    result = run_experiment(
        str(REPO / "experiments/prostate/student_baseline.yaml"),
        [*OVERRIDES, f"--data.init_args.data_root={synthetic_prostate_root}", f"--trainer.logger={loggers}"],
        root,
        "student",
        seed=1,
        group="tiny_table",
    )
    assert (Path(result.log_dir) / "metrics.csv").is_file()  # the CSV logger still feeds the table
    wandb.teardown()  # as at the end of the process: the W&B service finishes writing the run files
    runs = sorted((root / "wandb").glob("offline-run-*"))  # the run directory is the logger's save_dir
    assert len(runs) == 1
    records = wandb_log_payload(next(runs[0].glob("run-*.wandb")).read_bytes())
    for logged in (
        "test/dice/RUNMC",
        "test/dice",
        "train/loss",
        "val/dice",  # metrics, per site too
        "data_root",
        "image_size",  # the resolved config
        "student/seed_1",
        "tiny_table",  # run name and group
        "dice_per_site",
    ):  # the per-site bar chart (test/dice_per_site)
        assert logged.encode() in records, logged
    assert list((runs[0] / "files" / "media" / "images").rglob("dice_per_site*.png"))


def wandb_log_payload(data: bytes, block: int = 32768) -> bytes:
    """The protobuf records of a ``run-*.wandb`` file, concatenated (LevelDB log format: a 7-byte file
    header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type)."""
    assert data[:4] == b":W&B"
    payload, position = bytearray(), 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer too short for a header: padding
            position += block - position % block
            continue
        length = struct.unpack("<H", data[position + 4 : position + 6])[0]
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
    return bytes(payload)

"""Lightning DDP on CPU (gloo, 2 processes) for the temporal phase model: each process scores a share
of the test videos (the distributed sampler deals them out and repeats one to even them), yet the
relaxed phase metrics and the written ``<video>-pred.txt`` files are those of a 1-process run: the
videos are gathered before scoring, each counted once, and process 0 alone writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from distill.cli import main
from distill.formats.features import save_video_features
from distill.formats.phases import read_phase_file
from distill.modules import TCNPhaseModule

REPO = Path(__file__).resolve().parents[1]
# 3 test videos: an odd count, so the sampler of 2 processes repeats one
SPLIT = "--data.init_args.split={train: [video01], val: [video02], test: [video03, video04, video05]}"


def test_tcn_test_metrics_and_predictions_under_ddp_equal_one_process(synthetic_cholec80, tmp_path):
    features = tmp_path / "features"
    generator = np.random.default_rng(0)
    for video in [f"video0{i}" for i in range(1, 6)]:
        frames, _ = read_phase_file(synthetic_cholec80.root / "phase_annotations" / f"{video}-phase.txt")
        at_5_fps = frames[frames % 5 == 0]
        save_video_features(features, video, generator.standard_normal((len(at_5_fps), 8), np.float32), at_5_fps)
    torch.manual_seed(0)
    checkpoint = tmp_path / "tcn.ckpt"
    model = TCNPhaseModule(in_dim=8, num_layers=2, channels=8)
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__}, checkpoint)
    argv = [
        "--config",
        str(REPO / "experiments/surgical/tcn.yaml"),
        f"--data.init_args.features_dir={features}",
        f"--data.init_args.data_root={synthetic_cholec80.root}",
        SPLIT,
        "--data.init_args.num_workers=0",
        "--model.init_args.num_layers=2",
        "--model.init_args.channels=8",
        f"--ckpt_path={checkpoint}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]
    main(["test", *argv, f"--trainer.default_root_dir={tmp_path / 'one'}"])
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env |= {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ddp = [*argv, f"--trainer.default_root_dir={tmp_path / 'two'}", "--trainer.strategy=ddp", "--trainer.devices=2"]
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "test", *ddp], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def logged(run: str) -> dict[str, float]:
        (metrics,) = (tmp_path / run).rglob("metrics.csv")
        (row,) = csv.DictReader(metrics.open())
        return {key: float(value) for key, value in row.items() if value and key.startswith("test/")}

    one, two = logged("one"), logged("two")
    assert {"test/accuracy", "test/jaccard", "test/published/accuracy"} <= set(one)
    assert two == pytest.approx(one, rel=1e-6)
    folders = [list((tmp_path / run).rglob("phase_predictions/test")) for run in ("one", "two")]
    assert [len(f) for f in folders] == [1, 1]  # process 1 wrote no folder of its own
    files = {run: sorted(p.name for p in f[0].glob("*-pred.txt")) for run, f in zip(("one", "two"), folders)}
    assert files["one"] == files["two"] == ["video03-pred.txt", "video04-pred.txt", "video05-pred.txt"]
    for name in files["one"]:
        assert (folders[0][0] / name).read_text() == (folders[1][0] / name).read_text(), name

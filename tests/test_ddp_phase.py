"""Lightning DDP on CPU (gloo, 2 processes) for the phase pipeline: each process sees a share of the
data (the distributed sampler deals it out and repeats a few items to even it), yet the temporal
model's relaxed phase metrics and ``<video>-pred.txt`` files, and the frame classifier's exported
features, are those of a 1-process run."""

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
from distill.modules import PhaseClassifierModule, TCNPhaseModule

REPO = Path(__file__).resolve().parents[1]
# 3 test videos: an odd count, so the sampler of 2 processes repeats one
SPLIT = "--data.init_args.split={train: [video01], val: [video02], test: [video03, video04, video05]}"


def run_ddp_subprocess(subcommand: str, argv: list[str]) -> None:
    """``distill <subcommand> argv`` as 2 DDP processes on the CPU (gloo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env |= {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", subcommand, *argv, "--trainer.strategy=ddp", "--trainer.devices=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def run_one_and_two_processes(subcommand: str, model: torch.nn.Module, argv: list[str], tmp_path: Path) -> None:
    """``model``'s weights as a checkpoint, then ``distill <subcommand> argv --ckpt_path=...`` in this
    process (run folder ``one``) and as 2 DDP processes (``two``)."""
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__}, checkpoint)
    argv = [*argv, f"--ckpt_path={checkpoint}", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    main([subcommand, *argv, f"--trainer.default_root_dir={tmp_path / 'one'}"])
    run_ddp_subprocess(subcommand, [*argv, f"--trainer.default_root_dir={tmp_path / 'two'}"])


def test_tcn_test_metrics_and_predictions_under_ddp_equal_one_process(synthetic_cholec80, tmp_path):
    features = tmp_path / "features"
    generator = np.random.default_rng(0)
    for video in [f"video0{i}" for i in range(1, 6)]:
        frames, _ = read_phase_file(synthetic_cholec80.root / "phase_annotations" / f"{video}-phase.txt")
        at_5_fps = frames[frames % 5 == 0]
        save_video_features(features, video, generator.standard_normal((len(at_5_fps), 8), np.float32), at_5_fps)
    torch.manual_seed(0)
    argv = [
        "--config",
        str(REPO / "experiments/surgical/tcn.yaml"),
        f"--data.init_args.features_dir={features}",
        f"--data.init_args.data_root={synthetic_cholec80.root}",
        SPLIT,
        "--data.init_args.num_workers=0",
        "--model.init_args.num_layers=2",
        "--model.init_args.channels=8",
    ]
    run_one_and_two_processes("test", TCNPhaseModule(in_dim=8, num_layers=2, channels=8), argv, tmp_path)

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


def test_feature_export_under_ddp_writes_the_files_of_one_process(synthetic_cholec80, tmp_path):
    """The distributed sampler deals each video's frames out round-robin (and pads with repeats): the
    processes write their shares, process 0 merges them by frame number, and every features,
    frame-number and prediction file equals the 1-process file."""
    torch.manual_seed(0)
    argv = [
        "--config",
        str(REPO / "experiments/surgical/finetune.yaml"),
        "--model.init_args.backbone=test_efficientnet",
        "--model.init_args.pretrained_checkpoint=null",
        f"--data.init_args.frames_dir={synthetic_cholec80.frames}",
        f"--data.init_args.data_root={synthetic_cholec80.root}",
        "--data.init_args.image_size=32",
        "--data.init_args.resize_size=36",
        "--data.init_args.batch_size=3",
        "--data.init_args.num_workers=0",
        "--trainer.precision=32-true",
    ]
    run_one_and_two_processes("predict", PhaseClassifierModule(backbone="test_efficientnet"), argv, tmp_path)
    one, two = tmp_path / "one" / "predict", tmp_path / "two" / "predict"
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert len(names) == 3 * 6 and not (two / ".shards").exists()
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(two / name), np.load(one / name), rtol=1e-3, atol=1e-3, err_msg=name)
        else:
            assert (two / name).read_text() == (one / name).read_text(), name

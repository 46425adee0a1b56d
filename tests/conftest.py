"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_modules.surgical_layout import extract_dataset_frames
from data_modules.synth_prostate import write_synthetic_prostate
from data_modules.synth_surgical import write_synthetic_surgical

os.environ["WANDB_MODE"] = "disabled"  # no test talks to W&B; a test wanting offline runs sets it itself
# One intra-op thread per test process and its children: `make test` runs two workers on two cores,
# and two OpenMP threads per worker wait on each other (a one-run tiny table measured 3.5 s with one
# thread, 8.9 s with two, on a loaded 2-core machine).
# DISTILL_TEST_TORCH_THREADS=N runs the suite with N threads instead (CPU rounding changes with N).
TORCH_THREADS = int(os.environ.get("DISTILL_TEST_TORCH_THREADS", "1"))
torch.set_num_threads(TORCH_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))


def one_line_exit(argv: list[str]) -> str:
    """The one ``error: ...`` line ``distill argv`` exits with (`from conftest import one_line_exit`)."""
    from distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


SURGICAL_VIDEO_SIZE = (64, 80)  # (H, W) of the synthetic videos of synthetic_cholec80
NUM_CHOLEC80 = 6

# The tiny scale of every prostate experiment a test trains (`from conftest import TINY`): 32 px,
# width-4 networks, one epoch of two batches, no loader processes; a test adds what it needs after.
TINY = [
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=8",
    "--data.init_args.load_threads=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--model.init_args.network_kwargs.width=4",
]
# Lightning's progress bar and model summary off, a log line at every step (metrics.csv has every step)
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def synthetic_prostate_root(tmp_path_factory) -> Path:
    """A small synthetic 6-site prostate tree in the real layout, written once per session.

    2-3 cases per site (RUNMC 3, BMC 3, I2CVB 2, UCL 2, BIDMC 2, HK 2), in-plane 64 px
    (53 px at I2CVB and BIDMC), 14-30 slices. Read-only: copy it before modifying.
    """
    return write_synthetic_prostate(tmp_path_factory.mktemp("prostate"), seed=0, scale=0.1, size=64)


@pytest.fixture(scope="session")
def synthetic_cholec80(tmp_path_factory) -> SimpleNamespace:
    """6 synthetic Cholec80 videos of 3-4 s (``root``: videos and annotations, real layout) and their
    frames at 5 fps (``frames``; ``extracted``: the videos extracted), written once per session, two
    extraction processes. The surgical demo's layout: ``base`` is what ``$SURGICAL_DEMO`` names. Read-only."""
    base = tmp_path_factory.mktemp("cholec80")
    root, frames = base / "cholec80", base / "frames"
    write_synthetic_surgical(
        root, "cholec80", num_videos=NUM_CHOLEC80, seed=0, size=SURGICAL_VIDEO_SIZE, duration_s=(3.0, 4.0)
    )
    extracted = extract_dataset_frames(root, frames, "cholec80", fps=5, workers=2, progress=False)
    return SimpleNamespace(base=base, root=root, frames=frames, extracted=extracted)

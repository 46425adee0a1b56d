"""Mistakes that used to end in a traceback or a weak message, each now one ``error: ...`` line naming the
key or file (issue 25): impossible optimiser settings and loss weights, an image size beyond memory,
empty checkpoints and feature files, an ``--out`` folder that is a file, a mask not named ``.nii``, a
network option of the wrong type, a case listed twice, a full disk while writing frames, and no
``weights_only`` notice when SIGTERM writes ``last.ckpt``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import QUIET, TINY, one_line_exit
from test_reliability_data import write_video

import distill.utils
from distill.errors import DataError
from distill.formats.features import load_video_features
from distill.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "experiments/prostate/student_baseline.yaml"
STUDENT_KD = REPO / "experiments/prostate/student_kd.yaml"


def fit_args(config: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(config), f"--data.init_args.data_root={data_root}",
        f"--trainer.default_root_dir={out}", *TINY, *QUIET, "--trainer.limit_val_batches=1", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------ hyper-parameters, at construction
@pytest.mark.parametrize(
    "option, expected",
    [
        (
            "--model.init_args.optimizer.init_args.lr=-0.1",
            "SegmentationModule: optimizer refuses its settings (model.init_args.optimizer.init_args): "
            "Invalid learning rate: -0.1",
        ),
        (
            "--model.init_args.optimizer.init_args.weight_decay=-0.01",
            "SegmentationModule: optimizer refuses its settings (model.init_args.optimizer.init_args): "
            "Invalid weight_decay value: -0.01",
        ),
        (
            "--model.init_args.optimizer.init_args.betas=[0.9, 1.5]",
            "SegmentationModule: optimizer refuses its settings (model.init_args.optimizer.init_args): "
            "Invalid beta parameter at index 1: 1.5",
        ),
        (
            "--model.init_args.optimizer.init_args.lr=0",
            "SegmentationModule: optimizer lr is 0, so nothing would be trained; set optimizer.init_args.lr > 0",
        ),
        (
            "--model.init_args.loss_weights={dice: 0, lovasz: 0}",
            "SegmentationModule: every loss weight is 0 ({'dice': 0.0, 'lovasz': 0.0}), so nothing would be "
            "trained; give at least one term of loss_weights a weight > 0",
        ),
    ],
)
def test_impossible_training_settings_are_refused_before_any_data_is_read(tmp_path, monkeypatch, option, expected):
    import data_modules.prostate as prostate

    monkeypatch.setattr(prostate, "discover_cases", lambda *a, **k: pytest.fail("data read before the check"))
    assert one_line_exit(fit_args(STUDENT, tmp_path / "no-data", tmp_path / "run", option)) == f"error: {expected}"


def test_moco_momentum_above_one_is_refused_by_the_parser():
    message = one_line_exit(
        ["fit", "--config", str(REPO / "experiments/surgical/moco.yaml"), "--model.init_args.momentum=1.5"]
    )
    assert 'Parser key "momentum"' in message and "ClosedUnitInterval" in message


# ------------------------------------------------------------------ sizes that would not fit in memory
def test_an_image_size_beyond_memory_is_refused_from_the_headers_before_loading(
    synthetic_prostate_root, tmp_path, monkeypatch
):
    import data_modules.volumes as volumes

    images = [min((synthetic_prostate_root / site).glob("Case??.nii.gz")) for site in ("RUNMC", "BMC", "UCL")]
    keys = [f"{image.parent.name}/{image.name.split('.')[0]}" for image in images]
    case_list = tmp_path / "cases.yaml"
    case_list.write_text(f"train: [{keys[0]}, {keys[1]}]\nval: [{keys[2]}]\ntest: []\n")
    slices = sum(nib.load(image).shape[2] for image in images)
    monkeypatch.setattr(distill.utils, "available_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(volumes, "read_case", lambda *a, **k: pytest.fail("a volume was read before the check"))
    size = 100_000
    message = one_line_exit(
        fit_args(
            STUDENT, synthetic_prostate_root, tmp_path / "run", "--data.init_args.split=case_list",
            f"--data.init_args.case_list={case_list}", f"--data.init_args.image_size={size}",
        )
    )  # fmt: skip
    gigabytes = slices * size**2 * (4 + 1) / 1e9  # float32 image + uint8 mask per pixel
    assert message == (
        f"error: image_size={size}: the train and val volumes (3 cases, {slices} slices at {size}x{size}) would take "
        f"{gigabytes:.1f} GB of memory, more than the 16.0 GB available; lower data.init_args.image_size"
    )


def test_profile_input_beyond_memory_is_refused_before_building(monkeypatch):
    monkeypatch.setattr(distill.utils, "available_memory", lambda: 16 * 10**9)
    assert one_line_exit(["profile", "slim_unet", "--size", "100000"]) == (
        "error: --size 100000: a 1x3x100000x100000 float32 input would take 120.0 GB of memory, more than the "
        "16.0 GB available; lower --size or --batch"
    )


# ------------------------------------------------------------------ empty and truncated files
def test_an_empty_teacher_checkpoint_is_one_line(synthetic_prostate_root, tmp_path):
    empty = tmp_path / "teacher.ckpt"
    empty.write_bytes(b"")
    message = one_line_exit(
        fit_args(STUDENT_KD, synthetic_prostate_root, tmp_path / "run", f"--model.init_args.teacher_checkpoint={empty}")
    )
    assert (
        message
        == f"error: {empty}: empty file (0 bytes), not a checkpoint: its writing was interrupted or the copy failed"
    )


def test_empty_backbone_weights_and_feature_files_are_one_line(tmp_path):
    weights = tmp_path / "resnet.pth"
    weights.write_bytes(b"")
    with pytest.raises(DataError) as error:
        build_backbone("resnet18", weights=str(weights))
    assert str(error.value) == f"weights file {weights} is empty (0 bytes): its download or copy was interrupted"
    np.save(tmp_path / "video01.npy", np.zeros((4, 8), dtype=np.float32))
    (tmp_path / "video01_frames.npy").write_bytes(b"")
    with pytest.raises(DataError) as error:
        load_video_features(tmp_path, "video01")
    assert str(error.value) == (
        f"{tmp_path / 'video01_frames.npy'}: unreadable feature file, empty, truncated or not .npy "
        "(No data left in file); write it again"
    )


# ------------------------------------------------------------------ output paths
FOLDER_COMMANDS = [
    ["table", str(REPO / "experiments/prostate/tables/demo.yaml")],
    ["teachers", str(REPO / "experiments/prostate/teachers/by_site.yaml")],
    ["sweep", str(REPO / "experiments/prostate/sweeps/student_kd.yaml")],
    ["demo", "prostate"],
    ["data", "synth-prostate"],
    ["data", "synth-surgical"],
    ["data", "extract-frames", "--root", "videos", "--dataset", "unlabeled"],
]


@pytest.mark.parametrize(
    "command", FOLDER_COMMANDS, ids=lambda command: command[1] if command[0] == "data" else command[0]
)
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(tmp_path, command):
    blocker = tmp_path / "results.txt"
    blocker.write_text("user data")
    assert one_line_exit([*command, "--out", str(blocker)]) == (
        f"error: {blocker}: --out is a file, not a folder (it names the folder to write into); choose another path"
    )
    inside = blocker / "run"
    assert one_line_exit([*command, "--out", str(inside)]) == (
        f"error: {inside}: --out lies under {blocker}, which is a file; choose another path"
    )
    assert blocker.read_text() == "user data"


@pytest.mark.parametrize("name", ["mask.txt", "mask.nii.gz.tmp", "mask"])
def test_segment_nifti_refuses_a_mask_name_that_is_not_nifti_before_loading(tmp_path, name):
    out = tmp_path / name
    assert one_line_exit(["segment-nifti", str(tmp_path / "none.onnx"), str(tmp_path / "none.nii.gz"), str(out)]) == (
        f"error: {out}: the mask is written as NIfTI; name it .nii.gz (or .nii)"
    )


# ------------------------------------------------------------------ weak messages made useful
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("slim_unet:width=abc", "network 'slim_unet': network_kwargs.width must be an integer >= 1, got 'abc'"),
        ("slim_unet:width=2.5", "network 'slim_unet': network_kwargs.width must be an integer >= 1, got 2.5"),
        ("unet:dropout=1", "network 'unet': network_kwargs.dropout must be a number in [0, 1), got 1"),
        (
            "mobile_unet:encoder=nope",
            "network 'mobile_unet': cannot build it with network_kwargs {'encoder': 'nope'} (Unknown model (nope))",
        ),
    ],
)
def test_profile_network_options_of_the_wrong_type_name_the_option(spec, expected):
    assert one_line_exit(["profile", spec, "--size", "32"]) == f"error: {expected}"


@pytest.mark.parametrize(
    "lists, expected",
    [
        ("train: [RUNMC/Case00, RUNMC/Case00]\nval: [BMC/Case00]", "case 'RUNMC/Case00' is listed twice in train"),
        ("train: [RUNMC/Case00]\nval: [BMC/Case00, RUNMC/Case00]", "case 'RUNMC/Case00' is in both train and val"),
    ],
)
def test_a_case_listed_twice_says_so(synthetic_prostate_root, tmp_path, lists, expected):
    case_list = tmp_path / "cases.yaml"
    case_list.write_text(lists + "\n")
    message = one_line_exit(
        fit_args(
            STUDENT, synthetic_prostate_root, tmp_path / "run", "--data.init_args.split=case_list",
            f"--data.init_args.case_list={case_list}",
        )
    )  # fmt: skip
    assert message == f"error: {case_list}: {expected}"


def test_a_full_disk_while_writing_frames_names_the_folder_and_stops(tmp_path, monkeypatch):
    """OpenCV's imwrite only returns False; under 1 MiB free (faked: 0 bytes) tells a full disk. The first
    video's partial frames are removed and the second video is not tried."""
    import cv2

    videos, out = tmp_path / "videos", tmp_path / "frames"
    for name in ("a", "b"):
        write_video(videos / f"{name}.mp4", 25, 10)
    written = []
    monkeypatch.setattr(cv2, "imwrite", lambda path, image: written.append(path) or len(written) < 3)
    monkeypatch.setattr(distill.utils.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 0})())
    argv = ["data", "extract-frames", "--root", str(videos), "--out", str(out), "--dataset", "unlabeled"]
    assert one_line_exit([*argv, "--fps", "25", "--workers", "1"]) == (
        f"error: {out}: disk full while writing the frames of a; its partial frames were removed and finished videos "
        "kept (free space, then rerun: they are skipped)"
    )
    assert len(written) == 3 and all(Path(path).parent.name == "a" for path in written)
    assert not (out / "a").exists() and not (out / "b").exists()


def test_sigterm_writes_last_ckpt_without_the_weights_only_notice(synthetic_prostate_root, tmp_path):
    config = yaml.safe_load(STUDENT.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "kill_callback.KillAtStep", "init_args": {"step": 1, "signal_name": "SIGTERM"}}
    )
    killed = tmp_path / "student_sigterm.yaml"
    killed.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", *fit_args(killed, synthetic_prostate_root, tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: fit: interrupted by SIGTERM at epoch 0, step 1")
    assert "weights_only" not in done.stderr + done.stdout

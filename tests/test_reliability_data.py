"""Bad data refused in one line naming the file (issue 17, data readers and formats).

Output names that would leave their folder, two files claiming one prostate case, empty masks,
mask and image on different grids, a case list without val, phase files out of order, the
video's own frame rate, oversized NIfTI headers, and ``num_slices`` against ``in_channels``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from data_modules.frames import COMPLETION_MARKER
from data_modules.layouts import discover_cases
from data_modules.prostate import ProstateDataModule
from data_modules.surgical import SurgicalPhaseDataModule, SurgicalSSLDataModule
from data_modules.surgical_layout import extract_dataset_frames
from data_modules.volumes import read_case
from distill.cli import main
from distill.errors import DataError
from distill.formats import nifti as nifti_format
from distill.formats.features import save_video_features
from distill.formats.phases import read_phase_file, write_phase_file
from distill.metrics.phase_files import evaluate_phase_dirs
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_dice_hd95
from distill.utils import child_path

REPO = Path(__file__).resolve().parents[1]


def one_line(error: pytest.ExceptionInfo, *paths: Path) -> str:
    message = str(error.value)
    assert "\n" not in message
    for path in paths:
        assert str(path) in message
    return message


def write_video(path: Path, fps: float, num_frames: int, size: tuple[int, int] = (48, 64)) -> Path:
    """A real mp4 (OpenCV, mp4v) at ``fps``: frame k is a grey level that grows with k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size[1], size[0]))
    for k in range(num_frames):
        writer.write(np.full((*size, 3), 20 + 10 * k, dtype=np.uint8))
    writer.release()
    return path


def frame_names(folder: Path) -> list[int]:
    return sorted(int(p.stem) for p in folder.glob("*.jpg"))


# ---------------------------------------------------------------------------------------------
# 1. Output paths built from names stay inside their folder


@pytest.mark.parametrize("name", ["..", ".", "", ".hidden", "a/b", "../x", "a\\b", "a\0b"])
def test_child_path_refuses_names_that_leave_or_hide_in_the_folder(tmp_path, name):
    with pytest.raises(DataError, match="cannot name an output in") as error:
        child_path(tmp_path, name, "source.mp4")
    assert one_line(error).startswith("source.mp4: ")
    assert child_path(tmp_path, "video01") == tmp_path / "video01"


def test_extract_frames_refuses_a_video_whose_stem_leaves_the_output_folder(tmp_path):
    root, parent = tmp_path / "videos", tmp_path / "parent"
    write_video(root / "...mp4", 25, 5)
    out = parent / "frames"
    (parent / "keep.txt").parent.mkdir()
    (parent / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "extract-frames", "--root", str(root), "--out", str(out), "--dataset", "unlabeled"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {root / '...mp4'}: the name '..' cannot name an output in {out}")
    assert "\n" not in message
    assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]  # nothing written, nothing removed


def test_feature_files_refuse_a_video_name_that_leaves_the_folder(tmp_path):
    with pytest.raises(DataError, match="the name '../x.npy' cannot name an output"):
        save_video_features(tmp_path / "features", "../x", np.zeros((2, 3), np.float32), np.arange(2))
    assert not (tmp_path / "x.npy").exists()


# ---------------------------------------------------------------------------------------------
# 2. Two files claiming one case


@pytest.mark.parametrize(
    "first, second, what",
    [
        ("Case01.nii", "Case01.nii.gz", "image"),
        ("Case1.nii.gz", "Case01.nii.gz", "image"),
        ("Case01_Segmentation.nii.gz", "Case01_segmentation.nii.gz", "mask"),
        ("Case01_segmentation.nii", "Case01_segmentation.nii.gz", "mask"),
    ],
)
def test_two_files_claiming_one_case_are_refused(tmp_path, first, second, what):
    site = tmp_path / "RUNMC"
    site.mkdir()
    for name in ("Case01.nii.gz", "Case01_segmentation.nii.gz", first, second):
        (site / name).write_bytes(b"")
    with pytest.raises(DataError, match=f"two files claim the {what} of case RUNMC/Case0?1; keep one") as error:
        discover_cases(tmp_path)
    one_line(error, site / first, site / second)


# ---------------------------------------------------------------------------------------------
# 3. Empty masks: MONAI's conventions, reported


def test_empty_masks_follow_monai_conventions():
    empty = torch.zeros(4, 6, 5, dtype=torch.int64)
    gland = empty.clone()
    gland[1:3, 2:4, 1:4] = 1
    spacing = (3.0, 0.5, 0.5)
    diagonal = math.sqrt(12.0**2 + 3.0**2 + 2.5**2)
    dice, hd95 = volume_dice_hd95(empty, empty, spacing)
    assert dice == 1.0 and math.isnan(hd95)  # DiceMetric(ignore_empty=False); HD95 undefined, as MONAI
    assert volume_dice_hd95(empty, gland, spacing) == (0.0, pytest.approx(diagonal))  # a missed gland
    assert volume_dice_hd95(gland, empty, spacing) == (0.0, pytest.approx(diagonal))  # a false alarm
    assert volume_dice_hd95(gland, gland, spacing) == (1.0, 0.0)

    metric = PerGroupVolumeMetrics(["RUNMC"])
    metric.update(*volume_dice_hd95(empty, empty, spacing), "RUNMC", "a", empty_label=True)
    metric.update(*volume_dice_hd95(gland, gland, spacing), "RUNMC", "b")
    results = metric.compute()
    assert results["dice"] == 1.0 and results["hd95"] == 0.0  # the undefined HD95 is left out of the mean
    volumes = metric.per_volume()
    assert sorted(volumes["empty_label"].tolist()) == [False, True]


@pytest.fixture
def runmc(synthetic_prostate_root, tmp_path) -> Path:
    """A writable copy of the synthetic RUNMC site."""
    return Path(shutil.copytree(synthetic_prostate_root / "RUNMC", tmp_path / "prostate" / "RUNMC"))


def rewrite_nifti(path: Path, data=None, affine=None) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


def test_an_empty_mask_is_reported_when_it_is_read(runmc):
    case = discover_cases(runmc.parent)[0]
    rewrite_nifti(case.mask_path, data=np.zeros(nib.load(case.mask_path).shape, np.uint8))
    with pytest.warns(UserWarning, match=f"{case.mask_path}: empty mask"):
        _, mask, _, _ = read_case(case)
    assert not mask.any()


# ---------------------------------------------------------------------------------------------
# 4. Mask and image on different grids


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda affine: affine @ np.diag([1.0, 1.0, 1.5, 1.0]), "voxel spacing .* mm differs from .* mm of its image"),
        (lambda affine: affine + np.pad(np.ones((3, 1)), ((0, 1), (3, 0))), "affine differs from that of its image"),
    ],
    ids=["spacing", "affine"],
)
def test_a_mask_on_another_grid_than_its_image_is_refused(runmc, change, message):
    case = discover_cases(runmc.parent)[0]
    rewrite_nifti(case.mask_path, affine=change(nib.load(case.image_path).affine))
    with pytest.raises(DataError, match=message) as error:
        read_case(case)
    one_line(error, case.mask_path, case.image_path)


# ---------------------------------------------------------------------------------------------
# 5. A case list without val


def test_fitting_on_a_case_list_without_val_is_refused(runmc, tmp_path):
    case_list = tmp_path / "cases.yaml"
    case_list.write_text("train: [RUNMC/Case00]\ntest: [RUNMC/Case01]\n")
    data = ProstateDataModule(str(runmc.parent), split="case_list", case_list=str(case_list), num_workers=0)
    with pytest.raises(DataError, match="the case list has no val cases; fitting needs them") as error:
        data.setup("fit")
    one_line(error, case_list)
    data.setup("test")  # evaluating on it is fine


# ---------------------------------------------------------------------------------------------
# 6. Phase files out of order: every reader refuses them alike


@pytest.mark.parametrize(
    "frames, expected", [([0, 2, 1, 3], "frame 1 out of order after frame 2"), ([0, 1, 1, 2], "frame 1 repeated")]
)
def test_phase_lines_out_of_order_are_refused_by_every_reader(tmp_path, frames, expected):
    root = tmp_path / "cholec80"
    for video in ("video01", "video02"):
        (root / "videos").mkdir(parents=True, exist_ok=True)
        (root / "videos" / f"{video}.mp4").write_bytes(b"")  # never opened: the annotation is read first
        (root / "phase_annotations").mkdir(exist_ok=True)
        write_phase_file(root / "phase_annotations" / f"{video}-phase.txt", np.arange(4), np.zeros(4, np.int64))
    bad = root / "phase_annotations" / "video01-phase.txt"
    write_phase_file(bad, np.array(frames), np.zeros(4, np.int64))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for video in ("video01", "video02"):
        write_phase_file(predictions / f"{video}-pred.txt", np.arange(4), np.zeros(4, np.int64))
    messages = set()
    for read in (
        lambda: read_phase_file(bad),
        lambda: evaluate_phase_dirs(root / "phase_annotations", predictions),
        lambda: extract_dataset_frames(root, tmp_path / "frames", progress=False),
        lambda: SurgicalPhaseDataModule(
            tmp_path / "frames", root, split={"train": ["video01"], "test": ["video02"]}, val_fraction=0
        ).setup("fit"),
    ):
        with pytest.raises(DataError, match=expected) as error:
            read()
        messages.add(one_line(error, bad))
    assert len(messages) == 1
    assert not (tmp_path / "frames").exists()


# ---------------------------------------------------------------------------------------------
# 7. The video's own frame rate


def test_an_unlabelled_10fps_video_is_sampled_by_its_own_time(tmp_path):
    root = tmp_path / "custom"
    write_video(root / "clip.mp4", 10, 20)  # 2 s
    assert cv2.VideoCapture(str(root / "clip.mp4")).get(cv2.CAP_PROP_FPS) == 10
    extract_dataset_frames(root, tmp_path / "at5", "unlabeled", fps=5, workers=1, progress=False)
    assert frame_names(tmp_path / "at5" / "clip") == list(range(0, 50, 5))  # one frame per 0.2 s, 25 fps names
    marker = json.loads((tmp_path / "at5" / "clip" / COMPLETION_MARKER).read_text())
    assert (marker["video_fps"], marker["decoded_frames"], marker["written_frames"]) == (10, 20, 10)
    # Asked for more than it has, it gives each of its frames once, named by its time.
    extract_dataset_frames(root, tmp_path / "at25", "unlabeled", fps=25, workers=1, progress=False)
    assert frame_names(tmp_path / "at25" / "clip") == [math.floor(2.5 * k) for k in range(20)]
    data = SurgicalSSLDataModule(tmp_path / "at5", dataset="unlabeled", fps=1, num_workers=0)
    data.setup("fit")
    assert data.sets["train"].index.frames.tolist() == [0, 25]


def test_an_annotated_video_that_is_not_25fps_is_refused(tmp_path):
    root = tmp_path / "cholec80"
    video = write_video(root / "videos" / "video01.mp4", 10, 20)
    annotation = root / "phase_annotations" / "video01-phase.txt"
    annotation.parent.mkdir()
    write_phase_file(annotation, np.arange(50), np.zeros(50, np.int64))
    with pytest.raises(DataError, match="10 fps, but .* numbers 25 fps frames; re-encode it at 25 fps") as error:
        extract_dataset_frames(root, tmp_path / "frames", fps=5, workers=1, progress=False)
    one_line(error, video, annotation)
    assert not (tmp_path / "frames" / "video01").exists()


# ---------------------------------------------------------------------------------------------
# 8. A NIfTI header claiming a huge volume


def test_a_huge_nifti_header_is_refused_before_allocating(tmp_path, monkeypatch):
    path = tmp_path / "Case00.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    path.write_bytes(header.binaryblock + b"\0" * 4)  # the header alone, no voxels
    with pytest.raises(DataError, match=r"header claims 4000x4000x4000 = 64000000000 voxels, more than") as error:
        nifti_format.read_nifti(path)
    one_line(error, path)
    from distill.infer_onnx import read_volume  # segment-nifti reads through it too

    with pytest.raises(DataError, match="header claims 4000x4000x4000"):
        read_volume(path)
    small = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), small)
    assert nifti_format.read_nifti(small)[0].shape == (4, 4, 4)
    monkeypatch.setattr(nifti_format, "MAX_NIFTI_VOXELS", 63)  # the cap is a setting
    with pytest.raises(DataError, match="4x4x4 = 64 voxels, more than MAX_NIFTI_VOXELS = 63"):
        nifti_format.read_nifti(small)


# ---------------------------------------------------------------------------------------------
# 9. num_slices against in_channels


def test_an_in_channels_other_than_the_datas_is_refused_before_training(synthetic_prostate_root, tmp_path):
    """The data states its channels x slices and the CLI links them into the model; a config that
    sets another value is told so, not given a network it did not ask for."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments/prostate/teacher.yaml"),
                f"--data.init_args.data_root={synthetic_prostate_root}",
                "--data.init_args.sites=[RUNMC]",
                "--data.init_args.image_size=32",
                "--data.init_args.num_workers=0",
                "--data.init_args.load_threads=1",
                "--model.init_args.network_kwargs.width=4",
                "--model.init_args.in_channels=5",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert str(exit_info.value.code) == (
        "error: model.init_args.in_channels=5: the data states 3; leave it out, distill links it from the data"
    )

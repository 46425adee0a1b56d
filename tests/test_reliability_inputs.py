"""Inputs that were accepted without a word (issue 25): each is now one line naming the file, a
refusal where the result would be wrong, a warning where it is right but the user should know.

Prostate readers (4D images and extra channel files, constant images, masks without images, odd
file names, one image in two cases, nnU-Net images without labels, label classes no mask holds,
fitting without validation cases), surgical readers (annotations without videos, ``--out`` inside
the video folder, annotated videos without frames, predictions without ground truth, fitting
without validation videos), the teacher manifest and the limit-trained teachers spec.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import TINY

from data_modules.layouts import datalist_cases, discover_cases, nnunet_cases
from data_modules.prostate import ProstateDataModule
from data_modules.surgical import PhaseFeatureDataModule, SurgicalPhaseDataModule, SurgicalSSLDataModule
from distill.cli import main
from distill.errors import DataError
from distill.formats.features import save_video_features
from distill.formats.phases import write_phase_file
from distill.limit_trained import load_teachers_spec, teacher_subsets
from distill.modules.checkpoints import file_sha256
from distill.modules.teacher_records import read_teacher_manifest
from distill.modules.teacher_runtime import FrozenTeachers

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 6)  # (X, Y, Z) of the tiny volumes


def exit_line(argv: list[str]) -> str:
    """The one line a failing command prints (it exits with status 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message  # a string exit code: status 1
    return message


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def zonal_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:12, 4:12, 1:5] = 1
    mask[6:10, 6:10, 2:4] = 2
    return mask


def tiny_site(root: Path, cases: int = 3, site: str = "RUNMC") -> Path:
    """``root/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz``: noise images, zonal masks."""
    for number in range(cases):
        image = np.random.default_rng(number).normal(100, 20, SHAPE).astype(np.float32)
        write_nifti(root / site / f"Case{number:02d}.nii.gz", image)
        write_nifti(root / site / f"Case{number:02d}_segmentation.nii.gz", zonal_mask())
    return root


def module(root: Path, **kwargs) -> ProstateDataModule:
    options = {"image_size": 16, "num_workers": 0, "load_threads": 1, "augment": False} | kwargs
    return ProstateDataModule(str(root), **options)


def fit_teacher(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "experiments/prostate/teacher.yaml"),
        *TINY,
        f"--data.init_args.data_root={root}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# Prostate: images and their channels


def test_a_4d_image_in_the_sites_layout_is_refused_not_cut_to_its_first_volume(tmp_path):
    root = tiny_site(tmp_path / "data")
    image = root / "RUNMC" / "Case00.nii.gz"
    write_nifti(image, np.random.default_rng(0).normal(100, 20, (*SHAPE, 2)).astype(np.float32))
    assert exit_line(fit_teacher(root, tmp_path)) == (
        f"error: {image}: 4D image of 2 volumes, but data.init_args.channels=1 would read only the first 1; "
        "set data.init_args.channels=2 if they are channels (e.g. T2 + ADC), or keep one volume per file"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_datalist_entry_with_more_channel_files_than_read_is_refused(tmp_path):
    root = tiny_site(tmp_path / "data")
    entry = {"image": ["RUNMC/Case00.nii.gz", "RUNMC/Case01.nii.gz"], "label": "RUNMC/Case00_segmentation.nii.gz"}
    (root / "dataset.json").write_text(json.dumps({"training": [entry | {"case": "both"}]}))
    data = module(root, layout="datalist", predict_split="all")
    with pytest.raises(DataError) as error:
        data.setup("predict")
    assert str(error.value) == (
        f"{root / 'RUNMC/Case00.nii.gz'}: case data/both of 2 channel files, but data.init_args.channels=1 would "
        "read only the first 1; set data.init_args.channels=2 if they are channels (e.g. T2 + ADC), "
        "or keep one volume per file"
    )
    module(root, layout="datalist", predict_split="all", channels=2).setup("predict")  # both read: accepted


@pytest.mark.parametrize("normalization", ["zscore", "percentile"])
def test_a_constant_image_is_refused_naming_the_file(tmp_path, normalization):
    root = tiny_site(tmp_path / "data")
    image = write_nifti(root / "RUNMC" / "Case01.nii.gz", np.full(SHAPE, 7.0, np.float32))
    with pytest.raises(DataError) as error:
        module(root, normalization=normalization, predict_split="all").setup("predict")
    assert str(error.value) == f"{image}: constant image (every voxel 7): no anatomy to segment or normalise"


def test_a_constant_second_channel_is_refused_naming_its_file(tmp_path):
    root = tiny_site(tmp_path / "data")
    flat = write_nifti(root / "RUNMC" / "flat.nii.gz", np.zeros(SHAPE, np.float32))
    entry = {"image": ["RUNMC/Case00.nii.gz", "RUNMC/flat.nii.gz"], "label": "RUNMC/Case00_segmentation.nii.gz"}
    (root / "dataset.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(DataError) as error:
        module(root, layout="datalist", channels=2, predict_split="all").setup("predict")
    assert str(error.value) == f"{flat}: constant image (every voxel 0): no anatomy to segment or normalise"


def test_an_image_that_percentiles_cannot_scale_is_refused(tmp_path):
    root = tiny_site(tmp_path / "data")
    mostly_zero = np.zeros(SHAPE, np.float32)
    mostly_zero[8, 8, 3] = 100.0  # one bright voxel: the 1st and 99th percentiles are both 0
    image = write_nifti(root / "RUNMC" / "Case02.nii.gz", mostly_zero)
    with pytest.raises(DataError) as error:
        module(root, normalization="percentile", predict_split="all").setup("predict")
    assert str(error.value) == (
        f"{image}: 1st and 99th intensity percentiles are equal (0); percentile normalisation cannot scale it "
        "(use normalization: zscore)"
    )
    module(root, normalization="zscore", predict_split="all").setup("predict")  # z-score scales it


# ---------------------------------------------------------------------------------------------
# Prostate: which files make the cases


def test_a_mask_without_its_image_is_refused(tmp_path):
    root = tiny_site(tmp_path / "data")
    (root / "RUNMC" / "Case01.nii.gz").unlink()
    mask = root / "RUNMC" / "Case01_segmentation.nii.gz"
    assert exit_line(fit_teacher(root, tmp_path)) == (
        f"error: {mask}: mask of case RUNMC/Case01 without its image (Case01.nii.gz not found)"
    )


def test_nifti_files_with_other_names_in_a_site_folder_are_reported(tmp_path):
    root = tiny_site(tmp_path / "data")
    shutil.copy(root / "RUNMC" / "Case00.nii.gz", root / "RUNMC" / "case03.nii.gz")
    with pytest.warns(UserWarning) as caught:
        cases = discover_cases(root)
    assert [str(w.message) for w in caught] == [
        f"{root / 'RUNMC'}: 1 NIfTI file(s) not named CaseXX.nii.gz or CaseXX_segmentation.nii.gz left unread "
        "(case03.nii.gz)"
    ]
    assert [case.key for case in cases] == ["RUNMC/Case00", "RUNMC/Case01", "RUNMC/Case02"]


def test_one_image_listed_as_two_cases_is_refused(tmp_path):
    root = tiny_site(tmp_path / "data")
    entry = {"image": "RUNMC/Case00.nii.gz", "label": "RUNMC/Case00_segmentation.nii.gz"}
    spec = {"training": [entry | {"case": "a"}], "test": [entry | {"case": "b"}]}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError) as error:
        datalist_cases(root / "dataset.json")
    assert str(error.value) == (
        f"{root / 'dataset.json'}: {root / 'RUNMC/Case00.nii.gz'} is the image of both case data/a and case data/b; "
        "list each image once"
    )


def test_an_nnunet_image_without_its_label_is_refused(tmp_path):
    root = tmp_path / "Dataset001_Prostate"
    spec = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "gland": 1}, "file_ending": ".nii.gz"}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(spec))
    for case in ("prostate_00", "prostate_01"):
        write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.ones(SHAPE, np.float32))
    write_nifti(root / "labelsTr" / "prostate_00.nii.gz", zonal_mask())
    with pytest.raises(DataError) as error:
        nnunet_cases(root)
    assert str(error.value) == (
        f"{root / 'imagesTr/prostate_01_0000.nii.gz'}: no label file labelsTr/prostate_01.nii.gz (every imagesTr "
        "case needs one; unlabelled images go in a folder of unlabeled_images)"
    )


# ---------------------------------------------------------------------------------------------
# Prostate: labels and splits at set-up


def test_a_label_class_that_no_mask_holds_is_refused_at_setup(tmp_path):
    root = tiny_site(tmp_path / "data", cases=4)
    data = module(root, labels={"PZ": 1, "TZ": 2, "lesion": [3, 4]}, val_fraction=0.25, test_fraction=0.25)
    masks = [str(root / "RUNMC" / f"{case.case}_segmentation.nii.gz") for case in data.case_splits["train"]]
    with pytest.raises(DataError) as error:
        data.setup("fit")
    assert str(error.value) == (
        f"labels: class 'lesion' (mask value 3 or 4) occurs in none of the 2 training masks read ({', '.join(masks)})"
    )
    module(root, labels={"PZ": 1, "TZ": 2}, val_fraction=0.25, test_fraction=0.25).setup("fit")


def test_whole_gland_training_masks_that_are_all_empty_are_refused(tmp_path):
    root = tiny_site(tmp_path / "data", cases=3)
    for number in range(3):
        write_nifti(root / "RUNMC" / f"Case{number:02d}_segmentation.nii.gz", np.zeros(SHAPE, np.uint8))
    data = module(root)
    (train,) = data.case_splits["train"]
    with pytest.warns(UserWarning, match="empty mask"), pytest.raises(DataError) as error:
        data.setup("fit")
    assert str(error.value) == (
        f"labels: class 'gland' (mask value 1 or 2) occurs in none of the 1 training masks read ({train.mask_path})"
    )


def test_fitting_a_split_without_validation_cases_is_refused(tmp_path):
    root = tiny_site(tmp_path / "data", cases=2)  # a site of 2 cases: 1 train, 1 test, no val
    assert exit_line(fit_teacher(root, tmp_path)) == (
        f"error: {root}: split=per_site gives no val cases (train 1, val 0, test 1); "
        "fitting needs them (validation chooses best.ckpt): read more cases or change the split"
    )
    module(root).setup("test")  # evaluating on it is fine


# ---------------------------------------------------------------------------------------------
# Surgical: extraction


def write_video(path: Path, num_frames: int, size: tuple[int, int] = (32, 40)) -> Path:
    """A real 25 fps mp4 (OpenCV, mp4v) of ``num_frames`` grey frames."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size[1], size[0]))
    for k in range(num_frames):
        writer.write(np.full((*size, 3), 40 + 5 * k, dtype=np.uint8))
    writer.release()
    return path


def tiny_cholec80(root: Path, videos: int, frames: int = 10) -> Path:
    """``videos`` annotated 25 fps videos of ``frames`` frames, phases 0 then 1."""
    for number in range(1, videos + 1):
        write_video(root / "videos" / f"video{number:02d}.mp4", frames)
        labels = (np.arange(frames) >= frames // 2).astype(np.int64)
        (root / "phase_annotations").mkdir(parents=True, exist_ok=True)
        write_phase_file(root / "phase_annotations" / f"video{number:02d}-phase.txt", np.arange(frames), labels)
    return root


def extract(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "extract-frames", "--root", str(root), "--out", str(out), "--fps", "5", "--workers", "1", *extra]


def test_an_annotation_without_its_video_is_reported_and_the_others_extracted(tmp_path, capsys):
    root = tiny_cholec80(tmp_path / "cholec80", videos=4)
    (root / "videos" / "video03.mp4").unlink()
    main(extract(root, tmp_path / "frames"))
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {root}: 1 phase annotation(s) without their video left out "
        f"({root / 'phase_annotations/video03-phase.txt'}); extracting 3 of 4 annotated videos"
    ]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["video01", "video02", "video04"]
    # Training on the tree then names the video that has no frames, not a frame file.
    data = SurgicalPhaseDataModule(tmp_path / "frames", root, fps=5, num_workers=0, split={"train": ["video03"]})
    with pytest.raises(DataError) as error:
        data.setup("fit")
    assert str(error.value) == (
        f"{tmp_path / 'frames/video03'}: no frame folder for the annotated video video03 "
        f"({root / 'phase_annotations/video03-phase.txt'}); extract its frames, or move its annotation out of the dataset"
    )


@pytest.mark.parametrize("dataset", ["cholec80", "unlabeled"])
def test_extracting_into_the_video_folder_is_refused_before_writing(tmp_path, dataset):
    root = tiny_cholec80(tmp_path / "cholec80", videos=1)
    videos = root / "videos" if dataset == "cholec80" else root
    out = videos / "frames"
    before = sorted(root.rglob("*"))
    assert exit_line(extract(root, out, "--dataset", dataset)) == (
        f"error: {out}: inside the video folder {videos}; extract frames to a folder outside it "
        "(frame folders would mix with the videos, and a re-run removes the frame files it finds)"
    )
    assert sorted(root.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# Surgical: splits and frames at set-up


@pytest.fixture
def two_videos(tmp_path) -> tuple[Path, Path]:
    """Two annotated videos and their frames at 5 fps."""
    root = tiny_cholec80(tmp_path / "cholec80", videos=2)
    main(extract(root, tmp_path / "frames"))
    return root, tmp_path / "frames"


def test_a_moco_split_scaled_to_no_validation_videos_is_refused(two_videos, tmp_path):
    root, frames = two_videos
    argv = [
        "fit",
        "--config",
        str(REPO / "experiments/surgical/moco.yaml"),
        f"--data.init_args.data_root={root}",
        f"--data.init_args.frames_dir={frames}",
        "--data.init_args.fps=5",
        "--data.init_args.num_workers=0",
        "--model.init_args.backbone=resnet18",
        "--trainer.precision=32",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    assert exit_line(argv) == (
        f"error: {root}: split='paper' gives no validation videos (train 1, val 0, test 1; val_fraction=0.2); "
        "fitting needs them (validation chooses best.ckpt): add videos, raise val_fraction or give the split a val part"
    )
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_phase_and_feature_modules_refuse_fitting_without_validation(two_videos, tmp_path):
    root, frames = two_videos
    for video in ("video01", "video02"):
        save_video_features(tmp_path / "features", video, np.zeros((2, 4), np.float32), np.array([0, 5]))
    split = {"train": ["video01"], "test": ["video02"]}
    expected = (
        f"{root}: split={split!r} gives no validation videos (train 1, val 0, test 1; val_fraction=0.2); "
        "fitting needs them (validation chooses best.ckpt): add videos, raise val_fraction or give the split a val part"
    )
    for data in (
        SurgicalPhaseDataModule(frames, root, split=split, fps=5, num_workers=0),
        SurgicalSSLDataModule(frames, root, split=split, fps=5, num_workers=0),
        PhaseFeatureDataModule(tmp_path / "features", root, split=split, num_workers=0),
    ):
        with pytest.raises(DataError) as error:
            data.setup("fit")
        assert str(error.value) == expected
        data.setup("test")  # evaluation is fine


# ---------------------------------------------------------------------------------------------
# evaluate-phases


def phase_folders(tmp_path: Path, gt: list[str], pred: list[str]) -> tuple[Path, Path]:
    for folder, videos, suffix in ((tmp_path / "gt", gt, "-phase"), (tmp_path / "pred", pred, "-pred")):
        folder.mkdir()
        for video in videos:
            write_phase_file(folder / f"{video}{suffix}.txt", np.arange(0, 50, 5), np.zeros(10, np.int64))
    return tmp_path / "gt", tmp_path / "pred"


def test_evaluate_phases_refuses_predictions_without_ground_truth(tmp_path):
    gt, pred = phase_folders(tmp_path, ["video01", "video02"], ["video01", "video02", "video03", "video10"])
    assert exit_line(["evaluate-phases", str(gt), str(pred)]) == (
        f"error: {pred}: 2 prediction file(s) without ground truth in {gt} (video03-pred.txt, video10-pred.txt); "
        "the report would leave them out: add their ground truth or move them elsewhere"
    )
    (pred / "video03-pred.txt").unlink()
    (pred / "video10-pred.txt").rename(pred / "notes.txt")  # other files are not predictions
    main(["evaluate-phases", str(gt), str(pred)])


def test_evaluate_phases_refuses_the_ground_truth_as_its_own_prediction(tmp_path):
    gt, _ = phase_folders(tmp_path, ["video01"], [])
    assert exit_line(["evaluate-phases", str(gt), str(gt)]) == (
        f"error: {gt / 'video01-phase.txt'}: the prediction is the ground-truth file itself; give the prediction folder"
    )


# ---------------------------------------------------------------------------------------------
# Teacher manifest and limit-trained teachers


def save_checkpoint(path: Path, seed: int) -> Path:
    """A teacher checkpoint that loads (a width-4 slim U-Net), its weights drawn with ``seed``."""
    import torch

    from distill.models import build_segmentation_network

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_segmentation_network("slim_unet", 3, 2, width=4)
    architecture = {"network": "slim_unet", "network_kwargs": {"width": 4}, "in_channels": 3, "num_classes": 2}
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": architecture}, path)
    return path


@pytest.fixture
def teacher_runs(tmp_path) -> Path:
    """A manifest folder with two teacher checkpoints, and one checkpoint outside it."""
    for name, seed in (("a", 0), ("b", 1)):
        save_checkpoint(tmp_path / "teachers" / name / "best.ckpt", seed)
    save_checkpoint(tmp_path / "elsewhere" / "best.ckpt", 2)
    return tmp_path / "teachers"


def write_manifest(folder: Path, *entries: dict) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"teachers": list(entries)}, sort_keys=False))
    return path


def entry(name: str, checkpoint, sha256: str | None = None) -> dict:
    return {
        "name": name,
        "checkpoint": str(checkpoint) if isinstance(checkpoint, Path) else checkpoint,
        "sha256": sha256,
    }


@pytest.mark.parametrize("outside", ["../elsewhere/best.ckpt", "a/../../elsewhere/best.ckpt", "absolute"])
def test_a_manifest_checkpoint_outside_its_folder_is_refused(teacher_runs, outside):
    outside = str(teacher_runs.parent / "elsewhere/best.ckpt") if outside == "absolute" else outside
    manifest = write_manifest(teacher_runs, entry("a", "a/best.ckpt"), entry("b", outside))
    with pytest.raises(DataError) as error:
        read_teacher_manifest(manifest)
    assert str(error.value) == (
        f"{manifest}: teacher 'b' checkpoint {outside} lies outside the manifest's folder {teacher_runs} "
        "(a manifest lists the teacher runs next to it; move the runs there and name them relative to it)"
    )
    inside = write_manifest(teacher_runs, entry("a", teacher_runs / "a/best.ckpt"), entry("b", "b/../b/best.ckpt"))
    assert [Path(e.checkpoint).parent.name for e in read_teacher_manifest(inside)] == ["a", "b"]


@pytest.mark.parametrize(
    "second, expected",
    [
        (entry("a", "b/best.ckpt"), "two teachers are named 'a'; give each teacher its own name"),
        (entry("b", "a/best.ckpt"), "teachers 'a' and 'b' are the same checkpoint a/best.ckpt"),
        (
            entry("b", "b/best.ckpt", "abc123"),
            "teacher 'b' sha256 must be 64 hex digits or null (not checked), got 'abc123'",
        ),
        (entry("b", ["b/best.ckpt"]), "teacher 'b' checkpoint must be a file path, got ['b/best.ckpt']"),
        (
            entry("b", "b/best.ckpt") | {"subset": ["RUNMC/Case00"]},
            "teacher 'b' subset must be a mapping, got ['RUNMC/Case00']",
        ),
    ],
    ids=["name-twice", "checkpoint-twice", "bad-sha256", "checkpoint-list", "subset-list"],
)
def test_bad_manifest_entries_are_one_line(teacher_runs, second, expected):
    manifest = write_manifest(teacher_runs, entry("a", "a/best.ckpt"), second)
    with pytest.raises(DataError) as error:
        read_teacher_manifest(manifest)
    assert str(error.value) == f"{manifest}: {expected}"


def test_a_null_sha256_is_not_checked_and_a_recorded_one_is(teacher_runs):
    a, b = teacher_runs / "a/best.ckpt", teacher_runs / "b/best.ckpt"
    manifest = write_manifest(teacher_runs, entry("a", "a/best.ckpt"), entry("b", "b/best.ckpt", file_sha256(b)))
    teachers = FrozenTeachers(manifest, "segmentation")
    assert teachers.sources.expected_sha256 == [None, file_sha256(b)]
    teachers.load()
    assert [r.sha256 for r in teachers.records] == [file_sha256(a), file_sha256(b)]
    stale = write_manifest(teacher_runs, entry("a", "a/best.ckpt", file_sha256(b)))
    with pytest.raises(DataError, match=r"best.ckpt: content hash \w+\.\.\. differs from the recorded \w+\.\.\."):
        FrozenTeachers(stale, "segmentation").load()


def test_the_same_teacher_twice_is_refused(teacher_runs):
    a = teacher_runs / "a/best.ckpt"
    copy = Path(shutil.copy(a, teacher_runs / "copy.ckpt"))
    with pytest.raises(DataError) as error:
        FrozenTeachers([a, copy], "segmentation").load()
    assert str(error.value) == (
        f"{copy}: the same network as teacher 0 ({a}, equal content hash); each teacher must be listed once"
    )


def write_spec(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"config": "teacher.yaml", **fields}))
    return path


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"partition": "by_site", "sites": ["BMC", "RUNMC", "BMC"]}, "sites lists BMC twice"),
        ({"partition": "by_site", "sites": "BMC"}, "sites must be a list of strings, got 'BMC'"),
        (
            {"partition": "by_site", "overrides": "--trainer.max_epochs=2"},
            "overrides must be a list of strings, got '--trainer.max_epochs=2'",
        ),
        ({"partition": "random", "num_teachers": "3"}, "num_teachers must be an integer >= 2, got '3'"),
        ({"partition": "random", "num_teachers": 3, "max_cases": 0}, "max_cases must be an integer >= 1, got 0"),
        (
            {"partition": "case_lists", "case_lists": ["RUNMC/Case00"]},
            "case_lists must be a list of lists of SITE/CaseXX strings, got ['RUNMC/Case00']",
        ),
        (
            {"partition": "case_lists", "case_lists": [["RUNMC/Case00", "RUNMC/Case00"]]},
            "case_lists[0] lists RUNMC/Case00 twice",
        ),
    ],
)
def test_bad_teachers_specs_are_one_line(tmp_path, fields, expected):
    path = write_spec(tmp_path, **fields)
    with pytest.raises(DataError) as error:
        load_teachers_spec(path)
    assert str(error.value) == f"{path}: {expected}"


def test_case_lists_naming_cases_outside_the_training_split_are_refused_before_any_teacher_trains(tmp_path):
    spec = load_teachers_spec(
        write_spec(tmp_path, partition="case_lists", case_lists=[["RUNMC/Case00"], ["ISBI/Case01", "RUNMC/Case09"]])
    )
    with pytest.raises(DataError) as error:
        teacher_subsets(spec, ["RUNMC/Case00", "RUNMC/Case01"], 0, "spec.yaml")
    assert str(error.value) == (
        "spec.yaml: case_lists[1] names ISBI/Case01, RUNMC/Case09, not among the 2 labelled training cases "
        "of the split (SITE/CaseXX)"
    )

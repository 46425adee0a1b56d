"""Relaxed-boundary phase metrics against hand-worked cases (M2CAI/Cholec80 MATLAB protocol).

Labels are 0-based: Cholec80 id k (1-based, as in the MATLAB script) is label k-1.
Most cases use fps=1, tolerance_s=3, so t = 3 frames.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from distill.cli import main
from distill.errors import DataError
from distill.formats.phases import read_phase_file, write_phase_file
from distill.metrics import evaluate_phase_dirs, evaluate_phases, evaluate_video, relaxed_correct

T, F = True, False


def segment_correct(label: int, pred: list[int], mode: str, dataset: str = "cholec80") -> np.ndarray:
    """Relaxed correctness of one ground-truth segment of ``label`` (t = 3), placed after a
    correctly predicted 4-frame segment of another phase so that segment offsets are exercised."""
    prefix = 1 if label == 0 else 0
    gt = np.array([prefix] * 4 + [label] * len(pred))
    correct = relaxed_correct(gt, np.array([prefix] * 4 + pred), fps=1, dataset=dataset, mode=mode, tolerance_s=3)
    assert correct[:4].all()
    return correct[4:]


# (segment label, prediction, expected corrected, expected published); segments of 9 frames:
# first t = frames 0-2, middle 3-5, last t = frames 6-8.
RULE_CASES = {
    # id 3 (rule of ids 1-3): start forgives -1 only, end forgives +1 only.
    "ids 1-3": (
        2,
        [1, 0, 3, 1, 3, 2, 3, 4, 1],  # diff -1 -2 +1 | -1 +1 0 | +1 +2 -1
        [T, F, F, F, F, T, T, F, F],
        [T, F, F, F, F, T, F, F, F],  # partner of frame 0 is frame 6 (+1): no change; frame 6 not relaxed
    ),
    # id 4 (rule of ids 4-5): start forgives -1, end forgives +1 and +2 but not +3.
    "ids 4-5": (
        3,
        [2, 1, 4, 3, 3, 3, 4, 5, 6],  # diff -1 -2 +1 | 0 0 0 | +1 +2 +3
        [T, F, F, T, T, T, T, T, F],
        [T, T, F, T, T, T, F, F, F],  # frame 1 (diff -2) correct because frame 7 is +2
    ),
    # id 6 (rule of ids 6-7): start forgives -1 and -2 but not -3, end forgives +1.
    "ids 6-7": (
        5,
        [4, 3, 2, 5, 3, 5, 6, 4, 5],  # diff -1 -2 -3 | 0 -2 0 | +1 -1 0
        [T, T, F, T, F, T, T, F, T],
        [T, T, F, T, F, T, F, F, T],
    ),
}


@pytest.mark.parametrize("case", RULE_CASES)
@pytest.mark.parametrize("mode", ["corrected", "published"])
def test_relaxation_rules_per_phase_group(case, mode):
    label, pred, corrected, published = RULE_CASES[case]
    expected = corrected if mode == "corrected" else published
    np.testing.assert_array_equal(segment_correct(label, pred, mode), expected)


def test_published_mode_judges_first_frames_by_the_last_frames():
    # id 2 segment of 8 frames, t = 3: diff +1 on frames 5 and 7 (the last t frames 5, 6, 7).
    pred = [1, 1, 1, 1, 1, 2, 1, 2]
    np.testing.assert_array_equal(segment_correct(1, pred, "corrected"), [T] * 8)
    # Published: frames 0 and 2 (partners 5 and 7) were already right, frames 5 and 7 stay wrong.
    np.testing.assert_array_equal(segment_correct(1, pred, "published"), [T, T, T, T, T, F, T, F])
    # A wrong first frame is set correct by its partner, whatever its own diff.
    pred = [6, 1, 1, 1, 1, 2, 1, 1]
    np.testing.assert_array_equal(segment_correct(1, pred, "corrected"), [F, T, T, T, T, T, T, T])
    np.testing.assert_array_equal(segment_correct(1, pred, "published"), [T, T, T, T, T, F, T, T])


@pytest.mark.parametrize("mode", ["corrected", "published"])
def test_segment_shorter_than_tolerance_clips_t(mode):
    # The id 3 segment has 2 frames < t = 3, so both frames are in the first and in the last t.
    gt = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    pred = np.array([1, 1, 1, 1, 3, 1, 3, 3, 3, 3])  # diff +1 then -1 inside the short segment
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, mode=mode, tolerance_s=3), [T] * 10)
    pred[4:6] = [4, 0]  # +2 and -2 are not forgiven for id 3
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, mode=mode, tolerance_s=3)[4:6], [F, F])


def test_tolerance_is_ten_seconds_of_prediction_frames():
    # 1 fps: t = 10 frames. The id 2 segment starts at frame 20; prediction switches 11 frames late.
    gt = np.array([0] * 20 + [1] * 20)
    pred = np.array([0] * 31 + [1] * 9)
    expected = np.ones(40, bool)
    expected[30] = False
    np.testing.assert_array_equal(relaxed_correct(gt, pred, fps=1), expected)
    # 2 fps: t = 20 frames, the whole segment.
    assert relaxed_correct(gt, pred, fps=2).all()


def test_m2cai16_shifts_the_rules_by_one_id():
    gt = np.full(6, 3)
    # Label 3: Cholec80 GallbladderDissection (end forgives +2), M2CAI16 ClippingCutting (+1 only).
    pred = [3, 3, 3, 3, 4, 5]
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, "cholec80", tolerance_s=3), [T] * 6)
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, "m2cai16", tolerance_s=3), [T] * 5 + [F])
    # Label 5: Cholec80 CleaningCoagulation (start forgives -2), M2CAI16 GallbladderPackaging (-1 only).
    gt, pred = np.full(6, 5), [3, 4, 5, 5, 5, 5]
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, "cholec80", tolerance_s=3), [T] * 6)
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, "m2cai16", tolerance_s=3), [F, T, T, T, T, T])
    # TrocarPlacement (M2CAI16 label 0) takes the general rule: end forgives +1, not +2.
    gt, pred = np.full(6, 0), [0, 0, 0, 0, 1, 2]
    np.testing.assert_array_equal(relaxed_correct(gt, pred, 1, "m2cai16", tolerance_s=3), [T] * 5 + [F])


def test_per_phase_scores_are_clipped_at_100():
    # t = 1: frame 1 predicts id 2 one frame early (forgiven), so every frame is correct.
    result = evaluate_video(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), fps=1, tolerance_s=1)
    assert result["accuracy"] == 100.0
    np.testing.assert_allclose(result["jaccard"][:2], [100, 100])
    np.testing.assert_allclose(result["precision"][:2], [100, 100])  # phase 0: TP 2 / 1 predicted
    np.testing.assert_allclose(result["recall"][:2], [100, 100])  # phase 1: TP 3 / 2 in ground truth
    assert np.isnan(result["jaccard"][2:]).all() and np.isnan(result["recall"][2:]).all()


def test_never_predicted_phase_precision():
    gt, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])
    # t = 1: frame 2 (late transition) is forgiven, frame 3 is not: phase 1 has TP 1 over 0 predicted.
    result = evaluate_video(gt, pred, fps=1, tolerance_s=1)
    assert result["accuracy"] == 75.0
    np.testing.assert_allclose(result["jaccard"][:2], [75, 50])
    np.testing.assert_allclose(result["precision"][:2], [75, 100])  # 1/0 = inf, clipped
    np.testing.assert_allclose(result["recall"][:2], [100, 50])  # phase 0: 3/2 clipped
    # No tolerance: phase 1 has TP 0 over 0 predicted -> NaN.
    result = evaluate_video(gt, pred, fps=1, tolerance_s=0)
    assert np.isnan(result["precision"][1])
    np.testing.assert_allclose([result["jaccard"][1], result["recall"][1]], [0, 0])


# Two videos, t = 1 (fps 1, tolerance 1 s); phases 2-6 are predicted perfectly in both.
VIDEO_1 = (np.array([0, 0, 1, 1, 2, 3, 4, 5, 6]), np.array([0, 0, 0, 0, 2, 3, 4, 5, 6]))
VIDEO_2 = (np.array([0, 0, 0, 0, 2, 3, 4, 5, 6]), np.array([0, 1, 1, 1, 2, 3, 4, 5, 6]))


def test_aggregation_over_two_videos():
    report = evaluate_phases({"v1": VIDEO_1, "v2": VIDEO_2}, fps=1, tolerance_s=1)
    # Video 1: frame 3 wrong (late by 2). Video 2: frames 1, 2 wrong, frame 3 forgiven (early by 1).
    np.testing.assert_allclose(report.accuracy_per_video, [800 / 9, 700 / 9])
    assert report.accuracy == pytest.approx(750 / 9)
    assert report.accuracy_std == pytest.approx(100 / 9 / np.sqrt(2))  # N-1
    # Per video, phases 0 and 1 (1 is absent from video 2's ground truth):
    #   v1: J 75, 50  P 75, 100 (1/0)  R 100 (3/2), 50     v2: J 50, NaN  P 100 (2/1), NaN  R 50, NaN
    per_phase = {"jaccard": [62.5, 50], "precision": [87.5, 100], "recall": [75, 50]}
    for metric, first_two in per_phase.items():
        expected = np.array(first_two + [100.0] * 5)
        np.testing.assert_allclose(report.per_phase(metric), expected)
        assert report.mean(metric) == pytest.approx(expected.mean())
        assert report.std(metric) == pytest.approx(np.sqrt(((expected - expected.mean()) ** 2).sum() / 6))
    np.testing.assert_allclose(report.per_phase_std("jaccard")[:2], [25 / np.sqrt(2), 0])
    # Unrelaxed, all 18 frames: 13 right; F1 phase 0 = 2*3/(6+5), phase 1 = 0, phases 2-6 = 1.
    assert report.frame_accuracy == pytest.approx(1300 / 18, abs=1e-4)
    assert report.macro_f1 == pytest.approx(100 * (6 / 11 + 5) / 7, abs=1e-4)
    assert "Accuracy" in report.format()


def test_phase_absent_from_all_videos_is_ignored_for_precision_only():
    report = evaluate_phases({"v2": VIDEO_2}, fps=1, tolerance_s=1)
    assert np.isnan(report.per_phase("precision")[1])
    assert np.isnan(report.mean("jaccard")) and np.isnan(report.mean("recall"))
    assert report.mean("precision") == pytest.approx(100.0)  # 6 phases, all 100 (phase 0: 2/1 clipped)
    assert report.std("precision") == 0.0
    assert report.accuracy_std == 0.0  # MATLAB std of one value


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="same length"):
        relaxed_correct(np.array([0, 1]), np.array([0]), fps=1)
    with pytest.raises(ValueError, match="pred: phase indices"):
        relaxed_correct(np.array([0, 1]), np.array([0, 7]), fps=1)
    with pytest.raises(ValueError, match="mode"):
        relaxed_correct(np.array([0, 1]), np.array([0, 1]), fps=1, mode="matlab")


def write_video(gt_dir, pred_dir, name, late_s, pred_step=5, pred_name=None, dataset="cholec80"):
    """25 fps ground truth: 40 s of phase 0 then 40 s of phase 1 (2000 frames). Prediction every
    ``pred_step`` frames, switching to phase 1 ``late_s`` seconds late."""
    gt = np.repeat([0, 1], 1000)
    write_phase_file(gt_dir / name, np.arange(2000), gt, dataset)
    frames = np.arange(0, 2000, pred_step)
    pred = (frames >= 1000 + 25 * late_s).astype(int)
    write_phase_file(pred_dir / (pred_name or name), frames, pred, dataset)


@pytest.fixture
def dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    return gt_dir, pred_dir


def test_5fps_predictions_against_25fps_ground_truth(dirs):
    gt_dir, pred_dir = dirs
    # 5 fps: t = 50 prediction frames (10 s); 12 s late = 60 frames, so 10 of 400 stay wrong.
    write_video(gt_dir, pred_dir, "video41-phase.txt", late_s=12)
    # 1 fps, named videoXX-pred.txt: t = 10 frames, 8 s late is forgiven.
    write_video(gt_dir, pred_dir, "video42-phase.txt", late_s=8, pred_step=25, pred_name="video42-pred.txt")
    report = evaluate_phase_dirs(gt_dir, pred_dir)
    assert report.video_names == ("video41", "video42")
    np.testing.assert_allclose(report.fps, [5, 1])
    np.testing.assert_allclose(report.accuracy_per_video, [97.5, 100])
    # pred_fps=25 on 5 fps predictions (the reference code's slip): t = 250 frames, all forgiven.
    assert evaluate_phase_dirs(gt_dir, pred_dir, pred_fps=25).accuracy == 100.0


def test_m2cai16_file_names(dirs):
    gt_dir, pred_dir = dirs
    write_video(gt_dir, pred_dir, "workflow_video_01.txt", late_s=12, dataset="m2cai16")
    write_video(
        gt_dir,
        pred_dir,
        "test_workflow_video_02.txt",
        late_s=12,
        pred_name="test_workflow_video_02_pred.txt",
        dataset="m2cai16",
    )
    report = evaluate_phase_dirs(gt_dir, pred_dir, dataset="m2cai16")
    assert report.video_names == ("test_workflow_video_02", "workflow_video_01")
    assert report.phase_names[0] == "TrocarPlacement"
    np.testing.assert_allclose(report.accuracy_per_video, [97.5, 97.5])


def test_cli_end_to_end(dirs, tmp_path, capsys):
    gt_dir, pred_dir = dirs
    write_video(gt_dir, pred_dir, "video41-phase.txt", late_s=12)
    out = tmp_path / "report.json"
    main(["evaluate-phases", str(gt_dir), str(pred_dir), "--mode", "published", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "GallbladderRetraction" in printed and "97.50" in printed
    numbers = json.loads(out.read_text())
    assert numbers["mode"] == "published" and numbers["accuracy"]["mean"] == 97.5
    assert numbers["per_phase"]["ClippingCutting"]["jaccard"] is None  # absent phase -> null
    with pytest.raises(SystemExit, match="error: .*report.json: already exists"):
        main(["evaluate-phases", str(gt_dir), str(pred_dir), "--json", str(out)])


def write_prediction(path, frames, labels):
    write_phase_file(path, np.asarray(frames), np.asarray(labels))


BAD_PREDICTIONS = {
    "frame not in ground truth": (np.r_[np.arange(0, 2000, 5), 2005], "frame 2005 is not in the ground truth"),
    "uneven frames": (np.r_[0, 5, 15, np.arange(20, 2000, 5)], "not evenly spaced"),
    "truncated": (np.arange(0, 1000, 5), "predictions cover frames 0..995"),
}


@pytest.mark.parametrize("case", BAD_PREDICTIONS)
def test_bad_prediction_files_raise(dirs, case):
    gt_dir, pred_dir = dirs
    write_video(gt_dir, pred_dir, "video41-phase.txt", late_s=0)
    frames, message = BAD_PREDICTIONS[case]
    write_prediction(pred_dir / "video41-phase.txt", frames, np.zeros(len(frames), int))
    with pytest.raises(DataError, match=f"video41-phase.txt: .*{message}"):
        evaluate_phase_dirs(gt_dir, pred_dir)


def test_missing_or_ambiguous_predictions_and_empty_dirs_raise(dirs):
    gt_dir, pred_dir = dirs
    with pytest.raises(DataError, match="no ground-truth files matching video\\*-phase.txt"):
        evaluate_phase_dirs(gt_dir, pred_dir)
    write_video(gt_dir, pred_dir, "video41-phase.txt", late_s=0)
    (pred_dir / "video41-phase.txt").rename(pred_dir / "video41.txt")
    with pytest.raises(DataError, match="video41-phase.txt: no prediction"):
        evaluate_phase_dirs(gt_dir, pred_dir)
    write_prediction(pred_dir / "video41-pred.txt", [0], [0])
    write_prediction(pred_dir / "video41_pred.txt", [0], [0])
    with pytest.raises(DataError, match="several predictions"):
        evaluate_phase_dirs(gt_dir, pred_dir)


def test_unknown_phase_name_raises_in_cli(dirs, capsys):
    gt_dir, pred_dir = dirs
    write_video(gt_dir, pred_dir, "video41-phase.txt", late_s=0)
    (pred_dir / "video41-phase.txt").write_text("Frame\tPhase\n0\tPreparation\n5\tDissection\n")
    with pytest.raises(SystemExit, match="error: .*video41-phase.txt:3: unknown phase name 'Dissection'"):
        main(["evaluate-phases", str(gt_dir), str(pred_dir)])


def test_macro_f1_and_frame_accuracy_match_torchmetrics():
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    rng = np.random.default_rng(0)
    gt = np.repeat([0, 1, 3, 4, 6], 40)  # phases 2 and 5 never occur in ground truth
    pred = np.where(rng.random(gt.size) < 0.3, rng.integers(0, 6, gt.size), gt)  # 6 never predicted wrongly
    report = evaluate_phases({"v": (gt, pred)}, fps=1)
    target, preds = torch.from_numpy(gt), torch.from_numpy(pred)
    assert report.frame_accuracy == pytest.approx(
        100 * multiclass_accuracy(preds, target, 7, average="micro").item(), abs=1e-4
    )
    assert report.macro_f1 == pytest.approx(
        100 * multiclass_f1_score(preds, target, 7, average="macro").item(), abs=1e-4
    )


CANONICAL = (
    "Frame\tPhase\n0\tPreparation\n1\tPreparation\n2\t1\n3\tCalotTriangleDissection\n10\tGallbladderRetraction\n"
)
EXPECTED = ([0, 1, 2, 3, 10], [0, 0, 1, 1, 6])


@pytest.mark.parametrize(
    "text",
    [
        CANONICAL,
        CANONICAL.rstrip("\n"),  # no final newline
        CANONICAL.replace("\n", "\r\n"),  # CRLF
        CANONICAL.replace("\n1\t", "\n\n1\t"),  # blank line (line-by-line parser)
        CANONICAL.replace("\t", "  ").replace("Frame  Phase", "Frame\tPhase"),  # spaces (line-by-line parser)
        CANONICAL.replace("\n3\t", "\n+3\t"),  # signed frame (line-by-line parser)
    ],
    ids=["canonical", "no final newline", "crlf", "blank line", "spaces", "signed frame"],
)
def test_phase_file_layouts_parse_alike(tmp_path, text):
    path = tmp_path / "video01-phase.txt"
    path.write_bytes(text.encode())
    frames, labels = read_phase_file(path)
    np.testing.assert_array_equal(frames, EXPECTED[0])
    np.testing.assert_array_equal(labels, EXPECTED[1])
    assert frames.dtype == labels.dtype == np.int64


def test_long_phase_file_reads_as_written(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.sort(rng.choice(10**8, size=5000, replace=False))  # 1 to 8 digits
    frames[:3] = [0, 7, 10]
    labels = np.repeat(rng.integers(0, 8, 50), 100)  # runs, some of equal neighbours
    labels[rng.random(5000) < 0.01] = rng.integers(0, 8)  # isolated frames
    write_phase_file(tmp_path / "a.txt", frames, labels, "m2cai16")
    read_frames, read_labels = read_phase_file(tmp_path / "a.txt", "m2cai16")
    np.testing.assert_array_equal(read_frames, frames)
    np.testing.assert_array_equal(read_labels, labels)


# Bad line -> one-line DataError naming file and line (first bad line wins).
BAD_LINES = {
    "unknown name": ("5\tGallbladderDissectionX", "unknown phase name 'GallbladderDissectionX'"),
    "same length and ends as a known name": ("5\tGallbladderXissection", "unknown phase name 'GallbladderXissection'"),
    "index out of range": ("5\t7", "unknown phase name '7'"),
    "three fields": ("5\tPreparation\textra", "expected '<frame>\\\\t<phase>', got '5\\\\tPreparation\\\\textra'"),
    "one field": ("Preparation", "expected '<frame>\\\\t<phase>'"),
    "frame not a number": ("5a\tPreparation", "expected '<frame>\\\\t<phase>'"),
    "frame with a colon": ("5:\tPreparation", "expected '<frame>\\\\t<phase>'"),
    "frame with a slash": ("/5\tPreparation", "expected '<frame>\\\\t<phase>'"),
    "frame with two signs": ("+-5\tPreparation", "expected '<frame>\\\\t<phase>'"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_phase_line_is_named(tmp_path, case):
    line, message = BAD_LINES[case]
    body = [f"{i}\tGallbladderDissection" for i in range(6)]
    body[4] = line  # file line 6
    path = tmp_path / "video01-phase.txt"
    path.write_text("Frame\tPhase\n" + "\n".join(body) + "\n")
    with pytest.raises(DataError, match=f"video01-phase.txt:6: {message}") as error:
        read_phase_file(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [("", "empty file"), ("Frame\tLabel\n0\t0\n", "expected header"), ("Frame\tPhase\n\n", "no annotation lines")],
)
def test_bad_phase_file_header_or_body(tmp_path, text, message):
    path = tmp_path / "x.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_phase_file(path)


def test_evaluate_phases_imports_no_torch():
    # The command must start fast: its import path stays clear of torch and Lightning.
    code = "import sys, distill.cli, distill.metrics.phase_files; sys.exit(sorted({'torch', 'lightning'} & set(sys.modules)) or 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

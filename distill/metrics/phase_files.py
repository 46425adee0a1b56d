"""Phase evaluation of prediction files: ``Frame<TAB>Phase`` files in a prediction folder matched to the
ground truth of a Cholec80 / M2CAI16 folder (what ``distill evaluate-phases`` reads), aligned frame by frame
and scored with the relaxed metrics of :mod:`distill.metrics.phase`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.errors import DataError
from distill.formats.phases import VIDEO_FPS, natural_sorted, phase_names, read_phase_file
from distill.metrics.phase import Mode, PhaseReport, evaluate_phases

GROUND_TRUTH_PATTERNS: dict[str, tuple[str, ...]] = {
    "cholec80": ("video*-phase.txt",),
    "m2cai16": ("workflow_video_*.txt", "test_workflow_video_*.txt"),
}


PREDICTION_SUFFIXES = ("-pred.txt", "_pred.txt")


def prediction_candidates(ground_truth: Path) -> tuple[str, ...]:
    """File names accepted as the prediction for ``ground_truth``.

    ``videoXX-phase.txt`` -> ``videoXX-phase.txt``, ``videoXX-pred.txt``, ``videoXX_pred.txt``;
    ``[test_]workflow_video_XX.txt`` -> the same name, ``..._XX-pred.txt``, ``..._XX_pred.txt``.
    """
    video = ground_truth.name.removesuffix(".txt").removesuffix("-phase")
    return ground_truth.name, *(f"{video}{suffix}" for suffix in PREDICTION_SUFFIXES)


def _align_prediction(
    gt_path: Path, gt_frames: np.ndarray, pred_path: Path, pred_frames: np.ndarray
) -> tuple[np.ndarray, int]:
    """Positions (M,) in the ground truth of the predicted frames, and their frame step.

    Checks that the predicted frames exist in the ground truth and cover it evenly (both are
    strictly increasing, as :func:`read_phase_file` gives them). A one-line prediction has step 1
    (a 25 fps prediction of a one-frame video).
    """
    positions = np.clip(np.searchsorted(gt_frames, pred_frames), 0, gt_frames.size - 1)
    missing = pred_frames[gt_frames[positions] != pred_frames]
    if missing.size:
        raise DataError(f"{pred_path}: frame {missing[0]} is not in the ground truth {gt_path.name}")
    steps = np.unique(np.diff(pred_frames))
    if steps.size > 1:
        raise DataError(f"{pred_path}: frame numbers are not evenly spaced (steps {steps[:5].tolist()})")
    step = int(steps[0]) if steps.size else 1
    if pred_frames[0] - gt_frames[0] >= step or gt_frames[-1] - pred_frames[-1] >= step:
        raise DataError(
            f"{pred_path}: predictions cover frames {pred_frames[0]}..{pred_frames[-1]} every {step}, "
            f"the ground truth {gt_frames[0]}..{gt_frames[-1]}"
        )
    return positions, step


def evaluate_phase_dirs(
    gt_dir: str | Path,
    pred_dir: str | Path,
    dataset: str = "cholec80",
    mode: Mode = "corrected",
    pred_fps: float | None = None,
    tolerance_s: float = 10.0,
) -> PhaseReport:
    """Evaluate the prediction files in ``pred_dir`` against the ground truth in ``gt_dir``.

    Ground truth: ``videoXX-phase.txt`` (Cholec80) or ``[test_]workflow_video_XX.txt`` (M2CAI16),
    ``Frame<TAB>Phase`` at 25 fps. Predictions: the same format and name, or
    :func:`prediction_candidates`, at any regular rate: their frame numbers say which 25 fps
    frames are predicted, the ground truth is subsampled to those frames, and the prediction
    rate is ``25 / frame step`` unless ``pred_fps`` is given. The predictions must cover the
    whole video (no gap longer than one step at either end). Other files are ignored, but a
    prediction file (a candidate name of some video) without its ground truth is refused: the
    report would score fewer videos than were predicted.

    Raises:
        DataError: no ground-truth files, a video without (or with two) prediction files, a
            prediction without ground truth or that is the ground-truth file itself, frames not in
            the ground truth or unevenly spaced, unknown phase names.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    phase_names(dataset)  # raises DataError for an unknown dataset
    patterns = GROUND_TRUTH_PATTERNS[dataset.lower()]
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: ground-truth directory not found")
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction directory not found")
    gt_paths = sorted({path for pattern in patterns for path in gt_dir.glob(pattern)})
    if not gt_paths:
        raise DataError(f"{gt_dir}: no ground-truth files matching {' or '.join(patterns)}")
    expected = {name for gt_path in gt_paths for name in prediction_candidates(gt_path)}
    unmatched = natural_sorted(
        path.name
        for pattern in (*patterns, *(f"*{suffix}" for suffix in PREDICTION_SUFFIXES))
        for path in pred_dir.glob(pattern)
        if path.name not in expected
    )
    if unmatched:
        raise DataError(
            f"{pred_dir}: {len(unmatched)} prediction file(s) without ground truth in {gt_dir} "
            f"({', '.join(unmatched[:3])}{', ...' if len(unmatched) > 3 else ''}); the report would leave them out: "
            "add their ground truth or move them elsewhere"
        )
    videos, rates = {}, {}
    for gt_path in gt_paths:
        found = [pred_dir / name for name in prediction_candidates(gt_path) if (pred_dir / name).is_file()]
        if len(found) != 1:
            problem = "no prediction" if not found else f"several predictions ({', '.join(p.name for p in found)})"
            raise DataError(
                f"{gt_path}: {problem} in {pred_dir}; expected one of {', '.join(prediction_candidates(gt_path))}"
            )
        if found[0].samefile(gt_path):
            raise DataError(f"{found[0]}: the prediction is the ground-truth file itself; give the prediction folder")
        gt_frames, gt_labels = read_phase_file(gt_path, dataset)
        pred_frames, pred_labels = read_phase_file(found[0], dataset)
        positions, step = _align_prediction(gt_path, gt_frames, found[0], pred_frames)
        video = gt_path.name.removesuffix(".txt").removesuffix("-phase")
        videos[video] = (gt_labels[positions], pred_labels)
        rates[video] = pred_fps if pred_fps is not None else VIDEO_FPS / step
    return evaluate_phases(videos, rates, dataset, mode, tolerance_s)

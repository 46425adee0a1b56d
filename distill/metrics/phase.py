"""Relaxed-boundary surgical phase metrics: a port of the M2CAI/Cholec80 MATLAB evaluation.

The protocol (the M2CAI/Cholec80 MATLAB evaluation script): per video, ``diff = pred - gt``; inside the first ``t``
frames of a ground-truth segment a prediction still showing an earlier phase is forgiven (late
transition), inside its last ``t`` frames one already showing a later phase is forgiven (early
transition), with ``t = round(10 s x fps of the predictions)`` clipped to the segment length.
How far back/forward is forgiven depends on the segment's phase:

=====================================  =======================  =====================
Cholec80 id (1-based)                  first t frames forgive   last t frames forgive
=====================================  =======================  =====================
1-3 Preparation, Calot, Clipping       -1                       +1
4-5 GB dissection, GB packaging        -1                       +1, +2
6-7 Cleaning, GB retraction            -1, -2                   +1, +2
=====================================  =======================  =====================

M2CAI16 shifts every id by one: TrocarPlacement (id 1) takes the general rule of ids 1-4, as the
``else`` branch of the M2CAI ``Evaluate.m`` does (its -1 can never fire: nothing precedes it; its
+1 forgives Preparation predicted early), ids 5-6 the 4-5 rule and ids 7-8 the 6-7 rule.

Two modes: ``"corrected"`` (default) applies the end rule to the last ``t`` frames of the
segment. ``"published"`` reproduces the MATLAB indexing slip
``curDiff(curDiff(end-t+1:end) == 1) = 0``: frame ``i < t`` of a segment counts as correct
whenever frame ``L-t+i`` matches the end rule, and the last ``t`` frames get no end rule; use it
to compare with published numbers.

Labels are 0-based phase indices everywhere (as :func:`distill.formats.phases.read_phase_file`
returns them); ``diff`` does not depend on the offset. Folders of prediction files are scored by
:mod:`distill.metrics.phase_files`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from distill.formats.phases import phase_names

Mode = Literal["corrected", "published"]
MODES: tuple[str, ...] = ("corrected", "published")
METRICS: tuple[str, ...] = ("jaccard", "precision", "recall")

# How many phases back (first t frames) / forward (last t frames) a prediction may be and still
# count as correct, indexed by the 0-based phase of the ground-truth segment.
_CHOLEC80_BACK = (1, 1, 1, 1, 1, 2, 2)
_CHOLEC80_FORWARD = (1, 1, 1, 2, 2, 2, 2)
FORGIVEN_BACK: dict[str, np.ndarray] = {
    "cholec80": np.array(_CHOLEC80_BACK),
    "m2cai16": np.array((1,) + _CHOLEC80_BACK),
}
FORGIVEN_FORWARD: dict[str, np.ndarray] = {
    "cholec80": np.array(_CHOLEC80_FORWARD),
    "m2cai16": np.array((1,) + _CHOLEC80_FORWARD),
}


def _check_labels(gt: np.ndarray, pred: np.ndarray, n_phases: int) -> tuple[np.ndarray, np.ndarray]:
    """``gt``, ``pred`` as int64 (N,) arrays; ValueError unless same-length 1-D labels in [0, n_phases)
    (files are checked where they are read: :func:`~distill.formats.phases.read_phase_file`)."""
    gt, pred = np.asarray(gt, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if gt.ndim != 1 or gt.shape != pred.shape or gt.size == 0:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} must be non-empty 1-D arrays of the same length")
    for name, labels in (("gt", gt), ("pred", pred)):
        if labels.min() < 0 or labels.max() >= n_phases:
            raise ValueError(f"{name}: phase indices must lie in [0, {n_phases}), got {labels.min()}..{labels.max()}")
    return gt, pred


def relaxed_correct(
    gt: np.ndarray,
    pred: np.ndarray,
    fps: float,
    dataset: str = "cholec80",
    mode: Mode = "corrected",
    tolerance_s: float = 10.0,
) -> np.ndarray:
    """Which frames of one video count as correct under the relaxed boundary.

    Args:
        gt, pred: (N,) 0-based phase indices of one video, at ``fps`` frames per second.
        fps: frame rate of ``gt``/``pred``; the tolerance is ``tolerance_s * fps`` frames, rounded half up.
        dataset: 'cholec80' or 'm2cai16' (chooses the per-phase rules, see the module docstring).
        mode: 'corrected' (end rule on the last t frames) or 'published' (the MATLAB slip).
        tolerance_s: the relaxed boundary in seconds.

    Returns:
        (N,) bool, True where the relaxed ``diff`` is 0.
    """
    gt, pred = _check_labels(gt, pred, len(phase_names(dataset)))
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    back, forward = FORGIVEN_BACK[dataset.lower()], FORGIVEN_FORWARD[dataset.lower()]
    n = gt.size
    # Ground-truth segments: runs of one phase (MATLAB: bwconncomp per phase).
    starts = np.flatnonzero(np.r_[True, gt[1:] != gt[:-1]])
    lengths = np.diff(np.r_[starts, n])
    segment = np.repeat(np.arange(starts.size), lengths)  # (N,) segment of each frame
    position = np.arange(n) - starts[segment]  # (N,) frame index inside its segment
    length = lengths[segment]
    t = np.minimum(math.floor(tolerance_s * fps + 0.5), length)  # (N,) tolerance clipped to the segment

    diff = pred - gt
    in_first = position < t
    in_last = position >= length - t
    late_forgiven = in_first & (diff < 0) & (diff >= -back[gt])
    if mode == "corrected":
        early_forgiven = in_last & (diff > 0) & (diff <= forward[gt])
    else:
        # Frame i < t is judged by the end rule at frame L-t+i of the same segment. The start
        # rule only zeroes negative diffs, so the partner's original diff decides the match.
        partner = np.where(in_first, np.arange(n) + length - t, np.arange(n))
        early_forgiven = in_first & (diff[partner] > 0) & (diff[partner] <= forward[gt])
    return (diff == 0) | late_forgiven | early_forgiven


def evaluate_video(
    gt: np.ndarray,
    pred: np.ndarray,
    fps: float,
    dataset: str = "cholec80",
    mode: Mode = "corrected",
    tolerance_s: float = 10.0,
) -> dict[str, float | np.ndarray]:
    """Relaxed accuracy and per-phase Jaccard/precision/recall of one video, as MATLAB's ``Evaluate.m``.

    Args:
        gt, pred: (N,) 0-based phase indices; the other arguments as :func:`relaxed_correct`.

    Returns:
        ``{"accuracy": float, "jaccard": (P,), "precision": (P,), "recall": (P,)}`` in percent,
        P = number of phases. For phase p, TP = frames with ``pred == p or gt == p`` that are
        relaxed-correct; Jaccard = TP / that union, precision = TP / #(pred == p), recall =
        TP / #(gt == p). Values are clipped at 100 (the relaxation can push TP above either
        count); NaN where p is absent from ``gt``; a never-predicted phase has precision NaN
        when TP = 0 and 100 (inf, clipped) when TP > 0.
    """
    n_phases = len(phase_names(dataset))
    correct = relaxed_correct(gt, pred, fps, dataset, mode, tolerance_s)
    gt, pred = np.asarray(gt, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    agree = gt == pred
    gt_count = np.bincount(gt, minlength=n_phases)
    pred_count = np.bincount(pred, minlength=n_phases)
    union = gt_count + pred_count - np.bincount(gt[agree], minlength=n_phases)
    tp = np.bincount(gt[correct], minlength=n_phases) + np.bincount(pred[correct & ~agree], minlength=n_phases)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = {"jaccard": tp / union, "precision": tp / pred_count, "recall": tp / gt_count}
    absent = gt_count == 0
    result: dict[str, float | np.ndarray] = {"accuracy": 100.0 * correct.mean()}
    for name, score in scores.items():
        result[name] = np.where(absent, np.nan, np.minimum(100.0 * score, 100.0))
    return result


def _mean(values: np.ndarray, axis: int, ignore_nan: bool) -> np.ndarray:
    """MATLAB ``mean``/``nanmean`` along ``axis``: NaN for an empty (all-NaN) slice, no warning."""
    if not ignore_nan:
        return np.mean(values, axis=axis)
    valid = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        return np.nansum(values, axis=axis) / valid.sum(axis=axis)


def _std(values: np.ndarray, axis: int, ignore_nan: bool) -> np.ndarray:
    """MATLAB ``std``/``nanstd`` along ``axis``: N-1 normalisation, 0 for a single value."""
    count = (~np.isnan(values)).sum(axis=axis) if ignore_nan else values.shape[axis]
    squares = (values - np.expand_dims(_mean(values, axis, ignore_nan), axis)) ** 2
    total = np.nansum(squares, axis=axis) if ignore_nan else np.sum(squares, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(np.where(count > 0, total / np.maximum(count - 1, 1), np.nan))


def _frame_accuracy_and_macro_f1(gt: np.ndarray, pred: np.ndarray, n_phases: int) -> tuple[float, float]:
    """Unrelaxed accuracy and macro F1 (%) of (N,) labels, as torchmetrics' ``multiclass_accuracy``
    (micro) and ``multiclass_f1_score`` (macro over the phases with TP + FP + FN > 0)."""
    tp = np.bincount(gt[gt == pred], minlength=n_phases)
    fp = np.bincount(pred, minlength=n_phases) - tp
    fn = np.bincount(gt, minlength=n_phases) - tp
    present = tp + fp + fn > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return 100.0 * tp.sum() / gt.size, 100.0 * f1.mean()


@dataclass(frozen=True)
class PhaseReport:
    """Phase-recognition results over a set of videos.

    Attributes:
        dataset, mode, tolerance_s: how the numbers were computed.
        phase_names: (P,) names in index order.
        video_names: (V,) names in evaluation order.
        fps: (V,) frame rate of each video's predictions.
        accuracy_per_video: (V,) relaxed accuracy, %.
        per_video: ``"jaccard"``/``"precision"``/``"recall"`` -> (V, P), %, NaN as in
            :func:`evaluate_video`.
        frame_accuracy: unrelaxed accuracy over all frames of all videos, % (micro).
        macro_f1: unrelaxed F1 over all frames of all videos, macro over the phases that occur
            in ground truth or predictions, %.
    """

    dataset: str
    mode: str
    tolerance_s: float
    phase_names: tuple[str, ...]
    video_names: tuple[str, ...]
    fps: np.ndarray
    accuracy_per_video: np.ndarray
    per_video: dict[str, np.ndarray]
    frame_accuracy: float
    macro_f1: float

    @property
    def accuracy(self) -> float:
        """Relaxed accuracy, mean over videos, %."""
        return float(np.mean(self.accuracy_per_video))

    @property
    def accuracy_std(self) -> float:
        """Std of the relaxed accuracy over videos (N-1), %."""
        return float(_std(self.accuracy_per_video, 0, ignore_nan=False))

    def per_phase(self, metric: str) -> np.ndarray:
        """(P,) NaN-aware mean over videos of ``metric`` ('jaccard', 'precision' or 'recall')."""
        return _mean(self.per_video[metric], 0, ignore_nan=True)

    def per_phase_std(self, metric: str) -> np.ndarray:
        """(P,) NaN-aware std over videos (N-1) of ``metric``."""
        return _std(self.per_video[metric], 0, ignore_nan=True)

    def mean(self, metric: str) -> float:
        """Mean over phases of :meth:`per_phase`; NaN-aware for precision only, as MATLAB's Main.m."""
        return float(_mean(self.per_phase(metric), 0, ignore_nan=metric == "precision"))

    def std(self, metric: str) -> float:
        """Std over phases (N-1) of :meth:`per_phase`; NaN-aware for precision only."""
        return float(_std(self.per_phase(metric), 0, ignore_nan=metric == "precision"))

    def window_frames(self) -> list[int]:
        """The relaxed-boundary window in frames at each prediction rate (``tolerance_s`` x fps, rounded half up)."""
        return [math.floor(self.tolerance_s * float(fps) + 0.5) for fps in np.unique(self.fps)]

    def per_video_summary(self) -> dict[str, tuple[float, float]]:
        """``{metric: (mean, std)}`` over videos (N-1) of the relaxed accuracy and of each video's
        NaN-aware mean over phases of Jaccard, precision and recall, %."""
        values = {"accuracy": self.accuracy_per_video}
        values |= {m: _mean(self.per_video[m], 1, ignore_nan=True) for m in METRICS}
        return {
            name: (float(_mean(v, 0, ignore_nan=True)), float(_std(v, 0, ignore_nan=True)))
            for name, v in values.items()
        }

    def to_dict(self) -> dict:
        """JSON-ready numbers (NaN written as null)."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else round(float(value), 6)

        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "tolerance_s": self.tolerance_s,
            "tolerance_frames": self.window_frames(),
            "prediction_fps": [float(f) for f in np.unique(self.fps)],
            "per_video_mean_std": {
                name: {"mean": clean(mean), "std": clean(std)} for name, (mean, std) in self.per_video_summary().items()
            },
            "accuracy": {"mean": clean(self.accuracy), "std": clean(self.accuracy_std)},
            **{m: {"mean": clean(self.mean(m)), "std": clean(self.std(m))} for m in METRICS},
            "frame_accuracy": clean(self.frame_accuracy),
            "macro_f1": clean(self.macro_f1),
            "per_phase": {
                name: {m: clean(self.per_phase(m)[p]) for m in METRICS} for p, name in enumerate(self.phase_names)
            },
            "per_video": {
                name: {
                    "fps": float(self.fps[v]),
                    "accuracy": clean(self.accuracy_per_video[v]),
                    **{m: [clean(x) for x in self.per_video[m][v]] for m in METRICS},
                }
                for v, name in enumerate(self.video_names)
            },
        }

    def to_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def format(self) -> str:
        """Readable table: per-phase means over videos, then the summary lines."""
        rates = ", ".join(f"{f:g}" for f in np.unique(self.fps))
        width = max(len(name) for name in self.phase_names)
        frames = ", ".join(map(str, self.window_frames()))
        lines = [
            f"{self.dataset}, {len(self.video_names)} videos, relaxed boundary {self.tolerance_s:g} s = {frames} frames "
            f"at {rates} fps, {self.mode} mode",
            f"{'Phase':<{width}}  {'Jaccard':>8}  {'Precision':>9}  {'Recall':>8}",
        ]
        table = np.stack([self.per_phase(m) for m in METRICS], axis=1)  # (P, 3)
        for name, (jaccard, precision, recall) in zip(self.phase_names, table):
            lines.append(f"{name:<{width}}  {jaccard:8.2f}  {precision:9.2f}  {recall:8.2f}")
        lines += [
            "",
            f"Accuracy   {self.accuracy:6.2f} +- {self.accuracy_std:5.2f}  (relaxed; +- over videos)",
            *(
                f"{m.capitalize():<10} {self.mean(m):6.2f} +- {self.std(m):5.2f}  (relaxed; +- over phases)"
                for m in METRICS
            ),
            f"Frame accuracy {self.frame_accuracy:6.2f}  (unrelaxed, all frames)",
            f"Macro F1       {self.macro_f1:6.2f}  (unrelaxed, all frames)",
            "",
            f"Per video, mean +- SD over the {len(self.video_names)} videos (relaxed; Jaccard, precision, recall: "
            "each video's mean over its phases):",
            *(f"{m.capitalize():<10} {mean:6.2f} +- {std:5.2f}" for m, (mean, std) in self.per_video_summary().items()),
        ]
        return "\n".join(lines)


def evaluate_phases(
    videos: Mapping[str, tuple[np.ndarray, np.ndarray]],
    fps: float | Mapping[str, float],
    dataset: str = "cholec80",
    mode: Mode = "corrected",
    tolerance_s: float = 10.0,
) -> PhaseReport:
    """Evaluate many videos with the MATLAB protocol and aggregate as its ``Main.m``.

    Args:
        videos: name -> ``(gt, pred)``, each (N_v,) 0-based phase indices.
        fps: frame rate of the predictions, one for all videos or name -> rate.
        dataset, mode, tolerance_s: as :func:`relaxed_correct`.
    """
    if not videos:
        raise ValueError("no videos to evaluate")
    names = phase_names(dataset)
    rates = np.array([fps[name] if isinstance(fps, Mapping) else fps for name in videos], dtype=np.float64)
    results = [
        evaluate_video(gt, pred, rate, dataset, mode, tolerance_s) for (gt, pred), rate in zip(videos.values(), rates)
    ]
    all_gt = np.concatenate([np.asarray(gt, dtype=np.int64) for gt, _ in videos.values()])
    all_pred = np.concatenate([np.asarray(pred, dtype=np.int64) for _, pred in videos.values()])
    frame_accuracy, macro_f1 = _frame_accuracy_and_macro_f1(all_gt, all_pred, len(names))
    return PhaseReport(
        dataset=dataset.lower(),
        mode=mode,
        tolerance_s=tolerance_s,
        phase_names=names,
        video_names=tuple(videos),
        fps=rates,
        accuracy_per_video=np.array([r["accuracy"] for r in results]),
        per_video={m: np.stack([r[m] for r in results]) for m in METRICS},
        frame_accuracy=frame_accuracy,
        macro_f1=macro_f1,
    )

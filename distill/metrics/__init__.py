"""Evaluation metrics.

- ``phase``: relaxed-boundary surgical phase metrics (port of the M2CAI/Cholec80 MATLAB protocol);
- ``phase_files``: those metrics of prediction files in a folder against a ground-truth folder.
"""

from distill.metrics.phase import PhaseReport, evaluate_phases, evaluate_video, relaxed_correct
from distill.metrics.phase_files import evaluate_phase_dirs, prediction_candidates

__all__ = [
    "PhaseReport",
    "evaluate_phase_dirs",
    "evaluate_phases",
    "evaluate_video",
    "prediction_candidates",
    "relaxed_correct",
]

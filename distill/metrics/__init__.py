"""Evaluation metrics.

- ``phase``: relaxed-boundary surgical phase metrics (port of the M2CAI/Cholec80 MATLAB protocol).
"""

from distill.metrics.phase import (
    PhaseReport,
    evaluate_phase_dirs,
    evaluate_phases,
    evaluate_video,
    prediction_candidates,
    relaxed_correct,
)

__all__ = [
    "PhaseReport",
    "evaluate_phase_dirs",
    "evaluate_phases",
    "evaluate_video",
    "prediction_candidates",
    "relaxed_correct",
]

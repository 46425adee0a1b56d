"""Surgical phase vocabularies and the ``Frame<TAB>Phase`` annotation format (DESIGN.md section 2.2).

Cholec80 phase files have a header ``Frame\tPhase`` and one ``<frame>\t<PhaseName>`` line per
frame at 25 fps; M2CAI16 workflow files use the same two columns with 8 phases. Prediction
files use the same format at any frame rate (the frame numbers say which frames are covered).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.errors import DataError

CHOLEC80_PHASES: tuple[str, ...] = (
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
)
M2CAI16_PHASES: tuple[str, ...] = ("TrocarPlacement",) + CHOLEC80_PHASES
PHASES: dict[str, tuple[str, ...]] = {"cholec80": CHOLEC80_PHASES, "m2cai16": M2CAI16_PHASES}
CHOLEC80_TOOLS: tuple[str, ...] = ("Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag")
VIDEO_FPS = 25


def phase_names(dataset: str) -> tuple[str, ...]:
    """Phase names of ``dataset`` ('cholec80' or 'm2cai16') in index order."""
    try:
        return PHASES[dataset.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {sorted(PHASES)}") from None


def read_phase_file(path: str | Path, dataset: str = "cholec80") -> tuple[np.ndarray, np.ndarray]:
    """Read a ``Frame\\tPhase`` file.

    Returns ``(frames, labels)``: int64 arrays of shape (N,), frame numbers as written and
    0-based phase indices in the order of :func:`phase_names`. Phase names may also be given
    as integer indices (some prediction tools write those).
    """
    path = Path(path)
    names = phase_names(dataset)
    index = {name: i for i, name in enumerate(names)}
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    lines = path.read_text().splitlines()
    if not lines or lines[0].split("\t")[:2] != ["Frame", "Phase"]:
        raise DataError(f"{path}: expected header 'Frame\\tPhase', got {lines[0]!r}" if lines else f"{path}: empty file")
    frames, labels = [], []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{path}:{line_no}: expected '<frame>\\t<phase>', got {line!r}")
        frame, phase = fields
        if phase in index:
            label = index[phase]
        elif phase.isdigit() and int(phase) < len(names):
            label = int(phase)
        else:
            raise DataError(f"{path}:{line_no}: unknown phase name {phase!r} for {dataset} (known: {', '.join(names)})")
        frames.append(int(frame))
        labels.append(label)
    if not frames:
        raise DataError(f"{path}: no annotation lines")
    return np.asarray(frames, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def write_phase_file(path: str | Path, frames: np.ndarray, labels: np.ndarray, dataset: str = "cholec80") -> None:
    """Write ``frames`` (N,) and 0-based ``labels`` (N,) as a ``Frame\\tPhase`` file with phase names."""
    names = phase_names(dataset)
    frames, labels = np.asarray(frames), np.asarray(labels)
    if frames.shape != labels.shape:
        raise DataError(f"{path}: frames {frames.shape} and labels {labels.shape} differ in length")
    body = "".join(f"{int(f)}\t{names[int(l)]}\n" for f, l in zip(frames, labels))
    Path(path).write_text("Frame\tPhase\n" + body)

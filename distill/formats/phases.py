"""Surgical phase vocabularies, the ``Frame<TAB>Phase`` annotation format and where the datasets keep it.

Cholec80 phase files have a header ``Frame\tPhase`` and one ``<frame>\t<PhaseName>`` line per
frame at 25 fps; M2CAI16 workflow files use the same two columns with 8 phases. Prediction
files use the same format at any frame rate (the frame numbers say which frames are covered).

A frame is named by its **25 fps frame index** whatever rate it was sampled at (frame ``125`` is
the frame at 5 s in every frame folder, label file and feature file); a rate of ``fps`` keeps the
indices divisible by :func:`frame_step`.

Phase files as released: ``<root>/phase_annotations/videoXX-phase.txt`` (Cholec80), and
``[test_]workflow_video_XX.txt`` anywhere under the root (M2CAI16, next to its video, so the
flat layouts of some mirrors work too).
"""

from __future__ import annotations

import re
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
EXTRACTION_RATES = (1, 5, 25)  # frames per second that divide the 25 fps of the videos
M2CAI16_NAME = re.compile(r"(test_)?workflow_video_\d+")


def frame_step(fps: int) -> int:
    """Keep every ``frame_step(fps)``-th frame of a 25 fps video; ``fps`` must divide 25."""
    if fps not in EXTRACTION_RATES:
        raise DataError(f"fps={fps!r}: frame rate must be one of {EXTRACTION_RATES} (a divisor of {VIDEO_FPS})")
    return VIDEO_FPS // fps


def natural_key(name: str) -> tuple:
    """Sort key comparing the digit runs of ``name`` as numbers (``video9`` before ``video10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def natural_sorted(names) -> list[str]:
    """Sort names with their digit runs compared as numbers (:func:`natural_key`)."""
    return sorted(names, key=natural_key)


def phase_names(dataset: str) -> tuple[str, ...]:
    """Phase names of ``dataset`` ('cholec80' or 'm2cai16') in index order."""
    try:
        return PHASES[dataset.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {sorted(PHASES)}") from None


def check_dataset(dataset: str) -> str:
    """``dataset`` lower-cased; DataError unless it is 'cholec80' or 'm2cai16'."""
    phase_names(dataset)
    return dataset.lower()


def phase_annotation_files(root: str | Path, dataset: str) -> dict[str, Path]:
    """``{video name: phase annotation path}`` of every annotated video under ``root``, sorted."""
    root = Path(root)
    dataset = check_dataset(dataset)
    if dataset == "cholec80":
        paths = {p.name.removesuffix("-phase.txt"): p for p in root.glob("phase_annotations/*-phase.txt")}
        expected = "phase_annotations/videoXX-phase.txt"
    else:
        paths = {p.stem: p for p in root.rglob("*workflow_video_*.txt") if M2CAI16_NAME.fullmatch(p.stem)}
        expected = "[test_]workflow_video_XX.txt"
    if not paths:
        raise DataError(f"{root}: no {dataset} phase annotations found (expected {expected})")
    return {name: paths[name] for name in natural_sorted(paths)}


def read_phase_file(path: str | Path, dataset: str = "cholec80") -> tuple[np.ndarray, np.ndarray]:
    """Read a ``Frame\\tPhase`` file.

    Returns ``(frames, labels)``: int64 arrays of shape (N,), frame numbers as written and
    0-based phase indices in the order of :func:`phase_names`; frame numbers must be strictly
    increasing (a line out of order or a repeated frame is refused, as every reader agrees). Phase names may also be given
    as integer indices (some prediction tools write those). Blank lines are skipped; fields may
    be separated by any whitespace.

    Files in the canonical layout (``<digits>\\t<phase>`` on every line, ``\\n`` or ``\\r\\n``
    endings) are parsed with whole-file array operations; any other file, and any file with a
    bad line, goes through the line-by-line parser, which names the first bad line.
    """
    path = Path(path)
    names = phase_names(dataset)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    text = path.read_bytes()
    newline = text.find(b"\n")
    header = text if newline < 0 else text[:newline]
    if header.rstrip(b"\r").split(b"\t")[:2] != [b"Frame", b"Phase"]:
        shown = header.decode(errors="replace")
        raise DataError(f"{path}: expected header 'Frame\\tPhase', got {shown!r}" if text else f"{path}: empty file")
    parsed = _parse_canonical_lines(text, len(header) + 1, names)
    if parsed is None:
        lines = text[len(header) + 1 :].decode(errors="replace").splitlines()
        parsed = _parse_lines(path, lines, names, dataset)
    if parsed[0].size == 0:
        raise DataError(f"{path}: no annotation lines")
    steps = np.diff(parsed[0])
    if np.any(steps <= 0):
        first = int(np.argmax(steps <= 0))
        after, frame = parsed[0][first : first + 2].tolist()
        raise DataError(
            f"{path}: frame {frame} {'repeated' if frame == after else 'out of order'} after frame {after} "
            "(frame numbers must be strictly increasing)"
        )
    return parsed


# (1 << 8n) - 1 for n = 0..8: keeps the low n bytes of a little-endian uint64; and byte patterns.
_LOW_BYTES = np.array([(1 << 8 * n) - 1 for n in range(9)], dtype=np.uint64)
_ZEROS, _SIXES, _HIGH_NIBBLES = (np.uint64(int.from_bytes(bytes([b]) * 8, "little")) for b in (0x30, 0x06, 0xF0))


def _parse_canonical_lines(
    text: bytes, body_start: int, names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(frames, labels)`` of the ``<digits>\\t<phase>`` lines in ``text[body_start:]``, or None
    unless every line has exactly that form with a known phase (the line-by-line parser then
    takes over and names the bad line).

    Vectorised over the bytes: one tab per line locates both fields; each frame number is read as
    one 8-byte word; lines are grouped into runs of one phase name and
    each run's name is looked up once.
    """
    if not text.endswith(b"\n"):
        text += b"\n"
    buf = np.frombuffer(text, dtype=np.uint8)
    marks = np.flatnonzero(buf[body_start:] <= ord("\n")) + body_start  # tabs, newlines, other control bytes
    tabs, line_ends = marks[0::2], marks[1::2]
    if tabs.size == 0 or marks.size % 2 or np.any(buf[tabs] != ord("\t")) or np.any(buf[line_ends] != ord("\n")):
        return None  # not one tab then one newline per line
    line_starts = np.r_[body_start, line_ends[:-1] + 1]
    if text.find(b"\r", body_start) >= 0:  # accepted only as CRLF line endings
        if text.count(b"\r", body_start) != line_ends.size or np.any(buf[line_ends - 1] != ord("\r")):
            return None
        line_ends = line_ends - 1
    frame_width, name_width = tabs - line_starts, line_ends - tabs - 1
    if frame_width.min() < 1 or name_width.min() < 1 or frame_width.max() > 8 or name_width.max() > 24:
        return None  # a missing field, frame numbers of 9+ digits or a name longer than any known

    # Frame numbers: the 8 bytes before each tab as one little-endian uint64 (the number's first
    # digit lowest), bytes left of the number set to "0", checked and converted 8 digits at once.
    words = np.ndarray((buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))  # words[i] = bytes i..i+7
    pad = _LOW_BYTES[8 - frame_width]
    digits = (words[tabs - 8] & ~pad) | (_ZEROS & pad)
    if np.any((digits & _HIGH_NIBBLES) != _ZEROS) or np.any(((digits + _SIXES) & _HIGH_NIBBLES) != _ZEROS):
        return None  # a byte outside "0".."9"
    digits -= _ZEROS
    digits = (digits * np.uint64(10) + (digits >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    digits = (digits * np.uint64(100) + (digits >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    frames = ((digits * np.uint64(10000) + (digits >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.int64)

    # Runs of one phase name, keyed by the name's length and bytes 0-7, 8-15 and its last 8 (read
    # as little-endian uint64 at any offset, masked to the name): exact for names up to 24 bytes.
    near_end = tabs + 9 >= words.size  # the last lines, whose words would run past the buffer
    head = words[np.where(near_end, 0, tabs + 1)] & _LOW_BYTES[np.minimum(name_width, 8)]
    middle = words[np.where(near_end, 0, tabs + 9)] & _LOW_BYTES[np.clip(name_width - 8, 0, 8)]
    tail = np.where(name_width > 16, words[line_ends - 8], 0)
    key_changes = (np.diff(name_width) != 0) | (np.diff(head) != 0) | (np.diff(middle) != 0) | (np.diff(tail) != 0)
    run_starts = np.flatnonzero(np.r_[True, key_changes] | near_end)  # lines near the end: own runs
    run_ends = np.r_[run_starts[1:], tabs.size]
    index = {name.encode(): i for i, name in enumerate(names)} | {str(i).encode(): i for i in range(len(names))}
    run_labels = [index.get(text[tabs[first] + 1 : line_ends[first]]) for first in run_starts]
    if None in run_labels:
        return None
    return frames, np.repeat(np.array(run_labels, dtype=np.int64), run_ends - run_starts)


def _parse_lines(path: Path, lines: list[str], names: tuple[str, ...], dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, labels)`` of the body ``lines`` (line 2 on); DataError naming the first bad line."""
    index = {name: i for i, name in enumerate(names)}
    frames, labels = [], []
    for line_no, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split()
        try:
            frame, phase = int(fields[0]), fields[1]
        except (ValueError, IndexError):
            frame = None
        if len(fields) != 2 or frame is None:
            raise DataError(f"{path}:{line_no}: expected '<frame>\\t<phase>', got {line!r}")
        if phase in index:
            label = index[phase]
        elif phase.isdigit() and int(phase) < len(names):
            label = int(phase)
        else:
            raise DataError(f"{path}:{line_no}: unknown phase name {phase!r} for {dataset} (known: {', '.join(names)})")
        frames.append(frame)
        labels.append(label)
    return np.asarray(frames, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def write_phase_file(path: str | Path, frames: np.ndarray, labels: np.ndarray, dataset: str = "cholec80") -> None:
    """Write ``frames`` (N,) and 0-based ``labels`` (N,) as a ``Frame\\tPhase`` file with phase names."""
    names = phase_names(dataset)
    frames, labels = np.asarray(frames), np.asarray(labels)
    if frames.shape != labels.shape:
        raise ValueError(f"{path}: frames {frames.shape} and labels {labels.shape} differ in length")
    body = "".join(f"{int(frame)}\t{names[int(label)]}\n" for frame, label in zip(frames, labels))
    Path(path).write_text("Frame\tPhase\n" + body)

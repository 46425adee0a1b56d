"""Cholec80 / M2CAI16 on disk: the video and annotation readers, frame extraction of a dataset, video splits.

Layouts read (names exactly as released)::

    cholec80/videos/videoXX.mp4
    cholec80/phase_annotations/videoXX-phase.txt    Frame<TAB>Phase, one line per 25 fps frame
    cholec80/tool_annotations/videoXX-tool.txt      Frame<TAB>Grasper...SpecimenBag, every 25th frame
    m2cai16/train_dataset/workflow_video_XX.mp4       + workflow_video_XX.txt        (27 videos)
    m2cai16/test_dataset/test_workflow_video_XX.mp4   + test_workflow_video_XX.txt   (14 videos)

M2CAI16 files are found anywhere under the root with the label file next to its video, so the
flat layouts of some mirrors work too. A video's name is its file stem (``video01``,
``test_workflow_video_03``); frame folders, feature files and predictions are keyed by it.
The phase files themselves are found by :func:`distill.formats.phases.phase_annotation_files`.

**Annotation length.** A phase file must annotate exactly as many frames as the video decodes
to (the real Cholec80 and M2CAI16 files do); ``frame_tolerance`` accepts a few frames of
difference for decoders that drop trailing frames.

**Splits** (``split=``):

- ``"paper"`` (Cholec80, default): videos 1-40 train, 41-80 test (Ding et al. 2022);
- ``"tecno"`` (Cholec80): 1-40 train, 41-48 validation, 49-80 test (TeCNO, EndoNet);
- ``"official"`` (M2CAI16, default): ``workflow_video_*`` train, ``test_workflow_video_*`` test;
- or a mapping ``{"train": [...], "val": [...], "test": [...]}`` of video names.

Cholec80 splits are positions in the number-sorted video list. With all 80 videos they are
exactly the canonical ids; a tree with another number of videos (a synthetic one) keeps the
proportions, every non-empty part getting at least one video. A split without its own
validation part gives the last ``val_fraction`` of its training videos (at least one) to
validation, so model selection never sees a test video; ``val_fraction=0`` keeps the paper's
40 training videos and no validation (for evaluation: fitting needs validation videos, which choose
``best.ckpt``, and refuses a split without them). The label budget ``train_videos`` (the low-data regime)
then keeps the first N (int) or the first fraction (float) of the training videos.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from data_modules.frames import VideoSource, extract_frames
from distill.errors import DataError
from distill.formats.phases import (
    CHOLEC80_TOOLS,
    M2CAI16_NAME,
    check_dataset,
    frame_step,
    natural_sorted,
    phase_annotation_files,
    read_phase_file,
)

UNLABELED = "unlabeled"  # any .mp4 files / frame folders, no annotations (self-supervision only)
CHOLEC80_SPLITS = {"paper": (40, 0, 40), "tecno": (40, 8, 32)}  # (train, val, test) video counts
DEFAULT_SPLITS = {"cholec80": "paper", "m2cai16": "official"}
SPLIT_PARTS = ("train", "val", "test")

# --------------------------------------------------------------------------------------------
# Dataset readers


def video_files(root: str | Path, dataset: str) -> dict[str, Path]:
    """``{video name: video path}`` under ``root``: Cholec80 ``videos/*.mp4``, M2CAI16 ``**/*workflow_video_*.mp4``,
    ``unlabeled`` every ``**/*.mp4``; sorted by name."""
    root = Path(root)
    if dataset != UNLABELED:
        dataset = check_dataset(dataset)
    glob = {"cholec80": "videos/*.mp4", "m2cai16": "**/*workflow_video_*.mp4", UNLABELED: "**/*.mp4"}[dataset]
    paths = sorted(p for p in root.glob(glob) if dataset != "m2cai16" or M2CAI16_NAME.fullmatch(p.stem))
    if not paths:
        raise DataError(f"{root}: no videos found (expected {glob})")
    by_name = {p.stem: p for p in paths}
    if len(by_name) != len(paths):
        raise DataError(f"{root}: several videos share a file name; frame folders are named by file stem")
    return {name: by_name[name] for name in natural_sorted(by_name)}


def annotation_path_of(root: str | Path, dataset: str, video_path: Path) -> Path:
    """Where the phase annotation of ``video_path`` lives (Cholec80 folder, or next to the M2CAI16 video)."""
    if check_dataset(dataset) == "cholec80":
        return Path(root) / "phase_annotations" / f"{video_path.stem}-phase.txt"
    return video_path.with_suffix(".txt")


def read_tool_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Cholec80 ``Frame\\tGrasper...SpecimenBag`` tool file.

    Returns:
        ``(frames, flags)``: (N,) int64 25 fps frame indices and (N, 7) uint8 presence flags in
        ``CHOLEC80_TOOLS`` order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tool annotation file not found")
    header = path.read_text().split("\n", 1)[0].split()
    if header != ["Frame", *CHOLEC80_TOOLS]:
        raise DataError(f"{path}: expected header 'Frame' + {', '.join(CHOLEC80_TOOLS)}, got {' '.join(header)!r}")
    try:
        table = np.loadtxt(path, skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise DataError(f"{path}: {str(err).splitlines()[0]}") from None
    if table.shape[1] != 1 + len(CHOLEC80_TOOLS) or not np.isin(table[:, 1:], (0, 1)).all():
        raise DataError(f"{path}: expected rows of a frame number and {len(CHOLEC80_TOOLS)} 0/1 flags")
    return table[:, 0], table[:, 1:].astype(np.uint8)


def phase_labels_at(path: Path, dataset: str, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotated frames (K,) int64 at ``fps`` (25 fps indices divisible by 25 / fps) and their labels (K,)."""
    frames, labels = read_phase_file(path, dataset)
    keep = frames % frame_step(fps) == 0
    return frames[keep], labels[keep]


def extract_dataset_frames(
    data_root: str | Path,
    out_dir: str | Path,
    dataset: str = "cholec80",
    *,
    frame_tolerance: int = 0,
    **extract_kwargs: Any,
) -> list[str]:
    """Extract the frames of every video of a Cholec80 / M2CAI16 / unlabeled tree.

    Each annotated video must have its phase file, which must name known phases and annotate
    as many frames as the video decodes to (+- ``frame_tolerance``); a phase file without its video
    is left out with a warning. ``out_dir`` must lie outside the folder the videos are searched in
    (a re-run removes the frame files it finds in its video folders). ``extract_kwargs`` go to
    :func:`~data_modules.frames.extract_frames` (fps, size, frame_pattern, workers, progress).

    Returns:
        names of the videos extracted by this call (already finished ones are skipped).
    """
    video_folder = Path(data_root) / "videos" if dataset == "cholec80" else Path(data_root)
    if Path(out_dir).resolve().is_relative_to(video_folder.resolve()):
        raise DataError(
            f"{out_dir}: inside the video folder {video_folder}; extract frames to a folder outside it "
            "(frame folders would mix with the videos, and a re-run removes the frame files it finds)"
        )
    sources = []
    for name, path in video_files(data_root, dataset).items():
        if dataset == UNLABELED:
            sources.append(VideoSource(name, path))
            continue
        annotation = annotation_path_of(data_root, dataset, path)
        if not annotation.is_file():
            raise DataError(f"{annotation}: annotation file not found (needed for {path})")
        sources.append(VideoSource(name, path, len(read_phase_file(annotation, dataset)[0]), annotation))
    if dataset != UNLABELED:
        annotations = phase_annotation_files(data_root, dataset)
        extracted = {source.name for source in sources}
        orphans = [str(path) for name, path in annotations.items() if name not in extracted]
        if orphans:
            warnings.warn(
                f"{data_root}: {len(orphans)} phase annotation(s) without their video left out "
                f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}); "
                f"extracting {len(sources)} of {len(annotations)} annotated videos",
                stacklevel=2,
            )
    return extract_frames(sources, out_dir, frame_tolerance=frame_tolerance, **extract_kwargs)


# --------------------------------------------------------------------------------------------
# Splits


def scale_split(counts: Sequence[int], num_videos: int) -> tuple[int, ...]:
    """Part sizes for ``num_videos`` videos with the proportions of ``counts``.

    Exactly ``counts`` when ``num_videos == sum(counts)``; otherwise floor of the proportional
    size, at least 1 for every non-empty part, remainders to the largest shortfall.
    """
    counts = np.asarray(counts)
    if num_videos == counts.sum():
        return tuple(int(c) for c in counts)
    nonempty = counts > 0
    if num_videos < nonempty.sum():
        raise DataError(
            f"{num_videos} videos cannot fill the {int(nonempty.sum())} non-empty parts of a {tuple(counts)} split"
        )
    ideal = counts * num_videos / counts.sum()
    scaled = np.where(nonempty, np.maximum(np.floor(ideal), 1), 0).astype(int)
    while scaled.sum() > num_videos:
        scaled[np.argmax(scaled)] -= 1
    while scaled.sum() < num_videos:
        scaled[np.argmax(ideal - scaled)] += 1
    return tuple(int(c) for c in scaled)


def split_videos(
    videos: Sequence[str],
    dataset: str,
    split: str | Mapping[str, Sequence[str]] | None = None,
    val_fraction: float = 0.2,
) -> dict[str, list[str]]:
    """Assign ``videos`` to ``{"train", "val", "test"}`` (see the module docstring for the rules).

    Returns:
        the three parts as lists of video names, disjoint, in natural order.
    """
    dataset = check_dataset(dataset)
    videos = natural_sorted(videos)
    split = DEFAULT_SPLITS[dataset] if split is None else split
    if isinstance(split, Mapping):
        parts = {part: natural_sorted(split.get(part, ())) for part in SPLIT_PARTS}
        unknown = set(split) - set(SPLIT_PARTS)
        missing = sorted(set(sum(parts.values(), [])) - set(videos), key=str)
        if unknown or missing:
            raise DataError(f"split: unknown parts {sorted(unknown)} or videos without annotations {missing[:3]}")
        if sum(map(len, parts.values())) != len(set(sum(parts.values(), []))):
            raise DataError(f"split: a video is in more than one part: {split}")
        return parts
    if dataset == "cholec80" and split in CHOLEC80_SPLITS:
        counts = scale_split(CHOLEC80_SPLITS[split], len(videos))
        if sum(CHOLEC80_SPLITS[split]) != len(videos):
            rank_zero_info(
                f"cholec80 split {split!r}: {len(videos)} videos instead of {sum(CHOLEC80_SPLITS[split])}; parts scaled to {counts}"
            )
        bounds = np.cumsum((0, *counts))
        parts = {part: videos[bounds[i] : bounds[i + 1]] for i, part in enumerate(SPLIT_PARTS)}
    elif dataset == "m2cai16" and split == "official":
        test = [v for v in videos if v.startswith("test_")]
        parts = {"train": [v for v in videos if v not in test], "val": [], "test": test}
    else:
        known = list(CHOLEC80_SPLITS) if dataset == "cholec80" else ["official"]
        raise DataError(f"split={split!r}: unknown {dataset} split; use one of {known} or a mapping of video names")
    if not parts["val"] and val_fraction > 0 and len(parts["train"]) > 1:
        num_val = min(len(parts["train"]) - 1, max(1, round(val_fraction * len(parts["train"]))))
        parts["train"], parts["val"] = parts["train"][:-num_val], parts["train"][-num_val:]
    return parts


def first_videos(videos: Sequence[str], budget: int | float | None) -> list[str]:
    """The label budget: the first ``budget`` videos (int) or the first fraction of them (float)."""
    videos = list(videos)
    if budget is None:
        return videos
    if isinstance(budget, float) and 0 < budget <= 1:
        count = max(1, round(budget * len(videos)))
    elif isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget <= len(videos):
        count = budget
    else:
        raise DataError(
            f"train_videos={budget!r}: need an int in [1, {len(videos)}] (the training split) or a fraction in (0, 1]"
        )
    return videos[:count]

"""Synthetic laparoscopic cholecystectomy videos in the real Cholec80 / M2CAI16 layouts.

No surgical video can be downloaded here, so tests and the demo read these trees through the
real readers. Layouts and annotation formats are exactly the releases':

    cholec80: videos/videoXX.mp4, phase_annotations/videoXX-phase.txt (Frame<TAB>Phase, every
              25 fps frame), tool_annotations/videoXX-tool.txt (Frame<TAB>Grasper...SpecimenBag,
              every 25th frame, 0/1 flags)
    m2cai16:  train_dataset/workflow_video_XX.{mp4,txt}, test_dataset/test_workflow_video_XX.{mp4,txt}
              (8 phases, TrocarPlacement first; labels only, as in the workflow challenge; the
              videos are split train:test about 27:14)

Videos are 25 fps mp4 (``mp4v``) with a black circular endoscope margin. Phases follow the
canonical order with random durations (CleaningCoagulation is sometimes skipped) and
occasional back-and-forth transitions (a short return to the previous phase). Each phase has
its own look, built from parts that phases share, so no single pixel colour names the phase:
anatomy (gallbladder under fat, cystic duct with clips, exposed liver bed, specimen bag,
blood, trocar), instruments (coloured shaft-and-head shapes whose presence follows per-phase
probabilities and is written to the tool file) and motion (camera pan and instrument
oscillation with per-phase amplitude and speed). Per-video tissue colours, instrument ports,
brightness and noise vary.

Everything derives from ``seed``: the same seed gives the same annotations and frames.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from distill.errors import DataError
from distill.formats.phases import CHOLEC80_TOOLS, VIDEO_FPS, phase_names, write_phase_file

# Relative mean durations (Cholec80: long Calot triangle dissection and gallbladder dissection).
PHASE_WEIGHTS = {
    "TrocarPlacement": 1.0,
    "Preparation": 1.0,
    "CalotTriangleDissection": 3.0,
    "ClippingCutting": 1.5,
    "GallbladderDissection": 3.0,
    "GallbladderPackaging": 1.0,
    "CleaningCoagulation": 1.5,
    "GallbladderRetraction": 1.0,
}
# Probability that each tool is in view during a phase (the rest are 0).
TOOL_PROBABILITY = {
    "TrocarPlacement": {},
    "Preparation": {"Grasper": 0.9, "Hook": 0.4},
    "CalotTriangleDissection": {"Grasper": 0.95, "Hook": 0.95},
    "ClippingCutting": {"Grasper": 0.9, "Clipper": 0.85, "Scissors": 0.4},
    "GallbladderDissection": {"Grasper": 0.95, "Hook": 0.9, "Bipolar": 0.05},
    "GallbladderPackaging": {"Grasper": 0.8, "SpecimenBag": 1.0},
    "CleaningCoagulation": {"Grasper": 0.5, "Bipolar": 0.7, "Irrigator": 0.8},
    "GallbladderRetraction": {"Grasper": 0.7, "SpecimenBag": 0.95},
}
TOOL_KEEP_PROBABILITY = 0.7  # chance that a tool's presence carries over to the next second
BACK_AND_FORTH_PROBABILITY = 0.25  # per phase: a short return to the previous phase inside it
SKIP_CLEANING_PROBABILITY = 0.1
M2CAI16_TEST_FRACTION = 14 / 41


@dataclass(frozen=True)
class PhaseLook:
    """What a phase shows; lengths in units of the frame's shorter side / 128."""

    gallbladder: float = 0.0  # size of the gallbladder (0 = removed)
    fat: int = 0  # yellow fat patches over it
    duct: bool = False  # cystic duct exposed
    clips: int = 0  # clips on the duct
    liver_bed: bool = False  # dark dissected area
    blood: int = 0  # blood pools
    bag_pull: float = 0.0  # how far the specimen bag is pulled toward the edge (0..1)
    trocar: bool = False
    pan: float = 4.0  # camera pan amplitude
    pan_hz: float = 0.1
    tool_swing: float = 6.0  # instrument tip oscillation amplitude
    tool_hz: float = 0.5


PHASE_LOOKS = {
    "TrocarPlacement": PhaseLook(trocar=True, pan=14.0, pan_hz=0.3, tool_swing=0.0),
    "Preparation": PhaseLook(gallbladder=1.0, fat=5, pan=8.0, pan_hz=0.12, tool_swing=10.0, tool_hz=0.3),
    "CalotTriangleDissection": PhaseLook(gallbladder=1.0, fat=2, duct=True, pan=3.0, tool_swing=5.0, tool_hz=1.2),
    "ClippingCutting": PhaseLook(gallbladder=1.0, duct=True, clips=3, pan=2.0, tool_swing=3.0, tool_hz=0.4),
    "GallbladderDissection": PhaseLook(gallbladder=0.75, liver_bed=True, pan=5.0, tool_swing=8.0, tool_hz=1.0),
    "GallbladderPackaging": PhaseLook(pan=4.0, tool_swing=6.0, tool_hz=0.6),
    "CleaningCoagulation": PhaseLook(liver_bed=True, blood=4, pan=7.0, pan_hz=0.4, tool_swing=9.0, tool_hz=0.8),
    "GallbladderRetraction": PhaseLook(liver_bed=True, bag_pull=1.0, pan=10.0, pan_hz=0.2, tool_swing=4.0, tool_hz=0.3),
}
# BGR shaft colour, shaft thickness and head shape of each drawn instrument.
TOOL_STYLE = {
    "Grasper": ((95, 95, 95), 4, "jaws"),
    "Bipolar": ((170, 90, 40), 3, "prongs"),
    "Hook": ((210, 210, 210), 2, "hook"),
    "Scissors": ((70, 70, 70), 3, "blades"),
    "Clipper": ((45, 45, 45), 4, "clip_head"),
    "Irrigator": ((235, 235, 235), 5, "none"),
}


def video_names(dataset: str, num_videos: int) -> list[str]:
    """Names written for ``num_videos`` videos (M2CAI16: about 27:14 train:test, both non-empty)."""
    if dataset == "cholec80":
        return [f"video{i:02d}" for i in range(1, num_videos + 1)]
    num_test = min(num_videos - 1, max(1, round(num_videos * M2CAI16_TEST_FRACTION)))
    num_train = num_videos - num_test
    return [f"workflow_video_{i:02d}" for i in range(1, num_train + 1)] + [
        f"test_workflow_video_{i:02d}" for i in range(1, num_test + 1)
    ]


def write_synthetic_surgical(
    out: str | Path,
    dataset: str = "cholec80",
    num_videos: int = 8,
    seed: int = 0,
    size: tuple[int, int] = (128, 160),
    duration_s: tuple[float, float] = (30.0, 90.0),
    overwrite: bool = False,
) -> list[Path]:
    """Write a synthetic ``dataset`` ('cholec80' or 'm2cai16') tree under ``out``.

    Args:
        size: (height, width) of the frames.
        duration_s: (min, max) video length in seconds, drawn uniformly per video.
        overwrite: replace the dataset folders of an existing tree (refused otherwise: ``out`` must be
            missing or empty).

    Returns:
        the written video paths.
    """
    names_of_phases = phase_names(dataset)
    dataset = dataset.lower()
    if num_videos < (2 if dataset == "m2cai16" else 1):
        raise DataError(f"num_videos={num_videos}: too few videos for {dataset}")
    height, width = int(size[0]), int(size[1])
    if min(height, width) < 32:
        raise DataError(f"size={size}: frames must be at least 32x32")
    low, high = duration_s
    if not 0 < low <= high:
        raise DataError(f"duration_s={duration_s}: need 0 < min <= max")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out}: already holds files; write into an empty folder (or pass --overwrite to replace the dataset)"
            )
        for folder in DATASET_FOLDERS[dataset]:
            shutil.rmtree(out / folder, ignore_errors=True)
    paths = []
    for number, name in enumerate(video_names(dataset, num_videos), start=1):
        rng = np.random.default_rng([seed, number, len(names_of_phases)])
        num_frames = max(VIDEO_FPS, round(rng.uniform(low, high) * VIDEO_FPS))
        labels = phase_sequence(rng, names_of_phases, num_frames)
        tools = tool_presence(rng, [names_of_phases[label] for label in labels[::VIDEO_FPS]])
        if dataset == "cholec80":
            video_path = out / "videos" / f"{name}.mp4"
            write_phase_file(
                _mkdir(out / "phase_annotations") / f"{name}-phase.txt", np.arange(num_frames), labels, dataset
            )
            write_tool_file(_mkdir(out / "tool_annotations") / f"{name}-tool.txt", tools)
        else:
            video_path = out / ("test_dataset" if name.startswith("test_") else "train_dataset") / f"{name}.mp4"
            write_phase_file(_mkdir(video_path.parent) / f"{name}.txt", np.arange(num_frames), labels, dataset)
        scene = Scene(rng, height, width)
        write_video(
            video_path,
            (scene.render(t, names_of_phases[label], tools[t // VIDEO_FPS]) for t, label in enumerate(labels)),
            (height, width),
        )
        paths.append(video_path)
    return paths


DATASET_FOLDERS = {
    "cholec80": ("videos", "phase_annotations", "tool_annotations"),
    "m2cai16": ("train_dataset", "test_dataset"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def phase_sequence(rng: np.random.Generator, names: tuple[str, ...], num_frames: int) -> np.ndarray:
    """(num_frames,) int64 phase labels: canonical order, random durations, occasional returns."""
    weights = np.array([PHASE_WEIGHTS[name] for name in names])
    if "CleaningCoagulation" in names and rng.random() < SKIP_CLEANING_PROBABILITY:
        weights[names.index("CleaningCoagulation")] = 0.0
    present = weights > 0
    minimum = min(VIDEO_FPS, num_frames // (2 * present.sum()))
    fractions = np.zeros(len(names))
    fractions[present] = rng.dirichlet(4.0 * weights[present])
    counts = np.where(present, minimum + np.floor(fractions * (num_frames - minimum * present.sum())), 0).astype(int)
    counts[np.flatnonzero(present)[-1]] += num_frames - counts.sum()
    labels = np.repeat(np.arange(len(names)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for phase in np.flatnonzero(present)[1:]:
        length = counts[phase]
        if length >= 8 and rng.random() < BACK_AND_FORTH_PROBABILITY:
            back = max(1, int(length * rng.uniform(0.1, 0.25)))
            begin = starts[phase] + int(rng.integers(length // 4, length - length // 4 - back + 1))
            labels[begin : begin + back] = labels[starts[phase] - 1]
    return labels.astype(np.int64)


def tool_presence(rng: np.random.Generator, phase_per_second: list[str]) -> np.ndarray:
    """(seconds, 7) uint8 tool flags, one row per 25 frames, in CHOLEC80_TOOLS order."""
    flags = np.zeros((len(phase_per_second), len(CHOLEC80_TOOLS)), dtype=np.uint8)
    for second, phase in enumerate(phase_per_second):
        probability = np.array([TOOL_PROBABILITY[phase].get(tool, 0.0) for tool in CHOLEC80_TOOLS])
        drawn = rng.random(len(CHOLEC80_TOOLS)) < probability
        keep = second > 0 and phase == phase_per_second[second - 1]
        if keep:
            carried = rng.random(len(CHOLEC80_TOOLS)) < TOOL_KEEP_PROBABILITY
            drawn = np.where(carried & (probability > 0), flags[second - 1].astype(bool), drawn)
        flags[second] = drawn
    return flags


def write_tool_file(path: Path, flags: np.ndarray) -> None:
    """Cholec80 tool file: header ``Frame\\tGrasper...SpecimenBag``, row k at frame 25 k."""
    rows = "".join(f"{second * VIDEO_FPS}\t" + "\t".join(map(str, row)) + "\n" for second, row in enumerate(flags))
    path.write_text("Frame\t" + "\t".join(CHOLEC80_TOOLS) + "\n" + rows)


def write_video(path: Path, frames, size: tuple[int, int]) -> None:
    """Write (H, W, 3) uint8 BGR ``frames`` as a 25 fps mp4v video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (width, height))
    if not writer.isOpened():
        raise DataError(f"{path}: OpenCV cannot write mp4v video here")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()


class Scene:
    """One video's fixed appearance (tissue, anatomy layout, instrument ports, margin) and its renderer."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.unit = min(height, width) / 128
        self.margin = int(16 * self.unit)  # pan room around the visible tissue
        self.tissue = self._tissue_texture(rng)
        centre = np.array([width / 2, height / 2]) + rng.uniform(-0.05, 0.05, 2) * (width, height)
        self.anchor = centre + rng.uniform(-0.08, 0.08, 2) * (width, height)  # gallbladder / work area
        self.phases = rng.uniform(0, 2 * np.pi, 4)  # motion phase offsets
        self.ports = {tool: rng.uniform(-np.pi, np.pi) for tool in TOOL_STYLE}  # instrument entry angles
        self.fat_spots = rng.uniform(-1, 1, (6, 2))
        self.blood_spots = rng.uniform(-1, 1, (5, 2))
        self.brightness = rng.uniform(0.85, 1.1)
        self.noise = rng.normal(0, 4, (8, height, width, 1)).astype(np.int16)
        radius = 0.5 * width * rng.uniform(0.88, 0.96)
        yy, xx = np.mgrid[:height, :width]
        inside = (xx - width / 2 - rng.uniform(-2, 2)) ** 2 + (yy - height / 2) ** 2 <= radius**2
        self.view = inside[..., None]  # (H, W, 1) endoscope field of view

    def _tissue_texture(self, rng: np.random.Generator) -> np.ndarray:
        """(H + 2 m, W + 2 m, 3) uint8 BGR tissue: two per-video reds mixed by smooth noise."""
        shape = (self.height + 2 * self.margin, self.width + 2 * self.margin)
        mix = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 6 * self.unit)
        mix = (mix - mix.min()) / (np.ptp(mix) + 1e-6)
        grain = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 1.0) - 0.5
        dark = np.array([60, 70, 150]) + rng.uniform(-15, 15, 3)
        light = np.array([120, 140, 215]) + rng.uniform(-15, 15, 3)
        tissue = dark + mix[..., None] * (light - dark) + 40 * grain[..., None]
        return np.clip(tissue, 0, 255).astype(np.uint8)

    def _wave(self, t: float, hz: float, which: int) -> float:
        return float(np.sin(2 * np.pi * hz * t + self.phases[which]))

    def render(self, frame_index: int, phase: str, tools: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR frame ``frame_index`` showing ``phase`` with the flagged ``tools`` (7,)."""
        look, u, t = PHASE_LOOKS[phase], self.unit, frame_index / VIDEO_FPS
        pan = np.clip(
            look.pan * u * np.array([self._wave(t, look.pan_hz, 0), self._wave(t, look.pan_hz * 0.7, 1)]),
            -self.margin,
            self.margin,
        )
        dx, dy = (self.margin + pan).astype(int)
        frame = self.tissue[dy : dy + self.height, dx : dx + self.width].copy()
        centre = self.anchor - pan
        self._draw_anatomy(frame, look, centre, tools)
        tip = centre + look.tool_swing * u * np.array(
            [self._wave(t, look.tool_hz, 2), self._wave(t, look.tool_hz * 1.3, 3)]
        )
        for tool, present in zip(CHOLEC80_TOOLS, tools):
            if present and tool in TOOL_STYLE:
                self._draw_tool(frame, tool, tip)
        noisy = frame.astype(np.int16) * self.brightness + self.noise[frame_index % len(self.noise)]
        return np.where(self.view, np.clip(noisy, 0, 255), 0).astype(np.uint8)

    def _draw_anatomy(self, frame: np.ndarray, look: PhaseLook, centre: np.ndarray, tools: np.ndarray) -> None:
        u = self.unit

        def point(offset) -> tuple[int, int]:  # pixel at ``offset`` (in units) from the work-area centre
            x, y = centre + np.asarray(offset) * u
            return int(x), int(y)

        if look.trocar:
            cv2.circle(frame, point((-30, -20)), int(16 * u), (150, 150, 160), -1)
            cv2.circle(frame, point((-30, -20)), int(9 * u), (40, 40, 45), -1)
        if look.liver_bed:
            cv2.ellipse(frame, point((10, 8)), (int(34 * u), int(18 * u)), 20, 0, 360, (35, 30, 95), -1)
        if look.gallbladder:
            axes = (int(32 * u * look.gallbladder), int(18 * u * look.gallbladder))
            lifted = 48 * (1 - look.gallbladder)  # off the liver bed as the dissection goes on
            cv2.ellipse(frame, point((0, -lifted)), axes, -25, 0, 360, (90, 160, 120), -1)
        for x, y in self.fat_spots[: look.fat]:
            cv2.circle(frame, point((28 * x, 16 * y)), int(9 * u), (110, 200, 225), -1)
        if look.duct:
            cv2.line(frame, point((20, 14)), point((50, 34)), (200, 225, 235), max(1, int(3 * u)))
            for k in range(look.clips):
                cv2.rectangle(
                    frame, point((26 + 7 * k, 15 + 5 * k)), point((29 + 7 * k, 22 + 5 * k)), (215, 215, 215), -1
                )
        for x, y in self.blood_spots[: look.blood]:
            cv2.circle(frame, point((35 * x, 22 * y)), int(6 * u), (20, 20, 120), -1)
        if tools[CHOLEC80_TOOLS.index("SpecimenBag")]:
            bag = point((-40 * look.bag_pull, -30 * look.bag_pull))
            size = 1.0 - 0.4 * look.bag_pull
            cv2.ellipse(frame, bag, (int(30 * u * size), int(22 * u * size)), 10, 0, 360, (205, 215, 200), -1)
            cv2.ellipse(frame, bag, (int(12 * u * size), int(8 * u * size)), 10, 0, 360, (90, 160, 120), -1)

    def _draw_tool(self, frame: np.ndarray, tool: str, tip: np.ndarray) -> None:
        colour, thickness, head = TOOL_STYLE[tool]
        u = self.unit
        angle = self.ports[tool]
        direction = np.array([np.cos(angle), np.sin(angle)])
        port = tip + direction * 2 * max(self.height, self.width)
        head_at = tip + direction * 4 * u  # tools of one phase share the work area but not the tip
        normal = np.array([-direction[1], direction[0]])

        def as_point(p: np.ndarray) -> tuple[int, int]:
            return int(p[0]), int(p[1])

        cv2.line(frame, as_point(port), as_point(head_at), colour, max(1, int(thickness * u)))
        if head == "jaws":
            for side in (-1, 1):
                cv2.line(
                    frame,
                    as_point(head_at),
                    as_point(head_at - direction * 9 * u + normal * side * 4 * u),
                    (60, 60, 60),
                    max(1, int(2 * u)),
                )
        elif head == "prongs":
            for side in (-1, 1):
                cv2.line(
                    frame,
                    as_point(head_at + normal * side * 2 * u),
                    as_point(head_at - direction * 8 * u + normal * side * 2 * u),
                    (230, 230, 230),
                    1,
                )
        elif head == "hook":
            end = head_at - direction * 6 * u
            cv2.line(frame, as_point(head_at), as_point(end), (230, 230, 230), max(1, int(2 * u)))
            cv2.line(frame, as_point(end), as_point(end + normal * 4 * u), (230, 230, 230), max(1, int(2 * u)))
        elif head == "blades":
            for side in (-1, 1):
                cv2.line(
                    frame,
                    as_point(head_at),
                    as_point(head_at - direction * 10 * u + normal * side * 6 * u),
                    (180, 180, 180),
                    max(1, int(2 * u)),
                )
        elif head == "clip_head":
            corners = [
                head_at + normal * 4 * u,
                head_at - normal * 4 * u,
                head_at - direction * 8 * u - normal * 4 * u,
                head_at - direction * 8 * u + normal * 4 * u,
            ]
            cv2.fillConvexPoly(frame, np.array(corners, dtype=np.int32), (200, 200, 200))

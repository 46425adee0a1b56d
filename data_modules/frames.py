"""Frame folders: where extracted frames live, and the video -> frames extractor.

A frame is named by its **25 fps frame index** whatever rate it was extracted at, so frame
``125`` is the frame at 5 s in every folder, label file and feature file. Folders written by
other tools are read through a :class:`FramePattern`:

- ``{video}/{frame}.jpg`` (default; DistillingSelf, TMRNet): ``video01/125.jpg``
- ``{video}/{video}_{frame:06d}.png`` (TeCNO): ``video01/video01_000125.png``

``extract_frames`` decodes videos with OpenCV, keeps one frame per ``1 / fps`` seconds of the
video's own time (its ``CAP_PROP_FPS``; every ``25 / fps``-th frame of a 25 fps video), cuts the
black endoscope margin, resizes (250x250 by default) and writes the frames, one video per
process. **Frame rates.** Annotated videos (Cholec80, M2CAI16) must be 25 fps, since their
annotations number 25 fps frames: another rate is refused (re-encode the video); unlabelled
videos may have any rate (a 10 fps video at ``fps=5`` gives frames 0, 5, 10, ..., each 0.2 s
apart; asked for more frames per second than it has, it gives all of its frames). It is resumable: a video's completion marker ``<out>/<video>/.complete.json`` is
written (atomically) only after all its frames, so finished videos are skipped and an
interrupted one is redone from scratch. A folder finished with other settings (another fps, size
or pattern) is never replaced without ``overwrite``; a video that cannot be decoded leaves no
folder behind, and all such videos are reported together after the others are extracted.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import string
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from distill.errors import DataError
from distill.formats.phases import VIDEO_FPS, frame_step, natural_sorted
from distill.utils import child_path, is_disk_full, write_text_atomic

DEFAULT_FRAME_PATTERN = "{video}/{frame}.jpg"
TECNO_FRAME_PATTERN = "{video}/{video}_{frame:06d}.png"
COMPLETION_MARKER = ".complete.json"
FPS_TOLERANCE = 0.05  # an annotated video's rate may differ this much from 25 fps (container rounding)


@dataclass(frozen=True)
class FramePattern:
    """Path of frame ``frame`` (25 fps index) of ``video`` under a frames root.

    ``pattern`` is a ``str.format`` template with the fields ``{video}`` and ``{frame}`` (a
    format spec such as ``{frame:06d}`` is allowed). It must start with ``{video}/``: every
    video has its own folder (which also holds the extraction's completion marker).
    """

    pattern: str = DEFAULT_FRAME_PATTERN

    def __post_init__(self) -> None:
        prefix = "{video}/"
        file_part = self.pattern[len(prefix) :]
        if not self.pattern.startswith(prefix) or "/" in file_part:
            raise DataError(
                f"frame pattern {self.pattern!r}: must look like '{{video}}/<file name>' (one folder per video)"
            )
        fields = [field for _, field, _, _ in string.Formatter().parse(file_part) if field is not None]
        if fields.count("frame") != 1 or set(fields) - {"video", "frame"}:
            raise DataError(
                f"frame pattern {self.pattern!r}: the file name needs one {{frame}} field and no fields but {{video}}"
            )

    def video_dir(self, root: str | Path, video: str, source: str | Path | None = None) -> Path:
        """``root/<video>``; a video name that would leave ``root`` is refused (:func:`~distill.utils.child_path`)."""
        return child_path(root, video, source)

    def path(self, root: str | Path, video: str, frame: int) -> Path:
        return self.video_dir(root, video) / self.pattern[len("{video}/") :].format(video=video, frame=int(frame))

    def file_regex(self, video: str) -> re.Pattern:
        """Regex matching the file names of ``video``'s frames; group 1 is the frame index."""
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.pattern[len("{video}/") :]):
            parts.append(re.escape(literal))
            if field == "video":
                parts.append(re.escape(video))
            elif field == "frame":
                parts.append(r"(\d+)")
        return re.compile("".join(parts))

    def list_frames(self, root: str | Path, video: str) -> np.ndarray:
        """Sorted 25 fps indices (K,) int64 of the frames of ``video`` present under ``root``."""
        folder = self.video_dir(root, video)
        if not folder.is_dir():
            return np.zeros(0, dtype=np.int64)
        regex = self.file_regex(video)
        matches = (regex.fullmatch(name) for name in _file_names(folder))
        return np.sort(np.fromiter((int(m.group(1)) for m in matches if m), dtype=np.int64))

    def list_videos(self, root: str | Path) -> list[str]:
        """Names of the video folders under ``root`` (hidden folders ignored), naturally sorted."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: frames folder not found")
        return natural_sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _file_names(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return [entry.name for entry in entries if entry.is_file()]


def crop_black_margin(frame: np.ndarray, threshold: int = 15, median_size: int = 19) -> np.ndarray:
    """Cut the black margin around an endoscope image.

    Args:
        frame: (H, W, 3) uint8 BGR image.
        threshold: grey level above which a pixel counts as image, not margin.
        median_size: median-blur kernel (odd) that removes isolated bright noise from the mask.

    Returns:
        (h, w, 3) view of ``frame``: the bounding box of the non-black pixels, or the whole
        frame when it is entirely black.
    """
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    _, mask = cv2.threshold(grey, threshold, 255, cv2.THRESH_BINARY)
    mask = cv2.medianBlur(mask, median_size)
    x, y, width, height = cv2.boundingRect(mask)
    if width == 0 or height == 0:
        return frame
    return frame[y : y + height, x : x + width]


@dataclass(frozen=True)
class VideoSource:
    """A video to extract.

    ``annotated_frames`` is the number of 25 fps frames its phase annotation covers, checked
    against the decoded frame count (``annotation_path`` is named in the error); ``None`` for
    unlabelled videos.
    """

    name: str
    path: Path
    annotated_frames: int | None = None
    annotation_path: Path | None = None


class FramesDiskFull(DataError):
    """The disk filled while frames were written: the extraction stops at once, naming the frames folder."""


@dataclass(frozen=True)
class ExtractionSettings:
    fps: int
    size: tuple[int, int]  # (height, width) of the written frames
    frame_pattern: str
    frame_tolerance: int  # |decoded - annotated| frames accepted

    def marker(self) -> dict:
        return {"fps": self.fps, "size": list(self.size), "frame_pattern": self.frame_pattern}


def extract_frames(
    videos: Sequence[VideoSource],
    out_dir: str | Path,
    *,
    fps: int = 1,
    size: tuple[int, int] = (250, 250),
    frame_pattern: str = DEFAULT_FRAME_PATTERN,
    workers: int = 2,
    frame_tolerance: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Decode ``videos`` to frame files ``out_dir/<frame_pattern>`` at ``fps``, in parallel.

    Each kept frame (one per ``1 / fps`` s of video time, see :func:`_decode_video`) has its black margin cut
    (:func:`crop_black_margin`) and is resized to ``size`` = (height, width). Videos whose
    completion marker records the same fps, size and pattern are skipped; one finished with other
    settings is replaced only with ``overwrite``.

    Returns:
        names of the videos extracted by this call (skipped ones excluded).

    Raises:
        DataError: before any work, a video name that would leave ``out_dir`` or a finished folder
            with other settings (without ``overwrite``);
            after extracting every other video, the videos that cannot be opened, decode no frame,
            are annotated but not 25 fps (:func:`video_rate`), or whose decoded frame count differs from ``annotated_frames`` by more than
            ``frame_tolerance``, all in one message.
    """
    pattern = FramePattern(frame_pattern)
    settings = ExtractionSettings(fps, (int(size[0]), int(size[1])), frame_pattern, frame_tolerance)
    frame_step(fps)  # rejects an unusable rate before any work
    for video in videos:  # names that would leave out_dir, before anything is written
        pattern.video_dir(out_dir, video.name, video.path)
    if len({video.name for video in videos}) != len(videos):
        raise DataError(f"{out_dir}: two videos share a name; frame folders are named by video file stem")
    todo = [video for video in videos if not _is_complete(pattern.video_dir(out_dir, video.name), settings)]
    finished_otherwise = [
        pattern.video_dir(out_dir, video.name)
        for video in todo
        if (pattern.video_dir(out_dir, video.name) / COMPLETION_MARKER).is_file()
    ]
    if finished_otherwise and not overwrite:
        recorded = _read_marker(finished_otherwise[0])
        raise DataError(
            f"{finished_otherwise[0]}: holds a finished extraction with other settings "
            f"({', '.join(f'{k}={recorded.get(k)}' for k in settings.marker())}; {len(finished_otherwise)} such folders); "
            "extract into another --out, or pass --overwrite to replace them"
        )
    failures: dict[str, str] = {}
    bar = tqdm(total=len(todo), unit="video", desc=f"extracting frames at {fps} fps", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for video in todo:
                try:
                    _extract_video(video, out_dir, settings)
                except DataError as err:
                    if isinstance(err, FramesDiskFull):
                        raise
                    failures[video.name] = str(err)
                bar.update()
        else:
            # Workers start fresh ("spawn"): a forked child inherits OpenCV's thread-pool locks in
            # whatever state the parent's threads left them, and hung in cv2.setNumThreads.
            with ProcessPoolExecutor(
                max_workers=min(workers, len(todo)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=cv2.setNumThreads,
                initargs=(1,),
            ) as pool:
                futures = {pool.submit(_extract_video, video, out_dir, settings): video.name for video in todo}
                for future in as_completed(futures):
                    if isinstance(future.exception(), FramesDiskFull):  # every other video would fail alike
                        pool.shutdown(cancel_futures=True)
                        raise future.exception()
                    if isinstance(future.exception(), DataError):
                        failures[futures[future]] = str(future.exception())
                    elif future.exception() is not None:
                        raise future.exception()
                    bar.update()
    finally:
        bar.close()
    if failures:
        raise DataError(
            f"{out_dir}: {len(failures)} of {len(todo)} videos could not be extracted (the others were): "
            + "; ".join(failures[name] for name in natural_sorted(failures))
        )
    return [video.name for video in todo]


def _read_marker(video_dir: Path) -> dict:
    """The settings recorded by a finished extraction of ``video_dir`` ({} when none or unreadable)."""
    try:
        recorded = json.loads((video_dir / COMPLETION_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _is_complete(video_dir: Path, settings: ExtractionSettings) -> bool:
    recorded = _read_marker(video_dir)
    return {key: recorded.get(key) for key in settings.marker()} == settings.marker()


def _extract_video(video: VideoSource, out_dir: str | Path, settings: ExtractionSettings) -> int:
    """Write the kept frames of one video, then its completion marker; returns the decoded frame count.

    On failure the frames written are removed again (and the folder when that empties it).
    """
    pattern = FramePattern(settings.frame_pattern)
    video_dir = pattern.video_dir(out_dir, video.name)
    (video_dir / COMPLETION_MARKER).unlink(missing_ok=True)
    _remove_frames(pattern, out_dir, video.name)  # frames of an interrupted or older run
    try:
        return _decode_video(video, out_dir, settings)
    except BaseException:
        _remove_frames(pattern, out_dir, video.name)
        if video_dir.is_dir() and not any(video_dir.iterdir()):
            video_dir.rmdir()
        raise


def _remove_frames(pattern: FramePattern, out_dir: str | Path, video: str) -> None:
    for frame in pattern.list_frames(out_dir, video):
        pattern.path(out_dir, video, frame).unlink()


def video_rate(capture: cv2.VideoCapture, video: VideoSource) -> float:
    """The frame rate to number ``video``'s frames by: its own (``CAP_PROP_FPS``) when unlabelled;
    exactly 25 for an annotated video, whose annotation numbers 25 fps frames (another rate is refused)."""
    rate = capture.get(cv2.CAP_PROP_FPS)
    if not (math.isfinite(rate) and rate > 0):
        raise DataError(f"{video.path}: the video does not say its frame rate (CAP_PROP_FPS {rate}); re-encode it")
    if video.annotated_frames is None:
        return rate
    if abs(rate - VIDEO_FPS) > FPS_TOLERANCE:
        raise DataError(
            f"{video.path}: {rate:g} fps, but {video.annotation_path or 'its annotation'} numbers {VIDEO_FPS} fps frames; "
            f"re-encode it at {VIDEO_FPS} fps (ffmpeg -i IN -r {VIDEO_FPS} OUT) or extract it with --dataset unlabeled"
        )
    return float(VIDEO_FPS)


def _decode_video(video: VideoSource, out_dir: str | Path, settings: ExtractionSettings) -> int:
    """Write one frame per ``1 / fps`` s of video time, named by the 25 fps index of its interval's start.

    Decoded frame ``k`` of a video at ``rate`` fps is at 25 fps position ``k * 25 / rate``; the
    first frame in each interval ``[j * step, (j + 1) * step)`` (``step = 25 / fps``) is written as
    frame ``j * step``. At 25 fps this keeps every ``step``-th frame; a slower video gives fewer
    frames (never a frame twice), a faster one drops the extra ones.
    """
    pattern = FramePattern(settings.frame_pattern)
    video_dir = pattern.video_dir(out_dir, video.name)
    capture = cv2.VideoCapture(str(video.path))
    try:
        if not capture.isOpened():
            raise DataError(f"{video.path}: cannot open video (unreadable file or unknown format)")
        rate = video_rate(capture, video)
        video_dir.mkdir(parents=True, exist_ok=True)
        step = frame_step(settings.fps)
        height, width = settings.size
        decoded = written = 0
        last_interval = -1
        while capture.grab():
            interval = math.floor(decoded * VIDEO_FPS / (rate * step) + 1e-9)
            if interval != last_interval:
                last_interval = interval
                ok, frame = capture.retrieve()
                if not ok:
                    break
                image = crop_black_margin(frame)
                shrink = image.shape[0] > height or image.shape[1] > width
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                target = pattern.path(out_dir, video.name, interval * step)
                if not cv2.imwrite(str(target), image):  # OpenCV gives no reason: the free space tells a full disk
                    if is_disk_full(OSError(f"cv2.imwrite could not write {target}"), target.parent):
                        raise FramesDiskFull(
                            f"{Path(out_dir)}: disk full while writing the frames of {video.name}; its partial frames "
                            "were removed and finished videos kept (free space, then rerun: they are skipped)"
                        )
                    raise DataError(f"{target}: cannot write frame (is {target.parent} writable?)")
                written += 1
            decoded += 1
    finally:
        capture.release()
    if decoded == 0:
        raise DataError(f"{video.path}: no frame could be decoded (unreadable or truncated video)")
    if video.annotated_frames is not None and abs(decoded - video.annotated_frames) > settings.frame_tolerance:
        raise DataError(
            f"{video.annotation_path or video.path}: annotates {video.annotated_frames} frames but {video.path} "
            f"decodes to {decoded} (tolerance {settings.frame_tolerance}; truncated video or mismatched annotation)"
        )
    marker = {**settings.marker(), "decoded_frames": decoded, "written_frames": written, "video_fps": rate}
    write_text_atomic(video_dir / COMPLETION_MARKER, json.dumps(marker))
    return decoded

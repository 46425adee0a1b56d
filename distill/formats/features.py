"""Per-video feature arrays: what ``distill predict`` of a frame classifier writes and the temporal model reads.

``<features_dir>/<video>.npy`` (T, D) float16/float32 and ``<features_dir>/<video>_frames.npy``
(T,) int64, the 25 fps index of each feature row (labels are looked up in the phase annotation
at those indices).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill.errors import DataError
from distill.utils import child_path

if TYPE_CHECKING:
    import torch


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """``array`` as numpy; a torch tensor (any device) is detached and copied to the CPU (torch is not imported here)."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def save_video_features(
    features_dir: str | Path, video: str, features: np.ndarray | torch.Tensor, frames: np.ndarray | torch.Tensor
) -> None:
    """Write one video's features: ``features`` (T, D) float16/float32 and ``frames`` (T,) 25 fps indices."""
    features, frames = _as_numpy(features), _as_numpy(frames)
    if features.ndim != 2 or frames.shape != (features.shape[0],) or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"{video}: expected float features (T, D) and frames (T,), got {features.dtype} {features.shape} and {frames.shape}"
        )
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    np.save(child_path(features_dir, f"{video}.npy"), features)
    np.save(child_path(features_dir, f"{video}_frames.npy"), frames.astype(np.int64))


def load_video_features(features_dir: str | Path, video: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one video's ``(features (T, D), frames (T,) int64)`` written by :func:`save_video_features`
    (``mmap``: map the features instead of reading them)."""
    paths = [Path(features_dir) / f"{video}.npy", Path(features_dir) / f"{video}_frames.npy"]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: feature file not found (write it with save_video_features)")
    arrays = []
    for path, mode in zip(paths, ("r" if mmap else None, None)):
        try:
            arrays.append(np.load(path, mmap_mode=mode))
        except (EOFError, ValueError, OSError) as err:  # empty, truncated, or not an .npy array
            reason = " ".join(str(err).split()) or type(err).__name__
            raise DataError(
                f"{path}: unreadable feature file, empty, truncated or not .npy ({reason}); write it again"
            ) from None
    features, frames = arrays
    if features.ndim != 2 or frames.shape != (features.shape[0],):
        raise DataError(f"{paths[0]}: features {features.shape} do not match frames {frames.shape} in {paths[1].name}")
    return features, frames.astype(np.int64)

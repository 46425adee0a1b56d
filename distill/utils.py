"""Small helpers shared by the entry points."""

from __future__ import annotations

from pathlib import Path


def unique_path(path: str | Path) -> Path:
    """``path`` if free, else ``stem-1.suffix``, ``stem-2.suffix``, ...: earlier results are never overwritten."""
    path = Path(path)
    candidate, counter = path, 0
    while candidate.exists():
        counter += 1
        candidate = path.with_name(f"{path.stem.split('.')[0]}-{counter}{''.join(path.suffixes)}")
    return candidate

"""Small helpers shared by the entry points."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def unique_path(path: str | Path) -> Path:
    """``path`` if free, else ``stem-1.suffix``, ``stem-2.suffix``, ...: earlier results are never overwritten."""
    path = Path(path)
    candidate, counter = path, 0
    while candidate.exists():
        counter += 1
        candidate = path.with_name(f"{path.stem.split('.')[0]}-{counter}{''.join(path.suffixes)}")
    return candidate


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write ``path`` all at once: yields a temporary path in the same folder (same suffixes, hidden
    name) to write to; on success it is flushed to disk and renamed over ``path``, on error removed.

    A kill or a full disk therefore leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_write`)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)

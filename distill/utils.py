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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

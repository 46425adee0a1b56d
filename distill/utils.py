"""Small helpers shared by the entry points: output paths from names, unique and atomic file writes, a folder lock,
the one YAML reader, a JSON reader."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DataError


def child_path(folder: str | Path, name: str, source: str | Path | None = None) -> Path:
    """``folder / name`` for an output named after something the user supplied (a video's file stem,
    a case id, a video name); ``source`` is that thing (e.g. the video file), named in the error.

    A name that is empty, contains a path separator or NUL, or starts with "." (``..`` leaves the
    folder; hidden entries are skipped by the readers) is refused with a one-line DataError, so
    nothing is ever written outside ``folder``.
    """
    name = str(name)
    if not name or name.startswith(".") or any(char in name for char in "/\\\0"):
        raise DataError(
            f"{source if source is not None else name}: the name {name!r} cannot name an output in {folder} "
            "(empty, a path, or starting with '.'); rename it"
        )
    return Path(folder) / name


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

    A kill or a full disk therefore leaves either the old file or the new one, never a truncated one;
    a full disk is a one-line DataError naming ``path`` (:func:`is_disk_full`), after the temporary
    file is removed.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except Exception as err:
        if not isinstance(err, DataError) and is_disk_full(err, path.parent):
            raise DataError(
                f"{path}: disk full while writing it; the partial file was removed and any earlier {path.name} kept "
                "(free space, then rerun)"
            ) from None
        raise
    finally:
        temporary.unlink(missing_ok=True)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded")


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write to ``folder`` ran out of space: an ENOSPC/EDQUOT ``OSError`` anywhere in the
    chain, a writer's message saying so (safetensors: ``os error 28``), or a writer that hides the cause
    (``torch.save``: ``unexpected pos``) while the disk has under 1 MiB left (measured before the partial
    file is removed)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(message in str(err) for message in DISK_FULL_MESSAGES):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def available_memory() -> int:
    """Bytes this process can allocate now without swapping: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_unless_memory_fits(num_bytes: int, what: str, hint: str) -> None:
    """A one-line DataError, before anything is allocated, when ``what`` (e.g. ``"image_size=100000: the
    train volumes"``, naming the option) would take more than :func:`available_memory`; ``hint`` ends it."""
    available = available_memory()
    if num_bytes > available:
        raise DataError(
            f"{what} would take {num_bytes / 1e9:.1f} GB of memory, more than the {available / 1e9:.1f} GB "
            f"available; {hint}"
        )


#: ``flock`` errors of file systems without it (some NFS and Lustre mounts): lock with a file instead.
NO_FLOCK_ERRNOS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


@contextmanager
def folder_lock(folder: str | Path, holder: str) -> Iterator[None]:
    """Hold ``folder/.lock`` inside the block (``fcntl.flock``, the holder's pid written in it), so
    two processes never work in one folder at once: the second is refused in one line naming the
    folder and the first one's pid. The system drops the lock when its process ends, even by kill -9.
    On a file system without ``flock`` (ENOSYS, ENOLCK), :func:`exclusive_lock_file` instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        no_flock = take_flock(descriptor, folder, holder)
        if no_flock is None:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            yield
            return
    finally:
        os.close(descriptor)
    with exclusive_lock_file(folder, holder, no_flock):
        yield


def take_flock(descriptor: int, folder: Path, holder: str) -> str | None:
    """Take ``flock`` on ``descriptor``: None once held, the error's name (``"ENOSYS"``) when the file
    system has no ``flock``; another holder's lock is refused in one line."""
    import fcntl

    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
        raise DataError(
            f"{folder}: in use by another {holder} (pid {pid}); wait for it to end or use another folder"
        ) from None
    except OSError as err:
        if err.errno not in NO_FLOCK_ERRNOS:
            raise
        return errno.errorcode[err.errno]
    return None


@contextmanager
def exclusive_lock_file(folder: Path, holder: str, reason: str) -> Iterator[None]:
    """Hold ``folder/.lock.excl``, created with ``O_EXCL`` and holding ``host pid``, inside the block;
    said on stderr, since such a lock outlives a killed process: a lock file of this host whose
    process is gone is taken over, one of another host is refused naming the file to delete."""
    path = folder / ".lock.excl"
    print(f"note: {folder}: the file system refuses flock ({reason}); locking with {path}", file=sys.stderr)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _attempt in range(2):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            host, _, pid = path.read_text(errors="replace").strip().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                path.unlink(missing_ok=True)  # its process is gone (killed): take it over
                continue
            raise DataError(
                f"{folder}: in use by another {holder} (host {host or 'unknown'}, pid {pid or 'unknown'}); wait for "
                f"it to end, or delete {path} if that process is gone"
            ) from None
    else:
        raise DataError(f"{path}: could not take the lock file; delete it if no {holder} runs")
    try:
        os.write(descriptor, f"{me}\n".encode())
        os.close(descriptor)
        yield
    finally:
        path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: DataModule arguments that name folders the data is read from: no output may be written inside them.
INPUT_FOLDER_KEYS = ("data_root", "frames_dir", "features_dir")


def refuse_output_inside_inputs(output: str | Path, data_args: Mapping[str, Any], what: str) -> None:
    """One-line :class:`DataError` when the output folder ``output`` (the option ``what``) is, or lies
    inside, a data folder of ``data_args`` (:data:`INPUT_FOLDER_KEYS`): its files would be read as data
    by this run and every later one. Call it before creating anything."""
    resolved = Path(output).resolve()
    for key in INPUT_FOLDER_KEYS:
        folder = data_args.get(key)
        if folder is not None and (resolved == Path(folder).resolve() or Path(folder).resolve() in resolved.parents):
            raise DataError(
                f"{output}: {what} lies inside the data folder {folder} ({key}), where runs would be read as "
                "data; choose an output folder outside it"
            )


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_write`)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)


#: The most values a YAML document may hold once its aliases are expanded: far above any config or spec,
#: far below an alias bomb ("billion laughs": nine nested levels of nine aliases hold 9**9 values).
MAX_YAML_VALUES = 100_000


def yaml_alias_problem(root: yaml.Node | None) -> str | None:
    """Why the composed YAML document ``root`` is refused, or None: an alias that contains itself, or
    more than :data:`MAX_YAML_VALUES` values once every alias is expanded (counted without expanding)."""
    sizes: dict[int, int] = {}
    opened: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in opened:
            raise RecursionError
        opened.add(key)
        children = node.value if isinstance(node, yaml.CollectionNode) else ()
        parts = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        sizes[key] = 1 + sum(size(part) for part in parts)
        if sizes[key] > MAX_YAML_VALUES:
            raise OverflowError
        return sizes[key]

    try:
        size(root) if root is not None else 0
    except RecursionError:
        return "an alias that contains itself, or nesting too deep to read"
    except OverflowError:
        return f"aliases that expand to more than {MAX_YAML_VALUES} values (an alias bomb); write the values out"
    return None


def load_yaml_text(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing a document whose aliases expand beyond reason
    (:func:`yaml_alias_problem`) with a one-line :class:`DataError` naming ``source`` before it is built.
    Every YAML this project reads goes through here (:func:`read_yaml`, and the CLI's config values)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        problem = yaml_alias_problem(root)
        if problem is not None:
            raise DataError(f"{source}: refused, {problem}")
        return loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str, expect: type | None = dict, missing_hint: str = "") -> Any:
    """The data of the YAML file ``path`` (a ``what``, e.g. "table spec"), read with ``yaml.safe_load``.

    Every problem is a one-line :class:`DataError` naming the file: missing (then ``missing_hint``),
    invalid YAML (line and column), a tag that builds Python objects (``!!python/...``: refused),
    aliases that expand beyond reason (:func:`load_yaml_text`), a top level that is not an ``expect`` (``None``: anything). An empty file reads as an empty ``expect``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{missing_hint}")
    try:
        data = load_yaml_text(path.read_text(), str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        tag = re.search(r"tag:yaml\.org,2002:(python/\S+?)'", problem)
        if tag:
            raise DataError(
                f"{path}: YAML tag !!{tag.group(1)}{where} refused: a {what} holds plain data, not Python objects"
            ) from None
        raise DataError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None and expect is not None:
        return expect()
    if expect is not None and not isinstance(data, expect):
        raise DataError(f"{path}: a {what} must be {_yaml_kind(expect)} at the top level, got {_yaml_kind(type(data))}")
    return data


def read_extending_yaml(path: str | Path, what: str, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of the YAML file ``path`` (:func:`read_yaml`) with its ``extends: BASE.yaml`` applied:
    BASE (relative to ``path``'s folder; it may extend another) updated by this file's keys, mappings
    merged key by key at every depth, any other value (a list, a number) replaced as a whole.
    A chain that comes back to a file is a one-line DataError."""
    path = Path(path)
    data = read_yaml(path, what)
    if "extends" not in data:
        return data
    base_path = Path(os.path.normpath(path.parent / str(data.pop("extends"))))
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        raise DataError(f"{path}: 'extends' makes a cycle ({' -> '.join(p.name for p in (*chain, base_path))})")
    return deep_update(read_extending_yaml(base_path, what, chain), data)


def deep_update(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys: mappings merged key by key at every depth, other values replaced."""
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_update(merged[key], value) if both else value
    return merged


def read_json(path: str | Path, what: str, expect: type = dict, missing_hint: str = "") -> Any:
    """The data of the JSON file ``path`` (a ``what``, e.g. "run result"); a one-line :class:`DataError`
    naming the file when it is missing (then ``missing_hint``), not valid JSON (e.g. truncated: line
    and column) or not an ``expect`` at the top level."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{missing_hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}: {what} is not valid JSON (truncated or damaged){where}") from None
    if not isinstance(data, expect):
        raise DataError(f"{path}: a {what} must be {_yaml_kind(expect)} at the top level, got {_yaml_kind(type(data))}")
    return data


def _yaml_kind(kind: type) -> str:
    """How YAML calls a Python type read from it: "a mapping", "a list", ..."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(kind, f"a {kind.__name__}")

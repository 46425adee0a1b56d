"""Which teachers a student learns from, and the record of them that its checkpoints keep.

- :class:`TeacherSources`: the teachers as the user names them (a checkpoint file or run directory,
  a list of them, or a teacher manifest that ``distill teachers`` writes, :func:`read_teacher_manifest`)
  and the content hash (SHA-256) expected of each. :meth:`TeacherSources.load` reads each file once:
  the hash of its bytes is checked, its network rebuilt from the same bytes
  (:func:`distill.modules.checkpoints.build_network`) and its other entries kept (:class:`LoadedTeacher`).
- :class:`TeacherRecord`: the file a teacher was read from and its hash, so a retrained teacher
  cannot silently change what an old student config means, nor a resumed run continue with another
  teacher. A student writes them into every checkpoint (:func:`write_teacher_records`, entry
  ``teacher_records``), leaving its hyper-parameters as the user gave them, and refuses to resume
  with teachers whose content changed (:func:`check_teacher_records`). Checkpoints written before
  that entry existed held the resolved file and hash in the ``teacher_checkpoint`` / ``teacher_sha256``
  hyper-parameters; they are read too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from distill.errors import DataError
from distill.modules.checkpoints import build_network, decode_checkpoint, read_checkpoint_bytes, resolve_checkpoint
from distill.utils import read_yaml

#: The checkpoint entry listing the teachers a student was trained with: ``[{"checkpoint", "sha256"}]``.
TEACHER_RECORDS = "teacher_records"
#: Checkpoint entries a loaded teacher does not keep: its weights are in its network, its optimiser is of no use.
WEIGHT_ENTRIES = ("state_dict", "optimizer_states")


@dataclass(frozen=True)
class TeacherRecord:
    """Which file a teacher was read from, and its content hash."""

    checkpoint: str
    sha256: str


@dataclass(frozen=True)
class LoadedTeacher:
    """One teacher read from its file: its record, its frozen network (eval mode) and the checkpoint's
    other entries (``hyper_parameters``, ``train_info_nce``, ...; without :data:`WEIGHT_ENTRIES`)."""

    record: TeacherRecord
    network: nn.Module
    metadata: dict


class TeacherSources:
    """The teachers as given: their checkpoint files or run directories and the hash expected of each.

    Args:
        source: a teacher manifest YAML (``.yaml``/``.yml``; read when first needed, once), one
            checkpoint file or run directory, or a list of them.
        sha256: expected content hash per teacher (``None`` entries: not checked); replaces a
            manifest's hashes. A mismatch fails at load time, naming the file.
    """

    def __init__(self, source: str | Path | Sequence[str | Path], sha256: Sequence[str | None] | None = None) -> None:
        self._given_sha256 = sha256
        self._manifest: Path | None = None  # set: checkpoints and hashes still to be read from it
        if isinstance(source, (str, Path)) and Path(source).suffix in (".yaml", ".yml"):
            self._manifest = Path(source)
        else:
            checkpoints = [source] if isinstance(source, (str, Path)) else list(source)
            self._set_checkpoints([str(c) for c in checkpoints], [None] * len(checkpoints))

    def _set_checkpoints(self, checkpoints: list[str], listed_sha256: list[str | None]) -> None:
        self._checkpoints = checkpoints
        self._expected_sha256 = list(self._given_sha256) if self._given_sha256 is not None else listed_sha256
        if len(self._expected_sha256) != len(self._checkpoints):
            raise DataError(
                f"teachers: {len(self._checkpoints)} checkpoints but {len(self._expected_sha256)} sha256 values"
            )

    def _read_manifest(self) -> None:
        if self._manifest is not None:  # raises (and retries next time) while the manifest is unreadable
            entries = read_teacher_manifest(self._manifest)
            self._set_checkpoints([e.checkpoint for e in entries], [e.sha256 for e in entries])
            self._manifest = None

    @property
    def checkpoints(self) -> list[str]:
        """The teachers' checkpoint files or run directories as given (a manifest's: read now)."""
        self._read_manifest()
        return self._checkpoints

    @property
    def expected_sha256(self) -> list[str | None]:
        """Expected content hash per teacher (``None``: not checked)."""
        self._read_manifest()
        return self._expected_sha256

    def __len__(self) -> int:
        return len(self.checkpoints)

    def load(self, family: str, overrides: Mapping | None = None) -> list[LoadedTeacher]:
        """Every teacher, each file read once and checked against its expected hash and the other
        teachers' (each teacher listed once).

        Args:
            family: network family of the teachers (see :mod:`distill.modules.checkpoints`).
            overrides: architecture options for plain state dicts without hyper-parameters.
        """
        if not self.checkpoints:
            raise DataError("teachers: no teacher checkpoint given")
        loaded: list[LoadedTeacher] = []
        for given, expected in zip(self.checkpoints, self.expected_sha256):
            path = resolve_checkpoint(given)
            data = read_checkpoint_bytes(path)
            digest = hashlib.sha256(data).hexdigest()
            if expected is not None and digest != expected:
                raise DataError(
                    f"{path}: content hash {digest[:12]}... differs from the recorded {expected[:12]}... "
                    "(the teacher was retrained or replaced); point to the original file or drop the recorded hash"
                )
            twin = next((k for k, teacher in enumerate(loaded) if teacher.record.sha256 == digest), None)
            if twin is not None:
                raise DataError(
                    f"{path}: the same network as teacher {twin} ({loaded[twin].record.checkpoint}, equal content "
                    "hash); each teacher must be listed once"
                )
            payload = decode_checkpoint(path, data)
            loaded.append(
                LoadedTeacher(
                    record=TeacherRecord(checkpoint=str(path), sha256=digest),
                    network=build_network(payload, path, family, overrides),
                    metadata={k: v for k, v in payload.items() if k not in WEIGHT_ENTRIES},
                )
            )
        return loaded


def write_teacher_records(checkpoint: dict, records: Sequence[TeacherRecord]) -> None:
    """Record the teachers' files and hashes in a student's ``checkpoint`` (entry :data:`TEACHER_RECORDS`)."""
    checkpoint[TEACHER_RECORDS] = [asdict(record) for record in records]


def recorded_teacher_hashes(checkpoint: Mapping) -> list[str | None] | None:
    """The teacher hashes a student's ``checkpoint`` records (``None`` entries: not recorded), ``None``
    when it records none: its :data:`TEACHER_RECORDS`, else its ``teacher_sha256`` hyper-parameter
    (one hash, or one per teacher), which held the resolved hashes before that entry existed."""
    if TEACHER_RECORDS in checkpoint:
        return [record["sha256"] for record in checkpoint[TEACHER_RECORDS]]
    recorded = (checkpoint.get("hyper_parameters") or {}).get("teacher_sha256")
    if recorded is None:
        return None
    return [recorded] if isinstance(recorded, str) else list(recorded)


def check_teacher_records(checkpoint: Mapping, records: Sequence[TeacherRecord]) -> None:
    """DataError naming the teachers whose content (``records``, read now) differs from what the
    student's ``checkpoint`` was trained with (:func:`recorded_teacher_hashes`)."""
    recorded = recorded_teacher_hashes(checkpoint)
    if recorded is None:
        return
    changed = [r.checkpoint for r, old in zip(records, recorded) if old is not None and r.sha256 != old]
    if changed or len(recorded) != len(records):
        raise DataError(
            f"{', '.join(changed or [r.checkpoint for r in records])}: teacher differs from the one this "
            "checkpoint was trained with (content hash changed); resume with the original teacher files"
        )


@dataclass(frozen=True)
class ManifestEntry:
    """One limit-trained teacher of a manifest: its checkpoint, hash, training subset and score."""

    name: str
    checkpoint: str
    sha256: str | None  # None: not checked
    subset: dict
    val_metric: float | None = None


def read_teacher_manifest(path: str | Path) -> list[ManifestEntry]:
    """Teachers listed in a manifest YAML (``distill teachers`` writes it); paths relative to it.

    Format::

        teachers:
          - {name: BMC, checkpoint: BMC/.../best.ckpt, sha256: ..., subset: {train_sites: [BMC]}, val_metric: 0.81}

    Names are unique; each checkpoint lies inside the manifest's folder (the teacher runs next to
    it) and is listed once; ``sha256`` is 64 hex digits, or null: not checked.
    """
    path = Path(path)
    raw = read_yaml(path, "teacher manifest", missing_hint=" (train the teachers with `distill teachers` first)")
    entries = raw.get("teachers")
    if not entries or not isinstance(entries, list):
        raise DataError(f"{path}: a teacher manifest needs a non-empty 'teachers' list")
    result: list[ManifestEntry] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: teacher entry {entry!r} must be a mapping with name, checkpoint and sha256")
        missing = {"name", "checkpoint", "sha256"} - set(entry)
        if missing:
            raise DataError(f"{path}: teacher entry {entry.get('name', entry)} lacks {', '.join(sorted(missing))}")
        name, written, sha256 = str(entry["name"]), entry["checkpoint"], entry["sha256"]
        if any(e.name == name for e in result):
            raise DataError(f"{path}: two teachers are named {name!r}; give each teacher its own name")
        if not isinstance(written, str) or not written:
            raise DataError(f"{path}: teacher {name!r} checkpoint must be a file path, got {written!r}")
        checkpoint = path.parent / written
        if not (
            _inside(checkpoint.absolute(), path.parent.absolute())
            or _inside(checkpoint.resolve(), path.parent.resolve())
        ):
            raise DataError(
                f"{path}: teacher {name!r} checkpoint {written} lies outside the manifest's folder {path.parent} "
                "(a manifest lists the teacher runs next to it; move the runs there and name them relative to it)"
            )
        if not checkpoint.is_file():
            raise DataError(f"{path}: teacher {name!r} checkpoint {checkpoint} not found")
        twin = next((e for e in result if Path(e.checkpoint).resolve() == checkpoint.resolve()), None)
        if twin is not None:
            raise DataError(f"{path}: teachers {twin.name!r} and {name!r} are the same checkpoint {written}")
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
            raise DataError(
                f"{path}: teacher {name!r} sha256 must be 64 hex digits or null (not checked), got {sha256!r}"
            )
        subset = entry.get("subset") or {}
        if not isinstance(subset, dict):
            raise DataError(f"{path}: teacher {name!r} subset must be a mapping, got {subset!r}")
        result.append(
            ManifestEntry(
                name=name,
                checkpoint=str(checkpoint),
                sha256=sha256.lower() if sha256 is not None else None,
                subset=dict(subset),
                val_metric=entry.get("val_metric"),
            )
        )
    return result


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (absolute) names something inside ``folder`` (absolute), ``..`` resolved by name."""
    return Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder))

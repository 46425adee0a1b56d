"""Frozen teachers: the one component every distillation module uses to hold its teachers, and
:class:`TeacherStudent`, the part of a distillation module that owns their bookkeeping.

- Teachers are rebuilt from their checkpoints (:func:`distill.modules.checkpoints.load_network`),
  always in eval mode, without autograd.
- They load lazily (:meth:`FrozenTeachers.load`, called when fitting starts), so testing,
  predicting or exporting a trained student never needs its teachers' files.
- Their weights never enter the student's checkpoints or ``state_dict`` (they are reloaded
  from their files); each teacher file is identified by its SHA-256, which the student
  records (:class:`TeacherStudent`), so a retrained teacher cannot silently change what an
  old student config means, nor a resumed run continue with another teacher.
- A teacher manifest (``distill teachers`` writes it) lists teachers with their hashes;
  :meth:`FrozenTeachers.from_manifest` reads it when the teachers are first needed, once.
- Teachers of the same architecture run as one batched pass (``torch.func`` stacked weights
  under ``vmap``: one grouped convolution per layer), not K Python round trips, on GPUs where
  launches dominate. On CPU the grouped convolution is slower than K plain passes (measured
  by ``benchmarks/bench_multi_teacher.py``), so by default CPU teachers run one by one.
- ``channels_last`` teachers (the module's switch) run NHWC convolutions: 1.5x faster on CPU.
- Batch norm is folded into the convolution before it on the first pass (eval mode makes it a
  fixed affine map; :func:`distill.models.fold_batch_norms`): same outputs, one pass less.
- On CPU, a teacher asked for its output only (no feature taps) runs as a frozen TorchScript
  graph (``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference``: weights prepacked for
  oneDNN, convolution + activation fused), traced on its first such pass: the same outputs to
  float rounding (1e-7), 1.6x (ResNet-50) to 2.5x (EfficientNet-Lite0) faster teacher passes
  at 64 px (``benchmarks/bench_moco_distill.py``).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from distill.errors import DataError
from distill.models import FeatureTaps, fold_batch_norms
from distill.modules.checkpoints import file_sha256, load_network, resolve_checkpoint
from distill.utils import read_yaml


@dataclass(frozen=True)
class TeacherRecord:
    """Which file a teacher was read from, and its content hash."""

    checkpoint: str
    sha256: str


def architecture_key(net: nn.Module) -> tuple:
    """Networks with equal keys can share one batched pass (same class, same tensor shapes)."""
    return (type(net).__qualname__, tuple((k, tuple(v.shape)) for k, v in net.state_dict().items()))


class FrozenTeachers(nn.Module):
    """K frozen teacher networks, loaded lazily, kept out of checkpoints, run batched.

    Args:
        checkpoints: one checkpoint file or run directory per teacher (see also
            :meth:`from_manifest` and :meth:`from_source`).
        family: network family of the teachers (see :mod:`distill.modules.checkpoints`).
        sha256: expected content hash per teacher (``None`` entries: not checked). A mismatch
            fails at load time, naming the file.
        overrides: architecture options for plain state dicts without hyper-parameters.
        batched: run same-architecture teachers as one ``vmap``-ed pass; ``None`` (default):
            on CUDA only.
        channels_last: keep 4-D convolution weights in NHWC memory format (feed NHWC inputs).
        fold_batch_norm: fold batch norm into the convolutions on the first forward pass.
        frozen_graph: run each teacher as a frozen TorchScript graph when no features are tapped;
            ``None`` (default): for float32 CPU inputs outside autocast. A teacher that cannot be
            traced runs eagerly, with a warning.
    """

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        family: str,
        sha256: Sequence[str | None] | None = None,
        overrides: Mapping | None = None,
        batched: bool | None = None,
        channels_last: bool = False,
        fold_batch_norm: bool = True,
        frozen_graph: bool | None = None,
    ) -> None:
        super().__init__()
        self._manifest: Path | None = None  # set: checkpoints and hashes still to be read from it
        self._given_sha256 = sha256
        self._set_checkpoints([str(c) for c in checkpoints], [None] * len(checkpoints))
        self.family = family
        self.overrides = dict(overrides or {})
        self.batched = batched
        self.channels_last = channels_last
        self.fold_batch_norm = fold_batch_norm
        self.frozen_graph = frozen_graph
        self._graphs: dict[tuple, nn.Module] = {}  # (teacher, input shape, dtype) -> frozen graph (or the network)
        self._folded_convs: set[str] | None = None  # None: not folded yet
        self.networks = nn.ModuleList()
        self._records: list[TeacherRecord] | None = None
        self._stacked: list[tuple[list[int], nn.Module, dict, dict]] | None = None
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forgive_own_missing_keys)

    @classmethod
    def from_manifest(
        cls, manifest: str | Path, family: str, sha256: Sequence[str | None] | None = None, **options
    ) -> FrozenTeachers:
        """The teachers of a manifest (:func:`read_teacher_manifest`), read when first needed.

        ``sha256`` (if given) replaces the manifest's hashes; ``options``: see the class.
        """
        teachers = cls([], family, **options)
        teachers._manifest, teachers._given_sha256 = Path(manifest), sha256
        return teachers

    @classmethod
    def from_source(
        cls,
        source: str | Path | Sequence[str | Path],
        family: str,
        sha256: Sequence[str | None] | None = None,
        **options,
    ) -> FrozenTeachers:
        """Teachers from a manifest YAML (``.yaml``/``.yml``), one checkpoint, or a list of them."""
        if isinstance(source, (str, Path)) and Path(source).suffix in (".yaml", ".yml"):
            return cls.from_manifest(source, family, sha256, **options)
        return cls([source] if isinstance(source, (str, Path)) else list(source), family, sha256, **options)

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

    @property
    def loaded(self) -> bool:
        return len(self.networks) > 0  # load() reads every teacher or fails

    def records(self) -> list[TeacherRecord]:
        """Resolved checkpoint files and their hashes, checked against the expected hashes."""
        if not self.checkpoints:
            raise DataError("teachers: no teacher checkpoint given")
        if self._records is None:
            records = []
            for given, expected in zip(self.checkpoints, self.expected_sha256):
                path = resolve_checkpoint(given)
                digest = file_sha256(path)
                if expected is not None and digest != expected:
                    raise DataError(
                        f"{path}: content hash {digest[:12]}... differs from the recorded {expected[:12]}... "
                        "(the teacher was retrained or replaced); point to the original file or drop the recorded hash"
                    )
                twin = next((r for r in records if r.sha256 == digest), None)
                if twin is not None:
                    raise DataError(
                        f"{path}: the same network as teacher {records.index(twin)} ({twin.checkpoint}, equal content "
                        "hash); each teacher must be listed once"
                    )
                records.append(TeacherRecord(checkpoint=str(path), sha256=digest))
            self._records = records
        return self._records

    def available_records(self) -> list[TeacherRecord] | None:
        """:meth:`records` if every teacher file is there and as expected now, else ``None``
        (e.g. testing a student whose teachers are gone); :meth:`load` reports the problem."""
        try:
            return self.records()
        except DataError:
            return None

    def load(self) -> None:
        """Read every teacher (once), frozen in eval mode."""
        if self.loaded:
            return
        self.networks.extend(load_network(r.checkpoint, self.family, self.overrides) for r in self.records())
        if self.channels_last:
            self.networks.to(memory_format=torch.channels_last)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeachers:
        """Teachers stay in eval mode whatever the student does (frozen batch-norm statistics)."""
        return super().train(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._state_prefix = prefix  # where this module sits in the state dict being loaded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._stacked = None  # stacked copies and graphs follow the networks' device/dtype on next use
        self._graphs = {}
        return super()._apply(fn, recurse)

    def _uses_graph(self, x: torch.Tensor, feature_paths: Sequence[str]) -> bool:
        if feature_paths or self.frozen_graph is False:
            return False
        automatic = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        return bool(self.frozen_graph) or automatic

    def _graph(self, index: int, network: nn.Module, x: torch.Tensor) -> nn.Module:
        """Teacher ``index`` as a frozen TorchScript graph for inputs shaped like ``x`` (any batch
        size), traced on ``x`` the first time. A trace that converts a tensor to a Python value
        (a ``TracerWarning``: control flow that a graph would freeze, e.g. MONAI's padding of odd
        sizes) is dropped and the network runs eagerly, as does one that cannot be traced."""
        key = (index, tuple(x.shape[1:]), x.dtype)
        if key not in self._graphs:
            graph = network
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    traced = torch.jit.trace(network, x, check_trace=False, strict=False)
                if not any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                        graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            except Exception as error:  # noqa: BLE001 - any tracing failure: the eager pass is still right
                warnings.warn(
                    f"teacher {index} runs eagerly: it cannot be traced ({type(error).__name__}: {error})", stacklevel=3
                )
            self._graphs[key] = graph
        return self._graphs[key]

    def _groups(self) -> list[tuple[list[int], nn.Module, dict, dict]]:
        """Teachers grouped by architecture: (indices, meta-device template, stacked params, buffers)."""
        if self._stacked is None:
            groups: dict[tuple, list[int]] = {}
            for index, net in enumerate(self.networks):
                groups.setdefault(architecture_key(net), []).append(index)
            batched = self.batched
            if batched is None:
                batched = any(p.is_cuda for p in self.networks.parameters())
            self._stacked = []
            for indices in groups.values():
                members = [self.networks[i] for i in indices]
                if len(indices) == 1 or not batched:
                    self._stacked += [([i], self.networks[i], {}, {}) for i in indices]
                    continue
                params, buffers = stack_module_state(members)
                template = copy.deepcopy(members[0]).to("meta")
                self._stacked.append((indices, template, params, buffers))
        return self._stacked

    def _fold_once(self, x: torch.Tensor, feature_paths: Sequence[str]) -> None:
        """Fold batch norm into every teacher on the first pass (convolutions tapped for features kept)."""
        if self._folded_convs is None:
            self._folded_convs = set()
            if self.fold_batch_norm:
                for index, net in enumerate(self.networks):  # folded weights keep the memory format
                    self.networks[index], folded = fold_batch_norms(net, x[:1], keep=tuple(feature_paths))
                    self._folded_convs.update(folded)
                self._stacked = None
        tapped = self._folded_convs.intersection(feature_paths)
        if tapped:
            raise RuntimeError(
                f"teacher features requested at {sorted(tapped)}, whose batch norm was folded in on the "
                "first pass; tap them from the first pass on, or pass fold_batch_norm=False"
            )

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, feature_paths: Sequence[str] = ()
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Every teacher on the same input.

        Args:
            x: (B, ...) input batch.
            feature_paths: module paths whose outputs to return too (the same in every teacher).

        Returns:
            ``(outputs, features)``: ``outputs[k]`` teacher k's output (e.g. (B, C, H, W) logits),
            ``features[k]`` its tapped features in ``feature_paths`` order.
        """
        if not self.loaded:
            raise RuntimeError(
                "FrozenTeachers.load() must run before the teachers are used (it runs when fitting starts)"
            )
        self._fold_once(x, feature_paths)
        outputs: list = [None] * len(self.networks)
        features: list = [None] * len(self.networks)
        for indices, template, params, buffers in self._groups():
            taps = FeatureTaps(template, feature_paths, owner="teacher")
            try:
                if not params:  # a single network: a plain forward pass
                    graph = self._uses_graph(x, feature_paths)
                    out = (self._graph(indices[0], template, x) if graph else template)(x)
                    outputs[indices[0]], features[indices[0]] = out, taps.pop()
                    continue

                def run(p, b, inputs, template=template, taps=taps):  # bound now: defined in a loop
                    return functional_call(template, (p, b), (inputs,)), taps.pop()

                out, feats = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
                for slot, index in enumerate(indices):
                    outputs[index] = out[slot]
                    features[index] = [f[slot] for f in feats]
            finally:
                taps.remove()
        return outputs, features


def _drop_own_keys(module: FrozenTeachers, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forgive_own_missing_keys(module: FrozenTeachers, incompatible_keys) -> None:
    # Teacher weights come from their files, never from a student checkpoint.
    own = getattr(module, "_state_prefix", "") + "networks."
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(own)]


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


class TeacherStudent:
    """The teacher bookkeeping of a distillation module, mixed in before its LightningModule base.

    The student holds its teachers as :class:`FrozenTeachers` (:meth:`attach_teachers`, in
    ``__init__``); this part records their files and hashes in the hyper-parameters (so every
    checkpoint names them), loads them when fitting starts (:meth:`prepare_distillation`, which
    a method extends with its own checks and training-only heads), and refuses to resume a
    checkpoint with teachers whose content changed. Training-only parts live in
    ``distill_heads`` and are dropped when a checkpoint is loaded without teachers (test,
    predict, export).

    A single-teacher student (``single_teacher = True``) records ``teacher_checkpoint`` and
    ``teacher_sha256`` as plain values, a multi-teacher one ``teacher_sha256`` as a list.
    """

    single_teacher: ClassVar[bool] = False
    teachers: FrozenTeachers

    def attach_teachers(self, teachers: FrozenTeachers) -> None:
        """Hold ``teachers``; records them now if their files are there (else when fitting starts)."""
        self.teachers = teachers
        # The frozen teachers are in eval mode on purpose; Lightning would warn about it at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        records = teachers.available_records()
        if records is not None:
            self.record_teachers(records)

    def record_teachers(self, records: Sequence[TeacherRecord]) -> None:
        """Store the resolved teacher files and hashes in the hyper-parameters (saved with every checkpoint)."""
        if self.single_teacher:
            self.hparams["teacher_checkpoint"] = records[0].checkpoint
            self.hparams["teacher_sha256"] = records[0].sha256
        else:
            self.hparams["teacher_sha256"] = [r.sha256 for r in records]

    def recorded_teacher_hashes(self, hparams: Mapping) -> list[str] | None:
        """The teacher hashes a checkpoint's hyper-parameters record (``None``: none recorded)."""
        recorded = hparams.get("teacher_sha256")
        if recorded is None:
            return None
        return [recorded] if self.single_teacher else list(recorded)

    def teacher_files(self) -> str:
        return ", ".join(r.checkpoint for r in self.teachers.records())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.prepare_distillation()

    def prepare_distillation(self) -> None:
        """Load the teachers (raising if they are gone or changed) and record them; methods extend
        this with their checks of teachers against student and their training-only heads."""
        self.teachers.load()
        self.record_teachers(self.teachers.records())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if not self.teachers.loaded:  # test / predict / export: the student alone
            for key in [k for k in state if k.startswith("distill_heads.")]:
                del state[key]
            return
        recorded = self.recorded_teacher_hashes(checkpoint.get("hyper_parameters") or {})
        records = self.teachers.records()
        if recorded is not None and recorded != [r.sha256 for r in records]:
            changed = [r.checkpoint for r, old in zip(records, recorded) if r.sha256 != old]
            raise DataError(
                f"{', '.join(changed) or self.teacher_files()}: teacher differs from the one this "
                "checkpoint was trained with (content hash changed); resume with the original teacher files"
            )

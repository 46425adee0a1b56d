"""How frozen teachers run inside a student: :class:`FrozenTeachers`, the one component every
distillation module holds its teachers in, and :class:`TeacherStudent`, the part of a distillation
module that loads them when fitting starts and keeps their record in its checkpoints. Which
teachers, their files and hashes: :mod:`distill.modules.teacher_records`.

- Teachers are rebuilt from their checkpoints, always in eval mode, without autograd.
- They load lazily (:meth:`FrozenTeachers.load`, called when fitting starts), so testing,
  predicting or exporting a trained student never needs its teachers' files.
- Their weights never enter the student's checkpoints or ``state_dict`` (they are reloaded
  from their files, whose hashes the checkpoints record).
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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from distill.models import FeatureTaps, fold_batch_norms
from distill.modules.teacher_records import (
    TeacherRecord,
    TeacherSources,
    check_teacher_records,
    write_teacher_records,
)


def architecture_key(net: nn.Module) -> tuple:
    """Networks with equal keys can share one batched pass (same class, same tensor shapes)."""
    return (type(net).__qualname__, tuple((k, tuple(v.shape)) for k, v in net.state_dict().items()))


class FrozenTeachers(nn.Module):
    """K frozen teacher networks, loaded lazily, kept out of checkpoints, run batched.

    Args:
        source: a teacher manifest YAML, one checkpoint file or run directory, or a list of them
            (:class:`~distill.modules.teacher_records.TeacherSources`).
        family: network family of the teachers (see :mod:`distill.modules.checkpoints`).
        sha256: expected content hash per teacher (``None`` entries: not checked; default: a
            manifest's). A mismatch fails at load time, naming the file.
        overrides: architecture options for plain state dicts without hyper-parameters.
        batched: run same-architecture teachers as one ``vmap``-ed pass; ``None`` (default):
            on CUDA only.
        channels_last: keep 4-D convolution weights in NHWC memory format (feed NHWC inputs).
        fold_batch_norm: fold batch norm into the convolutions on the first forward pass.
        frozen_graph: run each teacher as a frozen TorchScript graph when no features are tapped;
            ``None`` (default): for float32 CPU inputs outside autocast. A teacher that cannot be
            traced runs eagerly, with a warning.

    After :meth:`load`: ``networks`` (K modules), ``records`` (K :class:`TeacherRecord`: file and
    hash) and ``checkpoint_metadata`` (K dicts: each checkpoint's entries besides its weights).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        family: str,
        sha256: Sequence[str | None] | None = None,
        overrides: Mapping | None = None,
        batched: bool | None = None,
        channels_last: bool = False,
        fold_batch_norm: bool = True,
        frozen_graph: bool | None = None,
    ) -> None:
        super().__init__()
        self.sources = TeacherSources(source, sha256)
        self.family = family
        self.overrides = dict(overrides or {})
        self.batched = batched
        self.channels_last = channels_last
        self.fold_batch_norm = fold_batch_norm
        self.frozen_graph = frozen_graph
        self.networks = nn.ModuleList()
        self.records: list[TeacherRecord] = []
        self.checkpoint_metadata: list[dict] = []
        self._graphs: dict[tuple, nn.Module] = {}  # (teacher, input shape, dtype) -> frozen graph (or the network)
        self._folded_convs: set[str] | None = None  # None: not folded yet
        self._stacked: list[tuple[list[int], nn.Module, dict, dict]] | None = None
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forgive_own_missing_keys)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def loaded(self) -> bool:
        return len(self.networks) > 0  # load() reads every teacher or fails

    def load(self) -> None:
        """Read every teacher (once; each file once), frozen in eval mode."""
        if self.loaded:
            return
        teachers = self.sources.load(self.family, self.overrides)
        self.records = [teacher.record for teacher in teachers]
        self.checkpoint_metadata = [teacher.metadata for teacher in teachers]
        self.networks.extend(teacher.network for teacher in teachers)
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
            raise ValueError(
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
            raise ValueError(
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


class TeacherStudent:
    """The teacher side of a distillation module, mixed in before its LightningModule base::

        class MyStudent(TeacherStudent, MyModule):
            def __init__(self, teacher_checkpoint: str, teacher_sha256: str | None = None, **kwargs):
                super().__init__(**kwargs)
                self.distill_heads = nn.ModuleDict()  # training-only parts
                self.attach_teachers(FrozenTeachers(teacher_checkpoint, "segmentation", [teacher_sha256]))

            def prepare_distillation(self):  # fitting starts: the teachers are loaded, then checked
                super().prepare_distillation()
                ...  # check self.teachers.networks against the student, build self.distill_heads

            def training_outputs(self, batch):
                (teacher_logits,), _ = self.teachers(batch["image"])  # outputs per teacher, features
                ...

    The teachers load when fitting starts (:meth:`prepare_distillation`, from ``setup``); every
    checkpoint then records their files and hashes (``teacher_records``), the hyper-parameters stay
    as the user gave them, and resuming a checkpoint with teachers whose content changed is refused.
    Training-only parts live in ``distill_heads`` and are dropped when a checkpoint is loaded without
    teachers (test, predict, export).
    """

    teachers: FrozenTeachers

    def attach_teachers(self, teachers: FrozenTeachers) -> None:
        """Hold ``teachers`` (not loaded yet)."""
        self.teachers = teachers
        # The frozen teachers are in eval mode on purpose; Lightning would warn about it at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

    def teacher_files(self) -> str:
        """The loaded teachers' files, for messages."""
        return ", ".join(r.checkpoint for r in self.teachers.records)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.prepare_distillation()

    def prepare_distillation(self) -> None:
        """Load the teachers (raising if they are gone or changed); methods extend this with their
        checks of teachers against student and their training-only heads."""
        self.teachers.load()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teachers.loaded:
            write_teacher_records(checkpoint, self.teachers.records)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if not self.teachers.loaded:  # test / predict / export: the student alone
            for key in [k for k in state if k.startswith("distill_heads.")]:
                del state[key]
            return
        check_teacher_records(checkpoint, self.teachers.records)

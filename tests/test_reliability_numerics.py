"""Faults of numbers and disks: non-finite teachers, caches, losses and weights stop a run in one line and
are never saved; a full disk while writing a checkpoint or teacher cache says so; an ONNX student whose
graph disagrees with its metadata is refused before it writes a wrong mask."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from distill.cli import main
from distill.errors import DataError
from distill.lightning_cli import AtomicCheckpointIO
from distill.models import build_segmentation_network
from distill.modules import FrozenTeachers
from distill.modules.checkpoints import load_network
from distill.modules.finite import NonFiniteLossWatch
from distill.modules.teacher_cache import compute_teacher_logits, read_teacher_cache, write_teacher_cache

REPO = Path(__file__).resolve().parents[1]


def save_segmentation_checkpoint(path: Path, poison: str | None = None) -> Path:
    """A width-4 slim U-Net checkpoint in Lightning's layout; ``poison``: a state key set to NaN/inf."""
    torch.manual_seed(0)
    state = build_segmentation_network("slim_unet", 3, 2, width=4).state_dict()
    if poison is not None:
        state[poison].view(-1)[:2] = torch.tensor([math.nan, math.inf])
    hparams = {"network": "slim_unet", "network_kwargs": {"width": 4}, "in_channels": 3, "num_classes": 2}
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in state.items()}, "hyper_parameters": hparams,
         "network_family": "segmentation"},
        path,
    )  # fmt: skip
    return path


# ------------------------------------------------------------------ non-finite teachers and caches
def test_a_teacher_with_nan_weights_is_refused_when_loaded(tmp_path):
    good = load_network(save_segmentation_checkpoint(tmp_path / "good.ckpt"), "segmentation")
    assert all(torch.isfinite(p).all() for p in good.state_dict().values())
    key = next(k for k, v in good.state_dict().items() if "running_var" in k)
    bad = save_segmentation_checkpoint(tmp_path / "bad.ckpt", poison=key)
    with pytest.raises(DataError, match=rf"bad.ckpt: non-finite weights: {key} \(1 nan, 1 inf\)"):
        load_network(bad, "segmentation")
    teachers = FrozenTeachers([bad], "segmentation")
    with pytest.raises(DataError, match="bad.ckpt: non-finite weights"):
        teachers.load()


class OverflowingTeachers(nn.Module):
    """Stands in for FrozenTeachers: one teacher whose logits exceed float16's range (7e4 > 65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(7e4))

    def forward(self, x: torch.Tensor):
        return [x[:, :2] * self.scale], [[]]


def test_teacher_caches_with_non_finite_logits_are_refused_when_built_and_when_read(tmp_path):
    with pytest.raises(DataError, match=r"teacher cache: non-finite teacher outputs: logits \(0 nan, \d+ inf\)"):
        compute_teacher_logits(OverflowingTeachers(), [torch.ones(2, 3, 4, 4)])
    logits = torch.zeros(4, 1, 2, 4, 4, dtype=torch.float16)
    logits[1, 0, 0, 0, 0] = math.nan
    cache = tmp_path / "cache.safetensors"
    write_teacher_cache(cache, logits, {"data": "x"})
    with pytest.raises(DataError, match=r"cache.safetensors: non-finite cached teacher logits: logits \(1 nan"):
        read_teacher_cache(cache, {"data": "x"})


# ------------------------------------------------------------------ non-finite losses and weights
def test_a_non_finite_loss_names_its_first_step_terms_and_outputs_at_the_next_check():
    """Recorded on the device at every step, read at the check: the first non-finite step's terms and
    outputs are named (the student's finite logits are not); finite steps and a new record say nothing."""
    finite = {"logits": torch.zeros(2, 2, 4, 4), "teacher_logits": torch.zeros(1, 2, 2, 4, 4)}
    broken = {"logits": torch.zeros(2, 2, 4, 4), "teacher_logits": torch.full((1, 2, 2, 4, 4), math.nan)}
    terms = {"dice": torch.tensor(0.5), "kd": torch.tensor(math.nan)}
    watch = NonFiniteLossWatch()
    watch.update(torch.tensor(0.5), {"dice": torch.tensor(0.5), "kd": torch.tensor(0.1)}, finite, step=40)
    watch.check(epoch=3, step=40)  # finite: nothing to say
    for step in (41, 42):
        watch.update(terms["dice"] + terms["kd"], terms, broken, step=step)
        watch.update(torch.tensor(0.5), {"dice": torch.tensor(0.5), "kd": torch.tensor(0.1)}, finite, step=step)
    with pytest.raises(DataError) as info:
        watch.check(epoch=3, step=42)
    assert str(info.value) == (
        "training stopped at epoch 3, step 42: the loss went non-finite at step 41 (non-finite: term kd, "
        "teacher_logits); nothing from that step on is saved (lower the learning rate, or check the inputs and teachers)"
    )
    watch.check(epoch=3, step=43)  # a new record


def test_a_gradient_scaler_may_skip_non_finite_steps_but_not_too_many_in_a_row():
    watch = NonFiniteLossWatch()
    for step, loss in enumerate([math.inf, 1.0, math.inf, math.inf, 1.0]):
        watch.update(torch.tensor(loss), {"dice": torch.tensor(loss)}, {}, step=step)
    watch.check(epoch=0, step=4, tolerated_run=2)  # at most 2 in a row: skipped overflows
    for step in range(5, 8):
        watch.update(torch.tensor(math.inf), {"dice": torch.tensor(math.inf)}, {}, step=step)
    with pytest.raises(DataError, match=r"went non-finite at step 5 \(3 steps in a row, more than the 2 the gradient"):
        watch.check(epoch=0, step=7, tolerated_run=2)


def test_a_diverging_run_stops_in_one_line_and_leaves_no_non_finite_checkpoint(synthetic_prostate_root, tmp_path):
    """lr 1e6: the weights blow up in the first steps; the run exits with one line, writes no
    ``fit_complete.json``, and every checkpoint on disk (if any) holds finite numbers only."""
    out = tmp_path / "run"
    argv = [
        "fit", "--config", str(REPO / "experiments/prostate/student_baseline.yaml"),
        f"--data.init_args.data_root={synthetic_prostate_root}", f"--trainer.default_root_dir={out}",
        "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.load_threads=1",
        "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--model.init_args.network_kwargs.width=4", "--model.init_args.optimizer.init_args.lr=1e6",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: training stopped at epoch ") and "\n" not in message
    assert "non-finite weights or buffers" in message or "the loss went non-finite" in message
    assert not list(out.rglob("fit_complete.json"))
    for checkpoint in out.rglob("*.ckpt"):
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), checkpoint


# ------------------------------------------------------------------ a full disk
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save hides ENOSPC behind 'unexpected pos'; the free space then tells (faked here at 0 bytes,
    as a full disk shows it): one line naming the file, the partial file gone, the earlier one kept."""
    import distill.lightning_cli as lightning_cli
    import distill.utils as utils

    target = tmp_path / "best.ckpt"
    target.write_bytes(b"earlier checkpoint")

    def save_until_full(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(lightning_cli.torch, "save", save_until_full)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 0})())
    with pytest.raises(DataError, match=rf"{target}: disk full while writing it; the partial file was removed"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert target.read_bytes() == b"earlier checkpoint" and sorted(tmp_path.iterdir()) == [target]
    # With space left the same failure is not a full disk: it keeps its own error.
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 10 << 30})())
    with pytest.raises(RuntimeError, match="unexpected pos"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)


def test_a_full_disk_while_writing_a_teacher_cache_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    def save_until_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")  # what safetensors reports as "os error 28"

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    cache = tmp_path / "teachers.safetensors"
    with pytest.raises(DataError, match=rf"{cache}: disk full while writing it"):
        write_teacher_cache(cache, torch.zeros(2, 1, 2, 4, 4, dtype=torch.float16), {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ ONNX students that disagree with their metadata
def write_onnx(path: Path, out_channels: int, pool: bool, metadata: dict, fixed_shapes: bool = True) -> Path:
    """A 1x1-convolution 'student' (3 slices in, ``out_channels`` out), halving the size if ``pool``,
    with ``metadata`` as its distill.preprocessing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = metadata["image_size"] if isinstance(metadata.get("image_size"), int) else 32
    out_size = size // 2 if pool else size
    in_shape = ["N", 3, size, size] if fixed_shapes else ["N", "S", "H", "W"]
    out_shape = ["N", out_channels, out_size, out_size] if fixed_shapes else ["N", "C", "H2", "W2"]
    weight = numpy_helper.from_array(np.ones((out_channels, 3, 1, 1), np.float32), "weight")
    nodes = [helper.make_node("Conv", ["image", "weight"], ["conv" if pool else "logits"])]
    if pool:
        nodes.append(helper.make_node("AveragePool", ["conv"], ["logits"], kernel_shape=[2, 2], strides=[2, 2]))
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"distill.preprocessing": json.dumps(metadata)})
    onnx.save(model, str(path))
    return path


GOOD_METADATA = {"num_slices": 3, "image_size": 32, "normalization": "zscore", "num_classes": 2}


@pytest.mark.parametrize(
    "name, out_channels, pool, metadata, fixed, expected",
    [
        ("one_class", 1, False, GOOD_METADATA, True, "output is 1x32x32 per slice but its metadata says 2x32x32"),
        ("smaller", 2, True, GOOD_METADATA, True, "output is 2x16x16 per slice but its metadata says 2x32x32"),
        ("one_class_dynamic", 1, False, GOOD_METADATA, False, r"output is 1x\S+ per slice but its metadata says 2x32x32"),
        ("smaller_dynamic", 2, True, GOOD_METADATA, False, "output is 2x16x16 per slice but its metadata"),
        ("huge", 2, False, {**GOOD_METADATA, "image_size": 200000}, False,
         r"image_size = 200000, expected an integer in \[8, 4096\]"),
        ("even_slices", 2, False, {**GOOD_METADATA, "num_slices": 4}, False, "num_slices = 4 must be odd"),
    ],
)  # fmt: skip
def test_segment_nifti_refuses_a_model_that_disagrees_with_its_metadata(
    tmp_path, name, out_channels, pool, metadata, fixed, expected
):
    model = write_onnx(tmp_path / f"{name}.onnx", out_channels, pool, metadata, fixed)
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(40, 40, 5)).astype(np.float32), np.eye(4)), image)
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(SystemExit) as info:
        main(["segment-nifti", str(model), str(image), str(out)])
    message = str(info.value.code)
    assert message.startswith(f"error: {model}: ") and "\n" not in message
    assert re.search(expected, message), message
    assert not out.exists()


def test_segment_nifti_accepts_a_model_that_agrees_with_its_metadata(tmp_path):
    model = write_onnx(tmp_path / "good.onnx", 2, False, GOOD_METADATA, fixed_shapes=True)
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(40, 40, 5)).astype(np.float32), np.eye(4)), image)
    main(["segment-nifti", str(model), str(image), str(tmp_path / "mask.nii.gz")])
    assert nib.load(tmp_path / "mask.nii.gz").shape == (40, 40, 5)

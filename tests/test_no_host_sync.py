"""No training step waits for the host: on a GPU a value read back (``.item()``, ``bool()``, ``int()``,
``float()``, ``.tolist()``) stalls the launch queue. On the CPU the same reads are caught by patching
them for the duration of training steps after the first (which may check things once, e.g. a frozen
teacher graph against the eager teacher). What a CPU can show; the GPU check runs the step under
``torch.cuda.set_sync_debug_mode("error")``."""

# ruff: noqa: F811 - the surgical fixtures are imported from test_surgical_modules and requested by name
from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from test_surgical_modules import TINY, cholec, ssl_data, teacher_ckpt, trainer  # noqa: F401

from distill.modules import MoCoDistillModule, MoCoModule

REPO = Path(__file__).resolve().parents[1]
HOST_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")
# Reads of tensors that live on the host on a GPU too: the optimisers' step counters (on the CPU unless
# `capturable`) and the axes MONAI's Dice loss builds with a device-less `torch.arange`.
HOST_TENSOR_READS = ("torch/optim/", "monai/losses/dice.py")


class HostReadRecorder(L.Callback):
    """Records every host read of a tensor during training steps from the second on."""

    def __init__(self) -> None:
        self.originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        self.reads: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            return
        for name, original in self.originals.items():

            def recorded(tensor, *args, _name=name, _original=original, **kwargs):
                where = " <- ".join(line.strip().splitlines()[0] for line in traceback.format_stack(limit=8)[:-1])
                if not any(place in where for place in HOST_TENSOR_READS):
                    self.reads.append(f"{_name} at {where}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, recorded)

    def on_train_batch_end(self, *args) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("distilled", [False, True], ids=["moco", "moco + distillation"])
def test_moco_training_steps_read_nothing_back(cholec, teacher_ckpt, tmp_path, distilled):
    recorder = HostReadRecorder()
    model = MoCoDistillModule(teacher_checkpoint=str(teacher_ckpt), **TINY) if distilled else MoCoModule(**TINY)
    run = trainer(tmp_path, limit_train_batches=3, callbacks=[recorder])
    try:
        run.fit(model, datamodule=ssl_data(cholec))
    finally:
        recorder.on_train_batch_end()
    assert run.global_step == 3 and recorder.reads == []


def test_a_queue_the_global_batch_does_not_divide_names_the_process_counts_that_work(cholec, tmp_path):
    """Checked once, at set-up (every step must write whole global batches to keep the queue aligned)."""
    from distill.errors import DataError
    from distill.models.ssl import queue_batch_problem

    assert queue_batch_problem(24, 4, 2) is None
    assert queue_batch_problem(24, 4, 4) == (
        "must be a multiple of the global batch (data.batch_size=4 x 4 processes = 16); "
        "with this batch size it works on 1, 2, 3, 6 processes"
    )
    assert queue_batch_problem(2**16, 128, 3).endswith("it works on 1, 2, 4, 8, 16, 32, 64, 128, ... processes")
    with pytest.raises(DataError) as refused:
        trainer(tmp_path).fit(MoCoModule(**{**TINY, "queue_size": 18}), datamodule=ssl_data(cholec))
    assert str(refused.value) == (
        "model.queue_size=18 must be a multiple of the global batch (data.batch_size=4 x 1 processes = 4); "
        "no process count works with this batch size; choose one that divides the queue size"
    )


@pytest.mark.parametrize("config", ["teacher.yaml", "student_kd.yaml"])
def test_fully_supervised_prostate_training_steps_read_nothing_back(synthetic_prostate_root, tmp_path, config):
    """Every slice labelled (the default): the batches carry no `labeled` flags to test, so the label
    terms and the KD terms (logits and features, live teacher) run without a host read."""
    from conftest import QUIET
    from conftest import TINY as PROSTATE_TINY
    from test_multi_teacher import save_teacher

    from distill.lightning_cli import DistillCLI

    extra = []
    if config == "student_kd.yaml":
        extra = [
            f"--model.init_args.teacher_checkpoint={save_teacher(tmp_path / 'teacher.ckpt')}",
            "--model.init_args.loss_weights={dice: 1.0, lovasz: 1.0, kd: 1.0, feature: 10.0}",
        ]
    cli = DistillCLI(
        args=[
            "--config",
            str(REPO / "experiments/prostate" / config),
            *PROSTATE_TINY,
            *QUIET,
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--model.init_args.finite_check_every=50",  # the one read, every 50 steps (QUIET logs every step)
            f"--data.init_args.data_root={synthetic_prostate_root}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            *extra,
        ],
        run=False,
    )
    recorder = HostReadRecorder()
    cli.trainer.callbacks.append(recorder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        recorder.on_train_batch_end()
    assert cli.trainer.global_step == 3 and recorder.reads == []

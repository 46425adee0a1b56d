"""Set-up on an accelerator, replayed on the CPU: during ``setup`` Lightning reports the accelerator as
``module.device`` (``lightning/pytorch/trainer/call.py``, ``_call_setup_hook``) while the weights are
still on the CPU; they move only afterwards (``strategy.setup``). Here the reported device is ``meta``:
a tensor built on ``self.device`` during set-up then meets CPU weights and fails, as on a GPU. Every
task and every distillation variant fits under it."""

# ruff: noqa: F811 - the surgical fixtures are imported from test_surgical_modules and requested by name
from __future__ import annotations

from pathlib import Path
from unittest.mock import PropertyMock, patch

import pytest
import torch
from conftest import TINY as PROSTATE_TINY
from lightning.pytorch.trainer import call
from test_multi_teacher import save_teacher, write_manifest
from test_surgical_modules import TINY, cholec, features_dir, phase_data, ssl_data, teacher_ckpt, trainer  # noqa: F401

from data_modules.surgical import PhaseFeatureDataModule
from distill.cli import main
from distill.modules import MoCoDistillModule, MoCoModule, PhaseClassifierModule, TCNPhaseModule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def accelerator_reported_during_setup(monkeypatch):
    """The trainer's root device reads ``meta`` while Lightning's set-up hooks run (and only then)."""
    setup_hook = call._call_setup_hook
    reported = []

    def faked(trainer) -> None:
        meta = PropertyMock(return_value=torch.device("meta"))
        with patch.object(type(trainer.strategy), "root_device", new_callable=lambda: meta):
            setup_hook(trainer)
        reported.append(trainer.lightning_module.device)

    monkeypatch.setattr(call, "_call_setup_hook", faked)
    return reported


def fit_prostate(root: Path, out: Path, config: str, *extra: str) -> None:
    main(
        [
            "fit",
            "--config",
            str(REPO / "experiments/prostate" / config),
            *PROSTATE_TINY,
            "--trainer.limit_val_batches=1",
            f"--data.init_args.data_root={root}",
            f"--trainer.default_root_dir={out}",
            *extra,
        ]
    )


def test_the_fake_reports_meta_during_setup_and_the_weights_end_on_the_cpu(
    accelerator_reported_during_setup, synthetic_prostate_root, tmp_path
):
    fit_prostate(synthetic_prostate_root, tmp_path / "teacher", "teacher.yaml")
    assert accelerator_reported_during_setup == [torch.device("meta")]


@pytest.mark.parametrize("cached", [False, True], ids=["live teacher with features", "teacher cache"])
def test_single_teacher_distillation_sets_up_on_an_accelerator(
    accelerator_reported_during_setup, synthetic_prostate_root, tmp_path, cached
):
    teacher = save_teacher(tmp_path / "teacher.ckpt")
    extra = [f"--model.init_args.teacher_checkpoint={teacher}"]
    if cached:  # the cache holds logits only; intensity augmentation would change them
        extra += [
            "--model.init_args.loss_weights={dice: 1.0, kd: 1.0}",
            f"--model.init_args.teacher_cache={tmp_path / 'cache.safetensors'}",
            "--data.init_args.intensity_augmentation=false",
        ]
    else:
        extra.append("--model.init_args.loss_weights={dice: 1.0, lovasz: 1.0, kd: 1.0, feature: 10.0}")
    fit_prostate(synthetic_prostate_root, tmp_path / "run", "student_kd.yaml", *extra)
    assert (tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("rule", ["mean", "learned"])
def test_multi_teacher_distillation_sets_up_on_an_accelerator(
    accelerator_reported_during_setup, synthetic_prostate_root, tmp_path, rule
):
    manifest = write_manifest(tmp_path / "m.yaml", [save_teacher(tmp_path / f"t{k}.ckpt", seed=k) for k in range(2)])
    weights = "{dice: 1.0, kd: 1.0, feature: 10.0" + (", gate: 1.0}" if rule == "learned" else "}")
    fit_prostate(
        synthetic_prostate_root,
        tmp_path / "run",
        "student_multi_teacher.yaml",
        f"--model.init_args.teachers={manifest}",
        f"--model.init_args.weighting={rule}",
        f"--model.init_args.loss_weights={weights}",
    )
    assert (tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_surgical_modules_set_up_on_an_accelerator(
    accelerator_reported_during_setup,
    cholec,
    teacher_ckpt,
    features_dir,
    tmp_path,
):
    """MoCo, MoCo + distillation, the frame classifier from a MoCo checkpoint, the TCN."""
    trainer(tmp_path).fit(MoCoModule(**TINY), datamodule=ssl_data(cholec))
    trainer(tmp_path).fit(MoCoDistillModule(teacher_checkpoint=str(teacher_ckpt), **TINY), datamodule=ssl_data(cholec))
    classifier = PhaseClassifierModule(
        backbone=TINY["backbone"], pretrained_checkpoint=str(teacher_ckpt), mode="linear_probe", class_weights=True
    )
    trainer(tmp_path).fit(classifier, datamodule=phase_data(cholec, train_videos=2))
    tcn = TCNPhaseModule(num_layers=2, channels=8)
    trainer(tmp_path).fit(tcn, datamodule=PhaseFeatureDataModule(features_dir, cholec.root, num_workers=0))
    assert accelerator_reported_during_setup == [torch.device("meta")] * 4

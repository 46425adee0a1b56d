"""Prostate distillation end to end: networks, feature taps, teacher loading, modules, CLI, tables."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import QUIET, TINY
from safetensors.torch import save_file

from distill.cli import main
from distill.errors import DataError
from distill.losses import weighted_sum
from distill.models import FeatureTaps, build_segmentation_network, count_parameters
from distill.modules import SegDistillModule, SegmentationModule
from distill.modules.checkpoints import file_sha256, load_segmentation_network
from distill.tables import run_table

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [*TINY, *QUIET, "--trainer.limit_train_batches=3"]


def metrics_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_registry_teacher_is_heavy_and_students_are_light():
    teacher = count_parameters(build_segmentation_network("unet", 3, 2))
    assert teacher > 30e6
    for name in ("slim_unet", "mobile_unet"):
        student = build_segmentation_network(name, 3, 2)
        assert count_parameters(student) < teacher / 10
        assert student(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_unknown_network_is_a_clear_error():
    with pytest.raises(DataError, match="unknown network 'unet3'; registered: mobile_unet, slim_unet, unet"):
        build_segmentation_network("unet3", 3, 2)


def test_feature_taps_capture_named_layers_and_reject_bad_paths():
    net = build_segmentation_network("slim_unet", 3, 2, width=4)
    taps = FeatureTaps(net, ["down_2", "down_4"])
    net(torch.randn(2, 3, 64, 64))
    shallow, deep = taps.pop()
    assert shallow.shape == (2, 16, 16, 16) and deep.shape == (2, 64, 4, 4)
    with pytest.raises(DataError, match="teacher: no module at path 'down_5'.*down_4"):
        FeatureTaps(net, ["down_5"], owner="teacher")


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    """A plain safetensors state dict of a width-8 U-Net teacher (seeded: the same in any test order)."""
    path = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_file(build_segmentation_network("unet", 3, 2, width=8).state_dict(), str(path))
    return path


def test_teacher_checkpoint_errors_name_the_file(tmp_path, teacher_file):
    with pytest.raises(
        DataError, match=f"{teacher_file}: checkpoint does not match the segmentation network .*mobile_unet"
    ):
        load_segmentation_network(teacher_file, network="mobile_unet")
    with pytest.raises(DataError, match="records no network architecture"):
        load_segmentation_network(teacher_file)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"{corrupt}: unreadable checkpoint"):
        load_segmentation_network(corrupt)
    with pytest.raises(DataError, match="missing.ckpt: checkpoint not found"):
        load_segmentation_network(tmp_path / "missing.ckpt")


def distill_module(teacher_file: Path, **kwargs) -> SegDistillModule:
    module = SegDistillModule(
        teacher_checkpoint=str(teacher_file),
        teacher_network="unet",
        teacher_network_kwargs={"width": 8},
        network="slim_unet",
        network_kwargs={"width": 4},
        feature_pairs=[{"student": "down_2", "teacher": "down_2"}, {"student": "down_4", "teacher": "down_4"}],
        **kwargs,
    )
    module.prepare_distillation()  # what fitting does first: load the teachers, build the adapters
    return module


@pytest.mark.parametrize(
    "feature_loss, logit_loss",
    [
        ("attention", "kd"),
        ({"name": "attention", "p": 4}, {"name": "channel_wise"}),
        ({"name": "mse"}, "kd"),
        ({"name": "channel_wise", "temperature": 2}, "kd"),
        ({"name": "region_affinity"}, "kd"),
    ],
)
def test_distillation_losses_chosen_by_name_train_a_step(teacher_file, feature_loss, logit_loss):
    module = distill_module(teacher_file, feature_loss=feature_loss, logit_loss=logit_loss)
    module.train()
    optimizer = module.optimizer_factory(module.parameter_groups())
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=generator),
        "label": torch.randint(0, 2, (2, 32, 32), generator=generator),
    }
    terms = module.loss_terms(batch, module.training_outputs(batch))
    assert set(terms) == {"dice", "lovasz", "kd", "feature"} and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    optimizer.step()


def test_unknown_distillation_loss_is_a_one_line_error(teacher_file):
    with pytest.raises(
        DataError, match=r"^feature_loss: unknown loss 'cosine'; known: attention, channel_wise, mse, region_affinity$"
    ):
        SegDistillModule(
            teacher_checkpoint=str(teacher_file),
            feature_loss="cosine",
            feature_pairs=[{"student": "down_2", "teacher": "down_2"}],
        )


def test_teacher_is_frozen_in_eval_mode_and_left_out_of_checkpoints(teacher_file):
    module = distill_module(teacher_file, feature_loss="mse")
    module.train()
    teacher = module.teachers.networks[0]
    assert module.net.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = module.optimizer_factory(module.parameter_groups())
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised >= {id(p) for p in module.distill_heads.parameters()}  # 1x1 adapters train with the student
    assert module.teachers.records[0].sha256 == file_sha256(teacher_file) and module.hparams.teacher_sha256 is None
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["teacher_records"] == [{"checkpoint": str(teacher_file), "sha256": file_sha256(teacher_file)}]
    assert checkpoint["state_dict"] and not any("teachers." in k for k in checkpoint["state_dict"])
    assert checkpoint["network_family"] == "segmentation"
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: the teacher weights are restored from its file

    # Testing/predicting a trained student needs neither its teacher file nor its training-only heads.
    teacher_file.unlink()
    student = SegDistillModule(
        teacher_checkpoint=str(teacher_file),
        network="slim_unet",
        network_kwargs={"width": 4},
        feature_pairs=[{"student": "down_2", "teacher": "down_2"}],
        feature_loss="mse",
    )
    student.on_load_checkpoint(checkpoint)
    student.load_state_dict(checkpoint["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(student.net.state_dict().values(), module.net.state_dict().values()))
    with pytest.raises(DataError, match="teacher.safetensors: checkpoint not found"):
        student.prepare_distillation()


def test_resume_refuses_a_retrained_teacher(tmp_path, teacher_file):
    module = distill_module(teacher_file)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)  # what Lightning does: records the teacher
    save_file(build_segmentation_network("unet", 3, 2, width=8).state_dict(), str(teacher_file))  # retrained
    resumed = distill_module(teacher_file)
    with pytest.raises(
        DataError, match="teacher.safetensors: teacher differs from the one this checkpoint was trained with"
    ):
        resumed.on_load_checkpoint(checkpoint)
    pinned = SegDistillModule(
        teacher_checkpoint=str(teacher_file),
        teacher_sha256=module.teachers.records[0].sha256,
        teacher_network="unet",
        teacher_network_kwargs={"width": 8},
        loss_weights={"dice": 1.0, "kd": 1.0},
    )
    with pytest.raises(DataError, match="teacher.safetensors: content hash .* differs from the recorded"):
        pinned.prepare_distillation()


def test_distillation_terms_are_computed_and_the_loss_decreases(teacher_file):
    torch.manual_seed(0)
    # the network starts at this task's foreground fraction (image > 0.5: 31 %), as a user sets it
    module = distill_module(
        teacher_file, loss_weights={"dice": 1.0, "lovasz": 1.0, "kd": 1.0, "feature": 10.0}, foreground_prior=0.3
    )
    image = torch.randn(4, 3, 32, 32)
    batch = {"image": image, "label": (image[:, 1] > 0.5).long()}  # learnable from the centre slice
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(50):
        terms = module.loss_terms(batch, module.training_outputs(batch))
        loss = weighted_sum(terms, module.loss_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(terms) == {"dice", "lovasz", "kd", "feature"}
    # measured over teacher and student seeds 0-11 (1 thread): last / first 0.53-0.72 after 50 steps;
    # after 25 steps 0.63-0.82 (seeds 0-15 and 0-11, 1 thread) and 0.63-0.81 (seeds 0-15, 2 threads)
    assert losses[-1] < 0.85 * losses[0]


def test_unknown_loss_term_fails_at_construction():
    with pytest.raises(DataError, match="unknown loss term 'kd'"):
        SegmentationModule(network="slim_unet", loss_weights={"dice": 1.0, "kd": 1.0})


@pytest.mark.parametrize(
    "override, named",
    [
        ("--model.init_args.widht=4", "widht"),
        ("--trainer.max_epochz=3", "trainer.max_epochz"),
        ("--data.init_args.split=per_sit", "split"),
    ],
)
def test_bad_yaml_key_or_value_is_a_one_line_error_naming_it(synthetic_prostate_root, override, named):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments/prostate/teacher.yaml"),
                override,
                f"--data.init_args.data_root={synthetic_prostate_root}",
            ]
        )
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message


def test_missing_data_root_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments/prostate/teacher.yaml"),
                *OVERRIDES,
                f"--data.init_args.data_root={tmp_path / 'nowhere'}",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
            ]
        )
    assert str(tmp_path / "nowhere") in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_table_fit_test_resume_and_predict(synthetic_prostate_root, tmp_path):
    """The demo's path at toy scale, then resume from last.ckpt and predict NIfTI masks."""
    out = tmp_path / "table"
    overrides = [
        *OVERRIDES,
        f"--data.init_args.data_root={synthetic_prostate_root}",
        "--model.init_args.eval_batch_size=64",
    ]
    results = run_table(REPO / "experiments/prostate/tables/single_teacher.yaml", out, overrides)
    few_labels = [f"student ({n} labelled cases){kd}" for n in (3, 6) for kd in ("", " + KD on all images")]
    assert [r.name for r in results] == ["teacher (U-Net)", "student (no KD)", "student + KD", *few_labels]
    for result in results:
        assert 0.0 <= result.metrics["test/dice"] <= 1.0 and result.metrics["test/hd95"] > 0
        assert {"test/dice/RUNMC", "test/dice/HK"} <= set(result.metrics)
        assert Path(result.best_checkpoint).is_file()
        assert (Path(result.log_dir) / "config.yaml").is_file()
    table = (out / "results.md").read_text()
    assert "- student + KD vs student (no KD): Dice " in table and "| teacher (U-Net) |" in table
    assert "split: per_site by case" in table and "seeds: 0" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == [r.name for r in results] and float(rows[0]["test/dice"]) == results[0].metrics[
        "test/dice"
    ]
    assert (out / "site_dice.png").stat().st_size > 0

    # A restarted table (same settings) finds the finished runs and trains nothing again.
    again = run_table(REPO / "experiments/prostate/tables/single_teacher.yaml", out, overrides)
    assert [r.metrics for r in again] == [r.metrics for r in results] and (out / "results-1.md").is_file()

    # Resume the KD run from its last checkpoint: training continues at the saved step.
    kd = results[2]
    last = Path(kd.best_checkpoint).with_name("last.ckpt")
    saved_step = torch.load(last, weights_only=True)["global_step"]
    teacher_ckpt = results[0].best_checkpoint
    kd_args = [
        "--config",
        str(REPO / "experiments/prostate/student_kd.yaml"),
        *OVERRIDES,
        f"--data.init_args.data_root={synthetic_prostate_root}",
        f"--model.init_args.teacher_checkpoint={teacher_ckpt}",
        f"--trainer.default_root_dir={tmp_path / 'kd'}",
    ]
    main(["fit", *kd_args, "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    resumed_dir = tmp_path / "kd" / "lightning_logs" / "version_0"
    steps = [int(row["step"]) for row in metrics_rows(resumed_dir) if row.get("train/loss")]
    assert steps and min(steps) >= saved_step and max(steps) < 2 * saved_step
    assert torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * saved_step

    # Predict: one NIfTI per test volume, aligned with its input.
    main(["predict", *kd_args, f"--ckpt_path={last}"])
    predictions = sorted((tmp_path / "kd" / "predictions").rglob("*_prediction.nii.gz"))
    assert predictions
    site, case = predictions[0].parent.name, predictions[0].name.split("_")[0]
    image = nib.load(next((synthetic_prostate_root / site).glob(f"{case}.nii.gz")))
    mask = nib.load(predictions[0])
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    with pytest.raises(SystemExit, match="exists"):  # never overwrites earlier predictions
        main(["predict", *kd_args, f"--ckpt_path={last}"])

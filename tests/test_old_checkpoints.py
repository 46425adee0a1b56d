"""Student checkpoints written before ``teacher_records`` existed still test, resume and load.

Such a checkpoint has no ``teacher_records`` entry, and its ``teacher_checkpoint`` / ``teacher_sha256``
hyper-parameters hold the teacher file that was resolved and its hash, where a checkpoint now keeps
the user's values there. :func:`as_written_before_records` turns a fresh checkpoint into that layout:
for a KD student this is the whole difference (compared with a checkpoint the earlier code wrote for
the same run: the same entries but ``teacher_records``, the same weights).
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET, TINY

from distill.cli import main
from distill.errors import DataError
from distill.modules import SegDistillModule, SegmentationModule
from distill.modules.checkpoints import file_sha256
from distill.modules.teacher_records import check_teacher_records

REPO = Path(__file__).resolve().parents[1]


def fit_args(config: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "experiments/prostate" / config), f"--data.init_args.data_root={data_root}",
        f"--trainer.default_root_dir={out}", *TINY, *QUIET, "--trainer.limit_val_batches=1", *extra,
    ]  # fmt: skip


def as_written_before_records(checkpoint: Path, out: Path) -> Path:
    """A copy of a single-teacher student ``checkpoint`` as the code before ``teacher_records`` wrote it."""
    payload = torch.load(checkpoint, weights_only=True)
    (record,) = payload.pop("teacher_records")
    payload["hyper_parameters"] |= {"teacher_checkpoint": record["checkpoint"], "teacher_sha256": record["sha256"]}
    torch.save(payload, out)
    return out


def logged_test_metrics(run: Path) -> dict[str, str]:
    with open(run / "lightning_logs" / "version_0" / "metrics.csv") as f:
        return {k: v for row in csv.DictReader(f) for k, v in row.items() if k.startswith("test/") and v}


@pytest.fixture(scope="module")
def kd_run(synthetic_prostate_root, tmp_path_factory) -> SimpleNamespace:
    """A tiny teacher, a KD student of it (teacher given as its run directory), and the student's
    ``last.ckpt`` in the current (``new``) and the earlier (``old``) layout."""
    base = tmp_path_factory.mktemp("old_checkpoints")
    main(["fit", *fit_args("teacher.yaml", synthetic_prostate_root, base / "teacher")])
    student_args = fit_args(
        "student_kd.yaml",
        synthetic_prostate_root,
        base / "student",
        f"--model.init_args.teacher_checkpoint={base / 'teacher'}",
    )
    main(["fit", *student_args])
    new = base / "student" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return SimpleNamespace(
        base=base,
        teacher=base / "teacher" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt",
        student_args=student_args,
        new=new,
        old=as_written_before_records(new, base / "old.ckpt"),
    )


def test_a_new_checkpoint_records_the_teacher_and_keeps_the_users_values(kd_run):
    payload = torch.load(kd_run.new, weights_only=True)
    assert payload["teacher_records"] == [{"checkpoint": str(kd_run.teacher), "sha256": file_sha256(kd_run.teacher)}]
    assert payload["hyper_parameters"]["teacher_checkpoint"] == str(kd_run.base / "teacher")
    assert payload["hyper_parameters"]["teacher_sha256"] is None


def test_an_old_checkpoint_tests_as_the_new_one_does(kd_run):
    """``distill test --ckpt_path``: the same weights, the same metrics."""
    for name in ("old", "new"):
        main(["test", *kd_run.student_args, f"--trainer.default_root_dir={kd_run.base / f'test_{name}'}",
              f"--ckpt_path={getattr(kd_run, name)}"])  # fmt: skip
    old, new = logged_test_metrics(kd_run.base / "test_old"), logged_test_metrics(kd_run.base / "test_new")
    assert "test/dice" in old and old == new


def test_an_old_checkpoint_resumes_and_its_next_checkpoints_record_the_teacher(kd_run):
    out = kd_run.base / "resumed"
    main(["fit", *kd_run.student_args, f"--trainer.default_root_dir={out}", "--trainer.max_epochs=2",
          f"--ckpt_path={kd_run.old}"])  # fmt: skip
    resumed = torch.load(out / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2 * torch.load(kd_run.old, weights_only=True)["global_step"]
    assert resumed["teacher_records"] == [{"checkpoint": str(kd_run.teacher), "sha256": file_sha256(kd_run.teacher)}]


def test_an_old_checkpoint_refuses_a_retrained_teacher(kd_run, tmp_path):
    """The hash an old checkpoint records in ``teacher_sha256`` is checked when it is resumed."""
    retrained = tmp_path / "best.ckpt"
    payload = torch.load(kd_run.teacher, weights_only=True)
    payload["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, retrained)
    student = SegDistillModule(
        teacher_checkpoint=str(retrained),
        network="slim_unet",
        network_kwargs={"width": 4},
        feature_pairs=[{"student": "down_2", "teacher": "down_2"}, {"student": "down_4", "teacher": "down_4"}],
    )
    student.prepare_distillation()
    with pytest.raises(DataError) as error:
        student.on_load_checkpoint(torch.load(kd_run.old, weights_only=True))
    assert str(error.value) == (
        f"{retrained}: teacher differs from the one this checkpoint was trained with (content hash changed); "
        "resume with the original teacher files"
    )


def test_old_and_new_checkpoints_load_from_checkpoint_alike(kd_run):
    old, new = (
        SegDistillModule.load_from_checkpoint(p, map_location="cpu", weights_only=True)
        for p in (kd_run.old, kd_run.new)
    )
    assert old.hparams.teacher_checkpoint == str(kd_run.teacher) and new.hparams.teacher_checkpoint == str(
        kd_run.base / "teacher"
    )
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_a_multi_teacher_checkpoint_of_before_records_its_hashes_as_a_list():
    records = [SimpleNamespace(checkpoint=f"t{k}.ckpt", sha256=f"{k}" * 64) for k in range(2)]
    old = {"hyper_parameters": {"teachers": "manifest.yaml", "teacher_sha256": ["0" * 64, "1" * 64]}}
    check_teacher_records(old, records)  # the same teachers
    old["hyper_parameters"]["teacher_sha256"][1] = "2" * 64
    with pytest.raises(DataError, match=r"^t1.ckpt: teacher differs from the one this checkpoint was trained with"):
        check_teacher_records(old, records)


# A checkpoint the code before the data links wrote (commit cff7332: `distill fit` of
# student_baseline.yaml, when the YAML still set in_channels, with a width-2 slim U-Net, one epoch of
# two batches at 32 px on the synthetic tree): today's YAML names no in_channels, the data links it.
BEFORE_LINKS = REPO / "tests/fixtures/slim_unet_student_before_links.ckpt"


def test_a_checkpoint_written_before_the_data_links_tests_through_todays_yaml(synthetic_prostate_root, tmp_path):
    args = fit_args(
        "student_baseline.yaml", synthetic_prostate_root, tmp_path, "--model.init_args.network_kwargs.width=2"
    )
    main(["test", *args, f"--ckpt_path={BEFORE_LINKS}"])
    metrics = logged_test_metrics(tmp_path)
    assert 0 <= float(metrics["test/dice"]) <= 1 and "test/dice/RUNMC" in metrics
    module = SegmentationModule.load_from_checkpoint(BEFORE_LINKS, weights_only=True)
    assert (module.hparams.in_channels, module.hparams.num_classes, module.hparams.class_names) == (3, 2, None)

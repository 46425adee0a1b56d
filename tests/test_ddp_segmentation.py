"""Lightning DDP on CPU (gloo, 2 processes) for prostate segmentation, teacher and single-teacher student.

Every rank splits the cases alike, and the per-volume validation and test metrics of a checkpoint
are those of a 1-process run: the distributed sampler repeats a volume to give both ranks as many,
and each volume still counts once. The DDP runs are ``distill`` subprocesses; the 1-process runs
evaluate the same checkpoints in this process. ``tests/ddp_probe.py`` records what each rank saw.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_key

REPO = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = REPO / "experiments/prostate/teacher.yaml", REPO / "experiments/prostate/student_kd.yaml"
# 1 val and 5 test cases: odd counts, so the sampler of 2 ranks repeats one volume in each loop.
SITES = "--data.init_args.sites=[RUNMC,I2CVB,UCL,BIDMC,HK]"
TINY = [
    SITES,
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--data.init_args.load_threads=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.accelerator=cpu",
    "--model.init_args.network_kwargs.width=4",
]


def test_volume_metrics_count_a_repeated_volume_once_in_any_order():
    cases = [(0.5, 2.0, "A", "a1"), (0.7, 4.0, "A", "a2"), (0.9, 1.0, "B", "b1")]
    metric, reordered = PerGroupVolumeMetrics(["A", "B"]), PerGroupVolumeMetrics(["A", "B"])
    for case in [*cases, cases[0]]:  # a1 twice, as a padding sampler serves it
        metric.update(*case)
    for case in reversed(cases):
        reordered.update(*case)
    results = metric.compute()
    assert results["dice"].item() == pytest.approx(0.7) and results["hd95"].item() == pytest.approx(7 / 3)
    assert results["dice/A"].item() == pytest.approx(0.6) and results["hd95/B"].item() == 1.0
    assert all(torch.equal(results[name], value) for name, value in reordered.compute().items())  # bit for bit
    volumes = metric.per_volume()
    assert volumes["volume"].tolist() == sorted(volume_key(name) for name in ("a1", "a2", "b1"))
    by_key = {volume_key(c[3]): c for c in cases}
    assert [by_key[k][0] for k in volumes["volume"].tolist()] == volumes["dice"].tolist()


def run_ddp(subcommand: str, config: Path, run_dir: Path, *extra: str) -> None:
    """``distill <subcommand>`` as 2 DDP processes on CPU (gloo), recording with the probe callback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "distill.cli", subcommand, "--config", str(config), *TINY, *extra,
               f"--trainer.default_root_dir={run_dir}", "--trainer.strategy=ddp", "--trainer.devices=2",
               "--trainer.callbacks+=ddp_probe.RecordEvaluation", f"--trainer.callbacks.out_dir={run_dir / 'probe'}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_one_process(subcommand: str, config: Path, run_dir: Path, *extra: str) -> None:
    """``distill <subcommand>`` in this process on 1 CPU thread, as each DDP process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([subcommand, "--config", str(config), *TINY, *extra, f"--trainer.default_root_dir={run_dir}",
              "--trainer.devices=1", "--trainer.callbacks+=ddp_probe.RecordEvaluation",
              f"--trainer.callbacks.out_dir={run_dir / 'probe'}"])
    finally:
        torch.set_num_threads(threads)


def probe(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "probe" / f"{name}.json").read_text())


def logged(run_dir: Path, prefix: str) -> dict[str, str]:
    """The metrics starting with ``prefix`` logged by the run, as written (last value of each)."""
    with open(run_dir / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: v for row in rows for k, v in row.items() if k.startswith(prefix) and v != ""}


def check_ranks_agree(run_dir: Path, fn: str, loop: str, split: list[str]) -> None:
    """Both ranks split alike and evaluated ``split`` together, one volume twice (the sampler's padding)."""
    ranks = [probe(run_dir, f"{fn}_rank{rank}") for rank in (0, 1)]
    assert ranks[0]["splits"] == ranks[1]["splits"]
    served = ranks[0]["served"][loop] + ranks[1]["served"][loop]
    assert len(served) == len(split) + 1 and len(ranks[0]["served"][loop]) == len(ranks[1]["served"][loop])
    assert sorted(set(served)) == sorted(split)


def fit_then_compare(config: Path, run_dir: Path, data_root: Path, *extra: str) -> Path:
    """2-process fit, then the 1-process validation and the 2- and 1-process tests of its last.ckpt:
    per-volume and logged metrics must be equal. Returns last.ckpt."""
    data = f"--data.init_args.data_root={data_root}"
    run_ddp("fit", config, run_dir / "fit", data, *extra)
    val_cases = probe(run_dir / "fit", "fit_rank0")["splits"]["val"]
    assert len(val_cases) == 1
    check_ranks_agree(run_dir / "fit", "fit", "val", val_cases)
    last = run_dir / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    run_one_process("validate", config, run_dir / "validate", data, *extra, f"--ckpt_path={last}")
    assert probe(run_dir / "fit", "fit_val_metrics") == probe(run_dir / "validate", "validate_val_metrics")
    assert set(probe(run_dir / "fit", "fit_val_metrics")) == set(val_cases)
    assert logged(run_dir / "fit", "val/") == logged(run_dir / "validate", "val/") != {}

    run_ddp("test", config, run_dir / "test-ddp", data, *extra, f"--ckpt_path={last}")
    test_cases = probe(run_dir / "test-ddp", "test_rank0")["splits"]["test"]
    assert len(test_cases) == 5
    check_ranks_agree(run_dir / "test-ddp", "test", "test", test_cases)
    run_one_process("test", config, run_dir / "test", data, *extra, f"--ckpt_path={last}")
    per_volume = probe(run_dir / "test-ddp", "test_test_metrics")
    assert per_volume == probe(run_dir / "test", "test_test_metrics") and set(per_volume) == set(test_cases)
    assert logged(run_dir / "test-ddp", "test/") == logged(run_dir / "test", "test/")
    assert {"test/dice", "test/hd95", "test/dice/RUNMC", "test/hd95/HK"} <= set(logged(run_dir / "test", "test/"))
    return last


@pytest.fixture(scope="module")
def teacher_checkpoint(synthetic_prostate_root, tmp_path_factory) -> Path:
    return fit_then_compare(TEACHER, tmp_path_factory.mktemp("ddp-teacher"), synthetic_prostate_root)


def test_teacher_under_ddp_matches_one_process(teacher_checkpoint):
    assert torch.load(teacher_checkpoint, weights_only=True)["global_step"] == 2  # both ranks stepped together


def test_single_teacher_student_under_ddp_matches_one_process(synthetic_prostate_root, teacher_checkpoint, tmp_path):
    """Each rank loads the teacher when fitting starts; the student's checkpoints hold no teacher."""
    last = fit_then_compare(STUDENT, tmp_path, synthetic_prostate_root,
                            f"--model.init_args.teacher_checkpoint={teacher_checkpoint}")
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teachers.") for key in state)

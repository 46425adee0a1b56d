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
from conftest import QUIET, TINY

from distill.cli import main
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_key

REPO = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = REPO / "experiments/prostate/teacher.yaml", REPO / "experiments/prostate/student_kd.yaml"
# 1 val and 5 test cases: odd counts, so the sampler of 2 ranks repeats one volume in each loop.
SITES = "--data.init_args.sites=[RUNMC,I2CVB,UCL,BIDMC,HK]"
OVERRIDES = [SITES, *TINY, *QUIET, "--data.init_args.batch_size=4", "--trainer.accelerator=cpu"]


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
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    }
    env = {
        **inherited,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "distill.cli",
        subcommand,
        "--config",
        str(config),
        *OVERRIDES,
        *extra,
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.callbacks+=ddp_probe.RecordEvaluation",
        f"--trainer.callbacks.out_dir={run_dir / 'probe'}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_one_process(subcommand: str, config: Path, run_dir: Path, *extra: str) -> None:
    """``distill <subcommand>`` in this process on 1 CPU thread, as each DDP process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            [
                subcommand,
                "--config",
                str(config),
                *OVERRIDES,
                *extra,
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.devices=1",
                "--trainer.callbacks+=ddp_probe.RecordEvaluation",
                f"--trainer.callbacks.out_dir={run_dir / 'probe'}",
            ]
        )
    finally:
        torch.set_num_threads(threads)


def probe(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "probe" / f"{name}.json").read_text())


def logged(run_dir: Path, prefix: str) -> dict[str, str]:
    """The metrics starting with ``prefix`` logged by the run, as written (last value of each)."""
    with open(run_dir / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: v for row in rows for k, v in row.items() if k.startswith(prefix) and v != ""}


def check_ranks_agree(run_dir: Path, fn: str, loop: str) -> list[str]:
    """Both ranks split alike and evaluated the ``loop`` split together, one volume twice (the
    sampler's padding for an odd count). Returns that split's cases."""
    ranks = [probe(run_dir, f"{fn}_rank{rank}") for rank in (0, 1)]
    assert ranks[0]["splits"] == ranks[1]["splits"]
    cases = ranks[0]["splits"][loop]
    served = [ranks[0]["served"][loop], ranks[1]["served"][loop]]
    assert len(cases) % 2 == 1 and len(served[0]) == len(served[1]) == (len(cases) + 1) // 2
    assert sorted(set(served[0] + served[1])) == sorted(cases)
    return cases


def check_same_metrics(ddp_dir: Path, one_dir: Path, fn: str, loop: str, cases: list[str]) -> None:
    """Per-volume metrics (each case once) and logged metrics of the DDP run equal the 1-process run's."""
    per_volume = probe(ddp_dir, f"{fn}_{loop}_metrics")
    assert per_volume == probe(one_dir, f"{'validate' if loop == 'val' else 'test'}_{loop}_metrics")
    assert sorted(case for case, _, _ in per_volume) == sorted(cases)
    assert logged(ddp_dir, f"{loop}/") == logged(one_dir, f"{loop}/") != {}


def fit_and_validate(config: Path, run_dir: Path, data: str, *extra: str) -> Path:
    """2-process fit, then a 1-process validation of its last.ckpt, which holds the weights the
    fit validated last: the same validation metrics. Returns last.ckpt."""
    run_ddp("fit", config, run_dir / "fit", data, *extra)
    val_cases = check_ranks_agree(run_dir / "fit", "fit", "val")
    last = run_dir / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run_one_process("validate", config, run_dir / "validate", data, *extra, f"--ckpt_path={last}")
    check_same_metrics(run_dir / "fit", run_dir / "validate", "fit", "val", val_cases)
    return last


def test_teacher_under_ddp_matches_one_process(synthetic_prostate_root, tmp_path):
    data = f"--data.init_args.data_root={synthetic_prostate_root}"
    last = fit_and_validate(TEACHER, tmp_path, data)
    assert torch.load(last, weights_only=True)["global_step"] == 2  # both ranks stepped together

    run_ddp("test", TEACHER, tmp_path / "test-ddp", data, f"--ckpt_path={last}")
    test_cases = check_ranks_agree(tmp_path / "test-ddp", "test", "test")
    run_one_process("test", TEACHER, tmp_path / "test", data, f"--ckpt_path={last}")
    check_same_metrics(tmp_path / "test-ddp", tmp_path / "test", "test", "test", test_cases)
    assert {"test/dice/RUNMC", "test/hd95/HK"} <= set(logged(tmp_path / "test", "test/"))


def test_single_teacher_student_under_ddp_matches_one_process(synthetic_prostate_root, tmp_path):
    """Every rank loads the teacher when fitting starts; the student's checkpoints hold no teacher.
    (Its evaluation is the teacher's code, tested under DDP above for the test loop too.) The
    teacher cache: each rank computes half the slices, and the file equals a 1-process build."""
    data = f"--data.init_args.data_root={synthetic_prostate_root}"
    run_one_process("fit", TEACHER, tmp_path / "teacher", data)
    teacher = f"--model.init_args.teacher_checkpoint={next((tmp_path / 'teacher').rglob('last.ckpt'))}"
    cache = tmp_path / "cache" / "two.safetensors"
    # the cache holds logits (no features), and intensity jitter would change what the teachers predict
    cached = [
        "--model.init_args.loss_weights={dice: 1, lovasz: 1, kd: 1}",
        "--data.init_args.intensity_augmentation=false",
    ]
    last = fit_and_validate(
        STUDENT, tmp_path / "student", data, teacher, *cached, f"--model.init_args.teacher_cache={cache}"
    )
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teachers.") for key in state)
    one = tmp_path / "cache" / "one.safetensors"
    run_one_process("fit", STUDENT, tmp_path / "one", data, teacher, *cached, f"--model.init_args.teacher_cache={one}")
    assert sorted(p.name for p in cache.parent.iterdir()) == ["one.safetensors", "two.safetensors"]  # no shard left
    assert cache.read_bytes() == one.read_bytes()

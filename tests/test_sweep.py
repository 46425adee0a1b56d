"""Sweep files: wandb's own agent builds command lines the CLI accepts; the local runner is
resumable and finds the best point."""

from __future__ import annotations

import csv
import io
import itertools
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.cli import main
from distill.errors import DataError
from distill.sweep import SweepSpec, build_argv, grid_points, random_point, read_results, run_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted(REPO.glob("experiments/*/sweeps/*.yaml"))


def agent_argv(spec: SweepSpec, point: dict, monkeypatch, tmp_path) -> list[str]:
    """The command line ``wandb agent`` starts for ``point``: its real ``_command_run``, with the
    process start replaced by a recorder."""
    from wandb import wandb_agent

    started = []

    class RecordedProcess:
        def __init__(self, command=None, **kwargs):
            started.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command, agent._function, agent._in_jupyter = (
        yaml.safe_load(spec.path.read_text())["command"],
        None,
        False,
    )
    agent._forward_signals, agent._run_processes = False, {}
    agent._command_run({"run_id": "run0", "program": spec.program, "args": {k: {"value": v} for k, v in point.items()}})
    (command,) = started
    return [c for c in command if c != "/usr/bin/env"]  # ${env}: the agent's launcher prefix


def sampled_points(spec: SweepSpec, n: int = 3) -> list[dict]:
    if spec.method == "grid":
        return list(itertools.islice(grid_points(spec), n))
    rng = np.random.default_rng(0)
    return [random_point(spec, rng) for _ in range(n)]


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_sweep_file_argv_from_wandb_agent_is_accepted_by_the_cli(sweep_file, monkeypatch, tmp_path):
    spec = SweepSpec.load(sweep_file)
    assert spec.program == "distill" and "${args}" in spec.command
    monkeypatch.chdir(REPO)  # sweep commands name configs relative to the repository
    for point in sampled_points(spec):
        argv = agent_argv(spec, point, monkeypatch, tmp_path)
        assert build_argv(spec, point) == argv  # the local runner runs what the agent runs
        printed = io.StringIO()
        with redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
            main([*argv[1:], "--print_config"])
        assert exit_info.value.code in (None, 0)
        config = yaml.safe_load(printed.getvalue())
        for key, value in point.items():  # every swept value reached the parsed config
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, key


def test_grid_sweep_runs_every_point_once_and_resumes(tmp_path, capsys):
    sweep = REPO / "experiments/prostate/sweeps/student_baseline.yaml"
    spec = SweepSpec.load(sweep)
    calls = []

    def fake(argv, run_dir, metric, overrides):  # val/dice peaks at lr 1e-3, lovasz 0.5
        point = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--model."))
        calls.append(point)
        lr, lovasz = (
            float(point["model.init_args.optimizer.init_args.lr"]),
            float(point["model.init_args.loss_weights.lovasz"]),
        )
        return 0.9 - abs(np.log10(lr) + 3) - 0.1 * lovasz

    run_sweep(sweep, tmp_path, count=2, execute=fake)  # interrupted after two points
    assert len(calls) == 2
    results = run_sweep(sweep, tmp_path, execute=fake)  # resumes with the four others
    assert len(calls) == 6 and len(results) == 6
    assert sorted(r.point for r in read_results(tmp_path / "sweep.csv")) == list(range(6))
    assert {tuple(p.values()) for p in calls} == {tuple(str(v) for v in p.values()) for p in grid_points(spec)}
    assert "best point 2 (val/dice = 0.85, maximize)" in capsys.readouterr().out
    assert run_sweep(sweep, tmp_path, execute=fake) and len(calls) == 6  # nothing left to run


def write_sweep(tmp_path: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "program": "distill",
                "method": method,
                "metric": {"name": "val/loss", "goal": "minimize"},
                "command": ["${program}", "fit", "${args}"],
                "parameters": {
                    "x": {"distribution": "uniform", "min": -4.0, "max": 4.0},
                    "n": {"distribution": "int_uniform", "min": 1, "max": 3},
                    "kind": {"values": ["a", "b"]},
                },
            }
        )
    )
    return path


def quadratic(argv, run_dir, metric, overrides):
    point = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--"))
    return (float(point["x"]) - 1.0) ** 2 + (point["kind"] == "b")


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_sweeps_resume_and_report_the_best(tmp_path, method, capsys):
    if method == "bayes":
        pytest.importorskip("optuna")
    path, out = write_sweep(tmp_path, method), tmp_path / "out"
    run_sweep(path, out, count=4, execute=quadratic)
    results = run_sweep(path, out, count=16, execute=quadratic)
    assert [r.point for r in results] == list(range(20))
    assert len({r.params["x"] for r in results}) == 20  # resuming did not repeat points
    assert all(-4 <= r.params["x"] <= 4 and r.params["n"] in (1, 2, 3) for r in results)
    best = min(results, key=lambda r: r.metric)
    assert f"best point {best.point} (val/loss = {best.metric:g}, minimize)" in capsys.readouterr().out
    assert best.metric < 1.0  # 20 points find x near 1 with kind a


def test_bad_sweep_files_raise(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nmetric: {name: val/dice}\nparameters: {lr: {min: 0.1, max: 1.0}}\n")
    with pytest.raises(DataError, match="parameters.lr: grid sweeps need values"):
        SweepSpec.load(path)
    path.write_text("method: hyperband\nmetric: {name: val/dice}\nparameters: {lr: {value: 1}}\n")
    with pytest.raises(DataError, match="method"):
        SweepSpec.load(path)
    with pytest.raises(DataError, match="needs --count"):
        run_sweep(write_sweep(tmp_path, "random"), tmp_path / "out", execute=quadratic)


def test_one_point_of_a_sweep_fits_for_one_batch(synthetic_prostate_root, tmp_path, capsys):
    """The real runner: `distill sweep` runs one grid point as a CLI subprocess, one batch."""
    main(
        [
            "sweep",
            str(REPO / "experiments/prostate/sweeps/student_baseline.yaml"),
            "--count",
            "1",
            "--out",
            str(tmp_path),
            f"--data.init_args.data_root={synthetic_prostate_root}",
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            "--data.init_args.load_threads=1",
            "--model.init_args.network_kwargs.width=4",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
        ]
    )
    (result,) = read_results(tmp_path / "sweep.csv")
    assert result.status == "finished", (tmp_path / "point-000" / "output.log").read_text()[-2000:]
    assert 0.0 <= result.metric <= 1.0
    with open(next((tmp_path / "point-000").rglob("metrics.csv"))) as stream:
        assert any(row["val/dice"] for row in csv.DictReader(stream))
    assert "best point 0 (val/dice = " in capsys.readouterr().out

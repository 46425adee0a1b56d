"""The run layer under faults and mistakes: SIGTERM, stale or damaged finished runs, unfinished
teacher runs, two tables on one folder, killed sweep points, resuming with changed settings, and
the one-line errors of the table, profile and evaluate-phases commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, one_line_exit

from distill.cli import main
from distill.errors import DataError

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "experiments/prostate/student_baseline.yaml"
TEACHER = REPO / "experiments/prostate/teacher.yaml"
OVERRIDES = [*TINY, "--trainer.limit_val_batches=1"]


def distill(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # a Ctrl-C sent to its process group reaches it alone
    )


# ------------------------------------------------------------------ SIGTERM and Ctrl-C
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_a_table_at_once_naming_the_run(synthetic_prostate_root, tmp_path, stop):
    """SIGTERM, or Ctrl-C (SIGINT to the process group), mid-epoch of the first run: last.ckpt is
    written, no result.json, the second run never starts, exit 143 / 130 with one line naming the run
    and the signal (`distill fit`'s case: tests/test_resume.py)."""
    config = yaml.safe_load(STUDENT.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "kill_callback.KillAtStep", "init_args": {"step": 1, "signal_name": stop}}
    )
    killed_config = tmp_path / "student_sigterm.yaml"
    killed_config.write_text(yaml.safe_dump(config, sort_keys=False))
    spec = tmp_path / "table.yaml"
    spec.write_text(f"runs:\n  - {{name: first, config: {killed_config}}}\n  - {{name: second, config: {STUDENT}}}\n")
    out = tmp_path / "out"
    done = distill(
        "table", str(spec), "--out", str(out), *OVERRIDES, f"--data.init_args.data_root={synthetic_prostate_root}"
    )
    run_dir = out / "first" / "seed_0"
    last = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert done.returncode == 128 + signal.Signals[stop], done.stderr[-2000:]
    said = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT (Ctrl-C)"}[stop]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: run 'first' (seed 0) in {run_dir}: interrupted by {said} at epoch 0, step 1; "
        f"wrote {last}; rerun to train it again"
    )
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert not (run_dir / "result.json").exists() and not (out / "second").exists()
    assert not (last.parent / "fit_complete.json").exists()


def test_sigterm_between_trainer_calls_is_not_lost():
    """Outside a trainer call the handler stops the command at once; inside one (Lightning's handler
    chained before it) the signal is remembered and ends the block when the call returns."""
    from distill.errors import Terminated
    from distill.termination import handle_stop_signals

    with (
        pytest.raises(Terminated, match="^distill table: interrupted by SIGTERM$"),
        handle_stop_signals("distill table"),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not stopped")
    chained = []
    with (
        pytest.raises(Terminated, match="^distill table: interrupted by SIGTERM$"),
        handle_stop_signals("distill table"),
    ):
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: (chained.append(signum), ours(signum, frame)))
        os.kill(os.getpid(), signal.SIGTERM)  # a trainer call's handler runs: nothing raised here
        chained.append("went on")
    assert chained == [signal.SIGTERM, "went on"] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_is_a_stop_like_sigterm_and_twice_stops_at_once():
    """Ctrl-C outside a trainer call stops the command at once (exit 130 through the CLI); during one it
    is passed to the SIGTERM handler in force (Lightning's: stop at the next batch, checkpoint there),
    and a second Ctrl-C raises KeyboardInterrupt at once. The handlers are restored after."""
    from distill.errors import Terminated
    from distill.termination import exit_status, handle_stop_signals

    default_sigint = signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated, match=r"^distill fit: interrupted by SIGINT \(Ctrl-C\)$"):
        with handle_stop_signals("distill fit"):
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not stopped")
    assert exit_status() == 130
    seen = []
    with pytest.raises(KeyboardInterrupt), handle_stop_signals("distill fit"):
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: (seen.append(signum), ours(signum, frame)))
        os.kill(os.getpid(), signal.SIGINT)  # a trainer call's SIGTERM handler gets it: nothing raised here
        seen.append("went on")
        os.kill(os.getpid(), signal.SIGINT)
    assert seen == [signal.SIGTERM, "went on"]
    assert signal.getsignal(signal.SIGINT) is default_sigint and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------ finished runs
def test_finished_runs_are_keyed_by_their_configuration(synthetic_prostate_root, tmp_path, capsys):
    """A finished run is reused only with the same resolved configuration; a damaged result.json or an
    unfinished run directory (no completion marker) is refused in one line."""
    from distill.modules.checkpoints import resolve_checkpoint

    spec = tmp_path / "table.yaml"
    spec.write_text(f"runs:\n  - {{name: student, config: {STUDENT}}}\n")
    out = tmp_path / "out"
    args = ["table", str(spec), "--out", str(out), *OVERRIDES, f"--data.init_args.data_root={synthetic_prostate_root}"]
    main(args)
    done = out / "student" / "seed_0" / "result.json"
    result = json.loads(done.read_text())
    assert len(result["config_sha256"]) == 64

    main([*args, "--verbose"])  # display-only flags (progress bar, summary) differ: read back, nothing trained
    assert json.loads(done.read_text()) == result and not (done.parent / "lightning_logs" / "version_1").exists()
    assert one_line_exit([*args, "--trainer.max_epochs=5", "--model.init_args.network_kwargs.width=8"]) == (
        f"error: {done}: this run finished with other settings (model.init_args.network_kwargs.width: 4 then, 8 now; "
        f"trainer.max_epochs: 1 then, 5 now); use another --out, or delete {done.parent} to train it again"
    )

    text = done.read_text()
    done.write_text(text[:50])
    message = one_line_exit(args)
    assert message.startswith(f"error: {done}: run result is not valid JSON (truncated or damaged) at line ")
    assert message.endswith(f"; delete {done.parent} to train that run again")
    done.write_text(json.dumps({key: value for key, value in result.items() if key != "metrics"}))
    assert one_line_exit(args) == (
        f"error: {done}: incomplete run result (lacks metrics); delete {done.parent} to train that run again"
    )
    done.write_text(text)

    # teacher_checkpoint: <run dir> takes only a finished run's checkpoints
    best = Path(result["best_checkpoint"])
    assert resolve_checkpoint(done.parent) == best and (best.parent / "fit_complete.json").is_file()
    (best.parent / "fit_complete.json").unlink()
    with pytest.raises(DataError) as error:
        resolve_checkpoint(done.parent)
    assert str(error.value) == (
        f"{done.parent}: no finished run here (checkpoints, but no fit_complete.json next to them: "
        "the training was stopped before its end); finish it or point to a checkpoint file"
    )


@pytest.mark.parametrize(
    "runs, expected",
    [
        ("[{name: a, config: C}, {name: a, config: C}]", "two runs are named 'a'; each run needs its own name"),
        (
            "[{name: student + KD, config: C}, {name: Student KD, config: C}]",
            "runs 'student + KD' and 'Student KD' would share the folder 'student_kd'; rename one",
        ),
        ("{name: a, config: C}", "'runs' must be a list of runs, got {'name': 'a', 'config': 'C'}"),
    ],
    ids=["same name", "same folder", "not a list"],
)
def test_table_runs_must_have_distinct_names(tmp_path, runs, expected):
    spec = tmp_path / "table.yaml"
    spec.write_text(f"runs: {runs}\n".replace("config: C", f"config: {STUDENT}"))
    message = one_line_exit(["table", str(spec), "--out", str(tmp_path / "out")])
    assert message == f"error: {spec}: {expected}".replace("'C'", repr(str(STUDENT)))
    assert not (tmp_path / "out").exists()


def test_table_spec_extends_cycles_and_lists_are_one_line(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("extends: second.yaml\n")
    second.write_text("extends: first.yaml\n")
    assert one_line_exit(["table", str(first), "--out", str(tmp_path / "out")]) == (
        f"error: {second}: 'extends' makes a cycle (first.yaml -> second.yaml -> first.yaml)"
    )
    first.write_text("extends: first.yaml\n")
    assert one_line_exit(["table", str(first), "--out", str(tmp_path / "out")]) == (
        f"error: {first}: 'extends' makes a cycle (first.yaml -> first.yaml)"
    )
    second.write_text("- runs\n")
    first.write_text("extends: second.yaml\n")
    assert one_line_exit(["table", str(first), "--out", str(tmp_path / "out")]) == (
        f"error: {second}: a table spec must be a mapping at the top level, got a list"
    )


@pytest.mark.parametrize(
    "command, what, text",
    [
        ("table", "table spec", "runs:\n  - {name: a, config: !!python/name:os.system }\n"),
        ("teachers", "teachers spec", "config: x.yaml\npartition: !!python/object/apply:os.getcwd []\n"),
        ("sweep", "sweep file", "method: grid\nparameters: {x: {values: [!!python/tuple [1, 2]]}}\n"),
    ],
)
def test_python_tags_deep_in_specs_are_one_line(tmp_path, command, what, text):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    message = one_line_exit([command, str(spec), "--out", str(tmp_path / "out")])
    assert message.startswith(f"error: {spec}: YAML tag !!python/") and f"a {what} holds plain data" in message


def test_a_second_table_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom distill.utils import folder_lock\n"
            "with folder_lock(sys.argv[1], 'x'):\n    print('locked', flush=True)\n    time.sleep(60)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        spec = tmp_path / "table.yaml"
        spec.write_text(f"runs:\n  - {{name: student, config: {STUDENT}}}\n")
        assert one_line_exit(["table", str(spec), "--out", str(out)]) == (
            f"error: {out}: in use by another `distill table` (pid {holder.pid}); wait for it to end or use another folder"
        )
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing trained


def test_without_flock_the_lock_is_an_exclusive_file_of_host_and_pid(tmp_path, monkeypatch, capsys):
    """On a file system that refuses flock (ENOSYS: some NFS and Lustre mounts) the lock is
    ``.lock.excl``: said on stderr, refusing a second holder, taken over from a dead process."""
    import errno
    import fcntl
    import socket

    from distill.errors import DataError
    from distill.utils import folder_lock

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / ".lock.excl"
    with folder_lock(tmp_path, "x"):
        assert lock_file.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        with pytest.raises(DataError) as refused, folder_lock(tmp_path, "x"):
            pass
        assert str(refused.value) == (
            f"{tmp_path}: in use by another x (host {socket.gethostname()}, pid {os.getpid()}); wait for it to "
            f"end, or delete {lock_file} if that process is gone"
        )
    assert not lock_file.exists()
    assert (
        f"note: {tmp_path}: the file system refuses flock (ENOSYS); locking with {lock_file}" in capsys.readouterr().err
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(f"{socket.gethostname()} {dead.pid}\n")  # left by a killed holder
    with folder_lock(tmp_path, "x"):
        assert lock_file.read_text().endswith(f" {os.getpid()}\n")
    lock_file.write_text("otherhost 1\n")
    with pytest.raises(DataError, match=r"\(host otherhost, pid 1\)"), folder_lock(tmp_path, "x"):
        pass


# ------------------------------------------------------------------ sweeps
def test_killed_sweep_points_are_retried_failed_ones_kept(tmp_path, capsys):
    """A point stopped by a signal is recorded "killed" and run again by the next call; a point
    that failed by itself (an error exit, no metric) stays "failed"."""
    from distill.runs import ProcessKilled
    from distill.sweep import read_results, run_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "program: distill\nmethod: grid\nmetric: {name: val/dice, goal: maximize}\n"
        "command: ['${program}', fit, '${args}']\nparameters: {x: {values: [1, 2, 3]}}\n"
    )
    calls, kill = [], {"2"}

    def execute(argv, run_dir, metric, overrides):
        x = argv[-1].split("=")[1]
        calls.append(x)
        if x in kill:
            raise ProcessKilled("exit status -9")
        return None if x == "3" else 0.5

    run_sweep(sweep, tmp_path / "out", execute=execute)
    assert "point 1: stopped by a signal (exit status -9); a rerun retries it" in capsys.readouterr().out
    kill.clear()
    results = run_sweep(sweep, tmp_path / "out", execute=execute)
    assert calls == ["1", "2", "3", "2"]
    assert [(r.point, r.status) for r in results] == [(0, "finished"), (1, "finished"), (2, "failed")]
    assert [r.status for r in read_results(tmp_path / "out" / "sweep.csv")] == [
        "finished",
        "killed",
        "failed",
        "finished",
    ]


@pytest.mark.parametrize(
    "code, killed",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", True),
        ("raise SystemExit(143)", True),
        ("raise SystemExit('error: bad')", False),
    ],
)
def test_sweep_runner_tells_a_killed_point_from_a_failed_one(tmp_path, monkeypatch, code, killed):
    from distill import runs

    monkeypatch.setattr(runs, "lightning_argv", lambda argv, run_dir, overrides: [sys.executable, "-c", code])
    if killed:
        with pytest.raises(runs.ProcessKilled):
            runs.run_cli_subprocess(["distill", "fit"], tmp_path, "val/dice")
    else:
        assert runs.run_cli_subprocess(["distill", "fit"], tmp_path, "val/dice") is None


# ------------------------------------------------------------------ resuming, one-line errors
def test_resuming_with_another_learning_rate_says_so(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"_class_path": "distill.modules.SegmentationModule", "lr_schedule": "constant"},
            "optimizer_states": [{"param_groups": [{"lr": 0.0004, "initial_lr": 0.001, "weight_decay": 0.0001}]}],
        },
        checkpoint,
    )
    message = one_line_exit(
        [
            "fit",
            "--config",
            str(TEACHER),
            f"--ckpt_path={checkpoint}",
            "--model.init_args.optimizer.init_args.lr=0.01",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_epochs=-5",  # stops right after the check, before any data is read
        ]
    )
    assert message == "error: trainer: `max_epochs` must be a non-negative integer or -1. You passed in -5."
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {checkpoint}: resuming keeps the checkpoint's optimizer state, so these config changes do not "
        "apply (lr_schedule: checkpoint 'constant', config 'cosine'; lr: checkpoint 0.001, config 0.01)"
    ]


def test_profile_and_phase_tool_mistakes_are_one_line(tmp_path):
    assert one_line_exit(["profile", "slim_unet:width=-4", "--size", "32"]) == (
        "error: network 'slim_unet': network_kwargs.width must be an integer >= 1, got -4"
    )
    truncated = tmp_path / "results.json"
    truncated.write_text('[{"name": "a", "seed": 0,')
    assert one_line_exit(["profile", "--results", str(truncated)]) == (
        f"error: {truncated}: results file is not valid JSON (truncated or damaged) at line 1, column 26"
    )
    truncated.write_text('[{"name": "a", "seed": 0}]')
    assert one_line_exit(["profile", "--results", str(truncated)]) == (
        f"error: {truncated}: entry 0 is not a finished run (lacks best_checkpoint, val_score)"
    )
    target = tmp_path / "missing" / "phases.json"
    assert one_line_exit(["evaluate-phases", str(tmp_path), str(tmp_path), "--json", str(target)]) == (
        f"error: {target}: folder {target.parent} does not exist; create it first"
    )


def test_teacher_manifest_entry_that_is_a_string_is_one_line(tmp_path):
    from distill.modules.teacher_records import read_teacher_manifest

    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("teachers:\n  - runs/BMC/best.ckpt\n")
    with pytest.raises(DataError) as error:
        read_teacher_manifest(manifest)
    assert str(error.value) == (
        f"{manifest}: teacher entry 'runs/BMC/best.ckpt' must be a mapping with name, checkpoint and sha256"
    )

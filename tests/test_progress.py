"""The table progress display: an ETA weighted by each run's expected work (epochs x batches),
checked with a fake clock; one line per run when stderr is not a terminal, a bar when it is."""

from __future__ import annotations

import io
import re

import pytest

from distill.progress import TableProgress
from distill.runs import RunResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def result(name: str, score: float) -> RunResult:
    return RunResult(name, 0, {}, "val/dice", score, 1, 1.0, "best.ckpt", "logs")


def train(progress: TableProgress, clock: FakeClock, name: str, epochs: int, batches: int, seconds_per_batch: float):
    """One run as the table drives it: every batch costs ``seconds_per_batch`` on the fake clock, then 1 s of testing."""
    progress.start_run(name)
    progress.training_started(batches)
    for epoch in range(epochs):
        for batch in range(batches):
            clock.now += seconds_per_batch
            progress.trained(epoch + (batch + 1) / batches, f"epoch {epoch + 1}/{epochs}")
    clock.now += 1.0
    progress.finish_run(result(name, 0.5))


def test_eta_weighs_runs_by_epochs_times_batches_and_is_right_within_2x_after_the_first_run():
    # a short teacher (1 epoch x 8 batches), then two students of 10 epochs: one on the same data
    # (8 batches), one on other data (4 batches, its own kind), 0.5 s a batch throughout
    clock = FakeClock()
    plan = [(1, "teacher.yaml"), (10, "student.yaml"), (10, "other.yaml")]
    progress = TableProgress(plan, clock=clock, stream=io.StringIO())
    assert progress.eta_seconds() is None  # nothing trained yet: no rate to extrapolate
    train(progress, clock, "teacher", epochs=1, batches=8, seconds_per_batch=0.5)
    eta = progress.eta_seconds()
    true_left = 10 * 8 * 0.5 + 1 + 10 * 4 * 0.5 + 1  # 62 s
    # measured: 5 s for 8 units; left 10x8 + 10x8 (the other kind's batches unknown yet: the last run's)
    assert eta == pytest.approx(5 / 8 * 160)
    assert true_left / 2 <= eta <= 2 * true_left
    runs_only = (clock.now - 100.0) / 1 * 2  # what a per-run estimate says: 10 s, six times too short
    assert runs_only < true_left / 2
    # within the second run, the ETA follows its batches; the third run's own batches replace the guess
    train(progress, clock, "student", epochs=10, batches=8, seconds_per_batch=0.5)
    progress.start_run("other")
    progress.training_started(4)
    assert progress.work_left() == 40  # 10 epochs x its own 4 batches
    assert progress.eta_seconds() == pytest.approx((clock.now - 100.0) / 88 * 40)


def test_reused_and_teacher_runs_in_the_plan():
    clock = FakeClock()
    # a train_once run reused at seed 1 trains nothing; a run of 3 teachers x 2 epochs trains 3 trainers
    progress = TableProgress([(6, "teacher.yaml"), (0, "")], clock=clock, stream=io.StringIO())
    progress.start_run("teachers")
    for _ in range(3):
        progress.training_started(5)
        for epoch in range(2):
            clock.now += 5
            progress.trained(epoch + 1, "")
    assert progress.work_left() == 0 and progress.work_done == 30
    progress.finish_run([result("teachers/a", 0.25), result("teachers/b", 0.75)])
    progress.start_run("teachers (seed 1)")
    progress.finish_run(None)
    assert progress.work_left() == 0


def test_one_line_per_run_when_not_a_terminal():
    clock, stream = FakeClock(), io.StringIO()
    progress = TableProgress([(2, "a.yaml"), (1, "b.yaml"), (1, "c.yaml")], clock=clock, stream=stream)
    train(progress, clock, "student (seed 0)", epochs=2, batches=3, seconds_per_batch=2.0)
    progress.start_run("teachers (seed 0)")
    clock.now += 4
    progress.finish_run([result("teachers/a", 0.25), result("teachers/b", 0.75)])
    progress.start_run("MoCo teacher (seed 0)")  # its checkpoint is the last epoch (monitor: epoch)
    progress.finish_run(RunResult("MoCo teacher", 0, {}, "epoch", 4.0, 1, 1.0, "best.ckpt", "logs"))
    progress.close()
    assert stream.getvalue().splitlines() == [
        "[1/3] student (seed 0): 13 s, val/dice 0.5000",
        "[2/3] teachers (seed 0): 4 s, val/dice (mean of 2) 0.5000",
        "[3/3] MoCo teacher (seed 0): 0 s, last epoch 4",
    ]


def test_a_bar_with_the_eta_on_a_terminal_and_nothing_when_disabled():
    clock, terminal = FakeClock(), Terminal()
    progress = TableProgress([(1, "a.yaml"), (1, "a.yaml")], clock=clock, stream=terminal)
    train(progress, clock, "first", epochs=1, batches=4, seconds_per_batch=1.0)
    progress.start_run("second")
    progress.close()
    drawn = terminal.getvalue()
    assert "\r" in drawn and "1.0/2 runs" in drawn and "[1/2]" not in drawn  # redrawn in place, no run lines
    assert re.search(r", ETA 00:05, starting\]", drawn)  # 5 s for 4 units of work, 4 units left
    quiet = io.StringIO()
    silent = TableProgress([(1, "a.yaml")], enabled=False, clock=clock, stream=quiet)
    train(silent, clock, "first", epochs=1, batches=4, seconds_per_batch=1.0)
    silent.close()
    assert quiet.getvalue() == ""

"""``distill table`` prints one progress display and the table; ``--verbose`` brings Lightning's logs back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
CHATTER = ("LOCAL_RANK", "GPU available", "UserWarning", "`Trainer.fit` stopped", "Tip:", "Trainable params")


def run_table_command(spec: Path, out: Path, data_root: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "table",
            str(spec),
            "--out",
            str(out),
            *extra,
            *TINY,
            f"--data.init_args.data_root={data_root}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_table_output_is_progress_and_table_unless_verbose(synthetic_prostate_root, tmp_path, verbose):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        f"title: Tiny table\nruns:\n  - {{name: student, config: {REPO / 'experiments/prostate/student_baseline.yaml'}}}\n"
    )
    output = run_table_command(spec, tmp_path / "out", synthetic_prostate_root, *(["--verbose"] if verbose else []))
    assert "### Tiny table" in output and "| student | 0.12M |" in output
    assert "args parameter" not in output  # the table passes args to LightningCLI on purpose, never a warning
    if verbose:
        assert "GPU available" in output and "`Trainer.fit` stopped" in output
    else:
        assert not [line for line in output.splitlines() if any(word in line for word in CHATTER)]
        # stderr is a pipe here, not a terminal: one line per run (name, seconds, validation score), no redraws
        assert re.search(r"^\[1/1\] student \(seed 0\): \d+ s, val/dice \d\.\d{4}$", output, re.MULTILINE)
        assert "\r" not in output and "runs [" not in output


def test_interrupted_demo_data_is_rewritten_not_taken_as_finished(tmp_path, capsys):
    from distill.demo import write_demo_data_once

    target = tmp_path / "data" / "prostate"

    def interrupted(folder: Path) -> None:
        (folder / "BMC").mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_demo_data_once(target, "test data", interrupted)
    assert not target.exists()  # only the .partial folder, which the next run discards
    write_demo_data_once(target, "test data", lambda folder: (folder / "RUNMC").mkdir(parents=True))
    assert (
        sorted(p.name for p in target.iterdir()) == ["RUNMC"] and not (tmp_path / "data" / "prostate.partial").exists()
    )
    write_demo_data_once(target, "test data", interrupted)  # finished data is kept as it is
    assert "writing test data" in capsys.readouterr().out

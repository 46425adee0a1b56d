"""Bad values and files are refused before any work, in one line naming the key or file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from conftest import one_line_exit

from distill.cli import main

REPO = Path(__file__).resolve().parents[1]
TEACHER = str(REPO / "experiments/prostate/teacher.yaml")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate-phases", "gt", "pred", "--pred-fps", "0"], "argument --pred-fps: must be > 0, got 0"),
        (["evaluate-phases", "gt", "pred", "--pred-fps", "-5"], "argument --pred-fps: must be > 0, got -5"),
        (["evaluate-phases", "gt", "pred", "--pred", "5"], "unrecognized arguments: --pred 5"),
        (
            ["data", "extract-frames", "--root", "r", "--out", "o", "--workers", "0"],
            "argument --workers: must be >= 1, got 0",
        ),
        (
            ["data", "extract-frames", "--root", "r", "--out", "o", "--size", "0", "250"],
            "argument --size: must be >= 1, got 0",
        ),
        (
            ["data", "synth-surgical", "--out", "o", "--num-videos", "x"],
            "argument --num-videos: expected an integer, got 'x'",
        ),
        (["data", "synth-prostate", "--out", "o", "--scale", "0"], "argument --scale: must be > 0, got 0"),
    ],
)
def test_tool_options_are_checked_by_argparse(argv, expected):
    assert expected in one_line_exit(argv)


def test_synthetic_writers_refuse_existing_data_without_overwrite(tmp_path):
    out = tmp_path / "cholec80"
    args = [
        "data",
        "synth-surgical",
        "--out",
        str(out),
        "--num-videos",
        "1",
        "--size",
        "32",
        "32",
        "--duration-s",
        "1",
        "1",
    ]
    main(args)
    video = out / "videos" / "video01.mp4"
    written = video.stat().st_mtime_ns
    assert f"{out}: already holds files" in one_line_exit(args)
    assert video.stat().st_mtime_ns == written
    main([*args, "--overwrite"])
    assert video.is_file() and video.stat().st_mtime_ns != written


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--trainer.max_epoch=1"], "unrecognized arguments: --trainer.max_epoch=1"),
        (["--data.init_args.batch_size=0"], 'Parser key "batch_size": Not of type PositiveInt: 0 does not conform'),
        (["--data.init_args.num_workers=-1"], 'Parser key "num_workers": Not of type NonNegativeInt'),
        (
            ["--data.init_args.background_fraction=1.5"],
            'Parser key "background_fraction": Not of type ClosedUnitInterval',
        ),
    ],
)
def test_bad_lightning_options_are_one_line(extra, expected):
    assert expected in one_line_exit(["fit", "--config", TEACHER, *extra])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\n   bad: [\n")
    assert (
        one_line_exit(["fit", "--config", str(bad)])
        == f"error: {bad}: invalid YAML at line 3, column 7: mapping values are not allowed here"
    )


def test_evaluation_without_checkpoint_is_refused():
    for subcommand in ("test", "predict"):
        assert f"{subcommand}: no --ckpt_path, so the model would have untrained weights" in one_line_exit(
            [subcommand, "--config", TEACHER]
        )


def test_ckpt_path_problems_name_the_file(tmp_path):
    missing, junk, pickled, truncated, other = (
        tmp_path / name for name in ("none.ckpt", "junk.ckpt", "pickle.ckpt", "trunc.ckpt", "arch.ckpt")
    )
    junk.write_bytes(b"not a checkpoint")
    torch.save({"state_dict": argparse.Namespace()}, pickled)
    torch.save({"state_dict": {}, "hyper_parameters": {"network": "slim_unet", "in_channels": 3}}, other)
    truncated.write_bytes(other.read_bytes()[:200])
    cases = {
        missing: "checkpoint not found",
        junk: "not a readable checkpoint, truncated or corrupt",
        truncated: "not a readable checkpoint, truncated or corrupt",
        pickled: "refused by weights_only loading, untrusted pickle content (Unsupported global: GLOBAL argparse.Namespace",
        other: "checkpoint architecture differs from the config (network: checkpoint 'slim_unet', config 'unet')",
    }
    for path, expected in cases.items():
        assert one_line_exit(["test", "--config", TEACHER, f"--ckpt_path={path}"]).startswith(
            f"error: {path}: {expected}"
        )


def test_a_checkpoint_for_other_input_channels_than_the_datas_is_refused(synthetic_prostate_root, tmp_path):
    """in_channels comes from the data (linked when the model is built): checked against the checkpoint then."""
    five = tmp_path / "five.ckpt"
    hparams = {"_class_path": "distill.modules.SegmentationModule", "network": "unet", "in_channels": 5}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, five)
    message = one_line_exit(
        ["test", "--config", TEACHER, f"--ckpt_path={five}", f"--data.init_args.data_root={synthetic_prostate_root}"]
    )
    assert (
        message
        == f"error: {five}: checkpoint architecture differs from the config (in_channels: checkpoint 5, config 3)"
    )


def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = one_line_exit(["fit", "--config", TEACHER, f"--trainer.default_root_dir={blocker / 'run'}"])
    assert message.startswith(f"error: {blocker / 'run'}: output folder not writable")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from distill.utils import atomic_write

    target = tmp_path / "best.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    "compare, expected",
    [
        ("{baseline: a, candidate: nope}", "compare names 'nope', which is not a run"),
        ("{baseline: a, candidate: b, metric: test/acc}", "compare metric 'test/acc' is not one of the columns"),
    ],
)
def test_table_spec_compare_mistakes_name_the_file(tmp_path, compare, expected):
    spec = tmp_path / "table.yaml"
    spec.write_text(
        "columns: [{metric: test/dice}]\n"
        f"runs: [{{name: a, config: {TEACHER}}}, {{name: b, config: {TEACHER}}}]\n"
        f"compare: {compare}\n"
    )
    assert one_line_exit(["table", str(spec), "--out", str(tmp_path / "out")]) == f"error: {spec}: {expected}"


YAML_PROBLEMS = {  # file text -> the message after "<file>: " ({what}: the file's role)
    "trainer:\n  max_epochs: 1\n   bad: [\n": "invalid YAML at line 3, column 7: mapping values are not allowed here",
    "runs: !!python/object:argparse.Namespace {}\n": "YAML tag !!python/object:argparse.Namespace at line 1, column 7 refused: a {what} holds plain data, not Python objects",
    "- a\n- b\n": "a {what} must be a mapping at the top level, got a list",
    None: "{what} not found",
}


@pytest.mark.parametrize(
    "command, what", [("table", "table spec"), ("teachers", "teachers spec"), ("sweep", "sweep file")]
)
@pytest.mark.parametrize("text", list(YAML_PROBLEMS), ids=["malformed", "python tag", "list", "missing"])
def test_spec_yaml_problems_are_one_line_errors_naming_the_file(tmp_path, command, what, text):
    spec = tmp_path / "spec.yaml"
    if text is not None:
        spec.write_text(text)
    expected = YAML_PROBLEMS[text].format(what=what)
    assert one_line_exit([command, str(spec), "--out", str(tmp_path / "out")]) == f"error: {spec}: {expected}"


def test_yaml_problem_exits_without_traceback(tmp_path):
    import os
    import subprocess
    import sys

    spec = tmp_path / "spec.yaml"
    spec.write_text("a: !!python/object/apply:os.system [echo hacked]\n")
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", "table", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        cwd=REPO,
    )
    assert result.returncode != 0 and "hacked" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: {spec}: YAML tag !!python/object/apply:os.system at line 1, "
        "column 4 refused: a table spec holds plain data, not Python objects"
    ]

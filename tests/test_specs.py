"""Specs without repetition: grids in table specs, experiment YAMLs that extend another, and files
named relative to the spec that names them.

``tests/fixtures/surgical_before_grids.json`` holds, as read with ``yaml.safe_load`` at commit 54400ad
(before grids and ``extends``), the run lists of the two surgical table specs and the six forked
demo YAMLs; the specs and YAMLs of today must expand and resolve to exactly those, but for the
demo settings changed on purpose since (:data:`CHANGED_SINCE`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.cli import main
from distill.errors import DataError
from distill.lightning_cli import DistillCLI
from distill.limit_trained import load_teachers_spec
from distill.table_spec import load_table_spec
from distill.tables import progress_plan
from distill.utils import read_extending_yaml

REPO = Path(__file__).resolve().parents[1]
REMOVED = object()  # a key since left out of the YAML
BEFORE = json.loads((REPO / "tests/fixtures/surgical_before_grids.json").read_text())
# Demo pre-training settings changed after 54400ad so that the teacher and the students learn
# (InfoNCE below 0.8 x chance; docs/results.md, "Surgical pre-training: what stopped it learning").
LEARNING_SETTINGS = {
    "model.init_args.momentum": 0.99,
    "model.init_args.proj_batch_norm": True,
    "data.init_args.augmentation_strength": 0.2,
}
STUDENT_SETTINGS = {
    **LEARNING_SETTINGS,
    "trainer.max_epochs": 12,
    "model.init_args.optimizer.init_args.lr": 0.05,
    "model.init_args.warmup_steps": 60,
}
# The data states the phase count, and the CLI links it into the model (distill.data_links).
LINKED = {"model.init_args.num_classes": REMOVED}
CHANGED_SINCE = {name: LINKED for name in BEFORE["experiment_yamls"]} | {
    "demo/moco_teacher.yaml": {
        **LINKED,
        **LEARNING_SETTINGS,
        "trainer.max_epochs": 5,
        # the teacher keeps its last epoch: its frozen backbone makes the probe's accuracy blind to the head
        "trainer.callbacks.0.init_args.monitor": "epoch",
    },
    "demo/moco.yaml": LINKED | STUDENT_SETTINGS,
    "demo/moco_distill.yaml": LINKED | STUDENT_SETTINGS,
}


def with_changes(config: dict, changes: dict) -> dict:
    """``config`` (a deep copy) with each dotted key of ``changes`` set (a number indexes a list), or
    deleted where its value is :data:`REMOVED`."""
    config = json.loads(json.dumps(config))
    index = lambda key: int(key) if key.isdigit() else key  # noqa: E731
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[index(key)]
        if value is REMOVED:
            del node[index(leaf)]
        else:
            node[index(leaf)] = value
    return config


@pytest.mark.parametrize("table", ["demo", "paper"])
def test_surgical_grids_expand_to_the_runs_once_listed_by_hand(table):
    before = BEFORE["table_runs"][f"tables/{table}.yaml"]  # config paths then relative to the repository root
    expected = [{**run, "config": str(REPO / run["config"])} for run in before]
    runs = load_table_spec(REPO / f"experiments/surgical/tables/{table}.yaml").runs
    assert len(runs) == {"demo": 21, "paper": 27}[table]
    assert runs == expected  # names, configs, overrides, chaining keys, order: all of it


@pytest.mark.parametrize("name", sorted(BEFORE["experiment_yamls"]))
def test_surgical_demo_yamls_extend_the_paper_ones_and_resolve_as_before(name):
    path = REPO / "experiments/surgical" / name
    assert "extends: ../" in path.read_text()  # an override of the paper YAML, not a fork
    expected = with_changes(BEFORE["experiment_yamls"][name], CHANGED_SINCE.get(name, {}))
    assert read_extending_yaml(path, "config") == expected


def test_the_cli_reads_an_extending_yaml_as_its_resolved_mapping(tmp_path):
    cli = DistillCLI(
        args=["--config", str(REPO / "experiments/surgical/demo/moco.yaml"), f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert cli.trainer.max_epochs == 12 and cli.datamodule.hparams.image_size == 48  # the demo's
    assert cli.model.hparams.backbone == "mobilenetv3_small_050" and cli.model.hparams.queue_size == 256
    assert cli.model.hparams.temperature == 0.2  # the paper YAML's, not repeated in the demo's


def test_extends_merges_mappings_and_replaces_lists_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {b: 1, c: [1, 2], d: {e: 1}}\nf: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\na: {c: [3], d: {g: 2}}\nf: null\n")
    assert read_extending_yaml(tmp_path / "sub" / "child.yaml", "config") == {
        "a": {"b": 1, "c": [3], "d": {"e": 1, "g": 2}},
        "f": None,
    }
    (tmp_path / "base.yaml").write_text("extends: sub/child.yaml\n")
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/base.yaml: 'extends' makes a cycle \(child.yaml -> base.yaml -> child.yaml\)"
    ):
        read_extending_yaml(tmp_path / "sub" / "child.yaml", "config")


def test_grid_fields_nulls_and_mistakes(tmp_path):
    spec = tmp_path / "tables" / "grid.yaml"
    spec.parent.mkdir()
    spec.write_text(
        "runs:\n"
        "  - {name: base, config: ../base.yaml}\n"
        "  - grid: {size: [8, 16], init: [{init: a, source: base}, {init: b, source: null}]}\n"
        "    runs: [{name: '{init} {size}', config: ../x.yaml, init_from: '{source}', overrides: ['--w={size}']}]\n"
    )
    runs = load_table_spec(spec).runs
    folder = str(tmp_path)
    assert runs == [
        {"name": "base", "config": os.path.join(folder, "base.yaml")},
        {"name": "a 8", "config": os.path.join(folder, "x.yaml"), "init_from": "base", "overrides": ["--w=8"]},
        {"name": "b 8", "config": os.path.join(folder, "x.yaml"), "overrides": ["--w=8"]},  # null: no init_from
        {"name": "a 16", "config": os.path.join(folder, "x.yaml"), "init_from": "base", "overrides": ["--w=16"]},
        {"name": "b 16", "config": os.path.join(folder, "x.yaml"), "overrides": ["--w=16"]},
    ]
    for body, message in [
        ("[{grid: {s: [1]}, runs: [{name: '{t}', config: x.yaml}]}]", "names {t}, which is not a field of its grid"),
        ("[{grid: {s: []}, runs: []}]", "grid axis 's' must be a non-empty list of values"),
        ("[{grid: {s: [1]}, runs: [], seeds: 2}]", "a grid entry is {grid:"),
    ]:
        spec.write_text(f"runs: {body}\n")
        with pytest.raises(DataError, match=f"^{spec}: .*{message[:20]}"):
            load_table_spec(spec)


def test_spec_files_are_relative_to_the_spec_and_command_line_paths_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "teachers.yaml").write_text("config: ../teacher.yaml\npartition: by_site\n")
    (tmp_path / "specs" / "t.yaml").write_text(
        "runs:\n  - {name: teachers, teachers: teachers.yaml}\n  - {name: s, config: /abs/s.yaml, teachers: teachers}\n"
    )
    spec = load_table_spec("specs/t.yaml")  # relative to the working directory, as typed
    assert spec.runs[0]["teachers"] == os.path.join("specs", "teachers.yaml")
    assert spec.runs[1] == {"name": "s", "config": "/abs/s.yaml", "teachers": "teachers"}  # a run name stays one
    assert load_teachers_spec(spec.runs[0]["teachers"])["config"] == "teacher.yaml"  # specs/../teacher.yaml


def test_progress_plan_reads_epochs_from_configs_and_overrides():
    spec = load_table_spec(REPO / "experiments/prostate/tables/demo_multi_teacher.yaml")
    plan = progress_plan(spec, 2, ["--trainer.max_epochs", "3"])
    assert [epochs for epochs, _ in plan[:3]] == [3, 6 * 3, 3]  # the command line wins; 6 site teachers
    plan = progress_plan(spec, 2, [])
    teacher, teachers, student = (epochs for epochs, _ in plan[:3])
    assert (teacher, teachers, student) == (8, 6 * 12, 6)  # run overrides, the teachers spec's, the table's
    assert plan[len(spec.runs)] == (0, "") and plan[len(spec.runs) + 1] == (0, "")  # train_once: reused at seed 1


def test_a_bad_extends_through_the_cli_is_one_line(tmp_path):
    (tmp_path / "missing.yaml").write_text("extends: nothere.yaml\n")
    (tmp_path / "typo.yaml").write_text(
        f"extends: {REPO / 'experiments/prostate/teacher.yaml'}\nmodel: {{init_args: {{bogus: 1}}}}\n"
    )
    for name, expected in [
        ("missing.yaml", f"error: {tmp_path / 'nothere.yaml'}: config file not found"),
        ("typo.yaml", "error: Option 'bogus' is not accepted"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(tmp_path / name), f"--trainer.default_root_dir={tmp_path / 'run'}"])
        assert str(exit_info.value.code).startswith(expected) and "\n" not in str(exit_info.value.code)

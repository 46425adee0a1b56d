"""A config is data, and nothing empty passes as a result: code named in a config, YAML alias bombs,
weak parser messages, non-finite checkpoints, outputs inside the data folder, empty tables and fits
that trained nothing are each refused in one line before any work (Ctrl-C: tests/test_resume.py and
tests/test_reliability_runs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import one_line_exit
from torch.utils.data import DataLoader, TensorDataset

from distill.callbacks import FitCompletion, LastCheckpoint
from distill.errors import DataError
from distill.table_spec import load_table_spec
from distill.utils import MAX_YAML_VALUES, load_yaml_text, read_yaml

REPO = Path(__file__).resolve().parents[1]
STUDENT = str(REPO / "experiments/prostate/student_baseline.yaml")
TEACHER = str(REPO / "experiments/prostate/teacher.yaml")
# nine levels of nine aliases: 9**10 strings once expanded; a few hundred bytes of YAML
ALIAS_BOMB = (
    "a0: &a0 ["
    + ",".join(['"lol"'] * 9)
    + "]\n"
    + "".join(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 9) + "]\n" for level in range(1, 10))
)


# ------------------------------------------------------------------ code from a config
def test_a_config_cannot_call_a_function(tmp_path, monkeypatch):
    """`optimizer: {class_path: os.system, init_args: {command: ...}}` in a --config file was imported
    and called; it is refused, naming the key, and the command never runs."""
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(
        "model:\n  init_args:\n    optimizer:\n      class_path: os.system\n"
        f"      init_args: {{command: 'touch {tmp_path / 'PWNED'}'}}\n"
    )
    message = one_line_exit(["fit", "--config", STUDENT, "--config", str(hostile), "--trainer.fast_dev_run=true"])
    assert message == (
        "error: fit.model.init_args.optimizer: os.system is not a class; "
        "a config names classes only, never a function to call"
    )
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--model.init_args.optimizer={class_path: collections.OrderedDict}",
            "Expected 'collections.OrderedDict' to be a subclass of <class 'Optimizer'>",
        ),
        ("--model.init_args.optimizer=os.system", 'Parser key "optimizer": Expected a path but os.system'),
        (
            "--config=model:\n  class_path: os.system\n  init_args: {command: ls}\n",
            'Parser key "model": Import path os.system does not correspond to a subclass of LightningModule',
        ),
        (
            "--data.init_args.batch_size=abc",
            "Parser key \"batch_size\": Not of type PositiveInt: invalid literal for int() with base 10: 'abc'",
        ),
    ],
)
def test_class_paths_and_values_refused_with_their_reason(tmp_path, monkeypatch, override, expected):
    """Only optimizer classes go in the optimizer slot, only modules in the model slot, and the reason is
    given (not the `Expected a <class 'NoneType'>` of the union's other branch, nor nothing)."""
    monkeypatch.chdir(tmp_path)
    message = one_line_exit(["fit", "--config", STUDENT, override])
    assert expected in message and "NoneType" not in message


def test_the_code_check_walks_every_key():
    """A function anywhere in a parsed config, and a non-optimizer class under an `optimizer` key, are
    refused; parsed values that are callable objects (the `--config` paths: jsonargparse's Path) are data."""
    from jsonargparse import Namespace
    from jsonargparse.typing import Path_fr

    from distill.lightning_cli import refuse_code_in_config

    refuse_code_in_config(
        Namespace(config=[Path_fr(STUDENT)], model=Namespace(init_args=Namespace(optimizer=torch.optim.SGD)))
    )
    with pytest.raises(DataError, match=r"^trainer\.callbacks\[1\]: (os|posix)\.system is not a class"):
        refuse_code_in_config({"trainer": {"callbacks": [{"class_path": "collections.OrderedDict"}, os.system]}})
    with pytest.raises(DataError, match=r"^model\.optimizer: collections\.OrderedDict is not a torch\.optim"):
        refuse_code_in_config({"model": {"optimizer": {"class_path": "collections.OrderedDict"}}})


# ------------------------------------------------------------------ YAML alias bombs
def test_yaml_alias_bombs_and_self_references_are_refused_unbuilt(tmp_path):
    """Counted on the composed document, never expanded: the bomb is refused in one line naming its
    source; a document just under the cap reads."""
    with pytest.raises(DataError, match=r"^spec\.yaml: refused, aliases that expand to more than 100000 values"):
        load_yaml_text(ALIAS_BOMB, "spec.yaml")
    with pytest.raises(DataError, match="an alias that contains itself"):
        load_yaml_text("a: &a [*a]\n", "x.yaml")
    # {a: &a [n items], b: *a}: the mapping, 2 keys and the list of n + 1 values twice = 2n + 5 values
    fits = (MAX_YAML_VALUES - 5) // 2
    assert len(load_yaml_text("a: &a [" + ", ".join(["1"] * fits) + "]\nb: *a\n", "ok")["b"]) == fits
    with pytest.raises(DataError, match="expand to more than"):
        load_yaml_text("a: &a [" + ", ".join(["1"] * (fits + 1)) + "]\nb: *a\n", "over")
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    with pytest.raises(DataError, match=r"bomb\.yaml: refused, aliases"):
        read_yaml(tmp_path / "bomb.yaml", "table spec")


def test_an_alias_bomb_given_to_distill_fit_is_refused_at_once(tmp_path):
    """As a --config file and as an inline value, through LightningCLI's own reading (it hung)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for argv, expected in (
        (["--config", str(bomb)], f"error: {bomb}: refused, aliases that expand to more than"),
        (
            ["--config", STUDENT, f"--model.init_args.network_kwargs={ALIAS_BOMB}"],
            'error: Parser key "model": YAML value: refused, aliases that expand to more than',
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "distill.cli", "fit", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr[-800:]


# ------------------------------------------------------------------ nothing reported as a result
def test_a_checkpoint_with_nan_weights_is_refused_by_test(tmp_path, monkeypatch):
    """`distill test --ckpt_path` on NaN weights gave Dice 0.0 and exit 0."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "nan.ckpt"
    torch.save({"state_dict": {"net.conv.weight": torch.tensor([1.0, float("nan")])}, "hyper_parameters": {}}, ckpt)
    assert one_line_exit(["test", "--config", TEACHER, f"--ckpt_path={ckpt}"]) == (
        f"error: {ckpt}: non-finite weights: net.conv.weight (1 nan, 0 inf) (a diverged or damaged training; retrain it)"
    )


def test_an_output_folder_inside_the_data_folder_is_refused_before_anything_is_made(
    synthetic_prostate_root, tmp_path, monkeypatch
):
    """A run folder under data_root was created before the data was read, and broke every later run on
    that data ("unknown site folder <root>/runs"). Refused for fit and table; nothing is created."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in synthetic_prostate_root.iterdir())
    inside = synthetic_prostate_root / "runs"
    data = f"--data.init_args.data_root={synthetic_prostate_root}"
    assert one_line_exit(["fit", "--config", TEACHER, data, f"--trainer.default_root_dir={inside}"]) == (
        f"error: {inside}: trainer.default_root_dir lies inside the data folder {synthetic_prostate_root} "
        "(data_root), where runs would be read as data; choose an output folder outside it"
    )
    spec = REPO / "experiments/prostate/tables/demo.yaml"
    assert one_line_exit(["table", str(spec), "--out", str(inside), data]).startswith(
        f"error: {inside}: --out lies inside the data folder {synthetic_prostate_root} (data_root)"
    )
    assert sorted(p.name for p in synthetic_prostate_root.iterdir()) == before


@pytest.mark.parametrize(
    "text, expected",
    [
        ("title: t\nruns: []\n", "no runs ('runs' is missing or empty; is it indented under another key?)"),
        (
            "title: t\noverrides: [--trainer.max_epochs=1]\n",
            "no runs ('runs' is missing or empty; is it indented under another key?)",
        ),
        (
            "title: t\noverrides:\n  runs:\n    - {name: a, config: a.yaml}\n",
            "'overrides' must be a list of --key=value strings, got {'runs': [{'name': 'a', 'config': 'a.yaml'}]}",
        ),
    ],
)
def test_a_table_without_runs_is_refused(tmp_path, text, expected):
    """An empty run list (e.g. the runs indented under `overrides:`) gave an empty table and exit 0."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(DataError) as refused:
        load_table_spec(spec)
    assert str(refused.value) == f"{spec}: {expected}"


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_index):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_that_trained_on_nothing_is_an_error_and_not_a_finished_run(tmp_path):
    """All masks empty gave "No training batches", exit 0 and a fit_complete.json beside no checkpoint,
    so the folder counted as a finished teacher."""
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[FitCompletion(), LastCheckpoint(dirpath=str(tmp_path / "checkpoints"))],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    empty = DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=2)
    with pytest.raises(DataError, match="^fit: the training data gave no batch"):
        trainer.fit(_Linear(), train_dataloaders=empty)
    assert not (tmp_path / "checkpoints").exists()

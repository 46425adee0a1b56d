"""Every YAML under experiments/ is usable as written, from any working directory: run configs
(also those that ``extends`` another) instantiate through the CLI, table and teacher specs load and
name configs that exist (sweep files: tests/test_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from distill.lightning_cli import DistillCLI
from distill.limit_trained import load_teachers_spec
from distill.table_spec import load_table_spec
from distill.utils import read_extending_yaml

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p.parent.name != "sweeps")


def kind(path: Path) -> str:
    raw = read_extending_yaml(path, "experiment YAML")
    if "model" in raw:
        return "run"
    if "trainer" in raw:
        return "fragment"  # e.g. logging/wandb.yaml, given after a run config: --config X --config logging/wandb.yaml
    return "table" if "runs" in raw else "teachers" if "partition" in raw else "unknown"


@pytest.mark.parametrize("config", YAMLS, ids=[str(p.relative_to(REPO / "experiments")) for p in YAMLS])
def test_experiment_yaml_is_usable_as_written(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # specs name their files relative to their own folder, not the working directory
    what = kind(config)
    assert what != "unknown", f"{config}: neither a run config, a config fragment, a table spec nor a teachers spec"
    if what in ("run", "fragment"):
        overrides = [f"--trainer.default_root_dir={tmp_path}"]
        if "${oc.env:RESNET50_WEIGHTS" in str(read_extending_yaml(config, "experiment YAML")):
            overrides.append("--model.init_args.backbone_weights=null")  # the user's weights file is not here
        configs = ["--config", str(config)]
        if what == "fragment":
            configs = ["--config", str(REPO / "experiments/prostate/student_baseline.yaml"), *configs]
        cli = DistillCLI(args=[*configs, *overrides], run=False)
        assert isinstance(cli.model, L.LightningModule) and isinstance(cli.datamodule, L.LightningDataModule)
        assert hasattr(cli.model, "deployable_network")  # a results table can measure it
    elif what == "table":
        spec = load_table_spec(config)
        for run in spec.runs:
            referenced = run.get("config") or run.get("teachers")
            assert referenced is None or not referenced.endswith(".yaml") or Path(referenced).is_file(), referenced
    else:
        spec = load_teachers_spec(config)
        assert Path(spec["config"]).is_file()

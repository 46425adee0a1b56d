"""The package works outside a checkout: its wheel, installed into a scratch virtual environment
(offline: dependencies from this environment, nothing from a registry), runs ``distill demo
prostate`` from an empty working directory, with the specs and experiment YAMLs it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# the demo's runs on the tiny data: validated after the one epoch, one batch to validate and to test
FEW_BATCHES = ["--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
SOURCES = ("pyproject.toml", "README.md", "distill", "data_modules", "experiments")


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command[:4]}: {done.stderr[-3000:]}"
    return done.stdout + done.stderr


def copy_sources(tmp_path: Path) -> Path:
    """A copy of the checkout's package sources (setuptools builds in the source folder: not in this one)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # distill/experiments stays a link to experiments/
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    return source


def build_wheel(tmp_path: Path) -> Path:
    source = copy_sources(tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), "."], source)
    (wheel,) = (tmp_path / "dist").glob("distill_medimg-*.whl")
    return wheel


def scratch_venv(tmp_path: Path) -> Path:
    """A fresh venv that also sees this environment's packages (a ``.pth`` naming its site-packages:
    their own ``.pth`` files, such as an editable install's, are not run from there)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "dev_environment.pth").write_text("\n".join(paths) + "\n")
    return venv


def test_wheel_runs_the_demo_from_an_empty_folder(tmp_path, synthetic_prostate_root):
    wheel = build_wheel(tmp_path)
    venv = scratch_venv(tmp_path)
    python = str(venv / "bin" / "python")
    run(
        [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index", str(wheel)], tmp_path
    )
    work = tmp_path / "empty"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = run(
        [python, "-c", "import distill.table_spec as s; print(s.__file__); print(s.packaged_experiments())"], work, env
    )
    module, experiments = map(Path, where.split())
    assert module.is_relative_to(venv) and experiments.is_relative_to(venv)  # the installed copy, not this checkout
    assert (experiments / "surgical" / "demo" / "tcn.yaml").is_file()
    out = work / "runs" / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "prostate").symlink_to(synthetic_prostate_root)  # the demo writes no data where some is
    output = run(
        [str(venv / "bin" / "distill"), "demo", "prostate", "--seeds", "1", *TINY, *FEW_BATCHES],
        work,
        {**env, "WANDB_MODE": "disabled"},
    )
    assert "[3/3] student + KD (seed 0):" in output  # one line per run: stderr is not a terminal
    table = (out / "results.md").read_text()
    assert table.startswith("### Procedure 1, demo preset (CPU scale)")
    for row in ("teacher (U-Net)", "student (no KD)", "student + KD"):
        assert f"| {row} |" in table
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing written outside --out


def test_the_editable_install_reads_the_experiments_of_its_checkout(tmp_path):
    """What `make test` installs (`pip install -e`): the packaged experiments are the checkout's folder."""
    source = copy_sources(tmp_path)
    venv = scratch_venv(tmp_path)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index"]
    run([*pip, "--no-build-isolation", "-e", str(source)], tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = run(
        [python, "-c", "import distill.table_spec as s; print(s.packaged_experiments().resolve())"], tmp_path, env
    )
    assert Path(where.strip()) == (source / "experiments").resolve()

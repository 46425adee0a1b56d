"""What the DataModule states reaches the model once, through the CLI's links (distill.data_links)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest

from data_modules.prostate import ProstateDataModule
from data_modules.surgical import PhaseFeatureDataModule, SurgicalSSLDataModule
from distill.data_links import PhaseData, SegmentationData
from distill.lightning_cli import DistillCLI

REPO = Path(__file__).resolve().parents[1]


LOADERS_BUILT: list[str] = []


class PlainData(L.LightningDataModule):
    """A user's DataModule that states nothing; its loader records being built."""

    def __init__(self, size: int = 4) -> None:
        super().__init__()

    def train_dataloader(self):
        LOADERS_BUILT.append("train")
        return []


def built(tmp_path: Path, config: str, *overrides: str) -> DistillCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return DistillCLI(
            args=["--config", str(REPO / "experiments" / config), f"--trainer.default_root_dir={tmp_path}", *overrides],
            run=False,
        )


@pytest.mark.parametrize("config", ["surgical/moco.yaml", "surgical/finetune.yaml", "surgical/tcn.yaml"])
def test_the_phase_count_and_the_tcns_dataset_follow_the_data(config, tmp_path):
    for dataset, phases in (("cholec80", 7), ("m2cai16", 8)):
        cli = built(tmp_path, config, f"--data.init_args.dataset={dataset}")
        assert cli.model.hparams.num_classes == phases
        if config.endswith("tcn.yaml"):  # its relaxed metrics follow the dataset's protocol (an interpolation)
            assert cli.model.hparams.dataset == dataset
        else:  # the pre-training and fine-tuning modules forward unknown arguments: nothing is linked into them
            assert "dataset" not in cli.model.hparams


def test_a_datamodule_that_states_nothing_leaves_the_models_values(tmp_path):
    cli = built(
        tmp_path,
        "prostate/student_baseline.yaml",
        f"--data={__name__}.PlainData",
        "--model.init_args.in_channels=5",
        "--model.init_args.num_classes=4",
    )
    assert (cli.model.hparams.in_channels, cli.model.hparams.num_classes, cli.model.hparams.class_names) == (5, 4, None)
    # skipping a link formats the DataModule, and Lightning's str() of one builds every loader: not here
    assert LOADERS_BUILT == []
    assert "Train dataloader" in str(cli.datamodule) and LOADERS_BUILT == ["train"]  # Lightning's str() again


def test_the_shipped_datamodules_state_their_protocol(synthetic_prostate_root, tmp_path):
    prostate = ProstateDataModule(data_root=synthetic_prostate_root, num_slices=5, image_size=32)
    assert isinstance(prostate, SegmentationData)
    assert (prostate.in_channels, prostate.num_classes, prostate.class_names, prostate.image_size) == (
        5,
        2,
        ["gland"],
        32,
    )
    frames = SurgicalSSLDataModule(frames_dir=tmp_path, data_root=tmp_path, dataset="m2cai16", image_size=48)
    features = PhaseFeatureDataModule(features_dir=tmp_path, data_root=tmp_path)
    assert isinstance(frames, PhaseData) and isinstance(features, PhaseData)
    assert (frames.num_classes, frames.image_size, features.num_classes, features.image_size) == (8, 48, 7, None)

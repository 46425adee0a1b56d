"""What ``distill export`` needs of a prostate segmentation run: its data, rebuilt from the saved
DataModule hyper-parameters (the model card's description, INT8 calibration slices, labelled test cases)."""

from __future__ import annotations

from pathlib import Path

from data_modules.prostate import ProstateDataModule
from data_modules.volumes import read_case
from distill.errors import DataError
from distill.formats.sites import site_order
from distill.model_card import RunData


def prostate_run_data(hyper_parameters: dict):
    """A segmentation run's data (:class:`distill.model_card.RunData`) from its saved DataModule
    hyper-parameters: the split as the run made it, the raw training volumes, the labelled test cases."""
    settings = {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}
    if not settings.get("data_root") or not Path(settings["data_root"]).is_dir():
        raise DataError(f"{settings.get('data_root')}: the run's data_root is not a folder here")
    data = ProstateDataModule(**{**settings, "num_workers": 0})
    splits = {name: data.case_splits[name] for name in ("train", "val", "test")}
    sites = sorted({case.site for cases in splits.values() for case in cases}, key=site_order)
    description = {
        "root": str(settings["data_root"]),
        "layout": settings.get("layout", "sites"),
        "split": settings.get("split"),
        "sites": sites,
        "cases": {name: len(cases) for name, cases in splits.items()},
        "cases_per_site": {
            site: {name: sum(case.site == site for case in cases) for name, cases in splits.items()} for site in sites
        },
        "labelled_training_cases": sum(case.mask_path is not None for case in splits["train"]),
    }

    def train_images():
        for case in splits["train"]:
            yield read_case(case, 1, data.label_map)[0]

    def test_cases():
        for case in splits["test"]:
            image, mask, spacing, _ = read_case(case, 1, data.label_map)
            if mask is not None:
                yield case.site, case.case, image, mask, spacing

    return RunData(description, train_images, test_cases)

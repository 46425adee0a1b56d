"""Segmentation data in the layouts people have (MONAI datalist, MSD, nnU-Net raw), zonal labels,
multi-channel inputs and semi-supervised training cases, read back through the DataModule and
trained and tested through the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import QUIET, TINY

from data_modules.prostate import ProstateDataModule
from data_modules.synth_prostate import ZONAL_LABELS, synthetic_adc, write_layout
from distill.cli import main
from distill.errors import DataError
from distill.lightning_cli import DistillCLI
from distill.losses import DiceLoss, LovaszLoss
from distill.losses.registry import LOGIT_LOSSES, choose_loss, logit_loss
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_class_dice_hd95, volume_dice_hd95
from distill.modules import SegmentationModule
from distill.modules.teacher_cache import compute_teacher_logits

REPO = Path(__file__).resolve().parents[1]
ZONAL = dict(ZONAL_LABELS)
CASES = [f"{site}/Case0{i}" for site in ("RUNMC", "BMC") for i in range(3)]  # the fixture's zonal cases


@pytest.fixture(scope="module")
def layouts(synthetic_prostate_root, tmp_path_factory) -> dict[str, Path]:
    """The fixture's RUNMC and BMC cases (zonal masks) in each layout; read-only."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(synthetic_prostate_root, base / name, name) for name in ("datalist", "msd", "nnunet")}


def module(root, **kwargs) -> ProstateDataModule:
    options = {"image_size": 64, "num_workers": 0, "augment": False, "batch_size": 4, "load_threads": 1} | kwargs
    return ProstateDataModule(str(root), **options)


def source_case(root: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """T2 image and mask values (X, Y, Z) of a case of the six-site tree."""
    site, case = key.split("/")
    mask = next((root / site).glob(f"{case}_*egmentation.nii.gz"))
    return nib.load(root / site / f"{case}.nii.gz").get_fdata(), np.asarray(nib.load(mask).dataobj)


def zscore(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> slices first (Z, X, Y), mean 0, std 1 (the DataModule's normalisation at native size)."""
    volume = volume.transpose(2, 0, 1)
    return (volume - volume.mean()) / volume.std()


# --- reading each layout back -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["datalist", "msd", "nnunet"])
def test_each_layout_reads_back_the_images_masks_and_channels_written(layouts, synthetic_prostate_root, layout):
    channels = 1 if layout == "datalist" else 2
    data = module(layouts[layout], layout=layout, channels=channels, labels=ZONAL, predict_split="all")
    assert (data.in_channels, data.num_classes, data.class_names) == (3 * channels, 3, ["PZ", "TZ"])
    volumes = list(data.predict_dataloader())
    assert len(volumes) == 6
    site = {"datalist": None, "msd": "msd", "nnunet": "nnunet"}[layout]  # no site in the file: the folder's name
    assert data.site_names == (["RUNMC", "BMC"] if site is None else [site])
    for number, volume in enumerate(volumes):
        key = f"{volume['site']}/{volume['case']}" if site is None else CASES[int(volume["case"][-2:])]
        if site is not None:
            assert volume["case"] == f"prostate_{number:02d}" and volume["site"] == site
        t2, mask = source_case(synthetic_prostate_root, key)
        np.testing.assert_array_equal(volume["label"].numpy(), mask.transpose(2, 0, 1))  # zonal values kept
        assert set(volume["label"].unique().tolist()) == {0, 1, 2}
        centre = t2.shape[2] // 2
        np.testing.assert_allclose(volume["image"][centre, 1].numpy(), zscore(t2)[centre], atol=1e-4)
        if channels == 2:  # channel-major: T2's three slices, then the second channel's
            adc = zscore(synthetic_adc(t2.astype(np.float32), mask))
            np.testing.assert_allclose(volume["image"][centre, 3:].numpy(), adc[centre - 1 : centre + 2], atol=1e-4)


def test_datalist_of_the_release_splits_like_the_sites_layout(layouts, synthetic_prostate_root):
    datalist = module(layouts["datalist"], layout="datalist").case_splits
    sites = module(synthetic_prostate_root, sites=["RUNMC", "BMC"]).case_splits
    for split in ("train", "val", "test"):
        assert [c.key for c in datalist[split]] == [c.key for c in sites[split]]


def test_whole_gland_is_the_default_and_values_outside_the_map_are_refused(layouts):
    volume = next(iter(module(layouts["msd"], layout="msd", channels=2).val_dataloader()))
    zonal = np.asarray(nib.load(layouts["msd"] / "labelsTr" / f"{volume['case']}.nii.gz").dataobj)
    np.testing.assert_array_equal(volume["label"].numpy(), (zonal > 0).transpose(2, 0, 1))  # PZ and TZ merged
    with pytest.raises(DataError, match=r"labelsTr/prostate_\d\d\.nii\.gz: mask values must be in \{0, 1\} .*\[2\.0\]"):
        module(layouts["msd"], layout="msd", labels={"PZ": 1}).setup("fit")
    with pytest.raises(DataError, match="labels: mask value 2 is in both 'TZ' and 'gland'"):
        module(layouts["msd"], layout="msd", labels={"TZ": 2, "gland": [1, 2]})


def test_datalist_lists_sites_and_unlabelled_entries(layouts, tmp_path):
    root = layouts["datalist"]
    entry = lambda key, label=True: {  # noqa: E731
        "image": f"{key}.nii.gz",
        **({"label": f"{key}_{'S' if key.startswith('BMC') else 's'}egmentation.nii.gz"} if label else {}),
        "site": "Nijmegen" if key.startswith("RUNMC") else "Boston",
    }
    spec = {
        "training": [entry("RUNMC/Case00"), entry("BMC/Case00"), entry("RUNMC/Case01", label=False)],
        "validation": [entry("BMC/Case01")],
        "test": [entry("RUNMC/Case02"), entry("BMC/Case02")],
    }
    (tmp_path / "list.json").write_text(json.dumps(spec))
    shutil.copytree(root / "RUNMC", tmp_path / "RUNMC")
    shutil.copytree(root / "BMC", tmp_path / "BMC")
    data = module(tmp_path, layout="datalist", datalist=str(tmp_path / "list.json"), split="datalist")
    splits = {name: [(c.key, c.labeled) for c in cases] for name, cases in data.case_splits.items()}
    assert splits["train"] == [("Boston/Case00", True), ("Nijmegen/Case00", True), ("Nijmegen/Case01", False)]
    assert splits["val"] == [("Boston/Case01", True)] and [k for k, _ in splits["test"]] == [
        "Boston/Case02",
        "Nijmegen/Case02",
    ]
    assert data.site_names == ["Boston", "Nijmegen"]  # any site names
    two_files = {"image": ["RUNMC/Case00.nii.gz", "BMC/Case00.nii.gz"], "label": "RUNMC/Case00_segmentation.nii.gz"}
    (tmp_path / "channels.json").write_text(json.dumps({"training": [two_files | {"case": "both"}]}))
    options = {"layout": "datalist", "datalist": str(tmp_path / "channels.json"), "predict_split": "all"}
    with pytest.raises(DataError, match=r"BMC/Case00\.nii\.gz: channel shape .* differs from"):  # other grid
        next(iter(module(tmp_path, channels=2, **options).predict_dataloader()))
    two_files["image"][1] = "RUNMC/Case00.nii.gz"  # the same file twice: two equal channels
    (tmp_path / "channels.json").write_text(json.dumps({"training": [two_files | {"case": "both"}]}))
    volume = next(iter(module(tmp_path, channels=2, **options).predict_dataloader()))
    assert (volume["case"], volume["image"].shape[1]) == ("both", 6)
    assert torch.equal(volume["image"][:, :3], volume["image"][:, 3:])
    spec["validation"].append({"image": "BMC/Case09.nii.gz", "label": "BMC/Case09_Segmentation.nii.gz"})
    (tmp_path / "list.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"list\.json: validation entry 1: .*BMC/Case09\.nii\.gz not found"):
        module(tmp_path, layout="datalist", datalist=str(tmp_path / "list.json")).setup("fit")
    spec["validation"] = [entry("BMC/Case01", label=False)]
    (tmp_path / "list.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"validation entry 0: .*Case01\.nii\.gz has no 'label'"):
        module(tmp_path, layout="datalist", datalist=str(tmp_path / "list.json")).setup("fit")


def test_bad_layout_input_is_one_line_naming_the_file(layouts, tmp_path):
    nnunet = tmp_path / "nnunet"
    shutil.copytree(layouts["nnunet"], nnunet)
    (nnunet / "imagesTr" / "prostate_03_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/prostate_03_0001\.nii\.gz: channel 1 \(ADC\) of case prostate_03"):
        module(nnunet, layout="nnunet", channels=2).setup("fit")
    assert len(module(nnunet, layout="nnunet", channels=1).case_splits["all"]) == 6  # T2 only: channel 1 unused
    shutil.copy(layouts["nnunet"] / "imagesTr" / "prostate_03_0001.nii.gz", nnunet / "imagesTr")  # restored
    (nnunet / "imagesTs").mkdir()  # label-free images, nnU-Net names: one case of two channel files
    for channel in ("0000", "0001"):
        shutil.copy(
            nnunet / "imagesTr" / f"prostate_00_{channel}.nii.gz", nnunet / "imagesTs" / f"scan_{channel}.nii.gz"
        )
    extra = module(nnunet, layout="nnunet", channels=2, unlabeled_images=["imagesTs"]).case_splits["train"][-1]
    assert (extra.key, extra.labeled) == ("imagesTs/scan", False)
    assert [path.name for path in extra.image_paths] == ["scan_0000.nii.gz", "scan_0001.nii.gz"]
    (nnunet / "imagesTs" / "scan_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTs/scan_0001\.nii\.gz: channel 1 of case scan not found"):
        _ = module(nnunet, layout="nnunet", channels=2, unlabeled_images=["imagesTs"]).case_splits
    spec = json.loads((nnunet / "dataset.json").read_text())
    (nnunet / "dataset.json").write_text(json.dumps(spec | {"file_ending": ".mha"}))
    with pytest.raises(DataError, match=r"nnunet/dataset\.json: file_ending '\.mha' is not read here"):
        module(nnunet, layout="nnunet").setup("fit")
    with pytest.raises(
        DataError, match=r"imagesTr/prostate_\d\d\.nii\.gz: 2 channel\(s\) in 1 file\(s\), .*channels=3"
    ):
        module(layouts["msd"], layout="msd", channels=3).setup("fit")
    with pytest.raises(DataError, match=r"nowhere/dataset\.json: datalist not found"):
        module(tmp_path, layout="datalist", datalist=str(tmp_path / "nowhere" / "dataset.json")).setup("fit")
    with pytest.raises(DataError, match="split: split=datalist needs layout=datalist"):
        module(tmp_path, split="datalist")


def test_synth_prostate_writes_a_layout(tmp_path):
    command = [
        "data",
        "synth-prostate",
        "--out",
        str(tmp_path),
        "--layout",
        "nnunet",
        "--scale",
        "0.05",
        "--size",
        "16",
    ]
    main(command)
    data = module(tmp_path, layout="nnunet", channels=2, labels=ZONAL, image_size=16, predict_split="all")
    assert len(data.case_splits["all"]) == 4  # 2 RUNMC + 2 BMC cases
    assert {tuple(v["label"].unique().tolist()) for v in data.predict_dataloader()} == {(0, 1, 2)}
    with pytest.raises(SystemExit, match="already holds files"):
        main(command)


# --- semi-supervised training cases ------------------------------------------------------------


def labelled_keys(data: ProstateDataModule) -> list[str]:
    return [case.key for case in data.case_splits["train"] if case.labeled]


def test_labeled_cases_count_fraction_list_and_determinism(synthetic_prostate_root):
    full = module(synthetic_prostate_root)
    train = [case.key for case in full.case_splits["train"]]
    assert len(train) == 6  # one training case per site (2-3 cases each, one to val / test)
    three = module(synthetic_prostate_root, labeled_cases=3)
    assert [c.key for c in three.case_splits["train"]] == train  # every training image stays
    assert len(labelled_keys(three)) == 3
    assert labelled_keys(three) == labelled_keys(module(synthetic_prostate_root, labeled_cases=3))  # same seed
    assert labelled_keys(three) == [
        c.key for c in module(synthetic_prostate_root, train_num_cases=3).case_splits["train"]
    ]
    choices = {tuple(labelled_keys(module(synthetic_prostate_root, labeled_cases=3, seed=s))) for s in range(4)}
    assert len(choices) > 1  # the seed decides (the split moves too)
    assert len(labelled_keys(module(synthetic_prostate_root, labeled_cases=0.25))) == 2  # 1.5 rounded half up
    assert labelled_keys(module(synthetic_prostate_root, labeled_cases=[train[4], train[0]])) == [train[0], train[4]]
    for split in ("val", "test"):  # untouched
        assert [c.key for c in three.case_splits[split]] == [c.key for c in full.case_splits[split]]
        assert all(case.labeled for case in three.case_splits[split])
    with pytest.raises(DataError, match="labeled_cases: 10 requested, 6 labelled training cases available"):
        _ = module(synthetic_prostate_root, labeled_cases=10).case_splits
    with pytest.raises(DataError, match="labeled_cases: HK/Case99 not among the labelled training cases"):
        _ = module(synthetic_prostate_root, labeled_cases=["HK/Case99"]).case_splits
    for bad in (1.5, 0, 0.0):
        with pytest.raises(DataError, match=r"labeled_cases: a number of cases >= 1, a fraction in \(0, 1\)"):
            module(synthetic_prostate_root, labeled_cases=bad)


def test_batches_say_which_slices_are_labelled_and_unlabelled_images_are_included(synthetic_prostate_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_prostate_root / "HK", root / "HK")
    (root / "extra").mkdir()
    shutil.copy(synthetic_prostate_root / "UCL" / "Case01.nii.gz", root / "extra" / "scan_a.nii.gz")
    data = module(root, val_fraction=0.0, test_fraction=0.0, labeled_cases=1, unlabeled_images=["extra"])
    train = data.case_splits["train"]
    assert [(c.key, c.labeled) for c in train if not c.labeled][-1] == ("extra/scan_a", False)
    assert sum(c.labeled for c in train) == 1 and len(train) == 3
    dataset = data.train_set
    depth = {v.case.key: v.image.shape[1] for v in dataset.volumes}
    for volume_index, volume in enumerate(dataset.volumes):  # unlabelled volumes give every slice
        served = [s for v, s in dataset.samples if v == volume_index]
        if not volume.labeled:
            assert served == list(range(depth[volume.case.key]))
        else:
            assert served == torch.nonzero(volume.mask.flatten(1).any(1)).flatten().tolist()  # gland slices
    batches = list(data.train_dataloader())
    labeled = torch.cat([b["labeled"] for b in batches])
    assert labeled.dtype == torch.bool and batches[0]["labeled"].shape == (4,)
    expected = torch.tensor([dataset.volumes[v].labeled for v, _ in dataset.samples])
    assert sorted(labeled.tolist()) == sorted(expected.tolist()) and 0 < labeled.sum() < len(labeled)
    for batch in batches:  # unlabelled slices carry an all-zero placeholder mask
        assert not batch["label"][~batch["labeled"]].any()
    assert all(case.labeled for case in data.case_splits["all"])  # what val/test/predict draw from
    with pytest.raises(DataError, match="nowhere: unlabelled image folder not found"):
        _ = module(root, sites=["HK"], unlabeled_images=["nowhere"]).case_splits


class ShiftTeacher(torch.nn.Module):
    """A stand-in for FrozenTeachers: one 'teacher' whose logits are a fixed function of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, image: torch.Tensor):
        return [self.conv(image)], None


@torch.no_grad()
def test_teacher_cache_covers_unlabelled_slices(synthetic_prostate_root):
    data = module(synthetic_prostate_root, sites=["HK"], val_fraction=0.0, test_fraction=0.0, labeled_cases=1)
    teacher = ShiftTeacher()
    logits = compute_teacher_logits(teacher, data.teacher_cache_inputs(batch_size=5))
    train = data.train_set
    assert logits.shape[:2] == (len(train.samples), 1)
    data.attach_teacher_outputs(logits)  # augment off: served as computed
    unlabelled_seen = 0
    for index in range(len(train)):
        item = train[index]
        expected = teacher(item["image"][None])[0][0][0].half()  # (C, H, W) of the one teacher
        torch.testing.assert_close(item["teacher_logits"][0], expected, atol=2e-3, rtol=1e-3)
        unlabelled_seen += int(not item["labeled"])
    assert unlabelled_seen > 0


# --- multi-class losses and metrics --------------------------------------------------------------


def test_per_class_dice_hd95_and_their_mean():
    label = torch.zeros(4, 10, 10, dtype=torch.int64)
    label[1:3, 2:6, 2:6] = 1  # PZ: 32 voxels
    label[1:3, 6:8, 2:6] = 2  # TZ: 16 voxels
    pred = label.clone()
    pred[1:3, 6:8, 2:4] = 0  # half of TZ missed
    dice, hd95 = volume_class_dice_hd95(pred, label, [3.0, 1.0, 1.0], 3)
    assert dice == [1.0, pytest.approx(2 * 8 / (8 + 16))] and hd95[0] == 0.0
    assert (dice[1], hd95[1]) == volume_dice_hd95(pred == 2, label == 2, [3.0, 1.0, 1.0])
    metric = PerGroupVolumeMetrics(["A"], class_names=["PZ", "TZ"])
    metric.update(dice, hd95, "A", "v1")
    metric.update([0.5, 0.0], [2.0, float("nan")], "A", "v2")
    results = {name: value.item() for name, value in metric.compute().items()}
    assert results["dice_PZ"] == pytest.approx(0.75) and results["dice_TZ"] == pytest.approx(dice[1] / 2)
    assert results["dice"] == pytest.approx((sum(dice) / 2 + 0.25) / 2) == results["dice/A"]
    assert results["hd95_TZ"] == pytest.approx(hd95[1])  # NaN left out
    assert results["hd95"] == pytest.approx((sum(hd95) / 2 + 2.0) / 2)


def test_losses_are_multi_class():
    label = torch.zeros(2, 8, 8, dtype=torch.int64)
    label[:, 2:5, 2:5] = 1
    label[:, 5:7, 2:5] = 2
    perfect = torch.nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float() * 20
    assert DiceLoss()(perfect, label).item() < 1e-4 and LovaszLoss()(perfect, label).item() < 1e-6
    # Hard (one-hot) predictions: Lovasz-softmax is exactly 1 - IoU, averaged over the present classes.
    pred = label.clone()
    pred[:, 5, 2:5] = 1  # 3 TZ pixels per image called PZ
    hard = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 50
    ious = [1.0, 9 / 12, 3 / 6]  # background exact; PZ: 9 of 12 predicted pixels; TZ: 3 of 6 found
    assert LovaszLoss()(hard, label).item() == pytest.approx(1 - sum(ious) / 3, abs=1e-5)
    kd = choose_loss("kd", LOGIT_LOSSES, "logit_loss")
    weights = torch.ones(1, 2, 8, 8)
    same = logit_loss(kd, hard, hard[None], weights, 4.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and logit_loss(kd, perfect, hard[None], weights, 4.0) > 0.01
    # and they train a 3-class network. Measured over seeds 0-15, 1 and 2 threads: after 120 steps the
    # last/first loss is 0.17-0.21 and every pixel right (after 60 steps: 0.29-0.35, 86-100 % right)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 1)  # per pixel: the three intensity levels are separable
    image = label[:, None].float() + 0.1 * torch.randn(2, 1, 8, 8)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.1)
    losses = []
    for _ in range(120):
        logits = net(image)
        loss = (
            DiceLoss()(logits, label)
            + LovaszLoss()(logits, label)
            + logit_loss(kd, logits, perfect[None], weights, 4.0)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (net(image).argmax(1) == label).float().mean() > 0.95


# --- through the CLI ---------------------------------------------------------------------------

RUN = [*TINY, "--trainer.limit_val_batches=1", *QUIET]  # the shared tiny scale, one validation batch
#: What a zonal two-channel dataset adds to an experiment YAML (the example in docs/own-data.md; tests/test_docs.py keeps them equal).
ZONAL_TWO_CHANNEL = """\
data:
  init_args:
    channels: 2
    labels: {PZ: 1, TZ: 2}
"""


def last_metrics(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run_dir / "lightning_logs" / "version_1" / "metrics.csv").open()))
    return {key: float(value) for row in rows for key, value in row.items() if value and key.startswith("test/")}


def fit_and_test(config: str, run_dir: Path, *options: str) -> dict[str, float]:
    """``distill fit`` then ``distill test`` on best.ckpt; the test metrics logged."""
    args = ["--config", str(REPO / config), *options, *RUN, f"--trainer.default_root_dir={run_dir}"]
    main(["fit", *args])
    best = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    main(["test", *args, f"--ckpt_path={best}"])
    return last_metrics(run_dir)


def test_datalist_and_nnunet_fit_and_test_through_the_cli(layouts, tmp_path):
    metrics = fit_and_test(
        "experiments/prostate/student_baseline.yaml",
        tmp_path / "datalist",
        f"--data.init_args.data_root={layouts['datalist']}",
        "--data.init_args.layout=datalist",
    )
    assert {"test/dice/RUNMC", "test/dice/BMC"} <= set(metrics) and 0 <= metrics["test/dice"] <= 1
    assert not any(key.startswith("test/dice_") for key in metrics)  # one class: the names of today
    (tmp_path / "zonal.yaml").write_text(ZONAL_TWO_CHANNEL)
    metrics = fit_and_test(
        "experiments/prostate/student_baseline.yaml",
        tmp_path / "nnunet",
        "--config",
        str(tmp_path / "zonal.yaml"),
        f"--data.init_args.data_root={layouts['nnunet']}",
        "--data.init_args.layout=nnunet",
    )
    assert metrics["test/dice"] == pytest.approx((metrics["test/dice_PZ"] + metrics["test/dice_TZ"]) / 2)
    assert {"test/hd95_PZ", "test/hd95_TZ", "test/dice/nnunet"} <= set(metrics)


def test_msd_zonal_teacher_distils_into_a_zonal_student_through_the_cli(layouts, tmp_path):
    (tmp_path / "zonal.yaml").write_text(ZONAL_TWO_CHANNEL)
    data = [f"--data.init_args.data_root={layouts['msd']}", "--data.init_args.layout=msd"]
    # the teacher: a slim U-Net trained on the zonal labels (any trained segmentation network can teach)
    teacher = [
        "--config",
        str(REPO / "experiments/prostate/student_baseline.yaml"),
        "--config",
        str(tmp_path / "zonal.yaml"),
    ]
    main(["fit", *teacher, *data, *RUN, f"--trainer.default_root_dir={tmp_path / 'teacher'}"])
    student = fit_and_test(
        "experiments/prostate/student_kd.yaml",
        tmp_path / "student",
        "--config",
        str(tmp_path / "zonal.yaml"),
        *data,
        f"--model.init_args.teacher_checkpoint={tmp_path / 'teacher'}",
    )
    assert student["test/dice"] == pytest.approx((student["test/dice_PZ"] + student["test/dice_TZ"]) / 2)
    assert {"test/hd95_PZ", "test/hd95_TZ", "test/dice/msd"} <= set(student)
    rows = list(csv.DictReader((tmp_path / "student" / "lightning_logs" / "version_0" / "metrics.csv").open()))
    kd = [float(row["train/kd"]) for row in rows if row.get("train/kd")]
    assert kd and all(value > 0 for value in kd)
    best = tmp_path / "student" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit, match=r"best\.ckpt: trained on 2 MRI channels .*reads one channel per volume"):
        main(["export", str(best), "--out", str(tmp_path / "student.onnx")])
    # the teacher YAML names no classes or channels: it takes both, and the class names, from the data
    cli = DistillCLI(
        args=[
            "--config",
            str(REPO / "experiments/prostate/teacher.yaml"),
            *data,
            "--data.init_args.labels={PZ: 1, TZ: 2}",
            "--data.init_args.channels=2",
            *RUN,
        ],
        run=False,
    )
    linked = {key: cli.model.hparams[key] for key in ("in_channels", "num_classes", "class_names")}
    assert linked == {"in_channels": 6, "num_classes": 3, "class_names": ["PZ", "TZ"]}
    assert cli.model.net(torch.zeros(1, 6, 32, 32)).shape == (1, 3, 32, 32)
    # a module built in Python for other data: one line at set-up, before the first batch
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=1)
    with pytest.raises(DataError, match=r"^model num_classes=2 differs from the data's 3 \(in a YAML leave"):
        trainer.fit(SegmentationModule(in_channels=6, num_classes=2, network_kwargs={"width": 4}), cli.datamodule)

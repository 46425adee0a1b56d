"""Synthetic prostate tree (real layout) and ProstateDataModule: reading, splits, 2.5D stacks, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_modules.layouts import ProstateCase, discover_cases
from data_modules.prostate import ProstateDataModule
from data_modules.splits import split_cases
from data_modules.synth_prostate import write_synthetic_prostate
from distill.errors import DataError
from distill.formats.nifti import save_mask_like
from distill.formats.sites import PROSTATE_SITES


def module(root, **kwargs) -> ProstateDataModule:
    """A DataModule at the fixture's size, without workers or augmentation unless asked."""
    options = {"image_size": 64, "num_workers": 0, "augment": False, "batch_size": 4} | kwargs
    return ProstateDataModule(str(root), **options)


def raw_case(root: Path, site: str, case: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Image and mask as nibabel (X, Y, Z) arrays, straight from disk."""
    image = nib.load(root / site / f"{case}.nii.gz")
    mask_path = next((root / site).glob(f"{case}_*egmentation.nii.gz"))
    return image.get_fdata(), np.asarray(nib.load(mask_path).dataobj), image


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.nii.gz"))
    }


# --- the synthetic tree ---------------------------------------------------------------------------------


def test_synthetic_tree_has_the_real_file_names(synthetic_prostate_root):
    names = {site: sorted(p.name for p in (synthetic_prostate_root / site).iterdir()) for site in PROSTATE_SITES}
    assert names["RUNMC"] == [f"Case0{i}{suffix}.nii.gz" for i in range(3) for suffix in ("", "_segmentation")]
    assert names["BMC"] == [f"Case0{i}{suffix}.nii.gz" for i in range(3) for suffix in ("", "_Segmentation")]
    assert names["BIDMC"] == [
        "Case00.nii.gz",
        "Case00_segmentation.nii.gz",
        "Case02.nii.gz",
        "Case02_segmentation.nii.gz",
    ]
    assert names["HK"] == ["Case38.nii.gz", "Case38_segmentation.nii.gz", "Case39.nii.gz", "Case39_segmentation.nii.gz"]
    assert [n for n in names["I2CVB"] if "seg" not in n] == ["Case00.nii.gz", "Case01.nii.gz"]
    assert [n for n in names["UCL"] if "seg" not in n] == ["Case01.nii.gz", "Case26.nii.gz"]


def test_synthetic_volumes_look_like_the_release(synthetic_prostate_root):
    image, mask, nifti = raw_case(synthetic_prostate_root, "RUNMC", "Case00")
    assert nifti.get_data_dtype() == np.int16 and np.issubdtype(mask.dtype, np.integer)
    assert set(np.unique(mask)) == {0, 1, 2}  # zonal: 2 = central gland, inside the gland
    # Real field of view (384 px x 0.6 mm) at 64 px, real slice thickness.
    np.testing.assert_allclose(nifti.header.get_zooms(), (0.6 * 384 / 64, 0.6 * 384 / 64, 3.6), rtol=1e-5)
    gland_per_slice = (mask > 0).any(axis=(0, 1))
    assert not gland_per_slice[0] and not gland_per_slice[-1] and gland_per_slice.sum() >= 5
    _, hk_mask, hk = raw_case(synthetic_prostate_root, "HK", "Case38")
    assert hk.get_data_dtype() == np.float32 and set(np.unique(hk_mask)) == {0, 1}
    np.testing.assert_allclose(hk.header.get_zooms(), (0.5 * 384 / 64, 0.5 * 384 / 64, 4.0), rtol=1e-5)


def test_synthetic_tree_is_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic_prostate(tmp_path / name, seed=seed, scale=0.05, size=32)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert file_digests(tmp_path / "a") != file_digests(tmp_path / "c")
    with pytest.raises(DataError, match="already holds files"):
        write_synthetic_prostate(tmp_path / "a", seed=3, scale=0.05, size=32)


# --- reading it back ------------------------------------------------------------------------------------


def test_train_batches_and_volume_items(synthetic_prostate_root):
    data = module(synthetic_prostate_root, augment=True)
    assert (data.in_channels, data.num_classes) == (3, 2)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 64, 64) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1} and batch["label"].any()

    volume = next(iter(data.val_dataloader()))
    image, mask, nifti = raw_case(synthetic_prostate_root, volume["site"], volume["case"])
    slices, height, width = image.shape[2], image.shape[0], image.shape[1]
    assert volume["image"].shape == (slices, 3, 64, 64) and volume["image"].dtype == torch.float32
    assert volume["label"].dtype == torch.int64
    np.testing.assert_array_equal(volume["label"].numpy(), (mask > 0).transpose(2, 0, 1))
    assert volume["label"].shape == (slices, height, width)
    affine = nifti.affine
    expected_spacing = [abs(affine[2, 2]), np.linalg.norm(affine[:3, 0]), np.linalg.norm(affine[:3, 1])]
    assert volume["spacing"].dtype == torch.float64
    np.testing.assert_allclose(volume["spacing"].numpy(), expected_spacing, rtol=1e-6)
    np.testing.assert_allclose(volume["affine"].numpy(), affine, rtol=1e-6)
    assert volume["image_path"] == str(synthetic_prostate_root / volume["site"] / f"{volume['case']}.nii.gz")


def test_resized_sites_keep_original_resolution_labels(synthetic_prostate_root):
    data = module(synthetic_prostate_root, sites=["BIDMC"], split="per_site", image_size=32)
    volume = next(iter(data.test_dataloader()))
    _, mask, _ = raw_case(synthetic_prostate_root, "BIDMC", volume["case"])
    assert volume["image"].shape[-2:] == (32, 32)
    assert volume["label"].shape == mask.transpose(2, 0, 1).shape == (mask.shape[2], 53, 53)


def test_two_and_a_half_d_stacks_are_the_neighbouring_slices(synthetic_prostate_root):
    data = module(synthetic_prostate_root, sites=["RUNMC"], num_slices=5, test_fraction=0.0, val_fraction=0.0)
    image, mask, _ = raw_case(synthetic_prostate_root, "RUNMC", "Case00")
    normalised = image.transpose(2, 0, 1)
    normalised = (normalised - normalised.mean()) / normalised.std()  # per-volume z-score, no resize at 64 px
    slices = normalised.shape[0]

    data_all = module(synthetic_prostate_root, sites=["RUNMC"], num_slices=5, predict_split="all")
    volume = next(item for item in data_all.predict_dataloader() if item["case"] == "Case00")
    for centre in (0, 1, slices // 2, slices - 1):
        expected = normalised[np.clip(np.arange(centre - 2, centre + 3), 0, slices - 1)]
        np.testing.assert_allclose(volume["image"][centre].numpy(), expected, atol=1e-4)

    train_set = data.train_dataloader().dataset
    gland_slices = np.flatnonzero((mask > 0).any(axis=(0, 1)))
    position = train_set.samples.index((0, int(gland_slices[0])))
    sample = train_set[position]
    np.testing.assert_allclose(
        sample["image"].numpy(), normalised[gland_slices[0] - 2 : gland_slices[0] + 3], atol=1e-4
    )
    np.testing.assert_array_equal(sample["label"].numpy(), mask[:, :, gland_slices[0]] > 0)


def test_foreground_only_and_background_fraction(synthetic_prostate_root):
    options = {"sites": ["HK"], "test_fraction": 0.0, "val_fraction": 0.0}
    gland_slices = sum(
        int((raw_case(synthetic_prostate_root, "HK", c)[1] > 0).any(axis=(0, 1)).sum()) for c in ("Case38", "Case39")
    )
    all_slices = sum(raw_case(synthetic_prostate_root, "HK", c)[0].shape[2] for c in ("Case38", "Case39"))
    assert len(module(synthetic_prostate_root, **options).train_dataloader().dataset) == gland_slices
    assert (
        len(module(synthetic_prostate_root, **options, background_fraction=1.0).train_dataloader().dataset)
        == all_slices
    )
    assert (
        len(module(synthetic_prostate_root, **options, foreground_only=False).train_dataloader().dataset) == all_slices
    )
    half = len(module(synthetic_prostate_root, **options, background_fraction=0.5).train_dataloader().dataset)
    assert half == gland_slices + int(0.5 * (all_slices - gland_slices) + 0.5)  # rounded half up


def test_percentile_normalisation_is_in_unit_range(synthetic_prostate_root):
    volume = next(iter(module(synthetic_prostate_root, sites=["UCL"], normalization="percentile").test_dataloader()))
    assert volume["image"].min() == 0 and volume["image"].max() == 1


def test_site_aliases(synthetic_prostate_root, tmp_path):
    for alias, site in (("ISBI", "RUNMC"), ("ISBI_1.5", "BMC"), ("HK", "HK")):
        (tmp_path / alias).symlink_to(synthetic_prostate_root / site, target_is_directory=True)
    cases = discover_cases(tmp_path)
    assert [c.key for c in cases] == [
        "RUNMC/Case00",
        "RUNMC/Case01",
        "RUNMC/Case02",
        "BMC/Case00",
        "BMC/Case01",
        "BMC/Case02",
        "HK/Case38",
        "HK/Case39",
    ]
    assert cases[3].mask_path.name == "Case00_Segmentation.nii.gz"
    assert {c.site for c in discover_cases(tmp_path, sites=["isbi_1.5"])} == {"BMC"}
    (tmp_path / "BMC").symlink_to(synthetic_prostate_root / "BMC", target_is_directory=True)
    with pytest.raises(DataError, match="also at"):
        discover_cases(tmp_path)


def test_setup_is_cached_per_process(synthetic_prostate_root):
    first = module(synthetic_prostate_root).val_dataloader().dataset.volumes
    second = module(synthetic_prostate_root).val_dataloader().dataset.volumes
    assert all(a is b for a, b in zip(first, second)) and first


# --- splits ---------------------------------------------------------------------------------------------


def fake_cases(counts: dict[str, int]) -> list[ProstateCase]:
    """Cases that only need names: split logic never opens files."""
    return [
        ProstateCase(site, f"Case{i:02d}", Path(f"{site}/Case{i:02d}.nii.gz"), Path("mask"))
        for site, n in counts.items()
        for i in range(n)
    ]


def assert_disjoint_cover(splits: dict[str, list[ProstateCase]], cases: list[ProstateCase]) -> None:
    keys = [c.key for name in ("train", "val", "test") for c in splits[name]]
    assert len(keys) == len(set(keys)) and set(keys) == {c.key for c in cases}


def test_per_site_split_fractions():
    cases = fake_cases({"RUNMC": 30, "I2CVB": 19, "BIDMC": 3, "HK": 2})
    splits = split_cases(cases, "per_site", val_fraction=0.15, test_fraction=0.25, seed=0)
    assert_disjoint_cover(splits, cases)
    count = {
        name: {s: sum(c.site == s for c in splits[name]) for s in ("RUNMC", "I2CVB", "BIDMC", "HK")} for name in splits
    }
    assert count["test"] == {"RUNMC": 8, "I2CVB": 5, "BIDMC": 1, "HK": 1}  # round(0.25 n), at least 1
    assert count["val"] == {"RUNMC": 5, "I2CVB": 3, "BIDMC": 1, "HK": 0}  # round(0.15 n), at least 1 from 3 cases
    assert split_cases(cases, "per_site", seed=0) == splits
    assert split_cases(cases, "per_site", seed=1) != splits


def test_leave_one_site_out_split():
    cases = fake_cases({"RUNMC": 30, "BMC": 30, "HK": 12})
    splits = split_cases(cases, "leave_one_site_out", val_fraction=0.15, held_out_site="HK", seed=0)
    assert_disjoint_cover(splits, cases)
    assert [c.key for c in splits["test"]] == [c.key for c in cases if c.site == "HK"]
    assert [sum(c.site == s for c in splits["val"]) for s in ("RUNMC", "BMC", "HK")] == [5, 5, 0]
    with pytest.raises(DataError, match="held_out_site"):
        split_cases(cases, "leave_one_site_out", held_out_site="UCL")


def test_case_list_split(synthetic_prostate_root, tmp_path):
    case_list = tmp_path / "split.yaml"
    case_list.write_text("train: [RUNMC/Case00, ISBI_1.5/Case01]\nval: [HK/Case38]\ntest: [BIDMC/Case02, UCL/Case26]\n")
    data = module(synthetic_prostate_root, split="case_list", case_list=str(case_list))
    assert {name: [c.key for c in data.case_splits[name]] for name in ("train", "val", "test")} == {
        "train": ["RUNMC/Case00", "BMC/Case01"],
        "val": ["HK/Case38"],
        "test": ["UCL/Case26", "BIDMC/Case02"],  # in site order
    }
    case_list.write_text("train: [RUNMC/Case00, BIDMC/Case01]\n")  # BIDMC has no Case01
    with pytest.raises(DataError, match=r"split\.yaml.*BIDMC/Case01"):
        module(synthetic_prostate_root, split="case_list", case_list=str(case_list)).setup("fit")
    case_list.write_text("train: [RUNMC/Case00]\ntest: [RUNMC/Case00]\n")
    with pytest.raises(DataError, match=r"split\.yaml.*both train and test"):
        module(synthetic_prostate_root, split="case_list", case_list=str(case_list)).setup("fit")


def test_split_with_the_datamodule_is_by_case(synthetic_prostate_root):
    splits = module(synthetic_prostate_root).case_splits
    assert_disjoint_cover(splits, splits["all"])
    for site in ("RUNMC", "BMC"):  # 3 cases: one each
        assert [sum(c.site == site for c in splits[name]) for name in ("train", "val", "test")] == [1, 1, 1]


def test_training_subsets_leave_val_and_test_alone(synthetic_prostate_root):
    full = module(synthetic_prostate_root).case_splits
    by_site = module(synthetic_prostate_root, train_sites=["BMC", "ISBI"]).case_splits
    assert {c.site for c in by_site["train"]} == {"RUNMC", "BMC"}
    assert by_site["train"] == [c for c in full["train"] if c.site in ("RUNMC", "BMC")]
    few = module(synthetic_prostate_root, train_num_cases=2).case_splits
    assert len(few["train"]) == 2 and set(few["train"]) < set(full["train"])
    for subset in (by_site, few):
        assert subset["val"] == full["val"] and subset["test"] == full["test"]
    with pytest.raises(DataError, match="train_num_cases"):
        module(synthetic_prostate_root, train_num_cases=50).setup("fit")


def test_sites_restricts_what_is_read(synthetic_prostate_root):
    data = module(synthetic_prostate_root, sites=["UCL", "HK"], predict_split="all")
    assert {c.site for c in data.case_splits["all"]} == {"UCL", "HK"}
    assert len(data.predict_dataloader()) == 4


# --- writing predictions --------------------------------------------------------------------------------


def test_save_mask_like_round_trips_and_refuses_to_overwrite(synthetic_prostate_root, tmp_path):
    volume = next(iter(module(synthetic_prostate_root, sites=["BMC"]).test_dataloader()))
    mask = volume["label"].numpy().astype(np.uint8)
    out = save_mask_like(mask, volume["image_path"], tmp_path / "pred" / "Case.nii.gz")
    written, reference = nib.load(out), nib.load(volume["image_path"])
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask.transpose(1, 2, 0))
    with pytest.raises(DataError, match=r"Case\.nii\.gz.*already exists"):
        save_mask_like(np.zeros_like(mask), volume["image_path"], out)
    save_mask_like(np.zeros_like(mask), volume["image_path"], out, overwrite=True)
    assert not np.asarray(nib.load(out).dataobj).any()


# --- bad input ------------------------------------------------------------------------------------------


def write_case(folder: Path, case: str = "Case00", image=None, mask=None, mask_suffix: str = "_segmentation") -> Path:
    """A tiny (8, 8, 4) case; ``image``/``mask`` override the arrays, None mask writes no mask."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4) if image is None else image
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{case}.nii.gz")
    if mask is not False:
        mask = np.zeros((8, 8, 4), np.uint8) if mask is None else mask
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / f"{case}{mask_suffix}.nii.gz")
    return folder / f"{case}.nii.gz"


def load(root: Path) -> None:
    """Read every case (a one-case tree has no val case to fit with)."""
    module(root, image_size=8, predict_split="all").setup("predict")


def test_missing_mask(tmp_path):
    write_case(tmp_path / "UCL", mask=False)
    with pytest.raises(DataError, match=r"UCL/Case00\.nii\.gz: mask Case00_segmentation"):
        load(tmp_path)


def test_image_mask_shape_mismatch(tmp_path):
    write_case(tmp_path / "UCL", mask=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"Case00_segmentation\.nii\.gz: mask shape \(8, 8, 3\)"):
        load(tmp_path)


def test_mask_values_outside_zonal_labels(tmp_path):
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:4, 2:4, 1] = 3
    write_case(tmp_path / "BMC", mask=mask, mask_suffix="_Segmentation")
    with pytest.raises(DataError, match=r"Case00_Segmentation\.nii\.gz: mask values .* \[3\.0\]"):
        load(tmp_path)


def test_nan_voxels(tmp_path):
    image = np.ones((8, 8, 4), np.float32)
    image[0, 0, 0] = np.nan
    write_case(tmp_path / "HK", "Case38", image=image)
    with pytest.raises(DataError, match=r"HK/Case38\.nii\.gz: 1 NaN"):
        load(tmp_path)


def test_empty_site_folder(tmp_path):
    write_case(tmp_path / "HK", "Case38")
    (tmp_path / "UCL").mkdir()
    with pytest.raises(DataError, match=r"UCL: empty site folder"):
        load(tmp_path)


def test_unknown_site_folder_and_name(tmp_path):
    write_case(tmp_path / "HK", "Case38")
    (tmp_path / "Prostate3T").mkdir()
    with pytest.raises(DataError, match=r"Prostate3T: unknown site folder; known sites: RUNMC, BMC"):
        load(tmp_path)
    assert [c.key for c in discover_cases(tmp_path, sites=["HK"])] == ["HK/Case38"]
    with pytest.raises(DataError, match=r"sites: unknown site 'MSD'; known sites: RUNMC, BMC, I2CVB, UCL, BIDMC, HK"):
        discover_cases(tmp_path, sites=["HK", "MSD"])


@pytest.mark.parametrize("kept_fraction", [0.1, 0.6])  # broken header, broken voxel data
def test_corrupt_nifti(tmp_path, kept_fraction):
    noise = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    image_path = write_case(tmp_path / "RUNMC", image=noise)
    content = image_path.read_bytes()
    image_path.write_bytes(content[: int(kept_fraction * len(content))])  # truncated download
    with pytest.raises(DataError, match=r"RUNMC/Case00\.nii\.gz: cannot read NIfTI"):
        load(tmp_path)


def test_missing_data_root(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: prostate data root not found.*distill data synth-prostate"):
        load(tmp_path / "nowhere")


def test_bad_options_name_the_key(synthetic_prostate_root):
    with pytest.raises(DataError, match="num_slices"):
        module(synthetic_prostate_root, num_slices=4)
    with pytest.raises(DataError, match="held_out_site"):
        module(synthetic_prostate_root, split="leave_one_site_out")


def test_slice_augmentation_keeps_image_label_and_logits_aligned_and_is_seeded():
    from data_modules.augment import SliceAugmentation, seeded_augmentation

    torch.manual_seed(0)
    image = torch.nn.functional.avg_pool2d(torch.randn(1, 3, 40, 40), 5, 1, 2)[0] * 5  # smooth blobs
    label = (image[1:2] > 0).long()
    logits = torch.cat([-image[1:2], image[1:2]]) * 10  # a "teacher" that agrees with the label
    augment = SliceAugmentation(flip_prob=0.5, affine_prob=1.0, intensity=False, spatial_keys=("teacher_logits",))
    for seed in range(10):
        out = seeded_augmentation(augment, {"image": image, "label": label, "teacher_logits": logits}, seed, 0, 0)
        assert out["label"].dtype == torch.int64 and set(out["label"].unique().tolist()) <= {0, 1}
        inside = slice(6, -6)  # away from the border padding
        assert ((out["image"][1] > 0).long() == out["label"][0])[inside, inside].float().mean() > 0.9
        assert (out["teacher_logits"].argmax(0) == out["label"][0])[inside, inside].float().mean() > 0.9
    again = seeded_augmentation(augment, {"image": image, "label": label}, 3, 1, 7)
    first = seeded_augmentation(augment, {"image": image, "label": label}, 3, 1, 7)
    other = seeded_augmentation(augment, {"image": image, "label": label}, 3, 1, 8)
    assert torch.equal(again["image"], first["image"]) and not torch.equal(other["image"], first["image"])
    identity = SliceAugmentation(flip_prob=0.0, affine_prob=0.0, intensity=False)({"image": image, "label": label})
    assert torch.equal(identity["image"], image) and torch.equal(identity["label"], label)

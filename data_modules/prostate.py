"""The prostate MRI segmentation DataModule (the MS-Net/SAML release and the common public layouts).

Its parts, one job each: :mod:`data_modules.layouts` finds the cases of a ``layout:``,
:mod:`data_modules.splits` splits them by case (from ``seed`` only, identical on every DDP rank),
:mod:`data_modules.volumes` reads, checks and resizes a case, :mod:`data_modules.prostate_datasets`
serves 2.5D stacks of ``num_slices`` adjacent slices of every channel predicting the centre slice
for training and whole volumes, with the mask at the original resolution (3D Dice / HD95 in mm), for
evaluation. Masks become class indices through ``labels``: the whole gland (any of {1, 2} -> 1, the
default) or a mapping such as zonal ``{PZ: 1, TZ: 2}`` (class k = the k-th entry).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader

from data_modules.layouts import (
    LAYOUTS,
    Layout,
    ProstateCase,
    datalist_cases,
    discover_cases,
    image_folder_cases,
    msd_cases,
    nnunet_cases,
)
from data_modules.prostate_datasets import ProstateSliceDataset, ProstateVolumeDataset, training_augmentation
from data_modules.resumable import ResumableTraining
from data_modules.splits import (
    SPLIT_METHODS,
    SPLITS,
    LabeledCases,
    SplitMethod,
    keep_labels_of,
    restrict_training_cases,
    sorted_cases,
    split_cases,
)
from data_modules.volumes import WHOLE_GLAND, Normalization, ProstateVolume, load_volume, nifti_slices, volume_stacks
from distill.errors import DataError
from distill.formats.sites import canonical_site, site_order
from distill.types import ClosedUnitInterval, NonNegativeInt, PositiveInt
from distill.utils import refuse_unless_memory_fits

#: Labels as written in YAML: ``whole_gland`` or {class name: file value or values}.
LabelMap = Literal["whole_gland"] | dict[str, int | list[int]]
#: ``predict_split`` as written in YAML: the test cases, or every labelled case read.
PredictSplit = Literal["test", "all"]


def _label_map(labels: str | Mapping) -> dict[str, list[int]]:
    """``labels`` as {class name: file values}, checked (one line naming ``labels`` when wrong)."""
    if labels == "whole_gland":
        return dict(WHOLE_GLAND)
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"labels: 'whole_gland' or a mapping {{class name: mask value(s)}}, got {labels!r}")
    mapping, seen = {}, {}
    for name, values in labels.items():
        values = [values] if isinstance(values, int) else list(values)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise DataError(f"labels: class {name!r} needs positive integer mask values, got {labels[name]!r}")
        for value in values:
            if value in seen:
                where = f"listed twice in {name!r}" if seen[value] == name else f"in both {seen[value]!r} and {name!r}"
                raise DataError(f"labels: mask value {value} is {where}")
            seen[value] = name
        mapping[str(name)] = values
    return mapping


class ProstateDataModule(ResumableTraining, L.LightningDataModule):
    """Prostate MRI (any layout of :mod:`data_modules.layouts`) for 2.5D segmentation with case-level splits.

    Train batches: ``{"image": float32 (B, channels * num_slices, H, W), "label": int64 (B, H, W),
    "labeled": bool (B,)}`` (``labeled`` False: an unlabelled slice with an all-zero ``label``; only
    when ``labeled_cases`` leaves some training cases unlabelled).
    Val/test/predict: one volume per item (see :class:`~data_modules.prostate_datasets.ProstateVolumeDataset`); predict serves
    the test cases (``predict_split="test"``) or every labelled case read (``"all"``).

    Args:
        data_root: folder holding the data (site folders, or a datalist / MSD / nnU-Net dataset folder).
        sites: sites to read (aliases accepted; with ``layout: sites`` other folder names are read
            when listed here); None reads every site.
        split: "per_site", "leave_one_site_out" (needs ``held_out_site``), "case_list"
            (needs ``case_list``, a YAML file with train/val/test lists of "SITE/CaseXX") or
            "datalist" (the training / validation / test lists of ``layout: datalist``; other
            splits pool every labelled entry and split it).
        val_fraction, test_fraction: per-site fractions ("per_site"; val only for leave-one-site-out).
        train_sites, train_num_cases, train_cases: restrict the training cases (limit-trained
            teachers) to sites, a seeded number of cases, or a list of "SITE/CaseXX"; val/test are
            unaffected.
        num_slices: adjacent slices of each channel stacked as input channels (odd).
        image_size: in-plane size the network sees.
        normalization: "zscore" or "percentile" (1st/99th clip, rescale to [0, 1]), per volume and channel.
        foreground_only, background_fraction: train on foreground slices plus this fraction of the others.
        augment: MONAI flips, small rotations/scaling and intensity jitter on training samples.
        intensity_augmentation: include the intensity jitter (cached teacher outputs cannot follow it).
        seed: fixes splits, subsets, background slices, labelled cases, the shuffle order of every
            epoch and the augmentation of every sample (same on every rank; checkpoints hold the
            position in the epoch, so a resumed run continues exactly, see :mod:`data_modules.resumable`).
        load_threads: volumes read in parallel in ``setup``.
        layout: "sites", "datalist", "msd" or "nnunet" (:mod:`data_modules.layouts`).
        datalist: the datalist JSON of ``layout: datalist`` (default ``<data_root>/dataset.json``;
            paths in it are relative to its folder).
        channels: MRI channels read per case (1: T2; 2: T2 + ADC), the first ``channels`` of a 4D
            file or channel files; the network sees ``channels * num_slices`` input channels.
        labels: "whole_gland" (mask values 1 and 2 -> class 1) or ``{class name: value(s)}``, e.g.
            zonal ``{PZ: 1, TZ: 2}`` (class k = the k-th entry; other nonzero values are refused).
        labeled_cases: keep masks for only these training cases (an int N, a fraction in (0, 1) or a
            list of "SITE/Case"; see :func:`~data_modules.splits.keep_labels_of`); every training image is still used.
        unlabeled_images: folders (relative to ``data_root``) of images without masks, added to the
            training images as unlabelled (never to val/test).
    """

    def __init__(
        self,
        data_root: str = "data/prostate",
        sites: list[str] | None = None,
        split: SplitMethod = "per_site",
        val_fraction: ClosedUnitInterval = 0.15,
        test_fraction: ClosedUnitInterval = 0.25,
        held_out_site: str | None = None,
        case_list: str | None = None,
        train_sites: list[str] | None = None,
        train_num_cases: PositiveInt | None = None,
        train_cases: list[str] | None = None,
        num_slices: PositiveInt = 3,
        image_size: PositiveInt = 384,
        normalization: Normalization = "zscore",
        foreground_only: bool = True,
        background_fraction: ClosedUnitInterval = 0.0,
        augment: bool = True,
        intensity_augmentation: bool = True,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
        predict_split: PredictSplit = "test",
        load_threads: PositiveInt = 4,
        layout: Layout = "sites",
        datalist: str | None = None,
        channels: PositiveInt = 1,
        labels: LabelMap = "whole_gland",
        labeled_cases: LabeledCases | None = None,
        unlabeled_images: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # A YAML value outside these choices is refused by the parser: one here comes from Python code.
        for key, choices in (
            ("split", SPLIT_METHODS),
            ("normalization", get_args(Normalization)),
            ("predict_split", get_args(PredictSplit)),
            ("layout", LAYOUTS),
        ):
            if self.hparams[key] not in choices:
                raise ValueError(f"{key}: {' or '.join(choices)} (got {self.hparams[key]!r})")
        labeled_ok = (
            labeled_cases is None
            or isinstance(labeled_cases, (list, tuple))
            or (isinstance(labeled_cases, float) and 0 < labeled_cases < 1)
            or (isinstance(labeled_cases, int) and not isinstance(labeled_cases, bool) and labeled_cases >= 1)
        )
        checks = {
            "held_out_site": (split != "leave_one_site_out" or held_out_site, "required for split=leave_one_site_out"),
            "case_list": (split != "case_list" or case_list is not None, "required for split=case_list"),
            "val_fraction": (
                0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1,
                "val_fraction and test_fraction must be in [0, 1) with a sum below 1",
            ),
            "num_slices": (num_slices >= 1 and num_slices % 2 == 1, "must be odd and positive"),
            "image_size": (image_size >= 8, "must be at least 8"),
            "background_fraction": (0 <= background_fraction <= 1, "must be in [0, 1]"),
            "labeled_cases": (labeled_ok, "a number of cases >= 1, a fraction in (0, 1) or a list of SITE/Case keys"),
        }
        if split == "datalist":
            checks = {"split": (layout == "datalist", "split=datalist needs layout=datalist"), **checks}
        for key, (ok, requirement) in checks.items():
            if not ok:
                raise DataError(f"{key}: {requirement} (got {self.hparams[key]!r})")
        self.label_map = _label_map(labels)
        self._case_splits: dict[str, list[ProstateCase]] | None = None
        self._volumes: dict[str, list[ProstateVolume]] = {}
        self._train_set: ProstateSliceDataset | None = None

    # what the model takes from the data (:class:`distill.data_links.SegmentationData`)
    @property
    def image_size(self) -> int:
        """Training slice side S of the (B, in_channels, S, S) stacks."""
        return self.hparams.image_size

    @property
    def in_channels(self) -> int:
        """Network input channels (= ``channels * num_slices``)."""
        return self.hparams.channels * self.hparams.num_slices

    @property
    def num_classes(self) -> int:
        """Background and the classes of ``labels`` (2 for the whole gland)."""
        return 1 + len(self.label_map)

    @property
    def class_names(self) -> list[str]:
        """Names of the foreground classes 1, 2, ... ("gland" for the whole gland)."""
        return list(self.label_map)

    @property
    def seed(self) -> int:
        """The seed of the case subsets, the epoch order and the augmentation."""
        return self.hparams.seed

    @property
    def site_names(self) -> list[str]:
        """Sites of the labelled cases read (release order first), for per-site metrics."""
        return sorted({case.site for case in self.case_splits["all"]}, key=site_order)

    def _read_cases(self) -> list[ProstateCase]:
        """Every case of ``layout``, labelled or not, restricted to ``sites`` (when given)."""
        hp = self.hparams
        root = Path(hp.data_root)
        if hp.layout == "sites":
            return discover_cases(root, hp.sites, exclude=hp.unlabeled_images or ())
        if not root.is_dir():
            raise DataError(f"{root}: data root not found (layout: {hp.layout})")
        if hp.layout == "datalist":
            cases = datalist_cases(hp.datalist or root / "dataset.json", default_site=root.name)
        elif hp.layout == "msd":
            cases = msd_cases(root)
        else:
            cases = nnunet_cases(root, hp.channels)
        if hp.sites is not None:
            available = sorted({case.site for case in cases}, key=site_order)
            keep = {canonical_site(name, "sites", available) for name in hp.sites}
            missing = keep - set(available)
            if missing:
                raise DataError(
                    f"sites: {', '.join(sorted(missing))} not among the sites read ({', '.join(available)})"
                )
            cases = [case for case in cases if case.site in keep]
        return cases

    @property
    def case_splits(self) -> dict[str, list[ProstateCase]]:
        """{"train", "val", "test", "all"} -> cases; found and split once per DataModule.

        "all" holds the labelled cases; "train" ends with the unlabelled images (datalist entries
        without ``label``, ``unlabeled_images`` folders) and holds cases whose mask
        ``labeled_cases`` drops (``mask_path`` None).
        """
        if self._case_splits is None:
            hp = self.hparams
            cases = self._read_cases()
            labeled = [case for case in cases if case.labeled]
            if not labeled:
                raise DataError(f"{hp.data_root}: no labelled case (every case lacks a mask)")
            splits = split_cases(
                labeled, hp.split, hp.val_fraction, hp.test_fraction, hp.held_out_site, hp.case_list, hp.seed
            )
            train = restrict_training_cases(
                splits["train"], hp.train_sites, hp.train_num_cases, hp.seed, hp.train_cases
            )
            unlabeled = [case for case in cases if not case.labeled]
            for folder in hp.unlabeled_images or ():
                unlabeled += image_folder_cases(Path(hp.data_root) / folder, hp.layout, hp.channels)
            splits["train"] = keep_labels_of(train, hp.labeled_cases, hp.seed) + unlabeled
            known = {case.key for case in labeled}
            clash = next((case for case in unlabeled if case.key in known), None)
            if clash is not None:
                raise DataError(f"{clash.image_path}: unlabelled image named like the labelled case {clash.key}")
            splits["all"] = sorted_cases(labeled)
            self._case_splits = splits
        return self._case_splits

    def setup(self, stage: str | None = None) -> None:
        """Load (once) the volumes the stage needs: fit -> train + val, validate -> val, test, predict.

        Fitting needs train and val cases (val chooses ``best.ckpt``), and every class of ``labels``
        in some training mask (a class no mask holds cannot be learnt: the labels do not fit the data).
        """
        hp = self.hparams
        if stage == "fit":
            for name in ("train", "val"):
                if self.case_splits[name]:
                    continue
                if hp.split == "case_list":
                    raise DataError(
                        f"{hp.case_list}: the case list has no {name} cases; fitting needs them "
                        "(validation chooses best.ckpt)"
                    )
                counts = ", ".join(f"{part} {len(self.case_splits[part])}" for part in SPLITS)
                raise DataError(
                    f"{hp.data_root}: split={hp.split} gives no {name} cases ({counts}); "
                    "fitting needs them (validation chooses best.ckpt): read more cases or change the split"
                )
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (hp.predict_split,),
        }.get(stage, ("train", "val", "test"))
        self._refuse_volumes_beyond_memory([name for name in needed if name not in self._volumes])
        for name in needed:
            self._split_volumes(name)
        if stage == "fit":
            self._check_classes_occur(self._split_volumes("train"))

    def _check_classes_occur(self, volumes: Sequence[ProstateVolume]) -> None:
        """Refuse a class of ``labels`` that none of the labelled ``volumes`` holds, naming the masks read."""
        masks = [volume for volume in volumes if volume.labeled]
        present = torch.zeros(self.num_classes, dtype=torch.bool)
        for volume in masks:
            present |= torch.bincount(volume.label.flatten().long(), minlength=self.num_classes).bool()
        for index, (name, values) in enumerate(self.label_map.items(), start=1):
            if not present[index]:
                paths = [str(volume.case.mask_path) for volume in masks]
                shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
                raise DataError(
                    f"labels: class {name!r} (mask value {' or '.join(map(str, values))}) occurs in none of the "
                    f"{len(paths)} training masks read ({shown})"
                )

    def _split_volumes(self, name: str) -> list[ProstateVolume]:
        """Volumes of one split ("train", "val", "test" or "all"), read in parallel threads once."""
        if name not in self._volumes:
            hp = self.hparams
            load = functools.partial(
                load_volume,
                image_size=hp.image_size,
                normalization=hp.normalization,
                channels=hp.channels,
                labels=self.label_map,
            )
            with ThreadPoolExecutor(max_workers=max(1, hp.load_threads)) as pool:
                self._volumes[name] = list(pool.map(load, self.case_splits[name]))
        return self._volumes[name]

    def _refuse_volumes_beyond_memory(self, names: Sequence[str]) -> None:
        """Refuse, in one line and before reading any voxel, splits whose volumes at ``image_size`` would not
        fit in memory: float32 images (every channel) and uint8 masks, slice counts read from the headers."""
        cases = list({case.key: case for name in names for case in self.case_splits[name]}.values())
        if not cases:
            return
        hp = self.hparams
        slices = sum(nifti_slices(case.image_path) for case in cases)
        num_bytes = slices * hp.image_size**2 * (4 * hp.channels + 1)
        refuse_unless_memory_fits(
            num_bytes,
            f"image_size={hp.image_size}: the {' and '.join(names)} volumes ({len(cases)} cases, {slices} slices "
            f"at {hp.image_size}x{hp.image_size})",
            "lower data.init_args.image_size",
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self.resumable_loader(
            self.train_set,
            hp.seed,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # page-locked batches: an asynchronous copy to the GPU
        )

    @property
    def train_set(self) -> ProstateSliceDataset:
        """Training slices, built once: their augmentation random stream runs on across epochs."""
        if self._train_set is None:
            hp = self.hparams
            self._train_set = ProstateSliceDataset(
                self._split_volumes("train"),
                num_slices=hp.num_slices,
                foreground_only=hp.foreground_only,
                background_fraction=hp.background_fraction,
                transform=training_augmentation(hp.intensity_augmentation) if hp.augment else None,
                seed=hp.seed,
            )
        return self._train_set

    # ------------------------------------------- teacher-output cache protocol
    def teacher_cache_fingerprint(self) -> dict:
        """What cached teacher outputs depend on: the training samples, size, slices, normalisation."""
        hp, train = self.hparams, self.train_set
        samples = [f"{train.volumes[v].case.key}:{s}" for v, s in train.samples]
        digest = hashlib.sha256("\n".join(samples).encode()).hexdigest()
        return {
            "samples": digest,
            "num_samples": len(samples),
            "image_size": hp.image_size,
            "num_slices": hp.num_slices,
            "normalization": hp.normalization,
        }

    def teacher_cache_inputs(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Un-augmented training inputs (B, in_channels, H, W) of samples ``start:stop`` in sample
        order (unlabelled slices included), for the teachers."""
        train = self.train_set
        samples = train.samples[start:stop]
        for first in range(0, len(samples), batch_size):
            yield torch.stack(
                [
                    volume_stacks(train.volumes[v].image, train.num_slices, s)
                    for v, s in samples[first : first + batch_size]
                ]
            )

    def attach_teacher_outputs(self, logits: torch.Tensor) -> None:
        """Serve ``logits`` (N, K, C, H, W) as ``batch["teacher_logits"]``, augmented with the image."""
        hp = self.hparams
        if hp.augment and hp.intensity_augmentation:
            raise DataError(
                "teacher_cache: intensity augmentation changes what the teachers would predict and "
                "cannot be applied to cached outputs; set data.init_args.intensity_augmentation=false"
            )
        train = self.train_set
        if logits.shape[0] != len(train.samples):
            raise DataError(f"teacher_cache: {logits.shape[0]} cached samples for {len(train.samples)} training slices")
        train.teacher_logits = logits
        if hp.augment:
            train.transform = training_augmentation(intensity=False, cached_logits=True)

    def _volume_loader(self, name: str) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            ProstateVolumeDataset(self._split_volumes(name), self.hparams.num_slices),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._volume_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._volume_loader(self.hparams.predict_split)

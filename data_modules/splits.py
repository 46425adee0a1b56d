"""Case-level splits of prostate cases: train / val / test, the training subsets of limit-trained
teachers and the masks semi-supervised training keeps.

Every split is by case and derived from ``seed`` only, so it is identical on every DDP rank.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from data_modules.layouts import ProstateCase
from distill.errors import DataError
from distill.formats.phases import natural_key
from distill.formats.sites import PROSTATE_SITES, canonical_site, site_order
from distill.utils import read_yaml

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: ``split`` as written in YAML (see :func:`split_cases`).
SplitMethod = Literal["per_site", "leave_one_site_out", "case_list", "datalist"]
SPLIT_METHODS: tuple[str, ...] = get_args(SplitMethod)
#: ``labeled_cases`` as written in YAML: a number of cases, a fraction of them, or a list of "SITE/Case" keys.
LabeledCases = int | float | list[str]


def round_half_up(value: float) -> int:
    """``value`` rounded to the nearest integer, halves up (2.5 -> 3, where ``round`` gives 2)."""
    return int(np.floor(value + 0.5))


def _split_site(
    cases: list[ProstateCase], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[ProstateCase], list[ProstateCase], list[ProstateCase]]:
    """Shuffle one site's cases (seeded by seed and site) into (train, val, test).

    A site with >= 3 cases gets at least one val and one test case (when the fraction is > 0);
    a site with 2 cases gets one test case; train always keeps at least one case.
    """
    n = len(cases)
    n_test = max(round_half_up(test_fraction * n), int(test_fraction > 0 and n >= 2))
    n_val = max(round_half_up(val_fraction * n), int(val_fraction > 0 and n >= 3))
    n_val = max(0, min(n_val, n - 1 - n_test))
    n_test = max(0, min(n_test, n - 1 - n_val))
    site = cases[0].site  # release sites keep their historical seeding; others by a stable hash of the name
    site_index = (
        PROSTATE_SITES.index(site) if site in PROSTATE_SITES else zlib.crc32(site.encode()) + len(PROSTATE_SITES)
    )
    order = np.random.default_rng([seed, site_index]).permutation(n)
    shuffled = [cases[i] for i in order]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


def _by_site(cases: list[ProstateCase]) -> dict[str, list[ProstateCase]]:
    """{site: its cases}, sites and cases in the order of ``cases``."""
    groups: dict[str, list[ProstateCase]] = {}
    for case in cases:
        groups.setdefault(case.site, []).append(case)
    return groups


def sorted_cases(cases: list[ProstateCase]) -> list[ProstateCase]:
    """``cases`` ordered by site (:func:`~distill.formats.sites.site_order`), then case id ("Case2" < "Case10")."""
    return sorted(cases, key=lambda c: (site_order(c.site), natural_key(c.case)))


def _read_case_list(path: str | Path, cases: list[ProstateCase]) -> dict[str, list[ProstateCase]]:
    """Splits from a YAML file ``{train: [SITE/CaseXX, ...], val: [...], test: [...]}``."""
    path = Path(path)
    spec = read_yaml(path, "case list")
    if not spec or set(spec) - set(SPLITS):
        raise DataError(f"{path}: expected a mapping with keys {', '.join(SPLITS)}")
    known = {case.key: case for case in cases}
    splits: dict[str, list[ProstateCase]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = spec.get(split) or []
        if not isinstance(entries, list):
            raise DataError(f"{path}: {split} must be a list of SITE/CaseXX entries")
        splits[split] = []
        for entry in entries:
            site, _, case = str(entry).partition("/")
            key = f"{canonical_site(site)}/{case}"
            if key not in known:
                raise DataError(f"{path}: unknown case {entry!r} in {split} (not among the cases read from data_root)")
            if key in seen:
                where = f"listed twice in {split}" if seen[key] == split else f"in both {seen[key]} and {split}"
                raise DataError(f"{path}: case {entry!r} is {where}")
            seen[key] = split
            splits[split].append(known[key])
    return splits


def split_cases(
    cases: list[ProstateCase],
    split: SplitMethod = "per_site",
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    held_out_site: str | None = None,
    case_list: str | Path | None = None,
    seed: int = 0,
) -> dict[str, list[ProstateCase]]:
    """Case-level train/val/test splits ({"train", "val", "test"} -> cases); no case is in two splits.

    Args:
        split: "per_site" (fractions within every site), "leave_one_site_out" (test = all of
            ``held_out_site``, val = ``val_fraction`` of every other site), "case_list"
            (YAML file ``case_list``) or "datalist" (each case's ``listed_split``: the
            training / validation / test lists of a datalist layout).
    """
    if split == "case_list":
        return {name: sorted_cases(chosen) for name, chosen in _read_case_list(case_list, cases).items()}
    if split == "datalist":
        return {name: sorted_cases([c for c in cases if c.listed_split == name]) for name in SPLITS}
    parts: dict[str, list[ProstateCase]] = {name: [] for name in SPLITS}
    groups = _by_site(cases)
    held_out = canonical_site(held_out_site, "held_out_site", list(groups)) if split == "leave_one_site_out" else None
    if held_out is not None and held_out not in groups:
        raise DataError(f"held_out_site: {held_out} is not among the sites read ({', '.join(groups)})")
    for site, site_cases in groups.items():
        if site == held_out:
            parts["test"] += site_cases
            continue
        site_test_fraction = 0.0 if held_out else test_fraction
        for name, chosen in zip(SPLITS, _split_site(site_cases, val_fraction, site_test_fraction, seed)):
            parts[name] += chosen
    return {name: sorted_cases(chosen) for name, chosen in parts.items()}


def restrict_training_cases(
    train: list[ProstateCase],
    train_sites: Sequence[str] | None,
    train_num_cases: int | None,
    seed: int,
    train_cases: Sequence[str] | None = None,
) -> list[ProstateCase]:
    """Training subset for limit-trained teachers: only ``train_cases`` ("SITE/CaseXX") or
    ``train_sites``, then the first ``train_num_cases`` after a shuffle seeded by ``seed``."""
    if train_cases is not None:
        by_key = {case.key: case for case in train}
        unknown = [key for key in train_cases if key not in by_key]
        if unknown:
            raise DataError(f"train_cases: {', '.join(unknown)} not among the training cases of this split")
        if not train_cases:
            raise DataError("train_cases: empty list (a teacher needs at least one training case)")
        train = [by_key[key] for key in sorted(set(train_cases))]
    if train_sites is not None:
        available = {case.site for case in train}
        keep = {canonical_site(name, "train_sites", sorted(available)) for name in train_sites}
        if keep - available:
            raise DataError(f"train_sites: {', '.join(sorted(keep - available))} has no training cases")
        train = [case for case in train if case.site in keep]
    if train_num_cases is not None:
        if not 1 <= train_num_cases <= len(train):
            raise DataError(f"train_num_cases: {train_num_cases} requested, {len(train)} training cases available")
        chosen = np.random.default_rng(seed).permutation(len(train))[:train_num_cases]
        train = [train[i] for i in sorted(chosen)]
    return train


def keep_labels_of(train: list[ProstateCase], labeled_cases: LabeledCases | None, seed: int) -> list[ProstateCase]:
    """Semi-supervised training: every training case stays, but only the chosen ones keep their mask.

    ``labeled_cases`` N (int) keeps the masks of the first N labelled training cases after the
    shuffle ``np.random.default_rng(seed).permutation`` (the cases ``train_num_cases: N`` keeps,
    so both compare on the same labels); a float f in (0, 1) keeps round(f x count) (half up, at
    least 1); a list keeps those "SITE/Case" keys. The others become unlabelled (``mask_path`` None).
    """
    if labeled_cases is None:
        return train
    labeled = [case for case in train if case.labeled]
    if isinstance(labeled_cases, (list, tuple)):
        by_key = {case.key: case for case in labeled}
        unknown = [str(key) for key in labeled_cases if key not in by_key]
        if unknown:
            raise DataError(f"labeled_cases: {', '.join(unknown)} not among the labelled training cases of this split")
        keep = set(labeled_cases)
    else:
        count = labeled_cases if isinstance(labeled_cases, int) else max(1, round_half_up(labeled_cases * len(labeled)))
        if not 1 <= count <= len(labeled):
            raise DataError(
                f"labeled_cases: {labeled_cases} requested, {len(labeled)} labelled training cases available"
            )
        chosen = np.random.default_rng(seed).permutation(len(labeled))[:count]
        keep = {labeled[i].key for i in chosen}
    return [case if case.key in keep else dataclasses.replace(case, mask_path=None) for case in train]

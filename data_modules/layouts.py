"""Segmentation data in the layouts people have, read into one case record (:class:`ProstateCase`).

``layout`` of :class:`~data_modules.prostate.ProstateDataModule`:

- ``sites`` (default): the MS-Net/SAML release, one folder per site (:func:`discover_cases`)::

      <root>/RUNMC/Case00.nii.gz  Case00_segmentation.nii.gz  ...   (alias folder ISBI)
      <root>/BMC/Case00.nii.gz    Case00_Segmentation.nii.gz  ...   (alias folder ISBI_1.5)
      <root>/I2CVB/  UCL/  BIDMC/  HK/   (other folder names: list them in ``sites:``)

- ``datalist``: a MONAI Decathlon-style ``dataset.json`` (``datalist:``, default
  ``<root>/dataset.json``) with ``training`` / ``validation`` / ``test`` lists of
  ``{"image": ..., "label": ..., "site": ...}``, read with MONAI's
  :func:`monai.data.load_decathlon_datalist` (paths relative to the file's folder). ``image`` is
  one file (3D, or 4D with channels last) or a list of channel files; ``site`` is optional (default:
  the root folder's name); a ``training`` entry without ``label`` is an unlabelled training image.
- ``msd``: the Medical Segmentation Decathlon layout (Task05_Prostate: ``imagesTr/prostate_00.nii.gz``
  4D T2 + ADC, ``labelsTr/prostate_00.nii.gz`` with 0 / 1 PZ / 2 TZ), its ``dataset.json``'s
  ``training`` list through the same MONAI loader; the label-free ``test`` images are not read.
- ``nnunet``: the nnU-Net v2 raw layout, ``dataset.json`` with ``channel_names``, ``labels`` and
  ``file_ending``, ``imagesTr/<case>_0000<ending>`` (``_0001`` for the second channel, ...) and
  ``labelsTr/<case><ending>``.

Every reader returns :class:`ProstateCase` records; a case without a mask (``mask_path`` None) is
an unlabelled training image. ``unlabeled_images:`` folders (:func:`image_folder_cases`) add more.
Site names go through :func:`distill.formats.sites.canonical_site` ("isbi" -> "RUNMC").
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lightning.pytorch.utilities import rank_zero_warn
from monai.data import load_decathlon_datalist

from distill.errors import DataError
from distill.formats.sites import KNOWN_SITES_HINT, PROSTATE_SITES, canonical_site

#: ``layout`` as written in YAML.
Layout = Literal["sites", "datalist", "msd", "nnunet"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: The lists of a Decathlon datalist and the split each one feeds (``split: datalist``).
DATALIST_SPLITS: dict[str, str] = {"training": "train", "validation": "val", "test": "test"}
NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
_CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")
#: The two spellings of the release's mask files (``Case00_segmentation.nii.gz``, ``Case00_Segmentation.nii.gz``).
MASK_SUFFIXES: tuple[str, ...] = ("_segmentation", "_Segmentation")
_CASE_FILE = re.compile(rf"^Case(\d+)({'|'.join(map(re.escape, MASK_SUFFIXES))})?(\.nii(?:\.gz)?)$")


@dataclass(frozen=True)
class ProstateCase:
    """One case on disk.

    Attributes:
        site: site name ("RUNMC", a datalist's ``site``, the dataset folder's name, ...).
        case: case id ("Case05", "prostate_00").
        image_path: the image (all channels when it is 4D), or its first channel file.
        mask_path: the label file; None for an unlabelled training image.
        channel_paths: files of channels 2, 3, ... when every channel is its own file.
        listed_split: the datalist list that holds it ("train", "val", "test"; ``split: datalist``).
        named_channels: the dataset names the channels of its 4D images (MSD's ``modality``: T2 first),
            so reading only the first ``channels`` of them is a choice; otherwise a 4D image must hold
            exactly the channels read.
    """

    site: str
    case: str
    image_path: Path
    mask_path: Path | None
    channel_paths: tuple[Path, ...] = ()
    listed_split: str = "train"
    named_channels: bool = False

    @property
    def key(self) -> str:
        """ "SITE/CaseXX", the name used in case lists."""
        return f"{self.site}/{self.case}"

    @property
    def image_paths(self) -> tuple[Path, ...]:
        return (self.image_path, *self.channel_paths)

    @property
    def labeled(self) -> bool:
        return self.mask_path is not None


def nifti_stem(path: Path) -> str | None:
    """File name without ``.nii.gz`` / ``.nii``; None for other files."""
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending) and len(path.name) > len(ending):
            return path.name[: -len(ending)]
    return None


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object")
    return spec


def _unique_cases(cases: list[ProstateCase], source: Path) -> list[ProstateCase]:
    """``cases``, unless two share a key or an image file (one patient that could land on both sides of a split)."""
    seen: dict[str, ProstateCase] = {}
    files: dict[Path, ProstateCase] = {}
    for case in cases:
        if case.key in seen:
            raise DataError(
                f"{source}: {seen[case.key].image_path} and {case.image_path} are both case {case.key} "
                "(rename one, or give datalist entries a 'case' field)"
            )
        seen[case.key] = case
        for path in case.image_paths:
            other = files.setdefault(path.resolve(), case)
            if other is not case:
                raise DataError(
                    f"{source}: {path} is the image of both case {other.key} and case {case.key}; list each image once"
                )
    return cases


def discover_cases(
    data_root: str | Path, sites: Sequence[str] | None = None, exclude: Sequence[str | Path] = ()
) -> list[ProstateCase]:
    """Find every case of the requested sites (all site folders when ``sites`` is None) of the
    ``sites`` layout. A folder with another name than the release's sites is read when ``sites``
    lists it (by its exact name, case-insensitively); ``exclude`` folders (unlabelled images) are skipped.

    Returns cases ordered by site (as ``sites`` lists them; release order when None) and case number.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(
            f"{root}: prostate data root not found; expected site folders {'/, '.join(PROSTATE_SITES)}/ holding "
            f"CaseXX.nii.gz + CaseXX_segmentation.nii.gz (write a synthetic tree with "
            f"`distill data synth-prostate --out {root}`)"
        )
    listed = {str(name).upper() for name in sites or ()}
    skipped = {(root / folder).resolve() for folder in exclude}
    folders: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.resolve() in skipped:
            continue
        site = canonical_site(folder.name)
        if site not in PROSTATE_SITES:
            if sites is None:
                raise DataError(
                    f"{folder}: unknown site folder; {KNOWN_SITES_HINT}; list the sites to read with `sites:`"
                )
            if folder.name.upper() not in listed:
                continue
        if site in folders:
            raise DataError(f"{folder}: site {site} is also at {folders[site]}; keep one folder per site")
        folders[site] = folder
    wanted = (
        [canonical_site(name, "sites", [s for s in folders if s not in PROSTATE_SITES]) for name in sites]
        if sites is not None
        else [s for s in PROSTATE_SITES if s in folders]
    )
    for site in wanted:
        if site not in folders:
            raise DataError(f"{root / site}: site folder not found (found: {', '.join(folders) or 'none'})")
    if not wanted:
        raise DataError(f"{root}: no site folders; {KNOWN_SITES_HINT}")
    return [case for site in wanted for case in _site_cases(site, folders[site])]


def _site_cases(site: str, folder: Path) -> list[ProstateCase]:
    """Cases of one site folder, ordered by case number; every image needs its mask.

    Files are matched to cases by case number, so two files that claim one case's image or mask
    (``Case01.nii`` and ``Case01.nii.gz``, ``Case1.nii.gz`` and ``Case01.nii.gz``, both mask
    spellings) are refused: they would become two cases of one patient, possibly on both sides of a split.
    A mask without its image is refused; other NIfTI files are left unread, with a warning.
    """
    claimed: dict[tuple[int, bool], Path] = {}
    unread = []
    for path in sorted(folder.iterdir()):
        match = _CASE_FILE.match(path.name)
        if match is None or not path.is_file():
            if nifti_stem(path) is not None and not path.name.startswith("."):
                unread.append(path.name)
            continue
        key = (int(match.group(1)), match.group(2) is not None)
        if key in claimed:
            raise DataError(
                f"{claimed[key]}, {path}: two files claim the {'mask' if key[1] else 'image'} of case "
                f"{site}/Case{match.group(1)}; keep one"
            )
        claimed[key] = path
    images = sorted((number, path) for (number, is_mask), path in claimed.items() if not is_mask)
    orphan = next(
        (path for (number, is_mask), path in sorted(claimed.items()) if is_mask and (number, False) not in claimed),
        None,
    )
    if orphan is not None:
        case = orphan.name.split("_", 1)[0]
        raise DataError(f"{orphan}: mask of case {site}/{case} without its image ({case}.nii.gz not found)")
    if not images:
        raise DataError(f"{folder}: empty site folder (no CaseXX.nii.gz images)")
    if unread:
        rank_zero_warn(
            f"{folder}: {len(unread)} NIfTI file(s) not named CaseXX.nii.gz or CaseXX_segmentation.nii.gz "
            f"left unread ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''})"
        )
    cases = []
    for number, image in images:
        case = image.name.split(".", 1)[0]
        extension = image.name[len(case) :]
        mask = claimed.get((number, True))
        if mask is None:
            masks = [f"{case}{suffix}{extension}" for suffix in MASK_SUFFIXES]
            raise DataError(f"{image}: mask {masks[0]} (or {masks[1]}) not found")
        cases.append(ProstateCase(site, case, image, mask))
    return cases


def datalist_cases(
    path: str | Path, base_dir: str | Path | None = None, default_site: str = "data", keys=tuple(DATALIST_SPLITS)
) -> list[ProstateCase]:
    """Cases of a MONAI Decathlon-style datalist (its ``keys`` lists that are present), in file order.

    Paths go through :func:`monai.data.load_decathlon_datalist` (relative to ``base_dir``, default
    the file's folder); each must exist. The case id is the image file's name without ``.nii.gz``
    (a ``case`` field overrides it); ``site`` defaults to ``default_site``.
    """
    path = Path(path)
    raw = _load_json(path, "datalist")
    present = [key for key in keys if raw.get(key)]
    if not present:
        raise DataError(f"{path}: no {' / '.join(keys)} list of {{image, label}} entries")
    cases = []
    for key in present:
        if not isinstance(raw[key], list) or not all(isinstance(e, (dict, str)) for e in raw[key]):
            raise DataError(f"{path}: {key} must be a list of {{image, label}} entries")
        if any(isinstance(e, dict) and "image" not in e for e in raw[key]):
            index = next(i for i, e in enumerate(raw[key]) if isinstance(e, dict) and "image" not in e)
            raise DataError(f"{path}: {key} entry {index} has no 'image'")
        try:
            entries = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: {key}: {' '.join(str(err).split())}") from None
        for index, (entry, original) in enumerate(zip(entries, raw[key])):
            where = f"{path}: {key} entry {index}"
            images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            files = [Path(image) for image in images]
            label = entry.get("label")
            if isinstance(label, list):
                raise DataError(f"{where}: 'label' must be one file, got a list")
            for file in [*files, *([Path(label)] if label is not None else [])]:
                if not file.is_file():
                    raise DataError(f"{where}: {file} not found")
            if label is None and key != "training":
                raise DataError(
                    f"{where}: {files[0]} has no 'label' (only training images may be unlabelled; "
                    "for the Decathlon's label-free test list use layout: msd)"
                )
            # site/case from the file as written: MONAI turns values naming an existing path into paths
            fields = original if isinstance(original, dict) else {}
            case_id = str(fields.get("case") or nifti_stem(files[0]) or files[0].stem)
            site = canonical_site(str(fields.get("site") or default_site))
            label_path = Path(label) if label is not None else None
            cases.append(ProstateCase(site, case_id, files[0], label_path, tuple(files[1:]), DATALIST_SPLITS[key]))
    return _unique_cases(cases, path)


def msd_cases(root: str | Path) -> list[ProstateCase]:
    """The labelled ``training`` cases of a Medical Segmentation Decathlon task folder (site: its name)."""
    root = Path(root)
    cases = datalist_cases(root / "dataset.json", root, default_site=root.name, keys=("training",))
    return [dataclasses.replace(case, named_channels=True) for case in cases]


def _nnunet_settings(root: Path, channels: int) -> tuple[str, dict]:
    path = root / "dataset.json"
    spec = _load_json(path, "nnU-Net dataset.json")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in spec]
    if missing:
        raise DataError(f"{path}: nnU-Net dataset.json lacks {', '.join(missing)}")
    ending = spec["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{path}: file_ending {ending!r} is not read here (NIfTI only: {', '.join(NIFTI_ENDINGS)})")
    names = spec["channel_names"]
    if not isinstance(names, dict) or len(names) < channels:
        raise DataError(f"{path}: channel_names lists {len(names)} channel(s), data.init_args.channels={channels}")
    return ending, names


def nnunet_cases(root: str | Path, channels: int = 1) -> list[ProstateCase]:
    """Cases of an nnU-Net v2 raw dataset folder: one per ``labelsTr`` file, with its ``channels``
    image files ``imagesTr/<case>_0000`` ... (site: the folder's name)."""
    root = Path(root)
    ending, names = _nnunet_settings(root, channels)
    labels = sorted((root / "labelsTr").glob(f"*{ending}")) if (root / "labelsTr").is_dir() else []
    if not labels:
        raise DataError(f"{root / 'labelsTr'}: no label files (<case>{ending})")
    cases = []
    for label in labels:
        case_id = label.name[: -len(ending)]
        files = [root / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(channels)]
        for c, file in enumerate(files):
            if not file.is_file():
                raise DataError(f"{file}: channel {c} ({names.get(str(c), '?')}) of case {case_id} not found")
        cases.append(ProstateCase(canonical_site(root.name), case_id, files[0], label, tuple(files[1:])))
    labelled = {case.case for case in cases}
    for image in sorted((root / "imagesTr").glob(f"*{ending}")):
        match = _CHANNEL_FILE.match(image.name[: -len(ending)])
        if match is None or match.group(1) not in labelled:
            raise DataError(
                f"{image}: no label file labelsTr/{match.group(1) if match else image.name[: -len(ending)]}{ending} "
                "(every imagesTr case needs one; unlabelled images go in a folder of unlabeled_images)"
            )
    return cases


def image_folder_cases(folder: str | Path, layout: str, channels: int = 1) -> list[ProstateCase]:
    """Unlabelled images of one folder (``unlabeled_images:``), site = the folder's name.

    With the ``nnunet`` layout, files ``<case>_0000`` ... ``<case>_<channels - 1>`` make one case;
    otherwise every NIfTI file is one case (all its channels when it is 4D).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: unlabelled image folder not found")
    stems = {stem: path for path in sorted(folder.iterdir()) if (stem := nifti_stem(path)) and path.is_file()}
    cases = []
    if layout == "nnunet":
        groups: dict[str, dict[int, Path]] = {}
        for stem, path in stems.items():
            match = _CHANNEL_FILE.match(stem)
            if match is None:
                raise DataError(f"{path}: not an nnU-Net image name <case>_0000")
            groups.setdefault(match.group(1), {})[int(match.group(2))] = path
        for case_id, files in sorted(groups.items()):
            ending = files[min(files)].name[len(case_id) + 5 :]
            for c in range(channels):
                if c not in files:
                    raise DataError(f"{folder / f'{case_id}_{c:04d}{ending}'}: channel {c} of case {case_id} not found")
            cases.append(
                ProstateCase(folder.name, case_id, files[0], None, tuple(files[c] for c in range(1, channels)))
            )
    else:
        cases = [
            ProstateCase(folder.name, stem, path, None, named_channels=layout == "msd") for stem, path in stems.items()
        ]
    if not cases:
        raise DataError(f"{folder}: no NIfTI images in the unlabelled image folder")
    return _unique_cases(cases, folder)

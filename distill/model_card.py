"""The model card ``distill export`` writes beside every exported model: ``<out>.card.json`` and
``<out>.card.md``.

Every field is read from the run's own files, never typed by hand: the checkpoint (architecture,
hyper-parameters, distillation settings, the teachers' files and SHA-256, the validation score its
``ModelCheckpoint`` chose it on), the run's ``result.json`` next to it (``distill table``; else the
``test/`` values of its ``metrics.csv``, ``distill test``) for test scores per site and overall,
each teacher's own checkpoint and results, the data split (:class:`RunData`, the caller reads it
with the run's DataModule) and the export's measurements (size, FLOPs, CPU latency, INT8 check).
A run without test results gets a card that says so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DataError
from distill.formats.sites import PROSTATE_SITES
from distill.modules.checkpoints import file_sha256, load_state, resolve_checkpoint
from distill.utils import read_json, write_text_atomic

#: Hyper-parameters of a distillation student copied into the card (those it has).
DISTILLATION_KEYS = (
    "loss_weights",
    "temperature",
    "logit_loss",
    "feature_loss",
    "feature_pairs",
    "teacher_weighting",
    "teacher_cache",
)
#: Where a run's result.json may lie above its checkpoint (``<run>/lightning_logs/version_N/checkpoints/``).
RESULT_SEARCH_DEPTH = 4


@dataclass(frozen=True)
class RunData:
    """A run's data as its DataModule split it (``distill export`` reads it through ``data_modules``).

    Attributes:
        description: ``root``, ``layout``, ``split``, ``sites``, ``cases`` (split -> count),
            ``cases_per_site`` (site -> split -> count), ``labelled_training_cases``.
        train_images: () -> iterator of raw (S, H0, W0) float32 training volumes (slices first).
        test_cases: () -> iterator of ``(site, case, image (S, H0, W0) float32, label (S, H0, W0) uint8
            class indices, spacing (3,) mm)`` of the labelled test cases.
    """

    description: dict
    train_images: Callable[[], Iterator]
    test_cases: Callable[[], Iterator[tuple]]


def run_test_results(checkpoint: Path) -> tuple[dict[str, float], str] | None:
    """The ``test/`` metrics of the run that wrote ``checkpoint`` and the file they come from: its
    ``result.json`` (a table run, whose ``best_checkpoint`` is this file) or, else, the last ``test/``
    row of the ``metrics.csv`` in its log folder; None without either."""
    for folder in list(checkpoint.resolve().parents)[:RESULT_SEARCH_DEPTH]:
        result = folder / "result.json"
        if result.is_file():
            data = read_json(result, "run result")
            if Path(str(data.get("best_checkpoint", ""))).resolve() == checkpoint.resolve():
                return {k: float(v) for k, v in data.get("metrics", {}).items() if k.startswith("test/")}, str(result)
    metrics_file = checkpoint.resolve().parent.parent / "metrics.csv"
    if metrics_file.is_file():
        with open(metrics_file, newline="") as stream:
            rows = [row for row in csv.DictReader(stream) if row.get("test/dice") or row.get("test/acc")]
        if rows:
            return {k: float(v) for k, v in rows[-1].items() if k.startswith("test/") and v not in ("", None)}, str(
                metrics_file
            )
    return None


def validation_score(payload: dict) -> dict | None:
    """``{"monitor", "score"}``: what the checkpoint's ``ModelCheckpoint`` chose it on, if recorded."""
    for state in (payload.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            return {"monitor": state["monitor"], "score": float(state["best_model_score"])}
    return None


def site_results(metrics: dict[str, float]) -> dict:
    """Overall and per-site test Dice / HD95 / ECE with the worst site (lowest Dice) and the spread."""
    names = ("dice", "hd95", "ece")
    overall = {name: metrics.get(f"test/{name}") for name in names}
    sites = sorted({k.split("/")[2] for k in metrics if k.count("/") == 2 and k.startswith("test/dice/")})
    per_site = {site: {name: metrics.get(f"test/{name}/{site}") for name in names} for site in sites}
    summary = {"overall": overall, "per_site": per_site}
    dice = {site: values["dice"] for site, values in per_site.items() if values["dice"] is not None}
    if dice:
        worst = min(dice, key=dice.get)
        mean = sum(dice.values()) / len(dice)
        spread = math.sqrt(sum((v - mean) ** 2 for v in dice.values()) / (len(dice) - 1)) if len(dice) > 1 else None
        summary |= {"worst_site": {"site": worst, "dice": dice[worst]}, "site_dice_sd": spread}
    return summary


def teacher_entries(payload: dict) -> list[dict]:
    """The teachers a student's checkpoint ``payload`` learned from: checkpoint, SHA-256 (the files and
    hashes it records, else those its settings name, hashed now), the validation score each teacher's
    checkpoint was chosen on and its run's test results; [] for a non-student."""
    from distill.modules.teacher_records import TEACHER_RECORDS, TeacherSources

    hyper_parameters = payload.get("hyper_parameters") or {}
    if TEACHER_RECORDS in payload:
        recorded = [(record["checkpoint"], record["sha256"]) for record in payload[TEACHER_RECORDS]]
    else:
        source = hyper_parameters.get("teacher_checkpoint") or hyper_parameters.get("teachers")
        if not source:
            return []
        sha = hyper_parameters.get("teacher_sha256")
        teachers = TeacherSources(source, [sha] if isinstance(sha, str) else sha)
        recorded = list(zip(teachers.checkpoints, teachers.expected_sha256))
    entries = []
    for path, expected in recorded:
        entry: dict = {"checkpoint": str(path), "sha256": expected}
        try:
            resolved = resolve_checkpoint(path)
        except DataError as err:
            entries.append(entry | {"note": f"not readable now: {err}"})
            continue
        payload = load_state(resolved)
        entry["sha256"] = expected or file_sha256(resolved)
        entry["network"] = (payload.get("hyper_parameters") or {}).get("network")
        entry["validation"] = validation_score(payload)
        found = run_test_results(resolved)
        entry["test"] = site_results(found[0])["overall"] if found else None
        entries.append(entry)
    return entries


def build_card(
    checkpoint: Path,
    payload: dict,
    export: dict,
    data: RunData | None,
    data_problem: str | None = None,
) -> dict:
    """The card as a JSON-ready dict (see the module docstring); ``export``: what the export measured
    (``file``, ``format``, ``parameters``, ``gflops``, ``input_shape``, ``latency_ms``, ``int8``...)."""
    hp = dict(payload.get("hyper_parameters") or {})
    data_hp = {k: v for k, v in (payload.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    found = run_test_results(checkpoint)
    teachers = teacher_entries(payload)
    card = {
        "model": {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
            "module": str(hp.get("_class_path", "?")).rsplit(".", 1)[-1],
            "network": hp.get("network") or hp.get("backbone"),
            "network_kwargs": hp.get("network_kwargs"),
            **export,
        },
        "training_data": (
            data.description
            if data
            else {"root": data_hp.get("data_root"), "layout": data_hp.get("layout"), "split": data_hp.get("split")}
        )
        | {"data_seed": data_hp.get("seed"), "labeled_cases_setting": data_hp.get("labeled_cases")},
        "validation": validation_score(payload),
        "teachers": teachers,
        "distillation": {k: hp[k] for k in DISTILLATION_KEYS if k in hp} if teachers else None,
        "test": (site_results(found[0]) | {"source": found[1]}) if found else None,
    }
    if data_problem:
        card["training_data"]["note"] = data_problem
    card["intended_use"], card["limits"] = intended_use(card, hp)
    return card


def intended_use(card: dict, hp: dict) -> tuple[str, list[str]]:
    """A sentence of intended use and the limits, from what the card records."""
    described = card["training_data"]
    sites = described.get("sites") or []
    classes = hp.get("class_names") or (["whole gland"] if hp.get("num_classes", 2) == 2 else None)
    if "num_slices" in card["model"].get("preprocessing", {}):
        train = (described.get("cases") or {}).get("train", "?")
        use = (
            f"Segmentation of {', '.join(classes or ['?'])} on axial T2-weighted prostate MRI, "
            f"{card['model']['preprocessing']['num_slices']} adjacent slices per input at "
            f"{card['model']['preprocessing']['image_size']} px; trained on {train} cases from {len(sites)} site(s) "
            f"({', '.join(sites) or '?'}). Research use; not a medical device."
        )
    else:
        use = "Surgical phase recognition from endoscopic video frames. Research use; not a medical device."
    limits = []
    unseen = [site for site in PROSTATE_SITES if sites and site not in sites]
    if unseen:
        limits.append(f"not validated on sites it never saw: {', '.join(unseen)}, nor on other scanners or protocols")
    if card["test"] is None:
        limits.append("no test results were found for this checkpoint: its accuracy on held-out cases is unknown")
    elif card["test"].get("worst_site"):
        worst = card["test"]["worst_site"]
        limits.append(f"lowest test Dice at site {worst['site']} ({worst['dice']:.3f}): check it on local data first")
    if card["model"].get("int8"):
        limits.append("INT8 model: its test Dice was re-measured through onnxruntime (see int8)")
    return use, limits


def format_card(card: dict) -> str:
    """The card as Markdown."""
    model, data, test = card["model"], card["training_data"], card["test"]

    def value(x) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = [
        f"# Model card: {Path(model['file']).name}",
        "",
        f"**Intended use.** {card['intended_use']}",
        "",
        "**Limits.**",
        *[f"- {limit}" for limit in card["limits"] or ["none recorded"]],
        "",
        "## Model",
        f"- file: {model['file']} ({model['format']}, {model['size_bytes'] / 1e6:.2f} MB, sha256 {model['sha256']})",
        f"- from checkpoint: {model['checkpoint']} (sha256 {model['checkpoint_sha256']})",
        f"- architecture: {model['module']} / {model['network']} {json.dumps(model.get('network_kwargs') or {})}",
        f"- parameters: {model['parameters']:,}; {model['gflops']:.3f} GFLOP per input {tuple(model['input_shape'])}",
        f"- preprocessing: {json.dumps(model['preprocessing'])}",
        *[
            f"- CPU latency ({name}): {ms:.2f} ms per input (median; {model['threads']})"
            for name, ms in model["latency_ms"].items()
        ],
    ]
    if model.get("int8"):
        q = model["int8"]
        lines.append(
            f"- INT8 (static QDQ, per-channel weights, {q['calibration_slices']} training slices): test Dice "
            f"{q['dice_int8']:.4f} vs fp32 {q['dice_fp32']:.4f} on {q['test_cases']} cases (drop {q['dice_drop']:+.4f}, "
            f"allowed {q['max_dice_drop']:g}); ECE {q['ece_int8']:.4f} vs {q['ece_fp32']:.4f}"
        )
    lines += ["", "## Training data", *[f"- {k}: {json.dumps(v)}" for k, v in data.items()]]
    lines += ["", "## Validation"]
    validation = card["validation"]
    lines.append(f"- chosen on {validation['monitor']} = {validation['score']:.4f}" if validation else "- not recorded")
    lines += ["", "## Teachers"]
    if not card["teachers"]:
        lines.append("- none (trained without distillation)")
    for teacher in card["teachers"]:
        scores = teacher.get("test") or {}
        validated = teacher.get("validation") or {}
        lines.append(
            f"- {teacher['checkpoint']} ({teacher.get('network')}), sha256 {teacher['sha256']}; validation "
            f"{validated.get('monitor', '-')} {value(validated.get('score'))}; test Dice {value(scores.get('dice'))}, "
            f"HD95 {value(scores.get('hd95'))}, ECE {value(scores.get('ece'))}"
            + (f"; {teacher['note']}" if "note" in teacher else "")
        )
    if card["distillation"]:
        lines += ["", "## Distillation", *[f"- {k}: {json.dumps(v)}" for k, v in card["distillation"].items()]]
    lines += ["", "## Test results"]
    if test is None:
        lines.append("- no test results: this run was not tested (run `distill test` or a table), so none are shown")
    else:
        lines += [f"- source: {test['source']}", "", "| site | Dice | HD95 mm | ECE |", "|---|---|---|---|"]
        for site, values in {**test["per_site"], "overall": test["overall"]}.items():
            lines.append(f"| {site} | {value(values['dice'])} | {value(values['hd95'])} | {value(values['ece'])} |")
        if test.get("worst_site"):
            lines += [
                "",
                f"- worst site: {test['worst_site']['site']} (Dice {test['worst_site']['dice']:.4f}); "
                f"SD of Dice across sites: {value(test.get('site_dice_sd'))}",
            ]
    return "\n".join(lines) + "\n"


def write_card(model_path: Path, card: dict) -> tuple[Path, Path]:
    """``<model>.card.json`` and ``<model>.card.md`` beside the model (atomic writes)."""
    json_path = model_path.with_name(model_path.name + ".card.json")
    md_path = model_path.with_name(model_path.name + ".card.md")
    write_text_atomic(json_path, json.dumps(card, indent=2) + "\n")
    write_text_atomic(md_path, format_card(card))
    return json_path, md_path

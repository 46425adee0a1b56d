"""Deploying a student: calibration (ECE) against hand-computed values, the worst site and spread of a
hand-made results file, the model card of an exported demo student filled from its run's files, the
INT8 export's Dice check (kept within the bound, refused past it) and the protocol of phase results."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.classification import binary_calibration_error

from distill import report
from distill.cli import main
from distill.metrics.calibration import ece_of_bins, reliability_bins
from distill.metrics.phase import evaluate_phases
from distill.metrics.segmentation import PerGroupVolumeMetrics
from distill.modules import SegmentationModule
from distill.modules.checkpoints import file_sha256
from distill.runs import RunResult
from distill.tables import run_table

onnxruntime = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ calibration
def test_ece_of_a_small_case_equals_the_hand_computed_value_and_torchmetrics():
    probability = torch.tensor([0.0, 1.0, 0.5, 0.95, 0.5])
    label = torch.tensor([0, 1, 1, 0, 0])
    # 15 bins: 0.0 -> bin 0 (rate 0, |0 - 0|), 1.0 -> its own slot (|1 - 1|), 0.5 twice -> bin 7
    # (rate 1/2, mean 0.5: 0), 0.95 -> bin 14 (rate 0, |0 - 0.95|): ECE = 0.95 / 5
    assert ece_of_bins(reliability_bins(probability, label)) == pytest.approx(0.19)
    generator = torch.Generator().manual_seed(0)
    probability = torch.rand(4000, generator=generator) ** 2
    label = (torch.rand(4000, generator=generator) < probability * 0.7).long()
    halves = reliability_bins(probability[:1500], label[:1500]) + reliability_bins(probability[1500:], label[1500:])
    reference = float(binary_calibration_error(probability.double(), label, n_bins=15, norm="l1"))
    assert ece_of_bins(halves) == pytest.approx(reference, abs=1e-9) and reference > 0.05


class ConstantLogits(nn.Module):
    """(B, C, H, W) -> logits giving foreground probability ``p`` everywhere."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.logit = math.log(p / (1 - p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(x.shape[0], 1, *x.shape[2:])
        return torch.cat([zeros, zeros + self.logit], dim=1)


def test_a_segmentation_test_run_logs_the_per_volume_ece_per_site():
    module = SegmentationModule(network="slim_unet", network_kwargs={"width": 4}, eval_batch_size=2)
    module.net = ConstantLogits(0.25)
    metric = PerGroupVolumeMetrics(["RUNMC", "BMC"])
    fractions = {"a": ("RUNMC", 0.5), "b": ("RUNMC", 0.0), "c": ("BMC", 0.25)}
    for name, (site, fraction) in fractions.items():
        label = torch.zeros(5, 8, 8, dtype=torch.long)
        label.view(-1)[: int(fraction * label.numel())] = 1
        volume = {"image": torch.randn(5, 3, 4, 4), "label": label, "spacing": torch.ones(3), "site": site}
        outputs = module.evaluation_outputs(volume | {"image_path": name})
        metric.update(*outputs)
    # p = 0.25 everywhere: one bin, ECE = |foreground fraction - 0.25| per volume, then averaged
    results = {k: float(v) for k, v in metric.compute().items()}
    assert results["ece/RUNMC"] == pytest.approx((0.25 + 0.25) / 2, abs=1e-6)
    assert results["ece/BMC"] == pytest.approx(0.0, abs=1e-6)
    assert results["ece"] == pytest.approx(0.5 / 3, abs=1e-6)
    count, probability, foreground = metric.reliability()
    assert count.sum() == 3 * 5 * 64 and probability.sum() == pytest.approx(0.25 * 3 * 320)
    assert foreground.sum() == (0.5 + 0.25) * 320


def test_frame_classifiers_log_multiclass_ece():
    from distill.modules import PhaseClassifierModule

    module = PhaseClassifierModule(backbone="resnet18", num_classes=3)
    probabilities = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]])
    module.test_metrics.update(probabilities, torch.tensor([0, 1]))
    # top-1 confidence 0.9 correct (bin 13: |1 - 0.9|), 0.6 wrong (bin 9: |0 - 0.6|): (0.1 + 0.6) / 2
    assert float(module.test_metrics.compute()["ece"]) == pytest.approx(0.35)


# ------------------------------------------------------------------ worst site and spread
def site_run(name: str, seed: int, dice: dict[str, float]) -> RunResult:
    metrics = {"test/dice": sum(dice.values()) / len(dice), **{f"test/dice/{s}": v for s, v in dice.items()}}
    return RunResult(name, seed, metrics, "val/dice", 0.5, 1000, 1.0, "best.ckpt", "log")


def test_worst_site_and_spread_follow_a_hand_made_results_file():
    results = [
        site_run("student", 0, {"RUNMC": 0.8, "BMC": 0.6, "HK": 0.7}),
        site_run("student", 1, {"RUNMC": 0.9, "BMC": 0.7, "HK": 0.5}),
    ]
    columns = [{"metric": "test/dice", "label": "Dice", "groups": True}]
    table = report.format_table("t", columns, [], results)
    assert "| model | params | Dice BMC | Dice HK | Dice RUNMC | Dice mean | Dice worst site | Dice site SD |" in table
    # worst per seed: BMC 0.6, HK 0.5 -> 0.55 ± 0.0707; SD across sites per seed: 0.1 and 0.2 -> 0.15 ± 0.0707
    assert "| 0.550 ± 0.071 (BMC 1, HK 1) | 0.150 ± 0.071 |" in table
    rows = list(csv.DictReader(io.StringIO(report.results_csv(results, [], columns))))
    assert [(r["test/dice_worst_site"], float(r["test/dice_worst"])) for r in rows] == [("BMC", 0.6), ("HK", 0.5)]
    assert [float(r["test/dice_site_sd"]) for r in rows] == pytest.approx([0.1, 0.2])
    summaries = [r["site_summary"]["test/dice"] for r in json.loads(report.results_json(results, [], columns))]
    assert summaries[1] == {"worst_site": "HK", "worst": 0.5, "site_sd": pytest.approx(0.2)}


# ------------------------------------------------------------------ the demo table, its card and INT8
@pytest.fixture(scope="module")
def demo_table(synthetic_prostate_root, tmp_path_factory) -> Path:
    """The prostate demo spec at test scale (32 px, width-4 networks, 12 epochs of batches of 4, one seed)."""
    out = tmp_path_factory.mktemp("demo27")
    run_table(
        REPO / "experiments/prostate/tables/demo.yaml",
        out,
        [
            f"--data.init_args.data_root={synthetic_prostate_root}",
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            "--data.init_args.load_threads=1",
            "--model.init_args.network_kwargs.width=4",
            "--data.init_args.batch_size=4",
            "--trainer.max_epochs=12",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        seeds=1,
        verbose=False,
    )
    return out


def test_the_demo_table_shows_ece_worst_site_and_the_student_minus_teacher_ece(demo_table):
    table = (demo_table / "results.md").read_text()
    assert "| Dice worst site | Dice site SD | HD95 mm | ECE |" in table
    assert "- student + KD vs teacher (U-Net): ECE " in table and "- student (no KD) vs teacher (U-Net): ECE " in table
    assert (demo_table / "calibration.png").stat().st_size > 0
    record = json.loads((demo_table / "results.json").read_text())
    assert all(0 <= r["metrics"]["test/ece"] < 1 and r["site_summary"]["test/dice"]["worst_site"] for r in record)


def student_checkpoint(demo_table: Path) -> Path:
    return Path(json.loads((demo_table / "student_kd" / "seed_0" / "result.json").read_text())["best_checkpoint"])


def test_an_exported_demo_student_gets_a_card_filled_from_its_run(demo_table, tmp_path, capsys):
    checkpoint = student_checkpoint(demo_table)
    out = tmp_path / "student.onnx"
    main(["export", str(checkpoint), "--out", str(out), "--quantize", "int8", "--calibration-slices", "16"])
    printed = capsys.readouterr().out
    assert f"model card {out}.card.md" in printed and "int8: test Dice" in printed
    card = json.loads(Path(f"{out}.card.json").read_text())
    result = json.loads((demo_table / "student_kd" / "seed_0" / "result.json").read_text())
    teacher_result = json.loads((demo_table / "teacher_u_net" / "seed_0" / "result.json").read_text())
    assert card["model"]["parameters"] == result["parameters"] and card["model"]["gflops"] > 0
    assert card["model"]["sha256"] == file_sha256(out) and set(card["model"]["latency_ms"]) == {"fp32", "int8"}
    assert card["test"]["overall"]["dice"] == result["metrics"]["test/dice"]
    sites = {k.split("/")[2]: v for k, v in result["metrics"].items() if k.startswith("test/dice/")}
    assert {s: v["dice"] for s, v in card["test"]["per_site"].items()} == sites
    assert card["test"]["worst_site"] == {"site": min(sites, key=sites.get), "dice": min(sites.values())}
    assert card["test"]["overall"]["ece"] == result["metrics"]["test/ece"]
    [teacher] = card["teachers"]
    assert teacher["sha256"] == file_sha256(teacher_result["best_checkpoint"])
    assert teacher["test"]["dice"] == teacher_result["metrics"]["test/dice"]
    assert teacher["validation"]["score"] == pytest.approx(teacher_result["val_score"])
    assert card["distillation"]["temperature"] == 1.0 and "kd" in card["distillation"]["loss_weights"]
    data = card["training_data"]
    assert data["sites"] == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"] and sum(data["cases"].values()) == 14
    assert data["labelled_training_cases"] == data["cases"]["train"]
    assert card["validation"]["score"] == pytest.approx(result["val_score"])
    assert f"trained on {data['cases']['train']} cases from 6 site(s)" in card["intended_use"]
    markdown = Path(f"{out}.card.md").read_text()
    assert "## Test results" in markdown and f"| {min(sites, key=sites.get)} |" in markdown
    # the INT8 model runs unchanged through the torch-free NIfTI entry point
    assert card["model"]["int8"]["dice_drop"] <= 0.01 and card["model"]["int8"]["dice_fp32"] > 0.3


def test_a_run_without_test_results_gets_a_card_that_says_so(demo_table, tmp_path):
    checkpoint = tmp_path / "copy" / "best.ckpt"
    checkpoint.parent.mkdir()
    shutil.copy(student_checkpoint(demo_table), checkpoint)
    main(["export", str(checkpoint), "--out", str(tmp_path / "s.onnx")])
    card = json.loads((tmp_path / "s.onnx.card.json").read_text())
    assert card["test"] is None and "no test results were found" in " ".join(card["limits"])
    assert "- no test results" in (tmp_path / "s.onnx.card.md").read_text()


def test_int8_export_is_refused_when_quantisation_costs_dice(demo_table, tmp_path):
    """One early channel made huge (batch-norm shift) and ignored by the next convolution: the fp32 outputs
    are unchanged, but INT8 activations of that tensor share one scale and lose every other channel."""
    checkpoint = tmp_path / "forced.ckpt"
    payload = torch.load(student_checkpoint(demo_table), weights_only=True)
    state = payload["state_dict"]
    state["net.conv_0.conv_0.adn.N.bias"][0] = 1e4
    state["net.conv_0.conv_1.conv.weight"][:, 0] = 0.0
    torch.save(payload, checkpoint)
    out = tmp_path / "forced.onnx"
    with pytest.raises(SystemExit, match=r"the INT8 model's test Dice is .* > --max-dice-drop 0.01; nothing written"):
        main(["export", str(checkpoint), "--out", str(out), "--quantize", "int8", "--calibration-slices", "16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forced.ckpt"]


# ------------------------------------------------------------------ surgical protocol
def test_phase_results_state_their_protocol_and_per_video_spread():
    gt = np.repeat([0, 1, 2], 20)
    videos = {"video41": (gt, gt), "video42": (gt, np.roll(gt, 10))}
    result = evaluate_phases(videos, 5.0, tolerance_s=1.0)
    text = result.format()
    assert "relaxed boundary 1 s = 5 frames at 5 fps" in text
    accuracy = result.accuracy_per_video
    expected = f"Accuracy   {accuracy.mean():6.2f} +- {accuracy.std(ddof=1):5.2f}"
    assert "Per video, mean +- SD over the 2 videos" in text and expected in text
    assert result.to_dict()["tolerance_frames"] == [5]


def test_a_tcn_test_run_writes_its_protocol_beside_its_predictions(synthetic_cholec80, tmp_path):
    import lightning as L

    from data_modules.surgical import PhaseFeatureDataModule
    from distill.formats.features import save_video_features
    from distill.formats.phases import read_phase_file
    from distill.modules.phase import TCNPhaseModule

    features = tmp_path / "features"
    for path in sorted((synthetic_cholec80.root / "phase_annotations").glob("video*-phase.txt")):
        frames, _ = read_phase_file(path)
        frames = frames[::5]  # 5 fps
        save_video_features(features, path.name.removesuffix("-phase.txt"), np.random.rand(len(frames), 8), frames)
    data = PhaseFeatureDataModule(features, synthetic_cholec80.root, num_workers=0)
    model = TCNPhaseModule(num_layers=2, channels=4, tolerance_s=1.0, causal=False)
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "max_epochs": 1}
    run = L.Trainer(default_root_dir=tmp_path, num_sanity_val_steps=0, enable_model_summary=False, **options)
    run.fit(model, datamodule=data)
    metrics = run.test(model, datamodule=data, verbose=False)[0]
    folder = tmp_path / "phase_predictions" / "test"
    protocol = json.loads((folder / "protocol.json").read_text())
    assert protocol["temporal_model"] == "offline (sees future frames) single-stage TCN, 2 layers"
    assert protocol["prediction_fps"] == [5.0] and protocol["tolerance_frames"] == [5]
    assert protocol["test_videos"] == data.splits["test"] and protocol["split"]["train"] == data.splits["train"]
    accuracy = protocol["results"]["per_video_mean_std"]["accuracy"]
    assert metrics["test/accuracy_video_sd"] == pytest.approx(accuracy["std"], rel=1e-5)
    text = (folder / "evaluation.md").read_text()
    assert "- relaxed boundary: 1 s = 5 frames" in text and f"- tested on: {', '.join(data.splits['test'])}" in text

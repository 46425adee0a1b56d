"""The chained surgical table end to end at toy scale: pre-training (teacher, MoCo, MoCo +
distillation) -> phase fine-tuning with feature export -> TCN -> relaxed metrics, rows and ribbons.

The spec is the demo spec's pre-training runs and 25 % rows, with toy overrides (32 px, a 16-key
queue, 2 training batches, 1-2 epochs) on the session's 6 synthetic videos of 3-4 s."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from data_modules.surgical_layout import split_videos
from distill.formats.phases import read_phase_file
from distill.runs import slug
from distill.table_spec import load_table_spec
from distill.tables import run_table

REPO = Path(__file__).resolve().parents[1]
IMAGE_OVERRIDES = [
    "--data.init_args.image_size=32",
    "--data.init_args.resize_size=36",
    "--data.init_args.batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
]
MOCO_OVERRIDES = [
    "--model.init_args.queue_size=16",
    "--model.init_args.proj_hidden_dim=32",
    "--model.init_args.proj_dim=16",
]
COMMON_OVERRIDES = [
    "--data.init_args.num_workers=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def toy_spec(tmp_path: Path) -> Path:
    """The demo spec reduced to its pre-training runs and the 25 % rows, with toy-scale overrides per run."""
    spec = asdict(load_table_spec(REPO / "experiments/surgical/tables/demo.yaml"))  # grid expanded, paths absolute
    runs = [run for run in spec["runs"] if run["name"].startswith("pre-training") or "25%" in run["name"]]
    for run in runs:
        config = Path(run["config"]).name
        extra = ["--trainer.max_epochs=2"] if config == "tcn.yaml" else IMAGE_OVERRIDES
        moco = MOCO_OVERRIDES if config.startswith("moco") else []
        run["overrides"] = [*run.get("overrides", []), *extra, *moco, *COMMON_OVERRIDES]
    spec.update(runs=runs, seeds=1, compare=[c for c in spec["compare"] if "25%" in c["baseline"]])
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_surgical_table_chains_pretraining_finetuning_and_tcn(synthetic_cholec80, tmp_path, monkeypatch):
    data = synthetic_cholec80.base
    monkeypatch.setenv("SURGICAL_DEMO", str(data))
    out = tmp_path / "table"

    results = run_table(toy_spec(tmp_path), out)

    pretraining = [
        "pre-training: teacher (frozen ImageNet backbone, surgical MoCo head)",
        "pre-training: MoCo v2",
        "pre-training: MoCo v2 + distillation",
    ]
    rows = ["ImageNet-supervised 25%", "MoCo v2 25%", "MoCo v2 + distillation 25%"]
    assert [r.name for r in results] == pretraining + rows  # 'show: false' keeps the fine-tuning runs out
    assert all(0 <= r.metrics["test/probe_acc"] <= 1 for r in results[:3])
    # the teacher keeps its last epoch (its frozen backbone leaves the probe blind to the head); students: the probe
    assert [r.monitor for r in results[:3]] == ["epoch", "val/probe_acc", "val/probe_acc"]
    results = results[3:]
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    for label in ("Accuracy", "Precision", "Recall", "Jaccard", "frame acc (classifier)", "probe acc (pre-training)"):
        assert f"| {label} |" in header
    assert "relaxed phase metrics" in table and "3D metrics" not in table  # the spec's notes, not prostate's
    assert "MoCo v2 + distillation 25% vs MoCo v2 25%: Accuracy" in table
    assert "MoCo v2 + distillation 25% vs MoCo v2 25%: frame acc (classifier)" in table  # compare entry's own metric
    for result in results:
        assert {"test/accuracy", "test/precision", "test/recall", "test/jaccard"} <= set(result.metrics)
        assert 0 <= result.metrics["test/accuracy"] <= 100
    probe = {r.name: r.metrics.get("test/probe_acc") for r in results}
    assert probe["ImageNet-supervised 25%"] is None  # no pre-training run behind it
    assert all(0 <= probe[name] <= 1 for name in rows[1:])  # the pre-training's probe, carried along the chain

    # model selection on validation videos only, disjoint from the test videos the TCNs predict
    videos = [p.name.removesuffix("-phase.txt") for p in sorted((data / "cholec80" / "phase_annotations").iterdir())]
    split = split_videos(videos, "cholec80", "paper", 0.2)
    assert split["val"] and not set(split["val"]) & set(split["test"])
    tested = next(line for line in table.splitlines() if line.startswith("- tested on ("))  # the runs' protocol
    assert tested.endswith(f", seed 0): {', '.join(split['test'])}") and "- relaxed boundary (" in table
    for result in results:
        assert result.monitor == "val/accuracy"
        with open(Path(result.log_dir) / "metrics.csv") as stream:
            val_scores = [float(row["val/accuracy"]) for row in csv.DictReader(stream) if row.get("val/accuracy")]
        assert len(val_scores) == 2 and result.val_score == pytest.approx(max(val_scores))  # the best epoch on val
        predictions = Path(result.log_dir) / "phase_predictions" / "test"
        assert sorted(p.name for p in predictions.iterdir()) == [
            "evaluation.md",
            "protocol.json",
            *[f"{v}-pred.txt" for v in split["test"]],
        ]
        for video in split["test"]:
            frames, _ = read_phase_file(predictions / f"{video}-pred.txt")
            gt_frames, _ = read_phase_file(data / "cholec80" / "phase_annotations" / f"{video}-phase.txt")
            assert frames.tolist() == gt_frames[::5].tolist()  # 5 fps features -> 5 fps predictions
    hidden = {"MoCo v2 25% finetune": "val/acc", "ImageNet-supervised 25% finetune": "val/acc"}
    for name, monitor in hidden.items():
        finetune = json.loads((out / slug(name) / "seed_0" / "result.json").read_text())
        assert finetune["monitor"] == monitor
        tcn = next(r for r in results if r.name == name.removesuffix(" finetune"))
        assert tcn.metrics["test/acc"] == finetune["metrics"]["test/acc"]  # the frame classifier's, carried along
    assert sorted(p.name for p in out.glob("phase_ribbons_*.png")) == [f"phase_ribbons_{v}.png" for v in split["test"]]


def test_a_distillation_row_whose_teacher_is_at_chance_is_flagged():
    from distill.report import format_table
    from distill.runs import RunResult

    def result(name: str, seed: int, **metrics: float) -> RunResult:
        return RunResult(name, seed, metrics, "val/probe_acc", 0.5, 1000, 1.0, "best.ckpt", ".")

    results = [
        result("MoCo v2", 0, **{"test/train_info_nce": 4.0}),
        result("distilled", 0, **{"test/train_info_nce": 4.1, "test/teacher_at_chance": 0.0}),
        result("distilled from an untrained teacher", 0, **{"test/teacher_at_chance": 0.0}),
        result("distilled from an untrained teacher", 1, **{"test/teacher_at_chance": 1.0}),
    ]
    table = format_table("t", [{"metric": "test/train_info_nce"}], [], results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "distilled from an untrained teacher (! teacher at chance)" in rows
    assert "MoCo v2" in rows and "distilled" in rows  # not flagged
    assert sum("(! teacher at chance):" in line for line in table.splitlines()) == 1  # explained once


def test_the_real_clips_script_builds_each_pre_training_from_its_demo_preset():
    """benchmarks/ssl_real_clips.py reads the demo presets with their ``extends:`` base applied
    (the optimiser and most settings live in the paper YAML) and builds the modules from them."""
    import importlib.util

    from distill.modules import MoCoModule

    spec = importlib.util.spec_from_file_location("ssl_real_clips", REPO / "benchmarks" / "ssl_real_clips.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, epochs in (("moco_teacher", 5), ("moco", 12), ("moco_distill", 12)):
        options, data, max_epochs = script.preset(name)
        assert max_epochs == epochs and data["image_size"] == 48 and options["queue_size"] == 256
        assert options["optimizer"]([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] > 0
    model = MoCoModule(**script.preset("moco_teacher")[0])
    assert model.hparams.freeze_backbone and model.hparams.proj_batch_norm

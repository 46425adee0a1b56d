"""Surgical self-supervision on real unlabelled clips: teacher, MoCo v2, MoCo v2 + distillation.

    python benchmarks/ssl_real_clips.py CLIPS_DIR [--out runs/real_clips] [--fps 5]
        [--teacher-epochs 5] [--epochs 8] [--seed 0]

CLIPS_DIR holds ``*.mp4`` clips and a ``clips.tsv`` (``file<TAB>group<TAB>...``: a coarse label
per clip, e.g. the action-triplet group of CholecT50 clips). Frames are extracted once to
``<out>/frames`` (56 x 56, ``--fps``); the three pre-trainings use the demo presets
(``experiments/surgical/demo/moco_teacher.yaml``, ``moco.yaml``, ``moco_distill.yaml``: 48 px,
K 256) on every frame as unlabelled data (``dataset="unlabeled"``). Prints, for each, the mean
InfoNCE of the last epoch against chance ln(1 + K) and the leave-one-clip-out 10-NN accuracy of
its projection embeddings over the clip groups (neighbours from other clips only; beside it the
accuracy of always answering the most common group of the other clips), and for the distilled
student its agreement with the teacher (similarity KL, top-5 overlap) on the same frames.
Not part of ``make test``; nothing here is specific to one set of clips.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from data_modules.surgical import SurgicalSSLDataModule
from data_modules.surgical_datasets import FrameDataset, unlabelled_frame_index
from data_modules.surgical_layout import extract_dataset_frames
from data_modules.video_transforms import eval_transform
from distill.errors import DataError
from distill.metrics.embedding import info_nce_chance, knn_accuracy, neighbour_overlap, similarity_kl
from distill.modules import MoCoDistillModule, MoCoModule
from distill.utils import read_extending_yaml

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "experiments/surgical/demo"


def preset(name: str) -> tuple[dict, dict, int]:
    """(model options with the optimiser as a callable, data options, max_epochs) of a demo preset."""
    config = read_extending_yaml(PRESETS / f"{name}.yaml", "surgical preset")  # the paper YAML + the demo's keys
    model = dict(config["model"]["init_args"])
    optimizer = model.pop("optimizer")
    module, _, cls = optimizer["class_path"].rpartition(".")
    model["optimizer"] = functools.partial(getattr(importlib.import_module(module), cls), **optimizer["init_args"])
    model.pop("teacher_checkpoint", None)
    data = {
        k: v
        for k, v in config["data"]["init_args"].items()
        if k in ("fps", "image_size", "resize_size", "augmentation_strength", "batch_size")
    }
    return model, data, int(config["trainer"]["max_epochs"])


def clip_groups(clips_dir: Path) -> dict[str, str]:
    """Clip stem -> group, from ``clips.tsv``."""
    table = clips_dir / "clips.tsv"
    if not table.is_file():
        raise DataError(f"{table}: not found (file<TAB>group per clip)")
    with table.open() as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    if not rows or not {"file", "group"} <= set(rows[0]):
        raise DataError(f"{table}: needs the columns 'file' and 'group'")
    return {Path(row["file"]).stem: row["group"] for row in rows}


def pretrain(model: MoCoModule, frames: Path, data_options: dict, epochs: int, seed: int) -> float:
    """Fit on every frame (no validation); the mean InfoNCE of the last epoch."""
    L.seed_everything(seed, verbose=False)
    data = SurgicalSSLDataModule(str(frames), dataset="unlabeled", num_workers=1, seed=seed, **data_options)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    model.trainer_for_saving = trainer
    return float(model.epoch_info_nce.compute())


@torch.no_grad()
def embed(encoder: torch.nn.Module, dataset: FrameDataset) -> torch.Tensor:
    """(N, D) unit-norm embeddings of every frame, eval transform, in index order."""
    encoder.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=128)
    return torch.cat([encoder(batch["image"]) for batch in loader])


def majority_of_other_clips(labels: torch.Tensor, clips: torch.Tensor) -> float:
    """Accuracy of answering, for each frame, the most common label among the other clips' frames."""
    right = 0
    for clip in clips.unique():
        others = Counter(labels[clips != clip].tolist()).most_common(1)[0][0]
        right += int((labels[clips == clip] == others).sum())
    return right / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/real_clips"))
    parser.add_argument("--fps", type=int, default=5, choices=[1, 5, 25])
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the teacher preset's")
    parser.add_argument("--epochs", type=int, default=None, help="students; default: the student presets'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader worker takes the other core of a 2-core machine
    groups = clip_groups(args.clips_dir)
    frames = args.out / "frames"
    extract_dataset_frames(args.clips_dir, frames, "unlabeled", fps=args.fps, size=(56, 56), progress=False)
    videos = sorted(p.name for p in frames.iterdir() if p.is_dir())
    missing = [v for v in videos if v not in groups]
    if missing:
        raise DataError(f"{args.clips_dir / 'clips.tsv'}: no group for {missing[0]}")
    names = sorted({groups[v] for v in videos})
    index = unlabelled_frame_index(
        frames, SurgicalSSLDataModule(str(frames), dataset="unlabeled").pattern, videos, args.fps
    )
    labels = torch.tensor([names.index(groups[videos[i]]) for i in index.video_ids])
    clips = torch.as_tensor(index.video_ids)

    teacher_options, data_options, teacher_epochs = preset("moco_teacher")
    data_options["fps"] = args.fps
    eval_frames = FrameDataset(
        frames,
        index=index,
        pattern=SurgicalSSLDataModule(str(frames), dataset="unlabeled").pattern,
        transform=eval_transform(data_options["image_size"], data_options["resize_size"]),
    )
    results = {}
    teacher = MoCoModule(**teacher_options)
    results["teacher"] = pretrain(teacher, frames, data_options, args.teacher_epochs or teacher_epochs, args.seed)
    teacher_path = args.out / "teacher.ckpt"
    teacher.trainer_for_saving.save_checkpoint(teacher_path)
    embeddings = {"teacher": embed(teacher.encoder_q, eval_frames)}
    for name, config, cls in (
        ("MoCo v2", "moco", MoCoModule),
        ("MoCo v2 + distillation", "moco_distill", MoCoDistillModule),
    ):
        options, student_data, epochs = preset(config)
        student_data["fps"] = args.fps
        extra = {"teacher_checkpoint": str(teacher_path)} if cls is MoCoDistillModule else {}
        model = cls(**options, **extra)
        results[name] = pretrain(model, frames, student_data, args.epochs or epochs, args.seed)
        embeddings[name] = embed(model.encoder_q, eval_frames)
        queue_size = options["queue_size"]

    chance = info_nce_chance(queue_size)
    print(
        f"{len(videos)} clips, {len(index)} frames at {args.fps} fps, {len(names)} groups; chance ln(1 + K) = {chance:.2f}"
    )
    print(f"most common group of the other clips: accuracy {majority_of_other_clips(labels, clips):.3f}")
    print("| pre-training | final InfoNCE | / chance | 10-NN group acc (other clips) | KL to teacher | top-5 overlap |")
    print("|---|---|---|---|---|---|")
    for name, nce in results.items():
        knn = knn_accuracy(embeddings[name], labels, clips, 10)
        agreement = ["-", "-"]
        if name != "teacher":
            agreement = [
                f"{similarity_kl(embeddings['teacher'], embeddings[name]):.3f}",
                f"{neighbour_overlap(embeddings['teacher'], embeddings[name], 5):.3f}",
            ]
        print(f"| {name} | {nce:.2f} | {nce / chance:.2f} | {knn:.3f} | {' | '.join(agreement)} |")
    print(f"(top-5 overlap chance: {5 / (len(index) - 1):.4f})")


if __name__ == "__main__":
    main()

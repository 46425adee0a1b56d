"""Deployment export: ONNX/TorchScript files of segmentation students and frame classifiers match
PyTorch, and the torch-free NIfTI entry point segments a volume exactly as the Lightning predict
path does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.prostate import ProstateDataModule
from data_modules.surgical import SurgicalPhaseDataModule
from data_modules.surgical_layout import extract_dataset_frames
from data_modules.synth_surgical import write_synthetic_surgical
from distill.cli import main
from distill.errors import DataError
from distill.export import export_student, load_student
from distill.infer_onnx import OnnxSegmenter, resize_weights, segment_nifti
from distill.modules import PhaseClassifierModule, SegmentationModule

onnxruntime = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def predict_volumes(data_root: Path) -> dict[str, dict]:
    """The DataModule's predict items (every case), one per site."""
    data = ProstateDataModule(
        data_root=str(data_root), image_size=IMAGE_SIZE, num_workers=0, load_threads=1, predict_split="all"
    )
    data.setup("predict")
    return {volume["site"]: volume for volume in data.predict_dataloader()}


@pytest.fixture(scope="module")
def student_checkpoint(synthetic_prostate_root, tmp_path_factory) -> Path:
    """A slim U-Net (width 4, 32 px) after one training step, saved by the CLI as a user gets it.

    One step leaves the network predicting background everywhere, so the final layer's bias is
    then shifted to make about half of a volume foreground: mask comparisons see both classes.
    """
    run = tmp_path_factory.mktemp("student")
    main(
        [
            "fit",
            "--config",
            str(REPO / "experiments/prostate/student_baseline.yaml"),
            f"--data.init_args.data_root={synthetic_prostate_root}",
            f"--data.init_args.image_size={IMAGE_SIZE}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=8",
            "--data.init_args.load_threads=1",
            "--model.init_args.network_kwargs.width=4",
            "--model.init_args.foreground_prior=null",  # a random output layer: logits that vary, masks to compare
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={run}",
        ]
    )
    path = next(run.rglob("last.ckpt"))
    net, _ = load_student(path)
    with torch.no_grad():
        logits = net(predict_volumes(synthetic_prostate_root)["RUNMC"]["image"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["net.final_conv.bias"][1] += (logits[:, 0] - logits[:, 1]).median()
    torch.save(checkpoint, path)
    return path


def test_onnx_export_matches_pytorch_under_onnxruntime(student_checkpoint, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    main(["export", str(student_checkpoint), "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "max |onnx - pytorch|" in printed and "latency" in printed and "MB" in printed
    net, preprocessing = load_student(student_checkpoint)
    assert preprocessing == {
        "num_slices": 3,
        "image_size": IMAGE_SIZE,
        "normalization": "zscore",
        "num_classes": 2,
        "largest_component": False,
    }
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="student.onnx: already exists"):
        main(["export", str(student_checkpoint), "--out", str(out)])


def test_torchscript_export_matches_pytorch(student_checkpoint, tmp_path):
    report = export_student(student_checkpoint, tmp_path / "student.pt", "torchscript")
    assert report.max_abs_diff <= 1e-4 and report.size_bytes == (tmp_path / "student.pt").stat().st_size
    loaded = torch.jit.load(str(report.path))
    net, _ = load_student(student_checkpoint)
    x = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=0)


def test_failed_numerical_check_writes_nothing(student_checkpoint, tmp_path):
    with pytest.raises(DataError, match="differs from PyTorch by .* > tolerance 0; not written"):
        export_student(student_checkpoint, tmp_path / "student.onnx", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("sizes", [(53, 32), (64, 32), (32, 64), (32, 53), (17, 17)])
def test_resize_weights_reproduce_torch_interpolate(sizes, antialias):
    (height, width), size = sizes, (sizes[1], sizes[0])
    planes = torch.rand(2, height, width, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(planes[:, None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[
        :, 0
    ]
    ours = (
        resize_weights(height, size[0], antialias)
        @ planes.double().numpy()
        @ resize_weights(width, size[1], antialias).T
    )
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def test_onnx_nifti_entry_point_equals_the_lightning_predict_path(
    student_checkpoint, synthetic_prostate_root, tmp_path
):
    model = tmp_path / "student.onnx"
    export_student(student_checkpoint, model)
    module = SegmentationModule.load_from_checkpoint(student_checkpoint, map_location="cpu", weights_only=True).eval()
    segmenter = OnnxSegmenter(model)
    volumes = predict_volumes(synthetic_prostate_root)
    for site in ("RUNMC", "I2CVB"):  # 64 px and 53 px in-plane
        volume = volumes[site]
        expected = module.predict_volume(volume["image"], volume["label"].shape[-2:]).numpy()
        image = nib.load(volume["image_path"])
        raw = np.asarray(image.get_fdata(dtype=np.float32)).transpose(2, 0, 1)
        # Same network input as the DataModule builds, and the same mask.
        np.testing.assert_allclose(segmenter.network_input(raw), volume["image"].numpy(), atol=1e-4)
        out = tmp_path / f"{site}_mask.nii.gz"
        segment_nifti(model, volume["image_path"], out)
        written = nib.load(out)
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
        mask = np.asarray(written.dataobj).transpose(2, 0, 1)
        # The logits on the volume's grid agree (predict_volume's resize, in PyTorch) ...
        with torch.no_grad():
            logits = F.interpolate(module(volume["image"]), size=tuple(volume["label"].shape[-2:]), mode="bilinear")
        np.testing.assert_allclose(segmenter.logits(raw), logits.numpy(), atol=1e-4, rtol=0)
        # ... so the masks are equal wherever PyTorch's decision is not a float tie (this
        # one-step student's logits are close: onnxruntime and numpy differ from PyTorch by ~1e-7).
        decided = (logits[:, 1] - logits[:, 0]).abs().numpy() > 1e-4
        assert 0.05 < expected[decided].mean() < 0.95  # both classes occur: not a vacuous comparison
        np.testing.assert_array_equal(mask[decided], expected[decided])
    with pytest.raises(DataError, match="already exists"):
        segment_nifti(model, volumes["RUNMC"]["image_path"], tmp_path / "RUNMC_mask.nii.gz")


def test_nifti_entry_point_runs_without_torch(student_checkpoint, synthetic_prostate_root, tmp_path):
    model = tmp_path / "student.onnx"
    export_student(student_checkpoint, model)
    image = next((synthetic_prostate_root / "UCL").glob("Case*[0-9].nii.gz"))
    code = (
        "import sys, runpy; sys.argv = ['infer_onnx', *sys.argv[1:]]; runpy.run_module('distill.infer_onnx', run_name='__main__');"
        "sys.exit(sorted({'torch', 'lightning'} & set(sys.modules)) or 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(model), str(image), str(tmp_path / "mask.nii.gz")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(image).shape


@pytest.fixture(scope="module")
def phase_checkpoint(tmp_path_factory) -> Path:
    """A tiny frame classifier (timm's test_efficientnet, 256 features, 32 px) after one step, saved by
    a Trainer; its hyper-parameters name a MoCo pre-training file that no longer exists."""
    base = tmp_path_factory.mktemp("phase")
    write_synthetic_surgical(base / "cholec80", "cholec80", num_videos=3, seed=1, size=(48, 56), duration_s=(2.0, 2.0))
    extract_dataset_frames(base / "cholec80", base / "frames", "cholec80", fps=1, workers=1, progress=False)
    data = SurgicalPhaseDataModule(
        str(base / "frames"),
        str(base / "cholec80"),
        image_size=IMAGE_SIZE,
        resize_size=36,
        batch_size=2,
        num_workers=0,
        fps=1,
        predict_fps=1,
    )
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=base,
    )
    trainer.fit(PhaseClassifierModule(backbone="test_efficientnet"), datamodule=data)
    path = base / "phase.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["pretrained_checkpoint"] = str(base / "deleted_moco.ckpt")
    torch.save(checkpoint, path)
    return path


def test_phase_classifier_onnx_gives_logits_and_features_of_pytorch_and_is_never_overwritten(
    phase_checkpoint, tmp_path, capsys
):
    assert torch.load(phase_checkpoint, weights_only=True)["network_family"] == "phase_classifier"
    out = tmp_path / "frames.onnx"
    main(["export", str(phase_checkpoint), "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert (
        "max |onnx - pytorch|" in printed and f"(1, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) input" in printed and "MB" in printed
    )
    module = PhaseClassifierModule.load_from_checkpoint(phase_checkpoint, map_location="cpu", weights_only=True).eval()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["logits", "features"]
    preprocessing = json.loads(session.get_modelmeta().custom_metadata_map["distill.preprocessing"])
    assert (preprocessing["image_size"], preprocessing["resize_size"], preprocessing["num_classes"]) == (
        IMAGE_SIZE,
        36,
        7,
    )
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected_logits, expected_features = module(x).numpy(), module.features(x).numpy()
        logits, features = session.run(None, {"image": x.numpy()})
        assert logits.shape == (batch, 7) and features.shape == (batch, 256)
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(features, expected_features, atol=1e-4, rtol=0)
    written = out.read_bytes()
    with pytest.raises(SystemExit, match="frames.onnx: already exists"):
        main(["export", str(phase_checkpoint), "--format", "torchscript", "--out", str(out)])
    assert out.read_bytes() == written
    with pytest.raises(DataError, match="a phase_recognition model, not a segmentation student"):
        OnnxSegmenter(out)


def test_phase_classifier_torchscript_matches_pytorch_and_a_failed_check_writes_nothing(phase_checkpoint, tmp_path):
    report = export_student(phase_checkpoint, tmp_path / "frames.pt", "torchscript")
    loaded = torch.jit.load(str(report.path))
    net, _ = load_student(phase_checkpoint)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="differs from PyTorch by .* > tolerance 0; not written"):
        export_student(phase_checkpoint, tmp_path / "frames.onnx", tolerance=0.0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["frames.pt", "frames.pt.card.json", "frames.pt.card.md"]

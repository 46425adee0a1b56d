"""Deployment export: ONNX/TorchScript files match PyTorch, and the torch-free NIfTI entry point
segments a volume exactly as the Lightning predict path does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.prostate import ProstateDataModule
from distill.cli import main
from distill.errors import DataError
from distill.export import export_segmentation_student, load_student
from distill.infer_onnx import OnnxSegmenter, resize_weights, segment_nifti
from distill.modules import SegmentationModule

onnxruntime = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def predict_volumes(data_root: Path) -> dict[str, dict]:
    """The DataModule's predict items (every case), one per site."""
    data = ProstateDataModule(data_root=str(data_root), image_size=IMAGE_SIZE, num_workers=0, load_threads=1,
                              predict_split="all")
    data.setup("predict")
    return {volume["site"]: volume for volume in data.predict_dataloader()}


@pytest.fixture(scope="module")
def student_checkpoint(synthetic_prostate_root, tmp_path_factory) -> Path:
    """A slim U-Net (width 4, 32 px) after one training step, saved by the CLI as a user gets it.

    One step leaves the network predicting background everywhere, so the final layer's bias is
    then shifted to make about half of a volume foreground: mask comparisons see both classes.
    """
    run = tmp_path_factory.mktemp("student")
    main(["fit", "--config", str(REPO / "experiments/prostate/student_baseline.yaml"),
          f"--data.init_args.data_root={synthetic_prostate_root}", f"--data.init_args.image_size={IMAGE_SIZE}",
          "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--data.init_args.load_threads=1",
          "--model.init_args.network_kwargs.width=4", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          f"--trainer.default_root_dir={run}"])
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
    assert preprocessing == {"num_slices": 3, "image_size": IMAGE_SIZE, "normalization": "zscore",
                             "num_classes": 2, "largest_component": False}
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="student.onnx: already exists"):
        main(["export", str(student_checkpoint), "--out", str(out)])


def test_torchscript_export_matches_pytorch(student_checkpoint, tmp_path):
    report = export_segmentation_student(student_checkpoint, tmp_path / "student.pt", "torchscript")
    assert report.max_abs_diff <= 1e-4 and report.size_bytes == (tmp_path / "student.pt").stat().st_size
    loaded = torch.jit.load(str(report.path))
    net, _ = load_student(student_checkpoint)
    x = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=0)


def test_failed_numerical_check_writes_nothing(student_checkpoint, tmp_path):
    with pytest.raises(DataError, match="differs from PyTorch by .* > tolerance 0; not written"):
        export_segmentation_student(student_checkpoint, tmp_path / "student.onnx", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("sizes", [(53, 32), (64, 32), (32, 64), (32, 53), (17, 17)])
def test_resize_weights_reproduce_torch_interpolate(sizes, antialias):
    (height, width), size = sizes, (sizes[1], sizes[0])
    planes = torch.rand(2, height, width, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(planes[:, None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[:, 0]
    ours = resize_weights(height, size[0], antialias) @ planes.double().numpy() @ resize_weights(width, size[1], antialias).T
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def test_onnx_nifti_entry_point_equals_the_lightning_predict_path(student_checkpoint, synthetic_prostate_root, tmp_path):
    model = tmp_path / "student.onnx"
    export_segmentation_student(student_checkpoint, model)
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
    export_segmentation_student(student_checkpoint, model)
    image = next((synthetic_prostate_root / "UCL").glob("Case*[0-9].nii.gz"))
    code = (
        "import sys, runpy; sys.argv = ['infer_onnx', *sys.argv[1:]]; runpy.run_module('distill.infer_onnx', run_name='__main__');"
        "sys.exit(sorted({'torch', 'lightning'} & set(sys.modules)) or 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(model), str(image), str(tmp_path / "mask.nii.gz")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(image).shape

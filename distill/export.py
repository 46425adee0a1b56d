"""Deployment export of students: ONNX (for onnxruntime) or TorchScript.

``distill export CKPT --format onnx --out student.onnx`` rebuilds the network from the
checkpoint's hyper-parameters and weights (no teacher, no pre-training file, no training code
needed), exports it with a dynamic batch axis (the spatial size is the checkpoint's
``image_size``, as the network was trained), runs the saved file next to PyTorch on a sample input
and refuses the export when any output differs by more than ``tolerance``, then reports the file
size and the CPU latency of one input. The checkpoint's recorded ``network_family`` says what it
holds:

- ``"segmentation"`` students map (B, num_slices, S, S) slice stacks to (B, C, S, S) ``logits``.
  The preprocessing (:data:`PREPROCESSING_KEYS`: slices per input, in-plane size, intensity
  normalisation, largest-component post-processing, read from the checkpoint's data-module and
  model hyper-parameters) lets ``distill.infer_onnx`` segment a NIfTI volume without PyTorch.
- ``"phase_classifier"`` frame encoders / phase models
  (:class:`distill.modules.PhaseClassifierModule`) map (B, 3, S, S) ImageNet-normalised frames to
  (B, num_phases) ``logits`` and (B, D) pooled ``features`` (the input of the temporal model).

The preprocessing travels inside the file: ONNX metadata ``distill.preprocessing`` (JSON),
TorchScript extra file ``distill.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from distill.errors import DataError
from distill.infer_onnx import METADATA_KEY
from distill.models.backbones import IMAGENET_MEAN, IMAGENET_STD, FrameClassifier, feature_dim
from distill.modules.checkpoints import (
    checkpoint_family,
    load_network,
    load_state,
    resolve_checkpoint,
)

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
PREPROCESSING_KEYS = ("num_slices", "image_size", "normalization", "num_classes", "largest_component")
DEFAULT_IMAGE_SIZE = 384  # the DataModule's default, for checkpoints without data-module hyper-parameters
# The surgical phase DataModule's evaluation transform (resize the shorter side, centre crop) defaults.
DEFAULT_FRAME_SIZE, DEFAULT_FRAME_RESIZE = 224, 250
OUTPUT_NAMES = {"segmentation": ("logits",), "phase_classifier": ("logits", "features")}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_student` wrote and measured.

    Attributes:
        path: the exported file.
        format: "onnx" or "torchscript".
        max_abs_diff: largest |exported - PyTorch| output on the sample inputs (batch 2 and 1).
        size_bytes: file size.
        latency_ms: median CPU latency of one ``input_shape`` forward pass in the exported
            runtime (onnxruntime or TorchScript).
        input_shape: (1, channels, S, S), the shape timed.
        preprocessing: the metadata stored in the file.
    """

    path: Path
    format: str
    max_abs_diff: float
    size_bytes: int
    latency_ms: float
    input_shape: tuple[int, ...]
    preprocessing: dict

    def format_lines(self) -> str:
        """Human-readable summary, one fact per line."""
        return "\n".join(
            [
                f"exported {self.path} ({self.format})",
                f"max |{self.format} - pytorch| = {self.max_abs_diff:.2e} on sample inputs",
                f"size {self.size_bytes / 1e6:.2f} MB",
                f"latency {self.latency_ms:.2f} ms per {self.input_shape} input on CPU (median)",
                f"preprocessing {json.dumps(self.preprocessing)}",
            ]
        )


class LogitsAndFeatures(nn.Module):
    """A :class:`FrameClassifier` with both outputs: (B, 3, S, S) -> ((B, num_classes), (B, D))."""

    def __init__(self, classifier: FrameClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.classifier.features(x)
        return self.classifier.head(features), features


def load_student(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """The eval-mode network of a segmentation or phase-classifier checkpoint (phase: returning
    logits and features) and the preprocessing it was trained with."""
    path = resolve_checkpoint(checkpoint)
    payload = load_state(path)
    family = checkpoint_family(payload, path, None)
    if family not in OUTPUT_NAMES:
        raise DataError(
            f"{path}: holds a {family!r} network; export takes {' or '.join(map(repr, OUTPUT_NAMES))} checkpoints"
        )
    net = load_network(path, family=family)
    model = payload.get("hyper_parameters") or {}
    data = payload.get("datamodule_hyper_parameters") or {}
    if family == "phase_classifier":
        preprocessing = {
            "task": "phase_recognition",
            "image_size": int(data.get("image_size", DEFAULT_FRAME_SIZE)),
            "resize_size": int(data.get("resize_size", DEFAULT_FRAME_RESIZE)),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "num_classes": int(model.get("num_classes", 7)),
            "num_features": feature_dim(net.backbone),
            "outputs": list(OUTPUT_NAMES[family]),
        }
        return LogitsAndFeatures(net).eval(), preprocessing
    channels = int(data.get("channels", 1))
    if channels > 1:
        raise DataError(
            f"{path}: trained on {channels} MRI channels (data.init_args.channels); the exported pipeline "
            "(distill segment-nifti) reads one channel per volume"
        )
    preprocessing = {
        "num_slices": int(model.get("in_channels", data.get("num_slices", 3))),
        "image_size": int(data.get("image_size", DEFAULT_IMAGE_SIZE)),
        "normalization": str(data.get("normalization", "zscore")),
        "num_classes": int(model.get("num_classes", 2)),
        "largest_component": bool(model.get("largest_component", False)),
    }
    return net, preprocessing


def export_student(
    checkpoint: str | Path,
    out: str | Path,
    format: Format = "onnx",
    tolerance: float = 1e-4,
    opset: int = 17,
    latency_repeats: int = 20,
    seed: int = 0,
) -> ExportReport:
    """Export the network of ``checkpoint`` to ``out`` and check every output against PyTorch.

    Raises:
        DataError: ``out`` exists, the format is unknown, the checkpoint is unusable or of another
            family, or the exported file differs from PyTorch by more than ``tolerance`` (then
            nothing is written).
    """
    out = Path(out)
    if format not in FORMATS:
        raise DataError(f"format: expected one of {FORMATS}, got {format!r}")
    if out.exists():
        raise DataError(f"{out}: already exists; refusing to overwrite")
    net, preprocessing = load_student(checkpoint)
    size = preprocessing["image_size"]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, preprocessing.get("num_slices", 3), size, size, generator=generator)
    output_names = list(preprocessing.get("outputs", ["logits"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        write = _write_onnx if format == "onnx" else _write_torchscript
        run = write(net, sample, Path(temporary), preprocessing, opset, output_names)
        with torch.no_grad():
            max_diff = max(
                float(np.abs(exported - expected.numpy()).max())
                for x in (sample, sample[:1])
                for exported, expected in zip(run(x.numpy()), _outputs(net(x)), strict=True)
            )
        if not max_diff <= tolerance:
            raise DataError(
                f"{out}: the {format} export differs from PyTorch by {max_diff:.2e} > tolerance {tolerance:g}; not written"
            )
        latency = _median_ms(run, sample[:1].numpy(), latency_repeats)
        if out.exists():
            raise DataError(f"{out}: appeared while exporting; refusing to overwrite")
        os.replace(temporary, out)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return ExportReport(out, format, max_diff, out.stat().st_size, latency, tuple(sample[:1].shape), preprocessing)


def _outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A network's output as a tuple of tensors."""
    return result if isinstance(result, tuple) else (result,)


# Exporter chatter: constant folding of strided slices, TorchScript's deprecation notice, and the
# tracer's note that shape checks become constants (the spatial size is fixed by the sample, the
# checkpoint's ``image_size``, and only the batch axis stays dynamic, as documented).
_QUIET = ("Constant folding", "`torch.jit.", "Converting a tensor to a Python boolean")


def _write_onnx(
    net: nn.Module, sample: torch.Tensor, path: Path, preprocessing: dict, opset: int, output_names: list[str]
) -> Callable:
    """Export with the TorchScript-based exporter (no onnxscript needed), batch axis dynamic;
    returns a numpy -> list of numpy (one per output) runner of the saved file under onnxruntime."""
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        torch.onnx.export(
            net,
            (sample,),
            str(path),
            input_names=["image"],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["image", *output_names]},
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(preprocessing)})
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(output_names, {"image": x})


def _write_torchscript(
    net: nn.Module, sample: torch.Tensor, path: Path, preprocessing: dict, opset: int, output_names: list[str]
) -> Callable:
    """Trace (the batch size is not baked in) and save with the metadata as an extra file;
    returns a numpy -> list of numpy (one per output) runner of the reloaded file."""
    with warnings.catch_warnings(), torch.no_grad():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        traced = torch.jit.trace(net, sample)
        torch.jit.save(traced, str(path), _extra_files={"distill.json": json.dumps(preprocessing)})
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [output.numpy() for output in _outputs(loaded(torch.from_numpy(x)))]

    return run


def _median_ms(run: Callable, x: np.ndarray, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of ``run(x)``."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))

"""Deployment export of segmentation students: ONNX (for onnxruntime) or TorchScript.

``distill export CKPT --format onnx --out student.onnx`` rebuilds the network from the
checkpoint's hyper-parameters (no teacher, no training code needed), exports it with a dynamic
batch axis (the in-plane size is the checkpoint's ``image_size``, as the network was trained), runs the saved file next to PyTorch on a sample input and refuses the export when
they differ by more than ``tolerance``, then reports the file size and the CPU latency of one
slice stack. The preprocessing the network expects (:data:`PREPROCESSING_KEYS`: slices per input,
in-plane size, intensity normalisation, largest-component post-processing, read from the
checkpoint's data-module and model hyper-parameters) travels inside the file: ONNX metadata
``distill.preprocessing`` (JSON), TorchScript extra file ``distill.json``. ``distill.infer_onnx``
reads it to segment a NIfTI volume without PyTorch.
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
from distill.modules.checkpoints import load_segmentation_network, load_state, resolve_checkpoint

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
PREPROCESSING_KEYS = ("num_slices", "image_size", "normalization", "num_classes", "largest_component")
DEFAULT_IMAGE_SIZE = 384  # the DataModule's default, for checkpoints without data-module hyper-parameters


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_segmentation_student` wrote and measured.

    Attributes:
        path: the exported file.
        format: "onnx" or "torchscript".
        max_abs_diff: largest |exported - PyTorch| logit on the sample inputs (batch 2 and 1).
        size_bytes: file size.
        latency_ms: median CPU latency of one (1, num_slices, image_size, image_size) forward pass
            in the exported runtime (onnxruntime or TorchScript).
        preprocessing: the metadata stored in the file (see :data:`PREPROCESSING_KEYS`).
    """

    path: Path
    format: str
    max_abs_diff: float
    size_bytes: int
    latency_ms: float
    preprocessing: dict

    def format_lines(self) -> str:
        """Human-readable summary, one fact per line."""
        return "\n".join(
            [
                f"exported {self.path} ({self.format})",
                f"max |{self.format} - pytorch| = {self.max_abs_diff:.2e} on sample inputs",
                f"size {self.size_bytes / 1e6:.2f} MB",
                f"latency {self.latency_ms:.2f} ms per (1, {self.preprocessing['num_slices']}, "
                f"{self.preprocessing['image_size']}, {self.preprocessing['image_size']}) input on CPU (median)",
                f"preprocessing {json.dumps(self.preprocessing)}",
            ]
        )


def load_student(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """The eval-mode network of a segmentation checkpoint and the preprocessing it was trained with."""
    path = resolve_checkpoint(checkpoint)
    net = load_segmentation_network(path)
    payload = load_state(path)
    model = payload.get("hyper_parameters") or {}
    data = payload.get("datamodule_hyper_parameters") or {}
    preprocessing = {
        "num_slices": int(model.get("in_channels", data.get("num_slices", 3))),
        "image_size": int(data.get("image_size", DEFAULT_IMAGE_SIZE)),
        "normalization": str(data.get("normalization", "zscore")),
        "num_classes": int(model.get("num_classes", 2)),
        "largest_component": bool(model.get("largest_component", False)),
    }
    return net, preprocessing


def export_segmentation_student(
    checkpoint: str | Path,
    out: str | Path,
    format: Format = "onnx",
    tolerance: float = 1e-4,
    opset: int = 17,
    latency_repeats: int = 20,
    seed: int = 0,
) -> ExportReport:
    """Export the network of ``checkpoint`` to ``out`` and check it against PyTorch.

    Raises:
        DataError: ``out`` exists, the format is unknown, the checkpoint is unusable, or the
            exported file differs from PyTorch by more than ``tolerance`` (then nothing is written).
    """
    out = Path(out)
    if format not in FORMATS:
        raise DataError(f"format: expected one of {FORMATS}, got {format!r}")
    if out.exists():
        raise DataError(f"{out}: already exists; refusing to overwrite")
    net, preprocessing = load_student(checkpoint)
    size = preprocessing["image_size"]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, preprocessing["num_slices"], size, size, generator=generator)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        write = _write_onnx if format == "onnx" else _write_torchscript
        run = write(net, sample, Path(temporary), preprocessing, opset)
        with torch.no_grad():
            max_diff = max(float(np.abs(run(x.numpy()) - net(x).numpy()).max()) for x in (sample, sample[:1]))
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
    return ExportReport(out, format, max_diff, out.stat().st_size, latency, preprocessing)


# Exporter chatter: constant folding of strided slices, TorchScript's deprecation notice, and the
# tracer's note that shape checks become constants (the spatial size is fixed by the sample, the
# checkpoint's ``image_size``, and only the batch axis stays dynamic, as documented).
_QUIET = ("Constant folding", "`torch.jit.", "Converting a tensor to a Python boolean")


def _write_onnx(net: nn.Module, sample: torch.Tensor, path: Path, preprocessing: dict, opset: int) -> Callable:
    """Export with the TorchScript-based exporter (no onnxscript needed), batch axis dynamic;
    returns a numpy -> numpy runner of the saved file under onnxruntime."""
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        torch.onnx.export(
            net, (sample,), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(preprocessing)})
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0]


def _write_torchscript(net: nn.Module, sample: torch.Tensor, path: Path, preprocessing: dict, opset: int) -> Callable:
    """Trace (the batch size is not baked in: convolutions only) and save with the metadata as an
    extra file; returns a numpy -> numpy runner of the reloaded file."""
    with warnings.catch_warnings(), torch.no_grad():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        traced = torch.jit.trace(net, sample)
        torch.jit.save(traced, str(path), _extra_files={"distill.json": json.dumps(preprocessing)})
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

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

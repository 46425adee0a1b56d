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
TorchScript extra file ``distill.json``. Every export also writes a model card beside the model,
``<out>.card.md`` and ``<out>.card.json`` (:mod:`distill.model_card`).

``quantize="int8"`` (segmentation students, ONNX): the exported file is quantised and its test Dice
checked (:mod:`distill.quantize`); when the mean test Dice drops by more than ``max_dice_drop``,
nothing is written. ``out`` then holds the INT8 model; the card gives both latencies.
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

from distill.benchmarking import count_flops
from distill.errors import DataError
from distill.infer_onnx import METADATA_KEY
from distill.model_card import RunData, build_card, write_card
from distill.models.backbones import IMAGENET_MEAN, IMAGENET_STD, FrameClassifier, feature_dim
from distill.modules.checkpoints import (
    checkpoint_family,
    file_sha256,
    load_network,
    load_state,
    resolve_checkpoint,
)
from distill.quantize import quantize_and_check

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
        card: the model card (:func:`distill.model_card.build_card`), written beside ``path``.
        card_paths: its ``.card.json`` and ``.card.md`` files.
    """

    path: Path
    format: str
    max_abs_diff: float
    size_bytes: int
    latency_ms: float
    input_shape: tuple[int, ...]
    preprocessing: dict
    card: dict | None = None
    card_paths: tuple[Path, ...] = ()

    def format_lines(self) -> str:
        """Human-readable summary, one fact per line."""
        lines = [
            f"exported {self.path} ({self.format})",
            f"max |{self.format} - pytorch| = {self.max_abs_diff:.2e} on sample inputs",
            f"size {self.size_bytes / 1e6:.2f} MB",
            f"latency {self.latency_ms:.2f} ms per {self.input_shape} input on CPU (median)",
            f"preprocessing {json.dumps(self.preprocessing)}",
        ]
        int8 = (self.card or {}).get("model", {}).get("int8")
        if int8:
            latency = self.card["model"]["latency_ms"]
            lines.append(
                f"int8: test Dice {int8['dice_int8']:.4f} vs fp32 {int8['dice_fp32']:.4f} on {int8['test_cases']} test "
                f"cases (drop {int8['dice_drop']:+.4f} <= {int8['max_dice_drop']:g}); latency {latency['int8']:.2f} ms vs "
                f"fp32 {latency['fp32']:.2f} ms ({latency['fp32'] / latency['int8']:.2f}x)"
            )
        lines += [f"model card {path}" for path in self.card_paths]
        return "\n".join(lines)


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
    quantize: Literal["int8"] | None = None,
    calibration_slices: int = 64,
    max_dice_drop: float = 0.01,
    run_data: Callable[[dict], RunData] | None = None,
) -> ExportReport:
    """Export the network of ``checkpoint`` to ``out``, check every output against PyTorch, write the
    model card (and with ``quantize="int8"`` quantise and check the test Dice, module docstring).

    ``run_data`` reads a segmentation run's data from its DataModule hyper-parameters (the card's
    split and the INT8 calibration and test cases); without it (or when it fails) the card says so.

    Raises:
        DataError: ``out`` or its card exists, the format is unknown, the checkpoint is unusable or of
            another family, the exported file differs from PyTorch by more than ``tolerance``, or the
            INT8 model loses more than ``max_dice_drop`` test Dice (then nothing is written).
    """
    out = Path(out)
    if format not in FORMATS:
        raise DataError(f"format: expected one of {FORMATS}, got {format!r}")
    for path in (out, out.with_name(out.name + ".card.json"), out.with_name(out.name + ".card.md")):
        if path.exists():
            raise DataError(f"{path}: already exists; refusing to overwrite")
    if quantize not in (None, "int8"):
        raise DataError(f"quantize: expected int8, got {quantize!r}")
    if quantize and format != "onnx":
        raise DataError(f"--quantize {quantize}: ONNX exports only (got --format {format})")
    if calibration_slices < 1:
        raise DataError(f"calibration slices: expected at least 1, got {calibration_slices}")
    net, preprocessing = load_student(checkpoint)
    path = resolve_checkpoint(checkpoint)
    payload = load_state(path)
    if quantize and "num_slices" not in preprocessing:
        raise DataError(f"{path}: --quantize {quantize} takes segmentation students (their test Dice is checked)")
    data, data_problem = None, None
    if run_data is not None and "num_slices" in preprocessing:
        try:
            data = run_data(payload.get("datamodule_hyper_parameters") or {})
        except DataError as err:
            if quantize:
                raise DataError(f"--quantize {quantize} needs the run's data: {err}") from None
            data_problem = f"the run's data could not be read now ({err})"
    elif "num_slices" in preprocessing:
        data_problem = "the run's data was not read (no reader given)"
    size = preprocessing["image_size"]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, preprocessing.get("num_slices", 3), size, size, generator=generator)
    output_names = list(preprocessing.get("outputs", ["logits"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    temporaries = [Path(temporary)]
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
        runs, int8 = {"fp32": run}, None
        if quantize:
            quantized = Path(temporary).with_name(Path(temporary).name + ".int8")
            temporaries.append(quantized)
            int8 = quantize_and_check(
                Path(temporary), quantized, data, preprocessing, calibration_slices, max_dice_drop, seed, out
            )
            session = _session(quantized)
            runs["int8"] = lambda x: session.run(output_names, {"image": x})
        latencies = interleaved_latency_ms(runs, sample[:1].numpy(), latency_repeats)
        final = quantized if quantize else Path(temporary)
        if out.exists():
            raise DataError(f"{out}: appeared while exporting; refusing to overwrite")
        os.replace(final, out)
    finally:
        for leftover in temporaries:
            Path(leftover).unlink(missing_ok=True)
    measured = {
        "file": str(out),
        "format": format,
        "size_bytes": out.stat().st_size,
        "sha256": file_sha256(out),
        "parameters": sum(p.numel() for p in net.parameters()),
        "gflops": count_flops(net, tuple(sample[:1].shape)) / 1e9,
        "input_shape": list(sample[:1].shape),
        "preprocessing": preprocessing,
        "latency_ms": latencies,
        "threads": f"{'onnxruntime' if format == 'onnx' else 'torch'} default threads on {os.cpu_count()} CPUs",
        "max_abs_diff_fp32": max_diff,
        "int8": int8,
    }
    card = build_card(path, payload, measured, data, data_problem)
    card_paths = write_card(out, card)
    return ExportReport(
        out,
        format,
        max_diff,
        out.stat().st_size,
        latencies["int8" if quantize else "fp32"],
        tuple(sample[:1].shape),
        preprocessing,
        card,
        card_paths,
    )


def _session(path: Path):
    """An onnxruntime CPU session of ``path``."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def interleaved_latency_ms(runs: dict[str, Callable], x: np.ndarray, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of ``run(x)`` per named runner, measured in turns (one call of each per round),
    so that a load change on the machine affects every runner alike."""
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(repeats, 1)):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * float(np.median(values)) for name, values in times.items()}


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

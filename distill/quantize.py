"""INT8 quantisation of an exported segmentation student, refused when it costs test Dice.

``distill export --quantize int8`` (:func:`distill.export.export_student`) hands its fp32 ONNX file
to :func:`quantize_and_check`: ONNX Runtime static quantisation (QDQ, INT8 per-channel weights,
UINT8 activations calibrated on ``calibration_slices`` slices drawn with ``seed`` from the run's
training cases), then the run's labelled test cases are segmented through onnxruntime with the fp32
and the INT8 model (:class:`~distill.infer_onnx.OnnxSegmenter`, as ``distill segment-nifti`` runs
them): when the mean test Dice drops by more than ``max_dice_drop``, nothing is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from distill.errors import DataError
from distill.infer_onnx import METADATA_KEY, OnnxSegmenter
from distill.model_card import RunData


def calibration_inputs(model: Path, data: RunData, count: int, seed: int) -> np.ndarray:
    """(count, num_slices, S, S) float32 network inputs: slices drawn with ``seed`` from the run's training
    volumes (every slice equally likely), preprocessed as the exported model's metadata says."""
    segmenter = OnnxSegmenter(model)
    stacks = np.concatenate([segmenter.network_input(image) for image in data.train_images()])
    if not len(stacks):
        raise DataError("INT8 calibration: the run's training split holds no slice")
    chosen = np.random.default_rng(seed).choice(len(stacks), size=min(count, len(stacks)), replace=False)
    return stacks[np.sort(chosen)]


def onnx_test_scores(model: Path, data: RunData, num_classes: int) -> dict:
    """Mean 3D Dice (foreground classes averaged per case) and mean ECE of the run's labelled test cases
    segmented through onnxruntime by ``model`` (:class:`~distill.infer_onnx.OnnxSegmenter`)."""
    from distill.metrics.calibration import ece_of_bins, foreground_probability, reliability_bins
    from distill.metrics.segmentation import volume_class_dice_hd95

    segmenter = OnnxSegmenter(model)
    dice, ece = [], []
    for _site, _case, image, label, spacing in data.test_cases():
        logits = segmenter.logits(image)
        mask = segmenter.mask(logits)
        label = torch.from_numpy(np.asarray(label, dtype=np.int64))
        class_dice, _ = volume_class_dice_hd95(
            torch.from_numpy(mask.astype(np.int64)), label, list(spacing), num_classes
        )
        dice.append(float(np.nanmean(class_dice)))
        ece.append(ece_of_bins(reliability_bins(foreground_probability(torch.from_numpy(logits)), label > 0)))
    if not dice:
        raise DataError("INT8 check: the run's test split holds no labelled case")
    return {"dice": float(np.mean(dice)), "ece": float(np.mean(ece)), "cases": len(dice)}


def quantize_int8(fp32: Path, int8: Path, inputs: np.ndarray) -> None:
    """Quantise the ONNX model ``fp32`` into ``int8`` with ONNX Runtime's static quantisation: QDQ,
    per-channel INT8 weights, UINT8 activations whose ranges come from ``inputs`` (N, C, H, W), one
    calibration sample per row."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs[i : i + 1] for i in range(len(inputs)))

        def get_next(self) -> dict | None:
            item = next(self.items, None)
            return None if item is None else {"image": item}

    logging.disable(
        logging.WARNING
    )  # the quantiser's advice to pre-process first (shape inference), on the root logger
    try:
        quantize_static(
            str(fp32),
            str(int8),
            Rows(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(logging.NOTSET)


def quantize_and_check(
    fp32: Path,
    int8: Path,
    data: RunData | None,
    preprocessing: dict,
    calibration_slices: int,
    max_dice_drop: float,
    seed: int,
    out: Path,
) -> dict:
    """Quantise ``fp32`` into ``int8`` (static, QDQ, per-channel INT8 weights, UINT8 activations,
    calibrated on training slices), then compare both on the test cases; DataError (naming ``out``)
    when the test Dice drops by more than ``max_dice_drop``. Returns the card's ``int8`` record."""
    import onnx

    if data is None:
        raise DataError("--quantize int8 needs the run's data (its training slices and test cases)")
    inputs = calibration_inputs(fp32, data, calibration_slices, seed)
    quantize_int8(fp32, int8, inputs)
    model = onnx.load(str(int8))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(preprocessing)})
    onnx.save(model, str(int8))
    before = onnx_test_scores(fp32, data, preprocessing["num_classes"])
    after = onnx_test_scores(int8, data, preprocessing["num_classes"])
    drop = before["dice"] - after["dice"]
    if not drop <= max_dice_drop:
        raise DataError(
            f"{out}: the INT8 model's test Dice is {after['dice']:.4f} vs {before['dice']:.4f} in fp32 on "
            f"{before['cases']} test cases, a drop of {drop:.4f} > --max-dice-drop {max_dice_drop:g}; nothing written"
        )
    return {
        "method": "onnxruntime quantize_static, QDQ, per-channel INT8 weights, UINT8 activations (MinMax)",
        "calibration_slices": len(inputs),
        "calibration_seed": seed,
        "test_cases": before["cases"],
        "dice_fp32": before["dice"],
        "dice_int8": after["dice"],
        "dice_drop": drop,
        "max_dice_drop": max_dice_drop,
        "ece_fp32": before["ece"],
        "ece_int8": after["ece"],
    }

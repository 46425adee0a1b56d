"""Segment a NIfTI volume with an exported ONNX student under onnxruntime: no PyTorch, no Lightning.

    python -m distill.infer_onnx student.onnx Case00.nii.gz Case00_mask.nii.gz
    distill segment-nifti student.onnx Case00.nii.gz Case00_mask.nii.gz      (same thing)

Needs only numpy, nibabel, scipy and onnxruntime. The steps replicate the prostate DataModule's
evaluation path and :meth:`SegmentationModule.predict_volume`, with the settings stored in the
model by ``distill export`` (metadata ``distill.preprocessing``):

1. read the (X, Y, Z) volume, slices first: (S, H0, W0) = (Z, X, Y);
2. per-volume intensity normalisation: ``zscore`` (mean 0, std 1 over all voxels) or
   ``percentile`` (clip at the 1st/99th percentile, rescale to [0, 1]);
3. resize every slice to ``image_size`` x ``image_size`` (bilinear, antialiased: PyTorch's
   ``interpolate(..., antialias=True)`` weights);
4. 2.5D stacks: slice s sees slices s-k .. s+k (k = ``num_slices`` // 2, edges replicated);
5. logits (S, C, size, size) resized back to (H0, W0) (bilinear, ``align_corners=False``),
   argmax over classes; optionally only the largest 3D connected component of the foreground;
6. the (S, H0, W0) mask is written as uint8 (X, Y, Z) NIfTI with the input's affine and header.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from distill.argparse_tools import ToolParser, one_line_errors
from distill.errors import DataError
from distill.formats.nifti import read_nifti, write_mask_like

METADATA_KEY = "distill.preprocessing"  # ONNX metadata key of the settings below, JSON
MAX_IMAGE_SIZE = 4096  # in-plane network size; larger metadata is refused before anything is allocated


def resize_weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out_size, in_size) float64 matrix of PyTorch's 1-D bilinear resampling (``align_corners=False``).

    ``antialias=True``: the triangle filter widened by the downscale factor and normalised per
    output sample (``F.interpolate(..., antialias=True)``); ``False``: plain two-tap bilinear
    with the source coordinate clamped at 0 (``F.interpolate(..., mode="bilinear")``).
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        inverse = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            centre = scale * (i + 0.5)
            low = max(int(centre - support + 0.5), 0)
            high = min(int(centre + support + 0.5), in_size)
            taps = np.maximum(1.0 - np.abs((np.arange(low, high) - centre + 0.5) * inverse), 0.0)
            if taps.sum() > 0:
                weights[i, low:high] = taps / taps.sum()
        return weights
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    first = np.minimum(source.astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    fraction = np.clip(source - first, 0.0, 1.0)
    np.add.at(weights, (np.arange(out_size), first), 1.0 - fraction)
    np.add.at(weights, (np.arange(out_size), second), fraction)
    return weights


def resize_planes(planes: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize the last two axes of ``planes`` (..., H, W) to ``size`` with :func:`resize_weights`; float32."""
    height, width = planes.shape[-2:]
    if (height, width) == tuple(size):
        return planes.astype(np.float32, copy=False)
    rows = resize_weights(height, size[0], antialias).astype(np.float32)
    columns = resize_weights(width, size[1], antialias).astype(np.float32)
    return (rows @ planes.astype(np.float32, copy=False) @ columns.T).astype(np.float32, copy=False)


def normalize_volume(image: np.ndarray, method: str) -> np.ndarray:
    """(S, H, W) float32, normalised over all voxels like MONAI's ``NormalizeIntensity`` ("zscore")
    or ``ScaleIntensityRangePercentiles(1, 99, 0, 1, clip=True)`` ("percentile")."""
    if method == "zscore":
        std = float(image.std(dtype=np.float64))
        return ((image - np.float32(image.mean(dtype=np.float64))) / np.float32(std if std != 0.0 else 1.0)).astype(
            np.float32
        )
    if method == "percentile":
        low, high = np.percentile(image, [1, 99])
        if high == low:
            return (image - np.float32(low)).astype(np.float32)
        return np.clip((image - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    raise DataError(f"normalization: expected zscore or percentile, got {method!r}")


def neighbour_slices(num_total: int, num_slices: int) -> np.ndarray:
    """int64 (num_total, num_slices): row s holds slices s - k .. s + k (k = num_slices // 2), edges replicated."""
    half = num_slices // 2
    return np.clip(np.arange(num_total)[:, None] + np.arange(-half, half + 1), 0, num_total - 1)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """(S, H, W) binary mask with only its largest 26-connected foreground component (as MONAI's
    ``KeepLargestConnectedComponent`` on label 1)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return mask
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return np.where(labels == largest, mask, 0).astype(mask.dtype)


class OnnxSegmenter:
    """An exported student under onnxruntime, with the preprocessing stored in the model.

    Args:
        model_path: ``.onnx`` file written by ``distill export``.
        batch_size: slice stacks per onnxruntime call.
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, model_path: str | Path, batch_size: int = 32, providers: list[str] | None = None) -> None:
        import onnxruntime

        model_path = Path(model_path)
        if not model_path.is_file():
            raise DataError(f"{model_path}: ONNX model not found")
        try:
            self.session = onnxruntime.InferenceSession(
                str(model_path), providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # noqa: BLE001 - any loader failure is the same user problem
            raise DataError(f"{model_path}: cannot load ONNX model ({' '.join(str(err).split())[:200]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise DataError(f"{model_path}: no {METADATA_KEY} metadata; export the model with `distill export`")
        try:
            self.preprocessing = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise DataError(f"{model_path}: {METADATA_KEY} metadata is not JSON ({err.msg})") from None
        if not isinstance(self.preprocessing, dict) or "num_slices" not in self.preprocessing:
            task = self.preprocessing.get("task", "non-segmentation") if isinstance(self.preprocessing, dict) else "?"
            raise DataError(f"{model_path}: a {task} model, not a segmentation student")
        self.model_path = model_path
        self.check_preprocessing()
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = batch_size

    def check_preprocessing(self) -> None:
        """Refuse metadata out of range or disagreeing with the graph's declared input and output shapes
        (``(batch, num_slices, size, size)`` in, ``(batch, num_classes, size, size)`` out; symbolic axes pass)."""
        settings, where = self.preprocessing, f"{self.model_path}: {METADATA_KEY}"
        for key, low, high in (("image_size", 8, MAX_IMAGE_SIZE), ("num_slices", 1, 63), ("num_classes", 2, 1000)):
            value = settings.get(key, 2 if key == "num_classes" else None)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise DataError(f"{where}: {key} = {value!r}, expected an integer in [{low}, {high}]")
        if settings["num_slices"] % 2 == 0:
            raise DataError(f"{where}: num_slices = {settings['num_slices']} must be odd (slice s and k on each side)")
        if settings.get("normalization") not in ("zscore", "percentile"):
            raise DataError(
                f"{where}: normalization = {settings.get('normalization')!r}, expected zscore or percentile"
            )
        size, classes = settings["image_size"], settings.get("num_classes", 2)
        for role, declared, expected in (
            ("input", self.session.get_inputs()[0].shape, (settings["num_slices"], size, size)),
            ("output", self.session.get_outputs()[0].shape, (classes, size, size)),
        ):
            self.check_shape(role, tuple(declared)[1:], expected)

    def check_shape(self, role: str, shape: tuple, expected: tuple) -> None:
        """DataError if a fixed axis of ``shape`` (``(C, H, W)`` past the batch axis) differs from ``expected``."""
        if len(shape) != len(expected) or any(isinstance(a, int) and a != b for a, b in zip(shape, expected)):
            raise DataError(
                f"{self.model_path}: the model's {role} is {'x'.join(map(str, shape))} per slice but its metadata "
                f"says {'x'.join(map(str, expected))} (channels x size x size); re-export it with `distill export`"
            )

    def network_input(self, image: np.ndarray) -> np.ndarray:
        """(S, H0, W0) raw volume -> (S, num_slices, size, size) float32 network input."""
        settings = self.preprocessing
        size = settings["image_size"]
        volume = resize_planes(
            normalize_volume(image.astype(np.float32), settings["normalization"]), (size, size), antialias=True
        )
        return np.ascontiguousarray(volume[neighbour_slices(volume.shape[0], settings["num_slices"])])

    def logits(self, image: np.ndarray) -> np.ndarray:
        """(S, H0, W0) raw volume -> (S, C, H0, W0) float32 logits resized back to the volume's grid."""
        stacks = self.network_input(image)
        chunks = []
        for start in range(0, stacks.shape[0], self.batch_size):
            logits = self.session.run(None, {self.input_name: stacks[start : start + self.batch_size]})[0]
            size = self.preprocessing["image_size"]
            self.check_shape("output", logits.shape[1:], (self.preprocessing.get("num_classes", 2), size, size))
            chunks.append(resize_planes(logits, image.shape[-2:], antialias=False))
        return np.concatenate(chunks)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(S, H0, W0) raw volume -> (S, H0, W0) uint8 class mask on the same grid."""
        return self.mask(self.logits(image))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """(S, C, H0, W0) logits of :meth:`logits` -> (S, H0, W0) uint8 class mask (argmax, then the
        largest component when the metadata asks for it)."""
        mask = logits.argmax(axis=1).astype(np.uint8)
        return keep_largest_component(mask) if self.preprocessing.get("largest_component") else mask


def read_volume(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """(S, H0, W0) float32 voxels (slices first) and the NIfTI image; DataError if unreadable, not 3D,
    too large (:func:`~distill.formats.nifti.read_nifti`) or not finite."""
    data, nifti = read_nifti(path)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: NaN/inf voxels")
    return np.ascontiguousarray(data.transpose(2, 0, 1)), nifti


def segment_nifti(model_path: str | Path, image_path: str | Path, out_path: str | Path, batch_size: int = 32) -> Path:
    """Segment ``image_path`` with the ONNX student ``model_path``; the mask goes to ``out_path``
    (which must not exist) on the input's grid and affine."""
    if not str(out_path).endswith((".nii", ".nii.gz")):
        raise DataError(f"{out_path}: the mask is written as NIfTI; name it .nii.gz (or .nii)")
    if Path(out_path).exists():
        raise DataError(f"{out_path}: already exists; refusing to overwrite")
    segmenter = OnnxSegmenter(model_path, batch_size=batch_size)
    image, nifti = read_volume(image_path)
    return write_mask_like(segmenter.predict(image), nifti, out_path)


def build_parser(prog: str) -> ToolParser:
    """Arguments of ``MODEL IN OUT [--batch-size N]``."""
    parser = ToolParser(
        prog=prog,
        description="Segment a NIfTI volume with an exported ONNX student (onnxruntime, no PyTorch). Preprocessing as "
        "the prostate DataModule's evaluation path, settings read from the model; the mask is written on the input's "
        "grid and affine (see distill/infer_onnx.py).",
    )
    parser.add_argument("model", help="ONNX student written by `distill export --format onnx`")
    parser.add_argument("image", help="input volume (.nii or .nii.gz)")
    parser.add_argument("out", help="mask to write (.nii.gz; must not exist)")
    parser.add_argument("--batch-size", type=int, default=32, help="slice stacks per onnxruntime call")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m distill.infer_onnx") -> None:
    """``python -m distill.infer_onnx MODEL IN OUT``, also run as ``distill segment-nifti``; prints the mask's path."""
    args = build_parser(prog).parse_args(argv)
    with one_line_errors():
        print(segment_nifti(args.model, args.image, args.out, args.batch_size))


if __name__ == "__main__":
    main()

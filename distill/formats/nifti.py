"""NIfTI volumes: the one reader (:func:`read_nifti`), and masks written on a reference volume's grid
(what ``distill predict`` and ``distill segment-nifti`` write).

Arrays are slices first, (S, H0, W0) = nibabel's (Z, X, Y); a mask is transposed back to
(X, Y, Z) and written as uint8 with the reference's affine and header, so viewers overlay it on
the input volume.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from distill.errors import DataError
from distill.utils import atomic_write

# what nibabel raises on a bad file
NIFTI_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
#: Volumes whose header claims more voxels are refused before reading (a damaged header, not an MRI
#: volume: 2^28 float32 voxels are 1 GiB); raise it to read larger volumes.
MAX_NIFTI_VOXELS = 2**28


def read_nifti(path: str | Path, channels: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Voxels float32 (X, Y, Z) (a trailing axis of length 1 dropped) and the image of a 3D NIfTI file;
    with ``channels``, (X, Y, Z, C) of a 3D (C = 1) or 4D (C channels, e.g. MSD's T2 + ADC) file.

    Every problem is a one-line DataError naming the file: unreadable, not 3D (or 4D), or a header
    claiming more than :data:`MAX_NIFTI_VOXELS` voxels (checked before anything is allocated).
    """
    path = Path(path)

    def unreadable(err: Exception) -> DataError:
        return DataError(f"{path}: cannot read NIfTI ({' '.join(f'{type(err).__name__}: {err}'.split())})")

    try:
        nifti = nib.load(path)
    except NIFTI_READ_ERRORS as err:
        raise unreadable(err) from None
    shape = tuple(int(n) for n in nifti.shape)
    if math.prod(shape) > MAX_NIFTI_VOXELS:
        raise DataError(
            f"{path}: header claims {'x'.join(map(str, shape))} = {math.prod(shape)} voxels, more than "
            f"MAX_NIFTI_VOXELS = {MAX_NIFTI_VOXELS} (a damaged header? raise distill.formats.nifti.MAX_NIFTI_VOXELS)"
        )
    try:
        data = nifti.get_fdata(dtype=np.float32)
    except NIFTI_READ_ERRORS as err:
        raise unreadable(err) from None
    if channels:
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise DataError(f"{path}: expected a 3D or 4D (X, Y, Z, channels) volume, got shape {data.shape}")
        return data, nifti
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, nifti


def write_mask_like(
    mask: np.ndarray, reference: nib.Nifti1Image, out_path: str | Path, overwrite: bool = False
) -> Path:
    """Write a (S, H0, W0) mask as uint8 (X, Y, Z) NIfTI with ``reference``'s affine and header.

    Written atomically (a kill never leaves a truncated file); refuses to replace an existing
    file unless ``overwrite`` (DataError). A mask off the reference's grid is the caller's mistake
    (ValueError).
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise DataError(f"{out_path}: already exists; pass overwrite=True to replace it")
    volume = np.ascontiguousarray(np.asarray(mask).transpose(1, 2, 0), dtype=np.uint8)
    if volume.shape != tuple(reference.shape[:3]):
        raise ValueError(
            f"{out_path}: mask of shape {np.shape(mask)} (S, H0, W0) does not fit "
            f"{reference.get_filename() or 'the reference'} of shape {reference.shape[:3]} (X, Y, Z)"
        )
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_path) as temporary:
        nib.save(nib.Nifti1Image(volume, reference.affine, header), temporary)
    return out_path


def save_mask_like(
    mask: np.ndarray, reference_image_path: str | Path, out_path: str | Path, overwrite: bool = False
) -> Path:
    """:func:`write_mask_like` on the grid of the NIfTI file ``reference_image_path``."""
    reference_path, out_path = Path(reference_image_path), Path(out_path)
    if out_path.exists() and not overwrite:  # before reading the reference
        raise DataError(f"{out_path}: already exists; pass overwrite=True to replace it")
    try:
        reference = nib.load(reference_path)
    except NIFTI_READ_ERRORS as err:
        raise DataError(f"{reference_path}: cannot read NIfTI ({' '.join(str(err).split())})") from err
    return write_mask_like(mask, reference, out_path, overwrite)

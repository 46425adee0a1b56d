"""Synthetic multi-site prostate T2 MRI, written in the real MS-Net/SAML layout.

No prostate MRI can be downloaded here, so tests and the demo read this tree through the real
loader. It has the release's names and quirks: six site folders, ``CaseXX.nii.gz`` images with
``CaseXX_segmentation.nii.gz`` masks (``_Segmentation`` at BMC), non-contiguous case ids
(BIDMC has no Case01, HK is Case38-Case49), zonal masks {0, 1, 2} at RUNMC and BMC (2 = central
gland), int16 or float32 images, int masks, thick axial slices, nibabel (X, Y, Z) arrays, Z axial.

Each volume is a pelvis-like scene: body outline, fat, muscles, bones, bladder above the gland,
rectum behind it, seminal vesicles at the base, and a few gland-like distractor blobs. The gland
(peripheral zone + nodular central zone, partial dark capsule, occasional dark lesion) shares
its intensity range and texture with fat and the distractors, so no intensity threshold
separates it; position relative to the rectum, bladder and muscles does. Every site renders
the scene with its own field of view, contrast (gamma, fat brightness), bias field, endorectal
coil shading, blur, noise and intensity scale, so leave-one-site-out is a real domain shift.

Everything derives from ``seed``: the same seed writes the same bytes (nibabel writes gzip with
a fixed mtime), and a case's content depends only on (seed, site, case id), not on ``scale``.
"""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from distill.errors import DataError


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition and appearance of one site; anatomy is drawn in mm, then rendered per site."""

    name: str
    case_ids: tuple[int, ...]
    mask_suffix: str  # "_segmentation" or "_Segmentation"
    real_matrix: int  # in-plane matrix at real resolution (px); ``size`` rescales it
    real_pixel_mm: float  # in-plane spacing at ``real_matrix`` (mm)
    slice_mm: float  # slice thickness (mm)
    slice_count: tuple[int, int]  # inclusive range of axial slices per volume
    zonal: bool  # masks hold 1 = peripheral gland, 2 = central gland
    image_dtype: type
    mask_dtype: type
    intensity_scale: float
    gamma: float
    fat_signal: float  # fat brightness relative to nominal (lower = fat-suppressed look)
    noise_sigma: float  # Rician noise, fraction of the unit signal range
    bias_strength: float  # std of the log multiplicative bias field
    coil_boost: float  # endorectal-coil brightening next to the rectum (0 = body coil)
    blur_mm: float  # in-plane point-spread sigma (mm)
    axis_signs: tuple[int, int]  # signs of the x/y affine columns (scanner orientation)


SITE_STYLES: tuple[SiteStyle, ...] = (
    SiteStyle(
        "RUNMC",
        tuple(range(30)),
        "_segmentation",
        real_matrix=384,
        real_pixel_mm=0.60,
        slice_mm=3.6,
        slice_count=(15, 24),
        zonal=True,
        image_dtype=np.int16,
        mask_dtype=np.uint8,
        intensity_scale=1200.0,
        gamma=1.0,
        fat_signal=1.0,
        noise_sigma=0.030,
        bias_strength=0.15,
        coil_boost=0.0,
        blur_mm=0.6,
        axis_signs=(-1, -1),
    ),
    SiteStyle(
        "BMC",
        tuple(range(30)),
        "_Segmentation",
        real_matrix=384,
        real_pixel_mm=0.40,
        slice_mm=3.0,
        slice_count=(17, 24),
        zonal=True,
        image_dtype=np.int16,
        mask_dtype=np.int16,
        intensity_scale=500.0,
        gamma=1.2,
        fat_signal=0.95,
        noise_sigma=0.060,
        bias_strength=0.20,
        coil_boost=1.2,
        blur_mm=0.8,
        axis_signs=(-1, -1),
    ),
    SiteStyle(
        "I2CVB",
        tuple(range(19)),
        "_segmentation",
        real_matrix=320,
        real_pixel_mm=0.55,
        slice_mm=1.8,
        slice_count=(26, 30),
        zonal=False,
        image_dtype=np.float32,
        mask_dtype=np.uint8,
        intensity_scale=1.0,
        gamma=0.8,
        fat_signal=0.85,
        noise_sigma=0.040,
        bias_strength=0.30,
        coil_boost=0.0,
        blur_mm=0.7,
        axis_signs=(1, 1),
    ),
    SiteStyle(
        "UCL",
        (1, *range(26, 38)),
        "_segmentation",
        real_matrix=384,
        real_pixel_mm=0.60,
        slice_mm=3.6,
        slice_count=(15, 22),
        zonal=False,
        image_dtype=np.float32,
        mask_dtype=np.uint8,
        intensity_scale=700.0,
        gamma=1.1,
        fat_signal=0.7,
        noise_sigma=0.035,
        bias_strength=0.10,
        coil_boost=0.0,
        blur_mm=0.6,
        axis_signs=(-1, 1),
    ),
    SiteStyle(
        "BIDMC",
        (0, *range(2, 13)),
        "_segmentation",
        real_matrix=320,
        real_pixel_mm=0.45,
        slice_mm=2.5,
        slice_count=(20, 28),
        zonal=False,
        image_dtype=np.int16,
        mask_dtype=np.int16,
        intensity_scale=2500.0,
        gamma=0.9,
        fat_signal=0.55,
        noise_sigma=0.050,
        bias_strength=0.25,
        coil_boost=1.5,
        blur_mm=0.5,
        axis_signs=(1, -1),
    ),
    SiteStyle(
        "HK",
        tuple(range(38, 50)),
        "_segmentation",
        real_matrix=384,
        real_pixel_mm=0.50,
        slice_mm=4.0,
        slice_count=(14, 20),
        zonal=False,
        image_dtype=np.float32,
        mask_dtype=np.uint8,
        intensity_scale=400.0,
        gamma=1.3,
        fat_signal=1.0,
        noise_sigma=0.045,
        bias_strength=0.15,
        coil_boost=0.0,
        blur_mm=0.9,
        axis_signs=(-1, -1),
    ),
)

_REAL_MATRIX_REFERENCE = 384  # ``size`` is the matrix of the sites whose real matrix is 384


def scaled_case_ids(style: SiteStyle, scale: float) -> list[int]:
    """Case ids written for ``style`` at ``scale``: the first round(scale x real count), at least 2.

    Beyond the real count (scale > 1) new ids continue after the site's last real id.
    """
    count = max(2, int(round(scale * len(style.case_ids))))
    extra = range(style.case_ids[-1] + 1, style.case_ids[-1] + 1 + max(0, count - len(style.case_ids)))
    return [*style.case_ids, *extra][:count]


def write_synthetic_prostate(
    out_dir: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    size: int = 128,
    num_threads: int = 4,
    overwrite: bool = False,
) -> Path:
    """Write the six-site tree under ``out_dir`` and return it.

    Args:
        out_dir: output root; site folders RUNMC/, BMC/, I2CVB/, UCL/, BIDMC/, HK/ are created in it
            and must not already hold files.
        seed: everything derives from it (same seed, same bytes).
        scale: fraction of the real per-site case counts (30, 30, 19, 13, 12, 12), at least 2 per site.
        size: in-plane matrix of the 384-px sites (real-like: 384); the 320-px sites get
            ``size * 320 / 384``. The physical field of view stays real-like, so the in-plane
            spacing is ``real spacing * real matrix / matrix`` (0.4-0.6 mm at size 384).
        num_threads: volumes rendered and compressed in parallel.
        overwrite: replace site folders that already hold files (refused otherwise).
    """
    if scale <= 0 or size < 16:
        raise DataError(f"synthetic prostate: need scale > 0 and size >= 16, got scale={scale}, size={size}")
    root = Path(out_dir)
    for style in SITE_STYLES:
        site_dir = root / style.name
        if site_dir.is_dir() and any(site_dir.iterdir()):
            if not overwrite:
                raise DataError(
                    f"{site_dir}: already holds files; write the synthetic tree into an empty folder (or pass --overwrite)"
                )
            shutil.rmtree(site_dir)
        site_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(style, case_id) for style in SITE_STYLES for case_id in scaled_case_ids(style, scale)]
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        list(pool.map(lambda job: _write_case(root, *job, seed=seed, size=size), jobs))
    return root


def _write_case(root: Path, style: SiteStyle, case_id: int, seed: int, size: int) -> None:
    """Render one case and save ``<site>/CaseXX.nii.gz`` + its mask."""
    site_index = SITE_STYLES.index(style)
    rng = np.random.default_rng([seed, site_index, case_id])
    matrix = max(16, int(round(size * style.real_matrix / _REAL_MATRIX_REFERENCE)))
    pixel_mm = style.real_pixel_mm * style.real_matrix / matrix
    shape = (matrix, matrix, int(rng.integers(style.slice_count[0], style.slice_count[1] + 1)))
    spacing = (pixel_mm, pixel_mm, style.slice_mm)

    signal, gland, central, rectum_centre = _render_anatomy(rng, shape, spacing, style.fat_signal)
    image = _acquire(rng, signal, spacing, style, rectum_centre)
    label = gland.astype(style.mask_dtype)
    if style.zonal:
        label[central] = 2

    affine = np.diag([style.axis_signs[0] * pixel_mm, style.axis_signs[1] * pixel_mm, style.slice_mm, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + [0.0, 0.0, rng.uniform(-20, 20)]
    stem = root / style.name / f"Case{case_id:02d}"
    nib.save(nib.Nifti1Image(image, affine), f"{stem}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), f"{stem}{style.mask_suffix}.nii.gz")


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Physical coordinates (mm) centred on the volume: x (X,1,1), y (1,Y,1), z (1,1,Z); +y is posterior."""
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    return [a.reshape([-1 if i == d else 1 for i in range(3)]) for d, a in enumerate(axes)]


def _radius(grid: list[np.ndarray], centre, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius (X, Y, Z): < 1 inside; an infinite semi-axis makes a tube."""
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes)))


@functools.cache
def _upsampling_matrix(fine: int, coarse: int) -> np.ndarray:
    """(fine, coarse) cubic-spline zoom as a matrix: column j is the j-th unit vector zoomed to ``fine``."""
    matrix = ndimage.zoom(np.eye(coarse, dtype=np.float32), (fine / coarse, 1), order=3, mode="nearest")
    matrix.setflags(write=False)
    return matrix


def _smooth_noise(rng: np.random.Generator, shape, coarse=(5, 5, 4)) -> np.ndarray:
    """Low-frequency random field (X, Y, Z), unit std, clipped to [-2, 2] (lobulation, bias).

    Equal to ``ndimage.zoom(coarse noise, order=3)`` (the spline zoom is separable) but applied as
    three small matrix products, which is ~50x faster than zooming the volume.
    """
    bases = [_upsampling_matrix(n, c) for n, c in zip(shape, coarse)]
    field = np.einsum("xi,yj,zk,ijk->xyz", *bases, rng.standard_normal(coarse, dtype=np.float32), optimize=True)
    return np.clip(field / field.std(), -2, 2)


def _texture(rng: np.random.Generator, shape, sigma_px) -> np.ndarray:
    """Band-limited Gaussian texture (X, Y, Z) with unit std; ``sigma_px`` sets its grain."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return field / field.std()


def _render_anatomy(rng, shape, spacing, fat_signal):
    """Paint the pelvis scene in unit T2 signal.

    Returns:
        signal float32 (X, Y, Z) in about [0, 1]; gland bool (X, Y, Z); central gland bool (X, Y, Z);
        rectum centre (x, y) in mm (where an endorectal coil would sit).
    """
    grid = _grid(shape, spacing)
    z = grid[2]
    u = rng.uniform
    fine = _texture(rng, shape, np.divide(0.8, spacing))
    nodular = _texture(rng, shape, np.divide(3.0, spacing))
    half_depth = shape[2] * spacing[2] / 2
    inf = np.inf  # semi-axis of structures that run through every slice

    def blob(centre, semi_axes, lobulation: float = 0.0) -> np.ndarray:
        """Normalised radius (X, Y, Z) of an ellipsoid whose surface a smooth random field pushes in/out."""
        radius = _radius(grid, centre, semi_axes)
        return radius / (1 + lobulation * _smooth_noise(rng, shape)) if lobulation else radius

    signal = np.full(shape, 0.02, np.float32)  # air

    def paint(region, values):
        signal[region] = values[region] if isinstance(values, np.ndarray) else values

    # Gland placement first: everything else is arranged around it. Its craniocaudal extent
    # leaves at least two empty slices at each end, even after lobulation (factor <= 1.2).
    centre = np.array([u(-10, 10), u(-15, 5), u(-0.1, 0.1) * half_depth])
    semi = np.array([u(17, 25), u(12, 18), 0.0])
    semi[2] = min(u(16, 24), (half_depth - 2 * spacing[2] - abs(centre[2])) / 1.25)
    taper = 1 + u(0.1, 0.3) * np.clip((z - centre[2]) / semi[2], -1, 1)  # narrow apex, wide base

    paint(blob((0, u(0, 10), 0), (u(130, 170), u(95, 125), inf)) < 1, 0.78 * fat_signal * u(0.9, 1.05) + 0.05 * fine)
    muscle = 0.22 + 0.03 * fine
    for side in (-1, 1):
        # gluteus, obturator internus, levator ani
        paint(blob((side * u(60, 80), u(60, 80), 0), (u(35, 45), u(30, 40), inf), 0.1) < 1, muscle)
        paint(blob((side * u(55, 70), centre[1] + u(-5, 5), 0), (u(10, 14), u(30, 40), inf), 0.1) < 1, muscle)
        paint(blob((side * (semi[0] + u(8, 14)), centre[1] + 0.5 * semi[1], 0), (4, 16, inf), 0.3) < 1, muscle)
        femoral_head = blob((side * u(85, 100), centre[1] + u(-5, 10), 0), (22, 22, inf))
        pubis = blob((side * u(8, 14), centre[1] - semi[1] - u(18, 28), 0), (8, 10, inf))
        for bone in (femoral_head, pubis):
            paint(bone < 1, 0.04)  # cortex
            paint(bone < 0.8, 0.6 * fat_signal + 0.05 * fine)  # marrow

    bladder_centre = (centre[0] + u(-5, 5), centre[1] - u(5, 15), centre[2] + semi[2] + u(15, 30))
    bladder = blob(bladder_centre, (u(30, 45), u(25, 35), u(20, 30)), 0.1)
    paint(bladder < 1, 0.25)
    paint(bladder < 0.92, 0.95 + 0.02 * fine)

    rectum_semi = (u(12, 18), u(9, 13), inf)
    rectum_centre = (centre[0] + u(-4, 4), centre[1] + semi[1] + 0.8 * rectum_semi[1], 0)
    rectum = blob(rectum_centre, rectum_semi)
    paint(rectum < 1, 0.2 + 0.03 * fine)
    paint(rectum < 0.7, u(0.05, 0.6) + 0.1 * nodular)  # air, fluid or stool

    for side in (-1, 1):  # seminal vesicles: bright convoluted tubes behind the base
        vesicle_centre = (centre[0] + side * u(12, 20), centre[1] + 0.7 * semi[1], centre[2] + 0.8 * semi[2])
        paint(blob(vesicle_centre, (u(10, 15), u(4, 7), u(5, 8)), 0.25) < 1, 0.7 + 0.1 * fine)

    # Distractors (nodes, bowel, vessels): gland-like texture and intensity, anterior or lateral,
    # half of them with a dark rim like the gland's capsule.
    for _ in range(rng.integers(2, 6)):
        angle = u(0.9, 2.1) * np.pi  # y < 0 is anterior
        blob_semi = (u(6, 14), u(6, 14), u(6, 14))
        distance = u(1.1, 2.2) * semi[:2].mean() + 0.8 * blob_semi[0]
        offset = (distance * np.cos(angle), distance * np.sin(angle), u(-0.8, 0.8) * semi[2])
        distractor = blob(centre + offset, blob_semi, 0.2)
        if rng.random() < 0.5:
            paint(distractor < 1.15, 0.28)
        paint(distractor < 1, u(0.38, 0.7) + 0.08 * nodular + 0.06 * fine)

    # The gland: lobulated, tapered ellipsoid with the rectum pressing on its back.
    gland_radius = blob(centre, (semi[0] * taper, semi[1] * taper, semi[2]), 0.1)
    gland = (gland_radius < 1) & (rectum > 1.15)
    capsule = (gland_radius < 1 + 1.5 / semi[0]) & ~gland & (_smooth_noise(rng, shape) > -0.3) & (rectum > 1)
    paint(capsule, 0.28)
    paint(gland, u(0.48, 0.72) + 0.08 * fine + 0.04 * nodular)  # peripheral zone
    central = gland & (blob(centre + [0, -0.2 * semi[1], 0.15 * semi[2]], semi * u(0.45, 0.7), 0.15) < 1)
    paint(central, u(0.35, 0.5) + 0.1 * nodular + 0.04 * fine)
    if rng.random() < 0.5:  # a dark focal lesion in the peripheral zone
        lesion_centre = centre + semi * [u(-0.6, 0.6), u(0.2, 0.6), u(-0.5, 0.5)]
        paint(gland & ~central & (blob(lesion_centre, (6, 5, 6)) < 1), 0.3 + 0.04 * fine)
    return signal, gland, central, rectum_centre[:2]


def _acquire(rng, signal, spacing, style: SiteStyle, rectum_centre) -> np.ndarray:
    """Render unit signal (X, Y, Z) as ``style``'s scanner would: blur, gamma, bias, coil, Rician noise, scale."""
    image = ndimage.gaussian_filter(signal, (style.blur_mm / spacing[0], style.blur_mm / spacing[1], 0))
    image = np.clip(image, 0, None) ** (style.gamma * rng.uniform(0.9, 1.1))
    image *= np.exp(style.bias_strength * _smooth_noise(rng, signal.shape, coarse=(4, 4, 3)))
    if style.coil_boost:
        x, y, _ = _grid(signal.shape, spacing)
        image *= 1 + style.coil_boost * np.exp(-np.hypot(x - rectum_centre[0], y - rectum_centre[1]) / 25.0)
    sigma = style.noise_sigma * rng.uniform(0.8, 1.2)
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * sigma
    image = np.hypot(image + noise[0], noise[1]) * style.intensity_scale * rng.uniform(0.8, 1.2)
    if np.issubdtype(style.image_dtype, np.integer):
        return np.round(np.clip(image, 0, np.iinfo(style.image_dtype).max)).astype(style.image_dtype)
    return image.astype(style.image_dtype)


#: Zonal classes of the synthetic masks (1 peripheral zone, 2 central / transition zone), as MSD Task05 numbers them.
ZONAL_LABELS: dict[str, int] = {"PZ": 1, "TZ": 2}


def synthetic_adc(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A made-up second channel (X, Y, Z) for multi-channel tests: smoothed, inverted T2 contrast
    with a brighter peripheral zone. Not a physical ADC map; it only gives a second input to learn from."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), (1, 1, 0))
    return (smooth.max() - smooth + 0.3 * smooth.std() * (mask == 1)).astype(np.float32)


def write_layout(
    source_root: str | Path, out_dir: str | Path, layout: str, sites: tuple[str, ...] = ("RUNMC", "BMC")
) -> Path:
    """Rewrite the cases of ``sites`` of a synthetic six-site tree in another layout, for tests and trials.

    ``datalist``: the files under ``<out>/<site>/`` and a MONAI ``dataset.json`` (training list with
    ``site``); ``msd``: Task05_Prostate's layout (``imagesTr/prostate_NN.nii.gz`` 4D T2 +
    :func:`synthetic_adc`, ``labelsTr/``, ``dataset.json`` with ``modality`` and ``labels``);
    ``nnunet``: nnU-Net v2 raw (``imagesTr/prostate_NN_0000.nii.gz`` T2, ``_0001`` the second
    channel, ``labelsTr/prostate_NN.nii.gz``, ``dataset.json`` with ``channel_names``, ``labels``,
    ``file_ending``). Masks keep their values (RUNMC and BMC are zonal: 1 PZ, 2 TZ).
    """
    import json

    source, out = Path(source_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for site in sites:
        for image_path in sorted((source / site).glob("Case??.nii.gz")):
            mask_path = next((source / site).glob(f"{image_path.name[:6]}_*egmentation.nii.gz"))
            entries.append((site, image_path, mask_path))
    training = []
    for number, (site, image_path, mask_path) in enumerate(entries):
        image, mask = nib.load(image_path), nib.load(mask_path)
        if layout == "datalist":
            (out / site).mkdir(exist_ok=True)
            shutil.copy(image_path, out / site / image_path.name)
            shutil.copy(mask_path, out / site / mask_path.name)
            training.append({"image": f"{site}/{image_path.name}", "label": f"{site}/{mask_path.name}", "site": site})
            continue
        t2 = np.asarray(image.dataobj, dtype=np.float32)
        labels = np.asarray(mask.dataobj).astype(np.uint8)
        adc = synthetic_adc(t2, labels)
        name = f"prostate_{number:02d}"
        (out / "imagesTr").mkdir(exist_ok=True)
        (out / "labelsTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(labels, image.affine), out / "labelsTr" / f"{name}.nii.gz")
        if layout == "msd":
            nib.save(nib.Nifti1Image(np.stack([t2, adc], axis=3), image.affine), out / "imagesTr" / f"{name}.nii.gz")
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        elif layout == "nnunet":
            for channel, volume in enumerate((t2, adc)):
                nib.save(nib.Nifti1Image(volume, image.affine), out / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        else:
            raise DataError(f"layout: 'datalist', 'msd' or 'nnunet', got {layout!r}")
    if layout == "nnunet":
        spec = {
            "channel_names": {"0": "T2", "1": "ADC"},
            "labels": {"background": 0, **ZONAL_LABELS},
            "numTraining": len(entries),
            "file_ending": ".nii.gz",
        }
    else:
        spec = {"name": "Prostate", "modality": {"0": "T2", "1": "ADC"} if layout == "msd" else {"0": "T2"}}
        spec |= {"labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": len(entries)}
        spec |= {"training": training, "test": []}
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out

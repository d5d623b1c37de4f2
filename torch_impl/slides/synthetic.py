"""A synthetic mini-CAMELYON16: small pyramidal TIFF slides with H&E-like tissue and lesions.

Real CAMELYON16 is ~700 GB; the demo, the tutorials and the tests need something that is
generated in seconds yet exercises the same code path: the CAMELYON16 folder layout, tiled
JPEG pyramidal TIFFs that OpenSlide opens as "generic-tiff" with a recorded resolution,
ASAP XML lesion polygons and a test reference CSV.

How one slide is painted (all vectorised, float32, level-0 pixels of `mpp` um):
  * tissue: a smooth random field (white noise on a coarse grid, Gaussian-blurred,
    pushed down outside a central ellipse, upsampled bilinearly) thresholded at the quantile
    that gives 30-50% tissue: a few blobs with smooth borders on a white background;
  * stroma: pink, its shade modulated by a finer smooth field (fibre-like texture);
  * nuclei: random impulses (Poisson density per um^2) blurred by a Gaussian of ~1.2 um,
    blended towards dark purple;
  * lesions (tumour slides only): 1-3 star-shaped polygons covering 6-14% of the tissue,
    painted purple with nuclei 4x denser and darker. At 4 um/px (16x smaller) they are
    still clearly darker purple blobs, so a small CNN can learn them at low resolution.
The lesion polygons are what gets written as ASAP XML; the lesion mask is those polygons
rasterised with `rasterize_polygons`, so annotation and texture agree by construction.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from .camelyon import SlideRecord, rasterize_polygons, write_asap_xml

logger = logging.getLogger(__name__)

# RGB colours (0-255). Stroma shades lerp from LIGHT to DARK with the fibre texture; nuclei
# blend towards NUC with their density.
_BACKGROUND = (242.0, 241.0, 244.0)
_NORMAL_LIGHT, _NORMAL_DARK = (244.0, 200.0, 222.0), (222.0, 140.0, 182.0)  # pink stroma
_NORMAL_NUC = (92.0, 56.0, 140.0)  # purple nuclei
_TUMOR_LIGHT, _TUMOR_DARK = (196.0, 150.0, 205.0), (160.0, 105.0, 175.0)  # purple tumour
_TUMOR_NUC = (62.0, 32.0, 112.0)  # darker nuclei

_NUCLEUS_SIGMA_UM = 1.2  # Gaussian sigma of a nucleus (diameter ~5 um)
_NORMAL_NUCLEI_PER_UM2 = 1 / 14.0**2  # one nucleus per 14 x 14 um of stroma
_TUMOR_NUCLEI_PER_UM2 = 1 / 7.0**2  # 4x denser in lesions
_FIBRE_CELL_UM = 4.0  # grid step of the fibre texture
_LEVELS = 64  # quantisation steps of shade and nucleus density in the colour table
_TILE = 256  # TIFF tile side, pixels
_MIN_LEVEL_SIZE = 256  # stop the pyramid once the larger side is <= this


@dataclass
class SyntheticSlide:
    """One painted slide, level 0.

    Attributes:
        rgb: (H, W, 3) uint8.
        tissue: (H, W) bool, tissue (lesions included).
        lesion: (H, W) bool, tumour (all False for normal slides).
        polygons: lesion outlines, a list of (N_i, 2) float64 (x, y) arrays in level-0 pixels.
    """

    rgb: np.ndarray
    tissue: np.ndarray
    lesion: np.ndarray
    polygons: list[np.ndarray]


def slide_seed(seed: int, slide_id: str) -> int:
    """The seed of one slide: depends only on the data-set seed and the slide id.

    Uses crc32 (not Python's `hash`, which is salted per process) so that a slide can be
    regenerated on its own, e.g. by a test that wants its ground-truth masks.
    """
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(zlib.crc32(slide_id.encode()),))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _smooth_field(rng: np.random.Generator, grid_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """(gh, gw) float32 smooth random field, zero mean and unit std."""
    f = ndimage.gaussian_filter(rng.standard_normal(grid_hw, dtype=np.float32), sigma, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _upsample(field: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 (gh, gw) field to (H, W)."""
    img = Image.fromarray(field.astype(np.float32), mode="F")
    return np.asarray(img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, n_vertices: int = 64) -> np.ndarray:
    """(n_vertices, 2) (x, y) of a blob: r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)).

    Harmonics k = 2..4 with amplitudes a_k <= 0.12 keep r > 0, so the polygon is simple.
    """
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
    r *= radius
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def synthesize_slide(size: tuple[int, int], tumor: bool, seed: int, mpp: float = 0.25) -> SyntheticSlide:
    """Paint one slide of `size` = (H, W) level-0 pixels at `mpp` um/px (module docstring)."""
    H, W = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)

    # Tissue: smooth field on a grid of (min side / 32)-px cells, lowered outside an ellipse
    # (normalised radius rho = 1 at the middle of each side) so tissue stays off the border.
    cell = max(4, min(H, W) // 32)
    gh, gw = math.ceil(H / cell), math.ceil(W / cell)
    field = _smooth_field(rng, (gh, gw), sigma=3.0)
    ry = (np.arange(gh) + 0.5) / gh * 2 - 1  # (gh,) in (-1, 1)
    rx = (np.arange(gw) + 0.5) / gw * 2 - 1  # (gw,)
    rho = np.sqrt(ry[:, None] ** 2 + rx[None, :] ** 2)  # (gh, gw)
    field -= 6.0 * np.clip((rho - 0.7) / 0.3, 0.0, 1.0)
    threshold = np.quantile(field, 1.0 - rng.uniform(0.3, 0.5))
    tissue = _upsample(field, (H, W)) > threshold  # (H, W)

    # Lesions: star polygons centred deep inside tissue.
    polygons: list[np.ndarray] = []
    lesion = np.zeros((H, W), dtype=bool)
    if tumor:
        coarse = field > threshold  # (gh, gw) tissue on the grid
        depth = ndimage.distance_transform_edt(coarse) * cell  # level-0 px to background
        n_lesions = int(rng.integers(1, 4))
        area = rng.uniform(0.06, 0.14) * tissue.sum() / n_lesions  # per lesion, px
        radius = math.sqrt(area / math.pi)
        for _ in range(n_lesions):
            ok = np.argwhere(depth >= 0.8 * radius)
            if len(ok) == 0:
                ok = np.argwhere(depth == depth.max())
            iy, ix = ok[rng.integers(len(ok))]
            cy, cx = (iy + rng.uniform()) * cell, (ix + rng.uniform()) * cell
            polygons.append(_star_polygon(rng, cx, cy, radius))
        lesion = rasterize_polygons(polygons, (H, W), 1.0)
        tissue |= lesion

    # Colour: stroma shade (fibre texture t), then nuclei (density n) on top.
    fc = max(1, round(_FIBRE_CELL_UM / mpp))
    t = _upsample(_smooth_field(rng, (math.ceil(H / fc), math.ceil(W / fc)), 1.5), (H, W))
    t = np.clip(0.5 + 0.3 * t, 0.0, 1.0)  # (H, W) stroma shade

    # Nuclei are drawn on a half-resolution grid (blur cost / 4) and upsampled: a nucleus
    # is a Gaussian of sigma ~5 px at level 0, smooth at either resolution.
    half = lesion[::2, ::2]  # (H/2, W/2)
    per_px = (2 * mpp) ** 2  # um^2 per half-resolution pixel
    p = np.where(half, np.float32(_TUMOR_NUCLEI_PER_UM2 * per_px), np.float32(_NORMAL_NUCLEI_PER_UM2 * per_px))
    impulses = (rng.random(half.shape, dtype=np.float32) < p).astype(np.float32)
    sigma = _NUCLEUS_SIGMA_UM / (2 * mpp)
    n = ndimage.gaussian_filter(impulses, sigma) * np.float32(0.85 * 2 * np.pi * sigma**2)
    n = np.clip(_upsample(n, (H, W)), 0.0, 1.0)  # (H, W), 0.85 at a nucleus centre

    # Per-pixel colour through a lookup table instead of (H, W, 3) float arithmetic:
    # class c (0 background, 1 stroma, 2 lesion) x shade level x nucleus level -> RGB.
    # Quantising t and n to _LEVELS steps is invisible under the sensor noise added below.
    jitter = 1.0 + rng.uniform(-0.03, 0.03, size=3)  # stain variation, per channel
    lut = _colour_table(jitter).reshape(-1, 3)  # (3 * _LEVELS * _LEVELS, 3) uint8
    cls = tissue.astype(np.uint16) + lesion  # (H, W) in {0, 1, 2}
    tq = (t * (_LEVELS - 1) + 0.5).astype(np.uint16)
    nq = (n * (_LEVELS - 1) + 0.5).astype(np.uint16)
    rgb = np.take(lut, (cls * _LEVELS + tq) * _LEVELS + nq, axis=0)  # (H, W, 3)
    noise = rng.integers(-4, 5, size=(H, W, 1), dtype=np.int16)  # sensor noise, same on R, G, B
    rgb = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    return SyntheticSlide(rgb=rgb, tissue=tissue, lesion=lesion, polygons=polygons)


def _colour_table(jitter: np.ndarray) -> np.ndarray:
    """(3, L, L, 3) uint8 RGB for class (background, stroma, lesion) x shade t x nuclei n.

    colour = (light + (dark - light) t) (1 - n) + nucleus n, times the per-channel jitter;
    the background ignores t, n and the jitter.
    """
    q = np.linspace(0.0, 1.0, _LEVELS)
    t, n = q[:, None, None], q[None, :, None]  # (L, 1, 1), (1, L, 1)
    table = np.empty((3, _LEVELS, _LEVELS, 3))
    table[0] = _BACKGROUND
    for c, (light, dark, nuc) in (
        (1, (_NORMAL_LIGHT, _NORMAL_DARK, _NORMAL_NUC)),
        (2, (_TUMOR_LIGHT, _TUMOR_DARK, _TUMOR_NUC)),
    ):
        light, dark, nuc = np.array(light), np.array(dark), np.array(nuc)
        table[c] = ((light + (dark - light) * t) * (1.0 - n) + nuc * n) * jitter
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


def pyramid(rgb: np.ndarray, min_size: int = _MIN_LEVEL_SIZE) -> list[np.ndarray]:
    """[level 0, level 1, ...]: each level the 2x2 mean of the previous, until max side <= min_size.

    Every level is an exact 2x downsample (OpenSlide then reports downsamples 1, 2, 4, ...),
    so both sides must be divisible by 2 at every step: multiples of 256 always work.
    """
    levels = [rgb]
    while max(levels[-1].shape[:2]) > min_size:
        a = levels[-1]
        h, w = a.shape[:2]
        if h % 2 or w % 2:
            raise ValueError(
                f"slide size {rgb.shape[:2]} halves to an odd size {(h, w)} before reaching "
                f"{min_size} px; use sizes divisible by a power of two (e.g. multiples of 256)"
            )
        # four strided adds: the same sum as reshape(...).sum(axis=(1, 3)), ~10x faster
        s = a[0::2, 0::2].astype(np.uint16)
        s += a[1::2, 0::2]
        s += a[0::2, 1::2]
        s += a[1::2, 1::2]
        s += 2
        s //= 4
        levels.append(s.astype(np.uint8))  # rounded mean, (h/2, w/2, 3)
    return levels


def write_pyramid_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float, quality: int = 90) -> None:
    """Write (H, W, 3) uint8 as a tiled (256 px) JPEG pyramidal TIFF that OpenSlide opens.

    One top-level page per pyramid level (OpenSlide's generic-tiff reader takes tiled pages,
    not SubIFDs), each with XResolution = YResolution = 1e4 / level_mpp pixels per centimetre,
    from which OpenSlide derives `openslide.mpp-x/y`.
    """
    levels = pyramid(rgb)
    bigtiff = sum(a.nbytes for a in levels) > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                photometric="rgb",
                tile=(_TILE, _TILE),
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,  # 1 = reduced-resolution copy
                metadata=None,
            )


@dataclass(frozen=True)
class DataPreset:
    """The default size of a synthetic data set: slide counts, level-0 size (H, W) px and um/px."""

    n_normal: int
    n_tumor: int
    n_test_normal: int
    n_test_tumor: int
    size: tuple[int, int]
    mpp: float


#: `make_demo_data`'s difficulties and their defaults. "demo": big, darker lesions (this
#: module's painter); "camelyon": small lesions visible only at fine scale, with confounders
#: (`synthetic_camelyon.py`), in CAMELYON16's class balance (160 + 110 training, 80 + 49 test
#: slides) scaled down to 2 mm square slides.
DIFFICULTIES: dict[str, DataPreset] = {
    "demo": DataPreset(n_normal=6, n_tumor=6, n_test_normal=4, n_test_tumor=4, size=(2048, 2048), mpp=0.25),
    "camelyon": DataPreset(n_normal=24, n_tumor=16, n_test_normal=12, n_test_tumor=8, size=(8192, 8192), mpp=0.25),
}

#: Columns of `<root>/lesions.csv` (written for the "camelyon" difficulty).
LESION_CSV_COLUMNS = (
    "slide_id",
    "split",
    "label",
    "n_lesions",
    "largest_lesion_mm",
    "lesion_area_mm2",
    "category",
)


def make_demo_data(
    root: str | os.PathLike,
    n_normal: int | None = None,
    n_tumor: int | None = None,
    n_test_normal: int | None = None,
    n_test_tumor: int | None = None,
    size: int | tuple[int, ...] | None = (),
    seed: int = 0,
    mpp: float | None = None,
    difficulty: str = "demo",
) -> list[SlideRecord]:
    """Write a synthetic CAMELYON16 under `root` and return its records (as `discover` would).

    Layout: training/{normal,tumor}/*.tif, training/lesion_annotations/tumor_*.xml,
    testing/images/test_*.tif, testing/lesion_annotations/test_*.xml (tumour test slides),
    testing/reference.csv (no header, `test_001,Tumor,Macro` / `test_002,Normal`).
    Test labels are a seeded shuffle of n_test_normal zeros and n_test_tumor ones.
    Slides are `size` = (H, W) (or H for H x H) level-0 pixels at `mpp` um/px with levels
    1x, 2x, 4x, ... Counts, `size` and `mpp` left at None (or `size` empty) take the
    difficulty's preset (:data:`DIFFICULTIES`; "demo": 6 + 6 training and 4 + 4 test slides of
    2048 x 2048 px at 0.25 um/px).

    `difficulty` "demo" paints with :func:`synthesize_slide` (every tumour test slide is
    `Tumor,Macro`); "camelyon" with :func:`~torch_impl.slides.synthetic_camelyon.synthesize_camelyon_slide`:
    reference.csv says `Tumor,Macro` or `Tumor,Micro` by the largest lesion (ITC-sized ones
    count as Micro, as CAMELYON16 has no third class), and `<root>/lesions.csv` lists every
    slide's lesions (:data:`LESION_CSV_COLUMNS`; category none / itc / micro / macro).
    Everything is a function of `seed`; existing files are overwritten.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}; got {difficulty!r}")
    preset = DIFFICULTIES[difficulty]
    n_normal = preset.n_normal if n_normal is None else n_normal
    n_tumor = preset.n_tumor if n_tumor is None else n_tumor
    n_test_normal = preset.n_test_normal if n_test_normal is None else n_test_normal
    n_test_tumor = preset.n_test_tumor if n_test_tumor is None else n_test_tumor
    mpp = preset.mpp if mpp is None else mpp
    if size is None or (not isinstance(size, int) and len(size) == 0):
        size = preset.size
    root = Path(root)
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    camelyon = difficulty == "camelyon"
    paint = synthesize_slide
    if camelyon:  # imported here: synthetic_camelyon builds on this module
        from .synthetic_camelyon import synthesize_camelyon_slide as paint
    rng = np.random.default_rng(seed)
    test_labels = rng.permutation([0] * n_test_normal + [1] * n_test_tumor)
    # (slide id, label, split, slide folder, annotation folder or None)
    plan: list[tuple[str, int, str, Path, Path | None]] = []
    train_ann = root / "training" / "lesion_annotations"
    test_ann = root / "testing" / "lesion_annotations"
    for i in range(1, n_normal + 1):
        plan.append((f"normal_{i:03d}", 0, "train", root / "training" / "normal", None))
    for i in range(1, n_tumor + 1):
        plan.append((f"tumor_{i:03d}", 1, "train", root / "training" / "tumor", train_ann))
    for i, label in enumerate(test_labels, start=1):
        plan.append((f"test_{i:03d}", int(label), "test", root / "testing" / "images", test_ann if label else None))

    planned = {folder / f"{slide_id}.tif" for slide_id, _, _, folder, _ in plan}
    folders = {folder for _, _, _, folder, _ in plan}
    stale = [
        p for folder in sorted(folders) if folder.is_dir() for p in sorted(folder.glob("*.tif")) if p not in planned
    ]
    if stale:
        logger.warning(
            "%s already holds %d other slide(s) (e.g. %s) that discover() will also find; use an empty directory",
            root,
            len(stale),
            stale[0].name,
        )

    start = time.perf_counter()
    records = []
    lesion_rows: list[tuple] = []
    for slide_id, label, split, folder, ann_folder in plan:
        slide = paint((H, W), bool(label), slide_seed(seed, slide_id), mpp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{slide_id}.tif"
        write_pyramid_tiff(path, slide.rgb, mpp)
        ann_path = None
        if ann_folder is not None:
            ann_folder.mkdir(parents=True, exist_ok=True)
            ann_path = ann_folder / f"{slide_id}.xml"
            write_asap_xml(ann_path, slide.polygons)
        records.append(SlideRecord(slide_id, path, label, split, ann_path))
        if camelyon:
            lesion_rows.append(_lesion_row(slide, slide_id, split, label, mpp))
        logger.debug(
            "wrote %s (label %d, %.1f%% tissue, %.1f%% of it lesion)",
            path,
            label,
            100 * slide.tissue.mean(),
            100 * slide.lesion.sum() / max(int(slide.tissue.sum()), 1),
        )

    categories = {row[0]: row[-1] for row in lesion_rows}
    if len(test_labels):
        with open(root / "testing" / "reference.csv", "w") as f:
            for r in records:
                if r.split == "test":
                    f.write(f"{r.slide_id},{_reference_label(r, categories)}\n")
    if camelyon:
        with open(root / "lesions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(LESION_CSV_COLUMNS)
            writer.writerows(lesion_rows)
    logger.info(
        "wrote %d synthetic slides of %dx%d px at %g um/px to %s in %.1f s",
        len(records),
        H,
        W,
        mpp,
        root,
        time.perf_counter() - start,
    )
    return records


def _reference_label(record: SlideRecord, categories: dict[str, str]) -> str:
    """A reference.csv label: Normal, or Tumor,Macro / Tumor,Micro by the largest lesion's
    category (Macro when unknown: the demo's big lesions)."""
    if not record.label:
        return "Normal"
    return "Tumor,Macro" if categories.get(record.slide_id, "macro") == "macro" else "Tumor,Micro"


def _lesion_row(slide: SyntheticSlide, slide_id: str, split: str, label: int, mpp: float) -> tuple:
    """One row of lesions.csv (:data:`LESION_CSV_COLUMNS`) for a painted CamelyonSlide."""
    lesions = getattr(slide, "lesions", [])
    largest = max((lesion.diameter_mm for lesion in lesions), default=0.0)
    area = int(slide.lesion.sum()) * (mpp / 1000) ** 2  # the painted union, mm^2
    category = lesions[0].category if lesions else "none"
    return (slide_id, split, label, len(lesions), f"{largest:.4f}", f"{area:.6f}", category)

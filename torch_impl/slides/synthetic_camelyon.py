"""A harder synthetic CAMELYON16: small metastases that only a high-resolution model can see.

The demo data (`synthetic.py`) paints lesions as darker purple blobs that a model finds at
8 um/px. Here a lesion differs from normal tissue only at the scale of single cells, and the
lesions are as small as CAMELYON16's, so that the resolution a model trains at should matter.
`docs/synthetic_camelyon.md` has the full description and the parameter table
(:class:`CamelyonParams`).

Generative model of one slide (`size` = (H, W) level-0 px at `mpp` um/px; every length below
is in micrometres and converted with the painting resolution):

  * Painting resolution: the fields are painted at `paint_mpp` (0.5 um/px, or `mpp` if that
    is coarser) and the finished RGB is upsampled bilinearly to level 0, so level 0 holds no
    detail finer than 0.5 um.
  * Colour is Beer-Lambert: optical density OD = H * h + E * e per pixel (h, e: RGB stain
    vectors), transmittance T = exp(-OD), RGB = white * T. Per slide the H and E strengths,
    the stain vectors and the white level vary (stain variation acts on the stains, not on RGB).
  * Tissue: a smooth random field thresholded to cover `tissue_fraction` of the slide, kept
    off the border (as in `synthetic.py`).
  * Normal tissue: eosin stroma with a fibre texture, scattered small round uniform dark
    nuclei (Gaussian blobs through a soft threshold), and dense lymphocyte regions (the same
    small dark nuclei, crowded): purple at coarse scale, small uniform nuclei at fine scale.
  * Lesions (tumour slides): the largest lesion's diameter comes from
    :func:`sample_lesion_diameters` (categories itc / micro / macro like CAMELYON16's, the
    macro class scaled to the 2 mm slide), plus Poisson(`satellite_mean`) smaller satellites.
    Each is a smooth star-shaped polygon whose largest diameter (Feret) is the drawn one,
    inside tissue and apart from the others (shrunk where there is no room: the recorded
    sizes are the painted ones). Inside a lesion the nuclei are larger, pleomorphic (random
    sizes and elongation), crowded (a hard-core point process) and textured (chromatin
    noise), and paler per unit area.
  * Coarse-scale compensation: a tumour painting T_tum and the normal painting T_norm of the
    same place are combined as T = T_tum - G(T_tum) + G(T_norm) inside lesions (G: Gaussian
    low-pass of sigma `compensation_sigma_um`, in transmittance, i.e. in linear RGB). At
    coarse scale (8 um/px) the lesion then has the colour of the normal tissue it replaced;
    only the texture finer than ~G's scale is the tumour's. The tumour stroma is also made
    paler (`tumor_eosin`), so that the correction stays small.
  * Confounders, on normal and tumour slides alike, drawn from a stream that does not depend
    on the label: lymphocyte regions (Poisson count), a tissue fold (a band where the tissue
    lies twice: OD multiplied, darker and more saturated), pen marks (green, blue or black
    strokes), air bubbles (pale discs with dark rims).
  * Sensor noise, then 8-bit quantisation.

Random streams: the slide seed spawns independent streams for tissue, stain, normal
texture, confounders, lesions and tumour texture, so a normal and a tumour slide painted
from the same seed are identical outside the lesions (and inside them at coarse scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from .camelyon import rasterize_polygons
from .synthetic import SyntheticSlide

__all__ = [
    "CAMELYON_PARAMS",
    "CATEGORIES",
    "CamelyonParams",
    "CamelyonSlide",
    "Confounders",
    "Lesion",
    "lesion_category",
    "sample_confounders",
    "sample_lesion_diameters",
    "synthesize_camelyon_slide",
]

#: Slide-level lesion categories, by the largest lesion (CAMELYON16 / pN-stage names).
CATEGORIES = ("none", "itc", "micro", "macro")

_PEN_COLOURS = ("green", "blue", "black")
#: Transmittance (R, G, B) of one pen stroke at full density.
_PEN_TRANSMITTANCE = {"green": (0.30, 0.62, 0.42), "blue": (0.32, 0.42, 0.78), "black": (0.22, 0.22, 0.25)}
# Ruifrok & Johnston's H and E optical-density vectors (R, G, B), normalised below.
_H_VECTOR = (0.650, 0.704, 0.286)
_E_VECTOR = (0.072, 0.990, 0.105)


@dataclass(frozen=True)
class CamelyonParams:
    """The parameters of the generative model (module docstring; docs/synthetic_camelyon.md).

    Lengths in micrometres, diameters in millimetres, densities in nuclei per um^2, rates per
    slide. Optical densities (OD) are natural-log units per unit stain vector.
    """

    # --- painting ---
    paint_mpp: float = 0.5  # painting resolution (um/px); level 0 is upsampled from it
    tissue_fraction: tuple[float, float] = (0.35, 0.55)  # share of the slide covered by tissue
    noise_std: float = 1.5  # sensor noise, grey levels (std), per pixel and channel
    # --- stain (per-slide variation) ---
    h_strength: tuple[float, float] = (0.7, 1.3)  # haematoxylin multiplier, uniform range
    e_strength: tuple[float, float] = (0.7, 1.3)  # eosin multiplier, uniform range
    stain_vector_jitter: float = 0.05  # std of the noise added to each stain vector before normalising
    white: tuple[float, float] = (236.0, 250.0)  # white level (grey levels), uniform per channel
    # --- normal tissue ---
    stroma_eosin: tuple[float, float] = (0.25, 0.55)  # stroma E OD from the fibre texture (low, high)
    tissue_haematoxylin: float = 0.12  # H OD of all tissue (faint purple tint)
    fibre_um: float = 4.0  # grid step of the fibre texture
    normal_nucleus_spacing_um: float = 13.0  # scattered nuclei: one per spacing x spacing um on average (Poisson)
    normal_nucleus_sigma_um: float = 1.25  # Gaussian sigma of a normal nucleus (diameter ~4.5 um)
    normal_nucleus_amplitude: tuple[float, float] = (0.9, 1.15)  # blob heights: near-uniform sizes
    normal_nucleus_od: float = 1.45  # H OD of a normal nucleus (dark)
    # --- lymphocyte regions (confounder) ---
    lymph_regions_mean: float = 1.5  # Poisson mean of the number of dense lymphocyte regions
    lymph_radius_um: tuple[float, float] = (40.0, 220.0)  # region radius, log-uniform
    lymph_nucleus_spacing_um: float = 6.5  # the same small nuclei, crowded: one per spacing^2 um^2 (Poisson)
    # --- other confounders ---
    fold_rate: float = 0.3  # probability of a tissue fold
    fold_width_um: tuple[float, float] = (25.0, 120.0)  # band width, uniform
    pen_rate: float = 0.25  # probability of pen marks (1-2 strokes of one colour)
    pen_width_um: tuple[float, float] = (15.0, 45.0)  # stroke width, uniform
    bubble_rate: float = 0.2  # probability of an air bubble
    bubble_radius_um: tuple[float, float] = (60.0, 300.0)  # bubble radius, uniform
    # --- lesions ---
    itc_share: float = 0.15  # tumour slides whose largest lesion is ITC-sized
    micro_share: float = 0.45  # ... micro-metastasis; the rest (0.40) macro
    itc_mm: tuple[float, float] = (0.03, 0.2)  # ITC diameter range, log-uniform
    micro_mm: tuple[float, float] = (0.2, 1.0)  # micro-metastasis diameter range, log-uniform
    macro_mm: tuple[float, float] = (1.0, 1.4)  # macro-metastasis diameter range (scaled 1/2), uniform
    max_lesion_fraction: float = 0.7  # a lesion's diameter is at most this share of the shorter side
    satellite_mean: float = 1.0  # Poisson mean of extra, smaller lesions on a tumour slide
    tumor_nucleus_spacing_um: float = 11.0  # hard-core distance between tumour nuclei (a crowded sheet)
    tumor_nucleus_sigma_um: tuple[float, float] = (
        2.6,
        3.4,
    )  # (s1, s2): round nuclei sigma (s1+s2)/2, elongated ones s2 x s1
    tumor_elongation: float = 1.5  # extra axis ratio of the elongated nuclei (half of them), on top of s2/s1
    tumor_nucleus_amplitude: tuple[float, float] = (0.5, 1.5)  # blob heights: pleomorphic sizes
    tumor_nucleus_od: float = 0.8  # H OD of a tumour nucleus before texture (vesicular, paler)
    tumor_chromatin: float = 0.6  # relative std of the chromatin texture in tumour nuclei
    chromatin_um: float = 1.0  # grain of the chromatin texture: noise on a grid of this step, bilinear
    tumor_eosin: float = 0.32  # tumour cytoplasm E OD (paler than stroma: pre-compensation)
    compensation_sigma_um: float = 6.0  # low-pass scale of the coarse-colour compensation

    def __post_init__(self) -> None:
        if not self.paint_mpp > 0:
            raise ValueError(f"paint_mpp must be > 0 um/px, got {self.paint_mpp}")
        if not (0 <= self.itc_share and 0 <= self.micro_share and self.itc_share + self.micro_share <= 1):
            raise ValueError(
                "itc_share + micro_share must lie in [0, 1] (the rest is macro); "
                f"got {self.itc_share} + {self.micro_share}"
            )
        for name in ("fold_rate", "pen_rate", "bubble_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")


#: The default parameters (docs/synthetic_camelyon.md).
CAMELYON_PARAMS = CamelyonParams()


@dataclass(frozen=True)
class Lesion:
    """One painted lesion.

    Attributes:
        polygon: (N, 2) float64 (x, y) outline in level-0 pixels.
        diameter_mm: largest diameter (maximum Feret diameter of the outline), millimetres.
        area_mm2: area of the outline (shoelace), square millimetres.
        category: "itc" (< 0.2 mm), "micro" (< 1 mm) or "macro" (:func:`lesion_category`).
    """

    polygon: np.ndarray
    diameter_mm: float
    area_mm2: float
    category: str


@dataclass(frozen=True)
class Confounders:
    """The confounders of one slide; geometry in level-0 pixels ((x, y) order for points).

    Attributes:
        lymph: [(cx, cy, radius)] of the dense lymphocyte regions.
        fold: (x0, y0, angle_rad, width) of the fold band's centre line, or None.
        pen: (colour, [stroke polylines (N, 2)], width), or None.
        bubble: (cx, cy, radius), or None.
    """

    lymph: list[tuple[float, float, float]]
    fold: tuple[float, float, float, float] | None
    pen: tuple[str, list[np.ndarray], float] | None
    bubble: tuple[float, float, float] | None


@dataclass
class CamelyonSlide(SyntheticSlide):
    """A painted slide (`SyntheticSlide`: rgb, tissue, lesion, polygons) with its ground truth.

    Attributes:
        lesions: the lesions, largest first (empty on normal slides); `polygons` are theirs.
        lymph: (H, W) bool, dense lymphocyte regions (inside tissue).
        confounders: what was painted besides tissue and lesions.
        stain: {"h": H multiplier, "e": E multiplier, "white": (3,) white level}.
    """

    lesions: list[Lesion] = field(default_factory=list)
    lymph: np.ndarray | None = None
    confounders: Confounders | None = None
    stain: dict = field(default_factory=dict)

    @property
    def category(self) -> str:
        """The slide's category by its largest lesion: one of :data:`CATEGORIES`."""
        return self.lesions[0].category if self.lesions else "none"


def lesion_category(diameter_mm: float, params: CamelyonParams = CAMELYON_PARAMS) -> str:
    """ "itc" below `params.itc_mm[1]` (0.2 mm), "micro" below `params.macro_mm[0]` (1 mm), else "macro"."""
    if diameter_mm < params.itc_mm[1]:
        return "itc"
    return "micro" if diameter_mm < params.macro_mm[0] else "macro"


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def sample_lesion_diameters(
    rng: np.random.Generator, max_diameter_mm: float = math.inf, params: CamelyonParams = CAMELYON_PARAMS
) -> np.ndarray:
    """Diameters (mm) of one tumour slide's lesions, largest first.

    The largest lesion's category is itc / micro / macro with probabilities `itc_share`,
    `micro_share` and the rest; its diameter is log-uniform (uniform for macro) in the
    category's range. Poisson(`satellite_mean`) satellites are log-uniform between the ITC
    minimum and the largest diameter. All are clipped to `max_diameter_mm` (what fits on the
    slide), so on small slides the categories shift down; the category of a painted lesion
    is always that of its painted size.
    """
    u = rng.uniform()
    if u < params.itc_share:
        largest = _log_uniform(rng, *params.itc_mm)
    elif u < params.itc_share + params.micro_share:
        largest = _log_uniform(rng, *params.micro_mm)
    else:
        largest = float(rng.uniform(*params.macro_mm))
    largest = min(largest, max_diameter_mm)
    n_satellites = int(rng.poisson(params.satellite_mean))
    low = min(params.itc_mm[0], largest)
    satellites = [_log_uniform(rng, low, largest) for _ in range(n_satellites)]
    return np.array([largest] + sorted(satellites, reverse=True))


def sample_confounders(rng: np.random.Generator, params: CamelyonParams = CAMELYON_PARAMS) -> dict[str, object]:
    """Which confounders a slide has: {"lymph": count, "fold": bool, "pen": colour or None, "bubble": bool}.

    Always draws the same numbers from `rng`, whatever the rates, so that changing a rate
    changes only whether a confounder is present, not the rest of the slide.
    """
    u = rng.uniform(size=4)
    n_lymph = int(rng.poisson(params.lymph_regions_mean))
    colour = _PEN_COLOURS[int(rng.integers(len(_PEN_COLOURS)))]
    return {
        "lymph": n_lymph,
        "fold": bool(u[0] < params.fold_rate),
        "pen": colour if u[1] < params.pen_rate else None,
        "bubble": bool(u[2] < params.bubble_rate),
    }


# ---------------------------------------------------------------- painting helpers
def _smooth_field(rng: np.random.Generator, grid_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """(gh, gw) float32 smooth random field, zero mean and unit std."""
    f = ndimage.gaussian_filter(rng.standard_normal(grid_hw, dtype=np.float32), sigma, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _upsample(field: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 (gh, gw) field to (H, W)."""
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _repeat(mask: np.ndarray, f: int, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: each pixel of `mask` repeated f x f times, cropped to `hw`."""
    if f == 1:
        return mask[: hw[0], : hw[1]]
    img = Image.fromarray(mask.view(np.uint8)).resize((mask.shape[1] * f, mask.shape[0] * f), Image.Resampling.NEAREST)
    return np.asarray(img)[: hw[0], : hw[1]] > 0


def _star_polygon(rng: np.random.Generator, diameter: float, n_vertices: int = 96) -> np.ndarray:
    """(n_vertices, 2) (x, y) around (0, 0): r(theta) = 1 + sum_k a_k cos(k theta + phi_k), k = 2..5,
    scaled so that the largest diameter (max distance between vertices) is `diameter`."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    k = np.arange(2, 6)[:, None]
    a = rng.uniform(0.0, 0.1, size=(4, 1)) / (k - 1) ** 0.5
    r = 1.0 + (a * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi, size=(4, 1)))).sum(axis=0)
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    feret = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
    return pts * (diameter / feret)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _nucleus_blobs(
    rng: np.random.Generator,
    shape: tuple[int, int],
    prob: np.ndarray | float,
    sigma: tuple[float, float],
    amplitude: tuple[float, float],
) -> np.ndarray:
    """(h, w) float32 sum of Gaussian blobs of peak height U(amplitude), one per pixel with
    probability `prob` (per-pixel array or scalar), of (sigma_y, sigma_x) pixels."""
    where = np.flatnonzero(rng.random(shape, dtype=np.float32) < prob)
    impulses = np.zeros(shape, dtype=np.float32)
    impulses.flat[where] = rng.uniform(*amplitude, size=where.size).astype(np.float32)
    blobs = ndimage.gaussian_filter(impulses, sigma, truncate=2.5)  # beyond 2.5 sigma a blob is below the threshold
    return blobs * np.float32(2 * np.pi * sigma[0] * sigma[1])


def _occupancy(blobs: np.ndarray) -> np.ndarray:
    """Nuclear occupancy in [0, 1] from summed blob heights: a soft threshold, so a blob of
    height a and sigma s is a flat-topped disc of radius ~ s sqrt(2 ln(a / 0.25))."""
    return np.clip((blobs - np.float32(0.2)) * np.float32(2.5), 0.0, 1.0)


def _stain_vectors(rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    vectors = []
    for v in (_H_VECTOR, _E_VECTOR):
        v = np.abs(np.array(v) + rng.normal(0.0, jitter, size=3))
        vectors.append((v / np.linalg.norm(v)).astype(np.float32))
    return vectors[0], vectors[1]


def _transmittance(h_od: np.ndarray, e_od: np.ndarray, h_vec: np.ndarray, e_vec: np.ndarray) -> np.ndarray:
    """(3, h, w) float32 T = exp(-(H h + E e)) of (h, w) stain densities (channels first:
    contiguous planes make the element-wise work several times faster than (h, w, 3))."""
    t = np.empty((3,) + h_od.shape, dtype=np.float32)
    for c in range(3):
        np.multiply(h_od, -h_vec[c], out=t[c])
        t[c] -= e_od * e_vec[c]
        np.exp(t[c], out=t[c])
    return t


def _paint_normal(
    rng: np.random.Generator,
    tissue: np.ndarray,
    lymph_weight: np.ndarray,
    p_um: float,
    params: CamelyonParams,
) -> tuple[np.ndarray, np.ndarray]:
    """(H OD, E OD) of the normal tissue at the painting resolution (`p_um` um/px)."""
    h, w = tissue.shape
    fc = max(1, round(params.fibre_um / p_um))
    fibre = _upsample(_smooth_field(rng, (math.ceil(h / fc), math.ceil(w / fc)), 1.5), (h, w))
    fibre = np.clip(0.5 + 0.3 * fibre, 0.0, 1.0)
    per_px = p_um**2
    prob = (per_px / params.normal_nucleus_spacing_um**2) * (1 - lymph_weight) + (
        per_px / params.lymph_nucleus_spacing_um**2
    ) * lymph_weight
    s = params.normal_nucleus_sigma_um / p_um
    occ = _occupancy(_nucleus_blobs(rng, (h, w), prob, (s, s), params.normal_nucleus_amplitude)) * tissue
    lo, hi = params.stroma_eosin
    e_od = (lo + (hi - lo) * fibre) * (1.0 - 0.8 * occ) * tissue
    h_od = params.tissue_haematoxylin * tissue + params.normal_nucleus_od * occ
    return h_od.astype(np.float32), e_od.astype(np.float32)


def _hard_core_blobs(
    rng: np.random.Generator,
    shape: tuple[int, int],
    distance: float,
    sigmas: list[tuple[float, float]],
    amplitude: tuple[float, float],
) -> np.ndarray:
    """(h, w) float32 Gaussian blobs at the points of a hard-core process: crowded nuclei that
    rarely overlap, with no lattice (a lattice would alias into a pattern visible at coarse scale).

    Matern type II thinning: Poisson points of density 2 / distance^2 with random marks; of
    every pair closer than `distance` the point with the larger mark goes. Each kept point is a
    blob of a random class of `sigmas` ((sigma_y, sigma_x) px) and peak height U(amplitude).
    """
    n = int(rng.poisson(2.0 * shape[0] * shape[1] / distance**2))
    pts = rng.uniform((0, 0), shape, size=(n, 2))
    marks = rng.uniform(size=n)
    pairs = cKDTree(pts).query_pairs(distance, output_type="ndarray")  # (m, 2) indices, i < j
    loser = np.where(marks[pairs[:, 0]] > marks[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    keep = np.ones(n, dtype=bool)
    keep[loser] = False
    ys, xs = pts[keep].astype(np.int64).T
    cls = rng.integers(len(sigmas), size=ys.size)
    heights = rng.uniform(*amplitude, size=ys.size).astype(np.float32)
    blobs = np.zeros(shape, dtype=np.float32)
    for k, sigma in enumerate(sigmas):  # one blur per size class
        impulses = np.zeros(shape, dtype=np.float32)
        np.add.at(impulses, (ys[cls == k], xs[cls == k]), heights[cls == k])
        blobs += ndimage.gaussian_filter(impulses, sigma, truncate=2.5) * np.float32(2 * np.pi * sigma[0] * sigma[1])
    return blobs


def _paint_tumor(
    rng: np.random.Generator, shape: tuple[int, int], tissue: np.ndarray, p_um: float, params: CamelyonParams
) -> tuple[np.ndarray, np.ndarray]:
    """(H OD, E OD) of tumour everywhere in a `shape` crop: crowded, pleomorphic, textured nuclei.

    Nuclei form a hard-core point process (a crowded sheet); half are round, half elongated along
    y or x (one axis per slide); random blob heights make the sizes vary (pleomorphism).
    """
    s_lo, s_hi = (s / p_um for s in params.tumor_nucleus_sigma_um)
    s_round = 0.5 * (s_lo + s_hi)
    e = params.tumor_elongation**0.5
    long_axis = (s_hi * e, s_lo / e) if rng.uniform() < 0.5 else (s_lo / e, s_hi * e)
    spacing = params.tumor_nucleus_spacing_um / p_um
    blobs = _hard_core_blobs(rng, shape, spacing, [(s_round, s_round), long_axis], params.tumor_nucleus_amplitude)
    occ = _occupancy(blobs) * tissue
    # chromatin: white noise on a grid of `chromatin_um` cells, upsampled bilinearly (granular texture)
    g = max(1, round(params.chromatin_um / p_um))
    grain = rng.standard_normal((math.ceil(shape[0] / g) + 1, math.ceil(shape[1] / g) + 1), dtype=np.float32)
    chromatin = _upsample(grain, ((grain.shape[0]) * g, grain.shape[1] * g))[: shape[0], : shape[1]]
    chromatin = np.clip(1.0 + params.tumor_chromatin * chromatin, 0.2, 2.5)
    h_od = params.tissue_haematoxylin * tissue + params.tumor_nucleus_od * occ * chromatin
    e_od = params.tumor_eosin * (1.0 - 0.8 * occ) * tissue
    return h_od.astype(np.float32), e_od.astype(np.float32)


def _low_pass(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of sigma `sigma` px of an (h, w) float32 field, computed on a grid
    coarser by ~sigma/3 (block means, blur, bilinear upsampling back): cheap for large sigma."""
    k = max(1, int(sigma // 3))
    h, w = field.shape
    hk, wk = math.ceil(h / k), math.ceil(w / k)
    padded = np.pad(field, ((0, hk * k - h), (0, wk * k - w)), mode="edge")
    coarse = padded.reshape(hk, k, wk, k).mean(axis=(1, 3))
    coarse = ndimage.gaussian_filter(coarse, sigma / k, mode="nearest", truncate=3.0)
    # block centres sit at (i + 0.5) k - 0.5; PIL's bilinear resize maps pixel centres the same way
    return _upsample(coarse, (hk * k, wk * k))[:h, :w]


def _place_lesions(
    rng: np.random.Generator,
    diameters_px: np.ndarray,
    coarse_tissue: np.ndarray,
    cell: float,
    min_diameter_px: float,
) -> list[np.ndarray]:
    """Star polygons (level-0 px) of the given diameters, inside tissue and apart; largest first.

    A centre is drawn among the coarse cells that lie at least a radius deep in tissue and at
    least the two radii (plus 4 cells) away from the lesions placed before. Where no cell has
    that room, the lesion shrinks to the most room any cell offers (a lesion sticking out of
    the tissue would change the tissue's outline, a cue visible at any scale), and a satellite
    is left out if that is below `min_diameter_px`. The polygons have the painted diameters.
    """
    depth = ndimage.distance_transform_edt(coarse_tissue) * cell  # px to the background
    iy, ix = np.indices(coarse_tissue.shape)
    cy, cx = (iy + 0.5) * cell, (ix + 0.5) * cell
    placed: list[tuple[float, float, float]] = []
    polygons = []
    for d in diameters_px:
        room = depth.copy()  # the largest radius that fits at each cell
        for px, py, pr in placed:
            room = np.minimum(room, np.hypot(cx - px, cy - py) - pr - 4 * cell)
        r = min(d / 2, float(room.max()))
        if 2 * r < min_diameter_px:
            if placed:
                continue
            r = min_diameter_px / 2  # a tumour slide keeps its one lesion, on the deepest tissue
        candidates = np.argwhere(room >= r)
        y, x = candidates[rng.integers(len(candidates))]
        y, x = (y + 0.5) * cell, (x + 0.5) * cell  # a cell centre: the room was measured there
        placed.append((x, y, r))
        # rounded as the ASAP XML writes them, so the annotation read back rasterises to the mask
        polygons.append(np.round(_star_polygon(rng, 2 * r) + (x, y), 4))
    return polygons


def _region_centres(rng: np.random.Generator, coarse_tissue: np.ndarray, cell: float, n: int) -> np.ndarray:
    """(n, 2) (x, y) level-0 px of random points on tissue."""
    cells = np.argwhere(coarse_tissue)
    if len(cells) == 0:
        cells = np.argwhere(np.ones_like(coarse_tissue))
    pick = cells[rng.integers(len(cells), size=n)]
    return (pick[:, ::-1] + rng.uniform(size=(n, 2))) * cell


def _random_stroke(rng: np.random.Generator, H: int, W: int, length: float) -> np.ndarray:
    """(N, 2) (x, y) of a smooth random curve of about `length` px starting somewhere on the slide."""
    n = 40
    step = length / n
    turn = np.cumsum(rng.normal(0.0, 0.12, size=n)) + rng.uniform(0, 2 * np.pi)
    start = rng.uniform((0.1 * W, 0.1 * H), (0.9 * W, 0.9 * H))
    return start + np.cumsum(np.stack([np.cos(turn), np.sin(turn)], axis=1) * step, axis=0)


def synthesize_camelyon_slide(
    size: tuple[int, int], tumor: bool, seed: int, mpp: float = 0.25, params: CamelyonParams = CAMELYON_PARAMS
) -> CamelyonSlide:
    """Paint one slide of `size` = (H, W) level-0 pixels at `mpp` um/px (module docstring).

    Deterministic in `seed` (use :func:`~torch_impl.slides.synthetic.slide_seed`); a normal
    and a tumour slide of the same seed are identical outside the lesions. Returns the
    level-0 RGB (H, W, 3) uint8, the tissue, lesion and lymphocyte masks (H, W) bool, the
    lesion polygons and sizes (largest first), the confounders and the stain draw.
    """
    H, W = int(size[0]), int(size[1])
    if H < 1 or W < 1 or not mpp > 0:
        raise ValueError(f"size must be positive pixels and mpp > 0 um/px; got size {size}, mpp {mpp}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]
    rng_tissue, rng_stain, rng_normal, rng_conf, rng_lesion, rng_tumor = streams

    f = max(1, round(max(params.paint_mpp, mpp) / mpp))  # level-0 px per painted px
    p_um = f * mpp
    h, w = math.ceil(H / f), math.ceil(W / f)  # painting grid

    # Tissue: smooth field on a coarse grid, lowered outside a central ellipse, thresholded.
    cell = max(4, min(H, W) // 32)  # level-0 px per coarse cell
    gh, gw = math.ceil(H / cell), math.ceil(W / cell)
    tfield = _smooth_field(rng_tissue, (gh, gw), sigma=3.0)
    ry = (np.arange(gh) + 0.5) / gh * 2 - 1
    rx = (np.arange(gw) + 0.5) / gw * 2 - 1
    rho = np.sqrt(ry[:, None] ** 2 + rx[None, :] ** 2)
    tfield -= 6.0 * np.clip((rho - 0.7) / 0.3, 0.0, 1.0)
    threshold = np.quantile(tfield, 1.0 - rng_tissue.uniform(*params.tissue_fraction))
    coarse_tissue = tfield > threshold

    # Confounder plan and geometry: drawn in full whatever is present (rates change presence only).
    plan = sample_confounders(rng_conf, params)
    lymph_centres = _region_centres(rng_conf, coarse_tissue, cell, plan["lymph"])
    lymph_radii = np.exp(rng_conf.uniform(*np.log(params.lymph_radius_um), size=plan["lymph"])) / mpp
    fold_geom = (
        *_region_centres(rng_conf, coarse_tissue, cell, 1)[0],
        rng_conf.uniform(0, np.pi),
        rng_conf.uniform(*params.fold_width_um) / mpp,
    )
    n_strokes = 1 + int(rng_conf.integers(2))
    strokes = [_random_stroke(rng_conf, H, W, rng_conf.uniform(0.3, 0.8) * max(H, W)) for _ in range(n_strokes)]
    pen_width = rng_conf.uniform(*params.pen_width_um) / mpp
    bubble_geom = (
        *rng_conf.uniform((0.1 * W, 0.1 * H), (0.9 * W, 0.9 * H)),
        rng_conf.uniform(*params.bubble_radius_um) / mpp,
    )
    lymph_field = _smooth_field(rng_conf, (gh, gw), sigma=1.5)
    confounders = Confounders(
        lymph=[(float(x), float(y), float(r)) for (x, y), r in zip(lymph_centres, lymph_radii)],
        fold=tuple(float(v) for v in fold_geom) if plan["fold"] else None,
        pen=(plan["pen"], strokes, float(pen_width)) if plan["pen"] else None,
        bubble=tuple(float(v) for v in bubble_geom) if plan["bubble"] else None,
    )

    # Lesions: sizes, outlines, masks (level 0 and painting grid).
    lesions: list[Lesion] = []
    if tumor:
        max_mm = params.max_lesion_fraction * min(H, W) * mpp / 1000
        diameters = sample_lesion_diameters(rng_lesion, max_mm, params)
        min_px = params.itc_mm[0] * 1000 / mpp
        for poly in _place_lesions(rng_lesion, diameters * 1000 / mpp, coarse_tissue, cell, min_px):
            d = float(pdist(poly).max()) * mpp / 1000  # the painted diameter (maximum Feret)
            area = _polygon_area(poly) * (mpp / 1000) ** 2
            lesions.append(Lesion(poly, d, area, lesion_category(d, params)))
        lesions.sort(key=lambda lesion: -lesion.diameter_mm)
    polygons = [lesion.polygon for lesion in lesions]
    lesion = rasterize_polygons(polygons, (H, W), 1.0) if lesions else np.zeros((H, W), dtype=bool)
    lesion_p = rasterize_polygons(polygons, (h, w), 1.0 / f) if lesions else np.zeros((h, w), dtype=bool)

    # Masks on the painting grid; at level 0 the painted pixels' masks repeated (the painting's
    # own resolution), except the lesion mask: the annotation polygons rasterised at level 0.
    tissue_p = (_upsample(tfield, (h, w)) > threshold) | lesion_p
    iy, ix = np.indices((gh, gw))
    lymph_score = np.full((gh, gw), -1.0, dtype=np.float32)
    for (x, y), r in zip(lymph_centres, lymph_radii):  # a few regions: a loop over regions, not pixels
        dist = np.hypot((ix + 0.5) * cell - x, (iy + 0.5) * cell - y) / r
        lymph_score = np.maximum(lymph_score, 1.0 - dist + 0.25 * lymph_field)
    lymph_score_p = _upsample(lymph_score, (h, w))
    lymph_weight = np.clip(lymph_score_p * 8.0 + 0.5, 0.0, 1.0) * tissue_p
    tissue = _repeat(tissue_p, f, (H, W)) | lesion
    lymph = _repeat((lymph_score_p > 0) & tissue_p, f, (H, W))

    # Stain of this slide.
    h_mult = rng_stain.uniform(*params.h_strength)
    e_mult = rng_stain.uniform(*params.e_strength)
    h_vec, e_vec = _stain_vectors(rng_stain, params.stain_vector_jitter)
    white = rng_stain.uniform(*params.white, size=3).astype(np.float32)
    noise_rng = np.random.default_rng(rng_stain.integers(2**63))

    h_od, e_od = _paint_normal(rng_normal, tissue_p, lymph_weight, p_um, params)
    t = _transmittance(h_mult * h_od, e_mult * e_od, h_vec, e_vec)  # (3, h, w)

    if lesions:
        # Tumour texture on the lesions' bounding box (padded for the low-pass), combined as
        # T_tum - G(T_tum) + G(T_norm) inside the lesions.
        sigma = params.compensation_sigma_um / p_um
        pad = int(3 * sigma) + 1
        ys, xs = np.nonzero(lesion_p.any(axis=1))[0], np.nonzero(lesion_p.any(axis=0))[0]
        y0, y1 = max(0, ys[0] - pad), min(h, ys[-1] + 1 + pad)
        x0, x1 = max(0, xs[0] - pad), min(w, xs[-1] + 1 + pad)
        box = (slice(y0, y1), slice(x0, x1))
        th, te = _paint_tumor(rng_tumor, (y1 - y0, x1 - x0), tissue_p[box], p_um, params)
        diff = _transmittance(h_mult * th, e_mult * te, h_vec, e_vec) - t[(slice(None), *box)]
        inside = lesion_p[box]
        for c in range(3):
            high = diff[c] - _low_pass(diff[c], sigma)
            t[c][box][inside] += high[inside]

    _paint_confounders(t, confounders, tissue_p, f, p_um)

    noise = noise_rng.standard_normal((h, w), dtype=np.float32) * np.float32(params.noise_std) + np.float32(0.5)
    planes = []
    for c in range(3):
        plane = t[c] * white[c] + noise
        planes.append(np.clip(plane, 0, 255, out=plane).astype(np.uint8))
    rgb_p = np.stack(planes, axis=-1)  # (h, w, 3)
    rgb = rgb_p if f == 1 else np.asarray(Image.fromarray(rgb_p).resize((W, H), Image.Resampling.BILINEAR))
    return CamelyonSlide(
        rgb=np.ascontiguousarray(rgb[:H, :W]),
        tissue=tissue,
        lesion=lesion,
        polygons=polygons,
        lesions=lesions,
        lymph=lymph,
        confounders=confounders,
        stain={"h": float(h_mult), "e": float(e_mult), "white": white},
    )


def _paint_confounders(t: np.ndarray, confounders: Confounders, tissue: np.ndarray, f: int, p_um: float) -> None:
    """Fold, pen and bubble on the (3, h, w) transmittance `t`, in place (geometry / f = painting px)."""
    h, w = tissue.shape
    if confounders.fold is not None:
        x0, y0, angle, width = confounders.fold
        x0, y0, width = x0 / f, y0 / f, width / f
        # signed distance to the band's centre line, evaluated as an outer sum (no (h, w) index grids)
        d = np.abs(
            (np.arange(w, dtype=np.float32)[None, :] - x0) * np.sin(angle)
            - (np.arange(h, dtype=np.float32)[:, None] - y0) * np.cos(angle)
        )
        band = np.clip((width / 2 - d) / max(width * 0.15, 1.0) + 0.5, 0.0, 1.0) * tissue  # soft-edged
        on = band > 0
        # a second layer of tissue: OD x (1 + 0.9 band), i.e. T ** (1 + 0.9 band)
        t[:, on] = t[:, on] ** (1.0 + 0.9 * band[on])
    if confounders.pen is not None:
        colour, strokes, width = confounders.pen
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for stroke in strokes:
            draw.line(
                [(float(x) / f, float(y) / f) for x, y in stroke],
                fill=255,
                width=max(1, round(width / f)),
                joint="curve",
            )
        ink = ndimage.gaussian_filter(np.asarray(img, dtype=np.float32) / 255, 1.0)
        on = ink > 0.01
        od = -np.log(np.array(_PEN_TRANSMITTANCE[colour], dtype=np.float32))
        t[:, on] *= np.exp(-ink[on] * od[:, None])
    if confounders.bubble is not None:
        cx, cy, r = (v / f for v in confounders.bubble)
        rim = max(2.0, 3.0 / p_um)  # rim width ~3 um in painted px
        y0, y1 = max(0, int(cy - r - 4 * rim)), min(h, int(cy + r + 4 * rim) + 1)
        x0, x1 = max(0, int(cx - r - 4 * rim)), min(w, int(cx + r + 4 * rim) + 1)
        if y1 > y0 and x1 > x0:
            yy, xx = np.ogrid[y0:y1, x0:x1]
            dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32)
            inside = np.clip((r - dist) / rim + 0.5, 0.0, 1.0)
            ring = np.exp(-(((dist - r) / rim) ** 2))
            crop = t[:, y0:y1, x0:x1]
            crop[:] = crop + (1.0 - crop) * 0.55 * inside  # pale: the bubble lifts part of the stain's absorption
            crop *= np.exp(-1.2 * ring)  # dark refractive rim

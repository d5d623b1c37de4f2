"""Attention heatmaps: the head's attention placed back on the slide.

    SlidePrediction (torch_impl.pipeline.predict: predict_file, or load_prediction of a
    saved attention/<id>.npy + .json) --> attention (h', w') on the cell grid
        --cell -> working pixels -> thumbnail pixels--> <id>_heatmap.png
        --cell -> working pixels / f, tile by tile--> <id>_attention.tif (pyramidal)
        --contours of the most attended cells -> level-0 pixels--> <id>_attention.geojson
        --lesion polygons on the cell grid--> attention AUC, lesion vs other tissue

Drawing needs a prediction and the slide file, never the model: running the model is
:mod:`torch_impl.pipeline.predict`'s job (the ``heatmap`` command does both).

Where a cell lies. The head's grid is the trunk's feature grid (stride S = 32 working
pixels), pooled by the head's pool size P if it pools; one cell is ``c = S P`` working
pixels wide (``SlidePrediction.cell_size``). Over a crop box (y0, x0, h, w) in working
pixels, cell (i, j) covers working rows [y0 + i c, y0 + (i+1) c) and columns
[x0 + j c, x0 + (j+1) c), clipped to the crop (the same convention as the tissue mask the
head saw, ``SlideInput.feature_mask``). An output image whose pixel (u, v) covers working
pixels [u sy, (u+1) sy) x [v sx, (v+1) sx) (a thumbnail with scale (sy, sx) = (H / h_t,
W / w_t), or the TIFF with sy = sx = f) shows, at each pixel, the cell under the pixel's
centre ((u + 1/2) sy, (v + 1/2) sx), and nothing outside the crop (:func:`sample_attention`).

The TIFF (``write_attention_tiff``) covers the whole slide, [0, H) x [0, W) working
pixels, at ``f`` working pixels per TIFF pixel at its base level (default 8, so 4 um/px at
0.5 um/px; smaller for small slides so that there are at least two levels), with levels
f, 2f, 4f, ... down to one 256-px tile. Each level is sampled from the cell grid directly,
tile by tile, so memory stays one tile. Values are uint8: 0 = no tissue or outside the
analysed crop, 1..255 = tissue, linear in attention from the slide's least to its most
attended tissue cell. The resolution tags hold the level's um/px (pixels per centimetre
= 1e4 / (mpp f 2^level)), so viewers that place overlays by physical size line it up with
the slide; the ImageDescription holds the same placement as JSON.

Lesion cells (:func:`lesion_fraction`): the lesion polygons (level-0 (x, y), exclusion
holes cut out) are rasterised with ``rasterize_polygons`` onto a grid of k x k sub-pixels
per cell (k = 16, fewer for grids over 4096/16 cells a side); a *lesion cell* is a tissue
cell (attention > 0) at least half of whose area inside the crop lies in a lesion; every
other tissue cell is a non-lesion cell. PIL fills a polygon's outline pixels too, so
lesions grow by up to one sub-pixel: a cell's lesion fraction is over-estimated by at
most ~1/k per lesion border crossing it (<= 0.1 measured against the synthetic slides'
painted lesion masks at k = 16). The attention AUC is the ROC AUC of the attention value separating the
two (0.5 = no better than chance); undefined (None) when either set is empty.

The GeoJSON (:func:`attention_geojson`) outlines, for each fraction q of
:data:`TOP_FRACTIONS` (10% and 1%), the *top-q cells*: the ceil(q n) most attended of the
slide's n tissue cells (attention > 0), cells tied with the last of them included. Their
outline is traced by marching squares (``contourpy``) on the 0/1 grid of those cells, with
the grid's values at the cell centres and the contour at 1/2: it runs along cell edges,
through the midpoints of the edges between a top cell and another, and so cuts each convex
corner of a region (and fills each concave one) by a right triangle of half a cell side;
every cell centre lies inside the outline exactly when the cell is a top cell (the last
row and column of cells are clipped to the crop like everywhere here, and their centres
are those of the clipped cells). Where two top cells touch only at a corner, the outline
may join or separate them; their centres are unaffected. The coordinates are level-0
pixels (x, y) of the slide: working pixels times mpp / mpp_level0 on each axis (the
inverse of how lesion annotations are placed above). It is a FeatureCollection with one
Polygon feature per connected region (exterior ring counter-clockwise, holes clockwise, in
(x, y) as written, RFC 7946), each with ``properties`` ``{"objectType": "annotation",
"name", "classification": {"name": "attention top 10%", "color": [r, g, b]}}``: QuPath's
File > Import objects reads it as annotations of that class.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from contourpy import FillType, contour_generator

from ..slides import Slide, rasterize_polygons, read_lesions
from .checkpoint import load_model, trained_mpp
from .logs import verbosity_options
from .metrics import roc_auc
from .options import OptionParser, option
from .plots import overlay_attention
from .predict import InferenceOptions, SlidePrediction, load_prediction, predict_file, save_prediction
from .runtime import atomic_write, resolve_device

__all__ = [
    "TOP_FRACTIONS",
    "HeatmapOptions",
    "attention_auc",
    "attention_geojson",
    "attention_to_uint8",
    "cell_index",
    "lesion_fraction",
    "main_heatmap",
    "region_polygons",
    "sample_attention",
    "top_attention_cells",
    "write_attention_geojson",
    "write_attention_tiff",
    "write_heatmap",
]

logger = logging.getLogger(__name__)

TIFF_TILE = 256  # TIFF tile side, pixels
MAX_TIFF_DOWNSAMPLE = 8  # default working pixels per TIFF pixel at the base level
LESION_FRACTION = 0.5  # a tissue cell is a lesion cell when at least this much of it is lesion
SUBPIXELS = 16  # lesion raster: sub-pixels per cell side (fewer for large grids)
_MAX_SUBGRID = 4096  # longest side of the lesion raster grid
#: Fractions of the tissue cells whose most attended ones the GeoJSON outlines.
TOP_FRACTIONS = (0.10, 0.01)
_CONTOUR_COLORS = [(255, 0, 0), (255, 140, 0), (255, 215, 0), (0, 160, 255)]  # smallest fraction first


@dataclass(frozen=True, kw_only=True)
class HeatmapOptions(InferenceOptions):
    """The ``heatmap`` command (--out, --mpp, --device, --amp, --slide-cache from
    :class:`~torch_impl.pipeline.predict.InferenceOptions`; --checkpoint becomes optional).
    Raises ValueError when neither --checkpoint nor --attention is given, or for sizes < 1."""

    slide: Path = option(metavar="FILE")  # the slide file
    checkpoint: Path | None = option(None, metavar="FILE")  # training checkpoint (.pt); not needed with --attention
    attention: Path | None = option(None, metavar="FILE")  # saved attention/<id>.npy (evaluate, predict): no model run
    annotation: Path | None = option(None, metavar="XML")  # ASAP XML lesion annotation: lesion outlines, attention AUC
    thumbnail_size: int = option(1024, metavar="PX")  # longest side of the PNG's thumbnail, pixels
    tiff_downsample: int | None = None  # working pixels per base-level TIFF pixel; none = 8, less for small slides

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint is None and self.attention is None:
            raise ValueError("give --checkpoint, or --attention with a saved attention map")
        if self.thumbnail_size < 1:
            raise ValueError(f"--thumbnail-size must be >= 1 pixel, got {self.thumbnail_size}")
        if self.tiff_downsample is not None and self.tiff_downsample < 1:
            raise ValueError(
                f"--tiff-downsample must be >= 1 (working pixels per TIFF pixel), got {self.tiff_downsample}"
            )


# ---------------------------------------------------------------------- cells and pixels
def cell_index(coords: np.ndarray, start: float, length: float, cell_size: float, n_cells: int) -> np.ndarray:
    """Cell holding each working-pixel coordinate along one axis; -1 outside the crop.

    Args:
        coords: (n,) working-pixel coordinates (e.g. pixel centres).
        start, length: the crop along this axis, [start, start + length).
        cell_size: working pixels per cell.
        n_cells: cells along this axis.

    Returns:
        (n,) int64: floor((coord - start) / cell_size), or -1 where the coordinate is
        outside [start, start + length) or past the last cell.
    """
    rel = np.asarray(coords, dtype=np.float64) - start
    idx = np.floor(rel / cell_size).astype(np.int64)
    inside = (rel >= 0) & (rel < length) & (idx < n_cells)
    return np.where(inside, idx, -1)


def sample_attention(
    attention: np.ndarray,
    box: Sequence[int],
    cell_size: float,
    ys: np.ndarray,
    xs: np.ndarray,
    outside: float = np.nan,
) -> np.ndarray:
    """Attention at the working-pixel points ys x xs (module docstring).

    Args:
        attention: (h', w') values on the cell grid.
        box: (y0, x0, h, w) crop in working pixels.
        cell_size: working pixels per cell side.
        ys, xs: (n,), (m,) working-pixel coordinates of the sample rows and columns.
        outside: value for points outside the crop.

    Returns:
        (n, m) attention[i(y), j(x)], ``outside`` where the point is outside the crop.
    """
    attention = np.asarray(attention)
    y0, x0, h, w = box
    ri = cell_index(ys, y0, h, cell_size, attention.shape[0])  # (n,)
    ci = cell_index(xs, x0, w, cell_size, attention.shape[1])  # (m,)
    dtype = np.result_type(attention.dtype, np.min_scalar_type(outside) if np.isfinite(outside) else np.float64)
    padded = np.full((attention.shape[0] + 1, attention.shape[1] + 1), outside, dtype=dtype)
    padded[:-1, :-1] = attention  # index -1 hits the extra row/column of `outside`
    return padded[ri[:, None], ci[None, :]]  # (n, m)


def attention_on_image(
    attention: np.ndarray,
    box: Sequence[int],
    cell_size: float,
    out_hw: tuple[int, int],
    scale: tuple[float, float],
) -> np.ndarray:
    """(h_t, w_t) float64 attention on an image whose pixel covers (sy, sx) working pixels.

    Pixel (u, v) takes the cell under its centre ((u + 1/2) sy, (v + 1/2) sx); NaN
    outside the crop. For a thumbnail of the whole slide, scale = (H / h_t, W / w_t).
    """
    ys = (np.arange(out_hw[0]) + 0.5) * scale[0]
    xs = (np.arange(out_hw[1]) + 0.5) * scale[1]
    return sample_attention(np.asarray(attention, dtype=np.float64), box, cell_size, ys, xs)


def attention_to_uint8(attention: np.ndarray) -> np.ndarray:
    """(h', w') uint8: 0 where attention is 0 (no tissue), 1..255 linear over tissue cells.

    value = 1 + round(254 (a - a_min) / (a_max - a_min)) over tissue cells (a > 0);
    255 for all tissue cells when they are equally attended.
    """
    a = np.asarray(attention, dtype=np.float64)
    tissue = a > 0
    out = np.zeros(a.shape, dtype=np.uint8)
    if not tissue.any():
        return out
    lo, hi = a[tissue].min(), a[tissue].max()
    scaled = np.ones_like(a) if hi == lo else (a - lo) / (hi - lo)
    out[tissue] = 1 + np.round(254 * scaled[tissue]).astype(np.uint8)
    return out


# ---------------------------------------------------------------------- lesions
def _to_grid(
    polygons: Sequence[np.ndarray], level0_to_working: tuple[float, float], origin: tuple[float, float], pixel: float
) -> list[np.ndarray]:
    """Level-0 (x, y) polygons -> (x, y) in a grid of `pixel` working px starting at `origin` (y, x)."""
    fy, fx = level0_to_working
    return [
        np.column_stack([(p[:, 0] * fx - origin[1]) / pixel, (p[:, 1] * fy - origin[0]) / pixel])
        for p in (np.asarray(q, dtype=np.float64).reshape(-1, 2) for q in polygons)
    ]


def lesion_fraction(
    lesions: Sequence[np.ndarray],
    holes: Sequence[np.ndarray],
    grid_hw: tuple[int, int],
    box: Sequence[int],
    cell_size: float,
    level0_to_working: tuple[float, float],
) -> np.ndarray:
    """(h', w') fraction of each cell's area inside the crop that lies in a lesion.

    Args:
        lesions, holes: level-0 (x, y) polygons (``read_lesions``); holes are cut out.
        grid_hw: (h', w') the attention grid.
        box: (y0, x0, h, w) crop in working pixels.
        cell_size: working pixels per cell side.
        level0_to_working: (fy, fx) working pixels per level-0 pixel (mpp_level0 / mpp).

    Rasterised with ``rasterize_polygons`` on k x k sub-pixels per cell (module docstring):
    sub-pixel (u, v) covers working pixels y0 + [u, u+1) c/k, x0 + [v, v+1) c/k.
    """
    gh, gw = grid_hw
    k = max(1, min(SUBPIXELS, _MAX_SUBGRID // max(gh, gw)))
    pixel = cell_size / k  # working px per sub-pixel
    y0, x0, h, w = box
    origin = (float(y0), float(x0))
    raster = rasterize_polygons(
        _to_grid(lesions, level0_to_working, origin, pixel),
        (gh * k, gw * k),
        1.0,
        holes=_to_grid(holes, level0_to_working, origin, pixel),
    )
    inside_y = (np.arange(gh * k) + 0.5) * pixel < h  # (gh k,) sub-pixel centre inside the crop
    inside_x = (np.arange(gw * k) + 0.5) * pixel < w
    inside = inside_y[:, None] & inside_x[None, :]  # (gh k, gw k)
    lesion = (raster & inside).reshape(gh, k, gw, k).sum(axis=(1, 3))  # (gh, gw)
    area = inside.reshape(gh, k, gw, k).sum(axis=(1, 3))
    return np.divide(lesion, area, out=np.zeros((gh, gw)), where=area > 0)


def attention_auc(attention: np.ndarray, fraction: np.ndarray) -> dict[str, Any]:
    """AUC of attention separating lesion cells from other tissue cells (module docstring).

    Returns {"attention_auc": float or None, "n_lesion_cells": int, "n_tissue_cells": int}.
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.shape != fraction.shape:
        raise ValueError(f"attention {a.shape} and lesion fraction {fraction.shape} differ")
    tissue = a > 0
    is_lesion = tissue & (fraction >= LESION_FRACTION)
    n_lesion, n_tissue = int(is_lesion.sum()), int(tissue.sum())
    auc = None
    if 0 < n_lesion < n_tissue:
        auc = float(roc_auc(is_lesion[tissue].astype(np.int64), a[tissue]))
    else:
        logger.warning("attention AUC undefined: %d lesion cells among %d tissue cells", n_lesion, n_tissue)
    return {"attention_auc": auc, "n_lesion_cells": n_lesion, "n_tissue_cells": n_tissue}


# ---------------------------------------------------------------------- the TIFF
def auto_tiff_downsample(slide_hw: tuple[int, int], min_base: int = 2 * TIFF_TILE) -> int:
    """MAX_TIFF_DOWNSAMPLE, halved (down to 1) until the base's longer side is >= min_base."""
    f = MAX_TIFF_DOWNSAMPLE
    while f > 1 and max(math.ceil(slide_hw[0] / f), math.ceil(slide_hw[1] / f)) < min_base:
        f //= 2
    return f


def write_attention_tiff(
    path: str | os.PathLike,
    attention: np.ndarray,
    box: Sequence[int],
    cell_size: float,
    slide_hw: tuple[int, int],
    mpp: float,
    downsample: int | None = None,
    description: dict[str, Any] | None = None,
) -> list[tuple[int, int]]:
    """Write the attention as a tiled (256 px), zlib-compressed, pyramidal uint8 TIFF.

    Args:
        attention: (h', w') cell grid.
        box, cell_size: its placement (module docstring).
        slide_hw: (H, W) of the slide in working pixels: the TIFF covers all of it.
        mpp: working um/px.
        downsample: working pixels per base-level TIFF pixel, f; default
            :func:`auto_tiff_downsample`.
        description: extra entries for the JSON ImageDescription.

    One top-level page per level (as OpenSlide's generic-tiff reader wants), levels
    f 2^l until a level fits in one tile; level l is (ceil(H / (f 2^l)), ceil(W / (f 2^l))).
    Returns the level shapes.
    """
    H, W = int(slide_hw[0]), int(slide_hw[1])
    f = auto_tiff_downsample((H, W)) if downsample is None else int(downsample)
    if f < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    values = attention_to_uint8(attention)  # (h', w')
    factors = [f]
    while max(math.ceil(H / factors[-1]), math.ceil(W / factors[-1])) > TIFF_TILE:
        factors.append(factors[-1] * 2)

    def tiles(d: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        """Row-major (256, 256) tiles of the level with d working px per pixel."""
        for r in range(0, shape[0], TIFF_TILE):
            ys = (np.arange(r, r + TIFF_TILE) + 0.5) * d  # (256,) working y of pixel centres
            for c in range(0, shape[1], TIFF_TILE):
                xs = (np.arange(c, c + TIFF_TILE) + 0.5) * d
                yield sample_attention(values, box, cell_size, ys, xs, outside=0).astype(np.uint8)

    meta = {
        "mpp": mpp * f,
        "working_mpp": mpp,
        "downsample": f,
        "slide_hw": [H, W],
        "box": [int(v) for v in box],
        "cell_size": cell_size,
        "values": "0 = no tissue/outside crop; 1..255 = min..max attention",
    }
    meta.update(description or {})
    shapes = [(math.ceil(H / d), math.ceil(W / d)) for d in factors]
    with atomic_write(path, "wb") as fh, tifffile.TiffWriter(fh, bigtiff=H * W // (f * f) > 2**31) as tif:
        for level, (d, shape) in enumerate(zip(factors, shapes)):
            px_per_cm = 1e4 / (mpp * d)
            tif.write(
                tiles(d, shape),
                shape=shape,
                dtype=np.uint8,
                photometric="minisblack",
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,  # 1 = reduced-resolution copy
                description=json.dumps(meta) if level == 0 else None,
                metadata=None,
            )
    return shapes


# ---------------------------------------------------------------------- the GeoJSON
def top_attention_cells(attention: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """The top-``fraction`` cells (module docstring) and the attention threshold they reach.

    Args:
        attention: (h', w') cell grid; cells with attention > 0 are tissue.
        fraction: in (0, 1].

    Returns:
        (h', w') bool mask of the tissue cells with attention >= t, and t, the attention of
        the ceil(fraction n)-th most attended of the n tissue cells; an all-False mask and
        NaN without tissue.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    a = np.asarray(attention, dtype=np.float64)
    tissue = a > 0
    values = np.sort(a[tissue])[::-1]  # (n,) decreasing
    if values.size == 0:
        return np.zeros(a.shape, dtype=bool), math.nan
    threshold = float(values[max(1, math.ceil(fraction * values.size)) - 1])
    return tissue & (a >= threshold), threshold


def _drop_straight_vertices(ring: np.ndarray) -> np.ndarray:
    """A closed ring (first point repeated last) without the vertices inside horizontal or
    vertical runs.

    Diagonal runs (staircases of cut corners) keep every vertex: each of their segments
    stays inside one half-cell square, where the map to working pixels (affine on each
    half-cell, :func:`_cells_to_working`) keeps it straight; a merged diagonal would cross
    the clipped last cell's kink. Exact on marching-squares vertices (multiples of 1/2).
    """
    pts = ring[:-1]  # (n, 2) open
    before, after = pts - np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0) - pts
    straight = ((before[:, 0] == 0) & (after[:, 0] == 0)) | ((before[:, 1] == 0) & (after[:, 1] == 0))
    kept = pts[~straight]
    return np.vstack([kept, kept[:1]])


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring: > 0 when counter-clockwise with y pointing up."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def region_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Outlines of the True cells of an (h', w') grid, in cell units (module docstring).

    Cell (i, j) is the square [j, j+1) x [i, i+1) in (x, y); its centre (j + 1/2, i + 1/2).

    Returns:
        one polygon per connected region: [exterior, *holes], each ring an (n, 2) float
        array of (x, y) vertices, closed (first point repeated last), multiples of 1/2,
        exterior counter-clockwise and holes clockwise (y up).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D cell grid, got shape {mask.shape}")
    if not mask.any():
        return []
    h, w = mask.shape
    z = np.pad(mask.astype(np.float64), 1)  # a ring of zeros: every outline closes
    xs, ys = np.arange(-1, w + 1) + 0.5, np.arange(-1, h + 1) + 0.5  # cell centres
    points, offsets = contour_generator(xs, ys, z, name="serial", fill_type=FillType.OuterOffset).filled(0.5, 1.5)
    polygons = []
    for pts, offs in zip(points, offsets):
        rings = [_drop_straight_vertices(pts[a:b]) for a, b in zip(offs[:-1], offs[1:])]
        rings = [r if (_signed_area(r) > 0) == (k == 0) else r[::-1] for k, r in enumerate(rings)]
        polygons.append(rings)
    return polygons


def _cells_to_working(u: np.ndarray, start: float, length: float, cell_size: float, n_cells: int) -> np.ndarray:
    """Cell units -> working pixels along one axis, with the last cell clipped to the crop.

    Integer k (a cell edge) -> start + min(k c, length); k + 1/2 (a cell centre) -> the
    middle of the clipped cell k; linear in between.
    """
    edges = np.minimum(np.arange(n_cells + 1) * float(cell_size), float(length))  # (n + 1,)
    nodes = np.empty(2 * n_cells + 1)
    nodes[0::2] = edges
    nodes[1::2] = (edges[:-1] + edges[1:]) / 2
    return start + np.interp(u, np.arange(2 * n_cells + 1) / 2, nodes)


def attention_geojson(
    prediction: SlidePrediction,
    level0_per_working: tuple[float, float],
    top_fractions: Sequence[float] = TOP_FRACTIONS,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the outlines of the top-q cells, q in ``top_fractions``
    (module docstring), in level-0 pixels.

    Args:
        prediction: attention, box and cell_size.
        level0_per_working: (fy, fx) level-0 pixels per working pixel (mpp / mpp_level0).
        top_fractions: each in (0, 1].
    """
    att = np.asarray(prediction.attention)
    y0, x0, h, w = prediction.box
    fy, fx = level0_per_working
    c = prediction.cell_size
    colors = {q: _CONTOUR_COLORS[min(k, len(_CONTOUR_COLORS) - 1)] for k, q in enumerate(sorted(set(top_fractions)))}
    features = []
    for q in top_fractions:
        cells, threshold = top_attention_cells(att, q)
        name = f"attention top {100 * q:g}%"
        for rings in region_polygons(cells):
            coordinates = [
                np.column_stack(
                    [
                        _cells_to_working(r[:, 0], x0, w, c, att.shape[1]) * fx,
                        _cells_to_working(r[:, 1], y0, h, c, att.shape[0]) * fy,
                    ]
                ).tolist()
                for r in rings
            ]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": coordinates},
                    "properties": {
                        "objectType": "annotation",
                        "name": f"{name} (attention >= {threshold:.4g})",
                        "classification": {"name": name, "color": list(colors[q])},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_attention_geojson(
    path: str | os.PathLike,
    prediction: SlidePrediction,
    level0_per_working: tuple[float, float],
    top_fractions: Sequence[float] = TOP_FRACTIONS,
) -> int:
    """Write :func:`attention_geojson` to ``path`` (atomically); returns the number of features."""
    collection = attention_geojson(prediction, level0_per_working, top_fractions)
    with atomic_write(path) as f:
        json.dump(collection, f)
    return len(collection["features"])


# ---------------------------------------------------------------------- the drawing
def _check_grid(attention: np.ndarray, box: Sequence[int], cell_size: float) -> None:
    """The grid must cover the crop exactly: (n - 1) c < crop side <= n c on both axes."""
    for n, side, name in zip(attention.shape, box[2:], ("rows", "columns")):
        if not (n - 1) * cell_size < side <= n * cell_size:
            raise ValueError(
                f"an attention grid of {attention.shape} cells of {cell_size} px does not "
                f"cover a crop of {box[2]}x{box[3]} px ({name}); wrong mpp or attention file?"
            )


def write_heatmap(
    prediction: SlidePrediction,
    out_dir: str | os.PathLike,
    annotation: str | os.PathLike | None = None,
    slide_path: str | os.PathLike | None = None,
    thumbnail_size: int = 1024,
    tiff_downsample: int | None = None,
    top_fractions: Sequence[float] = TOP_FRACTIONS,
) -> dict[str, Any]:
    """Draw a slide's attention into ``out_dir``: ``<id>_heatmap.png``, ``<id>_attention.tif``
    and ``<id>_attention.geojson`` (id = ``prediction.slide_id``).

    Args:
        prediction: from :func:`torch_impl.pipeline.predict.predict_file` (or
            ``predict_slide``), or :func:`~torch_impl.pipeline.predict.load_prediction` of
            a saved ``attention/<id>.npy``.
        out_dir: created if needed.
        annotation, thumbnail_size, tiff_downsample: as the fields of :class:`HeatmapOptions`
            (the ``heatmap`` command's options); the attention AUC (module docstring) goes
            into the result and the PNG title, and the TIFF's levels are
            :func:`write_attention_tiff`'s.
        slide_path: the slide file, when it is no longer where ``prediction.slide_path``
            says; its lower-case stem must be the prediction's slide id.
        top_fractions: the GeoJSON's levels (:func:`attention_geojson`).

    Returns:
        dict with slide_id, prob_tumor, png, tiff, geojson, geojson_features, tiff_levels
        (shapes), tiff_mpp, tiff_downsample, box, cell_size, mpp, and with an annotation
        attention_auc, n_lesion_cells, n_tissue_cells.
    """
    if slide_path is None:
        slide_path = Path(prediction.slide_path)
    else:
        slide_path = Path(slide_path)
        if slide_path.stem.lower() != prediction.slide_id.lower():
            raise ValueError(f"this is the prediction of {prediction.slide_id}, not of {slide_path}")
    out_dir = Path(out_dir)
    slide_id, prob = prediction.slide_id, prediction.prob_tumor
    att, box, cell_size = np.asarray(prediction.attention), tuple(prediction.box), prediction.cell_size
    _check_grid(att, box, cell_size)
    slide = Slide(slide_path, mpp=prediction.mpp)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _, H, W = slide.shape
        thumb = slide.thumbnail(min(thumbnail_size, max(H, W)))  # (h_t, w_t, 3), never upsampled
        scale = (H / thumb.shape[0], W / thumb.shape[1])  # working px per thumbnail px
        on_thumb = attention_on_image(att, box, cell_size, thumb.shape[:2], scale)
        level0_to_working = (slide.mpp_level0[0] / slide.mpp, slide.mpp_level0[1] / slide.mpp)

        result: dict[str, Any] = {
            "slide_id": slide_id,
            "prob_tumor": prob,
            "box": list(box),
            "cell_size": cell_size,
            "mpp": float(slide.mpp),
        }
        title = f"{slide_id}   P(tumour) = {prob:.3f}"
        outlines: list[np.ndarray] = []
        if annotation is not None:
            lesions, holes = read_lesions(annotation)
            result.update(
                attention_auc(att, lesion_fraction(lesions, holes, att.shape, box, cell_size, level0_to_working))
            )
            auc = result["attention_auc"]
            title += (
                f"\nattention AUC, lesion vs other tissue cells: "
                f"{'undefined' if auc is None else f'{auc:.3f}'} "
                f"({result['n_lesion_cells']} of {result['n_tissue_cells']} cells lesion)"
            )
            outlines = _to_grid(lesions, level0_to_working, (0.0, 0.0), 1.0)
            outlines = [p / np.array([scale[1], scale[0]]) for p in outlines]  # (x, y) thumbnail px

        y0, x0, h, w = box
        margin = 0.05 * max(h / scale[0], w / scale[1])
        view = (
            round(y0 / scale[0] - margin),
            round(x0 / scale[1] - margin),
            round(h / scale[0] + 2 * margin),
            round(w / scale[1] + 2 * margin),
        )
        png = out_dir / f"{slide_id}_heatmap.png"
        overlay_attention(thumb, on_thumb, png, title, outlines=outlines, view=view)

        tiff = out_dir / f"{slide_id}_attention.tif"
        f = auto_tiff_downsample((H, W)) if tiff_downsample is None else int(tiff_downsample)
        levels = write_attention_tiff(
            tiff,
            att,
            box,
            cell_size,
            (H, W),
            float(slide.mpp),
            f,
            description={"slide": str(slide_path), "slide_id": slide_id},
        )

        geojson = out_dir / f"{slide_id}_attention.geojson"
        n_features = write_attention_geojson(
            geojson, prediction, (1 / level0_to_working[0], 1 / level0_to_working[1]), top_fractions
        )
    finally:
        slide.close()
    result.update(
        png=str(png),
        tiff=str(tiff),
        geojson=str(geojson),
        geojson_features=n_features,
        tiff_levels=[list(s) for s in levels],
        tiff_mpp=float(slide.mpp) * f,
        tiff_downsample=f,
    )
    logger.info(
        "%s: wrote %s, %s (%d levels, base %g um/px) and %s (%d regions)%s",
        slide_id,
        png,
        tiff,
        len(levels),
        result["tiff_mpp"],
        geojson,
        n_features,
        "" if annotation is None else f"; attention AUC {result['attention_auc']}",
    )
    return result


def main_heatmap(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl heatmap --slide FILE --checkpoint FILE --out DIR`` (:class:`HeatmapOptions`).

    Returns 0. The pipeline's errors propagate: :func:`torch_impl.pipeline.cli.main` reports
    the expected ones in one line (exit status 2).
    """
    parser = OptionParser(
        HeatmapOptions,
        prog=prog or "python -m torch_impl heatmap",
        description="Attention heatmap of one slide: <id>_heatmap.png (thumbnail overlay), "
        "<id>_attention.tif (pyramidal TIFF at slide scale) and <id>_attention.geojson "
        "(contours of the most attended cells, QuPath annotations); with --annotation, "
        "the attention's AUC separating lesion from other tissue.",
        parents=[verbosity_options()],
    )
    opts = parser.parse(argv)
    if opts.attention is not None:
        prediction = load_prediction(opts.attention)
        if opts.mpp is not None and not math.isclose(opts.mpp, prediction.mpp, rel_tol=0.1):
            raise ValueError(f"--mpp {opts.mpp} differs from the {prediction.mpp} um/px the attention was computed at")
    else:
        device = resolve_device(opts.device)
        model, _ = load_model(opts.checkpoint, device=device)
        prediction = predict_file(
            model, opts.slide, trained_mpp(opts.checkpoint, opts.mpp), device, opts.amp, slide_cache=opts.slide_cache
        )
        save_prediction(prediction, opts.out_dir / "attention")  # to redraw without the model
    write_heatmap(
        prediction,
        opts.out_dir,
        annotation=opts.annotation,
        slide_path=opts.slide,
        thumbnail_size=opts.thumbnail_size,
        tiff_downsample=opts.tiff_downsample,
    )
    return 0

"""Attention heatmaps: the head's attention placed back on the slide.

    slide --predict_slide (or a saved attention/<id>.npy + .json)--> attention (h', w')
        --cell -> working pixels -> thumbnail pixels--> <id>_heatmap.png
        --cell -> working pixels / f, tile by tile--> <id>_attention.tif (pyramidal)
        --lesion polygons on the cell grid--> attention AUC, lesion vs other tissue

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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from .checkpoint import load_model
from ..slides import Slide, rasterize_polygons, read_lesions
from .evaluate import SlidePrediction, predict_slide, read_train_config, resolve_device, save_attention
from ..slides.inputs import open_slide_input
from .metrics import roc_auc
from ..models.streaming_clam import StreamingCLAM
from .plots import overlay_attention

__all__ = [
    "attention_auc",
    "attention_to_uint8",
    "cell_index",
    "lesion_fraction",
    "main_heatmap",
    "sample_attention",
    "write_attention_tiff",
    "write_heatmap",
]

logger = logging.getLogger(__name__)

TIFF_TILE = 256  # TIFF tile side, pixels
MAX_TIFF_DOWNSAMPLE = 8  # default working pixels per TIFF pixel at the base level
LESION_FRACTION = 0.5  # a tissue cell is a lesion cell when at least this much of it is lesion
SUBPIXELS = 16  # lesion raster: sub-pixels per cell side (fewer for large grids)
_MAX_SUBGRID = 4096  # longest side of the lesion raster grid


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
    attention: np.ndarray, box: Sequence[int], cell_size: float, out_hw: tuple[int, int],
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
def _to_grid(polygons: Sequence[np.ndarray], level0_to_working: tuple[float, float],
             origin: tuple[float, float], pixel: float) -> list[np.ndarray]:
    """Level-0 (x, y) polygons -> (x, y) in a grid of `pixel` working px starting at `origin` (y, x)."""
    fy, fx = level0_to_working
    return [np.column_stack([(p[:, 0] * fx - origin[1]) / pixel, (p[:, 1] * fy - origin[0]) / pixel])
            for p in (np.asarray(q, dtype=np.float64).reshape(-1, 2) for q in polygons)]


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
    raster = rasterize_polygons(_to_grid(lesions, level0_to_working, origin, pixel), (gh * k, gw * k),
                                1.0, holes=_to_grid(holes, level0_to_working, origin, pixel))
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

    meta = {"mpp": mpp * f, "working_mpp": mpp, "downsample": f, "slide_hw": [H, W],
            "box": [int(v) for v in box], "cell_size": cell_size,
            "values": "0 = no tissue/outside crop; 1..255 = min..max attention"}
    meta.update(description or {})
    shapes = [(math.ceil(H / d), math.ceil(W / d)) for d in factors]
    with tifffile.TiffWriter(path, bigtiff=H * W // (f * f) > 2**31) as tif:
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


# ---------------------------------------------------------------------- the command
def _load_saved(attention: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A saved (h', w') attention and its placement JSON (``evaluate.save_attention``)."""
    npy = Path(attention)
    meta_path = npy.with_suffix(".json")
    if not npy.is_file():
        raise FileNotFoundError(f"attention file not found: {npy}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{npy} has no placement file {meta_path} (written by evaluate "
                                f"beside it); without it the map cannot be placed on the slide")
    meta = json.loads(meta_path.read_text())
    return np.load(npy), meta


def _check_grid(attention: np.ndarray, box: Sequence[int], cell_size: float) -> None:
    """The grid must cover the crop exactly: (n - 1) c < crop side <= n c on both axes."""
    for n, side, name in zip(attention.shape, box[2:], ("rows", "columns")):
        if not (n - 1) * cell_size < side <= n * cell_size:
            raise ValueError(f"an attention grid of {attention.shape} cells of {cell_size} px does not "
                             f"cover a crop of {box[2]}x{box[3]} px ({name}); wrong mpp or attention file?")


def write_heatmap(
    checkpoint_or_model: str | os.PathLike | StreamingCLAM | None,
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    annotation: str | os.PathLike | None = None,
    mpp: float | None = None,
    device: str | torch.device | None = None,
    attention: str | os.PathLike | None = None,
    thumbnail_size: int = 1024,
    tiff_downsample: int | None = None,
    amp: bool | None = None,
) -> dict[str, Any]:
    """Draw a slide's attention: ``<id>_heatmap.png`` and ``<id>_attention.tif`` in ``out_dir``.

    Args:
        checkpoint_or_model: a checkpoint file (``load_model``; its ``train_config["mpp"]``
            is the default mpp) or a StreamingCLAM (then ``mpp`` is required; the model
            is used where it is). Unused (may be None) when ``attention`` is given.
        slide_path: the slide file. Its id is the file's lower-case stem.
        out_dir: created if needed.
        annotation: ASAP XML lesion annotation: adds the attention AUC of lesion vs other
            tissue cells (module docstring) to the result and the PNG title, and outlines
            the lesions on the PNG.
        mpp: working resolution in um/px.
        device: where to run a checkpoint's model; default the first GPU, else the CPU.
        attention: a saved ``attention/<id>.npy`` from ``evaluate_run``; its ``.json``
            beside it gives the placement, mpp and P(tumour), and no model is run.
        thumbnail_size: longest side of the PNG's thumbnail, pixels.
        tiff_downsample: working pixels per base-level TIFF pixel (see
            :func:`write_attention_tiff`).
        amp: bfloat16 autocast of the trunk; default on CUDA only.

    Also writes ``attention/<id>.npy`` + ``.json`` in ``out_dir`` when it runs the model,
    so the map can be redrawn without it.

    Returns:
        dict with slide_id, prob_tumor, png, tiff, tiff_levels (shapes), tiff_mpp,
        tiff_downsample, box, cell_size, mpp, and with an annotation attention_auc,
        n_lesion_cells, n_tissue_cells.
    """
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    slide_id = slide_path.stem.lower()
    if attention is not None:
        att, meta = _load_saved(attention)
        if mpp is not None and not math.isclose(float(mpp), float(meta["mpp"]), rel_tol=0.1):
            raise ValueError(f"mpp {mpp} differs from the {meta['mpp']} um/px the attention was computed at")
        if meta.get("slide_id", slide_id) != slide_id:
            raise ValueError(f"{attention} is the attention of {meta['slide_id']}, not of {slide_path}")
        box, cell_size, prob = tuple(meta["box"]), meta["cell_size"], meta.get("prob_tumor")
        pred: SlidePrediction | None = None
        slide = Slide(slide_path, mpp=float(meta["mpp"]))
    else:
        if isinstance(checkpoint_or_model, StreamingCLAM):
            if mpp is None:
                raise ValueError("pass mpp with a model (a checkpoint records its own)")
            model, dev = checkpoint_or_model, device
        elif checkpoint_or_model is not None:
            if mpp is None:
                mpp = read_train_config(checkpoint_or_model).get("mpp")
                if mpp is None:
                    raise ValueError(f"{checkpoint_or_model}: train_config has no 'mpp'; pass mpp")
            dev = resolve_device(device)
            model, _ = load_model(checkpoint_or_model, device=dev)
        else:
            raise ValueError("give a checkpoint, a model, or a saved attention file")
        slide_input = open_slide_input(slide_path, mpp=float(mpp), rng=None)
        try:
            run_on = torch.device(dev) if dev is not None else next(model.parameters()).device
            use_amp = run_on.type == "cuda" if amp is None else amp
            pred = predict_slide(model, slide_input, run_on, use_amp, slide_id=slide_id)
        except BaseException:
            slide_input.close()
            raise
        slide = slide_input.slide
        att, box, cell_size, prob = pred.attention, pred.box, pred.cell_size, pred.prob_tumor

    try:
        _check_grid(att, box, cell_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        if pred is not None:
            save_attention(pred, out_dir / "attention", slide_path=str(slide_path))
        _, H, W = slide.shape
        thumb = slide.thumbnail(min(thumbnail_size, max(H, W)))  # (h_t, w_t, 3), never upsampled
        scale = (H / thumb.shape[0], W / thumb.shape[1])  # working px per thumbnail px
        on_thumb = attention_on_image(att, box, cell_size, thumb.shape[:2], scale)
        level0_to_working = (slide.mpp_level0[0] / slide.mpp, slide.mpp_level0[1] / slide.mpp)

        result: dict[str, Any] = {"slide_id": slide_id, "prob_tumor": prob, "box": list(box),
                                  "cell_size": cell_size, "mpp": float(slide.mpp)}
        title = slide_id + ("" if prob is None else f"   P(tumour) = {prob:.3f}")
        outlines: list[np.ndarray] = []
        if annotation is not None:
            lesions, holes = read_lesions(annotation)
            result.update(attention_auc(att, lesion_fraction(lesions, holes, att.shape, box, cell_size,
                                                             level0_to_working)))
            auc = result["attention_auc"]
            title += (f"\nattention AUC, lesion vs other tissue cells: "
                      f"{'undefined' if auc is None else f'{auc:.3f}'} "
                      f"({result['n_lesion_cells']} of {result['n_tissue_cells']} cells lesion)")
            outlines = _to_grid(lesions, level0_to_working, (0.0, 0.0), 1.0)
            outlines = [p / np.array([scale[1], scale[0]]) for p in outlines]  # (x, y) thumbnail px

        y0, x0, h, w = box
        margin = 0.05 * max(h / scale[0], w / scale[1])
        view = (round(y0 / scale[0] - margin), round(x0 / scale[1] - margin),
                round(h / scale[0] + 2 * margin), round(w / scale[1] + 2 * margin))
        png = out_dir / f"{slide_id}_heatmap.png"
        overlay_attention(thumb, on_thumb, png, title, outlines=outlines, view=view)

        tiff = out_dir / f"{slide_id}_attention.tif"
        f = auto_tiff_downsample((H, W)) if tiff_downsample is None else int(tiff_downsample)
        levels = write_attention_tiff(tiff, att, box, cell_size, (H, W), float(slide.mpp), f,
                                      description={"slide": str(slide_path), "slide_id": slide_id})
    finally:
        slide.close()
    result.update(png=str(png), tiff=str(tiff), tiff_levels=[list(s) for s in levels],
                  tiff_mpp=float(slide.mpp) * f, tiff_downsample=f)
    logger.info("%s: wrote %s and %s (%d levels, base %g um/px)%s", slide_id, png, tiff, len(levels),
                result["tiff_mpp"], "" if annotation is None else
                f"; attention AUC {result['attention_auc']}")
    return result


def main_heatmap(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m torch_impl heatmap --slide FILE --checkpoint FILE --out DIR``. Returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_impl heatmap",
        description="Attention heatmap of one slide: <id>_heatmap.png (thumbnail overlay) and "
                    "<id>_attention.tif (pyramidal TIFF at slide scale); with --annotation, the "
                    "attention's AUC separating lesion from other tissue.",
    )
    parser.add_argument("--slide", type=Path, required=True, help="slide file")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="training checkpoint (not needed with --attention)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--annotation", type=Path, default=None, help="ASAP XML lesion annotation")
    parser.add_argument("--mpp", type=float, default=None,
                        help="working resolution in um/px (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--attention", type=Path, default=None,
                        help="saved attention/<id>.npy from evaluate (skips the model)")
    parser.add_argument("--thumbnail-size", type=int, default=1024, help="PNG thumbnail's longest side")
    parser.add_argument("--tiff-downsample", type=int, default=None,
                        help="working pixels per base TIFF pixel (default 8, less for small slides)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: on for CUDA)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.attention is None:
        parser.error("give --checkpoint, or --attention with a saved attention map")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_heatmap(args.checkpoint, args.slide, args.out, annotation=args.annotation, mpp=args.mpp,
                  device=args.device, attention=args.attention, thumbnail_size=args.thumbnail_size,
                  tiff_downsample=args.tiff_downsample, amp=args.amp)
    return 0

"""Tissue detection on slide thumbnails, and the boxes and grids derived from it.

Stained tissue is coloured; glass background is white or grey. In HSV the saturation
S = (max(R,G,B) - min(R,G,B)) / max(R,G,B) separates them well, and Otsu's threshold picks
the cut between the two histogram modes without a hand-tuned constant. Small specks (dust,
debris) are dropped and small holes filled with connected-component labelling.

Three coordinate grids appear here; every function says which it uses:
  * thumbnail pixels: the mask, (h, w);
  * working pixels: the slide at its working mpp, (H, W) = slide.shape[1:];
    thumbnail pixel (i, j) covers working pixels [i sy, (i+1) sy) x [j sx, (j+1) sx)
    with scale (sy, sx) = (H / h, W / w) (see `Slide.thumbnail`);
  * feature-map positions: the CNN's output grid over a crop, (H', W').
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: 8-connectivity: diagonal neighbours belong to the same tissue piece.
_EIGHT = np.ones((3, 3), dtype=bool)

Box = tuple[int, int, int, int]  # (y, x, h, w): top-left corner and size, in pixels


class NoTissueError(ValueError):
    """No tissue found: the tissue mask is empty, or the image has no colour to find it by."""


#: A thumbnail is "colourless" when 99.9% of its pixels have a saturation at most
#: min_saturation, and "has content" when its brightness spans more than this (0..1) between
#: its 1% and 99% quantiles: both together mean a grayscale (or unstained) image with
#: something on it, which saturation-based detection cannot see. Blank glass has no content.
_CONTENT_SPAN = 0.1


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an (h, w, 3) uint8 RGB image: (h, w) float64 in [0, 1].

    S = (max - min) / max over the three channels, and 0 where max = 0 (black).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB image, got shape {rgb.shape}")
    c = rgb.astype(np.float64)
    mx, mn = c.max(axis=2), c.min(axis=2)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold (Otsu 1979) of a sample: the cut t maximising between-class variance.

    With histogram probabilities p_k at bin centres c_k, for a cut after bin k:
        w0 = sum_{i<=k} p_i,  w1 = 1 - w0,  m0 = sum_{i<=k} p_i c_i,  mT = sum_i p_i c_i
        sigma_b^2(k) = (mT w0 - m0)^2 / (w0 w1)
    Returns the upper edge of the best bin k: values > t form the upper class.
    Returns value_range[1] for a sample with fewer than two occupied bins (no cut exists).
    """
    hist, edges = np.histogram(np.ravel(values), bins=bins, range=value_range)
    p = hist / max(hist.sum(), 1)
    c = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)
    w1 = 1.0 - w0
    m0 = np.cumsum(p * c)
    mT = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mT * w0 - m0) ** 2 / (w0 * w1)
    sigma_b[~np.isfinite(sigma_b) | (w0 <= 0) | (w1 <= 1e-12)] = -1.0
    if sigma_b.max() < 0:
        return float(value_range[1])
    return float(edges[int(np.argmax(sigma_b)) + 1])


def tissue_mask(
    rgb_thumbnail: np.ndarray,
    min_area: int = 64,
    max_hole_area: int = 64,
    min_saturation: float = 0.05,
) -> np.ndarray:
    """Boolean tissue mask (h, w) of an (h, w, 3) uint8 RGB thumbnail.

    1. S = HSV saturation; tissue = S > max(Otsu(S), min_saturation). The floor keeps a
       blank slide (only background, whose S is noise around 0.0-0.03) from being split
       in two by Otsu.
    2. Drop 8-connected tissue pieces of fewer than `min_area` thumbnail pixels.
    3. Fill holes (background pieces not touching the border) of at most `max_hole_area`
       thumbnail pixels; larger holes (fat, lumina) stay background.
    Areas are in thumbnail pixels, so choose them for the thumbnail's scale.

    Raises:
        NoTissueError: the image is grayscale (or unstained) but not blank: detection by
            saturation cannot work on it, so the message says so instead of returning an
            empty mask that would read as "blank slide". A blank image gives an empty mask.
    """
    s = saturation(rgb_thumbnail)
    if np.quantile(s, 0.999) <= min_saturation:
        value = rgb_thumbnail.max(axis=2) / 255.0  # HSV value
        lo, hi = np.quantile(value, [0.01, 0.99])
        if hi - lo > _CONTENT_SPAN:
            raise NoTissueError(
                f"the image has no colour saturation (99.9% of its pixels have HSV saturation <= {min_saturation}) "
                f"but does have content (brightness from {lo:.2f} to {hi:.2f}): a grayscale or unstained scan? "
                f"Tissue detection finds stained tissue by its saturation; give an RGB scan of the stained slide"
            )
    t = max(otsu_threshold(s), min_saturation)
    mask = s > t

    labels, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)  # sizes[0] = background
    keep = sizes >= min_area
    keep[0] = False
    mask = keep[labels]

    holes, n_holes = ndimage.label(~mask)  # 4-connected background pieces
    hole_sizes = np.bincount(holes.ravel(), minlength=n_holes + 1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = hole_sizes <= max_hole_area
    fill[0] = False  # label 0 is tissue itself
    fill[border] = False  # background connected to the border is not a hole
    mask |= fill[holes]
    logger.debug("tissue_mask: threshold %.3f, %d pieces kept, %.1f%% tissue", t, int(keep.sum()), 100 * mask.mean())
    return mask


def _pair(v: float | tuple[float, float]) -> tuple[float, float]:
    return (float(v), float(v)) if np.isscalar(v) else (float(v[0]), float(v[1]))


def tissue_bbox(
    mask: np.ndarray,
    scale: float | tuple[float, float],
    limit_hw: tuple[int, int] | None = None,
) -> Box:
    """Bounding box (y, x, h, w) of the tissue, in working pixels.

    `scale` = working pixels per mask pixel, one number or (sy, sx). Mask rows
    [i0, i1) become working rows [floor(i0 sy), ceil(i1 sy)), so the box contains every
    working pixel under a tissue mask pixel. `limit_hw` = (H, W) clips the box to the image.

    Raises NoTissueError if the mask is empty.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise NoTissueError(
            "the tissue mask is empty; lower tissue_mask's min_saturation or min_area, or "
            "check that the slide is not blank"
        )
    sy, sx = _pair(scale)
    y0, y1 = math.floor(rows[0] * sy), math.ceil((rows[-1] + 1) * sy)
    x0, x1 = math.floor(cols[0] * sx), math.ceil((cols[-1] + 1) * sx)
    if limit_hw is not None:
        y0, x0 = max(y0, 0), max(x0, 0)
        y1, x1 = min(y1, limit_hw[0]), min(x1, limit_hw[1])
    return (y0, x0, y1 - y0, x1 - x0)


def crop_box(bbox: Box, max_size: int = 65536, rng: np.random.Generator | None = None) -> Box:
    """Limit a box (y, x, h, w) to at most `max_size` pixels per side.

    Training (`rng` given): along an axis longer than `max_size`, a window of `max_size`
    is drawn uniformly inside the box, a cheap augmentation that also bounds the work.
    Evaluation (`rng` None): the box is returned unchanged, whatever its size, so
    evaluation always covers the whole tissue and is deterministic (the reference
    implementation crops test slides at random instead).
    """
    y, x, h, w = (int(v) for v in bbox)
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if rng is None:
        return (y, x, h, w)
    if h > max_size:
        y, h = y + int(rng.integers(0, h - max_size + 1)), max_size
    if w > max_size:
        x, w = x + int(rng.integers(0, w - max_size + 1)), max_size
    return (y, x, h, w)


def mask_at_resolution(
    mask: np.ndarray,
    out_hw: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resample a boolean mask to a coarser grid: a cell is True if any True pixel falls in it.

    Args:
        mask: (h, w) bool, e.g. the thumbnail tissue mask.
        out_hw: (H', W'), e.g. the feature-map grid.
        box: (y, x, bh, bw) in mask pixels (fractions allowed): the part of the mask that
            the output grid spans; default the whole mask. Output cell (i, j) covers mask
            rows [y + i bh/H', y + (i+1) bh/H') and the matching columns; every mask pixel
            touched by that interval counts. Cells outside the mask are False.
            For a crop (y0, x0, Hc, Wc) in working pixels whose feature map has stride S
            and a mask with scale (sy, sx): box = (y0/sy, x0/sx, H' S/sy, W' S/sx).

    Returns:
        (H', W') bool.

    Counting uses a summed-area table: count = I[r1, c1] - I[r0, c1] - I[r1, c0] + I[r0, c0].
    """
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_hw must be positive, got {out_hw}")
    h, w = mask.shape
    by, bx, bh, bw = box if box is not None else (0.0, 0.0, float(h), float(w))
    eps = 1e-9  # an edge that lands on a pixel boundary must not touch the next pixel

    def spans(start: float, length: float, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        e = start + np.arange(n + 1) * (length / n)  # (n+1,) cell edges in mask pixels
        lo = np.floor(e[:-1] + eps).astype(np.int64)
        hi = np.maximum(np.ceil(e[1:] - eps).astype(np.int64), lo + 1)
        return np.clip(lo, 0, size), np.clip(hi, 0, size)

    r0, r1 = spans(by, bh, out_h, h)  # (H',)
    c0, c1 = spans(bx, bw, out_w, w)  # (W',)
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    count = (
        integral[np.ix_(r1, c1)] - integral[np.ix_(r0, c1)] - integral[np.ix_(r1, c0)] + integral[np.ix_(r0, c0)]
    )  # (H', W')
    return count > 0

"""Drawing helpers shared by the tutorials (kept out of the package: they only draw).

Coordinates are image pixels: x is the column, y the row, row 0 at the top (as ``imshow``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from reference.tiling import AxisTile, TilePlan

__all__ = ["owned_pixels", "draw_tile_plan", "box_average", "draw_outline"]


def owned_pixels(axis_tile: AxisTile, n: int) -> tuple[int, int]:
    """Input pixels ``[j0 S, min(j1 S, n))`` under a tile's owned block ``[j0, j1)`` on one axis.

    These strips partition ``[0, n)``: they show which part of the image a tile answers for,
    while the tile itself reads a halo around them.
    """
    S = axis_tile.stride
    return axis_tile.out_start * S, min(axis_tile.out_stop * S, n)


def draw_tile_plan(
    ax, plan: TilePlan, image: np.ndarray | None = None, outline: Sequence[int] = (), numbers: bool = True
) -> None:
    """Draw ``plan`` on ``ax``: every owned block filled, chosen tiles' input regions outlined.

    Args:
        ax: a matplotlib Axes.
        plan: the tile plan; tile ``k`` is ``plan.tiles[k]`` (row-major).
        image: optional (H, W) or (H, W, 3) array drawn underneath.
        outline: indices of tiles whose input region is outlined and owned block hatched.
        numbers: write each tile's index in its owned block.
    """
    H, W = plan.image_size
    if image is not None:
        ax.imshow(image, extent=(0, W, H, 0), cmap="gray" if image.ndim == 2 else None)
    colours = plt.get_cmap("tab10").colors
    n_cols = len(plan.cols)
    for k, tile in enumerate(plan.tiles):
        # one colour per tile, different from its right and lower neighbours'
        colour = colours[(k // n_cols + 2 * (k % n_cols)) % len(colours)]
        (r0, r1), (c0, c1) = owned_pixels(tile.row, H), owned_pixels(tile.col, W)
        chosen = k in outline
        ax.add_patch(
            Rectangle(
                (c0, r0),
                c1 - c0,
                r1 - r0,
                facecolor=colour,
                edgecolor="none",
                alpha=0.5 if chosen else 0.3,
                hatch="//" if chosen else None,
            )
        )
        if numbers:
            ax.text((c0 + c1) / 2, (r0 + r1) / 2, str(k), ha="center", va="center", fontsize=9)
        if chosen:
            ax.add_patch(
                Rectangle(
                    (tile.col.start, tile.row.start),
                    tile.col.length,
                    tile.row.length,
                    fill=False,
                    edgecolor=colour,
                    linewidth=2.5,
                    zorder=3,
                    clip_on=False,
                )
            )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("column (input pixels)")
    ax.set_ylabel("row (input pixels)")


def box_average(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample ``image`` by ``factor`` on both axes: each output pixel is the mean of a
    ``factor`` x ``factor`` block (a box filter, as a slide pyramid's levels are made).

    Args:
        image: (H, W) or (H, W, C), any numeric dtype; H and W must be multiples of ``factor``.
        factor: integer >= 1.

    Returns:
        (H / factor, W / factor[, C]) float64.
    """
    H, W = image.shape[:2]
    if factor < 1 or H % factor or W % factor:
        raise ValueError(f"image {H} x {W} does not split into {factor} x {factor} blocks; crop it to a multiple first")
    blocks = np.asarray(image, dtype=np.float64).reshape(H // factor, factor, W // factor, factor, *image.shape[2:])
    return blocks.mean(axis=(1, 3))


def draw_outline(ax, polygon: np.ndarray, scale: float = 1.0, offset: Sequence[float] = (0.0, 0.0), **style) -> None:
    """Draw a closed (N, 2) (x, y) outline on ``ax`` at ``(polygon - offset) * scale``.

    ``offset`` is in the polygon's units (e.g. the level-0 corner of a crop), ``scale`` turns
    them into the axes' units (e.g. 0.25 for level-0 pixels at 0.25 um/px onto an axis in um).
    ``style`` goes to ``ax.plot`` (default: a thin black line).
    """
    xy = (np.vstack([polygon, polygon[:1]]) - np.asarray(offset, dtype=np.float64)) * scale  # (N + 1, 2)
    ax.plot(xy[:, 0], xy[:, 1], **{"color": "black", "lw": 1.0, **style})

"""Drawing helpers shared by the tutorials (kept out of the package: they only draw).

Coordinates are image pixels: x is the column, y the row, row 0 at the top (as ``imshow``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from reference.tiling import AxisTile, TilePlan

__all__ = ["owned_pixels", "draw_tile_plan"]


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

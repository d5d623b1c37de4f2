"""Figure helpers shared by evaluation, heatmaps and the tutorials.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, not
through ``pyplot``: no global backend switch, no figure registry to leak memory over
hundreds of slides, and it works headless (servers, CI). Each helper returns the figure
(a notebook displays it) and writes a PNG when given a path.

Image coordinates follow the thumbnails: (h, w) arrays, row 0 at the top, and outlines as
(N, 2) arrays of (x, y) in the same pixel grid (x to the right, y down).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runtime import atomic_write

__all__ = ["plot_roc", "overlay_attention"]


def _save(fig: Figure, path: str | os.PathLike | None, dpi: int) -> None:
    """Write the figure to ``path`` (format from its suffix, PNG by default), whole or not at all."""
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with atomic_write(path, "wb", what="figure") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")


def plot_roc(
    fpr: np.ndarray,
    tpr: np.ndarray,
    auc: float,
    path: str | os.PathLike | None = None,
    ci: tuple[float, float] | None = None,
    title: str = "ROC",
    dpi: int = 120,
) -> Figure:
    """ROC curve, the chance diagonal, and the AUC (with its CI) in the legend.

    Args:
        fpr, tpr: (n,) false- and true-positive rates of the curve's points, in threshold
            order from (0, 0) to (1, 1) (see :func:`torch_impl.pipeline.evaluate.roc_curve`).
        auc: area under the curve.
        path: PNG file to write, or None.
        ci: (low, high) confidence interval of the AUC, shown in the legend if given.
    """
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape} and {tpr.shape}")
    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    label = f"AUC = {auc:.3f}"
    if ci is not None:
        label += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    # Straight segments between the points: a tie between a positive and a negative score
    # is a diagonal step, and the area under the segments is then the AUC (ties count 1/2).
    ax.plot(fpr, tpr, lw=2, color="C0", label=label)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.5", label="chance")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path, dpi)
    return fig


def overlay_attention(
    thumbnail: np.ndarray,
    attention_on_thumb: np.ndarray,
    path: str | os.PathLike | None = None,
    title: str = "",
    outlines: Sequence[np.ndarray] = (),
    view: tuple[int, int, int, int] | None = None,
    alpha: float = 0.5,
    cmap: str = "turbo",
    colorbar_label: str = "attention / max attention",
    dpi: int = 150,
) -> Figure:
    """A thumbnail with attention drawn over it as a semi-transparent colour map.

    Args:
        thumbnail: (h, w, 3) uint8 RGB.
        attention_on_thumb: (h, w) float, the attention at every thumbnail pixel; NaN or
            values <= 0 are left uncoloured (background, outside the analysed crop). It is
            shown divided by its maximum, so the colour scale runs from 0 to 1.
        path: PNG file to write, or None.
        title: figure title.
        outlines: polygons to outline (e.g. annotated lesions), each (N, 2) of (x, y) in
            thumbnail pixels.
        view: (y, x, h, w) thumbnail region to show (e.g. the tissue box); default all.
        alpha: opacity of the colour map.
    """
    thumbnail = np.asarray(thumbnail)
    att = np.asarray(attention_on_thumb, dtype=float)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"thumbnail must be (h, w, 3) RGB, got shape {thumbnail.shape}")
    if att.shape != thumbnail.shape[:2]:
        raise ValueError(f"attention_on_thumb must be {thumbnail.shape[:2]} like the thumbnail, got {att.shape}")
    shown = np.ma.masked_where(~(att > 0), att)  # NaN compares False: masked too
    if shown.count():
        shown = shown / shown.max()

    h, w = att.shape
    fig = Figure(figsize=(7.0, 7.0 * h / w + 0.6) if w >= h else (7.0 * w / h + 1.2, 7.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(thumbnail, interpolation="nearest")
    im = ax.imshow(shown, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
    for poly in outlines:
        xy = np.asarray(poly, dtype=float).reshape(-1, 2)
        closed = np.vstack([xy, xy[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color="black", lw=1.2)
    if view is not None:
        y, x, vh, vw = view
        ax.set_xlim(x - 0.5, x + vw - 0.5)
        ax.set_ylim(y + vh - 0.5, y - 0.5)  # image convention: y grows downwards
    ax.set_axis_off()
    ax.set_title(title, fontsize="medium")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.solids.set_alpha(1.0)
    cbar.set_label(colorbar_label)
    _save(fig, path, dpi)
    return fig

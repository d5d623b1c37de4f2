"""From a slide file to what the model eats: a lazy tissue crop and a tissue mask on the feature grid.

    slide file --Slide(mpp)--> lazy (3, H, W) at the working resolution
        --thumbnail + Otsu--> tissue mask --bounding box, crop_box--> RegionView (3, h, w)
        --after the trunk--> tissue mask on the (h', w') feature grid for the head

Training passes an ``rng``: a crop larger than ``max_size`` becomes a random ``max_size``
window inside the tissue. Evaluation passes none: the whole tissue, deterministically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .slide import RegionView, Slide
from .tissue import crop_box, mask_at_resolution, tissue_bbox, tissue_mask

__all__ = ["SlideInput", "open_slide_input"]


@dataclass(frozen=True)
class SlideInput:
    """A slide prepared for the model.

    Attributes:
        slide: the open slide (working resolution ``slide.mpp`` um/px).
        source: lazy (3, h, w) uint8 view of the crop, the trunk's input.
        box: (y, x, h, w) of the crop in working pixels.
        thumbnail_mask: (h_t, w_t) bool tissue mask of the thumbnail.
        scale: (sy, sx) working pixels per thumbnail pixel.
    """

    slide: Slide
    source: RegionView
    box: tuple[int, int, int, int]
    thumbnail_mask: np.ndarray
    scale: tuple[float, float]

    def feature_mask(self, feature_hw: tuple[int, int], stride: int) -> torch.Tensor:
        """(1, h', w') bool: which feature-map positions (total stride ``stride``) hold tissue."""
        y0, x0, _, _ = self.box
        sy, sx = self.scale
        h, w = feature_hw
        box = (y0 / sy, x0 / sx, h * stride / sy, w * stride / sx)
        return torch.from_numpy(mask_at_resolution(self.thumbnail_mask, (h, w), box))[None]

    def close(self) -> None:
        self.slide.close()


def open_slide_input(
    path: str | os.PathLike,
    mpp: float = 0.5,
    max_size: int = 65536,
    rng: np.random.Generator | None = None,
    thumbnail_size: int = 1024,
) -> SlideInput:
    """Open a slide, find its tissue and crop to it (never reading the slide whole).

    Args:
        path: slide file (any format OpenSlide reads).
        mpp: working resolution in micrometres per pixel.
        max_size: largest crop side in working pixels; larger tissue is cropped at random
            when ``rng`` is given (training), kept whole otherwise (evaluation).
        rng: random generator for training crops; None for deterministic evaluation.
        thumbnail_size: longest side of the thumbnail used for tissue detection.

    Raises:
        FileNotFoundError, SlideError: the file is missing or unreadable.
        NoTissueError: no tissue was found.
    """
    slide = Slide(path, mpp=mpp)
    try:
        _, H, W = slide.shape
        thumb = slide.thumbnail(min(thumbnail_size, max(H, W)))  # (h_t, w_t, 3), never upscaled
        mask = tissue_mask(thumb)
        scale = (H / mask.shape[0], W / mask.shape[1])
        box = crop_box(tissue_bbox(mask, scale, limit_hw=(H, W)), max_size=max_size, rng=rng)
    except Exception:
        slide.close()
        raise
    return SlideInput(slide, RegionView(slide, *box), tuple(int(v) for v in box), mask, scale)

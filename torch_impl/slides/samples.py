"""The real H&E sample slide shipped with the package, and a small in-memory copy of it.

``data/cmu_small_region.svs`` is an Aperio SVS of 2220 x 2967 pixels (columns x rows) at
0.499 um per pixel, a crop of the OpenSlide test slide CMU-1 (Carnegie Mellon University),
public domain under CC0 1.0; ``data/README.md`` records its source, licence and SHA-256.
The tests and the tutorials read it from here, so nothing has to be downloaded or installed.

    sample_slide_path()     the file (open it with OpenSlide or ``torch_impl.slides.Slide``)
    load_he_sample(factor)  the whole slide as an (H, W, 3) float array in [0, 1],
                            averaged over factor x factor pixel blocks
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openslide

__all__ = ["SAMPLE_SLIDE_SHA256", "load_he_sample", "sample_slide_path"]

logger = logging.getLogger(__name__)

#: SHA-256 of the shipped sample slide (also in ``data/README.md``).
SAMPLE_SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"

_SAMPLE = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"


def sample_slide_path() -> Path:
    """Path of the shipped CC0 H&E sample slide ``cmu_small_region.svs``.

    Raises:
        FileNotFoundError: the file is not installed (a copy of the package without its
            package data); reinstall the project, e.g. ``pip install -e .``.
    """
    if not _SAMPLE.is_file():
        raise FileNotFoundError(
            f"the sample slide {_SAMPLE} is missing: the package was installed without its data "
            "files; reinstall the project (pip install -e . from the repository root)"
        )
    return _SAMPLE


def load_he_sample(factor: int = 4) -> np.ndarray:
    """The sample slide as an (H, W, 3) float64 RGB array in [0, 1], block-averaged.

    Level 0 (2967 rows x 2220 columns, 0.499 um/px) is read whole, scaled to [0, 1]
    (uint8 / 255), cut to a multiple of ``factor`` in each direction (the last
    ``H0 mod factor`` rows and ``W0 mod factor`` columns are dropped) and averaged over
    non-overlapping factor x factor blocks: output pixel (i, j) is the mean of level-0 pixels
    [i f, (i+1) f) x [j f, (j+1) f). So H = 2967 // factor and W = 2220 // factor, at
    0.499 * factor um per pixel; the default factor 4 gives (741, 555, 3) at about 2 um/px.

    Args:
        factor: block side in level-0 pixels, an integer >= 1 (1 = full resolution).

    Raises:
        ValueError: ``factor`` is not an integer >= 1, or larger than the slide.
        FileNotFoundError: see :func:`sample_slide_path`.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1 (level-0 pixels per block side), got {factor!r}")
    factor = int(factor)
    with openslide.OpenSlide(str(sample_slide_path())) as slide:
        width, height = slide.dimensions  # OpenSlide gives (columns, rows)
        if factor > min(width, height):
            raise ValueError(f"factor {factor} is larger than the sample slide ({height} x {width} pixels)")
        rgba = slide.read_region((0, 0), 0, (width, height))  # PIL image, (x, y) = (column, row)
    rgb = np.asarray(rgba.convert("RGB"), dtype=np.float64) / 255  # (H0, W0, 3)
    h, w = height // factor, width // factor
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    logger.debug("sample slide %d x %d px, averaged over %d x %d blocks -> %d x %d",
                 height, width, factor, factor, h, w)
    return blocks.mean(axis=(1, 3))  # (h, w, 3)

